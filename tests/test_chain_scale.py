"""A chain: a store broker bridged into a central broker with a per-store prefix. A register
at head office (on the central broker) pays through a store's terminal."""

from __future__ import annotations

import json

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, Scenario

from .broker import Mosquitto
from .rig import POI, ROOT, Subscriber, outcome_for

STORE = "poi/store-12"


def store_bridge_config(central: Mosquitto) -> str:
    """The documented example, pointed at the test's central broker (no TLS here)."""
    lines = []
    for line in (ROOT / "examples" / "mosquitto" / "store-bridge.conf").read_text().splitlines():
        if line.startswith(("address", "bridge_cafile", "bridge_certfile", "bridge_keyfile")):
            continue
        lines.append(line)
        if line.startswith("connection "):
            lines.append(f"address {central.host}:{central.port}")
    return "\n".join(lines) + "\n"


async def test_register_on_the_central_broker_pays_through_a_store(tmp_path):
    central = Mosquitto(tmp_path / "central").start()
    store = Mosquitto(tmp_path / "store", extra_config=store_bridge_config(central)).start()
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05)),
                                ack_timeout=0.3)
    device = await simulator.start_pty(tmp_path / "terminal")
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": store.host, "port": store.port, "base_topic": "poi-bridge"},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device}}],
    }))
    await bridge.start()
    try:
        async with Subscriber(central, [f"{STORE}/#"], client_id="head-office") as office:
            # The store's retained states reach head office under the store's prefix.
            await office.wait_for(lambda t, p: t == f"{STORE}/bridge/state"
                                  and p == {"state": "online"}, timeout=20)
            await office.wait_for(lambda t, p: t == f"{STORE}/terminals/{POI}/state"
                                  and p["state"] == "online", timeout=20)
            request = responses.payment_request("HQ-TILL", "C1", POI, 19.3)
            await office.publish(f"{STORE}/terminals/{POI}/request", json.dumps(request))
            answer = await office.wait_for(outcome_for("C1"), timeout=20)
            assert answer["bridge"]["outcome"] == "approved"
            assert any(t == f"{STORE}/registers/HQ-TILL/response" for t, _, _ in office.messages)
            retained = await office.wait_for(
                lambda t, p: t == f"{STORE}/transactions/HQ-TILL/C1" and p.get("state") == "final")
            assert retained["bridge"]["transaction"]["poi_id"] == POI
    finally:
        await bridge.stop()
        await simulator.close()
        store.kill()
        central.kill()

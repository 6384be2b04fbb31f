"""Another bridge on the same topics: two daemons on one broker and one base_topic (a second
box, a test install left running) both took a register's request and both charged it. Each
now sees the other in {base}/bridge/state and refuses new requests while it is there (see
bridge.daemon.peers); a previous run of its own, or another store behind a chain bridge, is
not another bridge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, Scenario

from .broker import Mosquitto
from .follow_rig import wait_until
from .rig import POI, Daemon, Simulator, Subscriber, outcome_for, write_config
from .test_chain_scale import Store, arrives

BASE = "poi/two"
REQUEST = f"{BASE}/terminals/{POI}/request/TILL1"


@contextlib.asynccontextmanager
async def a_bridge(workdir: Path, broker: Any, client_id: str) -> AsyncIterator[
        tuple[Bridge, SimulatorServer]]:
    """A bridge with its own journal, client id and simulated terminal (same POIID); the
    same `workdir` again is the same journal on a second run (a box that comes back)."""
    workdir.mkdir(exist_ok=True)
    terminal = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05)),
                               ack_timeout=0.3)
    device = await terminal.start_pty(workdir / f"terminal{time.monotonic_ns()}")
    bridge = Bridge(parse_config({
        "journal": str(workdir / "journal.sqlite3"),
        "mqtt": {"host": broker.host, "port": broker.port, "base_topic": BASE,
                 "client_id": client_id},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device}}],
    }), hotplug=False)
    try:
        await bridge.start()
        yield bridge, terminal
    finally:
        await bridge.stop()
        await terminal.close()


def charged(terminal: SimulatorServer) -> list[str]:
    return [f"{sale}/{service}" for (sale, service), entry in terminal.terminal.ledger.items()
            if entry.charged]


def answers(register: Subscriber, service_id: str) -> list[dict[str, Any]]:
    match = outcome_for(service_id)
    return [p for t, p, _ in register.messages if match(t, p)]


async def test_two_bridges_on_one_base_topic_charge_nothing_twice(tmp_path, mosquitto, caplog):
    caplog.set_level(logging.INFO, logger="poi_bridge")
    async with Subscriber(mosquitto, [f"{BASE}/registers/TILL1/#", f"{BASE}/bridge/state"],
                          client_id="register-TILL1") as register, \
            a_bridge(tmp_path / "a", mosquitto, "bridge-a") as (first, terminal_a):
        assert await wait_until(lambda: first.gateway.connected, 15)
        stopped_b = False
        async with a_bridge(tmp_path / "b", mosquitto, "bridge-b") as (second, terminal_b):
            assert await wait_until(lambda: second.gateway.connected, 15)
            # (No wait for the first to have seen the second: the broker passes it the
            # second's "online", sent before the second took requests, before this request)
            await register.publish(REQUEST, responses.payment_request("TILL1", "P1", POI, 12.5))
            assert await wait_until(lambda: len(answers(register, "P1")) >= 2, 15)
            await asyncio.sleep(0.5)  # a charge, or a third answer, would show now
            got = answers(register, "P1")
            assert [p["bridge"]["outcome"] for p in got] == ["rejected", "rejected"]
            for answer in got:
                result = answer["SaleToPOIResponse"]["PaymentResponse"]["Response"]
                assert result["ErrorCondition"] == "UnavailableService"
                assert "Nothing was sent to the terminal" in answer["bridge"]["error"]
                assert "another poi-bridge" in answer["bridge"]["error"]
            assert charged(terminal_a) == charged(terminal_b) == []
            assert first.gateway.other_bridge is not None
            assert second.gateway.other_bridge is not None
            assert "'bridge-b'" in first.health()["other_bridges"][0]
            critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
            assert len(critical) == 2, critical
            assert any("'bridge-a'" in m and str(tmp_path / "a") in m for m in critical)
            assert any("'bridge-b'" in m and str(tmp_path / "b") in m for m in critical)
            assert all("Stop one of the" in m for m in critical)
            stopped_b = True
        assert stopped_b
        # The other said offline (a clean stop): the first takes requests again, and says
        # "online" again in the document the other's "offline" replaced
        assert await wait_until(lambda: first.gateway.other_bridge is None, 10)
        state = await register.wait_for(
            lambda t, p: t.endswith("/bridge/state") and p["state"] == "online"
            and p["client_id"] == "bridge-a" and p["announcement"] > 1)
        assert state["instance"] == first.gateway.peers.identity["instance"]
        await register.publish(REQUEST, responses.payment_request("TILL1", "P2", POI, 4.0))
        answer = await register.wait_for(outcome_for("P2"))
        assert answer["bridge"]["outcome"] == "approved"
        assert charged(terminal_a) == ["TILL1/P2"]


async def test_two_bridges_started_at_once_charge_a_payment_at_most_once(tmp_path, mosquitto):
    """Neither finds the other's document when it subscribes: each takes requests only once
    its own "online" came back, by when the broker has passed it the other's if that was
    first."""
    async with Subscriber(mosquitto, [f"{BASE}/registers/TILL1/#"],
                          client_id="register-TILL1") as register:
        async with contextlib.AsyncExitStack() as stack:
            (first, terminal_a), (second, terminal_b) = await asyncio.gather(
                stack.enter_async_context(a_bridge(tmp_path / "a", mosquitto, "bridge-a")),
                stack.enter_async_context(a_bridge(tmp_path / "b", mosquitto, "bridge-b")))
            assert await wait_until(lambda: first.gateway.connected and second.gateway.connected,
                                    15)
            await register.publish(REQUEST, responses.payment_request("TILL1", "S1", POI, 3.0))
            assert await wait_until(lambda: len(answers(register, "S1")) >= 2, 15)
            await asyncio.sleep(0.5)
            outcomes = sorted(p["bridge"]["outcome"] for p in answers(register, "S1"))
            assert outcomes == ["rejected", "rejected"], outcomes
            assert len(charged(terminal_a) + charged(terminal_b)) == 0
            assert first.gateway.peers.seen == second.gateway.peers.seen == 1


async def test_a_bridge_killed_under_a_broker_that_kept_its_online_is_not_another_bridge(
        tmp_path, mosquitto):
    """A power cut: the broker and the daemon are SIGKILLed, the broker's last save holds the
    bridge's retained "online", and no will ever said otherwise (the broker died with the
    connection). The daemon's next run finds that "online" and takes it for its own
    previous run, not another bridge, and pays."""
    sim = Simulator(tmp_path, "--delay", "0.1")
    daemon = Daemon(write_config(tmp_path, mosquitto, sim.link), tmp_path).start()
    request = f"poi-bridge/terminals/{POI}/request/TILL1"
    saved = mosquitto.workdir / "mosquitto.db"
    try:
        async with Subscriber(mosquitto, ["poi-bridge/bridge/state"]) as watcher:
            before = await watcher.wait_for(lambda t, p: p["state"] == "online")
            seen = time.time()
        # (autosave_interval 1: saved within a second or two)
        assert await wait_until(lambda: saved.exists() and saved.stat().st_mtime > seen + 0.1,
                                10)
        mosquitto.kill()
        daemon.kill()
        mosquitto.start()
        async with Subscriber(mosquitto, ["poi-bridge/bridge/state"]) as watcher:
            left = await watcher.wait_for(lambda t, p: True)
        assert left == before  # the killed run's "online", still retained
        daemon.start()
        async with Subscriber(mosquitto, ["poi-bridge/registers/TILL1/#",
                                          "poi-bridge/bridge/state"]) as register:
            now = await register.wait_for(lambda t, p: p.get("state") == "online"
                                          and p["instance"] != before["instance"], timeout=20)
            assert now["bridge_id"] == before["bridge_id"]
            await register.publish(request, responses.payment_request("TILL1", "R1", POI, 9.0))
            answer = await register.wait_for(outcome_for("R1"), timeout=20)
            assert answer["bridge"]["outcome"] == "approved"
        log = daemon.log()
        assert "a previous run of this bridge" in log
        assert "ANOTHER POI-BRIDGE" not in log
    finally:
        daemon.kill()
        ledger = sim.stop()
    assert [k for k, v in ledger.items() if v["charged"]] == ["TILL1/R1"]


async def test_two_stores_behind_a_central_broker_do_not_see_each_other(tmp_path):
    """Each store's broker carries bridge/state out to the central broker, never in: two
    stores with the same base_topic and client id are not two bridges on one broker."""
    central = Mosquitto(tmp_path / "central").start()
    names = ("store-12", "store-13")
    stores = [await Store(tmp_path / n, n, (central.host, central.port)).start() for n in names]
    office = Subscriber(central, ["poi/+/bridge/state", "poi/+/registers/+/response"],
                        client_id="head-office")
    await office.connect()
    try:
        states = {}
        for name in names:
            states[name] = await arrives(office, lambda t, p, n=name: t == f"poi/{n}/bridge/state"
                                         and p.get("state") == "online", timeout=20)
        assert states["store-12"]["instance"] != states["store-13"]["instance"]
        assert states["store-12"]["client_id"] == states["store-13"]["client_id"]
        for store in stores:
            service_id = "C" + store.name.split("-")[1]
            request = responses.payment_request("HQ1", service_id, POI, 5.0)
            await office.publish(f"poi/{store.name}/terminals/{POI}/request",
                                 json.dumps(request))
            answer = await arrives(office, outcome_for(service_id), timeout=20)
            assert answer["bridge"]["outcome"] == "approved"
        for store in stores:
            assert store.bridge is not None
            assert store.bridge.gateway.other_bridge is None
            assert store.bridge.gateway.peers.seen == 0
    finally:
        await office.disconnect()
        for store in stores:
            await store.stop()
        central.kill()


def test_a_document_of_this_host_client_id_and_journal_whose_process_is_gone_is_an_earlier_run():
    """A journal replaced (moved aside after a power cut damaged it) makes a new bridge_id:
    the broker's saved "online" of the run before it (same host, client id and journal path,
    its process gone) is no other bridge, or the store would be blocked until someone
    cleared it by hand. A live process there, or another client id or journal, still is."""
    import json
    import subprocess
    import sys

    from bridge.daemon.peers import OtherBridges

    def peers() -> OtherBridges:
        return OtherBridges(bridge_id="new-journal", client_id="poi-bridge",
                            journal="/var/lib/poi-bridge/journal.sqlite3", topic="t",
                            host="store-12")

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        earlier = {"state": "online", "instance": "i-old", "bridge_id": "old-journal",
                   "host": "store-12", "pid": dead_pid, "client_id": "poi-bridge",
                   "journal": "/var/lib/poi-bridge/journal.sqlite3", "announcement": 1}
        p = peers()
        p.heard(json.dumps(earlier).encode(), json.loads, retained=True)
        assert not p.others and p.refusal() is None
        for change in ({"pid": alive.pid}, {"client_id": "other"},
                       {"journal": "/srv/journal.sqlite3"}, {"host": "store-13"}):
            p = peers()
            p.heard(json.dumps({**earlier, **change}).encode(), json.loads, retained=True)
            assert p.others and p.refusal() is not None, change
        p = peers()  # published while this one listens: it runs, whatever its pid says
        p.heard(json.dumps(earlier).encode(), json.loads)
        assert p.others
    finally:
        alive.kill()
        alive.wait()


async def test_a_copy_with_this_bridges_client_id_stopped_leaves_it_taking_requests(
        tmp_path, mosquitto, caplog, monkeypatch):
    """Review: a copied configuration (same client id, own journal and terminal) started
    beside the store's bridge: the two took the broker's session from each other about
    once a second, and after the copy had stopped the store's bridge refused every
    payment ("another poi-bridge serves this broker's topics") until restarted, with a
    CRITICAL, a WARNING and an INFO line per takeover meanwhile."""
    from bridge.daemon import peers as peer_rules
    monkeypatch.setattr(peer_rules, "SAME_CLIENT_ID_HELD", 3.0)
    caplog.set_level(logging.INFO, logger="poi_bridge")
    async with Subscriber(mosquitto, [f"{BASE}/registers/TILL1/#"],
                          client_id="register-TILL1") as register, \
            a_bridge(tmp_path / "a", mosquitto, "poi-bridge") as (first, terminal_a):
        assert await wait_until(lambda: first.gateway.connected, 15)
        async with a_bridge(tmp_path / "b", mosquitto, "poi-bridge"):
            assert await wait_until(lambda: first.gateway.other_bridge is not None, 15)
            await asyncio.sleep(4)  # they take the session from each other meanwhile
        said = len(caplog.records)
        # The copy stopped: within the held time (and a reconnect or two) it is gone
        assert await wait_until(lambda: first.gateway.other_bridge is None
                                and first.gateway.peers.refusal() is None, 20), \
            [r.getMessage()[:160] for r in caplog.records[said:]]
        await register.publish(REQUEST, responses.payment_request("TILL1", "P9", POI, 3.0))
        answer = await register.wait_for(outcome_for("P9"))
        assert answer["bridge"]["outcome"] == "approved", answer
        assert charged(terminal_a) == ["TILL1/P9"]
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL
                and "ANOTHER POI-BRIDGE" in r.getMessage()]
    assert len(critical) <= 2, [r.getMessage()[:120] for r in critical]  # (one each way)


async def test_a_bridge_with_this_ones_client_id_on_a_bridged_broker_stays_another_bridge(
        tmp_path, mosquitto, monkeypatch, caplog):
    """A review of the rule above: two boxes cloned with the default client id, each on its
    own broker, the brokers bridged both ways. Neither takes the other's connection, so a
    connection held says nothing of the other: each took the other as gone after the held
    time and charged while the other refused (one request, a refusal and an approval). A
    bridge with this one's client id is taken as gone only once seen taking turns."""
    from bridge.daemon import peers as peer_rules
    monkeypatch.setattr(peer_rules, "SAME_CLIENT_ID_HELD", 2.0)
    other_broker = Mosquitto(tmp_path / "other-broker", extra_config=(
        f"connection link\naddress {mosquitto.host}:{mosquitto.port}\n"
        f"topic {BASE}/# both 1\ncleansession false\nremote_clientid link-2\n")).start()
    try:
        async with Subscriber(mosquitto, [f"{BASE}/registers/TILL1/#"],
                              client_id="register-TILL1") as register, \
                a_bridge(tmp_path / "a", mosquitto, "poi-bridge") as (first, terminal_a), \
                a_bridge(tmp_path / "b", other_broker, "poi-bridge") as (second, terminal_b):
            assert await wait_until(lambda: first.gateway.other_bridge is not None
                                    and second.gateway.other_bridge is not None, 15)
            caplog.set_level(logging.INFO, logger="poi_bridge")
            await asyncio.sleep(2 * peer_rules.SAME_CLIENT_ID_HELD + 1)
            assert first.gateway.other_bridge is not None
            assert second.gateway.other_bridge is not None
            # (dropped, even for a moment, one would have taken the requests sent then)
            assert not [m for m in caplog.messages if "taken as gone" in m], caplog.messages
            await register.publish(REQUEST, responses.payment_request("TILL1", "P3", POI, 2.0))
            assert await wait_until(lambda: len(answers(register, "P3")) >= 2, 15)
            await asyncio.sleep(0.5)
            assert {a["bridge"]["outcome"] for a in answers(register, "P3")} == {"rejected"}
            assert charged(terminal_a) == charged(terminal_b) == []
    finally:
        other_broker.kill()

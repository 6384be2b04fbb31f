"""The technician's commands (`status`, `resync`) and the register client they are built on,
against a running bridge and a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.register_client import RegisterClient
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .rig import POI

BASE = "poi/store-cli"


@contextlib.asynccontextmanager
async def running_bridge(tmp_path, broker, *, password: str | None = None,
                         **mqtt: Any) -> AsyncIterator[Bridge]:
    """A bridge on `broker` (base topic BASE) with a simulated terminal, online."""
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05),
                                         link=LinkBehaviour(status_hold=0.05)), "stx-etx-lrc")
    device = await simulator.start_pty(tmp_path / "terminal")
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": broker.host, "port": broker.port, "base_topic": BASE,
                 "client_id": "bridge-cli-test", **mqtt},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device}}],
    }), mqtt_password=password)
    await bridge.start()
    try:
        for _ in range(250):
            if bridge.workers[POI].online and bridge.gateway.connected:
                break
            await asyncio.sleep(0.02)
        yield bridge
    finally:
        await bridge.stop()
        await simulator.close()


async def test_a_command_gets_its_own_answer_not_another_operators(tmp_path, mosquitto):
    """Head office (through the chain bridge) asks for a resync just before the technician:
    both answers come on bridge/response/resync, and each operator must take its own, told by
    the token the bridge echoes in "transaction", not the first answer to that command."""
    async with running_bridge(tmp_path, mosquitto), \
            RegisterClient(mosquitto.host, mosquitto.port, "TILL9", base_topic=BASE,
                           persistent=False) as technician, \
            aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="head-office") as office:
        await office.subscribe(f"{BASE}/bridge/response/resync", qos=1)
        await office.publish(f"{BASE}/bridge/request/resync", json.dumps(
            {"sale_id": "HQ", "service_id": "theirs", "transaction": "hq-1"}), qos=1)
        mine = await technician.command("resync", {"sale_id": "TILL9", "service_id": "mine"},
                                        timeout=15)
        assert "no transaction TILL9/mine" in mine["error"]
        # Nor does one client mix up its own commands to the same topic.
        first, second = await asyncio.gather(*(
            technician.command("resync", {"sale_id": "TILL9", "service_id": which}, timeout=15)
            for which in ("first", "second")))
        assert "TILL9/first" in first["error"] and "TILL9/second" in second["error"]
        async with asyncio.timeout(15):  # head office got its own answer, with its own token
            async for message in office.messages:
                answer = json.loads(message.payload)
                if answer["transaction"] == "hq-1":
                    break
        assert "no transaction HQ/theirs" in answer["error"]

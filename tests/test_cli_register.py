"""`poi-bridge register`, the technician's register, as a real process against a real broker.

It pays through a running bridge; it says at once, instead of after its whole timeout, when
no bridge has ever announced itself on the base topic it was given (the usual mistake: the
default --base-topic against a bridge configured with another); and it warns when the bridge
is offline (the request then waits in the broker for the bridge's persistent session).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

import aiomqtt

from bridge.register_client import RegisterClient

from .rig import POI, ROOT, python_env
from .test_cli_tools import BASE, running_bridge


async def register(mosquitto, *args: str, timeout: float = 60) -> tuple[int, str, str, float]:
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "register", "--broker",
        f"{mosquitto.host}:{mosquitto.port}", *args, env=python_env(), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode(), time.monotonic() - started


async def test_pay_through_a_running_bridge(tmp_path, mosquitto):
    async with running_bridge(tmp_path, mosquitto):
        code, out, err, _ = await register(mosquitto, "--base-topic", BASE, "--sale-id",
                                           "TILL9", "pay", "--terminal", POI, "--amount",
                                           "4.20", "--timeout", "30")
        assert code == 0, err
        assert out.startswith("TILL9/") and f"on {POI}: approved (source terminal)" in out
        assert ". accepted" in err and ". completed" in err  # the events, for the person
        code, out, err, _ = await register(mosquitto, "--base-topic", BASE, "--sale-id",
                                           "TILL9", "transactions")
        assert code == 0, err
        listed = json.loads(out)
        assert [t["sale_id"] for t in listed] == ["TILL9"]
        assert listed[0]["outcome"] == "approved"


async def test_a_base_topic_no_bridge_uses_is_reported_at_once(mosquitto):
    code, out, err, took = await register(mosquitto, "--base-topic", "nobody/here", "pay",
                                          "--terminal", POI, "--amount", "1", "--timeout", "60")
    assert code == 2
    assert "no bridge has announced itself on nobody/here/bridge/state" in err
    assert "--base-topic" in err
    assert took < 20, "waited for the request's timeout instead of saying what is wrong"


async def test_an_offline_bridge_is_named_and_the_request_still_goes(mosquitto):
    # What the broker keeps after a bridge died: its last will, retained.
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="will") as client:
        await client.publish(f"{BASE}/bridge/state", json.dumps({"state": "offline"}), qos=1,
                             retain=True)
        await client.subscribe(f"{BASE}/terminals/+/request", qos=1)
        running = asyncio.create_task(register(
            mosquitto, "--base-topic", BASE, "--sale-id", "TILL9", "pay", "--terminal", POI,
            "--amount", "1", "--timeout", "2"))
        async with asyncio.timeout(30):
            async for message in client.messages:
                request = json.loads(message.payload)
                break
        code, _, err, _ = await running
    assert request["SaleToPOIRequest"]["MessageHeader"]["SaleID"] == "TILL9"
    assert "the bridge is offline; the request waits in the broker" in err
    assert code == 2 and "no answer in time" in err


async def test_acting_as_a_till_by_hand_leaves_the_tills_session_alone(mosquitto):
    """`register --sale-id TILL1` once connected as `register-TILL1` with a clean session: the
    id a till keeps its persistent session under. The till was taken off the broker and the
    results queued for it while it was away were thrown away. The command has its own id."""
    async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1", base_topic=BASE):
        pass  # the till subscribes, then goes away: its session and subscription are kept
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="bridge") as bridge:
        await bridge.publish(f"{BASE}/registers/TILL1/response", json.dumps(
            {"bridge": {"outcome": "approved", "transaction": {"service_id": "S1"}}}), qos=1)
    code, _, err, _ = await register(mosquitto, "--base-topic", BASE, "--sale-id", "TILL1",
                                     "terminals")
    assert code == 2 and "no bridge has announced itself" in err  # it did connect, though
    async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                              base_topic=BASE) as till:
        async with asyncio.timeout(10):
            while not till.responses:
                await asyncio.sleep(0.05)
    assert till.responses[0]["bridge"]["transaction"]["service_id"] == "S1"
    log = mosquitto.log_path.read_text()
    assert f" as poi-bridge-cli-{socket.gethostname()}-" in log, log

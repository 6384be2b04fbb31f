"""README: "A terminal request's MQTT 5 response topic and correlation data are not used: its
answers always go to {base}/registers/{SaleID}/response (only operator commands use them)".
The answers on bridge/error to a terminal request (an internal error while handling it, a
retained request refused) carried its correlation data all the same (review rv2)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.daemon.journal import Journal
from bridge.simulator import responses

from .rig import POI
from .test_daemon_mqtt import BASE, eventually, request_topic, running
from .test_mqtt_faults import gateway_for


def broken(*_: Any, **__: Any) -> None:
    raise RuntimeError("a bug")


async def answer_on(client: aiomqtt.Client, topic: str) -> aiomqtt.Message:
    async with asyncio.timeout(10):
        async for message in client.messages:
            if message.topic.value == topic:
                return message
    raise AssertionError("unreachable")


async def test_answers_to_a_terminal_request_carry_none_of_its_correlation_data(
        tmp_path, mosquitto):
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal, protocol="5")
    gateway.set_request_handler(broken)
    try:
        async with running(gateway), aiomqtt.Client(
                mosquitto.host, mosquitto.port, identifier="register",
                protocol=aiomqtt.ProtocolVersion.V5) as register:
            await register.subscribe(f"{BASE}/bridge/error", qos=1)
            await register.subscribe(f"{BASE}/registers/#", qos=1)
            await eventually(lambda: gateway.connected)
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{BASE}/bridge/response/register"
            props.CorrelationData = b"till-1"
            request = json.dumps(responses.payment_request("POS1", "C1", POI)).encode()
            # handled, and the handling fails: bridge/error and the register's topic
            await register.publish(f"{request_topic()}/POS1", request, qos=1, properties=props)
            for topic in (f"{BASE}/bridge/error", f"{BASE}/registers/POS1/response"):
                message = await answer_on(register, topic)
                assert "internal error" in message.payload.decode(), message.payload
                assert getattr(message.properties, "CorrelationData", None) is None, topic
            # published retained (MQTT 5: refused at once), answered on bridge/error
            await register.publish(f"{request_topic()}/POS1", request, qos=1, retain=True,
                                   properties=props)
            message = await answer_on(register, f"{BASE}/bridge/error")
            assert "with retain" in message.payload.decode(), message.payload
            assert getattr(message.properties, "CorrelationData", None) is None
            await register.publish(f"{request_topic()}/POS1", b"", qos=1, retain=True)
    finally:
        journal.close()

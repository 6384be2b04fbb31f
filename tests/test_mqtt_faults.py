"""What the MQTT side does with what it cannot use, against a real mosquitto: a response topic
no broker accepts, a broker that refuses a publish, a retained request, a connection that
cannot even be set up. None of these may take the connection, or the daemon, down silently."""

from __future__ import annotations

import asyncio
import json
import logging

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import MqttConfig
from bridge.daemon.journal import Journal
from bridge.daemon.mqtt import RegisterGateway
from bridge.transports import Backoff

from .rig import Subscriber
from .test_daemon_mqtt import BASE, eventually, running


def gateway_for(mosquitto, journal: Journal, **config) -> RegisterGateway:
    settings = {"host": mosquitto.host, "port": mosquitto.port, "base_topic": BASE,
                "client_id": "bridge-faults", **config}
    return RegisterGateway(MqttConfig(**settings), journal,
                           backoff=Backoff(initial=0.05, maximum=0.2))


def answers_commands(gateway: RegisterGateway) -> None:
    """A handler answering each command as the intake does: on its fixed response topic,
    or on the requester's response topic when it gave one."""
    def handle(topic: str, payload: bytes, reply) -> None:
        command = topic.rsplit("/", 1)[-1]
        reply.send(f"{BASE}/bridge/response/{command}", {"status": "ok", "data": command})
    gateway.set_request_handler(handle)


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --- A: a response topic that cannot be published to -------------------------------------------

async def test_a_wildcard_response_topic_is_answered_on_the_fixed_topic(tmp_path, mosquitto):
    """An MQTT 5 command whose ResponseTopic holds a wildcard used to be stored as given: paho
    refused to publish it, the MQTT task died, and the answer stayed in the outbox to kill
    every restart too. Now the answer goes to the documented topic, with the correlation
    data, and the connection stays up for the next command."""
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal, protocol="5")
    answers_commands(gateway)
    try:
        async with running(gateway), aiomqtt.Client(
                mosquitto.host, mosquitto.port, identifier="operator",
                protocol=aiomqtt.ProtocolVersion.V5) as operator:
            await operator.subscribe(f"{BASE}/bridge/#", qos=1)
            await eventually(lambda: gateway.connected)
            for response_topic in ("ops/replies/#", "ops/+/replies"):
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = response_topic
                props.CorrelationData = b"req-1"
                await operator.publish(f"{BASE}/bridge/request/health", b"{}", qos=1,
                                       properties=props)
                async with asyncio.timeout(10):
                    async for message in operator.messages:
                        if message.topic.value == f"{BASE}/bridge/response/health":
                            assert json.loads(message.payload)["status"] == "ok"
                            assert message.properties.CorrelationData == b"req-1"
                            break
            await eventually(lambda: not journal.pending())
            assert journal.pending() == []
            assert gateway.connected and gateway.reconnects == 0
    finally:
        journal.close()


async def test_an_unpublishable_message_already_in_the_journal_is_given_up_loudly(
        tmp_path, mosquitto, caplog):
    """A journal written by the old code may hold an answer addressed to such a topic. It is
    logged as an error, marked so that it is not tried again, and everything after it still
    goes out on the same connection."""
    journal = Journal(tmp_path / "journal.sqlite3")
    good = f"{BASE}/registers/POS1/response"
    journal.enqueue([("ops/replies/#", b'{"n": 1}', 1, False),
                     ("ops/\x01replies", b'{"n": 2}', 1, False),
                     (good, b'{"n": 3}', 1, False)])
    gateway = gateway_for(mosquitto, journal)
    try:
        async with Subscriber(mosquitto, [good]) as register, running(gateway):
            await register.wait_for(lambda t, p: p == {"n": 3}, timeout=10)
            await eventually(lambda: not journal.pending())
            assert journal.pending() == []
            assert journal.counts()["undelivered"] == 0
            await asyncio.sleep(0.3)  # a broker dropping us for the control character
            assert gateway.connected and gateway.reconnects == 0
            assert gateway.undeliverable == 2
    finally:
        journal.close()
    logged = errors(caplog)
    assert any("'ops/replies/#'" in line and "not tried again" in line
               and "SELECT payload FROM outbox WHERE id = 1" in line for line in logged), logged
    assert any("'ops/\\x01replies'" in line for line in logged), logged

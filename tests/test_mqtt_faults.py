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


# --- B: a connection that cannot be set up; a task that ends ------------------------------------

def test_check_config_refuses_what_would_keep_the_bridge_off_the_broker(tmp_path):
    """A TLS file that is missing or unreadable, a key without its certificate, an empty
    client id (no persistent session), a keepalive MQTT cannot carry: each used to pass the
    check and stop the connection at run time."""
    from .test_cli import cli

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[mqtt]\nclient_id = ""\nkeepalive = 100000\n'
        f'[mqtt.tls]\nca_file = "{ca}"\ncert_file = "{tmp_path / "missing.pem"}"\n'
        f'key_file = "{tmp_path}"\n')
    done = cli("check-config", str(config))
    assert done.returncode == 2
    problems = done.stderr.decode().splitlines()
    assert any("mqtt.client_id:" in p and "must be a stable, printable name" in p
               for p in problems), problems
    assert any("mqtt.keepalive:" in p for p in problems), problems
    assert any(f"mqtt.tls.cert_file: Value error, cannot read {tmp_path / 'missing.pem'}: "
               "No such file or directory" in p for p in problems), problems
    assert any(f"mqtt.tls.key_file: Value error, cannot read {tmp_path}: Is a directory" in p
               for p in problems), problems
    assert not any("ca_file" in p for p in problems), problems  # there, and readable

    from bridge.config import ConfigError, parse_config
    try:
        parse_config({"mqtt": {"tls": {"key_file": str(ca)}}})
    except ConfigError as exc:
        assert exc.problems == [("mqtt.tls: Value error, key_file is set without cert_file: "
                                 "the client key is only used with its certificate")]
    else:
        raise AssertionError("a key without its certificate was accepted")


async def test_tls_files_that_cannot_be_used_are_logged_and_retried_until_fixed(
        tmp_path, caplog):
    """A ca_file that is not a certificate, a client certificate with another's key: the
    MQTT task used to die without a word. Each attempt now logs one error naming the file,
    and the bridge keeps trying: once the files are put right it connects."""
    from .test_mqtt_security import tls_broker

    broker, pki = tls_broker(tmp_path, ["127.0.0.1"])
    ca = tmp_path / "ca.pem"
    ca.write_text("this is not a certificate\n")
    key = tmp_path / "client.key"
    key.write_bytes((pki / "broker.key").read_bytes())  # not the client certificate's key
    journal = Journal(tmp_path / "journal.sqlite3")
    config = MqttConfig(host=broker.host, port=broker.port, base_topic=BASE,
                        client_id="bridge-tls-fix",
                        tls={"ca_file": ca, "cert_file": pki / "client.pem", "key_file": key})
    gateway = RegisterGateway(config, journal, backoff=Backoff(initial=0.05, maximum=0.2))
    try:
        async with running(gateway) as running_gateway:
            def logged(text: str) -> bool:
                return any(text in line for line in errors(caplog))

            await eventually(lambda: logged(f"TLS ca_file {ca} cannot be used"))
            assert logged(f"TLS ca_file {ca} cannot be used: [X509: NO_CERTIFICATE_OR_CRL_FOUND]")
            ca.write_bytes((pki / "ca.pem").read_bytes())
            await eventually(lambda: logged(f"TLS cert_file {pki / 'client.pem'} with key_file "
                                            f"{key} cannot be used"))
            assert not running_gateway.connected
            key.write_bytes((pki / "client.key").read_bytes())
            await eventually(lambda: gateway.connected)
            assert gateway.connected
    finally:
        journal.close()
        broker.kill()
    setup_errors = [line for line in errors(caplog) if "cannot set up the connection" in line]
    assert setup_errors and all("\n" not in line for line in setup_errors)


def test_a_daemon_task_that_ends_stops_the_daemon_with_a_failure_status(
        tmp_path, mosquitto, caplog, monkeypatch):
    """A long-lived task of the daemon that ends (here the status loop, meeting a bug) used to
    leave a daemon that said READY and fed the watchdog: now it is logged and the daemon
    stops with a status systemd restarts it for. (Run as `poi-bridge run` does: SystemExit
    leaves the event loop itself.)"""
    import pytest

    from bridge.config import parse_config
    from bridge.daemon.app import TASK_EXIT_STATUS, Bridge, run_bridge

    async def broken_status_loop(self) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("a bug in the status loop")

    monkeypatch.setattr(Bridge, "_status_loop", broken_status_loop)
    config = parse_config({"journal": str(tmp_path / "journal.sqlite3"),
                           "mqtt": {"host": mosquitto.host, "port": mosquitto.port,
                                    "client_id": "bridge-task-ends"}})

    async def main() -> None:
        await asyncio.wait_for(run_bridge(config), 15)

    with pytest.raises(SystemExit) as stopped:
        asyncio.run(main())
    assert stopped.value.code == TASK_EXIT_STATUS
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1, [r.getMessage() for r in caplog.records]
    assert critical[0].getMessage().startswith(
        "the daemon's status task ended unexpectedly (RuntimeError: a bug in the status loop)")

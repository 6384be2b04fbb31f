"""What the MQTT side does with what it cannot use, against a real mosquitto: a response topic
no broker accepts, a broker that refuses a publish, a retained request, a connection that
cannot even be set up. None of these may take the connection, or the daemon, down silently."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import time

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import MqttConfig, parse_config
from bridge.daemon.journal import Journal
from bridge.daemon.mqtt import RegisterGateway
from bridge.protocol.transaction import Transaction, TxState, request_digest
from bridge.simulator import responses
from bridge.transports import Backoff

from .broker import Mosquitto
from .rig import POI, Subscriber, outcome_for
from .test_daemon_mqtt import BASE, Store, default_scenario, eventually, request_topic, running



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


async def test_an_answer_journaled_before_a_restart_still_carries_its_correlation_data(
        tmp_path, mosquitto):
    """An MQTT 5 requester matches an answer by its CorrelationData. It was kept in memory
    beside the outbox row, so an answer that went out after a restart (the daemon stopped
    or died between journaling and publishing it) came without it and matched nothing."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    before = gateway_for(mosquitto, journal, protocol="5")  # never connected: nothing goes out
    before.enqueue("ops/replies/7", {"status": "ok", "data": "health"}, correlation=b"req-7")
    journal.close()
    journal = Journal(path)
    gateway = gateway_for(mosquitto, journal, protocol="5")
    try:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="operator",
                                  protocol=aiomqtt.ProtocolVersion.V5) as operator:
            await operator.subscribe("ops/replies/#", qos=1)
            async with running(gateway), asyncio.timeout(10):
                async for message in operator.messages:
                    assert json.loads(message.payload) == {"status": "ok", "data": "health"}
                    assert message.properties.CorrelationData == b"req-7"
                    break
                await eventually(lambda: not journal.pending())
    finally:
        journal.close()


async def test_with_mqtt5_the_broker_keeps_packets_far_past_max_payload_from_the_daemon(
        tmp_path, mosquitto):
    """The daemon announces a Maximum Packet Size (max_payload plus room for the topics):
    paho read a 250 MB request whole into memory before max_payload refused it. One a
    little over max_payload still reaches the daemon, which answers why it is refused."""
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal, protocol="5", max_payload=64 * 1024)
    seen: list[int] = []
    gateway.set_request_handler(lambda topic, payload, reply: seen.append(len(payload)))
    try:
        async with running(gateway), aiomqtt.Client(
                mosquitto.host, mosquitto.port, identifier="big-sender",
                protocol=aiomqtt.ProtocolVersion.V5) as sender:
            await eventually(lambda: gateway.connected)
            topic = f"{BASE}/terminals/V400m-1/request"
            await sender.publish(topic, b"x" * (8 * 1024 * 1024), qos=1)  # far past it
            await sender.publish(topic, b"y" * (80 * 1024), qos=1)  # a little over 64 KiB
            await eventually(lambda: seen)
            await asyncio.sleep(0.5)
            assert seen == [80 * 1024]
    finally:
        journal.close()


async def test_with_mqtt5_a_retained_transaction_document_expires_after_its_retention(
        tmp_path, mosquitto):
    """The daemon clears each transactions/... document once the journal forgets it. A lost
    clearing (a chain bridge's full queue drops it) left the document at head office for
    good; with MQTT 5 it carries a Message Expiry just past the retention, so the brokers
    drop it themselves. Nothing else the bridge retains expires."""
    from bridge.daemon.mqtt import RETAINED_EXPIRY_SLACK

    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal, protocol="5")
    document = f"{BASE}/transactions/TILL1/S1"
    journal.enqueue([(document, b'{"state":"final"}', 1, True),
                     (f"{BASE}/terminals/V400m-1/state", b'{"state":"online"}', 1, True),
                     (f"{BASE}/registers/TILL1/response", b'{"n":1}', 1, False)])
    received: dict[str, aiomqtt.Message] = {}
    try:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="office",
                                  protocol=aiomqtt.ProtocolVersion.V5) as office:
            await office.subscribe(f"{BASE}/#", qos=1)
            async with running(gateway), asyncio.timeout(10):
                async for message in office.messages:
                    received[message.topic.value] = message
                    if len(received) == 3:
                        break
        expiry = getattr(received[document].properties, "MessageExpiryInterval", None)
        retention = gateway.config.transaction_retention
        assert expiry is not None and retention < expiry <= retention + RETAINED_EXPIRY_SLACK
        for topic, message in received.items():
            if topic != document:
                assert getattr(message.properties, "MessageExpiryInterval", None) is None, topic
    finally:
        journal.close()


async def test_with_mqtt5_an_open_transactions_document_does_not_expire(tmp_path, mosquitto):
    """Review: every transactions/... document carried the Message Expiry, an open one too.
    A transaction left unresolved stays open however long (the bridge keeps asking its
    terminal), so its in_progress or unresolved document vanished from the broker after
    about 50 h while the journal still held it open. Now only a final document expires.
    Time compressed: a retention of 1 s and no slack stand for 48 h + 2 h."""
    from unittest import mock

    from bridge.daemon import mqtt as mqtt_module
    from bridge.protocol.actions import Deliver, Progress

    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal, protocol="5")
    gateway.config = gateway.config.model_copy(update={"transaction_retention": 1.0})
    documents = f"{BASE}/transactions/TILL1/"
    gateway.progress(Progress("TILL1", "OPEN", POI, "accepted"))  # in_progress
    gateway.progress(Progress("TILL1", "GIVEN-UP", POI, "accepted"))
    gateway.deliver(Deliver("TILL1", "GIVEN-UP", POI, "Payment", "unresolved", "bridge", None,
                            "no answer from the terminal", accepted=True))
    gateway.progress(Progress("TILL1", "DONE", POI, "accepted"))
    gateway.deliver(Deliver("TILL1", "DONE", POI, "Payment", "approved", "terminal", None,
                            accepted=True))
    seen: dict[str, dict] = {}
    try:
        with mock.patch.object(mqtt_module, "RETAINED_EXPIRY_SLACK", 0.0):
            async with running(gateway):
                await eventually(lambda: not journal.pending())
        await asyncio.sleep(2.5)  # past the compressed retention
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="office",
                                  protocol=aiomqtt.ProtocolVersion.V5) as office:
            await office.subscribe(f"{documents}#", qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.5):
                    async for message in office.messages:
                        seen[message.topic.value[len(documents):]] = json.loads(message.payload)
    finally:
        journal.close()
    assert {name: document["state"] for name, document in seen.items()} == {
        "OPEN": "in_progress", "GIVEN-UP": "unresolved"}, seen


async def test_a_registers_request_with_a_response_topic_is_not_warned_about(
        tmp_path, mosquitto, caplog):
    """A register's request is answered on the register's topics, whatever ResponseTopic
    its MQTT 5 client sets: no warning to "fix the ResponseTopic" for every payment."""
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal, protocol="5")
    handled: list[str] = []
    gateway.set_request_handler(lambda topic, payload, reply: handled.append(topic))
    try:
        async with running(gateway), aiomqtt.Client(
                mosquitto.host, mosquitto.port, identifier="till",
                protocol=aiomqtt.ProtocolVersion.V5) as till:
            await eventually(lambda: gateway.connected)
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{BASE}/registers/TILL1/response"
            await till.publish(f"{BASE}/terminals/V400m-1/request/TILL1", b"{}", qos=1,
                               properties=props)
            await eventually(lambda: handled)
    finally:
        journal.close()
    assert not [m for m in caplog.messages if "response topic" in m], caplog.messages


async def test_a_broker_that_bounds_packets_never_drops_the_bridge_for_what_it_publishes(
        tmp_path):
    """A broker with max_packet_size (examples/mosquitto/mosquitto.conf) disconnects a client
    for a larger packet. A `transactions` answer of 1000 long rows (about 600 KB) made it
    drop the bridge, and the same answer went first again at every reconnect: no result
    reached any register. The answer now stays within max_payload and says how many rows
    it left out; a payment after it still reaches its register."""
    limit = parse_config({"mqtt": {"max_payload": 64 * 1024}}).mqtt.packet_limit
    broker = Mosquitto(tmp_path / "broker", extra_config=f"max_packet_size {limit}\n").start()
    journal = Journal(tmp_path / "journal.sqlite3")  # the store's journal, already long
    with journal.batch():
        for n in range(1000):
            document = responses.payment_request("TILL1", f"R{n}", POI)
            journal.save(Transaction(
                sale_id="TILL1", service_id=f"R{n}", poi_id=POI, category="Payment",
                request=document, digest=request_digest(document), created_at=time.time(),
                updated_at=time.time(), state=TxState.FINAL, outcome="rejected",
                source="bridge", detail="x" * 500))
    journal.close()
    try:
        async with Store(tmp_path, broker, default_scenario()) as store, \
                Subscriber(broker, [f"{BASE}/#"]) as operator:
            await operator.publish(f"{BASE}/bridge/request/transactions",
                                   {"limit": 1000, "transaction": "t-1"})
            answer = await operator.wait_for(lambda t, p: t.endswith("/response/transactions")
                                             and p.get("transaction") == "t-1", timeout=10)
            assert answer["status"] == "ok" and 0 < len(answer["data"]) < 1000, len(answer)
            assert answer["omitted"] == 1000 - len(answer["data"])
            await operator.publish(request_topic(), responses.payment_request(
                "POS1", "P1", POI, 3.0))
            result = await operator.wait_for(outcome_for("P1"), timeout=10)
            assert result["bridge"]["outcome"] == "approved"
            assert store.bridge.gateway.reconnects == 0
        assert "oversize packet" not in broker.log_path.read_text()
    finally:
        broker.kill()


async def test_two_bridges_with_one_client_id_are_named_as_such(tmp_path, mosquitto, caplog):
    """Each takes the other's session and the broker drops the older at once, over and over:
    each side logged only 'lost the MQTT broker' about once a second."""
    first = Journal(tmp_path / "first.sqlite3")
    second = Journal(tmp_path / "second.sqlite3")
    try:
        async with running(gateway_for(mosquitto, first, client_id="twin")), \
                running(gateway_for(mosquitto, second, client_id="twin")):
            await eventually(lambda: any("most likely another client uses the same client id"
                                         in m for m in caplog.messages), timeout=20)
    finally:
        first.close()
        second.close()
    (line,) = {m for m in caplog.messages if "same client id" in m}
    assert "'twin'" in line and "mqtt.client_id" in line


async def _hold_subacks(mosquitto, delay: float, subscribing: asyncio.Event | None = None):
    """A TCP proxy to the broker that holds back every SUBACK `delay` seconds, and what
    follows it behind it: a slow broker (a loaded store box). A connection the broker
    closes is closed to the client at once, held packets or not. `subscribing` is set at
    each SUBSCRIBE that passes."""
    async def packets(reader):
        while True:
            first = await reader.readexactly(1)
            header, length, shift = first, 0, 0
            while True:  # the remaining length, 7 bits a byte
                byte = await reader.readexactly(1)
                header += byte
                length += (byte[0] & 0x7F) << shift
                shift += 7
                if not byte[0] & 0x80:
                    break
            yield first[0] & 0xF0, header + await reader.readexactly(length)

    async def to_broker(reader, writer) -> None:
        with contextlib.suppress(Exception):
            async for kind, packet in packets(reader):
                writer.write(packet)
                await writer.drain()
                if kind == 0x80 and subscribing is not None:  # SUBSCRIBE
                    subscribing.set()
        writer.close()

    async def to_client(reader, writer) -> None:
        held: asyncio.Queue = asyncio.Queue()

        async def release() -> None:
            while True:
                due, packet = await held.get()
                await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
                writer.write(packet)
                await writer.drain()

        releasing = asyncio.create_task(release())
        due = 0.0
        with contextlib.suppress(Exception):
            async for kind, packet in packets(reader):
                now = asyncio.get_running_loop().time()
                due = max(due, now + delay if kind == 0x90 else now)  # 0x90: SUBACK
                held.put_nowait((due, packet))
        releasing.cancel()
        writer.close()

    async def handle(client_reader, client_writer) -> None:
        broker_reader, broker_writer = await asyncio.open_connection(mosquitto.host,
                                                                     mosquitto.port)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(to_broker(client_reader, broker_writer),
                                 to_client(broker_reader, client_writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_a_subscription_the_broker_dropped_ends_at_once_and_names_the_twin(
        tmp_path, mosquitto, caplog):
    """On a loaded machine a twin's connection dropped while it subscribed ended only when
    the subscription timed out (aiomqtt waits for the SUBACK all the same, 10 s): longer
    than SHORT_CONNECTION, so the run of short connections started over each time and the
    twins were never named (CI, 2026-12-02: 'Operation timed out' for 20 s, no name). A
    subscription pending when the connection ends now fails at once, and a connection
    lasts until the broker dropped it. The twin here is this test, taking the session each
    time the bridge subscribes (behind a broker slow to answer SUBSCRIBE)."""
    from bridge.daemon import mqtt as mqtt_module

    subscribing = asyncio.Event()
    proxy = await _hold_subacks(mosquitto, 30.0, subscribing)
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        gateway = gateway_for(mosquitto, journal, port=proxy.sockets[0].getsockname()[1],
                              client_id="twin")
        async with running(gateway):
            for _ in range(mqtt_module.SHORT_CONNECTIONS_SAID):
                await asyncio.wait_for(subscribing.wait(), 10)
                subscribing.clear()
                async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="twin"):
                    pass
            # each one ended at once: three SUBACK time-outs would take 30 s
            await eventually(lambda: any("same client id" in m for m in caplog.messages),
                             timeout=mqtt_module.OPERATION_TIMEOUT / 2)
    finally:
        journal.close()
        proxy.close()
    ended = [m for m in caplog.messages if "ended while subscribing" in m]
    assert len(ended) >= mqtt_module.SHORT_CONNECTIONS_SAID, caplog.messages


async def test_one_bridge_on_a_broker_slow_to_answer_subscribe_is_not_named_a_twin(
        tmp_path, mosquitto, caplog, monkeypatch):
    """Review rv18: counting every connection dropped before it had subscribed as short named
    a lone bridge a twin when its broker was slow to answer SUBSCRIBE and the bridge gave the
    connection up at OPERATION_TIMEOUT: an ERROR sending the technician after a second daemon
    that does not exist. (Times scaled down: the time-out 1 s, SHORT_CONNECTION 0.5 s.)"""
    from bridge.daemon import mqtt as mqtt_module

    monkeypatch.setattr(mqtt_module, "OPERATION_TIMEOUT", 1.0)
    monkeypatch.setattr(mqtt_module, "SHORT_CONNECTION", 0.5)
    proxy = await _hold_subacks(mosquitto, 1.5)
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        gateway = gateway_for(mosquitto, journal, port=proxy.sockets[0].getsockname()[1],
                              client_id="the-only-bridge")
        async with running(gateway):
            await eventually(lambda: sum(m.startswith("lost the MQTT broker")
                                         for m in caplog.messages)
                             > mqtt_module.SHORT_CONNECTIONS_SAID, timeout=30)
    finally:
        journal.close()
        proxy.close()
    assert not [m for m in caplog.messages if "same client id" in m]


async def test_twins_dropped_while_they_subscribe_are_named_as_such(
        tmp_path, mosquitto, caplog, monkeypatch):
    """On a loaded machine the broker dropped each twin while it was still subscribing
    (each connection's setup takes a few round trips): such a drop was logged as "cannot
    reach MQTT broker ... Is the broker running?" and not counted, so the twins were never
    named (CI: test_two_bridges_with_one_client_id_are_named_as_such under load)."""
    from bridge.daemon.mqtt_client import PipelinedClient

    original = PipelinedClient.subscribe

    async def slow_subscribe(self, *args, **kwargs):
        await asyncio.sleep(0.5)  # longer than the twin's pause before it connects again
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(PipelinedClient, "subscribe", slow_subscribe)
    first = Journal(tmp_path / "first.sqlite3")
    second = Journal(tmp_path / "second.sqlite3")
    try:
        async with running(gateway_for(mosquitto, first, client_id="twin")), \
                running(gateway_for(mosquitto, second, client_id="twin")):
            await eventually(lambda: any("same client id" in m for m in caplog.messages),
                             timeout=20)
    finally:
        first.close()
        second.close()
    assert any("most likely another client uses the same client id" in m
               for m in caplog.messages)
    assert not any("Is the broker running?" in m for m in caplog.messages)


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
    """A key without its certificate, an empty client id (no persistent session), a keepalive
    MQTT cannot carry: each used to pass the check and stop the connection at run time. A TLS
    file this user cannot read is a warning, not a refusal: the daemon's user may read it, a
    systemd credential exists only inside the service, and every other command that loads
    the configuration (devices, udev-rules, status) must still work."""
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

    config.write_text(
        f'[mqtt.tls]\nca_file = "{ca}"\ncert_file = "{tmp_path / "missing.pem"}"\n'
        f'key_file = "{tmp_path}"\n'
        '[[terminals]]\npoi_id = "V400m-1"\n[terminals.link]\nkind = "tcp"\n'
        'host = "10.0.0.5"\nport = 8443\n')  # no terminal at all is an error of its own
    done = cli("check-config", str(config))
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.decode().splitlines()
    assert any(f"warning: mqtt.tls.cert_file: cannot read {tmp_path / 'missing.pem'}: "
               "No such file or directory" in w for w in warnings), warnings
    assert any(f"warning: mqtt.tls.key_file: cannot read {tmp_path}: Is a directory" in w
               for w in warnings), warnings
    assert not any("ca_file" in w for w in warnings), warnings  # there, and readable
    assert cli("udev-rules", "--config", str(config)).returncode == 0

    from bridge.config import ConfigError, parse_config
    try:
        parse_config({"mqtt": {"tls": {"key_file": str(ca)}}})
    except ConfigError as exc:
        assert exc.problems == [("mqtt.tls: key_file is set without cert_file: "
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


async def test_a_refused_login_is_said_once_not_at_every_retry(tmp_path, caplog):
    """The log review: a refused login (and a connection that cannot be set up) logged an
    ERROR at every retry, every 30 s, for as long as nobody fixed it: 120 pages an hour for
    one mistake. It is said at once, then again only after OUTAGE_REMINDER or if it
    changes; the retries between go to debug."""
    from .test_mqtt_security import passwords

    passwd = tmp_path / "passwd"
    passwords(passwd, {"poi-bridge": "bridge-pw"})
    broker = Mosquitto(tmp_path / "broker", anonymous=False,
                       extra_config=f"password_file {passwd}\n").start()
    journal = Journal(tmp_path / "journal.sqlite3")
    config = MqttConfig(host=broker.host, port=broker.port, base_topic=BASE,
                        client_id="bridge-login", username="poi-bridge")
    gateway = RegisterGateway(config, journal, password="wrong",
                              backoff=Backoff(initial=0.05, maximum=0.1))
    caplog.set_level(logging.DEBUG, logger="poi_bridge.mqtt")

    def refusals(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level
                and "refused the bridge's login" in r.getMessage()]
    try:
        async with running(gateway):
            await eventually(lambda: len(refusals(logging.DEBUG)) >= 4, timeout=20)
    finally:
        journal.close()
        broker.kill()
    assert len(refusals(logging.ERROR)) == 1, refusals(logging.ERROR)


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


# --- C: an MQTT 5 broker that refuses a publish --------------------------------------------------

def acl_broker(tmp_path, *allowed: str):
    """mosquitto whose ACL lets anonymous clients (the bridge) use only `allowed` topics."""
    from .broker import Mosquitto

    acl = tmp_path / "acl"
    acl.write_text("".join(f"topic readwrite {topic}\n" for topic in allowed))
    return Mosquitto(tmp_path / "acl-broker", extra_config=f"acl_file {acl}\n").start(), acl


def allow(broker, acl, *allowed: str) -> None:
    """Change the ACL as an administrator would, and have mosquitto reload it."""
    acl.write_text("".join(f"topic readwrite {topic}\n" for topic in allowed))
    broker.process.send_signal(signal.SIGHUP)


@contextlib.asynccontextmanager
async def refusing_broker(tmp_path, retry: Backoff):
    """A connected MQTT 5 gateway and a broker that refuses it everything but bridge/#."""
    broker, acl = acl_broker(tmp_path, f"{BASE}/bridge/#")
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(broker, journal, protocol="5")
    gateway._refusal_backoff = retry
    try:
        async with running(gateway):
            await eventually(lambda: gateway.connected)
            yield broker, acl, journal, gateway
    finally:
        journal.close()
        broker.kill()


async def test_with_mqtt5_a_refused_online_says_to_let_the_bridge_write_its_state(
        tmp_path, caplog):
    """Review: an ACL that lets the bridge read its own bridge/state but not write it. The
    broker refuses the "online" (PUBACK 0x87), which aiomqtt's publish took as published:
    the bridge then waited for it to come back and said to let its user READ that topic,
    the wrong advice. The PUBACK's reason is now read (as for every outbox message), and
    the error says the ACL must let the bridge write there."""
    from bridge.daemon.peers import ANNOUNCE_TIMEOUT

    from .broker import Mosquitto

    state = f"{BASE}/bridge/state"
    acl = tmp_path / "acl"
    acl.write_text(f"topic read {state}\n" + "".join(
        f"topic readwrite {BASE}/{topics}\n"
        for topics in ("registers/#", "terminals/#", "transactions/#", "bridge/request/#",
                       "bridge/response/#", "bridge/error", "bridge/health")))
    broker = Mosquitto(tmp_path / "acl-broker", extra_config=f"acl_file {acl}\n").start()
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(broker, journal, protocol="5")
    try:
        async with running(gateway):
            started = time.monotonic()
            await eventually(lambda: gateway.connected, timeout=15)
            waited = time.monotonic() - started
    finally:
        journal.close()
        broker.kill()
    said = errors(caplog)
    assert any("refused the bridge's \"online\"" in line and state in line
               and "write" in line for line in said), said
    assert not any("did not come back" in line for line in said), said
    assert gateway.peers.blind  # it cannot see another bridge there: said so, serving on
    assert waited < ANNOUNCE_TIMEOUT  # nothing to wait for: it will not come back


async def test_a_publish_the_broker_refuses_stays_pending_and_is_retried(tmp_path, caplog):
    """An MQTT 5 PUBACK with reason code 0x87 (Not authorized) used to count as delivered:
    an ACL missing registers/# lost every result without a word. Now the message stays in
    the outbox (undelivered), the error says where to look, it is published again with a
    growing delay, not in a loop, and goes out once the ACL is fixed."""
    response = f"{BASE}/registers/TILL1/response"
    retry = Backoff(initial=0.2, maximum=0.4)
    async with refusing_broker(tmp_path, retry) as (broker, acl, journal, gateway), \
            Subscriber(broker, [f"{BASE}/#"], client_id="watcher") as watcher:
        gateway.enqueue(response, {"n": 1})
        gateway.enqueue(f"{BASE}/bridge/error", {"n": 2})  # allowed: goes on meanwhile
        await watcher.wait_for(lambda t, p: p == {"n": 2}, timeout=10)

        def rounds() -> int:
            return sum("publishing again 1 message" in r.getMessage() for r in caplog.records)

        # Not in a hot loop: pauses of at least 0.1 s fit at most 10 rounds in 1.5 s (a
        # timer never fires early: a slow machine only makes fewer)...
        await asyncio.sleep(1.5)
        assert rounds() <= 10, rounds()
        # ...and retried: how soon depends on the machine, so wait for it.
        await eventually(lambda: rounds() >= 2)
        assert rounds() >= 2, rounds()
        assert journal.counts()["undelivered"] == 1 and gateway.refused == 1
        assert [m.topic for m in journal.pending()] == [response]
        refused = [line for line in errors(caplog) if "refused the message" in line]
        assert refused and f"on topic '{response}': Not authorized (reason code 0x87)" \
            in refused[0] and f"allowed to publish to {BASE}/#" in refused[0], refused
        assert watcher.on(response) == []

        allow(broker, acl, f"{BASE}/#")
        await watcher.wait_for(lambda t, p: t == response and p == {"n": 1}, timeout=10)
        await eventually(lambda: not journal.pending())
        assert journal.counts()["undelivered"] == 0 and gateway.refused == 0
        assert gateway.connected and gateway.reconnects == 0


async def test_refused_messages_stay_counted_while_they_are_published_again(
        tmp_path, monkeypatch):
    """The count of refused messages (status, metrics, the stop's wait) once dropped to 0
    for the moment a round of them was published again, until the broker refused them
    anew: a check at that moment read "nothing refused" while a result was held."""
    from bridge.daemon.outbox import OutboxPump

    seen: list[int] = []
    publish_again = OutboxPump._retry_refused

    def counted(pump):
        publish_again(pump)
        seen.append(pump.held)  # right after the round went out, before any answer

    monkeypatch.setattr(OutboxPump, "_retry_refused", counted)
    async with refusing_broker(tmp_path, Backoff(initial=0.2, maximum=0.2)) as (
            broker, acl, journal, gateway):
        gateway.enqueue(f"{BASE}/registers/TILL1/response", {"n": 1})
        await eventually(lambda: len(seen) >= 3)
        assert seen[:3] == [1, 1, 1] and gateway.refused == 1
        allow(broker, acl, f"{BASE}/#")
        await eventually(lambda: not journal.pending())
        await eventually(lambda: gateway.refused == 0)


async def test_refused_messages_stay_counted_across_a_reconnect(tmp_path, caplog):
    """A new connection forgot what the broker had refused on the one before: the count read
    0 while the bridge was disconnected and, once connected again, until the broker refused
    the messages anew. systemd's STATUS= is written at once when the broker connects, so
    right after every reconnect `systemctl status` left out the refused results."""
    async with refusing_broker(tmp_path, Backoff(initial=30, maximum=30)) as (
            broker, acl, journal, gateway):
        gateway.enqueue(f"{BASE}/registers/TILL1/response", {"n": 1})
        await eventually(lambda: gateway.refused == 1)
        assert gateway.refused == 1

        def refusals() -> int:
            return sum("refused the message" in line for line in errors(caplog))

        seen: set[tuple[bool, int]] = set()

        async def sample() -> None:
            while True:
                seen.add((gateway.connected, gateway.refused))
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        try:
            broker.stop()
            await eventually(lambda: not gateway.connected)
            broker.start()
            await eventually(lambda: gateway.reconnects == 1 and refusals() == 2)
            assert gateway.reconnects == 1 and refusals() == 2  # refused anew, once
        finally:
            sampler.cancel()
        assert (False, 1) in seen and (True, 1) in seen  # it was sampled at both
        assert {refused for _, refused in seen} == {1}, seen
        assert [m.topic for m in journal.pending()] == [f"{BASE}/registers/TILL1/response"]


async def test_a_refused_answer_outside_the_bridges_topics_is_given_up_and_a_stop_is_quick(
        tmp_path, caplog):
    """An operator's MQTT 5 ResponseTopic the bridge's ACL does not allow: no change on the
    bridge's side makes that answer go, so it is given up once (logged, counted), not
    retried every minute for ever. And a clean stop does not wait for refused messages that
    stay pending (a result the ACL refuses waits for the ACL to be fixed)."""
    async with refusing_broker(tmp_path, Backoff(initial=0.2, maximum=0.4)) as (
            broker, acl, journal, gateway):
        gateway.enqueue("ops/replies/1", {"status": "ok"})
        gateway.enqueue(f"{BASE}/registers/TILL1/response", {"n": 1})
        await eventually(lambda: gateway.undeliverable == 1)
        await asyncio.sleep(1.0)
        assert [m.topic for m in journal.pending()] == [f"{BASE}/registers/TILL1/response"]
        assert gateway.refused == 1  # the result: held, published again
        assert not any("publishing again" in r.getMessage() and "ops/replies" in r.getMessage()
                       for r in caplog.records)
        assert any("ops/replies/1" in line and "refused by the broker" in line
                   for line in errors(caplog))
        # The stop does not wait its whole time for the held result: given 30 s, it takes
        # a moment (a bound far from both, as a loaded machine may take a second or two).
        started = time.monotonic()
        await gateway.announce_offline(timeout=30)
        assert time.monotonic() - started < 10


async def test_a_terminal_answer_during_a_clean_stop_does_not_leave_its_state_online(
        tmp_path, mosquitto):
    """Review: a clean stop published each terminal's "offline" while the workers and the
    state publisher still ran (they end after it): a terminal's answer in that window put
    "online" back after the "offline", and the retained document said "terminal ready" for
    as long as the bridge was stopped (1 stop in 30 at an in-flight answer). The state
    changes are made here where they raced: as the stop's announcement begins, and after it,
    before Bridge.stop ends the gateway's and the workers' tasks."""
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal)
    topic = f"{BASE}/terminals/{POI}/state"
    state = {"poi_id": POI, "link": "tcp 10.0.0.5:8443", "detail": "", "identity": "confirmed",
             "open_transactions": 1}
    try:
        async with running(gateway), Subscriber(mosquitto, [topic]) as sub:
            gateway.terminal_state(POI, {**state, "state": "busy", "active": "TILL1/S1"})
            await sub.wait_for(lambda t, p: p["state"] == "busy")
            stopping = asyncio.create_task(gateway.announce_offline())
            await asyncio.sleep(0)  # the stop is under way
            # The terminal's answer: the payment ends, the worker says "online"
            gateway.terminal_state(POI, {**state, "state": "online", "active": None,
                                         "open_transactions": 0})
            await stopping
            await sub.wait_for(lambda t, p: p["state"] == "offline")
            # ... and another change after it (a link lost, another terminal's answer)
            gateway.terminal_state(POI, {**state, "state": "online", "active": None,
                                         "open_transactions": 0, "identity": "unknown"})
            await asyncio.sleep(1.0)  # (a state published after it arrives meanwhile)
            assert [p["state"] for p in sub.on(topic)] == ["busy", "offline"], sub.on(topic)
        async with Subscriber(mosquitto, [topic], client_id="late") as late:
            retained = await late.wait_for(lambda t, p: t == topic)
        assert retained["state"] == "offline" and "the bridge stopped" in retained["detail"], \
            retained
    finally:
        journal.close()


async def test_a_refused_retained_state_is_not_published_over_a_newer_one(tmp_path):
    """A retained transaction state the broker refused must not be published again after a
    newer state of the same transaction went through: it would replace it."""
    record = f"{BASE}/transactions/TILL1/S1"
    async with refusing_broker(tmp_path, Backoff(initial=1.5, maximum=1.5)) as (
            broker, acl, journal, gateway):
        gateway.enqueue(record, {"state": "in_progress"}, retain=True)
        await asyncio.sleep(0.5)
        assert [m.topic for m in journal.pending()] == [record]  # refused: still pending
        allow(broker, acl, f"{BASE}/#")
        await asyncio.sleep(0.3)
        gateway.enqueue(record, {"state": "final"}, retain=True)
        await eventually(lambda: not journal.pending())
        assert gateway.refused == 0
        await asyncio.sleep(2.0)  # past the retry that would have sent the old one
        async with Subscriber(broker, [record], client_id="late") as late:
            assert await late.wait_for(lambda t, p: True, timeout=5) == {"state": "final"}
            await asyncio.sleep(0.3)
            assert late.on(record) == [{"state": "final"}]


async def test_an_older_refused_state_due_again_behind_a_newer_one_is_not_published(tmp_path):
    """A retained document the broker refused, due again while the newer document of the
    same transaction is published and not yet acknowledged (a loaded broker, a WAN link):
    published then, it reached the broker after the newer one and replaced it, an ended
    transaction retained as in_progress for good (found by review rv11)."""
    import os

    from bridge.daemon.mqtt_client import PipelinedClient, PublishRefused

    async def acl_reloaded() -> None:
        async with PipelinedClient(broker.host, broker.port, identifier="probe",
                                   protocol=aiomqtt.ProtocolVersion.V5) as probe:
            for _ in range(200):
                with contextlib.suppress(PublishRefused):
                    await asyncio.wait_for(
                        probe.publish_nowait(f"{BASE}/registers/probe", b"x"), 5)
                    return
                await asyncio.sleep(0.05)
        raise AssertionError("the broker never took the new ACL")

    record = f"{BASE}/transactions/TILL1/S1"
    # A long delay: the retry round is run below by hand, at the moment the timer would fire
    # (growing: the refusal leaves it at 600-1200 s, until nothing refused is held any more)
    async with refusing_broker(tmp_path, Backoff(initial=600, maximum=6000)) as (
            broker, acl, journal, gateway):
        gateway.enqueue(record, {"state": "in_progress"}, retain=True)
        await eventually(lambda: gateway.refused == 1)
        pump = gateway._pump
        allow(broker, acl, f"{BASE}/#")  # the administrator fixes the ACL
        await acl_reloaded()
        os.kill(broker.process.pid, signal.SIGSTOP)  # no PUBACK for a while
        try:
            gateway.enqueue(record, {"state": "final"}, retain=True)
            await eventually(lambda: pump.in_window == 1)  # "final" is out, not acknowledged
            pump.retry_timer.cancel()
            pump._retry_refused()  # what the timer runs
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        await eventually(lambda: not journal.pending())
        await eventually(lambda: gateway.refused == 0)
        async with Subscriber(broker, [record], client_id="late") as late:
            retained = await late.wait_for(lambda t, p: True, timeout=5)
        assert retained == {"state": "final"}, (
            f"the broker retains {retained} for a transaction that ended")
        # Nothing refused is held now (the old document replaced, the newer one taken): a
        # refusal to come is retried after the first delay again, not after the grown one
        assert gateway._refusal_backoff.next_delay() <= 600


async def test_the_client_reports_a_refusal_as_such_and_mqtt311_is_unchanged(tmp_path):
    """The publish future fails with the broker's reason under MQTT 5; under MQTT 3.1.1 a
    PUBACK carries no reason, and the future completes as before."""
    import pytest

    from bridge.daemon.mqtt_client import PipelinedClient, PublishRefused

    broker, _ = acl_broker(tmp_path, "allowed/#")
    try:
        async with PipelinedClient(broker.host, broker.port, identifier="v5",
                                   protocol=aiomqtt.ProtocolVersion.V5) as client:
            with pytest.raises(PublishRefused) as refused:
                await asyncio.wait_for(client.publish_nowait("denied/x", b"x"), 10)
            assert refused.value.code == 0x87 and refused.value.reason == "Not authorized"
            await asyncio.wait_for(client.publish_nowait("allowed/x", b"x"), 10)
        async with PipelinedClient(broker.host, broker.port, identifier="v311",
                                   protocol=aiomqtt.ProtocolVersion.V311) as client:
            assert await asyncio.wait_for(client.publish_nowait("denied/x", b"x"), 10) is None
    finally:
        broker.kill()


# --- D: a request published with retain ----------------------------------------------------------

RETAINED_ERROR = "requests must not be published with retain; nothing was started"


async def test_a_retained_request_starts_nothing_and_is_answered_on_the_error_topic(
        tmp_path, mosquitto, caplog):
    """The broker sends a retained request again at every subscription: it used to be
    answered again after each reconnect and, once the journal had pruned it, run on the
    terminal a second time. Now a request that arrives retained starts nothing, is answered
    on bridge/error, and is logged once however often it comes."""
    from bridge.simulator import responses

    from .test_daemon_mqtt import POI, Store, default_scenario, request_topic

    async with Subscriber(mosquitto, []) as till:  # retained before the bridge subscribes
        await till.publish(request_topic(), responses.payment_request("POS1", "R1", POI, 5.0),
                           retain=True)
        await till.publish(f"{BASE}/bridge/request/terminals", {"transaction": "t-7"},
                           retain=True)
    async with Subscriber(mosquitto, [f"{BASE}/registers/POS1/#", f"{BASE}/bridge/error",
                                      f"{BASE}/bridge/response/+"], client_id="till",
                          persistent=True) as till, \
            Store(tmp_path, mosquitto, default_scenario()) as store:
        refusal = await till.wait_for(lambda t, p: t == f"{BASE}/bridge/error", timeout=10)
        assert refusal["status"] == "error" and RETAINED_ERROR in refusal["error"]
        assert refusal["poi_id"] == POI and refusal["topic"] == request_topic()
        # with the IDs as sent, as every refusal there (the contract review saw none)
        assert (refusal["sale_id"], refusal["service_id"]) == ("POS1", "R1"), refusal
        answer = await till.wait_for(lambda t, p: t.endswith("/bridge/response/terminals"))
        assert answer["status"] == "error" and RETAINED_ERROR in answer["error"]
        assert answer["transaction"] == "t-7"

        # a reconnect: the broker sends both again; they are refused again, not logged again
        await till.disconnect()
        mosquitto.stop()
        mosquitto.start()
        await till.connect()
        await eventually(lambda: store.bridge.gateway.reconnects == 1
                         and store.bridge.gateway.connected)
        await eventually(lambda: len(till.on(f"{BASE}/bridge/error")) >= 1, timeout=5)
        await asyncio.sleep(1.0)
        assert till.on(f"{BASE}/registers/POS1/event") == []
        assert till.on(f"{BASE}/registers/POS1/response") == []
        assert not store.simulator.terminal.ledger  # the terminal saw nothing
        assert store.bridge.journal.transactions() == []
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "retained request" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per retained request, not one per reconnect


async def test_with_mqtt5_even_a_live_retained_request_is_refused(tmp_path, mosquitto):
    """Under MQTT 5 the bridge subscribes with "retain as published", so a request published
    with retain while the bridge listens is refused at once, not only at the next reconnect
    (with MQTT 3.1.1 the broker clears the flag on that first delivery)."""
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal, protocol="5")
    handled: list[str] = []
    gateway.set_request_handler(lambda topic, payload, reply: handled.append(topic))
    try:
        async with running(gateway), Subscriber(mosquitto, [f"{BASE}/bridge/error"]) as till:
            await eventually(lambda: gateway.connected)
            await till.publish(f"{BASE}/terminals/V400m-1/request", {"x": 1}, retain=True)
            refusal = await till.wait_for(lambda t, p: True, timeout=10)
            assert RETAINED_ERROR in refusal["error"] and refusal["poi_id"] == "V400m-1"
            await till.publish(f"{BASE}/terminals/V400m-1/request", {"x": 2})
            await eventually(lambda: handled)
            assert handled == [f"{BASE}/terminals/V400m-1/request"]  # the plain one only
            # Clearing it as the refusal says (an empty retained message, which MQTT 5 also
            # delivers with retain set) is no request, and gets no second refusal.
            await till.publish(f"{BASE}/terminals/V400m-1/request", b"", retain=True)
            await asyncio.sleep(0.5)
            assert len(till.on(f"{BASE}/bridge/error")) == 1
            assert handled == [f"{BASE}/terminals/V400m-1/request"]
    finally:
        journal.close()



async def swallows_one_cancellation() -> None:
    """What Python 3.11's asyncio.wait_for (inside aiomqtt) may do: a cancellation that
    arrives as its future completes is lost, and the coroutine goes on."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        pass
    await asyncio.sleep(3600)


async def test_a_stop_whose_cancellation_is_swallowed_still_ends(tmp_path, mosquitto):
    """Seen in a soak: a SIGTERM just as the MQTT connection came up; the cancellation of
    the MQTT task was lost inside aiomqtt, the task went on serving, then reconnecting after
    a broker outage, and the daemon never exited until it was killed. Now the stop cancels
    again what is still running, and the MQTT task does not reconnect once a stop was
    asked, even if its cancellation was lost and the connection ended otherwise."""
    from bridge.config import parse_config
    from bridge.daemon.app import STOP_GRACE, Bridge

    config = parse_config({"journal": str(tmp_path / "journal.sqlite3"),
                           "mqtt": {"host": mosquitto.host, "port": mosquitto.port}})
    bridge = Bridge(config, hotplug=False)
    try:
        stubborn = asyncio.create_task(swallows_one_cancellation(), name="stubborn")
        bridge._tasks = [stubborn]
        started = time.monotonic()
        await bridge._end_tasks()
        assert stubborn.cancelled() and time.monotonic() - started < 2 * STOP_GRACE + 1
    finally:
        bridge.journal.close()

    journal = Journal(tmp_path / "gateway.sqlite3")
    gateway = gateway_for(mosquitto, journal)

    served: list[int] = []

    async def serve_losing_the_cancellation(client) -> None:
        served.append(1)
        if len(served) > 1:  # a reconnect: the bug; this time a cancellation goes through
            await asyncio.sleep(3600)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
        raise aiomqtt.MqttError("Disconnected during message iteration")  # the broker went

    gateway._serve = serve_losing_the_cancellation
    task = asyncio.create_task(gateway.run())
    try:
        await eventually(lambda: gateway._client is not None)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=3)
        assert task in done and task.cancelled() and served == [1]  # not reconnecting
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        journal.close()


async def test_a_retained_refusal_on_bridge_error_echoes_no_card_data_in_its_topic(
        tmp_path, mosquitto):
    """bridge/error reaches every operator and head office: a request topic whose SaleID
    level is a card number was echoed in full in the refusal's `topic` (the diff review),
    though its error text and IDs beside it pass the card-data filter."""
    pan = "4111111111111111"
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal, protocol="5")
    gateway.set_request_handler(lambda topic, payload, reply: None)
    try:
        async with running(gateway), Subscriber(mosquitto, [f"{BASE}/bridge/error"]) as till:
            await eventually(lambda: gateway.connected)
            await till.publish(f"{BASE}/terminals/V400m-1/request/{pan}", {"x": 1}, retain=True)
            refusal = await till.wait_for(lambda t, p: True, timeout=10)
            assert RETAINED_ERROR in refusal["error"]
            assert pan not in json.dumps(refusal), refusal
            assert refusal["topic"] == f"{BASE}/terminals/V400m-1/request/[redacted]"
            await till.publish(f"{BASE}/terminals/V400m-1/request/{pan}", b"", retain=True)
    finally:
        journal.close()


async def test_a_broker_out_of_reach_is_said_once_then_reminded_with_how_long_and_what_waits(
        tmp_path, caplog, monkeypatch):
    """Broker down at start: "cannot reach MQTT broker ...; retrying" said nothing of what
    to check, or that results wait; then (field review) a WARNING at every retry, every
    ~30 s for as long as it lasted, none saying how long or how much waits, and the first
    line after a loss was aiomqtt's "Disconnected during message iteration". Now: the first
    failure or the loss is said once, with what to check; then a reminder at most every
    OUTAGE_REMINDER (10 min; 0.5 s here) with the outage's length and the messages waiting
    in the outbox; and when the broker is back, one line saying after how long, and how
    many are being sent."""
    from bridge.daemon import mqtt as mqtt_module

    from .broker import free_port

    monkeypatch.setattr(mqtt_module, "OUTAGE_REMINDER", 0.5)
    caplog.set_level(logging.INFO, logger="poi_bridge")
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.enqueue([(f"{BASE}/registers/POS1/response", b'{"n": %d}' % n, 1, False)
                     for n in range(3)])  # results made while the broker is away
    port = free_port()  # nothing listens there yet
    config = MqttConfig(host="127.0.0.1", port=port, base_topic=BASE, client_id="down-at-start")
    gateway = RegisterGateway(config, journal, backoff=Backoff(initial=0.05, maximum=0.1))

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    def reminders() -> list[str]:
        return [m for m in warned() if " still out of reach after " in m]

    try:
        async with running(gateway):
            await eventually(lambda: len(reminders()) >= 2)
            said = warned()
            assert said[0].startswith(f"cannot reach MQTT broker 127.0.0.1:{port}: "), said
            assert "Is the broker running? (systemctl status mosquitto)" in said[0], said[0]
            assert "Results are kept and sent on reconnect" in said[0], said[0]
            # (a broker that runs, elsewhere than configured: a technician's review)
            assert "Are mqtt.host and mqtt.port in the configuration its address?" \
                in said[0], said[0]
            # the retries between (every 0.05-0.1 s) are not warnings of their own
            assert said[1:] == reminders(), said
            assert re.search(r"still out of reach after \d+ s \(.*\); 3 messages waiting in "
                             r"the outbox \(results, events, answers\) are sent once it is "
                             r"back\. Retrying; is the broker running\?", said[1]), said[1]
            broker = Mosquitto(tmp_path / "broker", port=port).start()
            try:
                await eventually(lambda: gateway.connected)
                back = [r.getMessage() for r in caplog.records
                        if r.getMessage().startswith("connected to MQTT broker")]
                assert re.fullmatch(
                    rf"connected to MQTT broker 127\.0\.0\.1:{port} again, after \d+ s out "
                    r"of reach; 3 messages waiting in the outbox \(results, events, "
                    r"answers\) are being sent now", back[0]), back
                before = len(warned())
            finally:
                broker.kill()
            await eventually(lambda: len(reminders()) >= 3)
            lost = warned()[before:]
            assert lost[0].startswith(f"lost the MQTT broker 127.0.0.1:{port} (the "
                                      "connection closed: "), lost
            assert "Disconnected during message iteration" not in lost[0], lost
            assert "systemctl status mosquitto" in lost[0], lost
            assert not [m for m in lost if m.startswith("cannot reach")], lost
    finally:
        journal.close()


async def test_a_broker_that_goes_away_after_a_run_of_takeovers_is_said_at_once(
        tmp_path, caplog):
    """A review: once a run of takeovers (another client with the bridge's client id) had
    been named, each loss was logged at debug and marked as said, so a broker that then
    went away was said only after OUTAGE_REMINDER, 10 minutes. A reconnection that fails
    after a takeover is an outage, said at once."""
    from bridge.daemon import mqtt as mqtt_module

    caplog.set_level(logging.INFO, logger="poi_bridge")
    broker = Mosquitto(tmp_path / "broker").start()
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        gateway = gateway_for(broker, journal, client_id="twin")
        async with running(gateway):
            for _ in range(mqtt_module.SHORT_CONNECTIONS_SAID + 2):
                await eventually(lambda: gateway.connected)
                async with aiomqtt.Client(broker.host, broker.port, identifier="twin"):
                    pass  # takes the session: the broker drops the bridge
                await eventually(lambda: not gateway.connected)
            assert any("same client id" in m for m in caplog.messages)
            await eventually(lambda: gateway.connected)
            said = len(caplog.records)
            broker.kill()
            await eventually(lambda: any(
                r.levelno == logging.WARNING and "cannot reach MQTT broker" in r.getMessage()
                for r in caplog.records[said:]), timeout=10)
    finally:
        journal.close()
        broker.kill()

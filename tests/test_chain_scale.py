"""A chain: store brokers bridged into a central broker, each under its own prefix, as
`examples/mosquitto/store-bridge.conf` and the README's "A chain of stores" describe. Real
mosquitto processes on both sides, the real daemon and a simulated terminal in each store,
registers at head office (on the central broker) and in the store. Between a store and the
central broker runs a TCP relay the tests can cut: the WAN link."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, Scenario

from .broker import Mosquitto
from .example_broker import DropInMosquitto, broker_tls, make_pki
from .rig import POI, ROOT, Subscriber, outcome_for

EXAMPLE = ROOT / "examples" / "mosquitto" / "store-bridge.conf"
CENTRAL_ACL = ROOT / "examples" / "mosquitto" / "central.acl"
CENTRAL = ROOT / "examples" / "mosquitto" / "central.conf"
STORE = "poi/store-12"
LINK = f"{STORE}/bridge/link"


def store_bridge_config(host: str, port: int, store: str = "store-12", *,
                        pki: Path | None = None, identity: str | None = None,
                        **settings: str) -> str:
    """The documented example for `store`, pointed at host:port. With `pki`, its TLS lines
    name the files there (the client certificate of `identity`, the store by default);
    without, they are left out. `settings` replace the example's values (try_private=
    "false", ...). Added for the tests only: `restart_timeout 1 2`, so that the bridge tries
    again every 1-2 s rather than 5-30 s (with a single value, mosquitto 2.0.11 kept its
    default 5-30 s back-off here)."""
    files = {"bridge_cafile": "ca", "bridge_certfile": identity or store,
             "bridge_keyfile": identity or store}
    lines = []
    for line in EXAMPLE.read_text().replace("store-12", store).splitlines():
        key = line.split(" ", 1)[0]
        if key == "address" or (key in files and pki is None):
            continue
        if key in files:
            line = f"{key} {pki / files[key]}.{'key' if key == 'bridge_keyfile' else 'pem'}"
        if key in settings:
            line = f"{key} {settings.pop(key)}"
        lines.append(line)
        if key == "connection":
            lines.append(f"address {host}:{port}")
    assert not settings, f"not in the example: {settings}"
    return "\n".join([*lines, "restart_timeout 1 2"]) + "\n"


class WanLink:
    """A TCP relay between a store's bridge and the central broker. `cut()` resets every
    connection through it and refuses new ones until `restore()`."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self._listener.getsockname()
        self._up = True
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            try:
                if not self._up:
                    raise OSError("the link is down")
                far = socket.create_connection(self.target, timeout=2)
            except OSError:
                near.close()
                continue
            with self._lock:
                self._pairs.append((near, far))
            threading.Thread(target=self._relay, args=(near, far), daemon=True).start()

    @staticmethod
    def _relay(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def cut(self) -> None:
        self._up = False
        with self._lock:
            for pair in self._pairs:
                for sock in pair:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            self._pairs.clear()

    def restore(self) -> None:
        self._up = True

    def close(self) -> None:
        self.cut()
        self._listener.close()


class Store:
    """One store: its broker bridged as documented, a simulated terminal, the daemon."""

    def __init__(self, workdir: Path, name: str, central: tuple[str, int], *,
                 protocol: str = "3.1.1", broker_config: str = "", pki: Path | None = None,
                 mqtt: dict[str, Any] | None = None, **settings: str) -> None:
        self.workdir, self.name = workdir, name
        self.broker = Mosquitto(workdir / "broker", extra_config=(
            store_bridge_config(*central, store=name, pki=pki, **settings) + broker_config))
        self.protocol = protocol
        self.mqtt = mqtt or {}
        self.simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05)),
                                         ack_timeout=0.3)
        self.bridge: Bridge | None = None

    async def start(self) -> Store:
        self.broker.start()
        device = await self.simulator.start_pty(self.workdir / "terminal")
        self.bridge = Bridge(parse_config({
            "journal": str(self.workdir / "journal.sqlite3"),
            "mqtt": {"host": self.broker.host, "port": self.broker.port,
                     "base_topic": "poi-bridge", "protocol": self.protocol, **self.mqtt},
            "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device}}],
        }))
        await self.bridge.start()
        return self

    async def stop(self) -> None:
        if self.bridge is not None:
            await self.bridge.stop()
        await self.simulator.close()
        self.broker.kill()

    def charged(self) -> set[tuple[str, str]]:
        """(SaleID, ServiceID) of every payment the store's terminal received."""
        return set(self.simulator.terminal.ledger)


async def arrives(sub: Subscriber, predicate: Any, *, since: int = 0,
                  timeout: float = 15.0) -> Any:
    """The payload of the first message from index `since` on that matches."""
    async with asyncio.timeout(timeout):
        while True:
            for topic, payload, _ in sub.messages[since:]:
                if predicate(topic, payload):
                    return payload
            await asyncio.sleep(0.02)


def copies(sub: Subscriber, service_id: str) -> list[tuple[str, str]]:
    """(topic, content) of every register response for service_id that sub received."""
    match = outcome_for(service_id)
    return [(t, json.dumps(p, sort_keys=True)) for t, p, _ in sub.messages if match(t, p)]


async def pay(till: Subscriber, service_id: str) -> None:
    request = responses.payment_request("TILL1", service_id, POI, 12.5)
    await till.publish(f"poi-bridge/terminals/{POI}/request", json.dumps(request))
    await arrives(till, outcome_for(service_id, "approved"))


def online(store: str):
    return lambda t, p: t == f"poi/{store}/bridge/state" and isinstance(p, dict) \
        and p.get("state") == "online"


async def test_register_on_the_central_broker_pays_through_a_store(tmp_path):
    central = Mosquitto(tmp_path / "central").start()
    store = await Store(tmp_path / "store-12", "store-12", (central.host, central.port)).start()
    try:
        async with Subscriber(central, [f"{STORE}/#"], client_id="head-office") as office:
            # The store's retained states reach head office under the store's prefix.
            await office.wait_for(online("store-12"), timeout=20)
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
        await store.stop()
        central.kill()


async def test_results_made_while_the_wan_is_down_reach_head_office_when_it_is_back(tmp_path):
    """The link goes down, the store keeps paying, the central broker restarts meanwhile:
    once the link is back, head office has every result, each with the content the till
    got. QoS 1 may deliver one twice, never a different one. It fails with `cleansession
    true` (the store broker then drops what it holds for the bridge while disconnected),
    with QoS 0 on the registers/# line (not queued at all), or with `bridge_protocol_version
    mqttv50`: mosquitto 2.0's MQTT 5 bridge sends no Session Expiry Interval, the central
    broker ends the store's session when the link drops, and head office's request is lost."""
    # (wan_down: the central broker has published the bridge's last will, link down)
    async with wan_down(tmp_path) as (central, wan, store, office, till):
        cut_at = len(office.messages)
        for service_id in ("W1", "W2", "W3"):
            await pay(till, service_id)  # the store works on, alone
        # Head office asks the store for its transactions: the request waits at the central
        # broker, in the bridge's persistent session.
        await office.publish(f"{STORE}/bridge/request/transactions",
                             {"transaction": "hq-1", "sale_id": "TILL1"})
        # The central broker is restarted meanwhile (it saves its sessions on the way down).
        await office.disconnect()
        central.stop()
        central.start()
        await office.connect()
        await asyncio.sleep(0.5)
        assert not any(outcome_for(s)(t, p) for t, p, _ in office.messages[cut_at:]
                       for s in ("W1", "W2", "W3"))

        wan.restore()
        for service_id in ("W1", "W2", "W3"):
            answer = await arrives(office, outcome_for(service_id), since=cut_at)
            assert answer["bridge"]["outcome"] == "approved"
        listing = await arrives(office, lambda t, p: t == f"{STORE}/bridge/response/transactions"
                                and p.get("transaction") == "hq-1")
        assert {"W1", "W2", "W3"} <= {row["service_id"] for row in listing["data"]}
        await arrives(office, lambda t, p: t == LINK and p == 1, since=cut_at)
        for service_id in ("W1", "W2", "W3"):
            received = copies(office, service_id)
            assert {t for t, _ in received} == {f"{STORE}/registers/TILL1/response"}
            assert {c for _, c in received} == {c for _, c in copies(till, service_id)}


async def test_stores_each_under_their_prefix_and_a_request_reaches_only_its_store(tmp_path):
    """Two stores with the same terminal id: head office tells them apart by prefix alone."""
    central = Mosquitto(tmp_path / "central").start()
    names = ("store-12", "store-13")
    stores = [await Store(tmp_path / n, n, (central.host, central.port)).start() for n in names]
    office = Subscriber(central, ["poi/+/registers/+/response", "poi/+/bridge/state"],
                        client_id="head-office")
    watchers = [Subscriber(s.broker, ["poi-bridge/terminals/+/request"], client_id="watch")
                for s in stores]
    await office.connect()
    for watcher in watchers:
        await watcher.connect()
    try:
        for name in names:
            await arrives(office, online(name), timeout=20)
        for name in names:
            service_id = "A" + name.split("-")[1]
            request = responses.payment_request("HQ1", service_id, POI, 7.0)
            await office.publish(f"poi/{name}/terminals/{POI}/request", json.dumps(request))
        for store, watcher in zip(stores, watchers, strict=True):
            service_id = "A" + store.name.split("-")[1]
            answer = await arrives(office, outcome_for(service_id, "approved"))
            assert answer["bridge"]["transaction"]["service_id"] == service_id
            assert {t for t, _ in copies(office, service_id)} == {
                f"poi/{store.name}/registers/HQ1/response"}
            assert store.charged() == {("HQ1", service_id)}
            assert [p["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
                    for _, p, _ in watcher.messages] == [service_id]
    finally:
        for sub in (office, *watchers):
            await sub.disconnect()
        for store in stores:
            await store.stop()
        central.kill()


async def test_no_echo_when_the_central_broker_ignores_the_bridge_bit(tmp_path):
    """With try_private false (what to set for a central broker that refuses the bridge
    protocol version) the central broker sends the bridge every message matching its
    subscriptions, its own included. The example's topic lines never subscribe to what
    they publish, so nothing comes back: a till's payment runs once and is answered once.
    With the former `topic # both`, the request came back, the daemon answered it again
    (`duplicate`) and every result reached the store's registers twice."""
    central = Mosquitto(tmp_path / "central").start()
    store = await Store(tmp_path / "store-12", "store-12", (central.host, central.port),
                        try_private="false").start()
    office = Subscriber(central, [f"{STORE}/#"], client_id="head-office")
    till = Subscriber(store.broker, ["poi-bridge/registers/TILL1/#", "poi-bridge/bridge/#"],
                      client_id="till-1")
    await office.connect()
    await till.connect()
    try:
        await arrives(office, online("store-12"), timeout=20)
        await pay(till, "E1")
        await arrives(office, outcome_for("E1", "approved"))
        await asyncio.sleep(1.0)  # an echo comes back within milliseconds
        assert len(copies(till, "E1")) == 1
        assert len(copies(office, "E1")) == 1
        events = [p["event"] for t, p, _ in till.messages if t.endswith("/event")]
        assert "duplicate" not in events
        assert [p["state"] for t, p, _ in till.messages if t == "poi-bridge/bridge/state"] == [
            "online"]
        log = central.log_path.read_text()
        assert "New client connected" in log and "as store-12" in log
        assert "New bridge connected" not in log  # the bridge bit really was off
    finally:
        await till.disconnect()
        await office.disconnect()
        await store.stop()
        central.kill()


async def test_mqtt5_bridge_answers_reach_head_office_on_a_store_side_response_topic(tmp_path):
    """An MQTT 5 bridge carries ResponseTopic and CorrelationData unchanged, and the daemon
    publishes the answer on that topic in the store's broker when it lies under
    poi-bridge/bridge/response/ (which the bridge sends out to head office)."""
    central = Mosquitto(tmp_path / "central").start()
    store = await Store(tmp_path / "store-12", "store-12", (central.host, central.port),
                        protocol="5", bridge_protocol_version="mqttv50").start()
    received: list[aiomqtt.Message] = []
    stray = Subscriber(store.broker, ["hq/#"], client_id="watch")
    await stray.connect()
    try:
        async with aiomqtt.Client(central.host, central.port, identifier="head-office-v5",
                                  protocol=aiomqtt.ProtocolVersion.V5) as office:
            for topic in (f"{STORE}/bridge/state", f"{STORE}/bridge/response/#", "hq/#"):
                await office.subscribe(topic, qos=1)

            async def read() -> None:
                async for message in office.messages:
                    received.append(message)
            reader = asyncio.create_task(read())

            async def seen(topic: str) -> aiomqtt.Message:
                async with asyncio.timeout(15):
                    while True:
                        for message in received:
                            if message.topic.value == topic:
                                return message
                        await asyncio.sleep(0.02)

            state = await seen(f"{STORE}/bridge/state")
            assert json.loads(state.payload)["state"] == "online"

            async def ask(response_topic: str, correlation: bytes) -> None:
                properties = Properties(PacketTypes.PUBLISH)
                properties.ResponseTopic = response_topic
                properties.CorrelationData = correlation
                await office.publish(f"{STORE}/bridge/request/terminals", b"{}", qos=1,
                                     properties=properties)

            await ask("poi-bridge/bridge/response/hq-7", b"hq-7")
            answer = await seen(f"{STORE}/bridge/response/hq-7")
            assert answer.properties.CorrelationData == b"hq-7"
            assert json.loads(answer.payload)["status"] == "ok"

            # A ResponseTopic outside poi-bridge/bridge/response/ is not used (the bridge
            # may publish where the requester may not): the answer comes on the fixed
            # topic, with its correlation data, through the bridge to head office.
            await ask("hq/replies/8", b"hq-8")
            def with_hq_8() -> list[aiomqtt.Message]:
                return [m for m in received
                        if getattr(m.properties, "CorrelationData", None) == b"hq-8"]

            async with asyncio.timeout(15):
                while not with_hq_8():
                    await asyncio.sleep(0.02)
            (answer,) = with_hq_8()
            assert answer.topic.value == f"{STORE}/bridge/response/terminals"
            await asyncio.sleep(0.5)
            assert not stray.messages
            reader.cancel()
    finally:
        await stray.disconnect()
        await store.stop()
        central.kill()


@contextlib.asynccontextmanager
async def wan_down(tmp_path: Path, **store_settings: Any):
    """A store behind a WAN link, head office (a persistent session on results, the link
    and command answers) and a till connected, the link cut (head office has seen the
    bridge's last will): yields (central, wan, store, office, till)."""
    central = Mosquitto(tmp_path / "central").start()
    wan = WanLink(central.host, central.port)
    store = await Store(tmp_path / "store-12", "store-12", (wan.host, wan.port),
                        **store_settings).start()
    office = Subscriber(central, ["poi/+/registers/+/response", "poi/+/bridge/link",
                                  "poi/+/bridge/response/#"],
                        client_id="head-office", persistent=True)
    till = Subscriber(store.broker, ["poi-bridge/registers/TILL1/#"], client_id="till-1")
    await office.connect()
    await till.connect()
    try:
        await arrives(office, lambda t, p: t == LINK and p == 1)
        wan.cut()
        await arrives(office, lambda t, p: t == LINK and p == 0)
        yield central, wan, store, office, till
    finally:
        await till.disconnect()
        await office.disconnect()
        await store.stop()
        wan.close()
        central.kill()


async def test_past_the_store_brokers_queue_the_newest_are_dropped_retained_documents_heal(
        tmp_path):
    """A store broker holds at most max_queued_messages for the bridge while the link is
    down; past that it drops the newest, and says so. Only the QoS 1 lines' messages are
    queued: a payment's 3 events and its response (its 2 transactions/... documents and 2
    terminal states are retained, bridged at QoS 0). On reconnecting, mosquitto sends every
    retained message under the bridged topics again, so each transaction's retained document
    still reaches head office, while the dropped register responses and events do not."""
    async with wan_down(tmp_path, broker_config="max_queued_messages 16\n") as (
            central, wan, store, office, till):
        paid = ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6"]  # 4 queued messages each: 24 for 16
        for service_id in paid:
            await pay(till, service_id)
        wan.restore()
        await arrives(office, outcome_for("Q1"))
        async with Subscriber(central, [f"{STORE}/transactions/TILL1/+"],
                              client_id="dashboard") as dashboard:
            for service_id in paid:
                document = await arrives(dashboard, lambda t, p, s=service_id: t.endswith(
                    f"/{s}") and p.get("state") == "final")
                assert document["bridge"]["outcome"] == "approved"
        assert not copies(office, "Q6")  # its response was past the limit: dropped
        assert "Outgoing messages are being dropped for client local.store-12" in \
            store.broker.log_path.read_text()


async def test_health_reports_do_not_fill_the_store_brokers_queue_while_the_wan_is_down(
        tmp_path):
    """bridge/health is published every health_interval. Were it queued for the bridge
    while the link is down, a long outage would fill max_queued_messages with stale copies
    and the payment results made after would be dropped. It is published and bridged at
    QoS 0, which mosquitto does not queue for a client that is away (queue_qos0_messages
    false); the retained copy reaches head office on reconnect."""
    async with wan_down(tmp_path, broker_config="max_queued_messages 16\n",
                        mqtt={"health_interval": 0.1}) as (central, wan, store, office, till):
        # More health reports than the queue holds, counted as the store broker passes them
        # on (a fixed wait sent too few on a loaded box, and the test proved nothing).
        async with Subscriber(store.broker, ["poi-bridge/bridge/health"],
                              client_id="store-watch") as watch:
            async with asyncio.timeout(30):
                while len(watch.messages) < 24:
                    await asyncio.sleep(0.05)
        await pay(till, "H1")
        wan.restore()
        answer = await arrives(office, outcome_for("H1"))
        assert answer["bridge"]["outcome"] == "approved"
        async with Subscriber(central, [f"{STORE}/bridge/health"],
                              client_id="dashboard") as dashboard:
            health = await arrives(dashboard, lambda t, p: True)
            assert health["terminals"]
        assert "Outgoing messages are being dropped" not in store.broker.log_path.read_text()


class TlsSubscriber(Subscriber):
    """A Subscriber that logs in on `port` with the client certificate `pki`/`name`.pem,
    checking the broker's against `ca`."""

    def __init__(self, broker: Any, topics: list[str], pki: Path, name: str, *, port: int,
                 ca: Path, client_id: str | None = None, persistent: bool = False) -> None:
        super().__init__(broker, topics, client_id=client_id or name, persistent=persistent)
        self.port = port
        self.tls = ssl.create_default_context(cafile=str(ca))
        self.tls.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}.key"))

    async def connect(self) -> None:
        self._client = aiomqtt.Client(self.broker.host, self.port, tls_context=self.tls,
                                      identifier=self.client_id,
                                      clean_session=not self.persistent)
        await self._client.__aenter__()
        for topic in self.topics:
            await self._client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._read())


def central_broker(tmp_path: Path) -> DropInMosquitto:
    """examples/mosquitto/central.conf, as a drop-in under Debian's main file, with
    central.acl: the stores' PKI in tmp_path/pki (store-12, store-13; its broker
    certificate is the central broker's), head office's in tmp_path/hq (head-office).
    ports[0] is the stores' listener, ports[1] head office's."""
    pki, hq = tmp_path / "pki", tmp_path / "hq"
    make_pki(pki, ["store-12", "store-13"])
    make_pki(hq, ["head-office"])
    return DropInMosquitto(tmp_path / "central", CENTRAL, {
        "/etc/mosquitto/poi-chain.acl": str(CENTRAL_ACL),
        "/etc/mosquitto/certs/head-office-ca.pem": str(hq / "ca.pem"),
        **broker_tls(pki, "/etc/mosquitto/certs/stores-ca.pem",
                     "/etc/mosquitto/certs/central.pem", "/etc/mosquitto/certs/central.key"),
    })


def head_office(central: DropInMosquitto, tmp_path: Path, topics: list[str],
                client_id: str, *, persistent: bool = False) -> TlsSubscriber:
    """A head-office client: its listener, the head-office certificate, its own client id."""
    return TlsSubscriber(central, topics, tmp_path / "hq", "head-office", client_id=client_id,
                         port=central.ports[1], ca=tmp_path / "pki" / "ca.pem",
                         persistent=persistent)


async def test_central_acl_keeps_each_store_to_its_own_prefix_and_session(tmp_path):
    """The central broker as examples/mosquitto/central.conf and central.acl set it up: on
    the stores' listener a certificate per store, its CN the username and the client id. A
    store broker configured (by mistake or on purpose) with another store's prefix and
    client id, but its own certificate, can neither publish nor subscribe there, nor take
    over that store's session: the real store-12 keeps working. Nor can a store's
    certificate log in on head office's listener, where client ids are free."""
    central = central_broker(tmp_path).start()
    pki = tmp_path / "pki"
    store = await Store(tmp_path / "store-12", "store-12", (central.host, central.ports[0]),
                        pki=pki).start()
    # store-13's broker, set up with store-12's prefix and client id (its own certificate)
    impostor = Mosquitto(tmp_path / "impostor", extra_config=store_bridge_config(
        central.host, central.ports[0], "store-12", pki=pki, identity="store-13")).start()
    office = head_office(central, tmp_path, ["poi/#"], "head-office")
    forger = Subscriber(impostor, ["poi-bridge/terminals/#"], client_id="forger")
    await office.connect()
    await forger.connect()
    try:
        await arrives(office, online("store-12"), timeout=20)
        log = central.log_path
        async with asyncio.timeout(10):
            while log.read_text().count("New bridge connected") < 2:
                await asyncio.sleep(0.05)  # the impostor's bridge is connected too
        await forger.publish("poi-bridge/registers/HQ1/response", {"forged": True})
        await forger.publish("poi-bridge/bridge/state", {"state": "offline"}, retain=True)
        request = responses.payment_request("HQ1", "T12", POI, 3.0)
        await office.publish(f"{STORE}/terminals/{POI}/request", json.dumps(request))
        answer = await arrives(office, outcome_for("T12"))
        assert answer["bridge"]["outcome"] == "approved"
        # ... and on the register's own topic, .../request/{SaleID}, as RegisterClient sends
        request = responses.payment_request("HQ1", "T13", POI, 4.0)
        await office.publish(f"{STORE}/terminals/{POI}/request/HQ1", json.dumps(request))
        answer = await arrives(office, outcome_for("T13"))
        assert answer["bridge"]["outcome"] == "approved"
        # store-13's certificate on head office's listener, as store-12: refused at once.
        thief = TlsSubscriber(central, [], pki, "store-13", client_id="store-12",
                              port=central.ports[1], ca=pki / "ca.pem")
        try:
            await thief.connect()
        except aiomqtt.MqttError:
            pass
        else:
            await thief.disconnect()
            raise AssertionError("a store's certificate logged in on head office's listener")
        await asyncio.sleep(0.5)
        assert not any(p == {"forged": True} or isinstance(p, dict) and p.get("state") == "offline"
                       for _, p, _ in office.messages)
        assert forger.messages == []  # the requests reached store-12 only
        assert store.charged() == {("HQ1", "T12"), ("HQ1", "T13")}
        text = log.read_text()
        assert "as store-13" in text and "closing old connection" not in text
    finally:
        await forger.disconnect()
        await office.disconnect()
        await store.stop()
        impostor.kill()
        central.kill()


async def test_several_head_office_clients_are_connected_at_once_each_gets_the_results(
        tmp_path):
    """With use_username_as_clientid on every listener, each head-office client got the
    client id "head-office": a dashboard and a register knocked each other off ("Client
    head-office already connected, closing old connection"), the register's payment ended
    OUTCOME UNKNOWN, and $share consumers could never be two. On head office's own
    listener each keeps its own id: a dashboard and a register both get every result, and
    two $share/hq consumers split them, each result to one."""
    central = central_broker(tmp_path).start()
    store = await Store(tmp_path / "store-12", "store-12", (central.host, central.ports[0]),
                        pki=tmp_path / "pki").start()
    results = "poi/+/registers/+/response"
    dashboard = head_office(central, tmp_path, [results, "poi/+/bridge/state"], "hq-dashboard")
    register = head_office(central, tmp_path, [results], "hq-register")
    workers = [head_office(central, tmp_path, [f"$share/hq/{results}"], f"hq-worker-{n}")
               for n in (1, 2)]
    clients = [dashboard, register, *workers]
    for client in clients:
        await client.connect()
    try:
        await arrives(dashboard, online("store-12"), timeout=20)
        paid = [f"S{n}" for n in range(1, 5)]
        for service_id in paid:
            request = responses.payment_request("HQ1", service_id, POI, 2.0)
            await register.publish(f"{STORE}/terminals/{POI}/request/HQ1", json.dumps(request))
            for client in (register, dashboard):
                answer = await arrives(client, outcome_for(service_id, "approved"))
                assert answer["bridge"]["transaction"]["service_id"] == service_id
        async with asyncio.timeout(10):
            while sum(len(w.messages) for w in workers) < len(paid):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a copy to both workers would come within milliseconds
        shared = sorted(s for w in workers for s in paid if copies(w, s))
        assert shared == paid and sum(len(w.messages) for w in workers) == len(paid)
        assert all(w.messages for w in workers), "the shared subscription split nothing"
        assert all(len(copies(c, s)) == 1 for c in (dashboard, register) for s in paid)
        assert "closing old connection" not in central.log_path.read_text()
    finally:
        for client in clients:
            await client.disconnect()
        await store.stop()
        central.kill()


async def test_head_offices_request_a_level_too_deep_is_refused_back_at_head_office(tmp_path):
    """The store's daemon refuses a request or command on a topic a level too deep, or with an
    empty last level, on bridge/error (8b5246a). Published at head office, such a request
    must cross the store bridge too, or it vanishes there and head office hears nothing: the
    example's topic lines and central.acl carry the whole request subtrees in (and nothing
    else: a head-office publish beside them never reaches the store), and the refusal comes
    back out on bridge/error. The exact topics keep working, each request arriving once."""
    central = central_broker(tmp_path).start()
    store = await Store(tmp_path / "store-12", "store-12", (central.host, central.ports[0]),
                        pki=tmp_path / "pki").start()
    office = head_office(central, tmp_path, [f"{STORE}/bridge/#", f"{STORE}/registers/#"],
                         "hq-register")
    # what crosses into the store, as the store's broker delivers it
    inside = Subscriber(store.broker, ["poi-bridge/#"], client_id="store-watch")
    await office.connect()
    await inside.connect()
    local = f"poi-bridge/terminals/{POI}/request"
    try:
        await arrives(office, online("store-12"), timeout=20)
        deep = {f"{STORE}/terminals/{POI}/request/HQ1/extra": f"{local}/HQ1/extra",
                f"{STORE}/terminals/{POI}/request/HQ1/": f"{local}/HQ1/"}
        for n, (topic, there) in enumerate(deep.items()):
            request = responses.payment_request("HQ1", f"D{n}", POI, 5.0)
            await office.publish(topic, json.dumps(request))
            refusal = await arrives(office, lambda t, p, there=there: t == f"{STORE}/bridge/error"
                                    and p.get("topic") == there)
            assert refusal["service_id"] == f"D{n}" and refusal["status"] == "error"
            assert "2 levels after 'request'" in refusal["error"]
        await office.publish(f"{STORE}/bridge/request/health/x", {"transaction": "hq-x"})
        refusal = await arrives(office, lambda t, p: t == f"{STORE}/bridge/error"
                                and p.get("transaction") == "hq-x")
        assert refusal["topic"] == "poi-bridge/bridge/request/health/x"
        assert "2 levels after 'request'" in refusal["error"]
        # The exact topics still work, through the same lines.
        for service_id, topic in (("N1", f"{STORE}/terminals/{POI}/request"),
                                  ("N2", f"{STORE}/terminals/{POI}/request/HQ1")):
            request = responses.payment_request("HQ1", service_id, POI, 6.0)
            await office.publish(topic, json.dumps(request))
            answer = await arrives(office, outcome_for(service_id))
            assert answer["bridge"]["outcome"] == "approved"
        await office.publish(f"{STORE}/bridge/request/health", {"transaction": "hq-h"})
        health = await arrives(office, lambda t, p: t == f"{STORE}/bridge/response/health"
                               and p.get("transaction") == "hq-h")
        assert health["status"] == "ok"
        # Beside the request subtrees, head office publishes nothing into the store (the
        # central ACL refuses it, the bridge does not carry it), and a deep request was
        # neither charged nor answered on a register's topics.
        for topic in (f"{STORE}/terminals/{POI}/requests/HQ1", f"{STORE}/bridge/requestx",
                      f"{STORE}/terminals/{POI}/state", f"{STORE}/registers/HQ1/response"):
            await office.publish(topic, {"transaction": "hq-stray"})
        await office.publish(f"{STORE}/bridge/request/health", {"transaction": "hq-last"})
        await arrives(office, lambda t, p: t == f"{STORE}/bridge/response/health"
                      and p.get("transaction") == "hq-last")
        assert not [t for t, p, _ in inside.messages
                    if isinstance(p, dict) and p.get("transaction") == "hq-stray"]
        sent = [t for t, p, _ in inside.messages if "/request" in t]
        assert sorted(sent) == sorted([*deep.values(), "poi-bridge/bridge/request/health/x",
                                       local, f"{local}/HQ1", "poi-bridge/bridge/request/health",
                                       "poi-bridge/bridge/request/health"])
        assert store.charged() == {("HQ1", "N1"), ("HQ1", "N2")}
        assert not [p for t, p, _ in office.messages if t.endswith("/response")
                    and (p.get("bridge") or {}).get("transaction", {}).get("service_id")
                    in ("D0", "D1")]
    finally:
        await inside.disconnect()
        await office.disconnect()
        await store.stop()
        central.kill()

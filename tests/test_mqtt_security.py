"""The MQTT side locked down, against real mosquitto: the documented ACL keeps each register
to its own results; TLS with a CA, client certificates and hostname checking."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import shutil
import ssl
import subprocess

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, Scenario

from .broker import Mosquitto
from .rig import POI, ROOT, outcome_for

ACL = ROOT / "examples" / "mosquitto" / "acl"


def passwords(path, users: dict[str, str]) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed (package mosquitto)")
    path.touch()
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True)


class Client:
    def __init__(self, broker, user: str, password: str, topics: list[str]) -> None:
        self.client = aiomqtt.Client(broker.host, broker.port, identifier=f"c-{user}",
                                     username=user, password=password)
        self.topics = topics
        self.messages: list[tuple[str, bytes]] = []

    async def __aenter__(self):
        await self.client.__aenter__()
        for topic in self.topics:
            await self.client.subscribe(topic, qos=1)
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self):
        async for message in self.client.messages:
            self.messages.append((message.topic.value, message.payload))

    async def __aexit__(self, *exc):
        self.task.cancel()
        await self.client.__aexit__(None, None, None)


async def start_bridge(tmp_path, broker, *, mqtt_password=None, **mqtt):
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05)),
                                ack_timeout=0.3)
    device = await simulator.start_pty(tmp_path / "terminal")
    config = parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": broker.host, "port": broker.port, **mqtt},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device}}],
    })
    return Bridge(config, mqtt_password=mqtt_password), simulator


@contextlib.asynccontextmanager
async def store_under_the_example_acl(tmp_path, delay: float = 0.05, users=None):
    """mosquitto with examples/mosquitto/acl, users poi-bridge, POS1 and POS2 (or `users`,
    name: password), the daemon logged in as poi-bridge, a simulated terminal: yields
    (bridge, simulator, broker)."""
    passwd = tmp_path / "passwd"
    passwords(passwd, {"poi-bridge": "bridge-pw", **(
        users or {"POS1": "pos1-pw", "POS2": "pos2-pw"})})
    broker = Mosquitto(tmp_path / "broker", anonymous=False,
                       extra_config=f"password_file {passwd}\nacl_file {ACL}\n").start()
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=delay)),
                                ack_timeout=0.3)
    device = await simulator.start_pty(tmp_path / "terminal")
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": broker.host, "port": broker.port, "username": "poi-bridge"},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device}}],
    }), mqtt_password="bridge-pw")
    await bridge.start()
    try:
        async with asyncio.timeout(10):
            while not (bridge.gateway.connected and bridge.workers[POI].online):
                await asyncio.sleep(0.05)
        yield bridge, simulator, broker
    finally:
        await bridge.stop()
        await simulator.close()
        broker.kill()


def request_topic(sale_id: str | None = None) -> str:
    """A terminal's request topic: .../request/{SaleID}, which the example ACL ties to the
    register's login, or the plain one."""
    return f"poi-bridge/terminals/{POI}/request" + (f"/{sale_id}" if sale_id else "")


async def answer(client: Client, service_id: str) -> dict:
    """The register response for service_id that `client` received."""
    async with asyncio.timeout(10):
        while True:
            for topic, payload in client.messages:
                body = json.loads(payload)
                if topic.endswith("/response") and outcome_for(service_id)(topic, body):
                    return body
            await asyncio.sleep(0.05)


async def test_acl_register_cannot_read_another_registers_results(tmp_path):
    async with store_under_the_example_acl(tmp_path) as (bridge, simulator, broker), \
            Client(broker, "POS1", "pos1-pw", ["poi-bridge/registers/POS1/#"]) as pos1, \
            Client(broker, "POS2", "pos2-pw", ["poi-bridge/registers/#",
                                               "poi-bridge/transactions/#"]) as pos2:
        await pos1.client.publish(request_topic("POS1"), json.dumps(
            responses.payment_request("POS1", "A1", POI)), qos=1)
        assert (await answer(pos1, "A1"))["bridge"]["outcome"] == "approved"
        await asyncio.sleep(0.5)
        assert pos2.messages == []  # subscribed to everything, allowed to see nothing of POS1
        # POS2 may not pretend to be the bridge either.
        await pos2.client.publish("poi-bridge/registers/POS1/response", b"{}", qos=1)
        await asyncio.sleep(0.3)
        assert all(payload != b"{}" for _, payload in pos1.messages)


def referring(sale_id: str, service_id: str, category: str, about: dict | None) -> dict:
    """A register's TransactionStatus or Abort request, naming `about` in MessageReference
    (no MessageReference at all when None)."""
    document = responses.payment_request(sale_id, service_id, POI, category=category)
    body = {"MessageReference": about} if about is not None else {}
    if category == "Abort":
        body["AbortReason"] = "MerchantAbort"
    document["SaleToPOIRequest"][f"{category}Request"] = body
    return document


async def test_a_register_may_not_read_or_abort_another_registers_payment_through_the_bridge(
        tmp_path):
    """The ACL keeps POS2 off POS1's topics, but the terminal answers a TransactionStatus or
    an Abort about any transaction, whoever made it: POS2 naming POS1's payment in
    MessageReference got POS1's whole response (card data included) on its own topic, and
    could abort POS1's payment. Both are refused NotAllowed now, as is a status request
    without MessageReference (the terminal would answer about its latest transaction);
    POS1 asking about its own still passes through."""
    pay1 = {"MessageCategory": "Payment", "SaleID": "POS1", "ServiceID": "A1"}
    async with store_under_the_example_acl(tmp_path, delay=1.5) as (bridge, simulator, broker), \
            Client(broker, "POS1", "pos1-pw", ["poi-bridge/registers/POS1/#"]) as pos1, \
            Client(broker, "POS2", "pos2-pw", ["poi-bridge/registers/POS2/#",
                                               "poi-bridge/transactions/POS2/#"]) as pos2:
        await pos1.client.publish(request_topic("POS1"), json.dumps(
            responses.payment_request("POS1", "A1", POI)), qos=1)
        await asyncio.sleep(0.3)  # POS1's payment is on the terminal now
        await pos2.client.publish(request_topic("POS2"), json.dumps(
            referring("POS2", "B1", "Abort", pay1)), qos=1)
        refused = await answer(pos2, "B1")
        assert refused["bridge"]["outcome"] == "rejected"
        assert refused["SaleToPOIResponse"]["AbortResponse"]["Response"][
            "ErrorCondition"] == "NotAllowed"
        assert "only its own transactions" in refused["bridge"]["error"]
        assert (await answer(pos1, "A1"))["bridge"]["outcome"] == "approved"

        for service_id, about in (("B2", pay1), ("B3", None)):
            await pos2.client.publish(request_topic("POS2"), json.dumps(
                referring("POS2", service_id, "TransactionStatus", about)), qos=1)
            refused = await answer(pos2, service_id)
            assert refused["bridge"]["outcome"] == "rejected", refused
            assert refused["SaleToPOIResponse"]["TransactionStatusResponse"]["Response"][
                "ErrorCondition"] == "NotAllowed"
        await pos1.client.publish(request_topic("POS1"), json.dumps(
            referring("POS1", "A2", "TransactionStatus", pay1)), qos=1)
        own = await answer(pos1, "A2")
        assert own["bridge"]["outcome"] == "approved", own
        await asyncio.sleep(0.3)
        # Nothing of POS1's payment reached POS2, on any topic it may read.
        assert not any(b'"A1"' in payload for _, payload in pos2.messages), pos2.messages
        assert len(simulator.terminal.ledger) == 1  # only POS1's payment reached it


async def test_a_register_may_not_act_as_another_by_writing_its_sale_id_in_the_header(
        tmp_path):
    """The header's SaleID is the sender's say-so: under the old ACL (any register may write
    .../request) POS2 could abort POS1's payment, or pay as POS1, by naming POS1 there. Now
    a register may write only .../request/{its login}, and the bridge refuses a header that
    names another SaleID there, answering the sender; the plain topic is closed to it."""
    pay1 = {"MessageCategory": "Payment", "SaleID": "POS1", "ServiceID": "A1"}
    async with store_under_the_example_acl(tmp_path, delay=1.5) as (bridge, simulator, broker), \
            Client(broker, "POS1", "pos1-pw", ["poi-bridge/registers/POS1/#"]) as pos1, \
            Client(broker, "POS2", "pos2-pw", ["poi-bridge/registers/POS2/#"]) as pos2:
        await pos1.client.publish(request_topic("POS1"), json.dumps(
            responses.payment_request("POS1", "A1", POI)), qos=1)
        await asyncio.sleep(0.3)
        forged = referring("POS1", "F1", "Abort", pay1)
        await pos2.client.publish(request_topic("POS2"), json.dumps(forged), qos=1)
        refused = await answer(pos2, "F1")  # to the sender, not to POS1
        assert refused["bridge"]["outcome"] == "rejected"
        assert "is not the topic's SaleID 'POS2'" in refused["bridge"]["error"], refused
        # Where the ACL does not let POS2 write, nothing arrives at all.
        for topic in (request_topic("POS1"), request_topic()):
            await pos2.client.publish(topic, json.dumps(forged), qos=1)
        await pos2.client.publish(request_topic("POS1"), json.dumps(
            responses.payment_request("POS1", "F2", POI)), qos=1)
        assert (await answer(pos1, "A1"))["bridge"]["outcome"] == "approved"
        await asyncio.sleep(0.5)
        assert [(sale, service) for sale, service in simulator.terminal.ledger] == [
            ("POS1", "A1")]
        assert not any(b'"F1"' in p or b'"F2"' in p for _, p in pos1.messages), pos1.messages
        assert bridge.intake.rejected == 1


def test_the_example_broker_refuses_packets_past_the_daemons_max_payload_with_room():
    """examples/mosquitto/mosquitto.conf bounds a client's packet (a register's 250 MB
    publish grew the daemon to 820 MB), at the daemon's own packet limit."""
    conf = (ROOT / "examples" / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    (line,) = [x for x in conf if x.startswith("max_packet_size ")]
    # Exactly the daemon's own limit: lower, and the broker would drop the bridge for a
    # result it may publish; higher, and a request between the two would reach no one
    # (the broker takes it, then drops it for an MQTT 5 daemon).
    assert int(line.split()[1]) == parse_config({}).mqtt.packet_limit


# --- TLS ----------------------------------------------------------------------------------------

def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path, key, cert):
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_pki(directory, server_names: list[str]):
    """A CA, a broker certificate for `server_names`, a client certificate."""
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "poi-bridge test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(directory / "ca", ca_key, ca)

    def leaf(name: str, sans: list[x509.GeneralName]):
        key = _key()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(directory / name, key, cert)

    sans = []
    for n in server_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    leaf("broker", sans)
    leaf("client", [x509.DNSName("poi-bridge")])


def tls_broker(tmp_path, names):
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki, names)
    options = (f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'broker.pem'}\n"
               f"keyfile {pki / 'broker.key'}\nrequire_certificate true\n")
    return Mosquitto(tmp_path / "broker", listener_options=options).start(), pki


async def test_tls_with_client_certificate_and_hostname_check(tmp_path):
    broker, pki = tls_broker(tmp_path, ["127.0.0.1"])
    tls = {"ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client.pem"),
           "key_file": str(pki / "client.key")}
    bridge, simulator = await start_bridge(tmp_path, broker, tls=tls)
    await bridge.start()
    try:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        async with aiomqtt.Client(broker.host, broker.port, tls_context=context,
                                  identifier="tls-register") as register:
            await register.subscribe("poi-bridge/#", qos=1)
            for _ in range(100):
                if bridge.gateway.connected and bridge.workers[POI].online:
                    break
                await asyncio.sleep(0.05)
            assert bridge.gateway.connected  # over TLS, with its client certificate
            await register.publish(f"poi-bridge/terminals/{POI}/request",
                                   json.dumps(responses.payment_request("POS1", "T1", POI)),
                                   qos=1)
            async with asyncio.timeout(15):
                async for message in register.messages:
                    payload = json.loads(message.payload)
                    if outcome_for("T1")(message.topic.value, payload):
                        assert payload["bridge"]["outcome"] == "approved"
                        break
        assert bridge.gateway.reconnects == 0
    finally:
        await bridge.stop()
        await simulator.close()
        broker.kill()


async def test_tls_hostname_mismatch_is_refused(tmp_path, caplog):
    broker, pki = tls_broker(tmp_path, ["broker.store-12.example"])  # not 127.0.0.1
    tls = {"ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client.pem"),
           "key_file": str(pki / "client.key")}
    bridge, simulator = await start_bridge(tmp_path, broker, tls=tls)
    await bridge.start()
    try:
        def told() -> bool:
            return any("certificate" in r.getMessage().lower()
                       or "hostname" in r.getMessage().lower() for r in caplog.records)

        async with asyncio.timeout(15):  # the handshake fails as soon as the machine gets to it
            while not told():
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # and it did not connect anyway after saying so
        assert not bridge.gateway.connected
    finally:
        await bridge.stop()
        await simulator.close()
        broker.kill()


@pytest.mark.parametrize("password_file, to_fix", [
    ("/etc/poi-bridge/mqtt-password", "the password in mqtt.password_file "
                                      "(/etc/poi-bridge/mqtt-password)"),
    # A systemd credential is a copy made at each start: the file to fix is its source.
    ("/run/credentials/poi-bridge.service/secret_mqtt-password",
     "the password in /etc/poi-bridge/credentials/mqtt-password (mqtt.password_file "
     "/run/credentials/poi-bridge.service/secret_mqtt-password is the systemd credential"),
])
async def test_a_refused_login_is_logged_as_such_not_as_an_unreachable_broker(
        tmp_path, caplog, password_file, to_fix):
    passwd = tmp_path / "passwd"
    passwords(passwd, {"poi-bridge": "bridge-pw"})
    broker = Mosquitto(tmp_path / "broker", anonymous=False,
                       extra_config=f"password_file {passwd}\n").start()
    bridge, simulator = await start_bridge(tmp_path, broker, mqtt_password="wrong",
                                           username="poi-bridge", password_file=password_file)
    caplog.set_level("WARNING", logger="poi_bridge.mqtt")
    await bridge.start()
    try:
        for _ in range(100):
            if any("refused the bridge's login" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.05)
        (line,) = {r.getMessage() for r in caplog.records
                   if "refused the bridge's login" in r.getMessage()}
        assert "as user 'poi-bridge'" in line and to_fix in line, line
        # read at start: fixing the file alone never helped, while the line said to fix it
        assert "restart it once the file is fixed" in line
        assert not any("cannot reach" in r.getMessage() for r in caplog.records)
        assert bridge.status_line().endswith(", broker login refused")
    finally:
        await bridge.stop()
        await simulator.close()
        broker.kill()


def test_only_a_connack_refusal_is_a_refused_login():
    """paho's own error codes 4 and 5 (not connected, connection refused) come in the same
    MqttCodeError as a CONNACK's 4 and 5: '[code:4] The client is not currently connected'
    was logged as a refused login."""
    from aiomqtt.exceptions import MqttConnectError

    from bridge.daemon.mqtt import login_refused

    assert login_refused(MqttConnectError(4)) and login_refused(MqttConnectError(5))
    assert not login_refused(aiomqtt.MqttCodeError(4, "The client is not currently connected"))
    assert not login_refused(aiomqtt.MqttCodeError(5, "Connection refused"))


def test_an_encrypted_client_key_is_named_as_such_and_never_prompts(tmp_path):
    from bridge.config import TlsConfig
    from bridge.daemon.mqtt import SetupError, tls_context

    make_pki(tmp_path, ["127.0.0.1"])
    key = serialization.load_pem_private_key((tmp_path / "client.key").read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    tls = TlsConfig(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "client.pem",
                    key_file=locked)
    with pytest.raises(SetupError, match="is encrypted with a passphrase") as raised:
        tls_context(tls)
    assert str(locked) in str(raised.value)
    # the same key unencrypted works
    assert tls_context(TlsConfig(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "client.pem",
                                 key_file=tmp_path / "client.key")) is not None

"""examples/mosquitto/mosquitto.conf and registers-tls.conf as the README installs them:
drop-ins in the conf.d of Debian's mosquitto package, under a main file that already sets persistence and its
location. Real mosquitto, the real daemon, a register over TLS with its own login."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from pathlib import Path

import aiomqtt

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, Scenario

from .example_broker import DropInMosquitto, broker_tls, make_pki
from .rig import POI, ROOT, outcome_for
from .test_check_config import readme_section
from .test_mqtt_security import passwords

EXAMPLES = ROOT / "examples" / "mosquitto"
EXAMPLE = EXAMPLES / "mosquitto.conf"
TLS_EXAMPLE = EXAMPLES / "registers-tls.conf"


def store_broker(tmp_path: Path) -> DropInMosquitto:
    """The example drop-in, its files (password file, ACL, TLS) in tmp_path; logins
    poi-bridge, TILL1 and operator."""
    pki = tmp_path / "pki"
    make_pki(pki, ["TILL1"])
    passwd = tmp_path / "poi-bridge.passwd"
    passwords(passwd, {"poi-bridge": "bridge-pw", "TILL1": "till1-pw", "operator": "op-pw"})
    return DropInMosquitto(tmp_path / "broker", [EXAMPLE, TLS_EXAMPLE], {
        "/etc/mosquitto/poi-bridge.passwd": str(passwd),
        "/etc/mosquitto/poi-bridge.acl": str(EXAMPLES / "acl"),
        **broker_tls(pki, "/etc/mosquitto/certs/ca.pem", "/etc/mosquitto/certs/broker.pem",
                     "/etc/mosquitto/certs/broker.key"),
    })


def till(broker: DropInMosquitto, pki: Path, *, persistent: bool = False,
         identifier: str = "till-1") -> aiomqtt.Client:
    """Register TILL1 on the store LAN: the TLS listener, its certificate and its login."""
    tls = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    tls.load_cert_chain(str(pki / "TILL1.pem"), str(pki / "TILL1.key"))
    return aiomqtt.Client(broker.host, broker.ports[1], tls_context=tls, identifier=identifier,
                          username="TILL1", password="till1-pw", clean_session=not persistent)


async def first(client: aiomqtt.Client, match) -> dict:
    async with asyncio.timeout(15):
        async for message in client.messages:
            body = json.loads(message.payload)
            if match(message.topic.value, body):
                return body
    raise AssertionError("unreachable")


async def test_the_example_store_broker_runs_as_a_drop_in_under_debians_main_file(tmp_path):
    """Debian's main file sets persistence_location; an example that set it again stopped
    the broker ("Duplicate persistence_location value in configuration"). As a drop-in it
    runs: the daemon logs in on the box's own listener, a register pays over TLS with its
    certificate and login, and a QoS 1 result queued for a register that is away survives a
    broker restart (persistence, which only the main file turns on)."""
    broker = store_broker(tmp_path).start()
    pki = tmp_path / "pki"
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05)),
                                ack_timeout=0.3)
    device = await simulator.start_pty(tmp_path / "terminal")
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": broker.host, "port": broker.ports[0], "protocol": "5",
                 "username": "poi-bridge"},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device}}],
    }), mqtt_password="bridge-pw")
    await bridge.start()
    try:
        # Subscribed before the till publishes: its first session on this broker queues
        # nothing for it before that (the request was lost in one CI run)
        async with asyncio.timeout(15):
            while not bridge.gateway.connected:
                await asyncio.sleep(0.05)
        async with till(broker, pki, persistent=True) as client:
            await client.subscribe("poi-bridge/registers/TILL1/#", qos=1)
            request = responses.payment_request("TILL1", "D1", POI, 5.0)
            await client.publish(f"poi-bridge/terminals/{POI}/request/TILL1",
                                 json.dumps(request), qos=1)
            answer = await first(client, outcome_for("D1"))
            assert answer["bridge"]["outcome"] == "approved"
        # The till is away: its next result waits in the broker, which restarts.
        request = responses.payment_request("TILL1", "D2", POI, 6.0)
        async with aiomqtt.Client(broker.host, broker.ports[0], username="operator",
                                  password="op-pw", identifier="watch") as operator:
            await operator.subscribe("poi-bridge/transactions/TILL1/D2", qos=1)
            async with till(broker, pki, identifier="till-1-pos") as pos:  # same login
                await pos.publish(f"poi-bridge/terminals/{POI}/request/TILL1",
                                  json.dumps(request), qos=1)
            await first(operator, lambda t, p: p.get("state") == "final")
        broker.stop()
        assert (broker.workdir / "mosquitto.db").exists()  # persistence_location: main file
        broker.start()
        async with till(broker, pki, persistent=True) as client:
            answer = await first(client, outcome_for("D2"))
            assert answer["bridge"]["outcome"] == "approved"
    finally:
        await bridge.stop()
        await simulator.close()
        broker.kill()


def test_the_store_example_without_certificates_still_serves_the_bridge(tmp_path):
    """Before the chain's certificates exist, only mosquitto.conf is installed: mosquitto
    starts and the bridge's listener (127.0.0.1:1883) takes its login. With the TLS
    listener in that file, mosquitto did not start at all ("Error: Unable to load CA
    certificates") and took the bridge's listener down with it."""
    passwd = tmp_path / "poi-bridge.passwd"
    passwords(passwd, {"poi-bridge": "bridge-pw"})
    broker = DropInMosquitto(tmp_path / "broker", EXAMPLE, {
        "/etc/mosquitto/poi-bridge.passwd": str(passwd),
        "/etc/mosquitto/poi-bridge.acl": str(EXAMPLES / "acl"),
    })
    broker.start()
    try:
        async def log_in() -> None:
            async with aiomqtt.Client(broker.host, broker.port, username="poi-bridge",
                                      password="bridge-pw", identifier="bridge") as client:
                await client.publish("poi-bridge/bridge/state", b"{}", qos=1)
        asyncio.run(log_in())
    finally:
        broker.kill()
    assert broker.ports == [broker.port], "mosquitto.conf opens the bridge's listener only"


def test_the_readme_installs_the_example_and_every_file_it_names():
    """README's store box steps put both examples into Debian's conf.d and create each
    file they point at (password file, ACL, TLS files), so mosquitto starts; the TLS
    drop-in only after its certificates are in place."""
    steps = readme_section("Installing on a store box")
    assert re.search(r"install -m644 examples/mosquitto/mosquitto\.conf +"
                     r"/etc/mosquitto/conf\.d/\S+\.conf", steps), steps
    tls = re.search(r"install -m644 examples/mosquitto/registers-tls\.conf +"
                    r"/etc/mosquitto/conf\.d/\S+\.conf", steps)
    assert tls, steps
    for example in (EXAMPLE, TLS_EXAMPLE):
        settings = [line for line in example.read_text().splitlines()
                    if line and not line.startswith("#")]
        named = {path for line in settings for path in re.findall(r"/etc/\S+", line)}
        assert named, f"{example.name} names its files"
        for path in named:
            directory, name = path.rsplit("/", 1)
            made = re.search(rf"install [^\n]*\b{re.escape(name)}\b[^\n]* "
                             rf"{re.escape(directory)}/", steps)
            assert path in steps or made, f"README's steps do not create {path}"
            if example is TLS_EXAMPLE:
                assert made and made.start() < tls.start(), \
                    f"README installs registers-tls.conf before {path}"
    # mosquitto reads them after it drops to its own user: not root-only.
    for secret in ("/etc/mosquitto/poi-bridge.passwd", "broker.key"):
        assert re.search(rf"install -m640 -g mosquitto [^\n]*{re.escape(secret)}", steps), \
            secret

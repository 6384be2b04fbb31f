"""The technician's commands (`status`, `resync`) and the register client they are built on,
against a running bridge and a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.daemon.journal import Journal
from bridge.protocol import crypto
from bridge.register_client import RegisterClient, connection_problem
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .broker import Mosquitto
from .rig import POI, ROOT, python_env
from .test_mqtt_security import make_pki, passwords

BASE = "poi/store-cli"


@contextlib.asynccontextmanager
async def running_bridge(tmp_path, broker, *, password: str | None = None,
                         terminal_says: str = POI, terminal_key: Any = None,
                         keys: dict[str, Any] | None = None,
                         **mqtt: Any) -> AsyncIterator[Bridge]:
    """A bridge on `broker` (base topic BASE) with a simulated terminal, online. The device
    on the link names itself `terminal_says` (another POIID: a terminal on the wrong port)
    and seals with `terminal_key`; `keys`: the terminal's key tables in the configuration."""
    simulator = SimulatorServer(Scenario(poi_id=terminal_says, default=Behaviour(delay=0.05),
                                         link=LinkBehaviour(status_hold=0.05)), "stx-etx-lrc",
                                key=terminal_key)
    device = await simulator.start_pty(tmp_path / "terminal")
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": broker.host, "port": broker.port, "base_topic": BASE,
                 "client_id": "bridge-cli-test", **mqtt},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device},
                       **(keys or {})}],
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


# --- a broker as the README's Security section sets it up: passwords, TLS ---------------------

def locked_broker(tmp_path) -> tuple[Mosquitto, dict[str, str]]:
    """No anonymous login, the bridge's user with a password, TLS with client certificates.
    Returns the broker and the bridge's [mqtt] login settings (password in a file)."""
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki, ["127.0.0.1"])
    passwd = tmp_path / "passwd"
    passwords(passwd, {"poi-bridge": "bridge-pw"})
    broker = Mosquitto(
        tmp_path / "broker", anonymous=False, extra_config=f"password_file {passwd}\n",
        listener_options=f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'broker.pem'}\n"
                         f"keyfile {pki / 'broker.key'}\nrequire_certificate true\n").start()
    (tmp_path / "mqtt-password").write_text("bridge-pw\n")
    return broker, {"username": "poi-bridge", "password_file": str(tmp_path / "mqtt-password"),
                    "ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client.pem"),
                    "key_file": str(pki / "client.key")}


def config_file(tmp_path, broker, login: dict[str, str], terminal: str = "") -> Path:
    """The bridge's configuration as a technician's command reads it (`terminal`: more of
    its terminal's TOML)."""
    tls = "".join(f'{key} = "{login[key]}"\n' for key in ("ca_file", "cert_file", "key_file")
                  if key in login)
    path = tmp_path / "poi-bridge.toml"
    path.write_text(
        f'journal = "{tmp_path / "journal.sqlite3"}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nbase_topic = "{BASE}"\n'
        + "".join(f'{key} = "{login[key]}"\n' for key in ("username", "password_file")
                  if key in login)
        + (f"[mqtt.tls]\n{tls}" if tls else "")
        + f'[[terminals]]\npoi_id = "{POI}"\n[terminals.link]\nkind = "serial"\n'
          'device = "/dev/null"\n' + terminal)
    return path


def bridge_mqtt(login: dict[str, str]) -> dict[str, Any]:
    tls = {key: login[key] for key in ("ca_file", "cert_file", "key_file")}
    return {"username": login["username"], "tls": tls}


async def cli(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "bridge", *args],
                                   capture_output=True, env=python_env(), cwd=cwd, timeout=60)


async def test_status_resync_and_register_log_in_as_the_configuration_says(tmp_path):
    """status once said "daemon: not reachable over MQTT", every terminal "unknown", against a
    running daemon on a broker that wants a password and TLS: it connected anonymously, in
    plain text. The commands now log in with the configuration's user, password file and
    TLS, as the daemon does."""
    broker, login = locked_broker(tmp_path)
    config = str(config_file(tmp_path, broker, login))
    try:
        async with running_bridge(tmp_path, broker, password="bridge-pw",
                                  **bridge_mqtt(login)) as bridge:
            assert bridge.gateway.connected
            status = await cli("status", "--config", config, "--json")
            assert status.returncode == 0, status.stderr
            report = json.loads(status.stdout)
            assert report["daemon"] == "running" and report["mqtt_error"] is None
            assert [(t["poi_id"], t["state"]) for t in report["terminals"]] == [(POI, "online")]
            resync = await cli("resync", "TILL9", "nope", "--config", config)
            assert resync.returncode == 2 and b"no transaction TILL9/nope" in resync.stderr
            listed = await cli("register", "--config", config, "terminals")
            assert listed.returncode == 0, listed.stderr
            assert json.loads(listed.stdout)[0]["poi_id"] == POI
            # The same from options, as for a register with its own login.
            listed = await cli("register", "--broker", f"{broker.host}:{broker.port}",
                               "--base-topic", BASE, "--username", "poi-bridge",
                               "--password-file", login["password_file"],
                               "--ca-file", login["ca_file"], "--cert-file", login["cert_file"],
                               "--key-file", login["key_file"], "terminals")
            assert listed.returncode == 0, listed.stderr
            # Files named relative to where the technician stands are read from there; they
            # were looked up as systemd credentials, as a relative path in the configuration.
            listed = await cli("register", "--broker", f"{broker.host}:{broker.port}",
                               "--base-topic", BASE, "--username", "poi-bridge",
                               "--password-file", "mqtt-password", "--ca-file", "pki/ca.pem",
                               "--cert-file", "pki/client.pem", "--key-file", "pki/client.key",
                               "terminals", cwd=tmp_path)
            assert listed.returncode == 0, listed.stderr
    finally:
        broker.kill()


async def test_status_says_what_failed_when_the_broker_cannot_be_asked(tmp_path):
    """A wrong password or missing TLS is not "daemon not reachable": it is said as what it
    is, with what to check, and the exit status is 2."""
    broker, login = locked_broker(tmp_path)
    try:
        async with running_bridge(tmp_path, broker, password="bridge-pw",
                                  **bridge_mqtt(login)) as bridge:
            assert bridge.gateway.connected
            (tmp_path / "wrong-password").write_text("not-it\n")
            cases = [
                ({**login, "password_file": str(tmp_path / "wrong-password")},
                 ["refused the login as user 'poi-bridge'", "mqtt.password_file"]),
                ({"username": "poi-bridge", "password_file": login["password_file"]},
                 ["cannot connect to the broker", "mqtt.tls"]),
                ({**login, "password_file": str(tmp_path / "no-such-file")},
                 ["cannot read the MQTT password file", "no-such-file"]),
            ]
            for case, fragments in cases:
                config = str(config_file(tmp_path, broker, case))
                status = await cli("status", "--config", config, "--json")
                assert status.returncode == 2, (case, status.stderr)
                report = json.loads(status.stdout)
                assert report["daemon"].startswith("unknown")
                assert all(f in report["mqtt_error"] for f in fragments), report["mqtt_error"]
            # Said the same way in the text report and by resync.
            text = await cli("status", "--config", config_file(tmp_path, broker, cases[0][0]))
            assert text.returncode == 2 and "not reachable" not in text.stdout.decode()
            assert cases[0][1][0] in text.stdout.decode()
            resync = await cli("resync", "TILL9", "T1", "--config",
                               config_file(tmp_path, broker, cases[0][0]))
            assert resync.returncode == 2 and cases[0][1][0] in resync.stderr.decode()
    finally:
        broker.kill()


async def test_a_refused_login_names_the_file_or_option_to_fix(tmp_path):
    """register without --config said "check mqtt.username and the password in
    mqtt.password_file", options it was not given; and a configuration's systemd credential
    (/run/credentials/...) is a copy: the file to fix is its source in
    /etc/poi-bridge/credentials."""
    broker, login = locked_broker(tmp_path)
    try:
        (tmp_path / "wrong-password").write_text("not-it\n")
        tls = ("--ca-file", login["ca_file"], "--cert-file", login["cert_file"],
               "--key-file", login["key_file"])
        done = await cli("register", "--broker", f"{broker.host}:{broker.port}",
                         "--base-topic", BASE, "--username", "poi-bridge", "--password-file",
                         "wrong-password", *tls, "terminals", cwd=tmp_path)
        said = done.stderr.decode()
        assert done.returncode == 2 and "refused the login as user 'poi-bridge'" in said, said
        assert "check --username and the password in --password-file wrong-password" in said
        assert "mqtt." not in said
        # The configuration's login, overridden by an option: each named as it was given.
        config = str(config_file(tmp_path, broker, login))
        done = await cli("register", "--config", config, "--password-file", "wrong-password",
                         "terminals", cwd=tmp_path)
        said = done.stderr.decode()
        assert "check mqtt.username and the password in --password-file" in said, said
    finally:
        broker.kill()
    from aiomqtt.exceptions import MqttConnectError
    credential = parse_config({"mqtt": {
        "username": "poi-bridge",
        "password_file": "/run/credentials/poi-bridge.service/secret_mqtt-password"}}).mqtt
    said = connection_problem(MqttConnectError(5), credential)
    assert "check mqtt.username and the password in /etc/poi-bridge/credentials/mqtt-password " \
           "(mqtt.password_file /run/credentials/poi-bridge.service/secret_mqtt-password is " \
           "the systemd credential made from it" in said, said


async def test_status_shows_a_terminal_whose_identity_check_failed(tmp_path, mosquitto):
    """The device on the terminal's port says it is another terminal: the bridge refuses
    every request for it. `status` printed only "online" for it, hiding why."""
    async with running_bridge(tmp_path, mosquitto, terminal_says="V400m-999") as bridge:
        for _ in range(250):
            if bridge.workers[POI].identity.startswith("mismatch"):
                break
            await asyncio.sleep(0.02)
        assert bridge.workers[POI].identity == "mismatch: V400m-999"
        config = config_file(tmp_path, mosquitto, {})
        text = await cli("status", "--config", config)
        out = text.stdout.decode()
        assert f"terminal {POI}: link up, but the wrong terminal: every request is refused" \
            in out, out
        assert f"terminal {POI}: online" not in out
        assert "IDENTITY MISMATCH: the device on this terminal's link says it is V400m-999" in out
        assert f"every request for {POI} is refused" in out
        report = json.loads((await cli("status", "--config", config, "--json")).stdout)
        assert report["terminals"][0]["identity"] == "mismatch: V400m-999"


@pytest.mark.parametrize("holds", [1, 2], ids=["old-key", "new-key"])
async def test_status_shows_the_key_a_terminal_in_a_key_rotation_holds(tmp_path, mosquitto,
                                                                      holds):
    """A key rotation: the bridge has the new key (v2) and the previous one (v1); the
    terminal holds one of them. Which key each terminal's messages come with tells a chain
    when previous_key may go: the state document and `status` show it."""
    held = crypto.NexoKey("K", holds, "old passphrase" if holds == 1 else "new passphrase")
    (tmp_path / "old").write_text("old passphrase")
    (tmp_path / "new").write_text("new passphrase")
    keys = {"key": {"identifier": "K", "version": 2, "passphrase_file": str(tmp_path / "new")},
            "previous_key": {"identifier": "K", "version": 1,
                             "passphrase_file": str(tmp_path / "old")}}
    async with running_bridge(tmp_path, mosquitto, terminal_key=held, keys=keys) as bridge:
        for _ in range(750):  # (heard, and the daemon on the broker to answer status)
            if bridge.workers[POI].state()["key"] == f"K v{holds}" and bridge.gateway.connected:
                break
            await asyncio.sleep(0.02)
        assert bridge.workers[POI].state()["key"] == f"K v{holds}"
        assert bridge.gateway.connected
        toml = "".join(f'[terminals.{name}]\nidentifier = "K"\nversion = {table["version"]}\n'
                       f'passphrase_file = "{table["passphrase_file"]}"\n'
                       for name, table in keys.items())
        config = config_file(tmp_path, mosquitto, {}, toml)
        out = (await cli("status", "--config", config)).stdout.decode()
        assert ("key rotation: the terminal still holds the old key (K v1, its previous_key)"
                if holds == 1 else "key rotation: the terminal holds the new key (K v2); "
                "previous_key K v1 may go once every terminal does") in out, out
        report = json.loads((await cli("status", "--config", config, "--json")).stdout)
        assert report["terminals"][0]["key"] == f"K v{holds}"


async def test_status_exits_non_zero_when_no_daemon_answers(tmp_path, mosquitto):
    """The broker is there, no daemon answers: status exited 0 as if all were well."""
    config = config_file(tmp_path, mosquitto, {})
    Journal(tmp_path / "journal.sqlite3").close()
    for extra in ([], ["--json"]):
        done = await cli("status", "--config", config, *extra)
        assert done.returncode == 1, (extra, done.stderr)
        # Said on stdout with the report, or on stderr beside the JSON.
        said = (done.stderr if extra else done.stdout).decode()
        assert f"no daemon answered on {BASE}/bridge/response/terminals" in said, said
        assert "is poi-bridge running" in said and "Traceback" not in done.stderr.decode()
    assert json.loads(done.stdout)["daemon"] == "not reachable over MQTT"


async def test_status_shows_a_terminal_whose_identity_is_not_confirmed(tmp_path, mosquitto):
    """The device on the link never answers the identity check (a wrong framer, key or
    cable): every payment is refused, and `status` said "online" for it, as for a terminal
    that works. While the first check is still out, though, nothing has failed (a request
    waits for it): `status` said "not confirmed ... refused" during every terminal's first
    check after a plug-in. The state document counts the checks left unanswered."""
    from .follow_rig import DeviceByHand

    device = DeviceByHand(tmp_path / "terminal")  # acknowledges frames, answers none
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "base_topic": BASE,
                 "client_id": "bridge-cli-test"},
        "terminals": [{"poi_id": POI, "status_timeout": 3.0,  # the check's time to answer
                       "link": {"kind": "serial", "device": str(tmp_path / "terminal")}}],
    }))
    await bridge.start()
    try:
        for _ in range(250):
            if bridge.workers[POI].online and bridge.gateway.connected \
                    and "Diagnosis" in device.categories():
                break
            await asyncio.sleep(0.02)
        assert bridge.workers[POI].identity == "unknown"
        assert bridge.workers[POI].state()["identity_checks_unanswered"] == 0
        out = (await cli("status", "--config", config_file(tmp_path, mosquitto, {}))
               ).stdout.decode()
        assert (f"terminal {POI}: online, identity check in progress (requests wait for the "
                "terminal to say which terminal it is)") in out, out
        assert "not confirmed" not in out, out

        for _ in range(300):  # the first check's time-out
            if bridge.workers[POI].state()["identity_checks_unanswered"]:
                break
            await asyncio.sleep(0.02)
        out = (await cli("status", "--config", config_file(tmp_path, mosquitto, {}))
               ).stdout.decode()
        assert (f"terminal {POI}: identity not confirmed: 1 identity check failed (the "
                "last: no answer to the identity check within 3 s); requests are refused "
                "until the terminal answers one (check the framer, key and cable)") in out, out
        assert f"terminal {POI}: online" not in out, out
        assert "line noise" not in out, out

        # Such a device often sends bytes that are no frame (a wrong baud rate): counted
        # since the daemon started, and shown
        os.write(device.master, b"ST,GS,+0001.25kg\r\n")
        for _ in range(250):
            if bridge.workers[POI].counters["noise_bytes"] >= 18:
                break
            await asyncio.sleep(0.02)
        out = (await cli("status", "--config", config_file(tmp_path, mosquitto, {}))
               ).stdout.decode()
        assert ("    line noise: 18 bytes that were no frame (1 framing errors) and 0 frames "
                "read since the daemon started; many such bytes: a wrong baud rate or framer, "
                "a damaged cable, or another device on the port") in out, out
    finally:
        await bridge.stop()
        device.close()


async def test_status_says_the_daemon_refuses_requests_while_another_bridge_is_seen(
        tmp_path, mosquitto):
    """A technician's review: with another bridge on the same topics the daemon refuses
    every payment, yet `status` said "daemon: running", each terminal "online", and exited
    0: nothing in it said why every payment failed. The other bridge here says "online" on
    the bridge's own state topic, as a second box would."""
    other = {"state": "online", "instance": "i-other", "bridge_id": "b-2", "host": "box-2",
             "pid": 77, "client_id": "poi-bridge-copy", "journal": "/var/lib/x.sqlite3",
             "announcement": 1}
    async with running_bridge(tmp_path, mosquitto) as bridge:
        config = config_file(tmp_path, mosquitto, {})
        quiet = (await cli("status", "--config", config)).stdout.decode()
        assert "REFUSING" not in quiet, quiet
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="box-2") as box:
            await box.publish(f"{BASE}/bridge/state", json.dumps(other), qos=1)
        for _ in range(250):
            if bridge.gateway.peers.others:
                break
            await asyncio.sleep(0.02)
        done = await cli("status", "--config", config)
        out = done.stdout.decode()
        assert done.returncode == 0, done.stderr
        assert "REFUSING EVERY NEW REQUEST: another poi-bridge serves these topics too " \
               "(host box-2 (pid 77, client id 'poi-bridge-copy'" in out, out
        report = json.loads((await cli("status", "--config", config, "--json")).stdout)
        assert len(report["other_bridges"]) == 1 and "box-2" in report["other_bridges"][0]

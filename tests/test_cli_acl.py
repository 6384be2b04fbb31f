"""The technician's commands under the example broker ACL (examples/mosquitto/acl), against
real mosquitto: the bridge's own login may publish only what the daemon publishes, so
`status`, `resync` and `register` log in as the operator or as the register itself; and a
publish the broker refuses is said as refused (MQTT 5), never as a daemon that does not run
or a payment whose outcome is unknown."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from .rig import POI
from .test_cli_tools import cli
from .test_mqtt_security import store_under_the_example_acl

USERS = {"operator": "operator-pw", "TILL1": "till1-pw"}


def login_files(tmp_path) -> dict[str, str]:
    """A password file per login, as a technician keeps them."""
    files = {}
    for user, password in {"poi-bridge": "bridge-pw", **USERS}.items():
        path = tmp_path / f"{user}-password"
        path.write_text(password + "\n")
        files[user] = str(path)
    return files


def store_config(tmp_path, broker, password_file: str) -> str:
    """The bridge's configuration, as on the store box: its own login, MQTT 5."""
    path = tmp_path / "poi-bridge.toml"
    path.write_text(
        f'journal = "{tmp_path / "journal.sqlite3"}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nbase_topic = "poi-bridge"\n'
        f'username = "poi-bridge"\npassword_file = "{password_file}"\nprotocol = "5"\n'
        f'[[terminals]]\npoi_id = "{POI}"\n[terminals.link]\nkind = "serial"\n'
        'device = "/dev/null"\n')
    return str(path)


def as_user(files: dict[str, str], user: str) -> tuple[str, ...]:
    return ("--username", user, "--password-file", files[user])


async def test_status_and_resync_as_the_operator_and_a_refusal_said_as_such(tmp_path):
    """With the bridge's login, status said "daemon: not reachable ... is poi-bridge
    running", resync "the daemon did not answer": the broker had refused the question."""
    async with store_under_the_example_acl(tmp_path, users=USERS) as (bridge, _, broker):
        files = login_files(tmp_path)
        config = store_config(tmp_path, broker, files["poi-bridge"])
        status = await cli("status", "--config", config, "--json")
        said = status.stderr.decode()
        assert status.returncode == 2, said
        report = json.loads(status.stdout)
        assert report["daemon"] == "unknown: the broker refused the question"
        assert ("the broker refused the publish on poi-bridge/bridge/request/terminals for "
                "user 'poi-bridge' (Not authorized (reason code 0x87))") in report["mqtt_error"]
        assert "--username operator --password-file FILE" in report["mqtt_error"]
        assert "is poi-bridge running" not in said + status.stdout.decode()

        status = await cli("status", "--config", config, *as_user(files, "operator"))
        assert status.returncode == 0, status.stderr
        assert "daemon: running" in status.stdout.decode()
        assert f"terminal {POI}: online" in status.stdout.decode()

        resync = await cli("resync", "TILL1", "nope", "--config", config)
        said = resync.stderr.decode()
        assert resync.returncode == 2 and "refused the publish on poi-bridge/bridge/request/" \
            "resync for user 'poi-bridge'" in said and "did not answer" not in said, said
        resync = await cli("resync", "TILL1", "nope", "--config", config,
                           *as_user(files, "operator"))
        assert resync.returncode == 2 and b"no transaction TILL1/nope" in resync.stderr
        assert bridge.gateway.connected


async def test_a_refused_payment_is_not_outcome_unknown(tmp_path):
    """register --config (the bridge's login) paying as TILL1: the broker refused the request
    (Denied PUBLISH), yet the command said OUTCOME UNKNOWN, "may still be charged", exit 3.
    Now: refused, nothing sent, exit 2; as TILL1 itself the payment goes through."""
    async with store_under_the_example_acl(tmp_path, users=USERS) as (_, simulator, broker):
        files = login_files(tmp_path)
        config = store_config(tmp_path, broker, files["poi-bridge"])
        pay = ("pay", "--terminal", POI, "--amount", "12.50", "--service-id", "R1")
        refused = await cli("register", "--config", config, "--sale-id", "TILL1", *pay)
        said = refused.stderr.decode()
        assert refused.returncode == 2, said
        assert "OUTCOME UNKNOWN" not in said and "payment published" not in said
        assert ("the broker refused the publish on poi-bridge/terminals/"
                f"{POI}/request/TILL1 for user 'poi-bridge'") in said, said
        assert "nothing was sent to the terminal" in said
        assert "--username TILL1 --password-file FILE" in said
        assert not simulator.terminal.ledger

        paid = await cli("register", "--config", config, *as_user(files, "TILL1"),
                         "--sale-id", "TILL1", *pay)
        assert paid.returncode == 0, paid.stderr
        assert "approved" in paid.stdout.decode()
        assert [(sale, service) for sale, service in simulator.terminal.ledger] == [
            ("TILL1", "R1")]


async def test_a_register_asking_for_operator_commands_is_told_at_once(tmp_path):
    """Logged in as a till, `register terminals` waited 31 s and said "no answer in time (is
    the bridge running?)": the broker had refused the command. The operator may."""
    async with store_under_the_example_acl(tmp_path, users=USERS) as (_, _, broker):
        files = login_files(tmp_path)
        config = store_config(tmp_path, broker, files["poi-bridge"])
        for action in ("terminals", "transactions"):
            started = time.monotonic()
            done = await cli("register", "--config", config, *as_user(files, "TILL1"),
                             "--sale-id", "TILL1", action)
            said = done.stderr.decode()
            assert done.returncode == 2 and time.monotonic() - started < 15, said
            assert (f"the broker refused the publish on poi-bridge/bridge/request/{action} for "
                    "user 'TILL1'") in said and "--username operator" in said, said
        listed = await cli("register", "--config", config, *as_user(files, "operator"),
                           "terminals")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)[0]["poi_id"] == POI


async def test_a_broker_that_speaks_only_mqtt_3_is_asked_in_3_and_its_silence_explained(
        tmp_path):
    """The commands connect with MQTT 5 to learn of a refusal; a broker that speaks only
    3.1.1 (amqtt here) is asked again in 3.1.1, and where no answer came, the command says
    such a broker cannot tell it refused."""
    pytest.importorskip("amqtt")
    from bridge.demo import start_embedded_broker
    from bridge.register_client import RegisterClient

    from .broker import free_port

    port = free_port()
    broker = await start_embedded_broker(port)
    try:
        async with RegisterClient("127.0.0.1", port, "TILL1", persistent=False,
                                  mqtt5=True) as register:
            assert register.protocol == "3.1.1"
        config = tmp_path / "poi-bridge.toml"
        config.write_text(f'journal = "{tmp_path / "journal.sqlite3"}"\n'
                          f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n')
        from bridge.daemon.journal import Journal
        Journal(tmp_path / "journal.sqlite3").close()
        status = await cli("status", "--config", str(config))
        said = status.stdout.decode()
        assert status.returncode == 1, status.stderr
        assert "no daemon answered" in said and "speaks MQTT 3.1.1 only" in said, said
        assert "Denied PUBLISH" in said
    finally:
        await broker.shutdown()
    await asyncio.sleep(0)

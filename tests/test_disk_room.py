"""A daemon started on a full journal disk said "online", took the request the broker gave
back, stopped again at its first commit, and after five such starts systemd gave up: the
register got no answer, and once room was made the bridge stayed down until restarted. It
now waits off the broker, its start extended for systemd (a STATUS saying why), until there is
room, and then starts by itself. A real broker, a real statvfs of the test's disk (the
room wanted is set above what it has), a real notification socket, the daemon in process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket

from bridge import cli
from bridge.config import parse_config
from bridge.daemon import disk_room
from bridge.daemon.app import run_bridge
from bridge.daemon.disk_room import short_of_room
from bridge.daemon.journal import Journal

from .rig import Subscriber

BASE = "poi/store-disk"


def _free(path) -> int:
    disk = os.statvfs(path)
    return disk.f_bavail * disk.f_frsize


def test_short_of_room_says_what_is_free_and_what_is_needed(tmp_path, monkeypatch):
    journal = tmp_path / "not-yet" / "journal.sqlite3"  # (its directory not made yet)
    assert short_of_room(journal) is None  # this disk has more than 8 MB free
    monkeypatch.setattr(disk_room, "JOURNAL_ROOM", _free(tmp_path) + 10**12)
    said = short_of_room(journal)
    assert said is not None and re.match(
        rf"\d+\.\d MB free on the disk of {re.escape(str(journal.parent))}, ", said), said
    assert said.endswith(f"{(_free(tmp_path) + 10**12) / 1e6:.0f} MB needed"), said


async def test_a_daemon_short_of_room_waits_off_the_broker_then_starts(tmp_path, mosquitto,
                                                                        monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="poi_bridge")
    monkeypatch.setattr(disk_room, "JOURNAL_ROOM", _free(tmp_path) + 10**12)
    monkeypatch.setattr(disk_room, "ROOM_CHECK_INTERVAL", 0.1)
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    systemd.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    journal = tmp_path / "journal.sqlite3"
    config = parse_config({"journal": str(journal),
                           "mqtt": {"host": mosquitto.host, "port": mosquitto.port,
                                    "base_topic": BASE, "client_id": "bridge-disk-room"}})
    loop = asyncio.get_running_loop()
    async with Subscriber(mosquitto, [f"{BASE}/bridge/state"]) as register:
        daemon = asyncio.create_task(run_bridge(config))
        online = False
        try:
            # Its start goes on while it waits: not READY (which arms the watchdog)
            told = [(await asyncio.wait_for(loop.sock_recv(systemd, 4096), 10)).decode()
                    for _ in range(2)]
            assert told[0] == "EXTEND_TIMEOUT_USEC=300000", told
            assert told[1].startswith("STATUS=waiting for room on the journal's disk: "), told
            await asyncio.sleep(0.5)
            # Off the broker, the journal not even opened: nothing taken that it cannot record
            assert not daemon.done() and not journal.exists()
            assert register.on(f"{BASE}/bridge/state") == []
            critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
            assert len(critical) == 1 and critical[0].startswith(
                "the journal's disk is full: "), critical
            assert "starts by itself once there is, no restart needed" in critical[0]
            monkeypatch.setattr(disk_room, "JOURNAL_ROOM", 0)  # room made
            await register.wait_for(lambda t, p: p.get("state") == "online")
            online = True
            while not (said := (await asyncio.wait_for(loop.sock_recv(systemd, 4096), 10))
                       .decode()).startswith("READY=1"):
                assert said.startswith(("EXTEND_TIMEOUT_USEC=", "STATUS=")), said
            assert journal.exists()
            assert any(m.startswith("room on the journal's disk again after ")
                       for m in caplog.messages), caplog.messages
        finally:
            if online:  # (its SIGTERM handler is installed only once it started)
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.wait_for(daemon, 15)
            else:
                daemon.cancel()
    systemd.close()


def test_status_says_the_journal_disk_is_full(tmp_path, mosquitto, monkeypatch, capsys):
    """No daemon can answer for itself while it waits off the broker: `status` looks at
    the disk."""
    config = tmp_path / "poi-bridge.toml"
    config.write_text(f'journal = "{tmp_path / "journal.sqlite3"}"\n[mqtt]\n'
                      f'host = "{mosquitto.host}"\nport = {mosquitto.port}\n'
                      f'base_topic = "{BASE}"\n')
    Journal(tmp_path / "journal.sqlite3").close()
    assert cli.main(["status", "--config", str(config)]) == 1  # (no daemon answered)
    assert "JOURNAL DISK FULL" not in capsys.readouterr().out
    monkeypatch.setattr(disk_room, "JOURNAL_ROOM", _free(tmp_path) + 10**12)
    assert cli.main(["status", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "  JOURNAL DISK FULL: " in out and " MB needed: the daemon takes no payment until " \
        "there is room; make room, and it starts by itself" in out, out
    cli.main(["status", "--config", str(config), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["journal_disk_short"].endswith(" MB needed"), report


async def test_status_beside_a_running_daemon_says_the_disk_is_nearly_full(
        tmp_path, mosquitto, monkeypatch):
    """A running daemon does not wait for room (only a starting one does): `status` said
    it "takes no payment" while it took them (a review)."""
    from .test_cli_tools import config_file, running_bridge

    async with running_bridge(tmp_path, mosquitto):
        monkeypatch.setattr(disk_room, "JOURNAL_ROOM", _free(tmp_path) + 10**12)
        out = await asyncio.to_thread(_status_out, config_file(tmp_path, mosquitto, {}))
    assert "  JOURNAL DISK NEARLY FULL: " in out and "a commit that fails stops the daemon" \
        in out, out
    assert "JOURNAL DISK FULL:" not in out


def _status_out(config) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        cli.main(["status", "--config", str(config)])
    return buffer.getvalue()

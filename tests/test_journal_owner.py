"""Whose journal it is: one daemon holds it at a time, and its files belong to the daemon's
user. Real processes, a real simulator on a pseudo-terminal and real SQLite files."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bridge import deployment
from bridge.cli_daemon import check_config
from bridge.daemon.journal import Journal, JournalError
from bridge.daemon.journal_files import lock_path

from .rig import (
    Daemon,
    Simulator,
    Subscriber,
    as_nobody,
    payment_on_the_wire,
    python_env,
    wait_until,
    write_config,
)
from .test_cli import cli
from .test_systemd_unit import UNIT, unit_settings

BASE = "poi-bridge"


def transaction_row(path, service_id):
    """Every column of the transaction's row: a status poll would change several."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT * FROM transactions WHERE service_id = ?",
                          (service_id,)).fetchall()


async def test_a_second_daemon_on_the_same_journal_refuses_before_touching_it(
        tmp_path, mosquitto):
    """A technician started `poi-bridge run` by hand beside the service: the second daemon
    took up the payment the first one owned, polled its terminal, and the two took the
    broker session from each other. It must refuse at once, exit 3, and say why."""
    sim = Simulator(tmp_path, "--delay", "30")  # the shopper takes her time: the row stays
    config = write_config(tmp_path, mosquitto, sim.link, terminal={"payment_timeout": 60.0})
    journal = tmp_path / "journal.sqlite3"
    first = Daemon(config, tmp_path).start()
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = Daemon(config, second_dir)
    third = Daemon(config, tmp_path / "third")
    try:
        async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
            await payment_on_the_wire(sub, "L1", 5.0)
        before = transaction_row(journal, "L1")
        assert len(before) == 1

        second.start()
        assert await asyncio.to_thread(second.process.wait, 15) == 3, second.log()[-3000:]
        said = second.log()
        assert (f"journal {journal} is in use by another poi-bridge process "
                f"(pid {first.process.pid})") in said, said
        assert "systemctl status poi-bridge" in said and "never run two" in said, said
        assert "recovering" not in said and "connected to MQTT broker" not in said, said
        assert transaction_row(journal, "L1") == before  # not taken up, not polled
        assert first.process.poll() is None

        # The technician's commands read the journal beside the daemon, unrefused.
        status = await asyncio.to_thread(cli, "status", "--config", str(config), "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert [t["service_id"] for t in report["open_transactions"]] == ["L1"], report

        # A daemon that died (SIGKILL) holds nothing: the next one starts and takes L1 up.
        first.kill()
        (tmp_path / "third").mkdir()
        third.start()
        assert await asyncio.to_thread(
            wait_until, lambda: "recovering 1 open transaction" in third.log()
            and "started:" in third.log(), 20), third.log()[-3000:]
        assert third.process.poll() is None
    finally:
        for daemon in (first, second, third):
            daemon.kill()
        sim.stop()


async def test_a_second_daemon_is_refused_after_the_lock_file_was_removed(tmp_path, mosquitto):
    """A technician deleted the "stale" journal.sqlite3.lock while the daemon ran: a second
    `poi-bridge run` made a new one, took the lock, took up the open payment and overwrote
    its approved result with `unresolved` (the journal review, h3). The database file
    itself is locked too: the second one refuses, naming the first one's pid."""
    sim = Simulator(tmp_path, "--delay", "30")
    config = write_config(tmp_path, mosquitto, sim.link, terminal={"payment_timeout": 60.0})
    journal = tmp_path / "journal.sqlite3"
    first = Daemon(config, tmp_path).start()
    (tmp_path / "second").mkdir()
    second = Daemon(config, tmp_path / "second")
    try:
        async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
            await payment_on_the_wire(sub, "R1", 5.0)
        before = transaction_row(journal, "R1")
        os.remove(lock_path(journal))

        second.start()
        assert await asyncio.to_thread(second.process.wait, 15) == 3, second.log()[-3000:]
        said = second.log()
        assert (f"journal {journal} is in use by another poi-bridge process "
                f"(pid {first.process.pid})") in said, said
        assert f"Its lock file {lock_path(journal)} was removed" in said, said
        assert "recovering" not in said and "connected to MQTT broker" not in said, said
        assert transaction_row(journal, "R1") == before
        assert first.process.poll() is None

        # The technician's commands still read the journal beside the daemon.
        status = await asyncio.to_thread(cli, "status", "--config", str(config), "--json")
        assert status.returncode == 0, status.stderr
        assert [t["service_id"] for t in json.loads(status.stdout)["open_transactions"]] \
            == ["R1"]
    finally:
        first.kill()
        second.kill()
        sim.stop()


def test_the_database_lock_is_held_until_the_journal_closes(tmp_path):
    """Held by a real process, the journal is refused to another even without its lock
    file; closed, it is free (the lock went with the journal's last descriptor)."""
    path = tmp_path / "journal.sqlite3"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from bridge.daemon.journal import Journal; "
         f"j = Journal({str(path)!r}); print('open', flush=True); sys.stdin.read(); j.close()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=python_env())
    try:
        assert holder.stdout.readline() == "open\n"
        os.remove(lock_path(path))
        with pytest.raises(JournalError, match=f"in use by another poi-bridge process "
                           f"\\(pid {holder.pid}\\)"):
            Journal(path)
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
    Journal(path).close()


@pytest.fixture
def box_for_nobody():
    """A directory user nobody may enter, with a configuration it may read (pytest's own
    tmp_path lives under a root-only directory); the daemon will never reach the broker."""
    nobody = as_nobody("the daemon")
    top = Path(tempfile.mkdtemp(prefix="poi-journal-owner-"))
    top.chmod(0o755)
    state = top / "state"
    state.mkdir()
    state.chmod(0o755)  # whatever the umask of the tests before
    config = top / "poi-bridge.toml"
    config.write_text(f'journal = "{state}/journal.sqlite3"\n[mqtt]\nhost = "127.0.0.1"\n'
                      'port = 1\n[[terminals]]\npoi_id = "V400m-1"\n'
                      '[terminals.link]\nkind = "tcp"\nhost = "192.0.2.1"\nport = 8443\n')
    config.chmod(0o644)
    yield nobody, state, config
    shutil.rmtree(top)


def run_as_nobody(nobody, config):
    return subprocess.run([*nobody, sys.executable, "-m", "bridge", "run", "--config",
                           str(config)], capture_output=True, text=True, cwd="/",
                          env=python_env(), timeout=60)


def test_a_journal_root_made_names_its_owner_and_the_chown(box_for_nobody):
    """A technician ran the daemon by hand as root once: the journal's files are root's, and
    the service's daemon stopped with SQLite's 'unable to open database file' and advice to
    keep the journal where it already was. It must name the files, whose they are, and the
    chown; and its start-up lines must not tell it to check what its own user can do."""
    nobody, state, config = box_for_nobody
    journal = state / "journal.sqlite3"
    Journal(journal).close()  # as root: the journal and its lock file are root's
    journal.chmod(0o600)
    os.chown(state, 65534, 65534)  # the directory is the daemon's, as StateDirectory= makes it
    done = run_as_nobody(nobody, config)
    said = done.stdout + done.stderr
    assert done.returncode == 3, said
    assert f"{journal} (owner root, mode 0600)" in said, said
    assert f"{journal}.lock (owner root, mode 0600)" in said, said
    assert f"chown nobody: {journal} {journal}.lock" in said, said
    assert "keep the journal there" not in said, said
    assert f"cannot write {journal} as uid 65534 (nobody), the user this daemon runs as" in said
    assert "check that user can" not in said, said


def test_a_journal_directory_the_daemon_cannot_write_names_it(box_for_nobody):
    nobody, state, config = box_for_nobody  # state: root's, 0755
    done = run_as_nobody(nobody, config)
    said = done.stdout + done.stderr
    assert done.returncode == 3, said
    assert f"may not write {state} (owner root, mode 0755)" in said, said
    assert f"chown nobody: {state} and start" in said, said
    assert f"cannot write in {state} as uid 65534 (nobody), the user this daemon runs" in said
    assert "check that user can" not in said, said


def test_check_config_warns_of_journal_files_not_the_daemons_users(tmp_path, capsys,
                                                                   monkeypatch):
    """check-config said OK over a journal root had made; the service's daemon then could
    not open it. (The unit's user, poi-bridge, is played by nobody: it is not on test boxes.)"""
    journal = tmp_path / "journal.sqlite3"
    Journal(journal).close()
    wal = tmp_path / "journal.sqlite3-wal"
    wal.write_bytes(b"")
    config = tmp_path / "bridge.toml"
    config.write_text(f'journal = "{journal}"\n[[terminals]]\npoi_id = "V400m-1"\n'
                      '[terminals.link]\nkind = "tcp"\nhost = "10.0.0.5"\nport = 8443\n')

    def check() -> str:
        assert check_config(argparse.Namespace(file=str(config))) == 0
        return capsys.readouterr().err

    monkeypatch.setattr(deployment, "DAEMON_USER", "nobody")
    os.chown(wal, 65534, 65534)
    err = check()
    owner = pwd.getpwuid(os.geteuid()).pw_name
    assert (f"warning: journal: {journal} is owned by {owner}; {journal}.lock is owned by "
            f"{owner}, not by nobody, the user the shipped unit runs the daemon as") in err, err
    assert f"chown nobody: {journal} {journal}.lock\n" in err, err
    for file in (journal, lock_path(journal)):
        os.chown(file, 65534, 65534)
    assert "chown" not in check()
    os.chown(journal, 0, 0)
    monkeypatch.setattr(deployment, "DAEMON_USER", "no-such-user-here")
    assert "chown" not in check()  # not installed as the unit runs it: nothing to compare


def test_the_daemons_user_is_the_units():
    assert unit_settings(UNIT)["Service"]["User"] == [deployment.DAEMON_USER]

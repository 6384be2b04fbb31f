"""The journal's files removed or replaced under the running daemon (the journal review, h2
and h5): payments went on into a deleted file without a word, and after a kill the
register's repeat went to the terminal a second time. The daemon now sees it within a
second, saves what the lost files hold beside the journal, says what to do and stops.
Real SQLite files, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import replace

import pytest

from bridge.daemon.journal import Journal, JournalError, JournalGone
from bridge.protocol.transaction import TxKey
from bridge.simulator import responses

from .rig import (
    POI,
    Daemon,
    Simulator,
    Subscriber,
    payment_on_the_wire,
    wait_until,
    write_config,
)
from .test_cli_tools import BASE as CLI_BASE
from .test_cli_tools import running_bridge
from .test_journal import make_txn

BASE = "poi-bridge"


def rows(path):
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT service_id, state FROM transactions "
                          "ORDER BY service_id").fetchall()


def watched(path):
    journal = Journal(path)
    failures: list[BaseException] = []
    called = threading.Event()
    journal.on_failure(lambda exc: (failures.append(exc), called.set()))
    journal.start_checkpoints(interval=0.05)
    return journal, failures, called


def test_a_removed_journal_is_saved_beside_it_and_reported(tmp_path, caplog):
    path = tmp_path / "journal.sqlite3"
    journal, failures, called = watched(path)
    try:
        journal.save(make_txn("G1"))
        os.remove(path)
        assert called.wait(10), caplog.text
        (copy,) = tmp_path.glob("journal.sqlite3.recovered-*")
        (marker,) = tmp_path.glob("journal.sqlite3.lost-*")
        assert isinstance(failures[0], JournalGone)
        assert rows(copy) == [("G1", "awaiting_response")]
        assert copy.stat().st_mode & 0o077 == 0
        assert not list(tmp_path.glob("*.saving-*"))
        journal.close()
        with pytest.raises(JournalError, match="will not start on what is at"):
            Journal(path)
        assert not path.exists()  # (left missing, as it was found)
        said = caplog.text
        assert f"journal {path} was removed (or renamed) while the bridge ran" in said, said
        assert f"saved in {copy}" in said and f"mv {copy} {path}" in said, said
        assert f"remove {marker}" in said, said
    finally:
        journal.close()
    # Put back as the copy says, it is the journal, whole; while the marker stays, no start
    os.replace(copy, path)
    with pytest.raises(JournalError, match=f"then remove {marker} and start"):
        Journal(path)
    marker.unlink()
    again = Journal(path)
    try:
        assert again.get(TxKey("R1", "G1")) is not None
    finally:
        again.close()


def test_a_removed_write_ahead_log_is_saved_and_reported(tmp_path, caplog):
    path = tmp_path / "journal.sqlite3"
    journal, failures, called = watched(path)
    try:
        journal.save(make_txn("G2"))
        os.remove(f"{path}-wal")
        assert called.wait(10), caplog.text
        (copy,) = tmp_path.glob("journal.sqlite3.recovered-*")
        assert rows(copy) == [("G2", "awaiting_response")]
        assert f"the write-ahead log {path}-wal of journal {path} was removed" in caplog.text
    finally:
        journal.close()


def test_a_replaced_journal_is_reported_and_the_new_file_left_alone(tmp_path, caplog):
    path = tmp_path / "journal.sqlite3"
    journal, failures, called = watched(path)
    try:
        journal.save(make_txn("G3"))
        os.rename(path, tmp_path / "aside")
        path.write_bytes(b"someone else's")
        assert called.wait(10), caplog.text
        assert "was replaced by another file while the bridge ran" in caplog.text
        assert path.read_bytes() == b"someone else's"
        (copy,) = tmp_path.glob("journal.sqlite3.recovered-*")
        assert rows(copy) == [("G3", "awaiting_response")]
    finally:
        journal.close()


def test_the_copy_holds_every_commit_the_daemon_acted_on(tmp_path):
    """A review: the copy was a snapshot taken while the daemon went on committing into the
    lost files, and acting on each commit (frames out, results published): 71 commits were
    missing from it. Now no commit follows the loss, and the copy holds every one made."""
    path = tmp_path / "journal.sqlite3"
    journal, failures, called = watched(path)
    done: list[str] = []
    try:
        bulky = {"SaleToPOIResponse": {"Receipt": "x" * 20000}}
        with journal.batch():  # (about 20 MB: a copy that takes a while)
            for n in range(1000):
                journal.save(replace(make_txn(f"B{n}"), response=bulky))
        os.remove(f"{path}-wal")
        for n in range(100000):
            if called.is_set():
                break
            try:
                journal.save(make_txn(f"A{n}"))  # returned: committed, acted on
            except JournalGone:
                break
            done.append(f"A{n}")
        assert called.wait(30)
        (copy,) = tmp_path.glob("journal.sqlite3.recovered-*")
        saved = {service for service, _ in rows(copy)}
        assert done and set(done) <= saved, sorted(set(done) - saved)[:5]
        assert len(saved) == 1000 + len(done)
    finally:
        journal.close()


class _CommitAsTheLossIsSeen:
    """The journal's connection, whose next COMMIT removes the -wal, waits until the
    checkpoint thread has seen it, and then a while more: a COMMIT under way as the loss is
    seen, which a copy taken meanwhile would miss."""

    def __init__(self, db: sqlite3.Connection, journal: Journal, wal: str) -> None:
        self._db, self._journal, self._wal = db, journal, wal

    def execute(self, sql: str, *args):
        if sql == "COMMIT" and self._wal:
            os.remove(self._wal)
            self._wal = ""
            assert wait_until(lambda: self._journal.lost, 10)
            time.sleep(0.5)
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._db, name)


def test_a_commit_under_way_as_the_loss_is_seen_is_in_the_copy(tmp_path):
    """Its save returned (the daemon acts on it), so the copy must hold it: the thread waits
    for a COMMIT under way (the commit gate) before it copies (a review: without the gate,
    the copy was taken while the COMMIT went on)."""
    path = tmp_path / "journal.sqlite3"
    journal, failures, called = watched(path)
    try:
        journal.save(make_txn("C0"))
        journal._db = _CommitAsTheLossIsSeen(journal._db, journal, f"{path}-wal")
        journal.save(make_txn("C1"))  # returned: committed
        assert called.wait(10)
        (copy,) = tmp_path.glob("journal.sqlite3.recovered-*")
        assert [service for service, _ in rows(copy)] == ["C0", "C1"]
    finally:
        journal.close()


def test_nothing_waiting_for_a_commit_runs_once_the_journal_is_lost(tmp_path):
    """A pass rolled back at the loss left its ACK in the framer, and the next kick ran at
    once (nothing waited for a commit any more) and sent it: an answer ACKed, recorded
    nowhere (a review). Once lost, nothing waits for a commit that will never come, and
    nothing runs."""
    path = tmp_path / "journal.sqlite3"
    journal, failures, called = watched(path)
    ran: list[str] = []
    try:
        journal.save(make_txn("K0"))
        os.remove(f"{path}-wal")
        assert called.wait(10)
        journal.after_commit(lambda: ran.append("kick"))
        assert journal.commit_pending and ran == []
    finally:
        journal.close()


def test_files_left_in_place_are_not_reported(tmp_path):
    path = tmp_path / "journal.sqlite3"
    journal, failures, called = watched(path)
    try:
        for i in range(20):
            journal.save(make_txn(f"N{i}"))
        assert not called.wait(0.5)
    finally:
        journal.close()
    assert not list(tmp_path.glob("*.recovered-*"))


async def test_the_daemon_stops_when_its_write_ahead_log_is_removed(tmp_path, mosquitto):
    """h5: the -wal removed under the daemon, then a kill -9: the in-flight payment's record
    was lost, and the register's identical repeat went to the terminal again. Now the daemon
    stops (exit 5) with the record saved; put back, it is taken up at the next start."""
    sim = Simulator(tmp_path, "--delay", "30")
    config = write_config(tmp_path, mosquitto, sim.link, terminal={"payment_timeout": 60.0})
    journal = tmp_path / "journal.sqlite3"
    daemon = Daemon(config, tmp_path).start()
    again = Daemon(config, tmp_path)
    try:
        async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
            await payment_on_the_wire(sub, "W1", 2.0)
            os.remove(f"{journal}-wal")
            # (5: the unit's RestartPreventExitStatus: systemd does not start it again)
            assert await asyncio.to_thread(daemon.process.wait, 15) == 5, daemon.log()[-3000:]
        said = daemon.log()
        (copy,) = tmp_path.glob("journal.sqlite3.recovered-*")
        (marker,) = tmp_path.glob("journal.sqlite3.lost-*")
        assert "CRITICAL" in said and f"the write-ahead log {journal}-wal" in said, said
        assert f"mv {copy} {journal}" in said and "stopping at once" in said, said
        assert [service for service, _ in rows(copy)] == ["W1"]

        # Started by hand meanwhile: not on what is at the path, without W1
        refused = Daemon(config, tmp_path / "refused")
        (tmp_path / "refused").mkdir()
        refused.start()
        assert await asyncio.to_thread(refused.process.wait, 15) == 3, refused.log()[-3000:]
        assert "the journal was removed or replaced while the bridge ran" in refused.log()
        assert f"mv {copy} {journal}" in refused.log() and str(marker) in refused.log()
        assert [service for service, _ in rows(copy)] == ["W1"]

        # Done as the log says: the next start takes W1 up from the copy
        for name in ("journal.sqlite3", "journal.sqlite3-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(tmp_path / name, tmp_path / f"{name}.aside")
        os.replace(copy, journal)
        marker.unlink()
        again.start()
        assert await asyncio.to_thread(
            wait_until, lambda: "recovering 1 open transaction" in again.log(), 20), \
            again.log()[-3000:]
    finally:
        daemon.kill()
        again.kill()
        sim.stop()


def test_a_journal_behind_a_symbolic_link_is_watched_where_it_lies(tmp_path, caplog):
    """SQLite names the -wal after the file a link leads to: the watch looked for it beside
    the link, found none, and never saw it go (a review)."""
    (tmp_path / "disk").mkdir()
    real = tmp_path / "disk" / "journal.sqlite3"
    link = tmp_path / "journal.sqlite3"
    real.touch()
    link.symlink_to(real)
    journal, failures, called = watched(link)
    try:
        journal.save(make_txn("L1"))
        os.remove(f"{real}-wal")
        assert called.wait(10), caplog.text
        assert f"the write-ahead log {real}-wal of journal {link} was removed" in caplog.text
    finally:
        journal.close()


async def test_a_request_while_the_lost_journal_is_saved_is_left_for_the_next_start(
        tmp_path, mosquitto, caplog):
    """While the copy is saved the daemon takes no write: a register's request then failed
    in the intake, whose error answer failed again, and the MQTT side logged a traceback and
    reconnected, again and again (a review). The request is now left unacknowledged, for
    the next start, without a word but the journal's."""
    async with running_bridge(tmp_path, mosquitto) as bridge, \
            Subscriber(mosquitto, [f"{CLI_BASE}/registers/POS1/#"]) as register:
        os.remove(f"{tmp_path / 'journal.sqlite3'}-wal")
        assert await asyncio.to_thread(wait_until, lambda: bridge.journal.lost, 10)
        await register.publish(f"{CLI_BASE}/terminals/{POI}/request",
                               responses.payment_request("POS1", "J1", POI, 3.0))
        await asyncio.sleep(1.5)
        assert register.messages == []  # (nothing answered that the journal did not hold)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
            and not r.getMessage().startswith("the write-ahead log")]
    assert not [m for m in said if "could not be handled" in m or "MQTT connection" in m], said

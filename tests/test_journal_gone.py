"""The journal's files removed or replaced under the running daemon (the journal review, h2
and h5): payments went on into a deleted file without a word, and after a kill the
register's repeat went to the terminal a second time. The daemon now sees it within a
second, saves what the lost files hold beside the journal, says what to do and stops.
Real SQLite files, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading

import pytest

from bridge.daemon.journal import Journal, JournalError, JournalGone
from bridge.protocol.transaction import TxKey
from bridge.simulator import responses

from .rig import POI, Daemon, Simulator, Subscriber, wait_until, write_config
from .test_journal import make_txn

BASE = "poi-bridge"
REQUEST = f"{BASE}/terminals/{POI}/request"


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
        assert isinstance(failures[0], JournalGone)
        assert rows(copy) == [("G1", "awaiting_response")]
        assert copy.stat().st_mode & 0o077 == 0
        journal.close()
        with pytest.raises(JournalError, match="will not start beside it"):
            Journal(path)
        assert not path.exists()  # (left missing, as it was found)
        said = caplog.text
        assert f"journal {path} was removed (or renamed) while the bridge ran" in said, said
        assert f"saved in {copy}" in said and f"mv {copy} {path}" in said, said
    finally:
        journal.close()
    # Put back as the copy says, it is the journal, whole
    os.replace(copy, path)
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
    stops (exit 3) with the record saved; put back, it is taken up at the next start."""
    sim = Simulator(tmp_path, "--delay", "30")
    config = write_config(tmp_path, mosquitto, sim.link, terminal={"payment_timeout": 60.0})
    journal = tmp_path / "journal.sqlite3"
    daemon = Daemon(config, tmp_path).start()
    again = Daemon(config, tmp_path)
    try:
        async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
            await sub.wait_for(lambda t, p: t.endswith(f"/terminals/{POI}/state")
                               and p["state"] == "online")
            await sub.publish(REQUEST, responses.payment_request("POS1", "W1", POI, 2.0))
            await sub.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "sent")
            os.remove(f"{journal}-wal")
            assert await asyncio.to_thread(daemon.process.wait, 15) == 3, daemon.log()[-3000:]
        said = daemon.log()
        (copy,) = tmp_path.glob("journal.sqlite3.recovered-*")
        assert "CRITICAL" in said and f"the write-ahead log {journal}-wal" in said, said
        assert f"mv {copy} {journal}" in said and "stopping at once" in said, said
        assert [service for service, _ in rows(copy)] == ["W1"]

        # systemd starts it again 5 s later: not beside the copy, which alone holds W1
        refused = Daemon(config, tmp_path / "refused")
        (tmp_path / "refused").mkdir()
        refused.start()
        assert await asyncio.to_thread(refused.process.wait, 15) == 3, refused.log()[-3000:]
        assert f"{copy} was saved when the journal was removed" in refused.log()
        assert f"mv {copy} {journal}" in refused.log()
        assert [service for service, _ in rows(copy)] == ["W1"]

        # Done as the log says: the next start takes W1 up from the copy
        for name in ("journal.sqlite3", "journal.sqlite3-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(tmp_path / name, tmp_path / f"{name}.aside")
        os.replace(copy, journal)
        again.start()
        assert await asyncio.to_thread(
            wait_until, lambda: "recovering 1 open transaction" in again.log(), 20), \
            again.log()[-3000:]
    finally:
        daemon.kill()
        again.kill()
        sim.stop()

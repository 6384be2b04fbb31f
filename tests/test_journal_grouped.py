"""Grouped commits (the daemon's mode): the writes of one event-loop pass commit once, and
what depends on them waits for that commit. A second connection to the same file plays the
crash: what it cannot see would not survive one."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable

import pytest

from bridge.daemon.journal import Journal
from bridge.protocol.transaction import TxKey, TxState

from .test_journal import make_txn


class Passes:
    """Stands for loop.call_soon: the test says when the next pass (the commit) runs."""

    def __init__(self) -> None:
        self.scheduled: list[Callable[[], None]] = []

    def __call__(self, callback: Callable[[], None]) -> None:
        self.scheduled.append(callback)

    def next(self) -> None:
        todo, self.scheduled = self.scheduled, []
        for callback in todo:
            callback()


@pytest.fixture
def grouped(tmp_path):
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    passes = Passes()
    journal.group_commits(passes)
    other = sqlite3.connect(path)
    yield journal, passes, other
    other.close()
    journal.close()


def _committed_services(other: sqlite3.Connection) -> list[str]:
    return [r[0] for r in other.execute("SELECT service_id FROM transactions ORDER BY 1")]


def test_a_pass_commits_once_and_only_then_runs_what_waited(grouped):
    journal, passes, other = grouped
    done: list[str] = []
    with journal.batch():
        journal.save(make_txn("S1"))
    journal.after_commit(lambda: done.append("send S1"))
    with journal.batch():
        journal.save(make_txn("S2"), [("t/a", b"{}", 1, False)])
    journal.after_commit(lambda: done.append("send S2"))

    assert len(passes.scheduled) == 1, "one commit per pass, however many steps"
    assert _committed_services(other) == [] and done == []
    assert journal.get(TxKey("R1", "S2")) is not None  # the daemon itself reads its writes
    passes.next()
    assert _committed_services(other) == ["S1", "S2"]
    assert done == ["send S1", "send S2"]


def test_after_commit_runs_at_once_when_nothing_waits(grouped):
    journal, passes, _ = grouped
    done: list[int] = []
    journal.after_commit(lambda: done.append(1))
    assert done == [1] and passes.scheduled == []


def test_the_publisher_sees_only_committed_messages(grouped):
    journal, passes, _ = grouped
    journal.enqueue([("t/a", b"1", 1, False)])
    passes.next()
    journal.enqueue([("t/b", b"2", 1, False)])
    assert [m.topic for m in journal.pending()] == ["t/a"]
    passes.next()
    assert [m.topic for m in journal.pending()] == ["t/a", "t/b"]


def test_a_failing_step_takes_back_only_its_own_writes(grouped):
    journal, passes, other = grouped
    with journal.batch():
        journal.save(make_txn("S1"), [("t/ok", b"1", 1, False)])
    with pytest.raises(RuntimeError), journal.batch():
        journal.save(make_txn("S2"), [("t/bad", b"2", 1, False)])
        raise RuntimeError("the step failed half-way")
    # the id the failed step took is given out again: it must not count as committed early
    journal.enqueue([("t/next", b"3", 1, False)])
    assert [m.topic for m in journal.pending()] == []
    passes.next()
    assert _committed_services(other) == ["S1"]
    assert [m.topic for m in journal.pending()] == ["t/ok", "t/next"]


def test_delivery_marks_ride_on_the_pass_commit_or_commit_alone(grouped):
    journal, passes, other = grouped
    ids = journal.enqueue([("t/a", b"1", 1, False), ("t/b", b"2", 1, False)])
    passes.next()
    journal.mark_delivered(ids[:1])  # nothing open: its own (unsynced) commit, at once
    assert passes.scheduled == []
    assert other.execute("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL"
                         ).fetchone() == (1,)
    journal.save(make_txn("S1"))
    journal.mark_delivered(ids[1:])  # a pass is open: joins it
    assert other.execute("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL"
                         ).fetchone() == (1,)
    passes.next()
    assert other.execute("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL"
                         ).fetchone() == (0,)


def test_close_commits_what_the_last_pass_wrote(tmp_path):
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.group_commits(Passes())  # the pass never comes: the daemon stops first
    journal.save(make_txn("S1", TxState.FINAL))
    journal.close()
    again = Journal(path)
    assert again.get(TxKey("R1", "S1")).state is TxState.FINAL
    again.close()


def test_a_failed_commit_does_not_run_what_depended_on_it(grouped, caplog):
    journal, passes, other = grouped
    # A COMMIT that SQLite refuses, standing in for a full disk or an I/O error: a deferred
    # foreign key left violated (the journal's own tables have none).
    db = journal._db
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY "
               "DEFERRED)")
    done: list[str] = []
    failures: list[BaseException] = []
    journal.on_failure(failures.append)
    journal.save(make_txn("S1"))
    journal.after_commit(lambda: done.append("send S1"))
    db.execute("INSERT INTO child VALUES (42)")
    passes.next()
    assert done == []
    assert _committed_services(other) == []
    assert "commit failed" in caplog.text and "check the disk" in caplog.text
    assert [type(f) for f in failures] == [sqlite3.IntegrityError]  # the daemon stops on it
    journal.save(make_txn("S2"))  # the journal goes on
    passes.next()
    assert _committed_services(other) == ["S2"]


def test_a_write_the_full_disk_refuses_is_reported_and_takes_back_its_unit_only(grouped,
                                                                                caplog):
    journal, passes, other = grouped
    failures: list[BaseException] = []
    journal.on_failure(failures.append)
    journal.save(make_txn("S1"), [("t/ok", b"1", 1, False)])
    # the file may not grow by one more page: SQLite's own "database or disk is full"
    (pages,) = journal._db.execute("PRAGMA page_count").fetchone()
    journal._db.execute(f"PRAGMA max_page_count={pages}")
    done: list[str] = []
    journal.after_commit(lambda: done.append("send S1"))
    with pytest.raises(sqlite3.OperationalError, match="full"):
        journal.save(make_txn("S2"), [("t/big", b"x" * 200_000, 1, False)])
    assert [str(f) for f in failures] == ["database or disk is full"]
    assert "a write failed" in caplog.text
    # SQLite may answer a full disk by rolling back the whole transaction, S1 with it: what
    # waited for S1 is not done either (so the daemon, told of the failure, stops)
    passes.next()
    assert done == [] and _committed_services(other) == [] and journal.pending() == []

    journal._db.execute("PRAGMA max_page_count=1000000")  # room again
    journal.save(make_txn("S3"), [("t/next", b"3", 1, False)])
    with pytest.raises(RuntimeError), journal.batch():  # a step's own failure is not the disk's
        journal.save(make_txn("S4"))
        raise RuntimeError("the step failed half-way")
    passes.next()
    assert len(failures) == 1
    assert _committed_services(other) == ["S3"]
    assert [m.topic for m in journal.pending()] == ["t/next"]


def test_a_write_another_writer_keeps_out_is_reported(grouped, caplog):
    """Someone holds the journal's write lock longer than busy_timeout (a technician's
    sqlite3 shell in a write transaction): the daemon cannot record the step either."""
    journal, passes, other = grouped
    failures: list[BaseException] = []
    journal.on_failure(failures.append)
    journal._db.execute("PRAGMA busy_timeout=50")
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            journal.save(make_txn("S1"))
    finally:
        other.execute("ROLLBACK")
    assert [str(f) for f in failures] == ["database is locked"]
    assert "cannot begin a write" in caplog.text
    journal.save(make_txn("S2"))  # the lock is gone: the journal works again
    passes.next()
    assert _committed_services(other) == ["S2"]


def test_a_delivery_mark_the_journal_cannot_write_is_only_a_warning(grouped, caplog):
    """Outside a pass, a mark is its own commit; if it fails, the message goes out once more
    (registers accept repeats): worth a line for the technician, not a stop."""
    journal, passes, other = grouped
    failures: list[BaseException] = []
    journal.on_failure(failures.append)
    ids = journal.enqueue([("t/a", b"1", 1, False)])
    passes.next()
    journal._db.execute("PRAGMA busy_timeout=50")
    other.execute("BEGIN IMMEDIATE")
    try:
        journal.mark_delivered(ids)
    finally:
        other.execute("ROLLBACK")
    assert "not marked delivered" in caplog.text and failures == []
    assert [m.id for m in journal.pending()] == ids
    journal.mark_delivered(ids)
    assert journal.pending() == []


async def test_on_the_event_loop_the_commit_comes_in_the_next_pass(tmp_path):
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.group_commits(asyncio.get_running_loop().call_soon)
    other = sqlite3.connect(path)
    try:
        journal.save(make_txn("S1"))
        assert _committed_services(other) == []
        await asyncio.sleep(0)
        assert _committed_services(other) == ["S1"]
    finally:
        other.close()
        journal.close()


def test_new_outbox_messages_are_announced_after_the_commit_and_its_frames(grouped):
    """The MQTT side publishes from the outbox listener: it must hear of every commit that
    made messages durable, after what waited for that commit (frames to terminals) and with
    the messages already visible to pending(); of no other commit."""
    journal, passes, _ = grouped
    done: list[str] = []
    journal.on_outbox_committed(
        lambda: done.append("publish " + ",".join(m.topic for m in journal.pending())))
    with journal.batch():
        journal.save(make_txn("S1"), [("t/accepted", b"{}", 1, False)])
    journal.after_commit(lambda: done.append("send S1"))
    assert done == []
    passes.next()
    assert done == ["send S1", "publish t/accepted"]

    journal.save(make_txn("S2"))  # no message: nothing to publish
    passes.next()
    assert done == ["send S1", "publish t/accepted"]
    journal.mark_delivered([m.id for m in journal.pending()])
    passes.next()
    assert len(done) == 2


def test_a_failed_commit_announces_nothing(grouped):
    journal, passes, _ = grouped
    announced: list[int] = []
    journal.on_outbox_committed(lambda: announced.append(len(journal.pending())))
    db = journal._db
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY "
               "DEFERRED)")
    journal.enqueue([("t/lost", b"{}", 1, False)])
    db.execute("INSERT INTO child VALUES (42)")
    passes.next()
    assert announced == []
    journal.enqueue([("t/next", b"{}", 1, False)])
    passes.next()
    assert announced == [1]


def test_outside_grouped_mode_each_commit_announces_its_messages(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        seen: list[list[str]] = []
        journal.on_outbox_committed(lambda: seen.append([m.topic for m in journal.pending()]))
        journal.enqueue([("t/a", b"{}", 1, False)])
        journal.save(make_txn("S1"))
        journal.enqueue([("t/b", b"{}", 1, False)])
        assert seen == [["t/a"], ["t/a", "t/b"]]
    finally:
        journal.close()


def _wal_size(path) -> int:
    return os.path.getsize(f"{path}-wal")


@pytest.mark.parametrize("reset", [True, False])
def test_a_wal_that_a_busy_daemon_never_lets_restart_is_started_over(tmp_path, reset):
    # Under load without a pause every commit lands while the checkpoint thread copies, so no
    # write ever begins with the whole WAL copied and SQLite never starts the file over. Here
    # that happens every time: the checkpoint (the thread's round, on its own connection)
    # runs while the pass's transaction is open.
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.wal_reset_bytes = 8 * 1024 * 1024 if reset else 1 << 62
    passes = Passes()
    journal.group_commits(passes)
    checkpointer = sqlite3.connect(path, isolation_level=None)
    peak = 0
    try:
        for i in range(400):  # 100 KB a pass: 40 MB of WAL if it is never started over
            journal.save(make_txn(f"S{i}"), [("t/x", bytes(100_000), 1, False)])
            journal._checkpoint(checkpointer)
            passes.next()
            peak = max(peak, _wal_size(path))
    finally:
        checkpointer.close()
        journal.close()
    if reset:
        assert peak < 12 * 1024 * 1024, f"the WAL reached {peak} bytes"
        check = sqlite3.connect(path)
        assert check.execute("SELECT COUNT(*) FROM transactions").fetchone() == (400,)
        assert check.execute("SELECT COUNT(*) FROM outbox").fetchone() == (400,)
        check.close()
    else:  # what the daemon did before: the same passes, no reset
        assert peak > 30 * 1024 * 1024, f"the WAL reached only {peak} bytes"

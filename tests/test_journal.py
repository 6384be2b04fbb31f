"""The journal on a real SQLite file: what is saved survives a reopen; a bad file stops us."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bridge.daemon.journal import SCHEMA_VERSION, Journal, JournalError
from bridge.protocol.transaction import Transaction, TxKey, TxState, request_digest

from .rig import python_env
from bridge.simulator import responses

ROOT = Path(__file__).resolve().parents[1]


def make_txn(service_id: str = "S1", state: TxState = TxState.AWAITING_RESPONSE) -> Transaction:
    doc = responses.payment_request("R1", service_id, "V400m-1", 9.99)
    return Transaction(sale_id="R1", service_id=service_id, poi_id="V400m-1", category="Payment",
                       request=doc, digest=request_digest(doc), created_at=100.0,
                       updated_at=100.0, state=state, poll_ids=("P1", "P2"), polls_sent=2,
                       extra={"note": "x"})


def test_transaction_round_trips_through_a_reopened_file(tmp_path):
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    txn = make_txn()
    journal.save(txn)
    journal.close()
    again = Journal(path)
    loaded = again.get(TxKey("R1", "S1"))
    assert loaded == txn
    assert loaded.poll_ids == ("P1", "P2") and loaded.state is TxState.AWAITING_RESPONSE
    assert again.get(TxKey("R1", "nope")) is None


def test_save_updates_in_place_and_open_transactions_skip_final(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    journal.save(make_txn("S1"))
    journal.save(make_txn("S2"))
    final = make_txn("S1", TxState.FINAL)
    final.outcome = "approved"
    journal.save(final)
    assert [t.service_id for t in journal.open_transactions()] == ["S2"]
    assert journal.open_transactions("V400m-other") == []
    assert journal.get(TxKey("R1", "S1")).outcome == "approved"
    assert [t.service_id for t in journal.transactions(state="final")] == ["S1"]


def test_outbox_is_atomic_with_the_transaction_and_survives_reopen(tmp_path):
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    ids = journal.save(make_txn(), [("a/b", b"{}", 1, False), ("a/c", b"[]", 1, True)])
    assert len(ids) == 2
    journal.mark_delivered(ids[:1])
    journal.close()
    journal = Journal(path)
    pending = journal.pending()
    assert [(m.topic, m.payload, m.retain) for m in pending] == [("a/c", b"[]", True)]
    assert journal.counts() == {"in_flight": 1, "unresolved": 0, "undelivered": 1}


def test_an_answers_correlation_data_is_kept_with_it_across_a_reopen(tmp_path):
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    journal.enqueue([("ops/replies/1", b"{}", 1, False, b"req-\x00\xff"),
                     ("a/b", b"{}", 1, False)])
    journal.close()
    journal = Journal(path)
    assert [(m.topic, m.correlation) for m in journal.pending()] == [
        ("ops/replies/1", b"req-\x00\xff"), ("a/b", None)]
    journal.close()


def test_a_journal_of_the_bridge_before_correlation_data_opens_and_gains_it(tmp_path):
    """The column is new, nullable, and schema version 1 stays: an older journal gains it on
    open with its pending messages intact, and an older bridge (which names the columns it
    uses) still opens a journal that has it."""
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    journal.enqueue([("a/old", b"{}", 1, True)])
    journal.close()
    with sqlite3.connect(path) as db:  # as the bridge before it wrote the file
        db.execute("ALTER TABLE outbox DROP COLUMN correlation")
    journal = Journal(path)
    journal.enqueue([("ops/replies/2", b"{}", 1, False, b"c-2")])
    assert [(m.topic, m.retain, m.correlation) for m in journal.pending()] == [
        ("a/old", True, None), ("ops/replies/2", False, b"c-2")]
    journal.close()
    with sqlite3.connect(path) as db:  # what the older bridge's pending() reads
        rows = db.execute("SELECT id, topic, payload, qos, retain FROM outbox "
                          "WHERE delivered_at IS NULL ORDER BY id").fetchall()
    assert [r[1] for r in rows] == ["a/old", "ops/replies/2"]


def test_failed_save_leaves_nothing_half_written(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    bad = make_txn()
    bad.request = {"not serialisable": object()}
    with pytest.raises(TypeError):
        journal.save(bad, [("t", b"x", 1, False)])
    assert journal.get(TxKey("R1", "S1")) is None and journal.pending() == []


def test_prune_forgets_only_old_final_and_delivered(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    old_final = make_txn("S1", TxState.FINAL)
    journal.save(old_final)
    journal.save(make_txn("S2"))  # open: never pruned
    (mid,) = journal.enqueue([("t", b"x", 1, False)])
    journal.mark_delivered([mid])
    journal.prune(older_than=10**12)
    assert journal.get(TxKey("R1", "S1")) is None
    assert journal.get(TxKey("R1", "S2")) is not None


def test_prune_in_steps_clears_each_forgotten_transactions_retained_topic(tmp_path):
    """The prune goes in steps of `limit` rows of each table (a busy store's hour of payments
    deleted at once held the event loop 1-2 s: the journal audit); each transaction it
    forgets has its retained document cleared in the same step."""
    journal = Journal(tmp_path / "j.sqlite3")
    for n in range(5):
        journal.save(make_txn(f"S{n}", TxState.FINAL))
    journal.save(make_txn("OPEN"))
    ids = journal.enqueue([("t", b"x", 1, False)] * 3)
    journal.mark_delivered(ids)

    def retained(key: TxKey) -> str:
        return f"transactions/{key.sale_id}/{key.service_id}"

    steps = []
    while (removed := journal.prune(10**12, 2, retained)) >= 2:
        steps.append(removed)
    steps.append(removed)
    assert steps == [4, 3, 1], steps  # (2+2, 1+2, 0+1)
    assert journal.get(TxKey("R1", "OPEN")) is not None
    assert all(journal.get(TxKey("R1", f"S{n}")) is None for n in range(5))
    cleared = [(m.topic, m.payload, m.retain) for m in journal.pending()]
    assert sorted(cleared) == [(f"transactions/R1/S{n}", b"", True) for n in range(5)]


def test_prune_keeps_the_documents_of_a_transaction_still_open(tmp_path):
    """Review: the prune deleted every delivered message older than the retention, the
    retained documents of open transactions too. A transaction left unresolved stays open
    however long: after 48 h a broker that lost its state got nothing back for it (redeliver
    found no document to publish again), against the README's "the latest retained
    document of every transaction it keeps". An open transaction's documents now stay."""
    from unittest import mock

    from bridge.daemon.registers import Topics

    topics = Topics("b")

    def retained(key: TxKey) -> str:
        return topics.transaction(key.sale_id, key.service_id)

    journal = Journal(tmp_path / "j.sqlite3")
    given_up, done = make_txn("OPEN", TxState.UNRESOLVED), make_txn("DONE", TxState.FINAL)
    three_days_ago = time.time() - 72 * 3600
    given_up.updated_at = done.updated_at = three_days_ago
    open_topic, done_topic = retained(given_up.key), retained(done.key)
    with mock.patch("time.time", return_value=three_days_ago):
        journal.save(given_up, [(open_topic, b'{"state":"in_progress"}', 1, True),
                                ("b/registers/R1/event", b'{"event":"accepted"}', 1, False)])
        journal.save(given_up, [(open_topic, b'{"state":"unresolved"}', 1, True),
                                ("b/registers/R1/response", b'{"n":1}', 1, False)])
        journal.save(done, [(done_topic, b'{"state":"final"}', 1, True)])
        journal.mark_delivered([m.id for m in journal.pending()])
    journal.prune(time.time() - 48 * 3600, retained=retained)
    assert journal.get(given_up.key) is not None and journal.get(done.key) is None
    (left,) = journal._db.execute("SELECT COUNT(*) FROM outbox WHERE retain = 0").fetchone()
    assert left == 0  # what the registers were told long ago goes as before
    # The broker lost its state: the open transaction's latest document goes out again
    count = journal.redeliver("b/transactions/", "b/registers/", time.time() - 3600, 5000)
    assert count == 1
    assert sorted((m.topic, m.payload) for m in journal.pending()) == [
        (done_topic, b""),  # the forgotten one's clearing
        (open_topic, b'{"state":"unresolved"}')]


def test_prune_keeps_a_final_transaction_whose_result_has_not_reached_the_broker(tmp_path):
    """Review: the prune forgot a final transaction by its age alone, its result still in
    the outbox (the broker out of reach, or refusing it, for over 48 h). Meanwhile `resync`
    answered "no transaction", and a register's repeat of the request was not known as one:
    it could go to the terminal as a new payment. A transaction is kept while a message
    written since it ended waits; those older go as before."""
    from unittest import mock

    def retained(key: TxKey) -> str:
        return f"b/transactions/{key.sale_id}/{key.service_id}"

    journal = Journal(tmp_path / "j.sqlite3")
    earlier, unsent = make_txn("EARLIER", TxState.FINAL), make_txn("UNSENT", TxState.FINAL)
    earlier.updated_at = time.time() - 80 * 3600
    unsent.updated_at = time.time() - 72 * 3600
    with mock.patch("time.time", return_value=earlier.updated_at):
        journal.save(earlier, [(retained(earlier.key), b'{"state":"final"}', 1, True)])
        journal.mark_delivered([m.id for m in journal.pending()])
    with mock.patch("time.time", return_value=unsent.updated_at):  # the broker went away
        journal.save(unsent, [("b/registers/R1/response", b'{"n":1}', 1, False),
                              (retained(unsent.key), b'{"state":"final"}', 1, True)])
    journal.prune(time.time() - 48 * 3600, retained=retained)
    assert journal.get(earlier.key) is None  # all it owed went out before
    assert journal.get(unsent.key) is not None
    assert [m.topic for m in journal.pending()] == [
        "b/registers/R1/response", retained(unsent.key), retained(earlier.key)]
    # The broker is back and takes them: the next prune forgets it, its document cleared
    journal.mark_delivered([m.id for m in journal.pending()])
    journal.prune(time.time() - 48 * 3600, retained=retained)
    assert journal.get(unsent.key) is None
    assert [(m.topic, m.payload) for m in journal.pending()] == [(retained(unsent.key), b"")]


async def test_the_prune_loop_lets_the_loop_run_between_its_steps(tmp_path):
    import types

    from bridge.daemon import app
    from bridge.daemon.registers import Topics

    journal = Journal(tmp_path / "j.sqlite3")
    for n in range(3 * app.PRUNE_STEP + 1):
        journal.save(make_txn(f"S{n}", TxState.FINAL))
    bridge = types.SimpleNamespace(
        clock=lambda: 10**12, journal=journal,
        config=types.SimpleNamespace(mqtt=types.SimpleNamespace(transaction_retention=3600)),
        gateway=types.SimpleNamespace(topics=Topics("b")))
    passes = 0

    async def count_passes() -> None:
        nonlocal passes
        while True:
            passes += 1
            await asyncio.sleep(0)

    seen_at: list[int] = []  # the loop passes counted when each step began
    prune = journal.prune

    def step(*args):
        seen_at.append(passes)
        return prune(*args)

    journal.prune = step
    counting = asyncio.create_task(count_passes())
    pruning = asyncio.create_task(app.Bridge._prune_loop(bridge))
    try:
        async with asyncio.timeout(10):
            while len(journal.pending()) < 3 * app.PRUNE_STEP + 1:
                await asyncio.sleep(0.01)
    finally:
        pruning.cancel()
        counting.cancel()
    assert len(seen_at) == 4 and seen_at == sorted(set(seen_at)), seen_at  # a pass between
    assert {m.topic for m in journal.pending()} == {
        f"b/transactions/R1/S{n}" for n in range(3 * app.PRUNE_STEP + 1)}


def test_garbage_file_is_refused_not_recreated(tmp_path):
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match="will not overwrite"):
        Journal(path)
    assert path.read_bytes().startswith(b"this is not a database")


@pytest.mark.parametrize("database", ["empty", "missing"])
def test_a_write_ahead_log_without_its_database_is_refused_not_overwritten(tmp_path, database):
    """A 0-byte (or missing) journal beside a -wal holding commits was taken for no journal:
    a new one was started, throwing the commits away, and the terminal's answers to the
    payments in them were dropped later. It is refused now, and nothing is touched."""
    import shutil

    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    journal.save(make_txn())
    wal = path.with_name(path.name + "-wal")
    kept = tmp_path / "kept-wal"
    shutil.copy(wal, kept)  # (a clean close checkpoints it away)
    journal.close()
    if database == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    shutil.copy(kept, wal)
    size = wal.stat().st_size
    with pytest.raises(JournalError, match="write-ahead log .* holds .* bytes") as refused:
        Journal(path)
    assert "move the -wal and -shm files aside" in str(refused.value)
    assert wal.stat().st_size == size
    # (the database file the lock made to be flocked is not left behind: found as it was)
    assert path.exists() == (database == "empty")
    assert f"is {database} but" in str(refused.value)


def test_a_new_journal_is_said_in_the_log(tmp_path, caplog):
    caplog.set_level("INFO", logger="poi_bridge.journal")
    Journal(tmp_path / "j.sqlite3").close()
    assert any("none there, a new one is started" in m for m in caplog.messages)


def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "j.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE something (x)")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="not a poi-bridge journal"):
        Journal(path)


@pytest.mark.parametrize("killed_at", ["CREATE TABLE IF NOT EXISTS transactions",
                                       "INSERT OR IGNORE INTO meta (key, value) VALUES "
                                       "('schema_version'"])
def test_a_first_start_killed_while_setting_up_the_journal_leaves_one_the_next_opens(
        tmp_path, killed_at):
    """A real process SIGKILLed during its very first Journal(): the schema's statements
    each committed on their own, so the file kept tables without a schema_version (or no
    table at all), and every later start refused it as no journal of its own until a
    technician moved it aside (the journal audit). The set-up is one transaction now."""
    path = tmp_path / "j.sqlite3"
    script = textwrap.dedent(f"""
        import os, signal, sqlite3
        from bridge.daemon import journal

        def connect(*args, **kwargs):
            db = sqlite3.connect(*args, **kwargs)
            db.set_trace_callback(lambda statement: os.kill(os.getpid(), signal.SIGKILL)
                                  if {killed_at!r} in statement else None)
            return db

        journal.sqlite3 = type("Sqlite3", (), {{"connect": staticmethod(connect)}})
        journal.Journal({str(path)!r})
        print("not killed")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=python_env(), timeout=60)
    assert done.returncode == -signal.SIGKILL, (done.stdout, done.stderr)
    reopened = Journal(path)
    try:
        assert reopened.bridge_id
        (version,) = reopened._db.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == str(SCHEMA_VERSION)
    finally:
        reopened.close()


def test_the_journal_under_another_name_is_still_refused_to_a_second_daemon(tmp_path):
    """The lock went by the path as written, while SQLite follows a symbolic link: a second
    daemon given the journal through one opened it beside the first (the journal audit)."""
    first = Journal(tmp_path / "journal.sqlite3")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "journal.sqlite3").symlink_to(tmp_path / "journal.sqlite3")
    try:
        with pytest.raises(JournalError, match="in use by another poi-bridge process"):
            Journal(tmp_path / "other" / "journal.sqlite3")
    finally:
        first.close()
    Journal(tmp_path / "other" / "journal.sqlite3").close()


def test_an_sqlite_file_with_nothing_in_it_is_set_up_as_a_new_journal(tmp_path):
    """What a first start killed straight after `PRAGMA journal_mode=WAL` leaves: a file of
    one page, no table. It holds no payment: set up as new. A technician's read-only
    command still finds no journal in it."""
    path = tmp_path / "j.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    assert path.stat().st_size > 0
    with pytest.raises(JournalError, match="not a poi-bridge journal"):
        Journal(path, readonly=True)
    Journal(path).close()
    Journal(path, readonly=True).close()


def test_commit_survives_kill_9_of_the_writer(tmp_path):
    """A real process saves and is SIGKILLed straight after: the row is on disk."""
    path = tmp_path / "j.sqlite3"
    script = textwrap.dedent(f"""
        import os, signal
        from bridge.daemon.journal import Journal
        from tests.test_journal import make_txn
        j = Journal({str(path)!r})
        j.save(make_txn("S7"), [("t", b"payload", 1, False)])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    assert proc.returncode == -9
    journal = Journal(path)
    assert journal.get(TxKey("R1", "S7")).state is TxState.AWAITING_RESPONSE
    assert [m.payload for m in journal.pending()] == [b"payload"]


def test_checkpoints_run_in_the_background_and_keep_the_wal_small(tmp_path):
    """Commits never checkpoint (that stalled the event loop); the background thread does,
    so the WAL stops growing while the daemon runs."""
    journal = Journal(tmp_path / "journal.sqlite3")
    wal = tmp_path / "journal.sqlite3-wal"
    for n in range(300):
        journal.save(make_txn(f"S{n}"))
    grown = wal.stat().st_size
    assert grown > 1_000_000  # no checkpoint inside the commits: every commit's pages are here
    journal.start_checkpoints(interval=0.02)
    for n in range(300):  # as many commits again: without checkpoints the WAL would double
        journal.save(make_txn(f"T{n}"))
        time.sleep(0.002)
    assert wal.stat().st_size <= grown
    journal.close()
    reopened = Journal(tmp_path / "journal.sqlite3", readonly=True)
    assert reopened.get(TxKey("R1", "S299")) is not None
    assert reopened.get(TxKey("R1", "T299")) is not None
    reopened.close()


def readonly_error() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("attempt to write a readonly database")
    error.sqlite_errorname = "SQLITE_READONLY"
    return error


def mount_read_only(monkeypatch, tmp_path) -> None:
    """statvfs says read-only everywhere (a read-only remount cannot be made here)."""
    real = os.statvfs(tmp_path)

    class ReadOnly:
        def __getattr__(self, name):
            return os.ST_RDONLY | real.f_flag if name == "f_flag" else getattr(real, name)

    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())


def test_a_journal_on_a_file_system_remounted_read_only_says_so(tmp_path, monkeypatch):
    """After disk errors the kernel remounts a file system read-only: SQLite says 'attempt
    to write a readonly database', and the advice was to check the free space and the
    permissions. (A read-only remount cannot be made here: statvfs reports one.)"""

    from bridge.daemon.journal_files import unusable

    error = readonly_error()
    assert "read-only" not in unusable(tmp_path / "j.sqlite3", error)
    mount_read_only(monkeypatch, tmp_path)
    text = unusable(tmp_path / "j.sqlite3", error)
    assert "mounted read-only" in text and "dmesg" in text and "fsck" in text, text


def test_a_read_only_journal_outside_the_state_directory_names_protectsystem_first(
        tmp_path, monkeypatch):
    """ProtectSystem=strict makes every path but /var/lib/poi-bridge read-only for the
    service: a journal configured elsewhere got "disk errors ... fsck", sending the
    technician after a healthy disk. Outside the state directory, or under systemd
    (INVOCATION_ID), the unit's sandbox comes first, the disk after."""
    from bridge.daemon.journal_files import unusable

    error = readonly_error()
    mount_read_only(monkeypatch, tmp_path)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    elsewhere = unusable(Path("/srv/pos/journal.sqlite3"), error)
    assert "ProtectSystem=strict" in elsewhere and "ReadWritePaths=/srv/pos" in elsewhere
    assert "/var/lib/poi-bridge" in elsewhere
    assert elsewhere.index("ProtectSystem=strict") < elsewhere.index("fsck"), elsewhere
    at_home = unusable(Path("/var/lib/poi-bridge/journal.sqlite3"), error)
    assert "ProtectSystem" not in at_home and "fsck" in at_home, at_home
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    under_unit = unusable(Path("/var/lib/poi-bridge/journal.sqlite3"), error)
    assert under_unit.index("ProtectSystem=strict") < under_unit.index("fsck"), under_unit


def test_a_journal_on_a_real_read_only_remount_is_not_called_a_permission_problem(tmp_path):
    """A real read-only remount (a tmpfs in a mount namespace of its own): the owner's own
    journal was reported as files to chown (os.access fails on a read-only mount too), not
    as the disk problem it is."""
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to remount a file system read-only")
    where = tmp_path / "disk"
    where.mkdir()
    script = (
        "import sys\n"
        "from bridge.daemon.journal import Journal, JournalError\n"
        "try:\n"
        f"    Journal({str(where / 'journal.sqlite3')!r})\n"
        "except JournalError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('opened')\n")
    setup = (f"{sys.executable} -c 'from bridge.daemon.journal import Journal; "
             f"Journal(\"{where / 'journal.sqlite3'}\").close()'")
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f"mount -t tmpfs tmpfs {where} && {setup} && mount -o remount,ro {where} && "
         f"{sys.executable} -c \"$0\"", script],
        capture_output=True, text=True, timeout=60, env=python_env())
    if "mount:" in run.stderr and "permission denied" in run.stderr.lower():
        pytest.skip(f"cannot mount here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert "mounted read-only" in run.stdout and "dmesg" in run.stdout, run.stdout
    assert "chown" not in run.stdout, run.stdout


def test_a_failing_checkpoint_is_said_once_with_what_to_do(tmp_path, caplog):
    """A full disk made the checkpoint thread log the same line every second, no advice."""
    caplog.set_level("INFO", logger="poi_bridge.journal")
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    try:
        broken = sqlite3.connect(path)
        broken.close()  # every statement on it fails with sqlite3.ProgrammingError
        for _ in range(3):
            journal._checkpoint(broken)
        warned = [m for m in caplog.messages if "WAL checkpoint failed" in m]
        assert len(warned) == 1 and "df -h" in warned[0], warned
        good = sqlite3.connect(path)
        journal._checkpoint(good)
        good.close()
        assert any("WAL checkpoints work again" in m for m in caplog.messages)
    finally:
        journal.close()


def test_a_journal_that_cannot_be_opened_says_what_to_do(tmp_path):
    """A directory named as the journal, a directory the daemon cannot create in: the error
    says what to check, not only SQLite's 'unable to open database file'."""
    with pytest.raises(JournalError, match="it is a directory; `journal` names the file"):
        Journal(tmp_path)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    with pytest.raises(JournalError) as raised:
        Journal(blocked / "journal.sqlite3")
    assert f"ls -ld {blocked}" in str(raised.value)
    assert "only /var/lib/poi-bridge is writable" in str(raised.value)


def test_the_last_request_sent_leaves_out_one_the_terminal_never_got(tmp_path):
    """After a restart the session judges a NotFound by the latest request of its category
    that may have reached the terminal: one that ended not_found (the terminal's NotFound,
    believed) never did, and must not make an earlier request's NotFound doubtful."""
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        earlier, later = make_txn("S1"), make_txn("S2")
        earlier.sent_at, later.sent_at = 100.0, 200.0
        journal.save(earlier)
        journal.save(later)
        assert journal.last_requests_sent("V400m-1") == {"Payment": 200.0}
        later.state, later.outcome = TxState.FINAL, "not_found"
        journal.save(later)
        assert journal.last_requests_sent("V400m-1") == {"Payment": 100.0}
        later.outcome = "approved"  # a correction: it did reach the terminal after all
        journal.save(later)
        assert journal.last_requests_sent("V400m-1") == {"Payment": 200.0}
    finally:
        journal.close()


def test_an_empty_journal_file_at_start_is_a_warning_not_a_new_start_unsaid(tmp_path, caplog):
    """A zero-length journal was started over with only "none there, a new one is started"
    at info: the payments it had held gone without a word."""
    path = tmp_path / "journal.sqlite3"
    path.touch()
    with caplog.at_level("INFO", logger="poi_bridge.journal"):
        Journal(path).close()
    (record,) = [r for r in caplog.records if str(path) in r.getMessage()]
    assert record.levelname == "WARNING", record.getMessage()
    assert "is empty (0 bytes)" in record.getMessage()
    assert "no payment recorded before is in it" in record.getMessage()
    assert "look for a backup" in record.getMessage()
    caplog.clear()
    with caplog.at_level("INFO", logger="poi_bridge.journal"):
        Journal(tmp_path / "new.sqlite3").close()  # missing: a first start, said at info
    assert "none there, a new one is started" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]

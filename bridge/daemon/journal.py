"""The durable journal: every transaction and every message owed to a register, in SQLite.

WAL mode with synchronous=FULL, so a commit has reached the disk when it returns: the shell
records a state before the action that depends on it. In the daemon, commits are grouped: what
the steps of one event-loop pass write commits once, at the start of the next pass, and the
actions that depend on it (frames to terminals, acknowledgements) are handed to
`after_commit()` and run only then (see `group_commits`); the MQTT side hears of new durable
outbox messages after those (`on_outbox_committed`) and publishes them. The outbox holds every MQTT
message until the broker acknowledged it; undelivered ones are sent again after a reconnect
or a restart. A journal that cannot be read stops the daemon: it is never recreated silently,
because it may hold the only record of a payment the shopper made. A journal that can no
longer be written (disk full, I/O error) in the daemon's mode is reported to `on_failure`:
the daemon's state in memory is then ahead of its record, so it stops (see run_bridge).
One daemon holds the journal at a time (a lock on `<journal>.lock`, see
journal_files.hold_lock); the technician's commands open it read-only beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from bridge import __version__
from bridge.daemon.journal_files import (
    JournalError,
    fsync_directory,
    hold_lock,
    journal_files,
    make_directory,
    open_failure,
    unusable,
    write_new,
)
from bridge.daemon.quiet import QuietRepeats
from bridge.daemon.quiet import window as quiet_window
from bridge.daemon.wal_check import WAL_HEADER, wal_damage
from bridge.protocol import jsontext
from bridge.protocol.transaction import (
    DEADLINE_FIELDS,
    STAMP_FIELDS,
    Transaction,
    TxKey,
    TxState,
)

log = logging.getLogger("poi_bridge.journal")

SCHEMA_VERSION = 1
CHECKPOINT_INTERVAL = 1.0  # s between WAL checkpoints (see start_checkpoints)
WAL_RESET_BYTES = 64 * 1024 * 1024  # a WAL past this is started over by the daemon (_reset_wal)
# s: a commit this slow is a disk a technician must hear of (an SD card or eMMC wearing out, a
# failing disk): the daemon's loop waits for it, a terminal's answer is acknowledged only
# after it, and the terminal sends it again meanwhile. Said once in full, then counted.
SLOW_COMMIT = 1.0
LOST_COPY_LIMIT = 120.0  # s: the most a lost journal's copy may take before the daemon stops
SLOW_COMMITS_QUIET = 600.0
# s: a transaction is forgotten only if it ended this long before the oldest message still
# waiting was written (prune): its stamps are the daemon's steady clock, the outbox's the wall
# clock, apart by a step of the system clock not yet followed (30 s) or one followed (which
# moves the transactions' stamps alone)
UNDELIVERED_MARGIN = 3600.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS transactions (
    sale_id TEXT NOT NULL,
    service_id TEXT NOT NULL,
    poi_id TEXT NOT NULL,
    category TEXT NOT NULL,
    state TEXT NOT NULL,
    digest TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    deadline REAL,
    next_poll_at REAL,
    poll_ids TEXT NOT NULL,
    polls_sent INTEGER NOT NULL,
    unanswered_polls INTEGER NOT NULL,
    reconcile_attempts INTEGER NOT NULL,
    outcome TEXT,
    source TEXT,
    response TEXT,
    detail TEXT NOT NULL,
    passthrough INTEGER NOT NULL,
    extra TEXT NOT NULL,
    PRIMARY KEY (sale_id, service_id)
);
CREATE INDEX IF NOT EXISTS transactions_open ON transactions (state) WHERE state != 'final';
-- A payment request is checked against the open payments of its SaleID (open_payments): found
-- through this one, not by reading the SaleID's 48 hours of finished ones. Created here, on
-- every open, so an older journal gains it too (an older bridge keeps it up to date unknowing)
CREATE INDEX IF NOT EXISTS transactions_open_sale ON transactions (sale_id) WHERE state != 'final';
CREATE INDEX IF NOT EXISTS transactions_updated ON transactions (updated_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created_at REAL NOT NULL,
    delivered_at REAL,
    correlation BLOB
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (id) WHERE delivered_at IS NULL;
"""
_COLUMNS = (
    "sale_id", "service_id", "poi_id", "category", "state", "digest", "request", "created_at",
    "updated_at", "sent_at", "deadline", "next_poll_at", "poll_ids", "polls_sent",
    "unanswered_polls", "reconcile_attempts", "outcome", "source", "response", "detail",
    "passthrough", "extra",
)
_JSON_COLUMNS = {"request", "response", "extra", "poll_ids"}
_UPSERT = (
    f"INSERT INTO transactions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    "ON CONFLICT (sale_id, service_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c not in ("sale_id", "service_id"))
)


class StepFailed(Exception):
    """What on_failure gets for a step that failed half-way for a reason of its own, not the
    disk's (Journal.step_failed): a fault of the bridge."""


class JournalGone(Exception):
    """The journal's database file or its write-ahead log is no longer the one the daemon
    writes (removed, renamed or replaced while it ran): see Journal._watch."""



@dataclass(frozen=True, slots=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation: bytes | None = None  # MQTT 5 CorrelationData the answer must carry


def _dumps(value: Any) -> str:
    return jsontext.compact(value).decode()


# Connections whose closing would delete a damaged -wal (_close_keeping_wal)
_KEPT_OPEN: list[sqlite3.Connection] = []




class Journal:
    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        """Open (or, the first time, create) the journal. `readonly` is for the technician's
        commands, which read it beside the running daemon and must never change it."""
        self.path = Path(path)
        self._depth = 0
        self._schedule: Callable[[Callable[[], None]], object] | None = None  # grouped mode
        self._group_open = False  # a transaction is waiting for the pass's commit
        self._after: list[Callable[[], None]] = []  # run once the group is durable
        self._outbox_listener: Callable[[], None] | None = None
        self._failure_listener: Callable[[BaseException], None] | None = None
        self._last_outbox_id = 0  # the newest outbox row written
        self._durable_outbox_id = 0  # the newest outbox row committed: pending() stops there
        self._checkpoints: tuple[threading.Event, threading.Thread] | None = None
        self.wal_reset_bytes = WAL_RESET_BYTES
        self._wal_reset_wanted = False  # set by the checkpoint thread, done after a commit
        self._checkpoint_failure: str | None = None  # the last one logged, until one works
        self._slow_commits = QuietRepeats(SLOW_COMMITS_QUIET, self._slow_commits_summed)
        self._wal_fd: int | None = None  # the -wal SQLite opened, to tell if it is still named
        # Set by the checkpoint thread once the journal's files are gone from its path
        # (_watch): no commit after it, so that the copy it saves holds every record the
        # daemon acted on. The gate makes a COMMIT and the look at the event one step.
        self._lost_event = threading.Event()
        self._commit_gate = threading.Lock()
        self._requests: dict[TxKey, tuple[dict[str, Any], str]] = {}
        # The last response saved, and its text: the result published in the same step
        # carries the same document (see response_text)
        self._response_text: tuple[dict[str, Any], str] | None = None
        # The daemon's journal is its alone; the technician's commands read it beside it
        self._lock: int | None = None
        self._db_fd: int | None = None  # the database file's, flocked (see hold_lock)
        created = False
        if not readonly:
            self._lock, self._db_fd, created = hold_lock(self.path)
        self.bridge_id: str | None = None  # (set on opening; a read-only one may have none)
        self.session_check_left = self._session_check_noted = False  # (note_connecting)
        try:
            self._open(readonly, created)
        except BaseException:
            self._release_lock()
            raise

    def _open(self, readonly: bool, created: bool = False) -> None:
        """`created`: hold_lock made the (empty) database file just now: it was missing."""
        if not readonly:
            try:
                self._refuse_beside_recovered()
            except JournalError:
                self._unmake(created)
                raise
        try:
            existed = self.path.exists() and self.path.stat().st_size > 0
        except OSError as exc:  # a directory it may not enter (StateDirectoryMode=0700)
            raise JournalError(open_failure(self.path, exc, readonly)) from None
        if readonly and not existed:
            raise JournalError(f"no journal at {self.path} (has the daemon run yet?)")
        wal = self._wal_path
        if not existed and wal.exists() and wal.stat().st_size > 0:
            # Its commits would be thrown away with a new database: the payments they hold
            # would be unknown to the bridge (their answers dropped, their retries re-sent).
            self._unmake(created)
            raise JournalError(
                f"journal {self.path} is {'missing' if created else 'empty'} but "
                f"its write-ahead log {wal} holds {wal.stat().st_size} bytes: the database "
                "file was truncated, replaced or removed. The bridge will not start a new "
                "journal over it. Restore the file if you can; otherwise move the -wal and "
                "-shm files aside too (keep them), and restart to begin a new journal.")
        if not existed and not readonly and not created:
            # Not what a first start leaves (the file missing): it was there, and empty.
            # Started over as before, but said: any payments it held are not in it now.
            log.warning("journal %s is empty (0 bytes): a new journal is started in it, so "
                        "no payment recorded before is in it. If the bridge ran here before, "
                        "the file was truncated or replaced (or a first start was cut short): "
                        "look for a backup of %s to know the payments of before, and check "
                        "the disk (dmesg)", self.path, self.path)
        elif not existed and not readonly:
            log.info("journal %s: none there, a new one is started", self.path)
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                           isolation_level=None, check_same_thread=False)
            else:
                make_directory(self.path.parent)
                self._db = sqlite3.connect(self.path, isolation_level=None,
                                           check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(open_failure(self.path, exc, readonly)) from None
        try:
            if readonly:
                self._check_existing(readonly=True)
                return
            if existed:
                # Before any write: the first one may start the WAL over, over the evidence
                self._refuse_damaged_wal()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            # Checkpoints (copying the WAL into the database file, with an fsync of it) run in
            # a thread of their own: done inside a commit, as SQLite does by default, one
            # commit in ~70 took 10 ms instead of 0.4, on the event loop.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute("PRAGMA journal_size_limit=4194304")  # WAL trimmed back after bursts
            if existed:
                self._check_existing()
            # The schema and its meta rows in one transaction: a daemon killed during its
            # first start left tables without a schema_version (or a file with no table at
            # all), which every later start refused as no journal of its
            self._db.executescript("BEGIN IMMEDIATE;\n" + _SCHEMA)
            self._add_missing_columns()
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            # This journal's own id, made once: the bridge that holds it names itself by it on
            # the broker, and a document of a previous run of its own is told from another
            # bridge's (bridge.daemon.peers)
            self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('bridge_id', ?)",
                             (os.urandom(8).hex(),))
            (self.bridge_id,) = self._db.execute(
                "SELECT value FROM meta WHERE key = 'bridge_id'").fetchone()
            # An earlier run connected to the broker and stopped before it recorded what
            # the broker answered (note_connecting)
            self.session_check_left = self._session_check_row()
            self._session_check_noted = self.session_check_left
            self._db.execute("COMMIT")
            (newest,) = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()
            self._last_outbox_id = self._durable_outbox_id = newest
            # The stamps earlier runs wrote, as they were at this start: a clock step this
            # run follows moves this run's stamps only (shift_times). Told apart by where
            # they came from, not by their value: a box that starts with its clock behind
            # stamps this run's payments before an earlier run's.
            self._db.execute(f"CREATE TEMP TABLE earlier_stamps AS SELECT sale_id, service_id, "
                             f"{', '.join(STAMP_FIELDS)} FROM transactions")
            self._db.execute("CREATE UNIQUE INDEX temp.earlier_stamps_key "
                             "ON earlier_stamps (sale_id, service_id)")
            # The -wal this connection has open now (under the lock, nothing else changes
            # it), for _watch. Its descriptor may be closed whenever: SQLite takes no lock on
            # the -wal itself (its locks are on the database file and the -shm).
            with contextlib.suppress(OSError):
                self._wal_fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise JournalError(unusable(self.path, exc)) from None
        except JournalError:
            self._db.close()
            raise

    def _refuse_damaged_wal(self) -> None:
        """Refuse a write-ahead log damaged in the middle (wal_damage): SQLite would open the
        journal without a word, without the commits after the damage (a request whose "sent
        to the terminal" record is lost would be sent again: a double charge)."""
        wal = self._wal_path
        try:
            if wal.stat().st_size <= WAL_HEADER:
                return
        except FileNotFoundError:
            return
        # A read opens the WAL (SQLite recovers it then); a PASSIVE checkpoint says how many
        # frames recovery took. It copies those into the database file, the -wal untouched.
        self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        _busy, valid, _done = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if valid < 0:  # (not a WAL-mode database: SQLite does not read this -wal)
            return
        try:
            damage = wal_damage(wal, valid)
        except OSError as exc:
            raise JournalError(open_failure(self.path, exc, readonly=False)) from None
        if damage is None:
            return
        self._close_keeping_wal()
        shm = journal_files(self.path)[2]
        where = f"frame {damage.frame}" if damage.frame else "its header (frame 0)"
        raise JournalError(
            f"journal {self.path}: its write-ahead log {wal} is damaged at "
            f"{where} of {damage.frames} (a disk fault: it no longer matches its "
            f"checksum). SQLite would silently drop the {damage.dropped} whole frame(s) after "
            f"it, holding {damage.commits} commit(s): the payments recorded after it. The "
            f"bridge will not start on it; the -wal file was not changed. Keep copies of "
            f"{self.path}, {wal} and {shm}. Then move the three files aside (keep them), "
            "restart the bridge to begin a new journal, and check the payments of the last "
            "minutes on the terminals; or restore the journal from a backup")

    def _close_keeping_wal(self) -> None:
        """Close the connection without SQLite's checkpoint-and-delete of the -wal, which
        the last connection to close does: a read-only one keeps the WAL open meanwhile (the
        closing one then cannot lock the database to checkpoint), and a read-only one never
        checkpoints nor deletes it when it closes in turn."""
        try:
            keeper = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                     isolation_level=None, check_same_thread=False)
            keeper.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error:
            _KEPT_OPEN.append(self._db)  # never closed: the process's end keeps the -wal
            self._db = sqlite3.connect(":memory:")  # (what _open's close() then closes)
            self._db.close()
            return
        self._db.close()
        keeper.close()

    def _check_existing(self, *, readonly: bool = False) -> None:
        (result,) = self._db.execute("PRAGMA quick_check").fetchone()
        if result != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {result}")
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master")}
        if not tables and not readonly:
            # (an SQLite file with nothing in it holds no payment: a first start cut short)
            log.info("journal %s: holds no table yet (its first start was cut short): set up "
                     "as a new one", self.path)
            return
        if "transactions" not in tables or "meta" not in tables:
            raise sqlite3.DatabaseError("this SQLite file is not a poi-bridge journal")
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None and not readonly and {"outbox"} <= tables and not any(
                self._db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()  # noqa: S608
                for table in ("transactions", "outbox")):
            # An earlier version's first start cut short between its schema's commits:
            # nothing recorded, its schema_version is written now
            return
        if row is None:
            raise sqlite3.DatabaseError("the journal has no schema_version")
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            raise sqlite3.DatabaseError(
                f"the journal's schema_version {row[0]!r} is not a number") from None
        if version > SCHEMA_VERSION:
            # Sound, and it may hold open payments: moved aside for a new journal, their
            # answers would be dropped and a register's retry sent to the terminal again.
            raise JournalError(
                f"journal {self.path} was written by a newer poi-bridge (schema version "
                f"{version}; this bridge, {__version__}, knows up to {SCHEMA_VERSION}). It "
                "is left as it is: run the bridge version that wrote it (the one installed "
                "before this one) or a newer one. Do not move it aside nor replace it: it "
                "may hold payments no register has heard of yet, which a new journal would "
                "not know")

    def _add_missing_columns(self) -> None:
        """Columns added since schema version 1, nullable: a journal of an older bridge gains
        them, and an older bridge still opens this one (it names the columns it uses)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        if "correlation" not in have:  # an MQTT 5 answer's CorrelationData, for a restart
            self._db.execute("ALTER TABLE outbox ADD COLUMN correlation BLOB")

    def start_checkpoints(self, interval: float = CHECKPOINT_INTERVAL) -> None:
        """Checkpoint the WAL every `interval` s from a background thread with its own
        connection (PASSIVE: it never waits for, nor blocks, the daemon's commits)."""
        if self._checkpoints is not None:
            return
        stop = threading.Event()
        thread = threading.Thread(target=self._checkpoint_loop, args=(stop, interval),
                                  name="journal checkpoints", daemon=True)
        self._checkpoints = (stop, thread)
        thread.start()

    def _checkpoint_loop(self, stop: threading.Event, interval: float) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            # A read opens the -wal now, while _watch can still tell it is the journal's
            db.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
            while not stop.wait(interval):
                # Before the checkpoint: one into files no longer named is of no use
                gone = self._watch()
                if gone is not None:
                    self._lost(db, gone)
                    return
                self._checkpoint(db)
        finally:
            db.close()

    @property
    def _wal_path(self) -> Path:
        return journal_files(self.path)[1]

    def _watch(self) -> str | None:
        """What became of the journal's files, if its path no longer names the database
        file or the -wal this process writes: removed (by a cleanup, a technician), renamed
        or replaced while the daemon ran. Commits then went on into files no later start
        reads, and SQLite says nothing of it. Two fstat and two stat calls, once a round of
        the checkpoint thread (1 s). None when they are still the journal's, or when it
        cannot be told (a path this process may no longer look up: not taken for gone)."""
        for fd, path, what in ((self._db_fd, self.path, f"journal {self.path}"),
                               (self._wal_fd, self._wal_path,
                                f"the write-ahead log {self._wal_path} of journal {self.path}")):
            if fd is None:
                continue
            held = os.fstat(fd)
            try:
                named = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                named = None
            except OSError:
                continue
            if held.st_nlink == 0 or named is None:
                return f"{what} was removed (or renamed) while the bridge ran"
            if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
                return f"{what} was replaced by another file while the bridge ran"
        return None

    def _lost(self, db: sqlite3.Connection, gone: str) -> None:
        """The journal's files are gone from its path (_watch): save what they hold beside
        it, say what to do, and stop the daemon (on_failure, JournalGone). Called from the
        checkpoint thread, with its connection, which still reads the lost files through its
        own descriptors. First no commit may follow (_lost_event, under the commit gate: a
        COMMIT under way ends first), so the copy holds every record the daemon acted on (a
        review: one taken while the loop went on committing missed 71 commits whose frames
        had gone out). Before the copy, a marker `<journal>.lost-<time>`: a stop or power
        cut during the copy must not let the next start go on with what is at the path."""
        self._lost_event.set()
        with self._commit_gate:
            pass
        # A disk dying under the copy may hang it: the daemon, which takes no write now,
        # must not stay up for as long as it hangs (its other failures are not reported
        # meanwhile, see _failed)
        overdue = threading.Timer(LOST_COPY_LIMIT, self._copy_overdue, args=(gone,))
        overdue.daemon = True
        overdue.start()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        marker = self.path.with_name(f"{self.path.name}.lost-{stamp}")
        copy = self.path.with_name(f"{self.path.name}.recovered-{stamp}")
        try:
            make_directory(self.path.parent)  # (it may have gone with the files)
            write_new(marker, f"{gone}\n".encode())
        except OSError as exc:
            log.critical("journal %s: cannot write the marker %s (%s) that keeps the bridge "
                         "from starting on what is at the path", self.path, marker, exc)
        try:
            self._save_copy(db, copy)
        except (OSError, sqlite3.Error) as exc:
            saved = (f"What it held could not be saved to {copy} ({exc}): the records written "
                     f"since the last checkpoint are lost with this process; check the "
                     f"payments of the last minutes on the terminals. Move aside what is at "
                     f"{self.path} now with its -wal and -shm files (keep them), then remove "
                     f"{marker} and start the bridge: it begins a new journal")
        else:
            saved = (f"What it held is saved in {copy}. Keep the bridge stopped, move aside "
                     f"whatever is at {self.path} now with its -wal and -shm files (keep "
                     f"them), put the copy back as the journal (mv {copy} {self.path}), remove "
                     f"{marker}, then start the bridge (systemctl start poi-bridge): it takes "
                     "up the open payments from it")
        log.critical("%s: the payments recorded since would not be read by the next start "
                     "(their answers dropped, a register's retry sent to the terminal again). "
                     "%s. The bridge stops now, and systemd does not start it again.", gone, saved)
        overdue.cancel()
        self._failed(JournalGone(f"{gone}; {saved}"))

    def _copy_overdue(self, gone: str) -> None:
        log.critical("%s, and saving what it held has taken over %.0f s (a disk that no longer "
                     "answers?): the bridge stops without it. Check the disk (dmesg), and the "
                     "payments of the last minutes on the terminals", gone, LOST_COPY_LIMIT)
        self._failed(JournalGone(f"{gone}; saving what it held did not finish"))

    def _unmake(self, created: bool) -> None:
        """A start refused leaves the database file missing if it found it so (hold_lock
        made it, to lock it)."""
        if created:
            with contextlib.suppress(OSError):
                os.unlink(os.path.realpath(self.path))

    def _refuse_beside_recovered(self) -> None:
        """No start while a marker of a lost journal (_lost) is there: the copy saved with
        it is the journal's only whole record, and a start on what is at the path (a new
        journal, or the database without its lost -wal) would take a register's repeat of a
        payment the copy holds for a new one."""
        markers = sorted(self.path.parent.glob(f"{glob_escape(self.path.name)}.lost-*"))
        if not markers:
            return
        copies = [copy for copy in sorted(
            self.path.parent.glob(f"{glob_escape(self.path.name)}.recovered-*"))
            if not copy.name.endswith(("-journal", "-wal", "-shm"))]
        put_back = (f"put the newest copy back as the journal (mv {copies[-1]} {self.path}), "
                    if copies else "check the payments of that stop's last minutes on the "
                    "terminals (no copy could be saved), ")
        raise JournalError(
            f"journal {self.path}: the journal was removed or replaced while the bridge ran "
            f"({', '.join(map(str, markers))}; see the log of that stop). The bridge will not "
            f"start on what is at {self.path} now, which may lack payments it recorded. Move "
            f"that aside with its -wal and -shm files (keep them), {put_back}then remove "
            f"{' '.join(map(str, markers))} and start the bridge")

    @staticmethod
    def _save_copy(db: sqlite3.Connection, copy: Path) -> None:
        """A copy of what `db` reads, committed records only, into the new file `copy`.
        Safe: `db` reads through the descriptors this process holds (the files need no
        name), in one read transaction, so the copy is one consistent state; it is written
        under another name (`.saving-`, mode 0600: it holds the terminals' answers) and
        renamed once whole, so that a copy cut short is never taken for one; never the
        journal's path, which may name another file now; and no descriptor of the journal's
        files is closed (that would drop SQLite's locks on them)."""
        saving = copy.with_name(copy.name.replace(".recovered-", ".saving-"))
        os.close(os.open(saving, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        try:
            target = sqlite3.connect(saving)
            try:
                db.backup(target)
            finally:
                target.close()
            os.rename(saving, copy)
            fsync_directory(copy.parent)
        except BaseException:
            with contextlib.suppress(OSError):  # a half copy is not to be taken for one
                os.unlink(saving)
            raise

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        """One round of the checkpoint thread, on its own connection: copy the WAL into the
        database file, and if the WAL has grown past wal_reset_bytes, ask for _reset_wal."""
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # the next round tries again; commits go on
            # Once per kind of failure, not every second: a full disk otherwise buried the
            # log in identical lines without saying what to do.
            if str(exc) != self._checkpoint_failure:
                self._checkpoint_failure = str(exc)
                log.warning("journal %s: WAL checkpoint failed: %s. Payments still go on while "
                            "the disk takes the journal's own writes; check the free space "
                            "and the disk (df -h %s; dmesg). Said once until it changes",
                            self.path, exc, self.path.parent)
            return
        if self._checkpoint_failure is not None:
            log.info("journal %s: WAL checkpoints work again", self.path)
            self._checkpoint_failure = None
        try:
            size = os.path.getsize(f"{self.path}-wal")
        except OSError:
            return
        if size > self.wal_reset_bytes:
            self._wal_reset_wanted = True

    def _reset_wal(self) -> None:
        """SQLite starts the WAL over (and journal_size_limit cuts the file back) only when a
        write begins while every frame has been copied into the database file. Under load
        without a pause, a commit always lands while the checkpoint thread copies: the WAL
        then grew without end, 10-12 MB a second at 64 terminals unpaced. So once it is too
        big, the daemon's own connection copies the last frames right after a commit, and
        its next write starts the file over. Its cost on the loop: copying the frames of the
        last few milliseconds, once per wal_reset_bytes written."""
        if not self._wal_reset_wanted:
            return
        self._wal_reset_wanted = False
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("journal %s: WAL checkpoint failed: %s", self.path, exc)

    def close(self) -> None:
        if self._checkpoints is not None:
            stop, thread = self._checkpoints
            stop.set()
            # (a copy of a lost journal under way is its only whole record: given the most
            # of the unit's TimeoutStopSec=30, not cut short at 10 s)
            thread.join(timeout=25 if self._lost_event.is_set() else 10)
            self._checkpoints = None
            if thread.is_alive():  # its connection is still open: see _release_lock
                log.warning("journal %s: the checkpoint thread did not end", self.path)
                # kept open (and locked) until the process ends: its _watch still reads them
                self._db_fd = self._wal_fd = None
        self.commit()  # what the last pass wrote
        self._slow_commits.flush()
        self._db.close()  # the last connection to close checkpoints what is left
        self._release_lock()

    def _release_lock(self) -> None:
        """Only once no SQLite connection of this process has the database open: closing a
        descriptor of it drops every POSIX lock of the process on it, SQLite's too."""
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        if self._db_fd is not None:
            os.close(self._db_fd)
            self._db_fd = None
        if self._lock is not None:
            os.close(self._lock)  # (the lock goes with it; the file stays, for the next)
            self._lock = None

    # --- commits ------------------------------------------------------------------------------

    def group_commits(self, schedule: Callable[[Callable[[], None]], object]) -> None:
        """From now on, commit once per event-loop pass: the first write of a pass opens a
        transaction and `schedule`s (loop.call_soon) its commit, which runs after every step
        of the pass. Under load, the steps of many terminals and registers share one commit
        and one fsync (a step alone: 230 us of CPU and 340 us of wall time on this project's
        VM; in a group of 16: 80 and 80). Whatever depends on the writes must go through
        after_commit()."""
        self._schedule = schedule

    @property
    def lost(self) -> bool:
        """The journal's files are gone from its path: it is saving what it holds, and then
        stops the daemon itself (_lost)."""
        return self._lost_event.is_set()

    @property
    def commit_pending(self) -> bool:
        """Whether writes of this pass wait for their commit (see after_commit). Always,
        once the journal is lost (_lost): nothing may go out on what it could not record."""
        return self._group_open or self._lost_event.is_set()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once everything written so far is durable: at once when nothing
        waits for a commit, otherwise right after the pass's commit, in the order given.
        Never once the journal is lost: a pass rolled back there left its ACK or frame in
        the framer, and a later kick would have sent it with no record of it (a review)."""
        if self._lost_event.is_set():
            return
        if self._group_open:
            self._after.append(callback)
        else:
            callback()

    def on_outbox_committed(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every commit that made new outbox messages durable, once
        the commit's after_commit() callbacks (frames to terminals) have run: the MQTT
        side publishes them there and then."""
        self._outbox_listener = listener

    def on_failure(self, listener: Callable[[BaseException], None]) -> None:
        """Call `listener` when, in grouped mode, a write or a commit fails with an SQLite
        error (disk full, I/O error). The step that wrote has already decided in memory
        (a result handled, a frame queued); its record is lost and what depends on it is not
        done, so nothing the daemon does after it can be trusted to be recorded."""
        self._failure_listener = listener

    def _failed(self, exc: BaseException) -> None:
        if self._lost_event.is_set() and not isinstance(exc, JournalGone):
            # (the writes refused since the loss: the checkpoint thread stops the daemon
            # once its copy is saved, which a stop now would cut short)
            log.debug("journal %s: %r while the journal's files are being saved", self.path,
                      exc)
            return
        if self._failure_listener is not None:
            self._failure_listener(exc)

    def _refuse_writes_once_lost(self) -> None:
        if self._lost_event.is_set():
            raise JournalGone(f"journal {self.path} is gone from its path: the bridge is "
                              "saving what it holds, and stops")

    def step_failed(self, exc: BaseException, where: str) -> None:
        """A step failed half-way for a reason of its own (not SQLite's): the journal took
        its records back, but the state in memory that made them (a terminal's session) has
        moved on, and nothing the daemon does from it can be trusted to be recorded, as
        after a failed write. Reported to `on_failure` likewise."""
        log.critical("journal %s: a step of %s failed half-way (%r); its records were taken "
                     "back, but the state in memory had moved on", self.path, where, exc)
        self._failed(StepFailed(f"a step of {where} failed half-way: {exc!r}"))

    def read_failed(self, exc: sqlite3.Error) -> None:
        """A read the daemon depends on failed (I/O error, a damaged file): whatever it would
        have decided from it cannot be trusted, as after a failed write. Reported to
        `on_failure` likewise."""
        log.critical("journal %s: a read failed: %s; check the disk", self.path, exc)
        self._failed(exc)

    def _committed(self, before: int) -> None:
        """What follows every commit, grouped or not, once its own actions have run:
        announce the outbox messages it made durable (the newest was `before`), then start
        the WAL over if the checkpoint thread asked for it."""
        if self._durable_outbox_id > before and self._outbox_listener is not None:
            try:
                self._outbox_listener()
            except Exception:
                log.exception("journal %s: publishing after the commit failed", self.path)
        self._reset_wal()

    def commit(self) -> None:
        """Commit the pass's transaction, then run what waited for it. A failed commit (disk
        full, I/O error) loses the pass's writes; nothing that depended on them is done."""
        self._response_text = None
        if not self._group_open:
            return
        callbacks, self._after = self._after, []
        self._group_open = False
        started = time.monotonic()
        try:
            if not self._commit_unless_lost():  # (_lost: the daemon stops, nothing is done)
                return
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._last_outbox_id = self._durable_outbox_id
            log.critical("journal %s: commit failed: %s; the last %d action(s) that depended "
                         "on it are not done (frames not sent, requests not acknowledged): "
                         "check the disk", self.path, exc, len(callbacks))
            self._failed(exc)
            return
        self._timed(started)
        before, self._durable_outbox_id = self._durable_outbox_id, self._last_outbox_id
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one failing action must not keep the others from running
                log.exception("journal %s: an action after the commit failed", self.path)
        self._committed(before)

    def _commit_unless_lost(self) -> bool:
        """COMMIT the open transaction, or, once the journal is lost (_lost), roll it back:
        False then. Under the gate, so that _lost's copy waits for a COMMIT under way."""
        with self._commit_gate:
            if self._lost_event.is_set():
                self._db.execute("ROLLBACK")
                self._last_outbox_id = self._durable_outbox_id
                return False
            self._db.execute("COMMIT")
            return True

    def _timed(self, started: float) -> None:
        took = time.monotonic() - started
        if took >= SLOW_COMMIT and self._slow_commits.tell("slow", took):
            log.warning("journal %s: a commit took %.1f s: everything waits for the journal's "
                        "disk meanwhile (payments, terminals' acknowledgements, the broker). "
                        "Check that disk: an SD card or eMMC wearing out, a failing disk "
                        "(dmesg), or another program writing heavily (iotop)",
                        self.path, took)

    def _slow_commits_summed(self, key: Any, count: int, last: Any, interval: float) -> None:
        log.warning("journal %s: %d more commit%s of %.0f s or more in the last %s (the last "
                    "%.1f s): check the journal's disk", self.path, count,
                    "" if count == 1 else "s", SLOW_COMMIT, quiet_window(interval), last)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._depth:  # inside batch(): the outermost one commits
            yield self._db
            return
        if self._schedule is not None:
            yield from self._grouped()
            return
        self._refuse_writes_once_lost()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            self._last_outbox_id = self._durable_outbox_id
            raise
        started = time.monotonic()
        if not self._commit_unless_lost():
            self._refuse_writes_once_lost()
        self._timed(started)
        self._response_text = None
        before, self._durable_outbox_id = self._durable_outbox_id, self._last_outbox_id
        self._committed(before)

    def _grouped(self) -> Iterator[sqlite3.Connection]:
        """One unit of writes inside the pass's transaction, as a savepoint: a unit that fails
        takes back its own writes only."""
        self._refuse_writes_once_lost()
        try:
            if not self._group_open:
                self._db.execute("BEGIN IMMEDIATE")  # waits busy_timeout for another writer
                self._group_open = True
                assert self._schedule is not None
                self._schedule(self.commit)
            self._db.execute("SAVEPOINT unit")
        except sqlite3.Error as exc:
            log.critical("journal %s: cannot begin a write: %s", self.path, exc)
            self._failed(exc)
            raise
        outbox_before = self._last_outbox_id
        try:
            yield self._db
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK TO unit")
                self._db.execute("RELEASE unit")
                self._last_outbox_id = outbox_before  # those ids may be given out again
            else:  # SQLite rolled the whole pass back, as it may on a full disk or I/O error
                self._abandon_pass()
            if isinstance(exc, sqlite3.Error):
                log.critical("journal %s: a write failed: %s; check the disk", self.path, exc)
                self._failed(exc)
            raise
        self._db.execute("RELEASE unit")

    def _abandon_pass(self) -> None:
        lost, self._after = self._after, []
        self._group_open = False  # the pass's commit, when it comes, finds nothing to do
        self._last_outbox_id = self._durable_outbox_id
        log.critical("journal %s: SQLite gave up the pass's transaction; the %d action(s) "
                     "that depended on it are not done", self.path, len(lost))

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Every save() and enqueue() inside commits as one unit: all or nothing, and one
        fsync for all the records and messages of a step instead of one each. What depends
        on them goes through after_commit() (the worker's frames do)."""
        with self._transaction():
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1

    # --- transactions -----------------------------------------------------------------------

    def _row(self, txn: Transaction) -> tuple[Any, ...]:
        values = []
        for column in _COLUMNS:
            value = getattr(txn, column)
            if column == "request":
                value = self._request_text(txn)
            elif column == "response" and value:
                value = self.response_text(value)
            elif column in _JSON_COLUMNS:
                if value is None:
                    pass
                elif not value:  # most transactions: no polls, nothing extra
                    value = "{}" if column == "extra" else "[]"
                else:
                    value = _dumps(list(value) if column == "poll_ids" else value)
            elif column == "state":
                value = str(value)
            elif column == "passthrough":
                value = int(value)
            values.append(value)
        return tuple(values)

    @staticmethod
    def _from_row(row: sqlite3.Row | tuple[Any, ...]) -> Transaction:
        data = dict(zip(_COLUMNS, row, strict=True))
        try:
            for column in _JSON_COLUMNS:
                if data[column] is not None:
                    data[column] = json.loads(data[column])
            data["poll_ids"] = tuple(data["poll_ids"])
            data["state"] = TxState(data["state"])
            data["passthrough"] = bool(data["passthrough"])
            return Transaction(**data)
        except (ValueError, TypeError) as exc:
            # SQLite checks no cell's contents (quick_check passes a damaged byte): the
            # journal's own failure, for its stop with its words, not a traceback
            raise sqlite3.DatabaseError(
                f"the record of transaction {data['sale_id']}/{data['service_id']} is "
                f"damaged ({exc})") from exc

    def _request_text(self, txn: Transaction) -> str:
        """The request never changes over a transaction's life, but is saved with every state:
        serialise it once while the transaction is open (snapshots share the same dict)."""
        cached = self._requests.get(txn.key)
        if cached is not None and cached[0] is txn.request:
            text = cached[1]
        else:
            text = _dumps(txn.request)
        if txn.state is TxState.FINAL:
            self._requests.pop(txn.key, None)
        else:
            self._requests[txn.key] = (txn.request, text)
        return text

    def response_text(self, response: dict[str, Any]) -> str:
        """`response` as the journal stores it (compact JSON), encoded once for the step that
        saves a result and publishes it: a terminal's answer can be 11 KB. Remembered for
        the same dict object only, until the next commit (nothing changes a result's
        document within a step)."""
        memo = self._response_text
        if memo is not None and memo[0] is response:
            return memo[1]
        text = _dumps(response)
        self._response_text = (response, text)
        return text

    def save(self, txn: Transaction, outbox: list[tuple[str, bytes, int, bool]] = ()) -> list[int]:
        """Commit a transaction's state, with the messages it owes registers, atomically."""
        with self._transaction() as db:
            db.execute(_UPSERT, self._row(txn))
            return [self._enqueue(db, *message) for message in outbox]

    def get(self, key: TxKey) -> Transaction | None:
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM transactions WHERE sale_id = ? AND service_id = ?",
            (key.sale_id, key.service_id),
        ).fetchone()
        return None if row is None else self._from_row(row)

    def stamped_by_earlier_run(self, key: TxKey, column: str, value: float | None) -> bool:
        """Whether `value` is the `column` stamp an earlier run wrote for `key` (see
        shift_times): a time a clock step of this run must not move."""
        if value is None or column not in STAMP_FIELDS:
            return False
        row = self._db.execute(
            f"SELECT 1 FROM temp.earlier_stamps WHERE sale_id = ? AND service_id = ? "  # noqa: S608
            f"AND {column} = ?", (key.sale_id, key.service_id, value)).fetchone()
        return row is not None

    def last_requests_sent(self, poi_id: str) -> dict[str, float]:
        """category -> when a request of it last went to terminal `poi_id`, of those kept
        that may have reached it: one the terminal answered NotFound about (believed: it
        never got it) does not count (TerminalSession._never_reached)."""
        rows = self._db.execute(
            "SELECT category, MAX(sent_at) FROM transactions WHERE poi_id = ? AND passthrough = 0"
            " AND sent_at IS NOT NULL AND outcome IS NOT 'not_found' GROUP BY category",
            (poi_id,))
        return {category: at for category, at in rows}

    def open_transactions(self, poi_id: str | None = None) -> list[Transaction]:
        query = f"SELECT {', '.join(_COLUMNS)} FROM transactions WHERE state != 'final'"
        params: tuple[Any, ...] = ()
        if poi_id is not None:
            query += " AND poi_id = ?"
            params = (poi_id,)
        return [self._from_row(r) for r in self._db.execute(query + " ORDER BY created_at", params)]

    def open_payments(self, sale_id: str, transaction_id: str) -> list[Transaction]:
        """The Payments of `sale_id` not final (held unsent, sent, polled, unresolved, given
        up on) whose request names SaleTransactionID.TransactionID `transaction_id`. Asked
        for every payment request: the partial index transactions_open_sale reads only the
        SaleID's open transactions (a few microseconds, however many finished ones the
        journal keeps; by the SaleID's primary key it read them all, 5.6 ms at 10 000)."""
        rows = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM transactions INDEXED BY transactions_open_sale "
            "WHERE sale_id = ? AND state != 'final' AND category = 'Payment' AND json_extract("
            "request, '$.SaleToPOIRequest.PaymentRequest.SaleData.SaleTransactionID."
            "TransactionID') = ? ORDER BY created_at", (sale_id, transaction_id))
        return [self._from_row(r) for r in rows]

    def transactions(
        self, *, state: str | None = None, poi_id: str | None = None, sale_id: str | None = None,
        outcome: str | None = None, limit: int = 100,
    ) -> list[Transaction]:
        clauses, params = [], []
        for column, value in (("state", state), ("poi_id", poi_id), ("sale_id", sale_id),
                              ("outcome", outcome)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM transactions{where} "
            "ORDER BY created_at DESC LIMIT ?", (*params, limit),
        )
        return [self._from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        in_flight, unresolved = self._db.execute(
            "SELECT COALESCE(SUM(state IN ('accepted', 'awaiting_response', 'polling')), 0), "
            "COALESCE(SUM(state = 'unresolved'), 0) FROM transactions WHERE state != 'final'"
        ).fetchone()
        (undelivered,) = self._db.execute(
            "SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL").fetchone()
        return {"in_flight": in_flight, "unresolved": unresolved, "undelivered": undelivered}

    # --- outbox -------------------------------------------------------------------------------

    def _enqueue(self, db: sqlite3.Connection, topic: str, payload: bytes, qos: int,
                 retain: bool, correlation: bytes | None = None) -> int:
        cursor = db.execute(
            "INSERT INTO outbox (topic, payload, qos, retain, created_at, correlation) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (topic, payload, qos, int(retain), time.time(), correlation),
        )
        self._last_outbox_id = int(cursor.lastrowid)
        return self._last_outbox_id

    def enqueue(self, messages: list[tuple[str, bytes, int, bool]]
                | list[tuple[str, bytes, int, bool, bytes | None]]) -> list[int]:
        """Messages (topic, payload, qos, retain[, correlation data]) to publish once durable."""
        with self._transaction() as db:
            return [self._enqueue(db, *message) for message in messages]

    def pending(self, limit: int = 1000, after_id: int = 0) -> list[OutboxMessage]:
        """Undelivered messages, oldest first, committed ones only: a message is published
        only once it would survive a crash."""
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, retain, correlation FROM outbox "
            "WHERE delivered_at IS NULL AND id > ? AND id <= ? ORDER BY id LIMIT ?",
            (after_id, self._durable_outbox_id, limit),
        )
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4]),
                              None if r[5] is None else bytes(r[5])) for r in rows]

    def mark_delivered(self, message_ids: list[int]) -> None:
        """No fsync of its own: a mark lost to a power cut only makes the message go out once
        more (registers already accept repeats); the next durable commit carries it anyway."""
        if not message_ids:
            return
        now = time.time()
        marks = [(now, i) for i in message_ids]
        if self._group_open or self._depth:  # rides on the commit that is coming anyway
            with self._transaction() as db:
                db.executemany("UPDATE outbox SET delivered_at = ? WHERE id = ?", marks)
            return
        self._refuse_writes_once_lost()
        self._db.execute("PRAGMA synchronous=NORMAL")  # not inside a transaction: SQLite says so
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("UPDATE outbox SET delivered_at = ? WHERE id = ?", marks)
                if not self._commit_unless_lost():
                    return
            except BaseException:
                if self._db.in_transaction:  # (SQLite may have rolled back already)
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:  # harmless on its own: the messages go out once more
            log.warning("journal %s: %d message(s) the broker acknowledged are not marked "
                        "delivered (%s): they will be published again; if this repeats, check "
                        "the disk", self.path, len(marks), exc)
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def last_delivered_at(self) -> float | None:
        """When the broker last acknowledged one of the messages kept, or None."""
        (at,) = self._db.execute("SELECT MAX(delivered_at) FROM outbox").fetchone()
        return at

    def note_connecting(self) -> bool:
        """Before a CONNECT to the broker: on the disk before it leaves, that a connection's
        answer is yet to be checked (cleared by note_connected, in the same commit as what
        the check wrote). The CONNECT itself makes the broker a session for the bridge's
        client id: a daemon killed between a CONNACK that showed the broker's state lost and
        the commit of journal.redeliver would find, at its next start, a session present and
        nothing to publish again, the retained documents and the results the broker lost
        gone for good. The next start sees this row instead (session_check_left). Written
        once, not at each retry of an outage. False when it could not be committed (the
        failure stops the daemon): then no CONNECT may go out."""
        if self._session_check_noted:
            return True
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('session_check', ?)",
                       (repr(time.time()),))
        self.commit()  # (inside the daemon's grouped pass: made durable now, not later)
        # (a commit that failed rolled the row back, and said so; one that worked may have
        # begun the next pass already, in an after_commit action that writes: the row is
        # there all the same)
        self._session_check_noted = self._session_check_row()
        return self._session_check_noted

    def _session_check_row(self) -> bool:
        return self._db.execute(
            "SELECT 1 FROM meta WHERE key = 'session_check'").fetchone() is not None

    def note_connect_refused(self) -> None:
        """The broker refused the connection (a CONNACK with an error code): it made no
        session, so no check is left to a later connection or start (a login refused,
        fixed and restarted, republished an hour of results: review rev8)."""
        with self._transaction() as db:
            db.execute("DELETE FROM meta WHERE key = 'session_check'")
        self._session_check_noted = False

    def note_connected(self) -> None:
        """The bridge is connected to the broker now, and the broker's answer checked: the
        last time it was, for the next start (an MQTT 5 session expires counted from the
        bridge's disconnect, not from the last message the broker took). One row, rewritten."""
        with self._transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('last_connected', ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                       (repr(time.time()),))
            db.execute("DELETE FROM meta WHERE key = 'session_check'")
        self._session_check_noted = False

    def last_connected_at(self) -> float | None:
        """When the bridge was last noted connected to the broker (note_connected), or None
        (never, or a journal of a bridge that did not note it)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'last_connected'").fetchone()
        try:
            return None if row is None else float(row[0])
        except ValueError:  # (not the journal's own writing: as if never noted)
            return None

    def redeliver(self, documents: str, responses: str, since: float, limit: int) -> int:
        """Mark pending again, for a broker that lost what it had acknowledged: the newest
        message of each retained topic under the prefix `documents` (unless it clears the
        topic), and the messages on topics `responses`<anything>/response delivered at
        `since` or later; the newest `limit` of those at most. Returns how many (from
        changes(): sqlite3's rowcount is -1 for a statement that starts with WITH)."""
        with self._transaction() as db:
            db.execute(
                "WITH latest AS (SELECT MAX(id) AS id FROM outbox "
                "  WHERE substr(topic, 1, ?1) = ?2 GROUP BY topic) "
                "UPDATE outbox SET delivered_at = NULL WHERE id IN ("
                "  SELECT id FROM outbox WHERE delivered_at IS NOT NULL AND ("
                "    (retain = 1 AND length(payload) > 0 AND id IN (SELECT id FROM latest))"
                "    OR (retain = 0 AND delivered_at >= ?3 AND substr(topic, 1, ?4) = ?5"
                "        AND substr(topic, -9) = '/response'))"
                "  ORDER BY id DESC LIMIT ?6)",
                (len(documents), documents, since, len(responses), responses, limit))
            return db.execute("SELECT changes()").fetchone()[0]

    def shift_times(self, delta: float, since: float, until: float) -> int:
        """Move by `delta` the times this run wrote, after its clock moved to follow a step
        of the system clock: every stamp but those an earlier run wrote (as they were when
        this journal was opened), and every deadline of an open transaction (this run holds
        them all since it started). Returns the rows changed. Each stamp of this run is from
        `since` (the run's start on its clock) to `until` (now): only those are looked up
        among the earlier run's, not the 48 hours of rows kept (seconds on the loop)."""
        changed = 0
        with self._transaction() as db:
            for column in STAMP_FIELDS:  # (Transaction.shift_times moves the same)
                changed += db.execute(
                    f"UPDATE transactions SET {column} = {column} + ? "  # noqa: S608
                    f"WHERE {column} BETWEEN ? AND ? AND NOT EXISTS (SELECT 1 FROM "
                    f"temp.earlier_stamps AS e WHERE e.sale_id = transactions.sale_id AND "
                    f"e.service_id = transactions.service_id AND e.{column} = "
                    f"transactions.{column})", (delta, since, until)).rowcount
            for column in DEADLINE_FIELDS:
                changed += db.execute(
                    f"UPDATE transactions SET {column} = {column} + ? "  # noqa: S608
                    f"WHERE state != 'final' AND {column} IS NOT NULL", (delta,)).rowcount
        return changed

    def prune(self, older_than: float, limit: int = -1,
              retained: Callable[[TxKey], str] | None = None) -> int:
        """Forget delivered messages and final transactions last touched before `older_than`,
        at most `limit` of each (-1: all), in one step. `retained`: a transaction's retained
        topic, cleared (an empty retained message queued) in the step that forgets it, so
        that no transaction is forgotten with its document left on the broker; the
        documents of an open transaction are kept however old, for redeliver (an unresolved
        one stays open for days: a broker that lost its state must get its document back).
        A transaction is forgotten only if it ended before the oldest message still waiting
        was written (UNDELIVERED_MARGIN before): while its result has not reached the broker
        (out of reach, or refusing it, for longer than the retention) it must stay known,
        for `resync` and to tell a register's repeat from a new payment.
        Returns the rows removed; fewer than `limit` of each: nothing older is left."""
        with self._transaction() as db:
            ended_before = older_than
            waiting = db.execute("SELECT created_at FROM outbox WHERE delivered_at IS NULL "
                                 "ORDER BY id LIMIT 1").fetchone()
            if waiting is not None:
                ended_before = min(older_than, waiting[0] - UNDELIVERED_MARGIN)
            open_documents = "[]" if retained is None else _dumps([
                retained(TxKey(*key)) for key in db.execute(
                    "SELECT sale_id, service_id FROM transactions WHERE state != 'final'")])
            removed = db.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE delivered_at IS "
                "NOT NULL AND delivered_at < ? AND NOT (retain = 1 AND topic IN (SELECT value "
                "FROM json_each(?))) LIMIT ?)", (older_than, open_documents, limit)).rowcount
            keys = db.execute(
                "SELECT sale_id, service_id FROM transactions WHERE state = 'final' AND "
                "updated_at < ? LIMIT ?", (ended_before, limit)).fetchall()
            if retained is not None:
                for key in keys:
                    self._enqueue(db, retained(TxKey(*key)), b"", 1, True)
            db.executemany("DELETE FROM transactions WHERE sale_id = ? AND service_id = ?",
                           keys)
        return removed + len(keys)

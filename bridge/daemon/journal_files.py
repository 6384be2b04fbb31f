"""The journal's files on disk, apart from what SQLite keeps in them: where they are, the locks
that keep a second daemon off them (hold_lock), the directory made for them, and what a
technician is told when they cannot be opened or written (unusable, open_failure).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pwd
import sqlite3
import stat
from pathlib import Path

from bridge.config import STATE_DIRECTORY

log = logging.getLogger("poi_bridge.journal")  # (the journal's own: technicians grep for it)


class JournalError(Exception):
    """The journal cannot be used; the text says what a technician should do."""


def unusable(path: Path, exc: sqlite3.Error) -> str:
    """What a technician should do about a journal SQLite refused. Only a damaged file is
    moved aside; a full disk or a permission problem leaves the journal as it is, since it
    may hold the only record of a payment a register has not heard of yet."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")) and _read_only_mount(path.parent):
        return _mounted_read_only(path, exc)
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        not_ours = not_writable(path)
        if not_ours is not None:
            return not_ours
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        # Not this bridge's daemon (its own lock file tells of that one, see hold_lock):
        # a technician's sqlite3 shell in a transaction, a backup tool, a copy of the bridge
        # pointed at another lock file. Free space and permissions have nothing to do with it.
        return (f"journal {path} is locked by another process ({exc}, {name}): it holds the "
                f"database locked for longer than the bridge waits. Find it with fuser -v "
                f"{path} {path}-wal {path}-shm (or lsof {path}), end it (an sqlite3 shell: "
                "COMMIT or ROLLBACK, then .quit), then restart the bridge. The journal is left "
                "as it is: do not delete it, nor its -wal and -shm files")
    if name and not name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return (f"journal {path} cannot be used ({exc}, {name}). It is left as it is: check "
                f"the free space and the permissions where it lives (df -h {path.parent}; "
                f"ls -l {path.parent}), then restart the bridge.")
    return (f"journal {path} is unreadable or corrupt ({exc}). It may hold payments not yet "
            "reported: the bridge will not overwrite it. Move it aside, keep it for "
            "inspection, and restart to begin a new journal.")


def _mounted_read_only(path: Path, exc: BaseException) -> str:
    disk = ("look at the kernel log (dmesg), check the disk (fsck, from a rescue system if "
            "it is the root file system), remount it read-write or replace it, then restart "
            "the bridge.")
    sandboxed = os.environ.get("INVOCATION_ID") is not None
    if sandboxed or not path.absolute().is_relative_to(STATE_DIRECTORY):
        # ProtectSystem=strict mounts everything but StateDirectory= read-only for the
        # service: by far the likelier reason than a disk the kernel gave up on.
        return (f"journal {path} cannot be written ({exc}): {path.parent} is read-only for "
                f"this process. Under poi-bridge.service that is the unit's "
                f"ProtectSystem=strict, which leaves only {STATE_DIRECTORY} writable: move "
                f"the journal into {STATE_DIRECTORY} (journal = "
                f"\"{STATE_DIRECTORY / 'journal.sqlite3'}\"), or allow its directory in a "
                f"drop-in (`systemctl edit poi-bridge`, [Service] ReadWritePaths={path.parent}), "
                f"then restart the bridge. It is left as it is. Otherwise the file system was "
                f"mounted read-only, as the kernel does after disk errors: {disk}")
    return (f"journal {path} cannot be written ({exc}): {path.parent} is on a file system "
            f"mounted read-only, as the kernel does after disk errors. It is left as it "
            f"is: {disk}")


def _read_only_mount(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def lock_path(path: Path) -> Path:
    """The file a daemon holds locked while it has the journal open (see hold_lock): beside
    the file itself, wherever symbolic links lead (SQLite follows them: a second daemon
    given the journal under another name would take up the same open payments)."""
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + ".lock")


def journal_files(path: Path) -> tuple[Path, Path, Path, Path]:
    """The database, SQLite's -wal and -shm beside it, and the daemon's lock file (all but
    the first named after the file a symbolic link leads to, as SQLite names them)."""
    real = os.path.realpath(path)
    return path, Path(real + "-wal"), Path(real + "-shm"), lock_path(path)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def not_writable(path: Path) -> str | None:
    """When this process may not write the journal's directory or one of its files (as after
    a technician ran the daemon by hand as root once: the files are then root's, and the
    daemon's user cannot open them): which, whose, and the chown that gives them back. None
    when it may write them all, or cannot tell."""
    me = user_name(os.geteuid())
    blocked: list[tuple[Path, os.stat_result]] = []
    candidates = [(path.parent, os.W_OK | os.X_OK)] + [
        (file, os.R_OK | os.W_OK) for file in journal_files(path)]
    for file, mode in candidates:
        try:
            info = file.stat()
        except OSError:  # not there, or not to be seen from here (the directory is named)
            continue
        if file == path.parent and not stat.S_ISDIR(info.st_mode):
            continue  # not a permission problem (see open_failure)
        if not os.access(file, mode):
            blocked.append((file, info))
    if not blocked:
        return None
    whose = "; ".join(f"{file} (owner {user_name(info.st_uid)}, mode "
                      f"{stat.S_IMODE(info.st_mode):04o})" for file, info in blocked)
    return (f"cannot open journal {path}: this process (user {me}, uid {os.geteuid()}) may not "
            f"write {whose}. Files another user made, as running the daemon by hand as root "
            f"does, must be given back to the daemon's user: chown {me}: "
            f"{' '.join(str(file) for file, _ in blocked)} and start the bridge again. Do not "
            "delete them: the journal may hold payments no register has heard of yet")


def open_failure(path: Path, exc: BaseException, readonly: bool) -> str:
    """Why the journal file would not open, and what a technician does about it."""
    if not readonly and _read_only_mount(path.parent):
        return _mounted_read_only(path, exc)  # (not a permission: no chown helps)
    if not readonly:
        not_ours = not_writable(path)
        if not_ours is not None:
            return not_ours
    try:
        is_dir = path.is_dir()
    except OSError:  # (pathlib raises it for a directory this user may not enter)
        is_dir = False
    if is_dir:
        return (f"cannot open journal {path}: it is a directory; `journal` names the file, "
                "e.g. /var/lib/poi-bridge/journal.sqlite3")
    if readonly:
        return (f"cannot read journal {path}: {exc}; run this as the poi-bridge user or root "
                f"(ls -l {path})")
    return (f"cannot open journal {path}: {exc}. The daemon's user must be able to create and "
            f"write it and its directory (ls -ld {path.parent}; df -h {path.parent}); under "
            "the shipped unit only /var/lib/poi-bridge is writable (ProtectSystem=strict, "
            "StateDirectory=): keep the journal there")


def make_directory(directory: Path) -> None:
    """The journal's directory, made if it is missing, each missing level mode 0700 (it holds
    the terminals' answers), and said: the deployment check at start said it would be."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for level in reversed(missing):
        with contextlib.suppress(FileExistsError):
            level.mkdir(mode=0o700)
    if missing:
        log.info("created directory %s (mode %04o) for the journal", missing[0],
                 stat.S_IMODE(missing[0].stat().st_mode))


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes) -> None:
    """A new file holding `data`, durable (its directory too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)


def _in_use(path: Path, who: str, why: str = "") -> JournalError:
    return JournalError(
        f"journal {path} is in use by another poi-bridge process ({who}): the bridge is "
        "probably already running as the service (systemctl status poi-bridge). Stop that "
        "one first (systemctl stop poi-bridge) if this one is to run instead; never run "
        f"two: both would take up the same open payments.{why} Nothing in the journal was "
        "read or changed")


def _flock_holder(fd: int) -> str | None:
    """The pid holding a flock on the file of `fd`, from /proc/locks (None: not found)."""
    info = os.fstat(fd)
    inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                    return fields[4] if fields[4].isdigit() and fields[4] != "0" else None
    except OSError:
        pass
    return None


def _open_database_file(path: Path) -> tuple[int, bool]:
    """A descriptor of the database file (where symbolic links lead, as SQLite opens it),
    made empty if missing, and whether this call made it. O_EXCL first, so that a start
    knows whether the file was there before it (an empty one is said, see Journal._open)."""
    real = os.path.realpath(path)
    for _ in range(3):  # (made or removed by someone else between the two calls: again)
        try:
            return os.open(real, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), True
        except FileExistsError:
            pass
        try:
            return os.open(real, os.O_RDWR | os.O_CLOEXEC), False
        except FileNotFoundError:
            continue
    return os.open(real, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), False


def hold_lock(path: Path) -> tuple[int, int, bool]:
    """Lock the journal for this daemon alone, before anything in it is read: a second
    daemon started by hand beside the service took up the open transactions the first one
    owned, polled their terminals and fought it for the broker session. Two flocks, each
    lasting as long as its descriptor: close() or the process's end, however it ends (a
    SIGKILLed daemon never blocks the next start).

    `<journal>.lock` (which holds the pid, for a second daemon's message) is taken first: it
    is there before the database is, so two first starts do not race to make it. Then the
    database file itself: a lock file alone was deleted as "stale" by a technician while
    the daemon ran, and a second daemon made a new one, took the open payments up and
    overwrote an approved result with `unresolved`. A flock on the database cannot be lost
    so while the file is in use, and it is apart from the POSIX (fcntl) locks SQLite takes
    on Linux (not on NFS, where SQLite is unsafe anyway). But closing any descriptor of the
    database file drops every POSIX lock this process holds on it, SQLite's included: that
    descriptor stays open until every connection of this process to it is closed (see
    Journal._release_lock). Other processes (the technician's read-only commands) are not affected.
    Returns the lock file's descriptor, the database's, and whether this start made the
    database file."""
    lock = lock_path(path)
    try:
        make_directory(path.parent)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise JournalError(open_failure(path, exc, readonly=False)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise JournalError(open_failure(path, exc, readonly=False)) from None
        raise _in_use(path, f"pid {holder}" if holder.isdigit() else f"see {lock}") from None
    try:
        db_fd, created = _open_database_file(path)
    except OSError as exc:
        os.close(fd)
        raise JournalError(open_failure(path, exc, readonly=False)) from None
    try:
        fcntl.flock(db_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _flock_holder(db_fd)
        os.close(db_fd)  # (no SQLite connection of this process has the file open yet)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise JournalError(open_failure(path, exc, readonly=False)) from None
        who = f"pid {holder}" if holder else f"see fuser -v {path}"
        raise _in_use(path, who, f" Its lock file {lock} was removed while that one ran: "
                      "never remove it by hand, a running bridge holds it.") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # only the pid for a second daemon's message: the lock is what counts
    return fd, db_fd, created

"""Room on the journal's disk, before the daemon takes payments.

On a full disk the daemon stops at its first commit that fails (exit status 3: what it
held in memory can no longer be recorded). Started again while the disk was still full, it
said "online", took the register's request the broker gave back, stopped again, and after
five such starts systemd gave up: registers got no answer at all, and once room was made the
bridge stayed down until someone restarted it. Now it does not start taking payments while
the disk is short of room: its start goes on for as long as it waits (EXTEND_TIMEOUT_USEC
sent at every look, with a STATUS that says why: not READY=1, which would arm the watchdog
before the journal's check at open, long for a journal that filled a disk), it stays off the
broker (registers see it offline, as its last will said), and it goes on by itself once
there is room.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from bridge.daemon.notify import SystemdNotifier

log = logging.getLogger("poi_bridge")

# bytes: what the daemon wants free before it starts. A payment's commit takes a few pages, but
# taking the open transactions up again, the WAL (started over past 64 MB) and a checkpoint
# into the database take more; a few MB only would stop it again at the first busy minute.
JOURNAL_ROOM = 8 * 1024 * 1024
ROOM_CHECK_INTERVAL = 10.0  # s between looks while waiting
ROOM_REMINDER = 600.0  # s between the warnings that it still waits


def _existing(path: Path) -> Path:
    """The journal's directory, or the nearest one above it that exists (a first start
    creates the missing ones)."""
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory


def short_of_room(journal: Path) -> str | None:
    """What the journal's disk lacks, said for a technician, or None when it has room.
    Counted as the daemon's user sees it (f_bavail: without the blocks kept for root)."""
    try:  # (the disk of the file a symbolic link leads to: SQLite writes there)
        disk = os.statvfs(_existing(Path(os.path.realpath(journal))))
    except OSError:
        return None  # (the journal's own open says what is wrong with the path)
    free = disk.f_bavail * disk.f_frsize
    if free < JOURNAL_ROOM:
        return (f"{free / 1e6:.1f} MB free on the disk of {journal.parent}, "
                f"{JOURNAL_ROOM / 1e6:.0f} MB needed")
    if disk.f_files and not disk.f_favail:  # (a file system that counts inodes, none left)
        return f"no file can be created on the disk of {journal.parent} (no inode left)"
    return None


async def wait_for_room(journal: Path, notifier: SystemdNotifier) -> None:
    """Return at once when the journal's disk has room; else wait until it has, telling
    systemd and the technician why."""
    problem = short_of_room(journal)
    if problem is None:
        return
    said = _said(journal, problem)
    loop = asyncio.get_running_loop()
    since = last_said = loop.time()
    while problem is not None:
        # (a start that timed out would be retried five times, then given up by systemd)
        notifier.extend_timeout(3 * ROOM_CHECK_INTERVAL)
        notifier.status(f"waiting for room on the journal's disk: {problem}")
        await asyncio.sleep(ROOM_CHECK_INTERVAL)
        problem = short_of_room(journal)
        if problem is not None and loop.time() - last_said >= ROOM_REMINDER:
            last_said = loop.time()
            log.warning("still waiting for room on the journal's disk (%.0f minutes now): "
                        "%s. %s", (last_said - since) / 60, problem, said)
    log.warning("room on the journal's disk again after %.0f s: the bridge starts",
                loop.time() - since)


def _said(journal: Path, problem: str) -> str:
    fix = (f"Make room on it (df -h {journal.parent}; large files: du -xsh /var/log/* "
           "/var/tmp/*); the bridge starts by itself once there is, no restart needed")
    log.critical("the journal's disk is full: %s. The bridge takes no payment until there is "
                 "room, since it could not record one (registers see it offline "
                 "meanwhile; results already in the journal are kept). %s", problem, fix)
    return fix

"""Room on the journal's disk, before the daemon takes payments.

On a full disk the daemon stops at its first commit that fails (exit status 3: what it
held in memory can no longer be recorded). Started again while the disk was still full, it
said "online", took the register's request the broker gave back, stopped again, and after
five such starts systemd gave up: registers got no answer at all, and once room was made the
bridge stayed down until someone restarted it. Now it does not start taking payments while
the disk is short of room: it tells systemd it is up and waiting (READY=1 with a STATUS that
says why, the watchdog fed), stays off the broker (registers see it offline, as its last
will said), and goes on by itself once there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from bridge.daemon.notify import SystemdNotifier, run_watchdog

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
    try:
        disk = os.statvfs(_existing(journal))
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
    # Up as far as systemd is concerned (a start timing out would be retried five times,
    # then given up): STATUS says what it waits for, the watchdog is fed meanwhile.
    notifier.ready(f"waiting for room on the journal's disk: {problem}")
    watchdog = asyncio.create_task(run_watchdog(notifier), name="watchdog (waiting for room)")
    loop = asyncio.get_running_loop()
    since = last_said = loop.time()
    try:
        while problem is not None:
            await asyncio.sleep(ROOM_CHECK_INTERVAL)
            problem = short_of_room(journal)
            if problem is not None and loop.time() - last_said >= ROOM_REMINDER:
                last_said = loop.time()
                log.warning("still waiting for room on the journal's disk (%.0f minutes "
                            "now): %s. %s", (last_said - since) / 60, problem, said)
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
    log.warning("room on the journal's disk again after %.0f s: the bridge starts",
                loop.time() - since)


def _said(journal: Path, problem: str) -> str:
    fix = (f"Make room on it (df -h {journal.parent}; large files: du -xsh /var/log/* "
           "/var/tmp/*); the bridge starts by itself once there is, no restart needed")
    log.critical("the journal's disk is full: %s. The bridge takes no payment until there is "
                 "room, since it could not record one (registers see it offline "
                 "meanwhile; results already in the journal are kept). %s", problem, fix)
    return fix

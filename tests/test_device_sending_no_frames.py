"""A device on the terminal's port that sends bytes but never a frame (a scale, or a terminal
at the wrong baud rate or behind the wrong framer) was logged only as "no answer to the
identity check within N s", the bytes themselves at debug: a technician looked for a
terminal switched off (field review, 2026-12-02). The warning now says bytes came that were
no frame. A real worker on a pseudo-terminal whose other end talks like a scale."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re

from bridge.config import TerminalConfig
from bridge.daemon import quiet
from bridge.daemon.journal import Journal
from bridge.daemon.worker import TerminalWorker
from bridge.transports import Backoff

from .test_terminal_worker import POI, RecordingOutlet


@contextlib.asynccontextmanager
async def worker_on_a_pty(tmp_path, framer: dict, status_timeout: float):
    """A started worker on a pseudo-terminal: (the worker, its outlet, the terminal's end)."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    journal = Journal(tmp_path / "journal.sqlite3")
    config = TerminalConfig.model_validate({
        "poi_id": POI, "link": {"kind": "serial", "device": os.ttyname(slave)},
        "framer": framer, "status_timeout": status_timeout})
    outlet = RecordingOutlet()
    worker = TerminalWorker(config, journal, outlet, backoff=Backoff(initial=0.05, maximum=0.2))
    await worker.start()
    try:
        yield worker, outlet, master
    finally:
        await worker.stop()
        os.close(master)
        os.close(slave)
        journal.close()


def unanswered(caplog) -> list[str]:
    return [m for m in caplog.messages if "no answer to the identity check" in m]


async def test_an_identity_check_unanswered_says_bytes_came_that_were_no_frame(
        tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="poi_bridge")
    async with worker_on_a_pty(tmp_path, {"name": "stx-etx-lrc"}, 1.0) as (_, _, master):
        async with asyncio.timeout(10):
            while not unanswered(caplog):
                os.write(master, b"ST,GS,+0001.25kg\r\n")  # a scale's weight, 10 a second
                try:
                    os.read(master, 4096)  # (what the bridge sent it)
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.1)
    line = unanswered(caplog)[0]
    said = re.search(r"; received (\d+) bytes that were no frame: wrong device, baud rate or "
                     r"framer\?", line)
    assert said, line
    assert int(said.group(1)) >= 18, line  # at least one of the scale's lines


async def test_the_bridges_own_frame_given_up_on_is_named_as_such(tmp_path, caplog):
    """The identity check's frame, never acknowledged, was given up on after the check had
    already gone unanswered: it was logged as 'poi-bridge/SnrcPJDWvh not acknowledged by the
    terminal', read as a transaction's IDs a technician would look for (field review)."""
    caplog.set_level(logging.WARNING, logger="poi_bridge")

    def given_up() -> list[str]:
        return [m for m in caplog.messages if "not acknowledged by the terminal" in m]

    # the check is unanswered at 1 s; its frame's tries end at 1.8 s
    framer = {"name": "stx-etx-lrc", "ack_timeout": 0.6, "max_tries": 3}
    async with worker_on_a_pty(tmp_path, framer, 1.0) as (_, _, master):
        async with asyncio.timeout(10):
            while not given_up():
                try:
                    os.read(master, 4096)  # read, never acknowledged
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.05)
    (line,) = given_up()
    assert line.startswith(f"terminal {POI}: a frame of the bridge's own (identity check or "
                           "status poll) not acknowledged by the terminal: "), line
    assert "poi-bridge/" not in line, line


async def test_an_identity_check_given_up_on_is_one_warning_not_two(tmp_path, caplog):
    """A technician's review: a device that acknowledges nothing (a wrong framer, a silent
    terminal) got two WARNING lines for each identity check given up on, "the identity
    check not acknowledged by the terminal" and "identity check not delivered ...", and
    each refused payment asks again. The session's line, which says what follows and what
    to check, is the one left."""
    caplog.set_level(logging.DEBUG, logger="poi_bridge")

    def about_the_check(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == level and "identity check" in r.getMessage()]

    # its frame's tries end at 0.9 s, well before the check's own 5 s
    framer = {"name": "stx-etx-lrc", "ack_timeout": 0.3, "max_tries": 3}
    async with worker_on_a_pty(tmp_path, framer, 5.0) as (_, _, master):
        async with asyncio.timeout(10):
            while not about_the_check(logging.WARNING):
                try:
                    os.read(master, 4096)  # read, never acknowledged
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # (a second line would have come with it)
    (warning,) = about_the_check(logging.WARNING)
    assert warning.startswith(f"terminal {POI}: identity check not delivered: "), warning
    assert any("not acknowledged by the terminal" in m
               for m in about_the_check(logging.DEBUG)), "the link's line, at debug"


NOISE = b"\x02c\x03" * 1365  # 4095 bytes, 1365 framing errors
WRITES = 16


async def test_line_noise_is_logged_once_per_read_and_every_byte_still_counted(
        tmp_path, caplog, monkeypatch):
    """Line noise is logged and counted once per read, not once per framing error: a device
    sending garbage that the framer reports every few bytes (here `STX x ETX` over and over,
    each one a frame whose LRC byte is the next STX) made the worker log one debug line and
    update the session once per event, on the loop every terminal shares. Counted in log
    lines, never timed."""
    caplog.set_level(logging.WARNING, logger="poi_bridge")
    caplog.set_level(logging.DEBUG, logger="poi_bridge.terminal")
    monkeypatch.setattr(quiet, "LINK_LOSSES_QUIET", 0.5)  # (10 minutes in the daemon)
    async with worker_on_a_pty(tmp_path, {"name": "stx-etx-lrc"}, 2.0) as (
            worker, outlet, master):
        await outlet.state_is("online")  # the port is open and raw: 0x03 is no ^C
        pending = NOISE * WRITES
        async with asyncio.timeout(15):
            while pending:
                try:
                    pending = pending[os.write(master, pending[:4095]):]
                except BlockingIOError:
                    pass
                try:
                    os.read(master, 4096)  # (what the bridge sent it)
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.01)
            while not unanswered(caplog):
                await asyncio.sleep(0.05)
    noise_lines = [m for m in caplog.messages if "line noise" in m]
    events = len(NOISE) * WRITES // 3
    assert worker.counters["framing_errors"] == events - 1  # every error still counted
    # one line per read (a pty read is at most a few KiB), not one per error
    assert 0 < len(noise_lines) < 200, (len(noise_lines), noise_lines[:3])
    said = re.search(r"received (\d+) bytes that were no frame", unanswered(caplog)[0])
    assert said, unanswered(caplog)[0]
    # every byte but the last STX x ETX, which waits for its LRC byte
    assert int(said.group(1)) == len(NOISE) * WRITES - 3
    assert worker.counters["noise_bytes"] == len(NOISE) * WRITES - 3
    # For a technician (at info, the default level): the first run said, then a warning per
    # interval while it goes on, every byte in one line or another
    first = [r for r in caplog.records if r.levelno == logging.INFO
             and "bytes on its line were no frame" in r.getMessage()]
    assert len(first) == 1, [r.getMessage() for r in first]
    assert "check the baud rate, the framer and the cable" in first[0].getMessage()
    went_on = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
               and "line noise goes on" in r.getMessage()]
    assert went_on, caplog.messages[-5:]
    told = [int(re.search(r"(\d+) bytes on its line", first[0].getMessage()).group(1))] + [
        int(re.search(r"(\d+) more bytes that were no frame", line).group(1))
        for line in went_on]
    assert sum(told) == len(NOISE) * WRITES - 3, (told, went_on)

"""A device on the terminal's port that sends bytes but never a frame (a scale, or a terminal
at the wrong baud rate or behind the wrong framer) was logged only as "no answer to the
identity check within N s", the bytes themselves at debug: a technician looked for a
terminal switched off (field review, 2026-12-02). The warning now says bytes came that were
no frame. A real worker on a pseudo-terminal whose other end talks like a scale."""

from __future__ import annotations

import asyncio
import logging
import os
import re

from bridge.config import TerminalConfig
from bridge.daemon.journal import Journal
from bridge.daemon.worker import TerminalWorker
from bridge.transports import Backoff

from .test_terminal_worker import POI, RecordingOutlet


async def test_an_identity_check_unanswered_says_bytes_came_that_were_no_frame(
        tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="poi_bridge")
    master, slave = os.openpty()
    os.set_blocking(master, False)
    journal = Journal(tmp_path / "journal.sqlite3")
    config = TerminalConfig.model_validate({
        "poi_id": POI, "link": {"kind": "serial", "device": os.ttyname(slave)},
        "framer": {"name": "stx-etx-lrc"}, "status_timeout": 1.0})
    worker = TerminalWorker(config, journal, RecordingOutlet(),
                            backoff=Backoff(initial=0.05, maximum=0.2))

    def unanswered() -> list[str]:
        return [m for m in caplog.messages if "no answer to the identity check" in m]

    await worker.start()
    try:
        async with asyncio.timeout(10):
            while not unanswered():
                os.write(master, b"ST,GS,+0001.25kg\r\n")  # a scale's weight, 10 a second
                try:
                    os.read(master, 4096)  # (what the bridge sent it)
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.1)
    finally:
        await worker.stop()
        os.close(master)
        os.close(slave)
        journal.close()
    line = unanswered()[0]
    said = re.search(r"; received (\d+) bytes that were no frame: wrong device, baud rate or "
                     r"framer\?", line)
    assert said, line
    assert int(said.group(1)) >= 18, line  # at least one of the scale's lines


async def test_the_bridges_own_frame_given_up_on_is_named_as_such(tmp_path, caplog):
    """The identity check's frame, never acknowledged, was given up on after the check had
    already gone unanswered: it was logged as 'poi-bridge/SnrcPJDWvh not acknowledged by the
    terminal', read as a transaction's IDs a technician would look for (field review)."""
    caplog.set_level(logging.WARNING, logger="poi_bridge")
    master, slave = os.openpty()
    os.set_blocking(master, False)
    journal = Journal(tmp_path / "journal.sqlite3")
    config = TerminalConfig.model_validate({
        "poi_id": POI, "link": {"kind": "serial", "device": os.ttyname(slave)},
        # the check is unanswered at 1 s; its frame's tries end at 1.8 s
        "framer": {"name": "stx-etx-lrc", "ack_timeout": 0.6, "max_tries": 3},
        "status_timeout": 1.0})
    worker = TerminalWorker(config, journal, RecordingOutlet(),
                            backoff=Backoff(initial=0.05, maximum=0.2))

    def given_up() -> list[str]:
        return [m for m in caplog.messages if "not acknowledged by the terminal" in m]

    await worker.start()
    try:
        async with asyncio.timeout(10):
            while not given_up():
                try:
                    os.read(master, 4096)  # read, never acknowledged
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.05)
    finally:
        await worker.stop()
        os.close(master)
        os.close(slave)
        journal.close()
    (line,) = given_up()
    assert line.startswith(f"terminal {POI}: a frame of the bridge's own (identity check or "
                           "status poll) not acknowledged by the terminal: "), line
    assert "poi-bridge/" not in line, line

"""What the daemon's log lines look like to journald and on a terminal."""

from __future__ import annotations

import io
import logging

from bridge.logging_setup import setup_logging


def _lines(monkeypatch, journald: bool) -> list[str]:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    if journald:
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("debug")
    log = logging.getLogger("poi_bridge.test")
    try:
        log.debug("debug line")
        log.info("terminal V400m-1: link up")
        log.warning("terminal V400m-1: link lost")
        log.error("journal: commit failed")
        log.critical("journal: check the disk")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("request could not be handled")
    finally:
        logging.getLogger().handlers.clear()
    return stream.getvalue().splitlines()


def test_under_journald_every_line_carries_its_syslog_priority(monkeypatch):
    lines = _lines(monkeypatch, journald=True)
    assert lines[:5] == ["<7>DEBUG poi_bridge.test: debug line",
                         "<6>INFO poi_bridge.test: terminal V400m-1: link up",
                         "<4>WARNING poi_bridge.test: terminal V400m-1: link lost",
                         "<3>ERROR poi_bridge.test: journal: commit failed",
                         "<2>CRITICAL poi_bridge.test: journal: check the disk"]
    traceback = lines[5:]
    assert traceback[0] == "<3>ERROR poi_bridge.test: request could not be handled"
    assert len(traceback) > 2 and all(line.startswith("<3>") for line in traceback)
    assert traceback[-1] == "<3>ValueError: boom"


def test_on_a_terminal_lines_are_timestamped_without_a_prefix(monkeypatch):
    lines = _lines(monkeypatch, journald=False)
    assert not any(line.startswith("<") for line in lines)
    assert lines[2].endswith(" WARNING poi_bridge.test: terminal V400m-1: link lost")
    assert lines[2][:4].isdigit()  # asctime first

"""What the daemon's log lines look like to journald and on a terminal."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

from bridge.logging_setup import setup_logging

from .rig import python_env


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


@pytest.mark.parametrize("problem,status,first_line", [
    ("log_level = \"loud\"\n", 2, "<3>"),
    ("[mqtt]\nusername = \"u\"\npassword_file = \"{tmp}/no-password\"\n", 1,
     "<2>CRITICAL poi_bridge: cannot read the MQTT password file {tmp}/no-password"),
    ("[[terminals]]\npoi_id = \"V400m-2\"\n[terminals.key]\nidentifier = \"K\"\nversion = 1\n"
     "passphrase_file = \"{tmp}/no-passphrase\"\n[terminals.link]\nkind = \"tcp\"\n"
     "host = \"127.0.0.1\"\nport = 9\n", 1,
     "<2>CRITICAL poi_bridge: terminal V400m-2: cannot read key passphrase file"),
])
def test_what_stops_the_daemon_at_start_reaches_journald_as_an_error(tmp_path, problem, status,
                                                                     first_line):
    """Under systemd, a configuration that cannot be read, or a secret the daemon cannot
    read, stopped it with plain stderr text, which journald stores at info:
    `journalctl -u poi-bridge -p warning` did not show why the service failed."""
    config = tmp_path / "poi-bridge.toml"
    config.write_text(
        f'journal = "{tmp_path}/journal.sqlite3"\n' + problem.format(tmp=tmp_path)
        + ('[[terminals]]\npoi_id = "V400m-1"\n[terminals.link]\nkind = "tcp"\n'
           'host = "127.0.0.1"\nport = 9\n' if "[[terminals]]" not in problem else ""))
    run = subprocess.run([sys.executable, "-m", "bridge", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=60,
                         env={**python_env(), "JOURNAL_STREAM": "8:12345"})
    assert run.returncode == status, run.stderr
    lines = run.stderr.splitlines()
    assert lines and all(line.startswith(("<2>", "<3>", "<4>", "<6>")) for line in lines), lines
    fatal = [line for line in lines if line.startswith(("<2>", "<3>"))]
    assert fatal and fatal[-1].startswith(first_line.format(tmp=tmp_path)), lines
    assert "Traceback" not in run.stderr

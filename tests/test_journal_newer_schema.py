"""A journal whose schema_version this bridge cannot take. One a newer bridge wrote (after a
downgrade) is sound and may hold open payments: it was called "unreadable or corrupt", to be
moved aside for a new journal, which would not know those payments (their answers dropped,
a register's retry sent to the terminal again). One whose schema_version is no number
stopped the daemon with a ValueError traceback instead of the journal's own clean stop."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from bridge.daemon.journal import Journal, JournalError

from .rig import python_env


def _set_version(path, value: str) -> None:
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (value,))
    db.commit()
    db.close()


def _run_daemon(tmp_path):
    config = tmp_path / "poi-bridge.toml"
    config.write_text(f'journal = "{tmp_path}/journal.sqlite3"\n[mqtt]\nhost = "127.0.0.1"\n'
                      'port = 1\n[[terminals]]\npoi_id = "V400m-1"\n'
                      '[terminals.link]\nkind = "tcp"\nhost = "192.0.2.1"\nport = 8443\n')
    done = subprocess.run([sys.executable, "-m", "bridge", "run", "--config", str(config)],
                          capture_output=True, text=True, env=python_env(), timeout=60)
    return done.returncode, done.stdout + done.stderr


def test_a_newer_bridges_journal_is_not_called_corrupt_nor_to_be_replaced(tmp_path):
    path = tmp_path / "journal.sqlite3"
    _set_version(path, "2")
    for readonly in (False, True):  # the daemon, and the technician's commands
        with pytest.raises(JournalError) as caught:
            Journal(path, readonly=readonly)
        text = str(caught.value)
        assert "newer" in text and "run the bridge version that wrote it" in text, text
        assert "corrupt" not in text and "begin a new journal" not in text, text
        assert "Do not move it aside nor replace it" in text, text
    status, said = _run_daemon(tmp_path)
    assert status == 3 and "Traceback" not in said, said
    assert "written by a newer poi-bridge" in said, said
    db = sqlite3.connect(path)  # left as it was
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    db.close()


def test_a_schema_version_that_is_no_number_is_a_journal_error_not_a_traceback(tmp_path):
    path = tmp_path / "journal.sqlite3"
    _set_version(path, "two")
    with pytest.raises(JournalError) as caught:
        Journal(path)
    assert "'two' is not a number" in str(caught.value)
    status, said = _run_daemon(tmp_path)
    assert status == 3 and "Traceback" not in said, said
    assert "'two' is not a number" in said, said

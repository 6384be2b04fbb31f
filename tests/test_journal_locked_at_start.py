"""A journal another process holds locked when the daemon starts (a technician's sqlite3
shell in a write transaction): the daemon said "check the free space and the permissions",
which have nothing to do with it. It says another process holds it, and how to find it."""

from __future__ import annotations

import sqlite3

import pytest

from bridge.daemon.journal import Journal, JournalError


def test_a_journal_locked_by_another_process_says_so(tmp_path):
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # a technician's sqlite3 shell in a write transaction
    try:
        with pytest.raises(JournalError) as caught:
            Journal(path)
    finally:
        other.close()
    text = str(caught.value)
    assert "locked by another process" in text and "free space" not in text, text
    assert f"fuser -v {path}" in text and f"lsof {path}" in text, text
    Journal(path).close()  # left as it was: it opens once the other process lets go

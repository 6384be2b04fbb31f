"""A large journal's check at open (SQLite's quick_check reads the whole file) must not make
every start outlast the unit's TimeoutStartSec=: the daemon asks systemd for the time first
(EXTEND_TIMEOUT_USEC), sized from the journal's files."""

from __future__ import annotations

import pytest

from bridge.config import parse_config
from bridge.daemon import app
from bridge.daemon.app import Bridge
from bridge.daemon.journal import Journal
from bridge.daemon.notify import SystemdNotifier

from .test_notify import FakeSystemd
from .test_systemd_unit import unit_settings


def make_bridge(tmp_path, notifier):
    config = parse_config({"journal": str(tmp_path / "journal.sqlite3"),
                           "mqtt": {"host": "127.0.0.1", "port": 1}})
    return Bridge(config, hotplug=False, notifier=notifier)


@pytest.fixture
def systemd(tmp_path):
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    yield fake
    fake.close()


def test_a_large_journal_asks_systemd_for_its_check_before_it_is_opened(
        tmp_path, systemd, monkeypatch):
    journal = Journal(tmp_path / "journal.sqlite3")
    with journal.batch():
        journal._db.execute("CREATE TABLE padding (x BLOB)")
        journal._db.execute("INSERT INTO padding VALUES (zeroblob(200000))")
    journal.close()
    files = [tmp_path / "journal.sqlite3", tmp_path / "journal.sqlite3-wal"]
    size = sum(f.stat().st_size for f in files if f.exists())
    assert size > 200000
    # A slow disk, made slower: this small journal stands for one of a few hundred MB
    monkeypatch.setattr(app, "JOURNAL_CHECK_RATE", 10_000.0)
    said_before_open = []

    def journal_opened(path):
        said_before_open.extend(systemd.wait_for(1, timeout=1))
        return Journal(path)

    monkeypatch.setattr(app, "Journal", journal_opened)
    bridge = make_bridge(tmp_path, SystemdNotifier(str(tmp_path / "notify.sock")))
    bridge.journal.close()
    bridge.notifier.close()
    (message,) = said_before_open
    key, _, value = message.partition("=")
    assert key == "EXTEND_TIMEOUT_USEC"
    asked = int(value) / 1e6
    assert asked == pytest.approx(size / 10_000.0 + app.START_ALLOWANCE, abs=1)
    assert asked > 60, "more than the unit's TimeoutStartSec, or it would change nothing"


def test_a_new_or_small_journal_changes_nothing(tmp_path, systemd):
    bridge = make_bridge(tmp_path, SystemdNotifier(str(tmp_path / "notify.sock")))
    bridge.journal.close()  # none there before: nothing to check, nothing asked
    assert systemd.count() == 0
    bridge = make_bridge(tmp_path, SystemdNotifier(str(tmp_path / "notify.sock")))
    bridge.journal.close()
    bridge.notifier.close()
    # a journal of a few KB: at most the unit's own budget again, asked from now
    (message,) = systemd.wait_for(1)
    assert message.startswith("EXTEND_TIMEOUT_USEC=")
    assert int(message.partition("=")[2]) / 1e6 < app.START_ALLOWANCE + 1


def test_the_rest_of_the_start_gets_the_units_own_budget():
    (timeout,) = unit_settings()["Service"]["TimeoutStartSec"]
    assert float(timeout) == app.START_ALLOWANCE

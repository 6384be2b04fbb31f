"""Key passphrases come from a file or a systemd credential, never from the configuration."""

from __future__ import annotations

import pytest

from bridge.config import TerminalConfig
from bridge.daemon.app import load_key


def terminal(passphrase_file: str) -> TerminalConfig:
    return TerminalConfig.model_validate({
        "poi_id": "V400m-1", "link": {"kind": "tcp", "host": "h", "port": 1},
        "key": {"identifier": "K", "version": 2, "passphrase_file": passphrase_file}})


def test_absolute_passphrase_file(tmp_path):
    secret = tmp_path / "pass"
    secret.write_text("p@ssw0rd123456\n")
    key = load_key(terminal(str(secret)))
    assert (key.identifier, key.version) == ("K", 2)
    assert "p@ssw0rd" not in repr(key)


def test_relative_path_is_a_systemd_credential(tmp_path, monkeypatch):
    (tmp_path / "secret_v400m").write_text("from-credentials")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert load_key(terminal("secret_v400m")).identifier == "K"


def test_unreadable_passphrase_stops_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="V400m-1: cannot read key passphrase file"):
        load_key(terminal(str(tmp_path / "missing")))

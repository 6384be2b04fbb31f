"""Key passphrases come from a file or a systemd credential, never from the configuration."""

from __future__ import annotations

import pytest

from bridge.config import TerminalConfig
from bridge.daemon.app import load_key
from bridge.protocol.crypto import same_key


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


def test_a_passphrase_that_is_not_utf8_stops_with_a_clear_message(tmp_path):
    secret = tmp_path / "pass"
    secret.write_bytes(b"\xff\xfe latin-1 \xe9\n")
    with pytest.raises(SystemExit, match="V400m-1: key passphrase file .* is not UTF-8 text"):
        load_key(terminal(str(secret)))


def test_a_byte_order_mark_is_no_part_of_the_passphrase(tmp_path):
    """Some Windows editors start a file with a UTF-8 byte order mark: it was read as the
    passphrase's first character, check-config said OK, and every payment was refused with
    "check the encryption key" (the crypto audit). No passphrase starts with one."""
    secret = tmp_path / "pass"
    secret.write_bytes(b"\xef\xbb\xbfp@ssw0rd123456\r\n")
    plain = tmp_path / "plain"
    plain.write_text("p@ssw0rd123456")
    assert same_key(load_key(terminal(str(secret))), load_key(terminal(str(plain))))


def test_a_relative_mqtt_password_file_is_a_credential_too(tmp_path, monkeypatch):
    """As a relative passphrase_file: the daemon read a relative password_file from its
    working directory (/ under systemd) instead of its credentials."""
    from pathlib import Path

    from bridge.config import read_configured_secret, read_secret

    (tmp_path / "secret_mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.chdir("/")
    assert read_configured_secret(Path("secret_mqtt-password"),
                                  "the MQTT password file") == "s3cret"
    # A path a technician gives on a command line is read as given, from where they are.
    elsewhere = tmp_path / "here"
    elsewhere.mkdir()
    (elsewhere / "pw.txt").write_text("typed\n")
    monkeypatch.chdir(elsewhere)
    assert read_secret(Path("pw.txt"), "the password file") == "typed"


def test_the_technician_commands_read_the_configured_password_as_the_daemon(tmp_path,
                                                                              monkeypatch):
    """status, resync and register --config read a relative mqtt.password_file from the
    working directory while the daemon takes it from its credentials."""
    from bridge.config import MqttConfig
    from bridge.register_client import RegisterClient

    (tmp_path / "secret_mqtt-password").write_text("pw\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.chdir("/")
    mqtt = MqttConfig.model_validate({"username": "poi-bridge",
                                      "password_file": "secret_mqtt-password"})
    client = RegisterClient.for_bridge(mqtt, "TILL1")
    assert client._login["password"] == "pw"


def test_relative_tls_files_are_credentials_too(tmp_path, monkeypatch):
    """As a relative password_file: a relative TLS file (the client key is a secret) was read
    from the daemon's working directory, / under systemd."""
    from pathlib import Path

    from bridge.config import MqttConfig

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.chdir("/")
    tls = MqttConfig.model_validate({"tls": {
        "ca_file": "secret_ca.pem", "cert_file": "secret_client.pem",
        "key_file": "secret_client.key"}}).tls
    assert (tls.ca_file, tls.cert_file, tls.key_file) == (
        tmp_path / "secret_ca.pem", tmp_path / "secret_client.pem", tmp_path / "secret_client.key")
    absolute = MqttConfig.model_validate({"tls": {"ca_file": "/etc/ssl/ca.pem"}}).tls
    assert absolute.ca_file == Path("/etc/ssl/ca.pem")

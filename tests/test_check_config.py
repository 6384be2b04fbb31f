"""`poi-bridge check-config` as a technician's last check before `systemctl start`: whatever
the daemon would refuse or mishandle must be refused here, with a message that says what to
do. Also: the shipped example configuration, the README and the unit agree with each other."""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

import bridge.config as config_module
import bridge.deployment as deployment_module
from bridge.cli_daemon import check_config
from bridge.config import ConfigError, load_config, parse_config

from .rig import ROOT, as_nobody, python_env
from .test_systemd_unit import UNIT, unit_settings

EXAMPLE = ROOT / "examples" / "poi-bridge.toml"
README = ROOT / "README.md"
UDEV_RULES = ROOT / "udev" / "70-poi-bridge.rules"


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """check-config in this process (so a test can point the credential paths elsewhere)."""
    status = check_config(argparse.Namespace(file=str(path)))
    out, err = capsys.readouterr()
    return status, out, err


def terminal(poi_id: str = "V400m-1", **link: object) -> dict[str, object]:
    return {"poi_id": poi_id, "link": link or {"kind": "tcp", "host": "10.0.0.5", "port": 8443}}


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def write(tmp_path: Path, text: str, name: str = "bridge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def good_toml(tmp_path: Path, extra_terminal: str = "", top: str = "") -> str:
    """A configuration check-config accepts: one TCP terminal, the journal in tmp_path."""
    return (f'journal = "{tmp_path / "journal.sqlite3"}"\n{top}'
            '[[terminals]]\npoi_id = "V400m-1"\n' + extra_terminal +
            '[terminals.link]\nkind = "tcp"\nhost = "10.0.0.5"\nport = 8443\n')


# --- 1. every duration, timeout and interval has a finite upper bound ---------------------------

DURATIONS = [  # (where, key, the largest value accepted)
    ("terminal", "payment_timeout", 3600), ("terminal", "status_timeout", 600),
    ("terminal", "poll_floor", 300), ("terminal", "reconcile_initial", 3600),
    ("terminal", "reconcile_max_interval", 86400),
    ("terminal", "reconcile_deadline", 30 * 86400),
    ("framer", "ack_timeout", 60), ("usb", "timeout", 60),
    ("mqtt", "health_interval", 3600), ("mqtt", "transaction_retention", 366 * 86400),
    ("mqtt", "republish_window", 48 * 3600),
]


def with_setting(where: str, key: str, value: object) -> dict:
    term = terminal()
    data: dict = {"terminals": [term]}
    if where == "terminal":
        term[key] = value
    elif where == "framer":
        term["framer"] = {key: value}
    elif where == "usb":
        term["link"] = {"kind": "usb", "vendor_id": "0x0b00", "product_id": "0x0080", key: value}
    else:
        data["mqtt"] = {key: value}
    return data


@pytest.mark.parametrize(("where", "key", "high"), DURATIONS)
@pytest.mark.parametrize("value", [math.inf, 1e12, math.nan])
def test_durations_are_refused_beyond_their_range(where, key, high, value):
    found = problems(with_setting(where, key, value))
    assert len(found) == 1, found
    place = {"terminal": f"terminals[0].{key}", "framer": f"terminals[0].framer.{key}",
             "usb": f"terminals[0].link.{key}", "mqtt": f"mqtt.{key}"}[where]
    assert found[0].startswith(f"{place}: "), found
    # The message gives the range, in seconds.
    assert f"at most {high:g} s" in found[0], found


@pytest.mark.parametrize(("where", "key", "high"), DURATIONS)
def test_durations_are_accepted_up_to_their_bound(where, key, high):
    parse_config(with_setting(where, key, high))
    assert problems(with_setting(where, key, high + 1))


@pytest.mark.parametrize(("key", "value"), [("resync_attempts", 10**9),
                                            ("resync_attempts", 21)])
def test_counts_that_multiply_a_timeout_are_bounded(key, value):
    found = problems(with_setting("terminal", key, value))
    assert found and "at most 20" in found[0], found
    found = problems(with_setting("framer", "max_tries", 10**6))
    assert found and "at most 10" in found[0], found


def test_check_config_refuses_an_infinite_payment_timeout(tmp_path, capsys):
    path = write(tmp_path, good_toml(tmp_path, "payment_timeout = inf\n"))
    status, out, err = check(path, capsys)
    assert status == 2 and "OK" not in out
    assert "terminals[0].payment_timeout: must be more than 0 s and at most 3600 s" in err, err
    assert "got inf" in err, err


# --- 2. the example configuration, the README and the unit agree --------------------------------

def credential_line() -> tuple[str, Path]:
    (value,) = unit_settings(UNIT)["Service"]["LoadCredential"]
    credential_id, _, source = value.partition(":")
    return credential_id, Path(source)


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_the_unit_and_check_config_agree_on_the_credentials():
    credential_id, source = credential_line()
    assert config_module.CREDENTIAL_ID == credential_id
    assert config_module.CREDENTIAL_SOURCE == source
    assert config_module.CREDENTIALS_DIRECTORY == Path("/run/credentials") / UNIT.name
    # systemd.exec(5): a directory given to LoadCredential= yields one credential per file,
    # named ID_FILENAME: the unit's own comment must say so.
    assert f"{config_module.CREDENTIALS_DIRECTORY}/{credential_id}_v400m-324688179" \
        in UNIT.read_text()


def test_the_example_uses_the_credentials_the_readme_installs():
    credential_id, source = credential_line()
    example = tomllib.loads(EXAMPLE.read_text())
    run = config_module.CREDENTIALS_DIRECTORY
    step3 = readme_section("Installing on a store box")
    secrets = {"mqtt.password_file": example["mqtt"]["password_file"]}
    for number, term in enumerate(example["terminals"]):
        if "key" in term:
            secrets[f"terminals[{number}].key.passphrase_file"] = term["key"]["passphrase_file"]
    assert len(secrets) >= 2, "the example shows both kinds of secret"
    for place, secret in secrets.items():
        path = Path(secret)
        assert path.parent == run, f"{place} = {secret} is not a credential of the unit"
        prefix = f"{credential_id}_"
        assert path.name.startswith(prefix), (place, secret)
        installed = source / path.name[len(prefix):]
        # README step 3 installs that very file, root-only.
        assert re.search(rf"install -m600 \S+ +{re.escape(str(installed))}\b", step3), (
            f"README step 3 does not install {installed} (for {place})")
    # And nothing in those sections points a secret anywhere else.
    for title in ("Configuration", "Installing on a store box"):
        for match in re.finditer(r"(password_file|passphrase_file|key_file) = \"([^\"]+)\"",
                                 readme_section(title)):
            assert match.group(2).startswith(f"{run}/{credential_id}_"), match.group(0)


def test_the_example_is_installed_by_step_3_and_shown_in_the_readme():
    step3 = readme_section("Installing on a store box")
    assert "install -m644 examples/poi-bridge.toml /etc/poi-bridge/poi-bridge.toml" in step3
    blocks = re.findall(r"```toml\n(.*?)```", readme_section("Configuration"), re.DOTALL)
    assert blocks, "the Configuration section shows the example"
    assert tomllib.loads(blocks[0]) == tomllib.loads(EXAMPLE.read_text()), (
        "README's Configuration example and examples/poi-bridge.toml differ")


def test_the_example_names_devices_the_udev_rule_makes():
    vendors = set(re.findall(r'ENV\{POI_BRIDGE_VENDOR\}="([a-z0-9]+)"', UDEV_RULES.read_text()))
    example = tomllib.loads(EXAMPLE.read_text())
    for term in example["terminals"]:
        device = term["link"].get("device")
        if device is None:
            continue
        match = re.fullmatch(r"/dev/poi/([a-z0-9]+)-([A-Za-z0-9]+)", device)
        assert match and match.group(1) in vendors, device
        assert match.group(2) == term["poi_id"].split("-", 1)[1], (
            f"{device}: the USB serial number is the terminal's serial, as in its POIID")


def test_the_example_logs_in_as_the_example_broker_acl_expects():
    acl = (ROOT / "examples" / "mosquitto" / "acl").read_text()
    mqtt = tomllib.loads(EXAMPLE.read_text())["mqtt"]
    base = mqtt["base_topic"]
    assert (f"user {mqtt['username']}\ntopic read {base}/terminals/+/request\n"
            f"topic read {base}/terminals/+/request/+\n"
            f"topic read {base}/bridge/request/+\n") in acl


def test_check_config_accepts_the_example_once_its_secrets_are_installed(
        tmp_path, capsys, monkeypatch):
    source = tmp_path / "etc-credentials"  # stands for /etc/poi-bridge/credentials
    source.mkdir()
    monkeypatch.setattr(deployment_module, "CREDENTIAL_SOURCE", source)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    # Before the secrets are installed: each missing one is an error naming where it goes.
    status, out, err = check(EXAMPLE, capsys)
    assert status == 2, (out, err)
    assert f"{source}/v400m-324688179 does not exist" in err, err
    assert f"{source}/mqtt-password does not exist" in err, err
    # Installed (as README step 3 does): OK, the journal in the state directory included.
    (source / "v400m-324688179").write_text("p@ssw0rd123456\n")
    (source / "mqtt-password").write_text("secret\n")
    status, out, err = check(EXAMPLE, capsys)
    assert status == 0, err
    assert "OK: 1 terminal(s)" in out and "V400m-324688179: serial" in out, out
    assert "error" not in err.lower(), err
    # A symlink in the credentials directory is ignored by systemd: not a secret then.
    (source / "mqtt-password").unlink()
    (tmp_path / "elsewhere").write_text("secret\n")
    (source / "mqtt-password").symlink_to(tmp_path / "elsewhere")
    status, out, err = check(EXAMPLE, capsys)
    assert status == 2 and "symlink" in err, err


# --- 3. what the daemon refuses or mishandles ---------------------------------------------------

def test_a_missing_passphrase_file_is_an_error(tmp_path, capsys):
    key = (f'[terminals.key]\nidentifier = "K"\nversion = 1\n'
           f'passphrase_file = "{tmp_path / "nope"}"\n')
    path = write(tmp_path, good_toml(tmp_path) + key)
    status, out, err = check(path, capsys)
    assert status == 2 and "OK" not in out
    assert f"terminals[0].key.passphrase_file: cannot read {tmp_path / 'nope'}: No such file" \
        in err, err
    assert "the daemon stops at start" in err, err


def test_a_key_rotations_previous_key_is_checked_as_the_key_is(tmp_path, capsys):
    """previous_key (the other key of a rotation): its passphrase file is checked like the
    key's, it needs a key beside it, and it must differ from it in identifier or version
    (a terminal names a message's key by those alone)."""
    (tmp_path / "k1").write_text("old passphrase\n")
    key = (f'[terminals.key]\nidentifier = "K"\nversion = 2\n'
           f'passphrase_file = "{tmp_path / "k1"}"\n')
    previous = (f'[terminals.previous_key]\nidentifier = "K"\nversion = 1\n'
                f'passphrase_file = "{tmp_path / "nope"}"\n')
    status, out, err = check(write(tmp_path, good_toml(tmp_path) + key + previous), capsys)
    assert status == 2 and "OK" not in out
    assert f"terminals[0].previous_key.passphrase_file: cannot read {tmp_path / 'nope'}" \
        in err, err
    (tmp_path / "nope").write_text("new passphrase\n")
    status, out, err = check(write(tmp_path, good_toml(tmp_path) + key + previous), capsys)
    assert status == 0, err
    assert "key K v2 (and previous_key K v1)" in out, out
    status, _out, err = check(write(tmp_path, good_toml(tmp_path) + previous), capsys)
    assert status == 2 and "previous_key is set without key" in err, err
    same = previous.replace("version = 1", "version = 2")
    status, _out, err = check(write(tmp_path, good_toml(tmp_path) + key + same), capsys)
    assert status == 2 and "previous_key has the identifier and version of key" in err, err


def test_a_missing_mqtt_password_file_is_an_error(tmp_path, capsys):
    path = write(tmp_path, good_toml(tmp_path) +
                 f'[mqtt]\nusername = "u"\npassword_file = "{tmp_path / "nope"}"\n')
    status, _out, err = check(path, capsys)
    assert status == 2 and f"mqtt.password_file: cannot read {tmp_path / 'nope'}" in err, err


def test_a_credential_no_unit_loads_is_an_error(tmp_path, capsys, monkeypatch):
    """Review rev6: /run/credentials/poi-bridge.service/mqtt-password (secret_ left out)
    passed with a warning and "OK", and the service then failed at every start. Only a
    credential a drop-in of the unit loads is left to the service to check."""
    from bridge import deployment

    source = tmp_path / "credentials"
    source.mkdir()
    (source / "mqtt-password").write_text("pw\n")
    drop_ins = tmp_path / "poi-bridge.service.d"
    monkeypatch.setattr(deployment, "CREDENTIAL_SOURCE", source)
    monkeypatch.setattr(deployment, "UNIT_DROP_INS", (drop_ins,))
    monkeypatch.setattr(deployment, "UNIT_FILES", (tmp_path / "poi-bridge.service",))
    wrong = config_module.CREDENTIALS_DIRECTORY / "mqtt-password"
    path = write(tmp_path, good_toml(tmp_path) +
                 f'[mqtt]\nusername = "u"\npassword_file = "{wrong}"\n')
    status, out, err = check(path, capsys)
    assert status == 2 and "OK" not in out, (out, err)
    assert "a credential neither the shipped unit" in err and \
        f"did you mean {config_module.CREDENTIALS_DIRECTORY}/secret_mqtt-password?" in err, err
    drop_ins.mkdir()
    (drop_ins / "override.conf").write_text(
        "[Service]\nLoadCredential=mqtt-password:/etc/somewhere/pw\n")
    status, out, err = check(path, capsys)
    assert status == 0 and "a credential a drop-in of the unit loads" in err, (out, err)
    # The other ways systemd names one (review rev9): an import glob, a directory's ID_
    # prefix, spaces around '=', a unit edited whole
    for unit, line in (("override.conf", "ImportCredential=mqtt-*"),
                       ("override.conf", "LoadCredential = mqtt:/etc/store"),
                       (None, "LoadCredentialEncrypted=mqtt-password:/x.cred")):
        (drop_ins / "override.conf").write_text(f"[Service]\n{line}\n" if unit else "")
        (tmp_path / "poi-bridge.service").write_text("" if unit else f"[Service]\n{line}\n")
        wrong_name = "mqtt_password" if "mqtt:" in line else "mqtt-password"
        path.write_text(good_toml(tmp_path) + f'[mqtt]\nusername = "u"\npassword_file = '
                        f'"{config_module.CREDENTIALS_DIRECTORY / wrong_name}"\n')
        status, out, err = check(path, capsys)
        assert status == 0 and "a drop-in of the unit loads" in err, (line, out, err)


def test_a_credential_source_it_may_not_look_at_gives_no_traceback(tmp_path, capsys,
                                                                    monkeypatch):
    """Review rev9: its directory is root's alone; the hint's look raised PermissionError
    for the daemon's user and for check-config run as another user."""
    from bridge import deployment

    class Closed(type(tmp_path)):
        def exists(self, **kwargs):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(deployment, "CREDENTIAL_SOURCE", Closed(tmp_path / "closed"))
    monkeypatch.setattr(deployment, "UNIT_DROP_INS", ())
    monkeypatch.setattr(deployment, "UNIT_FILES", ())
    wrong = config_module.CREDENTIALS_DIRECTORY / "mqtt-password"
    path = write(tmp_path, good_toml(tmp_path) +
                 f'[mqtt]\nusername = "u"\npassword_file = "{wrong}"\n')
    status, _out, err = check(path, capsys)
    assert status == 2 and "a credential neither the shipped unit" in err \
        and "did you mean" not in err, err


def test_a_tls_private_key_others_may_read_is_a_warning(tmp_path, capsys):
    """Review rev6: a 0644 TLS client key passed without a word, where a 0644 password file
    is warned about."""
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    cert = tmp_path / "client.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    path = write(tmp_path, good_toml(tmp_path) + f'[mqtt.tls]\ncert_file = "{cert}"\n'
                 f'key_file = "{key}"\n')
    for file in (key, cert):
        file.chmod(0o644)
    status, _out, err = check(path, capsys)
    assert status == 0 and (f"mqtt.tls.key_file: {key} (mode 0644) may be read by any user "
                            "of this box, and holds the bridge's TLS private key") in err, err
    assert "mqtt.tls.cert_file" not in err, err  # (a certificate is public)
    key.chmod(0o640)
    status, _out, err = check(path, capsys)
    assert status == 0 and "may be read by" not in err, err


def test_a_secret_or_journal_other_users_may_read_is_a_warning(tmp_path, capsys):
    """Any user of the box may read it: a warning. Its group may: none, since a secret outside
    the credentials directory is root:poi-bridge 0640 so that the daemon's user can read it,
    and `chmod 600` would stop the daemon."""
    secret = tmp_path / "pw"
    secret.write_text("secret\n")
    journal = tmp_path / "journal.sqlite3"
    files = (secret, journal, tmp_path / "journal.sqlite3-wal", tmp_path / "journal.sqlite3-shm")
    for file in files[1:]:
        file.write_bytes(b"")
    path = write(tmp_path, good_toml(tmp_path) +
                 f'[mqtt]\nusername = "u"\npassword_file = "{secret}"\n')
    for mode in (0o640, 0o600):
        for file in files:
            file.chmod(mode)
        status, _out, err = check(path, capsys)
        assert status == 0 and "may be read by" not in err and "chmod" not in err, err
    for mode in (0o644, 0o604):
        for file in files:
            file.chmod(mode)
        status, _out, err = check(path, capsys)
        assert status == 0, err
        assert (f"warning: mqtt.password_file: {secret} (mode 0{mode:o}) may be read by "
                f"any user of this box, and holds a secret: chmod o-r {secret}") in err, err
        assert (f"journal: {journal} (mode 0{mode:o}) may be read by any user of this box, "
                f"and holds the terminals' answers (card data, receipts): chmod o-r {journal}"
                ) in err, err
        assert f"{journal}-wal (mode 0{mode:o})" in err, err
        assert f"{journal}-shm (mode 0{mode:o})" in err, err


def test_a_secret_the_daemons_user_may_not_read_is_an_error_even_for_root(
        tmp_path, capsys, monkeypatch):
    """check-config, run as root, read a root-only password file and said OK; the daemon, as
    its own user, could not, and stopped at start. (nobody stands in for poi-bridge, which
    this box does not have.)"""
    monkeypatch.setattr(deployment_module, "DAEMON_USER", "nobody")
    source = tmp_path / "etc-credentials"  # stands for /etc/poi-bridge/credentials
    source.mkdir(mode=0o700)
    monkeypatch.setattr(deployment_module, "CREDENTIAL_SOURCE", source)
    secret = source / "mqtt-password"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    path = write(tmp_path, good_toml(tmp_path)
                 + f'[mqtt]\nusername = "u"\npassword_file = "{secret}"\n')
    status, out, err = check(path, capsys)
    assert status == 2 and "OK" not in out, (out, err)
    assert "user nobody, whom the daemon runs as, may not" in err, err
    assert ("name the credential systemd makes from it instead: "
            "/run/credentials/poi-bridge.service/secret_mqtt-password") in err, err
    # A file the daemon's user can read is fine.
    readable = Path(tempfile.mkdtemp(dir="/tmp")) / "mqtt-password"
    try:
        readable.parent.chmod(0o755)
        readable.write_text("pw\n")
        readable.chmod(0o644)
        path = write(tmp_path, good_toml(tmp_path)
                     + f'[mqtt]\nusername = "u"\npassword_file = "{readable}"\n')
        status, out, err = check(path, capsys)
        assert status == 0 and "may not" not in err, err
    finally:
        shutil.rmtree(readable.parent)


def test_an_unreadable_secret_is_a_warning_that_says_why(tmp_path, capsys, monkeypatch):
    """check-config may run as another user than the daemon: EACCES is no proof."""
    secret = tmp_path / "pw"
    secret.write_text("x\n")
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == secret:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    path = write(tmp_path, good_toml(tmp_path) +
                 f'[mqtt]\nusername = "u"\npassword_file = "{secret}"\n')
    status, _out, err = check(path, capsys)
    assert status == 0, err
    assert f"warning: mqtt.password_file: cannot read {secret}: Permission denied" in err, err
    assert "as uid" in err and "the daemon reads it as its own user" in err, err


@pytest.mark.parametrize("content", [b"", b"\n", b"\xff\xfe p\xe4ss\n",
                                     b"\xef\xbb\xbf\n"])  # (a byte order mark alone: empty)
def test_an_empty_or_undecodable_secret_is_an_error(tmp_path, capsys, content):
    secret = tmp_path / "pw"
    secret.write_bytes(content)
    path = write(tmp_path, good_toml(tmp_path) +
                 f'[mqtt]\nusername = "u"\npassword_file = "{secret}"\n')
    status, _out, err = check(path, capsys)
    assert status == 2 and "mqtt.password_file:" in err, err


def test_two_terminals_on_one_device_is_an_error(tmp_path, capsys):
    device = tmp_path / "ttyACM0"
    device.touch()
    alias = tmp_path / "terminal"
    alias.symlink_to(device)
    text = (f'journal = "{tmp_path / "j.sqlite3"}"\n'
            f'[[terminals]]\npoi_id = "A-1"\n[terminals.link]\nkind = "serial"\ndevice = "{device}"\n'
            f'[[terminals]]\npoi_id = "B-2"\n[terminals.link]\nkind = "tcp"\nhost = "h"\nport = 1\n'
            f'[[terminals]]\npoi_id = "C-3"\n[terminals.link]\nkind = "serial"\ndevice = "{alias}"\n')
    status, out, err = check(write(tmp_path, text), capsys)
    assert status == 2, (out, err)
    assert "terminals[2].link.device:" in err and "terminals[0] (A-1)" in err, err


def test_the_ok_summary_names_each_link_once(tmp_path, capsys):
    text = (f'journal = "{tmp_path / "j.sqlite3"}"\n'
            '[[terminals]]\npoi_id = "A-1"\n[terminals.link]\nkind = "usb"\n'
            'vendor_id = "0x0b00"\nproduct_id = "0x0084"\n'
            '[[terminals]]\npoi_id = "B-2"\n[terminals.link]\nkind = "tcp"\nhost = "h"\n'
            'port = 1\n')
    status, out, err = check(write(tmp_path, text), capsys)
    assert status == 0, err
    assert "  A-1: usb 0b00:0084, framer" in out, out  # was "usb usb 0b00:0084"
    assert "  B-2: tcp h:1, framer" in out, out


def test_a_frame_larger_than_the_bridge_publishes_is_refused():
    """A terminal's answer is published in one MQTT packet of at most mqtt.packet_limit (the
    broker's max_packet_size in the example): a larger one made the broker drop the bridge
    at every reconnect."""
    tcp = {"kind": "tcp", "host": "10.0.0.5", "port": 8443}
    fits = parse_config({"terminals": [{"poi_id": "A-1", "link": tcp,
                                        "framer": {"max_frame_size": 256 * 1024}}]})
    assert fits.terminals[0].framer.max_frame_size == 256 * 1024
    found = problems({"terminals": [{"poi_id": "A-1", "link": tcp,
                                     "framer": {"max_frame_size": 1024 * 1024}}]})
    assert len(found) == 1 and found[0].startswith(
        "terminals: terminals[0].framer.max_frame_size 1048576 is more than "), found
    assert "raise mqtt.max_payload" in found[0], found
    raised = parse_config({"mqtt": {"max_payload": 1024 * 1024},
                           "terminals": [{"poi_id": "A-1", "link": tcp,
                                          "framer": {"max_frame_size": 1024 * 1024}}]})
    assert raised.mqtt.packet_limit > 1024 * 1024  # room made: accepted


def test_no_terminal_is_an_error(tmp_path, capsys):
    status, _out, err = check(write(tmp_path, f'journal = "{tmp_path / "j"}"\n'), capsys)
    assert status == 2 and "terminals: no [[terminals]]" in err, err


@pytest.mark.parametrize("host", ["10.0.0.5 ", " 10.0.0.5", "", "10.0.0.5 8443"])
def test_a_tcp_host_with_spaces_is_refused(host):
    found = problems({"terminals": [terminal(kind="tcp", host=host, port=8443)]})
    assert len(found) == 1 and found[0].startswith("terminals[0].link.host: "), found
    found = problems({"mqtt": {"host": host}})
    assert found[0].startswith("mqtt.host: "), found


@pytest.mark.parametrize("host", ["mqtt://localhost", "mqtts://broker.lan:8883",
                                  "10.0.0.5:1883", "broker.lan:1883", "[::1]:1883", "[::1]"])
def test_a_host_written_as_a_url_or_with_its_port_is_refused(host):
    """check-config said OK, and the daemon tried for ever: 'Name or service not known'."""
    for found, place in ((problems({"mqtt": {"host": host}}), "mqtt.host"),
                         (problems({"terminals": [terminal(kind="tcp", host=host, port=1)]}),
                          "terminals[0].link.host")):
        assert found == [f'{place}: host "{host}" is not a host name or address: write the '
                         'name or address alone, e.g. host = "10.0.0.5" (the port has its own '
                         'key, TLS its own [mqtt.tls] table)'], found
    assert parse_config({"mqtt": {"host": "fe80::1"}}).mqtt.host == "fe80::1"  # IPv6


def test_an_empty_username_or_a_sale_id_no_topic_can_hold_is_refused():
    """Both passed check-config: the daemon logged in without a user name, and a register
    named 'TILL/2' was allowed and could never be answered."""
    assert problems({"mqtt": {"username": "", "password_file": "/x"}}) == [
        "mqtt.username: username is empty: name the broker user the bridge logs in as, or "
        "remove the key to log in without one"]
    found = problems({"terminals": [{**terminal(), "allowed_sale_ids": ["TILL1", "TILL/2"]}]})
    assert len(found) == 1 and found[0].startswith(
        "terminals[0].allowed_sale_ids: 'TILL/2' cannot be a register's SaleID"), found


def test_a_usb_transfer_wait_too_short_to_idle_on_is_refused():
    """A USB review: the link's `timeout` took any value above 0: at 0.0001 s an idle
    terminal's read was polled so often it took a fifth of a core, and a write gave up
    while the terminal was busy for a moment."""
    found = problems(with_setting("usb", "timeout", 0.0001))
    assert found == ["terminals[0].link.timeout: must be more than 0.01 s and at most 60 s "
                     "(1 minute); shorter, an idle terminal is polled hundreds of times a "
                     "second; got 0.0001"], found
    parse_config(with_setting("usb", "timeout", 0.02))


@pytest.mark.parametrize(("base_topic", "why"), [
    ("$SYS/poi", "it starts with '$', which brokers keep for their own topics ($SYS)"),
    ("", "it is empty"), ("/poi", "it starts with '/'"), ("poi/", "it ends with '/'"),
    ("poi/+/x", "it holds the wildcard '+'"), ("poi/#", "it holds the wildcard '#'"),
    ("poi\tstore", "it holds a control character")])
def test_a_base_topic_no_bridge_can_use_is_refused_saying_why(base_topic, why):
    """A technician's review: base_topic "$SYS/poi" passed check-config, and everything after
    blamed something else (the bridge's own state never came back, status said the ACL
    refused it): a broker drops what a client publishes under $. The refusal said only
    "must be a plain topic prefix", never which character was wrong."""
    assert problems({"mqtt": {"base_topic": base_topic}}) == [
        f"mqtt.base_topic: base_topic must be a plain topic prefix like 'poi/store-12': {why}"]
    assert parse_config({"mqtt": {"base_topic": "poi/$store"}}).mqtt.base_topic == "poi/$store"


@pytest.mark.parametrize(("journal", "fragment"), [
    ("/proc/journal.sqlite3", "not on a disk"),
    ("/sys/kernel/journal.sqlite3", "not on a disk"),
    ("{tmp}/file/no/such/journal.sqlite3", "not a directory"),
    ("{tmp}", "is a directory"),
    ("{tmp}/file/journal.sqlite3", "not a directory"),
])
def test_a_journal_that_cannot_be_kept_is_an_error(tmp_path, capsys, journal, fragment):
    (tmp_path / "file").write_text("")
    text = good_toml(tmp_path).replace(str(tmp_path / "journal.sqlite3"),
                                       journal.format(tmp=tmp_path))
    status, _out, err = check(write(tmp_path, text), capsys)
    assert status == 2 and "journal: " in err and fragment in err, err


def test_a_journal_the_user_cannot_write_is_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(deployment_module.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(deployment_module.os, "access", lambda *a, **k: False)
    status, _out, err = check(write(tmp_path, good_toml(tmp_path)), capsys)
    assert status == 0, err
    assert "warning: journal: cannot write in" in err and "as uid" in err, err


def test_a_missing_journal_directory_is_said_to_be_made_and_the_journal_makes_it(
        tmp_path, capsys, caplog):
    """Field review: the daemon logged an ERROR at start, "directory ... does not exist:
    create it", and the journal then made the directory itself and ran. Both now say the
    same: check-config and the daemon's start that it will be made, the journal that it
    was, mode 0700 (it holds the terminals' answers)."""
    import logging

    from bridge.daemon.journal import Journal

    journal = tmp_path / "no" / "such" / "dir" / "journal.sqlite3"
    text = good_toml(tmp_path).replace(str(tmp_path / "journal.sqlite3"), str(journal))
    status, _out, err = check(write(tmp_path, text), capsys)
    assert status == 0, err
    made = (f"warning: journal: directory {journal.parent} does not exist: the daemon "
            "creates it (mode 0700) when it opens the journal")
    assert made in err, err
    errors, warnings = deployment_module.deployment_problems(load_config(tmp_path / "bridge.toml"),
                                                             for_daemon=True)
    assert not errors, errors
    assert any(w.startswith(f"journal: directory {journal.parent} does not exist: the daemon "
                            "creates it (mode 0700)") for w in warnings), warnings
    with caplog.at_level(logging.INFO, logger="poi_bridge.journal"):
        Journal(journal).close()
    assert f"created directory {journal.parent} (mode 0700) for the journal" in caplog.messages
    for level in (journal.parents[2], journal.parents[1], journal.parent):
        assert level.stat().st_mode & 0o777 == 0o700, level


def test_a_journal_directory_that_cannot_be_made_is_an_error(tmp_path, monkeypatch):
    """Only a directory the daemon cannot make is an error at its start (a parent it may not
    write in)."""
    monkeypatch.setattr(deployment_module.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(deployment_module.os, "access", lambda *a, **k: False)
    journal = tmp_path / "no" / "journal.sqlite3"
    text = good_toml(tmp_path).replace(str(tmp_path / "journal.sqlite3"), str(journal))
    errors, _ = deployment_module.deployment_problems(
        load_config(write(tmp_path, text)), for_daemon=True)
    assert [e for e in errors if e.startswith(
        f"journal: directory {journal.parent} does not exist, and cannot be made: cannot "
        f"write in {tmp_path} as ")], errors


@pytest.mark.skipif(os.geteuid() != 0, reason="check-config as root, as the README says")
def test_a_mistyped_journal_directory_the_daemons_user_cannot_make_is_an_error_for_root(
        tmp_path, capsys, monkeypatch):
    """Review: check-config run as root (the README's way) said of a mistyped
    /var/lib/poi-brige "the daemon creates it", exit 0, because root may write in /var/lib;
    the daemon, as its own user, cannot, and refused to start. Judged for the daemon's user
    (the unit's User=; nobody stands in for it, which this box does not have)."""
    assert unit_settings(UNIT)["Service"]["User"] == [deployment_module.DAEMON_USER]
    monkeypatch.setattr(deployment_module, "DAEMON_USER", "nobody")
    typo = Path("/var/lib/poi-brige")
    if typo.exists():
        pytest.skip(f"{typo} exists on this box")
    text = good_toml(tmp_path).replace(str(tmp_path / "journal.sqlite3"),
                                       f"{typo}/journal.sqlite3")
    status, out, err = check(write(tmp_path, text), capsys)
    assert status == 2 and "OK" not in out, (out, err)
    assert (f": journal: directory {typo} does not exist, and the daemon cannot make it: "
            "user nobody, whom the daemon runs as, may not write in /var/lib (") in err, err
    assert "the daemon creates it" not in err, err
    # A parent the daemon's user may write in (here /tmp, anyone's): made at its start
    missing = Path(tempfile.mkdtemp()) / "not-yet"
    missing.parent.rmdir()
    text = good_toml(tmp_path).replace(str(tmp_path / "journal.sqlite3"),
                                       f"{missing}/journal.sqlite3")
    status, _out, err = check(write(tmp_path, text), capsys)
    assert status == 0, err
    assert f"warning: journal: directory {missing} does not exist: the daemon creates it" \
        in err, err


def test_the_default_journal_directory_is_made_by_systemd(tmp_path, capsys, monkeypatch):
    state = tmp_path / "var-lib-poi-bridge"  # not there yet: StateDirectory= makes it
    monkeypatch.setattr(deployment_module, "STATE_DIRECTORY", state)
    text = good_toml(tmp_path).replace(str(tmp_path / "journal.sqlite3"),
                                       str(state / "journal.sqlite3"))
    status, _out, err = check(write(tmp_path, text), capsys)
    assert status == 0 and not err, err


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          env=python_env(), cwd=ROOT, timeout=60, check=False)


def test_a_config_that_is_not_utf8_is_one_clear_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(good_toml(tmp_path).encode() + '# café\n'.encode("latin-1"))
    for argv in (("check-config", str(path)), ("run", "--config", str(path))):
        done = cli(*argv)
        err = done.stderr.decode()
        assert done.returncode == 2, (argv, err)
        assert "Traceback" not in err and "not UTF-8" in err and "line " in err, (argv, err)


# --- 4. messages that say what to do -------------------------------------------------------------

def test_a_top_level_key_after_a_table_says_to_move_it(tmp_path):
    found = problems(tomllib.loads('[mqtt]\nhost = "h"\nlog_level = "debug"\n'))
    assert found == [("mqtt.log_level: unknown key log_level in [mqtt]; log_level is a "
                      "top-level key: move it above the first [table] header (a key belongs "
                      "to the last table header above it)")], found


def test_a_terminal_key_after_its_link_table_says_to_move_it():
    data = tomllib.loads('[[terminals]]\npoi_id = "V400m-1"\n[terminals.link]\nkind = "tcp"\n'
                         'host = "h"\nport = 1\npayment_timeout = 60\n')
    (found,) = problems(data)
    assert found.startswith("terminals[0].link.payment_timeout: unknown key payment_timeout in "
                            "[terminals.link]; payment_timeout is a [[terminals]] key: move it "
                            "above [terminals.link]"), found


def test_an_unknown_key_suggests_a_near_one():
    (found,) = problems({"mqtt": {"keepalve": 30}})
    assert "unknown key keepalve in [mqtt]" in found and "keepalive" in found, found


def test_a_link_without_kind_lists_the_kinds():
    (found,) = problems({"terminals": [{"poi_id": "V400m-1",
                                        "link": {"device": "/dev/poi/verifone-1"}}]})
    assert found.startswith("terminals[0].link: ") and "kind" in found, found
    assert '"serial", "tcp" or "usb"' in found and 'kind = "serial"' in found, found
    (found,) = problems({"terminals": [terminal(kind="rs232", device="/dev/x")]})
    assert '"serial", "tcp" or "usb"' in found, found


def test_a_duplicate_poiid_names_both_places():
    (found,) = problems({"terminals": [terminal("A-1"), terminal("B-1"), terminal("A-1")]})
    assert found.startswith("terminals: "), found
    assert "A-1" in found and "terminals[0]" in found and "terminals[2]" in found, found


@pytest.mark.parametrize(("table", "line", "place"), [
    ("[mqtt]", 'keepalive = "30"', "mqtt.keepalive"),
    ("[mqtt]", 'port = "1883"', "mqtt.port"),
    ("[mqtt]", "keepalive = 30.0", "mqtt.keepalive"),
    ("[mqtt]", 'health_interval = "30"', "mqtt.health_interval"),
    ("[terminals.framer]", 'max_tries = "3"', "terminals[0].framer.max_tries"),
    ("[terminals.link]", 'baudrate = "9600"', None),
    ("[mqtt.tls]", 'check_hostname = "false"', "mqtt.tls.check_hostname"),
])
def test_numbers_and_booleans_must_be_toml_values(tmp_path, table, line, place):
    if table == "[terminals.link]":
        text = ('[[terminals]]\npoi_id = "V400m-1"\n[terminals.link]\nkind = "serial"\n'
                f'device = "/dev/x"\n{line}\n')
        place = "terminals[0].link.baudrate"
    elif table == "[terminals.framer]":
        text = good_toml(tmp_path) + f"{table}\n{line}\n"
    else:
        text = f"{table}\n{line}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    (found,) = caught.value.problems
    assert found.startswith(f"{place}: "), found
    assert "without quotes" in found or "whole number" in found, found


@pytest.mark.parametrize(("data", "said"), [
    ({"journal": 3},
     'journal: give a file path as a string, e.g. journal = "/var/lib/poi-bridge/journal.sqlite3"'),
    ({"journal": True},
     'journal: give a file path as a string, e.g. journal = "/var/lib/poi-bridge/journal.sqlite3"'),
    ({"mqtt": {"password_file": 5}},
     'mqtt.password_file: give a file path as a string, e.g. password_file = "/path/to/file"'),
], ids=["journal-number", "journal-boolean", "password-file"])
def test_a_path_written_as_a_number_or_boolean_says_to_quote_a_path(data, said):
    """Not pydantic's "Input is not a valid path for <class 'pathlib.Path'>": a Python type
    means nothing to whoever edits the file."""
    assert problems(data) == [said]


def test_python_callers_may_still_pass_strings_for_numbers():
    """`poi-bridge register --broker host:1883` builds the MQTT settings from text: the
    TOML rule is for the file."""
    from bridge.config import MqttConfig
    assert MqttConfig.model_validate({"port": "1883"}).port == 1883


def test_a_journal_directory_only_the_daemon_may_enter_is_a_warning_not_a_crash(tmp_path):
    """The unit's StateDirectoryMode=0700 keeps other users out of /var/lib/poi-bridge once
    the service has run; pathlib's is_dir() then raises PermissionError, which ended
    check-config, run as an ordinary user, with a traceback."""
    import shutil
    import tempfile

    nobody = as_nobody("check-config")

    # (pytest's own tmp_path lives under a root-only directory)
    tmp_path = Path(tempfile.mkdtemp(prefix="poi-check-config-"))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = tmp_path / "poi-bridge.toml"
    config.write_text(f'journal = "{state}/journal.sqlite3"\n'
                      '[[terminals]]\npoi_id = "V400m-1"\n'
                      '[terminals.link]\nkind = "tcp"\nhost = "192.0.2.1"\nport = 8443\n')
    tmp_path.chmod(0o755)
    config.chmod(0o644)
    done = subprocess.run(
        [*nobody, sys.executable, "-m", "bridge", "check-config", str(config)],
        capture_output=True, text=True, cwd="/", env=python_env(), timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.rmtree(tmp_path)
    said = done.stdout + done.stderr
    assert "cannot look at" in said and "uid 65534" in said


@pytest.mark.parametrize("device", ["/dev/tty\u0000USB0", "", "/dev/tty\nUSB0"])
def test_a_serial_device_that_is_not_a_printable_path_is_refused(device):
    """A NUL in a device path crashed check-config (realpath: embedded null byte)."""
    with pytest.raises(ConfigError, match="terminals\\[0\\].link.device: .*printable"):
        parse_config({"journal": "/var/lib/poi-bridge/journal.sqlite3", "terminals": [
            {"poi_id": "V400m-1", "link": {"kind": "serial", "device": device}}]})


def test_a_usb_terminal_without_serial_beside_its_twin_with_one_is_a_warning(tmp_path, capsys):
    """Two terminals of one model on USB, one configured with its serial and one without: the
    second takes any device with those ids, so with both plugged in it cannot tell which is
    its own and stays offline. check-config said OK."""
    usb = '[terminals.link]\nkind = "usb"\nvendor_id = 0x11ca\nproduct_id = 0x0219\n'
    text = (f'journal = "{tmp_path / "journal.sqlite3"}"\n'
            f'[[terminals]]\npoi_id = "V400m-1"\n{usb}serial = "324688179"\n'
            f'[[terminals]]\npoi_id = "V400m-2"\n{usb}')
    status, _out, err = check(write(tmp_path, text), capsys)
    assert status == 0, err
    assert ("warning: terminals[1].link: V400m-2 has no serial, and V400m-1 has the same usb "
            "11ca:0219") in err, err
    assert "set its serial" in err
    # each with its serial: nothing to say
    text = text.rstrip("\n") + '\nserial = "324688180"\n'
    _status, _out, err = check(write(tmp_path, text), capsys)
    assert "has no serial" not in err, err


def test_usb_twins_told_apart_by_port_are_neither_one_device_nor_warned_of(tmp_path, capsys):
    """Two terminals of one model that report no serial number, configured by port: not "the
    link of" each other, no warning. A third without serial or port beside them is."""
    usb = '[terminals.link]\nkind = "usb"\nvendor_id = "0x11ca"\nproduct_id = "0x0219"\n'
    text = (f'journal = "{tmp_path / "journal.sqlite3"}"\n'
            f'[[terminals]]\npoi_id = "V400m-1"\n{usb}port = "1-1.4"\n'
            f'[[terminals]]\npoi_id = "V400m-2"\n{usb}port = "1-1.5"\n')
    status, _out, err = check(write(tmp_path, text), capsys)
    assert status == 0, err
    assert "has no serial" not in err and "also the link of" not in err, err
    _status, _out, err = check(write(tmp_path, text.replace('"1-1.5"', '"1-1.4"')), capsys)
    assert "terminals[1].link.port: usb 11ca:0219 port 1-1.4 interface 0 is also the link " \
        "of terminals[0]" in err, err
    text += f'[[terminals]]\npoi_id = "V400m-3"\n{usb}'
    status, _out, err = check(write(tmp_path, text), capsys)
    assert status == 0, err
    assert ("warning: terminals[2].link: V400m-3 has no serial, and V400m-1, V400m-2 has the "
            "same usb 11ca:0219") in err, err
    assert "or its port" in err


def test_a_serial_device_that_does_not_exist_now_is_a_warning(tmp_path, capsys):
    """A mistyped /dev path looked like an unplugged cable, and check-config said OK. Not an
    error: udev makes the node when the terminal is plugged in."""
    text = (f'journal = "{tmp_path / "journal.sqlite3"}"\n'
            '[[terminals]]\npoi_id = "V400m-1"\n'
            '[terminals.link]\nkind = "serial"\ndevice = "/dev/poi/verifone-00000000"\n')
    status, _out, err = check(write(tmp_path, text), capsys)
    assert status == 0, err
    assert ("warning: terminals[0].link.device: /dev/poi/verifone-00000000 does not exist now "
            "(V400m-1): the terminal is unplugged or switched off, or the path is wrong") in err
    assert "poi-bridge devices" in err
    _status, _out, err = check(write(tmp_path, text.replace("/dev/poi/verifone-00000000",
                                                            "/dev/null")), capsys)
    assert "does not exist now" not in err, err


def test_a_status_timeout_within_the_links_own_retries_is_a_warning(tmp_path, capsys):
    """status_timeout 1 s with a framer that tries a frame 3 x 0.5 s: a poll is given up on
    while its frame may still reach the terminal (found by the soak, seed 8)."""
    short = good_toml(tmp_path, extra_terminal='status_timeout = 1.0\n'
                      '[terminals.framer]\nack_timeout = 0.5\nmax_tries = 3\n')
    status, _out, err = check(write(tmp_path, short), capsys)
    assert status == 0, err
    assert ("warning: terminals[0].status_timeout: 1 s is not more than the link's own tries "
            "of one frame (3 x ack_timeout 0.5 s)") in err, err
    _status, _out, err = check(write(tmp_path, good_toml(tmp_path)), capsys)  # the defaults
    assert "terminals[0].status_timeout" not in err, err


def test_time_outs_shorter_than_a_big_answers_line_time_are_a_warning(tmp_path, capsys):
    """A slow serial line: a status answer with the payment's receipts (16 KB) takes 68 s at
    2400 baud, longer than status_timeout (30 s): every such poll would be given up on
    while its answer is still on the wire, the payment left unresolved."""
    def serial(baudrate: int) -> str:
        return good_toml(tmp_path).replace(
            'kind = "tcp"\nhost = "10.0.0.5"\nport = 8443\n',
            f'kind = "serial"\ndevice = "/dev/null"\nbaudrate = {baudrate}\n')

    status, _out, err = check(write(tmp_path, serial(2400)), capsys)
    assert status == 0, err
    assert ("warning: terminals[0].status_timeout: 30 s is less than twice the time an answer "
            "of 16 KB (a payment's record with its receipts) takes on this link (68 s at "
            "2400 baud)") in err, err
    assert "terminals[0].payment_timeout: 120 s is less than twice" in err, err
    _status, _out, err = check(write(tmp_path, serial(115200)), capsys)
    assert "takes on this link" not in err, err


def test_mqtt_protocol_5_may_be_written_as_a_number(tmp_path, capsys):
    """`protocol = 5` unquoted was refused ("Input should be '3.1.1' or '5'"), which reads
    as if 5 were not allowed. The number 5 is MQTT 5; 3.1.1 cannot be a TOML number, and
    another number says to quote it."""
    status, _out, err = check(write(tmp_path, good_toml(tmp_path, top="[mqtt]\nprotocol = 5\n")),
                              capsys)
    assert status == 0, err
    assert parse_config({"mqtt": {"protocol": 5}}).mqtt.protocol == "5"
    status, _out, err = check(write(tmp_path, good_toml(tmp_path,
                                                        top="[mqtt]\nprotocol = 3.1\n")), capsys)
    assert status != 0
    assert 'mqtt.protocol: must be "3.1.1" or "5", in quotes: protocol = "3.1.1"' in err, err


# --- 3. the configuration audit: values that passed check-config and failed in service ---------

def test_a_frame_size_no_real_answer_fits_is_refused():
    """max_frame_size = 1024 passed (the floor was 256 bytes): a payment the terminal
    approved stayed unresolved for good, its status answers (a payment's record with its
    receipts: 11-12 KB, more encrypted) dropped as oversize or line noise."""
    from bridge.config import MIN_FRAME_SIZE

    for size in (256, 1024, MIN_FRAME_SIZE - 1):
        (found,) = problems({"terminals": [{**terminal(), "framer": {"max_frame_size": size}}]})
        assert found.startswith("terminals[0].framer.max_frame_size: "), found
        assert f"at least {MIN_FRAME_SIZE} bytes" in found and f"got {size}" in found, found
        assert "receipts" in found, found  # why: what an answer holds
    fixture = Path("/work/shared/fixtures/adyen/dotnet-pospayment-success.json")
    if fixture.exists():  # a payment's answer with its receipts, as the vendor sends it
        assert MIN_FRAME_SIZE >= 2 * fixture.stat().st_size
    assert parse_config({"terminals": [{**terminal(), "framer": {
        "max_frame_size": MIN_FRAME_SIZE}}]}).terminals[0].framer.max_frame_size == MIN_FRAME_SIZE


def test_a_reconcile_deadline_before_a_payment_can_be_unresolved_is_refused():
    """reconcile_deadline = 24 (seconds, meant as hours?) passed: a payment became unresolved
    after payment_timeout + resync_attempts x status_timeout, and was given up on at its
    first background poll."""
    (found,) = problems({"terminals": [{**terminal(), "reconcile_deadline": 24}]})
    assert found.startswith("terminals[0]: reconcile_deadline (24 s) "), found
    # the defaults: in_progress_limit's 600 (longer than 120 + 2 x 30) + 10
    assert "610 s" in found and "in_progress_limit 600 (its default)" in found \
        and "reconcile_initial" in found, found
    assert parse_config({"terminals": [{**terminal(), "reconcile_deadline": 610}]})
    # polled longer than the terminal may say it is in progress: the polls count
    (found,) = problems({"terminals": [{**terminal(), "reconcile_deadline": 24,
                                        "in_progress_limit": 150}]})
    assert "190 s" in found and "payment_timeout 120 + resync_attempts 2" in found, found


def test_a_reconcile_deadline_before_in_progress_limit_is_refused():
    """Review rev6: a payment the terminal keeps saying is in progress becomes unresolved
    only at in_progress_limit; a reconcile_deadline shorter gave it up at its first
    background poll, which the floor, counted from the status polls alone, let pass."""
    (found,) = problems({"terminals": [{**terminal(), "in_progress_limit": 3600,
                                        "reconcile_deadline": 1800}]})
    assert "reconcile_deadline (1800 s)" in found and "3610 s: in_progress_limit 3600 " \
        in found, found


def test_run_takes_a_value_below_a_new_floor_at_the_floor_and_says_so():
    """What `run` loads (load_config's `raised`): a value an earlier bridge ran below a
    floor added since is taken at the floor and noted with its place, POIID and what to
    set, while check-config's parse refuses it as above. Any other problem still refuses."""
    from bridge.config import MIN_FRAME_SIZE

    data = {"terminals": [terminal(), {**terminal("P400-2"), "reconcile_deadline": 24,
                                       "framer": {"max_frame_size": 1024}}]}
    raised: list[str] = []
    config = parse_config(data, raised=raised)
    second = config.terminals[1]
    assert second.framer.max_frame_size == MIN_FRAME_SIZE and second.reconcile_deadline == 610
    assert config.terminals[0].reconcile_deadline == 24 * 3600  # untouched
    assert data["terminals"][1]["reconcile_deadline"] == 24  # the caller's data as it was
    frame, deadline = raised
    assert frame.startswith("terminals[1].framer.max_frame_size (P400-2): must be at least "
                            f"{MIN_FRAME_SIZE} bytes; got 1024"), frame
    assert frame.endswith(f"the bridge runs with max_frame_size = {MIN_FRAME_SIZE} "
                          "(check-config refuses this file: set max_frame_size = "
                          f"{MIN_FRAME_SIZE} or more)"), frame
    assert deadline.startswith("terminals[1] (P400-2): reconcile_deadline (24 s)"), deadline
    assert "runs with reconcile_deadline = 610 " in deadline, deadline
    assert len(problems(data)) == 1  # the frame size: the terminal's own check waits for it

    other = {"terminals": [{**terminal(), "reconcile_deadline": 24, "payment_timeout": -1}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(other, raised=(kept := []))
    assert kept == [] and "payment_timeout" in caught.value.problems[0], caught.value.problems


def test_one_usb_serial_written_as_udev_writes_it_and_as_the_device_says_it_is_one_device():
    """"AB 12" (as the device reports it) and "AB_12" (as udev and `poi-bridge devices` write
    it) both find the device: two terminals configured so were not seen on one device."""
    from bridge.deployment import deployment_problems

    usb = {"kind": "usb", "vendor_id": "0x0b00", "product_id": "0x0080"}
    config = parse_config({"journal": "/var/lib/poi-bridge/journal.sqlite3", "terminals": [
        terminal("V400m-1", **usb, serial="AB 12"), terminal("V400m-2", **usb, serial="AB_12")]})
    errors, _warnings = deployment_problems(config)
    assert any(e.startswith("terminals[1].link.serial: usb 0b00:0080 serial AB_12") and
               "terminals[0] (V400m-1)" in e for e in errors), errors


@pytest.mark.parametrize(("link", "fragment"), [
    ({"kind": "serial", "device": "ttyUSB0"},
     ('terminals[0].link.device: "ttyUSB0" is not an absolute path: write the full path, '
      'e.g. device = "/dev/ttyUSB0"')),
    ({"kind": "usb", "vendor_id": "0x0b00", "product_id": "0x0080", "serial": ""},
     "terminals[0].link.serial: is empty: write the terminal's serial number"),
])
def test_a_relative_serial_device_or_an_empty_usb_serial_is_refused(link, fragment):
    (found,) = problems({"terminals": [terminal(**link)]})
    assert found.startswith(fragment), found


@pytest.mark.parametrize("vendor_id", [0, True])
def test_a_usb_vendor_id_written_as_a_toml_number_that_is_no_id_is_refused(tmp_path, vendor_id):
    """`vendor_id = 0b00` unquoted is a TOML binary number, 0: the terminal was never found."""
    (found,) = problems({"terminals": [terminal(kind="usb", vendor_id=vendor_id,
                                                product_id="0x0080")]})
    assert found.startswith("terminals[0].link.vendor_id: "), found
    assert 'write it in quotes as lsusb shows it: vendor_id = "0x0b00"' in found, found
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, '[[terminals]]\npoi_id = "V400m-1"\nlink = {kind = "usb", '
                                    'vendor_id = 0b00, product_id = 0x0080}\n'))
    assert "vendor_id = \"0x0b00\"" in caught.value.problems[0], caught.value.problems


def test_a_negative_usb_interface_is_refused():
    (found,) = problems({"terminals": [terminal(kind="usb", vendor_id="0x0b00",
                                                product_id="0x0080", interface=-1)]})
    assert found.startswith("terminals[0].link.interface: "), found
    assert "got -1" in found, found


def test_a_number_where_text_is_meant_says_where_and_to_quote_it(tmp_path):
    """`serial = 324688179` unquoted was reported at `terminals[0].link`, without the key,
    and as "Input should be a valid string"."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, '[mqtt]\nusername = 42\n[[terminals]]\npoi_id = "V400m-1"\n'
                                    'allowed_sale_ids = [1]\nlink = {kind = "usb", vendor_id = '
                                    '"0x0b00", product_id = "0x0080", serial = 324688179}\n'))
    assert caught.value.problems == [
        'mqtt.username: must be text: write it in quotes, username = "42"',
        'terminals[0].link.serial: must be text: write it in quotes, serial = "324688179"',
        'terminals[0].allowed_sale_ids[0]: must be text: write it in quotes, "1"',
    ], caught.value.problems


def test_a_single_terminals_table_says_to_use_double_brackets(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, '[terminals]\npoi_id = "V400m-1"\n'
                                    'link = {kind = "tcp", host = "10.0.0.5", port = 8443}\n'))
    (found,) = caught.value.problems
    assert found.startswith("terminals: ") and "use [[terminals]], one table per terminal" in found


def test_an_empty_list_of_allowed_registers_is_refused():
    """`allowed_sale_ids = []` passed, and every register was refused."""
    (found,) = problems({"terminals": [{**terminal(), "allowed_sale_ids": []}]})
    assert found.startswith("terminals[0].allowed_sale_ids: "), found
    assert "leave the key out to allow every register" in found, found


def test_a_relative_journal_is_checked_where_the_unit_would_open_it(tmp_path, capsys,
                                                                   monkeypatch):
    """The unit runs the daemon from / (no WorkingDirectory=): check-config, run from the
    technician's directory, checked the journal there, and said nothing of where the service
    would keep it."""
    assert "WorkingDirectory" not in UNIT.read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "state").mkdir()  # there beside check-config, not under /
    text = good_toml(tmp_path).replace(str(tmp_path / "journal.sqlite3"),
                                       "state/journal.sqlite3")
    _status, _out, err = check(write(tmp_path, text), capsys)
    assert ("warning: journal: state/journal.sqlite3 is relative: poi-bridge.service runs the "
            "daemon from /, where it opens /state/journal.sqlite3; write the full path, e.g. "
            "/var/lib/poi-bridge/journal.sqlite3") in err, err
    assert "journal: directory /state does not exist" in err, err


@pytest.mark.parametrize("device", ["/dev/ttyUSB0", "/dev/ttyACM3"])
def test_a_usb_serial_port_by_its_kernel_name_is_a_warning(tmp_path, capsys, device):
    """Its adapter back as /dev/ttyUSB1 after a replug left the terminal offline, said only
    at DEBUG."""
    text = (f'journal = "{tmp_path / "j.sqlite3"}"\n'
            f'[[terminals]]\npoi_id = "Rs232-1"\n[terminals.link]\nkind = "serial"\n'
            f'device = "{device}"\n'
            f'[[terminals]]\npoi_id = "Rs232-2"\n[terminals.link]\nkind = "serial"\n'
            f'device = "/dev/ttyS0"\n')
    status, out, err = check(write(tmp_path, text), capsys)
    said = [line for line in err.splitlines() if "kernel's name" in line]
    assert len(said) == 1, err
    assert f"terminals[0].link.device: {device} (Rs232-1)" in said[0], said
    assert "/dev/serial/by-id/" in said[0] and "/dev/poi/" in said[0], said


def test_the_checks_across_terminals_come_once_each_terminal_passes_its_own():
    """README: check-config prints every problem "in two rounds": a file with a field error
    and a POIID configured twice was said to have only the field error (pydantic runs the
    list's checks once each item is valid). What the README says is what it does."""
    bad = {**terminal(), "status_timeout": -5}
    said = problems({"terminals": [bad, terminal()]})
    assert len(said) == 1 and "terminals[0].status_timeout" in said[0], said
    said = problems({"terminals": [terminal(), terminal()]})
    assert len(said) == 1 and "V400m-1 is configured twice" in said[0], said
    assert "in two\nrounds: the checks across terminals" in README.read_text()

"""The command line as a technician uses it: real processes, real files, exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.protocol.framing import make_framer

from .conftest import FIXTURES
from .rig import ROOT, as_nobody, python_env

KEY = ["--key-id", "CryptoKeyIdentifier12345", "--key-version", "1"]


def cli(*args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridge", *args], input=stdin,
                          capture_output=True, env=python_env(), cwd=ROOT, timeout=timeout)


def test_inspect_summarises_a_vendor_response():
    done = cli("inspect", str(FIXTURES / "dotnet-pospayment-cancelled.json"))
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert "SaleToPOIResponse  Payment Response" in out
    assert "ServiceID 16151" in out and "POIID MX925-260193322" in out
    assert "Result Failure / Cancel" in out and "outcome: cancelled" in out


def test_inspect_json_has_the_documented_fields():
    done = cli("inspect", "--json", str(FIXTURES / "dotnet-pospayment-transaction-status-response.json"))
    summary = json.loads(done.stdout)
    assert {k: summary[k] for k in ("category", "sale_id", "service_id", "poi_id", "result",
                                    "error_condition", "outcome")} == {
        "category": "TransactionStatus", "sale_id": "TOSIM_1_1_6", "service_id": "35543420",
        "poi_id": "P400Plus-12345678", "result": "Success", "error_condition": None,
        "outcome": "approved"}


def test_inspect_decrypts_the_vendor_fixture(tmp_path):
    secret = tmp_path / "passphrase"
    secret.write_text("p@ssw0rd123456\n")
    done = cli("inspect", "--json", *KEY, "--passphrase-file", str(secret),
               str(FIXTURES / "dotnet-pospayment-encrypted-success.json"))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["encrypted"] is True and summary["outcome"] == "approved"
    assert summary["service_id"] == "9739"


@pytest.mark.parametrize("args,stdin,fragment", [
    (["-"], b"{not json", "at line 1 column 2"),
    (["-"], b'{"Other": 1}', "expected one SaleToPOIRequest"),
    (["/no/such/file"], None, "cannot read"),
    ([str(FIXTURES / "dotnet-pospayment-encrypted-success.json")], None, "is encrypted"),
    ([*KEY, "--passphrase", "wrong", str(FIXTURES / "dotnet-pospayment-encrypted-success.json")],
     None, "cannot decrypt"),
    (["--frame", "stx-etx-lrc", "-"], b"\x00\x01garbage", "no complete stx-etx-lrc frame"),
    (["-"], b'{"errors":["Nexo Service: crypto error (3)"],"ServiceID":"-NULL-"}',
     "crypto error (3)"),
])
def test_inspect_bad_input_is_one_clear_line_and_exit_2(args, stdin, fragment):
    done = cli("inspect", *args, stdin=stdin)
    assert done.returncode == 2
    err = done.stderr.decode()
    assert fragment in err
    # (--passphrase on the command line is warned of, on a line of its own, first)
    warned = "--passphrase" in args
    assert ("warning: --passphrase shows the passphrase" in err) == warned, err
    assert len(err.strip().splitlines()) == 1 + warned and "Traceback" not in err
    assert "p@ssw0rd" not in err and "wrong" not in err.replace("wrong key", "")


@pytest.mark.parametrize("framer", ["stx-etx-lrc", "dle-crc16", "length-prefixed"])
def test_inspect_reads_a_captured_frame_stream(framer):
    payload = (FIXTURES / "java-payment-sync-success.json").read_bytes()
    payload = json.dumps(json.loads(payload), separators=(",", ":")).encode()
    capture = b"\x15\x06noise" + make_framer(framer).encode(payload) + b"\x04"
    if framer == "length-prefixed":
        capture = make_framer(framer).encode(payload)
    done = cli("inspect", "--json", "--frame", framer, "-", stdin=capture)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "approved"


def test_inspect_finds_the_frames_after_a_truncated_length_prefixed_one():
    """A capture where the link dropped mid-frame: the cut frame's length header claims more
    bytes than follow. At the end of the input nothing more comes, so it is rejected as on a
    stalled link, and the good frames its claim had swallowed are found."""
    framer = make_framer("length-prefixed")
    cut = framer.encode((FIXTURES / "dotnet-pospayment-success.json").read_bytes())[:200]
    capture = cut + b"".join(
        framer.encode((FIXTURES / name).read_bytes())
        for name in ("dotnet-pospayment-cancelled.json",
                     "dotnet-pospayment-transaction-status-response.json"))
    done = cli("inspect", "--json", "--frame", "length-prefixed", "-", stdin=capture)
    assert done.returncode == 0, done.stderr
    found = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [(s["category"], s["service_id"]) for s in found] == [
        ("Payment", "16151"), ("TransactionStatus", "35543420")]


def test_check_config_reports_every_problem_with_its_place(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('journal = "/tmp/j"\n[mqtt]\nport = 99999\nbogus = 1\n'
                   'transaction_retention = 3600\n'
                   '[[terminals]]\npoi_id = "nodash"\n[terminals.link]\nkind = "serial"\n'
                   'device = "/dev/ttyACM0"\nbaudrate = 0\n')
    done = cli("check-config", str(bad))
    assert done.returncode == 2
    err = done.stderr.decode()
    for place in ("mqtt.port", "mqtt.bogus", "terminals[0].poi_id", "terminals[0].link.baudrate",
                  "mqtt.transaction_retention"):
        assert place in err, err
    # Pruned sooner than the 48-hour ServiceID rule, a register's repeat would start again.
    assert "at least 48 hours" in err
    good = tmp_path / "good.toml"
    good.write_text('[[terminals]]\npoi_id = "V400m-1"\n[terminals.link]\nkind = "tcp"\n'
                    'host = "10.0.0.5"\nport = 8443\n')
    done = cli("check-config", str(good))
    assert done.returncode == 0 and b"V400m-1: tcp 10.0.0.5:8443" in done.stdout


def test_check_config_on_broken_toml():
    done = cli("check-config", "-")  # not a file
    assert done.returncode == 2 and b"cannot read" in done.stderr


def test_make_demo_runs_end_to_end_in_under_a_minute():
    started = time.monotonic()
    done = cli("demo", timeout=90)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    out = done.stdout.decode()
    assert "outcome APPROVED (source: terminal)" in out
    assert "outcome DECLINED (source: terminal)" in out
    assert "outcome APPROVED (source: status-poll)" in out
    assert "every payment reached the register" in out
    assert time.monotonic() - started < 60


async def test_demo_waits_for_the_bridge_subscription(monkeypatch, capsys):
    """On a loaded box the bridge's MQTT subscription can come up after the terminal's link;
    a payment published before it had no subscriber, and the demo waited 60 s for nothing
    (seen once in CI). The demo now waits for both."""
    import asyncio

    from bridge import demo
    from bridge.daemon.mqtt_client import PipelinedClient

    original = PipelinedClient.subscribe

    async def slow_subscribe(self, *args, **kwargs):
        await asyncio.sleep(1.5)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(PipelinedClient, "subscribe", slow_subscribe)
    assert await asyncio.wait_for(demo.demo(), 90) == 0
    assert "every payment reached the register" in capsys.readouterr().out


def test_demo_without_the_demo_extra_says_what_to_install():
    """Without amqtt (the [demo] extra) the demo ended in a ModuleNotFoundError traceback."""
    done = subprocess.run(
        [sys.executable, "-c", ("import sys; sys.modules['amqtt'] = None; "
                                "from bridge.cli import main; sys.exit(main(['demo']))")],
        capture_output=True, env=python_env(), cwd=ROOT, timeout=60, text=True, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "the [demo] extra" in done.stderr and "amqtt" in done.stderr
    assert "-m pip install '/path/to/poi-bridge[demo]'" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("case", ["scenario", "scenario-key", "scenario-toml", "passphrase",
                                  "tcp-port", "tcp-in-use", "link-dir", "scenario-file",
                                  "ledger-dir", "response-file", "response-not-json"])
def test_simulate_bad_input_is_one_clear_line_and_a_non_zero_exit(tmp_path, case):
    """Each of these was a traceback, or "bad scenario: 1 validation error for Scenario"
    without the key or the reason. A --ledger that cannot be written was found at exit (a
    traceback, the ledger lost), a --response-file that cannot be read at every request."""
    scenario = tmp_path / "scenario.toml"
    busy = _busy_port()
    args, fragment = {
        "scenario": (['[default]\ndelay = "soon"\n'],
                     "default.delay: Input should be a valid number"),
        "scenario-key": (['[[transactions]]\namount = 3.0\nnever_answr = true\n'],
                         "transactions.0.never_answr: Extra inputs are not permitted"),
        "scenario-toml": (['[default\n'], "scenario.toml: not valid TOML: "),
        "scenario-file": (["--scenario", str(tmp_path / "nope.toml")],
                          "nope.toml: cannot read: No such file or directory"),
        "passphrase": (["--key-id", "K1", "--passphrase-file", str(tmp_path / "none")],
                       (f"cannot read the passphrase file {tmp_path / 'none'}: "
                        "No such file or directory")),
        "tcp-port": (["--tcp", "127.0.0.1:notaport"],
                     "--tcp: 'notaport' is not a port number (HOST:PORT, e.g. 127.0.0.1:8443)"),
        "tcp-in-use": (["--tcp", f"127.0.0.1:{busy.getsockname()[1]}"],
                       f"cannot listen on 127.0.0.1:{busy.getsockname()[1]}: "),
        "link-dir": (["--link", str(tmp_path / "no" / "dir" / "terminal")],
                     (f"--link {tmp_path / 'no' / 'dir' / 'terminal'}: cannot make the link: "
                      "No such file or directory")),
        "ledger-dir": (["--tcp", "127.0.0.1:0", "--ledger", str(tmp_path / "no" / "ledger.json")],
                       (f"--ledger {tmp_path / 'no' / 'ledger.json'}: cannot write there: "
                        f"directory {tmp_path / 'no'} does not exist")),
        "response-file": (["--tcp", "127.0.0.1:0", "--response-file", str(tmp_path / "none")],
                          (f"--response-file {tmp_path / 'none'}: cannot read: "
                           "No such file or directory")),
        "response-not-json": (["--tcp", "127.0.0.1:0", "--response-file", str(scenario)],
                              f"--response-file {scenario}: not a JSON document: "),
    }[case]
    scenario.write_text("[default]\n")
    if case.startswith("scenario") and case != "scenario-file":
        scenario.write_text(args[0])
        args = ["--scenario", str(scenario)]
    try:
        done = subprocess.run([sys.executable, "-m", "bridge", "simulate", *args],
                              capture_output=True, env=python_env(), cwd=ROOT, timeout=30,
                              text=True, check=False)
    finally:
        busy.close()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("poi-bridge simulate: ") and fragment in done.stderr, (
        done.stderr)


def test_the_readme_inspect_example_is_what_inspect_says():
    """The README showed "line 1 column 24" for an `echo` that ends its line: the real
    message says "line 2 column 1". Run the example as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### `poi-bridge inspect`"):]
    lines = section.splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith("$ echo "))
    command, shown = lines[at][2:], lines[at + 1]
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=False,
                          env={**python_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == 2
    assert done.stderr.strip() == shown


def test_password_and_passphrase_files_are_described_as_they_are_read(tmp_path):
    """Help texts said "its first line", but the whole file is the password (read_secret:
    the file without its trailing line end). A two-line file is one password."""
    from bridge.config import read_secret
    from bridge.register_client import read_password

    secret = tmp_path / "secret"
    secret.write_text("first\nsecond\n")
    assert read_secret(secret, "x") == "first\nsecond" == read_password(secret)
    assert "first line" not in (read_password.__doc__ or "")
    for command in ("register", "simulate", "inspect"):
        done = cli(command, "--help")
        text = " ".join(done.stdout.decode().split())
        assert "first line" not in text
        assert "the whole file, without its trailing line end" in text, (command, text)


def test_ctrl_c_in_a_technicians_command_is_one_line_and_status_130(monkeypatch, capsys):
    """Ctrl-C in `status` or `resync` printed a KeyboardInterrupt traceback."""
    from bridge import cli, cli_status

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_status, "run_status", interrupted)
    assert cli.main(["status", "--config", "/nonexistent.toml"]) == 130
    assert capsys.readouterr().err == "poi-bridge status: interrupted\n"


def test_status_as_a_user_who_may_not_enter_the_state_directory_exits_2(tmp_path):
    """The unit's StateDirectoryMode=0700: `status` run as another user raised
    PermissionError from the journal's path check (exit 1, which means 'no daemon')."""
    import shutil
    import tempfile

    nobody = as_nobody("status")
    top = Path(tempfile.mkdtemp(prefix="poi-status-"))
    try:
        (top / "state").mkdir(mode=0o700)
        config = top / "poi-bridge.toml"
        config.write_text(f'journal = "{top}/state/journal.sqlite3"\n[[terminals]]\n'
                          'poi_id = "V400m-1"\nlink = {kind = "tcp", host = "192.0.2.1", '
                          'port = 8443}\n')
        top.chmod(0o755)
        config.chmod(0o644)
        done = subprocess.run([*nobody, sys.executable, "-m", "bridge", "status", "--config",
                               str(config)],
                              capture_output=True, text=True, cwd="/", env=python_env(),
                              timeout=60)
    finally:
        shutil.rmtree(top)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot read journal" in done.stderr, done.stderr


def test_devices_json_gives_a_pseudo_terminals_path_as_its_device(tmp_path):
    """The JSON's "device" held "/dev/pts/N (pseudo-terminal, not a udev device)", no path."""
    master, slave = os.openpty()
    try:
        pty = os.ttyname(slave)
        (tmp_path / "terminal").symlink_to(pty)
        config = tmp_path / "poi-bridge.toml"
        config.write_text(f'[[terminals]]\npoi_id = "Desk3500-12345678"\n'
                          f'link = {{ kind = "serial", device = "{tmp_path / "terminal"}" }}\n')
        done = cli("devices", "--config", str(config), "--json")
    finally:
        os.close(master)
        os.close(slave)
    assert done.returncode == 0, done.stderr
    [terminal] = json.loads(done.stdout)["terminals"]
    assert terminal["present"] is True and terminal["device"] == pty
    assert terminal["device_note"] == "pseudo-terminal, not a udev device"


@pytest.mark.parametrize("wait", ["nan", "-1", "0", "inf", "soon"])
def test_resync_wait_must_be_seconds_as_registers_time_outs_are(wait, capsys):
    """`resync --wait nan` and `--wait -1` were taken: the result was never waited for."""
    from bridge import cli

    with pytest.raises(SystemExit) as caught:
        cli.main(["resync", "TILL1", "S1", "--config", "/nonexistent.toml", "--wait", wait])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --wait: {wait!r} is not a time-out: give seconds, more than 0" in err, err

"""The command line as a technician uses it: real processes, real files, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from bridge.protocol.framing import make_framer

from .conftest import FIXTURES
from .rig import ROOT, python_env

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
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
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

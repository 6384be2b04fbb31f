"""`poi-bridge inspect` prints a terminal's own texts as the detail quotes them: redacted."""

from __future__ import annotations

import json

import pytest

from bridge.protocol import crypto
from bridge.protocol.framing import make_framer

from .conftest import FIXTURES
from .test_cli import KEY, cli

PAN = "5555555555554444"


def decline(response: dict) -> bytes:
    """A vendor response turned into a decline whose texts carry card data, encrypted and
    captured on the wire between noise."""
    document = json.loads((FIXTURES / "java-payment-sync-success.json").read_bytes())
    document["SaleToPOIResponse"]["PaymentResponse"]["Response"] = response
    sealed = crypto.encrypt_message(document, crypto.NexoKey(KEY[1], 1, "p@ssw0rd123456"))
    return b"\x00noise" + make_framer("stx-etx-lrc").encode(json.dumps(sealed).encode())


@pytest.mark.parametrize("response", [
    {"Result": "Failure", "ErrorCondition": "Refusal 5555 5555 5555 4444"},
    {"Result": f"Declined card {PAN}"},  # an unknown Result
], ids=["error-condition", "result"])
@pytest.mark.parametrize("output", [[], ["--json"]], ids=["human", "json"])
def test_inspect_redacts_card_data_in_result_and_error_condition(tmp_path, response, output):
    secret = tmp_path / "passphrase"
    secret.write_text("p@ssw0rd123456\n")
    done = cli("inspect", *output, "--frame", "stx-etx-lrc", *KEY,
               "--passphrase-file", str(secret), "-", stdin=decline(response))
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert "[redacted]" in out
    for shown in (out, out.replace(" ", "")):
        assert PAN not in shown
    if output:
        summary = json.loads(out)
        assert summary["outcome"] in ("declined", "error")
        assert summary["result"] == ("Failure" if "ErrorCondition" in response
                                     else "Declined card [redacted]")
        assert summary["error_condition"] == ("Refusal [redacted]" if "ErrorCondition" in response
                                              else None)


@pytest.mark.parametrize("output", [[], ["--json"]], ids=["human", "json"])
def test_inspect_redacts_card_data_in_the_header(tmp_path, output):
    """A captured request from a register that put a swiped card's track data where its IDs
    belong: the header's texts are printed through the filter too, the message's kind and
    its readable IDs as they are."""
    track2 = f";{PAN}=29121010000012300000?"
    document = json.loads((FIXTURES / "java-payment-sync-success.json").read_bytes())
    header = document["SaleToPOIResponse"]["MessageHeader"]
    header.update({"MessageCategory": track2, "SaleID": f"TILL {PAN}", "ServiceID": PAN,
                   "POIID": "P400Plus-123456789", "MessageType": f"Response {PAN}"})
    capture = tmp_path / "capture.json"
    capture.write_text(json.dumps(document))
    done = cli("inspect", *output, str(capture))
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert PAN not in out and "=2912" not in out, out
    assert "P400Plus-123456789" in out and "SaleToPOIResponse" in out
    if output:
        summary = json.loads(out)
        assert (summary["sale_id"], summary["service_id"]) == ("TILL [redacted]", "[redacted]")


@pytest.mark.parametrize("framer", ["stx-etx-lrc", "length-prefixed", "dle-crc16"])
@pytest.mark.parametrize("output", [[], ["--json"]], ids=["human", "json"])
def test_inspect_reports_a_frame_cut_short_next_to_frames_found(tmp_path, framer, output):
    """A capture whose last frame the link cut short still shows the whole frames, and says
    how many bytes it discarded and why, as the README promises: a technician must not take
    the cut-off message for one that was never sent."""
    message = (FIXTURES / "java-payment-sync-success.json").read_bytes()
    whole = make_framer(framer).encode(message)
    cut = make_framer(framer).encode(message)[:-40]
    capture = tmp_path / "capture.bin"
    capture.write_bytes(whole + cut)
    done = cli("inspect", *output, "--frame", framer, str(capture))
    assert done.returncode == 0, done.stderr
    err = done.stderr.decode()
    assert "bytes discarded as noise (no frame: " in err, err
    discarded = int(err.split("poi-bridge inspect: ")[1].split()[1])
    assert 0 < discarded <= len(cut), err
    if output:
        summaries = [json.loads(line) for line in done.stdout.decode().splitlines()]
        assert len(summaries) == 1
        assert summaries[0]["noise"] == discarded


def test_inspect_says_nothing_of_noise_in_a_clean_capture(tmp_path):
    message = (FIXTURES / "java-payment-sync-success.json").read_bytes()
    capture = tmp_path / "capture.bin"
    capture.write_bytes(make_framer("stx-etx-lrc").encode(message))
    done = cli("inspect", "--json", "--frame", "stx-etx-lrc", str(capture))
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    assert json.loads(done.stdout)["noise"] == 0

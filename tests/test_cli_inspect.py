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

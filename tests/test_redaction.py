"""No card data or key material in the logs, even when a terminal puts it where we log."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from bridge.logging_setup import setup_logging
from bridge.redaction import redact
from bridge.simulator import responses

from .rig import POI, Daemon, Simulator, Subscriber, outcome_for, write_config

PAN = "5413330089600010"
TRACK2 = f";{PAN}=25121010000012345678?"
PASSPHRASE = "s3cret-passphrase-for-test"


@pytest.mark.parametrize("text", [
    f"card {PAN}", "card 5413 3300 8960 0010", f"track {TRACK2}",
    f"%B{PAN}^DOE/JOHN^25121010000000000000?", '"ExpiryDate": "2512"',
    '"SensitiveCardData": {"ExpiryDate": "0228", "CardSeqNumb": "01"}',
    "NexoBlob=fMtXTcQCbAi3gAwtOANt4tQEz2UUrorGVnDuCeYXTJUoF+NyNCmj+bwILU9io34q",
])
def test_sensitive_shapes_are_redacted(text):
    cleaned = redact(text)
    assert "[redacted]" in cleaned
    for secret in (PAN, "5413 3300 8960 0010", "0228", "2512", "fMtXTcQCbAi3gAwtOANt4"):
        assert secret not in cleaned


@pytest.mark.parametrize("text", [
    "terminal V400m-324688179: Payment POS1/S1 -> approved (terminal)",
    "ServiceID 1234567890123",  # not a card number: fails the Luhn check
    "at 2026-11-22T10:00:00.000Z amount 12.50",
])
def test_ordinary_lines_are_left_alone(text):
    assert redact(text) == text


def test_the_daemon_log_handler_redacts(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    setup_logging("debug")
    try:
        logging.getLogger("poi_bridge.test").warning("terminal said %s and %s", PAN, TRACK2)
        try:
            raise ValueError(f"bad card {PAN}")
        except ValueError:
            logging.getLogger("poi_bridge.test").exception("failure")
    finally:
        logging.getLogger().handlers.clear()
    output = stream.getvalue()
    assert PAN not in output and "[redacted]" in output


def card_data_response(tmp_path) -> str:
    """A terminal that sends everything it should not: full PAN, track 2, expiry."""
    doc = responses.payment_response(responses.payment_request("X", "1", POI, 5.0), "approve", 0)
    card = doc["SaleToPOIResponse"]["PaymentResponse"]["PaymentResult"]["PaymentInstrumentData"]
    card["CardData"].update({"PAN": PAN, "TrackData": [{"TrackValue": TRACK2}],
                             "SensitiveCardData": {"PAN": PAN, "ExpiryDate": "2512"}})
    path = tmp_path / "card-data.json"
    path.write_text(json.dumps(doc))
    return str(path)


def event_with_card_data(tmp_path) -> str:
    path = tmp_path / "event.json"
    path.write_text(json.dumps({"SaleToPOIRequest": {
        "MessageHeader": {"MessageCategory": "Event", "MessageClass": "Event",
                          "MessageType": "Notification", "ProtocolVersion": "3.0",
                          "SaleID": "X", "ServiceID": "1", "POIID": POI},
        "EventNotification": {"EventToNotify": "Reject", "TimeStamp": "2026-11-22T10:00:00Z",
                              "EventDetails": f"message=bad card {PAN} track {TRACK2}"}}}))
    return str(path)


async def test_no_card_data_or_key_material_in_any_daemon_log_line(tmp_path, mosquitto):
    secret = tmp_path / "key"
    secret.write_text(PASSPHRASE)
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({
        "poi_id": POI,
        "default": {"delay": 0.05, "response_file": card_data_response(tmp_path)},
        "transactions": [{"amount": 2.0, "response_file": event_with_card_data(tmp_path)}],
    }))
    sim = Simulator(tmp_path, "--scenario", str(scenario), "--key-id", "K1",
                    "--passphrase-file", str(secret))
    config = write_config(tmp_path, mosquitto, sim.link, terminal={"payment_timeout": 2.0})
    with open(config, "a") as handle:
        handle.write(f'[terminals.key]\nidentifier = "K1"\nversion = 1\n'
                     f'passphrase_file = "{secret}"\n')
    daemon = Daemon(config, tmp_path).start()
    try:
        async with Subscriber(mosquitto, ["poi-bridge/registers/POS1/#"]) as register:
            await asyncio.sleep(1.0)
            await register.publish(f"poi-bridge/terminals/{POI}/request",
                                   responses.payment_request("POS1", "R1", POI, 5.0))
            approved = await register.wait_for(outcome_for("R1"), timeout=20)
            assert approved["bridge"]["outcome"] == "approved"
            await register.publish(f"poi-bridge/terminals/{POI}/request",
                                   responses.payment_request("POS1", "R2", POI, 2.0))
            await register.wait_for(lambda t, p: t.endswith("/event")
                                    and p["event"] == "awaiting_status", timeout=20)
            await asyncio.sleep(1.0)
    finally:
        daemon.kill()
        sim.stop()
    log = daemon.log()
    assert "unusable answer for POS1/R2" in log  # the terminal's event did reach the log...
    assert "[redacted]" in log                   # ...with its card data taken out
    for secret_text in (PAN, "5413 3300", TRACK2, PASSPHRASE, "2512101"):
        assert secret_text not in log, secret_text
    # The register does receive what the terminal itself sent (the bridge does not alter it).
    card = approved["SaleToPOIResponse"]["PaymentResponse"]["PaymentResult"]
    assert card["PaymentInstrumentData"]["CardData"]["PAN"] == PAN

"""Untrusted text that a message quotes is filtered before it is cut (review rev7). Cut
first, the part of a card number left before the cut (15 of its 16 digits) was no longer one
the card-data filter knows, and went out as it was: on the register's response topic, in an
operator command's answer, in the retained transaction document and in the log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bridge.daemon import intake
from bridge.protocol import crypto, jsontext
from bridge.protocol.messages import (MessageError, check_request_header, load_json,
                                      parse_message)
from bridge.redaction import quoted

PAN = "5555555555554444"  # (a test card number)
# 12 of its digits in a row or more: what must never show
SHOWN_DIGITS = re.compile(r"\d{12,}")


def leaks(text: str) -> bool:
    return bool(SHOWN_DIGITS.search(text)) or PAN[:12] in text


def straddling(limit: int, before: str = "till ") -> str:
    """Text whose card number the cut at `limit` would split, 15 digits before it."""
    return before + "x" * (limit - len(before) - 15) + PAN + " and more text"


@pytest.mark.parametrize("limit", [20, 24, 40, 80, 200])
def test_quoted_filters_then_cuts(limit: int) -> None:
    text = straddling(limit)
    assert leaks(text[:limit])  # (what the cut alone let out)
    shown = quoted(text, limit)
    assert len(shown) <= limit and not leaks(shown), shown


def test_a_long_text_read_in_part_ends_before_a_run_the_reading_split() -> None:
    text = "x" * 4090 + PAN + "y" * 10
    shown = quoted(text, 5000)
    assert not leaks(shown) and shown.endswith("...")
    assert quoted("a" * 9000, 10) == "aaaaaaa..."


def test_a_timestamp_quoted_in_a_refusal() -> None:
    request = {"SaleToPOIRequest": {
        "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Service",
                          "MessageCategory": "Payment", "MessageType": "Request",
                          "SaleID": "POS1", "ServiceID": "P1", "POIID": "V400m-1"},
        "PaymentRequest": {
            "SaleData": {"SaleTransactionID": {"TransactionID": "T1",
                                               "TimeStamp": straddling(40, "2026-01-01 ")}},
            "PaymentTransaction": {"AmountsReq": {"Currency": "EUR",
                                                  "RequestedAmount": 1.0}}}}}
    _, error = intake._request_time_stamp(parse_message(request))
    assert error is not None and "is not an ISO 8601" in error and not leaks(error), error


def test_a_message_category_quoted_in_a_refusal() -> None:
    request = {"SaleToPOIRequest": {
        "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Service",
                          "MessageCategory": "Abort", "MessageType": "Request",
                          "SaleID": "POS1", "ServiceID": "A1", "POIID": "V400m-1"},
        "AbortRequest": {"AbortReason": "x", "MessageReference": {
            "SaleID": "POS1", "ServiceID": "P1",
            "MessageCategory": straddling(40, "Payment, till ")}}}}
    problems = "; ".join(check_request_header(parse_message(request)))
    assert "is no MessageCategory" in problems and not leaks(problems), problems


def test_a_negative_amount_quoted_in_a_refusal() -> None:
    with pytest.raises(MessageError) as raised:
        parse_message({"SaleToPOIRequest": {
            "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Service",
                              "MessageCategory": "Payment", "MessageType": "Request",
                              "SaleID": "POS1", "ServiceID": "P1", "POIID": "V400m-1"},
            "PaymentRequest": {"SaleData": {"SaleTransactionID": {
                "TransactionID": "T1", "TimeStamp": "2026-01-01T00:00:00Z"}},
                "PaymentTransaction": {"AmountsReq": {
                    "Currency": "EUR", "RequestedAmount": -int("1234567" + PAN)}}}}})
    assert "must be 0 or more" in str(raised.value) and not leaks(str(raised.value))


def test_a_duplicate_name_quoted() -> None:
    name = straddling(40, "note of till ")
    with pytest.raises(MessageError) as raised:
        load_json(json.dumps({name: 1})[:-1] + f', "{name}": 2}}', unique_names=True)
    assert "appears twice" in str(raised.value) and not leaks(str(raised.value))


def test_a_number_too_large_shows_no_card_number() -> None:
    with pytest.raises(jsontext.JsonTextError) as raised:
        jsontext.loads('{"a": ' + PAN + "9" * 400 + "}")
    assert "is too large" in str(raised.value) and not leaks(str(raised.value))


def test_a_terminals_crypto_error_quoted() -> None:
    text = crypto.terminal_crypto_error(
        {"errors": ["Nexo Service: crypto error (3) " + "y" * 150 + " " + PAN + " more"]})
    assert text is not None and "crypto error (3)" in text and not leaks(text), text


def test_an_operator_commands_key_and_value_quoted(tmp_path: Path) -> None:
    from .test_intake_fuzz import Rig

    rig = Rig(tmp_path / "journal.sqlite3")
    for body, said in (({straddling(40): 1}, "unknown key(s)"),
                       ({"state": straddling(40)}, "is none of")):
        (answer,) = rig.handle("poi-bridge/bridge/request/transactions",
                               json.dumps(body).encode())
        assert answer.topic == "poi-bridge/bridge/response/transactions"
        error = json.loads(answer.payload)["error"]
        assert said in error and not leaks(error), error
    rig.journal.close()

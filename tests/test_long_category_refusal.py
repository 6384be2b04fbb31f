"""A MessageCategory of letters and digits longer than the 64 characters a transaction records
(review rv4): the refusal named its body after the whole category while recording it cut, so
the card-data filter, which looks for the body by the recorded name, missed it, and a card
number in the category went out on registers/{SaleID}/response as the body's name. Such a
category cannot be read as one: the refusal says Unknown and names its body UnknownResponse
(README "A response"), and a refusal's body whose name the filter would change is renamed
whatever category was recorded (README "Security")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.daemon.registers import redacted_refusal
from bridge.protocol.actions import Deliver
from bridge.protocol.builders import failure_response
from bridge.simulator import responses

from .follow_rig import B
from .test_intake_fuzz import POI, Rig
from .test_request_handler_failure import answer_after_a_bug
from .test_unresolved_retry import order

PAN = "4111111111111111"
LONG = PAN + "A" * 60


def test_a_long_category_holding_a_card_number_is_refused_as_unknown_and_not_published(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        doc = responses.payment_request("POS1", "C1", POI)
        doc["SaleToPOIRequest"]["MessageHeader"]["MessageCategory"] = LONG
        answers = rig.handle(f"poi-bridge/terminals/{POI}/request/POS1",
                             json.dumps(doc).encode())
        assert answers
        for answer in answers:
            assert PAN.encode() not in answer.payload, (answer.topic, answer.payload[:300])
        (answer,) = [a for a in answers if a.topic == "poi-bridge/registers/POS1/response"]
        body = json.loads(answer.payload)
        assert set(body["SaleToPOIResponse"]) == {"MessageHeader", "UnknownResponse"}, body
        assert body["bridge"]["transaction"]["category"] == "Unknown", body["bridge"]
    finally:
        rig.journal.close()


def test_a_category_of_65_letters_is_refused_as_unknown(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        doc = responses.payment_request("POS1", "C1", POI)
        doc["SaleToPOIRequest"]["MessageHeader"]["MessageCategory"] = "P" * 65
        (answer,) = rig.handle(f"poi-bridge/terminals/{POI}/request/POS1",
                               json.dumps(doc).encode())
        body = json.loads(answer.payload)
        assert set(body["SaleToPOIResponse"]) == {"MessageHeader", "UnknownResponse"}, body
        assert body["bridge"]["transaction"]["category"] == "Unknown", body["bridge"]
    finally:
        rig.journal.close()


def test_a_refusal_body_named_after_another_category_than_recorded_passes_the_filter() -> None:
    header = {"MessageClass": "Service", "MessageCategory": "Payment", "SaleID": "POS1",
              "ServiceID": "C1", "POIID": POI}
    refusal = Deliver("POS1", "C1", POI, "Payment", "rejected", "bridge",
                      failure_response(header, LONG, "MessageFormat", "refused"), "refused")
    published = redacted_refusal(refusal)
    assert PAN not in json.dumps(published.response)
    assert set(published.response["SaleToPOIResponse"]) == {"MessageHeader", "UnknownResponse"}


async def test_an_internal_error_on_a_long_category_is_answered_as_unknown(
        tmp_path: Path, mosquitto: Any) -> None:
    doc = order("L1", B)
    doc["SaleToPOIRequest"]["MessageHeader"]["MessageCategory"] = LONG
    answer, sim_b = await answer_after_a_bug(tmp_path, mosquitto, doc)
    assert answer["bridge"]["outcome"] == "error", answer
    assert PAN not in json.dumps(answer), answer
    assert set(answer["SaleToPOIResponse"]) == {"MessageHeader", "UnknownResponse"}, answer
    assert answer["bridge"]["transaction"]["category"] == "Unknown", answer["bridge"]
    assert not sim_b.terminal.ledger

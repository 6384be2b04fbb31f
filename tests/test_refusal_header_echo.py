"""Review rv6: the MessageHeader an answer the bridge builds itself echoes (a refusal, the
internal-error reply, a status answered from the journal) kept every name the register put in
the request's header, and the card-data filter passes a refusal's header values, never its
names: a register that put a card number in a header *name* (or under a name the model does
not know, as a value the filter does not look into) had it published back on
registers/{SaleID}/response, and through a chain's bridge at head office. Such an echo holds
MessageHeader's own fields only (README "A response", "Security")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.daemon.registers import redacted_refusal
from bridge.protocol import builders
from bridge.protocol.actions import Deliver
from bridge.simulator import responses
from bridge.protocol.transaction import TxState

from .follow_rig import B
from .test_intake_fuzz import POI, Rig
from .test_request_handler_failure import answer_after_a_bug
from .test_status_from_journal import record
from .test_unresolved_retry import order

PAN = "4111111111111111"
# What the request's header held of MessageHeader's own fields (bridge.simulator.responses)
ECHOED = {"ProtocolVersion", "MessageClass", "MessageCategory", "MessageType", "SaleID",
          "ServiceID", "POIID"}


def published(answers: list) -> list[dict[str, Any]]:
    """The answers on the register's response topic; nothing published holds the PAN."""
    for answer in answers:
        assert PAN.encode() not in answer.payload, (answer.topic, answer.payload[:400])
    return [json.loads(a.payload) for a in answers
            if a.topic == "poi-bridge/registers/POS1/response"]


def test_a_card_number_in_a_header_name_of_a_malformed_request_is_not_published(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        doc = responses.payment_request("POS1", "C1", POI)
        doc["SaleToPOIRequest"]["MessageHeader"][PAN] = "x"
        doc["SaleToPOIRequest"]["MessageHeader"]["Note"] = "a name the model does not know"
        doc["SaleToPOIRequest"]["MessageHeader"]["MessageCategory"] = "Pay-ment"  # refused
        (answer,) = published(rig.handle(f"poi-bridge/terminals/{POI}/request/POS1",
                                         json.dumps(doc).encode()))
        header = answer["SaleToPOIResponse"]["MessageHeader"]
        # What the register needs to tell which request this answers is still there
        assert set(header) == ECHOED, header
        assert (header["SaleID"], header["ServiceID"]) == ("POS1", "C1"), header
    finally:
        rig.journal.close()


def test_a_card_number_under_an_unknown_header_name_of_a_recorded_refusal_is_not_published(
        tmp_path: Path) -> None:
    """A well-formed request refused (its terminal is not configured here) is recorded with
    its answer, which echoes the header of the parsed request: any value under any name (not
    only text). A copy delivered again is answered from that record."""
    other = "V400m-999999999"
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        doc = responses.payment_request("POS1", "C2", other)
        doc["SaleToPOIRequest"]["MessageHeader"][PAN] = {"PAN": PAN}
        doc["SaleToPOIRequest"]["MessageHeader"]["Extra"] = {"PAN": PAN}
        for _ in range(2):
            answers = rig.handle(f"poi-bridge/terminals/{other}/request/POS1",
                                 json.dumps(doc).encode())
            (answer,) = published(answers)
            assert set(answer["SaleToPOIResponse"]["MessageHeader"]) == ECHOED, answer
            assert answer["bridge"]["outcome"] == "rejected", answer["bridge"]
    finally:
        rig.journal.close()


def test_a_status_request_answered_from_the_journal_echoes_no_unknown_name(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        record(rig, "P1", POI, TxState.FINAL, "approved")
        status = builders.status_request(sale_id="POS1", service_id="T1", poi_id=POI,
                                         original_service_id="P1", original_category="Payment")
        reference = status["SaleToPOIRequest"]["TransactionStatusRequest"]["MessageReference"]
        reference["SaleID"] = "POS1"
        status["SaleToPOIRequest"]["MessageHeader"][PAN] = "x"
        status["SaleToPOIRequest"]["MessageHeader"]["Extra"] = {"PAN": PAN}
        reference[PAN] = "x"  # (its MessageReference, echoed in the answer, is open too)
        # named like a field's Python name (the model populates by name too): it took the
        # field's value out of the echo with it, which then named no ServiceID (review rv7)
        reference["service_id"] = "x"
        answers = rig.handle(f"poi-bridge/terminals/{POI}/request/POS1",
                             json.dumps(status).encode())
        (answer,) = published(answers)
        assert set(answer["SaleToPOIResponse"]["MessageHeader"]) == ECHOED, answer
        assert answer["bridge"]["outcome"] == "approved", answer["bridge"]
        said = answer["SaleToPOIResponse"]["TransactionStatusResponse"]["MessageReference"]
        assert said == {key: value for key, value in reference.items()
                        if key not in (PAN, "service_id")}, said
        assert said["ServiceID"] == "P1"
    finally:
        rig.journal.close()


def test_redacted_refusal_publishes_no_header_name_but_messageheaders_own() -> None:
    header = {"MessageClass": "Service", "MessageCategory": "Payment", "SaleID": "POS1",
              "ServiceID": "C1", "POIID": POI, "MessageType": "Response", PAN: "x",
              "Extra": {"PAN": PAN}}
    refusal = Deliver("POS1", "C1", POI, "Payment", "rejected", "bridge",
                      {"SaleToPOIResponse": {"MessageHeader": header, "PaymentResponse": {
                          "Response": {"Result": "Failure", "ErrorCondition": "Busy",
                                       "AdditionalResponse": "busy"}}}}, "busy")
    published = redacted_refusal(refusal)
    assert PAN not in json.dumps(published.response), published.response
    assert published.response["SaleToPOIResponse"]["MessageHeader"] == {
        key: value for key, value in header.items() if key in ECHOED}


async def test_the_internal_error_reply_echoes_no_card_number_in_a_header_name(
        tmp_path: Path, mosquitto: Any) -> None:
    doc = order("H1", B)
    doc["SaleToPOIRequest"]["MessageHeader"][PAN] = "x"
    answer, sim_b = await answer_after_a_bug(tmp_path, mosquitto, doc)
    assert answer["bridge"]["outcome"] == "error", answer
    assert PAN not in json.dumps(answer), answer
    assert set(answer["SaleToPOIResponse"]["MessageHeader"]) <= ECHOED, answer
    assert answer["SaleToPOIResponse"]["MessageHeader"]["ServiceID"] == "H1", answer
    assert not sim_b.terminal.ledger

"""What a register's request must be before the bridge sends it to a terminal: one body, the
one its MessageCategory names, and amounts that are JSON numbers of 0 or more. Messages from
terminals are not held to this (see test_messages.py: they are kept as they came)."""

from __future__ import annotations

import copy
import json
import math
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.protocol.messages import (
    MessageError,
    SaleToPOIRequest,
    check_request_header,
    parse_message,
)
from bridge.protocol.outcome import classify
from bridge.protocol.transaction import Transaction, TxState, request_digest
from bridge.simulator import responses

from .fuzzing import fuzz_settings
from .test_intake_fuzz import POI, Rig

AMOUNTS_REQ = ("PaymentRequest", "PaymentTransaction", "AmountsReq")


def payment() -> dict:
    return responses.payment_request("POS1", "S1", POI, 12.5)


def reversal() -> dict:
    return responses.payment_request("POS1", "S1", POI, 12.5, category="Reversal")


def at(document: dict, path: tuple[str, ...]) -> dict:
    node = document["SaleToPOIRequest"]
    for key in path:
        node = node[key]
    return node


def problems_of(document: dict | bytes) -> list[str]:
    """Everything that refuses the request: a MessageError of parse_message, or the header
    rules' problems (the intake refuses on either)."""
    try:
        message = parse_message(document)
    except MessageError as exc:
        return [str(exc)]
    return check_request_header(message)


def refused_by_intake(tmp_path, document: dict | bytes) -> dict:
    """The register's answer to `document` published to the test terminal's request topic."""
    raw = document if isinstance(document, bytes) else json.dumps(document).encode()
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        (answer,) = rig.handle(f"poi-bridge/terminals/{POI}/request", raw)
    finally:
        rig.journal.close()
    assert answer.topic == "poi-bridge/registers/POS1/response"
    body = json.loads(answer.payload)
    assert body["bridge"]["outcome"] == "rejected"
    response = body["SaleToPOIResponse"]["PaymentResponse"]["Response"]
    assert response["ErrorCondition"] == "MessageFormat"
    assert response["AdditionalResponse"] == body["bridge"]["error"]
    return body["bridge"]


def test_the_examples_used_here_are_valid_requests():
    for document in (payment(), reversal()):
        assert problems_of(document) == []


# --- 1. one body, the one MessageCategory names ---------------------------------------------

@pytest.mark.parametrize("extra,value", [
    ("ReversalRequest", {"ReversalReason": "MerchantCancel"}),
    ("AbortRequest", {"MessageReference": {"MessageCategory": "Payment"}}),
    ("EventNotification", {"EventToNotify": "Shutdown"}),
    ("CardAcquisitionRequest", {}),  # a body the bridge does not model is still a body
    ("ReversalRequest", None),
])
def test_a_request_with_a_second_body_is_refused_naming_it(extra, value):
    document = payment()
    document["SaleToPOIRequest"][extra] = value
    problems = problems_of(document)
    assert len(problems) == 1, problems
    assert extra in problems[0] and "PaymentRequest" in problems[0], problems


def test_a_second_body_where_the_category_names_neither_names_both():
    document = payment()
    document["SaleToPOIRequest"]["MessageHeader"]["MessageCategory"] = "Abort"
    document["SaleToPOIRequest"]["ReversalRequest"] = {}
    problems = problems_of(document)
    assert any("PaymentRequest" in p and "ReversalRequest" in p and "AbortRequest" in p
               for p in problems), problems


def test_a_request_with_two_bodies_is_answered_rejected_by_the_intake(tmp_path):
    document = payment()
    document["SaleToPOIRequest"]["ReversalRequest"] = reversal()["SaleToPOIRequest"][
        "ReversalRequest"]
    bridge = refused_by_intake(tmp_path, document)
    assert "ReversalRequest" in bridge["error"], bridge


def test_unknown_keys_that_are_not_bodies_are_still_kept_and_sent():
    document = payment()
    inner = document["SaleToPOIRequest"]
    inner["VendorExtension"] = {"a": [1, 2.5, None]}
    inner["Note"] = "till 3"
    message = parse_message(document)
    assert check_request_header(message) == []
    assert message.body_key() == "PaymentRequest"
    assert message.to_document() == document


def test_a_terminals_event_notification_in_a_request_envelope_still_parses():
    """Terminals send EventNotification inside SaleToPOIRequest; the one-body rule is for
    registers' requests (check_request_header), not for what terminals send."""
    document = payment()
    document["SaleToPOIRequest"]["EventNotification"] = {"EventToNotify": "Reject"}
    assert parse_message(document).to_document() == document


# --- 2. amounts are JSON numbers ----------------------------------------------------------

# (where the amount sits in the request, its field, the example request)
AMOUNT_FIELDS = [
    (AMOUNTS_REQ, "RequestedAmount", payment),
    (AMOUNTS_REQ, "TipAmount", payment),
    (AMOUNTS_REQ, "CashBackAmount", payment),
    (AMOUNTS_REQ, "PaidAmount", payment),
    (AMOUNTS_REQ, "MinimumAmountToDeliver", payment),
    (AMOUNTS_REQ, "MaximumCashBackAmount", payment),
    (AMOUNTS_REQ, "MinimumSplitAmount", payment),
    (("ReversalRequest",), "ReversedAmount", reversal),
]


@pytest.mark.parametrize("path,field,make", AMOUNT_FIELDS)
@pytest.mark.parametrize("value", ["12.50", "0", "", True, False, [12.5], {"Value": 12.5}])
def test_an_amount_that_is_not_a_json_number_is_refused_naming_the_field(path, field, make,
                                                                         value):
    document = make()
    at(document, path)[field] = value
    problems = problems_of(document)
    assert len(problems) == 1, problems
    assert re.search(rf"\.{field}: must be a JSON number", problems[0]), problems


def test_a_string_amount_is_answered_rejected_by_the_intake(tmp_path):
    document = payment()
    at(document, AMOUNTS_REQ)["RequestedAmount"] = "12.50"
    bridge = refused_by_intake(tmp_path, document)
    assert "AmountsReq.RequestedAmount: must be a JSON number" in bridge["error"], bridge


@pytest.mark.parametrize("path,field,make", AMOUNT_FIELDS)
@pytest.mark.parametrize("value", [0, 0.0, 1, 12.5, 10**12])
def test_amounts_that_are_numbers_pass_and_are_sent_as_they_came(path, field, make, value):
    document = make()
    at(document, path)[field] = value
    message = parse_message(json.dumps(document))
    assert check_request_header(message) == []
    assert message.to_document() == document
    sent = json.loads(message.to_bytes())
    assert at(sent, path)[field] == value and type(at(sent, path)[field]) is type(value)


def test_a_missing_or_null_requested_amount_is_still_refused():
    document = payment()
    del at(document, AMOUNTS_REQ)["RequestedAmount"]
    assert any("RequestedAmount" in p for p in problems_of(document))
    at(document, AMOUNTS_REQ)["RequestedAmount"] = None
    assert any("RequestedAmount" in p for p in problems_of(document))


def test_responses_from_terminals_keep_odd_amounts():
    """The strictness is for requests: a terminal's answer with string or negative amounts
    is kept as it came and still classified (NaN is not JSON at all: test_messages.py)."""
    raw = json.dumps({"SaleToPOIResponse": {
        "MessageHeader": {"MessageCategory": "Payment", "MessageClass": "Service",
                          "MessageType": "Response", "SaleID": "POS1", "ServiceID": "S1",
                          "POIID": POI},
        "PaymentResponse": {
            "Response": {"Result": "Success"},
            "PaymentResult": {"AmountsResp": {"AuthorizedAmount": "12.50", "TipAmount": -1,
                                              "CashBackAmount": None}},
            "AmountsReq": {"RequestedAmount": "12.50"}}}})
    message = parse_message(raw)
    assert classify(message).outcome == "approved"
    assert json.loads(message.to_bytes())["SaleToPOIResponse"]["PaymentResponse"][
        "AmountsReq"]["RequestedAmount"] == "12.50"


# --- 3. amounts are 0 or more, and finite -------------------------------------------------

@pytest.mark.parametrize("path,field,make", AMOUNT_FIELDS)
@pytest.mark.parametrize("value", [-1, -0.01, -(10**12)])
def test_a_negative_amount_is_refused_naming_the_field(path, field, make, value):
    document = make()
    at(document, path)[field] = value
    problems = problems_of(document)
    assert len(problems) == 1, problems
    assert re.search(rf"\.{field}: must be 0 or more", problems[0]), problems


def test_a_negative_amount_is_answered_rejected_by_the_intake(tmp_path):
    document = payment()
    at(document, AMOUNTS_REQ)["RequestedAmount"] = -12.5
    bridge = refused_by_intake(tmp_path, document)
    assert "AmountsReq.RequestedAmount: must be 0 or more" in bridge["error"], bridge


@pytest.mark.parametrize("path,field,make", AMOUNT_FIELDS)
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_nan_and_infinity_in_the_text_are_refused_as_not_json(path, field, make, literal):
    document = make()
    at(document, path)[field] = "PLACEHOLDER"
    raw = json.dumps(document).replace('"PLACEHOLDER"', literal).encode()
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    assert re.fullmatch(rf"not valid JSON: (number )?{literal.lstrip('-')}"
                        r" is (not a JSON number|too large)", problems[0].replace("-", "")), \
        problems


@pytest.mark.parametrize("path,field,make", AMOUNT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_in_a_document_built_in_python_are_refused_naming_the_field(
        path, field, make, value):
    document = make()
    at(document, path)[field] = value
    problems = problems_of(document)
    assert len(problems) == 1, problems
    assert re.search(rf"\.{field}: must be a finite number", problems[0]), problems


@pytest.mark.parametrize("literal", ["NaN", "-Infinity", "1e400", r'"\ud800"'])
def test_what_strict_json_does_not_have_is_answered_rejected_on_the_registers_topic(
        tmp_path, literal):
    """Python's reader takes these, JSON's does not: the request is refused (the terminal
    would choke on it, a register's own reader too), and the refusal reaches the register
    on its topic, under its IDs, rather than bridge/error."""
    raw = json.dumps(payment()).replace("12.5", literal).encode()
    bridge = refused_by_intake(tmp_path, raw)
    assert bridge["error"].startswith("request is unusable: not valid JSON: "), bridge
    # (refused_by_intake checked that it came on registers/POS1/response)
    assert bridge["transaction"]["service_id"] == "S1", bridge


json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
                | st.lists(st.integers(), max_size=2))


@fuzz_settings(200)
@given(value=json_scalars, which=st.sampled_from(AMOUNT_FIELDS))
def test_an_amount_passes_exactly_when_it_is_a_finite_number_of_0_or_more(value, which):
    path, field, make = which
    document = make()
    at(document, path)[field] = value
    good = (type(value) in (int, float) and math.isfinite(value) and value >= 0) or (
        value is None and field != "RequestedAmount")  # an optional one may be null
    problems = problems_of(json.dumps(document).encode())
    if good:
        assert problems == []
    elif isinstance(value, float) and not math.isfinite(value):  # json.dumps wrote NaN
        assert len(problems) == 1 and "is not a JSON number" in problems[0], problems
    else:
        assert len(problems) == 1 and f".{field}: must be" in problems[0], problems


def test_a_request_built_in_python_is_held_to_the_same_rules():
    inner = copy.deepcopy(payment()["SaleToPOIRequest"])
    inner["PaymentRequest"]["PaymentTransaction"]["AmountsReq"]["RequestedAmount"] = "1"
    with pytest.raises(ValueError, match="RequestedAmount"):
        SaleToPOIRequest.model_validate(inner)


@pytest.mark.parametrize("path,field,make", [f for f in AMOUNT_FIELDS
                                             if f[1] != "RequestedAmount"])
def test_an_optional_amount_may_be_null_as_some_serialisers_write_it(path, field, make):
    document = make()
    at(document, path)[field] = None
    assert problems_of(document) == []


@pytest.mark.parametrize("amount", [10**400, -(10**400)])
def test_an_amount_too_large_for_a_double_is_refused_never_a_crash(amount):
    """math.isfinite() of a 400-digit integer raised OverflowError, out of parse_message;
    then such an amount was taken and sent. README: a number too large for a double refuses
    the request as not valid JSON, written 1e400 or as a whole number."""
    document = payment()
    at(document, AMOUNTS_REQ)["RequestedAmount"] = amount
    (problem,) = problems_of(json.dumps(document).encode())
    assert "not valid JSON" in problem and "too large" in problem, problem


# --- 4. on .../request/{SaleID}, the header's SaleID is the topic's ---------------------------

@pytest.mark.parametrize("level,header_sale_id,answered_on", [
    ("POS1", "POS1", None),  # accepted: the terminal is offline here, refused for that
    ("POS2", "POS1", "poi-bridge/registers/POS2/response"),
    # (an empty level, .../request/, is a topic problem: test_request_topics)
])
def test_a_request_on_a_registers_topic_must_carry_that_sale_id(tmp_path, level,
                                                                 header_sale_id, answered_on):
    """The last level of .../request/{SaleID} is what a broker ACL ties to the register's
    login: a header naming another SaleID is refused NotAllowed, answered to the topic's
    register (the header's may be forged), never to the one the header names."""
    document = responses.payment_request(header_sale_id, "S1", POI, 12.5)
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        published = rig.handle(f"poi-bridge/terminals/{POI}/request/{level}",
                               json.dumps(document).encode())
    finally:
        rig.journal.close()
    (answer,) = [m for m in published if not m.retain]
    body = json.loads(answer.payload)
    if answered_on is None:
        assert answer.topic == "poi-bridge/registers/POS1/response"
        assert "is not the topic's SaleID" not in json.dumps(body)
        return
    assert answer.topic == answered_on, (answer.topic, body)
    error = body["bridge"]["error"] if "bridge" in body else body["error"]
    assert f"MessageHeader.SaleID 'POS1' is not the topic's SaleID '{level}'" in error
    if "bridge" in body:
        # the answer to the topic's register names it in the header too, as in `bridge`
        assert body["SaleToPOIResponse"]["MessageHeader"]["SaleID"] == level
        assert body["bridge"]["transaction"]["sale_id"] == level


@pytest.mark.parametrize("header", [{"SaleID": 123}, {"SaleID": None}, None])
def test_on_a_registers_topic_an_unreadable_sale_id_gets_the_header_error_answered_there(
        tmp_path, header):
    """A SaleID sent as a number, null, or no MessageHeader at all is the documented header
    error (MessageFormat), as on the plain topic, not 'SaleID 123 is not the topic's 123';
    it is answered to the topic's register, since the header names none."""
    document = responses.payment_request("123", "S1", POI, 12.5)
    if header is None:
        del document["SaleToPOIRequest"]["MessageHeader"]
    else:
        document["SaleToPOIRequest"]["MessageHeader"].update(header)
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        (answer,) = rig.handle(f"poi-bridge/terminals/{POI}/request/123",
                               json.dumps(document).encode())
    finally:
        rig.journal.close()
    assert answer.topic == "poi-bridge/registers/123/response", answer.topic
    body = json.loads(answer.payload)
    assert "is not the topic's SaleID" not in body["bridge"]["error"], body
    assert body["bridge"]["error"].startswith(("invalid header", "not a valid SaleToPOI")), body


@pytest.mark.parametrize("level,answered_on", [
    (None, "poi-bridge/bridge/error"), ("POS1", "poi-bridge/registers/POS1/response")])
def test_a_lone_surrogate_in_an_id_is_refused_without_a_crash(tmp_path, level, answered_on):
    """Read leniently to address the refusal, a SaleID '\\ud800' went into the answer, whose
    encoding then raised UnicodeEncodeError ('internal error'). It is answered where the
    request can be tied to a register: the topic's, or none (bridge/error)."""
    raw = json.dumps(payment()).replace('"POS1"', '"\\ud800"').encode()
    topic = f"poi-bridge/terminals/{POI}/request" + (f"/{level}" if level else "")
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        (answer,) = rig.handle(topic, raw)
    finally:
        rig.journal.close()
    assert answer.topic == answered_on
    assert "lone UTF-16 surrogate" in answer.payload.decode()


def test_a_name_written_twice_in_one_object_is_refused_naming_it(tmp_path):
    """{"RequestedAmount": 1250, "RequestedAmount": 12.5}: Python's reader keeps the last,
    readers in other languages may keep the first (or refuse), so the register, its logs
    and the bridge could each mean another amount. Refused, naming the name; nothing sent."""
    raw = json.dumps(payment()).replace(
        '"RequestedAmount": 12.5', '"RequestedAmount": 1250, "RequestedAmount": 12.5').encode()
    assert raw.count(b'"RequestedAmount"') == 2
    bridge = refused_by_intake(tmp_path, raw)
    assert bridge["error"] == ("request is unusable: not valid JSON: the name "
                               "'RequestedAmount' appears twice in one object (JSON readers "
                               "disagree on which one counts)"), bridge
    assert bridge["transaction"]["service_id"] == "S1", bridge  # answered under its IDs


def test_a_request_the_journal_holds_is_still_a_repeat_with_a_name_written_twice(tmp_path):
    """Taken before names written twice were refused, and delivered again by the broker: a
    refusal would tell the register that a payment it may have paid was rejected."""
    raw = json.dumps(payment()).replace('"Currency": "EUR"',
                                        '"Currency": "EUR", "Currency": "EUR"').encode()
    assert raw.count(b'"Currency"') == 2
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        document = json.loads(raw)  # what the bridge took then: the last one kept
        txn = Transaction(sale_id="POS1", service_id="S1", poi_id=POI, category="Payment",
                          request=document, digest=request_digest(document),
                          created_at=time.time(), updated_at=time.time(),
                          state=TxState.FINAL, outcome="approved", source="terminal")
        rig.journal.save(txn)
        published = rig.handle(f"poi-bridge/terminals/{POI}/request", raw)
        # Another register publishing that copy on its own topic gets NotAllowed, as for
        # any request naming another register's SaleID (the diff review: it got POS1's
        # result republished, to POS1, and no answer itself)
        elsewhere = rig.handle(f"poi-bridge/terminals/{POI}/request/POS2", raw)
    finally:
        rig.journal.close()
    (answer,) = [p for p in published if p.topic == "poi-bridge/registers/POS1/response"]
    assert json.loads(answer.payload)["bridge"]["outcome"] == "approved"
    (refused,) = [p for p in elsewhere if not p.retain]
    assert refused.topic == "poi-bridge/registers/POS2/response", refused.topic
    assert "is not the topic's SaleID 'POS2'" in json.loads(refused.payload)["bridge"]["error"]


def test_names_written_twice_in_a_terminals_message_are_not_refused():
    """A terminal's message is read as it comes (the last one kept), as before: the bridge
    does not refuse the vendor's answer, it reports it."""
    answer = json.dumps(responses.simple_response(payment())).replace(
        '"Result": "Success"', '"Result": "Failure", "Result": "Success"')
    assert answer.count('"Result"') == 2
    kept = json.dumps(parse_message(answer).to_document())
    assert kept.count('"Result"') == 1 and '"Result": "Success"' in kept



@pytest.mark.parametrize("body", ["AbortRequest", "TransactionStatusRequest"])
def test_a_reference_to_a_category_nexo_does_not_have_is_refused(body):
    """An abort of {"MessageCategory": "payment"} (a register's casing) named no category the
    bridge knows: it was not taken as about the held payment of those IDs, went to the
    terminal, and the payment went out afterwards (the second review). It is refused,
    naming the field; "Payment" passes."""
    category = "Abort" if body == "AbortRequest" else "TransactionStatus"
    document = {"SaleToPOIRequest": {
        "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Service",
                          "MessageCategory": category, "MessageType": "Request",
                          "SaleID": "POS1", "ServiceID": "A1", "POIID": POI},
        body: {"MessageReference": {"MessageCategory": "payment", "SaleID": "POS1",
                                    "ServiceID": "S1"}}}}
    if body == "AbortRequest":
        document["SaleToPOIRequest"][body]["AbortReason"] = "MerchantAbort"
    assert problems_of(document) == [
        f"{body}.MessageReference.MessageCategory 'payment' is no MessageCategory "
        "(Payment, Reversal, ...: mind the capitals)"]
    document["SaleToPOIRequest"][body]["MessageReference"]["MessageCategory"] = "Payment"
    assert problems_of(document) == []


def test_refused_sale_ids_leave_no_memory_behind(tmp_path):
    """be69c79 put topic_safe (which the intake asks of every request's SaleID) behind an LRU
    cache of 4096 entries, which kept every SaleID it was asked about alive, of any length a
    request can carry (mqtt.max_payload, 256 KB by default): about 1 GB for 4096 refused
    requests. Only the character check of an ID short enough to be one is cached now."""
    import gc
    import tracemalloc

    rig = Rig(tmp_path / "journal.sqlite3", max_payload=256 * 1024)
    try:
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(200):
                sale_id = f"{i:06d}" + "x" * 250_000  # too long for a topic level: refused
                payload = {"SaleToPOIRequest": {"MessageHeader": {"SaleID": sale_id}}}
                rig.handle(f"poi-bridge/terminals/{POI}/request", json.dumps(payload).encode())
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
    finally:
        rig.journal.close()
    assert held < 10e6, f"{held / 1e6:.1f} MB held after 200 refused requests"


def test_a_malformed_request_s_refusal_names_its_problems_up_to_three(tmp_path):
    """The refusal named the first problem only ("... MessageCategory: Field required (and 1
    more problems)"): a register fixing one at a time was refused once for each. The first
    three are named, the rest counted, in English."""
    header = ("MessageHeader",)
    document = payment()
    del at(document, header)["MessageCategory"]
    at(document, header)["ProtocolVersion"] = 3
    (said,) = problems_of(document)
    assert said == ("SaleToPOIRequest.MessageHeader.ProtocolVersion: Input should be a valid "
                    "string; SaleToPOIRequest.MessageHeader.MessageCategory: Field required")
    at(document, AMOUNTS_REQ)["RequestedAmount"] = "4111111111111111"  # (a card number)
    at(document, AMOUNTS_REQ)["Currency"] = 978
    (said,) = problems_of(document)
    assert said.count("; ") == 2 and said.endswith(" (and 1 more problem)"), said
    at(document, header)["MessageType"] = 5
    (said,) = problems_of(document)
    assert re.search(r"; [^;]+ \(and [2-9] more problems\)$", said), said
    at(document, header)["MessageCategory"] = "Payment"  # (answered in PaymentResponse)
    bridge = refused_by_intake(tmp_path, document)
    assert bridge["error"].startswith("not a valid SaleToPOIRequest: SaleToPOIRequest."
                                      "MessageHeader.ProtocolVersion: Input should be"), bridge
    assert "4111111111111111" not in json.dumps(bridge)

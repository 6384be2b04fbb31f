"""A status answer settles only the transaction it is about. The terminal echoes the poll's
MessageReference and carries the record's own header; a terminal that answers about
another transaction (its latest, or one of another category) says nothing of the one asked
about: its record is not that payment's outcome, its NotFound not "never received". An
answer that names the polled transaction is taken even when its own header's ServiceID is
not the poll's."""

from __future__ import annotations

import copy

from bridge.protocol.actions import Log, Unmatched
from bridge.protocol.transaction import TxKey, TxState
from bridge.simulator import responses

from .test_session import POI, SETTINGS, Harness, request_of


def polled(h: Harness) -> tuple[dict, dict]:
    """A payment R1/S1 whose answer never came, now asked about: (its request, the poll)."""
    h.submit("R1", "S1")
    request = request_of(h)
    h.advance(SETTINGS.payment_timeout + 1)
    return request, h.last_poll()


def another(request: dict, service_id: str = "OTHER9", category: str | None = None) -> dict:
    other = copy.deepcopy(request)
    header = other["SaleToPOIRequest"]["MessageHeader"]
    header["ServiceID"] = service_id
    if category is not None:
        header["MessageCategory"] = category
    return other


def test_a_record_of_another_transaction_does_not_settle_the_polled_payment():
    """The record's own header names ServiceID OTHER9: it was published as R1/S1's
    `approved` (goods leave for a payment the terminal may never have taken)."""
    h = Harness()
    request, poll = polled(h)
    record = responses.payment_response(another(request), "approve", h.now)
    actions = h.answer(responses.status_success(poll, record))
    assert h.delivers(actions) == []
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    (warning,) = [a for a in actions if isinstance(a, Log) and a.level == "warning"]
    assert "R1/OTHER9" in warning.message and "not taken" in warning.message, warning
    h.advance(SETTINGS.poll_floor)  # asked again
    right = responses.payment_response(request, "decline", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), right)))
    assert (result.service_id, result.outcome) == ("S1", "declined")


def test_an_echoed_reference_to_another_transaction_is_no_answer_about_this_one():
    """A NotFound (or a record without its own header) whose MessageReference names
    another transaction: the terminal answered about its latest one."""
    h = Harness()
    request, poll = polled(h)
    not_found = responses.status_not_found(poll)
    not_found["SaleToPOIResponse"]["TransactionStatusResponse"]["MessageReference"] = {
        "SaleID": "R1", "ServiceID": "OTHER9", "MessageCategory": "Payment"}
    assert h.delivers(h.answer(not_found)) == []  # not "nothing was charged"
    h.advance(SETTINGS.poll_floor)
    poll = h.last_poll()
    record = responses.payment_response(request, "approve", h.now)
    answer = responses.status_success(poll, record, inner_header=False)
    answer["SaleToPOIResponse"]["TransactionStatusResponse"]["MessageReference"]["ServiceID"] \
        = "OTHER9"
    # Two answers about another: the payment is unresolved (asked on), never settled
    assert [d.outcome for d in h.delivers(h.answer(answer))] == ["unresolved"]
    assert h.session.open[TxKey("R1", "S1")].state is TxState.UNRESOLVED


def test_a_record_of_another_category_does_not_settle_the_payment():
    """A ReversalResponse under the payment's own IDs (no inner header): a record of a
    reversal is no outcome of the payment."""
    h = Harness()
    request, poll = polled(h)
    header = dict(poll["SaleToPOIRequest"]["MessageHeader"], MessageType="Response")
    answer = {"SaleToPOIResponse": {"MessageHeader": header, "TransactionStatusResponse": {
        "Response": {"Result": "Success"},
        "RepeatedMessageResponse": {"RepeatedResponseMessageBody": {
            "ReversalResponse": {"Response": {"Result": "Success"}}}}}}}
    assert h.delivers(h.answer(answer)) == []
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING


def test_an_answer_naming_the_polled_payment_is_taken_under_another_header_service_id():
    """The terminal's header carries a ServiceID of its own (as in the vendor guide's
    examples), but its MessageReference and record name R1/S1: the one poll on the wire was
    about S1, so this answers it (it used to be ignored, and the poll counted unanswered)."""
    h = Harness()
    request, poll = polled(h)
    record = responses.payment_response(request, "approve", h.now)
    answer = responses.status_success(poll, record)
    answer["SaleToPOIResponse"]["MessageHeader"]["ServiceID"] = "987"
    (result,) = h.delivers(h.answer(answer))
    assert (result.service_id, result.outcome, result.source) == ("S1", "approved", "status-poll")


def test_an_answer_under_another_service_id_naming_nothing_is_not_taken():
    """Without a reference or a record's header there is nothing to match it by."""
    h = Harness()
    request, poll = polled(h)
    answer = responses.status_in_progress(poll)
    answer["SaleToPOIResponse"]["MessageHeader"]["ServiceID"] = "987"
    record = responses.payment_response(request, "approve", h.now)
    unnamed = responses.status_success(poll, record, inner_header=False)
    unnamed["SaleToPOIResponse"]["MessageHeader"]["ServiceID"] = "988"
    del unnamed["SaleToPOIResponse"]["TransactionStatusResponse"]["MessageReference"]
    for doc in (answer, unnamed):
        assert h.delivers(h.answer(doc)) == []
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING


def test_a_registers_status_answer_carrying_another_record_does_not_settle_the_payment():
    """A register asks about R1/S1, which the bridge is polling; the terminal's answer
    echoes the reference but carries the record of its latest payment (its header: R1/
    OTHER9). The register gets the answer as the terminal gave it; S1 is not settled."""
    from .test_session import status_of

    h = Harness()
    request, _ = polled(h)
    status = status_of("R1", "S1")
    h.submit("R1", "T1", doc=status)
    record = responses.payment_response(another(request), "approve", h.now)
    actions = h.answer(responses.status_success(status, record))
    assert [d.service_id for d in h.delivers(actions)] == ["T1"]
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    assert any(isinstance(a, Log) and "R1/OTHER9" in a.message and "not applied" in a.message
               for a in actions)


def reversal_under_the_payments_header(status: dict, fixtures_dir) -> dict:
    """The terminal's Success answer to `status` (about R1/S1) whose record's header names
    the Payment R1/S1 while its body is a ReversalResponse (the vendor's own)."""
    import json

    vendor = json.loads((fixtures_dir / "dotnet-pospayment-reversal-response-success.json")
                        .read_text())
    header = dict(status["SaleToPOIRequest"]["MessageHeader"], MessageType="Response")
    return {"SaleToPOIResponse": {"MessageHeader": header, "TransactionStatusResponse": {
        "Response": {"Result": "Success"},
        "MessageReference": {"SaleID": "R1", "ServiceID": "S1", "MessageCategory": "Payment"},
        "RepeatedMessageResponse": {
            "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Service",
                              "MessageCategory": "Payment", "MessageType": "Response",
                              "SaleID": "R1", "ServiceID": "S1", "POIID": POI},
            "RepeatedResponseMessageBody": {
                "ReversalResponse": vendor["SaleToPOIResponse"]["ReversalResponse"]}}}}}


def test_a_reversal_record_under_the_payments_own_header_does_not_settle_it(fixtures_dir):
    """The record's header names the polled Payment, its body is a ReversalResponse: a
    reversal's Success was read as the payment's and published `approved` (the body's name
    counted only when the record had no header)."""
    h = Harness()
    request, poll = polled(h)
    actions = h.answer(reversal_under_the_payments_header(poll, fixtures_dir))
    assert h.delivers(actions) == []
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    (warning,) = [a for a in actions if isinstance(a, Log) and a.level == "warning"]
    assert "the record names Reversal" in warning.message, warning
    h.advance(SETTINGS.poll_floor)  # asked again
    right = responses.payment_response(request, "decline", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), right)))
    assert (result.service_id, result.outcome) == ("S1", "declined")


def test_a_registers_status_answer_with_a_reversal_under_the_payments_header(fixtures_dir):
    """The same record answering a register's own status request, whether it named the
    category or not: the payment the bridge polls is not settled, the register is not told
    `approved`, and for a payment ended `not_found` nothing goes to the shell to correct it
    with."""
    from .test_session import status_of

    for named in ("Payment", None):
        h = Harness()
        polled(h)
        status = status_of("R1", "S1", category=named)
        h.submit("R1", "T1", doc=status)
        actions = h.answer(reversal_under_the_payments_header(status, fixtures_dir))
        assert [(d.service_id, d.outcome) for d in h.delivers(actions)] == [("T1", "error")]
        assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
        # The payment ended `not_found`: the record corrects nothing
        h = Harness()
        polled(h)
        (ended,) = h.delivers(h.answer(responses.status_not_found(h.last_poll())))
        assert ended.outcome == "not_found"
        h.submit("R1", "T1", doc=status)
        actions = h.answer(reversal_under_the_payments_header(status, fixtures_dir))
        assert [(d.service_id, d.outcome) for d in h.delivers(actions)] == [("T1", "error")]
        assert not [a for a in actions if isinstance(a, Unmatched)], named


def test_a_record_header_without_message_type_or_category_still_settles_only_its_own():
    """A record's header without MessageType and MessageCategory made the whole answer
    unreadable: a charged payment was never learned, and ended `unresolved`. It is read now,
    the category taken from its body: the payment's own record settles it, one whose header
    names another ServiceID, or whose body is a ReversalResponse, still does not."""
    def headless(poll: dict, record: dict, service_id: str = "S1") -> dict:
        answer = responses.status_success(poll, record)
        repeated = answer["SaleToPOIResponse"]["TransactionStatusResponse"][
            "RepeatedMessageResponse"]
        repeated["MessageHeader"] = {"SaleID": "R1", "ServiceID": service_id, "POIID": POI}
        return answer

    for service_id, category in (("OTHER9", None), ("S1", "Reversal")):
        h = Harness()
        request, poll = polled(h)
        record = responses.payment_response(another(request, service_id, category),
                                            "approve", h.now)
        assert h.delivers(h.answer(headless(poll, record, service_id))) == []
        assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    h.advance(SETTINGS.poll_floor)
    record = responses.payment_response(request, "approve", h.now)
    (result,) = h.delivers(h.answer(headless(h.last_poll(), record)))
    assert (result.service_id, result.outcome, result.source) == ("S1", "approved", "status-poll")
    header = result.response["SaleToPOIResponse"]["MessageHeader"]
    assert (header["MessageType"], header["MessageCategory"], header["ServiceID"]) \
        == ("Response", "Payment", "S1")

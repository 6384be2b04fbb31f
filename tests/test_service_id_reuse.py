"""A request under a SaleID+ServiceID the journal already has: an identical repeat, the same
request rebuilt with a new TimeStamp (a register's retry), or a different request."""

from __future__ import annotations

import copy

from hypothesis import given
from hypothesis import strategies as st

from bridge.protocol.transaction import (
    REFUSED_REQUEST_KEPT,
    SERVICE_ID_REUSE_WINDOW,
    Reuse,
    Transaction,
    TxKey,
    TxState,
    check_reuse,
    first_difference,
    request_digest,
    trim_refused,
)
from bridge.simulator import responses

POI = "V400m-1"


def payment(amount: float = 12.5, stamp: str = "2026-11-30T10:00:00.000Z") -> dict:
    document = responses.payment_request("TILL1", "S1", POI, amount)
    document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
        "TimeStamp"] = stamp
    return document


def recorded(document: dict, created_at: float = 1000.0) -> Transaction:
    return Transaction(sale_id="TILL1", service_id="S1", poi_id=POI, category="Payment",
                       request=document, digest=request_digest(document), created_at=created_at,
                       updated_at=created_at, state=TxState.FINAL, outcome="approved")


def test_an_identical_request_is_a_repeat_and_a_new_time_stamp_a_retry():
    txn = recorded(payment())
    same = payment()
    assert check_reuse(txn, request_digest(same), 1010.0, same) is Reuse.REPEAT
    rebuilt = payment(stamp="2026-11-30T10:02:00.000Z")
    assert check_reuse(txn, request_digest(rebuilt), 1010.0, rebuilt) is Reuse.RETRY
    # without the document only the digest can be compared: a conflict, as before
    assert check_reuse(txn, request_digest(rebuilt), 1010.0) is Reuse.CONFLICT


def test_any_other_difference_is_a_conflict_and_says_where_without_values():
    txn = recorded(payment())
    other = payment(amount=99.0, stamp="2026-11-30T10:02:00.000Z")
    assert check_reuse(txn, request_digest(other), 1010.0, other) is Reuse.CONFLICT
    assert first_difference(txn.request, other) == (
        "SaleToPOIRequest.PaymentRequest.PaymentTransaction.AmountsReq.RequestedAmount")
    renamed = payment()
    renamed["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
        "TransactionID"] = "another-sale"
    assert first_difference(txn.request, renamed) == (
        "SaleToPOIRequest.PaymentRequest.SaleData.SaleTransactionID.TransactionID")
    extra = payment()
    extra["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["OperatorID"] = "Anna"
    assert first_difference(txn.request, extra) == (
        "SaleToPOIRequest.PaymentRequest.SaleData.OperatorID")


def test_only_the_bodys_sale_transaction_time_stamp_is_ignored():
    base = payment()
    for path in (("MessageHeader", "TimeStamp"),
                 ("PaymentRequest", "PaymentTransaction", "TimeStamp"),
                 ("PaymentRequest", "SaleData", "TimeStamp")):
        changed = copy.deepcopy(base)
        node = changed["SaleToPOIRequest"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = "2026-11-30T10:02:00.000Z"
        assert first_difference(base, changed) == "SaleToPOIRequest." + ".".join(path)


def test_types_count_but_not_int_against_float():
    assert first_difference({"a": 12}, {"a": 12.0}) is None
    assert first_difference({"a": 1}, {"a": True}) == "a"
    assert first_difference({"a": "12"}, {"a": 12}) == "a"
    assert first_difference({"a": [1, 2]}, {"a": [1, 2, 3]}) == "a"
    assert first_difference({"a": [1, {"b": 2}]}, {"a": [1, {"b": 3}]}) == "a.[1].b"


def test_after_48_hours_the_service_id_is_free_again():
    txn = recorded(payment())
    other = payment(amount=99.0)
    later = 1000.0 + SERVICE_ID_REUSE_WINDOW + 1
    assert check_reuse(txn, request_digest(other), later, other) is Reuse.NEW


def test_after_48_hours_an_open_transactions_ids_are_still_taken():
    """An unresolved payment (or one given up on, which stays open) is still the record of
    what the terminal may have charged: a new request must not replace it."""
    later = 1000.0 + SERVICE_ID_REUSE_WINDOW + 1
    other = payment(amount=99.0)
    for state in (TxState.UNRESOLVED, TxState.POLLING, TxState.ACCEPTED):
        txn = recorded(payment())
        txn.state, txn.outcome = state, None
        assert check_reuse(txn, request_digest(other), later, other) is Reuse.CONFLICT
        assert check_reuse(txn, txn.digest, later, txn.request) is Reuse.REPEAT


json_leaves = (st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=5)
               | st.sampled_from([0.0, -0.0, 1.0, 2.5, -3.0, 1e300]))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=12)


def _whole_floats_as_ints(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_floats_as_ints(v) for v in value]
    return value


@given(a=json_values, b=json_values)
def test_first_difference_is_none_exactly_when_the_canonical_documents_are_equal(a, b):
    """Outside the TimeStamp rule it agrees with the digest (key order aside), once a whole
    float is written as the integer it equals (12.0 and 12 are the same amount)."""
    same = request_digest({"x": _whole_floats_as_ints(a)}) == request_digest(
        {"x": _whole_floats_as_ints(b)})
    assert (first_difference({"x": a}, {"x": b}) is None) == same


def test_a_journaled_request_that_fails_todays_checks_is_still_answered_as_a_repeat(tmp_path):
    """The broker delivers again (QoS 1) a request an older bridge took and journaled, but
    that today's stricter checks refuse (an amount as a string): the register must get the
    recorded result, not 'rejected' for a payment it may have been charged for."""
    import json

    from .test_intake_fuzz import POI as RIG_POI
    from .test_intake_fuzz import Rig

    topic = f"poi-bridge/terminals/{RIG_POI}/request"
    document = responses.payment_request("TILL1", "S1", RIG_POI)
    document["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"]["AmountsReq"][
        "RequestedAmount"] = "12.50"
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        now = rig.intake._clock()
        rig.journal.save(Transaction(
            sale_id="TILL1", service_id="S1", poi_id=RIG_POI, category="Payment",
            request=document, digest=request_digest(document), created_at=now - 60,
            updated_at=now - 50, state=TxState.FINAL, outcome="approved", source="terminal",
            response={"SaleToPOIResponse": {"PaymentResponse": {"Response": {
                "Result": "Success"}}}}))
        published = rig.handle(topic, json.dumps(document).encode())
        (answer,) = [json.loads(m.payload) for m in published if m.topic.endswith("/response")]
        assert (answer["bridge"]["outcome"], answer["bridge"]["source"]) == ("approved",
                                                                             "journal")
        # a different request failing the same check is refused as before
        other = copy.deepcopy(document)
        other["SaleToPOIRequest"]["MessageHeader"]["ServiceID"] = "S2"
        published = rig.handle(topic, json.dumps(other).encode())
        (answer,) = [json.loads(m.payload) for m in published if m.topic.endswith("/response")]
        assert answer["bridge"]["outcome"] == "rejected"
        assert "RequestedAmount" in answer["bridge"]["error"]
    finally:
        rig.journal.close()


def test_a_large_refused_request_is_kept_as_its_header_and_still_known_as_a_repeat(tmp_path):
    """Refused requests are journaled for 48 h (so that a copy delivered again gets the same
    answer). Kept whole, a register publishing large ones (up to max_payload, 256 KiB by
    default) filled the disk: 100 grew the journal by 54 MB. Past REFUSED_REQUEST_KEPT only
    the header is kept; the digest still recognises the copy."""
    import json

    from .test_intake_fuzz import Rig

    def padded(service_id: str) -> dict:
        document = responses.payment_request("TILL1", service_id, "V400m-999")
        document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"][
            "SaleToAcquirerData"] = "x" * 100_000
        return document

    topic = "poi-bridge/terminals/V400m-999/request"  # not this bridge's terminal
    journal_path = tmp_path / "journal.sqlite3"
    rig = Rig(journal_path, max_payload=256 * 1024)
    first = json.dumps(padded("S0")).encode()
    try:
        for n in range(30):
            (answer,) = [json.loads(m.payload) for m in rig.handle(
                topic, first if n == 0 else json.dumps(padded(f"S{n}")).encode())
                if m.topic.endswith("/response")]
            assert answer["bridge"]["outcome"] == "rejected"
            assert "unknown terminal V400m-999" in answer["bridge"]["error"]
        stored = rig.journal.get(TxKey("TILL1", "S0"))
        assert stored is not None and stored.request == {"SaleToPOIRequest": {
            "MessageHeader": json.loads(first)["SaleToPOIRequest"]["MessageHeader"]}}
        sizes = sum(p.stat().st_size for p in tmp_path.glob("journal.sqlite3*"))
        assert sizes < 1_500_000, sizes  # 30 x 100 KB kept whole: over 3 MB
        # The same request delivered again is answered as the repeat it is, and so is the
        # same request rebuilt with a new TimeStamp (a register's retry).
        rebuilt = json.loads(first)
        rebuilt["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
            "TimeStamp"] = "2026-11-30T23:59:59.000Z"
        for again in (first, json.dumps(rebuilt).encode()):
            published = rig.handle(topic, again)
            events = [json.loads(m.payload) for m in published if m.topic.endswith("/event")]
            assert [e["event"] for e in events] == ["duplicate"], events
        # A different one says that where it differs can no longer be told.
        rebuilt["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"]["AmountsReq"][
            "RequestedAmount"] = 99.0
        (answer,) = [json.loads(m.payload) for m in rig.handle(
            topic, json.dumps(rebuilt).encode()) if m.topic.endswith("/response")]
        assert "it differs at its body (a refused request over 8 KB is kept as its header " \
            "only)" in answer["bridge"]["error"], answer
    finally:
        rig.journal.close()


def test_a_refused_request_is_kept_whole_up_to_the_limit_and_as_its_header_beyond():
    small = recorded(payment())
    kept = small.request
    trim_refused(small)
    assert small.request is kept and "retry_digest" not in small.extra
    large_document = payment()
    large_document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleToAcquirerData"] = \
        "x" * REFUSED_REQUEST_KEPT
    large = recorded(large_document)
    trim_refused(large)
    assert large.request == {"SaleToPOIRequest": {
        "MessageHeader": large_document["SaleToPOIRequest"]["MessageHeader"]}}
    odd = recorded({"SaleToPOIRequest": "x" * 9000})
    trim_refused(odd)
    assert odd.request == {"SaleToPOIRequest": {"MessageHeader": None}}


def test_a_large_refused_request_still_tells_a_retry_from_a_different_request():
    """Kept as its header, it keeps a digest without the TimeStamp: the same request rebuilt
    for a retry is still a retry, anything else still a conflict."""
    def large(amount: float = 12.5, stamp: str = "2026-11-30T10:00:00.000Z") -> dict:
        document = payment(amount, stamp)
        document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleToAcquirerData"] = \
            "x" * REFUSED_REQUEST_KEPT
        return document

    txn = recorded(large())
    trim_refused(txn)
    rebuilt = large(stamp="2026-11-30T10:02:00.000Z")
    assert check_reuse(txn, request_digest(rebuilt), 1010.0, rebuilt) is Reuse.RETRY
    other = large(amount=99.0, stamp="2026-11-30T10:02:00.000Z")
    assert check_reuse(txn, request_digest(other), 1010.0, other) is Reuse.CONFLICT
    same = large()
    assert check_reuse(txn, request_digest(same), 1010.0, same) is Reuse.REPEAT


def test_a_large_refused_request_rebuilt_with_whole_numbers_written_otherwise_is_a_retry():
    """The full comparison takes 12 and 12.0 as equal; the digest kept for a large refused
    request must too, or the register's retry of it is refused as a different request."""
    document = payment(amount=12.0)
    document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleToAcquirerData"] = \
        "x" * REFUSED_REQUEST_KEPT
    txn = recorded(document)
    trim_refused(txn)
    rebuilt = copy.deepcopy(document)
    body = rebuilt["SaleToPOIRequest"]["PaymentRequest"]
    body["PaymentTransaction"]["AmountsReq"]["RequestedAmount"] = 12
    body["SaleData"]["SaleTransactionID"]["TimeStamp"] = "2026-11-30T10:02:00.000Z"
    assert first_difference(document, rebuilt) is None
    assert check_reuse(txn, request_digest(rebuilt), 1010.0, rebuilt) is Reuse.RETRY
    other = copy.deepcopy(rebuilt)
    other["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"]["AmountsReq"][
        "RequestedAmount"] = 12.5
    assert check_reuse(txn, request_digest(other), 1010.0, other) is Reuse.CONFLICT

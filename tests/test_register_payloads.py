"""The payload shapes registers depend on (bridge/daemon/registers.py)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from bridge.daemon.journal import Journal
from bridge.daemon.registers import (
    dumps,
    result_payload,
    result_payload_bytes,
    splices_response,
    transaction_payload,
    transaction_payload_from,
)
from bridge.protocol.actions import Deliver

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(outcome=st.sampled_from(["approved", "declined", "unresolved", "error"]),
       body=st.none() | st.dictionaries(st.text(), json_values, max_size=4),
       error=st.none() | st.text())
def test_the_retained_transaction_document_is_the_response_plus_its_state(outcome, body, error):
    """The transaction topic's bytes are made from the response topic's bytes (one encoding
    of a large terminal answer): they must equal encoding transaction_payload() itself."""
    response = None if body is None else {"SaleToPOIResponse": body}
    result = Deliver("TILL1", "S1", "V400m-1", "Payment", outcome, "terminal", response, error)
    at = 1_800_000_000.25
    made = transaction_payload_from(dumps(result_payload(result, at)), result)
    assert made == dumps(transaction_payload(result, at=at))
    assert json.loads(made)["state"] == ("unresolved" if outcome == "unresolved" else "final")


@given(outcome=st.sampled_from(["approved", "declined", "unresolved", "error"]),
       body=st.dictionaries(st.text(), json_values, max_size=4),
       error=st.none() | st.text())
def test_the_response_document_made_from_the_journals_text_is_the_same_bytes(
        tmp_path_factory, outcome, body, error):
    """The response topic's bytes are made from the text the journal stored for the same
    response (one encoding of a large terminal answer): they must equal encoding
    result_payload() itself, non-ASCII and escapes included."""
    journal = Journal(tmp_path_factory.mktemp("j") / "journal.sqlite3")
    try:
        response = {"SaleToPOIResponse": body}
        result = Deliver("TILL1", "S1", "V400m-1", "Payment", outcome, "terminal", response,
                         error)
        at = 1_800_000_000.25
        assert splices_response(result)
        made = result_payload_bytes(result, journal.response_text(response), at)
        assert made == dumps(result_payload(result, at))
    finally:
        journal.close()


def test_only_a_lone_sale_to_poi_response_is_spliced():
    def result(response):
        return Deliver("T", "S", "P", "Payment", "approved", "terminal", response, None)

    assert not splices_response(result(None))
    assert not splices_response(result({"SaleToPOIResponse": None}))
    assert not splices_response(result({"SaleToPOIResponse": {}, "Other": 1}))
    assert splices_response(result({"SaleToPOIResponse": {"a": 1}}))


def test_the_journal_reuses_a_responses_text_only_for_the_same_object_and_pass(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        journal.group_commits(lambda callback: None)
        response = {"SaleToPOIResponse": {"n": 1}}
        text = journal.response_text(response)
        assert journal.response_text(response) is text  # encoded once
        other = {"SaleToPOIResponse": {"n": 1}}
        assert journal.response_text(other) == text and journal.response_text(other) is not text
        journal.response_text(response)
        response["SaleToPOIResponse"]["n"] = 2  # (never done to a result; shows the rule)
        journal.commit()  # the pass ends: nothing is remembered past it
        assert journal.response_text(response) == '{"SaleToPOIResponse":{"n":2}}'
    finally:
        journal.close()


def test_a_repeat_of_an_unresolved_request_says_not_to_charge_again_as_the_first_report_did():
    """A repeat of the request (or a resync) answers `unresolved` from the journal: it used
    to say only that the bridge keeps asking, without the first report's "do not charge
    this sale again" and how to find out."""
    from bridge.daemon.registers import stored_result
    from bridge.protocol.transaction import Transaction, TxState

    txn = Transaction(sale_id="TILL1", service_id="S1", poi_id="V400m-1", category="Payment",
                      request={}, digest="", created_at=0.0, updated_at=0.0,
                      state=TxState.UNRESOLVED, detail="2 status poll(s) unanswered")
    error = stored_result(txn).error
    assert error.startswith("outcome unknown: 2 status poll(s) unanswered; the bridge keeps "
                            "asking"), error
    assert "do not charge this sale again until the result is known" in error
    assert "ServiceID S1, MessageCategory Payment, to terminal V400m-1" in error


def test_time_stamps_match_isoformat_across_seconds_and_in_any_order():
    """_now_iso formats each second once and reuses it: a stamp from another second (a
    journal's created_at after a newer one) must not get the cached second's text."""
    import datetime as dt
    import random

    from bridge.daemon.registers import _now_iso

    rng = random.Random(7)
    moments = [0.0, 59.9995, 60.0, 1764576000.0, 1764576000.999, 1764576001.001, 1e9 + 0.5]
    moments += [rng.uniform(1.7e9, 1.8e9) for _ in range(300)]
    for moment in moments + moments[::-1]:
        expected = dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        # (datetime rounds to the microsecond first: at most a millisecond apart, same second)
        assert _now_iso(moment)[:19] == expected[:19], moment
        assert abs(int(_now_iso(moment)[20:23]) - int(expected[20:23])) <= 1, moment
    now = _now_iso()
    assert now.endswith("Z") and dt.datetime.fromisoformat(now[:-1]).year >= 2026

"""Status answers, as a review (rv20) found them wrong: a register's status request answered
with another transaction's record; a restart with the clock behind (a terminal's NotFound
believed, a restored payment holding the terminal); a partial authorisation the terminal
answered Success; a stray non-outcome reopening a payment already asked about."""

from __future__ import annotations

import itertools
import time

import pytest

from bridge.daemon.registers import partial_amounts
from bridge.protocol.actions import Deliver, Log, Record
from bridge.protocol.messages import parse_message
from bridge.protocol.session import TerminalSession
from bridge.protocol.transaction import Transaction, TxKey, TxState, request_digest
from bridge.simulator import responses

from .test_intake_fuzz import POI as RIG_POI
from .test_intake_fuzz import Rig
from .test_session import POI, SETTINGS, Harness, request_of, status_of
from .test_status_from_journal import ask

HOUR = 3600.0


def unresolved(h: Harness, service: str = "S1") -> None:
    """`service` sent, never answered, both polls unanswered: the register told `unresolved`,
    the terminal free for other sales."""
    h.submit("R1", service)
    for seconds in (120, 30, 1, 30):
        h.advance(seconds)
    assert h.session.open[TxKey("R1", service)].state is TxState.UNRESOLVED


def restarted_behind(h: Harness, behind: float, after: float = 60.0) -> Harness:
    """The bridge of `h` restarts `after` s later on a box whose clock is `behind` s behind
    (no battery-backed clock, NTP not there yet; or fake-hwclock after a power cut): the
    journal's open payment and its last requests sent are restored, the terminal plugged in."""
    (record,) = [a.transaction for a in h.log if isinstance(a, Record)][-1:]
    ids = itertools.count(1)
    fresh = Harness(link_up=False)
    fresh.session = TerminalSession(POI, SETTINGS, new_service_id=lambda: f"X{next(ids)}")
    fresh.now = fresh.started = h.now + after - behind
    fresh.do(fresh.session.restore([record], fresh.now, dict(h.session.last_request_at)))
    fresh.plug_in()
    return fresh


def told(h: Harness, service: str = "S1", actions=None) -> list[str]:
    return [d.outcome for d in h.delivers(actions) if d.service_id == service]


# --- a register's status request answered about another transaction (F1) ---------------------

def test_a_register_told_nothing_of_its_payment_from_another_transactions_record():
    """What went wrong: S1 never reached the terminal (unresolved), S2 was approved after it.
    The register asks about S1; the terminal answers with its latest record, S2's, naming S2
    in its MessageReference and the record's header. The register was told `approved`, as if
    S1 had been paid, though the bridge's own poll refuses such an answer. Now: its status
    request ends `error`, saying the terminal answered about another transaction (S2) and
    carrying the terminal's answer as it came; S1 is left as it was."""
    h = Harness()
    unresolved(h)
    h.submit("R1", "S2")
    s2 = responses.payment_response(request_of(h, "R1", "S2"), "approve", h.now)
    h.answer(s2)
    status = status_of("R1", "S1", "T1")
    h.submit("R1", "T1", doc=status)
    answer = responses.status_success(status, s2)  # the record of S2, its header S2
    answer["SaleToPOIResponse"]["TransactionStatusResponse"]["MessageReference"] = {
        "SaleID": "R1", "ServiceID": "S2", "MessageCategory": "Payment"}
    actions = h.answer(answer)
    (result,) = h.delivers(actions)
    assert (result.service_id, result.outcome, result.source) == ("T1", "error", "terminal")
    assert "another transaction" in result.error and "R1/S2" in result.error, result.error
    assert "R1/S1" in result.error
    assert "9999" not in result.error  # (the record's card data is not quoted)
    assert result.response == answer  # the terminal's answer, as it came
    assert h.session.open[TxKey("R1", "S1")].state is TxState.UNRESOLVED  # left alone
    assert told(h, "S1", actions) == []


def test_a_register_told_nothing_from_a_record_whose_header_alone_names_another():
    """The same when only the record's header names the other transaction (the terminal
    echoes the reference asked about): its record is still S2's. A record about the one
    asked about is still told as it is (its own outcome, here for a payment the bridge no
    longer holds)."""
    h = Harness()
    h.submit("R1", "S1")
    s1 = responses.payment_response(request_of(h), "approve", h.now)
    h.answer(s1)
    h.submit("R1", "S2")
    s2 = responses.payment_response(request_of(h, "R1", "S2"), "approve", h.now)
    h.answer(s2)
    status = status_of("R1", "S1", "T1")
    h.submit("R1", "T1", doc=status)
    (result,) = h.delivers(h.answer(responses.status_success(status, s2)))  # echoes S1
    assert result.outcome == "error" and "the record's header names Payment R1/S2" in \
        result.error, result.error
    status = status_of("R1", "S1", "T2")
    h.submit("R1", "T2", doc=status)
    (result,) = h.delivers(h.answer(responses.status_success(status, s1)))
    assert (result.service_id, result.outcome, result.error) == ("T2", "approved", None)


# --- a restart with the wall clock behind the earlier run's stamps (F2, F2b) ----------------

def test_not_found_is_not_believed_when_a_later_payment_of_this_run_is_stamped_earlier():
    """What went wrong: the box restarts with its clock an hour behind. S2 goes to the
    terminal after the restored, unresolved S1, but is stamped before it. The terminal's
    NotFound about S1 (it remembers only its latest Payment, S2), arriving before NTP sets
    the clock, was believed: S1 `not_found`, "nothing was charged", though it may have been.
    Now: a request of this run went out after any of an earlier run, whatever the stamps
    say: the outcome stays unknown, and the register is told so."""
    h = Harness()
    unresolved(h)
    fresh = restarted_behind(h, HOUR)
    fresh.advance(30)  # the first poll about S1 goes unanswered (the terminal booting)
    fresh.submit("R1", "S2")
    fresh.answer(responses.payment_response(request_of(fresh, "R1", "S2"), "approve",
                                            fresh.now))
    assert fresh.sends(fresh.advance(20), "status-poll")  # the background poll about S1
    (result,) = fresh.delivers(fresh.answer(responses.status_not_found(fresh.last_poll())))
    assert (result.service_id, result.outcome) == ("S1", "unresolved"), result
    assert "may remember only its latest" in result.error
    assert fresh.session.open[TxKey("R1", "S1")].extra.get("abandoned")


def test_not_found_is_still_believed_of_the_latest_request_after_a_restart_behind():
    """The rule the fix keeps: NotFound about the terminal's latest request of its category
    means it never got it. S1 restored (the clock behind) and nothing sent since: believed."""
    h = Harness()
    h.submit("R1", "S1")
    fresh = restarted_behind(h, HOUR)
    (result,) = fresh.delivers(fresh.answer(responses.status_not_found(fresh.last_poll())))
    assert (result.service_id, result.outcome) == ("S1", "not_found"), result


def test_a_restored_payment_does_not_hold_the_terminal_for_as_long_as_the_clock_is_behind():
    """What went wrong: the box restarts an hour behind; the payment it was waiting for
    (sent 60 s before the crash) is restored and the terminal does not answer. Its payment
    time-out was counted from its stamp against this run's clock: the register heard
    nothing for an hour, and every new sale meanwhile was refused Busy. Now: it went out no
    later than the restart, so the register hears `unresolved` once a payment time-out from
    then has passed and the polls went unanswered, and the terminal takes new sales."""
    h = Harness()
    h.submit("R1", "S1")
    fresh = restarted_behind(h, HOUR)
    for _ in range(20):  # 20 x 31 s = 620 s, the terminal silent
        fresh.advance(31)
    assert told(fresh) == ["unresolved"]
    assert told(fresh, "S2", fresh.submit("R1", "S2")) == []  # sent, not refused Busy
    assert fresh.sends(purpose="request")[-1].service_id == "S2"


def test_after_the_clock_is_set_a_restored_payment_waits_its_own_time_out_again():
    """The restart's time moves with the clock step that sets it (shift_times), as this
    run's other times do: once NTP has set the clock, the restored payment's own stamp is
    right and counts again. Left where it was, the payment (sent 10 s before the crash)
    would be told `unresolved` as soon as two polls went unanswered, while the shopper may
    still be at the terminal."""
    h = Harness()
    h.submit("R1", "S1")
    sent = h.now
    fresh = restarted_behind(h, HOUR, after=10)
    fresh.advance(5)
    fresh.session.shift_times(HOUR)  # NTP sets the clock: the daemon follows the step
    fresh.now += HOUR
    while fresh.now < sent + SETTINGS.payment_timeout - 2:
        fresh.advance(2)
        assert told(fresh) == [], fresh.now - sent
    for _ in range(60):
        fresh.advance(2)
    assert told(fresh) == ["unresolved"]


# --- Success with less authorised than requested (F3) ----------------------------------------

def short_approval(request: dict, authorised: float | None, currency: str | None = "EUR",
                   now: float = 0.0) -> dict:
    """Adyen's partial payment: the terminal shows Approved, Result Success, and the response
    carries the authorised amount, lower than the one requested (docs.adyen.com/point-of-sale/
    partial-payments: "If this is less than the requested amount, you can make another payment
    request"). `authorised` None: the terminal left AuthorizedAmount out."""
    response = responses.payment_response(request, "approve", now)
    amounts = response["SaleToPOIResponse"]["PaymentResponse"]["PaymentResult"]["AmountsResp"]
    if authorised is None:
        del amounts["AuthorizedAmount"]
    else:
        amounts["AuthorizedAmount"] = authorised
    if currency is None:
        del amounts["Currency"]
    else:
        amounts["Currency"] = currency
    return response


def amounts_of(h: Harness, result: Deliver) -> dict:
    """bridge.amounts as the register gets them (the journal: the session's records)."""
    records = {a.transaction.key: a.transaction for a in h.log if isinstance(a, Record)}
    return partial_amounts(result, records.get)


def test_a_success_with_less_authorised_than_requested_is_partially_approved_as_answered():
    """What went wrong: 5.00 of 12.50 EUR authorised, Result Success (the terminal shows
    Approved): told `approved`, and the register closed the sale as paid in full. Now:
    `partially_approved`, with bridge.amounts, as for Result Partial."""
    h = Harness()
    h.submit("R1", "S1")  # 12.5 EUR
    answer = short_approval(request_of(h), 5.0)
    (result,) = h.delivers(h.answer(answer))
    assert (result.outcome, result.source, result.response) == (
        "partially_approved", "terminal", answer)
    assert amounts_of(h, result) == {"requested": 12.5, "approved": 5.0, "currency": "EUR"}
    (final,) = [a.transaction for a in h.log if isinstance(a, Record)][-1:]
    assert final.outcome == "partially_approved" and "5.0 of 12.5 EUR" in final.detail


def test_a_success_with_less_authorised_than_requested_is_partially_approved_when_polled():
    """The same when the answer was lost and the bridge's status poll finds the record."""
    h = Harness()
    h.submit("R1", "S1")
    lost = short_approval(request_of(h), 5.0)
    h.advance(120)
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), lost)))
    assert (result.outcome, result.source) == ("partially_approved", "status-poll")
    assert amounts_of(h, result) == {"requested": 12.5, "approved": 5.0, "currency": "EUR"}


def test_a_register_told_partially_approved_of_its_own_status_request_too():
    """The same when a register's own status request brings the record of a payment the
    bridge still asks about: the register's answer and the payment both partially_approved,
    and the register's answer carries the asked payment's amounts."""
    h = Harness()
    unresolved(h)
    record = short_approval(request_of(h), 5.0)
    status = status_of("R1", "S1", "T1")
    h.submit("R1", "T1", doc=status)
    results = {d.service_id: d for d in h.delivers(
        h.answer(responses.status_success(status, record)))}
    assert {k: d.outcome for k, d in results.items()} == {
        "T1": "partially_approved", "S1": "partially_approved"}
    assert amounts_of(h, results["T1"]) == {"requested": 12.5, "approved": 5.0,
                                           "currency": "EUR"}


def journal_holds(rig: Rig, outcome: str, source: str, authorised: float | None = None) -> dict:
    """The journal holds POS1/P1, a Payment of 12.50 EUR, ended `outcome` (with the
    terminal's Success for `authorised` of it, if given): its request."""
    request = responses.payment_request("POS1", "P1", RIG_POI, 12.5)
    rig.journal.save(Transaction(
        sale_id="POS1", service_id="P1", poi_id=RIG_POI, category="Payment",
        request=request, digest=request_digest(request), created_at=time.time(),
        updated_at=time.time(), state=TxState.FINAL, outcome=outcome, source=source,
        response=None if authorised is None else short_approval(request, authorised,
                                                                now=time.time())))
    return request


def test_a_register_told_partially_approved_from_the_journal_too(tmp_path):
    """The same when the journal answers a register's status request (a payment the bridge
    ended: recorded `approved` by an earlier version, its record says 5.00 of 12.50)."""
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        journal_holds(rig, "approved", "terminal", authorised=5.0)
        bridge = ask(rig, "T1", "P1")["bridge"]
        assert (bridge["outcome"], bridge["source"]) == ("partially_approved", "journal")
        assert bridge["amounts"] == {"requested": 12.5, "approved": 5.0, "currency": "EUR"}
    finally:
        rig.journal.close()


def test_a_register_told_partially_approved_of_a_payment_the_bridge_no_longer_holds():
    """Review rv22: S1 ended `not_found` (its NotFound believed), yet the terminal took it:
    its record says 5.00 of 12.50 authorised. A register's status request about S1 goes to
    the terminal (the journal answers only money outcomes), and the session no longer holds
    S1 to read the amounts against: told `approved`. The intake now hands the journal's
    AmountsReq of the payment asked about along with the request."""
    h = Harness()
    h.submit("R1", "S1")
    request = request_of(h)
    h.advance(120)
    assert told(h, actions=h.answer(responses.status_not_found(h.last_poll()))) == ["not_found"]
    status = status_of("R1", "S1", "T1")
    asked = request["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"]["AmountsReq"]
    h.do(h.session.submit(parse_message(status), status, request_digest(status), h.now,
                          asked_amounts=asked))
    answer = responses.status_success(status, short_approval(request, 5.0, now=h.now))
    assert told(h, "T1", h.answer(answer)) == ["partially_approved"]


def test_the_intake_hands_the_asked_payments_amounts_to_the_terminal_worker(tmp_path):
    """The daemon's side of the test above: a status request about a Payment the journal
    holds, which the journal does not answer (`not_found`), goes to the terminal with that
    payment's AmountsReq."""
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        request = journal_holds(rig, "not_found", "status-poll")
        worker = rig.intake.workers[RIG_POI]
        handed: list = []
        real_submit = worker.submit

        def submit(request, document, digest, asked_amounts=None):
            handed.append(asked_amounts)
            return real_submit(request, document, digest, asked_amounts)

        worker.submit = submit
        bridge = ask(rig, "T1", "P1")["bridge"]
        assert bridge["source"] != "journal", bridge  # (the terminal is asked: offline here)
        assert handed == [request["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"][
            "AmountsReq"]]
    finally:
        rig.journal.close()


@pytest.mark.parametrize("reference", [
    {"SaleID": "R2", "ServiceID": "S9", "MessageCategory": "Payment"},
    # (review rv23: an echo that keeps the asker's SaleID, the record's header naming R2's:
    # the status request's own header, or the IDs asked with another category)
    {"SaleID": "R1", "ServiceID": "T1", "MessageCategory": "TransactionStatus"},
    {"SaleID": "R1", "ServiceID": "S1", "MessageCategory": "Refund"},
])
def test_another_registers_record_is_not_shown_to_the_register_that_asked(reference):
    """Review rv22: R1 asks about its S1; the terminal answers about its latest payment, R2's
    S9 (a masked card, receipts). The error said so, and attached R2's record all the same:
    R1 read another register's payment, which the intake refuses a status request naming
    it. Now only the error, naming no IDs of the other register's."""
    h = Harness()
    h.submit("R1", "S1")
    h.answer(responses.payment_response(request_of(h), "approve", h.now))
    others = responses.payment_request("R2", "S9", POI, 40.0)
    status = status_of("R1", "S1", "T1")
    h.submit("R1", "T1", doc=status)
    answer = responses.status_success(status, responses.payment_response(others, "approve",
                                                                         h.now))
    answer["SaleToPOIResponse"]["TransactionStatusResponse"]["MessageReference"] = reference
    (result,) = [d for d in h.delivers(h.answer(answer)) if d.service_id == "T1"]
    assert (result.outcome, result.response) == ("error", None), result
    assert "another register's transaction" in result.error and "S9" not in result.error


def test_what_is_still_approved_a_success_without_less_authorised_in_the_same_currency():
    """Left `approved`: no AuthorizedAmount (nothing says less moved); as much as asked or
    more (a tip, cashback); an amount in another currency than asked (not comparable: the
    Result says it), also when only one side names its currency (then they are taken as
    the same). Result Partial stays partially_approved, whatever the amounts."""
    cases = [(None, "EUR", "approved"), (12.5, "EUR", "approved"), (14.0, "EUR", "approved"),
             (5.0, "USD", "approved"), (5.0, None, "partially_approved")]
    for authorised, currency, expected in cases:
        h = Harness()
        h.submit("R1", "S1")
        (result,) = h.delivers(h.answer(short_approval(request_of(h), authorised, currency)))
        assert result.outcome == expected, (authorised, currency, result.outcome)
    h = Harness()
    h.submit("R1", "S1")
    partial = responses.payment_response(request_of(h), "partial", h.now, authorised=12.5)
    assert [d.outcome for d in h.delivers(h.answer(partial))] == ["partially_approved"]


# --- a stray non-outcome under a payment already asked about (F4) ----------------------------

def test_a_stray_busy_under_an_unresolved_payments_ids_changes_nothing():
    """What went wrong: an unresolved payment (the register told, the terminal free) gets a
    stray message under its own SaleID/ServiceID that is no outcome (a repeated Busy frame).
    It was put back to POLLING: the register told `unresolved` a second time, and the
    reconcile backoff started over. Now: a warning, nothing else."""
    h = Harness()
    unresolved(h)
    txn = h.session.open[TxKey("R1", "S1")]
    before = (txn.state, txn.next_poll_at, txn.reconcile_attempts, txn.detail)
    actions = h.answer(responses.payment_response(request_of(h), "busy", h.now))
    assert [type(a) for a in actions] == [Log] and actions[0].level == "warning"
    assert (txn.state, txn.next_poll_at, txn.reconcile_attempts, txn.detail) == before
    for _ in range(6):
        h.advance(31)
    assert told(h) == ["unresolved"]


def test_a_stray_busy_under_a_polled_payments_ids_does_not_start_its_polls_over():
    """The same for a payment the bridge is polling (its answer lost): its unanswered polls
    keep counting, so the register is told `unresolved` when it would have been."""
    h = Harness()
    h.submit("R1", "S1")
    h.advance(120)  # no answer: the first poll
    h.advance(30)  # unanswered
    txn = h.session.open[TxKey("R1", "S1")]
    assert txn.state is TxState.POLLING and txn.unanswered_polls == 1
    before = (txn.unanswered_polls, txn.polls_sent, txn.next_poll_at, txn.detail)
    actions = h.answer(responses.payment_response(request_of(h), "busy", h.now))
    assert [type(a) for a in actions] == [Log]
    assert (txn.unanswered_polls, txn.polls_sent, txn.next_poll_at, txn.detail) == before
    h.advance(1)  # the second poll, unanswered too
    h.advance(30)
    assert told(h) == ["unresolved"]


def test_a_busy_while_waiting_for_the_answer_is_still_asked_about():
    """Unchanged: a Busy under the payment's IDs while the bridge waits for its answer (it may
    answer a copy of the request the terminal is already processing) puts it to polling."""
    h = Harness()
    h.submit("R1", "S1")
    h.answer(responses.payment_response(request_of(h), "busy", h.now))
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    assert told(h) == []

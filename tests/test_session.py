"""The terminal session state machine, driven by events and a fake clock: no I/O, no sleeps."""

from __future__ import annotations

import dataclasses
import json
import itertools

import pytest

from bridge.daemon.registers import stored_result
from bridge.protocol import builders
from bridge.protocol.messages import parse_message
from bridge.protocol.outcome import classify
from bridge.protocol.actions import Deliver, Log, Progress, Record, Send, Unmatched
from bridge.protocol.session import SessionSettings, TerminalSession
from bridge.protocol.transaction import TxKey, TxState, request_digest
from bridge.simulator import responses

POI = "V400m-324688179"
SETTINGS = SessionSettings(
    payment_timeout=120, status_timeout=30, resync_attempts=2, poll_floor=1,
    reconcile_initial=10, reconcile_max_interval=600, reconcile_deadline=3600,
)


class Harness:
    def __init__(self, settings: SessionSettings = SETTINGS, link_up: bool = True) -> None:
        counter = itertools.count(1)
        self.session = TerminalSession(POI, settings, new_service_id=lambda: f"P{next(counter)}")
        self.now = self.started = 1_000_000.0  # (started: this run's first time)
        self.log: list = []
        if link_up:
            self.plug_in()

    def plug_in(self, poi_id: str = POI) -> list:
        """The link comes up, and the device on it answers the identity check as `poi_id`
        (the shell tells the session the POIID of every message before handing it over)."""
        actions = self.do(self.session.link_is_up(self.now))
        return actions + self.name(poi_id)

    def name(self, poi_id: str = POI) -> list:
        """The device answers the latest identity check as `poi_id`."""
        checks = self.sends(purpose="identify")
        if not checks:
            return []
        self.session.terminal_named(poi_id)
        answer = responses.simple_response(checks[-1].document)
        answer["SaleToPOIResponse"]["MessageHeader"]["POIID"] = poi_id
        return self.answer(answer)

    def do(self, actions: list) -> list:
        self.log.extend(actions)
        return actions

    def submit(self, sale: str, service: str, category: str = "Payment", doc=None) -> list:
        doc = doc or responses.payment_request(sale, service, POI, 12.5, category=category)
        return self.do(self.session.submit(parse_message(doc), doc, request_digest(doc), self.now))

    def answer(self, document: dict) -> list:
        return self.do(self.session.receive(parse_message(document), self.now))

    def advance(self, seconds: float) -> list:
        self.now += seconds
        return self.do(self.session.tick(self.now))

    def sends(self, actions=None, purpose: str | None = None) -> list[Send]:
        return [a for a in (actions if actions is not None else self.log)
                if isinstance(a, Send) and (purpose is None or a.purpose == purpose)]

    def delivers(self, actions=None) -> list[Deliver]:
        return [a for a in (actions if actions is not None else self.log) if isinstance(a, Deliver)]

    def last_poll(self) -> dict:
        return self.sends(purpose="status-poll")[-1].document


def request_of(h: Harness, sale="R1", service="S1") -> dict:
    return next(s.document for s in h.sends(purpose="request") if s.service_id == service
                and s.sale_id == sale)


def assert_recorded_before(actions: list, kinds=(Send, Deliver)) -> None:
    """Every Send/Deliver about a transaction comes after a Record of it in the same batch."""
    recorded: set[tuple[str, str]] = set()
    for action in actions:
        if isinstance(action, Record):
            recorded.add((action.transaction.sale_id, action.transaction.service_id))
        elif isinstance(action, Send) and action.purpose in ("request", "status-poll"):
            ids = action.document["SaleToPOIRequest"]["MessageHeader"]
            ref = action.document["SaleToPOIRequest"].get("TransactionStatusRequest", {})
            original = ref.get("MessageReference", {}).get("ServiceID", ids["ServiceID"])
            assert (ids["SaleID"], original) in recorded, f"{action} before its Record"
        elif isinstance(action, Deliver) and action.outcome != "rejected":
            assert (action.sale_id, action.service_id) in recorded, f"{action} before its Record"


# --- the direct paths ------------------------------------------------------------------------

def test_approved_payment_records_before_sending_and_before_reporting():
    h = Harness()
    sent = h.submit("R1", "S1")
    assert_recorded_before(sent)
    assert [s.purpose for s in h.sends(sent)] == ["request"]
    assert sent[0].transaction.state is TxState.AWAITING_RESPONSE
    done = h.answer(responses.payment_response(request_of(h), "approve", h.now))
    assert_recorded_before(done)
    (result,) = h.delivers(done)
    assert (result.outcome, result.source) == ("approved", "terminal")
    body = result.response["SaleToPOIResponse"]["PaymentResponse"]
    assert body["Response"]["Result"] == "Success"
    assert h.session.active is None and not h.session.open


def test_declined_cancelled_and_aborted_outcomes():
    for decision, outcome in [("decline", "declined"), ("cancel", "cancelled"),
                              ("abort", "aborted")]:
        h = Harness()
        h.submit("R1", "S1")
        (result,) = h.delivers(h.answer(responses.payment_response(request_of(h), decision, h.now)))
        assert result.outcome == outcome


def abort_of(sale: str, service: str, abort_service: str = "A1") -> dict:
    return {"SaleToPOIRequest": {
        "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Service",
                          "MessageCategory": "Abort", "MessageType": "Request", "SaleID": sale,
                          "ServiceID": abort_service, "POIID": POI},
        "AbortRequest": {"AbortReason": "MerchantAbort", "MessageReference": {
            "MessageCategory": "Payment", "SaleID": sale, "ServiceID": service, "POIID": POI}}}}


def test_abort_passes_through_while_a_payment_is_open():
    h = Harness()
    h.submit("R1", "S1")
    actions = h.submit("R1", "A1", doc=abort_of("R1", "S1"))
    assert [s.purpose for s in h.sends(actions)] == ["abort"]
    assert h.delivers(actions) == []  # answered once the terminal has it (its frame ACKed)
    (done,) = h.delivers(h.do(h.session.frame_delivered("A1", h.now)))
    assert (done.service_id, done.outcome) == ("A1", "success")
    assert h.session.active == TxKey("R1", "S1")  # the payment still owns the terminal
    (result,) = h.delivers(h.answer(responses.payment_response(request_of(h), "abort", h.now)))
    assert result.outcome == "aborted" and result.service_id == "S1"


def test_abort_of_a_payment_still_held_by_the_bridge_withdraws_it():
    """The payment waits for the identity check of a newly plugged-in terminal: the terminal
    has never seen it. The abort must stop it (it is never sent), not go to the terminal
    while the payment follows once the check is answered."""
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))
    h.submit("R1", "S1")
    actions = h.submit("R1", "A1", doc=abort_of("R1", "S1"))
    assert h.sends(actions) == []
    assert_recorded_before(actions)
    results = {d.service_id: d for d in h.delivers(actions)}
    assert (results["S1"].outcome, results["S1"].source) == ("aborted", "bridge")
    condition = results["S1"].response["SaleToPOIResponse"]["PaymentResponse"]["Response"]
    assert condition["ErrorCondition"] == "Aborted"
    assert "nothing was charged" in condition["AdditionalResponse"]
    assert results["A1"].outcome == "success"
    assert not h.session.open and h.session.active is None
    assert [s.purpose for s in h.sends(h.name())] == []  # the check answered: nothing follows
    assert [s.purpose for s in h.sends(h.submit("R1", "S2"))] == ["request"]


def status_of(sale: str, about: str, status_service: str = "T1",
              category: str | None = "Payment") -> dict:
    """A register's own TransactionStatusRequest about `about` (naming `category`, if any)."""
    doc = builders.status_request(sale_id=sale, service_id=status_service, poi_id=POI,
                                  original_service_id=about, original_category=category or "")
    if category is None:
        del doc["SaleToPOIRequest"]["TransactionStatusRequest"]["MessageReference"][
            "MessageCategory"]
    return doc


def test_an_abort_or_status_request_about_a_held_request_that_is_no_payment_fits_it():
    """The diff review: a held Diagnosis asked about was told "do not charge it another
    way", withdrawn it ended `aborted` (a money outcome; other categories end success or
    failure), and an abort naming another category withdrew it anyway, where a status
    request naming another category is about no transaction the bridge holds."""
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))  # held: the identity check is on the wire
    h.submit("R1", "D1", doc=builders.diagnosis_request(sale_id="R1", service_id="D1",
                                                        poi_id=POI))
    (told,) = h.delivers(h.submit("R1", "T1", doc=status_of("R1", "D1", "T1",
                                                            category="Diagnosis")))
    assert told.outcome == "in_progress"
    text = told.response["SaleToPOIResponse"]["TransactionStatusResponse"]["Response"][
        "AdditionalResponse"]
    assert "Diagnosis R1/D1 has not been sent" in text and "charge" not in text, text
    other = abort_of("R1", "D1", "A1")  # names Payment: no such payment is held
    assert TxKey("R1", "D1") in h.session.open
    refused = h.delivers(h.submit("R1", "A1", doc=other))
    assert [(d.service_id, d.outcome) for d in refused] == [("A1", "rejected")]
    assert h.session.open[TxKey("R1", "D1")].state is TxState.ACCEPTED
    mine = abort_of("R1", "D1", "A2")
    mine["SaleToPOIRequest"]["AbortRequest"]["MessageReference"]["MessageCategory"] = \
        "Diagnosis"
    results = {d.service_id: d for d in h.delivers(h.submit("R1", "A2", doc=mine))}
    assert (results["D1"].outcome, results["A2"].outcome) == ("failure", "success")
    assert "nothing was done" in json.dumps(results["D1"].response)


def test_a_status_request_about_a_payment_still_held_by_the_bridge_is_answered_in_progress():
    """The payment waits for the identity check of a newly plugged-in terminal, or for a
    background status poll: the terminal has never seen it and would answer the register's
    status request NotFound ("nothing was charged"), yet the payment goes out afterwards and
    may be charged. The bridge answers itself: in progress, its result to follow."""
    identity = Harness(link_up=False)
    identity.do(identity.session.link_is_up(identity.now))
    identity.submit("R1", "S1")
    polling = Harness()
    polling.submit("R0", "S0")
    for seconds in (120, 30, 1, 30, 10):  # S0 unresolved, its background poll on the wire
        polling.advance(seconds)
    assert polling.session._probe is not None
    polling.submit("R1", "S1")
    for h, why in ((identity, "to say which terminal it is"), (polling, "a status poll")):
        assert h.session.open[TxKey("R1", "S1")].state is TxState.ACCEPTED
        for status in (status_of("R1", "S1"), status_of("R1", "S1", "T2", category=None)):
            actions = h.submit("R1", status["SaleToPOIRequest"]["MessageHeader"]["ServiceID"],
                               doc=status)
            assert h.sends(actions) == []  # the terminal is not asked
            assert_recorded_before(actions)
            (answer,) = h.delivers(actions)
            assert (answer.outcome, answer.source, answer.error) == ("in_progress", "bridge", None)
            assert actions[0].transaction.state is TxState.FINAL
            # in the shape of a terminal's own InProgress, which a register's library reads
            body = answer.response["SaleToPOIResponse"]["TransactionStatusResponse"]
            assert (body["Response"]["Result"], body["Response"]["ErrorCondition"]) == (
                "Failure", "InProgress")
            assert classify(parse_message(answer.response)).outcome == "in_progress"
            text = body["Response"]["AdditionalResponse"]
            assert "R1/S1 has not been sent" in text and why in text, text
            assert "do not charge it another way" in text
        # A status request naming another category is about no transaction the bridge holds
        # (a ServiceID is unique per SaleID): the terminal is asked, its NotFound is true.
        # (Not to a device that has not said who it is yet: refused, nothing sent.)
        other = status_of("R1", "S1", "T3", category="Reversal")
        asked = h.submit("R1", "T3", doc=other)
        if h is identity:
            assert h.sends(asked) == []
            (told,) = h.delivers(asked)
            assert (told.service_id, told.outcome) == ("T3", "rejected")
            assert "is being asked which terminal it is" in told.error
        else:
            assert [s.purpose for s in h.sends(asked)] == ["passthrough"]
            (told,) = h.delivers(h.answer(responses.status_not_found(other)))
            assert (told.service_id, told.outcome) == ("T3", "not_found")
        assert h.session.open[TxKey("R1", "S1")].state is TxState.ACCEPTED
    # the hold ends: the payment goes out, and its result comes under its own IDs
    assert [s.service_id for s in identity.sends(identity.name(), "request")] == ["S1"]
    (result,) = identity.delivers(identity.answer(
        responses.payment_response(request_of(identity), "approve", identity.now)))
    assert (result.service_id, result.outcome) == ("S1", "approved")


def test_second_request_while_one_is_open_is_refused_busy_and_recorded_as_refused():
    h = Harness()
    h.submit("R1", "S1")
    actions = h.submit("R2", "S9")
    assert h.sends(actions) == []
    # Recorded (final, rejected) before the answer: a redelivered copy of the same request
    # must get the same refusal, not run on the terminal.
    record = actions[0]
    assert isinstance(record, Record)
    assert (record.transaction.state, record.transaction.outcome) == (TxState.FINAL, "rejected")
    (refusal,) = h.delivers(actions)
    assert refusal.outcome == "rejected" and refusal.sale_id == "R2"
    response = refusal.response["SaleToPOIResponse"]["PaymentResponse"]["Response"]
    assert response["ErrorCondition"] == "Busy"
    assert "R1/S1" in refusal.error


def test_a_large_request_refused_busy_is_recorded_as_its_header():
    """Refusals are journaled for 48 h: a register's flood of large ones must not fill the
    disk (transaction.REFUSED_REQUEST_KEPT); the accepted request is kept whole."""
    h = Harness()
    accepted = h.submit("R1", "S1")
    big = responses.payment_request("R2", "S9", POI, 12.5)
    big["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleToAcquirerData"] = "x" * 20000
    (record, *_) = h.submit("R2", "S9", doc=big)
    assert record.transaction.request == {
        "SaleToPOIRequest": {"MessageHeader": big["SaleToPOIRequest"]["MessageHeader"]}}
    assert accepted[0].transaction.request["SaleToPOIRequest"]["PaymentRequest"]


def test_following_a_clock_step_moves_every_time_and_keeps_each_time_out_as_long():
    h = Harness()
    h.submit("R1", "S1")
    txn = h.session.open[TxKey("R1", "S1")]
    before = (txn.created_at, txn.sent_at, txn.deadline, h.session.next_deadline())
    h.session.shift_times(86400.0)
    after = (txn.created_at, txn.sent_at, txn.deadline, h.session.next_deadline())
    assert after == tuple(t + 86400.0 for t in before)
    h.now += 86400.0 + h.session.settings.payment_timeout - 0.1
    assert h.sends(h.advance(0.0), "status-poll") == []  # not yet: the wait is as long
    assert h.sends(h.advance(0.2), "status-poll")  # and then the poll goes


def expecting_a_stray_crypto_error() -> Harness:
    """The device named itself while the check asked with B's key was on the wire: the
    crypto error it will send about that check is expected (named_meanwhile())."""
    h = Harness(link_up=False)
    h.session.identity.other_keys = ("V400m-222",)
    h.do(h.session.link_is_up(h.now))
    own = h.sends(purpose="identify")[0]
    h.do(h.session.refused("crypto error", h.now))  # B's key is tried
    h.session.terminal_named(POI)
    named = responses.simple_response(own.document)
    named["SaleToPOIResponse"]["MessageHeader"]["POIID"] = POI
    h.answer(named)
    assert h.session.identity.stray_refusals == 1
    return h


def test_a_reopened_link_does_not_quote_why_the_device_before_was_not_named():
    """Why the last identity check failed is the device's on the link now: after the link
    reopened (another device, perhaps), a refusal and the state document's
    identity_check_failed quoted the one before's."""
    from bridge.protocol.identity import DeviceIdentity

    identity = DeviceIdentity(POI)
    identity.unnamed("the terminal refused it: it cannot decrypt our message")
    assert "cannot decrypt" in identity.not_named_text()
    identity.new_device()
    assert "cannot decrypt" not in identity.not_named_text()
    assert "(not asked yet)" in identity.not_named_text()
    assert identity.unnamed_reason == ""


def test_a_clock_step_moves_the_identity_times_too():
    """The wrong device's recheck and the deadline of an expected stray crypto error follow
    a step as the poll's and the check's do: a step back of an hour left a device that named
    another terminal unasked for an hour and ten seconds, and a step forward ended at once
    the wait for the stray error, which then was taken as the payment's."""
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))
    h.session.terminal_named("V400m-999999999", h.now)
    h.name("V400m-999999999")
    h.advance(0)
    wait = h.session.next_deadline() - h.now
    h.session.shift_times(-3600.0)
    h.now -= 3600.0
    assert h.session.next_deadline() - h.now == wait
    checks = len(h.sends(purpose="identify"))
    h.advance(wait)
    assert len(h.sends(purpose="identify")) == checks + 1  # asked again, as long after
    # The stray crypto error named_meanwhile() expects (see the key round's tests)
    h = expecting_a_stray_crypto_error()
    h.session.shift_times(3600.0)
    h.now += 3600.0
    h.submit("R1", "S1")
    absorbed = h.do(h.session.refused("crypto error", h.now))  # B's check's answer
    assert h.delivers(absorbed) == []
    assert h.session.open[TxKey("R1", "S1")].state is TxState.AWAITING_RESPONSE


def test_request_while_terminal_offline_is_refused_unavailable():
    h = Harness(link_up=False)
    (refusal,) = h.delivers(h.submit("R1", "S1"))
    assert refusal.outcome == "rejected"
    assert "offline" in refusal.error
    cond = refusal.response["SaleToPOIResponse"]["PaymentResponse"]["Response"]["ErrorCondition"]
    assert cond == "UnavailableDevice"


# --- the timeout-then-status-poll loop ---------------------------------------------------------

def test_response_lost_then_status_poll_recovers_approved_in_the_original_shape():
    h = Harness()
    h.submit("R1", "S1")
    original = responses.payment_response(request_of(h), "approve", h.now)  # never delivered
    assert h.advance(119.9) == []
    actions = h.advance(0.1)
    assert_recorded_before(actions)
    poll = h.sends(actions, "status-poll")[0].document["SaleToPOIRequest"]
    assert poll["MessageHeader"]["MessageCategory"] == "TransactionStatus"
    assert poll["MessageHeader"]["ServiceID"] not in ("S1",)
    assert poll["TransactionStatusRequest"]["MessageReference"] == {
        "SaleID": "R1", "ServiceID": "S1", "MessageCategory": "Payment"}
    done = h.answer(responses.status_success(h.last_poll(), original, inner_header=False))
    (result,) = h.delivers(done)
    assert (result.outcome, result.source) == ("approved", "status-poll")
    doc = result.response["SaleToPOIResponse"]
    assert doc["MessageHeader"]["ServiceID"] == "S1"
    assert doc["MessageHeader"]["MessageType"] == "Response"
    assert doc["PaymentResponse"] == original["SaleToPOIResponse"]["PaymentResponse"]
    assert len(h.sends(purpose="request")) == 1


def test_in_progress_polls_again_after_the_floor_then_approved():
    h = Harness()
    h.submit("R1", "S1")
    original = responses.payment_response(request_of(h), "approve", h.now)
    h.advance(120)
    for _ in range(5):
        actions = h.answer(responses.status_in_progress(h.last_poll()))
        assert any(isinstance(a, Progress) and a.event == "in_progress" for a in actions)
        assert h.sends(actions) == []  # not immediately: the floor keeps it from hot-looping
        assert len(h.sends(h.advance(1.0), "status-poll")) == 1
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), original)))
    assert result.outcome == "approved"
    assert len(h.sends(purpose="status-poll")) == 6


def test_a_terminal_in_progress_for_ever_leaves_the_register_unresolved_at_the_limit():
    """A hung terminal answering InProgress to every poll held the register for ever (a
    reviewer saw 100 polls in 2.5 minutes, no end). At in_progress_limit from the request
    the register is told `unresolved`, the terminal is free again, and the bridge asks on in
    the background: a later answer still resolves it."""
    h = Harness(dataclasses.replace(SETTINGS, in_progress_limit=300))
    h.submit("R1", "S1")
    original = responses.payment_response(request_of(h), "approve", h.now)
    h.advance(120)
    while h.now < 1_000_000.0 + 300:
        assert h.delivers(h.answer(responses.status_in_progress(h.last_poll()))) == []
        assert len(h.sends(h.advance(1.0), "status-poll")) == 1
    told = h.answer(responses.status_in_progress(h.last_poll()))
    (result,) = h.delivers(told)
    assert result.outcome == "unresolved"
    assert "still says the payment is in progress 300 s after it was sent" in result.error
    assert "in_progress_limit 300 s" in result.error and "keeps asking" in result.error
    assert h.session.active is None  # another payment may start
    txn = h.session.open[TxKey("R1", "S1")]
    assert txn.state is TxState.UNRESOLVED
    assert any(isinstance(a, Progress) and a.event == "unresolved" for a in told)
    assert len(h.sends(purpose="request")) == 1  # never sent again
    background = h.sends(h.advance(SETTINGS.reconcile_initial), "status-poll")
    assert len(background) == 1
    # Still "in progress" in the background: asked with the reconcile backoff (20 s now),
    # not every poll_floor, and without an event each time (the diff review saw 7191 polls
    # in two hours, each an event to the register).
    still = h.answer(responses.status_in_progress(h.last_poll()))
    assert not [a for a in still if isinstance(a, Progress | Deliver)]
    assert h.sends(h.advance(19), "status-poll") == []
    assert len(h.sends(h.advance(1), "status-poll")) == 1
    (resolved,) = h.delivers(h.answer(responses.status_success(h.last_poll(), original)))
    assert (resolved.outcome, resolved.source) == ("approved", "status-poll")


def test_request_lost_gives_not_found_and_is_never_resent():
    h = Harness()
    h.submit("R1", "S1")
    h.advance(120)
    (result,) = h.delivers(h.answer(responses.status_not_found(h.last_poll())))
    assert result.outcome == "not_found"
    cond = result.response["SaleToPOIResponse"]["PaymentResponse"]["Response"]["ErrorCondition"]
    assert cond == "NotFound"
    h.advance(10_000)
    assert len(h.sends(purpose="request")) == 1 and len(h.sends(purpose="status-poll")) == 1


def test_silent_terminal_goes_unresolved_frees_terminal_and_resolves_later():
    h = Harness()
    h.submit("R1", "S1")
    original = responses.payment_response(request_of(h), "approve", h.now)
    h.advance(120)                     # poll 1
    h.advance(30)                      # poll 1 unanswered
    assert len(h.sends(h.advance(1), "status-poll")) == 1  # poll 2 after the floor
    actions = h.advance(30)            # poll 2 unanswered -> unresolved
    (report,) = h.delivers(actions)
    assert report.outcome == "unresolved" and report.response is None
    assert "keeps asking" in report.error
    assert h.session.active is None
    assert h.session.open[TxKey("R1", "S1")].state is TxState.UNRESOLVED
    # The register moves on: a new payment is accepted while R1/S1 is reconciled.
    h.submit("R1", "S2")
    h.answer(responses.payment_response(request_of(h, "R1", "S2"), "approve", h.now))
    # Background reconcile with backoff: first after reconcile_initial (10 s).
    assert h.sends(h.advance(9)) == []
    polls = h.sends(h.advance(1), "status-poll")
    assert len(polls) == 1
    ref = polls[0].document["SaleToPOIRequest"]["TransactionStatusRequest"]["MessageReference"]
    assert ref["ServiceID"] == "S1"
    done = h.answer(responses.status_success(h.last_poll(), original))
    (resolved,) = h.delivers(done)
    assert (resolved.outcome, resolved.source) == ("approved", "status-poll")
    assert any(isinstance(a, Progress) and a.event == "resolved" for a in done)
    assert not h.session.open


def unresolved_then_another_paid() -> Harness:
    """R1/S1 unresolved (no answer, polls unanswered), then R1/S2 approved on the terminal."""
    h = Harness()
    h.submit("R1", "S1")
    for seconds in (120, 30, 1, 30):
        h.advance(seconds)
    h.submit("R1", "S2")
    h.answer(responses.payment_response(request_of(h, "R1", "S2"), "approve", h.now))
    return h


def test_not_found_after_another_payment_went_to_the_terminal_leaves_the_outcome_unknown():
    """The terminal may remember only its latest request of a category ("last such Request"
    in the vendor's NotFound). After S2 went to it, its NotFound about the unresolved S1 may
    be forgetting, not "never received": S1 is not reported not_found (the register would
    charge again), but unresolved, no longer asked about, with why. A NotFound before any
    later request still means never received."""
    h = Harness()
    h.submit("R1", "S1")
    h.advance(120)
    h.advance(30)
    h.advance(1)
    (report,) = h.delivers(h.advance(30))
    assert report.outcome == "unresolved"
    h.submit("R1", "S2")
    h.answer(responses.payment_response(request_of(h, "R1", "S2"), "approve", h.now))
    assert len(h.sends(h.advance(10), "status-poll")) == 1  # the background poll for S1
    told = h.answer(responses.status_not_found(h.last_poll()))
    (result,) = h.delivers(told)
    assert (result.service_id, result.outcome) == ("S1", "unresolved")
    assert "has taken another Payment request since this one" in result.error
    txn = h.session.open[TxKey("R1", "S1")]
    assert (txn.state, txn.next_poll_at, txn.extra.get("abandoned")) == \
        (TxState.UNRESOLVED, None, True)
    assert any(isinstance(a, Progress) and a.event == "reconcile_abandoned" for a in told)
    assert h.sends(h.advance(3600)) == []  # no more polls about it
    # The same after the system clock was stepped (the daemon shifts every time it holds):
    # the request's time must move with the transactions' (the diff review's case).
    h3 = unresolved_then_another_paid()
    h3.session.shift_times(3600.0)
    h3.now += 3600.0
    assert len(h3.sends(h3.advance(10), "status-poll")) == 1
    (result,) = h3.delivers(h3.answer(responses.status_not_found(h3.last_poll())))
    assert result.outcome == "unresolved", result
    # Another category since does not count: a Reversal's "last such Request" is its own.
    h2 = Harness()
    h2.submit("R1", "S1")
    h2.session.last_request_at["Reversal"] = h2.now + 1
    h2.advance(120)
    (result,) = h2.delivers(h2.answer(responses.status_not_found(h2.last_poll())))
    assert result.outcome == "not_found"


def test_a_not_found_sent_again_does_not_abandon_the_payment_a_second_time():
    """The terminal sends its NotFound about a payment abandoned for it again (a frame
    repeated, a late copy): the register was told once that the bridge stopped asking, and a
    second reconcile_abandoned and unresolved say nothing new. A record of the payment still
    settles it."""
    h = unresolved_then_another_paid()
    h.advance(10)
    poll = h.last_poll()
    told = h.answer(responses.status_not_found(poll))
    assert [(d.service_id, d.outcome) for d in h.delivers(told)] == [("S1", "unresolved")]
    again = h.answer(responses.status_not_found(poll))
    assert h.delivers(again) == [] and not any(isinstance(a, (Progress, Record)) for a in again)
    txn = h.session.open[TxKey("R1", "S1")]
    assert (txn.state, txn.next_poll_at, txn.extra.get("abandoned")) == \
        (TxState.UNRESOLVED, None, True)
    original = responses.payment_response(request_of(h), "approve", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(poll, original)))
    assert (result.service_id, result.outcome, result.source) == ("S1", "approved", "status-poll")


def test_a_late_in_progress_does_not_start_asking_about_an_abandoned_payment_again():
    """The bridge gave up on a payment at reconcile_deadline and told the register it stopped
    asking. The answer to its last poll then arrives late, "in progress": it used to start
    the background polls again (and, past the deadline, announce the abandon once more).
    It brings no outcome and changes nothing; a record of the payment still settles it."""
    h = Harness(SessionSettings(payment_timeout=1, status_timeout=1, resync_attempts=1,
                                poll_floor=0.1, reconcile_initial=2, reconcile_max_interval=8,
                                reconcile_deadline=20))
    h.submit("R1", "S1")
    while h.session.next_deadline() is not None:  # unresolved, then abandoned at the deadline
        h.now = h.session.next_deadline()
        h.do(h.session.tick(h.now))
    last_poll = h.last_poll()
    told = len(h.delivers())
    late = h.answer(responses.status_in_progress(last_poll))
    assert h.sends(late) == [] and h.delivers(late) == []
    assert not any(isinstance(a, (Record, Progress)) for a in late)
    assert h.session.next_deadline() is None
    h.advance(600)
    assert len(h.delivers()) == told and h.sends(h.advance(600)) == []
    original = responses.payment_response(request_of(h), "approve", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(last_poll, original)))
    assert (result.service_id, result.outcome) == ("S1", "approved")


def test_a_payment_given_up_on_is_asked_once_more_after_a_restart_but_not_announced_again():
    """After a restart every transaction the journal holds open is asked about once more,
    a payment given up on too (the terminal may know it now). The same answer again used to
    announce the abandon again: an unresolved result, an event and an error line at every
    restart (the soak's seed 8: 25 times for 2 payments). Meanwhile its record still says it
    was given up on, and why (a repeat is answered from it: the first fix, b42be83, made it
    say 'the bridge keeps asking and will report the result', which never came). A resync
    still announces its result; a new outcome still settles it."""
    h = unresolved_then_another_paid()
    h.advance(10)
    poll = h.last_poll()
    h.answer(responses.status_not_found(poll))  # abandoned, and said so once
    (record,) = [a.transaction for a in h.log if isinstance(a, Record)
                 and a.transaction.key == TxKey("R1", "S1")][-1:]
    assert record.extra.get("abandoned")
    for restart in (1, 2):
        last_requests = dict(h.session.last_request_at)
        ids = itertools.count(1)
        h.session = TerminalSession(POI, SETTINGS,
                                    new_service_id=lambda r=restart: f"X{r}P{next(ids)}")
        h.session.last_request_at.update(last_requests)  # as the worker restores them
        restored = h.do(h.session.restore([record], h.now))
        (record,) = [a.transaction for a in restored if isinstance(a, Record)]
        assert record.extra.get("abandoned") and "acquirer" in record.detail
        assert "acquirer" in stored_result(record).error  # what a repeat is told
        assert not any(isinstance(a, Progress) for a in restored)
        h.plug_in()
        again = h.answer(responses.status_not_found(h.last_poll()))
        assert h.delivers(again) == [], h.delivers(again)
        assert not any(isinstance(a, Progress) for a in again)
        assert not any(isinstance(a, Log) and a.level == "error" for a in again)
        assert h.session.next_deadline() is None  # no longer asked about
    asked = h.do(h.session.resync(record, h.now))  # the operator asks once more
    assert len(h.sends(asked, "status-poll")) == 1
    (told,) = h.delivers(h.answer(responses.status_not_found(h.last_poll())))
    assert (told.service_id, told.outcome) == ("S1", "unresolved") and "acquirer" in told.error
    h.session = TerminalSession(POI, SETTINGS, new_service_id=lambda: "Y1")
    h.do(h.session.restore([record], h.now))
    h.plug_in()
    original = responses.payment_response(request_of(h, "R1", "S1"), "approve", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), original)))
    assert (result.service_id, result.outcome) == ("S1", "approved")


def test_reconcile_backoff_grows_is_capped_and_gives_up_at_the_deadline():
    h = Harness(SessionSettings(payment_timeout=1, status_timeout=1, resync_attempts=1,
                                poll_floor=0.1, reconcile_initial=2, reconcile_max_interval=8,
                                reconcile_deadline=60))
    h.submit("R1", "S1")
    h.advance(1)
    h.advance(1)  # unresolved
    gaps, last = [], h.now
    txn = h.session.open[TxKey("R1", "S1")]
    while txn.next_poll_at is not None or txn.deadline is not None:
        h.now = h.session.next_deadline()
        if h.sends(h.do(h.session.tick(h.now)), "status-poll"):
            gaps.append(round(h.now - last, 3))
            last = h.now
    assert gaps[:4] == [2.0, 5.0, 9.0, 9.0]  # 2, then 4+1 s, then capped at 8+1 s
    abandoned = [a for a in h.log if isinstance(a, Progress) and a.event == "reconcile_abandoned"]
    assert len(abandoned) == 1
    assert h.session.open[TxKey("R1", "S1")].state is TxState.UNRESOLVED
    assert h.session.next_deadline() is None
    # Told as such, and recorded: the unresolved report said the bridge keeps asking
    report = h.delivers()[-1]
    assert (report.outcome, report.response) == ("unresolved", None)
    assert "stopped asking" in report.error and "acquirer" in report.error
    record = [a.transaction for a in h.log if isinstance(a, Record)][-1]
    assert record.extra.get("abandoned") and record.detail == report.error
    # a resync asks the terminal once more; unanswered, it is abandoned again
    asked = h.do(h.session.resync(record, h.now))
    assert len(h.sends(asked, "status-poll")) == 1
    h.advance(1)
    assert h.delivers()[-1].error == report.error
    assert h.session.next_deadline() is None


def test_unplug_mid_payment_then_replug_polls_at_once_and_resolves():
    h = Harness()
    h.submit("R1", "S1")
    original = responses.payment_response(request_of(h), "approve", h.now)
    h.now += 5
    down = h.do(h.session.link_is_down("serial device disappeared", h.now))
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    assert h.sends(down) == []
    h.now += 3
    up = h.plug_in()
    assert len(h.sends(up, "status-poll")) == 1
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), original)))
    assert result.outcome == "approved"
    assert len(h.sends(purpose="request")) == 1


def test_unplugged_for_long_reports_unresolved_without_sending():
    """Not before payment_timeout (120 s) from the request: the shopper may still be at the
    terminal; each poll that cannot go meanwhile is tried again."""
    h = Harness()
    h.submit("R1", "S1")
    h.do(h.session.link_is_down("EIO", h.now))
    for _ in range(3):
        h.advance(30)
    assert h.delivers() == []
    h.advance(30)  # 120 s after the request
    (report,) = h.delivers()
    assert report.outcome == "unresolved"
    # only the identity check and the original request ever went out
    assert [s.purpose for s in h.sends()] == ["identify", "request"]


def test_a_flapping_link_does_not_make_a_payment_unresolved_before_its_time():
    """Each replug polls at once, and a link lost again a moment later cut the poll, which
    counted as unanswered: two blips in 1.6 s told the register 'unresolved' while the
    shopper was still entering the PIN. Until payment_timeout from the request, the polls
    are asked again; the terminal's answer then still settles it."""
    h = Harness()
    h.submit("R1", "S1")
    original = responses.payment_response(request_of(h), "approve", h.now)
    for _ in range(6):  # blips: down, up (a poll goes), down again 0.3 s later
        h.now += 0.3
        h.do(h.session.link_is_down("EIO", h.now))
        h.now += 0.2
        h.plug_in()
    assert [d.outcome for d in h.delivers()] == []
    h.now += 1
    (result,) = h.delivers(h.answer(original))  # the terminal's own answer, once it is done
    assert (result.outcome, result.source) == ("approved", "terminal")


def test_request_not_acknowledged_is_polled_never_resent():
    h = Harness()
    h.submit("R1", "S1")
    h.do(h.session.send_failed("S1", "no ACK after 3 tries", h.now))
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    polls = h.sends(h.advance(1), "status-poll")
    assert len(polls) == 1
    h.answer(responses.status_not_found(h.last_poll()))
    assert len(h.sends(purpose="request")) == 1


def test_event_notification_instead_of_response_triggers_a_status_poll():
    h = Harness()
    h.submit("R1", "S1")
    reject = {"SaleToPOIRequest": {
        "MessageHeader": {"MessageCategory": "Event", "MessageClass": "Event",
                          "MessageType": "Notification", "POIID": POI, "SaleID": "N/A",
                          "ProtocolVersion": "3.0"},
        "EventNotification": {"EventToNotify": "Reject", "EventDetails": "message=bad"}}}
    h.answer(reject)
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    assert len(h.sends(h.advance(1), "status-poll")) == 1


def test_garbage_from_terminal_while_waiting_is_an_unusable_answer():
    h = Harness()
    h.submit("R1", "S1")
    h.do(h.session.unusable("not JSON", h.now))
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING


def test_late_original_response_wins_and_the_poll_answer_is_ignored():
    h = Harness()
    h.submit("R1", "S1")
    h.advance(120)
    poll = h.last_poll()
    (result,) = h.delivers(h.answer(responses.payment_response(request_of(h), "decline", h.now)))
    assert (result.outcome, result.source) == ("declined", "terminal")
    late = h.answer(responses.status_in_progress(poll))
    assert h.delivers(late) == [] and all(isinstance(a, Log) for a in late)


def test_duplicate_response_after_final_is_ignored():
    h = Harness()
    h.submit("R1", "S1")
    answer = responses.payment_response(request_of(h), "approve", h.now)
    h.answer(answer)
    again = h.answer(answer)
    assert h.delivers(again) == []
    # Unmatched: the shell looks in the journal (a late copy there, logged and dropped; a
    # lost record, kept and published: test_terminal_worker.py)
    (unmatched,) = again
    assert isinstance(unmatched, Unmatched)
    assert (unmatched.sale_id, unmatched.service_id, unmatched.outcome) == ("R1", "S1",
                                                                           "approved")


def test_non_money_request_times_out_as_error_without_status_polls():
    h = Harness()
    h.submit("R1", "D1", category="Diagnosis")
    (result,) = h.delivers(h.advance(120))
    assert result.outcome == "error" and "did not answer" in result.error
    assert h.sends(purpose="status-poll") == []


def test_diagnosis_answer_is_success():
    h = Harness()
    h.submit("R1", "D1", category="Diagnosis")
    req = request_of(h, "R1", "D1")
    (result,) = h.delivers(h.answer(responses.simple_response(req)))
    assert result.outcome == "success"


def test_a_non_money_answer_ends_success_failure_or_error(fixtures_dir):
    """A Login (or Diagnosis...) the terminal answers Failure / InProgress or Busy did not
    run: `failure`, final (it was published final with outcome `in_progress`, a word that
    says "ask again" of a request nothing asks about). An answer under its IDs that names a
    money category is no result of it: `error`, not `approved`."""
    login = json.loads((fixtures_dir / "java-login-request.json").read_text())  # (its body)
    for condition in ("InProgress", "Busy"):
        h = Harness()
        doc = {"SaleToPOIRequest": {
            "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Service",
                              "MessageCategory": "Login", "MessageType": "Request",
                              "SaleID": "R1", "ServiceID": "L1", "POIID": POI},
            "LoginRequest": login}}
        h.submit("R1", "L1", category="Login", doc=doc)
        answer = responses.simple_response(doc, result="Failure")
        answer["SaleToPOIResponse"]["LoginResponse"]["Response"]["ErrorCondition"] = condition
        (result,) = h.delivers(h.answer(answer))
        assert (result.outcome, result.source) == ("failure", "terminal"), condition
        assert not h.session.open and h.session.active is None
    h = Harness()
    h.submit("R1", "D1", category="Diagnosis")
    paid = responses.simple_response(request_of(h, "R1", "D1"))
    paid["SaleToPOIResponse"]["MessageHeader"]["MessageCategory"] = "Payment"
    paid["SaleToPOIResponse"]["PaymentResponse"] = paid["SaleToPOIResponse"].pop(
        "DiagnosisResponse")
    (result,) = h.delivers(h.answer(paid))
    assert result.outcome == "error" and "no Diagnosis result" in result.error, result
    assert not h.session.open


def test_register_status_request_passes_through_and_settles_an_unresolved_transaction():
    h = Harness()
    h.submit("R1", "S1")
    original = responses.payment_response(request_of(h), "approve", h.now)
    h.do(h.session.link_is_down("EIO", h.now))
    h.advance(30)
    h.advance(30)  # unresolved
    h.plug_in()
    bridge_poll = h.last_poll()
    status = {"SaleToPOIRequest": {
        "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Service",
                          "MessageCategory": "TransactionStatus", "MessageType": "Request",
                          "SaleID": "R1", "ServiceID": "T1", "POIID": POI},
        "TransactionStatusRequest": {"MessageReference": {
            "SaleID": "R1", "ServiceID": "S1", "MessageCategory": "Payment"}}}}
    actions = h.submit("R1", "T1", doc=status)
    assert [s.purpose for s in h.sends(actions)] == ["passthrough"]
    done = h.answer(responses.status_success(status, original))
    outcomes = {(d.service_id, d.outcome, d.source) for d in h.delivers(done)}
    assert ("T1", "approved", "terminal") in outcomes      # the register's own answer
    assert ("S1", "approved", "status-poll") in outcomes   # and the bridge's transaction
    late = h.answer(responses.status_in_progress(bridge_poll))
    assert h.delivers(late) == []


def test_a_register_status_answer_about_an_ended_payment_is_handed_to_the_shell():
    """The terminal's record of a payment the session no longer holds (the bridge ended it,
    `not_found` say), found by a register's status request: besides the register's own
    answer, an Unmatched in the original response's shape, marked with the status request
    that found it, so the shell can correct what the journal holds (TerminalWorker). Not for
    a payment the session still holds: that one the answer settles itself."""
    h = Harness()
    h.submit("R1", "S1")
    original = responses.payment_response(request_of(h), "approve", h.now)
    h.advance(120)
    (ended,) = h.delivers(h.answer(responses.status_not_found(h.last_poll())))
    assert ended.outcome == "not_found"
    status = status_of("R1", "S1", category="Payment")
    h.submit("R1", "T1", doc=status)
    actions = h.answer(responses.status_success(status, original, inner_header=False))
    assert [(d.service_id, d.outcome) for d in h.delivers(actions)] == [("T1", "approved")]
    (found,) = [a for a in actions if isinstance(a, Unmatched)]
    assert (found.sale_id, found.service_id, found.category, found.outcome, found.found_by) \
        == ("R1", "S1", "Payment", "approved", "R1/T1")
    header = found.response["SaleToPOIResponse"]["MessageHeader"]
    assert (header["SaleID"], header["ServiceID"], header["MessageCategory"],
            header["MessageType"], header["POIID"]) == ("R1", "S1", "Payment", "Response", POI)
    assert found.response["SaleToPOIResponse"]["PaymentResponse"] == \
        original["SaleToPOIResponse"]["PaymentResponse"]
    # NotFound, or a record of another category than the one named, is nothing to correct
    for asking, named, answer_of in (
            ("T2", "Payment", responses.status_not_found),
            ("T3", "Reversal", lambda st: responses.status_success(st, original))):
        status = status_of("R1", "S1", asking, category=named)
        h.submit("R1", asking, doc=status)
        actions = h.answer(answer_of(status))
        assert [d.service_id for d in h.delivers(actions)] == [asking]
        assert not [a for a in actions if isinstance(a, Unmatched)]


def test_a_register_status_answer_settles_only_a_transaction_of_the_category_asked_about():
    """A register's status request names a category with its SaleID and ServiceID. A
    Reversal asked about under a Payment's IDs is no Payment: the terminal's answer about it,
    echoing the IDs, must not end the open payment (a reversal's approval ended it
    "approved"). Nor does a record of another category, even when the register named none:
    the record's own header or body says what it is. A NotFound about the Reversal is true
    of it (no reversal has those IDs), and the payment is left as it was."""
    reversal = responses.payment_request("R1", "S1", POI, 12.5, category="Reversal")

    def polled_payment() -> Harness:
        h = Harness()
        h.submit("R1", "S1")
        h.do(h.session.link_is_down("EIO", h.now))
        h.advance(30)
        h.advance(30)
        h.plug_in()  # S1 asked about by status poll: a register's status answer may settle it
        assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
        return h

    def payment_left_alone(h: Harness, actions: list) -> None:
        assert [d.service_id for d in h.delivers(actions)] == ["T1"]
        assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING

    cases = [  # (the category the register names, the record the terminal answers with)
        ("Reversal", reversal), ("Reversal", None), (None, reversal)]
    for named, record_of in cases:
        h = polled_payment()
        status = status_of("R1", "S1", category=named)
        h.submit("R1", "T1", doc=status)
        original = responses.payment_response(record_of or request_of(h), "approve", h.now)
        answer = responses.status_success(status, original)
        answer["SaleToPOIResponse"]["TransactionStatusResponse"]["MessageReference"] = {
            "SaleID": "R1", "ServiceID": "S1"}  # the IDs echoed
        if named:
            answer["SaleToPOIResponse"]["TransactionStatusResponse"]["MessageReference"][
                "MessageCategory"] = named
        actions = h.answer(answer)
        payment_left_alone(h, actions)
        assert any(isinstance(a, Log) and "not applied" in a.message for a in actions)
    # NotFound echoing the reference: true of the reversal, says nothing of the payment
    h = polled_payment()
    status = status_of("R1", "S1", category="Reversal")
    h.submit("R1", "T1", doc=status)
    answer = responses.status_not_found(status)
    answer["SaleToPOIResponse"]["TransactionStatusResponse"]["MessageReference"] = \
        status["SaleToPOIRequest"]["TransactionStatusRequest"]["MessageReference"]
    actions = h.answer(answer)
    payment_left_alone(h, actions)
    assert h.delivers(actions)[0].outcome == "not_found"
    # The payment's own record settles it, whether the register named its category or none.
    for named in ("Payment", None):
        h = polled_payment()
        status = status_of("R1", "S1", category=named)
        h.submit("R1", "T1", doc=status)
        original = responses.payment_response(request_of(h), "approve", h.now)
        outcomes = {(d.service_id, d.outcome, d.source) for d in h.delivers(
            h.answer(responses.status_success(status, original)))}
        assert ("S1", "approved", "status-poll") in outcomes, (named, outcomes)
        assert not h.session.open


def test_request_is_held_while_a_background_poll_is_on_the_wire():
    h = Harness()
    h.submit("R1", "S1")
    original = responses.payment_response(request_of(h), "approve", h.now)
    h.advance(120)
    h.advance(30)
    h.advance(1)
    h.advance(30)  # unresolved
    h.advance(10)  # background poll on the wire
    assert h.session._probe is not None
    held = h.submit("R2", "S2")
    assert h.sends(held) == [] and isinstance(held[0], Record)
    assert held[0].transaction.state is TxState.ACCEPTED
    released = h.answer(responses.status_success(h.last_poll(), original))
    assert [s.purpose for s in h.sends(released)] == ["request"]
    assert h.sends(released)[0].service_id == "S2"


def test_held_request_is_rejected_if_the_link_drops_before_it_was_sent():
    h = Harness()
    h.submit("R1", "S1")
    h.advance(120)  # foreground poll on the wire
    h.advance(30)
    h.advance(1)
    h.advance(30)   # unresolved
    h.advance(10)   # background poll on the wire
    h.submit("R2", "S2")
    actions = h.do(h.session.link_is_down("EIO", h.now))
    refused = [d for d in h.delivers(actions) if d.service_id == "S2"]
    assert refused and refused[0].outcome == "rejected" and "nothing was charged" in refused[0].error
    assert all(s.service_id != "S2" for s in h.sends())


# --- restart and resync ------------------------------------------------------------------------

def test_restore_after_crash_polls_and_never_resends():
    h = Harness()
    h.submit("R1", "S1")
    h.submit("R1", "D1", category="Diagnosis")  # refused busy: recorded as final
    recorded = [a.transaction for a in h.log if isinstance(a, Record)]
    open_txn = [t for t in recorded if t.service_id == "S1"][-1]
    original = responses.payment_response(request_of(h), "approve", h.now)

    fresh = Harness(link_up=False)
    fresh.now = h.now + 5
    restored = fresh.do(fresh.session.restore([open_txn], fresh.now))
    assert fresh.sends(restored) == []
    assert any(isinstance(a, Progress) and a.event == "recovering" for a in restored)
    up = fresh.plug_in()
    assert [s.purpose for s in fresh.sends(up)] == ["identify", "status-poll"]  # who it is, then the poll
    (result,) = fresh.delivers(fresh.answer(responses.status_success(fresh.last_poll(), original)))
    assert result.outcome == "approved"
    assert fresh.sends(purpose="request") == []


def test_a_restored_payment_owns_the_terminal_again():
    """After a crash the payment that was in flight is asked about first: a new payment is
    refused Busy meanwhile, as it would have been without the restart."""
    h = Harness()
    h.submit("R1", "S1")
    open_txn = [a.transaction for a in h.log if isinstance(a, Record)][-1]
    fresh = Harness(link_up=False)
    fresh.do(fresh.session.restore([open_txn], fresh.now))
    assert fresh.session.active == TxKey("R1", "S1")
    fresh.plug_in()
    refused = fresh.submit("R2", "S2")
    assert fresh.sends(refused) == []
    (busy,) = fresh.delivers(refused)
    assert busy.outcome == "rejected" and "R1/S1" in busy.error
    assert [s.purpose for s in fresh.sends()] == ["identify", "status-poll"]
    original = responses.payment_response(request_of(h), "approve", h.now)
    fresh.answer(responses.status_success(fresh.last_poll(), original))
    assert fresh.session.active is None
    assert [s.purpose for s in fresh.sends(fresh.submit("R2", "S3"))] == ["request"]


def test_restore_finishes_open_non_money_transactions_as_error():
    h = Harness()
    h.submit("R1", "D1", category="Diagnosis")
    txn = [a.transaction for a in h.log if isinstance(a, Record)][-1]
    fresh = Harness()
    (result,) = fresh.delivers(fresh.do(fresh.session.restore([txn], fresh.now)))
    assert result.outcome == "error" and "restarted" in result.error


def test_resync_of_a_final_transaction_asks_again_and_falls_back_to_the_journal():
    h = Harness()
    h.submit("R1", "S1")
    h.answer(responses.payment_response(request_of(h), "approve", h.now))
    final = [a.transaction for a in h.log if isinstance(a, Record)][-1]
    assert final.state is TxState.FINAL
    actions = h.do(h.session.resync(final, h.now))
    assert len(h.sends(actions, "status-poll")) == 1
    h.advance(30)
    h.advance(1)
    fallen_back = h.advance(30)
    (fallback,) = h.delivers(fallen_back)
    assert (fallback.outcome, fallback.source) == ("approved", "journal")
    assert fallback.response == final.response
    # the result stands: no error beside an approval; the note is the event's
    assert fallback.error is None
    (event,) = [a for a in fallen_back if isinstance(a, Progress)]
    assert event.event == "completed" and "did not answer the resync" in event.detail
    assert not h.session.open
    # Recorded final again, before it is published: the journal must not keep the row open
    # (polled again after every restart, counted in flight, never pruned).
    assert_recorded_before(fallen_back)
    (record,) = [a.transaction for a in fallen_back if isinstance(a, Record)]
    assert (record.state, record.outcome, record.source) == (TxState.FINAL, "approved", "terminal")
    assert record.response == final.response and "reopened_from" not in record.extra


def test_resync_answered_not_found_keeps_the_stored_approval():
    """Hours and many sales later the terminal may have forgotten a payment: its NotFound to
    a cashier's "download" must not turn an approval it gave into `not_found`."""
    h = Harness()
    h.submit("R1", "S1")
    h.answer(responses.payment_response(request_of(h), "approve", h.now))
    final = [a.transaction for a in h.log if isinstance(a, Record)][-1]
    h.do(h.session.resync(final, h.now + 3600))
    for forgotten in (responses.status_not_found, responses.status_in_progress):
        settled = h.answer(forgotten(h.last_poll()))
        (result,) = h.delivers(settled)
        assert (result.outcome, result.source, result.error) == ("approved", "journal", None)
        assert result.response == final.response
        (event,) = [a for a in settled if isinstance(a, Progress)]
        assert event.event == "completed" and "stored result stands" in event.detail
        (record,) = [a.transaction for a in settled if isinstance(a, Record)]
        assert (record.state, record.outcome) == (TxState.FINAL, "approved")
        assert not h.session.open
        h.do(h.session.resync(record, h.now))


def test_resync_of_a_final_transaction_republishes_the_terminal_answer():
    h = Harness()
    h.submit("R1", "S1")
    answer = responses.payment_response(request_of(h), "approve", h.now)
    h.answer(answer)
    final = [a.transaction for a in h.log if isinstance(a, Record)][-1]
    h.do(h.session.resync(final, h.now))
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), answer)))
    assert (result.outcome, result.source) == ("approved", "status-poll")


def test_busy_with_our_own_service_id_is_not_an_outcome_the_status_poll_decides():
    """A Busy answering a retransmitted copy of our request (our ACK was lost) must not be
    taken for the payment's outcome: the terminal may be approving the first copy."""
    h = Harness()
    h.submit("R1", "S1")
    busy = responses.payment_response(request_of(h), "busy", h.now)
    assert h.delivers(h.answer(busy)) == []
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    h.advance(1)
    original = responses.payment_response(request_of(h), "approve", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), original)))
    assert (result.outcome, result.source) == ("approved", "status-poll")


def test_status_answer_whose_original_ended_busy_is_final_not_polled_forever():
    h = Harness()
    h.submit("R1", "S1")
    h.advance(120)
    busy = responses.payment_response(request_of(h), "busy", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), busy)))
    assert (result.outcome, result.source) == ("declined", "status-poll")
    assert not h.session.open and h.session.active is None


def test_requests_are_refused_while_the_link_holds_another_terminal():
    h = Harness()
    h.session.wrong_device = "P400Plus-111"
    refused = h.submit("POS1", "S1")
    assert not h.sends(refused)
    (result,) = h.delivers(refused)
    assert result.outcome == "rejected" and "P400Plus-111" in result.error
    assert any(isinstance(a, Record) and a.transaction.state is TxState.FINAL for a in refused)
    h.session.wrong_device = None  # the shell saw the right POIID, or reopened the link
    accepted = h.submit("POS1", "S2")
    assert [s.purpose for s in h.sends(accepted)] == ["request"]


def test_a_new_link_is_asked_who_is_on_it_before_anything_goes_out():
    h = Harness(link_up=False)
    up = h.do(h.session.link_is_up(h.now))
    (check,) = h.sends(up)
    header = check.document["SaleToPOIRequest"]["MessageHeader"]
    assert (check.purpose, header["MessageCategory"]) == ("identify", "Diagnosis")
    assert parse_message(check.document).body_key() == "DiagnosisRequest"
    waiting = h.submit("POS1", "S1")  # arrives while the check is on the wire
    assert h.sends(waiting) == [] and h.delivers(waiting) == []
    assert any(isinstance(a, Progress) and a.event == "accepted" for a in waiting)
    named = h.name()
    assert [s.purpose for s in h.sends(named)] == ["request"]
    assert h.session.named and h.session.wrong_device is None


def test_a_device_that_names_another_terminal_gets_neither_requests_nor_polls():
    """Ports swapped: the payment that waited for the check is refused (nothing was sent), and
    an open transaction's status poll waits for the right terminal: answered NotFound by the
    wrong one, it would end a payment the right one charged as not_found."""
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))
    h.submit("POS1", "S1")
    wrong = h.name("P400Plus-111")
    assert [s.purpose for s in h.sends(wrong)] == []
    (refused,) = h.delivers(wrong)
    assert (refused.service_id, refused.outcome) == ("S1", "rejected")
    assert "P400Plus-111" in refused.error and "nothing was sent" in refused.error
    condition = refused.response["SaleToPOIResponse"]["PaymentResponse"]["Response"]
    assert condition["ErrorCondition"] == "UnavailableDevice"
    assert not h.session.open and h.session.active is None

    h.do(h.session.link_is_down("unplugged", h.now))
    h.now += 1
    h.plug_in()
    h.submit("POS1", "S2")
    h.do(h.session.link_is_down("unplugged", h.now))  # S2's answer is lost with the link
    h.now += 1
    h.do(h.session.link_is_up(h.now))
    h.name("P400Plus-111")  # and the wrong terminal is plugged in
    asked = []
    for _ in range(4):  # nothing but, now and then, the identity check again
        sent = [s.purpose for s in h.sends(h.advance(30))]
        assert set(sent) <= {"identify"}, sent
        asked += sent
        if sent:
            h.name("P400Plus-111")  # the same answer
    assert 1 <= len(asked) <= 3  # asked again, each time after a longer pause
    assert h.session.open[TxKey("POS1", "S2")].state in (TxState.POLLING, TxState.UNRESOLVED)
    assert h.session.next_deadline() > h.now  # waiting, not spinning
    h.do(h.session.link_is_down("unplugged", h.now))
    h.now += 1
    h.plug_in()  # the right terminal is back
    original = responses.payment_response(request_of(h, "POS1", "S2"), "approve", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), original)))
    assert (result.service_id, result.outcome) == ("S2", "approved")


def test_a_payment_sent_then_held_by_the_wrong_device_is_never_told_nothing_was_sent():
    """A payment went out; its answer was lost with the link, and the device plugged in next
    is another terminal (cables swapped). Its status polls cannot go, and past
    payment_timeout the register is told `unresolved`. The soak (seed 4) showed the reason
    given was the refusal's text, "nothing was sent until a technician checks...", about a
    payment the terminal then approved: a cashier reading it may charge the shopper again."""
    h = Harness()
    h.submit("POS1", "S1")
    h.do(h.session.link_is_down("unplugged", h.now))
    h.now += 1
    h.do(h.session.link_is_up(h.now))
    h.name("P400Plus-111")
    unresolved = []
    for _ in range(8):
        unresolved += h.delivers(h.advance(30))
    (result,) = unresolved
    assert (result.service_id, result.outcome) == ("S1", "unresolved")
    assert "P400Plus-111" in result.error, result.error
    assert "nothing was sent" not in result.error, result.error
    assert "nothing was sent" not in h.session.open[TxKey("POS1", "S1")].detail
    h.session.following = True  # the daemon follows the two terminals: said so, still
    h.advance(600)
    assert "nothing was sent" not in h.session.open[TxKey("POS1", "S1")].detail


def payment_asked_about_on_a_device_that_named_nobody() -> Harness:
    """S1's answer is lost with the link; the device plugged in then rejects the identity
    check naming nobody (POIID "N/A", which the shell takes as no name), and after
    status_timeout S1's status poll goes out to it."""
    h = Harness()
    h.submit("POS1", "S1")
    h.do(h.session.link_is_down("unplugged", h.now))  # S1's answer is lost with the link
    h.now += 2
    h.do(h.session.link_is_up(h.now))
    reject = {"SaleToPOIRequest": {
        "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Event",
                          "MessageCategory": "Event", "MessageType": "Notification",
                          "DeviceID": "1", "POIID": "N/A", "SaleID": "N/A"},
        "EventNotification": {"EventToNotify": "Reject", "EventDetails": "unsupported"}}}
    h.answer(reject)
    assert [s.purpose for s in h.sends(h.advance(SETTINGS.status_timeout))] == ["status-poll"]
    return h


def test_a_status_answer_from_the_wrong_device_does_not_end_the_payment():
    """The device plugged in rejects the identity check without naming itself, so after
    status_timeout the open payment's poll goes out to it. Its answer names another terminal:
    its NotFound says nothing of our payment (the right terminal may have charged it), and
    counts as a poll unanswered. The right terminal, back, settles it."""
    h = payment_asked_about_on_a_device_that_named_nobody()
    not_found = responses.status_not_found(h.last_poll())
    not_found["SaleToPOIResponse"]["MessageHeader"]["POIID"] = "P400Plus-111"
    h.session.terminal_named("P400Plus-111")
    taken = h.answer(not_found)
    assert h.delivers(taken) == [] and h.sends(taken) == []
    assert any(isinstance(a, Log) and "P400Plus-111" in a.message for a in taken)
    txn = h.session.open[TxKey("POS1", "S1")]
    assert txn.state is TxState.POLLING and txn.unanswered_polls == 1
    assert all(s.purpose != "status-poll" for s in h.sends(h.advance(60)))  # held meanwhile

    h.do(h.session.link_is_down("unplugged", h.now))
    h.now += 1
    h.plug_in()  # the right terminal
    original = responses.payment_response(request_of(h, "POS1", "S1"), "approve", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), original)))
    assert (result.service_id, result.outcome) == ("S1", "approved")


@pytest.mark.parametrize("answer,own_service_id", [("NotFound", False), ("NotFound", True),
                                                   ("Busy", False), ("Busy", True)])
def test_a_status_answer_from_a_device_that_named_nobody_is_taken_only_if_final(
        answer, own_service_id):
    """The device plugged in rejects the identity check naming nobody (POIID "N/A"), and its
    answers name nobody either: a unit put in the terminal's place, say. Its NotFound about
    the open payment, or a record of it saying Busy ("declined, nothing was charged"), says
    nothing of it (the terminal that was there may have charged it), whether it answers
    under the poll's ServiceID or one of its own naming the payment: a poll unanswered. Its
    record of a final outcome is taken."""
    h = payment_asked_about_on_a_device_that_named_nobody()

    def as_its_own(document: dict) -> dict:
        if own_service_id:
            document["SaleToPOIResponse"]["MessageHeader"]["ServiceID"] = "T-77"
        document["SaleToPOIResponse"]["MessageHeader"]["POIID"] = "N/A"
        return document

    if answer == "NotFound":
        told = responses.status_not_found(h.last_poll())
    else:
        told = responses.status_success(h.last_poll(), responses.payment_response(
            request_of(h, "POS1", "S1"), "busy", h.now))
    taken = h.answer(as_its_own(told))
    assert h.delivers(taken) == []
    txn = h.session.open[TxKey("POS1", "S1")]
    assert txn.state is TxState.POLLING and txn.outcome is None
    polls = h.sends(h.advance(SETTINGS.status_timeout), "status-poll") \
        or h.sends(h.advance(SETTINGS.poll_floor), "status-poll")  # (after the probe's wait)
    assert polls  # asked again
    original = responses.payment_response(request_of(h, "POS1", "S1"), "approve", h.now)
    (result,) = h.delivers(h.answer(as_its_own(responses.status_success(h.last_poll(),
                                                                        original))))
    assert (result.service_id, result.outcome) == ("S1", "approved")


def test_a_device_that_will_not_say_who_it_is_never_gets_the_payment():
    """A device that did not answer the identity check in time used to get the waiting
    payment anyway. The soak's swapped cables showed what that does: the device was another
    terminal, and charged a payment addressed to this one. Now the check is asked again,
    the payment waits, and after two checks unanswered it is refused: nothing was sent.
    An answer naming the device, even late, lets the next request go."""
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))
    h.submit("POS1", "S1")
    first = h.advance(SETTINGS.status_timeout)
    assert [s.purpose for s in h.sends(first)] == ["identify"]  # asked again, nothing else
    (warning,) = [a for a in first if isinstance(a, Log) and a.level == "warning"]
    assert "no answer to the identity check" in warning.message
    assert "no payment goes to the device until it says which terminal it is" in warning.message
    second = h.advance(SETTINGS.status_timeout)
    assert h.sends(second) == []
    (refused,) = h.delivers(second)
    assert (refused.service_id, refused.outcome) == ("S1", "rejected")
    assert "did not say which terminal it is" in refused.error and "nothing was sent" in \
        refused.error
    assert h.sends(purpose="request") == []
    assert h.session.active is None
    h.name()  # the device names itself at last (a late answer carries its POIID)
    h.session.terminal_named(POI)
    sent = h.submit("POS1", "S2")
    assert [s.purpose for s in h.sends(sent)] == ["request"]


def test_a_payment_that_comes_after_an_unanswered_identity_check_is_not_sent_either():
    """The identity check went unanswered before any payment came (a device slow to boot,
    or another terminal with another key, answering a crypto error that names nobody). A
    payment that came next went straight to the device, whoever it was: the check was no
    longer on the wire, and only a request waiting during the check was held. It waits for
    a check that names the device, as one waiting during the first check does."""
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))
    h.do(h.session.refused("terminal cannot decrypt our message (crypto error)", h.now))
    assert h.sends(purpose="identify") and not h.session.named
    asked = h.submit("POS1", "S1")
    assert [s.purpose for s in h.sends(asked)] == ["identify"]  # asked again, not the payment
    refused = h.advance(SETTINGS.status_timeout)  # the second check goes unanswered too
    (result,) = h.delivers(refused)
    assert (result.service_id, result.outcome) == ("S1", "rejected")
    assert "did not say which terminal it is" in result.error
    assert h.sends(purpose="request") == []
    h.name()  # a later check names this terminal: the next payment goes
    assert [s.purpose for s in h.sends(h.submit("POS1", "S2"))] == ["request"]


def test_an_abort_or_status_request_waits_for_the_device_to_say_who_it_is():
    """A register's Abort and TransactionStatus used to go to the device at once, named or
    not. On a swapped cable that device is another terminal: the abort stops that terminal's
    payment, and its NotFound answers a status request about ours. They are refused (nothing
    sent) until the device names itself: while it is being asked, and after it did not say."""
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))  # the identity check is on the wire
    for sale, doc, service in (("POS1", abort_of("POS1", "S0", "A1"), "A1"),
                               ("POS1", status_of("POS1", "S0", "T1"), "T1")):
        actions = h.submit(sale, service, doc=doc)
        assert h.sends(actions) == []
        (refused,) = h.delivers(actions)
        assert (refused.service_id, refused.outcome) == (service, "rejected")
        assert "is being asked which terminal it is" in refused.error
        assert "nothing was sent" in refused.error
    h.advance(SETTINGS.status_timeout)  # no answer to the check
    actions = h.submit("POS1", "A2", doc=abort_of("POS1", "S0", "A2"))
    (refused,) = h.delivers(actions)
    assert h.sends(actions) == [] and refused.outcome == "rejected"
    assert "has not said which terminal it is (no answer to the identity check" in refused.error
    h.do(h.session.link_is_down("unplugged", h.now))
    h.plug_in()  # the right terminal, which names itself
    assert [s.purpose for s in h.sends(h.submit("POS1", "A3", doc=abort_of("POS1", "S0", "A3")))] \
        == ["abort"]
    assert [s.purpose for s in h.sends(h.submit("POS1", "T2", doc=status_of("POS1", "S0", "T2")))] \
        == ["passthrough"]


def test_an_unreadable_answer_to_the_identity_check_sends_no_payment():
    """An answer that does not decrypt says a device is there, not which: the payment waits
    for a check that names it (asked again at once), and is refused if none does. The same
    to a payment is no outcome: it is asked about."""
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))
    h.submit("POS1", "S1")
    again = h.do(h.session.unreadable("HMAC does not verify", h.now))
    assert [s.purpose for s in h.sends(again)] == ["identify"]
    assert any(isinstance(a, Log) and "cannot be read" in a.message for a in again)
    named = h.name()  # the second check is answered, naming this terminal
    assert [s.purpose for s in h.sends(named)] == ["request"]
    after = h.do(h.session.unreadable("HMAC does not verify", h.now))
    assert h.delivers(after) == []
    assert h.session.open[TxKey("POS1", "S1")].state is TxState.POLLING


def test_any_message_that_names_the_device_ends_the_identity_check():
    """A terminal that rejects the check with an event still says who it is: what waits
    goes out at once, not after status_timeout."""
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))
    h.submit("POS1", "S1")
    reject = {"SaleToPOIRequest": {
        "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Event",
                          "MessageCategory": "Event", "MessageType": "Notification",
                          "DeviceID": "1", "POIID": POI},
        "EventNotification": {"EventToNotify": "Reject", "EventDetails": "unsupported"}}}
    h.session.terminal_named(POI)  # the shell, from the event's POIID
    sent = h.answer(reject)
    assert [s.purpose for s in h.sends(sent)] == ["request"]


def test_a_restart_does_not_count_a_poll_before_the_link_could_open():
    """Restored before the terminal's link opens (the daemon's start), a transaction must
    not be charged an unanswered poll for it: with resync_attempts=2, one slow answer after
    the restart then told the register `unresolved`. A terminal that stays away for
    status_timeout still counts, as any offline terminal does."""
    h = Harness()
    h.submit("R1", "S1")
    open_txn = [a.transaction for a in h.log if isinstance(a, Record)][-1]
    fresh = Harness(link_up=False)
    fresh.now = h.now + 5
    fresh.do(fresh.session.restore([open_txn], fresh.now))
    assert fresh.session.open[open_txn.key].unanswered_polls == 0
    fresh.plug_in()
    assert fresh.sends(purpose="status-poll")  # asked at once once the link is up
    unanswered = fresh.advance(SETTINGS.status_timeout)  # one poll goes unanswered
    assert fresh.delivers(unanswered) == []  # not unresolved after one
    assert fresh.session.open[open_txn.key].unanswered_polls == 1

    away = Harness(link_up=False)
    away.now = h.now + 5
    away.do(away.session.restore([open_txn], away.now))
    away.advance(SETTINGS.status_timeout)  # the terminal never came back
    assert away.session.open[open_txn.key].unanswered_polls == 1


def test_another_sessions_identity_check_answered_on_this_link_is_nothing_of_ours():
    """Terminals followed to each other's links: the device now on this link answers the
    identity check the other terminal's session sent it before the move. Not ours, and no
    warning for a technician; but its POIID names the device on this link as well as any
    message does: the check on the wire is not waited for (the review: it was, and then a
    stray crypto error was taken as its failure, logging the named device as unnamed)."""
    from bridge.protocol import builders

    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))
    h.submit("POS1", "S1")
    foreign = responses.simple_response(builders.diagnosis_request(
        sale_id="poi-bridge", service_id="OTHERS0001", poi_id="V400m-other"))
    foreign["SaleToPOIResponse"]["MessageHeader"]["POIID"] = POI
    h.session.terminal_named(POI)
    taken = h.answer(foreign)
    assert [s.purpose for s in h.sends(taken)] == ["request"] and h.delivers(taken) == []
    assert [a.level for a in taken if isinstance(a, Log)] == ["debug"]
    assert h.session.identity.check is None
    assert h.session.identity.unnamed_checks == 0


# --- identity checks with other terminals' keys --------------------------------------------

def test_a_device_that_cannot_take_the_links_key_is_asked_with_each_other_terminals_key():
    """Terminals with keys of their own, cables swapped: the device on this link refuses
    the identity check (it cannot decrypt it), and nothing ever named it, so it was never
    followed. The check is asked again with each other terminal's key (names only: the
    shell holds the keys); the one that the device reads names it."""
    h = Harness(link_up=False)
    h.session.identity.other_keys = ("V400m-222", "V400m-333")
    h.do(h.session.link_is_up(h.now))
    assert [s.key_of for s in h.sends(purpose="identify")] == [None]
    h.do(h.session.refused("terminal cannot decrypt our message", h.now))
    h.do(h.session.refused("terminal cannot decrypt our message", h.now))
    checks = h.sends(purpose="identify")
    assert [s.key_of for s in checks] == [None, "V400m-222", "V400m-333"]
    assert len({s.service_id for s in checks}) == 3  # each its own check
    assert not h.session.identity.unnamed_checks  # still asking: not yet unnamed
    assert any(isinstance(a, Log) and "with V400m-333's key" in a.message for a in h.log)
    h.session.terminal_named("V400m-333")  # its answer, read with that key, names it
    answer = responses.simple_response(checks[-1].document)
    answer["SaleToPOIResponse"]["MessageHeader"]["POIID"] = "V400m-333"
    h.answer(answer)
    assert h.session.wrong_device == "V400m-333"
    sent = h.submit("POS1", "S1")  # and nothing is sent to it
    assert h.sends(sent) == [] and h.delivers(sent)[0].outcome == "rejected"


def test_when_no_key_is_read_the_device_stays_unnamed_with_the_own_keys_reason():
    """Every key tried: the device is unnamed once (not once per key), and the reason a
    technician reads is the link's own key's, then which others were tried. A check with
    another key that goes unanswered ends the round the same way."""
    h = Harness(link_up=False)
    h.session.identity.other_keys = ("V400m-222",)
    h.do(h.session.link_is_up(h.now))
    h.do(h.session.refused("terminal cannot decrypt our message (key K1)", h.now))
    h.do(h.session.unreadable("HMAC does not verify", h.now))  # the answer to B's key's check
    assert h.session.identity.unnamed_checks == 1
    reason = h.session.identity.unnamed_reason
    assert reason.startswith("the terminal refused the identity check: terminal cannot "
                             "decrypt our message (key K1); asked again with V400m-222's key "
                             "(in case it is that terminal): not read either"), reason
    asked = h.submit("POS1", "S1")  # a payment gets a round of its own, own key first
    assert [s.key_of for s in h.sends(asked)] == [None]
    h.do(h.session.refused("terminal cannot decrypt our message (key K1)", h.now))
    h.advance(SETTINGS.status_timeout)  # B's key's check goes unanswered
    (refused,) = h.delivers()
    assert refused.outcome == "rejected" and h.sends(purpose="request") == []
    assert "asked again with V400m-222's key (in case it is that terminal): no answer to the " \
        "identity check" in refused.error, refused.error


def test_without_other_keys_a_refused_check_leaves_the_device_unnamed_at_once():
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))
    h.do(h.session.refused("terminal cannot decrypt our message", h.now))
    assert [s.key_of for s in h.sends(purpose="identify")] == [None]
    assert h.session.identity.unnamed_checks == 1
    assert h.session.identity.unnamed_reason == \
        "the terminal refused the identity check: terminal cannot decrypt our message"


def test_a_crypto_error_while_a_payment_waits_is_no_outcome_of_it():
    """A crypto error names no message: the device may owe one for something else (an
    identity check asked with another terminal's key, what another worker sent it before
    a follow). It used to end the waiting payment `error` while the terminal charged it."""
    h = Harness()
    h.submit("R1", "S1")
    actions = h.do(h.session.refused("terminal cannot decrypt our message", h.now))
    assert h.delivers(actions) == []
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    late = responses.payment_response(request_of(h), "approve", h.now)
    (result,) = h.delivers(h.answer(late))  # its own answer still wins
    assert (result.outcome, result.source) == ("approved", "terminal")


def test_a_device_named_during_the_key_round_keeps_its_name_and_the_stray_error_is_absorbed():
    h = Harness(link_up=False)
    h.session.identity.other_keys = ("V400m-222",)
    h.do(h.session.link_is_up(h.now))
    own = h.sends(purpose="identify")[0]
    h.do(h.session.refused("crypto error", h.now))  # a stray one: B's key is tried
    assert [s.key_of for s in h.sends(purpose="identify")] == [None, "V400m-222"]
    h.session.terminal_named(POI)  # then the answer to the first check names the device
    named = responses.simple_response(own.document)
    named["SaleToPOIResponse"]["MessageHeader"]["POIID"] = POI
    h.answer(named)
    assert h.session.identity.check is None and h.session.named
    h.submit("R1", "S1")  # the payment goes
    absorbed = h.do(h.session.refused("crypto error", h.now))  # B's check's answer
    assert h.delivers(absorbed) == [] and h.session.identity.unnamed_checks == 0
    assert h.session.open[TxKey("R1", "S1")].state is TxState.AWAITING_RESPONSE


def test_a_late_crypto_error_to_a_timed_out_identity_check_tries_the_other_keys():
    h = Harness(link_up=False)
    h.session.identity.other_keys = ("V400m-222",)
    h.do(h.session.link_is_up(h.now))
    h.advance(SETTINGS.status_timeout)  # unanswered
    h.do(h.session.refused("crypto error", h.now))  # then its answer, late
    assert [s.key_of for s in h.sends(purpose="identify")] == [None, "V400m-222"]


def test_an_expected_stray_crypto_error_is_absorbed_only_until_its_deadline():
    """The review: a device that drops what it cannot read never sends the crypto error
    named_meanwhile() expects, and the count swallowed a real one about a payment much
    later (the payment then waited its whole payment_timeout instead of being asked)."""
    h = expecting_a_stray_crypto_error()
    h.now += SETTINGS.status_timeout + 1  # it never came
    h.submit("R1", "S1")
    h.do(h.session.refused("crypto error", h.now))  # about the payment: asked about
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    assert h.session.identity.stray_refusals == 0


def test_a_crypto_error_after_the_device_named_itself_asks_no_other_key_and_warns_nothing():
    """The review's sequence: our check on the wire, the device names itself by answering
    another session's check, then a stray crypto error: it used to start a round with
    another terminal's key to a named device, and end it logging the device unnamed."""
    from bridge.protocol import builders

    h = Harness(link_up=False)
    h.session.identity.other_keys = ("V400m-222",)
    h.do(h.session.link_is_up(h.now))
    h.session.terminal_named(POI)
    foreign = responses.simple_response(builders.diagnosis_request(
        sale_id="poi-bridge", service_id="OTHERS0001", poi_id="V400m-other"))
    foreign["SaleToPOIResponse"]["MessageHeader"]["POIID"] = POI
    h.answer(foreign)
    for _ in range(2):  # (the check was ended by the naming: they answer nothing we wait for)
        (stray,) = h.do(h.session.refused("crypto error", h.now))
        assert "answers nothing the bridge waits for" in stray.message, stray
    assert [s.key_of for s in h.sends(purpose="identify")] == [None]
    assert h.session.identity.unnamed_checks == 0


def test_an_abandoned_payments_reason_survives_a_poll_that_cannot_go_after_a_restart():
    """Found by the soak (--keys per-terminal, seed 31, at 08c6a07): a payment given up on
    (the terminal's NotFound after it took another payment) was restored at a restart
    before its terminal's link opened; its one more poll could not go (offline), and that
    failure wrote "terminal ... offline" over the reason the register and a repeat of the
    request are given ("do not charge again ... check the acquirer's records")."""
    from bridge.daemon.registers import stored_result

    h = unresolved_then_another_paid()
    h.advance(10)
    h.answer(responses.status_not_found(h.last_poll()))
    given_up = h.session.open[TxKey("R1", "S1")].snapshot()
    reason = given_up.detail
    assert "may remember only its latest" in reason
    fresh = Harness(link_up=False)
    fresh.now = h.now + 5
    fresh.do(fresh.session.restore([given_up], fresh.now))
    fresh.advance(SETTINGS.status_timeout)  # the link has not come back: the poll cannot go
    txn = fresh.session.open[TxKey("R1", "S1")]
    assert txn.detail == reason, txn.detail
    assert stored_result(txn).error == reason


def test_not_found_after_a_later_payment_that_itself_never_reached_the_terminal_is_believed():
    """Soak seed 45: S1's frame went unacknowledged, S2 went out after it, and the terminal
    answered NotFound about S2 (believed: it never got it) and then about S1. S2 never
    reached the terminal, so it is no later request that makes S1's NotFound doubtful: S1
    ended as given up on (a manual check), though nothing had been charged."""
    h = Harness()
    h.submit("R1", "S1")
    h.do(h.session.send_failed("S1", "no ACK within 2 s; gave up after 3 tries", h.now, "R1"))
    h.advance(1)
    first_poll = h.last_poll()
    while h.session.open[TxKey("R1", "S1")].state is not TxState.UNRESOLVED:
        assert h.now < 1_000_000.0 + 600
        h.advance(10)  # polls unanswered: unresolved, the terminal is free again
    h.now += 5
    h.submit("R2", "S2")
    h.advance(120)  # S2 unanswered: asked about
    (s2,) = h.delivers(h.answer(responses.status_not_found(h.last_poll())))
    assert (s2.service_id, s2.outcome) == ("S2", "not_found")
    polls: list = []
    while not polls:  # S1 is asked about again in the background
        assert h.now < 1_000_000.0 + 3600
        polls = h.sends(h.advance(10), "status-poll")
    about = polls[-1].document["SaleToPOIRequest"]["TransactionStatusRequest"][
        "MessageReference"]
    assert about["ServiceID"] == "S1" and polls[-1].document != first_poll
    (s1,) = h.delivers(h.answer(responses.status_not_found(polls[-1].document)))
    assert (s1.service_id, s1.outcome) == ("S1", "not_found"), s1


def test_a_frame_is_named_for_a_technician_by_what_it_is():
    """A status poll and an identity check go under ServiceIDs of their own: the log line
    for one not acknowledged named that ID, which a technician cannot look up anywhere."""
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))
    (check,) = h.sends(purpose="identify")
    assert h.session.frame_subject(check.service_id, check.sale_id) == "the identity check"
    h.name()
    h.submit("R1", "S1")
    assert h.session.frame_subject("S1", "R1") == "Payment R1/S1"
    h.advance(120)
    poll = h.sends(purpose="status-poll")[-1]
    assert h.session.frame_subject(poll.service_id, poll.sale_id) == \
        "the status poll about R1/S1"
    assert h.session.frame_subject("Z9", "R7") == "R7/Z9"  # nothing known of it


def test_a_not_found_corrected_by_the_terminals_own_answer_counts_as_sent_again():
    """Found by a review: S2 went out after the unresolved S1 and its NotFound was believed
    (_never_reached put last_request_at back to S1's). Then S2's own answer came (the worker
    publishes it as a correction): S2 did reach the terminal, so S1's NotFound is doubtful
    again, as the journal says after a restart. The worker tells the session so
    (request_reached)."""
    h = Harness()
    h.submit("R1", "S1")
    while not [d for d in h.delivers(h.advance(1.0)) if d.service_id == "S1"]:
        assert h.now < 1_000_000.0 + 4000
    s1_sent = h.session.open[TxKey("R1", "S1")].sent_at
    h.submit("R1", "S2")
    s2_sent = h.session.open[TxKey("R1", "S2")].sent_at
    h.advance(120)  # S2 unanswered: asked about first (it owns the terminal)
    poll = h.last_poll()
    assert poll["SaleToPOIRequest"]["TransactionStatusRequest"]["MessageReference"][
        "ServiceID"] == "S2"
    h.answer(responses.status_not_found(poll))
    assert h.session.last_request_at["Payment"] == s1_sent  # believed: S2 never got there
    h.session.request_reached("Payment", s2_sent)  # (the worker, on S2's late answer)
    assert h.session.last_request_at["Payment"] == s2_sent
    h.session.request_reached("Payment", s1_sent)  # an older one changes nothing
    assert h.session.last_request_at["Payment"] == s2_sent
    while h.last_poll()["SaleToPOIRequest"]["TransactionStatusRequest"]["MessageReference"][
            "ServiceID"] != "S1":
        assert h.now < 1_000_000.0 + 8000
        h.advance(1.0)
    (s1,) = [d for d in h.delivers(h.answer(responses.status_not_found(h.last_poll())))
             if d.service_id == "S1"]
    assert s1.outcome == "unresolved" and "taken another Payment" in s1.error, s1


def test_status_and_abort_requests_waiting_at_once_are_bounded():
    """A register sending status requests by the thousand opened a transaction for each, and
    every step of the terminal walked them all (the review of 2026-12-03). Past
    MAX_OPEN_PASSTHROUGH waiting at once another is refused Busy, nothing sent; once one is
    answered, the next goes out."""
    from bridge.protocol.passthrough import MAX_OPEN_PASSTHROUGH

    h = Harness()
    for n in range(MAX_OPEN_PASSTHROUGH):
        sent = h.sends(h.submit("R1", f"T{n}", doc=status_of("R1", "S9", f"T{n}")))
        assert [s.purpose for s in sent] == ["passthrough"], n
    refused = h.submit("R1", "TX", doc=status_of("R1", "S9", "TX"))
    assert h.sends(refused) == []
    (told,) = h.delivers(refused)
    assert (told.service_id, told.outcome) == ("TX", "rejected")
    response = told.response["SaleToPOIResponse"]["TransactionStatusResponse"]["Response"]
    assert response["ErrorCondition"] == "Busy", response
    assert f"has {MAX_OPEN_PASSTHROUGH} status and abort requests waiting" in \
        response["AdditionalResponse"], response
    # An abort is counted too, and a payment is not held back by them
    assert h.delivers(h.submit("R1", "AX", doc=abort_of("R1", "S9", "AX")))[0].outcome == \
        "rejected"
    assert [s.purpose for s in h.sends(h.submit("R1", "S1"))] == ["request"]
    first = h.sends(purpose="passthrough")[0].document
    h.answer(responses.simple_response(first))
    again = h.submit("R1", "TY", doc=status_of("R1", "S9", "TY"))
    assert [s.purpose for s in h.sends(again)] == ["passthrough"]

"""A terminal's record of a payment that says Busy (a status answer whose
RepeatedMessageResponse carries Failure / Busy): the terminal never started it. It ends
`declined` (final, nothing charged, retry with a new ServiceID), but the detail says why, so
that a cashier does not take it for a refused card; and a register's own status request
about it is answered `declined` too, not `busy` ("ask again later": the record never
changes), whether the terminal or the journal answers it."""

from __future__ import annotations

import dataclasses
from typing import Any

from bridge.protocol import builders
from bridge.protocol.actions import Log, Progress, Record
from bridge.protocol.transaction import TxKey
from bridge.simulator import responses
from bridge.simulator.terminal import Behaviour

from .follow_rig import A, BASE, DeviceByHand, bridge_on, simulator, wait_until
from .rig import Subscriber, outcome_for
from .test_session import SETTINGS, Harness, request_of, status_of


def busy_record(h: Harness, poll: dict) -> dict:
    return responses.status_success(poll, responses.payment_response(request_of(h), "busy",
                                                                     h.now))


def test_a_record_saying_busy_is_declined_saying_the_card_was_not_refused():
    h = Harness()
    h.submit("R1", "S1")
    h.advance(120)  # no answer: asked about
    actions = h.answer(busy_record(h, h.last_poll()))
    (result,) = h.delivers(actions)
    assert (result.outcome, result.source) == ("declined", "status-poll")
    said = result.response["SaleToPOIResponse"]["PaymentResponse"]["Response"]
    assert said["ErrorCondition"] == "Busy"  # the register reads it there
    (done,) = [p for p in actions if isinstance(p, Progress) and p.event == "completed"]
    assert "did not start" in done.detail and "card was not refused" in done.detail
    assert done.detail.startswith("declined: the terminal's record says Busy")


def test_a_registers_status_request_about_a_busy_record_is_answered_declined():
    h = Harness()
    h.submit("R1", "S1")
    h.advance(120)  # polled about: the register asks too
    status = status_of("R1", "S1", "T1")
    h.submit("R1", "T1", doc=status)
    answer = busy_record(h, status)
    results = {d.service_id: d for d in h.delivers(h.answer(answer))}
    assert results["T1"].outcome == "declined", results
    assert results["S1"].outcome == "declined", results


async def test_a_status_request_answered_from_the_journal_about_a_busy_record_is_declined(
        tmp_path, mosquitto):
    """End to end: the terminal answers the payment Busy (not an outcome: asked about), its
    record says Busy (declined); the register's status request, answered from the journal,
    says declined as well."""
    sim = simulator(A, Behaviour(decision="busy", delay=0.05))
    try:
        link = await sim.start_pty(tmp_path / "port")
        async with bridge_on(tmp_path, mosquitto, {A: link}, poll_floor=0.05) as bridge, \
                Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
            assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 15)
            topic = f"{BASE}/terminals/{A}/request/TILL1"
            await sub.publish(topic, responses.payment_request("TILL1", "P1", A, 12.5))
            paid = await sub.wait_for(outcome_for("P1"), timeout=15)
            assert paid["bridge"]["outcome"] == "declined", paid
            await sub.publish(topic, builders.status_request(
                sale_id="TILL1", service_id="T1", poi_id=A, original_service_id="P1",
                original_category="Payment"))
            status = await sub.wait_for(outcome_for("T1"), timeout=15)
            assert (status["bridge"]["outcome"], status["bridge"]["source"]) == (
                "declined", "journal"), status
    finally:
        await sim.close()


# --- a request that may have reached the terminal twice --------------------------------------
# The link sent the payment frame again after the terminal stayed silent (no ACK, no NAK): it
# may have read both copies, run the first and answered the second Busy. A record saying Busy
# then proves nothing, and "send it again" could charge the shopper twice.

def test_a_busy_record_of_a_request_sent_twice_is_not_declined_but_asked_again():
    h = Harness(dataclasses.replace(SETTINGS, in_progress_limit=300))
    h.submit("R1", "S1")
    marked = h.do(h.session.frame_resent("S1", "R1"))  # the link sends it again
    assert any(isinstance(a, Record) and a.transaction.extra["resent_after_silence"] == 1
               for a in marked)  # journaled: a restart still knows it
    assert any(isinstance(a, Log) and "goes out again (2 copies)" in a.message for a in marked)
    assert h.session.frame_delivered("S1", h.now, "R1") == []
    h.advance(120)  # no answer: asked about
    asked = h.answer(busy_record(h, h.last_poll()))
    assert h.delivers(asked) == []
    (event,) = [p for p in asked if isinstance(p, Progress)]
    assert event.event == "in_progress" and "may have got this request twice" in event.detail
    assert len(h.sends(h.advance(1.0), "status-poll")) == 1
    # the record changes once the first copy is done: that is the outcome
    approved = responses.payment_response(request_of(h), "approve", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), approved)))
    assert (result.outcome, result.source) == ("approved", "status-poll")
    assert len(h.sends(purpose="request")) == 1  # never sent again


def test_a_busy_record_that_stays_after_a_request_went_twice_ends_unresolved_not_declined():
    h = Harness(dataclasses.replace(SETTINGS, in_progress_limit=300))
    h.submit("R1", "S1")
    # no ACK after every try, two of them met with silence: the terminal may have read three
    h.do(h.session.frame_resent("S1", "R1"))
    h.do(h.session.frame_resent("S1", "R1"))
    h.do(h.session.send_failed("S1", "no ACK within 2 s; gave up after 3 tries", h.now, "R1"))
    h.advance(1)
    result = None
    while result is None and h.now < 1_000_000.0 + 400:
        (result,) = h.delivers(h.answer(busy_record(h, h.last_poll()))) or (None,)
        h.advance(1.0)
    assert result is not None and result.outcome == "unresolved", result
    assert "may have got this request twice" in result.error
    assert "in_progress_limit 300 s" in result.error
    assert len(h.sends(purpose="request")) == 1


def test_a_busy_record_of_a_payment_delivered_at_once_is_declined():
    """Acknowledged at the first copy (no FrameResent): the terminal read it once."""
    h = Harness()
    h.submit("R1", "S1")
    assert h.session.frame_delivered("S1", h.now, "R1") == []
    h.advance(120)
    (result,) = h.delivers(h.answer(busy_record(h, h.last_poll())))
    assert result.outcome == "declined"


# A link that sends a frame again 0.3 s after silence, and a bridge quick to poll
QUICK_RESENDS = {"framer": {"ack_timeout": 0.3, "max_tries": 3}, "poll_floor": 0.05,
                 "payment_timeout": 1.0}


class LosesFirstPaymentAck(DeviceByHand):
    """A terminal's end whose ACK of the first copy of a Payment frame is lost on the line:
    the bridge sends the frame again, and the terminal has read both copies."""

    lost = False

    def _flush(self) -> None:
        if not self.lost and self.categories().count("Payment") == 1:
            self.lost = True
            self.framer.data_to_send()  # its ACK, lost
            return
        super()._flush()


async def pay_twice_over(device: DeviceByHand, bridge: Any, sub: Subscriber) -> dict:
    """The device names itself, and TILL1 pays 12.50 as P1; returns once the device has read
    the payment's frame twice (the bridge sent it again after the lost ACK)."""
    assert await wait_until(lambda: "Diagnosis" in device.categories(), timeout=10)
    device.answer_check_as(A)
    assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 10)
    request = responses.payment_request("TILL1", "P1", A, 12.5)
    await sub.publish(f"{BASE}/terminals/{A}/request/TILL1", request)
    assert await wait_until(lambda: device.categories().count("Payment") == 2, 10)
    return request


async def test_end_to_end_a_busy_record_after_a_lost_ack_is_not_told_declined(
        tmp_path, mosquitto):
    """The terminal runs the first copy and answers the second Busy; asked about, its record
    says Busy. The register must not hear `declined` (it would charge again): the bridge asks
    on, and the terminal's real record, once there, is the outcome."""
    device = LosesFirstPaymentAck(tmp_path / "port")
    try:
        async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port")},
                             **QUICK_RESENDS) as bridge, \
                Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
            request = await pay_twice_over(device, bridge, sub)
            device.send(responses.payment_response(device.received[-1], "busy", 0.0))
            busy = responses.payment_response(request, "busy", 0.0)
            polls = 0
            while polls < 3:  # the bridge asks; the record says Busy each time
                assert await wait_until(
                    lambda: device.categories().count("TransactionStatus") > polls, 10)
                polls += 1
                device.send(responses.status_success(device.received[-1], busy))
            approved = responses.payment_response(request, "approve", 0.0)
            assert await wait_until(
                lambda: device.categories().count("TransactionStatus") > polls, 10)
            device.send(responses.status_success(device.received[-1], approved))
            paid = await sub.wait_for(outcome_for("P1"), timeout=10)
            assert (paid["bridge"]["outcome"], paid["bridge"]["source"]) == (
                "approved", "status-poll"), paid
            told = [p["bridge"]["outcome"] for p in sub.on(f"{BASE}/registers/TILL1/response")
                    if p["bridge"]["transaction"]["service_id"] == "P1"]
            assert told == ["approved"], told
            assert device.categories().count("Payment") == 2  # the framer's copies, no more
    finally:
        device.close()


def test_a_registers_status_request_about_a_request_sent_twice_is_not_told_declined():
    h = Harness()
    h.submit("R1", "S1")
    h.do(h.session.frame_resent("S1", "R1"))
    h.advance(120)  # polled about: the register asks too
    status = status_of("R1", "S1", "T1")
    h.submit("R1", "T1", doc=status)
    answered = h.answer(busy_record(h, status))
    results = {d.service_id: d for d in h.delivers(answered)}
    assert set(results) == {"T1"}, results  # the payment is still asked about
    assert results["T1"].outcome == "busy", results  # ask again, not "send it again"
    (done,) = [p for p in answered if isinstance(p, Progress) and p.service_id == "T1"]
    assert "may have got this request twice" in done.detail


def test_a_busy_answer_before_the_resent_copys_ack_keeps_the_mark():
    """Found by a review: the mark was set only when the frame's last copy was acknowledged
    (or given up on) while the payment still awaited its answer. The terminal's Busy to the
    second copy came first, sent the payment to polling, and the mark was lost: the Busy
    record then ended it declined. The copy is marked as it is sent."""
    h = Harness()
    h.submit("R1", "S1")
    h.do(h.session.frame_resent("S1", "R1"))
    busy = responses.payment_response(request_of(h), "busy", h.now)
    assert h.delivers(h.answer(busy)) == []  # Busy to our ServiceID: asked about
    assert h.session.frame_delivered("S1", h.now, "R1") == []  # the late ACK
    h.advance(1)
    assert h.delivers(h.answer(busy_record(h, h.last_poll()))) == []  # not declined


class SilentOnSecondCopy(LosesFirstPaymentAck):
    """... and is unplugged before it acknowledges the second."""

    def _flush(self) -> None:
        if self.categories().count("Payment") == 2:
            self.framer.data_to_send()  # no ACK: the cable goes before it
            return
        super()._flush()


async def test_link_lost_between_resends_forgets_that_the_request_went_twice(
        tmp_path, mosquitto):
    """Found by a review: copy 1 read (its ACK lost), copy 2 read, then the link drops
    before any ACK. The mark was set only from the frame's final ACK or failure, which a
    link reset never reports: asked about after the replug, the terminal's record says Busy
    (its answer to copy 2 while it ran copy 1), and the register was told `declined` ("send
    it again"). The mark is journaled as the copy goes out."""
    device = SilentOnSecondCopy(tmp_path / "port")
    try:
        async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port")},
                             **QUICK_RESENDS) as bridge, \
                Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
            request = await pay_twice_over(device, bridge, sub)
            device.close()  # unplugged before the second copy's ACK
            assert await wait_until(lambda: not bridge.workers[A].online, 10)
            device = DeviceByHand(tmp_path / "port")  # plugged back in
            assert await wait_until(lambda: "Diagnosis" in device.categories(), timeout=15)
            device.answer_check_as(A)
            assert await wait_until(lambda: "TransactionStatus" in device.categories(), 15)
            busy = responses.payment_response(request, "busy", 0.0)
            device.send(responses.status_success(device.received[-1], busy))
            # not declined: asked again (the record may change once the first copy is done)
            assert await wait_until(
                lambda: device.categories().count("TransactionStatus") >= 2, 10)
            told = [p["bridge"]["outcome"] for p in sub.on(f"{BASE}/registers/TILL1/response")
                    if p["bridge"]["transaction"]["service_id"] == "P1"]
            assert "declined" not in told, told
            record = bridge.journal.get(TxKey("TILL1", "P1"))
            assert record.extra.get("resent_after_silence") == 1, record.extra
            approved = responses.payment_response(request, "approve", 0.0)
            device.send(responses.status_success(device.received[-1], approved))
            paid = await sub.wait_for(outcome_for("P1"), timeout=10)
            assert paid["bridge"]["outcome"] == "approved", paid
    finally:
        device.close()

"""A terminal's record of a payment that says Busy (a status answer whose
RepeatedMessageResponse carries Failure / Busy): the terminal never started it. It ends
`declined` (final, nothing charged, retry with a new ServiceID), but the detail says why, so
that a cashier does not take it for a refused card; and a register's own status request
about it is answered `declined` too, not `busy` ("ask again later": the record never
changes), whether the terminal or the journal answers it."""

from __future__ import annotations

from bridge.protocol import builders
from bridge.protocol.actions import Progress
from bridge.simulator import responses
from bridge.simulator.terminal import Behaviour

from .follow_rig import A, BASE, bridge_on, simulator, wait_until
from .rig import Subscriber, outcome_for
from .test_session import Harness, request_of, status_of


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

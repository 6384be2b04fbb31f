"""A register's request larger than the link's max_frame_size once encrypted was recorded
as sent, failed to send, and was then polled about until the terminal said NotFound (after
a payment time-out on a terminal that is slow to answer), with last_request_at saying a
Payment had gone out (which makes a NotFound about an earlier payment untrustworthy). It is
refused at once now: `rejected`, nothing sent, with the size, the limit and what to do."""

from __future__ import annotations

import time

import pytest

from bridge.protocol.transaction import TxKey, TxState
from bridge.simulator import responses

from .follow_rig import A, BASE, DeviceByHand, bridge_on, simulator, wait_until
from .rig import Subscriber, outcome_for
from .test_session import Harness, request_of

pytestmark = pytest.mark.usefixtures("small_frames")

TILL = "TILL1"


def test_a_request_too_large_to_send_is_refused_and_does_not_count_as_sent():
    h = Harness()
    h.submit("R1", "S1")
    h.answer(responses.payment_response(request_of(h), "approve", h.now))
    first = h.session.last_request_at["Payment"]
    h.now += 5
    h.submit("R1", "S2")
    actions = h.do(h.session.not_writable("S2", "the request is 2000 bytes, over 1024", h.now))
    (refused,) = h.delivers(actions)
    assert (refused.service_id, refused.outcome) == ("S2", "rejected")
    assert h.sends(actions) == []  # no status poll
    record = [a.transaction for a in actions if hasattr(a, "transaction")][-1]
    assert (record.state, record.sent_at) == (TxState.FINAL, None)
    # a NotFound about an earlier payment is judged as if S2 had never gone out
    assert h.session.last_request_at["Payment"] == first
    assert h.session.active is None and not h.session.open


async def test_a_payment_over_max_frame_size_is_refused_at_once_end_to_end(tmp_path, mosquitto):
    sim = simulator(A)
    try:
        link = await sim.start_pty(tmp_path / "port")
        async with bridge_on(tmp_path, mosquitto, {A: link},
                             framer={"max_frame_size": 4096}) as bridge, \
                Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
            assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 15)
            topic = f"{BASE}/terminals/{A}/request/{TILL}"
            big = responses.payment_request(TILL, "B1", A, 12.5)
            big["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleReferenceID"] = "x" * 5000
            started = time.monotonic()
            await sub.publish(topic, big)
            answer = await sub.wait_for(outcome_for("B1"), timeout=20)
            info = answer["bridge"]
            assert (info["outcome"], info["source"]) == ("rejected", "bridge"), answer
            assert time.monotonic() - started < 10
            error = info["error"]
            assert "over terminal" in error and "max_frame_size 4096" in error, error
            assert "nothing was sent" in error and "new ServiceID" in error, error
            response = answer["SaleToPOIResponse"]["PaymentResponse"]["Response"]
            assert (response["Result"], response["ErrorCondition"]) == ("Failure",
                                                                        "MessageFormat")
            record = bridge.journal.get(TxKey(TILL, "B1"))
            assert (record.state, record.outcome, record.sent_at) == (TxState.FINAL,
                                                                      "rejected", None)
            assert "Payment" not in bridge.workers[A].session.last_request_at
            # the terminal heard of nothing: no payment, no status poll
            assert sim.terminal.ledger == {}
            # and is free: the next payment goes
            await sub.publish(topic, responses.payment_request(TILL, "B2", A, 12.5))
            ok = await sub.wait_for(outcome_for("B2"), timeout=15)
            assert ok["bridge"]["outcome"] == "approved", ok
            assert [p["bridge"]["outcome"] for p in sub.on(f"{BASE}/registers/{TILL}/response")
                    if p["bridge"]["transaction"]["service_id"] == "B1"] == ["rejected"]
            # the cashier's screen never read "sent" for a request that never went
            events = [e["event"] for e in sub.on(f"{BASE}/registers/{TILL}/event")
                      if e["transaction"]["service_id"] == "B1"]
            assert "sent" not in events and "completed" in events, events
    finally:
        await sim.close()



async def test_a_payment_over_max_frame_size_held_for_the_identity_check_is_refused_when_it_goes(
        tmp_path, mosquitto):
    """A payment taken while the device on the link has not yet answered the identity check
    goes (and is refused) in the step that reads the answer: no `sent` event, and the
    terminal is free for the next."""
    device = DeviceByHand(tmp_path / "port")
    try:
        async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port")},
                             framer={"max_frame_size": 4096}) as bridge, \
                Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
            assert await wait_until(lambda: "Diagnosis" in device.categories(), timeout=10)
            topic = f"{BASE}/terminals/{A}/request/{TILL}"
            big = responses.payment_request(TILL, "Q1", A, 13.5)
            big["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleReferenceID"] = "x" * 5000
            await sub.publish(topic, big)
            assert await wait_until(lambda: bridge.journal.get(TxKey(TILL, "Q1")) is not None, 10)
            assert bridge.journal.get(TxKey(TILL, "Q1")).state is TxState.ACCEPTED
            device.answer_check_as(A)
            refused = await sub.wait_for(outcome_for("Q1"), timeout=15)
            assert refused["bridge"]["outcome"] == "rejected", refused
            events = [e["event"] for e in sub.on(f"{BASE}/registers/{TILL}/event")
                      if e["transaction"]["service_id"] == "Q1"]
            assert "sent" not in events and "completed" in events, events
            await sub.publish(topic, responses.payment_request(TILL, "Q2", A, 14.5))
            assert await wait_until(lambda: "Payment" in device.categories(), 10)
            assert [d["SaleToPOIRequest"]["MessageHeader"]["ServiceID"] for d in device.received
                    if "PaymentRequest" in d["SaleToPOIRequest"]] == ["Q2"]
    finally:
        device.close()

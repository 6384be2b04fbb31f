"""A register's request larger than the link's max_frame_size once encrypted was recorded
as sent, failed to send, and was then polled about until the terminal said NotFound (after
a payment time-out on a terminal that is slow to answer), with last_request_at saying a
Payment had gone out (which makes a NotFound about an earlier payment untrustworthy). It is
refused at once now: `rejected`, nothing sent, with the size, the limit and what to do."""

from __future__ import annotations

import time

from bridge.protocol.transaction import TxKey, TxState
from bridge.simulator import responses

from .follow_rig import A, BASE, bridge_on, simulator, wait_until
from .rig import Subscriber, outcome_for
from .test_session import Harness, request_of

TILL = "TILL1"


def test_a_request_too_large_to_send_is_refused_and_does_not_count_as_sent():
    h = Harness()
    h.submit("R1", "S1")
    h.answer(responses.payment_response(request_of(h), "approve", h.now))
    first = h.session.last_request_at["Payment"]
    h.now += 5
    h.submit("R1", "S2")
    actions = h.do(h.session.too_large("S2", "the request is 2000 bytes, over 1024", h.now))
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
    finally:
        await sim.close()

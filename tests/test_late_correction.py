"""The terminal's own final answer, coming after the bridge had ended the payment with a
conclusion of its own (`not_found` after a status poll), used to be logged as "ignored a
late answer" and dropped: the register kept "nothing was charged, retry", and only a
manual resync could correct it. It is recorded and published again under the same IDs,
marked `bridge.corrects`, with a `corrected` event."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bridge.daemon.journal import Journal
from bridge.protocol.transaction import TxKey
from bridge.register_client import RegisterClient
from bridge.simulator import responses

from .follow_rig import A, BASE, DeviceByHand, bridge_on, wait_until


@pytest.mark.parametrize("decision,outcome,then", [
    ("approve", "approved", "if the sale was charged again since, reverse one of the charges"),
    # (the review: a decline told the register to reverse a charge that never was)
    ("decline", "declined", "nothing was charged by this request either way"),
    # Success, but 5.00 of the 12.50 authorised: partial, as when it answers in time
    ("approve 5.0", "partially_approved",
     "if the sale was charged again since, reverse one of the charges"),
])
async def test_the_terminals_answer_after_a_published_not_found_is_sent_as_a_correction(
        tmp_path, mosquitto, caplog, decision, outcome, then):
    device = DeviceByHand(tmp_path / "port-a")
    events: list[dict] = []
    try:
        with caplog.at_level(logging.WARNING, logger="poi_bridge"):
            async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port-a")},
                                 payment_timeout=1, status_timeout=5) as bridge:
                assert await wait_until(lambda: "Diagnosis" in device.categories(), 10)
                device.answer_check_as(A)
                assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 10)
                async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                          base_topic=BASE, persistent=False,
                                          on_event=events.append) as till:
                    paying = asyncio.create_task(till.pay(A, 12.5, timeout=20))
                    assert await wait_until(lambda: "Payment" in device.categories(), 10)
                    request = [d for d in device.received
                               if "PaymentRequest" in d["SaleToPOIRequest"]][-1]
                    # No answer: after payment_timeout the bridge asks, and the terminal
                    # (wrongly, or having lost it for a while) says it never got it
                    assert await wait_until(
                        lambda: "TransactionStatus" in device.categories(), 10)
                    poll = [d for d in device.received
                            if "TransactionStatusRequest" in d["SaleToPOIRequest"]][-1]
                    device.send(responses.status_not_found(poll))
                    first = await paying
                    assert first["bridge"]["outcome"] == "not_found", first
                    # Then its own answer to the payment comes: it did charge it
                    answer = responses.payment_response(request, decision.split()[0], 0)
                    if " " in decision:  # less authorised than asked
                        answer["SaleToPOIResponse"]["PaymentResponse"]["PaymentResult"][
                            "AmountsResp"]["AuthorizedAmount"] = float(decision.split()[1])
                    device.send(answer)
                    assert await wait_until(lambda: len(till.responses) >= 2, 10), \
                        till.responses
                    assert await wait_until(
                        lambda: any(e.get("event") == "corrected" for e in events), 10)
                    # It reached the terminal after all: it counts again as the latest
                    # Payment sent (a later NotFound about an earlier one is doubtful), in
                    # the session as in the journal (a review found the session forgot it)
                    key = TxKey("TILL1", request["SaleToPOIRequest"]["MessageHeader"][
                        "ServiceID"])
                    sent_at = bridge.journal.get(key).sent_at
                    assert sent_at is not None
                    assert bridge.workers[A].session.last_request_at.get("Payment") == sent_at
                    assert bridge.journal.last_requests_sent(A) == {"Payment": sent_at}
        service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
        correction = till.responses[-1]
        assert correction["bridge"]["outcome"] == outcome, correction
        assert correction["bridge"]["corrects"] == "not_found"
        assert correction["bridge"]["transaction"]["service_id"] == service_id
        assert correction["bridge"]["error"].startswith(
            f"correction: the terminal answered {outcome} after the bridge had published "
            "not_found"), correction
        assert correction["bridge"]["error"].endswith(then), correction
        stored = Journal(tmp_path / "journal.sqlite3", readonly=True).get(
            TxKey("TILL1", service_id))
        assert (stored.outcome, stored.source, stored.extra["corrected_from"]) == \
            (outcome, "terminal", "not_found")
        said = [r for r in caplog.records if "after the bridge had published not_found" in
                r.getMessage()]
        assert len(said) == 1, said
        charged = outcome in ("approved", "partially_approved")
        assert said[0].levelno == (logging.ERROR if charged else logging.WARNING)
        assert ("reverse one" in said[0].getMessage()) == charged
        if outcome == "partially_approved":
            assert correction["bridge"]["amounts"] == {"requested": 12.5, "approved": 5.0,
                                                       "currency": "EUR"}, correction
    finally:
        device.close()

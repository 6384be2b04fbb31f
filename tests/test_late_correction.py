"""The terminal's own final answer, coming after the bridge had ended the payment with a
conclusion of its own (`not_found` after a status poll), used to be logged as "ignored a
late answer" and dropped: the register kept "nothing was charged, retry", and only a
manual resync could correct it. It is recorded and published again under the same IDs,
marked `bridge.corrects`, with a `corrected` event."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from bridge.daemon.journal import Journal
from bridge.protocol import builders, crypto
from bridge.protocol.transaction import TxKey
from bridge.register_client import RegisterClient
from bridge.simulator import responses

from .follow_rig import A, B, BASE, KEYS, DeviceByHand, bridge_on, key_configs, wait_until


@contextlib.asynccontextmanager
async def paid_then_not_found(tmp_path, mosquitto, events: list[dict]):
    """A bridge whose payment (12.50, from till TILL1) went unanswered, was asked about,
    and was ended `not_found` on the terminal's NotFound: yields the bridge, the device, the
    till and the payment request as the terminal got it."""
    device = DeviceByHand(tmp_path / "port-a")
    try:
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
                yield bridge, device, till, request
    finally:
        device.close()


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
    events: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="poi_bridge"):
        async with paid_then_not_found(tmp_path, mosquitto, events) as (bridge, device, till,
                                                                         request):
            # Then its own answer to the payment comes: it did charge it
            answer = responses.payment_response(request, decision.split()[0], 0)
            if " " in decision:  # less authorised than asked
                answer["SaleToPOIResponse"]["PaymentResponse"]["PaymentResult"][
                    "AmountsResp"]["AuthorizedAmount"] = float(decision.split()[1])
            device.send(answer)
            assert await wait_until(lambda: len(till.responses) >= 2, 10), till.responses
            assert await wait_until(
                lambda: any(e.get("event") == "corrected" for e in events), 10)
            # It reached the terminal after all: it counts again as the latest Payment
            # sent (a later NotFound about an earlier one is doubtful), in the session as
            # in the journal (a review found the session forgot it)
            key = TxKey("TILL1", request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"])
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
    stored = Journal(tmp_path / "journal.sqlite3", readonly=True).get(TxKey("TILL1", service_id))
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


async def test_the_terminals_record_found_by_a_registers_status_request_corrects_a_not_found(
        tmp_path, mosquitto, caplog):
    """The terminal's record of a payment the bridge had ended `not_found` can come as the
    answer to a register's own status request about it. It was told only to the register
    that asked: the payment's own IDs kept "nothing was charged" in the journal and on the
    register's topic (another till, a reconciliation reading them, a resync). Now it is a
    correction under the payment's IDs, as the terminal's late answer is."""
    events: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="poi_bridge"):
        async with paid_then_not_found(tmp_path, mosquitto, events) as (_, device, till,
                                                                         request):
            service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
            # The till asks the terminal itself; this time the terminal finds it
            asking = asyncio.create_task(till.request(builders.status_request(
                sale_id="TILL1", service_id="ASK1", poi_id=A,
                original_service_id=service_id, original_category="Payment"), timeout=20))

            def asked() -> list[dict]:
                return [d for d in device.received
                        if d["SaleToPOIRequest"]["MessageHeader"]["ServiceID"] == "ASK1"]
            assert await wait_until(lambda: bool(asked()), 10)
            device.send(responses.status_success(
                asked()[-1], responses.payment_response(request, "approve", 0)))
            told = await asking
            assert told["bridge"]["outcome"] == "approved", told
            assert await wait_until(lambda: any(
                r["bridge"].get("corrects") == "not_found" for r in till.responses), 10), \
                till.responses
            assert await wait_until(lambda: any(
                e.get("event") == "corrected" and e["transaction"]["service_id"] == service_id
                for e in events), 10), events
    correction = next(r for r in till.responses if r["bridge"].get("corrects"))
    assert correction["bridge"]["outcome"] == "approved", correction
    assert correction["bridge"]["transaction"]["service_id"] == service_id
    # The payment's own shape, as a register handles its result whichever way it came
    assert correction["SaleToPOIResponse"]["PaymentResponse"]["Response"]["Result"] == \
        "Success", correction
    header = correction["SaleToPOIResponse"]["MessageHeader"]
    assert (header["ServiceID"], header["MessageCategory"]) == (service_id, "Payment")
    stored = Journal(tmp_path / "journal.sqlite3", readonly=True).get(TxKey("TILL1", service_id))
    assert (stored.outcome, stored.source, stored.extra["corrected_from"]) == \
        ("approved", "terminal", "not_found")
    said = [r for r in caplog.records if "after the bridge had published not_found" in
            r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR, said
    assert "status request TILL1/ASK1" in said[0].getMessage(), said[0].getMessage()


async def test_another_terminals_record_corrects_nothing(tmp_path, mosquitto, caplog):
    """The payment ran on A and ended `not_found`; the till asks terminal B about it, and B
    answers with a record under those IDs. That is no word of the terminal that ran it:
    B's record corrected A's payment, and the log told the store to reverse a charge (the
    review of the first fix)."""
    dev_a, dev_b = DeviceByHand(tmp_path / "port-a"), DeviceByHand(tmp_path / "port-b")
    try:
        with caplog.at_level(logging.WARNING, logger="poi_bridge"):
            async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port-a"),
                                                       B: str(tmp_path / "port-b")},
                                 payment_timeout=1, status_timeout=5) as bridge:
                for device, poi_id in ((dev_a, A), (dev_b, B)):
                    assert await wait_until(lambda d=device: "Diagnosis" in d.categories(), 10)
                    device.answer_check_as(poi_id)
                    assert await wait_until(
                        lambda p=poi_id: bridge.workers[p].identity == "confirmed", 10)
                async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                          base_topic=BASE, persistent=False) as till:
                    paying = asyncio.create_task(till.pay(A, 12.5, timeout=20))
                    assert await wait_until(lambda: "Payment" in dev_a.categories(), 10)
                    request = [d for d in dev_a.received
                               if "PaymentRequest" in d["SaleToPOIRequest"]][-1]
                    service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
                    assert await wait_until(
                        lambda: "TransactionStatus" in dev_a.categories(), 10)
                    poll = [d for d in dev_a.received
                            if "TransactionStatusRequest" in d["SaleToPOIRequest"]][-1]
                    dev_a.send(responses.status_not_found(poll))
                    assert (await paying)["bridge"]["outcome"] == "not_found"
                    asking = asyncio.create_task(till.request(builders.status_request(
                        sale_id="TILL1", service_id="ASK1", poi_id=B,
                        original_service_id=service_id, original_category="Payment"),
                        timeout=20))

                    def asked() -> list[dict]:
                        return [d for d in dev_b.received
                                if d["SaleToPOIRequest"]["MessageHeader"]["ServiceID"] == "ASK1"]
                    assert await wait_until(lambda: bool(asked()), 10)
                    dev_b.send(responses.status_success(
                        asked()[-1], responses.payment_response(request, "approve", 0)))
                    await asking
                    await asyncio.sleep(0.5)  # a correction would be out by now
                    assert not [r for r in till.responses if r["bridge"].get("corrects")]
                    assert bridge.workers[B].session.last_request_at.get("Payment") is None
        stored = Journal(tmp_path / "journal.sqlite3", readonly=True).get(
            TxKey("TILL1", service_id))
        assert (stored.poi_id, stored.outcome) == (A, "not_found")
        assert not [r for r in caplog.records if "reverse one" in r.getMessage()]
    finally:
        dev_a.close()
        dev_b.close()


@contextlib.asynccontextmanager
async def keyless_a_and_keyed_b(tmp_path, broker, **terminal):
    """A bridge with terminals A (no key) and B (a key) on devices driven by hand, each
    confirmed by its device (`terminal`: more settings of both). Yields the bridge and the
    two devices."""
    dev_a, dev_b = DeviceByHand(tmp_path / "port-a"), DeviceByHand(tmp_path / "port-b")
    try:
        async with bridge_on(tmp_path, broker, {A: str(tmp_path / "port-a"),
                                                B: str(tmp_path / "port-b")},
                             {B: key_configs(tmp_path)[B]}, payment_timeout=1,
                             status_timeout=5, **terminal) as bridge:
            assert await wait_until(lambda: "Diagnosis" in dev_a.categories(), 10)
            dev_a.answer_check_as(A)
            assert await wait_until(lambda: "Diagnosis" in dev_b.categories(), 10)
            check = crypto.decrypt_message(dev_b.received[-1], KEYS[B])
            named = responses.simple_response(check)
            named["SaleToPOIResponse"]["MessageHeader"]["POIID"] = B
            dev_b.send(named, key=KEYS[B])
            assert await wait_until(lambda: all(
                bridge.workers[p].identity == "confirmed" for p in (A, B)), 10)
            yield bridge, dev_a, dev_b
    finally:
        dev_a.close()
        dev_b.close()


async def test_a_clear_answer_on_a_keyless_link_corrects_no_keyed_terminals_payment(
        tmp_path, mosquitto, caplog):
    """B has a key, A none. B's payment ends `not_found`; then a message in clear on A's
    link (anyone who can write to it) names A and answers B's payment `approve`. It was
    taken as a late answer of the terminal that ran it, and B's payment corrected to
    approved for the register (a review of the forgery fix, which looked only at messages
    naming another terminal): only the terminal the payment ran on corrects it."""
    with caplog.at_level(logging.WARNING, logger="poi_bridge"):
        async with keyless_a_and_keyed_b(tmp_path, mosquitto) as (_bridge, dev_a, dev_b), \
                RegisterClient(mosquitto.host, mosquitto.port, "TILL1", base_topic=BASE,
                               persistent=False) as till:
            paying = asyncio.create_task(till.pay(B, 12.5, timeout=20))
            assert await wait_until(lambda: "TransactionStatus" in dev_b.categories(), 10)
            request = crypto.decrypt_message(
                [d for d in dev_b.received
                 if d["SaleToPOIRequest"]["MessageHeader"]["MessageCategory"] == "Payment"][-1],
                KEYS[B])
            poll = crypto.decrypt_message(dev_b.received[-1], KEYS[B])
            dev_b.send(responses.status_not_found(poll), key=KEYS[B])
            assert (await paying)["bridge"]["outcome"] == "not_found"
            service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
            forged = responses.payment_response(request, "approve", 0)
            forged["SaleToPOIResponse"]["MessageHeader"]["POIID"] = A
            dev_a.send(forged)
            assert await wait_until(lambda: forged in dev_a.acknowledged, 10)
            await asyncio.sleep(0.5)  # a correction would be out by now
            assert not [r for r in till.responses if r["bridge"].get("corrects")]
    stored = Journal(tmp_path / "journal.sqlite3", readonly=True).get(TxKey("TILL1", service_id))
    assert (stored.poi_id, stored.outcome) == (B, "not_found")
    said = [r.getMessage() for r in caplog.records if "ignored a late" in r.getMessage()]
    assert len(said) == 1 and f"ran on terminal {B}" in said[0], said


async def test_an_answer_planted_on_a_keyless_link_answers_no_keyed_terminals_request(
        tmp_path, mosquitto):
    """A message in clear on keyless A's link names A and answers `approve` under IDs the
    till has not used yet; the journal keeps it as an answer it had no request for. The
    till's later payment on keyed B under those IDs was answered `approved` from it, never
    sent to B (a second review). That record is A's word only: B's request is refused as a
    reuse of the IDs, and a status request to B about it is refused, naming A (asked, B's
    NotFound would read "nothing was charged" where a lost journal's record is A's real
    approval: a third review)."""
    async with keyless_a_and_keyed_b(tmp_path, mosquitto) as (_bridge, dev_a, dev_b), \
            RegisterClient(mosquitto.host, mosquitto.port, "TILL1", base_topic=BASE,
                           persistent=False) as till:
        planted = responses.payment_response(
            responses.payment_request("TILL1", "NEXT42", A, 99.0), "approve", 0)
        dev_a.send(planted)
        assert await wait_until(lambda: any(
            r["bridge"]["transaction"]["service_id"] == "NEXT42" for r in till.responses), 10)
        answer = await till.pay(B, 99.0, service_id="NEXT42", timeout=20)
        assert answer["bridge"]["outcome"] == "rejected", answer["bridge"]
        assert f"holds an answer of terminal {A}" in answer["bridge"]["error"]
        assert "Payment" not in dev_b.categories()
        status = await till.request(builders.status_request(
            sale_id="TILL1", service_id="ASK42", poi_id=B, original_service_id="NEXT42",
            original_category="Payment"), timeout=20)
        assert status["bridge"]["outcome"] == "rejected", status["bridge"]
        assert f"send the status request to terminal {A}" in status["bridge"]["error"]
        assert "TransactionStatus" not in dev_b.categories()


async def test_an_answer_for_a_register_not_allowed_on_the_terminal_is_not_kept(
        tmp_path, mosquitto, caplog):
    """With allowed_sale_ids, a request of another register never reaches the terminal: an
    answer on its link for one, which the journal has no record of, is no late answer of
    the terminal's. It was recorded and published to that register (and would answer its
    later request under those IDs); it is dropped, and the log says why."""
    with caplog.at_level(logging.WARNING, logger="poi_bridge"):
        async with keyless_a_and_keyed_b(tmp_path, mosquitto, allowed_sale_ids=["TILL1"]) as (
                bridge, dev_a, _dev_b), \
                RegisterClient(mosquitto.host, mosquitto.port, "TILL9", base_topic=BASE,
                               persistent=False) as other:
            planted = responses.payment_response(
                responses.payment_request("TILL9", "NEXT9", A, 99.0), "approve", 0)
            dev_a.send(planted)
            assert await wait_until(lambda: planted in dev_a.acknowledged, 10)
            assert await wait_until(lambda: other.responses or any(
                "SaleID TILL9 is not among the registers allowed" in m
                for m in caplog.messages), 10), caplog.messages
            await asyncio.sleep(0.5)  # (a result would be out by now)
            assert not other.responses, other.responses
            assert bridge.journal.get(TxKey("TILL9", "NEXT9")) is None

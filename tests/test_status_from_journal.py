"""A register's own TransactionStatusRequest about a transaction the journal holds: a
terminal restarted since, or another terminal, answers NotFound ("nothing was charged") for a
payment the bridge knows was approved. The journal's record answers instead."""

from __future__ import annotations

import asyncio
import json
import time

from bridge.protocol import builders
from bridge.protocol.messages import parse_message
from bridge.protocol.outcome import classify
from bridge.daemon.journal import Journal
from bridge.protocol.transaction import Transaction, TxKey, TxState, request_digest
from bridge.simulator import responses
from bridge.simulator.terminal import Behaviour, LedgerEntry, LinkBehaviour, Scenario

from .rig import POI as STORE_POI
from .rig import Subscriber, outcome_for
from .test_daemon_mqtt import BASE, Store, default_scenario, request_topic
from .follow_rig import A as HAND_POI
from .follow_rig import BASE as HAND_BASE
from .follow_rig import DeviceByHand, bridge_on, wait_until
from .test_intake_fuzz import POI, Rig

OTHER = "V400m-999999999"  # a terminal the payment ran on, not the one asked


def record(rig: Rig, service_id: str, poi_id: str, state: TxState,
           outcome: str | None = None) -> dict:
    request = responses.payment_request("POS1", service_id, poi_id, 12.5)
    response = responses.payment_response(request, "approve", time.time()) if outcome else None
    rig.journal.save(Transaction(
        sale_id="POS1", service_id=service_id, poi_id=poi_id, category="Payment",
        request=request, digest=request_digest(request), created_at=time.time(),
        updated_at=time.time(), state=state, outcome=outcome, source="terminal",
        response=response))
    return response


def ask(rig: Rig, service_id: str, about: str, sale_id: str = "POS1") -> dict:
    status = builders.status_request(sale_id=sale_id, service_id=service_id, poi_id=POI,
                                     original_service_id=about, original_category="Payment")
    status["SaleToPOIRequest"]["TransactionStatusRequest"]["MessageReference"]["SaleID"] = "POS1"
    published = rig.handle(f"poi-bridge/terminals/{POI}/request/{sale_id}",
                           json.dumps(status).encode())
    (answer,) = [m for m in published if m.topic.endswith("/response")]
    return json.loads(answer.payload)


def test_a_status_request_about_a_finished_payment_is_answered_from_the_journal(tmp_path):
    rig = Rig(tmp_path / "journal.sqlite3")  # its terminal is offline: never asked
    try:
        here = record(rig, "P1", POI, TxState.FINAL, "approved")
        elsewhere = record(rig, "P2", OTHER, TxState.FINAL, "approved")
        for status_id, about, original in (("T1", "P1", here), ("T2", "P2", elsewhere)):
            answer = ask(rig, status_id, about)
            bridge = answer["bridge"]
            assert (bridge["outcome"], bridge["source"], bridge["error"]) == (
                "approved", "journal", None), answer
            assert bridge["transaction"]["service_id"] == status_id
            inner = answer["SaleToPOIResponse"]
            assert inner["MessageHeader"]["ServiceID"] == status_id
            assert inner["MessageHeader"]["MessageType"] == "Response"
            status = inner["TransactionStatusResponse"]
            assert status["Response"] == {"Result": "Success"}
            assert status["MessageReference"]["ServiceID"] == about
            repeated = status["RepeatedMessageResponse"]
            assert repeated["RepeatedResponseMessageBody"]["PaymentResponse"] == \
                original["SaleToPOIResponse"]["PaymentResponse"]
            # the shape a terminal's answer has: the session reads it the same way
            assert classify(parse_message({"SaleToPOIResponse": inner})).outcome == "approved"
        # a repeat of the status request gets the same answer, as any repeat
        assert ask(rig, "T1", "P1")["bridge"]["outcome"] == "approved"
        # another register may still not ask about POS1's payment
        refused = ask(rig, "T3", "P1", sale_id="POS2")
        assert refused["bridge"]["outcome"] == "rejected"
        assert "only its own transactions" in refused["bridge"]["error"]
    finally:
        rig.journal.close()


def test_a_status_request_about_a_payment_open_on_another_terminal_names_it(tmp_path):
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        record(rig, "P3", OTHER, TxState.POLLING)
        answer = ask(rig, "T4", "P3")
        assert answer["bridge"]["outcome"] == "rejected"
        assert f"open on terminal {OTHER}" in answer["bridge"]["error"]
        assert answer["SaleToPOIResponse"]["TransactionStatusResponse"]["Response"][
            "ErrorCondition"] == "NotAllowed"
    finally:
        rig.journal.close()


async def test_through_the_broker_a_status_request_gets_the_journals_answer(tmp_path, mosquitto):
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
        await sub.publish(request_topic(),
                          responses.payment_request("POS1", "S1", STORE_POI, 9.5))
        await sub.wait_for(outcome_for("S1", "approved"))
        status = builders.status_request(sale_id="POS1", service_id="TS1", poi_id=STORE_POI,
                                         original_service_id="S1", original_category="Payment")
        await sub.publish(request_topic(), status)
        answer = await sub.wait_for(outcome_for("TS1"))
        assert (answer["bridge"]["outcome"], answer["bridge"]["source"]) == (
            "approved", "journal"), answer


def unsent_payment(journal: Journal, service_id: str, **fields) -> None:
    """A payment as the journal holds it, written straight to it (an earlier run's)."""
    document = responses.payment_request("POS1", service_id, STORE_POI, 7.0)
    now = time.time()
    journal.save(Transaction(sale_id="POS1", service_id=service_id, poi_id=STORE_POI,
                             category="Payment", request=document,
                             digest=request_digest(document), created_at=now - 120,
                             updated_at=now - 60, **fields))


def status_about(status_id: str, about: str) -> dict:
    return builders.status_request(sale_id="POS1", service_id=status_id, poi_id=STORE_POI,
                                   original_service_id=about, original_category="Payment")


async def test_a_status_request_about_an_unresolved_payment_the_terminal_forgot_is_not_not_found(
        tmp_path, mosquitto):
    """A payment left unresolved, then another taken on that terminal: the terminal may
    remember only its latest payment, so its NotFound about the first is no proof it was never
    charged (the bridge's own polls leave it unresolved). A register asking about it itself
    must not be told not_found ("nothing was charged, retry"): it would charge the shopper
    again. A terminal that does know the outcome still settles the payment, and a payment the
    journal knows never reached the terminal is still not_found."""
    journal = Journal(tmp_path / "journal.sqlite3")
    now = time.time()
    unsent_payment(journal, "U1", state=TxState.UNRESOLVED, sent_at=now - 120,
                   detail="status polls unanswered")
    unsent_payment(journal, "U2", state=TxState.FINAL, sent_at=now - 60, outcome="approved",
                   source="terminal")  # taken since: the terminal's latest payment
    unsent_payment(journal, "U3", state=TxState.FINAL, outcome="rejected", source="bridge",
                   detail="terminal offline; nothing was sent")
    journal.close()
    async with Subscriber(mosquitto, [f"{BASE}/registers/#", f"{BASE}/transactions/#"]) as sub, \
            Store(tmp_path, mosquitto, default_scenario()) as store:
        # the restart's poll: NotFound after a later payment, the bridge stops asking
        await sub.wait_for(lambda t, p: t.endswith("/event") and p["event"] ==
                           "reconcile_abandoned" and p["transaction"]["service_id"] == "U1")
        await sub.publish(request_topic(), status_about("T1", "U1"))
        answer = await sub.wait_for(outcome_for("T1"))
        bridge = answer["bridge"]
        assert (bridge["outcome"], bridge["source"]) == ("unresolved", "bridge"), answer
        assert answer["SaleToPOIResponse"] is None  # no NotFound for a library to read
        assert "NotFound" in bridge["error"] and "POS1/U1" in bridge["error"]
        assert "do not charge again" in bridge["error"]
        assert "check the acquirer's records" in bridge["error"]  # the payment's own reason
        payment = store.bridge.journal.get(TxKey("POS1", "U1"))
        assert (payment.state, payment.outcome) == (TxState.UNRESOLVED, None)
        retained = await sub.wait_for(lambda t, p: t == f"{BASE}/transactions/POS1/T1")
        assert retained["bridge"]["outcome"] == "unresolved", retained
        # the status request delivered again (QoS 1) gets the same answer from the journal
        await sub.publish(request_topic(), status_about("T1", "U1"))
        repeat = await sub.wait_for(lambda t, p: outcome_for("T1")(t, p)
                                    and p["bridge"]["source"] == "journal")
        assert (repeat["bridge"]["outcome"], repeat["bridge"]["error"]) == (
            "unresolved", bridge["error"]), repeat
        # a payment the journal knows never went to the terminal: NotFound is the truth
        await sub.publish(request_topic(), status_about("T3", "U3"))
        assert (await sub.wait_for(outcome_for("T3")))["bridge"]["outcome"] == "not_found"
        # the terminal does know U1 (it found its record): its answer settles the payment
        request = responses.payment_request("POS1", "U1", STORE_POI, 7.0)
        store.simulator.terminal.ledger[("POS1", "U1")] = LedgerEntry(
            "POS1", "U1", "Payment", request, Behaviour(), received_at=now - 120,
            completes_at=now - 119, outcome="approve",
            response=responses.payment_response(request, "approve", now - 119))
        await sub.publish(request_topic(), status_about("T4", "U1"))
        assert (await sub.wait_for(outcome_for("T4")))["bridge"]["outcome"] == "approved"
        settled = await sub.wait_for(outcome_for("U1", "approved"))
        assert settled["bridge"]["source"] == "status-poll"
        assert store.bridge.journal.get(TxKey("POS1", "U1")).outcome == "approved"


async def test_a_status_request_about_a_payment_still_awaiting_its_answer_is_not_not_found(
        tmp_path, mosquitto):
    """A register asks about its payment while the bridge still waits for the terminal's
    answer, and the terminal says NotFound (the request was lost, or the terminal has not
    taken it in yet). The bridge has not settled the payment: the register is told its outcome
    is not known yet, not "nothing was charged"; the payment's own result follows."""
    scenario = Scenario(poi_id=STORE_POI, default=Behaviour(lose_request=True),
                        link=LinkBehaviour(status_hold=0.05))
    async with Store(tmp_path, mosquitto, scenario, payment_timeout=3.0) as store, \
            Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
        await sub.publish(request_topic(), responses.payment_request("POS1", "W1", STORE_POI))
        await sub.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "sent")
        await sub.publish(request_topic(), status_about("T1", "W1"))
        answer = await sub.wait_for(outcome_for("T1"))
        assert answer["bridge"]["outcome"] == "unresolved", answer
        assert "still waiting for the terminal's answer" in answer["bridge"]["error"]
        assert store.bridge.journal.get(TxKey("POS1", "W1")).state is \
            TxState.AWAITING_RESPONSE
        # the bridge's own poll, after payment_timeout, with no payment taken since: never got it
        result = await sub.wait_for(outcome_for("W1"), timeout=20)
        assert result["bridge"]["outcome"] == "not_found", result


async def test_a_status_request_about_a_payment_held_unsent_is_answered_by_the_bridge(
        tmp_path, mosquitto):
    """A terminal just plugged in has not yet said which terminal it is: the payment waits
    for that, unsent. The register asks about it; the terminal, asked, would answer NotFound
    ("nothing was charged", as a terminal without the payment does), and the register might
    charge the shopper another way, while the payment goes out a moment later. The bridge
    answers itself, in progress; the payment's result follows under its own IDs."""
    device = DeviceByHand(tmp_path / "port")  # answers only what the test makes it answer
    try:
        async with bridge_on(tmp_path, mosquitto, {HAND_POI: str(tmp_path / "port")}), \
                Subscriber(mosquitto, [f"{HAND_BASE}/registers/#"]) as sub:
            assert await wait_until(lambda: "Diagnosis" in device.categories(), timeout=10)
            topic = f"{HAND_BASE}/terminals/{HAND_POI}/request/POS1"
            await sub.publish(topic, responses.payment_request("POS1", "H1", HAND_POI, 7.0))
            await sub.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "accepted")
            status = builders.status_request(sale_id="POS1", service_id="T1", poi_id=HAND_POI,
                                             original_service_id="H1",
                                             original_category="Payment")
            await sub.publish(topic, status)
            answered = asyncio.create_task(sub.wait_for(outcome_for("T1")))
            assert await wait_until(lambda: answered.done()
                                    or "TransactionStatus" in device.categories(), timeout=15)
            if not answered.done():  # asked, the terminal says what it knows: NotFound
                device.send(responses.status_not_found(status))
            answer = await answered
            bridge = answer["bridge"]
            assert (bridge["outcome"], bridge["source"]) == ("in_progress", "bridge"), answer
            assert "TransactionStatus" not in device.categories()
            text = answer["SaleToPOIResponse"]["TransactionStatusResponse"]["Response"][
                "AdditionalResponse"]
            assert "POS1/H1 has not been sent" in text, text
            # the device says who it is: the payment goes out, its result under its own IDs
            check = next(d for d in device.received if "DiagnosisRequest" in
                         d.get("SaleToPOIRequest", {}))
            device.send(responses.simple_response(check))
            assert await wait_until(lambda: "Payment" in device.categories(), timeout=10)
            payment = next(d for d in device.received if "PaymentRequest" in
                           d.get("SaleToPOIRequest", {}))
            device.send(responses.payment_response(payment, "approve", time.time()))
            result = await sub.wait_for(outcome_for("H1"))
            assert (result["bridge"]["outcome"], result["bridge"]["source"]) == (
                "approved", "terminal"), result
    finally:
        device.close()

"""A register's own TransactionStatusRequest about a transaction the journal holds: a
terminal restarted since, or another terminal, answers NotFound ("nothing was charged") for a
payment the bridge knows was approved. The journal's record answers instead."""

from __future__ import annotations

import json
import time

from bridge.protocol import builders
from bridge.protocol.messages import parse_message
from bridge.protocol.outcome import classify
from bridge.protocol.transaction import Transaction, TxState, request_digest
from bridge.simulator import responses

from .rig import POI as STORE_POI
from .rig import Subscriber, outcome_for
from .test_daemon_mqtt import BASE, Store, default_scenario, request_topic
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

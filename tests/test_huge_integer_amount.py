"""README "JSON means RFC 8259: NaN, Infinity and numbers too large for a double (1e400)
... refuse a request ... so nothing the bridge publishes holds them". Written as a whole
number (1 followed by 400 zeros) the same number was taken, sent to the terminal, and a
later payment of that sale tripped an OverflowError in the retry check (float() of it),
answered "internal error ... send the same request again" for ever (review rv2)."""

from __future__ import annotations

import json
import time

import pytest

from bridge.protocol.jsontext import JsonTextError, loads
from bridge.protocol.transaction import Transaction, TxState
from bridge.simulator import responses

from .rig import POI, Subscriber, outcome_for
from .test_daemon_mqtt import BASE, Store, default_scenario, request_topic
from .test_intake_fuzz import POI as RIG_POI
from .test_intake_fuzz import Rig

HUGE = "1" + "0" * 400


def with_amount(doc: dict, amount: str) -> bytes:
    return json.dumps(doc).replace('"RequestedAmount": 12.5',
                                   f'"RequestedAmount": {amount}').encode()


def payment(service_id: str, poi_id: str = POI, transaction_id: str = "order-1") -> dict:
    doc = responses.payment_request("POS1", service_id, poi_id, 12.5)
    doc["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
        "TransactionID"] = transaction_id
    return doc


@pytest.mark.parametrize("text", [HUGE, "-" + HUGE, "[" + HUGE + "]"])
def test_the_json_reader_refuses_an_integer_no_double_holds(text):
    with pytest.raises(JsonTextError, match="too large"):
        loads(text)


def test_the_json_reader_keeps_the_largest_integers_a_double_holds():
    assert loads(str(10**308)) == 10**308
    assert loads(str(2**1023)) == 2**1023


async def test_a_whole_number_too_large_for_a_double_is_refused(tmp_path, mosquitto):
    async with Store(tmp_path, mosquitto, default_scenario()) as store, \
            Subscriber(mosquitto, [f"{BASE}/registers/POS1/#"]) as sub:
        await sub.publish(f"{request_topic()}/POS1", with_amount(payment("H1"), HUGE))
        answer = await sub.wait_for(outcome_for("H1"))
        assert answer["bridge"]["outcome"] == "rejected", (
            answer["bridge"]["outcome"], list(store.simulator.terminal.ledger))
        assert "not valid JSON" in answer["bridge"]["error"], answer["bridge"]
        assert "too large" in answer["bridge"]["error"], answer["bridge"]
        assert not store.simulator.terminal.ledger, "sent to the terminal"


async def test_a_retry_check_against_a_huge_amount_is_no_internal_error(tmp_path, mosquitto):
    # the first payment of order-1 is open (never answered: polled), the next is a retry
    async with Store(tmp_path, mosquitto, default_scenario(never_answer=True, delay=30)), \
            Subscriber(mosquitto, [f"{BASE}/registers/POS1/#"]) as sub:
        await sub.publish(f"{request_topic()}/POS1", with_amount(payment("H1"), HUGE))
        first = await sub.wait_for(outcome_for("H1"))
        assert first["bridge"]["outcome"] == "rejected"
        await sub.publish(f"{request_topic()}/POS1", payment("H2"))
        answer = await sub.wait_for(
            lambda t, p: t.endswith("/event") and p["event"] == "sent"
            and p["transaction"]["service_id"] == "H2")
        assert answer is not None


def test_an_open_payment_recorded_with_a_huge_amount_does_not_break_the_retry_check(tmp_path):
    """A journal written before the reader refused such a number holds an open payment
    whose amount no double holds: the retry check of the next payment of that sale must
    not trip on float() of it (it answered "internal error" to every such payment)."""
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        recorded = payment("H1", RIG_POI)
        recorded["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"]["AmountsReq"][
            "RequestedAmount"] = 10**400
        now = time.time()
        rig.journal.save(Transaction(
            sale_id="POS1", service_id="H1", poi_id=RIG_POI, category="Payment",
            request=recorded, digest="d", created_at=now, updated_at=now,
            state=TxState.POLLING))
        (answer,) = rig.handle(f"poi-bridge/terminals/{RIG_POI}/request/POS1",
                               json.dumps(payment("H2", RIG_POI)).encode())
        body = json.loads(answer.payload)
        assert answer.topic == "poi-bridge/registers/POS1/response", (answer.topic, body)
        assert body["bridge"]["outcome"] != "error", body["bridge"]
        assert "internal error" not in (body["bridge"]["error"] or ""), body["bridge"]
    finally:
        rig.journal.close()

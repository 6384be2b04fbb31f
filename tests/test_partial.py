"""A partial approval (Result Partial: a gift card with too little on it, a partial
authorisation the acquirer allowed): money moved, but less than asked. Published as
`partially_approved`, never `approved`, with the amounts a register needs to finish the sale,
whichever way the result arrives (the terminal's answer, a status poll, the journal)."""

from __future__ import annotations

import asyncio
import json

from bridge.daemon.registers import partial_amounts, result_payload, stored_result
from bridge.protocol import builders
from bridge.protocol.actions import Deliver, Record
from bridge.protocol.messages import parse_message
from bridge.protocol.outcome import classify
from bridge.protocol.transaction import TxKey
from bridge.register_client import partial_advice
from bridge.simulator import responses
from bridge.simulator.terminal import Behaviour, SimulatedTerminal

from .rig import POI, Subscriber, outcome_for, wait_until
from .test_cli_register import pay_through_a_stand_in
from .test_cli_tools import BASE as CLI_BASE
from .test_daemon_mqtt import BASE, Store, default_scenario, request_topic
from .test_session import Harness, request_of, status_of


def journal_of(h: Harness):
    """The journal as the session's Records left it: a lookup by key, as Journal.get."""
    rows = {}
    for action in h.log:
        if isinstance(action, Record):
            rows[action.transaction.key] = action.transaction
    return rows.get


def only_delivery(actions: list) -> Deliver:
    (result,) = [a for a in actions if isinstance(a, Deliver)]
    return result


# --- the terminal's words -------------------------------------------------------------------

def test_partial_is_partially_approved_for_money_and_success_otherwise():
    for category in ("Payment", "Reversal", "StoredValue"):
        request = responses.payment_request("R1", "S1", POI, 10.0, category=category)
        answer = responses.simple_response(request, result="Partial")
        assert classify(parse_message(answer)).outcome == "partially_approved", category
    diagnosis = responses.simple_response(
        responses.payment_request("R1", "S1", POI, category="Diagnosis"), result="Partial")
    assert classify(parse_message(diagnosis)).outcome == "success"


# --- the session: final, a money outcome, never polled ----------------------------------------

def test_a_partial_answer_finishes_the_payment_partially_approved_and_is_not_polled():
    h = Harness()
    h.submit("R1", "S1")
    done = h.answer(responses.payment_response(request_of(h), "partial", h.now, authorised=5))
    result = only_delivery(done)
    assert (result.outcome, result.source) == ("partially_approved", "terminal")
    assert result.response["SaleToPOIResponse"]["PaymentResponse"]["Response"] == {
        "Result": "Partial", "AdditionalResponse": "tid=46403161&message=PARTIALLY%20APPROVED"}
    assert not h.session.open and h.session.active is None
    h.advance(600)
    assert not h.sends(purpose="status-poll")
    # A repeat of the request is answered from the journal, as it was
    (record,) = [a.transaction for a in done if isinstance(a, Record)]
    assert (record.state, stored_result(record).outcome) == ("final", "partially_approved")


def test_a_partial_recovered_by_status_poll_is_partially_approved_in_the_original_shape():
    h = Harness()
    h.submit("R1", "S1")
    lost = responses.payment_response(request_of(h), "partial", h.now)  # never arrives
    h.advance(121)
    (poll,) = h.sends(purpose="status-poll")
    result = only_delivery(h.answer(responses.status_success(poll.document, lost)))
    assert (result.outcome, result.source) == ("partially_approved", "status-poll")
    assert "PaymentResponse" in result.response["SaleToPOIResponse"]
    assert not h.session.open
    assert partial_amounts(result, journal_of(h)) == {
        "requested": 12.5, "approved": 6.25, "currency": "EUR"}


def test_a_partial_reversal_stored_value_and_status_answer_are_partially_approved():
    h = Harness()
    h.submit("R1", "S1")
    paid = responses.payment_response(request_of(h), "partial", h.now, authorised=4)
    h.answer(paid)
    h.submit("R1", "T1", category="TransactionStatus", doc=status_of("R1", "S1"))
    (asked,) = [s for s in h.sends(purpose="passthrough") if s.service_id == "T1"]
    result = only_delivery(h.answer(responses.status_success(asked.document, paid)))
    assert (result.service_id, result.outcome) == ("T1", "partially_approved")
    h.submit("R1", "V1", category="Reversal")
    reversal = request_of(h, service="V1")
    result = only_delivery(h.answer(responses.payment_response(reversal, "partial", h.now)))
    assert (result.outcome, result.source) == ("partially_approved", "terminal")
    h.submit("R1", "G1", category="StoredValue")
    stored = request_of(h, service="G1")
    result = only_delivery(h.answer(responses.simple_response(stored, result="Partial")))
    assert (result.outcome, result.source) == ("partially_approved", "terminal")
    assert not h.session.open


# --- what a register is told of the amounts ------------------------------------------

def test_the_amounts_of_a_partial_payment_reversal_stored_value_and_status_answer():
    h = Harness()
    h.submit("R1", "S1")  # 12.5 EUR
    paid = responses.payment_response(request_of(h), "partial", h.now, authorised=5)
    result = only_delivery(h.answer(paid))
    assert partial_amounts(result, journal_of(h)) == {
        "requested": 12.5, "approved": 5, "currency": "EUR"}
    published = result_payload(result, amounts=partial_amounts(result, journal_of(h)))
    assert published["bridge"]["amounts"]["approved"] == 5
    assert "amounts" not in result_payload(result)["bridge"]  # only when given
    # A register's own status request about it: the amounts of the payment it asked about
    h.submit("R1", "T1", category="TransactionStatus", doc=status_of("R1", "S1"))
    (asked,) = [s for s in h.sends(purpose="passthrough") if s.service_id == "T1"]
    status = only_delivery(h.answer(responses.status_success(asked.document, paid)))
    assert status.service_id == "T1"
    assert partial_amounts(status, journal_of(h)) == {
        "requested": 12.5, "approved": 5, "currency": "EUR"}
    # A Reversal says ReversedAmount both ways, without a currency
    h.submit("R1", "V1", category="Reversal")  # ReversedAmount 12.5
    reversal = request_of(h, service="V1")
    result = only_delivery(h.answer(
        responses.payment_response(reversal, "partial", h.now, authorised=2.5)))
    assert partial_amounts(result, journal_of(h)) == {
        "requested": 12.5, "approved": 2.5, "currency": None}
    # A StoredValue's are per item: the register reads them in the response
    h.submit("R1", "G1", category="StoredValue")
    stored = request_of(h, service="G1")
    result = only_delivery(h.answer(responses.simple_response(stored, result="Partial")))
    assert partial_amounts(result, journal_of(h)) == {
        "requested": None, "approved": None, "currency": None}


# --- the simulator and what a till prints -----------------------------------------------------

def test_the_simulator_answers_partial_and_its_ledger_counts_it_charged():
    terminal = SimulatedTerminal()
    terminal.script(Behaviour(decision="partial", authorised=3.0))
    request = responses.payment_request("R1", "S1", POI, 10.0)
    (answer,) = terminal.handle(request, 0.0).answers
    body = answer.document["SaleToPOIResponse"]["PaymentResponse"]
    assert body["Response"]["Result"] == "Partial"
    assert body["PaymentResult"]["AmountsResp"] == {"AuthorizedAmount": 3.0, "Currency": "EUR"}
    assert terminal.summary()["R1/S1"]["charged"] is True


def test_a_till_is_told_how_much_is_still_to_pay():
    text = partial_advice({"outcome": "partially_approved",
                           "amounts": {"requested": 10.0, "approved": 3.3, "currency": "EUR"}})
    assert "3.3 EUR of 10.0 EUR taken, 6.7 EUR still to pay" in text
    assert "charge the rest another way, or reverse" in text
    assert "could not read" in partial_advice({"amounts": {"requested": None, "approved": 1}})


async def test_register_pay_exits_4_and_says_what_is_still_to_pay(mosquitto):
    """Exit 1 ("another outcome") would let a till ask for the whole amount again."""
    async def partially(bridge, request) -> None:
        service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
        await bridge.publish(f"{CLI_BASE}/registers/TILL9/response", json.dumps({
            "SaleToPOIResponse": None,
            "bridge": {"outcome": "partially_approved", "source": "terminal", "error": None,
                       "transaction": {"sale_id": "TILL9", "service_id": service_id,
                                       "poi_id": POI, "category": "Payment"},
                       "amounts": {"requested": 12.5, "approved": 5.0, "currency": "EUR"},
                       "at": "2026-11-30T10:00:00.000Z"}}), qos=1)
    (code, out, err, _), _ = await pay_through_a_stand_in(
        mosquitto, partially, "--amount", "12.50", "--timeout", "30")
    assert code == 4, err
    assert ": partially_approved (source terminal): PARTIALLY APPROVED, NOT PAID IN FULL: " \
        "5.0 EUR of 12.5 EUR taken, 7.5 EUR still to pay" in out


# --- end to end: simulator, a real bridge, mosquitto ------------------------------------------

async def test_a_partial_approval_reaches_the_register_with_its_amounts(tmp_path, mosquitto):
    scenario = default_scenario(decision="partial", authorised=4.0)
    async with Store(tmp_path, mosquitto, scenario) as store:
        assert await asyncio.to_thread(wait_until, lambda: store.bridge.gateway.connected, 15)
        async with Subscriber(mosquitto, [f"{BASE}/registers/POS1/#", f"{BASE}/transactions/#",
                                          f"{BASE}/bridge/response/+"]) as sub:
            request = responses.payment_request("POS1", "P1", POI, 9.5)
            await sub.publish(request_topic(), request)
            answer = await sub.wait_for(outcome_for("P1"))
            info = answer["bridge"]
            assert (info["outcome"], info["source"]) == ("partially_approved", "terminal")
            assert info["amounts"] == {"requested": 9.5, "approved": 4.0, "currency": "EUR"}
            retained = await sub.wait_for(
                lambda t, p: t == f"{BASE}/transactions/POS1/P1" and p.get("state") == "final")
            assert retained["bridge"]["outcome"] == "partially_approved"
            assert retained["bridge"]["amounts"] == info["amounts"]
            row = store.bridge.journal.get(TxKey("POS1", "P1"))
            assert (row.state, row.outcome) == ("final", "partially_approved")

            # A repeat is answered from the journal, amounts and all
            await sub.publish(request_topic(), request)
            repeat = await sub.wait_for(lambda t, p: outcome_for("P1")(t, p)
                                        and p["bridge"]["source"] == "journal")
            assert repeat["bridge"]["outcome"] == "partially_approved"
            assert repeat["bridge"]["amounts"] == info["amounts"]

            # A status request about it: the terminal's record, or the journal's, says partial
            ask = builders.status_request(sale_id="POS1", service_id="Q1", poi_id=POI,
                                          original_service_id="P1", original_category="Payment")
            await sub.publish(request_topic(), ask)
            status = await sub.wait_for(outcome_for("Q1"))
            assert status["bridge"]["outcome"] == "partially_approved"
            assert status["bridge"]["amounts"] == info["amounts"]

            await sub.publish(f"{BASE}/bridge/request/transactions",
                              {"outcome": "partially_approved", "transaction": "x1"})
            listed = await sub.wait_for(lambda t, p: t.endswith("/response/transactions"))
            assert listed["status"] == "ok", listed
            assert {t["service_id"] for t in listed["data"]} >= {"P1"}


async def test_a_partial_approval_recovered_by_status_poll_end_to_end(tmp_path, mosquitto):
    scenario = default_scenario(decision="partial", never_answer=True)
    async with Store(tmp_path, mosquitto, scenario) as store:
        assert await asyncio.to_thread(wait_until, lambda: store.bridge.gateway.connected, 15)
        async with Subscriber(mosquitto, [f"{BASE}/registers/POS1/#"]) as sub:
            await sub.publish(request_topic(), responses.payment_request("POS1", "P2", POI, 7.0))
            answer = await sub.wait_for(outcome_for("P2"))
            info = answer["bridge"]
            assert (info["outcome"], info["source"]) == ("partially_approved", "status-poll")
            assert info["amounts"] == {"requested": 7.0, "approved": 3.5, "currency": "EUR"}
            assert json.dumps(answer).count('"Result": "Partial"') == 1

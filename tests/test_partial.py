"""A partial approval (Result Partial: a gift card with too little on it, a partial
authorisation the acquirer allowed): money moved, but less than asked. Published as
`partially_approved`, never `approved`, with the amounts a register needs to finish the sale,
whichever way the result arrives (the terminal's answer, a status poll, the journal)."""

from __future__ import annotations

import json

from bridge.daemon.registers import partial_amounts, result_payload
from bridge.protocol.actions import Deliver, Record
from bridge.register_client import partial_advice
from bridge.simulator import responses
from bridge.simulator.terminal import Behaviour, SimulatedTerminal

from .rig import POI
from .test_cli_register import pay_through_a_stand_in
from .test_cli_tools import BASE as CLI_BASE
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

"""The register side: RegisterClient and `poi-bridge register pay`, against a real broker and
a real bridge (or a stand-in for one where the bridge cannot be made to say a thing).

What went wrong:
- `register pay` exited 1 ("another outcome": not paid) for the bridge's `error` answer ("it
  may or may not have been started. Do not charge again") and for an outcome word it did not
  know, or none, though the terminal may have charged: the technician was told to charge
  again. Only the outcomes that prove nothing was taken exit 1; the others are OUTCOME
  UNKNOWN (3). A response without `source`, or a `transaction` without its IDs, crashed the
  command with a KeyError traceback.
- RegisterClient.request() kept waiting after a TransactionStatus request's `unresolved`
  answer, which is final for a status request, and raised TimeoutError at its end.
- pay() and `register pay` could not name the sale's TransactionID: every call was a new
  order, so the bridge's refusal of a retry of an open payment never applied to them.
- `register pay` showed every event on its SaleID's event topic, a live till's payments'
  too, as if they were its own payment's progress.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiomqtt
import pytest

from bridge.protocol import builders
from bridge.protocol.transaction import TxKey
from bridge.register_client import RegisterClient
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .follow_rig import A, B
from .follow_rig import BASE as FOLLOW_BASE
from .follow_rig import bridge_on
from .rig import POI, Subscriber
from .test_cli_register import (
    approve,
    assert_outcome_unknown,
    pay_through_a_stand_in,
    register,
    run_cli,
)
from .test_cli_tools import BASE as CLI_BASE
from .test_cli_tools import running_bridge
from .test_daemon_mqtt import BASE, Store
from .test_unresolved_retry import FAST, charged, ready, terminals


def answering(**bridge_part):
    """A stand-in bridge's answer to the payment: a response under its IDs whose `bridge`
    part is `bridge_part` (its `transaction` naming the payment's ServiceID unless given)."""
    async def answer(bridge: aiomqtt.Client, request: dict) -> None:
        service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
        part = {"transaction": {"sale_id": "TILL9", "service_id": service_id, "poi_id": POI},
                **bridge_part}
        if "transaction" in bridge_part:
            part["transaction"] = {**bridge_part["transaction"], "service_id": service_id}
        await bridge.publish(f"{CLI_BASE}/registers/TILL9/response",
                             json.dumps({"SaleToPOIResponse": None, "bridge": part}), qos=1)
    return answer


# --- A: which outcomes exit 1 ("not paid: nothing was taken") ---

async def test_a_payment_the_bridge_answered_error_is_outcome_unknown(tmp_path, mosquitto):
    """The bridge failed after it had handed the payment on and answered `error` ("it may or
    may not have been started. Do not charge again"): the command exited 1, not paid, and
    the payment went on to be approved."""
    async with running_bridge(tmp_path, mosquitto) as bridge, \
            Subscriber(mosquitto, [f"{CLI_BASE}/registers/#"]) as sub:
        worker = bridge.workers[POI]
        submit = worker.submit

        def submit_then_fail(*args, **kwargs):  # a bug after the payment was handed on
            submit(*args, **kwargs)
            raise RuntimeError("injected: a bug after the payment started")

        worker.submit = submit_then_fail
        code, out, err, _ = await register(mosquitto, "--base-topic", CLI_BASE, "--sale-id",
                                           "TILL9", "pay", "--terminal", POI, "--amount",
                                           "4.20", "--service-id", "E1", "--timeout", "30")
        print("exit", code, "| stdout:", out.strip(), "| stderr:", err.strip()[-400:])
        assert_outcome_unknown(code, err, "TILL9", "E1")
        assert "TILL9/E1 on " + POI + ": error (source bridge)" in out
        later = await sub.wait_for(lambda t, p: t.endswith("/response") and isinstance(p, dict)
                                   and (p.get("bridge") or {}).get("outcome") == "approved")
        assert later["bridge"]["transaction"]["service_id"] == "E1"  # it was charged


@pytest.mark.parametrize("part", [
    {"outcome": "error", "source": "bridge", "error": "the link was lost"},
    {"outcome": "settled", "source": "terminal"},  # a word from a newer bridge
    {"source": "terminal"},  # no outcome at all
    {"outcome": ["approved"], "source": "terminal"},
], ids=["error", "unknown-word", "no-outcome", "not-a-word"])
async def test_an_outcome_that_does_not_say_nothing_was_taken_is_outcome_unknown(mosquitto,
                                                                              part):
    (code, out, err, _), request = await pay_through_a_stand_in(
        mosquitto, answering(**part), "--amount", "2", "--timeout", "20")
    print("exit", code, "| stdout:", out.strip())
    assert_outcome_unknown(code, err, "TILL9",
                           request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"])
    assert "the bridge answered" in err, err


@pytest.mark.parametrize("outcome", ["declined", "cancelled", "aborted", "not_found",
                                     "rejected"])
async def test_the_outcomes_that_prove_nothing_was_taken_exit_1(mosquitto, outcome):
    (code, out, err, _), _ = await pay_through_a_stand_in(
        mosquitto, answering(outcome=outcome, source="terminal"), "--amount", "2",
        "--timeout", "20")
    assert code == 1, err
    assert f": {outcome} (source terminal)" in out and "OUTCOME UNKNOWN" not in err


async def test_a_response_without_source_or_ids_is_shown_not_a_crash(mosquitto):
    """A response without `bridge.source`, or whose `transaction` names only the ServiceID,
    ended the command with a KeyError traceback after the payment was approved."""
    (code, out, err, _), request = await pay_through_a_stand_in(
        mosquitto, answering(outcome="approved", transaction={}), "--amount", "2",
        "--timeout", "20")
    service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
    assert code == 0, err
    assert "Traceback" not in err
    assert f"TILL9/{service_id} on {POI}: approved (source not given)" in out, out


# --- B: a status request's `unresolved` answer is its answer ---

def _event(name: str, service_id: str):
    def predicate(topic, payload) -> bool:
        return (topic.endswith("/event") and isinstance(payload, dict)
                and payload.get("event") == name
                and payload.get("transaction", {}).get("service_id") == service_id)
    return predicate


async def test_a_status_request_answered_unresolved_is_answered(tmp_path, mosquitto):
    """The terminal answers NotFound about a payment the bridge still awaits: the bridge
    answers the register's status request `unresolved` (source bridge), final for a status
    request. RegisterClient.request() waited out its timeout and raised TimeoutError."""
    scenario = Scenario(poi_id=POI, default=Behaviour(delay=0.05),
                        transactions=[Behaviour(lose_request=True)],
                        link=LinkBehaviour(status_hold=0.05))
    async with Store(tmp_path, mosquitto, scenario, payment_timeout=20), \
            Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub, \
            RegisterClient(mosquitto.host, mosquitto.port, "POS1", base_topic=BASE,
                           persistent=False) as till:
        paying = asyncio.create_task(till.pay(POI, 5.0, service_id="P1", timeout=60))
        try:
            await sub.wait_for(_event("sent", "P1"))
            status = builders.status_request(sale_id="POS1", service_id="Q1", poi_id=POI,
                                             original_service_id="P1",
                                             original_category="Payment")
            started = time.monotonic()
            answer = await till.request(status, timeout=8)
            print("answered after %.1f s" % (time.monotonic() - started))
            assert answer["bridge"]["outcome"] == "unresolved"
            assert answer["bridge"]["source"] == "bridge"
            assert not paying.done()  # the payment itself waits on for its result
        finally:
            paying.cancel()


async def test_unresolved_ends_the_wait_of_a_status_request_only(mosquitto):
    """`unresolved` answers a money request for now (its result follows under its IDs): the
    wait goes on. For any other request (a status request) it is the answer."""
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="stand-in") as bridge, \
            RegisterClient(mosquitto.host, mosquitto.port, "TILL9", base_topic=CLI_BASE,
                           persistent=False) as till:
        await bridge.subscribe(f"{CLI_BASE}/terminals/#", qos=1)

        async def answer(service_id: str, category: str, outcome: str) -> None:
            await bridge.publish(f"{CLI_BASE}/registers/TILL9/response", json.dumps(
                {"SaleToPOIResponse": None, "bridge": {
                    "outcome": outcome, "source": "bridge", "transaction": {
                        "sale_id": "TILL9", "service_id": service_id, "poi_id": POI,
                        "category": category}}}), qos=1)

        paying = asyncio.create_task(till.pay(POI, 1.0, service_id="P1", timeout=20))
        status = builders.status_request(sale_id="TILL9", service_id="Q1", poi_id=POI,
                                         original_service_id="P1",
                                         original_category="Payment")
        asking = asyncio.create_task(till.request(status, timeout=20))
        async with asyncio.timeout(10):
            async for message in bridge.messages:
                if json.loads(message.payload)["SaleToPOIRequest"]["MessageHeader"][
                        "ServiceID"] == "Q1":
                    break
        await answer("P1", "Payment", "unresolved")
        await answer("Q1", "TransactionStatus", "unresolved")
        assert (await asyncio.wait_for(asking, 5))["bridge"]["outcome"] == "unresolved"
        await asyncio.sleep(0.3)
        assert not paying.done(), "a payment's `unresolved` was taken as its result"
        await answer("P1", "Payment", "approved")
        assert (await asyncio.wait_for(paying, 5))["bridge"]["outcome"] == "approved"


# --- C: the sale's TransactionID ---

async def test_a_retry_of_an_unresolved_payment_through_register_client_is_refused(
        tmp_path, mosquitto):
    """A till on RegisterClient whose payment is `unresolved` (maybe charged), and whose
    cashier presses "pay" again for the same order, on the next lane's terminal: pay() gave
    every call its own TransactionID, so the bridge could not tell the retry and charged it."""
    async with terminals(tmp_path) as (sim_a, sim_b, links), \
            bridge_on(tmp_path, mosquitto, links, **FAST) as bridge:
        await ready(bridge)
        async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                  base_topic=FOLLOW_BASE, persistent=False) as till:
            with pytest.raises(TimeoutError):  # U1: unresolved, then no answer in time
                await till.pay(A, 12.5, service_id="U1", transaction_id="order-1", timeout=4)
            assert bridge.journal.get(TxKey("TILL1", "U1")).state == "unresolved"
            again = await till.pay(B, 12.5, transaction_id="order-1", timeout=15)
            print("retry on B:", again["bridge"]["outcome"], again["bridge"]["error"])
            assert again["bridge"]["outcome"] == "rejected"
            assert "U1" in again["bridge"]["error"]
            assert charged(sim_b) == [] and charged(sim_a) == ["U1"]


async def test_register_pay_sends_the_transaction_id_it_is_given(mosquitto):
    (code, _, err, _), request = await pay_through_a_stand_in(
        mosquitto, approve, "--amount", "1", "--transaction-id", "order-77", "--timeout", "20")
    assert code == 0, err
    body = request["SaleToPOIRequest"]["PaymentRequest"]
    assert body["SaleData"]["SaleTransactionID"]["TransactionID"] == "order-77"


def test_register_pay_help_says_what_the_transaction_id_is_for():
    done = run_cli("register", "pay", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--transaction-id ORDER" in text
    assert "without it every call is a new order" in text.lower(), text
    assert "the bridge cannot catch a retry of an unfinished one" in text, text


@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_transaction_id_is_refused_before_sending(value):
    done = run_cli("register", "--broker", "127.0.0.1:9", "pay", "--terminal", POI,
                   "--amount", "1", f"--transaction-id={value}")
    assert done.returncode == 2, done.stderr
    assert "--transaction-id" in done.stderr and "cannot connect" not in done.stderr


# --- E: only its own payment's events ---

async def test_register_pay_shows_only_its_own_payments_events(mosquitto):
    """A live till under the same SaleID pays meanwhile: its events (on the same event
    topic) were shown as this payment's progress."""
    async def answer(bridge: aiomqtt.Client, request: dict) -> None:
        service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
        for sid, detail in (("OTHER1", "the till's own payment"), (service_id, "ours")):
            await bridge.publish(f"{CLI_BASE}/registers/TILL9/event", json.dumps(
                {"event": "accepted", "detail": detail, "transaction": {
                    "sale_id": "TILL9", "service_id": sid, "poi_id": POI}}), qos=1)
        await approve(bridge, request)

    (code, _, err, _), _ = await pay_through_a_stand_in(mosquitto, answer, "--amount", "1",
                                                        "--timeout", "20")
    assert code == 0, err
    assert ". accepted ours" in err, err
    assert "the till's own payment" not in err, err

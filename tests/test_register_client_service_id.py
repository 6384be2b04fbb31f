"""RegisterClient tells answers apart by ServiceID alone (the bridge's answers name nothing
else of the request): a call must never be handed another request's answer under the same
ServiceID. Real broker, bridge and simulated terminal on a pty.

Found in review: a second call under a ServiceID already waited on overwrote the first's
waiter (a double press: the first call timed out, OUTCOME UNKNOWN, though its result came),
and a different request reusing it (50.00 after 5.00) had its conflict refusal swallowed and
was handed the 5.00 approval: a till would book 50.00 as paid."""

from __future__ import annotations

import asyncio

import pytest

from bridge.register_client import RegisterClient

from .rig import POI, Subscriber
from .test_cli_tools import BASE, running_bridge

REQUESTS = f"{BASE}/terminals/{POI}/request/TILL9"


def _authorised(answer) -> float | None:
    body = answer["SaleToPOIResponse"]["PaymentResponse"]
    return (body.get("PaymentResult") or {}).get("AmountsResp", {}).get("AuthorizedAmount")


def _requests_under(sub: Subscriber, service_id: str) -> list:
    return [p for p in sub.on(REQUESTS)
            if p["SaleToPOIRequest"]["MessageHeader"]["ServiceID"] == service_id]


def _is_response(service_id: str):
    def predicate(topic: str, payload) -> bool:
        return (topic == f"{BASE}/registers/TILL9/response"
                and payload["bridge"]["transaction"]["service_id"] == service_id)
    return predicate


async def _published(sub: Subscriber, service_id: str) -> None:
    await sub.wait_for(lambda t, p: t == REQUESTS and p["SaleToPOIRequest"]["MessageHeader"][
        "ServiceID"] == service_id)


@pytest.mark.parametrize(("second_amount", "second_order"), [(5.0, "T1"), (50.0, "T2")],
                         ids=["double-press", "other-amount"])
async def test_a_second_call_under_a_service_id_still_waited_on_is_refused_unsent(
        tmp_path, mosquitto, second_amount, second_order):
    async with running_bridge(tmp_path, mosquitto), \
            Subscriber(mosquitto, [f"{BASE}/#"]) as sub, \
            RegisterClient(mosquitto.host, mosquitto.port, "TILL9", base_topic=BASE) as till:
        first = asyncio.create_task(till.pay(POI, 5.0, service_id="S1", transaction_id="T1",
                                             timeout=8))
        await _published(sub, "S1")
        with pytest.raises(ValueError, match="already waiting for the answer .* ServiceID 'S1'"):
            await till.pay(POI, second_amount, service_id="S1", transaction_id=second_order,
                           timeout=8)
        answer = await first  # its own result, not a time-out
        assert answer["bridge"]["outcome"] == "approved"
        assert _authorised(answer) == 5.0
        await sub.wait_for(_is_response("S1"))
        # the refused call sent nothing: the bridge saw one request under S1
        assert len(_requests_under(sub, "S1")) == 1


async def test_another_request_reusing_a_timed_out_ones_service_id_gets_its_refusal(
        tmp_path, mosquitto):
    """The bridge was away: the till's 5.00 timed out (queued in the bridge's session), then
    the till sent 50.00 under the same ServiceID. When the bridge comes back it runs the 5.00
    (`accepted`, approved) and refuses the 50.00 (`conflict`): the 50.00 call must get that
    refusal, never the 5.00 approval."""
    async with running_bridge(tmp_path, mosquitto):
        pass  # the bridge's persistent session now queues what comes while it is away
    async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub, \
            RegisterClient(mosquitto.host, mosquitto.port, "TILL9", base_topic=BASE) as till:
        with pytest.raises(TimeoutError):
            await till.pay(POI, 5.0, service_id="S3", transaction_id="T5", timeout=0.5)
        other = asyncio.create_task(till.pay(POI, 50.0, service_id="S3", transaction_id="T50",
                                              timeout=20))
        await sub.wait_for(lambda t, p: len(_requests_under(sub, "S3")) == 2)
        async with running_bridge(tmp_path, mosquitto):
            answer = await other
            # the 5.00 itself ran and was approved: that is not the 50.00's answer
            await sub.wait_for(lambda t, p: _is_response("S3")(t, p)
                               and p["bridge"]["outcome"] == "approved")
        assert answer["bridge"]["outcome"] == "rejected", answer["bridge"]
        assert answer["bridge"]["conflict"]["state"] in ("in_progress", "final")


async def test_another_request_after_a_redelivered_copy_of_an_answered_one_gets_its_refusal(
        tmp_path, mosquitto):
    """The till's 5.00 under S4 was answered. While the bridge is away the broker holds a
    copy of that request (QoS 1 delivers at least once), and the till sends 50.00 under S4.
    The bridge answers the copy from its journal (approved, then `duplicate`) and refuses the
    50.00 (`conflict`): the 50.00 call must get the refusal, not the copy's approval."""
    async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub, \
            RegisterClient(mosquitto.host, mosquitto.port, "TILL9", base_topic=BASE) as till:
        async with running_bridge(tmp_path, mosquitto):
            paid = await till.pay(POI, 5.0, service_id="S4", transaction_id="T5", timeout=8)
            assert paid["bridge"]["outcome"] == "approved"
        [sent] = _requests_under(sub, "S4")
        await sub.publish(REQUESTS, sent)  # the same request again, as a redelivery
        other = asyncio.create_task(till.pay(POI, 50.0, service_id="S4", transaction_id="T50",
                                              timeout=20))
        await sub.wait_for(lambda t, p: len(_requests_under(sub, "S4")) == 3)
        async with running_bridge(tmp_path, mosquitto):
            answer = await other
        assert answer["bridge"]["outcome"] == "rejected", answer["bridge"]
        assert answer["bridge"]["conflict"] == {"state": "final", "outcome": "approved"}


async def test_a_corrected_request_after_a_refusal_that_left_nothing_gets_its_own_result(
        tmp_path, mosquitto):
    """A request the bridge refused before taking it (a currency written `eur`) leaves
    nothing under its IDs: the till may send the corrected request under the same ServiceID,
    the bridge runs it, and its result is the call's answer (not waited out as another's)."""
    async with running_bridge(tmp_path, mosquitto), \
            RegisterClient(mosquitto.host, mosquitto.port, "TILL9", base_topic=BASE) as till:
        refused = await till.pay(POI, 5.0, "eur", service_id="S5", timeout=8)
        assert refused["bridge"]["outcome"] == "rejected"
        assert "conflict" not in refused["bridge"]
        answer = await till.pay(POI, 5.0, "EUR", service_id="S5", timeout=8)
        assert answer["bridge"]["outcome"] == "approved", answer["bridge"]
        assert _authorised(answer) == 5.0


async def test_another_request_after_a_journal_answered_repeat_gets_its_refusal(
        tmp_path, mosquitto):
    """The till restarted after its 5.00 under S6 was approved, and sent the 5.00 again: the
    bridge answers that repeat from its journal BEFORE its `duplicate` event. That answer is
    the journal's, not a refusal that left nothing under S6: the client must still know it
    sent the 5.00 under S6, so that a 50.00 under S6 (while a redelivered copy of the 5.00 is
    answered from the journal again) takes only its own conflict refusal, never the 5.00
    approval."""
    async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
        async with running_bridge(tmp_path, mosquitto), \
                RegisterClient(mosquitto.host, mosquitto.port, "TILL9",
                               base_topic=BASE) as before_restart:
            paid = await before_restart.pay(POI, 5.0, service_id="S6", transaction_id="T5",
                                            timeout=8)
            assert paid["bridge"]["outcome"] == "approved"
        async with RegisterClient(mosquitto.host, mosquitto.port, "TILL9",
                                  base_topic=BASE) as till:
            async with running_bridge(tmp_path, mosquitto):
                repeat = await till.pay(POI, 5.0, service_id="S6", transaction_id="T5",
                                        timeout=8)
                assert repeat["bridge"]["source"] == "journal", repeat["bridge"]
                [sent, _] = _requests_under(sub, "S6")
                await sub.wait_for(lambda t, p: t.endswith("/event")
                                   and p["event"] == "duplicate")
            await sub.publish(REQUESTS, sent)  # the same request again, as a redelivery
            other = asyncio.create_task(till.pay(POI, 50.0, service_id="S6",
                                                  transaction_id="T50", timeout=20))
            await sub.wait_for(lambda t, p: len(_requests_under(sub, "S6")) == 4)
            async with running_bridge(tmp_path, mosquitto):
                answer = await other
        assert answer["bridge"]["outcome"] == "rejected", answer["bridge"]
        assert answer["bridge"]["conflict"] == {"state": "final", "outcome": "approved"}

"""A different request reusing a transaction's SaleID and ServiceID is refused under those
IDs: the refusal must never read as that transaction's result (a register that took it for
one would record "not charged" and charge again)."""

from __future__ import annotations

import asyncio

from bridge.register_client import RegisterClient
from bridge.simulator import responses
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .rig import POI, Subscriber
from .test_daemon_mqtt import BASE, Store, request_topic


def _is_event(event: str, service_id: str):
    def predicate(topic: str, payload) -> bool:
        return (topic.endswith("/event") and payload.get("event") == event
                and payload["transaction"]["service_id"] == service_id)
    return predicate


def _conflict_refusal(topic: str, payload) -> bool:
    return topic.endswith("/response") and "conflict" in (payload.get("bridge") or {})


async def test_a_conflict_refusal_is_marked_and_the_register_waits_for_its_own_result(
        tmp_path, mosquitto):
    scenario = Scenario(poi_id=POI, default=Behaviour(delay=0.05),
                        transactions=[Behaviour(amount=33.0, delay=1.5)],
                        link=LinkBehaviour(status_hold=0.05))
    async with Store(tmp_path, mosquitto, scenario, payment_timeout=8), \
            Subscriber(mosquitto, [f"{BASE}/#"]) as sub, \
            RegisterClient(mosquitto.host, mosquitto.port, "POS1", base_topic=BASE,
                           persistent=False) as till:
        paying = asyncio.create_task(till.pay(POI, 33.0, service_id="Q1", timeout=30))
        await sub.wait_for(_is_event("accepted", "Q1"))
        # while Q1 runs, another request under the same IDs (another amount)
        await sub.publish(request_topic(), responses.payment_request("POS1", "Q1", POI, 34.0))
        refusal = await sub.wait_for(_conflict_refusal)
        bridge = refusal["bridge"]
        assert bridge["outcome"] == "rejected"
        assert bridge["transaction"]["service_id"] == "Q1"
        assert bridge["conflict"] == {"state": "in_progress", "outcome": None}
        # the register whose payment Q1 is gets its payment's own result, not the refusal
        result = await paying
        assert result["bridge"]["outcome"] == "approved", result
        assert "conflict" not in result["bridge"]
        # the retained document is Q1's own, never the refusal
        document = f"{BASE}/transactions/POS1/Q1"
        await sub.wait_for(lambda t, p: t == document and p["bridge"]["outcome"] == "approved")
        retained = [p for t, p, r in sub.messages if t == document]
        assert all(p["bridge"]["outcome"] != "rejected" and "conflict" not in p["bridge"]
                   for p in retained)

        # A register that itself sends the different request gets the refusal as its answer
        # (the bridge did not take its request), naming what stands under the IDs
        answer = await till.pay(POI, 35.0, service_id="Q1", timeout=10)
        assert answer["bridge"]["outcome"] == "rejected"
        assert answer["bridge"]["conflict"] == {"state": "final", "outcome": "approved"}
        assert answer["SaleToPOIResponse"]["PaymentResponse"]["Response"][
            "ErrorCondition"] == "NotAllowed"

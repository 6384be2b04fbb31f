"""A refusal published under a recorded transaction's SaleID and ServiceID, of another request
reusing them, must not read as that transaction's result: the README's `bridge.conflict`.
The intake flagged it only when the journal lookup found the reuse; a request refused
earlier, for what it is (malformed, another terminal's POIID in its header), went out
under the same IDs unflagged, and a register waiting for the running payment took that
`rejected` for its answer while the terminal charged (review rv25)."""

from __future__ import annotations

import asyncio
import json
import time

from bridge.protocol.transaction import Transaction, TxState, request_digest
from bridge.register_client import RegisterClient
from bridge.simulator import responses
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .rig import POI, Subscriber
from .test_daemon_mqtt import BASE, Store, request_topic
from .test_intake_fuzz import POI as RIG_POI
from .test_intake_fuzz import Rig


def test_a_request_refused_for_what_it_is_under_recorded_ids_carries_conflict(tmp_path):
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        recorded = responses.payment_request("POS1", "Q1", RIG_POI, 33.0)
        rig.journal.save(Transaction(
            sale_id="POS1", service_id="Q1", poi_id=RIG_POI, category="Payment",
            request=recorded, digest=request_digest(recorded), created_at=time.time(),
            updated_at=time.time(), state=TxState.AWAITING_RESPONSE))
        other = responses.payment_request("POS1", "Q1", "V400m-999", 34.0)  # not the topic's
        published = rig.handle(f"poi-bridge/terminals/{RIG_POI}/request/POS1",
                               json.dumps(other).encode())
        (answer,) = [json.loads(m.payload) for m in published if m.topic.endswith("/response")]
        assert answer["bridge"]["outcome"] == "rejected"
        assert answer["bridge"]["conflict"] == {"state": "in_progress", "outcome": None}
        # and one under IDs nothing is recorded under is the request's own answer
        fresh = responses.payment_request("POS1", "Q2", "V400m-999", 34.0)
        published = rig.handle(f"poi-bridge/terminals/{RIG_POI}/request/POS1",
                               json.dumps(fresh).encode())
        (answer,) = [json.loads(m.payload) for m in published if m.topic.endswith("/response")]
        assert answer["bridge"]["outcome"] == "rejected" and "conflict" not in answer["bridge"]
    finally:
        rig.journal.close()


def _accepted(service_id: str):
    def predicate(topic, payload) -> bool:
        return (topic.endswith("/event") and isinstance(payload, dict)
                and payload.get("event") == "accepted"
                and payload.get("transaction", {}).get("service_id") == service_id)
    return predicate


async def test_a_register_waiting_for_its_payment_is_not_told_another_requests_refusal(
        tmp_path, mosquitto):
    scenario = Scenario(poi_id=POI, default=Behaviour(delay=0.05),
                        transactions=[Behaviour(amount=33.0, delay=1.5)],
                        link=LinkBehaviour(status_hold=0.05))
    async with Store(tmp_path, mosquitto, scenario, payment_timeout=8), \
            Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub, \
            RegisterClient(mosquitto.host, mosquitto.port, "POS1", base_topic=BASE,
                           persistent=False) as till:
        paying = asyncio.create_task(till.pay(POI, 33.0, service_id="Q1", timeout=30))
        await sub.wait_for(_accepted("Q1"))
        other = responses.payment_request("POS1", "Q1", "V400m-999", 34.0)
        await sub.publish(request_topic(), other)  # its header's POIID is not the topic's
        result = await paying
        assert result["bridge"]["outcome"] == "approved", result["bridge"]

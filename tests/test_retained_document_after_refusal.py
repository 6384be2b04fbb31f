"""A request refused after its `accepted` event (over max_frame_size here; also a terminal
whose identity check fails twice, a wrong device on the link, a link lost while it was held)
had its retained transactions/{SaleID}/{ServiceID} document left saying `in_progress` for
48 h. That document is the README's "latest state and result of a transaction", and what a
register whose session the broker lost reads instead of its response: it waited for ever.
The refusal's final document replaces it, and it is what the bridge publishes again from its
journal for a broker that lost its state (review rv2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.simulator import responses
from tests.broker import Mosquitto

from .follow_rig import A, BASE, bridge_on, simulator, wait_until
from .rig import Subscriber, outcome_for
from .test_broker_lost_state import SLOW_SAVE

TILL = "TILL1"
FRAMER = {"max_frame_size": 4096}
pytestmark = pytest.mark.usefixtures("small_frames")  # (conftest: under the configured floor)


def too_big(service_id: str) -> dict[str, Any]:
    """A payment over the terminal's max_frame_size: accepted, then refused unsent."""
    doc = responses.payment_request(TILL, service_id, A, 12.5)
    doc["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleReferenceID"] = "x" * 5000
    return doc


async def refuse_after_accepted(bridge: Any, broker: Any, service_id: str) -> None:
    async with Subscriber(broker, [f"{BASE}/registers/#"]) as sub:
        assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 15)
        await sub.publish(f"{BASE}/terminals/{A}/request/{TILL}", too_big(service_id))
        await sub.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "accepted"
                           and p["transaction"]["service_id"] == service_id, timeout=20)
        answer = await sub.wait_for(outcome_for(service_id), timeout=20)
        assert answer["bridge"]["outcome"] == "rejected"
        # everything the bridge published has reached the broker
        assert await wait_until(lambda: bridge.journal.counts()["undelivered"] == 0, 10)


async def downloaded(broker: Any, service_id: str) -> Any:
    """What a register that lost the response reads: the retained document."""
    async with Subscriber(broker, [f"{BASE}/transactions/{TILL}/{service_id}"],
                          client_id="download") as late:
        return await late.wait_for(lambda t, p: True, timeout=5)


def assert_final_refusal(doc: Any) -> None:
    assert doc["state"] == "final", doc
    assert doc["bridge"]["outcome"] == "rejected", doc
    assert "max_frame_size" in doc["bridge"]["error"], doc
    body = doc["SaleToPOIResponse"]["PaymentResponse"]["Response"]
    assert (body["Result"], body["ErrorCondition"]) == ("Failure", "MessageFormat"), doc


async def test_a_request_refused_after_accepted_leaves_a_final_retained_document(
        tmp_path: Path, mosquitto: Any) -> None:
    sim = simulator(A)
    try:
        link = await sim.start_pty(tmp_path / "port")
        async with bridge_on(tmp_path, mosquitto, {A: link}, framer=FRAMER) as bridge:
            await refuse_after_accepted(bridge, mosquitto, "B1")
        assert_final_refusal(await downloaded(mosquitto, "B1"))
    finally:
        await sim.close()


async def test_a_broker_that_lost_its_state_gets_the_refusal_as_the_document(
        tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", extra_config=SLOW_SAVE).start()
    sim = simulator(A)
    try:
        link = await sim.start_pty(tmp_path / "port")
        async with bridge_on(tmp_path, broker, {A: link}, framer=FRAMER) as bridge:
            await refuse_after_accepted(bridge, broker, "B2")
        broker.kill()  # a power cut before it saved: the retained documents are gone
        broker.start()
        async with bridge_on(tmp_path, broker, {A: link}, framer=FRAMER) as bridge:
            assert await wait_until(lambda: bridge.gateway.lost_state == 1, 15)
            assert await wait_until(lambda: bridge.journal.counts()["undelivered"] == 0, 15)
            assert_final_refusal(await downloaded(broker, "B2"))
    finally:
        await sim.close()
        broker.kill()

"""A Payment with an empty SaleTransactionID.TransactionID went to the terminal: the bridge
tells a register's retry of a payment whose outcome is unknown by it (refused: the sale could
be charged twice), and without one such a retry went out. It is refused at once, naming the
field, as a payment without SaleTransactionID already was (for its TimeStamp)."""

from __future__ import annotations

from bridge.simulator import responses

from .follow_rig import A, BASE, bridge_on, simulator, wait_until
from .rig import Subscriber, outcome_for

TILL = "TILL1"


def without_sale_transaction_id(service_id: str, transaction_id: str | None) -> dict:
    document = responses.payment_request(TILL, service_id, A, 5.0)
    sale_data = document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]
    if transaction_id is None:
        del sale_data["SaleTransactionID"]
    else:
        sale_data["SaleTransactionID"]["TransactionID"] = transaction_id
    return document


async def test_a_payment_that_names_no_sale_is_refused_naming_the_field(tmp_path, mosquitto):
    sim = simulator(A)
    try:
        link = await sim.start_pty(tmp_path / "port")
        async with bridge_on(tmp_path, mosquitto, {A: link}) as bridge, \
                Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
            assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 15)
            topic = f"{BASE}/terminals/{A}/request/{TILL}"
            for service_id, transaction_id, field in (
                    ("N1", None, "SaleTransactionID.TimeStamp is missing"),  # (as before)
                    ("N2", "", "SaleTransactionID.TransactionID is empty"),
                    ("N3", "   ", "SaleTransactionID.TransactionID is empty")):
                await sub.publish(topic, without_sale_transaction_id(service_id, transaction_id))
                answer = await sub.wait_for(outcome_for(service_id), timeout=15)
                info = answer["bridge"]
                assert (info["outcome"], info["source"]) == ("rejected", "bridge"), answer
                assert field in info["error"], info
                assert answer["SaleToPOIResponse"]["PaymentResponse"]["Response"][
                    "ErrorCondition"] == "MessageFormat"
            await sub.publish(topic, responses.payment_request(TILL, "N9", A, 5.0))
            ok = await sub.wait_for(outcome_for("N9"), timeout=15)
            assert ok["bridge"]["outcome"] == "approved", ok
        assert [service for (_, service) in sim.terminal.ledger] == ["N9"]
    finally:
        await sim.close()

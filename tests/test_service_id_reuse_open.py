"""A ServiceID reused after 48 hours while the journal still holds a payment under it open
(unresolved; one given up on stays open for ever) replaced that payment's record: the
payment the terminal may have charged was forgotten, never asked about again (found by a
review). The new request is refused as a conflict, saying the earlier one is still open."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge.protocol.transaction import SERVICE_ID_REUSE_WINDOW, TxKey

from .follow_rig import A, B, BASE, bridge_on
from .rig import Subscriber
from .test_unresolved_retry import FAST, TILL, Till, order, ready, terminals


async def test_a_service_id_reused_after_48_h_does_not_replace_an_open_payment(
        tmp_path: Path, mosquitto: Any) -> None:
    async with terminals(tmp_path) as (sim_a, sim_b, links):
        async with Subscriber(mosquitto, [f"{BASE}/registers/{TILL}/#"]) as sub:
            till = Till(sub)
            async with bridge_on(tmp_path, mosquitto, links, **FAST) as bridge:
                await ready(bridge)
                await till.answer(A, order("U1", A), "unresolved")
                key = TxKey(TILL, "U1")
                assert bridge.journal.get(key).state == "unresolved"
                # 48 hours and a bit pass (the payment is still unresolved: with the default
                # reconcile_deadline it is abandoned after 24 h and stays open for ever)
                bridge.journal.commit()
                bridge.journal._db.execute(
                    "UPDATE transactions SET created_at = created_at - ? WHERE service_id = 'U1'",
                    (SERVICE_ID_REUSE_WINDOW + 60,))
                # The register's ServiceID counter comes round to U1 again: another sale
                new = order("U1", B, amount=7.0, transaction_id="order-2")
                refused = await till.answer(B, new)
                info = refused["bridge"]
                assert (info["outcome"], info["source"]) == ("rejected", "bridge"), refused
                assert "still open" in info["error"] and "new ServiceID" in info["error"], info
                # The earlier payment, which terminal A may have charged, must still be known
                # to the bridge (open, asked about), whatever happened to the new one
                still_open = [t for t in bridge.journal.open_transactions(A)
                              if t.service_id == "U1"]
                row = bridge.journal.get(key)
                assert still_open, (
                    "the unresolved 12.5 EUR payment on terminal A was replaced in the journal "
                    f"by the new request: now {row.poi_id} {row.state} {row.outcome} "
                    f"{row.request['SaleToPOIRequest']['PaymentRequest']['PaymentTransaction']}")

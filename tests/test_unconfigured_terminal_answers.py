"""A terminal removed from the configuration (or its poi_id renamed) while one of its
payments is open in the journal: recover() logs it, but nothing asks that terminal any more.
A register's retry of the sale was refused saying the bridge was asking the terminal, a
repeat of the request got only a `duplicate` event whose result never came (or, unresolved,
"the bridge keeps asking"), and a status request was sent to a terminal the bridge refuses
as unknown. Each answer now says the terminal is no longer configured, and to add it back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bridge.daemon.journal import Journal
from bridge.protocol import builders
from bridge.protocol.transaction import Transaction, TxState, request_digest

from .follow_rig import A, B, BASE, bridge_on
from .rig import Subscriber, outcome_for
from .test_unresolved_retry import FAST, TILL, Till, order, ready, terminal

GONE = "no longer in this bridge's configuration"


def journaled(path: Path, document: dict[str, Any], state: TxState, **more: Any) -> None:
    """A payment the previous run sent to terminal A, open when it stopped."""
    header = document["SaleToPOIRequest"]["MessageHeader"]
    sent = time.time() - 30.0
    journal = Journal(path)
    journal.save(Transaction(
        sale_id=TILL, service_id=header["ServiceID"], poi_id=A, category="Payment",
        request=document, digest=request_digest(document), created_at=sent, updated_at=sent,
        sent_at=sent, state=state, **more))
    journal.close()


async def test_answers_about_a_payment_of_a_terminal_no_longer_configured_say_so(
        tmp_path: Path, mosquitto: Any) -> None:
    polled = order("U1", A)
    unresolved = order("U2", A, transaction_id="order-2")
    journaled(tmp_path / "journal.sqlite3", polled, TxState.POLLING)
    journaled(tmp_path / "journal.sqlite3", unresolved, TxState.UNRESOLVED,
              outcome="unresolved", detail="no answer from the terminal")
    sim_b = terminal(B)
    try:
        links = {B: await sim_b.start_pty(tmp_path / "port-b")}  # A is not configured
        async with Subscriber(mosquitto, [f"{BASE}/registers/{TILL}/#"]) as sub, \
                bridge_on(tmp_path, mosquitto, links, **FAST) as bridge:
            till = Till(sub)
            await ready(bridge)
            # The cashier presses "pay" again, on the lane whose terminal is configured
            refused = await till.answer(B, order("R1", B))
            info = refused["bridge"]
            assert (info["outcome"], info["source"]) == ("rejected", "bridge"), refused
            error = info["error"]
            assert f"ServiceID U1 to terminal {A}" in error, error
            assert f"{GONE}" in error and f"terminal {A} is added back" in error, error
            assert "asking the terminal" not in error and "Wait for" not in error, error
            assert "do not charge this sale again" in error and "new TransactionID" in error

            # A repeat of the polled payment: the `duplicate` event says no result will come
            await sub.publish(f"{BASE}/terminals/{A}/request/{TILL}", polled)
            event = await sub.wait_for(lambda t, p: t.endswith("/event")
                                       and p.get("event") == "duplicate", timeout=15)
            assert GONE in str(event), event

            # A repeat of the unresolved one: its stored result, without "keeps asking"
            again = await till.answer(A, unresolved, "unresolved")
            error = again["bridge"]["error"]
            assert GONE in error and "keeps asking" not in error, error
            assert "do not charge this sale again" in error, error

            # A status request about U1, sent to terminal B: not "send it to terminal A"
            ask = builders.status_request(sale_id=TILL, service_id="Q1", poi_id=B,
                                          original_service_id="U1",
                                          original_category="Payment")
            await sub.publish(f"{BASE}/terminals/{B}/request/{TILL}", ask)
            told = await sub.wait_for(outcome_for("Q1"), timeout=15)
            error = told["bridge"]["error"]
            assert GONE in error and "send the status request" not in error, error
    finally:
        await sim_b.close()

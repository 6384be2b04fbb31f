"""A register told `unresolved` (the terminal may or may not have charged the shopper) whose
cashier presses "pay" again sends the same order (SaleID, SaleTransactionID.TransactionID,
amount, currency) under a new ServiceID. The bridge sent it to the terminal: a second charge
if the first went through. It is refused now, on any terminal, while the first is open
(unresolved, given up on, or still awaiting its answer or polled), and the refusal names the
first and what to do; the journal decides, across a restart. A different amount (split
tender), a new TransactionID (the cashier knows it was not charged), a repeat of the first
request, another category, and anything after the first ended final still go through."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bridge.daemon.journal import Journal
from bridge.protocol.transaction import TxState
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .follow_rig import A, B, BASE, bridge_on, wait_until
from .rig import Subscriber, outcome_for

TILL = "TILL1"
# A payment unresolved within a second or two: no answer, status polls answered InProgress
# until in_progress_limit; asked again in the background only after a minute
FAST = {"payment_timeout": 0.5, "status_timeout": 0.3, "resync_attempts": 1,
        "poll_floor": 0.05, "in_progress_limit": 1.0, "reconcile_initial": 60}
HUNG = Behaviour(never_answer=True, in_progress_polls=10**6, delay=0.05)


def terminal(poi_id: str, *hung: str) -> SimulatorServer:
    """A simulated terminal that approves, but leaves the payments `hung` (by ServiceID)
    unanswered, and its status polls about them InProgress."""
    script = [HUNG.model_copy(update={"service_id": service_id}) for service_id in hung]
    return SimulatorServer(Scenario(poi_id=poi_id, default=Behaviour(delay=0.05),
                                    transactions=script,
                                    link=LinkBehaviour(status_hold=0.05)), "stx-etx-lrc")


@contextlib.asynccontextmanager
async def terminals(work: Path) -> AsyncIterator[tuple[SimulatorServer, SimulatorServer,
                                                      dict[str, str]]]:
    """Terminal A, which leaves payment U1 hung, and terminal B, and their links."""
    sim_a, sim_b = terminal(A, "U1"), terminal(B)
    try:
        links = {A: await sim_a.start_pty(work / "port-a"),
                 B: await sim_b.start_pty(work / "port-b")}
        yield sim_a, sim_b, links
    finally:
        await sim_a.close()
        await sim_b.close()


def order(service_id: str, poi_id: str, amount: float = 12.5, transaction_id: str = "order-1",
          currency: str = "EUR") -> dict[str, Any]:
    document = responses.payment_request(TILL, service_id, poi_id, amount, currency)
    body = document["SaleToPOIRequest"]["PaymentRequest"]
    body["SaleData"]["SaleTransactionID"]["TransactionID"] = transaction_id
    return document


def charged(sim: SimulatorServer) -> list[str]:
    """The ServiceIDs of the payments the simulated terminal received."""
    return [service for (_, service), e in sim.terminal.ledger.items() if e.category == "Payment"]


class Till:
    """The register's side: publishes requests, reads its response and event topics."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub

    async def send(self, poi_id: str, document: dict[str, Any]) -> None:
        await self.sub.publish(f"{BASE}/terminals/{poi_id}/request/{TILL}", document)

    async def answer(self, poi_id: str, document: dict[str, Any], outcome: str | None = None,
                     timeout: float = 15) -> dict[str, Any]:
        """The first answer to `document` published after it was sent."""
        before = {id(payload) for _, payload, _ in self.sub.messages}
        await self.send(poi_id, document)
        wanted = outcome_for(document["SaleToPOIRequest"]["MessageHeader"]["ServiceID"], outcome)
        return await self.sub.wait_for(lambda t, p: id(p) not in before and wanted(t, p),
                                       timeout=timeout)


async def ready(bridge: Any) -> None:
    assert await wait_until(lambda: all(w.identity == "confirmed"
                                        for w in bridge.workers.values()), timeout=15)


def assert_refused_for(answer: dict[str, Any], earlier: str, poi_id: str) -> None:
    """A refusal of a retry of payment `earlier`, open on terminal `poi_id`: in the refusal
    shape, naming the earlier payment, what may have happened, and what to do."""
    info = answer["bridge"]
    assert (info["outcome"], info["source"]) == ("rejected", "bridge"), answer
    error = info["error"]
    assert f"ServiceID {earlier} to terminal {poi_id}" in error, error
    assert "may have charged it" in error and "do not charge this sale again" in error, error
    assert "TransactionStatusRequest" in error and "receipt" in error, error
    assert "new TransactionID" in error, error
    said = answer["SaleToPOIResponse"]["PaymentResponse"]["Response"]
    assert (said["Result"], said["ErrorCondition"]) == ("Failure", "NotAllowed"), answer
    assert said["AdditionalResponse"] == error


async def test_a_retry_of_an_unresolved_payment_is_refused_on_any_terminal_until_it_ends(
        tmp_path: Path, mosquitto: Any) -> None:
    async with terminals(tmp_path) as (sim_a, sim_b, links):
        async with Subscriber(mosquitto, [f"{BASE}/registers/{TILL}/#"]) as sub:
            till = Till(sub)
            async with bridge_on(tmp_path, mosquitto, links, **FAST) as bridge:
                await ready(bridge)
                first = order("U1", A)
                told = await till.answer(A, first, "unresolved")

                # The cashier presses "pay" again: on the same terminal, on the next lane's
                assert_refused_for(await till.answer(A, order("R1", A)), "U1", A)
                assert_refused_for(await till.answer(B, order("R2", B)), "U1", A)
                # the currency as another register writes it is the same currency
                assert_refused_for(await till.answer(B, order("R3", B, currency="eur")),
                                   "U1", A)

                # An identical repeat of the first request: answered as before, from the journal
                repeat = await till.answer(A, first)
                assert (repeat["bridge"]["outcome"], repeat["bridge"]["source"]) == (
                    "unresolved", "journal"), repeat

                # A second card for part of the order (split tender), and the override
                split = await till.answer(B, order("S1", B, amount=5.0), "approved")
                assert split["bridge"]["source"] == "terminal"
                await till.answer(B, order("N1", B, transaction_id="order-1b"), "approved")
                # Another category, even one carrying the same TransactionID
                reversal = responses.payment_request(TILL, "V1", B, 12.5, category="Reversal")
                reversal["SaleToPOIRequest"]["ReversalRequest"]["SaleData"] = {
                    # (now: a Reversal's stamp is held to the 300-s rule too)
                    "SaleTransactionID": {"TransactionID": "order-1",
                                          "TimeStamp": dt.datetime.now(dt.UTC).isoformat()}}
                assert (await till.answer(B, reversal))["bridge"]["outcome"] != "rejected"
                # Another register's order of the same TransactionID is its own
                other = order("O1", B)
                other["SaleToPOIRequest"]["MessageHeader"]["SaleID"] = "TILL2"
                await sub.publish(f"{BASE}/terminals/{B}/request/TILL2", other)
                assert await wait_until(lambda: "O1" in charged(sim_b), timeout=15)

            # The daemon restarts: the journal still holds the payment open
            async with bridge_on(tmp_path, mosquitto, links, **FAST) as bridge:
                await ready(bridge)
                retry = order("R4", B)
                assert_refused_for(await till.answer(B, retry), "U1", A)

                # The terminal's record of it comes back (approved): the order is paid, and
                # another payment of it (a second card after an approval) is no retry
                sim_a.terminal.ledger[(TILL, "U1")].behaviour = Behaviour(never_answer=True)
                await sub.publish(f"{BASE}/bridge/request/resync",
                                  {"sale_id": TILL, "service_id": "U1", "transaction": "t1"})
                await sub.wait_for(outcome_for("U1", "approved"), timeout=15)
                await till.answer(B, order("A1", B), "approved")
                # a copy of the refused retry, delivered again, is still refused: it never
                # runs after the register was told rejected
                again = await till.answer(B, retry)
                assert (again["bridge"]["outcome"], again["bridge"]["source"]) == (
                    "rejected", "journal"), again
        assert charged(sim_a) == ["U1"]
        assert sorted(charged(sim_b)) == ["A1", "N1", "O1", "S1"]
    # the unresolved report said not to charge the sale again, and how to know
    error = told["bridge"]["error"]
    assert "do not charge this sale again until the result is known" in error, error
    assert "TransactionStatusRequest" in error and "ServiceID U1" in error, error
    assert "receipt" in error, error


async def test_a_retry_of_a_payment_given_up_on_is_refused_saying_the_bridge_stopped_asking(
        tmp_path: Path, mosquitto: Any) -> None:
    async with terminals(tmp_path) as (sim_a, sim_b, links):
        async with Subscriber(mosquitto, [f"{BASE}/registers/{TILL}/#"]) as sub, \
                bridge_on(tmp_path, mosquitto, links,
                          **{**FAST, "reconcile_initial": 0.2, "reconcile_max_interval": 0.3,
                             "reconcile_deadline": 2.0}) as bridge:
            till = Till(sub)
            await ready(bridge)
            await till.answer(A, order("U1", A), "unresolved")
            await sub.wait_for(lambda t, p: t.endswith("/event")
                               and p["event"] == "reconcile_abandoned", timeout=20)
            refused = await till.answer(B, order("R1", B))
            assert_refused_for(refused, "U1", A)
            assert "stopped asking" in refused["bridge"]["error"], refused
            # still open, for good: the split tender goes on
            await till.answer(B, order("S1", B, amount=2.5), "approved")
        assert charged(sim_b) == ["S1"]


async def test_a_retry_on_another_terminal_of_a_payment_awaiting_its_answer_or_polled_is_refused(
        tmp_path: Path, mosquitto: Any) -> None:
    """On its own terminal such a retry was refused Busy; on the next lane's it was sent."""
    for state, settings in ((TxState.AWAITING_RESPONSE, {"payment_timeout": 30}),
                            (TxState.POLLING, {"payment_timeout": 0.3, "poll_floor": 0.05,
                                               "in_progress_limit": 30})):
        work = tmp_path / state
        work.mkdir()
        async with terminals(work) as (_, sim_b, links):
            async with Subscriber(mosquitto, [f"{BASE}/registers/{TILL}/#"]) as sub, \
                    bridge_on(work, mosquitto, links, **settings) as bridge:
                till = Till(sub)
                await ready(bridge)
                await till.send(A, order("U1", A))
                assert await wait_until(lambda: [t.state for t in bridge.journal.open_transactions(
                    A)] == [state], timeout=10), state
                assert_refused_for(await till.answer(B, order("R1", B)), "U1", A)
                await till.answer(B, order("S1", B, amount=1.0), "approved")
            assert charged(sim_b) == ["S1"], state


def test_an_older_journal_gains_the_index_the_lookup_uses(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    with sqlite3.connect(path) as db:  # as a journal of a bridge before it
        db.execute("DROP INDEX transactions_open_sale")
    journal = Journal(path)
    try:
        plan = journal._db.execute(
            "EXPLAIN QUERY PLAN SELECT sale_id FROM transactions WHERE sale_id = 'T' "
            "AND state != 'final'").fetchall()
        assert "transactions_open_sale" in str(plan), plan
        assert journal.open_payments("T", "order-1") == []
    finally:
        journal.close()

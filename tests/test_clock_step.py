"""The system clock stepped while the daemon runs (NTP setting a store box that booted
without a battery-backed clock): the daemon's own clock, the journal's times of the run and
the sessions' follow the step together, so nothing journaled looks days older (or newer)
than it is at the next start. Real journal, real broker, the simulated terminal on a pty."""

from __future__ import annotations

import asyncio
import json
import time

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.daemon.journal import Journal
from bridge.daemon.worker import SteadyClock
from bridge.protocol.transaction import Transaction, TxKey, TxState, request_digest
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, Scenario

from .rig import POI, Subscriber, outcome_for

DAYS = 3 * 86400.0
BASE = "poi-bridge"


class Wall:
    """A system clock that a test can step."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


async def online(bridge: Bridge) -> None:
    async with asyncio.timeout(15):
        while not (bridge.gateway.connected and bridge.workers[POI].online
                   and bridge.workers[POI].identity != "unknown"):
            await asyncio.sleep(0.05)


async def test_a_payment_made_before_the_clock_was_set_is_still_known_after_a_restart(
        tmp_path, mosquitto):
    """The daemon started with the clock 3 days behind; NTP set it; Q1 was approved before
    and Q2 after. Its steady clock kept the wrong time, so both were journaled 3 days old:
    the next start pruned them, and a register's retry of Q1 was sent to the terminal again.
    Now the daemon follows the step, and the retries are answered from the journal."""
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05)),
                                ack_timeout=0.3)
    device = await simulator.start_pty(tmp_path / "terminal")
    config = parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "base_topic": BASE},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device}}]})
    request_topic = f"{BASE}/terminals/{POI}/request/TILL1"
    wall = Wall(-DAYS)
    try:
        async with Subscriber(mosquitto, [f"{BASE}/registers/TILL1/#"]) as till:
            bridge = Bridge(config, hotplug=False, wall=wall)
            await bridge.start()
            try:
                await online(bridge)
                sent = {}
                for service_id in ("Q1", "Q2"):
                    sent[service_id] = responses.payment_request("TILL1", service_id, POI, 5.0,
                                                                 now=wall())
                    await till.publish(request_topic, sent[service_id])
                    await till.wait_for(outcome_for(service_id, "approved"), timeout=15)
                    if service_id == "Q1":
                        wall.offset = 0.0  # NTP steps the clock 3 days forward
                        assert round(bridge.follow_clock_step()) == round(DAYS)
                assert bridge.follow_clock_step() == 0.0  # once followed, no step is left
            finally:
                await bridge.stop()
            restarted = Bridge(config, hotplug=False)  # prunes what looks 48 h old
            await restarted.start()
            try:
                await online(restarted)
                for service_id in ("Q1", "Q2"):
                    stored = restarted.journal.get(TxKey("TILL1", service_id))
                    assert stored is not None, service_id
                    assert abs(stored.created_at - time.time()) < 120, stored.created_at
                    retry = json.loads(json.dumps(sent[service_id]))
                    retry["SaleToPOIRequest"]["PaymentRequest"]["SaleData"][
                        "SaleTransactionID"]["TimeStamp"] = responses.payment_request(
                        "TILL1", service_id, POI)["SaleToPOIRequest"]["PaymentRequest"][
                        "SaleData"]["SaleTransactionID"]["TimeStamp"]
                    till.messages.clear()  # what the first run published is not the answer
                    await till.publish(request_topic, retry)
                    await till.wait_for(lambda t, p, s=service_id: t.endswith("/event")
                                        and p["event"] == "duplicate"
                                        and p["transaction"]["service_id"] == s, timeout=15)
                    answer = await till.wait_for(outcome_for(service_id), timeout=15)
                    assert (answer["bridge"]["outcome"], answer["bridge"]["source"]) == (
                        "approved", "journal"), answer
            finally:
                await restarted.stop()
        for service_id in ("Q1", "Q2"):  # each reached the terminal once
            assert len(simulator.terminal.receipts[("TILL1", service_id)]) == 1
    finally:
        await simulator.close()


def test_the_journal_moves_this_runs_times_only(tmp_path):
    """A row of an earlier run keeps its times, whatever their values: this run's clock may
    have been behind, its stamps before the earlier run's. This run's stamps move, a
    restored row's included once this run rewrote them, and so does every deadline of an
    open transaction."""
    document = responses.payment_request("TILL1", "S1", POI)

    def row(service_id: str, at: float, state: TxState, deadline: float | None) -> Transaction:
        return Transaction(sale_id="TILL1", service_id=service_id, poi_id=POI,
                           category="Payment", request=document,
                           digest=request_digest(document), created_at=at, updated_at=at,
                           state=state, deadline=deadline)

    earlier = Journal(tmp_path / "journal.sqlite3")
    earlier.save(row("OLD", 1_000.0, TxState.FINAL, None))
    earlier.save(row("LATE", 6_000.0, TxState.POLLING, 6_100.0))  # after this run's start
    earlier.close()
    journal = Journal(tmp_path / "journal.sqlite3")  # this run, its clock behind
    try:
        journal.save(row("NEW", 5_000.0, TxState.FINAL, None))
        journal.save(row("OPEN", 5_100.0, TxState.AWAITING_RESPONSE, 5_220.0))
        restored = journal.get(TxKey("TILL1", "LATE"))
        restored.updated_at = 5_150.0  # this run's step of the restored payment
        journal.save(restored)
        assert journal.shift_times(DAYS, since=4_000.0, until=7_000.0) > 0
        times = {s: (journal.get(TxKey("TILL1", s)).created_at,
                     journal.get(TxKey("TILL1", s)).updated_at,
                     journal.get(TxKey("TILL1", s)).deadline)
                 for s in ("OLD", "LATE", "NEW", "OPEN")}
        assert times == {"OLD": (1_000.0, 1_000.0, None),
                         "LATE": (6_000.0, 5_150.0 + DAYS, 6_100.0 + DAYS),
                         "NEW": (5_000.0 + DAYS, 5_000.0 + DAYS, None),
                         "OPEN": (5_100.0 + DAYS, 5_100.0 + DAYS, 5_220.0 + DAYS)}
        assert journal.stamped_by_earlier_run(TxKey("TILL1", "LATE"), "created_at", 6_000.0)
        assert not journal.stamped_by_earlier_run(TxKey("TILL1", "LATE"), "updated_at",
                                                  5_150.0 + DAYS)
    finally:
        journal.close()


def test_the_steady_clock_ignores_a_step_until_told_to_follow_it():
    wall = Wall(-DAYS)
    clock = SteadyClock(wall)
    assert abs(clock.drift()) < 1
    wall.offset = 0.0
    assert abs(clock.drift() - DAYS) < 1  # seen, not followed
    before = clock()
    clock.shift(clock.drift())
    assert abs(clock() - before - DAYS) < 1 and abs(clock.drift()) < 1
    assert abs(clock.started - time.time()) < 5

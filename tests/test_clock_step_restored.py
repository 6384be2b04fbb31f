"""A payment restored from the journal (stamped by an earlier run, with a right clock) keeps
its times when this run follows a clock step, as the journal's own shift leaves an earlier
run's stamps alone. Moved by the step, its time-outs lay `delta` in the future: a terminal
that could not answer kept it open (the register never told `unresolved`, the terminal
busy), and the moved times were journaled for the next start."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.daemon.journal import Journal
from bridge.protocol.transaction import Transaction, TxKey, TxState, request_digest
from bridge.simulator import responses

from .rig import POI, Subscriber, outcome_for
from .test_clock_step import Wall

BASE = "poi-bridge"
HOUR = 3600.0


@pytest.mark.parametrize("behind", [0.0, HOUR])
async def test_a_payment_of_an_earlier_run_keeps_its_times_across_a_clock_step(
        tmp_path, mosquitto, behind):
    journal_path = tmp_path / "journal.sqlite3"
    # The previous run (right clock) sent P and died while waiting for the answer
    sent = time.time() - 5.0
    document = responses.payment_request("TILL1", "P1", POI, 7.0, now=sent)
    earlier = Journal(journal_path)
    earlier.save(Transaction(
        sale_id="TILL1", service_id="P1", poi_id=POI, category="Payment", request=document,
        digest=request_digest(document), created_at=sent, updated_at=sent, sent_at=sent,
        deadline=sent + 2.0, state=TxState.AWAITING_RESPONSE))
    earlier.close()
    config = parse_config({
        "journal": str(journal_path),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "base_topic": BASE},
        "terminals": [{"poi_id": POI,
                       # the terminal is not there after the restart: polls cannot go
                       "link": {"kind": "serial", "device": str(tmp_path / "absent")},
                       "payment_timeout": 2.0, "status_timeout": 0.5, "resync_attempts": 1,
                       "poll_floor": 0.05}]})
    # This start: a box without a battery-backed clock, `behind` s behind until NTP sets it
    wall = Wall(-behind)
    async with Subscriber(mosquitto, [f"{BASE}/registers/TILL1/#"]) as till:
        bridge = Bridge(config, hotplug=False, wall=wall)
        await bridge.start()
        try:
            await till.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "recovering")
            await asyncio.sleep(0.3)
            wall.offset = 0.0  # NTP sets the clock
            assert round(bridge.follow_clock_step()) == round(behind)
            # The payment was sent > payment_timeout ago and the terminal cannot be asked:
            # the register is told `unresolved` (the terminal free for other sales)
            try:
                answer = await till.wait_for(outcome_for("P1"), timeout=10)
            except TimeoutError:
                answer = None
            stored = bridge.journal.get(TxKey("TILL1", "P1"))
            moved = (round(stored.created_at - sent), round(stored.sent_at - sent))
            assert answer is not None and answer["bridge"]["outcome"] == "unresolved", (
                f"no result for P1 10 s after the step; state {stored.state}, journal's "
                f"created_at/sent_at moved by {moved} s")
            assert moved == (0, 0), moved
        finally:
            await bridge.stop()

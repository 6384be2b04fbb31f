"""bench/baseline.py: the two least-work baselines run against a real broker and real
pseudo-terminals, each payment's result joined to its start.

The durable baseline is the floor that section 1d sets beside the bridge: if it stopped
committing, or mixed up the terminals' payments, its figures would say nothing.
"""

from __future__ import annotations

import sqlite3

import pytest

from bench.common import BAUD
from bench.e2e import SMALL, Fleet, run_baseline

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_every_payment_of_every_terminal_is_answered_and_timed(mosquitto, tmp_path,
                                                                      durable):
    n = 3  # more than one: each terminal counts its ServiceIDs from the same start
    fleet = await Fleet(n, 0.02, BAUD).start()
    try:
        out = await run_baseline(mosquitto, fleet.devices, [(SMALL, 1.0)], tmp_path,
                                 tag="t", period={"small": 0.0}, think=(0.005, 0.01),
                                 broker_pid=None, durable=durable)
    finally:
        await fleet.close()
    small = out["small"]
    assert small["failures"] == {} and small["missing"] == 0, out.get("diagnostics")
    assert len(small["latencies"]) >= 2 * n  # each terminal paid more than once
    assert all(0.02 < t < 5.0 for t in small["latencies"])  # past the processing time
    journal = tmp_path / "baseline-durable-t.sqlite"
    if not durable:
        assert not journal.exists()
        return
    payments, answered = out["journal_rows"]
    # the warm-up payments (one a terminal) are journaled too
    assert payments == answered == len(small["latencies"]) + n
    with sqlite3.connect(journal) as db:
        mode, = db.execute("PRAGMA journal_mode").fetchone()
        terminals = {t for (t,) in db.execute("SELECT DISTINCT terminal FROM payments")}
        unanswered = db.execute("SELECT count(*) FROM payments WHERE answer IS NULL "
                                "OR instr(answer, service_id) = 0").fetchone()[0]
    assert mode == "wal"
    assert terminals == set(range(n))
    assert unanswered == 0  # each row holds the answer to its own request

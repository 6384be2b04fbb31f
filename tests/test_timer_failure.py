"""A bug met at a deadline (the session's tick or the framer's timeout, run from the worker's
loop timer) must neither kill the timer nor spin it.

The timer logged the exception and armed itself again for the earliest deadline, which was
the one that had just failed, already past: it fired again at once, the event loop spun at
100 % of a core (every other terminal and register slowed with it) and the log took a
traceback per pass, thousands a second (noted in session 15, fixed in session 16)."""

from __future__ import annotations

import asyncio
import logging
import time

from bridge.daemon import worker as worker_module
from bridge.transports import Backoff

from .test_link_task_failure import simulated_terminal_worker, wait_until


def timer_failures(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "timer step failed" in r.getMessage()]


async def test_a_deadline_that_fails_every_time_is_retried_after_a_pause(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with simulated_terminal_worker(tmp_path, Backoff(0.05, 5.0)) as worker:
        ticks: list[float] = []
        real_tick, real_deadline = worker.session.tick, worker.session.next_deadline

        def broken_tick(now):
            ticks.append(time.monotonic())
            raise RuntimeError("a bug met at every deadline")

        worker.session.tick = broken_tick
        worker.session.next_deadline = lambda: worker._clock() - 1.0  # always due
        worker._rearm()
        await asyncio.sleep(2.0)
        failed = len(ticks)
        # Mended: the pause ends at a step that works, and deadlines are on time again
        worked: list[float] = []

        def counting_tick(now):
            worked.append(time.monotonic())
            return real_tick(now)

        worker.session.tick = counting_tick
        await wait_until(lambda: worked, timeout=15.0)
        worker.session.next_deadline = real_deadline
        due_once = [worker._clock() + 0.2]
        worker.session.next_deadline = lambda: due_once[0] if due_once else real_deadline()

        def tick_once(now):
            due_once.clear()
            worked.append(time.monotonic())
            return real_tick(now)

        worker.session.tick = tick_once
        asked = time.monotonic()
        worked.clear()
        worker._rearm()
        await wait_until(lambda: worked, timeout=5.0)
        late = worked[0] - asked
    assert 1 <= failed <= 6, (
        f"{failed} failed timer steps in 2 s: a deadline that fails is retried at once")
    records = timer_failures(caplog)
    with_traceback = [r for r in records if r.exc_info]
    assert len(with_traceback) == 1, f"{len(with_traceback)} tracebacks for the same bug"
    assert len(records) == failed
    if failed >= 2:
        assert "2 times" in records[1].getMessage(), records[1].getMessage()
    assert late < 0.6, f"a deadline 0.2 s away fired {late:.2f} s later, after the bug mended"


async def test_the_same_timer_bug_shows_its_traceback_again_only_after_a_while(
        tmp_path, caplog, monkeypatch):
    """A bug met at some deadlines and not others (one transaction's status poll, say) is one
    traceback, then one line each, though steps that worked came between; its traceback
    comes again once FAILURE_NEWS_AFTER has passed since it was shown."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(worker_module, "FAILURE_NEWS_AFTER", 1.5)
    async with simulated_terminal_worker(tmp_path, Backoff(0.05, 5.0)) as worker:
        real_tick, real_deadline = worker.session.tick, worker.session.next_deadline
        calls: list[bool] = []

        def every_other(now):
            calls.append(len(calls) % 2 == 0)
            if calls[-1]:
                raise RuntimeError("a bug met at every other deadline")
            return real_tick(now)

        worker.session.tick = every_other
        worker.session.next_deadline = lambda: worker._clock() - 1.0
        worker._rearm()
        await asyncio.sleep(2.5)  # a failure every 0.25-0.5 s, a step that works after each
        worker.session.tick, worker.session.next_deadline = real_tick, real_deadline
        records = timer_failures(caplog)
    shown = [r.created for r in records if r.exc_info]
    assert records[0].exc_info and not records[1].exc_info and not records[2].exc_info, (
        "a step that worked made the same bug news again: its traceback at once")
    assert len(shown) >= 2, "the same bug long after its traceback: shown again"
    assert all(later - earlier >= 1.5 for earlier, later in zip(shown, shown[1:])), shown
    again = [r.getMessage() for r in records if r.exc_info][1]
    assert "times now)" in again, f"a traceback shown again says how often since: {again}"

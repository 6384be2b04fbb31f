"""The benchmark's event loop for the simulated terminals keeps their timing."""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import weakref

from bench.common import collector_paused, run_precise


async def _median_sleep(seconds: float, times: int = 25) -> float:
    took = []
    for _ in range(times):
        start = time.monotonic()
        await asyncio.sleep(seconds)
        took.append(time.monotonic() - start)
    return statistics.median(took)


def test_the_precise_loop_wakes_a_sub_millisecond_sleep_on_time():
    # A simulated terminal sleeps 87 us for one byte of line time at 115200 baud, and to the
    # next 10 ms slot for each piece of its answer. The default loop (epoll) rounds every
    # wait up to a whole millisecond, which made the terminal late and the bridge look slow.
    assert asyncio.run(_median_sleep(0.0002)) >= 0.001
    assert run_precise(_median_sleep(0.0002)) < 0.0008


def test_the_collector_is_paused_while_a_benchmark_measures_and_runs_after():
    class Node:
        pass

    was = gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        cycle = Node()
        cycle.self = cycle
        ref = weakref.ref(cycle)
        del cycle
        junk = [[] for _ in range(20000)]  # with the collector on, enough to collect the cycle
        assert ref() is not None, "no collection (and no pause) while measuring"
        del junk
    assert gc.isenabled() is was
    assert ref() is None, "collected on the way out"

"""The benchmark's event loop for the simulated terminals keeps their timing."""

from __future__ import annotations

import asyncio
import statistics
import time

from bench.common import run_precise


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

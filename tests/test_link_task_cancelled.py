"""A link task, or a terminal's link loop, ending cancelled with nobody asking (review rv19
noted the shape in _run_link; none is known to do so today). A cancelled reader or writer
raised out of _run_link and ended the terminal's link loop unseen: the terminal stayed
"online" with nobody reading it. And a link loop that ended for any reason was seen by
nobody: the daemon went on, READY and feeding the watchdog, with the terminal offline."""

from __future__ import annotations

import asyncio
import logging

from bridge.transports import Backoff

from .follow_rig import A, bridge_on
from .rig import POI
from .test_link_task_failure import simulated_terminal_worker, wait_until


async def test_a_link_task_cancelled_alone_reopens_the_link(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with simulated_terminal_worker(tmp_path, Backoff(0.05, 0.2)) as worker:
        await wait_until(lambda: worker.online, timeout=10)
        before = worker.counters["reconnects"]
        (reader,) = [t for t in asyncio.all_tasks() if t.get_name() == f"read {POI}"]
        reader.cancel()
        await wait_until(lambda: worker.counters["reconnects"] > before and worker.online,
                         timeout=10)
        (loop,) = worker.tasks
        assert not loop.done(), "the link loop ended with the cancelled task"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"the link's read {POI} task ended cancelled" in m for m in said), said


async def test_a_terminals_link_loop_that_ends_stops_the_daemon_for_systemd(
        tmp_path, mosquitto, caplog):
    from bridge.daemon.app import TASK_EXIT_STATUS

    async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "no-device-yet")}) as bridge:
        (loop,) = bridge.workers[A].tasks
        loop.cancel()
        await asyncio.wait_for(bridge.wait_stopped(), 5)
        assert bridge.exit_status == TASK_EXIT_STATUS
    said = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
    assert any(f"link {A} task ended unexpectedly" in m for m in said), said

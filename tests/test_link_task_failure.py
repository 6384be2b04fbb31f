"""A bug met while handling what the terminal sent (the worker's _bytes_read, called from the
serial read callback) fails the link task visibly, and the link is opened again.

The reader's exception used to be re-raised by `await task` in _run_link's cleanup (only
CancelledError and LinkClosed were suppressed there): the link loop died unseen, the worker
stayed "online" and neither read nor wrote again until the daemon restarted, and its stop()
raised the old exception (found by review rv12)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from bridge.config import TerminalConfig
from bridge.daemon.journal import Journal
from bridge.daemon.worker import TerminalWorker
from bridge.protocol.messages import parse_message
from bridge.protocol.transaction import request_digest
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, Scenario
from bridge.transports import Backoff

from .test_busy_record_after_nak import POI, HandTerminal, worker_paying
from .test_terminal_worker import RecordingOutlet


class Payer(HandTerminal):
    def answer(self, request, category, ack):
        if category == "Payment":
            self.payments += 1
            self.paid = responses.payment_response(request, "approve", time.time())
            self.send(ack, self.paid)
        elif category == "TransactionStatus":
            paid = getattr(self, "paid", None)
            self.send(ack, responses.status_in_progress(request) if paid is None
                      else responses.status_success(request, paid))


async def test_a_bug_while_reading_fails_the_link_task_visibly_and_the_link_reopens(
        tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "terminal"
    device = Payer(path, "stx-etx-lrc")
    seen = {}

    def a_bug_once(worker):
        """The framer raises on the next bytes read (the payment's ACK), then works again."""
        real, calls = worker.framer.receive_data, []

        def flaky(data, now):
            calls.append(data)
            if len(calls) == 1:
                raise RuntimeError("a bug met while reading")
            return real(data, now)

        worker.framer.receive_data = flaky
        seen.update(worker=worker, reconnects=worker.counters["reconnects"])

    try:
        async with worker_paying(tmp_path, path, "stx-etx-lrc",
                                 prepare=a_bug_once) as (outlet, _journal):
            worker = seen["worker"]
            link_task = worker._tasks[0]
            async with asyncio.timeout(10):
                while worker.counters["reconnects"] == seen["reconnects"] \
                        and not link_task.done():
                    await asyncio.sleep(0.01)
            assert not link_task.done(), (
                f"the link loop died with {link_task.exception()!r}: the link is never "
                f"reopened, the worker still says online={worker.online}")
            assert "link task failed" in caplog.text
            await outlet.state_is("online")  # opened again
        # (worker_paying's stop() above used to raise the reader's old exception)
    finally:
        device.close()



@contextlib.asynccontextmanager
async def simulated_terminal_worker(tmp_path, backoff: Backoff):
    """A TerminalWorker on the simulator's pseudo-terminal, once it has said who it is."""
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05)),
                                "stx-etx-lrc", ack_timeout=0.05)
    path = await simulator.start_pty(tmp_path / "terminal")
    config = TerminalConfig.model_validate({
        "poi_id": POI, "link": {"kind": "serial", "device": path},
        "framer": {"name": "stx-etx-lrc", "ack_timeout": 0.3}})
    journal = Journal(tmp_path / "journal.sqlite3")
    outlet = RecordingOutlet()
    worker = TerminalWorker(config, journal, outlet, backoff=backoff)
    await worker.start()
    try:
        await outlet.state_is("online")
        async with asyncio.timeout(10):
            while worker.identity == "unknown":
                await asyncio.sleep(0.01)
        yield worker
    finally:
        await worker.stop()
        await simulator.close()
        journal.close()


async def test_a_bug_met_on_every_frame_backs_off_and_logs_its_traceback_once(tmp_path, caplog):
    """A bug met on every frame (here _on_frame raising) fails each link on its first frame.
    That frame was counted in frames_in before _on_frame ran, so the link looked as if it had
    worked: the backoff was reset, and the link reopened ~23 times a second, each with a
    traceback, the terminal's state flipping online/down on MQTT (found by review: 187
    reopens in 8 s). A link ended by an internal error now backs off as one that never
    worked, and the same failure again is one line, its traceback logged once."""
    caplog.set_level(logging.INFO)
    # Delays from 0.025-0.05 s doubling: at most 7 reopens in the 3 s after the first
    # failure. Reset each time: ~17 a second (the simulator resends its answer every 0.05 s)
    async with simulated_terminal_worker(tmp_path, Backoff(initial=0.05, maximum=5.0)) as worker:
        def broken(payload):
            raise RuntimeError("a bug met on every frame")

        worker._on_frame = broken
        before = worker.counters["reconnects"]
        doc = responses.payment_request("POS1", "S1", POI, 10.0)
        worker.submit(parse_message(doc), doc, request_digest(doc))  # answered at once
        async with asyncio.timeout(10):
            while worker.counters["reconnects"] == before:
                await asyncio.sleep(0.005)
        first, started = worker.counters["reconnects"], time.monotonic()
        while time.monotonic() - started < 3.0 and worker.counters["reconnects"] < first + 20:
            await asyncio.sleep(0.005)
        reopens = worker.counters["reconnects"] - first
        failures = [r for r in caplog.records if "link task failed" in r.getMessage()]
    assert reopens <= 8, (
        f"{reopens} reopens in {time.monotonic() - started:.2f} s: a link that failed on its "
        "first frame reset the backoff as if it had worked")
    tracebacks = [r for r in failures if r.exc_info]
    assert len(tracebacks) == 1, f"{len(tracebacks)} tracebacks for the same bug"
    assert len(failures) >= 5
    assert "failed again" in failures[-1].getMessage()
    assert "5 times" in failures[4].getMessage(), failures[4].getMessage()

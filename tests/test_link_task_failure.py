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
from bridge.transports import Backoff

from .test_busy_record_after_nak import POI, HandTerminal
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


async def test_a_bug_while_reading_fails_the_link_task_visibly_and_the_link_reopens(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "terminal"
    device = Payer(path, "stx-etx-lrc")
    config = TerminalConfig.model_validate({
        "poi_id": POI, "link": {"kind": "serial", "device": str(path)},
        "framer": {"name": "stx-etx-lrc", "ack_timeout": 0.3},
        "payment_timeout": 3.0, "status_timeout": 0.8, "poll_floor": 0.05})
    journal = Journal(tmp_path / "journal.sqlite3")
    outlet = RecordingOutlet()
    worker = TerminalWorker(config, journal, outlet, backoff=Backoff(initial=0.05, maximum=0.2))
    await worker.start()
    try:
        await outlet.state_is("online")
        async with asyncio.timeout(10):
            while worker.identity == "unknown":
                await asyncio.sleep(0.01)
        real = worker.framer.receive_data
        calls = {"n": 0}

        def flaky(data, now):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a bug met while reading")
            return real(data, now)

        worker.framer.receive_data = flaky
        before = worker.counters["reconnects"]
        doc = responses.payment_request("POS1", "S1", POI, 10.0)
        worker.submit(parse_message(doc), doc, request_digest(doc))
        link_task = worker._tasks[0]
        async with asyncio.timeout(10):
            while worker.counters["reconnects"] == before and not link_task.done():
                await asyncio.sleep(0.01)
        assert not link_task.done(), (
            f"the link loop died with {link_task.exception()!r}: the link is never reopened, "
            f"the worker still says online={worker.online}")
        assert "link task failed" in caplog.text
        await outlet.state_is("online")  # reopened
        await worker.stop()  # clean: it used to raise the reader's old exception
    finally:
        with contextlib.suppress(RuntimeError):
            await worker.stop()  # (twice is harmless; here for a failed assertion above)
        journal.close()
        device.close()

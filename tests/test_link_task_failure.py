"""A bug met while handling what the terminal sent (the worker's _bytes_read, called from the
serial read callback) fails the link task visibly, and the link is opened again.

The reader's exception used to be re-raised by `await task` in _run_link's cleanup (only
CancelledError and LinkClosed were suppressed there): the link loop died unseen, the worker
stayed "online" and neither read nor wrote again until the daemon restarted, and its stop()
raised the old exception (found by review rv12)."""

from __future__ import annotations

import asyncio
import logging
import time

from bridge.simulator import responses

from .test_busy_record_after_nak import HandTerminal, worker_paying


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

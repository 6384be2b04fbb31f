"""A bug met while handling what the terminal sent (the worker's _bytes_read, called from the
serial read callback) fails the link task visibly, and the link is opened again.

The reader's exception used to be re-raised by `await task` in _run_link's cleanup (only
CancelledError and LinkClosed were suppressed there): the link loop died unseen, the worker
stayed "online" and neither read nor wrote again until the daemon restarted, and its stop()
raised the old exception (found by review rv12)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time

from bridge.config import TerminalConfig
from bridge.daemon.journal import Journal
from bridge.daemon import worker as worker_module
from bridge.daemon.worker import TerminalWorker
from bridge.protocol.framing.acknowledged import ACK
from bridge.protocol.framing.stx_etx_lrc import STX
from bridge.protocol.messages import parse_message
from bridge.protocol.transaction import request_digest
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer, open_pty
from bridge.simulator.terminal import Behaviour, Scenario
from bridge.transports import Backoff, LinkClosed

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
async def worker_on(tmp_path, device: str, backoff: Backoff, prepare=None, named: bool = True):
    """A TerminalWorker on the serial `device`, once online (and, if `named`, once the device
    has said who it is); `prepare(worker)` before it starts."""
    config = TerminalConfig.model_validate({
        "poi_id": POI, "link": {"kind": "serial", "device": device},
        "framer": {"name": "stx-etx-lrc", "ack_timeout": 0.3}})
    journal = Journal(tmp_path / "journal.sqlite3")
    outlet = RecordingOutlet()
    worker = TerminalWorker(config, journal, outlet, backoff=backoff)
    if prepare is not None:
        prepare(worker)
    await worker.start()
    try:
        await outlet.state_is("online")
        async with asyncio.timeout(10):
            while named and worker.identity == "unknown":
                await asyncio.sleep(0.01)
        yield worker
    finally:
        await worker.stop()
        journal.close()


@contextlib.asynccontextmanager
async def simulated_terminal_worker(tmp_path, backoff: Backoff):
    """A TerminalWorker on the simulator's pseudo-terminal, once it has said who it is."""
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05)),
                                "stx-etx-lrc", ack_timeout=0.05)
    path = await simulator.start_pty(tmp_path / "terminal")
    try:
        async with worker_on(tmp_path, path, backoff) as worker:
            yield worker
    finally:
        await simulator.close()


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


async def wait_until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def link_tasks_by_hand(tmp_path, write_loop, backoff: Backoff | None = None):
    """A worker on a pseudo-terminal whose link tasks are the test's: each link's reader waits
    for its gate (in `gates`, by transport, the last one opened last) and then ends with
    LinkClosed; its writer is `write_loop(gate)`. Yields the worker and the gates."""
    master, slave, _ = open_pty(tmp_path / "terminal")
    gates: dict = {}

    def gate(transport) -> asyncio.Future:
        return gates.setdefault(transport, asyncio.get_running_loop().create_future())

    async def read_loop(transport):
        await gate(transport)
        raise LinkClosed("the line hung up (the test's)")

    def by_hand(worker):
        worker._read_loop = read_loop
        worker.writer.run = lambda transport: write_loop(gate(transport))

    try:
        async with worker_on(tmp_path, str(tmp_path / "terminal"),
                             backoff or Backoff(0.01, 0.02),
                             prepare=by_hand, named=False) as worker:
            yield worker, gates
    finally:
        os.close(master)
        os.close(slave)


async def test_a_writer_bug_in_the_pass_the_reader_ends_is_logged(tmp_path, caplog):
    """The reader ended with LinkClosed and the writer failed with a bug in the same pass:
    _run_link went through the finished tasks in a set's order, and returned the LinkClosed
    reason without a word of the bug when the reader came first. Every link here."""
    caplog.set_level(logging.INFO)

    async def write_loop(gate):
        await gate  # as the reader: both finish in the same pass
        raise RuntimeError("a bug met while writing")

    async with link_tasks_by_hand(tmp_path, write_loop) as (worker, gates):
        for n in range(1, 11):
            await wait_until(lambda: len(gates) == n)
            list(gates.values())[-1].set_result(None)
            await wait_until(lambda: worker.counters["reconnects"] == n)
        failures = [r for r in caplog.records if "link task failed" in r.getMessage()]
    assert len(failures) == 10, f"the writer's bug logged for {len(failures)} of 10 links"
    assert "a bug met while writing" in caplog.text


async def test_a_task_that_raises_while_cancelled_is_logged(tmp_path, caplog):
    """The reader ended the link; the writer, cancelled, raised a bug of its own: suppressed
    with every other exception of an unfinished task, it went unseen. Then it was logged but
    the link counted as one no bug ended: the count of failures was cleared, and the same bug
    printed its traceback at every link's end (review rv14). Now once, as any bug's."""
    caplog.set_level(logging.INFO)

    async def write_loop(gate):
        try:
            await asyncio.get_running_loop().create_future()  # (never done)
        except asyncio.CancelledError:
            raise RuntimeError("a bug met while the writer was cancelled") from None

    async with link_tasks_by_hand(tmp_path, write_loop) as (worker, gates):
        for n in range(1, 4):
            await wait_until(lambda: len(gates) == n)
            list(gates.values())[-1].set_result(None)
            await wait_until(lambda: worker.counters["reconnects"] == n)
        failures = [r for r in caplog.records if "link task failed" in r.getMessage()]
        lost = [r.getMessage() for r in caplog.records if "link lost" in r.getMessage()]
    assert failures and failures[0].exc_info, "the writer's bug went unseen"
    assert "while the writer was cancelled" in repr(failures[0].exc_info[1])
    assert [bool(r.exc_info) for r in failures] == [True, False, False], \
        [r.getMessage() for r in failures]
    assert "the line hung up (the test's)" in lost[0]  # what ended the link, still


class AckWatcher(Payer):
    """Answers without waiting for the bridge's ACKs (its framer is not held by an answer
    never ACKed), and notes where in what it heard its payment's answer went out."""

    answered_at: int | None = None

    def answer(self, request, category, ack):
        if category == "Payment" and self.answered_at is None:
            self.answered_at = len(self.heard)
        super().answer(request, category, ack)

    def send(self, ack, document):
        document["SaleToPOIResponse"]["MessageHeader"]["POIID"] = POI
        os.write(self.master, ack + self.framer.encode(json.dumps(document).encode()))


async def test_a_frame_whose_handling_failed_is_not_acked_before_the_link_reopens(
        tmp_path, caplog):
    """The framer queues a frame's ACK as it reads it, before the worker handles it. When
    _on_frame raised, the worker scheduled no kick of its own, but until _run_link cancelled
    the writer (two passes later) another kick (the framer's resend timer, a commit's) sent
    the queued bytes, that ACK among them: the terminal forgot an answer the bridge never
    recorded. Now nothing is sent for a frame whose handling failed; the answer is had by
    the status poll on the reopened link."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "terminal"
    device = AckWatcher(path, "stx-etx-lrc")

    def a_bug_once(worker):
        real, calls = worker._on_frame, []

        def failing_once(payload):
            calls.append(payload)
            if len(calls) == 1:
                # a kick of this worker in the same pass, as from the framer's resend timer
                asyncio.get_running_loop().call_soon(worker.writer.kick)
                raise RuntimeError("a bug met handling an answer")
            return real(payload)

        worker._on_frame = failing_once

    try:
        async with worker_paying(tmp_path, path, "stx-etx-lrc",
                                 prepare=a_bug_once) as (outlet, _journal):
            # the bridge's next frame (its identity check on the reopened link)
            await wait_until(lambda: device.answered_at is not None
                             and STX in device.heard[device.answered_at:])
            after = device.heard[device.answered_at:]
            before_reopen = after[:after.index(STX)]
            assert bytes([ACK]) not in before_reopen, (
                f"{bytes(before_reopen)!r} reached the terminal before the link reopened: "
                "the ACK of an answer the bridge never recorded")
            result = await outlet.result_for("S1", timeout=20)
            assert result.outcome == "approved", result.error
        assert "link task failed" in caplog.text
    finally:
        device.close()


async def test_a_bug_after_the_link_worked_reopens_at_once_and_shows_its_traceback(
        tmp_path, caplog, monkeypatch):
    """A link a bug ended never reset the reopen backoff, however long it had worked: after a
    terminal that refused connections for a while (the backoff at its cap), a link that then
    worked for hours and met one bug waited 5-10 s to reopen, and a bug met once per payment
    kept every reopen there. Nor was the count of failures cleared, so the same bug days
    later came without its traceback (review rv14). A link up LINK_PROVEN_AFTER worked: a
    bug ending it reopens at once. A bug met at once still backs off. The same bug shows its
    traceback again once FAILURE_NEWS_AFTER has passed since it last did, one line
    meanwhile (see the every-frame test above, and the next one)."""
    caplog.set_level(logging.INFO)
    proven = 0.3
    monkeypatch.setattr(worker_module, "LINK_PROVEN_AFTER", proven)
    monkeypatch.setattr(worker_module, "FAILURE_NEWS_AFTER", 1.5 * proven)
    backoff = Backoff(initial=0.05, maximum=30.0)
    while backoff.next_delay() < 10:  # at its cap: the terminal refused connections a while
        pass
    # How long each link works before the bug (the last one: until the test ends)
    plan = [2 * proven, 0.0, 2 * proven]
    opened = []

    async def write_loop(gate):
        opened.append(time.monotonic())
        if len(opened) > len(plan):
            await gate  # (never set: this link lasts)
        until = opened[-1] + plan[len(opened) - 1]
        await wait_until(lambda: time.monotonic() >= until)
        raise RuntimeError("a bug met once per payment")

    async with link_tasks_by_hand(tmp_path, write_loop, backoff) as (worker, _):
        try:
            await wait_until(lambda: len(opened) == len(plan) + 1, timeout=10)
        except TimeoutError:
            raise AssertionError(f"{len(opened)} links opened in 10 s: a link that worked "
                                 "and met a bug waited the backoff's cap to reopen") from None
        failures = [r for r in caplog.records if "link task failed" in r.getMessage()]
    assert len(failures) == 3, [r.getMessage() for r in failures]
    # each link that worked: the traceback; the one that failed at once: one line
    assert [bool(r.exc_info) for r in failures] == [True, False, True], \
        [r.getMessage() for r in failures]



async def test_a_bug_met_at_every_links_end_is_one_traceback_however_long_links_last(
        tmp_path, caplog, monkeypatch):
    """The same bug, met at the end of every link (here the writer raising while cancelled),
    logged its whole traceback at every link's end once the links lasted LINK_PROVEN_AFTER
    (10 s): a link that worked cleared the failure counts. Real links last minutes or hours,
    so a TCP terminal closing idle connections each minute brought a traceback a minute
    (review rv15). The traceback comes again only FAILURE_NEWS_AFTER after it was shown."""
    caplog.set_level(logging.INFO)
    proven = 0.3
    monkeypatch.setattr(worker_module, "LINK_PROVEN_AFTER", proven)

    async def write_loop(gate):
        try:
            await asyncio.get_running_loop().create_future()  # (never done)
        except asyncio.CancelledError:
            raise RuntimeError("a bug met while the writer was cancelled") from None

    async with link_tasks_by_hand(tmp_path, write_loop, Backoff(0.01, 0.02)) as (worker, gates):
        for n in range(1, 4):
            await wait_until(lambda: len(gates) == n)
            opened = time.monotonic()
            # each link works a while (as links do: minutes, hours), then ends
            await wait_until(lambda: time.monotonic() - opened > 2 * proven)
            list(gates.values())[-1].set_result(None)
            await wait_until(lambda: worker.counters["reconnects"] == n)
        failures = [r for r in caplog.records if "link task failed" in r.getMessage()]
    assert [bool(r.exc_info) for r in failures] == [True, False, False], \
        [r.getMessage() for r in failures]
    assert "3 times now" in failures[-1].getMessage()

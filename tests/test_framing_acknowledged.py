"""The ACK/NAK side the two acknowledged framings (stx-etx-lrc, dle-crc16) share, driven as the
FrameWriter drives it: what data_to_send() returns is written, between events, and the time
of that write is passed in (review rv9).

An ACK or NAK names no frame. When a frame's first ACK comes late, a copy is already out, and
the peer answers that too: its ACK or NAK must not be taken as the next frame's. Nor can a NAK
be told from line noise: a NAK read proves no transmission answered (review rv10)."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.daemon.frame_writer import FrameWriter
from bridge.protocol.framing import (DleCrc16Framer, FrameFailed, FrameReceived, FrameResent,
                                     FrameSent, StxEtxLrcFramer)
from bridge.protocol.transaction import TxKey

from .test_frame_answered_not_sent_again import RecordingSession

ACK, NAK = b"\x06", b"\x15"
FRAMERS = [StxEtxLrcFramer, DleCrc16Framer]
CHECK, PAY = b'{"check":1}', b'{"pay":1}'


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_the_ack_time_counts_from_the_write(cls) -> None:
    """The payment waited 0.9 s of its 1 s ACK time for the writer (a slow commit before
    it). The time used to count from when it was queued: written at 0.9, it was sent again
    at 1.0, before the terminal could ACK it (README "Wire framing": a frame waiting to be
    written is not sent a second time)."""
    framer = cls(ack_timeout=1.0)
    framer.send_frame(b'{"pay":1}', 0.0)
    assert framer.handle_timeout(0.5) == []
    assert framer.data_to_send(0.9) == framer.encode(b'{"pay":1}')
    assert framer.next_deadline() == pytest.approx(1.9)
    assert framer.handle_timeout(1.0) == [], "sent again 0.1 s after it was written"
    assert framer.handle_timeout(1.9) == [FrameResent(b'{"pay":1}')]
    assert framer.data_to_send(1.95) == framer.encode(b'{"pay":1}')
    assert framer.next_deadline() == pytest.approx(2.95)  # the copy's own time, from its write


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_a_noise_nak_just_before_the_ack_on_the_last_try_does_not_give_the_frame_up(cls) -> None:
    """The abort's last copy is out; line noise read as a NAK, then the terminal's ACK of that
    copy, come in one read. The NAK used to give the abort up (the session: "not
    acknowledged") and the ACK right behind it was dropped. The ACK acknowledges it."""
    framer = cls(ack_timeout=1.0, max_tries=2)
    framer.send_frame(b'{"abort":1}', 0.0)
    framer.send_frame(b'{"n":2}', 0.0)
    framer.data_to_send(0.0)
    assert framer.handle_timeout(1.0) == [FrameResent(b'{"abort":1}')]
    framer.data_to_send(1.0)  # the copy, the last try
    events = framer.receive_data(NAK + ACK, 1.1)
    assert events == [FrameSent(b'{"abort":1}')]


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_an_ack_a_moment_behind_a_nak_on_the_last_try_acknowledges_the_frame(cls) -> None:
    """As above, the two bytes a few ms apart, in two reads (as on a serial line). The NAK
    used to give the abort up at once (the register told it may not have reached the
    terminal, though it did), the next frame went out, and the abort's ACK was taken as that
    frame's (review rv10). A NAK on the last try may be line noise: the frame is given up
    only at the last copy's ACK deadline, and an ACK before then acknowledges it."""
    framer = cls(ack_timeout=1.0, max_tries=2)
    framer.send_frame(b'{"abort":1}', 0.0)
    framer.send_frame(PAY, 0.0)
    framer.data_to_send(0.0)
    assert framer.handle_timeout(1.0) == [FrameResent(b'{"abort":1}')]
    framer.data_to_send(1.0)  # the copy, the last try
    events = framer.receive_data(NAK, 1.1)
    assert framer.data_to_send(1.1) == b"", "the next frame went out on a NAK that may be noise"
    events += framer.receive_data(ACK, 1.105)
    assert events == [FrameSent(b'{"abort":1}')], events


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_a_nak_alone_on_the_last_try_gives_the_frame_up_at_its_ack_deadline(cls) -> None:
    """The terminal's NAK of the last copy (or noise, with the copy's ACK lost): given up
    when the copy's ACK time is over, with the NAK as the reason; the next frame goes out
    then, when no reply to the copy can be taken as its own."""
    framer = cls(ack_timeout=1.0, max_tries=2)
    framer.send_frame(b'{"abort":1}', 0.0)
    framer.send_frame(PAY, 0.0)
    framer.data_to_send(0.0)
    framer.receive_data(NAK, 0.1)
    framer.data_to_send(0.1)
    assert framer.receive_data(NAK, 0.2) == []
    assert framer.data_to_send(0.2) == b"" and framer.next_deadline() == pytest.approx(1.1)
    (failed,) = framer.handle_timeout(1.1)
    assert isinstance(failed, FrameFailed) and failed.payload == b'{"abort":1}'
    assert "NAK" in failed.reason and "2 tries" in failed.reason
    assert framer.data_to_send(1.1) == framer.encode(PAY)


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_the_ack_of_a_copy_is_not_credited_to_the_next_frame(cls) -> None:
    """The payment's first ACK came late: its copy went out at the time-out, and the terminal
    ACKs both. The first ACK acknowledges the payment; the next frame (an abort) used to go
    out at once, and the terminal's ACK of the payment's copy, read after it, was taken as
    the abort's: the abort counted delivered (the register told `success`) although the
    terminal NAKs it (damaged on the line). The abort now waits for the copy's ACK."""
    framer = cls(ack_timeout=1.0)
    framer.send_frame(b'{"pay":1}', 0.0)
    framer.data_to_send(0.0)
    assert framer.handle_timeout(1.0) == [FrameResent(b'{"pay":1}')]
    framer.data_to_send(1.0)  # the copy
    assert framer.receive_data(ACK, 1.2) == [FrameSent(b'{"pay":1}')]  # of the first
    framer.send_frame(b'{"abort":2}', 1.25)
    events = []
    for data, now in ((b"", 1.25), (ACK, 1.3), (NAK, 1.4)):
        # what the framer has to write goes out; then the terminal's byte: the ACK of the
        # payment's copy, then the NAK of the abort, damaged
        framer.data_to_send(now)
        events += framer.receive_data(data, now)
    assert FrameSent(b'{"abort":2}') not in events, events
    assert events == [FrameResent(b'{"abort":2}')]


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_the_nak_of_a_copy_does_not_send_the_next_frame_again(cls) -> None:
    """A status poll's first ACK came late: its copy went out at the time-out. The terminal
    ACKs the first and NAKs the copy (damaged), in two reads. The ACK acknowledged the poll
    and the next frame, a payment, went out at once; the NAK of the poll's copy, read after
    it, was taken as the payment's: the payment, read intact by the terminal, was written
    to it a second time (a payment it may run twice). The payment now waits until the copy's
    ACK deadline: the NAK may be line noise, the copy's reply still to come (review rv10)."""
    framer = cls(ack_timeout=1.0)
    framer.send_frame(b'{"poll":1}', 0.0)
    framer.send_frame(b'{"pay":2}', 0.0)
    framer.data_to_send(0.0)
    assert framer.handle_timeout(1.0) == [FrameResent(b'{"poll":1}')]
    framer.data_to_send(1.0)  # the poll's copy
    assert framer.receive_data(ACK, 1.2) == [FrameSent(b'{"poll":1}')]  # of the first
    assert framer.data_to_send(1.2) == b""  # the payment waits
    assert framer.receive_data(NAK, 1.3) == []  # the terminal's NAK of the poll's copy
    assert framer.data_to_send(1.3) == b""
    assert framer.handle_timeout(2.0) == []  # the copy's ACK deadline
    assert framer.data_to_send(2.0) == framer.encode(b'{"pay":2}')
    assert framer.receive_data(ACK, 2.1) == [FrameSent(b'{"pay":2}')]


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_a_noise_nak_does_not_make_the_nak_of_the_copy_it_sent_the_next_frames(cls) -> None:
    """The identity check goes out; line noise reads as a NAK, and its copy is written at
    once; the terminal ACKs the first transmission in time, and NAKs the copy (read damaged)
    within the copy's ACK time. The noise used to count as the first transmission's reply,
    so nothing looked owed: the payment went out at the ACK, the copy's NAK was taken as the
    payment's and the payment, read intact, was written again: run twice (review rv10). An
    ACK proves a transmission answered, a NAK does not: the payment waits until the copy's
    ACK deadline, and the NAK read before then is the check's."""
    framer = cls(ack_timeout=1.0, max_tries=3)
    framer.send_frame(CHECK, 0.0)
    framer.send_frame(PAY, 0.0)
    assert framer.data_to_send(0.0) == framer.encode(CHECK)
    assert framer.receive_data(NAK, 0.05) == [FrameResent(CHECK)]  # line noise
    assert framer.data_to_send(0.05) == framer.encode(CHECK)  # the copy, written at once
    assert framer.receive_data(ACK, 0.1) == [FrameSent(CHECK)]  # the first transmission's
    out = framer.data_to_send(0.1)
    assert out == b"", "the payment went out with the check's copy unanswered"
    events = framer.receive_data(NAK, 0.3)  # the terminal's NAK of the check's copy
    out += framer.data_to_send(0.3)
    assert events == [] and out == b"", f"the NAK of the check's copy sent the payment: {events}"
    assert framer.next_deadline() == pytest.approx(1.05)  # the copy's ACK deadline
    assert framer.handle_timeout(1.05) == []
    assert framer.data_to_send(1.05) == framer.encode(PAY)  # once
    assert framer.receive_data(ACK, 1.2) == [FrameSent(PAY)]


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_a_noise_nak_does_not_make_the_ack_of_the_copy_it_sent_the_next_frames(cls) -> None:
    """As above, but the terminal ACKs the check's copy too: that ACK used to acknowledge the
    payment the moment it was written, before the terminal had read it (an abort: told
    delivered whatever became of it). It is the check's, and the payment goes out then: an
    ACK for every transmission shows none is owed."""
    framer = cls(ack_timeout=1.0, max_tries=3)
    framer.send_frame(CHECK, 0.0)
    framer.send_frame(PAY, 0.0)
    framer.data_to_send(0.0)
    framer.receive_data(NAK, 0.05)  # line noise
    framer.data_to_send(0.05)
    assert framer.receive_data(ACK, 0.1) == [FrameSent(CHECK)]
    assert framer.data_to_send(0.1) == b""
    events = framer.receive_data(ACK, 0.15)  # the ACK of the check's copy
    assert FrameSent(PAY) not in events, "the ACK of the check's copy was taken as the payment's"
    assert framer.data_to_send(0.15) == framer.encode(PAY)
    assert framer.receive_data(ACK, 0.2) == [FrameSent(PAY)]


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_a_noise_nak_does_not_end_the_wait_for_the_copys_reply(cls) -> None:
    """The poll's first ACK came late (its copy is out); the payment waits for the copy's
    reply. Line noise read as a NAK used to count as that reply: the payment went out, and
    the terminal's NAK of the poll's copy, read next, sent it again (review rv10)."""
    framer = cls(ack_timeout=1.0, max_tries=3)
    framer.send_frame(CHECK, 0.0)
    framer.send_frame(PAY, 0.0)
    framer.data_to_send(0.0)
    assert framer.handle_timeout(1.0) == [FrameResent(CHECK)]
    framer.data_to_send(1.0)  # the copy
    assert framer.receive_data(ACK, 1.2) == [FrameSent(CHECK)]  # the first's ACK, late
    assert framer.data_to_send(1.2) == b""  # the payment waits
    assert framer.receive_data(NAK, 1.25) == []  # line noise
    assert framer.data_to_send(1.25) == b"", "line noise let the payment out"
    events = framer.receive_data(NAK, 1.4)  # the terminal's NAK of the poll's copy
    assert events == [] and framer.data_to_send(1.4) == b""
    assert framer.handle_timeout(2.0) == []
    assert framer.data_to_send(2.0) == framer.encode(PAY)


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_a_copy_whose_answer_never_comes_holds_the_next_frame_until_its_ack_deadline(cls):
    """The copy's ACK is lost: the next frame goes out once the copy's ACK time is over."""
    framer = cls(ack_timeout=1.0)
    framer.send_frame(b'{"poll":1}', 0.0)
    framer.send_frame(b'{"pay":2}', 0.0)
    framer.data_to_send(0.0)
    framer.handle_timeout(1.0)
    framer.data_to_send(1.0)
    framer.receive_data(ACK, 1.2)
    assert framer.next_deadline() == pytest.approx(2.0) and not framer.awaiting_ack
    assert framer.handle_timeout(1.9) == [] and framer.data_to_send(1.9) == b""
    assert framer.handle_timeout(2.0) == []
    assert framer.data_to_send(2.0) == framer.encode(b'{"pay":2}')
    assert framer.awaiting_ack and framer.next_deadline() == pytest.approx(3.0)


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_the_next_frame_waits_only_after_a_copy_and_only_until_its_ack_deadline(cls) -> None:
    """An ACK in time costs the next frame no time. A NAK, its copy and an ACK: the NAK may
    have been line noise and the ACK the first transmission's, the copy's reply still to
    come, so the next frame waits until the copy's ACK deadline (at most ack_timeout)."""
    framer = cls(ack_timeout=1.0)
    for n in range(3):
        framer.send_frame(b'{"n":%d}' % n, 0.0)
    framer.data_to_send(0.0)
    assert framer.receive_data(ACK, 0.1) == [FrameSent(b'{"n":0}')]
    assert framer.data_to_send(0.1) == framer.encode(b'{"n":1}')
    assert framer.receive_data(NAK, 0.2) == [FrameResent(b'{"n":1}')]
    framer.data_to_send(0.2)
    assert framer.receive_data(ACK, 0.3) == [FrameSent(b'{"n":1}')]
    assert framer.data_to_send(0.3) == b""
    assert framer.next_deadline() == pytest.approx(1.2)
    assert framer.handle_timeout(1.2) == []
    assert framer.data_to_send(1.2) == framer.encode(b'{"n":2}')


# --- a model: the framer, the FrameWriter and the worker's answers, under any mix of events ---

NAMES = ["A", "B", "C"]


def run_model(cls, ops, max_tries=3) -> list:
    """Three frames, a mix of writes, time-outs and reads of ACKs, NAKs, noise and the
    terminal's responses (which count as their frame's ACK: FrameWriter.answered). No frame
    is written after it ended, none is acknowledged before it was written, every frame ends
    once everything is written and the time-outs pass, none goes out more than max_tries
    times, and every transmission after the first is reported (FrameResent)."""
    framer = cls(ack_timeout=1.0, max_tries=max_tries)
    session = RecordingSession()
    writer = FrameWriter("T1", framer, journal=None, session=session, apply=lambda a: None,
                         clock=time.monotonic)
    payload = {n: f'{{"req":"{n}"}}'.encode() for n in NAMES}
    enc = {n: framer.encode(payload[n]) for n in NAMES}
    keys = {n: TxKey("S1", n) for n in NAMES}
    resp_payload = {n: f'{{"resp":"{n}"}}'.encode() for n in NAMES}
    answers = {resp_payload[n]: keys[n] for n in NAMES}
    by_payload = {payload[n]: n for n in NAMES}
    peer = cls()  # encodes the terminal's responses
    written = {n: 0 for n in NAMES}
    resent = {n: 0 for n in NAMES}
    done: dict[str, str] = {}
    log: list = []
    now = 0.0

    def handle(events):
        for e in events:
            log.append(e)
            if isinstance(e, FrameReceived):
                handle(writer.answered(answers[e.payload]))
            elif isinstance(e, FrameResent):
                resent[by_payload[e.payload]] += 1
            elif isinstance(e, (FrameSent, FrameFailed)):
                n = by_payload[e.payload]
                assert n not in done, (n, done, log)
                if isinstance(e, FrameSent):
                    assert written[n] >= 1, f"{n} acknowledged before it was written: {log}"
                    writer.acknowledged(e)
                else:
                    writer.failed(e)
                done[n] = type(e).__name__

    def drain():
        out = framer.data_to_send(now)
        log.append(("drain", out))
        for n in NAMES:
            if out.count(enc[n]):
                assert n not in done, f"{n} written after {done.get(n)}: {log}"
                written[n] += out.count(enc[n])

    for n in NAMES:
        writer._in_flight.append((payload[n], keys[n]))
        framer.send_frame(payload[n], now)
    for op in ops:
        if op[0] == "drain":
            drain()
        elif op[0] == "timeout":
            now += 1.0
            handle(framer.handle_timeout(now))
        else:  # a read
            data = b""
            for t in op[1]:
                if t in ("ack", "nak", "noise"):
                    data += {"ack": ACK, "nak": NAK, "noise": b"x"}[t]
                elif written[t] >= 1:  # the terminal's response to a frame that went out
                    peer.send_frame(resp_payload[t], now)
                    data += peer.data_to_send()
                    peer.reset()
            now += 0.01
            handle(framer.receive_data(data, now))
    for _ in range(40):  # liveness: writing and waiting settles every frame
        drain()
        now += 1.0
        handle(framer.handle_timeout(now))
    assert set(done) == set(NAMES), (done, log)
    for n in NAMES:
        assert written[n] <= max_tries, (n, written, log)
        assert resent[n] >= written[n] - 1, (f"{n}: {written[n]} written, {resent[n]} marked",
                                             log)
    return log


token = st.sampled_from(["ack", "nak", "noise", "A", "B", "C"])
op = st.one_of(st.just(("drain",)), st.just(("timeout",)),
               st.tuples(st.just("read"), st.lists(token, min_size=1, max_size=5)))


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(FRAMERS), st.lists(op, max_size=25))
def test_the_framer_and_the_writer_end_every_frame_once(cls, ops) -> None:
    run_model(cls, ops)


BAUD_115200 = 10 / 115200  # s per byte: start bit, 8 data bits, stop bit


class CommittedJournal:
    """Nothing waits for a commit: the writer writes what the framer gives at once."""
    commit_pending = False

    def after_commit(self, callback) -> None:
        callback()


def writer_running(line, ack_timeout: float, seconds_per_byte: float):
    """A framer, its FrameWriter and the writer task on `line` (a stand-in transport)."""
    framer = StxEtxLrcFramer(ack_timeout=ack_timeout, max_frame_size=128 * 1024,
                             seconds_per_byte=seconds_per_byte)
    writer = FrameWriter("T1", framer, journal=CommittedJournal(), session=RecordingSession(),
                         apply=lambda a: None, clock=time.monotonic)
    return framer, writer, asyncio.create_task(writer.run(line))


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_the_ack_time_counts_from_the_frames_last_byte_on_the_line(cls) -> None:
    """A 60 KB frame (a print request with a logo) takes 5.2 s to cross a 115200 baud line.
    Its 2 s ACK time counted from the write, so the framer sent it again while the first copy
    was still going out: the terminal read it twice (two receipts, two payment requests)."""
    payload = b'{"print":"' + b"x" * 60_000 + b'"}'
    framer = cls(ack_timeout=2.0, max_frame_size=128 * 1024, seconds_per_byte=BAUD_115200)
    framer.send_frame(payload, 0.0)
    out = framer.data_to_send(10.0)
    on_the_line = len(out) * BAUD_115200
    assert on_the_line > 5.0
    assert framer.handle_timeout(12.5) == [], "sent again while its first copy was going out"
    assert framer.next_deadline() == pytest.approx(10.0 + on_the_line + 2.0)
    assert framer.handle_timeout(10.0 + on_the_line + 2.0) == [FrameResent(payload)]
    framer.data_to_send(20.0)  # the copy: its own line time, from its own write
    assert framer.next_deadline() == pytest.approx(20.0 + on_the_line + 2.0)


def test_a_frame_queued_behind_bytes_still_being_written_counts_from_their_end() -> None:
    """The writer task writes what the device could not take at once (the rest of a long
    frame) with what the framer gives it next (a copy, an ACK): the peer's time to ACK a
    frame in the second part counts from after the first part has crossed the line too."""

    class SlowLine:
        """Takes 4 KB at once (the kernel's buffer), the rest in the writer task's write."""

        def __init__(self) -> None:
            self.written: list[tuple[float, bytes]] = []
            self.in_kernel = 0  # (not drained in this test: the line is slow)

        def output_queued(self) -> int:
            return self.in_kernel

        def write_nowait(self, data: bytes) -> int:
            self.written.append((time.monotonic(), data[:4096]))
            self.in_kernel = min(len(data), 4096)
            return self.in_kernel

        async def write(self, data: bytes) -> None:
            self.written.append((time.monotonic(), data))

    async def main() -> None:
        line = SlowLine()
        framer, writer, task = writer_running(line, 2.0, BAUD_115200)
        try:
            await asyncio.sleep(0)  # the writer task waits, idle
            big = b'{"print":"' + b"x" * 30_000 + b'"}'
            writer._in_flight.append((big, TxKey("S1", "P1")))
            framer.send_frame(big, time.monotonic())
            started = time.monotonic()
            writer.kick()  # 4 KB now, the rest for the writer task
            frame = framer.encode(big)
            assert framer.next_deadline() >= started + len(frame) * BAUD_115200 + 2.0
            # The copy (after a NAK) is taken with the rest of the first one still unwritten
            framer.receive_data(NAK, time.monotonic())
            await asyncio.sleep(0.05)
            assert b"".join(data for _, data in line.written) == frame + frame
            # (the rest the writer task held, and the 4 KB in the kernel's buffer before it)
            assert framer.next_deadline() >= started + 2 * len(frame) * BAUD_115200 + 2.0, (
                "the copy's ACK time counted from before the first copy had crossed the line")
        finally:
            task.cancel()

    asyncio.run(main())


# A copy queued after a NAK (or a time-out) set the ACK deadline to now + ack_timeout while
# the transmission before it was still crossing the line (its deadline, with line time, cut
# short). Taken back on the answer of an earlier one, that shortened deadline was what _hold
# waited until: the next frame went out while the copy on the line could still be ACKed, and
# that ACK was taken as the next frame's (review rv16 of the line-time change).


@pytest.mark.parametrize("cls", [StxEtxLrcFramer, DleCrc16Framer], ids=lambda c: c.name)
def test_the_hold_after_a_taken_back_copy_lasts_until_the_copy_on_the_lines_ack_time(cls):
    first = b'{"print":"' + b"x" * 60_000 + b'"}'   # 5.2 s on the line
    second = b'{"pay":"' + b"y" * 30_000 + b'"}'    # 2.6 s on the line
    framer = cls(ack_timeout=2.0, max_frame_size=128 * 1024, seconds_per_byte=BAUD_115200)
    line = len(framer.encode(first)) * BAUD_115200
    framer.send_frame(first, 0.0)
    framer.data_to_send(0.0)                        # T1: ACK time until line + 2
    t = line + 2.0
    assert framer.handle_timeout(t) == [FrameResent(first)]  # its ACK was lost
    framer.data_to_send(t)                          # C2 taken: on the line until t + line
    c2_ack_time = t + line + 2.0
    assert framer.next_deadline() == pytest.approx(c2_ack_time)
    # Line noise read as a NAK while C2 is still going out: C3 queued (the writer is busy
    # writing C2, so C3 waits in the framer)
    assert framer.receive_data(NAK, t + 0.8) == [FrameResent(first)]
    # The terminal's answer to T1 arrives: its ACK was the one lost. C3 is taken back; two
    # transmissions out, no ACK read: the next frame waits for C2's reply
    assert framer.answered(first, t + 1.8) == [FrameSent(first)]
    framer.send_frame(second, t + 1.8)
    held_until = framer.next_deadline()
    assert held_until >= c2_ack_time, (
        f"held until {held_until:.2f} s, but C2 is on the line until {t + line:.2f} s and "
        f"its ACK may come until {c2_ack_time:.2f} s")


@pytest.mark.parametrize("cls", [StxEtxLrcFramer, DleCrc16Framer], ids=lambda c: c.name)
def test_the_copy_on_the_lines_ack_is_not_taken_for_the_next_frames(cls):
    first = b'{"print":"' + b"x" * 60_000 + b'"}'
    second = b'{"pay":"' + b"y" * 30_000 + b'"}'
    framer = cls(ack_timeout=2.0, max_frame_size=128 * 1024, seconds_per_byte=BAUD_115200)
    line = len(framer.encode(first)) * BAUD_115200
    framer.send_frame(first, 0.0)
    framer.data_to_send(0.0)
    t = line + 2.0
    framer.handle_timeout(t)
    framer.data_to_send(t)                          # C2, on the line until t + line
    framer.receive_data(NAK, t + 0.8)               # C3 queued, waits behind C2
    framer.answered(first, t + 1.8)
    framer.send_frame(second, t + 1.8)
    # The writer is free again once C2's last bytes are in the kernel (~t + line - 0.35 s):
    # the timer has run at every deadline up to then, and the writer takes what there is
    taken = t + line - 0.35
    while (due := framer.next_deadline()) is not None and due <= taken:
        framer.handle_timeout(due)
    framer.data_to_send(taken)
    second_crossed = taken + len(framer.encode(second)) * BAUD_115200
    # The terminal ACKs C2 (read in full at t + line) 0.1 s later: `second` has not even
    # crossed the line yet, and is counted delivered
    events = framer.receive_data(ACK, t + line + 0.1)
    assert t + line + 0.1 < second_crossed
    assert FrameSent(second) not in events, (
        "C2's ACK, read before the next frame's last byte had crossed the line, was taken "
        "as that frame's: it counts as delivered whatever became of it")


# --- the kernel's output buffer on a slow line ---------------------------------------------

SLOW_SPB = 10 / 9600 / 10   # 9600 baud, 10x faster
SLOW_ACK_TIMEOUT = 0.2      # 2 s, 10x shorter
KERNEL_BUFFER = 4096          # the tty's output buffer


class KernelLine:
    """A serial line: write_nowait() fills a 4 KB kernel buffer, which drains at SLOW_SPB a byte;
    write() waits for room. Records when each byte's run crosses the line."""

    def __init__(self) -> None:
        self.free_at = 0.0                      # when what is queued has all crossed
        self.stream = bytearray()
        self.ends: list[tuple[int, float]] = []  # (stream offset after a chunk, its end)
        self.taken_at: list[tuple[int, float]] = []  # (stream offset of a chunk, when written)

    def queued(self, now: float) -> float:
        return max(0.0, self.free_at - now) / SLOW_SPB

    def output_queued(self) -> int:
        return int(self.queued(time.monotonic()))

    def write_nowait(self, data: bytes) -> int:
        now = time.monotonic()
        n = max(0, min(len(data), int(KERNEL_BUFFER - self.queued(now))))
        if n:
            self.taken_at.append((len(self.stream), now))
            self.stream += data[:n]
            self.free_at = max(now, self.free_at) + n * SLOW_SPB
            self.ends.append((len(self.stream), self.free_at))
        return n

    async def write(self, data: bytes) -> None:
        while data:
            data = data[self.write_nowait(data):]
            if data:
                await asyncio.sleep(max(0.001, (self.queued(time.monotonic()) - KERNEL_BUFFER / 2)
                                        * SLOW_SPB))

    def end_of(self, offset: int) -> float:
        """When the byte ending at `offset` has crossed."""
        for end_offset, end in self.ends:
            if end_offset >= offset:
                return end - (end_offset - offset) * SLOW_SPB
        raise AssertionError("not written")

    def written_at(self, offset: int) -> float:
        return max(t for start, t in self.taken_at if start <= offset)


def test_a_copy_is_not_sent_again_while_the_copy_before_it_is_still_going_out() -> None:
    """What the kernel's serial output buffer still holds (4 KB) was left to ack_timeout's
    margin: 0.36 s at 115200 baud, but 4.3 s at 9600, more than the 2 s ack_timeout, so a copy
    after a NAK got its deadline before its last byte had crossed the line, and a third copy
    was written while the second was still going out (review rv17). The writer counts the
    transport's output queue too. Scaled 10x in time (ack_timeout 0.2 s, bytes 10x faster
    than 9600 baud), on a model of the line with a 4 KB kernel buffer."""
    async def main() -> list[tuple[float, float]]:
        line = KernelLine()
        framer, writer, task = writer_running(line, SLOW_ACK_TIMEOUT, SLOW_SPB)
        try:
            await asyncio.sleep(0)
            payload = b'{"print":"' + b"x" * 6000 + b'"}'   # 6.3 s at 9600 baud
            frame = framer.encode(payload)
            writer._in_flight.append((payload, TxKey("S1", "P1")))
            framer.send_frame(payload, time.monotonic())
            writer.kick()
            await asyncio.sleep(0.03)
            framer.receive_data(b"\x15", time.monotonic())  # line noise read as a NAK
            writer.kick()
            stop = time.monotonic() + 2.0
            while time.monotonic() < stop:  # the worker's timer
                due = framer.next_deadline()
                if due is None:
                    break
                await asyncio.sleep(max(0.0, min(due, stop) - time.monotonic()))
                if time.monotonic() >= due:
                    if any(isinstance(e, FrameResent)
                           for e in framer.handle_timeout(time.monotonic())):
                        writer.kick()
            copies = []
            at = line.stream.find(frame)
            while at >= 0:
                copies.append((line.written_at(at), line.end_of(at + len(frame))))
                at = line.stream.find(frame, at + 1)
            return copies
        finally:
            task.cancel()

    copies = asyncio.run(main())
    assert len(copies) >= 2, copies
    t0 = copies[0][0]
    shown = [(round(w - t0, 3), round(e - t0, 3)) for w, e in copies]
    # Copy 2 answers the NAK; a copy 3 may not be written while copy 2 is still going out
    # (the terminal would read the frame once more; README "Wire framing"). At 115200 baud
    # this holds (copy 3 goes ~ack_timeout - 0.36 s after copy 2's last byte)
    for (_, end_before), (written, _) in zip(copies[1:], copies[2:]):
        assert written >= end_before, (
            f"(written, last byte crossed) per copy, s (10x scale): {shown}: a copy was "
            f"written {end_before - written:.3f} s before the copy before it had crossed the "
            f"line, {end_before + SLOW_ACK_TIMEOUT - written:.3f} s before its ACK time was over")

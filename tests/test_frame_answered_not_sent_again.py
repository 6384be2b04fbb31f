"""A payment the terminal has answered is not written to it again.

The terminal reads the payment, its ACK is lost (or a noise byte reads as NAK), and it
answers at once (a declined card, a fast approval). The framer used to go on waiting for the
ACK of the request frame and send the payment again at ack_timeout, after its outcome was
told to the register: a terminal that runs the copy charges the shopper twice (review rv6).
An answer under the frame's SaleID and ServiceID now counts as its acknowledgement
(Framer.answered), and a copy queued and not yet written is withdrawn."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from bridge.daemon.frame_writer import FrameWriter
from bridge.protocol.framing import (FrameFailed, FrameReceived, FrameResent, FrameSent,
                                     StxEtxLrcFramer)
from bridge.protocol.transaction import TxKey
from bridge.simulator import responses

from .test_busy_record_after_nak import POI, HandTerminal, worker_paying
from .test_framing_stx_etx_lrc import ACK, NAK, frame


class FastTerminal(HandTerminal):
    """Answers each payment copy at once with an approval. Its ACK of the first copy is
    lost; `before` and `after` its answer on the wire: noise bytes that read as NAK, or its
    ACK late. `before` goes out in one write with the answer, so that the bridge reads them
    together: NAKs read alone would have their copy written at once, which is allowed (a
    NAK may be the terminal's) and not the case under test."""

    def __init__(self, path, framer: str, before: bytes, after: bytes) -> None:
        super().__init__(path, framer)
        self.before, self.after = before, after

    def answer(self, request: dict, category: str, ack: bytes) -> None:
        if category == "Payment":
            self.payments += 1
            # (send writes its first argument, here the noise instead of the lost ACK, and
            # the answer's frame in one write)
            self.send(ack if self.payments > 1 else self.before,
                      responses.payment_response(request, "approve", time.time()))
            if self.payments == 1:
                os.write(self.master, self.after)


@pytest.mark.parametrize("framer", ["stx-etx-lrc", "dle-crc16"])
@pytest.mark.parametrize("before,after", [(b"", b""), (b"", b"\x15\x06"), (b"\x15\x15", b"")],
                         ids=["ack-lost", "noise-nak-after", "two-noise-naks-before"])
async def test_a_payment_answered_is_not_written_to_the_terminal_again(tmp_path, framer, before,
                                                                        after):
    """Two NAKs read with the answer: the first queues a copy, the second finds it not yet
    written (it spends no try), and the answer takes it back (review rv7)."""
    path = tmp_path / "terminal"
    device = FastTerminal(path, framer, before, after)
    try:
        async with worker_paying(tmp_path, path, framer) as (outlet, _):
            result = await outlet.result_for("S1", timeout=10)
            assert result.outcome == "approved"
            # Give the framer its retransmissions (3 tries x 0.3 s): polled, not slept blind
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.0
            while loop.time() < end and device.payments < 2:
                await asyncio.sleep(0.05)
            assert device.payments == 1, (
                f"the payment, answered and delivered as {result.outcome}, was written to "
                f"the terminal {device.payments} times; results told: "
                f"{[(r.service_id, r.outcome, r.source) for r in outlet.results]}")
    finally:
        device.close()


class EchoingLink(HandTerminal):
    """A link that hands our own bytes back (RS-485 with local echo, a loopback): the
    payment's frame comes back as it went, under its own IDs, and no terminal ACKs it."""

    def answer(self, request: dict, category: str, ack: bytes) -> None:
        if category == "Payment":
            self.payments += 1
            self.framer.send_frame(json.dumps(request).encode(), time.monotonic())
            os.write(self.master, self.framer.data_to_send())


async def test_our_own_request_handed_back_is_no_answer(tmp_path):
    """Only a response under the frame's IDs counts as its ACK: a request that comes back
    (an echo) is not the terminal's word that it has the frame, which is sent again."""
    path = tmp_path / "terminal"
    device = EchoingLink(path, "stx-etx-lrc")
    try:
        async with worker_paying(tmp_path, path, "stx-etx-lrc"):
            loop = asyncio.get_running_loop()
            end = loop.time() + 5.0
            while loop.time() < end and device.payments < 2:
                await asyncio.sleep(0.05)
            assert device.payments >= 2  # not acknowledged: the framer's retransmission
    finally:
        device.close()


class RecordingSession:
    """What FrameWriter tells the session, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def send_failed(self, service_id, reason, now, sale_id=None):
        self.calls.append(("send_failed", sale_id, service_id))
        return []

    def frame_delivered(self, service_id, now, sale_id=None):
        self.calls.append(("frame_delivered", sale_id, service_id))
        return []

    def frame_resent(self, service_id, sale_id=None):
        self.calls.append(("frame_resent", sale_id, service_id))
        return []

    def frame_subject(self, service_id, sale_id=None):
        return f"{sale_id}/{service_id}"

    def is_identity_check(self, service_id, sale_id=None):
        return False  # (no identity check: every frame here is a register's)


def worker_events(writer: FrameWriter, events: list, answers: dict[bytes, TxKey]) -> None:
    """What TerminalWorker._framer_events and _take do with the framer's events (worker.py
    622-640, 703-716): a FrameReceived that is a response under a key calls writer.answered."""
    for event in events:
        if isinstance(event, FrameReceived):
            key = answers[event.payload]
            worker_events(writer, writer.answered(key), answers)
        elif isinstance(event, FrameResent):
            writer.resent(event)
        elif isinstance(event, FrameFailed):
            writer.failed(event)
        elif isinstance(event, FrameSent):
            writer.acknowledged(event)


def test_an_answer_read_with_a_nak_on_the_last_try_acknowledges_that_frame_only() -> None:
    """The terminal's response to the payment and a NAK of line noise in one read, the
    payment on its last try. The NAK used to give the payment up and make the next frame
    current before the worker saw the response, which then acknowledged that next frame,
    never written (review rv8). A NAK on the last try now gives a frame up only at its ACK
    deadline (review rv10): the response acknowledges the payment, and the next frame waits
    until then (the last copy's ACK may still come: it must not be taken as the poll's)."""
    framer = StxEtxLrcFramer(ack_timeout=1.0, max_tries=2)
    session = RecordingSession()
    writer = FrameWriter("T1", framer, journal=None, session=session, apply=lambda a: None,
                         clock=time.monotonic)
    pay, poll = TxKey("S1", "pay-1"), TxKey("bridge", "poll-9")
    writer._in_flight.append((b'{"pay":1}', pay))
    framer.send_frame(b'{"pay":1}', 0.0)
    writer._in_flight.append((b'{"poll":9}', poll))
    framer.send_frame(b'{"poll":9}', 0.0)
    framer.data_to_send()
    worker_events(writer, framer.receive_data(NAK, 0.1), {})
    framer.data_to_send()  # the copy is written (try 2 of 2)
    response = b'{"resp":"pay-1"}'
    worker_events(writer, framer.receive_data(frame(response) + NAK, 0.2), {response: pay})
    assert session.calls == [("frame_resent", "S1", "pay-1"), ("frame_delivered", "S1", "pay-1")]
    assert framer.data_to_send() == ACK  # our ACK of the response; the poll waits
    assert framer.handle_timeout(1.1) == []  # the payment's last copy's ACK deadline
    assert framer.awaiting_ack and framer.data_to_send() == frame(b'{"poll":9}')


class UnreadableAnswerTerminal(HandTerminal):
    """Its ACK of the payment is lost, and it answers at once with something the bridge
    cannot use: an approval with receipts (a signature image) over the bridge's
    max_frame_size of 4096 bytes ("oversize"), an approval cut short into bad JSON
    ("not-json"), a document that is no SaleToPOI message ("not-saletopoi"), or a crypto
    error, which names no message ("crypto-error"). It answers
    the bridge's status polls "in progress", counting them. "oversize-after-another": as
    "oversize", and right behind its answer to the identity check, in the same write, a
    frame of its own over max_frame_size (a notification with an image, say) while nothing
    waits for an answer: the payment's answer comes well within OVERSIZE_QUIET (5 s) of it."""

    how = "oversize"
    polls = 0

    def answer(self, request: dict, category: str, ack: bytes) -> None:
        if category == "TransactionStatus":
            self.polls += 1
            self.send(ack, responses.status_in_progress(request))
            return
        if category != "Payment":
            return
        self.payments += 1
        if self.payments > 1:
            os.write(self.master, ack)  # a copy: ACKed, not answered again
            return
        approval = responses.payment_response(request, "approve", time.time())
        if self.how.startswith("oversize"):
            approval["SaleToPOIResponse"]["PaymentResponse"]["SignatureImage"] = "A" * 6000
            self.send(b"", approval)  # (no ACK: lost)
            return
        payload = {"not-json": json.dumps(approval).encode()[:-40],
                   "not-saletopoi": b'{"error": "busy"}',
                   "crypto-error": b'{"errors": ["Nexo Service: crypto error (3)"]}'}[self.how]
        self.framer.send_frame(payload, time.monotonic())
        os.write(self.master, self.framer.data_to_send())

    def send(self, ack: bytes, document: dict) -> None:
        if (self.how != "oversize-after-another"
                or "DiagnosisResponse" not in document["SaleToPOIResponse"]):
            super().send(ack, document)
            return
        document["SaleToPOIResponse"]["MessageHeader"]["POIID"] = POI
        self.framer.send_frame(json.dumps(document).encode(), time.monotonic())
        notice = self.framer.encode(b'{"notice":"' + b"A" * 6000 + b'"}')
        os.write(self.master, ack + self.framer.data_to_send() + notice)


@pytest.mark.parametrize("framer", ["stx-etx-lrc", "dle-crc16"])
@pytest.mark.parametrize("how", ["oversize", "not-json", "not-saletopoi", "crypto-error",
                                 "oversize-after-another"])
@pytest.mark.usefixtures("small_frames")
async def test_a_payment_answered_unreadably_is_not_written_to_the_terminal_again(
        tmp_path, framer, how):
    """The payment's ACK is lost and the terminal answers it with a frame the bridge cannot
    read or use. The session takes that frame as the payment's answer (it cannot tell
    whose else it is) and asks about the payment by status poll. Only a readable response
    under the payment's IDs used to count as its acknowledgement, so the framer went on
    sending the payment (at ack_timeout, up to max_tries) to a terminal that had answered
    it: a terminal that runs a copy charges the shopper twice (review rv9). The status poll
    waits behind the payment's frame in the framer: when it reaches the terminal, the
    payment's frame is done with. An oversize frame within OVERSIZE_QUIET of another used to
    be taken as the same answer and not told to the session at all: the payment's, coming
    soon after an unrelated one, left the framer writing the payment again (review rv10)."""
    path = tmp_path / "terminal"
    device = UnreadableAnswerTerminal(path, framer)
    device.how = how
    try:
        async with worker_paying(tmp_path, path, framer, {"max_frame_size": 4096}):
            async with asyncio.timeout(10):
                while device.polls == 0:
                    await asyncio.sleep(0.02)
            assert device.payments == 1, (
                f"the payment, answered by the terminal ({how}), was written to it "
                f"{device.payments} times")
    finally:
        device.close()

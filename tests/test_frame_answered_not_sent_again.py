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

from bridge.simulator import responses

from .test_busy_record_after_nak import HandTerminal, worker_paying


class FastTerminal(HandTerminal):
    """Answers each payment copy at once with an approval. Its ACK of the first copy is
    lost; `before` and `after` its answer on the wire: noise bytes that read as NAK, or its
    ACK late."""

    def __init__(self, path, framer: str, before: bytes, after: bytes) -> None:
        super().__init__(path, framer)
        self.before, self.after = before, after

    def answer(self, request: dict, category: str, ack: bytes) -> None:
        if category == "Payment":
            self.payments += 1
            if self.payments == 1:
                os.write(self.master, self.before)
            self.send(ack if self.payments > 1 else b"",
                      responses.payment_response(request, "approve", time.time()))
            if self.payments == 1:
                os.write(self.master, self.after)


@pytest.mark.parametrize("framer", ["stx-etx-lrc", "dle-crc16"])
@pytest.mark.parametrize("before,after", [(b"", b""), (b"", b"\x15\x06"), (b"\x15\x15", b"")],
                         ids=["ack-lost", "noise-nak-after", "two-noise-naks-before"])
async def test_a_payment_answered_is_not_written_to_the_terminal_again(tmp_path, framer, before,
                                                                        after):
    """Two NAKs before the answer queue two copies, both taken back (review rv7)."""
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

"""A payment the terminal has answered is not written to it again.

The terminal reads the payment, its ACK is lost (or a noise byte reads as NAK), and it
answers at once (a declined card, a fast approval). The framer used to go on waiting for the
ACK of the request frame and send the payment again at ack_timeout, after its outcome was
told to the register: a terminal that runs the copy charges the shopper twice (review rv6).
An answer under the frame's SaleID and ServiceID now counts as its acknowledgement
(Framer.answered), and a copy queued and not yet written is withdrawn."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from bridge.simulator import responses

from .test_busy_record_after_nak import HandTerminal, worker_paying



class FastTerminal(HandTerminal):
    """Answers each payment copy at once with an approval. After its answer to the first
    copy: nothing (`first_reply` b"": the ACK is lost), or a noise byte that reads as NAK
    and then the ACK (b"\\x15\\x06")."""

    def __init__(self, path, first_reply: bytes) -> None:
        super().__init__(path, "stx-etx-lrc")
        self.first_reply = first_reply

    def answer(self, request: dict, category: str, ack: bytes) -> None:
        if category == "Diagnosis":
            self.send(ack, responses.simple_response(request))
        elif category == "Payment":
            self.payments += 1
            # The first copy: the answer at once, its ACK lost, or coming after the answer
            # behind a noise byte that reads as NAK
            self.send(ack if self.payments > 1 else b"",
                      responses.payment_response(request, "approve", time.time()))
            if self.payments == 1:
                os.write(self.master, self.first_reply)


@pytest.mark.parametrize("first_reply", [b"", b"\x15\x06"], ids=["ack-lost", "noise-nak"])
async def test_a_payment_answered_is_not_written_to_the_terminal_again(tmp_path, first_reply):
    path = tmp_path / "terminal"
    device = FastTerminal(path, first_reply)
    try:
        async with worker_paying(tmp_path, path, "stx-etx-lrc") as (outlet, _):
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

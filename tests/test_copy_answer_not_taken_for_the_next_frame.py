"""The terminal's ACK or NAK of a copy is not taken as the next frame's.

An ACK or NAK names no frame. When a frame's first ACK comes late, its copy is out already,
and the terminal answers the copy too. The bridge used to write its next frame as soon as the
first ACK came: the terminal's NAK of the copy, crossing that frame on the wire, sent it a
second time (a payment the terminal had read intact: run twice), and an ACK of the copy
counted it delivered whatever the terminal made of it (review rv9). The next frame now waits
for the copy's ACK, or the copy's ACK time (see AcknowledgedFramer._hold). A NAK does not
end the wait: line noise that reads as one cannot be told from the terminal's (review rv10)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

from bridge.protocol.framing import FrameReceived
from bridge.simulator import responses

from .test_busy_record_after_nak import HandTerminal, worker_paying

ACK_TIMEOUT = 0.5


class SlowFirstAckTerminal(HandTerminal):
    """Busy when the identity check comes: its ACK, with its answer, comes 0.6 s later, after
    the bridge's ACK time-out (0.5 s), so a copy of the check goes out. The copy reaches it
    damaged: it NAKs it 0.2 s after reading it, within the copy's ACK time. It ACKs the
    payment 0.3 s after reading it and approves it.
    With `noise_first`, a noise byte that reads as NAK follows the check on the wire at once
    (the bridge writes the copy at once), and the terminal ACKs and answers the check 0.1 s
    after reading it, well within the ACK time."""

    checks = 0
    noise_first = False

    def _readable(self) -> None:
        data = b""
        with contextlib.suppress(OSError):
            data = os.read(self.master, 65536)
        events = self.framer.receive_data(data, time.monotonic())
        ack = self.framer.data_to_send()[:1]
        later = asyncio.get_running_loop().call_later
        for event in events:
            if not isinstance(event, FrameReceived):
                continue
            request = json.loads(event.payload)
            category = request["SaleToPOIRequest"]["MessageHeader"]["MessageCategory"]
            if category == "Diagnosis":
                self.checks += 1
                if self.checks == 1 and self.noise_first:
                    os.write(self.master, b"\x15")  # line noise, read as NAK
                    later(0.1, self.send, ack, responses.simple_response(request))
                elif self.checks == 1:
                    later(0.6, self.send, ack, responses.simple_response(request))
                else:
                    later(0.2, os.write, self.master, b"\x15")  # the copy, damaged
            elif category == "Payment":
                self.payments += 1
                if self.payments == 1:
                    later(0.3, self.send, ack,
                          responses.payment_response(request, "approve", time.time()))
                else:
                    later(0.3, os.write, self.master, ack)
        out = self.framer.data_to_send()
        if out:
            os.write(self.master, out)


async def pay_after_the_checks_copy(tmp_path, noise_first: bool) -> None:
    path = tmp_path / "terminal"
    device = SlowFirstAckTerminal(path, "stx-etx-lrc")
    device.noise_first = noise_first
    try:
        async with worker_paying(tmp_path, path, "stx-etx-lrc", {"ack_timeout": ACK_TIMEOUT},
                                 named_first=False) as (outlet, _):
            result = await outlet.result_for("S1", timeout=10)
            assert result.outcome == "approved"
            assert device.checks == 2  # the check's copy went out: the case under test
            assert device.payments == 1, (
                f"the payment, read intact and ACKed, was written {device.payments} times: "
                "the NAK of the identity check's copy was taken as the payment's")
    finally:
        device.close()


async def test_the_nak_of_the_identity_checks_copy_does_not_send_the_payment_again(tmp_path):
    """The payment, queued while the identity check waits for its answer, goes out once the
    check is answered; the NAK of the check's copy, read after the payment went out, was
    taken as the payment's and the payment written to the terminal again."""
    await pay_after_the_checks_copy(tmp_path, noise_first=False)


async def test_a_noise_nak_does_not_let_the_nak_of_the_checks_copy_send_the_payment_again(
        tmp_path):
    """Line noise read as NAK sends the check's copy at once; the terminal ACKs the first
    transmission in time. The noise used to count as the first transmission's reply, so no
    reply looked owed for the copy: the payment went out at the ACK, and the terminal's NAK
    of the copy was taken as the payment's, written a second time (review rv10)."""
    await pay_after_the_checks_copy(tmp_path, noise_first=True)

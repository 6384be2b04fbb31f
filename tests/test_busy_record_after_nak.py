"""A payment sent again after a NAK may have reached the terminal twice, as after silence.

A NAK byte cannot be told from line noise (nor from the terminal's NAK of noise it read as a
frame) arriving while its ACK is on the way. Then the terminal runs the first copy and may
answer the second Busy, and its record says Busy: "declined, send it again" would charge the
shopper twice. Each framer that acknowledges reports such a copy (FrameResent), as it does a
copy sent after silence; the worker marks the payment, and the status poll keeps asking."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

import pytest

from bridge.config import TerminalConfig
from bridge.daemon.journal import Journal
from bridge.daemon.worker import TerminalWorker
from bridge.protocol.framing import FrameReceived
from bridge.protocol.framing import make_framer
from bridge.protocol.messages import parse_message
from bridge.protocol.transaction import TxKey, request_digest
from bridge.simulator import responses
from bridge.simulator.server import open_pty
from bridge.transports import Backoff

from .test_terminal_worker import RecordingOutlet

POI = "V400m-324688179"


class HandTerminal:
    """A terminal's end of a pseudo-terminal, answering by hand: it names itself to the
    identity check, and a subclass's `answer` gets each other request read, with the ACK its
    framer queued for it (the subclass writes it, or drops it: an ACK lost)."""

    def __init__(self, path, framer: str) -> None:
        self.master, self.slave, _ = open_pty(path)
        os.set_blocking(self.master, False)
        self.framer = make_framer(framer)
        self.payments = 0
        self.heard = bytearray()  # every byte the bridge wrote, as read here
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    def answer(self, request: dict, category: str, ack: bytes) -> None:
        raise NotImplementedError

    def _readable(self) -> None:
        data = b""
        with contextlib.suppress(OSError):
            data = os.read(self.master, 65536)
        self.heard += data
        events = self.framer.receive_data(data, time.monotonic())
        ack = self.framer.data_to_send()  # one ACK per frame read: the same bytes each
        for event in events:
            if isinstance(event, FrameReceived):
                request = json.loads(event.payload)
                category = request["SaleToPOIRequest"]["MessageHeader"]["MessageCategory"]
                if category == "Diagnosis":
                    self.send(ack[:1], responses.simple_response(request))
                else:
                    self.answer(request, category, ack[:1])
        out = self.framer.data_to_send()  # (the bridge's ACKs of our frames, handled)
        if out:
            os.write(self.master, out)

    def send(self, ack: bytes, document: dict) -> None:
        """Our ACK of the request, then `document` as a frame of ours."""
        document["SaleToPOIResponse"]["MessageHeader"]["POIID"] = POI
        self.framer.send_frame(json.dumps(document).encode(), time.monotonic())
        os.write(self.master, ack + self.framer.data_to_send())

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)
        os.close(self.slave)


class BusyOnCopyTerminal(HandTerminal):
    """Takes the first copy of a payment (and charges it), answers Busy to a second copy,
    and from then on its record of that ServiceID says Busy (the case
    BUSY_RECORD_OF_A_COPY in bridge/protocol/outcome.py is written for).
    `first_reply`: what follows the first copy on the wire: b"\\x15" (a noise byte that reads
    as NAK, while the terminal's ACK is lost or still on its way when the copy goes out: an
    ACK that came first would take back a copy not yet written), or b"" (silence: the ACK is
    lost)."""

    def __init__(self, path, first_reply: bytes, framer: str) -> None:
        super().__init__(path, framer)
        self.first_reply = first_reply
        self.busy_response = None

    def answer(self, request: dict, category: str, ack: bytes) -> None:
        if category == "Payment":
            self.payments += 1
            if self.payments == 1:
                os.write(self.master, self.first_reply)  # no answer yet: "processing"
            else:
                self.busy_response = responses.payment_response(request, "busy", time.time())
                self.send(ack, self.busy_response)
        elif category == "TransactionStatus":
            self.send(ack, responses.status_in_progress(request) if self.busy_response is None
                      else responses.status_success(request, self.busy_response))


@contextlib.asynccontextmanager
async def worker_paying(tmp_path, path, framer: str, framer_options: dict | None = None,
                        named_first: bool = True, prepare=None, pays: bool = True,
                        **timing):
    """A TerminalWorker on the pseudo-terminal at `path` (ACK time-out 0.3 s, unless
    `framer_options` say otherwise), its device named (unless not `named_first`: the payment
    then waits for the identity check); `prepare(worker)`, if given; then POS1 pays 10.00 as
    S1 (unless not `pays`). Yields the worker's outlet and journal."""
    config = TerminalConfig.model_validate({
        "poi_id": POI, "link": {"kind": "serial", "device": str(path)},
        "framer": {"name": framer, "ack_timeout": 0.3, **(framer_options or {})},
        "payment_timeout": 3.0, "status_timeout": 0.8, "poll_floor": 0.05, **timing})
    journal = Journal(tmp_path / "journal.sqlite3")
    outlet = RecordingOutlet()
    worker = TerminalWorker(config, journal, outlet, backoff=Backoff(initial=0.05, maximum=0.2))
    await worker.start()
    try:
        await outlet.state_is("online")
        async with asyncio.timeout(10):
            while named_first and worker.identity == "unknown":
                await asyncio.sleep(0.01)
        if prepare is not None:
            prepare(worker)
        if pays:
            doc = responses.payment_request("POS1", "S1", POI, 10.0)
            worker.submit(parse_message(doc), doc, request_digest(doc))
        yield outlet, journal
    finally:
        await worker.stop()
        journal.close()


async def pay_once(tmp_path, first_reply: bytes, framer: str):
    path = tmp_path / "terminal"
    device = BusyOnCopyTerminal(path, first_reply, framer)
    try:
        async with worker_paying(tmp_path, path, framer, resync_attempts=2,
                                 reconcile_initial=0.5, reconcile_max_interval=1.0,
                                 in_progress_limit=3.0) as (outlet, journal):
            result = await outlet.result_for("S1", timeout=20, final=False)
            return device, result, journal.get(TxKey("POS1", "S1"))
    finally:
        device.close()


@pytest.mark.parametrize("framer", ["stx-etx-lrc", "dle-crc16"])
@pytest.mark.parametrize("first_reply", [b"", b"\x15"], ids=["ack-lost", "noise-nak"])
async def test_a_payment_that_reached_the_terminal_twice_is_never_told_declined(
        tmp_path, first_reply, framer):
    device, result, stored = await pay_once(tmp_path, first_reply, framer)
    assert device.payments == 2  # the terminal got the payment twice, and runs the first
    # Busy in its record answers the copy: "declined, nothing charged, send it again" would
    # have the register charge the shopper a second time.
    assert result.outcome != "declined", result.error
    assert stored.extra.get("resent_after_silence") == 1  # the mark, journaled

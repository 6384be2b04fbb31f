"""A terminal's frame write path: the session's Send actions become bytes on the link, and
the session is told which frames reached the terminal (or never did).

The TerminalWorker keeps the session, the journal step and the link; it hands the writer
what to do and when:
- encode() a Send within the step, before its commit (a frame too large for the link is
  refused in that step);
- queue() each frame once that step is committed (the worker calls it from the journal's
  after_commit(): a frame never overtakes the record it depends on), then kick();
- reset() when a link comes up, run() beside the read loop while it is up;
- acknowledged(), resent() and failed() with the framer's FrameSent, FrameResent and
  FrameFailed events.

The framer's output may hold the ACK of a terminal's answer whose record is not durable yet,
and a terminal forgets an answer it saw ACKed: it is taken only when no commit is pending
(journal.commit_pending); whoever wakes the writer otherwise (the read loop, the
retransmission timer) does so through journal.after_commit(kick).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from bridge.daemon.journal import Journal
from bridge.protocol import crypto, jsontext
from bridge.protocol.actions import Action, Send
from bridge.protocol.framing import FrameFailed, FramerEvent, FrameResent, FrameSent, Framer
from bridge.protocol.session import TerminalSession
from bridge.protocol.transaction import TxKey
from bridge.transports import Transport

log = logging.getLogger("poi_bridge.terminal")


class FrameWriter:
    def __init__(self, poi_id: str, framer: Framer, journal: Journal, session: TerminalSession,
                 apply: Callable[[list[Action]], None], clock: Callable[[], float]) -> None:
        """`apply`: carries out the session's actions for a delivery (the worker's step);
        `clock`: the session's clock."""
        self.poi_id = poi_id
        self.framer = framer
        self.journal = journal
        self.session = session
        self._apply = apply
        self._clock = clock
        self._transport: Transport | None = None  # the link run() writes to
        # frames queued: payload -> the SaleID and ServiceID it went under
        self._in_flight: deque[tuple[bytes, TxKey]] = deque()
        # Frames of a framing without ACKs (length-prefixed), delivered once written: those
        # not yet taken from the framer, and those taken but not yet all written
        self._delivered_on_write: list[TxKey] = []
        self._unwritten_frames: list[TxKey] = []
        self._write_ready = asyncio.Event()
        self._writer_idle = False  # the writer task waits with nothing in hand
        self._unwritten = b""  # what write_nowait() could not write, for the writer task

    def encode(self, action: Send, key: crypto.NexoKey | None) -> tuple[bytes, str | None]:
        """The frame's payload (encrypted with `key`, if any), and why it cannot be sent
        (it cannot be encrypted, or is over the link's max_frame_size) or None."""
        document = action.document
        if key is not None:
            try:
                document = crypto.encrypt_message(document, key)
            except crypto.CryptoError as exc:
                # One request's fault: refused alone. Raised out of the worker's step, it
                # stopped the daemon, and the broker gave it the same request at every start
                return b"", (
                    f"the request cannot be encrypted for terminal {self.poi_id} ({exc}): "
                    "nothing was sent to the terminal and nothing was charged. Send it in "
                    "clear, without NexoBlob or SecurityTrailer, with a new ServiceID")
        payload = jsontext.compact(document)
        limit = self.framer.max_frame_size
        if len(payload) <= limit:
            return payload, None
        # Nothing is written: a register's request is refused at once (not polled about,
        # which would only bring NotFound after a payment time-out), saying what to do
        size = f"{len(payload)} bytes" + (" once encrypted" if key is not None else "")
        return payload, (
            f"the request is {size}, over terminal {self.poi_id}'s frame limit "
            f"(max_frame_size {limit} bytes): nothing was sent to the terminal and "
            "nothing was charged. Send a smaller request (shorter free-text fields, fewer "
            "items) with a new ServiceID, or, if the terminal takes larger messages, have "
            "the technician raise [terminals.framer] max_frame_size")

    def queue(self, action: Send, payload: bytes) -> list[FramerEvent]:
        """Hand a frame whose step is committed to the framer; kick() writes it. Returns the
        framer's events other than FrameSent, for the worker to handle."""
        self._in_flight.append((payload, TxKey(action.sale_id, action.service_id)))
        events = self.framer.send_frame(payload, time.monotonic())
        for event in events:
            if isinstance(event, FrameSent):
                # A framing without ACKs reports the frame sent as it queues it: it is
                # delivered once the transport has written it (an abort is answered then)
                sent = self._pop_in_flight(event.payload)
                if sent is not None:
                    self._delivered_on_write.append(sent)
        return [e for e in events if not isinstance(e, FrameSent)]

    def kick(self) -> None:
        """What the framer queued goes to the terminal now: written straight to the device
        when the writer task has nothing in hand, so a frame leaves in the pass of the
        commit that released it, ahead of that commit's MQTT publishing, and without a task
        wake-up. Otherwise, and for whatever the device could not take at once, the writer
        task carries on, in order. Called only from journal.after_commit (directly, or by
        the worker once it has queued a committed step's frame)."""
        transport = self._transport
        if not self._writer_idle or self._write_ready.is_set() or transport is None:
            self._write_ready.set()
            return
        data = self.framer.data_to_send(
            time.monotonic() + transport.output_queued() * self.framer.seconds_per_byte)
        if not data:
            return
        frames, self._delivered_on_write = self._delivered_on_write, []
        written = transport.write_nowait(data)
        if written < len(data):
            self._unwritten = data[written:]
            self._unwritten_frames += frames
            self._write_ready.set()
        else:
            self._frames_written(frames)

    def reset(self) -> None:
        """A new link (its framer reset too): the frames of the last one are forgotten."""
        self._in_flight.clear()
        self._unwritten = b""
        self._delivered_on_write.clear()
        self._unwritten_frames.clear()

    def drop_unsent(self) -> None:
        """Handling what the terminal sent failed, and the link is about to be reopened:
        what the framer holds does not go out (the ACK of the frame that failed may be among
        it). Its frames are forgotten, as a reopen forgets them: their transactions are
        asked about by status poll on the new link, never sent again."""
        self.framer.reset()
        self._delivered_on_write.clear()  # (never written: not delivered)

    async def run(self, transport: Transport) -> None:
        """The writer task, while `transport` is up."""
        self._transport = transport
        try:
            while True:
                self._writer_idle = True
                await self._write_ready.wait()
                self._writer_idle = False
                self._write_ready.clear()
                pending, self._unwritten = self._unwritten, b""
                frames, self._unwritten_frames = self._unwritten_frames, []
                if self.journal.commit_pending:
                    # The framer may hold the ACK of an answer whose record is not durable
                    # yet: that goes once the commit is done (a terminal forgets an answer
                    # it saw ACKed), by kick(), straight from the commit.
                    self.journal.after_commit(self.kick)
                else:
                    # (what the framer gives now crosses the line after the rest of an
                    # earlier write and what the driver still holds)
                    behind = (len(pending) + transport.output_queued()) \
                        * self.framer.seconds_per_byte
                    pending += self.framer.data_to_send(time.monotonic() + behind)
                    frames += self._delivered_on_write
                    self._delivered_on_write = []
                if pending:
                    await transport.write(pending)
                self._frames_written(frames)
        finally:
            self._writer_idle = False

    # --- delivery -----------------------------------------------------------------------------

    def acknowledged(self, event: FrameSent) -> None:
        """The terminal acknowledged a frame: an abort is answered now
        (TerminalSession.frame_delivered)."""
        sent = self._pop_in_flight(event.payload)
        if sent is not None:
            self._frames_written([sent])

    def failed(self, event: FrameFailed) -> None:
        """The framer gave up on a frame (no ACK after its tries)."""
        sent = self._pop_in_flight(event.payload)
        # (the identity check still out: the session's warning says it, and what to check;
        # both lines for one event, with each refused payment asking again, doubled the log)
        said_by_session = sent is not None and self.session.is_identity_check(
            sent.service_id, sent.sale_id)
        log.log(logging.DEBUG if said_by_session else logging.WARNING,
                "terminal %s: %s not acknowledged by the terminal: %s", self.poi_id,
                self.session.frame_subject(sent.service_id, sent.sale_id)
                if sent is not None else "a frame", event.reason)
        if sent is not None:
            self._apply(self.session.send_failed(sent.service_id, event.reason, self._clock(),
                                                 sent.sale_id))

    def answered(self, key: TxKey) -> list[FramerEvent]:
        """The terminal sent a message under `key`'s SaleID and ServiceID: if the frame
        awaiting its ACK went under them, it reached the terminal, whatever became of the
        ACK (lost, or line noise read as a NAK): it is not sent again (a payment the terminal
        has answered would reach it twice). The framer's events, for the worker."""
        if self.framer.awaiting_ack and self._in_flight and self._in_flight[0][1] == key:
            # (by its payload: within one read the framer may have moved on to the next frame)
            return self.framer.answered(self._in_flight[0][0], time.monotonic())
        return []

    def resent(self, event: FrameResent) -> None:
        """The framer sends a frame again after the terminal's silence: the session marks a
        request that may now reach it twice (TerminalSession.frame_resent). Its step's commit
        comes before the copy is written: the timer's kick waits for it."""
        sent = next((key for payload, key in self._in_flight if payload == event.payload), None)
        if sent is not None:
            self._apply(self.session.frame_resent(sent.service_id, sent.sale_id))

    def _frames_written(self, frames: list[TxKey]) -> None:
        """These frames reached the terminal (acknowledged, or written on a link without
        ACKs)."""
        for sent in frames:
            delivered = self.session.frame_delivered(sent.service_id, self._clock(),
                                                     sent.sale_id)
            if delivered:
                self._apply(delivered)

    def _pop_in_flight(self, payload: bytes) -> TxKey | None:
        for i, (sent, key) in enumerate(self._in_flight):
            if sent == payload:
                del self._in_flight[i]
                return key
        return None

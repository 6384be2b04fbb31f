"""What the two acknowledged framings (stx-etx-lrc, dle-crc16) share.

Sending: one frame is in flight at a time and the rest wait in a queue. The peer answers a
frame with ACK (0x06) or NAK (0x15). A NAK, or no answer within `ack_timeout` of the frame's
write (data_to_send(now)), sends the same frame again, up to `max_tries` transmissions in all;
after that the frame is reported as `FrameFailed` (at the last copy's ACK deadline: a NAK on
the last try may be line noise) and the next queued frame goes out. An ACK or NAK names no
frame, and a NAK cannot be told from line noise: when a frame is acknowledged after more than
one transmission of it went out (or the peer's answer stood for a lost ACK), the next frame
waits until the last copy's ACK deadline, or until an ACK has been read for every
transmission, so that the peer's reply to a copy is not taken as the next frame's (see _hold).

Receiving: between frames only control bytes mean something (ACK, NAK, and EOT where the
framing has it). Everything else there is line noise, reported as one `FramingError` per
stretch. An ACK or NAK applies to our outstanding frame; with nothing outstanding it is ignored.
The subclasses decode frames and use `_between_frames` and `_answer` from here.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import deque
from typing import ClassVar

from bridge.protocol.framing.base import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_TRIES,
    EndOfTransmission,
    FrameFailed,
    FrameResent,
    FramerEvent,
    FrameSent,
    Framer,
    FramingError,
)

ACK = 0x06
NAK = 0x15
EOT = 0x04

_ALL_BYTES = bytes(range(256))


class AcknowledgedFramer(Framer):
    """The ACK/NAK and retransmission half of a framer; subclasses add encoding and decoding."""

    #: The bytes that mean something between frames. A subclass that lists EOT gets
    #: `EndOfTransmission` events for it.
    control_bytes: ClassVar[bytes] = bytes((ACK, NAK))

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        max_tries: int = DEFAULT_MAX_TRIES,
        seconds_per_byte: float = 0.0,
    ) -> None:
        super().__init__(max_frame_size=max_frame_size, ack_timeout=ack_timeout,
                         max_tries=max_tries, seconds_per_byte=seconds_per_byte)
        # bytes.translate(None, delete) with this keeps only the control bytes, at C speed
        self._not_control = _ALL_BYTES.translate(None, self.control_bytes)
        self._outbox = bytearray()
        self._queue: deque[tuple[bytes, bytes]] = deque()  # (payload, encoded frame)
        self._current: tuple[bytes, bytes] | None = None
        self._copies: list[int] = []  # where in _outbox copies of _current wait, unwritten
        self._first_pending = False  # _current's first transmission is in _outbox, unwritten
        self._written = False  # a transmission of _current has been taken by data_to_send()
        self._tries = 0
        self._deadline: float | None = None
        self._taken = 0  # transmissions of _current taken by data_to_send()
        self._acks = 0  # ACKs read while one of them was out (a NAK may be line noise)
        self._nak_last = False  # a NAK read on the last try: given up at the deadline
        # A frame acknowledged with more transmissions out than ACKs read for them: the ACKs
        # that would show every one answered, and until when the next frame waits (_hold)
        self._owed = 0
        self._held_until: float | None = None
        self._reset_decoder()

    # --- the decoder, in the subclass ---------------------------------------------------------

    @abstractmethod
    def _reset_decoder(self) -> None:
        """Forget every received byte (called from __init__ and reset())."""

    # --- sending ------------------------------------------------------------------------------

    def send_frame(self, payload: bytes, now: float) -> list[FramerEvent]:
        payload = bytes(payload)
        if len(payload) > self.max_frame_size:
            raise ValueError(
                f"payload of {len(payload)} bytes is over max_frame_size {self.max_frame_size}")
        frame = self.encode(payload)  # ValueError for a payload this framing cannot carry
        self._queue.append((payload, frame))
        self._transmit_next(now)
        return []

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._outbox)

    def data_to_send(self, now: float | None = None) -> bytes:
        out = bytes(self._outbox)
        if self._current is not None and self._pending:
            self._written = True
            self._taken += self._first_pending + len(self._copies)
            if now is not None:
                # The peer's time to ACK counts from the write: a frame that waited in
                # _outbox (behind a commit) is not sent again before the peer could answer.
                # And from its last byte on the line: a 64 KiB frame takes 5.7 s at 115200
                # baud, and was sent again (a second print, a second payment request) while
                # its first copy was still going out.
                self._deadline = now + len(out) * self.seconds_per_byte + self.ack_timeout
        self._outbox.clear()
        self._copies.clear()
        self._first_pending = False
        return out

    @property
    def _pending(self) -> bool:
        """A transmission of the current frame waits in _outbox, not taken yet."""
        return self._first_pending or bool(self._copies)

    def next_deadline(self) -> float | None:
        return self._held_until if self._held_until is not None else self._deadline

    def handle_timeout(self, now: float) -> list[FramerEvent]:
        events: list[FramerEvent] = []
        if self._held_until is not None and now >= self._held_until:
            self._release(now)  # the copy's answer is not coming (lost, or the peer is slow)
        elif self._deadline is not None and now >= self._deadline:
            why = ("NAK from the peer" if self._nak_last
                   else f"no ACK within {self.ack_timeout:g} s")
            self._unacknowledged(now, events, why, timed_out=True)
        return events

    def reset(self) -> None:
        self._outbox.clear()
        self._copies.clear()
        self._first_pending = self._written = self._nak_last = False
        self._queue.clear()
        self._current = None
        self._tries = self._taken = self._acks = self._owed = 0
        self._deadline = self._held_until = None
        self._reset_decoder()

    @property
    def awaiting_ack(self) -> bool:
        return self._current is not None

    def _transmit_next(self, now: float) -> None:
        if self._current is None and self._queue and self._held_until is None:
            self._current = self._queue.popleft()
            self._tries, self._taken, self._acks = 1, 0, 0
            self._outbox += self._current[1]
            self._first_pending, self._written, self._nak_last = True, False, False
            self._deadline = now + self.ack_timeout

    def answered(self, payload: bytes, now: float) -> list[FramerEvent]:
        events: list[FramerEvent] = []
        if self._current is not None and self._current[0] == payload:
            self._acknowledged(now, events)
        return events

    def _acknowledged(self, now: float, events: list[FramerEvent]) -> None:
        if self._current is None or not self._written:
            # A stray ACK: nothing of ours waits for one, or the frame that does has not
            # gone out yet (an ACK of the frame before it again, or line noise)
            return
        payload = self._current[0]
        # Copies queued after a NAK or a time-out and not taken yet: the peer has the frame,
        # and a copy now would reach it twice
        self._take_back_copies()
        owed, deadline = self._taken - self._acks, self._deadline
        self._current = None
        self._deadline = None
        events.append(FrameSent(payload))
        if owed > 0:
            self._hold(owed, deadline if deadline is not None else now + self.ack_timeout)
        self._transmit_next(now)

    def _hold(self, owed: int, until: float) -> None:
        """The frame just acknowledged had `owed` more transmissions out than ACKs read for
        them (a copy went out, after silence or a NAK; or the peer's answer stood for its
        ACK): the peer may still ACK or NAK some. A NAK read for it proves nothing: it may
        have been line noise, the peer's reply to the copy still to come. Written now, the
        next frame would take such a byte as its own: an ACK would count it delivered
        whatever became of it, a NAK would send it a second time (a payment the terminal
        read intact). So every ACK and NAK read until `until` (the last copy's ACK deadline,
        past which a reply counts as lost) is taken as this frame's, and the next frame
        waits until then, or until `owed` more ACKs show every transmission answered. Only
        after a copy, or an ACK lost: no latency otherwise (at most ack_timeout)."""
        self._owed, self._held_until = owed, until

    def _release(self, now: float) -> None:
        self._owed, self._held_until = 0, None
        self._transmit_next(now)

    def _unacknowledged(self, now: float, events: list[FramerEvent], why: str,
                        timed_out: bool = False) -> None:
        """A NAK, or the ACK timeout: send the frame again, or give up on it."""
        if self._current is None:
            return  # a stray NAK
        if self._pending:
            # A transmission of the frame is still to be written (the writer waits for a
            # commit): it answers this NAK (line noise, or about a copy before it) already,
            # and the peer's time to ACK counts from it. No try is spent on it.
            self._deadline = self._not_before_taken(now + self.ack_timeout)
            return
        if self._tries < self.max_tries:
            self._tries += 1
            # A copy met with silence may have been read; so may a NAKed one: a NAK byte
            # cannot be told from line noise (nor from the peer's NAK of noise it read as a
            # frame) arriving while the peer's ACK is still on its way. The peer may now
            # get the frame twice either way.
            events.append(FrameResent(self._current[0]))
            self._copies.append(len(self._outbox))
            self._outbox += self._current[1]
            self._deadline = self._not_before_taken(now + self.ack_timeout)
            return
        if not timed_out:
            # The last try NAKed: it may be line noise, the peer's ACK of the last copy a
            # few ms behind it (in a read of its own). Given up at that copy's ACK deadline
            # (an ACK before then acknowledges it), so that its ACK is not the next frame's.
            self._nak_last = True
            return
        payload = self._current[0]
        tries = self._tries
        self._take_back_copies()  # (given up: none goes out after FrameFailed)
        self._current = None
        self._deadline = None
        events.append(FrameFailed(payload, f"{why}; gave up after {tries} tries"))
        self._transmit_next(now)

    def _not_before_taken(self, deadline: float) -> float:
        """A copy waiting to be written does not end the ACK time of the transmission before
        it, which may still be crossing the line (_hold waits for its reply)."""
        return deadline if self._deadline is None else max(deadline, self._deadline)

    def _take_back_copies(self) -> None:
        """Remove from _outbox every copy of the current frame queued and not yet taken by
        data_to_send(); what lies between and after them (our ACKs, the next frame) stays."""
        assert self._current is not None
        frame = self._current[1]
        for at in reversed(self._copies):  # the last first: earlier positions stay valid
            if self._outbox[at:at + len(frame)] == frame:
                del self._outbox[at:at + len(frame)]
        self._copies.clear()

    # --- receiving: helpers for the decoders --------------------------------------------------

    def _between_frames(self, segment: bytes | bytearray, now: float,
                        events: list[FramerEvent]) -> None:
        """Bytes outside any frame: act on the control bytes, report the rest as noise."""
        if not segment:
            return
        controls = segment.translate(None, self._not_control)
        noise = len(segment) - len(controls)
        if noise:
            events.append(FramingError("line noise between frames", noise))
        for byte in controls:
            if byte == EOT:  # only listed by framings that have it
                events.append(EndOfTransmission())
                continue
            if self._held_until is not None:
                # a reply to a transmission of the frame acknowledged before (see _hold)
                if byte == ACK:
                    self._owed -= 1
                    if not self._owed:
                        self._release(now)
                continue
            if byte == ACK:
                if self._current is not None and self._written:
                    self._acks += 1
                self._acknowledged(now, events)
            else:
                self._unacknowledged(now, events, "NAK from the peer")

    def _answer(self, good: bool) -> None:
        """Queue our ACK for a good frame or NAK for a damaged one."""
        self._outbox.append(ACK if good else NAK)

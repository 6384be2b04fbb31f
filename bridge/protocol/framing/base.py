"""The one interface every framer implements, and the events framers produce.

A framer is sans-I/O: the caller feeds it the bytes read from the link and the current time,
writes out whatever `data_to_send()` returns, and calls `handle_timeout()` once
`next_deadline()` has passed. Framers never raise on received bytes: anything that is not a
valid frame becomes a `FramingError` event and the decoder resynchronises.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

DEFAULT_MAX_FRAME_SIZE = 64 * 1024
DEFAULT_ACK_TIMEOUT = 2.0
DEFAULT_MAX_TRIES = 3


@dataclass(frozen=True, slots=True)
class FrameReceived:
    """A complete, checked frame arrived; `payload` is the message without framing."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class FrameSent:
    """The peer acknowledged our frame (or the framing has no acknowledgement)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class FrameResent:
    """Our frame goes out again, because the peer said nothing (no ACK, no NAK) in time or a
    NAK came (which line noise can fake): it may have read the copy before, so its
    application may get the frame twice. Reported as the copy is queued, before it is
    written (data_to_send)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class FrameFailed:
    """Our frame was not acknowledged after every try; the link is probably down."""

    payload: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class FramingError:
    """Bytes were discarded: garbage, bad checksum, truncated or oversize frame."""

    reason: str
    discarded: int


@dataclass(frozen=True, slots=True)
class EndOfTransmission:
    """The peer sent EOT: the conversation is over (stx-etx-lrc)."""


FramerEvent = (FrameReceived | FrameSent | FrameResent | FrameFailed | FramingError
               | EndOfTransmission)


class Framer(ABC):
    """Turns a byte stream into frames and frames into bytes, with acknowledgement where the
    framing has it. One instance per link; reset it when the link is reopened."""

    name: ClassVar[str]

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        max_tries: int = DEFAULT_MAX_TRIES,
        seconds_per_byte: float = 0.0,
    ) -> None:
        if max_frame_size < 1:
            raise ValueError("max_frame_size must be at least 1 byte")
        if ack_timeout <= 0:
            raise ValueError("ack_timeout must be positive")
        if max_tries < 1:
            raise ValueError("max_tries must be at least 1")
        if seconds_per_byte < 0:
            raise ValueError("seconds_per_byte must not be negative")
        self.max_frame_size = max_frame_size
        self.ack_timeout = ack_timeout
        self.max_tries = max_tries
        # The line's time per byte (serial: start, data, parity and stop bits at the baud
        # rate): the peer can ACK a frame only once its last byte has crossed the line
        self.seconds_per_byte = seconds_per_byte

    @abstractmethod
    def encode(self, payload: bytes) -> bytes:
        """The bytes of one frame carrying `payload` (pure; no state change)."""

    @abstractmethod
    def receive_data(self, data: bytes, now: float) -> list[FramerEvent]:
        """Feed bytes read from the link. Never raises on any byte sequence."""

    @abstractmethod
    def send_frame(self, payload: bytes, now: float) -> list[FramerEvent]:
        """Queue `payload` for sending. Frames go out one at a time: the next is sent once the
        previous one is acknowledged or has failed. Raises ValueError if the payload is larger
        than max_frame_size (the caller's bug, not line noise)."""

    @abstractmethod
    def data_to_send(self, now: float | None = None) -> bytes:
        """Bytes to write to the link now (frames, retransmissions, ACK/NAK); drains the buffer.
        `now`: the time they are written (or, behind bytes still on their way, the time those
        will have crossed the line); the peer's time to acknowledge a frame among them counts
        from when they have all crossed it, at seconds_per_byte (without `now`, from when the
        frame was queued: for tools and tests with no clock)."""

    @property
    @abstractmethod
    def has_data_to_send(self) -> bool:
        """Whether data_to_send() would return bytes (without draining them)."""

    @abstractmethod
    def next_deadline(self) -> float | None:
        """When `handle_timeout` must next be called, or None if nothing is pending."""

    @abstractmethod
    def handle_timeout(self, now: float) -> list[FramerEvent]:
        """Retransmit or give up on an unacknowledged frame whose deadline has passed."""

    @abstractmethod
    def reset(self) -> None:
        """Forget buffered bytes and pending frames (the link was closed and reopened)."""

    @property
    @abstractmethod
    def awaiting_ack(self) -> bool:
        """True while a sent frame waits for the peer's acknowledgement."""

    def answered(self, payload: bytes, now: float) -> list[FramerEvent]:
        """The peer's application answered the frame of `payload` (the caller read its answer
        under that frame's IDs): if it is the frame awaiting its ACK and it has gone out, it
        reached the peer, whatever became of the ACK (lost on the line, or line noise read
        as a NAK). It counts as acknowledged (FrameSent) and is not sent again. A framing
        without ACKs has nothing awaiting one."""
        return []

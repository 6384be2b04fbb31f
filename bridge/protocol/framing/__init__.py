"""Framers: sans-I/O codecs between a byte stream and whole messages.

    framer = make_framer("stx-etx-lrc")
    events = framer.receive_data(bytes_read, now)  # FrameReceived, FrameSent, ...
    events += framer.send_frame(payload, now)
    link.write(framer.data_to_send(now))            # frames, retransmissions, ACK/NAK
    if framer.next_deadline() is not None and now >= framer.next_deadline():
        events += framer.handle_timeout(now)
"""

from __future__ import annotations

from bridge.protocol.framing.base import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_TRIES,
    EndOfTransmission,
    FrameFailed,
    FrameResent,
    FrameReceived,
    FramerEvent,
    FrameSent,
    Framer,
    FramingError,
)
from bridge.protocol.framing.dle_crc16 import DleCrc16Framer
from bridge.protocol.framing.length_prefixed import LengthPrefixedFramer
from bridge.protocol.framing.stx_etx_lrc import StxEtxLrcFramer

FRAMERS: dict[str, type[Framer]] = {
    cls.name: cls for cls in (StxEtxLrcFramer, DleCrc16Framer, LengthPrefixedFramer)
}


def make_framer(
    name: str,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ack_timeout: float = DEFAULT_ACK_TIMEOUT,
    max_tries: int = DEFAULT_MAX_TRIES,
    seconds_per_byte: float = 0.0,
) -> Framer:
    """A new framer of the named kind; ValueError naming the known ones for any other name."""
    try:
        cls = FRAMERS[name]
    except KeyError:
        known = ", ".join(sorted(FRAMERS))
        raise ValueError(f"unknown framer {name!r}; known framers: {known}") from None
    return cls(max_frame_size=max_frame_size, ack_timeout=ack_timeout, max_tries=max_tries,
               seconds_per_byte=seconds_per_byte)


__all__ = [
    "DEFAULT_ACK_TIMEOUT",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_TRIES",
    "FRAMERS",
    "DleCrc16Framer",
    "EndOfTransmission",
    "FrameFailed",
    "FrameResent",
    "FrameReceived",
    "FrameSent",
    "Framer",
    "FramerEvent",
    "FramingError",
    "LengthPrefixedFramer",
    "StxEtxLrcFramer",
    "make_framer",
]

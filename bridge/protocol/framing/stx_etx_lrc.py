"""STX/ETX/LRC framing, as on Ingenico "Concert"-style serial links.

A frame is `STX(0x02) payload ETX(0x03) LRC`, where LRC is the XOR of every byte after STX up to
and including ETX. The receiver answers ACK (0x06) for a good frame and NAK (0x15) for a bad
LRC; EOT (0x04) from the peer ends a conversation. SaleToPOI payloads are JSON or XML, which
never contain raw control characters, so there is no byte stuffing: a payload holding STX or
ETX cannot be sent.

Resynchronisation. The decoder is always in one of three states:

* hunting, between frames: everything before the next STX is outside any frame. ACK, NAK and
  EOT there act; any other byte is line noise, reported as one `FramingError` per stretch.
* in a frame, after an STX: an STX before the ETX means the frame was cut short (a truncated
  frame or noise that looked like a frame start). It is reported and the frame restarts at the
  new STX, so a good frame right after garbage is never lost. After ETX comes the LRC byte:
  good -> `FrameReceived` + ACK; bad -> NAK + `FramingError`, back to hunting. One exception:
  if the byte in the LRC position is itself an STX and does not match, the "frame" was most
  likely noise ending in ETX and the STX opens the peer's real frame; it is kept as a frame
  start and no NAK is sent. (If it does match, the bytes form a valid frame by definition and
  are delivered: that collision is inherent to the framing.)
* skipping an oversize frame: when no ETX comes within `max_frame_size` payload bytes, what
  was buffered is dropped and reported; the rest of that frame is dropped up to its ETX and
  LRC byte (no answer: sending it again would not make it fit) or up to a new STX, which
  starts a frame as above.

At most STX + max_frame_size + ETX + LRC bytes are ever buffered.
"""

from __future__ import annotations

from bridge.protocol.framing.acknowledged import ACK, EOT, NAK, AcknowledgedFramer
from bridge.protocol.framing.base import FrameReceived, FramerEvent, FramingError

STX = 0x02
ETX = 0x03

_HUNT, _FRAME, _SKIP = range(3)


def lrc(data: bytes | bytearray) -> int:
    """XOR of all bytes of `data` (0 for no bytes).

    The bytes are read as one integer and folded in halves, so the work is a handful of
    big-integer operations done in C instead of one Python step per byte."""
    size = len(data)
    value = int.from_bytes(data, "little")
    while size > 1:
        high = size >> 1
        bits = (size - high) * 8
        value = (value & ((1 << bits) - 1)) ^ (value >> bits)
        size -= high
    return value


class StxEtxLrcFramer(AcknowledgedFramer):
    """`STX payload ETX LRC` with ACK/NAK, retransmission and EOT."""

    name = "stx-etx-lrc"
    control_bytes = bytes((ACK, NAK, EOT))

    def encode(self, payload: bytes) -> bytes:
        payload = bytes(payload)
        if STX in payload or ETX in payload:
            raise ValueError("an stx-etx-lrc payload must not contain STX (0x02) or ETX (0x03)")
        body = payload + b"\x03"
        return b"\x02" + body + bytes((lrc(body),))

    # --- decoding -----------------------------------------------------------------------------

    def _reset_decoder(self) -> None:
        self._buf = bytearray()
        self._state = _HUNT
        self._scan = 1  # in a frame: buf[1:_scan] is known to hold no STX and no ETX
        self._skipped = 0  # bytes of an oversize frame dropped since the last report

    def receive_data(self, data: bytes, now: float) -> list[FramerEvent]:
        events: list[FramerEvent] = []
        self._buf += data
        while True:
            if self._state == _HUNT:
                more = self._hunt(now, events)
            elif self._state == _FRAME:
                more = self._frame(events)
            else:
                more = self._skip(events)
            if not more:
                return events

    def _hunt(self, now: float, events: list[FramerEvent]) -> bool:
        buf = self._buf
        start = buf.find(STX)
        if start < 0:
            self._between_frames(buf, now, events)
            buf.clear()
            return False
        if start:
            self._between_frames(buf[:start], now, events)
            del buf[:start]
        self._state = _FRAME
        self._scan = 1
        return True

    def _frame(self, events: list[FramerEvent]) -> bool:
        buf = self._buf
        limit = self.max_frame_size + 2  # STX + the largest payload + ETX
        # Every STX before the ETX cuts the frame before it short. A run of them (a terminal
        # sending 0x02 over and over) restarts at its last one, reported once: one event per
        # byte stalled the worker's loop for seconds. Jumping to the last STX within reach
        # ends where restarting at each in turn would, oversize checks included.
        cut_short = 0
        while True:
            end = min(len(buf), limit)
            etx = buf.find(ETX, self._scan, end)
            stx = buf.rfind(STX, self._scan, end if etx < 0 else etx)
            if stx < 0:
                break
            cut_short += stx
            del buf[:stx]
            self._scan = 1
        if cut_short:
            events.append(FramingError("truncated frame: STX before ETX", cut_short))
        if etx < 0:
            if len(buf) >= limit:
                events.append(FramingError(
                    f"oversize frame: no ETX within {self.max_frame_size} bytes", limit))
                del buf[:limit]
                self._state = _SKIP
                self._skipped = 0
                return True
            self._scan = len(buf)
            return False
        if etx + 1 >= len(buf):
            self._scan = etx  # the LRC byte has not arrived yet
            return False
        check = buf[etx + 1]
        if check == lrc(buf[1:etx + 1]):
            events.append(FrameReceived(bytes(buf[1:etx])))
            self._answer(True)
            del buf[:etx + 2]
            self._state = _HUNT
            return True
        if check == STX:
            events.append(FramingError("bad LRC; the LRC byte is an STX, taken as a frame start",
                                       etx + 1))
            del buf[:etx + 1]
            self._scan = 1
            return True
        self._answer(False)
        events.append(FramingError("bad LRC", etx + 2))
        del buf[:etx + 2]
        self._state = _HUNT
        return True

    def _skip(self, events: list[FramerEvent]) -> bool:
        buf = self._buf
        etx = buf.find(ETX)
        stx = buf.find(STX, 0, len(buf) if etx < 0 else etx)
        if stx >= 0:
            cut = stx
        elif etx < 0:
            self._skipped += len(buf)
            buf.clear()
            return False
        elif etx + 1 >= len(buf):
            self._skipped += etx  # keep the ETX until its LRC byte arrives
            del buf[:etx]
            return False
        else:
            # the byte after ETX is the oversize frame's LRC, unless it is an STX (see above)
            cut = etx + 1 if buf[etx + 1] == STX else etx + 2
        total = self._skipped + cut
        if total:
            events.append(FramingError("rest of an oversize frame", total))
        self._skipped = 0
        del buf[:cut]
        self._state = _HUNT
        return True

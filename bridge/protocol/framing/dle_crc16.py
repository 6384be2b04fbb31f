"""DLE/CRC-16 framing, as on ZVT-style serial links.

A frame is `DLE STX` + the payload with every DLE (0x10) doubled + `DLE ETX` + CRC-16/KERMIT
of the unstuffed payload followed by the ETX byte, low byte first (the CRC is not stuffed).
The receiver answers ACK (0x06) or NAK (0x15); the sender retransmits as in `acknowledged`.

Resynchronisation. Inside a frame a DLE is always followed by DLE (a data DLE), ETX (the end)
or STX (a new frame start: the frame was truncated). The decoder is hunting, in a frame, or
skipping the rest of a broken frame:

* hunting: everything before the next `DLE STX` is outside any frame; ACK and NAK act, the
  rest is line noise. A DLE at the very end is kept in case an STX follows.
* in a frame: `DLE STX` restarts the frame (the cut-short one is reported); `DLE ETX` is
  followed by the two CRC bytes. Good CRC -> `FrameReceived` + ACK. A DLE followed by any
  other byte is bad stuffing: reported, and the rest of the frame is skipped.

  A stray DLE in garbage can shift the DLE pairing, so that the `DLE STX` opening a good
  frame is read as a data DLE followed by a data STX (`DLE DLE STX`). Every such spot in a
  frame is therefore a possible frame start. When the CRC fails, the frame is checked again
  from each of them in turn (they share the same end and CRC bytes), and the first that
  checks is delivered after reporting the garbage before it. The first
  MAX_RESYNC_CANDIDATES are tried; only line noise crafted with more than that many
  `DLE DLE STX` in one frame could hide a frame behind them. If nothing checks, the decoder
  NAKs and goes back to hunting. Like the frame start, a frame start overlapping the
  rejected CRC bytes is kept, and then there is no NAK (the "frame" was noise that ran
  into the peer's next frame).
* oversize: when the unstuffed payload passes `max_frame_size`, the frame restarts at its
  first possible frame start (`DLE DLE STX`, see above), if any, otherwise the rest of the
  frame is skipped: up to its `DLE ETX` and CRC, with no answer, or up to a `DLE STX` or a
  `DLE DLE STX` (the latter can be a frame start after a stray DLE), which starts a frame.
  A skipped frame with bad stuffing is NAKed at its end; an oversize one is not (sending it
  again would not make it fit). Restarts in a row within one read are one FramingError.

At most DLE STX + max_frame_size stuffed bytes (2 x max_frame_size at worst) + DLE ETX +
CRC bytes are buffered.
"""

from __future__ import annotations

import binascii
import re

from bridge.protocol.framing.acknowledged import AcknowledgedFramer
from bridge.protocol.framing.base import FrameReceived, FramerEvent, FramingError

DLE = 0x10
STX = 0x02
ETX = 0x03

MAX_RESYNC_CANDIDATES = 64

_DLE_STX = b"\x10\x02"
_DLE_DLE = b"\x10\x10"
_STARTS = re.compile(rb"(?:\x10\x02)+")  # a run of DLE STX
_HUNT, _FRAME, _SKIP = range(3)

# byte -> the same byte with its bits in reverse order
_MIRROR = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def crc16_kermit(data: bytes | bytearray) -> int:
    """CRC-16/KERMIT (poly 0x1021 reflected = 0x8408, init 0, no final XOR); check value
    crc16_kermit(b"123456789") == 0x2189.

    KERMIT is the bit-mirror image of CRC-16/XMODEM: mirror every input byte, run XMODEM
    (binascii.crc_hqx, a 256-entry-table CRC in C), mirror the 16-bit result. Same value as a
    Python table loop, about twenty times faster on an 11 KB frame."""
    register = binascii.crc_hqx(data.translate(_MIRROR), 0)
    return _MIRROR[register >> 8] | (_MIRROR[register & 0xFF] << 8)


def _unstuff(stuffed: bytes | bytearray) -> bytes:
    return bytes(stuffed).replace(_DLE_DLE, b"\x10")


def _end_of_starts(buf: bytearray, start: int) -> int:
    """Where the run of whole DLE STX pairs at buf[start] ends (in C, not a step per pair,
    and no copy: a short run costs what one pair did)."""
    run = _STARTS.match(buf, start)
    return run.end() if run else start


class DleCrc16Framer(AcknowledgedFramer):
    """`DLE STX` stuffed payload `DLE ETX` CRC-16/KERMIT, with ACK/NAK and retransmission."""

    name = "dle-crc16"

    def encode(self, payload: bytes) -> bytes:
        payload = bytes(payload)
        crc = crc16_kermit(payload + b"\x03")
        return b"".join((_DLE_STX, payload.replace(b"\x10", _DLE_DLE), b"\x10\x03",
                         crc.to_bytes(2, "little")))

    # --- decoding -----------------------------------------------------------------------------

    def _reset_decoder(self) -> None:
        self._buf = bytearray()
        self._state = _HUNT
        # in a frame (the buffer starts with DLE STX): buf[2:_scan] is parsed content, in
        # which _escapes DLE pairs stand for one data DLE each
        self._scan = 2
        self._escapes = 0
        self._skipped = 0  # bytes of a broken frame dropped since the last report
        self._skip_nak = False  # NAK the skipped frame at its end (bad stuffing, not oversize)

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

    def _begin_frame(self) -> None:
        self._state = _FRAME
        self._scan = 2
        self._escapes = 0

    def _begin_skip(self, *, nak: bool) -> None:
        self._state = _SKIP
        self._skipped = 0
        self._skip_nak = nak

    def _hunt(self, now: float, events: list[FramerEvent]) -> bool:
        buf = self._buf
        start = buf.find(_DLE_STX)
        if start < 0:
            cut = len(buf) - 1 if buf and buf[-1] == DLE else len(buf)
            if cut:
                self._between_frames(buf[:cut], now, events)
                del buf[:cut]
            return False
        if start:
            self._between_frames(buf[:start], now, events)
            del buf[:start]
        self._begin_frame()
        return True

    def _frame(self, events: list[FramerEvent]) -> bool:
        buf = self._buf
        size = len(buf)
        scan = self._scan
        # Frames cut short by a DLE STX, reported once when the scan stops: a terminal sending
        # DLE STX over and over would otherwise make one event per pair, and the worker's loop
        # stalled for seconds on them.
        cut_short = 0
        while True:
            # the first stuffed position at which the unstuffed payload would be oversize
            limit = 3 + self.max_frame_size + self._escapes
            i = buf.find(DLE, scan, min(size, limit))
            follower = buf[i + 1] if 0 <= i < size - 1 else None
            if follower == STX:
                # a run of DLE STX: each cuts the one before short; the frame opens at the last
                last = _end_of_starts(buf, i) - 2
                cut_short += last
                del buf[:last]
                size -= last
                scan = 2
                self._escapes = 0
                continue
            if follower == DLE:
                self._escapes += 1
                scan = i + 2
                continue
            if cut_short:
                events.append(FramingError("truncated frame: DLE STX before DLE ETX", cut_short))
                cut_short = 0
            if i < 0:
                if size >= limit:
                    more = self._oversize(limit, events)
                    if not more or self._state != _FRAME:
                        return more
                    # restarted at a frame start inside it: scan on, here (noise can make a
                    # restart every 3 bytes)
                    size = len(buf)
                    scan = self._scan
                    continue
                self._scan = size
                return False
            if follower is None:
                self._scan = i  # the byte after this DLE has not arrived yet
                return False
            if follower == ETX:
                return self._terminated(i, events)
            events.append(FramingError(
                f"bad byte stuffing: DLE followed by 0x{follower:02x}", i + 2))
            del buf[:i + 2]
            self._begin_skip(nak=True)
            return True

    def _terminated(self, etx: int, events: list[FramerEvent]) -> bool:
        """buf[etx:etx+2] is the DLE ETX ending the frame that starts at buf[0]."""
        buf = self._buf
        if etx + 4 > len(buf):
            self._scan = etx  # the CRC bytes have not arrived yet
            return False
        crc = buf[etx + 2] | (buf[etx + 3] << 8)
        payload = _unstuff(buf[2:etx]) if self._escapes else bytes(buf[2:etx])
        if crc16_kermit(payload + b"\x03") == crc:
            return self._deliver(payload, etx + 4, events)
        # maybe garbage with a stray DLE ran into a good frame: try each DLE DLE STX inside
        start = buf.find(_DLE_STX, 2, etx)
        tried = 0
        while start >= 0 and tried < MAX_RESYNC_CANDIDATES:
            tried += 1
            payload = _unstuff(buf[start + 2:etx])
            if crc16_kermit(payload + b"\x03") == crc:
                events.append(FramingError("garbage before a frame", start))
                return self._deliver(payload, etx + 4, events)
            start = buf.find(_DLE_STX, start + 2, etx)
        return self._drop_broken(etx + 2, "bad CRC", 0, nak=True, events=events)

    def _deliver(self, payload: bytes, end: int, events: list[FramerEvent]) -> bool:
        events.append(FrameReceived(payload))
        self._answer(True)
        del self._buf[:end]
        self._state = _HUNT
        return True

    def _drop_broken(self, crc_at: int, reason: str, already: int, *, nak: bool,
                     events: list[FramerEvent]) -> bool:
        """Drop a broken frame whose two CRC bytes are buf[crc_at:crc_at+2] (both present),
        keeping a frame start that overlaps them; `already` bytes of it were dropped before."""
        buf = self._buf
        if buf[crc_at] == DLE and buf[crc_at + 1] == STX:
            cut = crc_at
            nak = False
        elif buf[crc_at + 1] == DLE:
            cut = crc_at + 1  # kept: hunting sees whether an STX follows
            if crc_at + 2 < len(buf) and buf[crc_at + 2] == STX:
                nak = False
        else:
            cut = crc_at + 2
        if nak:
            self._answer(False)
        events.append(FramingError(reason, already + cut))
        del buf[:cut]
        self._state = _HUNT
        return True

    def _oversize(self, limit: int, events: list[FramerEvent]) -> bool:
        """The unstuffed payload of the frame at buf[0] passes max_frame_size at buf[limit]."""
        buf = self._buf
        if buf[limit - 1] == DLE and limit == len(buf):
            # a DLE pair ends the parsed bytes: if an STX follows, its second DLE may start a
            # frame (DLE DLE STX), so wait for the next byte before deciding
            self._scan = limit
            return False
        start = buf.find(_DLE_STX, 2, limit + 1)
        if start >= 0:
            # buf[2:start+1] is whole DLE pairs and other bytes: count the pairs left behind
            self._escapes -= buf.count(_DLE_DLE, 2, start + 1)
            reason = (f"oversize frame: over {self.max_frame_size} bytes; restarting at a"
                      " possible frame start inside it")
            last = events[-1] if events else None
            if isinstance(last, FramingError) and last.reason == reason:
                # Restarts in a row (nothing else happened since the last one in this read)
                # are reported as one: noise like DLE STX + (DLE DLE STX) x n restarts every
                # 3 bytes once past the limit, and one event each stalled the worker's loop
                # (2 s per 64 KiB read), which told the session each time.
                events[-1] = FramingError(reason, last.discarded + start)
            else:
                events.append(FramingError(reason, start))
            del buf[:start]
            self._scan = max(2, limit - start)
            return True
        events.append(FramingError(f"oversize frame: over {self.max_frame_size} bytes", limit))
        del buf[:limit]
        self._begin_skip(nak=False)
        return True

    def _skip(self, events: list[FramerEvent]) -> bool:
        """Drop the rest of a broken frame, keeping the DLE pairing; buf[0] starts a pair or a
        plain byte."""
        buf = self._buf
        size = len(buf)
        pos = 0
        while True:
            i = buf.find(DLE, pos)
            if i < 0:
                self._skipped += size
                buf.clear()
                return False
            if i + 1 >= size:
                break
            follower = buf[i + 1]
            if follower == DLE:
                if i + 2 >= size:
                    break
                if buf[i + 2] == STX:  # DLE DLE STX: maybe a stray DLE, then a frame start
                    return self._end_skip(i + 1, events)
                pos = i + 2
            elif follower == STX:
                return self._end_skip(i, events)
            elif follower == ETX:
                if i + 4 > size:
                    break
                reason = "rest of a corrupt frame" if self._skip_nak else \
                    "rest of an oversize frame"
                already = self._skipped
                self._skipped = 0
                return self._drop_broken(i + 2, reason, already, nak=self._skip_nak,
                                         events=events)
            else:
                pos = i + 2  # more bad stuffing in a frame already known to be broken
        # wait for more bytes, keeping the unfinished DLE sequence at buf[i:]
        self._skipped += i
        del buf[:i]
        return False

    def _end_skip(self, cut: int, events: list[FramerEvent]) -> bool:
        total = self._skipped + cut
        if total:
            events.append(FramingError(
                "rest of a corrupt frame" if self._skip_nak else "rest of an oversize frame",
                total))
        self._skipped = 0
        del self._buf[:cut]
        self._begin_frame()
        return True

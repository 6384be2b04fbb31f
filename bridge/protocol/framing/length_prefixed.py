"""Length-prefixed framing, for links that already guarantee integrity (TCP, USB bulk).

A frame is a 4-byte big-endian length followed by that many payload bytes. There is no
acknowledgement: `send_frame` reports `FrameSent` at once.

This framing carries JSON objects and XML documents (SaleToPOI JSON, OPI XML) and nothing
else: a payload must start with `{` or `<` and end with `}` or `>` (trailing spaces, tabs,
CR and LF allowed). `encode` refuses anything else, and the decoder uses the same rule as its
plausibility check, because there is no sync byte and no checksum to tell a frame from noise.

Resynchronisation. The decoder reads a candidate header at the front of its buffer and
accepts it only if the length is 1..max_frame_size, the first payload byte is `{` or `<`, and
once the payload is complete its last non-blank byte is `}` or `>`. Otherwise the candidate is
rejected and the decoder moves on by at least one byte, straight to the next position whose
fifth byte is `{` or `<` (the only positions where a frame can begin), so stretches of noise
and oversize frames are crossed with a couple of `find` calls instead of byte by byte. Since
nothing is delivered before a candidate is complete and checked, rejecting a candidate
rescans the bytes it had claimed, and a good frame inside them is found.

A candidate whose claimed payload has not all arrived is kept while bytes keep coming. If no
byte arrives for `stall_timeout` seconds (default ack_timeout x max_tries) the candidate is
taken for noise with a plausible-looking header: `next_deadline()` reports that time, and
`handle_timeout()` rejects the candidate and rescans what followed it. Each stretch of
rejected bytes is reported as one `FramingError` naming the first reason.

At most 4 + max_frame_size bytes plus one read are buffered.
"""

from __future__ import annotations

from bridge.protocol.framing.base import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_TRIES,
    FrameReceived,
    FramerEvent,
    FrameSent,
    Framer,
    FramingError,
)

HEADER_SIZE = 4
MAX_LENGTH = 0xFFFFFFFF

_OPENERS = b"{<"
_CLOSERS = b"}>"
_BLANKS = b" \t\r\n"


# Blank runs are crossed a block at a time (see LengthPrefixedFramer._last_solid)
_BLOCK = 32


def _ends_plausibly(data: bytes | bytearray, start: int, end: int) -> bool:
    """Whether the last non-blank byte of data[start:end] is `}` or `>` (blanks stripped in
    C; the decoder uses LengthPrefixedFramer._ends_plausibly, which remembers blank runs)."""
    solid = data[start:end].rstrip(_BLANKS)
    return bool(solid) and solid[-1] in _CLOSERS


class LengthPrefixedFramer(Framer):
    """4-byte big-endian length + a JSON or XML payload; no acknowledgement."""

    name = "length-prefixed"

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        max_tries: int = DEFAULT_MAX_TRIES,
        stall_timeout: float | None = None,
        seconds_per_byte: float = 0.0,
    ) -> None:
        super().__init__(max_frame_size=max_frame_size, ack_timeout=ack_timeout,
                         max_tries=max_tries, seconds_per_byte=seconds_per_byte)
        if stall_timeout is None:
            stall_timeout = ack_timeout * max_tries
        if stall_timeout <= 0:
            raise ValueError("stall_timeout must be positive")
        self.stall_timeout = stall_timeout
        self._buf = bytearray()
        self._outbox = bytearray()
        self._stall_deadline: float | None = None
        # For the plausibility check of candidates ending in blanks: the stream position of
        # buf[0], and for each block of _BLOCK bytes (numbered by stream position) the stream
        # position of the last non-blank byte at or before its end. Bytes at a stream
        # position never change (the buffer only loses its front and grows at its back), so
        # an entry stays true while its block is buffered: a run of blanks is read once,
        # however many candidates end in it.
        self._origin = 0
        self._solid: dict[int, int] = {}

    def encode(self, payload: bytes) -> bytes:
        payload = bytes(payload)
        if not payload or payload[0] not in _OPENERS \
                or not _ends_plausibly(payload, 0, len(payload)):
            raise ValueError("a length-prefixed payload must be a JSON object or an XML"
                             " document: start with '{' or '<', end with '}' or '>'")
        if len(payload) > MAX_LENGTH:
            raise ValueError(f"payload of {len(payload)} bytes does not fit a 4-byte length")
        return len(payload).to_bytes(HEADER_SIZE, "big") + payload

    def send_frame(self, payload: bytes, now: float) -> list[FramerEvent]:
        payload = bytes(payload)
        if len(payload) > self.max_frame_size:
            raise ValueError(
                f"payload of {len(payload)} bytes is over max_frame_size {self.max_frame_size}")
        self._outbox += self.encode(payload)
        return [FrameSent(payload)]

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._outbox)

    def data_to_send(self, now: float | None = None) -> bytes:
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def next_deadline(self) -> float | None:
        return self._stall_deadline

    def handle_timeout(self, now: float) -> list[FramerEvent]:
        events: list[FramerEvent] = []
        if self._stall_deadline is not None and now >= self._stall_deadline:
            self._parse(now, events,
                        stalled=f"truncated frame: no byte for {self.stall_timeout:g} s")
        return events

    def reset(self) -> None:
        self._buf.clear()
        self._outbox.clear()
        self._stall_deadline = None
        self._origin = 0
        self._solid.clear()

    @property
    def awaiting_ack(self) -> bool:
        return False

    def receive_data(self, data: bytes, now: float) -> list[FramerEvent]:
        events: list[FramerEvent] = []
        self._buf += data
        self._parse(now, events)
        return events

    def _parse(self, now: float, events: list[FramerEvent], stalled: str | None = None) -> None:
        """Deliver every complete frame in the buffer; `stalled` rejects the first candidate
        even though its payload is incomplete (the reason it is given)."""
        buf = self._buf
        pos = 0  # the candidate frame start; buf[:pos] is rejected
        reason = ""  # why the first byte of buf[:pos] was rejected
        waiting = False
        openers = [-1, -1]  # where `{` and `<` were last found (valid until buf changes)
        while len(buf) - pos > HEADER_SIZE:
            length = int.from_bytes(buf[pos:pos + HEADER_SIZE], "big")
            body = pos + HEADER_SIZE
            if length == 0:
                why = "frame of length 0"
            elif length > self.max_frame_size:
                # (A frame too big to keep starts like a document; noise read as a length
                # almost always passes the limit: the daemon treats the two differently)
                what = "oversize frame" if buf[body] in _OPENERS else "not a frame"
                why = f"{what}: length {length} > {self.max_frame_size}"
            elif buf[body] not in _OPENERS:
                why = "payload does not start with '{' or '<'"
            elif body + length > len(buf):
                if stalled is None:
                    waiting = True
                    break
                why, stalled = stalled, None
            elif self._ends_plausibly(body, body + length):
                if pos:
                    events.append(FramingError(reason, pos))
                events.append(FrameReceived(bytes(buf[body:body + length])))
                del buf[:body + length]
                self._origin += body + length
                pos = 0
                openers = [-1, -1]
                continue
            else:
                why = "payload does not end with '}' or '>'"
            if not pos:
                reason = why
            pos = self._next_candidate(pos + 1, openers)
        if pos:
            events.append(FramingError(reason, pos))
            del buf[:pos]
            self._origin += pos
        if len(self._solid) > 2 * (len(buf) // _BLOCK) + 64:
            # forget the blocks no longer buffered (amortised: at least half of them go)
            first = self._origin // _BLOCK
            self._solid = {block: at for block, at in self._solid.items() if block >= first}
        self._stall_deadline = now + self.stall_timeout if waiting else None

    def _ends_plausibly(self, start: int, end: int) -> bool:
        """Whether the last non-blank byte of buf[start:end] is `}` or `>` (same answer as the
        module's _ends_plausibly)."""
        last = self._buf[end - 1] if end > start else 0
        if last not in _BLANKS:
            return last in _CLOSERS
        solid = self._last_solid(start, end)
        return solid >= start and self._buf[solid] in _CLOSERS

    def _last_solid(self, start: int, end: int) -> int:
        """The index of the last non-blank byte of buf[start:end], start - 1 if none.

        A candidate's payload can end anywhere in a long run of blanks, and crafted input can
        make thousands of candidates end in the same run: walking back over it for each one
        made the decoder quadratic (seconds of CPU for 40 KB). Only the part of the last block
        before `end` is stripped here (at most _BLOCK bytes, in C); whole blocks below it are
        looked up in self._solid, each stripped once while buffered."""
        buf = self._buf
        origin = self._origin
        block = (origin + end - 1) // _BLOCK
        cut = max(start, block * _BLOCK - origin)  # where that block's part begins
        solid = buf[cut:end].rstrip(_BLANKS)
        if solid:
            return cut + len(solid) - 1
        if cut == start:
            return start - 1
        found = self._solid_below(block - 1) - origin
        return found if found >= start else start - 1

    def _solid_below(self, block: int) -> int:
        """The stream position of the last non-blank byte at or before the end of `block`
        (which is wholly received), or one before buf[0] if no buffered byte is one. The
        blocks crossed to find it all get the answer: none is stripped twice."""
        buf = self._buf
        origin = self._origin
        memo = self._solid
        crossed = []
        while True:
            found = memo.get(block)
            if found is not None:
                break
            crossed.append(block)
            first = block * _BLOCK - origin
            cut = max(0, first)
            solid = buf[cut:first + _BLOCK].rstrip(_BLANKS)
            if solid:
                found = origin + cut + len(solid) - 1
                break
            if not cut:  # (the bytes before buf[0] are gone: none of them counts)
                found = origin - 1
                break
            block -= 1
        for block in crossed:
            memo[block] = found
        return found

    def _next_candidate(self, start: int, openers: list[int]) -> int:
        """The first position from `start` on where a frame can begin: its fifth byte opens a
        document. Without one, the last four bytes are kept (a header may be arriving).
        `openers` caches the last `{` and `<` found, so that each is searched for once per
        stretch of the buffer rather than once per candidate."""
        buf = self._buf
        first = start + HEADER_SIZE
        best = -1
        for k, opener in enumerate(_OPENERS):
            found = openers[k]
            if found < first and found != -2:  # -2: none left in the buffer
                found = buf.find(opener, first)
                openers[k] = found if found >= 0 else -2
            if found >= 0 and (best < 0 or found < best):
                best = found
        if best >= 0:
            return best - HEADER_SIZE
        return max(start, len(buf) - HEADER_SIZE)

"""Property tests that every framer must pass, plus the framer registry.

The central property, for each framing: a stream of garbage interleaved with valid frames, cut
into reads at arbitrary points, never makes the decoder raise, and every valid frame comes out,
in order. "Follows the garbage" has one honest exception per framing, and the test allows
exactly that one: the garbage can open a frame that the valid frame's first bytes complete
into a frame that is valid by the framing's own rules -

* stx-etx-lrc: garbage ending in `STX x ETX` whose LRC happens to equal STX (0x02), the first
  byte of the next frame;
* dle-crc16: garbage ending in `DLE STX x DLE ETX` (or with one CRC byte) that the next
  frame's `DLE` / `DLE STX` completes into a correct CRC-16;
* length-prefixed: garbage ending in a header that claims a length reaching into the next
  frame, where the claimed payload starts with `{`/`<` and ends with `}`/`>`.

No decoder can tell those from real frames. So a valid frame may be missing only if the
decoder delivered some other frame whose own encoding sits in the stream starting before the
missing frame and running into it; anything else is a lost frame and fails the test.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from bridge.protocol.framing import (
    FRAMERS,
    DleCrc16Framer,
    EndOfTransmission,
    FrameFailed,
    FrameResent,
    FrameReceived,
    FrameSent,
    Framer,
    FramingError,
    LengthPrefixedFramer,
    StxEtxLrcFramer,
    make_framer,
)
from bridge.protocol.framing.dle_crc16 import crc16_kermit
from bridge.protocol.framing.stx_etx_lrc import lrc

from .fuzzing import fuzz_settings


# --- per-framing strategies ---------------------------------------------------------------


@functools.cache
def _bytes_from(alphabet: tuple[int, ...], max_size: int) -> SearchStrategy[bytes]:
    """Bytes drawn mostly from `alphabet` (the bytes the framing cares about), sometimes any."""
    byte = st.one_of(st.sampled_from(alphabet), st.integers(0, 255))
    return st.lists(byte, max_size=max_size).map(bytes)


@functools.cache
def _stx_payloads(max_size: int) -> SearchStrategy[bytes]:
    allowed = [b for b in range(256) if b not in (0x02, 0x03)]
    return st.lists(st.one_of(st.sampled_from([0x04, 0x06, 0x10, 0x15]),
                              st.sampled_from(allowed)), max_size=max_size).map(bytes)


@functools.cache
def _dle_payloads(max_size: int) -> SearchStrategy[bytes]:
    return _bytes_from((0x10, 0x02, 0x03, 0x06, 0x15), max_size)


@functools.cache
def _json_payloads(max_size: int) -> SearchStrategy[bytes]:
    """What the length-prefixed framing carries: `{...}` or `<...>`, maybe trailing blanks."""
    def build(opener: int, middle: bytes, blanks: bytes) -> bytes:
        closer = b"}" if opener == ord("{") else b">"
        return (bytes((opener,)) + middle + closer + blanks)[:max_size]

    documents = st.builds(
        build, st.sampled_from([ord("{"), ord("<")]),
        _bytes_from((0x00, 0x7B, 0x7D, 0x3C, 0x3E, 0x22), max(0, max_size - 2)),
        st.sampled_from([b"", b"\n", b"\r\n", b" "]))
    return documents.filter(lambda p: p[:1] in (b"{", b"<") and p.rstrip(b" \t\r\n")[-1:] in
                            (b"}", b">"))


@dataclass(frozen=True)
class Spec:
    name: str
    payloads: Callable[[int], SearchStrategy[bytes]]  # max_size -> valid payloads
    noise: tuple[int, ...]  # bytes worth over-representing in garbage
    fake_starts: tuple[bytes, ...]  # byte strings that look like the start of a frame

    def __str__(self) -> str:
        return self.name


SPECS = [
    Spec("stx-etx-lrc", _stx_payloads, (0x02, 0x03, 0x04, 0x06, 0x15), (b"\x02",)),
    # a lone DLE is a frame cut off in the middle of a stuffed DLE pair; DLE 0x41 is bad stuffing
    Spec("dle-crc16", _dle_payloads, (0x10, 0x02, 0x03, 0x06, 0x15),
         (b"\x10\x02", b"\x10\x10\x02", b"\x10\x03", b"\x10", b"\x10\x02\x10\x41")),
    Spec("length-prefixed", _json_payloads, (0x00, 0x01, 0x7B, 0x7D, 0x3C, 0x3E),
         (b"\x00\x00\x00\x05{", b"\x00\x00\x00\x30<", b"\x00\x00\x01\x00{", b"\x00\x00\x00")),
]
ENCODERS = {spec.name: make_framer(spec.name) for spec in SPECS}  # encode() is pure


@functools.cache
def _garbage(spec: Spec) -> SearchStrategy[bytes]:
    """Line noise as a link produces it: random bytes, frame starts, cut-off frames and
    frames with a damaged byte, in any mix. What garbage ends with matters most (it is what
    the next frame runs into), so it often ends with an opened frame and a stray byte or
    another frame start."""
    encode = ENCODERS[spec.name].encode
    fake_start = st.sampled_from(spec.fake_starts)
    pieces = st.lists(st.one_of(
        _bytes_from(spec.noise, 12),
        fake_start,
        st.tuples(spec.payloads(40), st.integers(0, 60)).map(
            lambda pk: encode(pk[0])[:pk[1]]),
        st.tuples(spec.payloads(40), st.integers(0, 60), st.integers(1, 255)).map(
            lambda pkx: _damage(encode(pkx[0]), pkx[1], pkx[2])),
    ), max_size=4).map(b"".join)
    opened = st.one_of(st.just(b""), fake_start,  # or a frame missing its last bytes
                       st.tuples(spec.payloads(40), st.integers(1, 3)).map(
                           lambda pk: encode(pk[0])[:-pk[1]]))
    tail = st.one_of(st.just(b""), fake_start, _bytes_from(spec.noise, 2))
    return st.tuples(pieces, opened, tail).map(b"".join)


def _damage(frame: bytes, index: int, flip: int) -> bytes:
    index %= len(frame)
    return frame[:index] + bytes((frame[index] ^ flip,)) + frame[index + 1:]


def _split(data: bytes, draw: Any) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _feed(framer: Framer, chunks: list[bytes]) -> list[Any]:
    """Feed the reads, then let every pending receive deadline pass (length-prefixed gives up
    on a claimed frame whose bytes stopped coming)."""
    events: list[Any] = []
    now = 0.0
    for chunk in chunks:
        now += 0.001
        events += framer.receive_data(chunk, now)
    for _ in range(10_000):
        deadline = framer.next_deadline()
        if deadline is None:
            break
        now = max(now, deadline)
        events += framer.handle_timeout(now)
    else:
        pytest.fail("handle_timeout never cleared the deadline")
    return events


def _received(events: list[Any]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, FrameReceived)]


def _overlapped(stream: bytes, start: int, delivered: list[bytes], framer: Framer) -> bool:
    """Whether a delivered frame's encoding sits in `stream` beginning before `start` and
    running past it."""
    for payload in set(delivered):
        encoded = framer.encode(payload)
        at = stream.find(encoded, max(0, start - len(encoded) + 1))
        while 0 <= at < start:
            if at + len(encoded) > start:
                return True
            at = stream.find(encoded, at + 1)
    return False


# --- the properties -----------------------------------------------------------------------


# Over every framing at once: garbage before, between and after valid frames.
@fuzz_settings(600)
@given(spec=st.sampled_from(SPECS), data=st.data())
def test_valid_frames_survive_garbage_split_anywhere(spec: Spec, data: Any) -> None:
    frames = data.draw(st.lists(spec.payloads(40), min_size=1, max_size=3), label="payloads")
    # a limit just big enough for the valid frames makes garbage run them into oversize
    tight = max(1, *(len(p) for p in frames))
    max_frame_size = data.draw(st.sampled_from([tight, 64 * 1024]), label="max_frame_size")
    framer = make_framer(spec.name, max_frame_size=max_frame_size)
    encoder = ENCODERS[spec.name]  # encodes frames of any size
    stream = b""
    starts = []
    for payload in frames:
        stream += data.draw(_garbage(spec))
        starts.append(len(stream))
        stream += framer.encode(payload)
    stream += data.draw(_garbage(spec))

    received = _received(_feed(framer, _split(stream, data.draw)))

    position = 0
    for payload, start in zip(frames, starts, strict=True):
        if _overlapped(stream, start, received, encoder):
            # Garbage that looked like a frame start swallowed this one (allowed). It must not
            # consume a delivered copy: a later frame with the same payload may own it.
            continue
        try:
            position = received.index(payload, position) + 1
        except ValueError:
            pytest.fail(f"lost the valid frame at byte {start}: {payload!r}; got {received!r}")


@pytest.mark.parametrize("spec", SPECS, ids=str)
@fuzz_settings(150)
@given(data=st.data())
def test_encode_then_decode_is_identity(spec: Spec, data: Any) -> None:
    framer = make_framer(spec.name)
    payloads = data.draw(st.lists(spec.payloads(300), min_size=1, max_size=4))
    stream = b"".join(framer.encode(p) for p in payloads)
    events = _feed(framer, _split(stream, data.draw))
    assert _received(events) == payloads
    assert not [e for e in events if isinstance(e, FramingError)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@fuzz_settings(200)
@given(data=st.data())
def test_how_the_bytes_are_split_into_reads_does_not_change_the_frames(
        spec: Spec, data: Any) -> None:
    payloads = data.draw(st.lists(spec.payloads(30), max_size=3), label="payloads")
    tight = max(1, *(len(p) for p in payloads)) if payloads else 1
    max_frame_size = data.draw(st.sampled_from([tight, 16, 64 * 1024]), label="max_frame_size")
    encoder = ENCODERS[spec.name]
    stream = b""
    for payload in payloads:
        stream += data.draw(_garbage(spec)) + encoder.encode(payload)
    stream += data.draw(_garbage(spec))

    whole = _received(_feed(make_framer(spec.name, max_frame_size=max_frame_size), [stream]))
    split = _received(_feed(make_framer(spec.name, max_frame_size=max_frame_size),
                            _split(stream, data.draw)))
    one_by_one = _received(_feed(make_framer(spec.name, max_frame_size=max_frame_size),
                                 [stream[i:i + 1] for i in range(len(stream))]))
    assert whole == split == one_by_one


@pytest.mark.parametrize("spec", SPECS, ids=str)
@fuzz_settings(150)
@given(data=st.data())
def test_any_bytes_never_raise_and_the_buffer_stays_bounded(spec: Spec, data: Any) -> None:
    max_frame_size = data.draw(st.integers(1, 48), label="max_frame_size")
    framer = make_framer(spec.name, max_frame_size=max_frame_size)
    stream = data.draw(_bytes_from((*spec.noise, 0x10, 0x02, 0x03), 400))
    events = _feed(framer, _split(stream, data.draw))
    for event in events:
        assert isinstance(event, FrameReceived | FramingError | EndOfTransmission)
        if isinstance(event, FrameReceived):
            assert len(event.payload) <= max_frame_size
        if isinstance(event, FramingError):
            assert event.discarded > 0
    # a frame start, at most max_frame_size payload bytes (DLE-stuffed: twice that), the end
    # and the checksum: nothing else may pile up in the receive buffer
    assert len(framer._buf) <= 2 * max_frame_size + 8
    # whatever the framer wants to send in answer is only ACK/NAK bytes
    assert set(framer.data_to_send()) <= {0x06, 0x15}


@pytest.mark.parametrize("cls", [StxEtxLrcFramer, DleCrc16Framer], ids=lambda c: c.name)
@fuzz_settings(200)
@given(actions=st.lists(st.sampled_from(["send", "ack", "nak", "timeout", "early"]),
                        max_size=40),
       max_tries=st.integers(1, 4))
def test_every_frame_sent_ends_exactly_once_in_order(cls: type[Framer], actions: list[str],
                                                     max_tries: int) -> None:
    """Whatever mix of sends, ACKs, NAKs and timeouts: each frame goes out at most max_tries
    times, one at a time, and ends as FrameSent or FrameFailed exactly once, in order."""
    framer = cls(ack_timeout=1.0, max_tries=max_tries)
    now = 0.0
    sent: list[bytes] = []
    ended: list[bytes] = []
    wire = b""
    for n, action in enumerate(actions):
        now += 0.25
        if action == "send":
            payload = b"{%d}" % n
            sent.append(payload)
            events = framer.send_frame(payload, now)
        elif action == "ack":
            events = framer.receive_data(b"\x06", now)
        elif action == "nak":
            events = framer.receive_data(b"\x15", now)
        elif action == "early":  # before any deadline: must change nothing
            deadline = framer.next_deadline()
            events = framer.handle_timeout(now)
            assert events == [] or (deadline is not None and now >= deadline)
        else:
            deadline = framer.next_deadline()
            now = max(now, deadline if deadline is not None else now)
            events = framer.handle_timeout(now)
        wire += framer.data_to_send()
        for event in events:
            if isinstance(event, FrameResent):  # the outstanding frame, sent again
                assert framer.awaiting_ack and event.payload in sent[len(ended):]
                continue
            assert isinstance(event, FrameSent | FrameFailed)
            ended.append(event.payload)
            if isinstance(event, FrameFailed):  # only after the last try
                assert wire.count(framer.encode(event.payload)) == max_tries
        unended = len(ended) < len(sent)
        assert framer.awaiting_ack <= unended
        if unended:  # awaiting its ACK, or waiting for the ACK or NAK owed for a copy of the
            # frame before it (acknowledged by a late ACK): both until a deadline
            assert framer.next_deadline() is not None
    assert ended == sent[:len(ended)]
    on_the_wire = len(ended) + (1 if framer.awaiting_ack else 0)
    for index, payload in enumerate(sent):
        tries = wire.count(framer.encode(payload))
        if index < on_the_wire:
            assert 1 <= tries <= max_tries
        else:  # still queued behind the outstanding frame
            assert tries == 0


@fuzz_settings(300)
@given(st.binary(max_size=300))
def test_lrc_is_the_xor_of_all_bytes(data: bytes) -> None:
    assert lrc(data) == functools.reduce(operator.xor, data, 0)


def _crc16_kermit_by_definition(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc


@fuzz_settings(300)
@given(st.binary(max_size=300))
def test_crc16_kermit_matches_the_bitwise_definition(data: bytes) -> None:
    assert crc16_kermit(data) == _crc16_kermit_by_definition(data)


# --- the registry -------------------------------------------------------------------------


def test_registry_knows_the_three_framers_by_their_configuration_names() -> None:
    assert FRAMERS == {"stx-etx-lrc": StxEtxLrcFramer, "dle-crc16": DleCrc16Framer,
                       "length-prefixed": LengthPrefixedFramer}
    from bridge.config import FRAMER_NAMES
    assert set(FRAMER_NAMES) == set(FRAMERS)


@pytest.mark.parametrize("name", sorted(FRAMERS))
def test_make_framer_passes_the_settings_on(name: str) -> None:
    framer = make_framer(name, max_frame_size=1000, ack_timeout=0.5, max_tries=5)
    assert isinstance(framer, FRAMERS[name])
    assert (framer.max_frame_size, framer.ack_timeout, framer.max_tries) == (1000, 0.5, 5)
    assert framer.name == name


def test_make_framer_names_the_known_framers_for_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown framer 'slip'") as info:
        make_framer("slip")
    for name in FRAMERS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", sorted(FRAMERS))
def test_settings_are_validated(name: str) -> None:
    with pytest.raises(ValueError):
        make_framer(name, max_frame_size=0)
    with pytest.raises(ValueError):
        make_framer(name, ack_timeout=0)
    with pytest.raises(ValueError):
        make_framer(name, max_tries=0)

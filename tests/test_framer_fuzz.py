"""The three framer decoders on the vendor's messages framed by each framing, then mutated.

test_framing_properties.py holds the properties on generated payloads and line noise; here
the frames are what a link carries (the vendor fixtures as the vendor wrote them, compact,
and changed the way fuzz_corpus changes documents), in reads cut anywhere:

- intact, every frame comes out as it went in (decode(encode(x)) == x), acknowledged once;
- damaged (a byte flipped, bytes cut, inserted, deleted or repeated, anywhere in the
  stream), the decoder does not raise, delivers no frame that is not in the bytes, keeps its
  buffer bounded, and still delivers the intact frame that follows, unless the damaged bytes
  opened a frame that the intact one's bytes complete (test_framing_properties.py says when
  a decoder cannot tell those from real frames).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from bridge.protocol.framing import FrameReceived, FramingError, make_framer
from bridge.protocol.framing.acknowledged import ACK

from .fuzz_corpus import damaged, fixture_texts, mutated, serialised, vendor_messages
from .fuzzing import fuzz_settings, tally
from .test_framing_properties import _feed, _overlapped, _received, _split

FRAMINGS = ["stx-etx-lrc", "dle-crc16", "length-prefixed"]
ACKNOWLEDGED = {"stx-etx-lrc", "dle-crc16"}
ENCODERS = {name: make_framer(name) for name in FRAMINGS}  # encode() is pure


def _encodable(name: str, payload: bytes) -> bool:
    try:
        ENCODERS[name].encode(payload)
    except ValueError:
        return False
    return True


@functools.cache
def payloads(name: str) -> SearchStrategy[bytes]:
    """What the framing carries: each fixture as the vendor wrote it, a vendor message
    changed and written out, or one damaged at the byte level, as long as the framing can
    carry it (stx-etx-lrc no STX or ETX; length-prefixed `{...}`)."""
    texts = sorted(fixture_texts().values())
    messages = st.sampled_from(sorted(vendor_messages().items())).map(lambda i: i[1])
    return st.one_of(
        st.sampled_from(texts),
        messages.flatmap(mutated).flatmap(serialised),
        st.sampled_from(texts).flatmap(damaged),
    ).filter(functools.partial(_encodable, name))


@pytest.mark.parametrize("name", FRAMINGS)
@fuzz_settings(60)
@given(data=st.data())
def test_framed_vendor_messages_come_out_as_they_went_in(name: str, data: Any) -> None:
    sent = data.draw(st.lists(payloads(name), min_size=1, max_size=3), label="payloads")
    framer = make_framer(name)
    stream = b"".join(framer.encode(payload) for payload in sent)
    events = _feed(framer, _split(stream, data.draw))
    assert _received(events) == sent
    assert not [e for e in events if isinstance(e, FramingError)]
    # each frame acknowledged once, nothing else said
    assert framer.data_to_send() == (bytes((ACK,)) * len(sent) if name in ACKNOWLEDGED else b"")
    tally("frames decoded")


@pytest.mark.parametrize("name", FRAMINGS)
@fuzz_settings(60)
@given(data=st.data())
def test_damaged_vendor_frames_never_break_the_decoder(name: str, data: Any) -> None:
    encoder = ENCODERS[name]
    frames = data.draw(st.lists(payloads(name), min_size=1, max_size=2), label="payloads")
    stream = b"".join(encoder.encode(payload) for payload in frames)
    for _ in range(data.draw(st.integers(1, 3), label="damages")):
        stream = data.draw(damaged(stream))
    intact = data.draw(payloads(name), label="intact payload")
    start = len(stream)
    stream += encoder.encode(intact)
    max_frame_size = data.draw(st.sampled_from([64 * 1024, max(len(intact), 1)]),
                               label="max_frame_size")
    framer = make_framer(name, max_frame_size=max_frame_size)

    events = _feed(framer, _split(stream, data.draw))

    received = _received(events)
    for event in events:
        if isinstance(event, FrameReceived):
            # no frame the bytes do not hold, none over the limit
            assert encoder.encode(event.payload) in stream, event.payload[:80]
            assert len(event.payload) <= max_frame_size
        if isinstance(event, FramingError):
            assert event.discarded > 0
    # a frame start, the payload (DLE-stuffed: twice that), its end and checksum at most
    assert len(framer._buf) <= 2 * max_frame_size + 8
    if received[-1:] == [intact]:
        tally("intact frame delivered after damage")
    else:
        assert _overlapped(stream, start, received, encoder), (
            f"lost the intact frame at byte {start} after damage; got {len(received)} frames")
        tally("intact frame opened by damaged bytes")
    tally("damaged frames delivered" if len(received) > 1 else "damaged frames dropped")

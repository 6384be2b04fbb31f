"""Length-prefixed framer: 4-byte big-endian length + JSON/XML payload, no acknowledgement."""

from __future__ import annotations

import json
import struct

import pytest

from bridge.protocol.framing import (
    FrameReceived,
    FrameSent,
    FramingError,
    LengthPrefixedFramer,
)
from tests.conftest import FIXTURES


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def received(events: list) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, FrameReceived)]


def errors(events: list) -> list[FramingError]:
    return [e for e in events if isinstance(e, FramingError)]


@pytest.fixture
def vendor_payload() -> bytes:
    return (FIXTURES / "dotnet-pospayment-success.json").read_bytes()


# --- encoding and sending -----------------------------------------------------------------


def test_encode_is_big_endian_length_then_payload() -> None:
    assert LengthPrefixedFramer().encode(b'{"a":1}') == b"\x00\x00\x00\x07{\"a\":1}"
    assert LengthPrefixedFramer().encode(b"<x/>\r\n") == b"\x00\x00\x00\x06<x/>\r\n"


@pytest.mark.parametrize("bad", [b"", b"hello", b"{unterminated", b"[1,2]", b" {}"])
def test_encode_refuses_what_is_not_a_json_object_or_xml_document(bad: bytes) -> None:
    framer = LengthPrefixedFramer()
    with pytest.raises(ValueError, match="JSON object or an XML"):
        framer.encode(bad)
    with pytest.raises(ValueError):
        framer.send_frame(bad, 0.0)
    assert framer.data_to_send() == b""


def test_send_frame_reports_frame_sent_at_once() -> None:
    framer = LengthPrefixedFramer()
    assert framer.send_frame(b'{"n":1}', 0.0) == [FrameSent(b'{"n":1}')]
    assert framer.send_frame(b'{"n":2}', 0.0) == [FrameSent(b'{"n":2}')]
    assert framer.data_to_send() == frame(b'{"n":1}') + frame(b'{"n":2}')
    assert framer.data_to_send() == b""
    assert not framer.awaiting_ack
    assert framer.next_deadline() is None
    assert framer.handle_timeout(1e9) == []


def test_send_frame_refuses_payload_over_max_frame_size() -> None:
    framer = LengthPrefixedFramer(max_frame_size=8)
    with pytest.raises(ValueError, match="max_frame_size"):
        framer.send_frame(b'{"ab":1}1', 0.0)
    assert framer.send_frame(b'{"ab":1}', 0.0) == [FrameSent(b'{"ab":1}')]


def test_stall_timeout_must_be_positive_and_defaults_to_ack_timeout_times_tries() -> None:
    assert LengthPrefixedFramer(ack_timeout=1.5, max_tries=4).stall_timeout == 6.0
    assert LengthPrefixedFramer(stall_timeout=0.25).stall_timeout == 0.25
    with pytest.raises(ValueError):
        LengthPrefixedFramer(stall_timeout=0)


# --- receiving ----------------------------------------------------------------------------


def test_vendor_payload_round_trips(vendor_payload: bytes) -> None:
    framer = LengthPrefixedFramer()
    events = framer.receive_data(framer.encode(vendor_payload), 0.0)
    assert events == [FrameReceived(vendor_payload)]
    assert json.loads(events[0].payload)["SaleToPOIResponse"]
    assert framer.data_to_send() == b""  # no acknowledgement


def test_vendor_payload_split_byte_by_byte(vendor_payload: bytes) -> None:
    framer = LengthPrefixedFramer()
    wire = frame(vendor_payload)
    events = []
    for i in range(len(wire) - 1):
        events += framer.receive_data(wire[i:i + 1], float(i))
    assert events == []
    assert framer.receive_data(wire[-1:], 1e6) == [FrameReceived(vendor_payload)]
    assert framer.next_deadline() is None


def test_two_frames_in_one_read() -> None:
    framer = LengthPrefixedFramer()
    events = framer.receive_data(frame(b'{"n":1}') + frame(b"<n>2</n>\n"), 0.0)
    assert events == [FrameReceived(b'{"n":1}'), FrameReceived(b"<n>2</n>\n")]


def test_zero_length_is_a_framing_error_and_the_next_frame_survives() -> None:
    framer = LengthPrefixedFramer()
    events = framer.receive_data(b"\x00\x00\x00\x00" + frame(b"{}"), 0.0)
    assert events == [FramingError("frame of length 0", 4), FrameReceived(b"{}")]


def test_oversize_length_is_a_framing_error_and_the_next_frame_survives() -> None:
    framer = LengthPrefixedFramer(max_frame_size=100)
    events = framer.receive_data(b"\x00\x00\x01\x00{" + frame(b'{"ok":1}'), 0.0)
    assert events == [FramingError("oversize frame: length 256 > 100", 5),
                      FrameReceived(b'{"ok":1}')]


def test_oversize_real_frame_is_crossed_without_delivering_anything_inside_it(
        vendor_payload: bytes) -> None:
    framer = LengthPrefixedFramer(max_frame_size=1024)
    events = framer.receive_data(frame(vendor_payload) + frame(b'{"after":1}'), 0.0)
    assert received(events) == [b'{"after":1}']
    assert errors(events) == [FramingError(f"oversize frame: length {len(vendor_payload)}"
                                           " > 1024", len(vendor_payload) + 4)]


def test_payload_not_starting_like_a_document_is_garbage() -> None:
    framer = LengthPrefixedFramer()
    events = framer.receive_data(frame(b"plain text}") + frame(b"{}"), 0.0)
    assert events == [FramingError("payload does not start with '{' or '<'", 15),
                      FrameReceived(b"{}")]


def test_payload_not_ending_like_a_document_is_rescanned_and_the_frame_inside_found() -> None:
    # the noise claims 12 bytes starting with '{': they end inside the real frame, not on '}'
    framer = LengthPrefixedFramer()
    events = framer.receive_data(b"\x00\x00\x00\x0c{" + frame(b'{"inner":true}'), 0.0)
    assert events == [FramingError("payload does not end with '}' or '>'", 5),
                      FrameReceived(b'{"inner":true}')]


def test_noise_is_reported_once_per_stretch() -> None:
    framer = LengthPrefixedFramer()
    noise = b"\xff" * 100 + b"{{{<<<" + b"\x01" * 50
    events = framer.receive_data(noise + frame(b'{"x":1}'), 0.0)
    assert events == [FramingError("not a frame: length 4294967295 > 65536", len(noise)),
                      FrameReceived(b'{"x":1}')]


def test_header_split_across_reads() -> None:
    framer = LengthPrefixedFramer()
    wire = frame(b'{"split":1}')
    assert framer.receive_data(wire[:2], 0.0) == []
    assert framer.next_deadline() is None  # no claimed frame yet, nothing to time out
    assert framer.receive_data(wire[2:4], 0.0) == []
    assert framer.receive_data(wire[4:], 0.0) == [FrameReceived(b'{"split":1}')]


def test_plausible_header_in_noise_is_given_up_after_the_stall_timeout() -> None:
    framer = LengthPrefixedFramer(stall_timeout=3.0)
    # noise that claims a 1000-byte document, then a real frame: nothing to deliver yet
    assert framer.receive_data(b"\x00\x00\x03\xe8{", 10.0) == []
    assert framer.next_deadline() == 13.0
    assert framer.receive_data(frame(b'{"real":1}'), 11.0) == []
    assert framer.next_deadline() == 14.0  # every byte that arrives restarts the wait
    assert framer.handle_timeout(13.9) == []
    events = framer.handle_timeout(14.0)
    assert events == [FramingError("truncated frame: no byte for 3 s", 5),
                      FrameReceived(b'{"real":1}')]
    assert framer.next_deadline() is None


def test_slow_real_frame_is_not_given_up_while_bytes_keep_coming(vendor_payload: bytes) -> None:
    framer = LengthPrefixedFramer(stall_timeout=1.0)
    wire = frame(vendor_payload)
    events = []
    now = 0.0
    for i in range(0, len(wire), 1000):
        now += 0.9
        deadline = framer.next_deadline()
        if deadline is not None and now >= deadline:
            events += framer.handle_timeout(now)
        events += framer.receive_data(wire[i:i + 1000], now)
    assert events == [FrameReceived(vendor_payload)]


def test_receive_buffer_stays_bounded_under_noise() -> None:
    framer = LengthPrefixedFramer(max_frame_size=64)
    for _ in range(200):
        framer.receive_data(b"\x00\x00\x00\x30{" + b"\xaa" * 500, 0.0)
        assert len(framer._buf) <= 4 + 64 + 500


def test_reset_forgets_a_partial_frame_and_unsent_bytes() -> None:
    framer = LengthPrefixedFramer()
    framer.send_frame(b"{}", 0.0)
    wire = frame(b'{"half":1}')
    framer.receive_data(wire[:7], 0.0)
    assert framer.next_deadline() is not None
    framer.reset()
    assert framer.data_to_send() == b""
    assert framer.next_deadline() is None
    events = framer.receive_data(wire[7:] + frame(b"{}"), 0.0)
    assert received(events) == [b"{}"]

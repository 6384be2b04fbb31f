"""DLE/CRC-16 framer: the real captured frame, stuffing, CRC-16/KERMIT, resynchronisation,
ACK/NAK and retransmission."""

from __future__ import annotations

import pytest

from bridge.protocol.framing import (
    DleCrc16Framer,
    EndOfTransmission,
    FrameFailed,
    FrameResent,
    FrameReceived,
    FrameSent,
    FramingError,
)
from bridge.protocol.framing.dle_crc16 import MAX_RESYNC_CANDIDATES, crc16_kermit
from tests.conftest import FIXTURES

ACK, NAK = b"\x06", b"\x15"

CAPTURED = bytes.fromhex("10 02 06 01 07 04 00 00 00 00 01 90 10 03 76 57")
CAPTURED_PAYLOAD = bytes.fromhex("06 01 07 04 00 00 00 00 01 90")


def frame(payload: bytes) -> bytes:
    """The frame built by hand from the definition: stuffing, then CRC low byte first."""
    crc = crc16_kermit(payload + b"\x03")
    return (b"\x10\x02" + payload.replace(b"\x10", b"\x10\x10") + b"\x10\x03"
            + bytes((crc & 0xFF, crc >> 8)))


def received(events: list) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, FrameReceived)]


def errors(events: list) -> list[FramingError]:
    return [e for e in events if isinstance(e, FramingError)]


# --- CRC and encoding ---------------------------------------------------------------------


def test_crc16_kermit_check_value() -> None:
    assert crc16_kermit(b"123456789") == 0x2189
    assert crc16_kermit(b"") == 0


def test_crc_of_the_captured_frame_covers_payload_and_etx() -> None:
    assert crc16_kermit(CAPTURED_PAYLOAD + b"\x03") == 0x5776  # sent as 76 57


def test_captured_frame_decodes_and_is_acked() -> None:
    framer = DleCrc16Framer()
    assert framer.receive_data(CAPTURED, 0.0) == [FrameReceived(CAPTURED_PAYLOAD)]
    assert framer.data_to_send() == ACK


def test_captured_frame_byte_by_byte() -> None:
    framer = DleCrc16Framer()
    events = []
    for i in range(len(CAPTURED)):
        events += framer.receive_data(CAPTURED[i:i + 1], float(i))
    assert events == [FrameReceived(CAPTURED_PAYLOAD)]


def test_encode_reproduces_the_captured_frame() -> None:
    assert DleCrc16Framer().encode(CAPTURED_PAYLOAD) == CAPTURED


def test_encode_doubles_every_dle() -> None:
    payload = b"\x10\x02 \x10\x10 \x10\x03"
    encoded = DleCrc16Framer().encode(payload)
    assert encoded == frame(payload)
    assert encoded[2:-4] == b"\x10\x10\x02 \x10\x10\x10\x10 \x10\x10\x03"
    assert DleCrc16Framer().receive_data(encoded, 0.0) == [FrameReceived(payload)]


def test_payload_over_max_frame_size_is_refused_when_sending() -> None:
    framer = DleCrc16Framer(max_frame_size=4)
    with pytest.raises(ValueError, match="max_frame_size"):
        framer.send_frame(b"12345", 0.0)
    framer.send_frame(b"\x10\x10\x10\x10", 0.0)  # 4 bytes, 8 once stuffed: fits
    assert framer.data_to_send() == frame(b"\x10\x10\x10\x10")


# --- receiving ----------------------------------------------------------------------------


def test_bad_crc_is_naked() -> None:
    framer = DleCrc16Framer()
    damaged = CAPTURED[:-1] + b"\x58"
    events = framer.receive_data(damaged, 0.0)
    assert events == [FramingError("bad CRC", len(damaged))]
    assert framer.data_to_send() == NAK


def test_damaged_payload_is_naked_and_the_retransmission_accepted() -> None:
    framer = DleCrc16Framer()
    damaged = CAPTURED[:4] + b"\x08" + CAPTURED[5:]
    events = framer.receive_data(damaged + CAPTURED, 0.0)
    assert received(events) == [CAPTURED_PAYLOAD]
    assert framer.data_to_send() == NAK + ACK


def test_two_frames_in_one_read_and_vendor_payload() -> None:
    vendor = (FIXTURES / "dotnet-pospayment-success.json").read_bytes()
    framer = DleCrc16Framer()
    events = framer.receive_data(frame(vendor) + CAPTURED, 0.0)
    assert events == [FrameReceived(vendor), FrameReceived(CAPTURED_PAYLOAD)]
    assert framer.data_to_send() == ACK + ACK


def test_vendor_payload_split_byte_by_byte() -> None:
    vendor = (FIXTURES / "dotnet-pospayment-success.json").read_bytes()
    assert len(vendor) > 10_000
    framer = DleCrc16Framer()
    wire = frame(vendor)
    events = []
    for i in range(len(wire)):
        events += framer.receive_data(wire[i:i + 1], 0.0)
    assert events == [FrameReceived(vendor)]


def test_binary_payload_full_of_dle_split_byte_by_byte() -> None:
    payload = bytes(range(256)) + b"\x10" * 9 + b"\x10\x02\x10\x03"
    framer = DleCrc16Framer()
    wire = frame(payload)
    events = []
    for i in range(len(wire)):
        events += framer.receive_data(wire[i:i + 1], 0.0)
    assert events == [FrameReceived(payload)]


def test_noise_between_frames_is_reported_and_eot_is_just_noise_here() -> None:
    framer = DleCrc16Framer()
    events = framer.receive_data(b"\x00\x04\xff" + CAPTURED, 0.0)
    assert events == [FramingError("line noise between frames", 3),
                      FrameReceived(CAPTURED_PAYLOAD)]
    assert not any(isinstance(e, EndOfTransmission) for e in events)


def test_truncated_frame_restarts_at_the_next_dle_stx() -> None:
    framer = DleCrc16Framer()
    events = framer.receive_data(CAPTURED[:7] + CAPTURED, 0.0)
    assert events == [FramingError("truncated frame: DLE STX before DLE ETX", 7),
                      FrameReceived(CAPTURED_PAYLOAD)]
    assert framer.data_to_send() == ACK


def test_bad_stuffing_skips_the_frame_and_naks_it_at_its_end() -> None:
    framer = DleCrc16Framer()
    broken = b"\x10\x02ab\x10\x41cd\x10\x10\x10\x03\x01\x02"
    events = framer.receive_data(broken + CAPTURED, 0.0)
    assert [e.reason for e in errors(events)] == [
        "bad byte stuffing: DLE followed by 0x41", "rest of a corrupt frame"]
    assert sum(e.discarded for e in errors(events)) == len(broken)
    assert received(events) == [CAPTURED_PAYLOAD]
    assert framer.data_to_send() == NAK + ACK


def test_garbage_frame_with_a_stray_dle_does_not_hide_the_next_frame() -> None:
    # "DLE STX abc DLE" then a frame: its DLE STX reads as a data DLE and a data STX; the
    # combined frame fails its CRC and the decoder finds the real frame inside it
    framer = DleCrc16Framer()
    events = framer.receive_data(b"\x10\x02abc\x10" + CAPTURED, 0.0)
    assert events == [FramingError("garbage before a frame", 6),
                      FrameReceived(CAPTURED_PAYLOAD)]
    assert framer.data_to_send() == ACK  # no NAK: the peer's frame was good


def test_stray_dle_then_frame_with_stuffed_dle_stx_in_its_payload() -> None:
    payload = b"\x10\x02\x10\x02 binary"
    framer = DleCrc16Framer()
    events = framer.receive_data(b"\x10\x02\x10\x10\x02" + b"\x10" + frame(payload), 0.0)
    assert received(events) == [payload]


def test_crc_bytes_overlapping_the_next_frame_start_are_not_eaten() -> None:
    for garbage in (b"\x10\x02ab\x10\x03", b"\x10\x02ab\x10\x03\x55"):
        framer = DleCrc16Framer()
        events = framer.receive_data(garbage + CAPTURED, 0.0)
        assert received(events) == [CAPTURED_PAYLOAD], garbage
        assert framer.data_to_send() == ACK, garbage  # the noise is not NAKed


def test_crc_bytes_overlapping_a_frame_start_split_across_reads() -> None:
    framer = DleCrc16Framer()
    events = framer.receive_data(b"\x10\x02ab\x10\x03\x55\x10", 0.0)
    events += framer.receive_data(CAPTURED[1:], 0.1)
    assert received(events) == [CAPTURED_PAYLOAD]


def test_oversize_counts_unstuffed_bytes() -> None:
    framer = DleCrc16Framer(max_frame_size=6)
    assert framer.receive_data(frame(b"\x10" * 6), 0.0) == [FrameReceived(b"\x10" * 6)]
    events = framer.receive_data(frame(b"\x10" * 7) + CAPTURED[:2] + frame(b"ok")[2:], 0.0)
    assert [e.reason for e in errors(events)] == [
        "oversize frame: over 6 bytes", "rest of an oversize frame"]
    assert received(events) == [b"ok"]
    assert framer.data_to_send() == ACK + ACK  # the oversize frame is not answered


def test_oversize_frame_fed_in_pieces_keeps_the_buffer_bounded() -> None:
    framer = DleCrc16Framer(max_frame_size=64)
    wire = frame(b"\x10x" * 3000) + CAPTURED
    events = []
    for i in range(0, len(wire), 5):
        events += framer.receive_data(wire[i:i + 5], 0.0)
        assert len(framer._buf) <= 2 * 64 + 8
    assert received(events) == [CAPTURED_PAYLOAD]


def test_oversize_garbage_with_a_stray_dle_before_a_frame() -> None:
    framer = DleCrc16Framer(max_frame_size=12)
    events = framer.receive_data(b"\x10\x02" + b"g" * 30 + b"\x10" + CAPTURED, 0.0)
    assert received(events) == [CAPTURED_PAYLOAD]


def test_oversize_restarts_at_a_frame_start_hidden_before_the_limit() -> None:
    # the garbage frame passes the limit inside the real frame, whose start hides behind a
    # stray DLE: the decoder restarts there instead of skipping past it
    framer = DleCrc16Framer(max_frame_size=10)
    events = framer.receive_data(b"\x10\x02" + b"\x10" + CAPTURED, 0.0)
    assert received(events) == [CAPTURED_PAYLOAD]
    assert errors(events)[0].reason.startswith("oversize frame")


@pytest.mark.parametrize("split", [None, 5, 6])
def test_oversize_exactly_at_a_dle_pair_that_hides_a_frame_start(split: int | None) -> None:
    # found by the property tests: with max_frame_size 1, "DLE STX DLE DLE" is one data byte,
    # and the stray DLE + the frame's DLE make the second: the limit is passed right at the
    # pair, and the frame's STX comes only after it (maybe in the next read)
    framer = DleCrc16Framer(max_frame_size=1)
    wire = b"\x10\x02\x10\x10\x10" + frame(b"")
    chunks = [wire] if split is None else [wire[:split], wire[split:]]
    events = []
    for chunk in chunks:
        events += framer.receive_data(chunk, 0.0)
    assert received(events) == [b""]


def test_resync_candidates_are_bounded() -> None:
    # crafted noise: more possible frame starts in one garbage frame than are tried
    framer = DleCrc16Framer()
    noise = b"\x10\x02" + b"\x10\x10\x02" * (MAX_RESYNC_CANDIDATES + 5) + b"\x10"
    events = framer.receive_data(noise + CAPTURED, 0.0)
    assert [e.reason for e in errors(events)] == ["bad CRC"]
    assert framer.data_to_send() == NAK


# --- acknowledgement and retransmission ---------------------------------------------------


def test_retransmit_on_nak_then_ack() -> None:
    framer = DleCrc16Framer()
    framer.send_frame(CAPTURED_PAYLOAD, 0.0)
    assert framer.data_to_send() == CAPTURED
    # the terminal may have read the first copy: a NAK can be line noise
    assert framer.receive_data(NAK, 0.5) == [FrameResent(CAPTURED_PAYLOAD)]
    assert framer.data_to_send() == CAPTURED
    assert framer.receive_data(ACK, 0.6) == [FrameSent(CAPTURED_PAYLOAD)]


def test_an_answer_takes_back_the_copy_queued_with_the_acks_after_it() -> None:
    """A NAK queues a copy (the writer waits on a commit), then our ACK of a frame of the
    terminal's, then a second NAK (spending no try: the copy answers it); the terminal's
    answer to the frame then comes: the copy is not written, our ACK is (review rv7)."""
    framer = DleCrc16Framer(ack_timeout=1.0)
    framer.send_frame(b'{"pay":1}', 0.0)
    framer.data_to_send()
    assert framer.receive_data(NAK, 0.1) == [FrameResent(b'{"pay":1}')]
    assert received(framer.receive_data(frame(b'{"e":1}'), 0.15)) == [b'{"e":1}']
    assert framer.receive_data(NAK, 0.2) == []  # the copy, unwritten, answers it already
    assert framer.answered(b'{"pay":1}', 0.3) == [FrameSent(b'{"pay":1}')]
    assert framer.data_to_send() == ACK


def test_retransmit_on_timeout_then_fail_after_max_tries() -> None:
    framer = DleCrc16Framer(ack_timeout=1.0, max_tries=3)
    framer.send_frame(b"\x10abc", 0.0)
    written = framer.data_to_send()
    assert framer.handle_timeout(0.999) == []
    assert framer.handle_timeout(1.0) == [FrameResent(b"\x10abc")]  # after silence
    written += framer.data_to_send()
    assert framer.next_deadline() == 2.0
    assert framer.receive_data(NAK, 1.5) == [FrameResent(b"\x10abc")]  # third, last try
    written += framer.data_to_send()
    events = framer.handle_timeout(2.5)
    assert events == [FrameFailed(b"\x10abc", "no ACK within 1 s; gave up after 3 tries")]
    assert written == frame(b"\x10abc") * 3 and framer.data_to_send() == b""


def test_frames_are_queued_one_at_a_time() -> None:
    framer = DleCrc16Framer()
    framer.send_frame(b"one", 0.0)
    framer.send_frame(b"two", 0.0)
    framer.send_frame(b"three", 0.0)
    assert framer.data_to_send() == frame(b"one")
    assert framer.receive_data(ACK, 0.1) == [FrameSent(b"one")]
    assert framer.data_to_send() == frame(b"two")
    events = framer.receive_data(ACK + CAPTURED, 0.2)
    assert events == [FrameSent(b"two"), FrameReceived(CAPTURED_PAYLOAD)]
    assert framer.data_to_send() == frame(b"three") + ACK


def test_stray_ack_is_ignored_and_reset_forgets_everything() -> None:
    framer = DleCrc16Framer()
    assert framer.receive_data(ACK, 0.0) == []
    framer.send_frame(b"x", 0.0)
    framer.receive_data(CAPTURED[:9], 0.0)
    framer.reset()
    assert not framer.awaiting_ack
    assert framer.next_deadline() is None
    assert framer.data_to_send() == b""
    assert framer.receive_data(CAPTURED[9:], 0.0) == [FramingError("line noise between frames",
                                                                   len(CAPTURED) - 9)]
    assert framer.receive_data(CAPTURED, 0.0) == [FrameReceived(CAPTURED_PAYLOAD)]

"""STX/ETX/LRC framer: encoding, decoding, resynchronisation, ACK/NAK and retransmission."""

from __future__ import annotations

import functools
import json
import operator

import pytest

from bridge.protocol.framing import (
    EndOfTransmission,
    FrameFailed,
    FrameResent,
    FrameReceived,
    FrameSent,
    FramingError,
    StxEtxLrcFramer,
)
from bridge.protocol.framing.stx_etx_lrc import lrc
from tests.conftest import FIXTURES

STX, ETX, EOT, ACK, NAK = b"\x02", b"\x03", b"\x04", b"\x06", b"\x15"


def frame(payload: bytes) -> bytes:
    """The frame built by hand from the definition, independent of the framer."""
    body = payload + ETX
    return STX + body + bytes((functools.reduce(operator.xor, body, 0),))


def received(events: list) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, FrameReceived)]


def errors(events: list) -> list[FramingError]:
    return [e for e in events if isinstance(e, FramingError)]


@pytest.fixture
def vendor_payload() -> bytes:
    return (FIXTURES / "dotnet-pospayment-success.json").read_bytes()


# --- encoding -----------------------------------------------------------------------------


def test_lrc_is_the_xor_of_the_bytes_after_stx_through_etx() -> None:
    assert lrc(b"") == 0
    assert lrc(b"\x03") == 0x03
    assert lrc(b"AB\x03") == 0x41 ^ 0x42 ^ 0x03
    assert lrc(bytes(range(256))) == 0  # every bit appears 128 times


def test_encode_is_stx_payload_etx_lrc() -> None:
    encoded = StxEtxLrcFramer().encode(b'{"a":1}')
    assert encoded == frame(b'{"a":1}')
    assert encoded[0] == 0x02 and encoded[-2] == 0x03
    assert encoded[1:-2] == b'{"a":1}'


@pytest.mark.parametrize("bad", [b"a\x02b", b"a\x03b", b"\x02", b"\x03"])
def test_payload_with_stx_or_etx_is_refused(bad: bytes) -> None:
    framer = StxEtxLrcFramer()
    with pytest.raises(ValueError, match="STX"):
        framer.encode(bad)
    with pytest.raises(ValueError):
        framer.send_frame(bad, 0.0)
    assert framer.data_to_send() == b""
    assert not framer.awaiting_ack


def test_payload_over_max_frame_size_is_refused_when_sending() -> None:
    framer = StxEtxLrcFramer(max_frame_size=10)
    with pytest.raises(ValueError, match="max_frame_size"):
        framer.send_frame(b"x" * 11, 0.0)
    assert framer.send_frame(b"x" * 10, 0.0) == []
    assert framer.data_to_send() == frame(b"x" * 10)


# --- receiving ----------------------------------------------------------------------------


def test_good_frame_is_delivered_and_acked() -> None:
    framer = StxEtxLrcFramer()
    events = framer.receive_data(frame(b'{"ok":true}'), 0.0)
    assert events == [FrameReceived(b'{"ok":true}')]
    assert framer.data_to_send() == ACK
    assert framer.data_to_send() == b""  # drained


def test_empty_payload_round_trips() -> None:
    framer = StxEtxLrcFramer()
    assert framer.receive_data(framer.encode(b""), 0.0) == [FrameReceived(b"")]


def test_bad_lrc_is_naked_and_reported() -> None:
    framer = StxEtxLrcFramer()
    damaged = bytearray(frame(b'{"a":1}'))
    damaged[-1] ^= 0x40
    events = framer.receive_data(bytes(damaged), 0.0)
    assert received(events) == []
    assert [e.reason for e in errors(events)] == ["bad LRC"]
    assert errors(events)[0].discarded == len(damaged)
    assert framer.data_to_send() == NAK


def test_damaged_payload_byte_is_naked_then_the_retransmission_is_accepted() -> None:
    framer = StxEtxLrcFramer()
    good = frame(b'{"amount":12.5}')
    damaged = good[:5] + bytes((good[5] ^ 0x01,)) + good[6:]
    events = framer.receive_data(damaged + good, 0.0)
    assert received(events) == [b'{"amount":12.5}']
    assert framer.data_to_send() == NAK + ACK


def test_eot_is_reported() -> None:
    framer = StxEtxLrcFramer()
    events = framer.receive_data(frame(b"{}") + EOT, 0.0)
    assert events == [FrameReceived(b"{}"), EndOfTransmission()]


def test_two_frames_in_one_read() -> None:
    framer = StxEtxLrcFramer()
    events = framer.receive_data(frame(b'{"n":1}') + frame(b'{"n":2}'), 0.0)
    assert events == [FrameReceived(b'{"n":1}'), FrameReceived(b'{"n":2}')]
    assert framer.data_to_send() == ACK + ACK


def test_vendor_payload_split_byte_by_byte(vendor_payload: bytes) -> None:
    assert len(vendor_payload) > 10_000
    framer = StxEtxLrcFramer()
    wire = framer.encode(vendor_payload)
    events = []
    for i in range(len(wire) - 1):
        events += framer.receive_data(wire[i:i + 1], float(i))
        assert framer.data_to_send() == b""  # nothing to answer before the LRC byte
    events += framer.receive_data(wire[-1:], 1e6)
    assert events == [FrameReceived(vendor_payload)]
    assert json.loads(events[0].payload)["SaleToPOIResponse"]["PaymentResponse"]
    assert framer.data_to_send() == ACK


def test_compact_vendor_payload_round_trips_between_two_framers(vendor_payload: bytes) -> None:
    payload = json.dumps(json.loads(vendor_payload), separators=(",", ":")).encode()
    terminal, bridge = StxEtxLrcFramer(), StxEtxLrcFramer()
    terminal.send_frame(payload, 0.0)
    assert bridge.receive_data(terminal.data_to_send(), 0.1) == [FrameReceived(payload)]
    assert terminal.receive_data(bridge.data_to_send(), 0.2) == [FrameSent(payload)]
    assert not terminal.awaiting_ack


def test_noise_between_frames_is_reported_and_skipped() -> None:
    framer = StxEtxLrcFramer()
    events = framer.receive_data(b"\x00\xffhello" + frame(b"{}") + b"\x7f\x7f", 0.0)
    assert received(events) == [b"{}"]
    assert [(e.reason, e.discarded) for e in errors(events)] == [
        ("line noise between frames", 7), ("line noise between frames", 2)]


def test_truncated_frame_is_reported_and_the_next_stx_restarts() -> None:
    framer = StxEtxLrcFramer()
    events = framer.receive_data(b"\x02{\"cut off" + frame(b'{"whole":1}'), 0.0)
    assert errors(events) == [FramingError("truncated frame: STX before ETX", 10)]
    assert received(events) == [b'{"whole":1}']
    assert framer.data_to_send() == ACK  # no NAK for a frame that never ended


def test_garbage_ending_in_etx_does_not_eat_the_next_frames_stx() -> None:
    # the byte after "\x02abc\x03" is the next frame's STX: in the LRC position, but it does
    # not match, so it is taken as the frame start it is, and nothing is NAKed
    assert lrc(b"abc\x03") != 0x02
    framer = StxEtxLrcFramer()
    events = framer.receive_data(b"\x02abc\x03" + frame(b'{"x":1}'), 0.0)
    assert received(events) == [b'{"x":1}']
    assert framer.data_to_send() == ACK


def test_stray_stx_in_noise_opens_a_frame_that_the_real_stx_restarts() -> None:
    framer = StxEtxLrcFramer()
    events = []
    for chunk in (b"\x00\x02", b"zz", frame(b"{}")[:3], frame(b"{}")[3:]):
        events += framer.receive_data(chunk, 0.0)
    assert received(events) == [b"{}"]
    assert errors(events)[-1] == FramingError("truncated frame: STX before ETX", 3)


def test_frame_of_exactly_max_frame_size_is_accepted_one_more_byte_is_oversize() -> None:
    framer = StxEtxLrcFramer(max_frame_size=8)
    assert framer.receive_data(frame(b"12345678"), 0.0) == [FrameReceived(b"12345678")]
    events = framer.receive_data(frame(b"123456789") + frame(b"{}"), 0.0)
    assert received(events) == [b"{}"]
    assert [e.reason for e in errors(events)] == [
        "oversize frame: no ETX within 8 bytes", "rest of an oversize frame"]
    # every byte of the oversize frame is accounted for: 2+9+1 bytes, STX ... LRC
    assert sum(e.discarded for e in errors(events)) == len(frame(b"123456789"))
    assert framer.data_to_send() == ACK + ACK  # the oversize frame is not answered


def test_oversize_frame_fed_in_pieces_keeps_the_buffer_bounded() -> None:
    framer = StxEtxLrcFramer(max_frame_size=64)
    wire = frame(b"x" * 5000) + frame(b'{"after":1}')
    events = []
    for i in range(0, len(wire), 7):
        events += framer.receive_data(wire[i:i + 7], 0.0)
        assert len(framer._buf) <= 64 + 3
    assert received(events) == [b'{"after":1}']
    assert errors(events)[0].reason.startswith("oversize frame")


def test_oversize_frame_whose_lrc_byte_is_stx_does_not_swallow_the_next_frame() -> None:
    framer = StxEtxLrcFramer(max_frame_size=4)
    events = framer.receive_data(b"\x02" + b"y" * 10 + b"\x03" + frame(b"{}"), 0.0)
    assert received(events) == [b"{}"]


def test_oversize_frame_cut_short_by_a_new_stx() -> None:
    framer = StxEtxLrcFramer(max_frame_size=4)
    events = framer.receive_data(b"\x02" + b"y" * 10, 0.0)
    assert errors(events) == [FramingError("oversize frame: no ETX within 4 bytes", 6)]
    events = framer.receive_data(b"zz" + frame(b"{1}"), 0.0)
    assert events == [FramingError("rest of an oversize frame", 7), FrameReceived(b"{1}")]


# --- acknowledgement and retransmission ---------------------------------------------------


def test_send_frame_transmits_and_waits_for_the_ack() -> None:
    framer = StxEtxLrcFramer()
    assert framer.send_frame(b'{"req":1}', 10.0) == []
    assert framer.data_to_send() == frame(b'{"req":1}')
    assert framer.awaiting_ack
    assert framer.next_deadline() == 12.0
    assert framer.receive_data(ACK, 10.5) == [FrameSent(b'{"req":1}')]
    assert not framer.awaiting_ack
    assert framer.next_deadline() is None


def test_retransmit_on_nak() -> None:
    framer = StxEtxLrcFramer()
    framer.send_frame(b"{}", 0.0)
    assert framer.data_to_send() == frame(b"{}")
    # sent again after a NAK, which line noise can fake while the terminal's ACK is on its
    # way: the terminal may have read both copies, as after silence
    assert framer.receive_data(NAK, 0.3) == [FrameResent(b"{}")]
    assert framer.data_to_send() == frame(b"{}")
    assert framer.next_deadline() == 2.3  # the timer restarts with the retransmission
    assert framer.receive_data(ACK, 0.4) == [FrameSent(b"{}")]


def test_an_answer_acknowledges_the_frame_and_withdraws_a_copy_not_yet_written() -> None:
    """The peer answered the frame (its ACK lost, or line noise read as a NAK): the frame is
    delivered, not sent again at the time-out, and a copy a NAK queued is taken back if it
    has not been written yet; the next frame goes out at the frame's ACK deadline (its ACK
    may still be on the way, the NAK line noise: it must not be taken as the next frame's),
    or at the frame's ACK, if that comes first."""
    framer = StxEtxLrcFramer(ack_timeout=1.0)
    framer.send_frame(b'{"n":1}', 0.0)
    framer.send_frame(b'{"n":2}', 0.0)
    assert framer.data_to_send() == frame(b'{"n":1}')
    assert framer.receive_data(NAK, 0.1) == [FrameResent(b'{"n":1}')]  # queued, not taken
    assert framer.answered(b'{"n":2}', 0.15) == []  # not the frame awaiting its ACK
    assert framer.answered(b'{"n":1}', 0.2) == [FrameSent(b'{"n":1}')]
    assert framer.answered(b'{"n":2}', 0.25) == []  # n 2 has not gone out: no answer to it
    assert framer.data_to_send() == b""  # the copy withdrawn; n 2 waits for n 1's ACK
    assert framer.handle_timeout(1.1) == []  # n 1's ACK deadline: nothing is sent again
    assert framer.data_to_send() == frame(b'{"n":2}')
    assert framer.receive_data(ACK, 1.2) == [FrameSent(b'{"n":2}')]
    assert framer.answered(b'{"n":2}', 1.3) == []  # nothing awaits an ACK: nothing to do


def test_an_ack_withdraws_a_copy_not_yet_written() -> None:
    framer = StxEtxLrcFramer(ack_timeout=1.0)
    framer.send_frame(b"{}", 0.0)
    assert framer.data_to_send() == frame(b"{}")
    # line noise reads as a NAK, the terminal's ACK right behind it, in one read
    assert framer.receive_data(NAK + ACK, 0.1) == [FrameResent(b"{}"), FrameSent(b"{}")]
    assert framer.data_to_send() == b""


def test_a_nak_while_a_copy_waits_to_be_written_spends_no_try() -> None:
    """Line noise read as two NAKs, the terminal's ACK right behind them, in one read: one
    copy queued (the second NAK finds it still unwritten: it answers that NAK already), and
    the ACK takes it back (review rv7, rv8)."""
    framer = StxEtxLrcFramer(ack_timeout=1.0)
    framer.send_frame(b'{"pay":1}', 0.0)
    framer.data_to_send()
    events = framer.receive_data(NAK + NAK + ACK, 0.1)
    assert events == [FrameResent(b'{"pay":1}'), FrameSent(b'{"pay":1}')]
    assert framer.data_to_send() == b""


def test_noise_naks_before_a_copy_is_written_do_not_give_the_frame_up() -> None:
    """As many NAKs as tries, in one read, the frame written once: it is not given up after
    one write (a copy waits), and the terminal's ACK behind them is the frame's own, not
    the next frame's (review rv8)."""
    framer = StxEtxLrcFramer(ack_timeout=1.0, max_tries=3)
    framer.send_frame(b'{"pay":1}', 0.0)
    framer.send_frame(b'{"n":2}', 0.0)
    assert framer.data_to_send() == frame(b'{"pay":1}')
    events = framer.receive_data(NAK + NAK + NAK + ACK, 0.1)
    assert events == [FrameResent(b'{"pay":1}'), FrameSent(b'{"pay":1}')]
    assert framer.data_to_send() == frame(b'{"n":2}')  # the copy taken back, the next frame


def test_a_frame_not_yet_written_is_neither_acknowledged_nor_given_up() -> None:
    """The previous frame's ACK, then line noise read as an ACK and NAKs, in one read: the
    next frame, queued and not yet written, cannot have been read by the terminal, let alone
    refused: nothing of it is reported, and it goes out (review rv8)."""
    framer = StxEtxLrcFramer(ack_timeout=1.0, max_tries=3)
    framer.send_frame(b'{"n":1}', 0.0)
    framer.send_frame(b'{"pay":2}', 0.0)
    assert framer.data_to_send() == frame(b'{"n":1}')
    events = framer.receive_data(ACK + ACK + NAK + NAK + NAK, 0.1)
    assert events == [FrameSent(b'{"n":1}')]
    assert framer.data_to_send() == frame(b'{"pay":2}')
    assert framer.awaiting_ack


def test_a_time_out_while_the_frame_waits_to_be_written_spends_no_try() -> None:
    """The writer waits for a commit longer than ack_timeout: the frame, not written, is not
    queued a second time (two copies would go out at once); its time counts from then."""
    framer = StxEtxLrcFramer(ack_timeout=1.0, max_tries=2)
    framer.send_frame(b'{"pay":1}', 0.0)
    assert framer.handle_timeout(1.0) == []
    assert framer.next_deadline() == 2.0
    assert framer.data_to_send() == frame(b'{"pay":1}')
    assert framer.handle_timeout(2.0) == [FrameResent(b'{"pay":1}')]  # written, unanswered


def test_retransmit_on_timeout() -> None:
    framer = StxEtxLrcFramer(ack_timeout=1.5)
    framer.send_frame(b"{}", 100.0)
    framer.data_to_send()
    assert framer.handle_timeout(101.4) == []  # not yet
    assert framer.data_to_send() == b""
    # sent again after silence: the terminal may have read both copies
    assert framer.handle_timeout(101.5) == [FrameResent(b"{}")]
    assert framer.data_to_send() == frame(b"{}")
    assert framer.next_deadline() == 103.0
    assert framer.receive_data(ACK, 102.0) == [FrameSent(b"{}")]
    assert framer.handle_timeout(200.0) == []
    assert framer.data_to_send() == b""


def test_frame_failed_after_max_tries_of_nak() -> None:
    framer = StxEtxLrcFramer(max_tries=3)
    framer.send_frame(b"{}", 0.0)
    written = framer.data_to_send()
    assert framer.receive_data(NAK, 0.1) == [FrameResent(b"{}")]
    written += framer.data_to_send()  # each copy written before the next NAK
    assert framer.receive_data(NAK, 0.2) == [FrameResent(b"{}")]
    written += framer.data_to_send()
    assert framer.receive_data(NAK, 0.3) == []  # (line noise, perhaps: given up at the deadline)
    deadline = 0.2 + framer.ack_timeout  # the last copy's
    assert framer.next_deadline() == deadline
    events = framer.handle_timeout(deadline)
    assert len(events) == 1 and isinstance(events[0], FrameFailed)
    assert events[0].payload == b"{}"
    assert "NAK" in events[0].reason and "3 tries" in events[0].reason
    assert written == frame(b"{}") * 3 and framer.data_to_send() == b""
    assert not framer.awaiting_ack
    assert framer.next_deadline() is None


def test_frame_failed_after_max_tries_of_timeouts() -> None:
    framer = StxEtxLrcFramer(ack_timeout=2.0, max_tries=2)
    framer.send_frame(b"{}", 0.0)
    written = framer.data_to_send()
    assert framer.handle_timeout(2.0) == [FrameResent(b"{}")]
    written += framer.data_to_send()
    events = framer.handle_timeout(4.0)  # the last try: given up, not sent again
    assert events == [FrameFailed(b"{}", "no ACK within 2 s; gave up after 2 tries")]
    assert written == frame(b"{}") * 2 and framer.data_to_send() == b""
    assert framer.handle_timeout(10.0) == []


def test_second_frame_is_queued_until_the_first_is_acked() -> None:
    framer = StxEtxLrcFramer()
    framer.send_frame(b'{"n":1}', 0.0)
    framer.send_frame(b'{"n":2}', 0.1)
    assert framer.data_to_send() == frame(b'{"n":1}')
    assert framer.receive_data(ACK, 1.0) == [FrameSent(b'{"n":1}')]
    assert framer.data_to_send() == frame(b'{"n":2}')
    assert framer.next_deadline() == 3.0  # timed from when it actually went out
    assert framer.receive_data(ACK, 1.5) == [FrameSent(b'{"n":2}')]
    assert framer.data_to_send() == b""


def test_next_frame_goes_out_after_the_first_failed() -> None:
    framer = StxEtxLrcFramer(max_tries=1)
    framer.send_frame(b'{"n":1}', 0.0)
    framer.send_frame(b'{"n":2}', 0.0)
    framer.data_to_send()
    events = framer.handle_timeout(2.0)
    assert [type(e) for e in events] == [FrameFailed]
    assert framer.data_to_send() == frame(b'{"n":2}')
    assert framer.awaiting_ack


def test_stray_ack_and_nak_with_nothing_outstanding_are_ignored() -> None:
    framer = StxEtxLrcFramer()
    assert framer.receive_data(ACK + NAK + ACK, 0.0) == []
    assert framer.data_to_send() == b""


def test_ack_between_frames_and_noise_acknowledges_our_frame() -> None:
    framer = StxEtxLrcFramer()
    framer.send_frame(b"{}", 0.0)
    framer.data_to_send()
    events = framer.receive_data(b"\xff" + ACK + frame(b'{"resp":1}'), 0.5)
    assert FrameSent(b"{}") in events
    assert received(events) == [b'{"resp":1}']
    assert framer.data_to_send() == ACK


def test_ack_bytes_inside_a_frame_are_payload_not_acknowledgements() -> None:
    framer = StxEtxLrcFramer()
    framer.send_frame(b"{}", 0.0)
    events = framer.receive_data(frame(b"a\x06b\x15c"), 0.5)
    assert events == [FrameReceived(b"a\x06b\x15c")]
    assert framer.awaiting_ack


def test_reset_forgets_partial_frames_and_pending_sends() -> None:
    framer = StxEtxLrcFramer()
    framer.send_frame(b'{"n":1}', 0.0)
    framer.send_frame(b'{"n":2}', 0.0)
    wire = frame(b'{"half":1}')
    framer.receive_data(wire[:5], 0.0)
    framer.reset()
    assert not framer.awaiting_ack
    assert framer.next_deadline() is None
    assert framer.data_to_send() == b""
    assert framer.receive_data(ACK, 1.0) == []  # nothing left to acknowledge
    # the rest of the half frame is now noise, and a whole frame decodes as usual
    events = framer.receive_data(wire[5:] + frame(b"{}"), 1.0)
    assert received(events) == [b"{}"]
    assert framer.data_to_send() == ACK



def test_each_copy_sent_again_after_silence_is_reported_for_its_own_frame() -> None:
    framer = StxEtxLrcFramer(ack_timeout=1.0, max_tries=3)
    framer.send_frame(b'{"n":1}', 0.0)
    framer.send_frame(b'{"n":2}', 0.0)
    framer.data_to_send()  # (the writer writes each transmission as it is queued)
    assert framer.handle_timeout(1.0) == [FrameResent(b'{"n":1}')]
    framer.data_to_send()
    assert framer.handle_timeout(2.0) == [FrameResent(b'{"n":1}')]
    framer.data_to_send()
    assert framer.receive_data(ACK, 2.5) == [FrameSent(b'{"n":1}')]
    # (n 2 waits for the ACKs or NAKs owed for n 1's copies, or the last one's deadline)
    assert framer.data_to_send() == b"" and framer.handle_timeout(3.0) == []
    assert framer.data_to_send() == frame(b'{"n":2}')
    assert framer.receive_data(NAK, 3.1) == [FrameResent(b'{"n":2}')]  # n 2 again
    framer.data_to_send()
    assert framer.receive_data(ACK, 3.2) == [FrameSent(b'{"n":2}')]

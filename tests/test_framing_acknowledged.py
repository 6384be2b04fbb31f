"""The ACK/NAK side the two acknowledged framings (stx-etx-lrc, dle-crc16) share, driven as the
FrameWriter drives it: what data_to_send() returns is written, between events, and the time
of that write is passed in (review rv9)."""

from __future__ import annotations

import pytest

from bridge.protocol.framing import (DleCrc16Framer, FrameFailed, FrameResent, FrameSent,
                                     StxEtxLrcFramer)

ACK, NAK = b"\x06", b"\x15"
FRAMERS = [StxEtxLrcFramer, DleCrc16Framer]


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_the_ack_time_counts_from_the_write(cls) -> None:
    """The payment waited 0.9 s of its 1 s ACK time for the writer (a slow commit before
    it). The time used to count from when it was queued: written at 0.9, it was sent again
    at 1.0, before the terminal could ACK it (README "Wire framing": a frame waiting to be
    written is not sent a second time)."""
    framer = cls(ack_timeout=1.0)
    framer.send_frame(b'{"pay":1}', 0.0)
    assert framer.handle_timeout(0.5) == []
    assert framer.data_to_send(0.9) == framer.encode(b'{"pay":1}')
    assert framer.next_deadline() == pytest.approx(1.9)
    assert framer.handle_timeout(1.0) == [], "sent again 0.1 s after it was written"
    assert framer.handle_timeout(1.9) == [FrameResent(b'{"pay":1}')]
    assert framer.data_to_send(1.95) == framer.encode(b'{"pay":1}')
    assert framer.next_deadline() == pytest.approx(2.95)  # the copy's own time, from its write


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_a_noise_nak_just_before_the_ack_on_the_last_try_does_not_give_the_frame_up(cls) -> None:
    """The abort's last copy is out; line noise read as a NAK, then the terminal's ACK of that
    copy, come in one read. The NAK used to give the abort up (the session: "not
    acknowledged") and the ACK right behind it was dropped. The ACK acknowledges it."""
    framer = cls(ack_timeout=1.0, max_tries=2)
    framer.send_frame(b'{"abort":1}', 0.0)
    framer.send_frame(b'{"n":2}', 0.0)
    framer.data_to_send(0.0)
    assert framer.handle_timeout(1.0) == [FrameResent(b'{"abort":1}')]
    framer.data_to_send(1.0)  # the copy, the last try
    events = framer.receive_data(NAK + ACK, 1.1)
    assert events == [FrameSent(b'{"abort":1}')]


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda c: c.name)
def test_a_nak_alone_on_the_last_try_still_gives_the_frame_up(cls) -> None:
    framer = cls(ack_timeout=1.0, max_tries=2)
    framer.send_frame(b'{"abort":1}', 0.0)
    framer.data_to_send(0.0)
    framer.receive_data(NAK, 0.1)
    framer.data_to_send(0.1)
    (failed,) = framer.receive_data(NAK, 0.2)
    assert isinstance(failed, FrameFailed) and failed.payload == b'{"abort":1}'

"""The ACK/NAK side the two acknowledged framings (stx-etx-lrc, dle-crc16) share, driven as the
FrameWriter drives it: what data_to_send() returns is written, between events, and the time
of that write is passed in (review rv9)."""

from __future__ import annotations

import pytest

from bridge.protocol.framing import (DleCrc16Framer, FrameResent,
                                     StxEtxLrcFramer)

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

"""Floods of frame starts (STX, or DLE STX) from a terminal: each one cuts the frame before it
short, but a run of them is reported as one FramingError, not one per byte. The worker handles
every event on the shared asyncio loop: 10 MiB of 0x02 once stalled it 1.8 s at a time and held
up another terminal's payment by 5 s. Counted in events, never timed."""

from __future__ import annotations

import pytest

from bridge.protocol.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    DleCrc16Framer,
    Framer,
    FrameReceived,
    FramingError,
    StxEtxLrcFramer,
)

MiB = 1024 * 1024
PAYLOAD = b'{"SaleToPOIResponse":{"after":"the flood"}}'


def received(events: list) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, FrameReceived)]


def discarded(events: list) -> int:
    return sum(e.discarded for e in events if isinstance(e, FramingError))


def feed(framer: Framer, data: bytes, chunk: int) -> list[list]:
    """The events of each read, the data cut into reads of `chunk` bytes."""
    return [framer.receive_data(data[i:i + chunk], 0.0) for i in range(0, len(data), chunk)]


# (framer, one frame start, the number of them in the flood: 1 MiB of bytes either way)
FLOODS = [
    pytest.param(StxEtxLrcFramer, b"\x02", MiB, id="stx-etx-lrc"),
    pytest.param(DleCrc16Framer, b"\x10\x02", MiB // 2, id="dle-crc16"),
]


@pytest.mark.parametrize("max_frame_size", [DEFAULT_MAX_FRAME_SIZE, 64])
@pytest.mark.parametrize("make,start,count", FLOODS)
def test_a_flood_of_frame_starts_in_one_read_is_a_few_events_then_the_frame(
        make, start, count, max_frame_size) -> None:
    framer = make(max_frame_size=max_frame_size)
    flood = start * count
    events = framer.receive_data(flood + framer.encode(PAYLOAD), 0.0)
    assert received(events) == [PAYLOAD]
    assert len(events) < 100, len(events)
    assert discarded(events) == len(flood)  # every start of the flood, the last one too
    assert framer.data_to_send() == b"\x06"  # the frame ACKed, nothing NAKed


@pytest.mark.parametrize("chunk", [4096, 4097, 1000])
@pytest.mark.parametrize("make,start,count", FLOODS)
def test_a_flood_of_frame_starts_read_in_pieces_is_a_few_events_per_read(
        make, start, count, chunk) -> None:
    framer = make()
    flood = start * count
    reads = feed(framer, flood + framer.encode(PAYLOAD), chunk)
    events = [event for read in reads for event in read]
    assert received(events) == [PAYLOAD]
    assert max(len(read) for read in reads) <= 3, sorted(len(read) for read in reads)[-5:]
    assert discarded(events) == len(flood)
    assert framer.data_to_send() == b"\x06"


@pytest.mark.parametrize("make,start", [(StxEtxLrcFramer, b"\x02"), (DleCrc16Framer, b"\x10\x02")])
def test_frame_starts_mixed_with_other_noise_are_one_report_per_read(make, start) -> None:
    """Starts with bytes between them (a frame cut short again and again) are one report too;
    the bytes between count among the discarded ones."""
    framer = make()
    noise = (start + b"cut") * 20_000
    events = framer.receive_data(noise + framer.encode(PAYLOAD), 0.0)
    assert received(events) == [PAYLOAD]
    assert events[0] == FramingError(events[0].reason, len(noise))
    assert events[0].reason.startswith("truncated frame")
    assert len(events) == 2


def test_a_start_run_inside_a_frame_still_restarts_at_its_last_start() -> None:
    """A partial frame, then starts, then the rest of a frame: the frame is cut short at the
    first start and the one after the run opens the frame that is delivered."""
    framer = StxEtxLrcFramer()
    events = framer.receive_data(b"\x02{\"partial" + b"\x02" * 5 + b"\x02" + b"{}\x03"
                                 + bytes((ord("{") ^ ord("}") ^ 3,)), 0.0)
    assert events == [FramingError("truncated frame: STX before ETX", 10 + 5),
                      FrameReceived(b"{}")]


def test_a_dle_start_run_keeps_the_dle_pairing() -> None:
    """DLE DLE STX inside a frame is a data DLE and a data STX, not a frame start: a run of
    DLE STX after it still restarts at its last DLE STX, and the frame after it comes out."""
    framer = DleCrc16Framer()
    good = framer.encode(b"\x10\x02 stuffed")
    events = framer.receive_data(b"\x10\x02ab\x10\x10\x02" + b"\x10\x02" * 1000 + good, 0.0)
    assert received(events) == [b"\x10\x02 stuffed"]
    assert [e for e in events if isinstance(e, FramingError)] == [FramingError("truncated frame: DLE STX before DLE ETX", 7 + 2000)]

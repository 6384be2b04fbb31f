"""Hostile inputs that once cost the framers (and the worker) CPU out of all proportion to
their size, on the asyncio loop every terminal shares. Counted in events and in bytes
examined, never timed.

* length-prefixed: `(L.to_bytes(4) + b"{") * k + b" " * L`: k candidates whose payloads all
  end in the same run of blanks, each walked back over it byte by byte (quadratic: 9 s of
  CPU for 64 KiB). The decoder must examine each byte a bounded number of times.
* dle-crc16: `DLE STX` + `(DLE DLE STX) * n`: once past max_frame_size, the frame restarts
  at the next possible frame start every 3 bytes, each restart an event the worker told the
  session about (2 s per 64 KiB read). Restarts in a row in one read are one event, and the
  worker tells the session about one oversize frame per read.

The fixes change no result: differential checks against the framers as they were before
(git revision PRE_FIX, or the old walk re-implemented here) on random streams of frames and
garbage cut into random reads.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import TerminalConfig
from bridge.daemon.journal import Journal
from bridge.daemon.worker import TerminalWorker
from bridge.protocol.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    DleCrc16Framer,
    FrameReceived,
    FramingError,
    LengthPrefixedFramer,
    length_prefixed,
)

KiB = 1024
PAYLOAD = b'{"SaleToPOIResponse":{"after":"the hostile input"}}'
PRE_FIX = "783385b"  # the last revision with the quadratic walk and one event per restart
REPO = Path(__file__).resolve().parent.parent
RESTART = "restarting at a possible frame start inside it"


def received(events: list) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, FrameReceived)]


def discarded(events: list) -> int:
    return sum(e.discarded for e in events if isinstance(e, FramingError))


def feed(framer, data: bytes, chunk: int) -> list[list]:
    """The events of each read, the data cut into reads of `chunk` bytes."""
    return [framer.receive_data(data[i:i + chunk], 0.0) for i in range(0, len(data), chunk)]


def blanks_trap(total: int) -> bytes:
    """k candidate headers claiming L bytes each, then L blanks: every candidate's payload
    ends in the blanks (or in the headers), none in a closer."""
    length = total // 2
    return (length.to_bytes(4, "big") + b"{") * ((total - length) // 5) + b" " * length


def restart_trap(after_limit: int, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """DLE STX, then DLE DLE STX (2 payload bytes in 3) past the limit, and `after_limit`
    bytes more."""
    return b"\x10\x02" + b"\x10\x10\x02" * (max_frame_size // 2 + 1 + after_limit // 3)


class CountingBuffer(bytearray):
    """A framer buffer that counts the bytes read out of it by indexing and slicing (a byte
    walk counts one per step, a slice its length)."""

    examined = 0

    def __getitem__(self, key):
        got = super().__getitem__(key)
        self.examined += len(got) if isinstance(key, slice) else 1
        return got


# --- length-prefixed: candidates ending in one run of blanks --------------------------------


@pytest.mark.parametrize("chunk", [None, 4096, 1000, 7])
@pytest.mark.parametrize("total", [16 * KiB, 64 * KiB])
def test_candidates_ending_in_one_run_of_blanks_then_a_frame(total, chunk) -> None:
    framer = LengthPrefixedFramer()
    trap = blanks_trap(total)
    wire = trap + framer.encode(PAYLOAD)
    reads = feed(framer, wire, chunk or len(wire))
    events = [event for read in reads for event in read]
    assert received(events) == [PAYLOAD]
    assert discarded(events) == len(trap)  # every byte of the trap, nothing of the frame
    assert max(len(read) for read in reads) <= 3


@pytest.mark.parametrize("chunk", [None, 512])
@pytest.mark.parametrize("total", [4 * KiB, 8 * KiB])
def test_candidates_ending_in_one_run_of_blanks_are_examined_in_linear_work(
        total, chunk) -> None:
    """Each candidate walked back over the whole run of blanks: ~total^2/40 bytes examined
    (400 K for 4 KiB, 100 times the input). Now a bounded number per byte."""
    framer = LengthPrefixedFramer()
    framer._buf = CountingBuffer()
    wire = blanks_trap(total) + framer.encode(PAYLOAD)
    reads = feed(framer, wire, chunk or len(wire))
    assert received([e for read in reads for e in read]) == [PAYLOAD]
    assert framer._buf.examined <= 8 * len(wire), (framer._buf.examined, len(wire))


def test_blank_runs_are_remembered_across_reads_and_forgotten_once_dropped() -> None:
    """Candidates completed one read at a time each end in the same run: the run is not
    walked again, and what the decoder remembers stays bounded by its buffer."""
    framer = LengthPrefixedFramer(max_frame_size=4 * KiB)
    framer._buf = CountingBuffer()
    wire = b""
    for _ in range(20):
        wire += blanks_trap(6 * KiB) + framer.encode(PAYLOAD)
    reads = feed(framer, wire, 3)
    assert received([e for read in reads for e in read]) == [PAYLOAD] * 20
    assert framer._buf.examined <= 12 * len(wire), (framer._buf.examined, len(wire))
    assert len(framer._solid) <= 2 * (len(framer._buf) // 32) + 64 + 8 * KiB // 32


# --- dle-crc16: oversize restarts every 3 bytes ---------------------------------------------


@pytest.mark.parametrize("chunk", [None, 4096, 4097, 1000])
@pytest.mark.parametrize("after_limit", [16 * KiB, 64 * KiB])
def test_oversize_restarts_in_a_row_are_one_event_per_read_then_the_frame(
        after_limit, chunk) -> None:
    framer = DleCrc16Framer()
    trap = restart_trap(after_limit)
    wire = trap + framer.encode(PAYLOAD)
    reads = feed(framer, wire, chunk or len(wire))
    events = [event for read in reads for event in read]
    assert received(events) == [PAYLOAD]
    assert max(len(read) for read in reads) <= 3, sorted(len(read) for read in reads)[-5:]
    assert discarded(events) == len(trap)
    assert framer.data_to_send() == b"\x06"  # the frame ACKed, the oversize one not NAKed


def test_restarts_are_still_reported_when_interleaved_with_other_errors() -> None:
    """Only restarts in a row merge: a frame start cut short between them keeps its own
    report, in order."""
    framer = DleCrc16Framer(max_frame_size=16)
    piece = restart_trap(60, 16)
    events = framer.receive_data(piece + piece + framer.encode(b"ok"), 0.0)
    reasons = [e.reason for e in events if isinstance(e, FramingError)]
    # restarts, the second trap's DLE STX cutting short, restarts, the frame's DLE STX
    assert [RESTART in r for r in reasons] == [True, False, True, False], reasons
    assert received(events) == [b"ok"]
    assert discarded(events) == 2 * len(piece)


# --- the worker: one oversize frame told per read --------------------------------------------


@pytest.fixture
def worker(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite3")
    config = TerminalConfig.model_validate({
        "poi_id": "V400m-324688179", "link": {"kind": "serial", "device": "/dev/null"},
        "framer": {"name": "dle-crc16"}})

    class Outlet:
        def deliver(self, result): pass
        def progress(self, event): pass
        def terminal_state(self, poi_id, state): pass

    worker = TerminalWorker(config, journal, Outlet())
    told = []
    real = worker.session.oversize

    def oversize(reason, now):
        told.append(reason)
        return real(reason, now)

    worker.session.oversize = oversize
    worker.told = told
    yield worker
    journal.close()


def test_the_worker_tells_one_oversize_frame_per_read_and_counts_every_error(worker) -> None:
    events = [FramingError(f"oversize frame: over 10 bytes (#{n})", 10) for n in range(50)]
    events += [FramingError("bad CRC", 5), FramingError("oversize frame: over 10 bytes", 9)]
    worker._framer_events(events)
    assert len(worker.told) == 1
    assert worker.counters["framing_errors"] == 52
    worker._framer_events(events[:2])  # the next read: told again
    assert len(worker.told) == 2
    assert worker.counters["framing_errors"] == 54


@pytest.mark.parametrize("chunk", [4096, 65536])
def test_the_worker_on_restart_noise_tells_the_session_at_most_once_per_read(
        worker, chunk) -> None:
    trap = restart_trap(64 * KiB)
    for reads, i in enumerate(range(0, len(trap), chunk), 1):
        worker._framer_events(worker.framer.receive_data(trap[i:i + chunk], 0.0))
        assert len(worker.told) <= reads
    assert worker.told  # oversize frames were told, just not each restart
    assert worker.counters["framing_errors"] >= len(worker.told)


# --- differential checks: the same results as before the fixes -------------------------------


def old_module(path: str, tmp_path: Path):
    """The module at `path` as of revision PRE_FIX, or skip (no git, or a shallow copy)."""
    try:
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{PRE_FIX}:{path}"],
                              capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"revision {PRE_FIX} not available")
    name = "prefix_" + Path(path).stem
    file = tmp_path / f"{name}.py"
    file.write_bytes(text)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class WalkingFramer(LengthPrefixedFramer):
    """The decoder with the old plausibility check: a byte-by-byte walk over the blanks."""

    def _ends_plausibly(self, start: int, end: int) -> bool:
        data = self._buf
        end -= 1
        while end >= start and data[end] in b" \t\r\n":
            end -= 1
        return end >= start and data[end] in b"}>"


def lp_stream(rng: random.Random, max_frame_size: int) -> bytes:
    out = bytearray()
    framer = LengthPrefixedFramer()
    for _ in range(rng.randrange(1, 40)):
        kind = rng.randrange(7)
        if kind == 0:
            body = json.dumps({"n": rng.randrange(10**6), "s": "x" * rng.randrange(300)})
            out += framer.encode(body.encode() + rng.choice([b"", b" ", b"\r\n", b" \t " * 40]))
        elif kind == 1:
            out += rng.randbytes(rng.randrange(1, 60))
        elif kind == 2:
            out += bytes(rng.choice(b" \t\r\n") for _ in range(rng.randrange(1, 400)))
        elif kind == 3:  # a header whose payload may end anywhere, opener and all
            length = rng.choice([0, rng.randrange(1, 600), max_frame_size + 1, 2**32 - 1])
            out += length.to_bytes(4, "big") + rng.choice([b"{", b"<", b"x"])
        elif kind == 4:
            out += rng.choice([b"}", b">", b"} ", b">\r\n", b"{", b"<"])
        elif kind == 5:
            out += blanks_trap(rng.randrange(10, 2000))
        else:  # a frame of XML with blanks inside and after
            out += framer.encode(b"<a>" + b" " * rng.randrange(200) + b"</a>"
                                 + b" " * rng.randrange(200))
    return bytes(out)


def run(framer, data: bytes, cuts: list[int]) -> list:
    """Per read: its events and what the framer then wants to send; then a stall."""
    out = []
    start = 0
    for cut in cuts + [len(data)]:
        out.append((framer.receive_data(data[start:cut], 0.0), framer.data_to_send()))
        start = cut
    due = framer.next_deadline()
    while due is not None:
        out.append((framer.handle_timeout(due), framer.data_to_send()))
        due = framer.next_deadline() if framer.next_deadline() != due else None
    return out


def random_cuts(rng: random.Random, size: int) -> list[int]:
    cuts, at = [], 0
    while True:
        at += rng.choice([1, 2, 3, 5, 64, 500, 4096, rng.randrange(1, 2000)])
        if at >= size:
            return cuts
        cuts.append(at)


@pytest.mark.parametrize("reference", ["pre-fix revision", "old walk"])
def test_length_prefixed_results_are_those_of_the_old_decoder(reference, tmp_path) -> None:
    if reference == "pre-fix revision":
        old = old_module("bridge/protocol/framing/length_prefixed.py", tmp_path)
        make_old = old.LengthPrefixedFramer
    else:
        make_old = WalkingFramer
    rng = random.Random(20261203)
    for case in range(250):
        max_frame_size = rng.choice([16, 64, 600, 4096, DEFAULT_MAX_FRAME_SIZE])
        data = lp_stream(rng, max_frame_size)
        cuts = random_cuts(rng, len(data))
        new = run(LengthPrefixedFramer(max_frame_size=max_frame_size), data, cuts)
        was = run(make_old(max_frame_size=max_frame_size), data, cuts)
        assert new == was, (case, max_frame_size)


def merge_restarts(events: list) -> list:
    """The old decoder's events as the new one reports them: restarts in a row, one."""
    out: list = []
    for event in events:
        last = out[-1] if out else None
        if (isinstance(event, FramingError) and RESTART in event.reason
                and isinstance(last, FramingError) and last.reason == event.reason):
            out[-1] = FramingError(event.reason, last.discarded + event.discarded)
        else:
            out.append(event)
    return out


def dle_stream(rng: random.Random, max_frame_size: int) -> bytes:
    framer = DleCrc16Framer()
    out = bytearray()
    for _ in range(rng.randrange(1, 30)):
        kind = rng.randrange(6)
        if kind == 0:
            payload = bytes(rng.choice(b"\x10\x02\x03ab") for _ in range(rng.randrange(80)))
            out += framer.encode(payload)
        elif kind == 1:
            out += bytes(rng.choice(b"\x10\x02\x03\x06\x15a") for _ in range(rng.randrange(40)))
        elif kind == 2:
            out += restart_trap(rng.randrange(0, 400), max_frame_size)
        elif kind == 3:
            out += b"\x10\x10\x02" * rng.randrange(1, 100)
        elif kind == 4:
            out += rng.randbytes(rng.randrange(1, 100))
        else:
            out += b"\x10\x02" + b"a\x10\x10" * rng.randrange(200)
    return bytes(out)


def test_dle_crc16_results_are_those_of_the_old_decoder_restarts_merged(tmp_path) -> None:
    old = old_module("bridge/protocol/framing/dle_crc16.py", tmp_path)
    rng = random.Random(3122026)
    merged = 0
    for case in range(250):
        max_frame_size = rng.choice([1, 4, 16, 64, 300])
        data = dle_stream(rng, max_frame_size)
        cuts = random_cuts(rng, len(data))
        new = run(DleCrc16Framer(max_frame_size=max_frame_size), data, cuts)
        was = run(old.DleCrc16Framer(max_frame_size=max_frame_size), data, cuts)
        merged += sum(len(events) for events, _ in was) - sum(len(events) for events, _ in new)
        assert new == [(merge_restarts(events), sent) for events, sent in was], \
            (case, max_frame_size)
    assert merged > 1000  # (the streams do make restarts in a row)


def test_the_module_plausibility_check_is_the_old_walk() -> None:
    """(encode's check, on any slice)"""
    rng = random.Random(7)
    for _ in range(2000):
        text = bytes(rng.choice(b" \t\r\n}>{<a") for _ in range(rng.randrange(12)))
        start = rng.randrange(len(text) + 1)
        end = rng.randrange(start, len(text) + 1)
        walker = WalkingFramer()
        walker._buf = bytearray(text)
        assert length_prefixed._ends_plausibly(text, start, end) == \
            walker._ends_plausibly(start, end), (text, start, end)

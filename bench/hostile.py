"""Hostile input: what one piece of crafted input costs the shared event loop.

Every terminal and the MQTT side share one event loop, so the CPU one input takes is time
every other payment waits. This prints, for inputs found by review to be costly (runs of
frame starts, resync candidates, restarts past the frame limit, text the card-data filter
scans), the CPU time of handling one piece of it at each size: a cost that grows faster
than the size is a defect. `python -m bench.hostile [--sizes 4096,16384,65536]`.

A row whose time at one size passes --give-up seconds is not run at the larger sizes (the
code before the fixes took minutes there); it shows `>` and the size it stopped at.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.protocol.framing import make_framer
from bridge.redaction import redact

READ = 4096  # bytes per read as a serial link hands them over (more only when behind)


def _frames(name: str, data: bytes, read: int) -> Callable[[], int]:
    def run() -> int:
        framer = make_framer(name)
        events = 0
        for i in range(0, len(data), read):
            events += len(framer.receive_data(data[i:i + read], 0.0))
            framer.data_to_send()
        return events
    return run


def _redact(text: str) -> Callable[[], int]:
    def run() -> int:
        return len(redact(text))
    return run


def _length_candidates(size: int) -> bytes:
    # Many 4-byte lengths each followed by "{", then blanks: each is a resync candidate
    # whose trailing blanks were walked byte by byte
    blanks = size // 2
    count = (size - blanks) // 5
    return (blanks.to_bytes(4, "big") + b"{") * count + b" " * blanks


def _repeat(unit: bytes | str, size: int) -> Any:
    return (unit * (size // len(unit) + 1))[:size]


# (input, what it is, size -> (make the call)); sizes in bytes of input
CASES: list[tuple[str, Callable[[int], Callable[[], int]]]] = [
    ("stx-etx-lrc: 0x02 over and over, 4 KiB reads",
     lambda n: _frames("stx-etx-lrc", _repeat(b"\x02", n), READ)),
    ("stx-etx-lrc: STX c ETX (a bad frame every 3 bytes), 4 KiB reads",
     lambda n: _frames("stx-etx-lrc", _repeat(b"\x02c\x03", n), READ)),
    ("dle-crc16: DLE STX over and over, 4 KiB reads",
     lambda n: _frames("dle-crc16", _repeat(b"\x10\x02", n), READ)),
    ("dle-crc16: DLE STX DLE DLE (short runs), 4 KiB reads",
     lambda n: _frames("dle-crc16", _repeat(b"\x10\x02\x10\x10", n), READ)),
    ("dle-crc16: DLE STX then DLE DLE STX past the limit, one read",
     lambda n: _frames("dle-crc16", b"\x10\x02" + _repeat(b"\x10\x10\x02", 65536 + n), 1 << 30)),
    ("length-prefixed: lengths then blanks, one read",
     lambda n: _frames("length-prefixed", _length_candidates(n), 1 << 30)),
    ("redact: '1%' over and over", lambda n: _redact(_repeat("1%", n))),
    ("redact: '1 ' over and over, then a mask", lambda n: _redact(
        _repeat("1 ", n - 10) + ";1234567*")),
    ("redact: '1 ' over and over", lambda n: _redact(_repeat("1 ", n))),
    ("redact: '1-' over and over", lambda n: _redact(_repeat("1-", n))),
    ("redact: 'pan=1 ' over and over", lambda n: _redact(_repeat("pan=1 ", n))),
]


def measure(sizes: list[int], give_up: float) -> list[dict[str, Any]]:
    rows = []
    for label, make in CASES:
        row: dict[str, Any] = {"input": label, "ms": {}, "stopped_at": None}
        for size in sizes:
            call = make(size)
            start = time.process_time()
            call()
            took = time.process_time() - start
            row["ms"][size] = round(took * 1000, 2)
            if took > give_up:
                row["stopped_at"] = size
                break
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,16384,65536",
                        help="input sizes in bytes, comma-separated")
    parser.add_argument("--give-up", type=float, default=5.0,
                        help="seconds: past this at one size, the larger ones are not run")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = measure(sizes, args.give_up)
    width = max(len(row["input"]) for row in rows)
    print("CPU ms to handle one input of each size (process_time, one call)")
    print(f"{'input':<{width}}  " + "  ".join(f"{size:>9}" for size in sizes))
    print(f"{'-' * width}  " + "  ".join("-" * 9 for _ in sizes))
    for row in rows:
        cells = []
        for size in sizes:
            if size in row["ms"]:
                cells.append(f"{row['ms'][size]:>9.2f}")
            else:
                cells.append(f"{'>':>9}")
        print(f"{row['input']:<{width}}  " + "  ".join(cells))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as out:
            json.dump({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows},
                      out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

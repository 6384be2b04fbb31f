"""py-spy against the daemon process, and a summary of where its CPU went."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def find_pyspy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


RATE = 200  # samples per second


def start(pid: int, seconds: float, out: Path, rate: int = RATE, *,
          gil: bool = False) -> subprocess.Popen[bytes]:
    """Sample `pid` for `seconds`. Without `gil`: every sample where the event loop's thread
    is not idle, including time blocked in a system call such as fsync (what occupies the
    loop). With `gil`: only samples where it holds the GIL (Python CPU work)."""
    binary = find_pyspy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(rate), "--format", "raw", "--output", str(out)]
        + (["--gil"] if gil else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _short(file: str) -> str:
    for marker in ("/site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _area(file: str) -> str:
    short = _short(file)
    top = short.split("/", 1)[0]
    if top == "bridge":
        return "/".join(short.split("/")[:2]).removesuffix(".py")
    if top.endswith(".py"):
        return top.removesuffix(".py")
    return top


_ALWAYS = ("bridge/__main__.py", "bridge/cli.py", "bridge/cli_daemon.py")  # 100%, no news


def summarise(raw: Path, top: int = 15, *, seconds: float | None = None,
              rate: int | None = None) -> dict[str, Any]:
    """Self time per line and per area (the innermost Python frame), and inclusive time per
    bridge function, from py-spy's raw (collapsed stacks) output, for the event loop's thread.
    With `seconds` and `rate`: the share of the recording the loop was busy (not in epoll)."""
    self_lines: Counter[str] = Counter()
    self_areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        if frames[0].startswith("Thread._bootstrap"):
            continue  # a worker thread (executor, idle in queue.get): not the event loop
        total += samples
        # the thread label py-spy puts first ("process 123:..." / "thread (0x..)") is not a frame
        parsed = [m for m in (_FRAME.match(f) for f in frames) if m and m.group("file")]
        if not parsed:
            continue
        leaf = parsed[-1]
        self_lines[f"{leaf.group('func')} ({_short(leaf.group('file'))}:{leaf.group('line')})"] \
            += samples
        self_areas[_area(leaf.group("file"))] += samples
        seen = set()
        for m in parsed:
            short = _short(m.group("file"))
            if short.startswith("bridge/") and short not in _ALWAYS:
                key = f"{short}:{m.group('func')}"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += samples

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in counter.most_common(top)] if total else []

    busy = round(100.0 * total / (seconds * rate), 1) if seconds and rate else None
    return {"samples": total, "loop_busy_pct": busy, "self_lines": pct(self_lines),
            "self_areas": pct(self_areas), "bridge_inclusive": pct(inclusive)}


def render(title: str, summary: dict[str, Any]) -> str:
    busy = summary.get("loop_busy_pct")
    out = [f"--- profile: {title} ({summary['samples']} samples of the daemon's event-loop thread"
           + (f"; it was busy, not waiting in epoll, {busy}% of the time)" if busy else ")")]
    for key, label in (("self_areas", "self time by area (innermost Python frame)"),
                       ("bridge_inclusive", "inclusive time in bridge functions"),
                       ("self_lines", "self time by line")):
        out.append(f"  {label}:")
        for name, share in summary[key]:
            out.append(f"    {share:5.1f}%  {name}")
    return "\n".join(out)

"""Shared pieces of the benchmark: the machine, statistics, /proc readings, requests.

Nothing here knows a result in advance: every number the suite prints comes from a clock,
/proc or a counter read while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import selectors
import subprocess
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "adyen" / "dotnet-pospayment-success.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")

BAUD = 115200
FRAMER = "stx-etx-lrc"
# The simulator's pacing writes baud // 1000 bytes per write (server.py), on an absolute
# schedule: 115 bytes, which is 10 ms of line time at 115200 baud 8N1. Each piece lands in the
# pty at the start of its 10 ms slot.
PACING_CHUNK = max(1, BAUD // 1000)

T = TypeVar("T")


def precise_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire when they are due, for the process that hosts the
    simulated terminals. The default selector, epoll, waits in whole milliseconds rounded up,
    so every sleep of a simulated terminal (its ACK's line time, its processing time, each
    paced piece of its answer) ended up to 1 ms late: about 2 ms a payment, which section 1
    counted as bridge-added (and baseline-added) time. select() waits in microseconds; it
    takes descriptors below 1024 only, far more than 64 terminals and their registers use."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def run_precise(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on a precise_loop()."""
    with asyncio.Runner(loop_factory=precise_loop) as runner:
        return runner.run(main)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection in a benchmark process while it measures. With 32
    terminals a full collection of the process hosting the simulated terminals and the
    registers took 30-45 ms: every terminal answered late and every register read late for
    that long, and the payments caught in it made the bridge's p99 (or the baseline's).
    Physical terminals and registers have no such pause. Collected before and after; the
    daemon, which is what is measured, keeps its collector."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


# --- the machine ---------------------------------------------------------------------------

def machine(mosquitto: str | None) -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    version = None
    if mosquitto:
        try:
            out = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, timeout=5,
                                 check=False)
            first = (out.stdout or out.stderr).strip().splitlines()
            version = first[0] if first else None
        except (OSError, subprocess.SubprocessError):
            version = None
    load = os.getloadavg()
    return {
        "code": code_revision(),
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "mosquitto": version,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def code_revision() -> str:
    """The commit measured, and whether bridge/ had uncommitted changes (read-only git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=5, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bridge"], cwd=ROOT,
                               text=True, capture_output=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes in bridge/" if dirty.strip() else "")


# --- statistics ----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no data."""
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def summary_ms(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000.0 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": _r(percentile(ms, 50)),
        "p99_ms": _r(percentile(ms, 99)),
        "min_ms": _r(min(ms)) if ms else None,
        "max_ms": _r(max(ms)) if ms else None,
    }


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --- a process seen from /proc -------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds (/proc/<pid>/stat fields 14 and 15)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int | None:
    """A 'kB' line of /proc/<pid>/status: VmHWM (peak RSS), VmRSS."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuWindow:
    """CPU seconds a process used between start() and stop(), and the wall time between."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.cpu0 = self.wall0 = 0.0
        self.cpu = self.wall = None

    def start(self) -> None:
        self.wall0 = time.monotonic()
        self.cpu0 = self._cpu() or 0.0

    def stop(self) -> None:
        self.wall = time.monotonic() - self.wall0
        cpu = self._cpu()
        self.cpu = None if cpu is None else cpu - self.cpu0

    def _cpu(self) -> float | None:
        if self.pid is None:
            usage = os.times()
            return usage.user + usage.system
        return proc_cpu_seconds(self.pid)

    def result(self, payments: int) -> dict[str, Any]:
        if self.cpu is None or not self.wall:
            return {"cpu_s": None, "cpu_pct_core": None, "cpu_ms_per_payment": None}
        return {
            "cpu_s": round(self.cpu, 3),
            "cpu_pct_core": round(100.0 * self.cpu / self.wall, 1),
            "cpu_ms_per_payment": round(1000.0 * self.cpu / payments, 3) if payments else None,
        }


# --- what registers send ----------------------------------------------------------------------

SMALL_AMOUNT = 12.5   # the simulator's own PaymentResponse (receipts, masked card data)
LARGE_AMOUNT = 11.0   # the vendor's PaymentResponse fixture, IDs rewritten by the simulator


def poi_id(index: int) -> str:
    return f"V400m-{100001 + index}"


def sale_id(index: int) -> str:
    return f"TILL{index + 1:02d}"


def payment_request(sale: str, service: str, poi: str, amount: float) -> dict[str, Any]:
    """A register's PaymentRequest of about 500 bytes, like a real till's (operator, a sale
    reference and acquirer data on top of the minimum)."""
    from bridge.simulator.responses import payment_request as minimal

    document = minimal(sale, service, poi, amount, "EUR")
    sale_data = document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]
    sale_data["OperatorID"] = "Operator01"
    sale_data["SaleReferenceID"] = f"{sale}-{service}-ref"
    sale_data["SaleToAcquirerData"] = ("applicationInfo.merchantApplication.name=poi-bridge-bench"
                                       "&applicationInfo.merchantApplication.version=1.0"
                                       "&tenderOption=ReceiptHandler,AskGratuity")
    return document


# The benchmark's own MQTT clients (registers, the baseline's publisher and subscriber) disable
# Nagle's algorithm: a client that both receives QoS 1 messages (and answers PUBACK) and
# publishes would otherwise hold its next small publish until the broker's delayed ACK of
# that PUBACK (up to 40 ms on Linux). That delay belongs to the instrument, not to the bridge.
# The daemon's own socket is left as the bridge configures it.
def nodelay() -> list[tuple[int, int, int]]:
    import socket

    return [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def compact(document: Any) -> bytes:
    """The bytes the bridge writes for a document (FrameWriter.encode: compact, UTF-8)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


class ServiceIds:
    """Unique ServiceIDs (1-10 letters and digits; the simulated terminals ignore a repeat), all
    SERVICE_ID_WIDTH long, so every message of a kind has the same size on the wire."""

    ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.count = 0

    def next(self) -> str:
        self.count += 1
        n, out = self.count, ""
        while n:
            n, d = divmod(n, 36)
            out = self.ALPHABET[d] + out
        sid = self.tag + out.rjust(SERVICE_ID_WIDTH - len(self.tag), "0")
        assert len(sid) == SERVICE_ID_WIDTH, sid
        return sid


SERVICE_ID_WIDTH = 8


def machine_speed(rounds: int = 7, per_round: int = 200) -> dict[str, Any]:
    """json.loads of the vendor's 11 KB fixture, median of `rounds`: how fast this VM is
    computing right now. Its speed changes from hour to hour (55 and 110 us on the same day),
    and every other figure with it: compare runs by this one."""
    import statistics

    raw = FIXTURE.read_text()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            json.loads(raw)
        samples.append((time.perf_counter() - start) / per_round * 1e6)
    return {"json_loads_fixture_us": round(statistics.median(samples), 1),
            "bytes": len(raw)}


def journal_commit_floor(directory: Path, commits: int = 300) -> dict[str, Any]:
    """SQLite WAL synchronous=FULL commits of a 1 KB row on the file system the daemon's
    journal uses: the disk's share of every journal write the bridge makes."""
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        db = sqlite3.connect(Path(tmp) / "floor.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        times = []
        for _ in range(commits):
            start = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (v) VALUES (?)", (b"x" * 1024,))
            db.execute("COMMIT")
            times.append(time.perf_counter() - start)
        db.close()
    return {"commits": commits, **summary_ms(times)}

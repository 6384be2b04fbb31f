"""poi-bridge benchmarks against the physical limit: `make bench` (or bench/run.py --quick).

    .venv/bin/python bench/run.py              # full run, about 4-5 minutes on a 2-core box
    .venv/bin/python bench/run.py --quick      # about a minute: 32 and 64 terminals, short windows
    .venv/bin/python bench/run.py --sections core          # just the in-process core (no broker)
    .venv/bin/python bench/run.py --terminals 1,32         # other terminal counts for section 1
    .venv/bin/python bench/run.py --broker-nodelay         # mosquitto with set_tcp_nodelay true
    .venv/bin/python bench/run.py --what-if journal-normal   # a PATCHED daemon (see
                                               # bench/whatif.py): what a change would buy;
                                               # written to bench/results/whatif-latest.json

Needs mosquitto (apt-get install mosquitto) for sections latency, throughput, recovery.
Prints a table and writes the same numbers as JSON to bench/results/latest.json.

What runs where: the simulated terminals (SimulatorServer on real pseudo-terminals, paced
at 115200 baud 8N1) and the registers' MQTT client run in this process; the bridge runs
as its own process (`python -m bridge run --config ...`) so /proc/<pid>/stat and
/proc/<pid>/status give its own CPU time and peak RSS (VmHWM); the baseline (bench/baseline.py)
is a process of its own too; mosquitto is a real broker on a free port, with persistence
saved at its default interval (1800 s) as on a store's box, and set_tcp_nodelay at its
default (off) unless --broker-nodelay. The benchmark's own MQTT clients set TCP_NODELAY
(bench/common.py: nodelay) so the instrument adds no Nagle delays of its own.

Profiling the daemon (py-spy attaches to the running process; pyinstrument cannot):
    .venv/bin/pip install py-spy                    # once
    .venv/bin/python bench/run.py --profile         # 64 terminals paced (vendor fixture), then
        # unpaced (other loads: --profile-loads paced-32-small,...); for each, py-spy records the daemon twice: "busy" (every sample where the
        # event loop is not idle in epoll, including time blocked in fsync) and "cpu" (--gil,
        # Python work only). Raw stacks: bench/results/profile-*.txt; the summary (self time by
        # area and line, inclusive time per bridge function) is printed and saved in
        # bench/results/profile.json.
    # by hand, on any running daemon:
    .venv/bin/py-spy top --pid PID
    .venv/bin/py-spy record --pid PID --duration 20 --format speedscope -o daemon.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common
from bench.common import BAUD, FIXTURE, ServiceIds, proc_cpu_seconds, summary_ms

RESULTS = ROOT / "bench" / "results"
DELAY = 0.05  # the simulated terminal's processing time per payment (section 1)
# A register's pause between payments, uniform in this range (s): random so terminals do not
# lock into step, at least 10 ms so the simulator's pacing tail never delays the next request.
THINK = (0.010, 0.030)

# Section 1b': a store's pace. A contactless payment with online authorisation takes the
# terminal about 2 s; the register then rings up the next basket. Even this is far busier
# than a real store (a lane takes a payment a minute or so): 64 lanes give ~20 payments/s.
STORE_PROCESSING = 2.0
STORE_THINK = (0.5, 2.5)

FULL = {
    "latency_ns": [1, 8, 32, 64], "durations": {"small": 8.0, "fixture": 10.0},
    "store_n": 64, "store_s": 30.0,
    "throughput_n": 64, "throughput_s": 15.0, "recovery_ns": [1, 16, 64], "core_s": 0.5,
    "io_s": 4.0,
}
QUICK = {
    "latency_ns": [32, 64], "durations": {"small": 2.5, "fixture": 3.0},
    "store_n": 64, "store_s": 10.0,
    "throughput_n": 64, "throughput_s": 4.0, "recovery_ns": [64], "core_s": 0.05,
    "io_s": 1.0,
}
SECTIONS = ("latency", "store", "throughput", "recovery", "core")
BROKER_AUTOSAVE_S = 1800  # mosquitto's default


# --- sections -------------------------------------------------------------------------------

async def section_latency(broker: Any, workroot: Path, plan: dict[str, Any],
                          log: Any) -> list[dict[str, Any]]:
    from bench.e2e import (
        LARGE,
        SMALL,
        DaemonProcess,
        Fleet,
        Registers,
        closed_loop,
        e2e_summary,
        wire_model,
        write_config,
    )

    variants = [SMALL, LARGE]
    wires = {v.name: wire_model(v, DELAY) for v in variants}
    rows: list[dict[str, Any]] = []
    for n in plan["latency_ns"]:
        workdir = workroot / f"latency-{n}"
        workdir.mkdir(parents=True)
        fleet = await Fleet(n, DELAY, BAUD).start()
        base = f"bench/latency{n}"
        daemon = DaemonProcess(write_config(workdir, broker, base, fleet.devices),
                               workdir / "daemon.log")
        ids = [ServiceIds("b") for _ in range(n)]
        try:
            async with Registers(broker, base) as registers:
                daemon.start()
                try:
                    ready = await registers.wait_ready(n)
                except TimeoutError:
                    raise RuntimeError("the daemon did not come up:\n" + daemon.log_tail()) from None
                for variant in variants:
                    duration = plan["durations"][variant.name]
                    log(f"  latency: {n} terminal(s), {variant.name} response, {duration:g} s")
                    result = await closed_loop(
                        registers, n, variant.amount, duration, ids, daemon_pid=daemon.pid,
                        broker_pid=broker.process.pid, period=wires[variant.name]["floor_ms"] / 1000,
                        think=THINK)
                    if not daemon.alive():
                        raise RuntimeError("the daemon died:\n" + daemon.log_tail())
                    rows.append({
                        "terminals": n, "response": variant.name,
                        "wire": dict(wires[variant.name]),
                        "bridge": {
                            **e2e_summary(result.latencies, wires[variant.name]),
                            "failures": result.failures, "window_s": round(result.wall, 2),
                            "payments_per_s": round(len(result.latencies) / result.wall, 2),
                            "daemon": {**result.daemon_cpu,
                                       "peak_rss_kb": daemon.peak_rss_kb()},
                            "mosquitto": result.broker_cpu, "bench_process": result.bench_cpu,
                            "bench_loop_lag": result.loop_lag,
                            "daemon_ready_s": round(ready, 2),
                        },
                    })
        finally:
            daemon.terminate()
            await fleet.close()
        for key, durable in (("baseline", False), ("durable_baseline", True)):
            log(f"  latency: {n} terminal(s), {key.replace('_', ' ')}")
            data_by_response = await _baseline_run(broker, workdir, plan, n, wires, variants,
                                                   durable=durable)
            for row in rows[-len(variants):]:
                row[key] = data_by_response[row["response"]]
                if row[key]["failures"]:
                    row[f"{key}_diagnostics"] = data_by_response["diagnostics"][:10]
        for row in rows[-len(variants):]:
            b, z = row["bridge"], row["baseline"]
            observed = z["observed_response_frame_bytes"]
            row["wire"]["model_matches_wire"] = observed == [row["wire"]["response_frame_bytes"]]
            row["ratio_p50"] = _ratio(b["p50_ms"], z["p50_ms"])
            row["ratio_p99"] = _ratio(b["p99_ms"], z["p99_ms"])
            row["bridge_minus_baseline_p50_ms"] = _diff(b["p50_ms"], z["p50_ms"])
            row["bridge_minus_baseline_p99_ms"] = _diff(b["p99_ms"], z["p99_ms"])
    return rows


async def _baseline_run(broker: Any, workdir: Path, plan: dict[str, Any], n: int,
                        wires: dict[str, Any], variants: list[Any], *,
                        durable: bool) -> dict[str, Any]:
    """The baseline of 1b (or, `durable`, of 1d) on fresh terminals of the same behaviour."""
    from bench.e2e import Fleet, LoopLag, e2e_summary, run_baseline

    fleet = await Fleet(n, DELAY, BAUD).start()
    try:
        with common.collector_paused():  # as for the bridge's runs: the simulators live here
            lag = LoopLag()
            lag.start()
            baseline = await run_baseline(
                broker, fleet.devices, [(v, plan["durations"][v.name]) for v in variants],
                workdir, tag=f"n{n}", think=THINK, broker_pid=broker.process.pid,
                period={v.name: wires[v.name]["floor_ms"] / 1000 for v in variants},
                durable=durable)
            baseline_lag = await lag.stop()
    finally:
        await fleet.close()
    out: dict[str, Any] = {"diagnostics": baseline.get("diagnostics", [])}
    for variant in variants:
        data = baseline[variant.name]
        failures = dict(data["failures"])
        if data["missing"]:
            failures["published but not received"] = data["missing"]
        out[variant.name] = {**e2e_summary(data["latencies"], wires[variant.name]),
                             "failures": failures, "process": data["cpu"],
                             "bench_loop_lag": baseline_lag,
                             "observed_response_frame_bytes": data["response_frame_bytes"]}
    if durable:
        journaled, answered = baseline["journal_rows"]
        sent = sum(out[v.name]["n"] for v in variants)
        if answered < sent:  # a result published that its journal does not hold: not durable
            raise RuntimeError(f"the durable baseline journaled {answered} answers for {sent} "
                               "results received")
        out["journal_rows"] = {"payments": journaled, "answered": answered}
    return out


async def _fleet_run(broker: Any, workroot: Path, name: str, n: int, delay: float, baud: int,
                     duration: float, *, period: float,
                     think: tuple[float, float] | None) -> tuple[Any, int | None]:
    """N simulated terminals, a daemon and the registers: a closed loop of small payments."""
    from bench.e2e import SMALL, DaemonProcess, Fleet, Registers, closed_loop, write_config

    workdir = workroot / f"{name}-{n}"
    workdir.mkdir()
    fleet = await Fleet(n, delay, baud).start()
    base = f"bench/{name}{n}"
    daemon = DaemonProcess(write_config(workdir, broker, base, fleet.devices),
                           workdir / "daemon.log")
    ids = [ServiceIds(name[0]) for _ in range(n)]
    try:
        async with Registers(broker, base) as registers:
            daemon.start()
            await registers.wait_ready(n)
            result = await closed_loop(
                registers, n, SMALL.amount, duration, ids, daemon_pid=daemon.pid,
                broker_pid=broker.process.pid, period=period, think=think)
            if not daemon.alive():
                raise RuntimeError("the daemon died:\n" + daemon.log_tail())
            return result, daemon.peak_rss_kb()
    finally:
        daemon.terminate()
        await fleet.close()


async def section_store(broker: Any, workroot: Path, plan: dict[str, Any],
                        log: Any) -> dict[str, Any]:
    """64 terminals at a store's pace (a still-heavy one): the daemon's share of a core and
    the latency it adds when it is not saturated."""
    from bench.e2e import SMALL, e2e_summary, wire_model

    n, duration = plan["store_n"], plan["store_s"]
    wire = wire_model(SMALL, STORE_PROCESSING)
    log(f"  store pace: {n} terminals, {STORE_PROCESSING:g} s processing, register pause "
        f"{STORE_THINK[0]:g}-{STORE_THINK[1]:g} s, {duration:g} s")
    result, rss = await _fleet_run(broker, workroot, "store", n, STORE_PROCESSING, BAUD,
                                   duration, period=wire["floor_ms"] / 1000, think=STORE_THINK)
    return {
        "terminals": n, "processing_s": STORE_PROCESSING, "think_s": STORE_THINK,
        "wire": wire, "window_s": round(result.wall, 2),
        "payments_per_s": round(len(result.latencies) / result.wall, 2) if result.wall else None,
        "bridge": e2e_summary(result.latencies, wire), "failures": result.failures,
        "daemon": {**result.daemon_cpu, "peak_rss_kb": rss},
        "mosquitto": result.broker_cpu, "bench_process": result.bench_cpu,
        "bench_loop_lag": result.loop_lag,
    }


async def section_throughput(broker: Any, workroot: Path, plan: dict[str, Any],
                             log: Any) -> dict[str, Any]:
    n, duration = plan["throughput_n"], plan["throughput_s"]
    log(f"  throughput: {n} terminals, no pacing, no processing time, {duration:g} s")
    result, rss = await _fleet_run(broker, workroot, "throughput", n, 0.0, 0, duration,
                                   period=0.0, think=None)
    done = len(result.latencies)
    return {
        "terminals": n, "window_s": round(result.wall, 2), "payments": done,
        "payments_per_s": round(done / result.wall, 1) if result.wall else None,
        "e2e": summary_ms(result.latencies), "failures": result.failures,
        "daemon": {**result.daemon_cpu, "peak_rss_kb": rss},
        "mosquitto": result.broker_cpu, "bench_process": result.bench_cpu,
        "bench_loop_lag": result.loop_lag,
    }


async def section_recovery(broker: Any, workroot: Path, plan: dict[str, Any],
                           log: Any) -> list[dict[str, Any]]:
    from bench.e2e import SMALL, DaemonProcess, Fleet, Registers, write_config

    rows = []
    for n in plan["recovery_ns"]:
        workdir = workroot / f"recovery-{n}"
        workdir.mkdir()
        log(f"  recovery: {n} payment(s) in flight, SIGKILL, restart")
        fleet = await Fleet(n, DELAY, BAUD, never_answer=True).start()
        base = f"bench/recovery{n}"
        config = write_config(workdir, broker, base, fleet.devices, payment_timeout=30.0,
                              status_timeout=3.0)
        first = DaemonProcess(config, workdir / "daemon-1.log")
        second = DaemonProcess(config, workdir / "daemon-2.log")
        ids = [ServiceIds("r") for _ in range(n)]
        try:
            async with Registers(broker, base) as registers:
                first.start()
                await registers.wait_ready(n)
                keys, futures = [], []
                for i in range(n):
                    sid = ids[i].next()
                    keys.append((common.sale_id(i), sid))
                    futures.append(await registers.publish_only(i, sid, SMALL.amount))

                async def in_flight(fleet: Any = fleet, keys: list[Any] = keys) -> None:
                    # every terminal has its request and has "decided" (the shopper paid), and
                    # will never send the answer: only a status poll can tell
                    while True:
                        entries = [s.terminal.ledger.get(k) for s, k in zip(fleet.servers, keys)]
                        if all(e is not None and e.completes_at <= time.time() for e in entries):
                            return
                        await asyncio.sleep(0.01)
                await asyncio.wait_for(in_flight(), 30)
                await asyncio.sleep(0.2)  # the terminals' ACKs are back; nothing else moves
                answered_before = sum(f.done() for f in futures)
                first.kill()
                restart = time.monotonic()
                second.start()
                await asyncio.wait(futures, timeout=60)
                arrivals = [f.result() for f in futures if f.done()]
                cpu = proc_cpu_seconds(second.pid) if second.pid else None
                online = next((at for at, state in registers.bridge_states
                               if at >= restart and state == "online"), None)
        finally:
            first.kill()
            second.terminate()
            await fleet.close()
        times = [a.at - restart for a in arrivals]
        sources: dict[str, int] = {}
        for a in arrivals:
            key = f"{a.outcome}/{a.source}"
            sources[key] = sources.get(key, 0) + 1
        rows.append({
            "terminals": n, "recovered": len(arrivals), "answered_before_kill": answered_before,
            "outcomes": sources,
            "restart_to_online_s": round(online - restart, 3) if online else None,
            "restart_to_first_result_s": round(min(times), 3) if times else None,
            "restart_to_last_result_s": round(max(times), 3) if len(times) == n else None,
            "daemon_cpu_s_until_done": round(cpu, 2) if cpu is not None else None,
        })
    return rows


# --- targets --------------------------------------------------------------------------------

def _diff(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _target(name: str, value: float | None, limit: float, unit: str,
            note: str = "", lost: str = "") -> dict[str, Any]:
    """`lost` says which payments of the run failed or timed out: any at all is a FAIL,
    whatever was measured (a latency measured only over the payments that were answered says
    nothing of the ones that were not)."""
    verdict = ("FAIL" if lost else "not measured" if value is None
               else "PASS" if value < limit else "FAIL")
    return {"target": name, "measured": value, "limit": limit, "unit": unit,
            "verdict": verdict, "note": "; ".join(x for x in (lost, note) if x),
            "lost": lost}


def _lost(**runs: dict[str, int] | None) -> str:
    """Why a target fails for its failed payments, e.g. "bridge lost 900 payments (no answer
    within 15 s: 900)"; "" if none failed. Each keyword names a run and gives its failures."""
    return "; ".join(f"{who} lost {_payments(failures)}" for who, failures in runs.items()
                     if failures)


def _payments(failures: dict[str, int]) -> str:
    """ "900 payments (no answer within 15 s: 900)" """
    total = sum(failures.values())
    why = ", ".join(f"{k}: {v}" for k, v in sorted(failures.items()))
    return f"{total} payment{'s' if total != 1 else ''} ({why})"


def _row_lost(row: dict[str, Any] | None, baseline: bool = False) -> str:
    """The failed payments of a section-1 row: the bridge's, and with `baseline` (for the
    targets that compare the two) the baseline's."""
    if not row:
        return ""
    runs = {"bridge": row["bridge"].get("failures")}
    if baseline:
        runs["baseline"] = (row.get("baseline") or {}).get("failures")
    return _lost(**runs)


def offered_rate(row: dict[str, Any]) -> float:
    """Payments per second section 1 offers at N terminals if the bridge added nothing: one
    payment per terminal every floor + mean pause."""
    return row["terminals"] / (row["wire"]["floor_ms"] / 1000 + sum(THINK) / 2)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    latency = results.get("latency") or []
    by = {(r["terminals"], r["response"]): r for r in latency}
    for response in ("small", "fixture"):
        row = by.get((32, response))
        note = ""
        if row and row.get("baseline"):
            note = (f"baseline's own added p99 {_f(row['baseline']['added_p99_ms'], 2)} ms; "
                    f"bridge - baseline p99 {_f(row.get('bridge_minus_baseline_p99_ms'), 1)} ms")
            if row.get("durable_baseline"):
                note += (f"; the durable baseline's (1d) added p99 "
                         f"{_f(row['durable_baseline']['added_p99_ms'], 2)} ms")
        out.append(_target(f"bridge-added p99 at 32 terminals ({response} response)",
                           row["bridge"]["added_p99_ms"] if row else None, 5.0, "ms", note,
                           _row_lost(row)))
    for r in latency:
        if r["response"] == "fixture":
            out.append(_target(f"bridge-added p99 vs wire time, fixture, {r['terminals']} terminal(s)",
                               r["bridge"]["added_p99_pct_of_wire"], 2.0, "% of wire",
                               f"wire {_f(r['wire']['wire_ms'])} ms", _row_lost(r)))
    for r in latency:
        for q in ("p50", "p99"):
            out.append(_target(f"end-to-end {q} bridge/baseline, {r['response']}, "
                               f"{r['terminals']} terminal(s)", r[f"ratio_{q}"], 1.5, "x",
                               lost=_row_lost(r, baseline=True)))
    for response in ("small", "fixture"):
        row = by.get((64, response))
        note = ""
        if row and row["bridge"]["daemon"]["cpu_ms_per_payment"]:
            rate = offered_rate(row)
            need = row["bridge"]["daemon"]["cpu_ms_per_payment"] * rate / 10
            note = (f"at {row['bridge']['payments_per_s']:g} payments/s achieved; the paced load "
                    f"offers {rate:.0f}/s, which at {row['bridge']['daemon']['cpu_ms_per_payment']:g} "
                    f"ms CPU each needs {need:.0f}% of a core")
            floor = (row.get("baseline") or {}).get("process", {}).get("cpu_ms_per_payment")
            if floor:
                note += (f"; the least-work baseline's {floor:g} ms each would need "
                         f"{floor * rate / 10:.0f}%")
        out.append(_target(f"daemon CPU, 64 terminals paced ({response} response)",
                           row["bridge"]["daemon"]["cpu_pct_core"] if row else None, 50.0,
                           "% of one core", note, _row_lost(row)))
    st = results.get("store")
    if st:
        lost = _lost(bridge=st.get("failures"))
        out.append(_target(f"daemon CPU, {st['terminals']} terminals at a store's pace",
                           st["daemon"]["cpu_pct_core"], 50.0, "% of one core",
                           f"{st['payments_per_s']:g} payments/s", lost))
        out.append(_target(f"bridge-added p99, {st['terminals']} terminals at a store's pace",
                           st["bridge"]["added_p99_ms"], 5.0, "ms",
                           f"bench loop lag p99 {_f(st['bench_loop_lag'].get('p99_ms'))} ms",
                           lost))
    rss = [r["bridge"]["daemon"]["peak_rss_kb"] for r in latency]
    for section in ("throughput", "store"):
        if results.get(section):
            rss.append(results[section]["daemon"]["peak_rss_kb"])
    rss = [x for x in rss if x is not None]
    out.append(_target("daemon peak RSS (VmHWM), worst run", round(max(rss) / 1024, 1)
                       if rss else None, 80.0, "MB"))
    recovery = {r["terminals"]: r for r in results.get("recovery") or []}
    row = recovery.get(64)
    unrecovered = row["terminals"] - row["recovered"] if row else 0
    out.append(_target("recovery of 64 in-flight payments, restart to last result",
                       row["restart_to_last_result_s"] if row else None, 5.0, "s",
                       f"{row['recovered']}/64 recovered" if row else "",
                       _lost(bridge={"not recovered within 60 s": unrecovered})
                       if unrecovered else ""))
    return out


def targets_over_rounds(results: dict[str, Any]) -> list[dict[str, Any]]:
    """With --rounds R: each target judged in every round of section 1 (the other sections ran
    once), as the range of what was measured and how many rounds passed. One run of a noisy
    VM is one sample; a verdict that holds in every round is the one to quote."""
    rounds = results.get("latency_rounds") or []
    if len(rounds) < 2:
        return []
    judged = [targets({**results, "latency": rows}) for rows in rounds]
    if any(len(j) != len(judged[0]) for j in judged):
        raise ValueError("the rounds of section 1 judged different targets")
    merged = []
    for i, first in enumerate(judged[0]):
        row = [j[i] for j in judged]
        if any(t["target"] != first["target"] for t in row):
            raise ValueError(f"rounds judged different targets at {first['target']!r}")
        values = [t["measured"] for t in row if t["measured"] is not None]
        passed = sum(t["verdict"] == "PASS" for t in row)
        lost = [f"round {n}: {t['lost']}" for n, t in enumerate(row, 1) if t.get("lost")]
        verdict = ("not measured" if not values and not lost else "PASS" if passed == len(row)
                   else "FAIL" if passed == 0 else "MIXED")
        merged.append({"target": first["target"], "limit": first["limit"], "unit": first["unit"],
                       "min": min(values) if values else None,
                       "max": max(values) if values else None,
                       "rounds": len(row), "passed": passed, "verdict": verdict,
                       "note": "; ".join(lost)})
    return merged


def missed_targets(results: dict[str, Any]) -> list[str]:
    """The targets not passed: over the rounds when there were several, else in the one run.
    One not measured (its section did not run: `make bench-targets` runs section 1 only) is
    not counted; one whose payments failed is (its verdict is FAIL)."""
    judged = results.get("targets_over_rounds") or results.get("targets") or []
    return [f"{t['target']} ({t['verdict']})" for t in judged
            if t["verdict"] not in ("PASS", "not measured")]


# --- the table ------------------------------------------------------------------------------

def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Columns in `left` are text (left-aligned), the others numbers (right-aligned)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _failures(failures: dict[str, int]) -> str:
    return str(sum(failures.values())) if failures else "0"


def _failure_lines(runs: list[tuple[str, dict[str, int] | None]]) -> list[str]:
    """Under a table with a `fail` column: which payments failed and why, one line per run that
    lost any (they are in no latency figure, and each fails its row's targets)."""
    return [f"    FAILED PAYMENTS, {where}: {_payments(failures)}"
            for where, failures in runs if failures]


def render_durable_baseline(latency: list[dict[str, Any]]) -> list[str]:
    out = ["1d. The least a durable bridge must do: the register's request over MQTT, committed to "
           "an SQLite journal (WAL, synchronous=FULL)",
           "    before the frame goes out, the answer committed before its one QoS 1 publish; no "
           "validation, state machine, events or polls (ms)"]
    rows = []
    for r in latency:
        d, b = r["durable_baseline"], r["bridge"]
        rows.append([r["response"], str(r["terminals"]), str(d["n"]), _f(d["p50_ms"]),
                     _f(d["p99_ms"]), _f(d["added_p50_ms"], 2), _f(d["added_p99_ms"], 2),
                     _f(d["added_p99_pct_of_wire"], 2), _f(b["added_p99_ms"], 2),
                     _f(_diff(b["added_p99_ms"], d["added_p99_ms"])),
                     _f(d["process"]["cpu_ms_per_payment"], 2),
                     _f(b["daemon"]["cpu_ms_per_payment"], 2),
                     _f(d["bench_loop_lag"].get("p99_ms")), _failures(d["failures"])])
    out += ["    " + x for x in _table(
        ["response", "N", "n", "e2e p50", "e2e p99", "added p50", "added p99", "%wire",
         "bridge added p99", "bridge - it p99", "its CPU ms/pay", "bridge CPU ms/pay",
         "lag p99", "fail"], rows)]
    out.append("    its CPU = the whole process: the register's side (publishing the request, "
               "taking its own QoS 1 acknowledgements) as well as the bridge's")
    out += _failure_lines([(f"durable baseline, {r['response']}, {r['terminals']} terminal(s)",
                            r["durable_baseline"].get("failures")) for r in latency])
    return out


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        "=" * 100,
        f"poi-bridge benchmarks ({results['mode']} run)   {m['date']}   code {m.get('code')}",
        (f"machine: {m['cpu']}, {m['cores']} cores, {m['implementation']} {m['python']}, "
         f"{m['mosquitto'] or 'mosquitto: not used'}, Linux {m['kernel']}, "
         f"load average at start {m['loadavg_at_start']}"),
        (f"link: stx-etx-lrc over pseudo-terminals; the simulated terminal paces its bytes at "
         f"{BAUD} baud 8N1; processing time {DELAY * 1000:g} ms; one daemon process; registers "
         f"pause {THINK[0] * 1000:g}-{THINK[1] * 1000:g} ms between payments"),
    ]
    cal = results.get("calibration")
    if cal:
        j = cal["journal_commit"]
        out.append(f"journal: {results.get('workdir')} on {cal['journal_fs']}; SQLite WAL "
                   f"synchronous=FULL commit of 1 KB there, before the runs: p50 "
                   f"{_f(j['p50_ms'], 2)} ms, p99 {_f(j['p99_ms'], 2)} ms, max {_f(j['max_ms'], 2)} ms")
        a = cal.get("journal_commit_after")
        if a:
            out.append(f"         after the runs: p50 {_f(a['p50_ms'], 2)} ms, p99 "
                       f"{_f(a['p99_ms'], 2)} ms, max {_f(a['max_ms'], 2)} ms")
        speed = cal.get("speed")
        if speed:
            after = cal.get("speed_after")
            out.append(f"speed: json.loads of the {speed['bytes'] // 1000} KB fixture (median), "
                       f"before the runs {speed['json_loads_fixture_us']} us"
                       + (f", after {after['json_loads_fixture_us']} us" if after else "")
                       + "; compare runs by it: a VM's speed can vary from hour to hour")
    if results.get("broker"):
        broker_info = results["broker"]
        out.append(f"broker: mosquitto, set_tcp_nodelay {str(broker_info['set_tcp_nodelay']).lower()}"
                   f"{'' if broker_info['set_tcp_nodelay'] else ' (its default)'}"
                   f", persistence autosave every {broker_info.get('autosave_interval_s', 1)} s")
    out.append("=" * 100)
    latency = results.get("latency")
    if latency:
        w = {r["response"]: r["wire"] for r in latency}
        out.append("")
        out.append("1a. End to end through the bridge: register publishes -> result on "
                   "registers/{SaleID}/response (ms)")
        for name, wire in w.items():
            out.append(f"    {name}: request frame {wire['request_frame_bytes']} B, response frame "
                       f"{wire['response_frame_bytes']} B; wire = all bytes at {BAUD} baud "
                       f"{wire['wire_ms']:.1f} ms; floor = processing + paced terminal bytes "
                       f"{wire['floor_ms']:.1f} ms")
        out.append("    added = end to end - floor (the request is written to the pty unpaced, so "
                   "its line time is in 'wire' but not in the run); %wire = added p99 / wire")
        rows = []
        for r in latency:
            b = r["bridge"]
            d = b["daemon"]
            rows.append([r["response"], str(r["terminals"]), str(b["n"]), _f(b["p50_ms"]),
                         _f(b["p99_ms"]), _f(r["wire"]["wire_ms"]), _f(r["wire"]["floor_ms"]),
                         _f(b["added_p50_ms"], 2), _f(b["added_p99_ms"], 2),
                         _f(b["added_p99_pct_of_wire"], 2), _f(b["payments_per_s"]),
                         _f(d["cpu_pct_core"]), _f(d["cpu_ms_per_payment"], 2),
                         _f(d["peak_rss_kb"] / 1024 if d["peak_rss_kb"] else None),
                         _f(b["bench_loop_lag"].get("p99_ms")), _failures(b["failures"])])
        out += ["    " + x for x in _table(
            ["response", "N", "n", "e2e p50", "e2e p99", "wire", "floor", "added p50",
             "added p99", "%wire", "pay/s", "CPU %core", "CPU ms/pay", "RSS MB", "lag p99",
             "fail"], rows)]
        out.append("    CPU = the daemon process (/proc utime+stime) over the window; RSS = its "
                   "VmHWM; lag = how late the benchmark's own loop (simulators, registers) woke "
                   "up, p99 ms; fail = payments (warm-up included) not approved or not answered "
                   "in time: in no latency figure, and any at all fails the row's targets")
        out += _failure_lines([(f"bridge, {r['response']}, {r['terminals']} terminal(s)",
                                r["bridge"].get("failures")) for r in latency])
        out.append("")
        out.append("1b. Baseline (write frame to the pty, read the answer with the same framer, "
                   "publish once at QoS 1, subscriber notes arrival) and ratio bridge/baseline")
        rows = []
        for r in latency:
            z, b = r["baseline"], r["bridge"]
            rows.append([r["response"], str(r["terminals"]), str(z["n"]), _f(z["p50_ms"]),
                         _f(z["p99_ms"]), _f(z["added_p50_ms"], 2), _f(z["added_p99_ms"], 2),
                         _f(r["bridge_minus_baseline_p50_ms"]),
                         _f(r["bridge_minus_baseline_p99_ms"]),
                         _f(r["ratio_p50"], 3), _f(r["ratio_p99"], 3),
                         _f(z["process"]["cpu_ms_per_payment"], 2),
                         _f(b["daemon"]["cpu_ms_per_payment"], 2),
                         _f(z["bench_loop_lag"].get("p99_ms")), _failures(z["failures"])])
        for r in latency:
            if not r["wire"].get("model_matches_wire", True):
                out.append(f"    WARNING: the baseline saw response frames of "
                           f"{r['baseline']['observed_response_frame_bytes']} B, the wire model "
                           f"assumed {r['wire']['response_frame_bytes']} B ({r['response']}, "
                           f"{r['terminals']} terminals)")
        out += ["    " + x for x in _table(
            ["response", "N", "n", "base p50", "base p99", "base added p50", "base added p99",
             "bridge-base p50", "bridge-base p99", "ratio p50", "ratio p99",
             "base CPU ms/pay", "bridge CPU ms/pay", "lag p99", "fail"], rows)]
        out += _failure_lines([(f"baseline, {r['response']}, {r['terminals']} terminal(s)",
                                r["baseline"].get("failures")) for r in latency])
        if all(r.get("durable_baseline") for r in latency):
            out.append("")
            out += render_durable_baseline(latency)
    st = results.get("store")
    if st:
        out.append("")
        out.append(f"1c. A store's pace: {st['terminals']} terminals, processing "
                   f"{st['processing_s']:g} s, registers pause {st['think_s'][0]:g}-"
                   f"{st['think_s'][1]:g} s between payments (small response; floor "
                   f"{st['wire']['floor_ms']:.1f} ms)")
        b, d = st["bridge"], st["daemon"]
        out += ["    " + x for x in _table(
            ["N", "n", "pay/s", "e2e p50", "e2e p99", "added p50", "added p99",
             "daemon CPU %core", "CPU ms/pay", "RSS MB", "lag p99", "fail"],
            [[str(st["terminals"]), str(b["n"]), _f(st["payments_per_s"]), _f(b["p50_ms"]),
              _f(b["p99_ms"]), _f(b["added_p50_ms"], 2), _f(b["added_p99_ms"], 2),
              _f(d["cpu_pct_core"]), _f(d["cpu_ms_per_payment"], 2),
              _f(d["peak_rss_kb"] / 1024 if d["peak_rss_kb"] else None),
              _f(st["bench_loop_lag"].get("p99_ms")), _failures(st["failures"])]])]
        out += _failure_lines([("bridge, store pace", st["failures"])])
    t = results.get("throughput")
    if t:
        out.append("")
        out.append(f"2. Throughput and footprint: {t['terminals']} terminals, no pacing, no "
                   "processing time, payments back to back")
        d = t["daemon"]
        out += ["    " + x for x in _table(
            ["window s", "payments", "pay/s", "e2e p50 ms", "e2e p99 ms", "daemon CPU %core",
             "daemon CPU ms/pay", "peak RSS MB", "mosquitto %core", "bench proc %core", "fail"],
            [[_f(t["window_s"]), str(t["payments"]), _f(t["payments_per_s"]),
              _f(t["e2e"]["p50_ms"]), _f(t["e2e"]["p99_ms"]), _f(d["cpu_pct_core"]),
              _f(d["cpu_ms_per_payment"], 2),
              _f(d["peak_rss_kb"] / 1024 if d["peak_rss_kb"] else None),
              _f(t["mosquitto"]["cpu_pct_core"]), _f(t["bench_process"]["cpu_pct_core"]),
              _failures(t["failures"])]])]
        out += _failure_lines([("bridge, throughput", t["failures"])])
    rec = results.get("recovery")
    if rec:
        out.append("")
        out.append("3. Recovery: N payments in flight (terminal never sends the response), "
                   "SIGKILL the daemon, start it again (payment_timeout 30 s)")
        rows = [[str(r["terminals"]), str(r["recovered"]),
                 ", ".join(f"{k} {v}" for k, v in r["outcomes"].items()) or "-",
                 _f(r["restart_to_online_s"], 2), _f(r["restart_to_first_result_s"], 2),
                 _f(r["restart_to_last_result_s"], 2), _f(r["daemon_cpu_s_until_done"], 2)]
                for r in rec]
        out += ["    " + x for x in _table(
            ["N", "recovered", "outcome/source", "restart->online s", "restart->first s",
             "restart->last s", "daemon CPU s"], rows, left=(2,))]
    core = results.get("core")
    if core:
        out.append("")
        out.append("4a. Framers in-process (frames/s; 'chunks' = the frame fed in 115-byte reads, "
                   "the pieces the simulator delivers at 115200 baud, one per 10 ms)")
        rows = [[r["framer"], r["payload"], str(r["payload_bytes"]), str(r["encode_per_s"]),
                 str(r["decode_per_s"]), str(r["decode_115B_chunks_per_s"]),
                 _f(r["encode_MB_s"]), _f(r["decode_MB_s"])] for r in core["framers"]]
        out += ["    " + x for x in _table(
            ["framer", "payload", "bytes", "encode/s", "decode/s", "decode chunks/s",
             "enc MB/s", "dec MB/s"], rows, left=(0, 1))]
        out.append("")
        out.append("4b. SaleToPOI messages: parse_message (load_json + validate) + to_bytes, "
                   "beside json.loads + json.dumps of the same bytes (per second)")
        rows = [[r["message"], str(r["bytes"]), str(r["parse_to_bytes_per_s"]),
                 str(r["json_loads_dumps_per_s"]), _f(r["slowdown_vs_json"]),
                 str(r["parse_message_per_s"]), str(r["validate_dict_per_s"]),
                 str(r["to_bytes_per_s"]), _f(r["us_load_json"]), _f(r["us_json_loads"])]
                for r in core["messages"]]
        out += ["    " + x for x in _table(
            ["message", "bytes", "parse+to_bytes/s", "json loads+dumps/s", "slower x",
             "parse_message/s", "validate dict/s", "to_bytes/s", "load_json us",
             "json.loads us"], rows)]
    io = (core or {}).get("io")
    if io:
        out.append("")
        out.append(f"4c. One I/O event's CPU (us): a serial read of {io['chunk_bytes']} bytes "
                   f"(a child process writes one into a pty every {io['chunk_interval_ms']:g} "
                   "ms), and a PUBACK")
        rows = [[r["what"], str(r["events"]), _f(r["us_user"]), _f(r["us_system"]),
                 _f(r["us_total"])] for r in io["reads"]]
        rows += [[r["what"], "-", "-", "-", _f(r["us_total"], 2)] for r in io["pubacks"]]
        out += ["    " + x for x in _table(
            ["event", "reads", "user us", "system us", "total us"], rows, left=(0,))]
    if results.get("targets"):
        out.append("")
        out.append("Targets")
        rows = [[t["verdict"], t["target"], _f(t["measured"], 3), f"< {t['limit']:g} {t['unit']}",
                 t.get("note", "")] for t in results["targets"]]
        out += ["    " + x for x in _table(
            ["verdict", "target", "measured", "limit", "note"], rows, left=(0, 1, 3, 4))]
    over = results.get("targets_over_rounds")
    if over:
        out.append("")
        out.append(f"Targets over {over[0]['rounds']} rounds of section 1 (1a/1b above: round 1; "
                   "every round's rows in the JSON, latency_rounds)")
        rows = [[t["verdict"], f"{t['passed']}/{t['rounds']}", t["target"],
                 f"{_f(t['min'], 3)} - {_f(t['max'], 3)}", f"< {t['limit']:g} {t['unit']}",
                 t.get("note", "")] for t in over]
        out += ["    " + x for x in _table(
            ["verdict", "passed", "target", "measured, min - max", "limit", "note"], rows,
            left=(0, 2, 4, 5))]
    return "\n".join(out)


async def io_costs(seconds: float) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.io_costs", str(seconds), cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"bench.io_costs failed (exit {process.returncode})")
    return json.loads(out)


# --- main -----------------------------------------------------------------------------------

def filesystem(path: Path) -> str:
    """The mount (device, type) holding `path`, from /proc/mounts."""
    best = ("?", "?", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            if str(path).startswith(mount) and len(mount) >= len(best[2]):
                best = (device, kind, mount)
    except OSError:
        pass
    return f"{best[0]} ({best[1]}) on {best[2]}"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.broker import Mosquitto, find_mosquitto

    plan = dict(QUICK if args.quick else FULL)
    if args.terminals:
        plan["latency_ns"] = [int(x) for x in args.terminals.split(",")]
    if args.what_if:
        from bench import e2e, whatif
        names = [x.strip() for x in args.what_if.split(",") if x.strip()]
        for name in names:
            if name not in whatif.PATCHES:
                raise SystemExit(f"bench: unknown --what-if {name!r}; known: {', '.join(whatif.PATCHES)}")
        e2e.WHATIF[:] = names
    wanted = [s.strip() for s in args.sections.split(",")] if args.sections else list(SECTIONS)
    for s in wanted:
        if s not in SECTIONS:
            raise SystemExit(f"bench: unknown section {s!r}; known: {', '.join(SECTIONS)}")
    binary = find_mosquitto()
    needs_broker = any(s != "core" for s in wanted) or args.profile
    if needs_broker and binary is None:
        raise SystemExit("bench: mosquitto is not installed. The latency, throughput and recovery "
                         "sections need a real broker: apt-get install mosquitto (or run "
                         "--sections core).")
    if not FIXTURE.exists():
        raise SystemExit(f"bench: the vendor fixture is missing: {FIXTURE}")
    results: dict[str, Any] = {"mode": ("quick" if args.quick else "full")
                               + (f", PATCHED DAEMON what-if {args.what_if}" if args.what_if else ""),
                               "what_if": args.what_if or None,
                               "machine": common.machine(binary if needs_broker else None),
                               "plan": plan, "processing_s": DELAY, "think_s": THINK,
                               "baud": BAUD, "framer": common.FRAMER}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    started = time.monotonic()
    workroot = Path(tempfile.mkdtemp(prefix="poi-bench-"))
    results["workdir"] = str(workroot)
    broker = None
    try:
        results["calibration"] = {
            "journal_fs": filesystem(workroot),
            "journal_commit": common.journal_commit_floor(workroot),
            "speed": common.machine_speed(),
        }
        if needs_broker:
            extra = "set_tcp_nodelay true\n" if args.broker_nodelay else ""
            # The test suite's broker writes its persistence file every second (crash tests
            # need that); with the thousands of retained transactions a benchmark leaves,
            # each save stalled the broker for tens of ms, in every section after the first.
            # A store's broker saves at mosquitto's default interval, as in
            # examples/mosquitto/mosquitto.conf.
            extra += f"autosave_interval {BROKER_AUTOSAVE_S}\n"
            broker = Mosquitto(workroot / "mosquitto", extra_config=extra).start()
            results["broker"] = {"set_tcp_nodelay": bool(args.broker_nodelay),
                                 "autosave_interval_s": BROKER_AUTOSAVE_S}
        if args.profile:
            RESULTS.mkdir(parents=True, exist_ok=True)
            results["profile"] = await profile(broker, workroot, profile_loads(args.profile_loads),
                                               log)
            return results
        if "core" in wanted:
            from bench import core
            log("core: framers and messages in-process")
            results["core"] = core.run(plan["core_s"])
            log("core: I/O event costs (serial reads, PUBACKs), in a process of its own")
            results["core"]["io"] = await io_costs(plan["io_s"])
        if "latency" in wanted:
            rounds = []
            for r in range(args.rounds):
                if args.rounds > 1:
                    log(f"latency: round {r + 1} of {args.rounds}")
                where = workroot / f"round-{r + 1}" if args.rounds > 1 else workroot
                rounds.append(await section_latency(broker, where, plan, log))
            results["latency"] = rounds[0]
            if len(rounds) > 1:
                results["latency_rounds"] = rounds
        if "store" in wanted:
            results["store"] = await section_store(broker, workroot, plan, log)
        if "throughput" in wanted:
            results["throughput"] = await section_throughput(broker, workroot, plan, log)
        if "recovery" in wanted:
            results["recovery"] = await section_recovery(broker, workroot, plan, log)
        if needs_broker:
            # the disk may have been busier while everything ran: measure again
            results["calibration"]["journal_commit_after"] = common.journal_commit_floor(workroot)
        results["calibration"]["speed_after"] = common.machine_speed()
    finally:
        if broker is not None:
            broker.kill()
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["targets"] = targets(results)
    results["targets_over_rounds"] = targets_over_rounds(results)
    return results


async def spy_pair(pid: int, name: str, seconds: float) -> dict[str, Any]:
    """Two py-spy recordings in a row: the loop's busy time (CPU and blocking system calls
    such as fsync), then CPU only (--gil)."""
    from bench import profiling

    out = {}
    for kind, gil in (("busy", False), ("cpu", True)):
        raw = RESULTS / f"profile-{name}-{kind}.txt"
        spy = profiling.start(pid, seconds, raw, gil=gil)
        await asyncio.to_thread(spy.wait)
        out[kind] = {"raw": str(raw), **profiling.summarise(
            raw, seconds=seconds if not gil else None, rate=profiling.RATE)}
    return out


PROFILE_LOADS = "paced-64-fixture,unpaced-64-small"


def profile_loads(spec: str) -> list[tuple[str, bool, int, str]]:
    """--profile-loads: comma-separated `paced|unpaced`-N-`small|fixture`."""
    loads = []
    for name in (s.strip() for s in spec.split(",")):
        match = re.fullmatch(r"(paced|unpaced)-([0-9]+)-(small|fixture)", name)
        if match is None or int(match[2]) < 1:
            raise SystemExit(f"bench: --profile-loads: {name!r} is not paced|unpaced-N-small|fixture")
        loads.append((name, match[1] == "paced", int(match[2]), match[3]))
    return loads


async def profile(broker: Any, workroot: Path, loads: list[tuple[str, bool, int, str]],
                  log: Any) -> dict[str, Any]:
    """py-spy on the daemon under each load (default: 64 terminals paced with the vendor
    fixture, then 64 unpaced with the small response)."""
    from bench import profiling
    from bench.e2e import (
        LARGE,
        SMALL,
        DaemonProcess,
        Fleet,
        Registers,
        closed_loop,
        wire_model,
        write_config,
    )

    out: dict[str, Any] = {}
    each = 9.0
    for name, paced, n, response in loads:
        workdir = workroot / f"profile-{name}"
        workdir.mkdir()
        fleet = await Fleet(n, DELAY if paced else 0.0, BAUD if paced else 0).start()
        base = f"bench/profile-{name}"
        daemon = DaemonProcess(write_config(workdir, broker, base, fleet.devices),
                               workdir / "daemon.log")
        ids = [ServiceIds("p") for _ in range(n)]
        variant = LARGE if response == "fixture" else SMALL
        try:
            async with Registers(broker, base) as registers:
                daemon.start()
                await registers.wait_ready(n)
                log(f"profile: {name}: {n} terminals, {variant.name} response, py-spy "
                    f"{each:g} s busy + {each:g} s CPU")
                task = asyncio.create_task(closed_loop(
                    registers, n, variant.amount, 2 * each + 3.0, ids, daemon_pid=daemon.pid,
                    broker_pid=broker.process.pid,
                    period=wire_model(variant, DELAY)["floor_ms"] / 1000 if paced else 0.0,
                    think=THINK if paced else None))
                await asyncio.sleep(2.0)  # past the warm-up
                spies = await spy_pair(daemon.pid, name, each)
                result = await task
        finally:
            daemon.terminate()
            await fleet.close()
        done = len(result.latencies)
        out[name] = {**spies, "payments": done, "payments_per_s": round(done / result.wall, 1),
                     "e2e_under_py_spy": summary_ms(result.latencies),
                     "daemon_cpu": result.daemon_cpu}
        for kind in ("busy", "cpu"):
            print(profiling.render(f"{name}, {kind} ({spies[kind]['raw']})", spies[kind]))
        print(f"    ({done} payments, {out[name]['payments_per_s']}/s, daemon "
              f"{result.daemon_cpu['cpu_ms_per_payment']} ms CPU per payment, under py-spy)")
    return out


def main() -> int:
    import aiomqtt  # noqa: F401 - it sets its logger's level on import; quieten it after

    logging.getLogger("mqtt").setLevel(logging.ERROR)  # "There are N pending publish calls"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer, shorter runs")
    parser.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy on the daemon under 64 terminals (needs py-spy)")
    parser.add_argument("--profile-loads", default=PROFILE_LOADS,
                        help="with --profile: the loads, comma-separated paced|unpaced-N-"
                             f"small|fixture (default {PROFILE_LOADS})")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--what-if", default="",
                        help="run a patched daemon (comma-separated patch names, listed in bench/whatif.py); "
                             "results are labelled, not the bridge's")
    parser.add_argument("--broker-nodelay", action="store_true",
                        help="run mosquitto with set_tcp_nodelay true (default: its default, off)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run section 1 (latency and baseline) this many times and judge "
                             "each target in every round (default 1)")
    parser.add_argument("--terminals", help="section 1 terminal counts, e.g. 1,32 (default: "
                                            "1,8,32,64; --quick: 32,64)")
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/latest.json; "
                                                    "whatif-latest.json with --what-if)")
    parser.add_argument("--fail-on-miss", action="store_true",
                        help="exit 3 unless every target judged passed (in every round)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    results = common.run_precise(run(args))
    if args.profile:
        path = RESULTS / "profile.json"
        path.write_text(json.dumps(results, indent=1))
        print(f"profile summary written to {path}")
        return 0
    print(render(results))
    if args.output is None:
        args.output = RESULTS / ("whatif-latest.json" if args.what_if else "latest.json")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults written to {args.output}  (elapsed {results['elapsed_s']} s)")
    missed = missed_targets(results)
    if args.fail_on_miss and missed:
        print(f"\n{len(missed)} target(s) not met in every round: " + "; ".join(missed))
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end pieces: simulated terminals, the daemon as a process, registers, the baseline.

The simulators (SimulatorServer on real pseudo-terminals) and the registers (one MQTT client
standing for all the tills, each with its own SaleID) run in the benchmark's process; the
bridge runs as `python -m bridge run --config ...` so /proc shows its own CPU and memory; the
baseline runs as `python -m bench.baseline`, also a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from bench.common import (
    BAUD,
    FIXTURE,
    FRAMER,
    LARGE_AMOUNT,
    PACING_CHUNK,
    ROOT,
    SERVICE_ID_WIDTH,
    SMALL_AMOUNT,
    CpuWindow,
    ServiceIds,
    collector_paused,
    compact,
    nodelay,
    payment_request,
    poi_id,
    proc_status_kb,
    sale_id,
    summary_ms,
)
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- the wire model -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    amount: float
    label: str


SMALL = Variant("small", SMALL_AMOUNT, "simulator's PaymentResponse")
LARGE = Variant("fixture", LARGE_AMOUNT, "vendor fixture dotnet-pospayment-success.json")


def response_payload(variant: Variant, request: dict[str, Any]) -> bytes:
    """The bytes the simulator sends for `request` (server.py: json.dumps compact)."""
    if variant is LARGE:
        document = responses.rewrite_ids(json.loads(FIXTURE.read_text()), request)
    else:
        document = responses.payment_response(request, "approve", time.time())
    return json.dumps(document, separators=(",", ":")).encode()


def wire_model(variant: Variant, delay: float, baud: int = BAUD) -> dict[str, Any]:
    """What the line itself costs for one payment.

    wire_ms: the physical time at `baud` 8N1 of every byte of the exchange (request frame,
    the two ACKs, response frame), 10 bit times a byte.
    floor_ms: what the simulated terminal actually imposes: its configured processing time,
    its ACK and its paced response frame. The bridge's request goes into the pseudo-terminal
    unpaced (a pty has no line speed), so it is in wire_ms but not in the floor: an end-to-end
    time minus the floor is what the bridge, MQTT and the register add; it can be compared
    with wire_ms directly. The simulator writes `baud // 1000` bytes (10 ms of line) at a time
    on an absolute schedule, so the last piece lands floor((L-1)/chunk)*chunk byte times after
    the first. (It then holds its write lock to the end of that piece's slot: registers pause
    at least 10 ms between payments so that tail never delays the next request's ACK.)
    """
    request = payment_request(sale_id(0), "b" * SERVICE_ID_WIDTH, poi_id(0), variant.amount)
    request_frame = len(compact(request)) + 3
    response_frame = len(response_payload(variant, request)) + 3
    wire = (request_frame + response_frame + 2) * 10 / baud
    paced_response = math.floor((response_frame - 1) / PACING_CHUNK) * PACING_CHUNK * 10 / baud
    floor = delay + 10 / baud + paced_response
    return {
        "request_frame_bytes": request_frame,
        "response_frame_bytes": response_frame,
        "wire_ms": round(wire * 1000, 3),
        "floor_ms": round(floor * 1000, 3),
        "processing_ms": round(delay * 1000, 3),
    }


# --- simulated terminals ------------------------------------------------------------------------

def paced_scenario(index: int, delay: float, baud: int, *, never_answer: bool = False) -> Scenario:
    """Default: the simulator's own PaymentResponse. Amount LARGE_AMOUNT: the vendor fixture."""
    return Scenario(
        poi_id=poi_id(index),
        default=Behaviour(delay=delay, never_answer=never_answer),
        transactions=[Behaviour(amount=LARGE_AMOUNT, delay=delay, never_answer=never_answer,
                                response_file=FIXTURE)],
        link=LinkBehaviour(baud=baud, seed=index),
    )


class Fleet:
    """N simulated terminals, each on its own pseudo-terminal, in this process."""

    def __init__(self, n: int, delay: float, baud: int, *, never_answer: bool = False) -> None:
        self.servers = [SimulatorServer(paced_scenario(i, delay, baud, never_answer=never_answer),
                                        FRAMER) for i in range(n)]
        self.devices: list[str] = []

    async def start(self) -> Fleet:
        self.devices = [await s.start_pty() for s in self.servers]
        return self

    async def close(self) -> None:
        # SimulatorServer.close() cancels _serve_pty but not the pty read loop it started
        # (asyncio.wait does not cancel its tasks when cancelled), nor that loop's retransmit
        # timer. The read loop stays pending on a future no one resolves; when the garbage
        # collector later finalises it, its `finally: remove_reader(fd)` runs on an fd number a
        # newer pseudo-terminal may have reused by then, and that terminal stops reading for
        # good (no ACKs, retransmissions, timeouts). So cancel those loops here, while their fd
        # is still theirs, before closing.
        ours = {id(server) for server in self.servers}
        leaked = []
        for task in asyncio.all_tasks():
            coro = task.get_coro()
            frame = getattr(coro, "cr_frame", None)
            if (getattr(coro, "__qualname__", "") == "SimulatorServer._read_loop" and frame
                    is not None and id(frame.f_locals.get("self")) in ours):
                task.cancel()
                leaked.append(task)
        for task in leaked:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.close()
        gc.collect()


# --- the daemon -------------------------------------------------------------------------------

def write_config(workdir: Path, broker: Any, base: str, devices: list[str], *,
                 payment_timeout: float = 30.0, status_timeout: float = 3.0) -> Path:
    lines = [
        f'journal = "{workdir / "journal.sqlite3"}"',
        'log_level = "info"',
        "[mqtt]",
        f'host = "{broker.host}"',
        f"port = {broker.port}",
        f'base_topic = "{base}"',
        f'client_id = "poi-bridge-{base.replace("/", "-")}"',
    ]
    for i, device in enumerate(devices):
        lines += [
            "[[terminals]]",
            f'poi_id = "{poi_id(i)}"',
            f"payment_timeout = {payment_timeout}",
            f"status_timeout = {status_timeout}",
            "[terminals.link]",
            'kind = "serial"',
            f'device = "{device}"',
            f"baudrate = {BAUD}",
            "[terminals.framer]",
            f'name = "{FRAMER}"',
        ]
    path = workdir / "poi-bridge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


WHATIF: list[str] = []  # bench/whatif.py patches for every daemon started (--what-if)


class DaemonProcess:
    """`python -m bridge run --config FILE`, its CPU and memory read from /proc. With
    --what-if, `python -m bench.whatif run --config FILE` (the same, patched at start-up)."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the daemon keeps writing to it
        env = python_env()
        module = "bridge"
        if WHATIF:
            module = "bench.whatif"
            env["POI_BENCH_WHATIF"] = ",".join(WHATIF)
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "run", "--config", str(self.config)],
            stdout=log, stderr=log, env=env, cwd=ROOT)
        log.close()
        return self

    def peak_rss_kb(self) -> int | None:
        return proc_status_kb(self.pid, "VmHWM") if self.pid else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def kill(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# --- registers ----------------------------------------------------------------------------------

@dataclass
class Arrival:
    at: float
    outcome: str | None
    source: str | None


class Registers:
    """The tills: one MQTT client publishing for every SaleID and subscribed to every
    register's response topic (an MQTT client per till would only add sockets here)."""

    def __init__(self, broker: Any, base: str, *, events: bool = False) -> None:
        self.broker = broker
        self.base = base
        self.events = events
        self.client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiting: dict[tuple[str, str], asyncio.Future[Arrival]] = {}  # (SaleID, ServiceID)
        self.terminal_states: dict[str, str] = {}
        self.bridge_states: list[tuple[float, str]] = []
        self.arrivals: list[tuple[tuple[str, str], Arrival]] = []
        self.event_log: list[tuple[float, dict[str, Any]]] = []
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Registers:
        self.client = aiomqtt.Client(self.broker.host, self.broker.port,
                                     identifier=f"bench-registers-{self.base.replace('/', '-')}",
                                     clean_session=True, max_inflight_messages=0,
                                     socket_options=nodelay())
        await self.client.__aenter__()
        topics = [f"{self.base}/registers/+/response", f"{self.base}/terminals/+/state",
                  f"{self.base}/bridge/state"]
        if self.events:
            topics.append(f"{self.base}/registers/+/event")
        for topic in topics:
            await self.client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        if self.client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        assert self.client is not None
        async for message in self.client.messages:
            at = time.monotonic()
            topic = message.topic.value
            try:
                payload = json.loads(message.payload) if message.payload else None
            except (TypeError, ValueError):
                continue
            if topic.endswith("/response"):
                info = (payload or {}).get("bridge") or {}
                ids = info.get("transaction") or {}
                key = (ids.get("sale_id", ""), ids.get("service_id", ""))
                arrival = Arrival(at, info.get("outcome"), info.get("source"))
                self.arrivals.append((key, arrival))
                future = self._waiting.get(key)
                if future is not None and not future.done() and arrival.outcome != "unresolved":
                    future.set_result(arrival)
            elif topic.endswith("/event"):
                self.event_log.append((at, payload))
            elif "/terminals/" in topic and isinstance(payload, dict):
                self.terminal_states[topic.split("/")[-2]] = payload.get("state", "?")
            elif topic.endswith("/bridge/state") and isinstance(payload, dict):
                self.bridge_states.append((at, payload.get("state", "?")))
            self._changed.set()

    async def wait_ready(self, n: int, timeout: float = 60.0) -> float:
        """Until the bridge is online and all n terminals have their link up."""
        start = time.monotonic()
        wanted = {poi_id(i) for i in range(n)}

        async def ready() -> None:
            while True:
                up = {p for p, s in self.terminal_states.items() if s in ("online", "busy")}
                online = self.bridge_states and self.bridge_states[-1][1] == "online"
                if online and wanted <= up:
                    return
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(ready(), timeout)
        # from here on only results matter on this connection (and the bridge's state)
        assert self.client is not None
        await self.client.unsubscribe(f"{self.base}/terminals/+/state")
        return time.monotonic() - start

    async def pay(self, index: int, service_id: str, amount: float,
                  timeout: float = 60.0) -> tuple[float, Arrival]:
        """Publish one payment and wait for its final answer: (seconds, arrival)."""
        assert self.client is not None
        document = payment_request(sale_id(index), service_id, poi_id(index), amount)
        payload = compact(document)
        future: asyncio.Future[Arrival] = asyncio.get_running_loop().create_future()
        key = (sale_id(index), service_id)
        self._waiting[key] = future
        topic = f"{self.base}/terminals/{poi_id(index)}/request"
        t0 = time.monotonic()
        try:
            await self.client.publish(topic, payload, qos=1)
            arrival = await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(key, None)
        return arrival.at - t0, arrival

    async def publish_only(self, index: int, service_id: str, amount: float) -> asyncio.Future[Arrival]:
        assert self.client is not None
        document = payment_request(sale_id(index), service_id, poi_id(index), amount)
        future: asyncio.Future[Arrival] = asyncio.get_running_loop().create_future()
        self._waiting[(sale_id(index), service_id)] = future
        await self.client.publish(f"{self.base}/terminals/{poi_id(index)}/request",
                                  compact(document), qos=1)
        return future


# --- load -------------------------------------------------------------------------------------

PAY_TIMEOUT = 15.0  # a payment not answered by then counts as a failure

class LoopLag:
    """How late this process's event loop wakes a 10 ms sleep: the harness's own health (the
    simulated terminals live on this loop; if it lags, their timing does too)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(0.01)
            self.lags.append(time.monotonic() - start - 0.01)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        s = summary_ms(self.lags)
        return {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "max_ms": s["max_ms"]}


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    loop_lag: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    daemon_cpu: dict[str, Any] = field(default_factory=dict)
    broker_cpu: dict[str, Any] = field(default_factory=dict)
    bench_cpu: dict[str, Any] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1


async def closed_loop(registers: Registers, n: int, amount: float, duration: float, ids: list[ServiceIds],
                      *, daemon_pid: int | None, broker_pid: int | None, period: float = 0.0,
                      think: tuple[float, float] | None = None, warmup: int = 1,
                      seed: int = 1) -> LoadResult:
    """Every terminal pays, waits for the answer, pays again, until `duration` is over.

    `period` staggers the terminals' first payments over one payment time, and `think`
    (a random pause between a terminal's payments, uniform in (low, high) seconds, seeded)
    keeps them from locking into step. A warm-up payment per terminal first, not counted.
    This process's garbage collector is paused meanwhile (collector_paused)."""
    with collector_paused():
        return await _closed_loop(registers, n, amount, duration, ids, daemon_pid=daemon_pid,
                                  broker_pid=broker_pid, period=period, think=think,
                                  warmup=warmup, seed=seed)


async def _closed_loop(registers: Registers, n: int, amount: float, duration: float,
                       ids: list[ServiceIds], *, daemon_pid: int | None, broker_pid: int | None,
                       period: float, think: tuple[float, float] | None, warmup: int,
                       seed: int) -> LoadResult:
    result = LoadResult()

    async def warm(i: int) -> None:
        # not timed, but a warm-up payment lost is a payment lost: it counts as a failure
        try:
            _, arrival = await registers.pay(i, ids[i].next(), amount, timeout=PAY_TIMEOUT)
        except TimeoutError:
            result.fail(f"warm-up: no answer within {PAY_TIMEOUT:g} s")
            return
        if arrival.outcome != "approved":
            result.fail(f"warm-up: outcome {arrival.outcome}")

    for _ in range(warmup):
        await asyncio.gather(*(warm(i) for i in range(n)))
    windows = [CpuWindow(daemon_pid), CpuWindow(broker_pid), CpuWindow(None)]
    for w in windows:
        w.start()
    lag = LoopLag()
    lag.start()
    start = time.monotonic()
    deadline = start + duration

    async def terminal(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        if period:
            await asyncio.sleep(period * i / n)
        while time.monotonic() < deadline:
            try:
                seconds, arrival = await registers.pay(i, ids[i].next(), amount,
                                                       timeout=PAY_TIMEOUT)
            except TimeoutError:
                result.fail(f"no answer within {PAY_TIMEOUT:g} s")
                continue
            if arrival.outcome == "approved":
                result.latencies.append(seconds)
            else:
                result.fail(f"outcome {arrival.outcome}")
            if think:
                await asyncio.sleep(rng.uniform(*think))

    await asyncio.gather(*(terminal(i) for i in range(n)))
    for w in windows:
        w.stop()
    result.loop_lag = await lag.stop()
    result.wall = time.monotonic() - start
    done = len(result.latencies)
    result.daemon_cpu = windows[0].result(done)
    result.broker_cpu = windows[1].result(done)
    result.bench_cpu = windows[2].result(done)
    return result


# --- the baseline process ------------------------------------------------------------------------

class BaselineSubscriber:
    """Receives what the baseline publishes and notes the arrival time of each message."""

    def __init__(self, broker: Any, prefix: str) -> None:
        self.broker = broker
        self.prefix = prefix
        self.arrivals: dict[str, float] = {}
        self.client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BaselineSubscriber:
        self.client = aiomqtt.Client(self.broker.host, self.broker.port,
                                     identifier=f"bench-sub-{self.prefix.replace('/', '-')}",
                                     clean_session=True, socket_options=nodelay())
        await self.client.__aenter__()
        await self.client.subscribe(f"{self.prefix}/#", qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.client is not None
        async for message in self.client.messages:
            self.arrivals[message.topic.value] = time.monotonic()

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        if self.client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.__aexit__(None, None, None)


async def run_baseline(broker: Any, devices: list[str], variants: list[tuple[Variant, float]],
                       workdir: Path, *, tag: str, period: dict[str, float],
                       think: tuple[float, float] | None,
                       broker_pid: int | None, durable: bool = False) -> dict[str, Any]:
    """Run `python -m bench.baseline` on the same pseudo-terminals; join its send times with
    the arrival times seen here. `durable`: requests over MQTT and a journal's two commits
    (see bench/baseline.py)."""
    if durable:
        tag = f"durable-{tag}"
    prefix = f"bench-baseline/{tag}"
    spec = {
        "devices": devices, "host": broker.host, "port": broker.port, "prefix": prefix,
        "variants": [{"name": v.name, "amount": v.amount, "duration": d,
                      "period": period.get(v.name, 0.0)} for v, d in variants],
        "think": think, "tag": tag, "durable": durable,
        "journal": str(workdir / f"baseline-{tag}.sqlite"),
    }
    spec_path = workdir / f"baseline-{tag}.json"
    out_path = workdir / f"baseline-{tag}-out.json"
    spec_path.write_text(json.dumps(spec))
    results: dict[str, Any] = {}
    async with BaselineSubscriber(broker, prefix) as subscriber:
        broker_window = CpuWindow(broker_pid)
        broker_window.start()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.baseline", str(spec_path), str(out_path),
            env=python_env(), cwd=str(ROOT),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await process.communicate()
        broker_window.stop()
        if process.returncode != 0:
            raise RuntimeError(f"baseline failed ({process.returncode}): {err.decode()[-2000:]}")
        await asyncio.sleep(0.5)  # the last arrivals
        out = json.loads(out_path.read_text())
        results["diagnostics"] = out.get("diagnostics", [])
        if durable:
            results["journal_rows"] = out["journal_rows"]
        for variant, _ in variants:
            data = out[variant.name]
            latencies, missing = [], 0
            for topic, t0 in data["sent"]:
                at = subscriber.arrivals.get(topic)
                if at is None:
                    missing += 1
                else:
                    latencies.append(at - t0)
            results[variant.name] = {
                "latencies": latencies, "missing": missing, "failures": data["failures"],
                "cpu": data["cpu"], "wall": data["wall"],
                "response_frame_bytes": data["response_frame_bytes"],
            }
    return results


def e2e_summary(latencies: list[float], wire: dict[str, Any]) -> dict[str, Any]:
    floor = wire["floor_ms"] / 1000.0
    out = summary_ms(latencies)
    added = summary_ms([t - floor for t in latencies])
    out["added_p50_ms"] = added["p50_ms"]
    out["added_p99_ms"] = added["p99_ms"]
    out["added_p99_pct_of_wire"] = (round(100.0 * added["p99_ms"] / wire["wire_ms"], 3)
                                    if added["p99_ms"] is not None else None)
    out["added_p50_pct_of_wire"] = (round(100.0 * added["p50_ms"] / wire["wire_ms"], 3)
                                    if added["p50_ms"] is not None else None)
    return out

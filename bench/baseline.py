"""The baseline: the least work that moves a payment from a terminal to an MQTT subscriber.

For each pseudo-terminal: write the framed request, read the framed answer (the same
stx-etx-lrc framer does the ACKs), publish the answer once at QoS 1 with a plain MQTT client.
No journal, no validation, no state machine, no events. The benchmark's process subscribes
and notes when each message arrives; this process writes when each payment started.

With `"durable": true` in the spec it is the least a bridge that keeps the brief's promises
must do instead: the request comes over MQTT (published at QoS 1 by this process, a register
of its own, and received back through the broker), is committed to an SQLite journal (WAL,
synchronous=FULL, as the daemon's) before its frame goes out, and the answer is committed
before it is published. Still no validation, no state machine, no events, no status polls.
Its start time is the request's publish, as for the bridge.

    python -m bench.baseline SPEC.json OUT.json      (run by bench/run.py, not by hand)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import sys
import time
import tty
from pathlib import Path
from typing import Any

import aiomqtt

from bench.common import (
    FRAMER,
    CpuWindow,
    ServiceIds,
    collector_paused,
    compact,
    nodelay,
    payment_request,
    poi_id,
    sale_id,
)
from bridge.protocol.framing import FrameFailed, FrameReceived, make_framer


class Pty:
    """The terminal's end as the bridge sees it: the pty slave, raw, non-blocking."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        self.loop = asyncio.get_running_loop()

    async def _ready(self, writing: bool) -> None:
        future = self.loop.create_future()
        add, remove = ((self.loop.add_writer, self.loop.remove_writer) if writing
                       else (self.loop.add_reader, self.loop.remove_reader))
        add(self.fd, future.set_result, None)
        try:
            await future
        finally:
            remove(self.fd)

    async def read(self) -> bytes:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                await self._ready(False)
                continue
            if data:
                return data
            await self._ready(False)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                await self._ready(True)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


async def pay(port: Pty, framer: Any, document: dict[str, Any]) -> bytes:
    framer.send_frame(compact(document), time.monotonic())
    await port.write(framer.data_to_send())
    wanted = document["SaleToPOIRequest"]["MessageHeader"]["ServiceID"].encode()
    while True:
        data = await port.read()
        answer = None
        for event in framer.receive_data(data, time.monotonic()):
            if isinstance(event, FrameReceived) and wanted in event.payload:
                answer = event.payload
            elif isinstance(event, FrameFailed):
                raise RuntimeError(event.reason)
        ack = framer.data_to_send()
        if ack:
            await port.write(ack)
        if answer is not None:
            return answer


class Run:
    """One variant (response size) over every terminal: warm-up, then the measured window."""

    def __init__(self, spec: dict[str, Any], variant: dict[str, Any], client: aiomqtt.Client,
                 ports: list[Pty], framers: list[Any], ids: list[ServiceIds],
                 diagnostics: list[dict[str, Any]]) -> None:
        self.spec, self.variant, self.client = spec, variant, client
        self.ports, self.framers, self.ids = ports, framers, ids
        self.diagnostics = diagnostics
        self.sent: list[tuple[str, float]] = []
        self.failures: dict[str, int] = {}
        self.sizes: set[int] = set()
        self.deadline = 0.0

    def _fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1

    async def one(self, i: int, topic: str | None) -> None:
        """A payment on terminal i; `topic` None for a warm-up (published, not counted)."""
        sid = self.ids[i].next()
        document = payment_request(sale_id(i), sid, poi_id(i), self.variant["amount"])
        t0 = time.monotonic()
        try:
            answer = await asyncio.wait_for(pay(self.ports[i], self.framers[i], document), 15)
        except (TimeoutError, RuntimeError) as exc:
            self._fail(type(exc).__name__)
            framer = self.framers[i]
            self.diagnostics.append({
                "terminal": i, "service_id": sid, "error": repr(exc),
                "awaiting_ack": framer.awaiting_ack,
                "buffered": len(getattr(framer, "_buf", b"")),
                "since_start_s": round(time.monotonic() - t0, 3)})
            return
        if sid.encode() not in answer:
            self._fail("answer for another request")
            return
        await self.client.publish(topic or f"{self.spec['prefix']}/warmup/{i}/{sid}", answer,
                                  qos=1)
        if topic is not None:
            self.sent.append((topic, t0))
            self.sizes.add(len(answer) + 3)

    async def terminal(self, i: int) -> None:
        rng = random.Random(1000 + i)
        n, name = len(self.ports), self.variant["name"]
        if self.variant["period"]:
            await asyncio.sleep(self.variant["period"] * i / n)
        seq = 0
        while time.monotonic() < self.deadline:
            seq += 1
            await self.one(i, f"{self.spec['prefix']}/{name}/{i}/{seq}")
            if self.spec["think"]:
                await asyncio.sleep(rng.uniform(*self.spec["think"]))

    async def run(self) -> dict[str, Any]:
        n = len(self.ports)
        await asyncio.gather(*(self.one(i, None) for i in range(n)))  # warm-up, not counted
        window = CpuWindow(None)
        window.start()
        self.deadline = time.monotonic() + self.variant["duration"]
        await asyncio.gather(*(self.terminal(i) for i in range(n)))
        window.stop()
        return {"sent": self.sent, "failures": self.failures, "wall": window.wall,
                "cpu": window.result(len(self.sent)),
                "response_frame_bytes": sorted(self.sizes)}


class Journal:
    """One row per payment, committed (with its fsync) before the frame goes out and again
    before the answer is published: the daemon's two commits of a payment, nothing else."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS payments (terminal INTEGER, service_id TEXT, "
                        "request TEXT, answer TEXT, PRIMARY KEY (terminal, service_id))")

    def accepted(self, service_id: str, terminal: int, request: bytes) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO payments (service_id, terminal, request) VALUES (?, ?, ?)",
                        (service_id, terminal, request.decode()))
        self.db.execute("COMMIT")

    def answered(self, service_id: str, terminal: int, answer: bytes) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("UPDATE payments SET answer = ? WHERE terminal = ? AND service_id = ?",
                        (answer.decode(), terminal, service_id))
        self.db.execute("COMMIT")

    def count(self) -> tuple[int, int]:
        """(payments journaled, of which answered)."""
        return self.db.execute("SELECT count(*), count(answer) FROM payments").fetchone()


def requests_prefix(spec: dict[str, Any]) -> str:
    """Outside the prefix the benchmark's subscriber notes arrivals on."""
    return f"{spec['prefix']}-requests"


class DurableRun(Run):
    """The request over MQTT and the journal's two commits around the terminal's work."""

    def __init__(self, *args: Any, journal: Journal, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.journal = journal
        self.waiting: dict[tuple[int, str], asyncio.Future[None]] = {}

    def request_topic(self, i: int, sid: str, topic: str | None) -> str:
        """Where the request goes; what follows the terminal's number is the result topic."""
        result_topic = topic or f"{self.spec['prefix']}/warmup/{i}/{sid}"
        return f"{requests_prefix(self.spec)}/{i}/{result_topic}"

    async def serve(self, request_topic: str, payload: bytes) -> None:
        """The bridge's part: what a request received over MQTT costs at the least."""
        i, result_topic = request_topic.removeprefix(requests_prefix(self.spec) + "/").split("/", 1)
        document = json.loads(payload)
        sid = document["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
        done = self.waiting.pop((int(i), sid))  # each terminal counts its own ServiceIDs
        try:
            self.journal.accepted(sid, int(i), payload)
            answer = await asyncio.wait_for(
                pay(self.ports[int(i)], self.framers[int(i)], document), 15)
            self.journal.answered(sid, int(i), answer)
            await self.client.publish(result_topic, answer, qos=1)
        except Exception as exc:  # the run that waits for it counts it, or fails with it
            done.set_exception(exc)
            return
        done.set_result(None)
        if not result_topic.startswith(f"{self.spec['prefix']}/warmup/"):
            self.sizes.add(len(answer) + 3)

    async def one(self, i: int, topic: str | None) -> None:
        sid = self.ids[i].next()
        document = payment_request(sale_id(i), sid, poi_id(i), self.variant["amount"])
        done = self.waiting[i, sid] = asyncio.get_running_loop().create_future()
        t0 = time.monotonic()
        await self.client.publish(self.request_topic(i, sid, topic), compact(document), qos=1)
        try:
            await asyncio.wait_for(done, 20)  # a request lost on the way counts as a failure
        except (TimeoutError, RuntimeError) as exc:
            self._fail(type(exc).__name__)
            self.diagnostics.append({"terminal": i, "service_id": sid, "error": repr(exc),
                                     "since_start_s": round(time.monotonic() - t0, 3)})
            return
        if topic is not None:
            self.sent.append((topic, t0))


async def serve_requests(client: aiomqtt.Client, runs: list[DurableRun]) -> None:
    """Each request received goes to the run of the moment, as a task of its own (terminals
    work at once, as the daemon's workers do)."""
    tasks = set()
    async for message in client.messages:
        task = asyncio.create_task(runs[-1].serve(message.topic.value, message.payload))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    ports = [Pty(device) for device in spec["devices"]]
    framers = [make_framer(FRAMER) for _ in ports]
    ids = [ServiceIds("z") for _ in ports]
    results: dict[str, Any] = {}
    diagnostics: list[dict[str, Any]] = []
    journal = Journal(spec["journal"]) if spec.get("durable") else None
    async with aiomqtt.Client(spec["host"], spec["port"], identifier=f"bench-baseline-{spec['tag']}",
                              clean_session=True, max_inflight_messages=0,
                              socket_options=nodelay()) as client:
        runs: list[DurableRun] = []
        server = None
        if journal is not None:
            await client.subscribe(f"{requests_prefix(spec)}/#", qos=1)
            server = asyncio.create_task(serve_requests(client, runs))
        for variant in spec["variants"]:
            with collector_paused():  # as in the benchmark's process, for the same reason
                if journal is None:
                    run = Run(spec, variant, client, ports, framers, ids, diagnostics)
                else:
                    run = DurableRun(spec, variant, client, ports, framers, ids, diagnostics,
                                     journal=journal)
                    runs.append(run)
                results[variant["name"]] = await run.run()
        if server is not None:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
    for port in ports:
        port.close()
    if journal is not None:
        results["journal_rows"] = journal.count()
    results["diagnostics"] = diagnostics[:50]
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    import logging

    logging.getLogger("mqtt").setLevel(logging.ERROR)  # aiomqtt's "pending publish calls"
    # (aiomqtt is imported at the top of this module, so its own setLevel came first)
    asyncio.run(main(sys.argv[1], sys.argv[2]))

"""The baseline: the least work that moves a payment from a terminal to an MQTT subscriber.

For each pseudo-terminal: write the framed request, read the framed answer (the same
stx-etx-lrc framer does the ACKs), publish the answer once at QoS 1 with a plain MQTT client.
No journal, no validation, no state machine, no events. The benchmark's process subscribes
and notes when each message arrives; this process writes when each payment started.

    python -m bench.baseline SPEC.json OUT.json      (run by bench/run.py, not by hand)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
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


async def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    ports = [Pty(device) for device in spec["devices"]]
    framers = [make_framer(FRAMER) for _ in ports]
    ids = [ServiceIds("z") for _ in ports]
    results: dict[str, Any] = {}
    diagnostics: list[dict[str, Any]] = []
    async with aiomqtt.Client(spec["host"], spec["port"], identifier=f"bench-baseline-{spec['tag']}",
                              clean_session=True, max_inflight_messages=0,
                              socket_options=nodelay()) as client:
        for variant in spec["variants"]:
            with collector_paused():  # as in the benchmark's process, for the same reason
                results[variant["name"]] = await Run(spec, variant, client, ports, framers, ids,
                                                     diagnostics).run()
    for port in ports:
        port.close()
    results["diagnostics"] = diagnostics[:50]
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    import logging

    logging.getLogger("mqtt").setLevel(logging.ERROR)  # aiomqtt's "pending publish calls"
    # (aiomqtt is imported at the top of this module, so its own setLevel came first)
    asyncio.run(main(sys.argv[1], sys.argv[2]))

"""Section 4c: what one I/O event costs the daemon, beside the least it could cost.

- A serial read: a child process writes 115-byte chunks (what a 115200-baud line delivers in
  10 ms) into a pseudo-terminal, one every 0.4 ms; this process reads them with
  `SerialTransport.read()` (a task woken per read), with `SerialTransport.deliver()` (the
  worker's way: the loop's read callback hands each read on), then again with a bare loop
  reader callback that only calls os.read (the floor for any asyncio reader). CPU of this
  process per read (getrusage).
- A PUBACK: paho's decoder (`_packet.decode_puback`) against the daemon's short path for a
  two-byte PUBACK (`PipelinedClient._pubackcomp`), on a paho client with nothing in flight
  (so only the decoding is timed, not the callback); and what paho does
  after each PUBACK with 200 messages in flight, none waiting for a slot: its scan for one
  (`_update_inflight`) against the daemon's check (`_lean_update_inflight`).

Run in its own process by bench/run.py (`python -m bench.io_costs SECONDS`), which reads the
JSON it prints: it needs its own event loop and forks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import time
import tty
import types
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import _packet

from bench.core import SERIAL_CHUNK, rate
from bridge.config import SerialLink
from bridge.daemon.mqtt_client import PipelinedClient, _lean_update_inflight
from bridge.transports.serial import SerialTransport

CHUNK_INTERVAL = 0.0004
IN_FLIGHT = 200  # QoS 1 messages awaiting their PUBACK, as under load (the outbox allows 256)


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _feed(chunks: int) -> tuple[int, str, int]:
    """A pty whose master a child process fills with `chunks` chunks, paced."""
    master, slave = os.openpty()
    tty.setraw(slave)
    name = os.ttyname(slave)
    pid = os.fork()
    if pid == 0:  # the terminal's side
        try:
            os.close(slave)
            data = b"x" * SERIAL_CHUNK
            time.sleep(0.3)
            for _ in range(chunks):
                os.write(master, data)
                due = time.monotonic() + CHUNK_INTERVAL
                while time.monotonic() < due:
                    pass
            time.sleep(2)
        finally:
            os._exit(0)
    os.close(master)
    return pid, name, slave


async def _transport_reads(chunks: int) -> dict[str, Any]:
    pid, name, slave = _feed(chunks)
    transport = SerialTransport(SerialLink(device=name))
    await transport.open()
    os.close(slave)
    got = reads = 0
    before = _cpu()
    while got < chunks * SERIAL_CHUNK:
        got += len(await transport.read())
        reads += 1
    after = _cpu()
    await transport.close()
    _end(pid)
    return _per_read("SerialTransport.read()", reads, before, after)


async def _delivered_reads(chunks: int) -> dict[str, Any]:
    pid, name, slave = _feed(chunks)
    transport = SerialTransport(SerialLink(device=name))
    await transport.open()
    os.close(slave)
    counts = {"got": 0, "reads": 0}
    done = asyncio.get_running_loop().create_future()

    def receiver(data: bytes) -> None:
        counts["got"] += len(data)
        counts["reads"] += 1
        if counts["got"] >= chunks * SERIAL_CHUNK and not done.done():
            done.set_result(None)

    before = _cpu()
    delivering = asyncio.ensure_future(transport.deliver(receiver))
    await done
    after = _cpu()
    delivering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await delivering
    await transport.close()
    _end(pid)
    return _per_read("SerialTransport.deliver()", counts["reads"], before, after)


async def _callback_reads(chunks: int) -> dict[str, Any]:
    pid, name, slave = _feed(chunks)
    os.set_blocking(slave, False)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    counts = {"got": 0, "reads": 0}

    def on_readable() -> None:
        try:
            data = os.read(slave, 4096)
        except BlockingIOError:
            return
        counts["got"] += len(data)
        counts["reads"] += 1
        if counts["got"] >= chunks * SERIAL_CHUNK and not done.done():
            done.set_result(None)

    before = _cpu()
    loop.add_reader(slave, on_readable)
    await done
    after = _cpu()
    loop.remove_reader(slave)
    os.close(slave)
    _end(pid)
    return _per_read("bare reader callback (floor)", counts["reads"], before, after)


def _end(pid: int) -> None:
    """The measurement is over: stop the writer now rather than wait out its final sleep."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _per_read(what: str, reads: int, before: tuple[float, float],
              after: tuple[float, float]) -> dict[str, Any]:
    user, system = after[0] - before[0], after[1] - before[1]
    return {"what": what, "events": reads, "us_user": round(user / reads * 1e6, 1),
            "us_system": round(system / reads * 1e6, 1),
            "us_total": round((user + system) / reads * 1e6, 1)}


def _pubacks(seconds: float) -> list[dict[str, Any]]:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client._in_packet["packet"] = b"\x00\x05"  # message id 5, not in flight
    decoder = rate(lambda: _packet.decode_puback(0x40, b"\x00\x05", paho.MQTTv311), seconds)
    # (the client's PUBACK handler needs only these two of a PipelinedClient)
    pipelined = types.SimpleNamespace(_client=client, _acks={})
    short = rate(lambda: PipelinedClient._pubackcomp(pipelined, "PUBACK"), seconds)
    busy = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    busy.max_inflight_messages_set(256)
    for mid in range(1, IN_FLIGHT + 1):
        message = paho.MQTTMessage(mid, b"t")
        message.qos, message.state = 1, paho.mqtt_ms_wait_for_puback
        busy._out_messages[mid] = message
    busy._inflight_messages = IN_FLIGHT
    scan = rate(lambda: paho.Client._update_inflight(busy), seconds)
    check = rate(lambda: _lean_update_inflight(busy), seconds)
    return [{"what": "PUBACK, paho's decoder", "us_total": round(1e6 / decoder, 2)},
            {"what": "PUBACK, the daemon's short path", "us_total": round(1e6 / short, 2)},
            {"what": f"after it, paho's scan ({IN_FLIGHT} in flight)",
             "us_total": round(1e6 / scan, 2)},
            {"what": "after it, the daemon's check", "us_total": round(1e6 / check, 2)}]


def run(seconds: float) -> dict[str, Any]:
    chunks = max(500, int(seconds / CHUNK_INTERVAL))
    reads = [asyncio.run(_transport_reads(chunks)), asyncio.run(_delivered_reads(chunks)),
             asyncio.run(_callback_reads(chunks))]
    return {"chunk_bytes": SERIAL_CHUNK, "chunk_interval_ms": CHUNK_INTERVAL * 1000,
            "reads": reads, "pubacks": _pubacks(seconds)}


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 4.0)))

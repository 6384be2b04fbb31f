"""Where one payment's time goes: the path from a register's request to its result, in stages.

    .venv/bin/python -m bench.stages                   # 30 payments of each response, 1 terminal
    .venv/bin/python -m bench.stages --payments 60 --response fixture

One simulated terminal on a pseudo-terminal (115200 baud, 50 ms processing, as section 1 of
`make bench`), one register, payments one at a time. The daemon runs as its own process with
time stamps taken at each hand-over (`python -m bench.stages daemon run --config FILE`:
the bridge's code, with functions wrapped to note time.monotonic(), which is one clock for
every process of the box); the simulator and the register note theirs in this process. The
table gives each stage's p50, p90 and max in ms. The stages follow each other, so they add
up to the end-to-end time; "added" is the end-to-end time minus the floor of `make bench`
(processing + the paced answer), and "terminal beyond the floor" is the part of it spent in
the simulated terminal (the same in the baseline of `make bench`), not in the bridge.

The wrapping costs the daemon a few microseconds per stamp; the figures are for finding
where the time goes, not for the README's table of record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
DELAY = 0.05
_SERVICE_ID = re.compile(rb'"ServiceID":"([^"]+)"')


# --- the daemon's side: stamps ------------------------------------------------------------------

def _service_id(data: Any) -> str | None:
    raw = data if isinstance(data, bytes | bytearray) else str(data).encode()
    found = _SERVICE_ID.search(raw)
    return found.group(1).decode() if found else None


def install_stamps(stamps: list[tuple[str, str | None, float]]) -> None:
    """Wrap the daemon's hand-over points so each notes (stage, ServiceID, time)."""
    from bridge.daemon import mqtt_client, worker
    from bridge.transports.serial import SerialTransport

    now = time.monotonic

    taken = mqtt_client.PipelinedClient.next_message

    async def next_message(self):  # type: ignore[no-untyped-def]
        message = await taken(self)
        stamps.append(("request taken", _service_id(message.payload), now()))
        return message

    mqtt_client.PipelinedClient.next_message = next_message

    submit = worker.TerminalWorker.submit

    def submitted(self, request, *rest):  # type: ignore[no-untyped-def]
        result = submit(self, request, *rest)
        stamps.append(("request handled", request.message_header.service_id, now()))
        return result

    worker.TerminalWorker.submit = submitted

    send = worker.TerminalWorker._send

    def _send(self, action, *rest):  # type: ignore[no-untyped-def]
        stamps.append(("frame released", action.service_id, now()))
        return send(self, action, *rest)

    worker.TerminalWorker._send = _send

    write = SerialTransport.write

    async def stamped_write(self, data):  # type: ignore[no-untyped-def]
        stamps.append(("device write", None, now()))
        return await write(self, data)

    SerialTransport.write = stamped_write
    write_nowait = getattr(SerialTransport, "write_nowait", None)  # (not before ecede88)
    if write_nowait is not None:
        def stamped_write_nowait(self, data):  # type: ignore[no-untyped-def]
            stamps.append(("device write", None, now()))
            return write_nowait(self, data)

        SerialTransport.write_nowait = stamped_write_nowait

    on_frame = worker.TerminalWorker._on_frame

    def _on_frame(self, payload):  # type: ignore[no-untyped-def]
        service_id = _service_id(payload)
        stamps.append(("answer complete", service_id, now()))
        result = on_frame(self, payload)
        stamps.append(("answer handled", service_id, now()))
        return result

    worker.TerminalWorker._on_frame = _on_frame

    publish = mqtt_client.PipelinedClient.publish_nowait

    def publish_nowait(self, topic, payload, **options):  # type: ignore[no-untyped-def]
        result = publish(self, topic, payload, **options)
        if topic.endswith("/response"):
            stamps.append(("result published", _service_id(payload), now()))
        return result

    mqtt_client.PipelinedClient.publish_nowait = publish_nowait


def daemon_main(argv: list[str]) -> int:
    import atexit

    out = os.environ["POI_BENCH_STAGES"]
    stamps: list[tuple[str, str | None, float]] = []
    install_stamps(stamps)
    atexit.register(lambda: Path(out).write_text(json.dumps(stamps)))
    from bridge.cli import main

    return main(argv)


# --- the bench's side ------------------------------------------------------------------------

STAGES = [  # (name, from, to): consecutive, so they add up to the end-to-end time
    ("register -> bridge (MQTT)", "published", "request taken"),
    ("request checked, session step, journal writes", "request taken", "request handled"),
    ("commit (fsync) -> frame released", "request handled", "frame released"),
    ("frame -> device", "frame released", "device write"),
    ("terminal: request in, answer's last byte out", "device write", "answer complete"),
    ("answer handled (parse, session, journal writes)", "answer complete", "answer handled"),
    ("commit (fsync) -> result handed to paho", "answer handled", "result published"),
    ("paho -> broker -> register", "result published", "arrived"),
]


def _first_after(stamps: list[tuple[str, str | None, float]], stage: str, service_id: str | None,
                 after: float) -> float | None:
    for name, sid, at in stamps:
        if name == stage and at >= after and (service_id is None or sid == service_id):
            return at
    return None


def breakdown(payments: list[tuple[str, float, float]], stamps: list[tuple[str, str | None, float]],
              floor_ms: float) -> dict[str, Any]:
    """payments: (ServiceID, published, arrived) as seen by the register."""
    series: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    series["terminal beyond the floor"] = []
    series["end to end"] = []
    series["added (end to end - floor)"] = []
    stamps = sorted(stamps, key=lambda s: s[2])
    for service_id, published, arrived in payments:
        at = {"published": published, "arrived": arrived}
        for stage in ("request taken", "request handled", "frame released"):
            at[stage] = _first_after(stamps, stage, service_id, published)
        at["device write"] = _first_after(stamps, "device write", None, at["frame released"] or 0)
        for stage in ("answer complete", "answer handled", "result published"):
            at[stage] = _first_after(stamps, stage, service_id, at["device write"] or 0)
        if any(v is None for v in at.values()):
            continue  # a stamp went missing (it never should: the test checks)
        for name, start, end in STAGES:
            series[name].append((at[end] - at[start]) * 1000)
        series["terminal beyond the floor"].append(
            (at["answer complete"] - at["device write"]) * 1000 - floor_ms)
        series["end to end"].append((arrived - published) * 1000)
        series["added (end to end - floor)"].append((arrived - published) * 1000 - floor_ms)
    return {name: _summary(values) for name, values in series.items()}


def _summary(values: list[float]) -> dict[str, Any]:
    from bench.common import percentile

    def ms(q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value, 3)

    return {"n": len(values), "p50_ms": ms(50), "p90_ms": ms(90), "max_ms": ms(100)}


async def run(payments: int, responses: list[str]) -> dict[str, Any]:
    import subprocess

    from bench.common import BAUD, ServiceIds, collector_paused, machine_speed
    from bench.e2e import LARGE, SMALL, Fleet, Registers, python_env, wire_model, write_config
    from tests.broker import Mosquitto

    variants = {"small": SMALL, "fixture": LARGE}
    work = Path(tempfile.mkdtemp(prefix="poi-stages-"))
    broker = Mosquitto(work / "mosquitto",
                       extra_config="set_tcp_nodelay true\nautosave_interval 1800\n").start()
    fleet = await Fleet(1, DELAY, BAUD).start()
    config = write_config(work, broker, "bench/stages", fleet.devices)
    out = work / "stamps.json"
    env = {**python_env(), "POI_BENCH_STAGES": str(out)}
    log = open(work / "daemon.log", "ab")  # noqa: SIM115 - the daemon writes to it
    daemon = subprocess.Popen([sys.executable, "-m", "bench.stages", "daemon", "run", "--config",
                               str(config)], stdout=log, stderr=log, env=env, cwd=ROOT)
    log.close()
    seen: dict[str, list[tuple[str, float, float]]] = {}
    rng = random.Random(1)
    ids = ServiceIds("s")
    try:
        async with Registers(broker, "bench/stages") as registers:
            await registers.wait_ready(1)
            with collector_paused():
                for name in responses:
                    variant = variants[name]
                    for i in range(payments + 2):  # two warm-up payments, not counted
                        service_id = ids.next()
                        published = time.monotonic()
                        seconds, arrival = await registers.pay(0, service_id, variant.amount)
                        if i >= 2:
                            seen.setdefault(name, []).append((service_id, published, arrival.at))
                        await asyncio.sleep(rng.uniform(0.010, 0.030))
    finally:
        daemon.terminate()
        daemon.wait(timeout=15)
        await fleet.close()
        broker.kill()
    stamps = [tuple(s) for s in json.loads(out.read_text())]
    result: dict[str, Any] = {"speed": machine_speed(), "payments": payments, "responses": {}}
    for name, rows in seen.items():
        floor = wire_model(variants[name], DELAY)["floor_ms"]
        result["responses"][name] = {"floor_ms": floor,
                                     "stages": breakdown(rows, stamps, floor)}  # type: ignore[arg-type]
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"Where one payment's time goes: 1 terminal, 115200 baud, {DELAY * 1000:g} ms "
             f"processing, {result['payments']} payments each, in ms (json.loads of the 11 KB "
             f"fixture: {result['speed']['json_loads_fixture_us']} us on this VM now)"]
    for name, data in result["responses"].items():
        stages = data["stages"]
        order = [stage for stage, _, _ in STAGES]
        order.insert(order.index("terminal: request in, answer's last byte out") + 1,
                     "terminal beyond the floor")
        order += ["end to end", "added (end to end - floor)"]
        lines.append(f"  {name} response (floor {data['floor_ms']} ms)")
        lines.append(f"    {'stage':52s} {'p50':>8s} {'p90':>8s} {'max':>8s}")
        for stage in order:
            s = stages[stage]
            label = "  of which beyond the floor" if stage == "terminal beyond the floor" \
                else stage
            lines.append(f"    {label:52s} {s['p50_ms']:8.2f} {s['p90_ms']:8.2f} "
                         f"{s['max_ms']:8.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["daemon"]:
        return daemon_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--payments", type=int, default=30)
    parser.add_argument("--response", choices=["small", "fixture", "both"], default="both")
    parser.add_argument("--output", type=Path, default=RESULTS / "stages-latest.json")
    args = parser.parse_args(argv)
    responses = ["small", "fixture"] if args.response == "both" else [args.response]
    from bench.common import run_precise

    result = run_precise(run(args.payments, responses))
    print(render(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Minimal reproductions of the bridge bugs the soak (bench/soak.py) found, one per command.

    PYTHONPATH=. .venv/bin/python bench/soak_repro.py            # all of them
    PYTHONPATH=. .venv/bin/python bench/soak_repro.py busy-duplicate

Each one runs a real mosquitto, a simulated terminal and `poi-bridge run`, provokes the
fault in the smallest way, prints what happened, and says REPRODUCED (exit status 1) or
fixed. The soak tags the same symptoms with the same names (KNOWN_BUGS in bench/soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bridge.simulator import responses
from tests.broker import Mosquitto
from tests.rig import (
    POI,
    Daemon,
    Simulator,
    Subscriber,
    python_env,
    wait_until,
    write_config,
)

BASE = "poi-bridge"
REQUEST = f"{BASE}/terminals/{POI}/request"
RESPONSES = f"{BASE}/registers/POS1/response"


def payment(service_id: str, amount: float) -> dict[str, Any]:
    document = responses.payment_request("POS1", service_id, POI, amount)
    document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
        "TimeStamp"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return document


def journal(work: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{work / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT service_id, state, outcome, source, polls_sent, detail "
                          "FROM transactions ORDER BY created_at").fetchall()
    finally:
        db.close()


def outcomes(register: Subscriber) -> list[tuple[str, str]]:
    return [(p["bridge"]["transaction"]["service_id"], p["bridge"]["outcome"])
            for p in register.on(RESPONSES)]


async def ready(daemon: Daemon) -> None:
    assert wait_until(lambda: "link up" in daemon.log()
                      and "connected to MQTT broker" in daemon.log(), 20), daemon.log()[-2000:]
    await asyncio.sleep(1.0)


# --- the bugs -------------------------------------------------------------------------------------

async def left_offline(work: Path, broker: Mosquitto) -> bool:
    """A serial terminal whose device node is absent when the daemon starts is never opened
    when it appears (bridge/daemon/app.py, Bridge._start_hotplug: device_present(False), then
    only a udev event would bring it back; none comes for a pty or any node udev does not
    announce). The README says such terminals are retried with backoff."""
    link = work / "terminal"
    daemon = Daemon(write_config(work, broker, link), work).start()  # no device yet
    sim = None
    try:
        assert wait_until(lambda: "connected to MQTT broker" in daemon.log(), 20)
        await asyncio.sleep(1.0)
        sim = Simulator(work)  # now the terminal is plugged in, behind the configured path
        opened = wait_until(lambda: "link up" in daemon.log(), 20)
        print(f"  link up within 20 s of the terminal appearing: {opened}")
        print("  " + "\n  ".join(line for line in daemon.log().splitlines()
                                 if "is not plugged in" in line and "poi_bridge:" in line))
        return not opened
    finally:
        daemon.kill()
        if sim is not None:
            sim.stop()


async def dropped_while_draining(work: Path, broker: Mosquitto) -> bool:
    """Requests published while the daemon restarts (SIGTERM) are lost. Originally the
    draining daemon acknowledged (paho PUBACKs QoS 1 on receipt) and skipped them
    (RegisterGateway._receive); e7fc2da refused them, but those still queued in the MQTT
    client when Bridge.stop() cancelled the MQTT task were dropped; bc9f762 unsubscribes
    first (RegisterGateway.drain_requests), and a persistent session keeps messages only for
    its subscriptions: every request published from the UNSUBSCRIBE until the next start
    subscribes again is accepted by mosquitto and delivered to nobody."""
    sim = Simulator(work, "--delay", "0")
    daemon = Daemon(write_config(work, broker, sim.link), work).start()
    sent: list[str] = []
    try:
        async with Subscriber(broker, [RESPONSES], client_id="register-POS1",
                              persistent=True) as register:
            await ready(daemon)
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            while daemon.process.poll() is None and time.monotonic() - started < 10:
                for _ in range(5):  # bursts: some wait in the client's queue, acknowledged
                    sent.append(f"D{len(sent) + 1}")
                    await register.publish(REQUEST, payment(sent[-1], 1.0))
                await asyncio.sleep(0.005)
            daemon.start()  # what waited in the broker is delivered now
            await asyncio.sleep(8)
            answered = {sid for sid, _ in outcomes(register)}
        known = {row[0] for row in journal(work)}
        lost = [sid for sid in sent if sid not in answered and sid not in known]
        print(f"  {len(sent)} requests published while the daemon drained; never answered "
              f"and not in the journal: {lost}")
        return bool(lost)
    finally:
        daemon.kill()
        sim.stop()


async def busy_taken_for_declined(work: Path, broker: Mosquitto) -> bool:
    """The terminal is slow to ACK, so the framer sends the payment request again and the
    terminal reads it twice. It answers the second copy Busy, with the payment's own
    SaleID/ServiceID, and TerminalSession._original_answer (bridge/protocol/session.py) makes
    that final: declined, "terminal busy: the payment was not started". The terminal goes on
    and approves the first copy: charged, reported declined."""
    sim = Simulator(work, "--delay", "1.5")
    daemon = Daemon(write_config(work, broker, sim.link, terminal={"payment_timeout": 10.0}),
                    work).start()
    try:
        async with Subscriber(broker, [RESPONSES], client_id="register-POS1",
                              persistent=True) as register:
            await ready(daemon)
            os.kill(sim.process.pid, signal.SIGSTOP)  # the terminal hangs a moment
            await register.publish(REQUEST, payment("B1", 12.5))
            await asyncio.sleep(1.2)  # > max_tries x ack_timeout (3 x 0.3 s): 3 copies
            os.kill(sim.process.pid, signal.SIGCONT)
            await asyncio.sleep(4)
            told = outcomes(register)
    finally:
        daemon.kill()
        ledger = sim.stop()
    print(f"  register told {told}; journal {journal(work)}; terminal {ledger}")
    charged = ledger.get("POS1/B1", {}).get("charged", False)
    return charged and ("B1", "approved") not in told


async def busy_status_polled_forever(work: Path, broker: Mosquitto) -> bool:
    """The terminal refused the payment (Failure/Busy) and that answer was lost. The status
    poll says so (Success, RepeatedMessageResponse = the Failure/Busy response), classify()
    calls it BUSY, and TerminalSession._status_answer asks again after poll_floor, forever:
    never reported (not even unresolved), and the terminal stays taken for everybody."""
    sim = Simulator(work, "--decision", "busy", "--never-answer")
    daemon = Daemon(write_config(work, broker, sim.link, terminal={"payment_timeout": 1.0}),
                    work).start()
    try:
        async with Subscriber(broker, [RESPONSES], client_id="register-POS1") as register:
            await ready(daemon)
            await register.publish(REQUEST, payment("Y1", 3.0))
            await asyncio.sleep(8)
            told = outcomes(register)
    finally:
        daemon.kill()
        ledger = sim.stop()
    rows = journal(work)
    print(f"  after 8 s: register told {told}; journal {rows}; terminal {ledger}")
    return not told


async def redelivered_refusal(work: Path, broker: Mosquitto) -> bool:
    """A request the bridge refuses (Busy: the terminal is taken) is not journaled. When the
    broker delivers it again (QoS 1 is at least once; here mosquitto saved it as in flight
    and was killed -9 before the bridge's PUBACK), RequestIntake._request
    (bridge/daemon/intake.py) finds no journal row and starts it: the register was told
    "rejected, nothing was sent" (and may well retry with a new ServiceID), the terminal
    charges it."""
    sim = Simulator(work, "--delay", "4")
    daemon = Daemon(write_config(work, broker, sim.link, terminal={"payment_timeout": 10.0}),
                    work).start()
    register = Subscriber(broker, [RESPONSES], client_id="register-POS1", persistent=True)
    try:
        await register.connect()
        await ready(daemon)
        assert daemon.process is not None
        await register.publish(REQUEST, payment("R1", 1.0))  # takes the terminal for 4 s
        await asyncio.sleep(0.3)
        os.kill(daemon.process.pid, signal.SIGSTOP)  # the box hangs a moment...
        await register.publish(REQUEST, payment("R2", 2.0))  # ...as R2 is on its way to it
        await asyncio.sleep(2.5)  # mosquitto saves (once a second): R2 in flight to the bridge
        broker.kill()  # before the bridge's PUBACK
        os.kill(daemon.process.pid, signal.SIGCONT)  # the bridge refuses R2: terminal busy
        await register.disconnect()
        await asyncio.sleep(2)
        broker.start()  # R2 is delivered again
        await register.connect()
        await asyncio.sleep(10)
        told = outcomes(register)
    finally:
        await register.disconnect()
        daemon.kill()
        ledger = sim.stop()
    print(f"  register told {told}; terminal {ledger}")
    return ("R2", "rejected") in told and ledger.get("POS1/R2", {}).get("charged", False)


async def identity_mismatch_ignored(work: Path, broker: Mosquitto) -> bool:
    """Not a bug with udev-managed /dev/poi/... names, a hazard with /dev/ttyACM0-style ones:
    the device configured for terminal A turns out to be terminal B (after a replug renumbers
    the ports). B answers with its own POIID; the bridge logs "identity mismatch" and keeps
    sending A's payments to B, which charges them."""
    other = "P400Plus-111"
    process = subprocess.Popen(  # noqa: ASYNC220 - like tests.rig.Simulator
        [sys.executable, str(Path(__file__).with_name("soak_terminal.py")), "--pty", "--link",
         str(work / "terminal"), "--poi-id", other, "--ledger", str(work / "ledger.json")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=python_env(), cwd=ROOT)
    assert process.stdout is not None
    process.stdout.readline()
    daemon = Daemon(write_config(work, broker, work / "terminal"), work).start()
    try:
        async with Subscriber(broker, [RESPONSES], client_id="register-POS1") as register:
            await ready(daemon)
            for service_id in ("X1", "X2"):
                await register.publish(REQUEST, payment(service_id, 5.0))
                await asyncio.sleep(2)
            told = outcomes(register)
    finally:
        daemon.kill()
        process.terminate()
        process.wait()
    ledger = json.loads((work / "ledger.json").read_text())
    print(f"  payments for {POI}: register told {told}; charged by {other}: {sorted(ledger)}")
    print("  " + "\n  ".join(line for line in daemon.log().splitlines() if "says it is" in line))
    return len(ledger) == 2


REPROS: dict[str, Callable[[Path, Mosquitto], Awaitable[bool]]] = {
    "left-offline": left_offline,
    "dropped-while-draining": dropped_while_draining,
    "busy-taken-for-declined": busy_taken_for_declined,
    "busy-status-polled-forever": busy_status_polled_forever,
    "redelivered-refusal": redelivered_refusal,
    "identity-mismatch-ignored": identity_mismatch_ignored,
}


async def run(name: str) -> bool:
    work = Path(tempfile.mkdtemp(prefix=f"poi-repro-{name}-"))
    broker = Mosquitto(work / "mosquitto").start()
    try:
        print(f"{name}: {' '.join((REPROS[name].__doc__ or '').split())}")
        reproduced = await REPROS[name](work, broker)
    finally:
        broker.kill()
    print(f"  => {'REPRODUCED' if reproduced else 'not reproduced (fixed?)'}   ({work})\n")
    if not reproduced:
        shutil.rmtree(work, ignore_errors=True)
    return reproduced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", choices=[[], *REPROS], metavar="NAME",
                        help=f"one or more of: {', '.join(REPROS)} (default: all)")
    args = parser.parse_args()
    results = {name: asyncio.run(run(name)) for name in (args.names or list(REPROS))}
    for name, reproduced in results.items():
        print(f"{name:<28} {'REPRODUCED' if reproduced else 'ok'}")
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

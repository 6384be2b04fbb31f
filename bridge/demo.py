"""`make demo`: the whole chain on one machine, no configuration, no system services.

An embedded MQTT broker (amqtt) on localhost, a simulated terminal on a pseudo-terminal, the
bridge, and a register client that makes three payments: one approved, one declined, and
one whose response is lost on the wire and recovered by a status poll.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.register_client import RegisterClient
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, Scenario

POI_ID = "V400m-324688179"
SALE_ID = "DEMO-TILL-1"
PAYMENTS = [
    (12.50, "approved at the terminal"),
    (7.20, "declined by the card issuer"),
    (33.00, "approved, but the response is lost on the wire: recovered by a status poll"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_embedded_broker(port: int) -> Any:
    from amqtt.broker import Broker

    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    return broker


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="run the self-contained demonstration",
                              description=__doc__.splitlines()[0])
    p.add_argument("--verbose", action="store_true", help="show the bridge's own log lines")
    p.set_defaults(handler=run)


def _say(text: str) -> None:
    print(text, flush=True)


async def demo(verbose: bool = False) -> int:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR,
                        format="    [bridge] %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    port = free_port()
    _say(f"1. embedded MQTT broker (amqtt) on 127.0.0.1:{port}")
    broker = await start_embedded_broker(port)
    workdir = Path(tempfile.mkdtemp(prefix="poi-bridge-demo-"))
    scenario = Scenario(
        poi_id=POI_ID,
        default=Behaviour(decision="approve", delay=0.8),
        transactions=[
            Behaviour(amount=7.20, decision="decline", delay=0.8),
            Behaviour(amount=33.00, decision="approve", delay=0.8, never_answer=True,
                      in_progress_polls=1),
        ],
    )
    simulator = SimulatorServer(scenario, "stx-etx-lrc")
    device = await simulator.start_pty(workdir / "terminal")
    _say(f"2. simulated terminal {POI_ID} on pseudo-terminal {device} "
         f"-> {simulator.device} (STX/ETX/LRC framing)")
    config = parse_config({
        "journal": str(workdir / "journal.sqlite3"),
        "mqtt": {"host": "127.0.0.1", "port": port, "client_id": "poi-bridge-demo"},
        "terminals": [{
            "poi_id": POI_ID,
            "link": {"kind": "serial", "device": device, "baudrate": 115200},
            "payment_timeout": 3.0, "status_timeout": 3.0, "poll_floor": 0.3,
        }],
    })
    bridge = Bridge(config)
    await bridge.start()
    # (stopped on every way out: its tasks cancelled without a stop are an unexpected end)
    try:
        _say(f"3. bridge running: journal {config.journal}, payment timeout 3 s for the demo "
             "(120 s in production)")

        def show(event: dict[str, Any]) -> None:
            poll = f" #{event['poll']}" if "poll" in event else ""
            detail = f": {event['detail']}" if event.get("detail") else ""
            _say(f"     . {event['event']}{poll}{detail}")

        outcome_ok = True
        async with RegisterClient("127.0.0.1", port, SALE_ID, on_event=show) as register:
            # Wait for the terminal's link and for the bridge's subscription: a request published
            # before the bridge has ever subscribed has no subscriber to go to (on a loaded box the
            # MQTT connection can come up after the terminal's link).
            for _ in range(600):
                if bridge.workers[POI_ID].online and bridge.gateway.connected:
                    break
                await asyncio.sleep(0.05)
            else:
                _say("   the bridge did not come up within 30 s (terminal link or MQTT connection)")
                return 1
            _say(f"4. register {SALE_ID} makes three payments over MQTT")
            for n, (amount, story) in enumerate(PAYMENTS, 1):
                _say(f"\n   payment {n}: EUR {amount:.2f} ({story})")
                service_id = f"DEMO{n}{int(time.time()) % 100000}"
                answer = await register.pay(POI_ID, amount, service_id=service_id, timeout=60)
                info = answer["bridge"]
                body = (answer.get("SaleToPOIResponse") or {}).get("PaymentResponse", {})
                result = body.get("Response", {})
                authorised = body.get("PaymentResult", {}).get("AmountsResp", {}).get(
                    "AuthorizedAmount")
                _say(f"   => outcome {info['outcome'].upper()} (source: {info['source']}), "
                     f"Result {result.get('Result')}"
                     + (f" / {result['ErrorCondition']}" if result.get("ErrorCondition") else "")
                     + (f", authorised {authorised}" if authorised else ""))
                expected = ("approved", "declined", "approved")[n - 1]
                outcome_ok &= info["outcome"] == expected
            health = await register.command("health")
            _say(f"\n5. bridge health: {health['data']['journal']}, terminals "
                 f"{health['data']['terminals']}")
    finally:
        await bridge.stop()
    await simulator.close()
    with contextlib.suppress(Exception):
        await broker.shutdown()
    _say(f"\ndone in {time.monotonic() - started:.1f} s: "
         + ("every payment reached the register with the right outcome."
            if outcome_ok else "UNEXPECTED OUTCOME: see above."))
    return 0 if outcome_ok else 1


def _broker_missing() -> str | None:
    """Why the embedded broker cannot run, if it cannot: amqtt comes with the [demo] extra,
    which a store box's installation (`pip install /path/to/poi-bridge`) leaves out."""
    try:
        import amqtt.broker  # noqa: F401
    except ImportError as exc:
        return (f"poi-bridge demo: the embedded MQTT broker it runs (amqtt) is not installed "
                f"({exc}): it comes with the [demo] extra: {sys.executable} -m pip install "
                f"'/path/to/poi-bridge[demo]' (a checkout or a built wheel; in a checkout, "
                f"`make demo` installs it into .venv)")
    return None


def run(args: argparse.Namespace) -> int:
    missing = _broker_missing()
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    return asyncio.run(demo(args.verbose))

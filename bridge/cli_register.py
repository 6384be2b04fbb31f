"""`poi-bridge register`: be a register by hand (send a payment, resync, list)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import aiomqtt

from bridge.register_client import RegisterClient, cli_client_id


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "register", help="act as a register: pay, resync, list transactions",
        description="A register client over MQTT, for trying the bridge by hand.")
    p.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT")
    p.add_argument("--base-topic", default="poi-bridge")
    p.add_argument("--sale-id", default="MANUAL-1", help="this register's SaleID")
    p.add_argument("--json", action="store_true", help="print raw JSON answers")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    pay = sub.add_parser("pay", help="send a PaymentRequest and wait for the outcome")
    pay.add_argument("--terminal", required=True, metavar="POIID")
    pay.add_argument("--amount", required=True, type=float)
    pay.add_argument("--currency", default="EUR")
    pay.add_argument("--service-id", help="default: a fresh one")
    pay.add_argument("--timeout", type=float, default=300.0)
    resync = sub.add_parser("resync", help="ask the bridge to poll the terminal again")
    resync.add_argument("--service-id", required=True)
    listing = sub.add_parser("transactions", help="list transactions the bridge knows")
    listing.add_argument("--state", choices=["accepted", "awaiting_response", "polling",
                                             "unresolved", "final"])
    sub.add_parser("terminals", help="list terminals and their state")
    p.set_defaults(handler=run)


def _event(event: dict[str, Any]) -> None:
    poll = f" #{event['poll']}" if "poll" in event else ""
    print(f"  . {event['event']}{poll} {event.get('detail', '')}".rstrip(), file=sys.stderr)


async def _run(args: argparse.Namespace) -> int:
    host, _, port = args.broker.rpartition(":")
    # Its own client id, not the till's `register-<SaleID>`: acting as TILL1 by hand must not
    # take TILL1 off the broker nor throw away the results queued in its session.
    async with RegisterClient(host or "127.0.0.1", int(port), args.sale_id,
                              base_topic=args.base_topic, on_event=_event,
                              persistent=False, client_id=cli_client_id()) as register:
        # A request on a base topic no bridge listens to would wait for the whole timeout and
        # then say nothing useful: ask the bridge's retained state first.
        state = await register.wait_for_bridge()
        if state is None:
            print(f"poi-bridge register: no bridge has announced itself on "
                  f"{register.topics.bridge_state}: check --base-topic (the bridge's "
                  f"mqtt.base_topic) and that the bridge has been started", file=sys.stderr)
            return 2
        if state != "online":
            print(f"poi-bridge register: the bridge is {state}; the request waits in the broker "
                  f"until it is back", file=sys.stderr)
        if args.action == "pay":
            answer = await register.pay(args.terminal, args.amount, args.currency,
                                        service_id=args.service_id, timeout=args.timeout)
            info = answer["bridge"]
            if args.json:
                print(json.dumps(answer, indent=1))
            else:
                ids = info["transaction"]
                print(f"{ids['sale_id']}/{ids['service_id']} on {ids['poi_id']}: "
                      f"{info['outcome']} (source {info['source']})"
                      + (f": {info['error']}" if info.get("error") else ""))
            return 0 if info["outcome"] == "approved" else 1
        if args.action == "resync":
            answer = await register.command("resync", {"sale_id": args.sale_id,
                                                       "service_id": args.service_id})
        elif args.action == "transactions":
            answer = await register.command("transactions", {"state": args.state} if args.state
                                            else {})
        else:
            answer = await register.command("terminals")
        print(json.dumps(answer if args.json else answer.get("data") or answer, indent=1))
        return 0 if answer.get("status") == "ok" else 1


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except aiomqtt.MqttError as exc:
        print(f"poi-bridge register: cannot reach the broker {args.broker}: {exc}",
              file=sys.stderr)
        return 2
    except TimeoutError:
        print("poi-bridge register: no answer in time (is the bridge running?)", file=sys.stderr)
        return 2

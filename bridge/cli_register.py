"""`poi-bridge register`: be a register by hand (send a payment, resync, list)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiomqtt
from pydantic import ValidationError

from bridge.config import ConfigError, MqttConfig, load_config
from bridge.register_client import (
    ConnectionSetupError,
    RegisterClient,
    cli_client_id,
    connection_problem,
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "register", help="act as a register: pay, resync, list transactions",
        description="A register client over MQTT, for trying the bridge by hand.")
    p.add_argument("--config", metavar="FILE",
                   help="the bridge's configuration: its broker, base topic, user name, "
                        "password file and TLS (the options below override them)")
    p.add_argument("--broker", metavar="HOST:PORT", help="default 127.0.0.1:1883")
    p.add_argument("--base-topic", help="default poi-bridge")
    p.add_argument("--username")
    p.add_argument("--password-file", type=Path, metavar="FILE",
                   help="file holding the password (its first line)")
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS, the broker checked against the system's CAs")
    p.add_argument("--ca-file", type=Path, metavar="FILE",
                   help="connect with TLS, the broker checked against this CA")
    p.add_argument("--cert-file", type=Path, metavar="FILE", help="TLS client certificate")
    p.add_argument("--key-file", type=Path, metavar="FILE", help="its private key")
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


def _mqtt(args: argparse.Namespace) -> MqttConfig:
    """The broker and how to log in: the bridge's configuration if given, then the options."""
    settings: dict[str, Any] = {"host": "127.0.0.1"}
    if args.config is not None:
        try:
            settings = load_config(args.config).mqtt.model_dump(exclude_unset=True)
        except ConfigError as exc:
            raise _Usage(*(f"{exc.path}: {problem}" for problem in exc.problems)) from None
    if args.broker is not None:
        host, _, port = args.broker.rpartition(":")
        settings.update(host=host or "127.0.0.1", port=port)
    given = {"base_topic": args.base_topic, "username": args.username,
             "password_file": args.password_file}
    settings.update({key: value for key, value in given.items() if value is not None})
    tls = {key: value for key, value in (("ca_file", args.ca_file), ("cert_file", args.cert_file),
                                         ("key_file", args.key_file)) if value is not None}
    if tls or args.tls:
        settings["tls"] = {**(settings.get("tls") or {}), **tls}
    try:
        return MqttConfig.model_validate(settings)
    except ValidationError as exc:
        raise _Usage(*(f"{_option(e['loc'])}: {e['msg']}" for e in exc.errors())) from None


def _option(loc: tuple[Any, ...]) -> str:
    """The option (or configuration key) a validation error is about."""
    if loc[:1] in (("host",), ("port",)):
        return "--broker"
    if loc == ("tls",):
        return "TLS options"
    return "--" + str(loc[-1]).replace("_", "-")


class _Usage(Exception):
    """Options that do not make a connection; one line per problem."""


async def _run(args: argparse.Namespace, mqtt: MqttConfig) -> int:
    # Its own client id, not the till's `register-<SaleID>`: acting as TILL1 by hand must not
    # take TILL1 off the broker nor throw away the results queued in its session.
    async with RegisterClient.for_bridge(mqtt, args.sale_id, on_event=_event, persistent=False,
                                         client_id=cli_client_id()) as register:
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
        mqtt = _mqtt(args)
    except _Usage as exc:
        for problem in exc.args:
            print(f"poi-bridge register: {problem}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, mqtt))
    except TimeoutError:  # (an OSError: before the connection errors)
        print("poi-bridge register: no answer in time (is the bridge running?)", file=sys.stderr)
        return 2
    except (ConnectionSetupError, aiomqtt.MqttError, OSError) as exc:
        print(f"poi-bridge register: {connection_problem(exc, mqtt)}", file=sys.stderr)
        return 2

"""`poi-bridge register`: be a register by hand (send a payment, resync, list).

Exit status: 0 a payment approved (or a command answered "ok"); 1 a payment's outcome that
proves nothing was taken (declined, cancelled, aborted, not_found, rejected), or a command
answered with an error; 2 nothing was asked (bad options, no broker, no bridge);
3 OUTCOME UNKNOWN: a payment was handed to the broker and its answer did not come (timeout,
lost connection, interrupted), or the answer does not say whether it was charged (the
bridge's `error`, an outcome this command does not know). It may still be charged: do not
pay again, look it up;
4 PARTIALLY APPROVED: only part of the amount was taken: charge the rest another way, or
reverse it (never pay the whole amount again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from pydantic import ValidationError

from bridge.config import ConfigError, MqttConfig, load_config_as_run_does
from bridge.daemon.registers import topic_safe
from bridge.protocol.builders import new_service_id
from bridge.protocol.messages import POIID_PATTERN, SERVICE_ID_PATTERN
from bridge.register_client import (
    ConnectionLost,
    ConnectionSetupError,
    PublishRefusedByBroker,
    RegisterClient,
    cli_client_id,
    command_line_login,
    connection_problem,
    option_names,
    partial_advice,
    refused_advice,
    unseen_refusal,
)

OUTCOME_UNKNOWN = 3  # the exit status of a payment whose outcome is not known
PARTIALLY_APPROVED = 4  # only part was taken: neither paid (0) nor nothing taken (1)
# A payment's outcomes that prove nothing was taken (exit 1). Any other word than these,
# `approved` and `partially_approved` (the bridge's `error`: "it may or may not have been
# started"; a word from a newer bridge; none) may hide a charge: OUTCOME UNKNOWN.
NOTHING_TAKEN = frozenset({"declined", "cancelled", "aborted", "not_found", "rejected"})


def _finite(text: str) -> float:
    """A command-line number, NaN for anything float() refuses (so one test rejects both)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _amount(text: str) -> float:
    """An amount as the bridge takes it: a finite number, 0 or more."""
    value = _finite(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an amount: give a finite number of 0 or more, e.g. 12.50")
    return value + 0.0  # -0.0 as 0.0


def seconds(text: str) -> float:
    """A time-out: a finite number of seconds, more than 0."""
    value = _finite(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time-out: give seconds, more than 0")
    return value


def _id_problems(args: argparse.Namespace) -> list[str]:
    """The IDs the bridge would refuse, checked before anything is sent: a payment it refuses
    under another ID (cut, or on bridge/error) would be waited for in vain, and reported
    OUTCOME UNKNOWN; a wildcard in a topic makes paho raise."""
    problems = []
    if not (topic_safe(args.sale_id) and len(args.sale_id) <= 64):
        problems.append(f"--sale-id {args.sale_id[:40]!r}: 1 to 64 printable characters, "
                        "without / + #")
    if args.action == "pay":
        if not (topic_safe(args.terminal) and POIID_PATTERN.match(args.terminal)):
            problems.append(f"--terminal {args.terminal[:40]!r}: a POIID, [model]-[serial], "
                            "e.g. V400m-324688179")
        if args.service_id is not None and not SERVICE_ID_PATTERN.match(args.service_id):
            problems.append(f"--service-id {args.service_id[:40]!r}: 1 to 10 letters or digits")
        if args.transaction_id is not None and not args.transaction_id.strip():
            problems.append("--transaction-id: give the sale's order number (the bridge "
                            "refuses an empty one)")
    return problems


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "register", help="act as a register: pay, resync, list transactions",
        description="A register client over MQTT, for trying the bridge by hand.")
    p.add_argument("--config", metavar="FILE",
                   help="the bridge's configuration: its broker, base topic, user name, "
                        "password file and TLS (the options below override them)")
    p.add_argument("--broker", metavar="HOST[:PORT]",
                   help="default 127.0.0.1:1883; a host alone keeps the port of --config "
                        "(1883 without it); an IPv6 address with a port as [ADDRESS]:PORT")
    p.add_argument("--base-topic", help="default poi-bridge")
    p.add_argument("--username")
    p.add_argument("--password-file", type=Path, metavar="FILE",
                   help="file holding the password: the whole file, without its trailing "
                        "line end (as the daemon reads mqtt.password_file)")
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS, the broker checked against the system's CAs")
    p.add_argument("--ca-file", type=Path, metavar="FILE",
                   help="connect with TLS, the broker checked against this CA")
    p.add_argument("--cert-file", type=Path, metavar="FILE", help="TLS client certificate")
    p.add_argument("--key-file", type=Path, metavar="FILE", help="its private key")
    p.add_argument("--sale-id", default="MANUAL-1", help="this register's SaleID")
    p.add_argument("--plain-topic", action="store_true",
                   help="publish requests on terminals/POIID/request instead of "
                        "terminals/POIID/request/SALEID (a broker ACL that allows only the "
                        "plain topic, or a bridge older than 2026-11-30)")
    p.add_argument("--json", action="store_true", help="print raw JSON answers")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    pay = sub.add_parser(
        "pay", help="send a PaymentRequest and wait for the outcome",
        description="Send a PaymentRequest and wait for its outcome. Exit status 0 approved, "
                    "1 nothing was taken (declined, cancelled, aborted, not_found, rejected), "
                    "2 not sent, 3 OUTCOME UNKNOWN: sent, but no answer came (timeout, lost "
                    "connection) or the answer does not say whether it was charged (error, "
                    "an outcome this command does not know): it may still be charged, so do "
                    "not pay again; look it up with the SaleID and ServiceID printed. 4 "
                    "PARTIALLY APPROVED: only part was taken (printed): charge the rest "
                    "another way, or reverse it.")
    pay.add_argument("--terminal", required=True, metavar="POIID")
    pay.add_argument("--amount", required=True, type=_amount,
                     help="a finite number, 0 or more (e.g. 12.50)")
    pay.add_argument("--currency", default="EUR")
    pay.add_argument("--service-id", help="default: a fresh one")
    pay.add_argument("--transaction-id", metavar="ORDER",
                     help="the sale's order number (SaleTransactionID.TransactionID), the same "
                          "for every try of one sale. Without it every call is a new order "
                          "(SALEID-SERVICEID) and the bridge cannot catch a retry of an "
                          "unfinished one")
    pay.add_argument("--timeout", type=seconds, default=300.0,
                     help="seconds to wait for the outcome (default 300)")
    resync = sub.add_parser("resync", help="ask the bridge to poll the terminal again")
    resync.add_argument("--service-id", required=True)
    listing = sub.add_parser("transactions",
                             help="list this register's (--sale-id) transactions, newest first")
    listing.add_argument("--state", choices=["accepted", "awaiting_response", "polling",
                                             "unresolved", "final"])
    sub.add_parser("terminals", help="list terminals and their state")
    p.set_defaults(handler=run)


def _event(event: dict[str, Any]) -> None:
    poll = f" #{event['poll']}" if "poll" in event else ""
    print(f"  . {event['event']}{poll} {event.get('detail', '')}".rstrip(), file=sys.stderr)


def _events_of(service_id: str) -> Callable[[dict[str, Any]], None]:
    """_event for the events of one transaction only: a live till under the same SaleID
    pays meanwhile, and its events come on the same topic."""
    def shown(event: dict[str, Any]) -> None:
        transaction = event.get("transaction")
        if isinstance(transaction, dict) and transaction.get("service_id") == service_id:
            _event(event)
    return shown


def _mqtt(args: argparse.Namespace) -> MqttConfig:
    """The broker and how to log in: the bridge's configuration if given, then the options."""
    settings: dict[str, Any] = {"host": "127.0.0.1"}
    if args.config is not None:
        try:
            config = load_config_as_run_does(
                args.config, lambda line: print(f"poi-bridge register: {line}", file=sys.stderr))
            settings = config.mqtt.model_dump(exclude_unset=True)
        except ConfigError as exc:
            raise _Usage(*(f"{exc.path}: {problem}" for problem in exc.problems)) from None
    if args.broker is not None:
        host, port = _broker(args.broker)
        settings["host"] = host
        if port is not None:
            settings["port"] = port
    if args.base_topic is not None:
        settings["base_topic"] = args.base_topic
    settings.update(command_line_login(args.username, args.password_file))
    tls = {key: value.absolute() for key, value in (  # (as command_line_login's file)
        ("ca_file", args.ca_file), ("cert_file", args.cert_file), ("key_file", args.key_file))
        if value is not None}
    if tls or args.tls:
        settings["tls"] = {**(settings.get("tls") or {}), **tls}
    try:
        return MqttConfig.model_validate(settings)
    except ValidationError as exc:
        raise _Usage(*(f"{_option(e['loc'])}: {e['msg']}" for e in exc.errors())) from None


def _broker(value: str) -> tuple[str, int | None]:
    """`--broker`: HOST, HOST:PORT, [IPv6]:PORT or a bare IPv6 address; no port: None."""
    host, port = value, None
    if value.startswith("[") and "]" in value:
        host, rest = value[1:].split("]", 1)
        if rest:
            if not rest.startswith(":"):
                raise _Usage(f"--broker: {value!r}: give HOST, HOST:PORT or [ADDRESS]:PORT")
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    if port is not None and not (port.isascii() and port.isdigit()):
        raise _Usage(f"--broker: {port!r} is not a port number (HOST or HOST:PORT, "
                     "e.g. 127.0.0.1:1883)")
    return host or "127.0.0.1", None if port is None else int(port)


def _option(loc: tuple[Any, ...]) -> str:
    """The option (or configuration key) a validation error is about."""
    if loc[:1] in (("host",), ("port",)):
        return "--broker"
    if loc == ("tls",):
        return "TLS options"
    return "--" + str(loc[-1]).replace("_", "-")


class _Usage(Exception):
    """Options that do not make a connection; one line per problem."""


@dataclass
class _Payment:
    """The payment being made: once `sent` (its publication begun), its outcome is unknown
    until its answer comes, whatever goes wrong meanwhile."""

    sale_id: str
    service_id: str
    poi_id: str
    amount: str
    sent: bool = False
    protocol: str | None = None  # the connection's MQTT version, once connected


def _published(payment: _Payment) -> None:
    print(f"payment published: SaleID {payment.sale_id} ServiceID {payment.service_id} on "
          f"terminal {payment.poi_id}, {payment.amount}", file=sys.stderr, flush=True)


# The operator's login, as the installation makes it: the example ACL lets only it use the
# bridge's status and resync commands (README, install step 4)
OPERATOR = " --username operator --password-file /etc/poi-bridge/operator-password"


def _lookup(payment: _Payment, args: argparse.Namespace, mqtt: MqttConfig) -> str:
    """The commands that find out a payment's outcome, as they run for this user: with the
    configuration it paid with, or else its own broker options. As the operator only after a
    login: a broker that took none has no ACL to satisfy, and a by-hand user no operator
    password file (the command would fail on it)."""
    operator = OPERATOR if args.username or args.password_file or mqtt.username else ""
    sale, service = shlex.quote(payment.sale_id), shlex.quote(payment.service_id)
    if args.config:
        config = shlex.quote(str(args.config))
        return (f"    poi-bridge status --config {config}{operator}   (open and unresolved "
                "transactions)\n"
                f"    poi-bridge resync {sale} {service} --config {config}{operator}   (asks "
                "the terminal, shows the outcome)\n")
    given = [(option, value) for option, value in (
        ("--broker", args.broker), ("--base-topic", args.base_topic),
        ("--ca-file", args.ca_file), ("--cert-file", args.cert_file),
        ("--key-file", args.key_file)) if value is not None]
    register = "poi-bridge register" + "".join(
        f" {option} {shlex.quote(str(value))}" for option, value in given) + (
        " --tls" if args.tls else "") + f"{operator} --sale-id {sale}"
    return (f"    {register} transactions   (this register's transactions, with their "
            "outcome)\n"
            f"    {register} resync --service-id {service}   (asks the terminal again)\n")


def _unknown_answer(outcome: Any) -> str:
    """Why an answer that came leaves the payment's outcome unknown."""
    if outcome == "error":
        return ("the bridge answered outcome `error`: it failed while handling the payment, "
                "which may or may not have been started")
    if outcome is None:
        return "the bridge answered without an outcome"
    return (f"the bridge answered outcome {json.dumps(outcome)[:40]}, which this command "
            "does not know: it does not say that nothing was taken")


def _outcome_unknown(payment: _Payment, why: str, args: argparse.Namespace,
                     mqtt: MqttConfig, *, answered: bool = False) -> int:
    """Said when a payment was handed to the broker and its answer did not come, or came
    without saying whether it was charged (`answered`). The request waits in the bridge's
    persistent session (or is running, or ran): it may still be charged."""
    print(f"poi-bridge register: OUTCOME UNKNOWN for the payment SaleID {payment.sale_id} "
          f"ServiceID {payment.service_id} on {payment.poi_id} ({payment.amount}): {why}.\n"
          + ("  The terminal may have charged it: its own result may still come under these "
             "IDs.\n" if answered else
             "  The request was handed to the broker: the bridge runs it when it gets it (a "
             "bridge that is down, when it comes back), so it may still be charged.\n") +
          "  Do NOT pay again for this sale until its outcome is known. Find it out, once the "
          "bridge runs:\n" + _lookup(payment, args, mqtt) +
          "  \"no transaction\" before the bridge has taken the queued request does not mean "
          "it was not charged: ask again once the bridge is back."
          + ("\n  The broker speaks MQTT 3.1.1 only, so it could not say whether it refused the "
             "request: only if its log shows \"Denied PUBLISH\" on the request for this login "
             "did the request go nowhere." if payment.protocol == "3.1.1" else ""),
          file=sys.stderr, flush=True)
    return OUTCOME_UNKNOWN


async def _run(args: argparse.Namespace, mqtt: MqttConfig,
               payment: _Payment | None = None) -> int:
    skipped = False

    def malformed(topic: str, problem: str) -> None:
        nonlocal skipped
        if not skipped:  # once: a flood of them must not bury the answer
            skipped = True
            print(f"poi-bridge register: skipped a malformed message on {topic} ({problem}); "
                  "any more are skipped silently", file=sys.stderr, flush=True)

    # Its own client id, not the till's `register-<SaleID>`: acting as TILL1 by hand must not
    # take TILL1 off the broker nor throw away the results queued in its session.
    on_event = _event if payment is None else _events_of(payment.service_id)
    async with RegisterClient.for_bridge(mqtt, args.sale_id, on_event=on_event, persistent=False,
                                         on_malformed=malformed, client_id=cli_client_id(),
                                         plain_topic=args.plain_topic) as register:
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
            assert payment is not None
            payment.protocol = register.protocol

            def sending() -> None:
                # From here on, whatever fails, the broker may have the request: its outcome
                # is unknown, not "failed" (a failed publish may have reached the broker too).
                payment.sent = True

            try:
                answer = await register.pay(args.terminal, args.amount, args.currency,
                                            service_id=payment.service_id,
                                            transaction_id=args.transaction_id,
                                            timeout=args.timeout, on_sending=sending,
                                            on_published=lambda: _published(payment))
            except PublishRefusedByBroker as exc:
                payment.sent = False  # refused by the broker (MQTT 5): it went nowhere
                print(f"poi-bridge register: {exc}: nothing was sent to the terminal, nothing "
                      f"was charged (SaleID {payment.sale_id} ServiceID {payment.service_id}); "
                      f"{refused_advice(register.topics.base, payment.sale_id)}",
                      file=sys.stderr)
                return 2
            payment.sent = False  # its outcome is known: nothing after this makes it unknown
            # (the client took it for ours by bridge.transaction.service_id: both are objects;
            # any other field may be missing, said so, never a traceback after a payment)
            info = answer["bridge"]
            outcome = info.get("outcome")
            if args.json:
                print(json.dumps(answer, indent=1))
            else:
                ids = info["transaction"]
                print(f"{ids.get('sale_id', payment.sale_id)}/"
                      f"{ids.get('service_id', payment.service_id)} on "
                      f"{ids.get('poi_id', payment.poi_id)}: "
                      f"{outcome if outcome is not None else 'no outcome'} "
                      f"(source {info.get('source') or 'not given'})"
                      + (f": {info['error']}" if info.get("error") else "")
                      + (f": {partial_advice(info)}" if outcome == "partially_approved"
                         else ""))
            if outcome == "approved":
                return 0
            if outcome == "partially_approved":
                return PARTIALLY_APPROVED
            if isinstance(outcome, str) and outcome in NOTHING_TAKEN:
                return 1
            return _outcome_unknown(payment, _unknown_answer(outcome), args, mqtt,
                                    answered=True)
        try:
            if args.action == "resync":
                answer = await register.command("resync", {"sale_id": args.sale_id,
                                                           "service_id": args.service_id})
            elif args.action == "transactions":  # this register's, as resync asks for its own
                answer = await register.command("transactions", {"sale_id": args.sale_id} | (
                    {"state": args.state} if args.state else {}))
            else:
                answer = await register.command("terminals")
        except PublishRefusedByBroker as exc:
            print(f"poi-bridge register: {exc}; {refused_advice(register.topics.base)}",
                  file=sys.stderr)
            return 2
        except TimeoutError:
            print("poi-bridge register: no answer in time (is the bridge running?)"
                  + unseen_refusal(register.protocol), file=sys.stderr)
            return 2
        # (an empty list is data too: `[]`, not the answer around it)
        print(json.dumps(answer if args.json else answer.get("data", answer), indent=1))
        return 0 if answer.get("status") == "ok" else 1


def run(args: argparse.Namespace) -> int:
    try:
        mqtt = _mqtt(args)
        problems = _id_problems(args)
        if problems:
            raise _Usage(*problems)
    except _Usage as exc:
        for problem in exc.args:
            print(f"poi-bridge register: {problem}", file=sys.stderr)
        return 2
    payment = None
    if args.action == "pay":
        payment = _Payment(args.sale_id, args.service_id or new_service_id(), args.terminal,
                           f"{args.currency} {json.dumps(args.amount)}")  # as the request says
    try:
        return asyncio.run(_run(args, mqtt, payment))
    except TimeoutError:  # (an OSError: before the connection errors)
        if payment is not None and payment.sent:
            return _outcome_unknown(payment, f"no answer within {args.timeout:g} s", args, mqtt)
        print("poi-bridge register: no answer in time (is the bridge running?)", file=sys.stderr)
        return 2
    except (ConnectionSetupError, aiomqtt.MqttError, OSError) as exc:
        if payment is not None and payment.sent:
            why = str(exc) if isinstance(exc, ConnectionLost) else (
                f"the connection to the broker was lost or failed "
                f"({str(exc) or type(exc).__name__})")
            return _outcome_unknown(payment, why, args, mqtt)
        if isinstance(exc, BrokenPipeError):
            raise  # standard output closed (`| head`): bridge.cli ends quietly
        print(f"poi-bridge register: {connection_problem(exc, mqtt, option_names(mqtt, args))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if payment is not None and payment.sent:
            return _outcome_unknown(payment, "interrupted before the answer came", args, mqtt)
        print("poi-bridge register: interrupted", file=sys.stderr)
        return 130

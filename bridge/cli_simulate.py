"""`poi-bridge simulate`: a simulated terminal on a pseudo-terminal or a TCP port."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from bridge.addresses import host_port
from bridge.config import SecretError, read_secret
from bridge.logging_setup import setup_logging
from bridge.protocol import crypto
from bridge.protocol.framing import FRAMERS
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, Decision, LinkBehaviour, Scenario


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate", help="play a payment terminal on a pseudo-terminal or TCP port",
        description="A simulated terminal (POI) for tests, demos and benchmarks. Flags set the "
                    "default behaviour; --scenario FILE (TOML or JSON) scripts it per "
                    "transaction.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--pty", action="store_true", help="serve a new pseudo-terminal "
                                                          "(default); prints its path")
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen on a TCP port instead")
    p.add_argument("--link", type=Path, help="with --pty: keep a symlink here pointing at the "
                                             "current pseudo-terminal (gone while unplugged, "
                                             "back after the replug)")
    p.add_argument("--framer", default="stx-etx-lrc", choices=sorted(FRAMERS))
    p.add_argument("--poi-id", default=None, help="the terminal's POIID")
    p.add_argument("--scenario", type=Path, metavar="FILE", help="scenario file (TOML or JSON)")
    p.add_argument("--decision", choices=list(get_args(Decision)),
                   help="partial: Result Partial, half the amount authorised (or --authorised)")
    p.add_argument("--authorised", type=float,
                   help="with --decision partial: the amount authorised")
    p.add_argument("--delay", type=float, help="processing time per transaction, seconds")
    p.add_argument("--never-answer", action="store_true",
                   help="decide but never send the response (status polls still know it)")
    p.add_argument("--lose-request", action="store_true", help="ignore requests (NotFound)")
    p.add_argument("--in-progress-polls", type=int, help="answer InProgress to N polls first")
    p.add_argument("--response-file", type=Path, help="answer with this document, IDs rewritten")
    p.add_argument("--baud", type=int, help="pace written bytes at this baud rate (8N1)")
    p.add_argument("--garbage-rate", type=float, help="chance of junk bytes before a frame")
    p.add_argument("--corrupt-rate", type=float,
                   help="chance a received chunk is damaged (the framer NAKs it)")
    p.add_argument("--seed", type=int, help="random seed for the misbehaviour")
    p.add_argument("--ledger", type=Path, help="write the ledger (JSON) here on exit")
    p.add_argument("--key-id", help="encrypt like a terminal with this key identifier")
    p.add_argument("--key-version", type=int, default=1)
    p.add_argument("--passphrase-file", type=Path,
                   help="file holding the key's passphrase: the whole file, without its "
                        "trailing line end")
    p.set_defaults(handler=run)


class _Usage(Exception):
    """What keeps the simulator from starting, in one line."""


def _problems(exc: ValidationError) -> str:
    """Every problem of a validation error with its place: `default.delay: Input should...`."""
    return "; ".join(f"{'.'.join(str(part) for part in e['loc']) or '(top)'}: {e['msg']}"
                     for e in exc.errors())


def _load_scenario(path: Path) -> Scenario:
    try:
        return Scenario.load(path)
    except OSError as exc:
        raise _Usage(f"--scenario {path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise _Usage(f"--scenario {path}: not UTF-8 text: {exc}") from None
    except ValidationError as exc:
        raise _Usage(f"bad scenario {path}: {_problems(exc)}") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise _Usage(f"bad scenario {path}: not valid {kind}: {exc}") from None


def build_scenario(args: argparse.Namespace) -> Scenario:
    try:
        return _build_scenario(args)
    except ValidationError as exc:  # a flag's value (the scenario file was checked on load)
        raise _Usage("; ".join(f"--{str(e['loc'][-1]).replace('_', '-')}: {e['msg']}"
                               if e["loc"] else e["msg"] for e in exc.errors())) from None


def _tcp(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise _Usage(f"--tcp: {port!r} is not a port number (HOST:PORT, e.g. 127.0.0.1:8443)")
    return host.strip("[]") or "127.0.0.1", int(port)


def _build_scenario(args: argparse.Namespace) -> Scenario:
    base = _load_scenario(args.scenario) if args.scenario else Scenario()
    default = base.default.model_dump(exclude_unset=False)
    for flag, field in (("decision", "decision"), ("delay", "delay"),
                        ("authorised", "authorised"),
                        ("in_progress_polls", "in_progress_polls"),
                        ("response_file", "response_file")):
        if getattr(args, flag) is not None:
            default[field] = getattr(args, flag)
    if args.never_answer:
        default["never_answer"] = True
    if args.lose_request:
        default["lose_request"] = True
    link = base.link.model_dump()
    for flag in ("baud", "garbage_rate", "corrupt_rate", "seed"):
        if getattr(args, flag) is not None:
            link[flag] = getattr(args, flag)
    return Scenario(poi_id=args.poi_id or base.poi_id, default=Behaviour(**default),
                    transactions=base.transactions, link=LinkBehaviour(**link))


def _check_files(args: argparse.Namespace, scenario: Scenario) -> None:
    """The files the simulator uses later, checked now: a --response-file that cannot be read
    failed every request, a --ledger that cannot be written ended it with a traceback, the
    ledger lost."""
    named = [("--response-file" if args.response_file else "default.response_file",
              scenario.default.response_file)]
    named += [(f"transactions.{number}.response_file", entry.response_file)
              for number, entry in enumerate(scenario.transactions)]
    for where, path in named:
        if path is None:
            continue
        try:
            document = json.loads(Path(path).read_text())
        except OSError as exc:
            raise _Usage(f"{where} {path}: cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError
            raise _Usage(f"{where} {path}: not a JSON document: {exc}") from None
        if not isinstance(document, dict):
            raise _Usage(f"{where} {path}: not a response document: it must be a JSON "
                         "object, {\"SaleToPOIResponse\": ...}")
    if args.ledger:
        directory = args.ledger.parent
        problem = (f"directory {directory} does not exist" if not directory.is_dir() else
                   f"{args.ledger} is a directory" if args.ledger.is_dir() else
                   f"directory {directory} is not writable" if not os.access(
                       directory, os.W_OK | os.X_OK) else None)
        if problem:
            raise _Usage(f"--ledger {args.ledger}: cannot write there: {problem}")


def _key(args: argparse.Namespace) -> crypto.NexoKey | None:
    if not args.key_id:
        return None
    try:
        passphrase = read_secret(args.passphrase_file, "the passphrase file")
        return crypto.NexoKey(args.key_id, args.key_version, passphrase or "")
    except SecretError as exc:
        raise _Usage(str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise _Usage(f"unusable key: {exc}") from None


async def _serve(args: argparse.Namespace, scenario: Scenario,
                 key: crypto.NexoKey | None) -> None:
    server = SimulatorServer(scenario, args.framer, key=key)
    if args.tcp:
        host, port = _tcp(args.tcp)
        try:
            bound = await server.start_tcp(host, port)
        except OSError as exc:
            await server.close()
            raise _Usage(f"--tcp: cannot listen on {host_port(host, port)}: "
                         f"{exc.strerror or exc}") from None
        print(f"simulated terminal {scenario.poi_id} listening on {host_port(host, bound)}",
              flush=True)
    else:
        try:
            path = await server.start_pty(args.link)
        except OSError as exc:
            # (not server.close(): it would remove whatever is at --link, never replaced)
            where = f"--link {args.link}: cannot make the link" if args.link else (
                "cannot open a pseudo-terminal")
            raise _Usage(f"{where}: {exc.strerror or exc}") from None
        print(path, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    if args.ledger:
        args.ledger.write_text(json.dumps(server.terminal.summary(), indent=1))


def run(args: argparse.Namespace) -> int:
    setup_logging("info")
    if args.key_id and not args.passphrase_file:
        print("poi-bridge simulate: --key-id needs --passphrase-file", file=sys.stderr)
        return 2
    try:
        if args.tcp:
            _tcp(args.tcp)  # before anything starts
        scenario = build_scenario(args)
        _check_files(args, scenario)
        key = _key(args)
        asyncio.run(_serve(args, scenario, key))
    except _Usage as exc:
        print(f"poi-bridge simulate: {exc}", file=sys.stderr)
        return 2
    return 0

"""`poi-bridge simulate`: a simulated terminal on a pseudo-terminal or a TCP port."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bridge.logging_setup import setup_logging
from bridge.protocol import crypto
from bridge.protocol.framing import FRAMERS
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario


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
    p.add_argument("--scenario", type=Path, help="scenario file (TOML or JSON)")
    p.add_argument("--decision", choices=["approve", "decline", "cancel", "busy"])
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
    p.add_argument("--passphrase-file", type=Path, help="the key's passphrase")
    p.set_defaults(handler=run)


def build_scenario(args: argparse.Namespace) -> Scenario:
    base = Scenario.load(args.scenario) if args.scenario else Scenario()
    default = base.default.model_dump(exclude_unset=False)
    for flag, field in (("decision", "decision"), ("delay", "delay"),
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


async def _serve(args: argparse.Namespace, scenario: Scenario) -> None:
    key = None
    if args.key_id:
        passphrase = args.passphrase_file.read_text().rstrip("\r\n")
        key = crypto.NexoKey(args.key_id, args.key_version, passphrase)
    server = SimulatorServer(scenario, args.framer, key=key)
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        bound = await server.start_tcp(host or "127.0.0.1", int(port))
        print(f"simulated terminal {scenario.poi_id} listening on {host or '127.0.0.1'}:{bound}",
              flush=True)
    else:
        path = await server.start_pty(args.link)
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
        scenario = build_scenario(args)
    except (OSError, ValueError, ValidationError) as exc:
        print(f"poi-bridge simulate: bad scenario: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    asyncio.run(_serve(args, scenario))
    return 0

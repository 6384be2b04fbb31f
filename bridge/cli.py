"""`poi-bridge` command line: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from bridge import __version__

# Each module exposes add_parser(subparsers) and sets `handler` on its parsers.
COMMAND_MODULES = (
    "bridge.cli_daemon",     # run, check-config
    "bridge.cli_simulate",   # simulate
    "bridge.cli_register",   # register
    "bridge.cli_inspect",    # inspect
    "bridge.cli_status",     # status, resync
    "bridge.cli_udev",       # udev-rules, devices
    "bridge.demo",           # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poi-bridge",
        description="Bridge payment terminals (serial, USB, TCP) to registers over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"poi-bridge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C in a technician's command: one line, the shell's status for it. (`run` stops
        # on SIGTERM/SIGINT by its own handlers; `register pay` says what an interrupted
        # payment means itself.)
        print(f"poi-bridge {args.command}: interrupted", file=sys.stderr)
        return 130

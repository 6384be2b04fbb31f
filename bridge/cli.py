"""`poi-bridge` command line: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
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
        status = int(handler(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except KeyboardInterrupt:
        # Ctrl-C in a technician's command: one line, the shell's status for it. (`run` stops
        # on SIGTERM/SIGINT by its own handlers; `register pay` says what an interrupted
        # payment means itself.)
        print(f"poi-bridge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return stdout_closed()


# 128 + SIGPIPE: what a command killed by the closed pipe reports, as `ls | head` does. Not
# 0: the output was cut short, and a script under `set -o pipefail` must not take it whole.
STDOUT_CLOSED = 141


def stdout_closed() -> int:
    """Standard output was closed before everything was printed (`devices --all | head`):
    the reader has what it wanted. Exit quietly, without a traceback; what is still in the
    buffer goes to /dev/null, so that its flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return STDOUT_CLOSED

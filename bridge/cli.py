"""`poi-bridge` command line: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import sys

from bridge import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poi-bridge",
        description="Bridge payment terminals (serial, USB, TCP) to registers over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"poi-bridge {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return int(handler(args) or 0)

"""`poi-bridge run` (the daemon) and `poi-bridge check-config`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import sqlite3
import sys
from collections.abc import Callable
from typing import Any

from bridge.addresses import host_port
from bridge.config import (
    Config,
    ConfigError,
    SecretError,
    load_config,
    read_configured_secret,
)
from bridge.daemon.journal_files import JournalError, unusable
from bridge.deployment import deployment_problems
from bridge.logging_setup import print_problem, setup_logging


def add_parser(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run the bridge daemon",
                                description="Run the bridge: terminals <-> MQTT.")
    run.add_argument("--config", required=True, help="TOML configuration file")
    run.set_defaults(handler=run_daemon)
    check = subparsers.add_parser("check-config", help="validate a configuration file",
                                  description="Print every problem in FILE with its place.")
    check.add_argument("file", help="TOML configuration file")
    check.set_defaults(handler=check_config)


def _print(line: str) -> None:
    print(line, file=sys.stderr)


def _load_or_report(path: str, report: Callable[[str], None] = _print, *,
                    raised: list[str] | None = None) -> Config | None:
    """The configuration, or None after reporting every problem with its place (`raised`:
    see load_config)."""
    try:
        return load_config(path, raised=raised)
    except ConfigError as exc:
        for problem in exc.problems:
            report(f"{exc.path}: {problem}")
        return None


def check_config(args: argparse.Namespace) -> int:
    """Every problem in the file, then what only this box can tell (secrets, the journal's
    place, devices shared): exit 2 on an error, 0 with warnings about what this user cannot
    check for the daemon's user."""
    config = _load_or_report(args.file)
    if config is None:
        return 2
    errors, warnings = deployment_problems(config)
    for problem in errors:
        print(f"{args.file}: {problem}", file=sys.stderr)
    for problem in warnings:
        print(f"{args.file}: warning: {problem}", file=sys.stderr)
    if errors:
        return 2
    print(f"{args.file}: OK: {len(config.terminals)} terminal(s), broker "
          f"{host_port(config.mqtt.host, config.mqtt.port)}, "
          f"base topic {config.mqtt.base_topic}, journal {config.journal}")
    for terminal in config.terminals:
        link = terminal.link
        where = getattr(link, "device", None) or (
            host_port(link.host, link.port) if link.kind == "tcp"
            else f"{link.vendor_id:04x}:{link.product_id:04x}")
        print(f"  {terminal.poi_id}: {link.kind} {where}, framer {terminal.framer.name}, "
              f"payment timeout {terminal.payment_timeout:g} s"
              + (f", key {terminal.key.identifier} v{terminal.key.version}" if terminal.key else "")
              + (f" (and previous_key {terminal.previous_key.identifier} "
                 f"v{terminal.previous_key.version})" if terminal.previous_key else ""))
    return 0


def open_files_needed(config: Config) -> int:
    """File descriptors the daemon may hold: the journal (3 files, and the checkpoint
    thread's own), the broker, the udev monitor, a few per terminal, and room to spare."""
    return 64 + 8 * len(config.terminals)


def _raise_open_file_limit(config: Config, log: logging.Logger) -> None:
    """Run out of file descriptors, the daemon said READY and could do nothing: its broker
    connection, serial ports and journal checkpoints each failed with 'Too many open files',
    retried for ever. The soft limit is raised to the hard one; if that is still too low,
    the log says so at start, naming the unit setting."""
    needed = open_files_needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.error("only %d open files allowed (ulimit -n); the bridge needs about %d for %d "
                  "terminal(s): raise LimitNOFILE= in the unit (systemctl edit poi-bridge), "
                  "or it will fail with 'Too many open files'", soft, needed,
                  len(config.terminals))


def run_daemon(args: argparse.Namespace) -> int:
    # The journal holds what terminals answer (card data, receipts): whatever the daemon
    # creates is its user's alone, as the unit's UMask=0077 makes it, when run by hand too.
    os.umask(0o077)
    # A value below a floor added since an earlier bridge ran it is taken at the floor: an
    # upgrade must not leave the tills without a bridge over what check-config now refuses
    raised: list[str] = []
    config = _load_or_report(args.config, print_problem, raised=raised)
    if config is None:
        return 2
    setup_logging(config.log_level)
    from bridge.daemon.app import JOURNAL_EXIT_STATUS, run_bridge

    # What check-config would say about this box, in the log a technician reads: the
    # daemon starts anyway (it answers what it cannot do), but says what is wrong.
    log = logging.getLogger("poi_bridge")
    _raise_open_file_limit(config, log)
    errors, warnings = deployment_problems(config, for_daemon=True)
    for problem in raised:
        log.warning("configuration %s: %s", args.config, problem)
    for problem in errors:
        log.error("configuration %s: %s", args.config, problem)
    for problem in warnings:
        log.warning("configuration %s: %s", args.config, problem)

    try:
        password = read_configured_secret(config.mqtt.password_file, "the MQTT password file")
    except SecretError as exc:
        log.critical("%s: the daemon cannot start without it", exc)
        return 1
    try:
        asyncio.run(run_bridge(config, mqtt_password=password))
    except SystemExit as exc:  # a reason to stop at start (a key's passphrase unreadable)
        if not isinstance(exc.code, str):
            raise
        log.critical("%s", exc.code)  # logged, so that journald files it as an error
        return 1
    except JournalError as exc:
        logging.getLogger("poi_bridge").critical("%s", exc)
        return JOURNAL_EXIT_STATUS
    except sqlite3.Error as exc:  # a write at start-up (open transactions taken up again)
        logging.getLogger("poi_bridge").critical("%s", unusable(config.journal, exc))
        return JOURNAL_EXIT_STATUS
    return 0

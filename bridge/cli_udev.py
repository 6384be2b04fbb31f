"""`poi-bridge udev-rules` and `poi-bridge devices`: the store-box side of terminals on USB.

    poi-bridge udev-rules --config /etc/poi-bridge/poi-bridge.toml \
        > /etc/udev/rules.d/71-poi-bridge-local.rules
    poi-bridge devices [--config FILE] [--json] [--all]

`udev-rules` prints rules for exactly the configured serial/USB terminals (exit 0; 1 if a
terminal could not be expressed as a rule, each such terminal explained on stderr; 2 if the
configuration cannot be read).  `devices` lists the serial (tty) and USB devices udev knows,
which configured terminal each one is, and why the others are ignored (exit 0; 1 if a
configured serial/USB terminal was not found; 2 on a configuration error).

Register both with `add_parser(subparsers)`; handlers follow the `handler(args) -> int`
convention of bridge.cli.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Callable, Iterable
from typing import Any

from bridge.config import Config, ConfigError, SerialLink, load_config_as_run_does

DEFAULT_CONFIG = "/etc/poi-bridge/poi-bridge.toml"


def add_parser(subparsers: Any) -> None:
    """Register `udev-rules` and `devices` on an argparse subparsers object."""
    sub = subparsers.add_parser(
        "udev-rules",
        help="print udev rules for the configured serial and USB terminals",
        description="Print udev rules (group poi-bridge, mode 0660, ModemManager off, tag "
                    "poi-bridge, /dev/poi/ links) for exactly the serial and USB terminals "
                    "in the configuration. Install the output as "
                    "/etc/udev/rules.d/71-poi-bridge-local.rules.",
    )
    sub.add_argument("--config", required=True, metavar="FILE",
                     help=f"configuration file (e.g. {DEFAULT_CONFIG})")
    sub.set_defaults(handler=cmd_udev_rules)

    sub = subparsers.add_parser(
        "devices",
        help="list serial and USB devices and which configured terminal each one is",
        description="List the serial (tty) and USB devices udev knows, which configured "
                    "terminal each one is, and why the others are ignored.",
    )
    sub.add_argument("--config", metavar="FILE",
                     help="configuration file; without it no device is a terminal")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_argument("--all", action="store_true",
                     help="also list virtual terminals and pseudo devices")
    sub.set_defaults(handler=cmd_devices)


def _config_error(command: str, exc: ConfigError) -> int:
    print(f"poi-bridge {command}: configuration error: {exc}", file=sys.stderr)
    return 2


def _load(command: str, path: str) -> Config:
    """The configuration as `run` takes it (load_config_as_run_does), its warnings on stderr."""
    return load_config_as_run_does(
        path, lambda line: print(f"poi-bridge {command}: {line}", file=sys.stderr))


def cmd_udev_rules(args: argparse.Namespace) -> int:
    from bridge.daemon.udev_rules import render_rules, rules_problems

    try:
        config = _load("udev-rules", args.config)
    except ConfigError as exc:
        return _config_error("udev-rules", exc)
    sys.stdout.write(render_rules(config))
    problems = rules_problems(config)
    for problem in problems:
        print(f"poi-bridge udev-rules: left out: {problem}", file=sys.stderr)
    return 1 if problems else 0


def pyudev_devices() -> list[Any]:
    """The tty and usb_device devices udev knows about now."""
    import pyudev

    context = pyudev.Context()
    return [*context.list_devices(subsystem="tty"),
            *context.list_devices(subsystem="usb", DEVTYPE="usb_device")]


def device_report(config: Config | None, devices: Iterable[Any], *,
                  include_virtual: bool = False) -> dict[str, Any]:
    """What `devices` prints, as data: every device with the terminal it is or why not, and
    every configured serial/USB terminal with whether it was found."""
    from bridge.daemon.device_match import DeviceInfo, TerminalMatcher, describe_link

    matcher = TerminalMatcher(config if config is not None else [])
    rows: list[dict[str, Any]] = []
    hidden = 0
    found: dict[str, str] = {}
    notes: dict[str, str] = {}
    for device in devices:
        info = DeviceInfo.from_device(device)
        result = matcher.match(info)
        if config is None:
            reason = "no configuration given (--config FILE shows which terminal it is)"
        else:
            reason = result.reason
        if not result.relevant and not include_virtual:
            hidden += 1
            continue
        if result.poi_id is not None:
            found.setdefault(result.poi_id, info.devname or info.devpath)
        rows.append({**info.to_json(), "tagged": info.tagged, "poi_id": result.poi_id,
                     "reason": reason, "usable": result.relevant})
    rows.sort(key=lambda r: (r["subsystem"], r["devname"] or r["devpath"]))
    for t in matcher.hotplug_terminals:
        if t.poi_id not in found and isinstance(t.link, SerialLink):
            # A pseudo-terminal or a node udev does not manage is never among udev's devices:
            # present when the node is there (the daemon opens it and retries it itself).
            node = _unmanaged_node(t.link.device)
            if node is not None:
                found[t.poi_id], notes[t.poi_id] = node
    terminals = [
        {"poi_id": t.poi_id, "link": describe_link(t), "present": t.poi_id in found,
         "device": found.get(t.poi_id),
         # what kind of node "device" is, when udev does not manage it
         **({"device_note": notes[t.poi_id]} if t.poi_id in notes else {}),
         # devices that are not this terminal but whose reason names it (near misses)
         "near": [r["devname"] or r["devpath"] for r in rows
                  if r["poi_id"] is None and f"terminal {t.poi_id} " in r["reason"]]}
        for t in matcher.hotplug_terminals
    ]
    return {"devices": rows, "terminals": terminals, "hidden": hidden}


def _unmanaged_node(device: str) -> tuple[str, str] | None:
    """(the path, what it is) of `device` when it is an existing character device udev does
    not announce (a pseudo-terminal, a node outside /dev); None otherwise."""
    from bridge.daemon.hotplug import udev_announces

    if udev_announces(device):
        return None
    path = os.path.realpath(device)
    try:
        if not stat.S_ISCHR(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    kind = "pseudo-terminal" if path.startswith("/dev/pts/") else "device"
    return path, f"{kind}, not a udev device"


def _print_text(report: dict[str, Any], out: Any) -> None:
    if not report["devices"]:
        print("No serial or USB devices found.", file=out)
    for row in report["devices"]:
        details = []
        if row["vendor_id"] and row["product_id"]:
            details.append(f"USB {row['vendor_id']}:{row['product_id']}")
        if row["serial"]:
            details.append(f"serial {row['serial']}")
        if row["port"]:  # what a USB link's `port` is set to, for a terminal without serial
            details.append(f"port {row['port']}")
        links = [link for link in row["devlinks"] if not link.startswith("/dev/char/")]
        if links:
            details.append("links " + " ".join(sorted(links)))
        head = f"{row['devname'] or row['devpath']}  [{row['subsystem']}]"
        print(f"{head}  {', '.join(details)}" if details else head, file=out)
        if row["poi_id"]:
            print(f"    -> {row['reason']}", file=out)
        else:
            print(f"    ignored: {row['reason']}", file=out)
    if report["hidden"]:
        print(f"({report['hidden']} virtual terminals and pseudo devices not shown; --all "
              f"lists them)", file=out)
    if report["terminals"]:
        print("", file=out)
        print("Configured serial/USB terminals:", file=out)
        for terminal in report["terminals"]:
            if terminal["present"]:
                note = f" ({terminal['device_note']})" if "device_note" in terminal else ""
                print(f"    {terminal['poi_id']} ({terminal['link']}): on {terminal['device']}"
                      f"{note}", file=out)
            elif terminal["near"]:
                print(f"    {terminal['poi_id']} ({terminal['link']}): NOT FOUND; close: "
                      f"{', '.join(terminal['near'])} (see the reasons above)", file=out)
            else:
                print(f"    {terminal['poi_id']} ({terminal['link']}): NOT FOUND - no such "
                      f"device; check the terminal's cable and power", file=out)


def cmd_devices(args: argparse.Namespace, *,
                enumerate_devices: Callable[[], Iterable[Any]] | None = None) -> int:
    config = None
    if args.config:
        try:
            config = _load("devices", args.config)
        except ConfigError as exc:
            return _config_error("devices", exc)
    try:
        devices = list((enumerate_devices or pyudev_devices)())
    except (ImportError, OSError) as exc:
        print(f"poi-bridge devices: cannot list devices through udev: {exc}", file=sys.stderr)
        return 1
    report = device_report(config, devices, include_virtual=getattr(args, "all", False))
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_text(report, sys.stdout)
    return 0 if all(t["present"] for t in report["terminals"]) else 1

"""Which configured terminal a udev device is: `TerminalMatcher`, and `DeviceInfo`, what it
reads of a device.

Given a device's udev properties (the mapping pyudev's `Device.properties` gives: SUBSYSTEM,
DEVNAME, DEVLINKS, ID_VENDOR_ID, ID_MODEL_ID, ID_SERIAL_SHORT, DEVTYPE, TAGS, ...) the matcher
says which terminal (poi_id) the device is, or why it is none.  Serial links match by device
node or link (DEVNAME is the configured path, DEVLINKS contains it, or the configured path is
a symlink to DEVNAME); USB links by vendor id, product id and, if configured, serial number of
the usb_device (ID_SERIAL_SHORT or, where udev sets none, the kernel's `serial` attribute:
SYSFS_SERIAL) and, if configured, port (the usb_device's sysname, e.g. 1-1.4).  `poi-bridge
devices` prints its reasons; the hotplug monitor
(bridge/daemon/hotplug.py) asks it about every udev event.  No I/O but reading a symlink, and
that attribute of a pyudev usb_device.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from bridge.addresses import host_port
from bridge.config import Config, SerialLink, TerminalConfig, UsbLink
from bridge.daemon.udev_rules import (
    TAG,
    parse_poi_name,
    same_serial,
    udev_serial,
    usb_id_text,
)

WATCHED_SUBSYSTEMS = ("tty", "usb")

# The bridge's own property (udev never sets it): a usb_device's serial number as the kernel
# read it, for a device whose serial udev's usb_id does not copy into ID_SERIAL_SHORT (one
# with a comma or a character outside printable ASCII). pyusb reads it so, and the USB
# transport opens the device by it: the matcher must know it too.
SYSFS_SERIAL = "POI_BRIDGE_SYSFS_SERIAL"

# A usb_device's sysname where it is plugged into a port (root hubs are usb1, usb2, ...)
_PORT_PATH = re.compile(r"[0-9]+-[0-9]+(\.[0-9]+)*")


def _last_port(devpath: str) -> str | None:
    """The port of the USB device a DEVPATH ends in or runs through last (a tty's)."""
    return next((part for part in reversed(devpath.split("/")) if _PORT_PATH.fullmatch(part)),
                None)


# --- device description --------------------------------------------------------------------------


def device_properties(device: Any) -> dict[str, str]:
    """The udev properties of a pyudev Device (or a plain mapping of them, as recorded from
    `udevadm monitor --property`) as a plain dict of strings."""
    if isinstance(device, DeviceInfo):
        return dict(device.properties)
    if not hasattr(device, "properties"):
        # Checked after `properties`: pyudev's Device is itself a (deprecated) Mapping.
        if isinstance(device, Mapping):
            return {str(k): str(v) for k, v in device.items()}
        raise TypeError(f"not a udev device or property mapping: {device!r}")
    props: dict[str, str] = {}
    # pyudev decodes every name and value as strict UTF-8: one property in another encoding
    # (a vendor string put there by a local rule or hwdb entry) raised here, and the whole
    # event was lost. Such a property is left out; the ones the matcher reads are ASCII.
    with contextlib.suppress(UnicodeDecodeError):
        for key in device.properties:
            with contextlib.suppress(UnicodeDecodeError):
                value = device.properties.get(key)
                if value is not None:
                    props[str(key)] = str(value)
    # Fill in what libudev knows but a given source may not have put in the property list.
    action = getattr(device, "action", None)
    if action and "ACTION" not in props:
        props["ACTION"] = str(action)
    node = getattr(device, "device_node", None)
    if node:
        props["DEVNAME"] = str(node)
    if "DEVLINKS" not in props:
        links = list(getattr(device, "device_links", ()) or ())
        if links:
            props["DEVLINKS"] = " ".join(str(link) for link in links)
    if "DEVPATH" not in props:
        path = getattr(device, "device_path", None)
        if path:
            props["DEVPATH"] = str(path)
    if (props.get("DEVTYPE") == "usb_device" and not props.get("ID_SERIAL_SHORT")
            and SYSFS_SERIAL not in props):
        serial = _sysfs_serial(device)
        if serial:
            props[SYSFS_SERIAL] = serial
    return props


def _sysfs_serial(device: Any) -> str | None:
    """The `serial` attribute of a pyudev usb_device: the serial number string descriptor,
    which the kernel gives in UTF-8. None if it has none, or is gone (a 'remove' event)."""
    attributes = getattr(device, "attributes", None)
    if attributes is None:
        return None
    try:
        raw = attributes.get("serial")
    except (OSError, LookupError, ValueError):
        return None
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text.rstrip("\n") or None


def _usb_ids(props: Mapping[str, str]) -> tuple[str | None, str | None]:
    vendor = props.get("ID_VENDOR_ID") or None
    product = props.get("ID_MODEL_ID") or None
    if (vendor is None or product is None) and props.get("SUBSYSTEM") == "usb":
        # Kernel events carry PRODUCT=<vid>/<pid>/<bcdDevice> in hex without leading zeros.
        parts = props.get("PRODUCT", "").split("/")
        if len(parts) >= 2:
            try:
                vendor = vendor or usb_id_text(int(parts[0], 16))
                product = product or usb_id_text(int(parts[1], 16))
            except ValueError:
                pass
    return (vendor.lower() if vendor else None, product.lower() if product else None)


@dataclass(frozen=True)
class DeviceInfo:
    """One udev device as the bridge sees it. `properties` holds everything udev said."""

    devpath: str
    subsystem: str
    devtype: str | None
    devname: str | None
    devlinks: tuple[str, ...]
    vendor_id: str | None
    product_id: str | None
    serial: str | None
    tags: tuple[str, ...]
    action: str | None
    properties: Mapping[str, str] = field(compare=False, repr=False)

    @classmethod
    def from_device(cls, device: Any) -> DeviceInfo:
        """From a pyudev Device, a mapping of udev properties, or a DeviceInfo."""
        if isinstance(device, DeviceInfo):
            return device
        props = device_properties(device)
        devname = props.get("DEVNAME") or None
        if devname and not devname.startswith("/"):
            devname = "/dev/" + devname  # kernel events name the node relative to /dev
        vendor, product = _usb_ids(props)
        return cls(
            devpath=props.get("DEVPATH", ""),
            subsystem=props.get("SUBSYSTEM", ""),
            devtype=props.get("DEVTYPE") or None,
            devname=devname,
            devlinks=tuple(props.get("DEVLINKS", "").split()),
            vendor_id=vendor,
            product_id=product,
            serial=props.get("ID_SERIAL_SHORT") or props.get(SYSFS_SERIAL) or None,
            tags=tuple(t for t in props.get("TAGS", "").split(":") if t),
            action=props.get("ACTION") or None,
            properties=MappingProxyType(props),
        )

    @property
    def tagged(self) -> bool:
        """Tagged by udev/70-poi-bridge.rules (or the generated local rules)."""
        return TAG in self.tags

    @property
    def config_device(self) -> str | None:
        """The path to configure as a serial link's device: its /dev/poi/ name (udev's rules),
        which stays the same whichever port it is plugged into (the shortest: not a
        per-interface one), else the node."""
        links = [link for link in self.devlinks if link.startswith("/dev/poi/")]
        return min(links, key=len) if links else self.devname

    @property
    def usb_port(self) -> str | None:
        """For a USB device: the port it is plugged into as the kernel names the device (its
        sysname, the last part of DEVPATH), which a USB link's `port` is written as."""
        if self.subsystem != "usb" or self.devtype != "usb_device":
            return None
        name = self.devpath.rsplit("/", 1)[-1]
        return name if _PORT_PATH.fullmatch(name) else None

    @property
    def virtual(self) -> bool:
        return self.devpath.startswith("/devices/virtual/")

    def describe(self) -> str:
        """For technicians: the node, what it is, and its stable links."""
        what = self.devname or f"{self.subsystem} device {self.devpath}"
        details = []
        if self.vendor_id and self.product_id:
            details.append(f"USB {self.vendor_id}:{self.product_id}")
        if self.serial:
            details.append(f"serial {self.serial}")
        if self.usb_port:
            details.append(f"port {self.usb_port}")
        stable = [link for link in self.devlinks if not link.startswith("/dev/char/")]
        if stable:
            details.append("links " + ", ".join(sorted(stable)))
        return f"{what} ({'; '.join(details)})" if details else what

    def to_json(self) -> dict[str, Any]:
        return {
            "devpath": self.devpath,
            "subsystem": self.subsystem,
            "devtype": self.devtype,
            "devname": self.devname,
            "devlinks": list(self.devlinks),
            "vendor_id": self.vendor_id,
            "product_id": self.product_id,
            "serial": self.serial,
            "port": self.usb_port,
            "tags": list(self.tags),
        }


# --- matching ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchResult:
    """`poi_id` of the terminal the device is, or None; `reason` says why, for a technician.
    `relevant` is False for devices the bridge never uses (no device node, virtual consoles,
    USB interfaces, other subsystems). `near`: for no match, the terminals the device is the
    model of, with another serial number (a replacement, or a second one of that model)."""

    poi_id: str | None
    reason: str
    relevant: bool = True
    near: tuple[str, ...] = ()

    @property
    def matched(self) -> bool:
        return self.poi_id is not None


def describe_link(terminal: TerminalConfig) -> str:
    link = terminal.link
    if isinstance(link, SerialLink):
        return f"serial {link.device}"
    if isinstance(link, UsbLink):
        serial = f" serial {link.serial}" if link.serial is not None else (
            "" if link.port is not None else " (any serial)")
        port = f" port {link.port}" if link.port is not None else ""
        return f"USB {usb_id_text(link.vendor_id)}:{usb_id_text(link.product_id)}{serial}{port}"
    return f"tcp {host_port(link.host, link.port)}"


class TerminalMatcher:
    """Which configured terminal a udev device is.  Only the device's properties and the
    configuration are consulted, plus `resolve` (os.path.realpath; None turns it off) to follow
    a configured symlink that udev does not list in DEVLINKS (one made by hand, such as
    /etc/poi-bridge/terminal -> /dev/ttyS0).  The daemon and `poi-bridge devices` must agree on
    what is a terminal, hence the default rather than each caller passing it."""

    def __init__(self, config: Config | Iterable[TerminalConfig], *,
                 resolve: Callable[[str], str] | None = os.path.realpath) -> None:
        terminals = config.terminals if isinstance(config, Config) else list(config)
        self.terminals: tuple[TerminalConfig, ...] = tuple(terminals)
        self._serial = [(t.poi_id, t.link.device) for t in self.terminals
                        if isinstance(t.link, SerialLink)]
        self._usb = [(t.poi_id, t.link) for t in self.terminals if isinstance(t.link, UsbLink)]
        self._resolve = resolve

    def points_to(self, path: str) -> str | None:
        """Where the configured `path` leads now, if it is a link (what a worker opens);
        None if it is no link, or links are not followed."""
        if self._resolve is None:
            return None
        target = self._resolve(path)
        return target if target != path else None

    @property
    def hotplug_terminals(self) -> tuple[TerminalConfig, ...]:
        """The terminals that are on a local device (serial or USB), i.e. not TCP."""
        return tuple(t for t in self.terminals if isinstance(t.link, SerialLink | UsbLink))

    def match(self, device: Mapping[str, str] | DeviceInfo | Any) -> MatchResult:
        info = DeviceInfo.from_device(device)
        if info.subsystem not in WATCHED_SUBSYSTEMS:
            return MatchResult(None, f"subsystem {info.subsystem or '(none)'} is not watched "
                                     f"(terminals are tty or usb devices)", relevant=False)
        if info.subsystem == "usb" and info.devtype != "usb_device":
            return MatchResult(None, f"a USB {info.devtype or 'sub-device'}, not a USB device "
                                     f"node", relevant=False)
        if not info.devname:
            return MatchResult(None, "has no device node", relevant=False)
        if info.subsystem == "tty":
            result = self._match_tty(info)
            # A tty under /devices/virtual has no hardware parent: mostly consoles and pseudo
            # devices, noise here. But a configured one (Bluetooth /dev/rfcomm0, a Moxa Real
            # TTY /dev/ttyr00, tty0tty) is a serial port udev announces like any other.
            if info.virtual and not result.matched:
                return MatchResult(None, "virtual terminal or pseudo device, not a serial port",
                                   relevant=False)
            return result
        return self._match_usb(info)

    # serial links

    def _match_tty(self, info: DeviceInfo) -> MatchResult:
        found: list[tuple[str, str]] = []
        for poi_id, path in self._serial:
            if path == info.devname:
                found.append((poi_id, f"device node {path}"))
            elif path in info.devlinks:
                found.append((poi_id, f"udev link {path}"))
            elif self._resolve is not None:
                target = self._resolve(path)
                if target != path and target == info.devname:
                    found.append((poi_id, f"{path} points to {info.devname}"))
        if found:
            poi_id, how = found[0]
            reason = f"terminal {poi_id} (serial link, by {how})"
            if len(found) > 1:
                others = ", ".join(p for p, _ in found[1:])
                reason += f"; also configured for {others}: each device belongs to one terminal"
            return MatchResult(poi_id, reason)
        return self._tty_miss(info)

    def _tty_miss(self, info: DeviceInfo) -> MatchResult:
        for poi_id, link in self._usb:
            if (info.vendor_id, info.product_id) == (usb_id_text(link.vendor_id),
                                                     usb_id_text(link.product_id)) and (
                    link.serial is None or same_serial(link.serial, info.serial)) and (
                    # (a tty's DEVPATH runs through its USB device's, named by its port:
                    # the last such part, those before it being hubs')
                    link.port is None or link.port == _last_port(info.devpath)):
                return MatchResult(
                    None, f"serial port of USB device {info.vendor_id}:{info.product_id}, but "
                          f"terminal {poi_id} is configured with link kind = \"usb\" (its "
                          f"bulk interface), so this port is not used")
        near: list[tuple[str, str]] = []
        for poi_id, path in self._serial:
            name = parse_poi_name(path)
            if name is None or info.vendor_id not in name.vendor_ids or name.serial is None:
                continue
            if name.serial == info.serial:
                return MatchResult(
                    None, f"looks like terminal {poi_id} ({name.vendor} serial {name.serial}) "
                          f"but has no link {path}: install udev/70-poi-bridge.rules, then run "
                          f"`udevadm control --reload && udevadm trigger`")
            if info.serial and path.endswith(f"-{name.serial}"):  # (not a per-interface link)
                near.append((poi_id, f"terminal {poi_id} wants serial {name.serial} ({path}), "
                                     f"this is {info.serial}"))
        if near:
            return MatchResult(None, "; ".join(why for _, why in near),
                               near=tuple(poi_id for poi_id, _ in near))
        if not self._serial:
            return MatchResult(None, "no serial terminals configured")
        if info.tagged:
            hint = f' with device = "{info.config_device}"' if info.config_device else ""
            return MatchResult(None, "tagged as a payment terminal by udev, but no configured "
                                     f"terminal uses it: add a [[terminals]] entry{hint} if it "
                                     "should be bridged")
        return MatchResult(None, f"not a configured terminal: no serial link names "
                                 f"{info.devname} or one of its links")

    # usb links

    def _match_usb(self, info: DeviceInfo) -> MatchResult:
        if not self._usb:
            if info.tagged:
                return MatchResult(None, "tagged as a payment terminal by udev, but no terminal "
                                         "is configured with link kind = \"usb\"")
            return MatchResult(None, "no USB terminals configured")
        if info.vendor_id is None or info.product_id is None:
            return MatchResult(None, "USB device without vendor/product id in its udev "
                                     "properties")
        by_serial: list[str] = []  # or by port: this device and no other
        any_serial: list[str] = []
        near: list[str] = []
        other_serial: list[str] = []  # the model of these terminals, another serial number
        for poi_id, link in self._usb:
            vendor, product = usb_id_text(link.vendor_id), usb_id_text(link.product_id)
            if info.vendor_id != vendor:
                continue
            if info.product_id != product:
                near.append(f"terminal {poi_id} wants product {product}, this is "
                            f"{info.product_id}")
                continue
            if link.port is not None and link.port != info.usb_port:
                # (a twin at another port, or this terminal moved: it opens only at its port)
                near.append(f"terminal {poi_id} wants port {link.port}, this is at "
                            f"{info.usb_port or 'an unknown port'}")
                continue
            if link.serial is None:
                (by_serial if link.port is not None else any_serial).append(poi_id)
            elif same_serial(link.serial, info.serial):
                by_serial.append(poi_id)
            elif info.serial is None and udev_serial(link.serial) is None:
                # udev writes no ID_SERIAL_SHORT for such a serial, so its absence says nothing
                # about udev; only the kernel's `serial` attribute (SYSFS_SERIAL) tells, and
                # it was not read (a recorded event, or the device went away meanwhile).
                near.append(f"terminal {poi_id} wants serial {link.serial}, which udev does "
                            f"not put in ID_SERIAL_SHORT (it has a comma or a character "
                            f"outside printable ASCII), and this device's serial number "
                            f"could not be read from sysfs")
            elif info.serial is None:
                near.append(f"terminal {poi_id} wants serial {link.serial}, this device reports "
                            f"none (no udev data? is systemd-udevd running?)")
            else:
                near.append(f"terminal {poi_id} wants serial {link.serial}, this is "
                            f"{info.serial}")
                other_serial.append(poi_id)
        # The terminal configured with this very serial number (or port) comes first,
        # whatever the order of the configuration: one taking any must not take its device.
        found = by_serial or any_serial
        if found:
            reason = f"terminal {found[0]} (USB {info.vendor_id}:{info.product_id}"
            reason += f" serial {info.serial}" if info.serial else ""
            reason += f" port {info.usb_port})" if info.usb_port else ")"
            if len(found) > 1:
                reason += (f"; also matches {', '.join(found[1:])}: set link.serial (or "
                           f"link.port) so each terminal names its own device")
            return MatchResult(found[0], reason)
        if near:
            return MatchResult(None, "; ".join(near), near=tuple(other_serial))
        if info.tagged:
            return MatchResult(None, f"tagged as a payment terminal by udev (USB "
                                     f"{info.vendor_id}:{info.product_id}), but no configured "
                                     f"terminal has these ids")
        return MatchResult(None, f"USB {info.vendor_id}:{info.product_id} is not a configured "
                                 f"terminal")

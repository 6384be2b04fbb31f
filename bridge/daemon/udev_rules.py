"""udev rules for exactly the configured terminals (`poi-bridge udev-rules --config FILE`).

udev/70-poi-bridge.rules covers the known payment-terminal vendors by vendor id.  This module
writes the site-specific complement, meant for /etc/udev/rules.d/71-poi-bridge-local.rules:
one rule per serial or USB terminal in the configuration, with the same conventions (group
poi-bridge, mode 0660, ModemManager kept away, tag "poi-bridge"), so a terminal from a vendor
missing from the list still works and nothing else on the box is touched.

How each configured link is recognised, in udev's terms:
  serial /dev/poi/<vendor>-<serial>[-ifNN]  USB vendor id of <vendor> + ID_SERIAL_SHORT (+ the
                                            interface), and the rule creates that very link
  serial /dev/poi/<vendor>-path-<port>      vendor id + ID_PATH_TAG (the USB port)
  serial /dev/serial/by-id/..., by-path/... the link 60-serial.rules already made (SYMLINK==)
  serial /dev/ttyS0, /dev/ttyACM0           the kernel name (KERNEL==)
  usb    vendor_id/product_id[/serial]      ID_VENDOR_ID, ID_MODEL_ID, ID_SERIAL_SHORT of the
                                            usb_device; link /dev/poi/usb/<poi_id>
TCP terminals need no rule.  A link that cannot be expressed is left out and reported by
`rules_problems()` (and as a comment in the output), never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from bridge.config import Config, SerialLink, TerminalConfig, UsbLink

RULES_FILE = "/etc/udev/rules.d/71-poi-bridge-local.rules"
TAG = "poi-bridge"
GROUP = "poi-bridge"
MODE = "0660"
POI_DIR = "/dev/poi"

# Kept in step with the vendor list in udev/70-poi-bridge.rules (a test checks it): the short
# name that starts /dev/poi/<name>-<serial>, and the USB vendor ids that carry it.
KNOWN_VENDORS: dict[str, tuple[str, ...]] = {
    "ingenico": ("0b00", "079b"),
    "verifone": ("11ca",),
    "pax": ("2fb8",),
}

def _comment(text: str) -> str:
    """A comment line, whatever the configuration holds: a line break in a device name
    would otherwise end the comment and leave the rest as a rule udev cannot parse."""
    return "# " + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# Characters that need no quoting and are no glob in a udev match value.
_PLAIN = re.compile(r"^[A-Za-z0-9._:+@=#-]+\Z")
_PLAIN_PATH = re.compile(r"^[A-Za-z0-9._:+@=#/-]+\Z")
_KERNEL_NAME = re.compile(r"^tty[A-Za-z]*[0-9]+\Z")
_INTERFACE_SUFFIX = re.compile(r"^(?P<base>.+)-if(?P<num>[0-9a-f]{2})\Z")


@dataclass(frozen=True)
class PoiName:
    """/dev/poi/<vendor>-<id>[-ifNN] taken apart (the naming of 70-poi-bridge.rules)."""

    vendor: str
    vendor_ids: tuple[str, ...]
    serial: str | None = None       # ID_SERIAL_SHORT
    path_tag: str | None = None     # ID_PATH_TAG, for devices without a serial number
    kernel: str | None = None       # kernel name, the last resort of the static rules
    interface: str = "00"           # ID_USB_INTERFACE_NUM


def parse_poi_name(path: str) -> PoiName | None:
    """Undo the /dev/poi naming of udev/70-poi-bridge.rules; None if `path` is not such a name
    or its vendor is not in KNOWN_VENDORS."""
    prefix = POI_DIR + "/"
    if not path.startswith(prefix):
        return None
    name = path[len(prefix):]
    if "/" in name:
        return None
    interface = "00"
    suffix = _INTERFACE_SUFFIX.match(name)
    if suffix:
        name, interface = suffix.group("base"), suffix.group("num")
    for vendor in sorted(KNOWN_VENDORS, key=len, reverse=True):
        head = vendor + "-"
        if name.startswith(head) and len(name) > len(head):
            rest = name[len(head):]
            ids = KNOWN_VENDORS[vendor]
            if rest.startswith("path-") and len(rest) > len("path-"):
                return PoiName(vendor, ids, path_tag=rest[len("path-"):], interface=interface)
            if _KERNEL_NAME.match(rest):
                return PoiName(vendor, ids, kernel=rest, interface=interface)
            return PoiName(vendor, ids, serial=rest, interface=interface)
    return None


_SERIAL_SPACES = re.compile(r" +")
_SERIAL_REPLACED = re.compile(r"\\x|[^0-9A-Za-z#+.:=@_-]")


def udev_serial(serial: str) -> str | None:
    """A USB serial number as udev's usb_id builtin writes it in ID_SERIAL_SHORT: without
    leading and trailing spaces, each run of spaces one '_', any other character but letters,
    digits and #+-.:=@_ a '_'; None when udev sets none (a character outside printable ASCII,
    or a comma). What the device itself reports (and pyusb reads) is the serial unchanged."""
    if any(not " " <= c <= "\x7f" or c == "," for c in serial):
        return None
    spaced = _SERIAL_SPACES.sub("_", serial.strip(" "))
    return _SERIAL_REPLACED.sub(lambda m: m.group() if m.group() == "\\x" else "_", spaced)


def same_serial(configured: str, reported: str | None) -> bool:
    """Whether a configured `serial` names a device reporting `reported`: as the device says
    it, or as udev writes it (what `poi-bridge devices` shows)."""
    if reported is None:
        return False
    return configured == reported or configured == udev_serial(reported) or (
        udev_serial(configured) == reported)


def usb_id_text(value: int) -> str:
    """A USB vendor/product id as udev writes it: 4 lowercase hex digits."""
    return f"{value:04x}"


@dataclass(frozen=True)
class TerminalRule:
    poi_id: str
    summary: str          # what the configuration says, for the comment above the rule
    line: str | None      # the rule, or None when it cannot be expressed
    problem: str | None = None


def _assignments(poi_id: str) -> list[str]:
    return [
        f'GROUP="{GROUP}"',
        f'MODE="{MODE}"',
        'ENV{ID_MM_DEVICE_IGNORE}="1"',
        f'TAG+="{TAG}"',
        f'ENV{{POI_BRIDGE_POI_ID}}="{poi_id}"',
    ]


def _serial_rule(terminal: TerminalConfig, link: SerialLink) -> TerminalRule:
    poi_id, device = terminal.poi_id, link.device
    summary = f"serial link {device}"

    def problem(text: str) -> TerminalRule:
        return TerminalRule(poi_id, summary, None, f"terminal {poi_id}: device {device}: {text}")

    if not device.startswith("/dev/"):
        return problem("not under /dev; udev rules can only name device nodes and their links")
    if device.startswith(POI_DIR + "/usb/"):
        return problem('is a USB device node, not a serial port; configure the terminal with '
                       'link kind = "usb" (vendor_id, product_id, serial) instead')
    if device.startswith(POI_DIR + "/"):
        name = parse_poi_name(device)
        if name is None:
            known = ", ".join(sorted(KNOWN_VENDORS))
            return problem(f"a /dev/poi name must be <vendor>-<serial> with a vendor of "
                           f"udev/70-poi-bridge.rules ({known}) so a rule can tell which device "
                           f"it is; use that name, or the terminal's /dev/serial/by-id/ link")
        if name.serial is not None:
            ident, value = "ID_SERIAL_SHORT", name.serial
        elif name.path_tag is not None:
            ident, value = "ID_PATH_TAG", name.path_tag
        else:
            return problem(f"{name.kernel} is a kernel name, which changes between plugs; name "
                           f"the terminal by its USB serial number or port instead")
        if not _PLAIN.match(value):
            return problem(f"{value!r} contains characters a udev rule cannot match literally")
        matches = [
            'SUBSYSTEM=="tty"',
            f'ENV{{ID_VENDOR_ID}}=="{"|".join(name.vendor_ids)}"',
            f'ENV{{{ident}}}=="{value}"',
            f'ENV{{ID_USB_INTERFACE_NUM}}=="{name.interface}"',
        ]
        link_name = device[len("/dev/"):]
        line = ", ".join(matches + [f'SYMLINK+="{link_name}"'] + _assignments(poi_id))
        return TerminalRule(poi_id, summary, line)
    relative = device[len("/dev/"):]
    if "/" in relative:
        # A link made by an earlier rule (60-serial.rules: serial/by-id, serial/by-path).
        if not _PLAIN_PATH.match(relative):
            return problem("contains characters a udev rule cannot match literally")
        line = ", ".join(['SUBSYSTEM=="tty"', f'SYMLINK=="{relative}"'] + _assignments(poi_id))
        return TerminalRule(poi_id, summary, line)
    if not _PLAIN.match(relative):
        return problem("contains characters a udev rule cannot match literally")
    line = ", ".join(['SUBSYSTEM=="tty"', f'KERNEL=="{relative}"'] + _assignments(poi_id))
    return TerminalRule(poi_id, summary, line)


def _usb_rule(terminal: TerminalConfig, link: UsbLink,
              twins_serials: tuple[str, ...] = (),
              twins_ports: tuple[str, ...] = ()) -> TerminalRule:
    """`twins_serials`, `twins_ports`: the serials and ports other terminals of these ids are
    configured with; a link with neither leaves their devices alone (its rule matched them
    too: one device got both names, and the last POI_BRIDGE_POI_ID)."""
    poi_id = terminal.poi_id
    vendor, product = usb_id_text(link.vendor_id), usb_id_text(link.product_id)
    summary = (f"usb link {vendor}:{product}" + (f" serial {link.serial}" if link.serial else "")
               + (f" port {link.port}" if link.port else "")
               + ("" if link.serial or link.port else " (any serial)"))
    matches = [
        'SUBSYSTEM=="usb"',
        'ENV{DEVTYPE}=="usb_device"',
        f'ENV{{ID_VENDOR_ID}}=="{vendor}"',
        f'ENV{{ID_MODEL_ID}}=="{product}"',
    ]
    if link.serial is not None:
        serial = udev_serial(link.serial) or link.serial  # udev's spelling of it
        if not _PLAIN.match(serial):
            return TerminalRule(poi_id, summary, None,
                                f"terminal {poi_id}: usb serial {link.serial!r} contains "
                                f"characters a udev rule cannot match literally")
        matches.append(f'ENV{{ID_SERIAL_SHORT}}=="{serial}"')
    if link.port is not None:
        matches.append(f'KERNEL=="{link.port}"')  # the usb_device's name is its port path
    elif link.serial is None:
        matches += [f'ENV{{ID_SERIAL_SHORT}}!="{udev_serial(twin) or twin}"'
                    for twin in twins_serials if _PLAIN.match(udev_serial(twin) or twin)]
        matches += [f'KERNEL!="{twin}"' for twin in twins_ports]
    line = ", ".join(matches + [f'SYMLINK+="poi/usb/{poi_id}"'] + _assignments(poi_id))
    return TerminalRule(poi_id, summary, line)


def terminal_rules(config: Config | Iterable[TerminalConfig]) -> list[TerminalRule]:
    """One entry per serial or USB terminal (TCP terminals need no rule), in file order."""
    terminals = config.terminals if isinstance(config, Config) else list(config)
    out: list[TerminalRule] = []
    for terminal in terminals:
        if isinstance(terminal.link, SerialLink):
            out.append(_serial_rule(terminal, terminal.link))
        elif isinstance(terminal.link, UsbLink):
            link = terminal.link
            twins = [other.link for other in terminals
                     if other is not terminal and isinstance(other.link, UsbLink)
                     and (other.link.vendor_id, other.link.product_id)
                     == (link.vendor_id, link.product_id)]
            out.append(_usb_rule(terminal, link,
                                 tuple(twin.serial for twin in twins if twin.serial),
                                 tuple(twin.port for twin in twins if twin.port)))
    return out


def rules_problems(config: Config | Iterable[TerminalConfig]) -> list[str]:
    """Terminals `render_rules` had to leave out, one line each with what to change."""
    return [rule.problem for rule in terminal_rules(config) if rule.problem]


def render_rules(config: Config | Iterable[TerminalConfig]) -> str:
    """The rules file text for the configured serial and USB terminals."""
    rules = terminal_rules(config)
    lines = [
        "# Generated by `poi-bridge udev-rules`: one rule per configured serial/USB terminal.",
        f"# Install as {RULES_FILE}, then:",
        "#     udevadm control --reload && udevadm trigger --subsystem-match=tty "
        "--subsystem-match=usb",
        "# Regenerate after changing the terminals in the configuration.",
        "",
        'ACTION=="remove", GOTO="poi_bridge_local_end"',
        'SUBSYSTEM!="tty|usb", GOTO="poi_bridge_local_end"',
        'SUBSYSTEMS=="usb", ENV{ID_VENDOR_ID}=="", IMPORT{builtin}="usb_id"',
        'ENV{ID_PATH}=="", IMPORT{builtin}="path_id"',
        "",
    ]
    if not rules:
        lines += ["# No serial or USB terminals are configured: nothing to match.", ""]
    for rule in rules:
        lines.append(_comment(f"{rule.poi_id}: {rule.summary}"))
        if rule.line is None:
            lines.append(_comment(f"LEFT OUT: {rule.problem}"))
        else:
            lines.append(rule.line)
        lines.append("")
    lines.append('LABEL="poi_bridge_local_end"')
    return "\n".join(lines) + "\n"

"""udev rules: the static udev/70-poi-bridge.rules and the ones `poi-bridge udev-rules` writes.

systemd 252's udevadm has no `verify`, so the syntax is checked here by a checker that follows
udev-rules.c of that version (keys, attributes, operators per key, quoting, substitutions,
GOTO targets), plus `udevadm verify` where it exists.  What the rules *do* is checked by
applying them, with a small evaluator of the subset they use, to recorded udev properties of
real terminals, and feeding the result to the hotplug matcher.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bridge import cli_udev
from bridge.config import parse_config
from bridge.daemon.device_match import TerminalMatcher
from bridge.daemon.udev_rules import (
    KNOWN_VENDORS,
    parse_poi_name,
    render_rules,
    rules_problems,
    terminal_rules,
)

ROOT = Path(__file__).resolve().parents[1]
STATIC_RULES = ROOT / "udev" / "70-poi-bridge.rules"

# --- syntax checker ------------------------------------------------------------------------------

MATCH_OPS = {"==", "!="}
ASSIGN_OPS = {"=", "+=", "-=", ":="}

# key -> (attribute: "none" | "required" | "optional", match allowed, assignment operators)
KEYS: dict[str, tuple[str, bool, set[str]]] = {
    "ACTION": ("none", True, set()),
    "DEVPATH": ("none", True, set()),
    "KERNEL": ("none", True, set()),
    "SYMLINK": ("none", True, {"=", "+=", "-=", ":="}),
    "NAME": ("none", True, {"=", ":="}),
    "ENV": ("required", True, {"=", "+="}),
    "CONST": ("required", True, set()),
    "TAG": ("none", True, {"=", "+=", "-=", ":="}),
    "SUBSYSTEM": ("none", True, set()),
    "DRIVER": ("none", True, set()),
    "ATTR": ("required", True, {"="}),
    "SYSCTL": ("required", True, {"="}),
    "KERNELS": ("none", True, set()),
    "SUBSYSTEMS": ("none", True, set()),
    "DRIVERS": ("none", True, set()),
    "ATTRS": ("required", True, set()),
    "TAGS": ("none", True, set()),
    "TEST": ("optional", True, set()),
    "PROGRAM": ("none", True, set()),
    "RESULT": ("none", True, set()),
    # IMPORT{...}="x" is a match in udev (the '=' is accepted as '==').
    "IMPORT": ("required", True, {"="}),
    "OPTIONS": ("none", False, {"=", "+="}),
    "OWNER": ("none", False, {"=", ":="}),
    "GROUP": ("none", False, {"=", ":="}),
    "MODE": ("none", False, {"=", ":="}),
    "SECLABEL": ("required", False, {"=", "+=", ":="}),
    "RUN": ("optional", False, {"=", "+=", ":="}),
    "GOTO": ("none", False, {"="}),
    "LABEL": ("none", False, {"="}),
}
IMPORT_TYPES = {"program", "builtin", "file", "db", "cmdline", "parent"}
# ENV keys udev refuses to let rules set.
READ_ONLY_ENV = {"ACTION", "DEVLINKS", "DEVNAME", "DEVPATH", "DEVTYPE", "DRIVER", "IFINDEX",
                 "MAJOR", "MINOR", "SEQNUM", "SUBSYSTEM", "TAGS"}
DOLLAR_SUBST = {"devnode", "attr", "sysfs", "env", "kernel", "number", "driver", "devpath", "id",
                "major", "minor", "result", "parent", "name", "links", "root", "sys"}
PERCENT_SUBST = set("NsEkndbDpMmcPrSe%")
TOKEN = re.compile(r'(?P<key>[A-Z_]+)(?:\{(?P<attr>[^{}"]*)\})?\s*(?P<op>==|!=|\+=|-=|:=|=)\s*'
                   r'"(?P<value>[^"]*)"')
SEPARATOR = re.compile(r"\s*,\s*")


@dataclass
class Token:
    key: str
    attr: str | None
    op: str
    value: str

    @property
    def is_match(self) -> bool:
        return self.op in MATCH_OPS or self.key == "IMPORT"


@dataclass
class Rule:
    lineno: int
    tokens: list[Token]


@dataclass
class Parsed:
    rules: list[Rule] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def logical_lines(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        out.append((start, pending + raw))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def check_substitutions(value: str, where: str, errors: list[str]) -> None:
    for match in re.finditer(r"\$(\$|[a-z]+)(\{[^}]*\})?", value):
        if match.group(1) != "$" and match.group(1) not in DOLLAR_SUBST:
            errors.append(f"{where}: unknown substitution ${match.group(1)}")
    for match in re.finditer(r"%(.)", value):
        if match.group(1) not in PERCENT_SUBST:
            errors.append(f"{where}: unknown substitution %{match.group(1)}")


def check_rules(text: str, name: str = "rules") -> Parsed:
    """Parse like udev 252 and collect every error; also our own policies (no RUN)."""
    parsed = Parsed()
    labels: dict[str, int] = {}
    gotos: list[tuple[int, str]] = []
    for lineno, line in logical_lines(text):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{name}:{lineno}"
        tokens: list[Token] = []
        pos = 0
        while True:
            match = TOKEN.match(stripped, pos)
            if not match:
                parsed.errors.append(f"{where}: cannot parse at {stripped[pos:pos + 30]!r}")
                break
            tokens.append(Token(match["key"], match["attr"], match["op"], match["value"]))
            pos = match.end()
            if pos == len(stripped):
                break
            sep = SEPARATOR.match(stripped, pos)
            if not sep or sep.end() == pos or "," not in sep.group(0):
                parsed.errors.append(f"{where}: expected ',' after {match.group(0)!r}")
                break
            pos = sep.end()
            if pos == len(stripped):
                parsed.errors.append(f"{where}: trailing comma")
                break
        for token in tokens:
            spec = KEYS.get(token.key)
            if spec is None:
                parsed.errors.append(f"{where}: unknown key {token.key}")
                continue
            attr_rule, matchable, assign_ops = spec
            if attr_rule == "none" and token.attr is not None:
                parsed.errors.append(f"{where}: {token.key} takes no {{attribute}}")
            if attr_rule == "required" and not token.attr:
                parsed.errors.append(f"{where}: {token.key} needs an {{attribute}}")
            if token.op in MATCH_OPS:
                if not matchable:
                    parsed.errors.append(f"{where}: {token.key} cannot be matched ({token.op})")
                if "||" in token.value or token.value.startswith("|") or (
                        token.value.endswith("|") and token.value):
                    parsed.errors.append(f"{where}: empty alternative in {token.value!r}")
            elif token.op not in assign_ops:
                parsed.errors.append(f"{where}: {token.key} does not take {token.op}")
            if token.key == "ENV" and token.op in ASSIGN_OPS and token.attr in READ_ONLY_ENV:
                parsed.errors.append(f"{where}: ENV{{{token.attr}}} cannot be assigned")
            if token.key == "IMPORT" and token.attr not in IMPORT_TYPES:
                parsed.errors.append(f"{where}: IMPORT{{{token.attr}}}: unknown type")
            if token.key == "MODE" and not re.fullmatch(r"0?[0-7]{3}", token.value):
                parsed.errors.append(f"{where}: MODE {token.value!r} is not octal")
            if token.key == "TAG" and token.op in ASSIGN_OPS and not re.fullmatch(
                    r"[A-Za-z0-9_-]+", token.value):
                parsed.errors.append(f"{where}: invalid tag {token.value!r}")
            if token.key == "RUN":
                parsed.errors.append(f"{where}: RUN is not allowed in poi-bridge rules (udev "
                                     f"kills long-running programs; the daemon listens itself)")
            if token.key == "SYMLINK" and token.value.startswith("/"):
                parsed.errors.append(f"{where}: SYMLINK is relative to /dev")
            if token.key == "LABEL":
                if token.value in labels:
                    parsed.errors.append(f"{where}: LABEL {token.value} defined twice")
                labels[token.value] = lineno
            if token.key == "GOTO":
                gotos.append((lineno, token.value))
            check_substitutions(token.value, where, parsed.errors)
        if tokens and not any(not t.is_match or t.key == "IMPORT" for t in tokens):
            parsed.errors.append(f"{where}: rule has matches but no action")
        if tokens:
            parsed.rules.append(Rule(lineno, tokens))
    for lineno, target in gotos:
        if labels.get(target, -1) <= lineno:
            parsed.errors.append(f"{name}:{lineno}: GOTO {target} has no LABEL after it")
    return parsed


# --- a small evaluator: what the rules do to one device ------------------------------------------


@dataclass
class Outcome:
    env: dict[str, str]
    symlinks: list[str]
    tags: set[str]
    group: str | None = None
    mode: str | None = None

    @property
    def devlinks(self) -> str:
        return " ".join("/dev/" + link for link in self.symlinks)


def _glob(pattern: str, value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, alt) for alt in pattern.split("|"))


def _substitute(value: str, env: dict[str, str], kernel: str) -> str:
    value = re.sub(r"\$env\{([^}]*)\}|%E\{([^}]*)\}",
                   lambda m: env.get(m.group(1) or m.group(2), ""), value)
    return value.replace("%k", kernel).replace("$kernel", kernel)


def apply_rules(text: str, device: dict[str, str], parents: tuple[str, ...] = (),
                symlinks: tuple[str, ...] = ()) -> Outcome:
    """Apply the rules to one device event. `parents` are the SUBSYSTEMS above the device;
    `symlinks` the links earlier rules files made (for SYMLINK== matches)."""
    env = dict(device)
    kernel = env["DEVPATH"].rsplit("/", 1)[-1]
    out = Outcome(env, list(symlinks), set(filter(None, env.get("TAGS", "").split(":"))))
    rules = check_rules(text).rules
    labels = {t.value: i for i, r in enumerate(rules) for t in r.tokens if t.key == "LABEL"}
    index = 0
    while index < len(rules):
        rule, index = rules[index], index + 1
        jump = None
        matched = True
        for token in rule.tokens:
            if token.key == "LABEL":
                continue
            if token.is_match:
                if token.key == "IMPORT":
                    continue  # the recorded properties already hold what the builtins add
                if token.key == "ENV":
                    actual = env.get(token.attr or "", "")
                elif token.key == "SUBSYSTEM":
                    actual = env.get("SUBSYSTEM", "")
                elif token.key == "ACTION":
                    actual = env.get("ACTION", "")
                elif token.key == "KERNEL":
                    actual = kernel
                elif token.key == "SUBSYSTEMS":
                    hit = any(_glob(token.value, s) for s in (env["SUBSYSTEM"], *parents))
                    if hit != (token.op == "=="):
                        matched = False
                        break
                    continue
                elif token.key == "SYMLINK":
                    hit = any(_glob(token.value, s) for s in out.symlinks)
                    if hit != (token.op == "=="):
                        matched = False
                        break
                    continue
                else:
                    raise AssertionError(f"evaluator does not know match key {token.key}")
                if _glob(token.value, actual) != (token.op == "=="):
                    matched = False
                    break
        if not matched:
            continue
        for token in rule.tokens:
            if token.is_match or token.key == "LABEL":
                continue
            value = _substitute(token.value, env, kernel)
            if token.key == "ENV":
                if value:
                    env[token.attr or ""] = value
                else:
                    env.pop(token.attr or "", None)
            elif token.key == "SYMLINK":
                out.symlinks += [link for link in value.split() if link not in out.symlinks]
            elif token.key == "TAG":
                out.tags.add(value)
            elif token.key == "GROUP":
                out.group = value
            elif token.key == "MODE":
                out.mode = value
            elif token.key == "GOTO":
                jump = labels[value]
            elif token.key == "OPTIONS":
                continue
            else:
                raise AssertionError(f"evaluator does not know assignment {token.key}")
        if jump is not None:
            index = jump
    return out


# --- recorded devices (udevadm info --query=property, before poi-bridge's rules) -----------------

USB_PORT = "/devices/pci0000:00/0000:00:14.0/usb1/1-2"


def acm_tty(vendor: str, product: str, serial: str | None, interface: str = "00",
            kernel: str = "ttyACM0", action: str = "add") -> dict[str, str]:
    props = {
        "ACTION": action,
        "DEVPATH": f"{USB_PORT}/1-2:1.{int(interface)}/tty/{kernel}",
        "SUBSYSTEM": "tty",
        "DEVNAME": f"/dev/{kernel}",
        "MAJOR": "166",
        "MINOR": "0",
        "ID_BUS": "usb",
        "ID_VENDOR_ID": vendor,
        "ID_MODEL_ID": product,
        "ID_USB_INTERFACE_NUM": interface,
        "ID_USB_DRIVER": "cdc_acm",
        "ID_PATH": f"pci-0000:00:14.0-usb-0:2:1.{int(interface)}",
        "ID_PATH_TAG": f"pci-0000_00_14_0-usb-0_2_1_{int(interface)}",
        "ID_MM_CANDIDATE": "1",
        "TAGS": ":systemd:",
    }
    if serial:
        props["ID_SERIAL_SHORT"] = serial
        props["ID_SERIAL"] = f"Vendor_Model_{serial}"
    return props


def usb_device(vendor: str, product: str, serial: str | None) -> dict[str, str]:
    props = {
        "ACTION": "add",
        "DEVPATH": USB_PORT,
        "SUBSYSTEM": "usb",
        "DEVTYPE": "usb_device",
        "DEVNAME": "/dev/bus/usb/001/005",
        "PRODUCT": f"{int(vendor, 16):x}/{int(product, 16):x}/100",
        "BUSNUM": "001",
        "DEVNUM": "005",
        "ID_BUS": "usb",
        "ID_VENDOR_ID": vendor,
        "ID_MODEL_ID": product,
        "ID_PATH": "pci-0000:00:14.0-usb-0:2",
        "ID_PATH_TAG": "pci-0000_00_14_0-usb-0_2",
    }
    if serial:
        props["ID_SERIAL_SHORT"] = serial
    return props


RS232 = {"ACTION": "add", "DEVPATH": "/devices/pnp0/00:00/00:00:0/00:00:0.0/tty/ttyS0",
         "SUBSYSTEM": "tty", "DEVNAME": "/dev/ttyS0", "MAJOR": "4", "MINOR": "64"}


# --- the static file -----------------------------------------------------------------------------


def test_static_rules_syntax() -> None:
    parsed = check_rules(STATIC_RULES.read_text(), STATIC_RULES.name)
    assert parsed.errors == []
    assert len(parsed.rules) > 10


def test_checker_catches_mistakes() -> None:
    """The checker is not a rubber stamp."""
    bad = "\n".join([
        'SUBSYSTEM="tty", GOTO="nowhere"',               # assignment to a match-only key
        'KERNEL=="ttyACM*" GROUP="x"',                    # missing comma
        'ENV{DEVNAME}="x"',                               # read-only ENV
        'ATTRS=="1", MODE="rw"',                          # attribute missing, MODE not octal
        'FOO=="1", SYMLINK+="x"',                         # unknown key
        'SUBSYSTEM=="tty", RUN+="/usr/bin/poi-notify"',  # RUN forbidden here
        'SUBSYSTEM=="tty|", TAG+="bad tag"',              # empty alternative, bad tag
        'KERNEL=="x", SYMLINK+="poi/$envv{X}"',          # unknown substitution
        'KERNEL=="ttyS0"',                                # no action
        'KERNEL=="ttyS0", GROUP="dialout',               # unterminated quote
    ])
    errors = "\n".join(check_rules(bad, "bad").errors)
    for expected in ("bad:1: SUBSYSTEM does not take =", "GOTO nowhere has no LABEL",
                     "bad:2: expected ','", "bad:3: ENV{DEVNAME} cannot be assigned",
                     "bad:4: ATTRS needs an {attribute}", "bad:4: MODE 'rw' is not octal",
                     "bad:5: unknown key FOO", "bad:6: RUN is not allowed",
                     "bad:7: empty alternative", "bad:7: invalid tag",
                     "bad:8: unknown substitution $envv", "bad:9: rule has matches but no "
                     "action", "bad:10: cannot parse"):
        assert expected in errors, f"{expected!r} not reported:\n{errors}"


def test_static_vendor_list_matches_known_vendors() -> None:
    pairs = re.findall(
        r'^ENV\{ID_VENDOR_ID\}=="([0-9a-f]{4})", ENV\{POI_BRIDGE_VENDOR\}="([a-z]+)"',
        STATIC_RULES.read_text(), re.MULTILINE)
    listed: dict[str, set[str]] = {}
    for vendor_id, name in pairs:
        listed.setdefault(name, set()).add(vendor_id)
    assert listed == {name: set(ids) for name, ids in KNOWN_VENDORS.items()}
    # The real vendors the bridge is meant for.
    assert {"0b00", "11ca", "2fb8"} <= {v for v, _ in pairs}


def test_static_rules_terminal_with_serial() -> None:
    out = apply_rules(STATIC_RULES.read_text(), acm_tty("0b00", "0054", "12345678"),
                      parents=("usb", "pci"))
    assert out.symlinks == ["poi/ingenico-12345678", "poi/ingenico-12345678-if00"]
    assert (out.group, out.mode) == ("poi-bridge", "0660")
    assert out.env["ID_MM_DEVICE_IGNORE"] == "1"
    assert "poi-bridge" in out.tags


def test_static_rules_second_interface_gets_only_its_own_link() -> None:
    out = apply_rules(STATIC_RULES.read_text(),
                      acm_tty("11ca", "0219", "VX820A", interface="02", kernel="ttyACM1"),
                      parents=("usb",))
    assert out.symlinks == ["poi/verifone-VX820A-if02"]


def test_static_rules_fallback_without_serial_is_the_usb_port() -> None:
    out = apply_rules(STATIC_RULES.read_text(), acm_tty("2fb8", "2101", None), parents=("usb",))
    assert out.symlinks[0] == "poi/pax-path-pci-0000_00_14_0-usb-0_2_1_0"
    no_path = acm_tty("2fb8", "2101", None)
    del no_path["ID_PATH"], no_path["ID_PATH_TAG"]
    out = apply_rules(STATIC_RULES.read_text(), no_path, parents=("usb",))
    assert out.symlinks[0] == "poi/pax-ttyACM0"


def test_static_rules_usb_device_node() -> None:
    out = apply_rules(STATIC_RULES.read_text(), usb_device("11ca", "0219", "324688179"))
    assert out.symlinks == ["poi/usb/verifone-324688179"]
    assert (out.group, out.mode, out.env.get("ID_MM_DEVICE_IGNORE")) == ("poi-bridge", "0660", "1")


@pytest.mark.parametrize("device, parents", [
    (acm_tty("0403", "6001", "FT123"), ("usb",)),         # an FTDI cable, not a terminal vendor
    (RS232, ("pnp",)),                                     # the built-in serial port
    (acm_tty("0b00", "0054", "12345678", action="remove"), ("usb",)),
    ({**usb_device("0b00", "0054", "1"), "DEVTYPE": "usb_interface"}, ()),
])
def test_static_rules_leave_other_devices_alone(device, parents) -> None:
    out = apply_rules(STATIC_RULES.read_text(), device, parents=parents)
    assert out.symlinks == [] and out.group is None and out.mode is None
    assert "poi-bridge" not in out.tags and "ID_MM_DEVICE_IGNORE" not in out.env


# --- generated rules -----------------------------------------------------------------------------

CONFIG = parse_config({"terminals": [
    {"poi_id": "Desk3500-12345678",
     "link": {"kind": "serial", "device": "/dev/poi/ingenico-12345678"}},
    {"poi_id": "A920-0820000001",
     "link": {"kind": "serial", "device": "/dev/poi/pax-path-pci-0000_00_14_0-usb-0_2_1_0"}},
    {"poi_id": "Move5000-99887766",
     "link": {"kind": "serial", "device": "/dev/serial/by-id/usb-Ingenico_Move5000_99887766-if00"}},
    {"poi_id": "Rs232-0001", "link": {"kind": "serial", "device": "/dev/ttyS0"}},
    {"poi_id": "V400m-324688179",
     "link": {"kind": "usb", "vendor_id": "0x11ca", "product_id": "0x0219",
              "serial": "324688179"}},
    {"poi_id": "P400-1", "link": {"kind": "usb", "vendor_id": "0x11ca", "product_id": "0x0250"}},
    {"poi_id": "Cloud-1", "link": {"kind": "tcp", "host": "192.0.2.10", "port": 8443}},
]})


def test_generated_rules_syntax() -> None:
    text = render_rules(CONFIG)
    parsed = check_rules(text, "generated")
    assert parsed.errors == []
    assert rules_problems(CONFIG) == []


def test_generated_rules_one_rule_per_local_terminal_nothing_extra() -> None:
    parsed = check_rules(render_rules(CONFIG))
    owners = [t.value for r in parsed.rules for t in r.tokens
              if t.key == "ENV" and t.attr == "POI_BRIDGE_POI_ID"]
    local = [t.poi_id for t in CONFIG.terminals if t.link.kind != "tcp"]
    assert owners == local, "one rule per serial/USB terminal, none for TCP ones"
    acting = [r for r in parsed.rules
              if any(t.key in ("GROUP", "MODE", "SYMLINK", "TAG") and not t.is_match
                     for t in r.tokens)]
    assert len(acting) == len(local), "no rule besides the terminals' touches devices"
    for rule in acting:
        assigned = {(t.key, t.attr, t.value) for t in rule.tokens if not t.is_match}
        assert {("GROUP", None, "poi-bridge"), ("MODE", None, "0660"),
                ("ENV", "ID_MM_DEVICE_IGNORE", "1"), ("TAG", None, "poi-bridge")} <= assigned


def test_generated_rule_contents() -> None:
    by_id = {r.poi_id: r.line for r in terminal_rules(CONFIG)}
    assert "Cloud-1" not in by_id
    assert by_id["Desk3500-12345678"].startswith(
        'SUBSYSTEM=="tty", ENV{ID_VENDOR_ID}=="0b00|079b", ENV{ID_SERIAL_SHORT}=="12345678", '
        'ENV{ID_USB_INTERFACE_NUM}=="00", SYMLINK+="poi/ingenico-12345678"')
    assert 'ENV{ID_PATH_TAG}=="pci-0000_00_14_0-usb-0_2_1_0"' in by_id["A920-0820000001"]
    assert 'SYMLINK=="serial/by-id/usb-Ingenico_Move5000_99887766-if00"' in by_id[
        "Move5000-99887766"]
    assert 'KERNEL=="ttyS0"' in by_id["Rs232-0001"]
    assert by_id["V400m-324688179"].startswith(
        'SUBSYSTEM=="usb", ENV{DEVTYPE}=="usb_device", ENV{ID_VENDOR_ID}=="11ca", '
        'ENV{ID_MODEL_ID}=="0219", ENV{ID_SERIAL_SHORT}=="324688179", '
        'SYMLINK+="poi/usb/V400m-324688179"')
    assert "ID_SERIAL_SHORT" not in by_id["P400-1"], "no serial configured: any serial"


def test_generated_usb_rule_matches_the_serial_as_udev_writes_it() -> None:
    """A space-padded serial number, as the device reports it: udev's ID_SERIAL_SHORT has it
    trimmed, spaces made '_', so that is what the rule must compare."""
    config = parse_config({"terminals": [
        {"poi_id": "V400m-1", "link": {"kind": "usb", "vendor_id": "0x11ca",
                                       "product_id": "0x0219", "serial": "V400m 1  "}}]})
    assert rules_problems(config) == []
    assert 'ENV{ID_SERIAL_SHORT}=="V400m_1"' in terminal_rules(config)[0].line


def test_a_usb_terminal_without_serial_does_not_name_its_twins_device() -> None:
    """Two terminals of one model, one configured with its serial, one without (check-config
    warns of it): the rule of the one without matched the other's device too, which got both
    names in /dev/poi/usb/ and the wrong POI_BRIDGE_POI_ID (the deployment audit)."""
    config = parse_config({"terminals": [
        {"poi_id": "V240m-44444", "link": {"kind": "usb", "vendor_id": "0x11ca",
                                           "product_id": "0x0219", "serial": "44444"}},
        {"poi_id": "V240m-55555", "link": {"kind": "usb", "vendor_id": "0x11ca",
                                           "product_id": "0x0219"}}]})
    rules = render_rules(config)
    check_rules(rules)
    named = apply_rules(rules, usb_device("11ca", "0219", "44444"))
    assert (named.symlinks, named.env.get("POI_BRIDGE_POI_ID")) == (
        ["poi/usb/V240m-44444"], "V240m-44444")
    other = apply_rules(rules, usb_device("11ca", "0219", "99999"))
    assert (other.symlinks, other.env.get("POI_BRIDGE_POI_ID")) == (
        ["poi/usb/V240m-55555"], "V240m-55555")


def test_usb_terminals_configured_by_port_each_name_their_own_device() -> None:
    """Twins that report no serial number, told apart by port: each rule matches the device
    at its port (the usb_device's KERNEL name), and one without serial or port neither."""
    usb = {"kind": "usb", "vendor_id": "0x11ca", "product_id": "0x0219"}
    config = parse_config({"terminals": [
        {"poi_id": "V240m-left", "link": {**usb, "port": "1-1.4"}},
        {"poi_id": "V240m-right", "link": {**usb, "port": "1-1.5"}},
        {"poi_id": "V240m-any", "link": usb}]})
    rules = render_rules(config)
    check_rules(rules)
    for port, poi_id in (("1-1.4", "V240m-left"), ("1-1.5", "V240m-right"),
                         ("1-2", "V240m-any")):
        device = {**usb_device("11ca", "0219", None),
                  "DEVPATH": f"/devices/pci0000:00/0000:00:14.0/usb1/{port}"}
        named = apply_rules(rules, device)
        assert (named.symlinks, named.env.get("POI_BRIDGE_POI_ID")) == (
            [f"poi/usb/{poi_id}"], poi_id), port


@pytest.mark.parametrize("device, parents, symlinks, poi_id", [
    (acm_tty("0b00", "0054", "12345678"), ("usb",), (), "Desk3500-12345678"),
    (acm_tty("2fb8", "2101", None), ("usb",), (), "A920-0820000001"),
    (acm_tty("0b00", "0052", "99887766", kernel="ttyACM3"), ("usb",),
     ("serial/by-id/usb-Ingenico_Move5000_99887766-if00",), "Move5000-99887766"),
    (RS232, ("pnp",), (), "Rs232-0001"),
    (usb_device("11ca", "0219", "324688179"), (), (), "V400m-324688179"),
    (usb_device("11ca", "0250", "ABC"), (), (), "P400-1"),
])
def test_generated_rules_and_matcher_agree(device, parents, symlinks, poi_id) -> None:
    """Apply the generated rules to the terminal's udev event, then hand the result (the
    DEVLINKS udev would report) to the daemon's matcher: it must find the same terminal."""
    out = apply_rules(render_rules(CONFIG), device, parents=parents, symlinks=symlinks)
    assert out.env.get("POI_BRIDGE_POI_ID") == poi_id
    assert (out.group, out.mode, "poi-bridge" in out.tags) == ("poi-bridge", "0660", True)
    seen = {**out.env, "DEVLINKS": out.devlinks, "TAGS": ":" + ":".join(sorted(out.tags)) + ":"}
    assert TerminalMatcher(CONFIG).match(seen).poi_id == poi_id


@pytest.mark.parametrize("device, parents", [
    (acm_tty("0b00", "0054", "00000000"), ("usb",)),      # same vendor, another serial
    (acm_tty("0403", "6001", "FT1"), ("usb",)),           # an FTDI cable
    (usb_device("11ca", "0219", "111111111"), ()),         # another V400m
    ({**RS232, "DEVPATH": RS232["DEVPATH"].replace("ttyS0", "ttyS1"), "DEVNAME": "/dev/ttyS1"},
     ("pnp",)),
])
def test_generated_rules_leave_other_devices_alone(device, parents) -> None:
    out = apply_rules(render_rules(CONFIG), device, parents=parents)
    assert "POI_BRIDGE_POI_ID" not in out.env
    assert out.symlinks == [] and out.group is None and not out.tags - {"systemd"}


@pytest.mark.parametrize("device, problem", [
    ("/dev/poi/front-desk", "a /dev/poi name must be <vendor>-<serial>"),
    ("/dev/poi/usb/verifone-1", 'link kind = "usb"'),
    ("/dev/poi/pax-ttyACM0", "kernel name, which changes between plugs"),
    ("/tmp/fake-tty", "not under /dev"),
    ('/dev/serial/by-id/usb-x"y', "cannot match literally"),
    ("/dev/serial/by-id/usb-x\n", "cannot match literally"),  # would split the rule's line
    ("/dev/ttyACM0\n", "cannot match literally"),
])
def test_unexpressible_links_are_reported_not_guessed(device, problem) -> None:
    printable = device.isprintable()
    config = parse_config({"terminals": [
        {"poi_id": "Odd-1", "link": {"kind": "serial",
                                     "device": device if printable else "/dev/ttyACM9"}},
        {"poi_id": "Fine-1", "link": {"kind": "serial", "device": "/dev/ttyACM0"}},
    ]})
    if not printable:
        # The configuration refuses such a path (tests/test_check_config.py); the rules'
        # own guard stays, for a configuration built some other way.
        object.__setattr__(config.terminals[0].link, "device", device)
    problems = rules_problems(config)
    assert len(problems) == 1 and problems[0].startswith("terminal Odd-1: ")
    assert problem in problems[0]
    text = render_rules(config)
    assert check_rules(text).errors == []
    assert "# LEFT OUT: terminal Odd-1" in text
    assert 'ENV{POI_BRIDGE_POI_ID}="Odd-1"' not in text
    assert 'ENV{POI_BRIDGE_POI_ID}="Fine-1"' in text


def test_no_local_terminals_gives_a_valid_empty_file() -> None:
    config = parse_config({"terminals": [
        {"poi_id": "Cloud-1", "link": {"kind": "tcp", "host": "192.0.2.1", "port": 1}}]})
    text = render_rules(config)
    parsed = check_rules(text)
    assert parsed.errors == []
    assert all(t.key in ("GOTO", "LABEL", "IMPORT") or t.is_match
               for r in parsed.rules for t in r.tokens)


def test_parse_poi_name_round_trips_the_static_naming() -> None:
    name = parse_poi_name("/dev/poi/verifone-VX820A-if02")
    assert name is not None and (name.vendor, name.serial, name.interface) == (
        "verifone", "VX820A", "02")
    assert parse_poi_name("/dev/poi/ingenico-path-pci-0000_00_14_0-usb-0_2_1_0").path_tag == (
        "pci-0000_00_14_0-usb-0_2_1_0")
    assert parse_poi_name("/dev/poi/acme-1") is None
    assert parse_poi_name("/dev/ttyACM0") is None


# --- udevadm verify, where systemd has it (>= 254) -----------------------------------------------


def _udevadm_verify() -> str | None:
    udevadm = shutil.which("udevadm")
    if udevadm is None:
        return None
    probe = subprocess.run([udevadm, "verify", "--help"], capture_output=True, text=True)
    return udevadm if probe.returncode == 0 else None


@pytest.mark.skipif(_udevadm_verify() is None,
                    reason="`udevadm verify` needs systemd >= 254 (this box: no udevadm or older); "
                           "the checker above covers the syntax")
def test_udevadm_verify(tmp_path: Path) -> None:
    generated = tmp_path / "71-poi-bridge-local.rules"
    generated.write_text(render_rules(CONFIG))
    result = subprocess.run([_udevadm_verify(), "verify", "--no-style", str(STATIC_RULES),
                             str(generated)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the command ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poi-bridge")
    cli_udev.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.handler(args)


TOML = """
[[terminals]]
poi_id = "Desk3500-12345678"
link = { kind = "serial", device = "/dev/poi/ingenico-12345678" }

[[terminals]]
poi_id = "V400m-324688179"
link = { kind = "usb", vendor_id = "0x11ca", product_id = "0x0219", serial = "324688179" }
"""


def test_udev_rules_command_prints_the_rules(tmp_path: Path, capsys) -> None:
    config = tmp_path / "poi-bridge.toml"
    config.write_text(TOML)
    assert _run(["udev-rules", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert check_rules(captured.out).errors == []
    assert 'SYMLINK+="poi/ingenico-12345678"' in captured.out
    assert 'ENV{ID_SERIAL_SHORT}=="324688179"' in captured.out


def test_udev_rules_command_config_error_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    config = tmp_path / "poi-bridge.toml"
    config.write_text('[[terminals]]\npoi_id = "bad id"\nlink = { kind = "serial" }\n')
    assert _run(["udev-rules", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"poi-bridge udev-rules: configuration error: {config}")
    assert "terminals[0].poi_id" in lines[0] and "terminals[0].link.device" in lines[0]


def test_udev_rules_command_missing_file(tmp_path: Path, capsys) -> None:
    assert _run(["udev-rules", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_udev_rules_command_reports_left_out_terminals(tmp_path: Path, capsys) -> None:
    config = tmp_path / "poi-bridge.toml"
    config.write_text('[[terminals]]\npoi_id = "Odd-1"\n'
                      'link = { kind = "serial", device = "/dev/poi/front-desk" }\n')
    assert _run(["udev-rules", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert "# LEFT OUT: terminal Odd-1" in captured.out
    assert captured.err.startswith("poi-bridge udev-rules: left out: terminal Odd-1: ")


def test_udev_rules_command_requires_config() -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["udev-rules"])
    assert exc.value.code == 2

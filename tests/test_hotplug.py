"""Hotplug: matching udev devices to terminals, and the monitor read from the event loop.

Devices are real pyudev Device objects where possible: from /sys on this machine, and from
recorded udev events (the properties `udevadm monitor --property` prints for real terminals)
turned into pyudev Devices through libudev's own from-environment constructor.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import ctypes
import errno
import json
import logging
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import pyudev

from bridge import cli_udev
from bridge.config import parse_config
from bridge.daemon.device_match import DeviceInfo, TerminalMatcher
from bridge.daemon.hotplug import HotplugMonitor, udev_announces

CONTEXT = pyudev.Context()
USB_PORT = "/devices/pci0000:00/0000:00:14.0/usb1/1-2"


# --- recorded udev events (after udev's rules, as the daemon receives them) ----------------------


def ingenico_tty(action: str = "add", serial: str = "12345678", kernel: str = "ttyACM0",
                 port: str = "1-2", links: bool = True) -> dict[str, str]:
    props = {
        "ACTION": action,
        "DEVPATH": f"/devices/pci0000:00/0000:00:14.0/usb1/{port}/{port}:1.0/tty/{kernel}",
        "SUBSYSTEM": "tty",
        "DEVNAME": f"/dev/{kernel}",
        "SEQNUM": "4521",
        "MAJOR": "166",
        "MINOR": kernel.removeprefix("ttyACM"),
        "ID_BUS": "usb",
        "ID_VENDOR": "Ingenico",
        "ID_VENDOR_ID": "0b00",
        "ID_MODEL": "Desk_3500",
        "ID_MODEL_ID": "0054",
        "ID_SERIAL": f"Ingenico_Desk_3500_{serial}",
        "ID_SERIAL_SHORT": serial,
        "ID_USB_INTERFACE_NUM": "00",
        "ID_USB_DRIVER": "cdc_acm",
        "ID_MM_DEVICE_IGNORE": "1",
        "TAGS": ":systemd:poi-bridge:",
    }
    if links:
        props["DEVLINKS"] = (f"/dev/serial/by-id/usb-Ingenico_Desk_3500_{serial}-if00 "
                             f"/dev/poi/ingenico-{serial} /dev/poi/ingenico-{serial}-if00")
    return _enumerated_if_no_action(props)


def _enumerated_if_no_action(props: dict[str, str]) -> dict[str, str]:
    """Without an action the properties are those of `udevadm info` (an enumerated device),
    which has no ACTION and SEQNUM."""
    if not props["ACTION"]:
        del props["ACTION"], props["SEQNUM"]
    return props


def verifone_usb(action: str = "add", serial: str = "324688179",
                 devnum: str = "007") -> dict[str, str]:
    return _enumerated_if_no_action({
        "ACTION": action,
        "SEQNUM": "4533",
        "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-3",
        "SUBSYSTEM": "usb",
        "DEVTYPE": "usb_device",
        "DEVNAME": f"/dev/bus/usb/001/{devnum}",
        "PRODUCT": "11ca/219/100",
        "BUSNUM": "001",
        "DEVNUM": devnum,
        "ID_BUS": "usb",
        "ID_VENDOR_ID": "11ca",
        "ID_MODEL_ID": "0219",
        "ID_SERIAL_SHORT": serial,
        "DEVLINKS": f"/dev/poi/usb/verifone-{serial}",
        "TAGS": ":poi-bridge:",
    })


def ftdi_cable(action: str = "add") -> dict[str, str]:
    return _enumerated_if_no_action({
        "ACTION": action,
        "SEQNUM": "4540",
        "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-4/1-4:1.0/ttyUSB0/tty/ttyUSB0",
        "SUBSYSTEM": "tty",
        "DEVNAME": "/dev/ttyUSB0",
        "ID_BUS": "usb",
        "ID_VENDOR_ID": "0403",
        "ID_MODEL_ID": "6001",
        "ID_SERIAL_SHORT": "FT9XYZ",
        "DEVLINKS": "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_FT9XYZ-if00-port0",
    })


_LIBC = ctypes.CDLL(None)
_ENVIRON = ctypes.c_void_p.in_dll(_LIBC, "environ")


def as_pyudev(props: dict[str, str], raw: tuple[bytes, ...] = ()) -> pyudev.Device:
    """A real pyudev Device from a recorded event: libudev builds it from the process
    environment, as it does for a udev RUN program (it needs ACTION and SEQNUM).  libudev
    splits the environment strings in place, so it gets a private environment block of its
    own instead of the process's (swapped in for the call, then restored). `raw`: more
    properties, as the bytes NAME=VALUE (one in another encoding than UTF-8)."""
    assert props.get("ACTION") and props.get("SEQNUM"), "only events can be built this way"
    lines = [f"{k}={v}".encode() for k, v in props.items()] + list(raw)
    buffers = [ctypes.create_string_buffer(line) for line in lines]
    block = (ctypes.c_char_p * (len(buffers) + 1))(
        *[ctypes.cast(b, ctypes.c_char_p) for b in buffers], None)
    saved = _ENVIRON.value
    _ENVIRON.value = ctypes.addressof(block)
    try:
        return pyudev.Devices.from_environment(CONTEXT)
    finally:
        _ENVIRON.value = saved


def real_serial_port() -> Path | None:
    base = Path("/sys/class/tty")
    if not base.is_dir():
        return None
    for entry in sorted(base.iterdir()):
        if "/virtual/" not in str(entry.resolve()) and (entry / "dev").exists():
            return entry
    return None


REAL_TTY = real_serial_port()
needs_real_tty = pytest.mark.skipif(REAL_TTY is None,
                                    reason="no non-virtual tty in /sys/class/tty on this machine")

CONFIG = parse_config({"terminals": [
    {"poi_id": "Desk3500-12345678",
     "link": {"kind": "serial", "device": "/dev/poi/ingenico-12345678"}},
    {"poi_id": "V400m-324688179",
     "link": {"kind": "usb", "vendor_id": "0x11ca", "product_id": "0x0219",
              "serial": "324688179"}},
    {"poi_id": "Cloud-1", "link": {"kind": "tcp", "host": "192.0.2.10", "port": 8443}},
]})


# --- matching ------------------------------------------------------------------------------------


def test_match_serial_terminal_by_udev_link_from_a_real_pyudev_device() -> None:
    device = as_pyudev(ingenico_tty())
    assert isinstance(device, pyudev.Device) and device.device_node == "/dev/ttyACM0"
    result = TerminalMatcher(CONFIG).match(device)
    assert result.poi_id == "Desk3500-12345678"
    assert "udev link /dev/poi/ingenico-12345678" in result.reason


def test_match_usb_terminal_by_vendor_product_serial() -> None:
    matcher = TerminalMatcher(CONFIG)
    assert matcher.match(as_pyudev(verifone_usb())).poi_id == "V400m-324688179"
    other = matcher.match(verifone_usb(serial="111111111"))
    assert other.poi_id is None
    assert other.reason == ("terminal V400m-324688179 wants serial 324688179, this is "
                            "111111111")
    wrong_product = matcher.match({**verifone_usb(), "ID_MODEL_ID": "0250"})
    assert wrong_product.poi_id is None and "wants product 0219" in wrong_product.reason


def test_usb_terminal_without_configured_serial_takes_any() -> None:
    config = parse_config({"terminals": [
        {"poi_id": "V400m-1", "link": {"kind": "usb", "vendor_id": "0x11ca",
                                       "product_id": "0x0219"}}]})
    assert TerminalMatcher(config).match(verifone_usb(serial="999")).poi_id == "V400m-1"


@pytest.mark.parametrize("configured", ["V400m 324688179  ", "V400m_324688179"])
def test_a_usb_serial_udev_rewrote_still_matches(configured) -> None:
    """The terminal reports "V400m 324688179  " (space-padded); udev's usb_id trims it and
    writes "V400m_324688179" in ID_SERIAL_SHORT. A technician may configure either: the
    device's own (as lsusb -v shows it) or udev's (as `poi-bridge devices` shows it)."""
    config = parse_config({"terminals": [
        {"poi_id": "V400m-324688179", "link": {"kind": "usb", "vendor_id": "0x11ca",
                                               "product_id": "0x0219", "serial": configured}}]})
    result = TerminalMatcher(config).match(verifone_usb(serial="V400m_324688179"))
    assert result.poi_id == "V400m-324688179", result.reason


class SysfsSerial:
    """A real pyudev Device from a recorded event, whose usb_device has the kernel `serial`
    attribute given (bytes, as pyudev's Attributes.get returns them; None: no such file, as
    for a device already gone). Recorded events have no /sys behind them."""

    def __init__(self, device: pyudev.Device, serial: bytes | None) -> None:
        self._device = device
        self.attributes = {"serial": serial} if serial is not None else {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._device, name)


def verifone_without_udev_serial(action: str = "add") -> dict[str, str]:
    # What udev sends for such a device: its usb_id sets no ID_SERIAL_SHORT, no ID_SERIAL
    # with it, and the rules then make no /dev/poi/usb/ link.
    props = verifone_usb(action)
    del props["ID_SERIAL_SHORT"], props["DEVLINKS"]
    return props


@pytest.mark.parametrize("serial", ["VF,0042", "VF\u00e90042"])
async def test_a_usb_serial_udev_does_not_copy_is_read_from_sysfs(pipe_monitor, serial) -> None:
    """udev's usb_id sets no ID_SERIAL_SHORT when the serial number has a comma or a
    character outside printable ASCII (udev_serial() gives None), yet pyusb reads it and the
    USB transport opens the device by it. The matcher read only ID_SERIAL_SHORT, so the
    terminal was never plugged in: the daemon kept its worker down, and the reason blamed
    udev ("no udev data? is systemd-udevd running?"). It now reads the kernel's `serial`
    attribute of such a usb_device, compared as the transport compares."""
    config = parse_config({"terminals": [
        {"poi_id": "V400m-1", "link": {"kind": "usb", "vendor_id": "0x11ca",
                                       "product_id": "0x0219", "serial": serial}}]})
    matcher = TerminalMatcher(config)
    sysfs = serial.encode()  # the kernel gives the string descriptor in UTF-8
    result = matcher.match(SysfsSerial(as_pyudev(verifone_without_udev_serial()), sysfs))
    assert result.poi_id == "V400m-1", result.reason
    assert DeviceInfo.from_device(
        SysfsSerial(as_pyudev(verifone_without_udev_serial()), sysfs)).serial == serial
    other = matcher.match(SysfsSerial(as_pyudev(verifone_without_udev_serial()), b"VF,0043"))
    assert other.poi_id is None
    assert other.reason == f"terminal V400m-1 wants serial {serial}, this is VF,0043"

    # Without the attribute (a recorded event), it is not udev to blame: it sets none for
    # such a serial. A serial udev would have written still points at udev.
    unread = matcher.match(verifone_without_udev_serial())
    assert unread.poi_id is None and "systemd-udevd" not in unread.reason, unread.reason
    assert "udev does not put in ID_SERIAL_SHORT" in unread.reason
    none = TerminalMatcher(CONFIG).match(verifone_without_udev_serial())
    assert none.reason == ("terminal V400m-324688179 wants serial 324688179, this device "
                           "reports none (no udev data? is systemd-udevd running?)")

    # And the monitor says it is plugged in, then out (sysfs gone by the remove).
    recorder = Recorder()
    hotplug = HotplugMonitor(matcher, recorder.plug, recorder.unplug, monitor=pipe_monitor,
                             enumerate_devices=list, settle=0.01)
    await hotplug.start()
    try:
        pipe_monitor.push(SysfsSerial(as_pyudev(verifone_without_udev_serial()), sysfs))
        await asyncio.sleep(0.05)
        pipe_monitor.push(SysfsSerial(as_pyudev(verifone_without_udev_serial("remove")), None))
        await asyncio.sleep(0.05)
    finally:
        await hotplug.stop()
    assert recorder.calls == [("plug", "V400m-1", "/dev/bus/usb/001/007"),
                              ("unplug", "V400m-1", "/dev/bus/usb/001/007")]


async def test_two_identical_usb_terminals_one_configured_without_serial(pipe_monitor) -> None:
    """Same vendor and product ids; the terminal that takes any serial number is listed
    first. The one configured with its serial number still gets its own device, the other
    the remaining one, whatever order they are plugged in or listed."""
    config = parse_config({"terminals": [
        {"poi_id": "V400m-any", "link": {"kind": "usb", "vendor_id": "0x11ca",
                                         "product_id": "0x0219"}},
        {"poi_id": "V400m-324688179", "link": {"kind": "usb", "vendor_id": "0x11ca",
                                               "product_id": "0x0219",
                                               "serial": "324688179"}}]})
    own = verifone_usb(action="")  # in port 1-3
    other = {**verifone_usb(action="", serial="555000111", devnum="008"),
             "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-4"}
    assert TerminalMatcher(config).match(own).poi_id == "V400m-324688179"
    assert TerminalMatcher(config).match(other).poi_id == "V400m-any"
    for present in ([own, other], [other, own]):
        recorder = Recorder()
        hotplug = HotplugMonitor(TerminalMatcher(config), recorder.plug, recorder.unplug,
                                 monitor=pipe_monitor, enumerate_devices=lambda: list(present),
                                 settle=0.01)
        await hotplug.start()
        try:
            assert sorted(recorder.calls) == [("plug", "V400m-324688179", "/dev/bus/usb/001/007"),
                                              ("plug", "V400m-any", "/dev/bus/usb/001/008")]
            assert hotplug.absent() == []
        finally:
            await hotplug.stop()


def verifone_without_serial_at(port: str, devnum: str, action: str = "") -> dict[str, str]:
    """A terminal that reports no serial number, plugged into `port` (its sysname)."""
    props = {**verifone_usb(action=action, devnum=devnum),
             "DEVPATH": f"/devices/pci0000:00/0000:00:14.0/usb1/{port}"}
    del props["ID_SERIAL_SHORT"]
    return props


async def test_twins_without_serial_numbers_are_matched_by_port(pipe_monitor) -> None:
    """Two terminals of one model that report no serial number, each configured by the port
    it is plugged into; a third terminal of that model takes any device no other terminal's
    port names, listed first or not. A device at another port is not a port terminal's."""
    usb = {"kind": "usb", "vendor_id": "0x11ca", "product_id": "0x0219"}
    config = parse_config({"terminals": [
        {"poi_id": "V400m-any", "link": usb},
        {"poi_id": "V400m-left", "link": {**usb, "port": "1-1.4"}},
        {"poi_id": "V400m-right", "link": {**usb, "port": "1-1.5"}}]})
    left = verifone_without_serial_at("1-1.4", "007")
    right = verifone_without_serial_at("1-1.5", "008")
    matcher = TerminalMatcher(config)
    assert matcher.match(as_pyudev(verifone_without_serial_at("1-1.4", "007", "add"))
                         ).poi_id == "V400m-left"
    assert "port 1-1.4" in matcher.match(left).reason
    assert matcher.match(right).poi_id == "V400m-right"
    assert matcher.match(verifone_without_serial_at("1-2", "009")).poi_id == "V400m-any"
    only_ports = TerminalMatcher(config.terminals[1:])
    spare = only_ports.match(verifone_without_serial_at("1-2", "009"))
    assert spare.poi_id is None
    assert "terminal V400m-left wants port 1-1.4, this is at 1-2" in spare.reason, spare.reason
    recorder = Recorder()
    hotplug = HotplugMonitor(matcher, recorder.plug, recorder.unplug, monitor=pipe_monitor,
                             enumerate_devices=lambda: [right, left], settle=0.01)
    await hotplug.start()
    try:
        assert sorted(recorder.calls) == [("plug", "V400m-left", "/dev/bus/usb/001/007"),
                                          ("plug", "V400m-right", "/dev/bus/usb/001/008")]
    finally:
        await hotplug.stop()


def test_devices_shows_the_port_of_a_usb_device(tmp_path: Path, capsys) -> None:
    """What a technician copies into `port` for a terminal that reports no serial number."""
    _devices([], [verifone_without_serial_at("1-1.4", "007")])
    assert "/dev/bus/usb/001/007  [usb]  USB 11ca:0219, port 1-1.4" in capsys.readouterr().out


def test_kernel_event_usb_ids_come_from_product() -> None:
    """Raw kernel events (no udev yet) carry only PRODUCT=vid/pid/bcd, without zero padding."""
    config = parse_config({"terminals": [
        {"poi_id": "V400m-1", "link": {"kind": "usb", "vendor_id": "0x11ca",
                                       "product_id": "0x0219"}}]})
    raw = {"ACTION": "add", "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-3",
           "SUBSYSTEM": "usb", "DEVTYPE": "usb_device", "DEVNAME": "bus/usb/001/007",
           "PRODUCT": "11ca/219/100"}
    info = DeviceInfo.from_device(raw)
    assert (info.vendor_id, info.product_id, info.devname) == ("11ca", "0219",
                                                               "/dev/bus/usb/001/007")
    assert TerminalMatcher(config).match(raw).poi_id == "V400m-1"


def test_serial_port_of_a_usb_configured_terminal_is_explained() -> None:
    tty = {**ingenico_tty(links=False), "ID_VENDOR_ID": "11ca", "ID_MODEL_ID": "0219",
           "ID_SERIAL_SHORT": "324688179"}
    result = TerminalMatcher(CONFIG).match(tty)
    assert result.poi_id is None
    assert 'terminal V400m-324688179 is configured with link kind = "usb"' in result.reason


def test_a_usb_port_link_explains_only_its_own_devices_serial_port() -> None:
    """A review: the tty of a device at port 1-1.4 was taken for the one of a terminal
    configured with port 1-1 (the hub above it, in its DEVPATH too)."""
    config = parse_config({"terminals": [
        {"poi_id": "V400m-1", "link": {"kind": "usb", "vendor_id": "0x11ca",
                                        "product_id": "0x0219", "port": "1-1"}}]})
    below_the_hub = {**ingenico_tty(links=False), "ID_VENDOR_ID": "11ca", "ID_MODEL_ID": "0219",
                     "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.4/1-1.4:1.0/"
                                "tty/ttyACM0"}
    assert "configured with link kind" not in TerminalMatcher(config).match(below_the_hub).reason
    its_own = {**ingenico_tty(links=False, port="1-1"), "ID_VENDOR_ID": "11ca",
               "ID_MODEL_ID": "0219"}
    assert 'terminal V400m-1 is configured with link kind = "usb"' in \
        TerminalMatcher(config).match(its_own).reason


def test_terminal_without_its_poi_link_points_at_the_udev_rules() -> None:
    result = TerminalMatcher(CONFIG).match(ingenico_tty(links=False))
    assert result.poi_id is None
    assert "looks like terminal Desk3500-12345678" in result.reason
    assert "install udev/70-poi-bridge.rules" in result.reason


def test_tagged_but_unconfigured_device() -> None:
    result = TerminalMatcher(CONFIG.terminals[1:]).match(ingenico_tty(serial="55555555"))
    assert result.poi_id is None and result.relevant
    assert result.reason == "no serial terminals configured"
    config = parse_config({"terminals": [
        {"poi_id": "Rs232-1", "link": {"kind": "serial", "device": "/dev/ttyS0"}}]})
    result = TerminalMatcher(config).match(ingenico_tty(serial="55555555"))
    assert 'add a [[terminals]] entry with device = "/dev/poi/ingenico-55555555' in result.reason


def test_a_terminal_of_a_configured_ones_vendor_with_another_serial_is_a_near_miss() -> None:
    result = TerminalMatcher(CONFIG).match(ingenico_tty(serial="55555555"))
    assert result.poi_id is None and result.near == ("Desk3500-12345678",)
    assert result.reason == ("terminal Desk3500-12345678 wants serial 12345678 "
                             "(/dev/poi/ingenico-12345678), this is 55555555")


def test_not_a_terminal() -> None:
    result = TerminalMatcher(CONFIG).match(as_pyudev(ftdi_cable()))
    assert result.poi_id is None and result.relevant
    assert result.reason.startswith("not a configured terminal: no serial link names /dev/ttyUSB0")
    interface = TerminalMatcher(CONFIG).match({**verifone_usb(), "DEVTYPE": "usb_interface"})
    assert not interface.relevant


def test_manual_symlink_is_followed_by_default(tmp_path: Path) -> None:
    # A link made by hand, which udev does not list in DEVLINKS. The daemon builds its matcher
    # as TerminalMatcher(config), `poi-bridge devices` too: both must follow it.
    link = tmp_path / "till-terminal"
    link.symlink_to("/dev/ttyUSB0")  # the adapter's node; it need not exist for this
    config = parse_config({"terminals": [
        {"poi_id": "Rs-1", "link": {"kind": "serial", "device": str(link)}}]})
    result = TerminalMatcher(config).match(as_pyudev(ftdi_cable()))
    assert result.poi_id == "Rs-1" and f"{link} points to /dev/ttyUSB0" in result.reason
    assert TerminalMatcher(config, resolve=None).match(ftdi_cable()).poi_id is None
    report = cli_udev.device_report(config, [ftdi_cable("")])
    assert report["terminals"][0]["present"] is True


def rfcomm(action: str = "add", number: int = 0) -> dict[str, str]:
    """A Bluetooth serial port (`rfcomm bind`): a tty without hardware parent, so under
    /devices/virtual, like tty0tty's tnt* or a Moxa Real-TTY ttyr*."""
    return _enumerated_if_no_action({
        "ACTION": action, "SEQNUM": "5120", "SUBSYSTEM": "tty",
        "DEVPATH": f"/devices/virtual/tty/rfcomm{number}", "DEVNAME": f"/dev/rfcomm{number}",
        "MAJOR": "216", "MINOR": str(number), "TAGS": ":systemd:"})


RFCOMM_CONFIG = parse_config({"terminals": [
    {"poi_id": "Move5000-1", "link": {"kind": "serial", "device": "/dev/rfcomm0"}}]})


def test_configured_virtual_tty_is_a_terminal_other_virtual_ttys_are_not() -> None:
    matcher = TerminalMatcher(RFCOMM_CONFIG)
    result = matcher.match(as_pyudev(rfcomm()))
    assert result.poi_id == "Move5000-1" and "device node /dev/rfcomm0" in result.reason
    other = matcher.match(as_pyudev(rfcomm(number=1)))
    assert not other.relevant and "virtual terminal or pseudo device" in other.reason


async def test_configured_virtual_tty_is_followed_through_udev(pipe_monitor) -> None:
    recorder = Recorder()
    hotplug = HotplugMonitor(TerminalMatcher(RFCOMM_CONFIG), recorder.plug, recorder.unplug,
                             monitor=pipe_monitor, enumerate_devices=lambda: [rfcomm("")],
                             settle=0.01)
    await hotplug.start()
    assert recorder.calls == [("plug", "Move5000-1", "/dev/rfcomm0")]
    assert hotplug.absent() == [], "present: the daemon must not shut its worker off"
    for action, expected in [("remove", "unplug"), ("add", "plug")]:  # rfcomm release, bind
        pipe_monitor.push(as_pyudev(rfcomm(action)))
        await asyncio.sleep(0.05)
        await hotplug.wait_idle()
        assert recorder.calls[-1] == (expected, "Move5000-1", "/dev/rfcomm0")
    await hotplug.stop()


def _nodes_to_configure() -> list[str]:
    nodes = ["/dev/null", "/dev/ttyACM9", "/dev/tty0", "/dev/console"]
    if REAL_TTY is not None:
        nodes.append(pyudev.Devices.from_sys_path(CONTEXT, str(REAL_TTY)).device_node)
    return nodes


@pytest.mark.parametrize("by_link", [False, True], ids=["node", "hand-made link"])
@pytest.mark.parametrize("node", [*_nodes_to_configure(), "pty"])
def test_udev_announces_exactly_the_nodes_the_matcher_sees(tmp_path, node, by_link) -> None:
    """The daemon shuts off the worker of a terminal missing from udev's enumeration only if
    udev_announces() its node; it must then be a node the matcher will see when it appears,
    or the terminal is never opened again. Checked against udev's real enumeration here."""
    master = slave = None
    if node == "pty":
        master, slave = os.openpty()
        node = os.ttyname(slave)
    try:
        device = node
        if by_link:
            device = str(tmp_path / "terminal")
            os.symlink(node, device)
        config = parse_config({"terminals": [
            {"poi_id": "Rs-1", "link": {"kind": "serial", "device": device}}]})
        matcher = TerminalMatcher(config)
        seen = any(matcher.match(d).matched for d in cli_udev.pyudev_devices())
        announced = udev_announces(device)
        if os.path.exists(node):
            assert announced == seen, (node, announced, seen)
        else:
            # Not there yet: udev will make it, and the matcher will know it by its name.
            assert announced and not seen
            assert matcher.match({**ftdi_cable(), "DEVNAME": node}).matched
    finally:
        if master is not None:
            os.close(master)
            os.close(slave)


def test_same_device_configured_twice_is_pointed_out() -> None:
    config = parse_config({"terminals": [
        {"poi_id": "A-1", "link": {"kind": "serial", "device": "/dev/ttyUSB0"}},
        {"poi_id": "B-1", "link": {"kind": "serial", "device": "/dev/ttyUSB0"}}]})
    result = TerminalMatcher(config).match(ftdi_cable())
    assert result.poi_id == "A-1" and "also configured for B-1" in result.reason


@needs_real_tty
def test_real_sysfs_serial_port() -> None:
    device = pyudev.Devices.from_sys_path(CONTEXT, str(REAL_TTY))
    node = device.device_node
    assert node and node.startswith("/dev/")
    config = parse_config({"terminals": [
        {"poi_id": "Rs232-1", "link": {"kind": "serial", "device": node}}]})
    result = TerminalMatcher(config).match(device)
    assert result.poi_id == "Rs232-1" and f"device node {node}" in result.reason
    assert TerminalMatcher(CONFIG).match(device).poi_id is None


def test_real_virtual_console_is_not_relevant() -> None:
    if not Path("/sys/class/tty/tty0").exists():
        pytest.skip("no /sys/class/tty/tty0 on this machine")
    device = pyudev.Devices.from_sys_path(CONTEXT, "/sys/class/tty/tty0")
    result = TerminalMatcher(CONFIG).match(device)
    assert not result.relevant and "virtual" in result.reason


# --- the monitor, with an injected fd-backed monitor ---------------------------------------------


class PipeMonitor:
    """Stands in for pyudev.Monitor: a real fd that is readable while events are queued."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self.events: deque[Any] = deque()
        self.started = False
        self.polls = 0
        self.poll_times: list[float] = []

    def push(self, *events: Any) -> None:
        for event in events:
            self.events.append(event)
            os.write(self._write, b"x")

    def fail(self, err: int) -> None:
        self.push(OSError(err, os.strerror(err)))

    def fileno(self) -> int:
        return self._read

    def start(self) -> None:
        self.started = True

    def poll(self, timeout: float | None = None) -> Any:
        assert timeout == 0, "the event loop must never block in poll()"
        self.polls += 1
        self.poll_times.append(time.monotonic())
        if not self.events:
            return None
        os.read(self._read, 1)
        event = self.events.popleft()
        if isinstance(event, Exception):
            raise event
        return event

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    def plug(self, poi_id: str, device: DeviceInfo) -> None:
        self.calls.append(("plug", poi_id, device.devname))

    def unplug(self, poi_id: str, device: DeviceInfo) -> None:
        self.calls.append(("unplug", poi_id, device.devname))


@pytest.fixture
def pipe_monitor():
    monitor = PipeMonitor()
    yield monitor
    monitor.close()


def make(pipe_monitor: PipeMonitor, recorder: Recorder, present: list[Any] | None = None,
         **kwargs: Any) -> HotplugMonitor:
    devices = present if present is not None else []
    return HotplugMonitor(TerminalMatcher(CONFIG), recorder.plug, recorder.unplug,
                          monitor=pipe_monitor, enumerate_devices=lambda: list(devices),
                          settle=kwargs.pop("settle", 0.01), **kwargs)


async def test_monitor_started_before_enumeration(pipe_monitor) -> None:
    order: list[str] = []
    pipe_monitor.start = lambda: order.append("monitor started")  # type: ignore[method-assign]

    def enumerate_devices():
        order.append("enumerated")
        return []

    hotplug = HotplugMonitor(CONFIG, Recorder().plug, Recorder().unplug, monitor=pipe_monitor,
                             enumerate_devices=enumerate_devices)
    await hotplug.start()
    await hotplug.stop()
    assert order == ["monitor started", "enumerated"]


async def test_enumerated_device_also_seen_as_add_is_reported_once(pipe_monitor) -> None:
    recorder = Recorder()
    # Plugged in while the enumeration ran: it is both enumerated and queued as an event.
    pipe_monitor.push(as_pyudev(ingenico_tty()))
    hotplug = make(pipe_monitor, recorder, present=[ingenico_tty(action="")])
    await hotplug.start()
    assert recorder.calls == [("plug", "Desk3500-12345678", "/dev/ttyACM0")], \
        "start() returns after on_plug ran for terminals already present"
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    pipe_monitor.push(as_pyudev(ingenico_tty()))  # a repeated add
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert recorder.calls == [("plug", "Desk3500-12345678", "/dev/ttyACM0")]
    assert hotplug.is_present("Desk3500-12345678")
    await hotplug.stop()


async def test_plug_unplug_replug(pipe_monitor) -> None:
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder)
    await hotplug.start()
    assert recorder.calls == [] and hotplug.present() == {}
    for event, expected in [
        (ingenico_tty("add"), ("plug", "Desk3500-12345678", "/dev/ttyACM0")),
        (ingenico_tty("remove"), ("unplug", "Desk3500-12345678", "/dev/ttyACM0")),
        (ingenico_tty("add", kernel="ttyACM1"), ("plug", "Desk3500-12345678", "/dev/ttyACM1")),
    ]:
        pipe_monitor.push(as_pyudev(event))
        await asyncio.sleep(0.05)
        await hotplug.wait_idle()
        assert recorder.calls[-1] == expected
    assert len(recorder.calls) == 3
    assert hotplug.present()["Desk3500-12345678"].devname == "/dev/ttyACM1"
    await hotplug.stop()


async def test_terminals_followed_to_each_others_ports_are_matched_again_quietly(
        pipe_monitor) -> None:
    """The daemon swapped two terminals' links (their cables were swapped): each present
    device now belongs to the other terminal, without a plug or unplug (no device moved),
    and the next unplug is reported for the terminal now on that port."""
    def at(serial: str) -> dict[str, Any]:
        return {"poi_id": f"Desk3500-{serial}",
                "link": {"kind": "serial", "device": f"/dev/poi/ingenico-{serial}"}}

    configured = parse_config({"terminals": [at("11111111"), at("22222222")]}).terminals
    recorder = Recorder()
    present = [ingenico_tty(action="", serial="11111111", kernel="ttyACM0", port="1-2"),
               ingenico_tty(action="", serial="22222222", kernel="ttyACM1", port="1-3")]
    hotplug = HotplugMonitor(TerminalMatcher(configured), recorder.plug, recorder.unplug,
                             monitor=pipe_monitor, enumerate_devices=lambda: list(present),
                             settle=0.01)
    await hotplug.start()
    assert {p: d.devname for p, d in hotplug.present().items()} == {
        "Desk3500-11111111": "/dev/ttyACM0", "Desk3500-22222222": "/dev/ttyACM1"}
    first, second = configured
    swapped = [first.model_copy(update={"link": second.link}),
               second.model_copy(update={"link": first.link})]
    calls = list(recorder.calls)
    hotplug.rematch(TerminalMatcher(swapped))
    assert {p: d.devname for p, d in hotplug.present().items()} == {
        "Desk3500-11111111": "/dev/ttyACM1", "Desk3500-22222222": "/dev/ttyACM0"}
    assert recorder.calls == calls
    pipe_monitor.push(as_pyudev(ingenico_tty("remove", serial="11111111", kernel="ttyACM0",
                                             port="1-2")))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert recorder.calls[len(calls):] == [("unplug", "Desk3500-22222222", "/dev/ttyACM0")]
    await hotplug.stop()


async def test_remove_of_unknown_device_is_ignored(pipe_monitor, caplog) -> None:
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder)
    await hotplug.start()
    caplog.set_level(logging.DEBUG, logger="bridge.daemon.hotplug")
    pipe_monitor.push(as_pyudev(ingenico_tty("remove")), as_pyudev(verifone_usb("remove")))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert recorder.calls == []
    assert "never seen present: ignored" in caplog.text
    await hotplug.stop()


async def test_device_that_is_not_a_terminal(pipe_monitor, caplog) -> None:
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder)
    await hotplug.start()
    caplog.clear()  # the start-up warnings about the missing terminals
    caplog.set_level(logging.DEBUG, logger="bridge.daemon.hotplug")
    pipe_monitor.push(as_pyudev(ftdi_cable("add")))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    pipe_monitor.push(as_pyudev(ftdi_cable("remove")))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert recorder.calls == []
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("/dev/ttyUSB0" in m and "ignored: not a configured terminal" in m for m in debug)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    await hotplug.stop()


async def test_a_tagged_terminal_no_one_configured_is_said_once_per_appearance(
        pipe_monitor, caplog) -> None:
    """A new or replacement terminal plugged in was only a DEBUG line: the technician saw
    nothing. Once per appearance (not for a repeated add), with the device path to configure
    and that the bridge must be restarted (a WARNING here: it is of the vendor of the
    configured Desk3500, which is not plugged in, so probably its replacement)."""
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder)
    await hotplug.start()
    caplog.set_level(logging.INFO, logger="bridge.daemon.hotplug")

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno >= logging.INFO and "add a [[terminals]] entry" in r.getMessage()]

    for event in (ingenico_tty(serial="55555555"), ingenico_tty(serial="55555555"),
                  ingenico_tty("remove", serial="55555555"), ingenico_tty(serial="55555555")):
        pipe_monitor.push(as_pyudev(event))
        await asyncio.sleep(0.05)
        await hotplug.wait_idle()
    assert recorder.calls == []
    assert len(said()) == 2, said()
    assert 'add a [[terminals]] entry with device = "/dev/poi/ingenico-55555555"' in said()[0]
    assert "systemctl restart poi-bridge" in said()[0] and "plugged in" in said()[0]
    await hotplug.stop()


async def test_two_terminals_at_once(pipe_monitor) -> None:
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder)
    await hotplug.start()
    pipe_monitor.push(as_pyudev(verifone_usb()), as_pyudev(ftdi_cable()),
                      as_pyudev(ingenico_tty()))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert sorted(recorder.calls) == [("plug", "Desk3500-12345678", "/dev/ttyACM0"),
                                      ("plug", "V400m-324688179", "/dev/bus/usb/001/007")]
    pipe_monitor.push(as_pyudev(verifone_usb("unbind")), as_pyudev(verifone_usb("remove")))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert recorder.calls[-1] == ("unplug", "V400m-324688179", "/dev/bus/usb/001/007")
    assert set(hotplug.present()) == {"Desk3500-12345678"}
    await hotplug.stop()


async def test_event_storm_is_coalesced_without_blocking_the_loop(pipe_monitor) -> None:
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder, present=[ingenico_tty("")], settle=0.05,
                   max_events_per_read=64)
    await hotplug.start()
    assert recorder.calls == [("plug", "Desk3500-12345678", "/dev/ttyACM0")]

    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    # A flaky cable: the terminal flaps 300 times and ends plugged in; an unknown FTDI cable
    # flaps and ends unplugged; the V400m flaps and ends plugged in.
    storm = []
    for _ in range(300):
        storm += [ingenico_tty("remove"), ingenico_tty("add"), ftdi_cable("add"),
                  ftdi_cable("remove"), verifone_usb("add"), verifone_usb("remove")]
    storm.append(verifone_usb("add"))
    pipe_monitor.push(*storm)
    polls_before = len(pipe_monitor.poll_times)
    await asyncio.sleep(0.2)
    await hotplug.wait_idle()
    stop.set()
    await tick
    storm_polls = pipe_monitor.poll_times[polls_before:]

    assert recorder.calls[1:] == [
        ("unplug", "Desk3500-12345678", "/dev/ttyACM0"),  # it did go away, and came back:
        ("plug", "Desk3500-12345678", "/dev/ttyACM0"),    # once each, final state plugged
        ("plug", "V400m-324688179", "/dev/bus/usb/001/007"),
    ]
    assert hotplug.counters["events"] == len(storm)
    assert hotplug.counters["coalesced"] >= len(storm) - 3
    # Read in bounded chunks, with the loop running other tasks between them.
    assert len(storm_polls) >= len(storm)
    interleaved = [t for t in ticks if storm_polls[0] < t < storm_polls[-1]]
    # (28 chunks of 64; some are read back to back when the settle timer also reads on.)
    assert len(interleaved) >= len(storm) // 64 // 2, "the reader hogged the loop"
    # No read held the loop for more than two chunks (the reader's and the settle timer's
    # read on) between two turns of the ticker: counted in reads, not in seconds, which a
    # loaded machine stretches (a gap of 1.6 s once, with the process paused).
    reads = [bisect.bisect(storm_polls, b) - bisect.bisect(storm_polls, a)
             for a, b in zip(ticks, ticks[1:])]
    assert max(reads) <= 2 * 64, f"{max(reads)} events read without the loop running on"
    await hotplug.stop()


async def test_batch_of_exactly_one_read_is_not_held_back(pipe_monitor) -> None:
    """A read that stops at max_events with nothing left must not wait for max_delay."""
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder, settle=0.02, max_events_per_read=8, max_delay=30)
    await hotplug.start()
    started = time.monotonic()
    pipe_monitor.push(*[ftdi_cable(a) for a in ("add", "remove")] * 3, ingenico_tty("remove"),
                      ingenico_tty("add"))
    await asyncio.sleep(0.005)  # the loop reads the 8 events in one go, none left
    assert pipe_monitor.polls == 8, "stopped at max_events without seeing the queue empty"
    await asyncio.wait_for(hotplug.wait_idle(), timeout=5)
    assert recorder.calls == [("plug", "Desk3500-12345678", "/dev/ttyACM0")]
    assert time.monotonic() - started < 5
    assert hotplug.absent() == ["V400m-324688179"]
    await hotplug.stop()


async def test_storm_of_a_device_never_present_that_ends_removed_reports_nothing(
        pipe_monitor) -> None:
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder, settle=0.05)
    await hotplug.start()
    pipe_monitor.push(*[ingenico_tty(a) for _ in range(200) for a in ("add", "remove")])
    await asyncio.sleep(0.15)
    await hotplug.wait_idle()
    assert recorder.calls == [] and hotplug.present() == {}
    await hotplug.stop()


async def test_tag_filter_ignores_untagged_devices(pipe_monitor) -> None:
    recorder = Recorder()
    config = parse_config({"terminals": [
        {"poi_id": "Desk3500-12345678",
         "link": {"kind": "serial", "device": "/dev/poi/ingenico-12345678"}},
        {"poi_id": "Ftdi-1", "link": {"kind": "serial", "device": "/dev/ttyUSB0"}}]})
    hotplug = HotplugMonitor(config, recorder.plug, recorder.unplug, monitor=pipe_monitor,
                             enumerate_devices=lambda: [ftdi_cable("")], settle=0.01,
                             tag="poi-bridge")
    await hotplug.start()
    assert recorder.calls == [], "the enumerated FTDI cable carries no poi-bridge tag"
    pipe_monitor.push(as_pyudev(ftdi_cable("remove")), as_pyudev(ftdi_cable("add")),
                      as_pyudev(ingenico_tty()))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert recorder.calls == [("plug", "Desk3500-12345678", "/dev/ttyACM0")]
    await hotplug.stop()


def _socket_filter_length(fd: int) -> int:
    """Instructions in the BPF filter libudev attached to the socket (SO_GET_FILTER)."""
    length = ctypes.c_uint(0)
    so_get_filter = 26
    assert _LIBC.getsockopt(fd, socket.SOL_SOCKET, so_get_filter, None,
                            ctypes.byref(length)) == 0
    return length.value


@pytest.fixture
def udev_run(tmp_path: Path) -> str:
    """udev's run directory as udevd leaves it (its control socket): the real netlink
    monitor is opened whether or not this box runs udevd."""
    (tmp_path / "control").touch()
    return str(tmp_path)


async def test_real_monitor_filters_in_the_kernel(udev_run) -> None:
    lengths = {}
    for tag in (None, "poi-bridge"):
        hotplug = HotplugMonitor(CONFIG, Recorder().plug, Recorder().unplug, tag=tag,
                                 enumerate_devices=list, udev_run=udev_run)
        await hotplug.start()
        try:
            assert isinstance(hotplug.monitor, pyudev.Monitor) and hotplug.monitor.started
            lengths[tag] = _socket_filter_length(hotplug.monitor.fileno())
        finally:
            await hotplug.stop()
    assert lengths[None] > 0, "subsystem filter (tty, usb/usb_device) installed"
    assert lengths["poi-bridge"] > lengths[None], "the tag adds its own check"


async def test_lost_events_trigger_a_rescan(pipe_monitor, caplog) -> None:
    recorder = Recorder()
    present = [ingenico_tty(""), verifone_usb("")]
    hotplug = make(pipe_monitor, recorder, present=present)
    await hotplug.start()
    assert len(recorder.calls) == 2
    # The kernel dropped the remove event of the V400m (receive buffer overflow).
    present.pop()
    pipe_monitor.fail(errno.ENOBUFS)
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert recorder.calls[-1] == ("unplug", "V400m-324688179", "/dev/bus/usb/001/007")
    assert hotplug.counters["overflows"] == 1
    assert "udev events were lost" in caplog.text
    await hotplug.stop()


async def test_after_lost_events_the_rescan_beats_a_stale_remove(pipe_monitor) -> None:
    # A flaky-cable storm overflows the receive buffer: the kernel reports ENOBUFS, then the
    # events still queued, an older 'remove' among them; the 'add' after it was dropped. The
    # terminal is plugged in (the enumeration says so) and must end up plugged, after an
    # unplug for the replug that did happen.
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder, present=[ingenico_tty("")])
    await hotplug.start()
    pipe_monitor.fail(errno.ENOBUFS)
    pipe_monitor.push(as_pyudev(ingenico_tty("remove")))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert recorder.calls == [("plug", "Desk3500-12345678", "/dev/ttyACM0"),
                              ("unplug", "Desk3500-12345678", "/dev/ttyACM0"),
                              ("plug", "Desk3500-12345678", "/dev/ttyACM0")]
    assert hotplug.is_present("Desk3500-12345678") and hotplug.absent() == ["V400m-324688179"]
    await hotplug.stop()


async def test_after_lost_events_the_rescan_beats_a_stale_add(pipe_monitor) -> None:
    # The other way round: a queued 'change' of a device whose 'remove' was dropped, and of
    # a device plugged in and out again with only its 'add' left. Neither is there any more.
    recorder = Recorder()
    present = [ingenico_tty("")]
    hotplug = make(pipe_monitor, recorder, present=present)
    await hotplug.start()
    present.clear()
    pipe_monitor.fail(errno.ENOBUFS)
    pipe_monitor.push(as_pyudev(ingenico_tty("change")), as_pyudev(verifone_usb("add")))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert recorder.calls == [("plug", "Desk3500-12345678", "/dev/ttyACM0"),
                              ("unplug", "Desk3500-12345678", "/dev/ttyACM0")]
    assert hotplug.present() == {}
    await hotplug.stop()


async def test_async_callbacks_run_in_order_and_failures_do_not_stop_the_monitor(
        pipe_monitor, caplog) -> None:
    calls: list[str] = []

    async def on_plug(poi_id: str, device: DeviceInfo) -> None:
        calls.append(f"plug {poi_id} start")
        await asyncio.sleep(0.02)
        calls.append(f"plug {poi_id} end")
        if poi_id == "V400m-324688179":
            raise RuntimeError("worker not ready")

    def on_unplug(poi_id: str, device: DeviceInfo) -> None:
        calls.append(f"unplug {poi_id}")

    hotplug = HotplugMonitor(CONFIG, on_plug, on_unplug, monitor=pipe_monitor,
                             enumerate_devices=list, settle=0.01)
    await hotplug.start()
    pipe_monitor.push(as_pyudev(verifone_usb()))
    await asyncio.sleep(0.03)
    await hotplug.wait_idle()
    pipe_monitor.push(as_pyudev(verifone_usb("remove")), as_pyudev(ingenico_tty()))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert calls == ["plug V400m-324688179 start", "plug V400m-324688179 end",
                     "plug Desk3500-12345678 start", "plug Desk3500-12345678 end",
                     "unplug V400m-324688179"]
    assert "terminal V400m-324688179: the plug handler for /dev/bus/usb/001/007 failed" in \
        caplog.text
    await hotplug.stop()


async def test_monitor_is_read_by_the_event_loop(pipe_monitor) -> None:
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder)
    await hotplug.start()
    loop = asyncio.get_running_loop()
    assert pipe_monitor.started
    assert pipe_monitor.polls == 0, "nothing polls an idle monitor"
    # Nobody calls into the monitor object: the fd becoming readable is what drives it.
    pipe_monitor.push(as_pyudev(ingenico_tty()))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert pipe_monitor.polls >= 1
    assert recorder.calls == [("plug", "Desk3500-12345678", "/dev/ttyACM0")]
    await hotplug.stop()
    assert loop.remove_reader(pipe_monitor.fileno()) is False, "stop() removes the reader"
    pipe_monitor.push(as_pyudev(ingenico_tty("remove")))
    await asyncio.sleep(0.05)
    assert recorder.calls == [("plug", "Desk3500-12345678", "/dev/ttyACM0")]


async def test_missing_terminal_is_logged_for_the_technician(pipe_monitor, caplog) -> None:
    hotplug = make(pipe_monitor, Recorder())
    await hotplug.start()
    await hotplug.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("terminal Desk3500-12345678: its device (serial "
                            "/dev/poi/ingenico-12345678) is not plugged in") for m in warnings)
    # A mistyped path looks the same as an unplugged cable: both are said.
    assert all("or the device in the configuration is wrong" in m for m in warnings
               if "is not plugged in" in m), warnings
    assert any(m.startswith("terminal V400m-324688179:") for m in warnings)
    assert not any("Cloud-1" in m for m in warnings), "TCP terminals are not hotplug devices"


async def test_a_terminal_on_a_node_udev_does_not_announce_is_not_called_unplugged(
        pipe_monitor, caplog) -> None:
    # A pseudo-terminal (or any node outside /dev) never appears in udev's enumeration; its
    # worker opens it directly. Telling the technician it is "not plugged in" while its link
    # comes up a moment later sends them to check a cable that is fine.
    master, slave = os.openpty()
    try:
        config = parse_config({"terminals": [
            {"poi_id": "Desk3500-12345678",
             "link": {"kind": "serial", "device": "/dev/poi/ingenico-12345678"}},
            {"poi_id": "Pty-1", "link": {"kind": "serial", "device": os.ttyname(slave)}},
        ]})
        hotplug = HotplugMonitor(TerminalMatcher(config), Recorder().plug, Recorder().unplug,
                                 monitor=pipe_monitor, enumerate_devices=list, settle=0.01)
        await hotplug.start()
        await hotplug.stop()
    finally:
        os.close(master)
        os.close(slave)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("terminal Desk3500-12345678: its device") for m in warnings)
    assert not any("Pty-1" in m for m in warnings), warnings
    assert hotplug.absent() == ["Desk3500-12345678", "Pty-1"], "absent from udev all the same"


# --- a real netlink monitor ----------------------------------------------------------------------


def _netlink_family(fd: int) -> int:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return sock.family
    finally:
        sock.close()


async def test_real_pyudev_monitor_is_started_and_registered_with_the_loop(udev_run) -> None:
    hotplug = HotplugMonitor(CONFIG, Recorder().plug, Recorder().unplug, settle=0.01,
                             udev_run=udev_run)
    await hotplug.start()
    try:
        monitor = hotplug.monitor
        assert isinstance(monitor, pyudev.Monitor) and monitor.started
        assert _netlink_family(monitor.fileno()) == socket.AF_NETLINK
        loop = asyncio.get_running_loop()
        # The loop owns the fd: registering it a second time replaces our reader, so check by
        # removing it and putting it back.
        assert loop.remove_reader(monitor.fileno()) is True
        loop.add_reader(monitor.fileno(), hotplug._on_readable)
    finally:
        await hotplug.stop()


@needs_real_tty
async def test_real_kernel_uevent_reaches_the_callbacks(udev_run) -> None:
    """End to end through the kernel: a synthetic 'change' uevent for a real serial port (what
    `udevadm trigger` sends; harmless) arrives on the netlink socket, the loop reads it, the
    matcher recognises the configured port and on_plug runs."""
    uevent = REAL_TTY / "uevent"
    if not os.access(uevent, os.W_OK):
        pytest.skip(f"writing {uevent} needs root")
    node = pyudev.Devices.from_sys_path(CONTEXT, str(REAL_TTY)).device_node
    config = parse_config({"terminals": [
        {"poi_id": "Rs232-1", "link": {"kind": "serial", "device": node}}]})
    plugged = asyncio.Event()
    seen: list[DeviceInfo] = []

    def on_plug(poi_id: str, device: DeviceInfo) -> None:
        seen.append(device)
        plugged.set()

    # Kernel source: this box runs no udevd to re-broadcast; enumeration left empty so the
    # event is what tells the monitor about the port.
    hotplug = HotplugMonitor(config, on_plug, lambda *_: None, source="kernel",
                             enumerate_devices=list, settle=0.01, udev_run=udev_run)
    await hotplug.start()
    try:
        uevent.write_text("change")
        await asyncio.wait_for(plugged.wait(), timeout=5)
    finally:
        await hotplug.stop()
    assert seen[0].devname == node and seen[0].action == "change"
    assert hotplug.counters["events"] >= 1


# --- `poi-bridge devices` ------------------------------------------------------------------------


def _devices(argv: list[str], devices: list[Any]) -> int:
    parser = argparse.ArgumentParser(prog="poi-bridge")
    cli_udev.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["devices", *argv])
    assert args.handler is cli_udev.cmd_devices
    return cli_udev.cmd_devices(args, enumerate_devices=lambda: devices)


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "poi-bridge.toml"
    path.write_text("""
[[terminals]]
poi_id = "Desk3500-12345678"
link = { kind = "serial", device = "/dev/poi/ingenico-12345678" }

[[terminals]]
poi_id = "V400m-324688179"
link = { kind = "usb", vendor_id = "0x11ca", product_id = "0x0219", serial = "324688179" }
""")
    return path


def test_devices_json_lists_matches_and_reasons(tmp_path: Path, capsys) -> None:
    devices = [ingenico_tty(""), as_pyudev(ftdi_cable()), verifone_usb("", serial="111111111")]
    if Path("/sys/class/tty/tty0").exists():
        devices.append(pyudev.Devices.from_sys_path(CONTEXT, "/sys/class/tty/tty0"))
    code = _devices(["--config", str(_config_file(tmp_path)), "--json"], devices)
    report = json.loads(capsys.readouterr().out)
    by_node = {row["devname"]: row for row in report["devices"]}
    assert by_node["/dev/ttyACM0"]["poi_id"] == "Desk3500-12345678"
    assert by_node["/dev/ttyUSB0"]["poi_id"] is None
    assert by_node["/dev/ttyUSB0"]["reason"].startswith("not a configured terminal")
    assert "wants serial 324688179, this is 111111111" in by_node["/dev/bus/usb/001/007"]["reason"]
    assert "/dev/tty0" not in by_node, "virtual consoles only with --all"
    terminals = {t["poi_id"]: t for t in report["terminals"]}
    assert terminals["Desk3500-12345678"]["present"] is True
    assert terminals["V400m-324688179"] == {
        "poi_id": "V400m-324688179", "link": "USB 11ca:0219 serial 324688179",
        "present": False, "device": None, "near": ["/dev/bus/usb/001/007"]}
    assert code == 1, "a configured terminal is missing"


def test_devices_text_all_present(tmp_path: Path, capsys) -> None:
    code = _devices(["--config", str(_config_file(tmp_path))],
                    [as_pyudev(ingenico_tty()), as_pyudev(verifone_usb()), ftdi_cable("")])
    out = capsys.readouterr().out
    assert code == 0
    assert ("/dev/ttyACM0  [tty]  USB 0b00:0054, serial 12345678, links /dev/poi/ingenico-12345678"
            in out)
    assert "    -> terminal Desk3500-12345678 (serial link, by udev link " in out
    assert "/dev/ttyUSB0  [tty]" in out and "    ignored: not a configured terminal" in out
    assert "    V400m-324688179 (USB 11ca:0219 serial 324688179): on /dev/bus/usb/001/007" in out


def test_devices_reports_a_pseudo_terminal_that_exists_as_present(tmp_path: Path,
                                                                   capsys) -> None:
    """udev never lists a pseudo-terminal: a terminal configured on one (a simulator, a
    serial server's virtual port) was reported NOT FOUND, check the cable and power."""
    master, slave = os.openpty()
    pty = os.ttyname(slave)
    try:
        link = tmp_path / "terminal"
        link.symlink_to(pty)
        config = tmp_path / "poi-bridge.toml"
        config.write_text(f"""
[[terminals]]
poi_id = "Desk3500-12345678"
link = {{ kind = "serial", device = "{link}" }}

[[terminals]]
poi_id = "Desk3500-87654321"
link = {{ kind = "serial", device = "{tmp_path / 'gone'}" }}
""")
        code = _devices(["--config", str(config)], [])
        out = capsys.readouterr().out
    finally:
        os.close(master)
        os.close(slave)
    assert (f"    Desk3500-12345678 (serial {link}): on {pty} (pseudo-terminal, "
            "not a udev device)") in out
    assert "    Desk3500-87654321" in out and "NOT FOUND" in out.split("Desk3500-87654321")[1]
    assert code == 1, "one configured terminal is missing"


def test_devices_without_config_and_with_all(capsys) -> None:
    devices = [ftdi_cable("")]
    if Path("/sys/class/tty/tty0").exists():
        devices.append(pyudev.Devices.from_sys_path(CONTEXT, "/sys/class/tty/tty0"))
    assert _devices(["--json", "--all"], devices) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["terminals"] == []
    assert all(row["poi_id"] is None and row["reason"].startswith("no configuration given")
               for row in report["devices"])
    assert len(report["devices"]) == len(devices)


def test_devices_config_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("terminals = 3\n")
    assert _devices(["--config", str(bad)], []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("poi-bridge devices: configuration error: ")


def test_devices_on_this_machine_through_pyudev(capsys) -> None:
    """The default enumeration (pyudev) works here and lists the real serial port."""
    parser = argparse.ArgumentParser()
    cli_udev.add_parser(parser.add_subparsers())
    args = parser.parse_args(["devices", "--json"])
    assert args.handler(args) == 0
    report = json.loads(capsys.readouterr().out)
    nodes = {row["devname"] for row in report["devices"]}
    if REAL_TTY is not None:
        node = pyudev.Devices.from_sys_path(CONTEXT, str(REAL_TTY)).device_node
        assert node in nodes
    assert all(row["subsystem"] in ("tty", "usb") for row in report["devices"])


def test_a_receive_buffer_the_unit_may_not_raise_is_said_as_normal(monkeypatch, caplog) -> None:
    """Under the unit (no capabilities) the udev receive buffer cannot be raised past
    net.core.rmem_max at every start: harmless (an overflow triggers a rescan), so said at
    INFO as normal, not as a problem to look into."""
    def refuse(self, size):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(pyudev.Monitor, "set_receive_buffer_size", refuse)
    caplog.set_level(logging.DEBUG, logger="bridge.daemon.hotplug")
    HotplugMonitor(CONFIG, Recorder().plug, Recorder().unplug)._open_netlink()
    (record,) = [r for r in caplog.records if "receive buffer" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "normal under the unit: no CAP_NET_ADMIN" in record.getMessage()

"""What the technician is told about a device that is almost a configured terminal: a
replacement of the same model (another serial number), an adapter back under another kernel
name, and which of two identical adapters a by-id link names. Recorded udev events through a
pipe-backed monitor read by the event loop."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from bridge.config import parse_config
from bridge.daemon.device_match import TerminalMatcher
from bridge.daemon.hotplug import HotplugMonitor

from .test_hotplug import (
    PipeMonitor,
    Recorder,
    as_pyudev,
    ftdi_cable,
    ingenico_tty,
    make,
    verifone_usb,
)


@pytest.fixture
def pipe_monitor():
    monitor = PipeMonitor()
    yield monitor
    monitor.close()


REPLACING = 'README "Adding or replacing a terminal"'


async def settled(hotplug: HotplugMonitor) -> None:
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()


def warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


async def test_a_usb_terminal_replaced_by_one_of_the_same_model_is_said_at_warning(
        pipe_monitor, caplog) -> None:
    """Only "unplugged ... check its USB cable" used to reach the technician: the new
    terminal was a DEBUG line."""
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder, present=[verifone_usb(action="")])
    await hotplug.start()
    caplog.set_level(logging.INFO, logger="bridge.daemon.hotplug")
    pipe_monitor.push(as_pyudev(verifone_usb("remove")))
    await settled(hotplug)
    new = verifone_usb("add", serial="111222333", devnum="009")
    pipe_monitor.push(as_pyudev(new), as_pyudev(new))  # a repeated add: said once
    await settled(hotplug)
    said = warnings(caplog, "probably a replacement")
    assert len(said) == 1, said
    assert "terminal V400m-324688179" in said[0] and "111222333" in said[0], said
    assert "poi_id" in said[0] and "link.serial" in said[0] and REPLACING in said[0], said
    # once per appearance: unplugged and plugged in again, it is said again
    pipe_monitor.push(as_pyudev(verifone_usb("remove", serial="111222333", devnum="009")))
    await settled(hotplug)
    pipe_monitor.push(as_pyudev(verifone_usb("add", serial="111222333", devnum="010")))
    await settled(hotplug)
    assert len(warnings(caplog, "probably a replacement")) == 2
    assert recorder.calls == [("plug", "V400m-324688179", "/dev/bus/usb/001/007"),
                              ("unplug", "V400m-324688179", "/dev/bus/usb/001/007")]
    await hotplug.stop()


async def test_a_serial_terminal_replaced_by_one_of_the_same_model_names_the_old_one(
        pipe_monitor, caplog) -> None:
    hotplug = make(pipe_monitor, Recorder(), present=[ingenico_tty(action="")])
    await hotplug.start()
    caplog.set_level(logging.INFO, logger="bridge.daemon.hotplug")
    pipe_monitor.push(as_pyudev(ingenico_tty("remove")))
    await settled(hotplug)
    pipe_monitor.push(as_pyudev(ingenico_tty("add", serial="87654321")))
    await settled(hotplug)
    said = warnings(caplog, "probably a replacement")
    assert len(said) == 1 and "terminal Desk3500-12345678" in said[0], said
    assert '"/dev/poi/ingenico-87654321"' in said[0] and REPLACING in said[0], said
    await hotplug.stop()


def ftdi(action: str, number: int, *, serial: bool = True) -> dict[str, str]:
    """An FTDI adapter as ttyUSB<number> in USB port 1-<4+number>; without serial, both
    adapters get the one by-id name (udev: the last plugged in wins)."""
    props = ftdi_cable(action)
    port = f"1-{4 + number}"
    props.update(DEVPATH=f"/devices/pci0000:00/0000:00:14.0/usb1/{port}/{port}:1.0/"
                         f"ttyUSB{number}/tty/ttyUSB{number}",
                 DEVNAME=f"/dev/ttyUSB{number}", SEQNUM=str(5000 + number))
    if not serial:
        del props["ID_SERIAL_SHORT"]
        props["DEVLINKS"] = (f"{BY_ID} /dev/serial/by-path/pci-0000:00:14.0-usb-0:"
                             f"{4 + number}:1.0-port0")
    return props


BY_ID = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART-if00-port0"


async def test_an_adapter_back_under_another_kernel_name_is_said_with_the_link_to_use(
        pipe_monitor, caplog) -> None:
    config = parse_config({"terminals": [
        {"poi_id": "Rs232-1", "link": {"kind": "serial", "device": "/dev/ttyUSB0"}}]})
    recorder = Recorder()
    hotplug = HotplugMonitor(TerminalMatcher(config), recorder.plug, recorder.unplug,
                             monitor=pipe_monitor, settle=0.01,
                             enumerate_devices=lambda: [ftdi("", 0) | {"ACTION": ""}])
    await hotplug.start()
    caplog.set_level(logging.INFO, logger="bridge.daemon.hotplug")
    pipe_monitor.push(as_pyudev(ftdi("remove", 0)))
    await settled(hotplug)
    pipe_monitor.push(as_pyudev(ftdi("add", 1)))
    await settled(hotplug)
    said = warnings(caplog, "adapter is back as /dev/ttyUSB1")
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert said[0].startswith("terminal Rs232-1's adapter"), said
    assert "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_FT9XYZ-if00-port0" in said[0], said
    assert "a kernel name changes between plugs" in said[0], said
    assert recorder.calls == [("plug", "Rs232-1", "/dev/ttyUSB0"),
                              ("unplug", "Rs232-1", "/dev/ttyUSB0")], "not followed"
    await hotplug.stop()


async def test_two_adapters_on_one_by_id_link_name_the_one_the_link_points_to(
        pipe_monitor, caplog, tmp_path: Path) -> None:
    """The warning said "using /dev/ttyUSB0", the first plugged in, while the worker opens
    the configured link, which udev points at the last one plugged in."""
    link = tmp_path / "by-id-link"  # stands in for the by-id link: udev points it so
    config = parse_config({"terminals": [
        {"poi_id": "Rs232-1", "link": {"kind": "serial", "device": BY_ID}}]})
    hotplug = HotplugMonitor(TerminalMatcher(config, resolve=lambda p: str(link.resolve())
                                             if p == BY_ID else p),
                             Recorder().plug, Recorder().unplug, monitor=pipe_monitor,
                             enumerate_devices=list, settle=0.01)
    await hotplug.start()
    caplog.set_level(logging.INFO, logger="bridge.daemon.hotplug")
    link.symlink_to("/dev/ttyUSB0")
    pipe_monitor.push(as_pyudev(ftdi("add", 0, serial=False)))
    await settled(hotplug)
    link.unlink()
    link.symlink_to("/dev/ttyUSB1")
    pipe_monitor.push(as_pyudev(ftdi("add", 1, serial=False)))
    await settled(hotplug)
    said = warnings(caplog, "2 devices match")
    assert len(said) == 1, said
    assert "using /dev/ttyUSB0" not in said[0], said
    assert f"{BY_ID} points to /dev/ttyUSB1 now" in said[0], said
    await hotplug.stop()

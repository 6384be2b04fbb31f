"""A udev event the daemon cannot read (review rev4). pyudev decodes every property as strict
UTF-8: a device with one property in another encoding (a vendor string from a local rule
or a hwdb entry) raised inside the monitor's reader, the exception went to the event loop,
and the event was lost with no rescan: a USB terminal's plug lost so left it offline until
a restart (a serial one is found again by its node's recheck)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pyudev

from bridge.daemon.device_match import DeviceInfo

from .test_hotplug import Recorder, as_pyudev, make, pipe_monitor, verifone_usb

__all__ = ["pipe_monitor"]  # (the fixture)

V400M = ("plug", "V400m-324688179", "/dev/bus/usb/001/007")


def with_latin1_property(props: dict[str, str]) -> pyudev.Device:
    """A real pyudev Device from a recorded event, plus one property in Latin-1."""
    return as_pyudev(props, raw=("ID_MODEL_FROM_DATABASE=Café terminal".encode("latin-1"),))


def test_a_property_not_in_utf8_is_left_out_not_the_device() -> None:
    info = DeviceInfo.from_device(with_latin1_property(verifone_usb()))
    assert "ID_MODEL_FROM_DATABASE" not in info.properties
    assert (info.devname, info.serial, info.vendor_id) == (
        "/dev/bus/usb/001/007", "324688179", "11ca")


async def test_a_usb_terminal_with_such_a_property_is_plugged(pipe_monitor) -> None:
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder)
    await hotplug.start()
    pipe_monitor.push(with_latin1_property(verifone_usb()))
    await asyncio.sleep(0.05)
    await hotplug.wait_idle()
    assert recorder.calls == [V400M]
    await hotplug.stop()


def unreadable_said(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "could not be read" in r.getMessage()]


class Unreadable:
    """An event whose reading fails in a way no one foresaw."""

    device_path = "/devices/pci0000:00/0000:00:14.0/usb1/1-3"

    @property
    def properties(self) -> Any:
        raise RuntimeError("libudev said something odd")


async def test_an_event_that_cannot_be_read_is_said_and_rescanned(pipe_monitor,
                                                                  caplog) -> None:
    recorder = Recorder()
    present: list[Any] = []
    hotplug = make(pipe_monitor, recorder, present=present)
    await hotplug.start()
    caplog.set_level(logging.INFO, logger="bridge.daemon.hotplug")
    present.append(verifone_usb(""))  # plugged: its add event cannot be read
    pipe_monitor.push(Unreadable())
    await asyncio.sleep(0.1)
    await hotplug.wait_idle()
    assert recorder.calls == [V400M], "the rescan did not find the terminal"
    warnings = unreadable_said(caplog)
    assert len(warnings) == 1 and "/devices/pci0000:00/0000:00:14.0/usb1/1-3 could not be " \
        "read (RuntimeError: libudev said something odd)" in warnings[0], warnings
    # The same device again, within the quiet interval: counted, not said again
    pipe_monitor.push(Unreadable())
    await asyncio.sleep(0.1)
    await hotplug.wait_idle()
    assert len(unreadable_said(caplog)) == 1
    await hotplug.stop()


async def test_an_enumerated_device_that_cannot_be_read_hides_no_other(pipe_monitor,
                                                                       caplog) -> None:
    recorder = Recorder()
    hotplug = make(pipe_monitor, recorder, present=[Unreadable(), verifone_usb("")])
    await hotplug.start()
    assert recorder.calls == [V400M]
    assert "the enumerated device /devices/pci0000:00/0000:00:14.0/usb1/1-3 could not be " \
        "read" in caplog.text
    await hotplug.stop()


async def test_a_fault_handling_an_event_is_logged_as_one_and_rescanned(pipe_monitor,
                                                                        caplog) -> None:
    """A fault of the bridge's own handling of a readable event is not called an unreadable
    udev property: it is logged with its traceback, and the rescan still finds the device."""
    recorder = Recorder()
    present: list[Any] = []
    hotplug = make(pipe_monitor, recorder, present=present)
    await hotplug.start()
    receive = hotplug._receive
    faults = []

    def failing_once(info: DeviceInfo) -> None:
        if not faults:
            faults.append(info.devpath)
            raise KeyError("a bug")
        receive(info)

    hotplug._receive = failing_once  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="bridge.daemon.hotplug")
    present.append(verifone_usb(""))
    pipe_monitor.push(as_pyudev(verifone_usb()))
    await asyncio.sleep(0.1)
    await hotplug.wait_idle()
    assert recorder.calls == [V400M]
    (fault,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "handling the udev event of /devices/pci0000:00/0000:00:14.0/usb1/1-3 failed (a " \
        "fault of the bridge" in fault.getMessage() and fault.exc_info is not None
    assert unreadable_said(caplog) == []
    await hotplug.stop()

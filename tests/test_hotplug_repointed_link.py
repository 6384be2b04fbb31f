"""A terminal configured through a link made by hand (/etc/poi-bridge/terminal ->
/dev/ttyUSB0) that a technician points at another adapter already plugged in (the terminal
moved there), then unplugs the old adapter (review rv5): the link was followed only when udev
announced a device, the new adapter had been announced before, and the terminal stayed offline
until a restart. When a terminal's device goes, the devices already known are matched again,
the links followed anew."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.daemon.device_match import TerminalMatcher
from bridge.daemon.hotplug import HotplugMonitor
from bridge.simulator.server import SimulatorServer, open_pty
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .test_daemon_hotplug import POI
from .test_hotplug import PipeMonitor, Recorder


def tty(action: str, n: int, node: str) -> dict[str, str]:
    return {"ACTION": action, "SUBSYSTEM": "tty", "DEVNAME": node,
            "DEVPATH": f"/devices/pci0000:00/usb1/1-{n}/1-{n}:1.0/ttyUSB{n}/tty/ttyUSB{n}"}


def repoint(link: Path, target: str) -> None:
    """As a technician does it with `ln -sfn`: the link is replaced at once."""
    new = link.with_name(f".{link.name}.new")
    new.symlink_to(target)
    os.replace(new, link)


async def settled(hotplug: HotplugMonitor, recorder: Recorder, count: int) -> None:
    async with asyncio.timeout(5):
        while len(recorder.calls) < count:
            await asyncio.sleep(0.01)
    await hotplug.wait_idle()


def monitor_on(tmp_path: Path, pipe: PipeMonitor, recorder: Recorder,
               present: list[dict[str, str]]) -> tuple[HotplugMonitor, Path]:
    link = tmp_path / "terminal"
    link.symlink_to("/dev/ttyUSB0")  # the nodes need not exist: udev's events say they do
    config = parse_config({"terminals": [{"poi_id": POI, "link": {
        "kind": "serial", "device": str(link)}}]})
    hotplug = HotplugMonitor(TerminalMatcher(config), recorder.plug, recorder.unplug,
                             monitor=pipe, enumerate_devices=lambda: list(present),
                             settle=0.01)
    return hotplug, link


async def test_the_old_adapter_unplugged_after_the_link_moved_plugs_the_new_one(
        tmp_path: Path) -> None:
    pipe, recorder = PipeMonitor(), Recorder()
    present = [tty("", 0, "/dev/ttyUSB0"), tty("", 1, "/dev/ttyUSB1")]
    hotplug, link = monitor_on(tmp_path, pipe, recorder, present)
    try:
        await hotplug.start()
        assert recorder.calls == [("plug", POI, "/dev/ttyUSB0")]
        repoint(link, "/dev/ttyUSB1")
        present.pop(0)
        pipe.push(tty("remove", 0, "/dev/ttyUSB0"))
        await settled(hotplug, recorder, 3)
        assert recorder.calls == [("plug", POI, "/dev/ttyUSB0"), ("unplug", POI, "/dev/ttyUSB0"),
                                  ("plug", POI, "/dev/ttyUSB1")]
        assert hotplug.present()[POI].devname == "/dev/ttyUSB1"
    finally:
        await hotplug.stop()
        pipe.close()


async def test_a_rescan_after_the_link_moved_follows_it(tmp_path: Path) -> None:
    # No remove yet (the old adapter is still plugged in), but events were lost: the rescan
    # matches every device again, so the terminal is on the node its link names now.
    pipe, recorder = PipeMonitor(), Recorder()
    present = [tty("", 0, "/dev/ttyUSB0"), tty("", 1, "/dev/ttyUSB1")]
    hotplug, link = monitor_on(tmp_path, pipe, recorder, present)
    try:
        await hotplug.start()
        repoint(link, "/dev/ttyUSB1")
        pipe.fail(errno.ENOBUFS)
        await settled(hotplug, recorder, 3)
        assert recorder.calls[1:] == [("unplug", POI, "/dev/ttyUSB0"),
                                      ("plug", POI, "/dev/ttyUSB1")]
    finally:
        await hotplug.stop()
        pipe.close()


async def test_the_terminal_behind_a_moved_link_is_used_again(tmp_path: Path) -> None:
    master0, slave0, node0 = open_pty()  # the old adapter, nothing behind it any more
    sim = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05),
                                   link=LinkBehaviour(status_hold=0.05)))
    node1 = os.path.realpath(await sim.start_pty(tmp_path / "sim"))
    link = tmp_path / "terminal"
    link.symlink_to(node0)
    config = parse_config({
        "journal": str(tmp_path / "journal.sqlite3"), "mqtt": {"port": 1},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": str(link)},
                       "status_timeout": 1.0}],
    })
    bridge = Bridge(config, hotplug=False)
    pipe = PipeMonitor()
    present: list[Any] = [tty("add", 0, node0), tty("add", 1, node1)]
    bridge.hotplug = HotplugMonitor(TerminalMatcher(config), bridge._plugged, bridge._unplugged,
                                    monitor=pipe, enumerate_devices=lambda: list(present),
                                    settle=0.01)
    await bridge.start()
    worker = bridge.workers[POI]
    closed = False
    try:
        assert bridge.hotplug.is_present(POI)
        repoint(link, node1)
        pipe.push(tty("remove", 0, node0))
        os.close(master0)
        os.close(slave0)
        closed = True
        async with asyncio.timeout(10):
            while worker.identity != "confirmed":
                await asyncio.sleep(0.05)
        assert bridge.hotplug.present()[POI].devname == node1
    finally:
        await bridge.stop()
        await sim.close()
        pipe.close()
        if not closed:
            os.close(master0)
            os.close(slave0)

"""Hotplug in the daemon: udev events (fed through a pipe-backed monitor, read by the event
loop) bring a terminal's worker online and offline; a replug mid-payment is recovered by a
status poll; other terminals and the journal are not disturbed."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import pytest

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.daemon.device_match import TerminalMatcher
from bridge.daemon.hotplug import HotplugMonitor
from bridge.protocol.messages import parse_message
from bridge.protocol.transaction import TxKey, request_digest
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .test_hotplug import PipeMonitor

POI = "V400m-324688179"


def tty_event(action: str, link: str, devname: str) -> dict[str, str]:
    props = {"ACTION": action, "SUBSYSTEM": "tty", "DEVNAME": devname, "DEVLINKS": link,
             "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/tty/ttyACM0",
             "ID_VENDOR_ID": "11ca", "ID_MODEL_ID": "0219", "ID_SERIAL_SHORT": "324688179",
             "TAGS": ":poi-bridge:"}
    return props


async def wait_state(bridge: Bridge, state: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while bridge.workers[POI].state()["state"] != state:
            await asyncio.sleep(0.02)


async def test_unplug_and_replug_mid_payment_through_udev_events(tmp_path):
    simulator = SimulatorServer(
        Scenario(poi_id=POI, default=Behaviour(delay=0.5, never_answer=True),
                 link=LinkBehaviour(status_hold=0.05, replug_after=0.2)), ack_timeout=0.3)
    link = str(tmp_path / "terminal")
    await simulator.start_pty(link)
    config = parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"port": 1},  # no broker: results wait in the outbox, terminals work anyway
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": link},
                       "framer": {"ack_timeout": 0.3}, "payment_timeout": 5.0,
                       "status_timeout": 1.0, "poll_floor": 0.05}],
    })
    bridge = Bridge(config, hotplug=False)
    monitor = PipeMonitor()
    present = [tty_event("add", link, os.path.realpath(link))]
    bridge.hotplug = HotplugMonitor(TerminalMatcher(config), bridge._plugged, bridge._unplugged,
                                    monitor=monitor, enumerate_devices=lambda: list(present),
                                    settle=0.01)
    await bridge.start()
    try:
        await wait_state(bridge, "online")
        assert monitor.started
        doc = responses.payment_request("POS1", "H1", POI, 8.0)
        bridge.workers[POI].submit(parse_message(doc), doc, request_digest(doc))
        await asyncio.sleep(0.1)

        # The cable is pulled: udev says remove, and the pty goes away.
        old_node = os.path.realpath(link)
        monitor.push(tty_event("remove", link, old_node))
        simulator.unplug()
        await wait_state(bridge, "offline")
        assert "disappeared" in bridge.workers[POI].state()["detail"]

        # Plugged back in: a new node behind the same /dev/poi-style link.
        async with asyncio.timeout(5):
            while simulator.replugs == 0:
                await asyncio.sleep(0.02)
        monitor.push(tty_event("add", link, os.path.realpath(link)))
        async with asyncio.timeout(15):
            while (txn := bridge.journal.get(TxKey("POS1", "H1"))).state != "final":
                await asyncio.sleep(0.05)
        assert (txn.outcome, txn.source) == ("approved", "status-poll")
        assert simulator.terminal.ledger[("POS1", "H1")].charged
        assert bridge.hotplug.counters["plugs"] == 2 and bridge.hotplug.counters["unplugs"] == 1
    finally:
        await bridge.stop()
        await simulator.close()
        monitor.close()


async def test_device_that_is_not_a_terminal_changes_nothing(tmp_path):
    config = parse_config({
        "journal": str(tmp_path / "journal.sqlite3"), "mqtt": {"port": 1},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial",
                                               "device": "/dev/poi/verifone-324688179"}}],
    })
    bridge = Bridge(config, hotplug=False)
    monitor = PipeMonitor()
    bridge.hotplug = HotplugMonitor(TerminalMatcher(config), bridge._plugged, bridge._unplugged,
                                    monitor=monitor, enumerate_devices=list, settle=0.01)
    await bridge.start()
    try:
        await wait_state(bridge, "offline")
        assert bridge.workers[POI].state()["state"] == "offline"
        keyboard = {"ACTION": "add", "SUBSYSTEM": "usb", "DEVTYPE": "usb_device",
                    "DEVNAME": "/dev/bus/usb/001/007", "DEVPATH": "/devices/usb1/1-3",
                    "ID_VENDOR_ID": "046d", "ID_MODEL_ID": "c31c"}
        monitor.push(keyboard)
        await asyncio.sleep(0.2)
        assert bridge.hotplug.counters["plugs"] == 0
        assert bridge.workers[POI].state()["state"] == "offline"
    finally:
        await bridge.stop()
        monitor.close()


# Both are udev devices the matcher could not see before: a port reached through a link made by
# hand (udev does not list it in DEVLINKS), and a tty without hardware parent (Bluetooth rfcomm,
# tty0tty, Moxa Real-TTY), which udev places under /devices/virtual.
@pytest.mark.parametrize(
    "devpath", ["/devices/pnp0/00:04/tty/ttyS0", "/devices/virtual/tty/rfcomm0"],
    ids=["hand-made link", "virtual tty"])
async def test_daemon_follows_udev_for_a_terminal_behind_a_hand_made_link(tmp_path, devpath):
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05),
                                         link=LinkBehaviour(status_hold=0.05)))
    link = str(tmp_path / "terminal")  # the simulator's own symlink to its pty: made by hand
    await simulator.start_pty(link)
    config = parse_config({
        "journal": str(tmp_path / "journal.sqlite3"), "mqtt": {"port": 1},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": link}}],
    })

    def event(action: str) -> dict[str, str]:
        return {"ACTION": action, "SUBSYSTEM": "tty", "DEVPATH": devpath,
                "DEVNAME": os.path.realpath(link)}  # no DEVLINKS: udev knows nothing of it

    bridge = Bridge(config, hotplug=False)
    monitor = PipeMonitor()
    # Built as the daemon builds it: TerminalMatcher(config), nothing more.
    bridge.hotplug = HotplugMonitor(TerminalMatcher(config), bridge._plugged, bridge._unplugged,
                                    monitor=monitor, enumerate_devices=lambda: [event("add")],
                                    settle=0.01)
    await bridge.start()
    try:
        assert bridge.hotplug.absent() == [] and bridge.hotplug.is_present(POI)
        await wait_state(bridge, "online")
        monitor.push(event("remove"))
        await wait_state(bridge, "offline")
        assert bridge.workers[POI].state()["detail"] == "device unplugged"
        monitor.push(event("add"))
        await wait_state(bridge, "online")
    finally:
        await bridge.stop()
        await simulator.close()
        monitor.close()


def test_the_daemons_own_matcher_follows_a_hand_made_link(tmp_path):
    link = tmp_path / "payterm"
    link.symlink_to("/dev/ttyS0")
    config = parse_config({
        "journal": str(tmp_path / "journal.sqlite3"), "mqtt": {"port": 1},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": str(link)}}],
    })
    bridge = Bridge(config)  # the daemon's wiring, not started: no udev socket is opened
    try:
        ttys0 = {"SUBSYSTEM": "tty", "DEVNAME": "/dev/ttyS0",
                 "DEVPATH": "/devices/pnp0/00:04/tty/ttyS0"}
        assert bridge.hotplug is not None
        assert bridge.hotplug.matcher.match(ttys0).poi_id == POI
    finally:
        bridge.journal.close()


# --- a terminal whose node appears without udev saying so ----------------------------------------


@pytest.fixture
def dev_node():
    """A node path under /dev that does not exist yet (udev would announce it), removed after
    the test: the terminal's node appearing is a symlink made there to the simulator's pty."""
    path = f"/dev/poi-bridge-test-{uuid.uuid4().hex[:12]}"
    yield path
    if os.path.lexists(path):
        os.unlink(path)


def node_terminal(tmp_path, node: str):
    return parse_config({
        "journal": str(tmp_path / "journal.sqlite3"), "mqtt": {"port": 1},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": node}}],
    })


async def test_without_udevd_a_terminal_missing_at_start_is_opened_when_its_node_appears(
        tmp_path, dev_node, caplog):
    """A container or a minimal image: no udevd, yet pyudev's netlink socket opens. Hotplug
    stayed on and switched the terminal off, waiting for a plug event that never came."""
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05),
                                         link=LinkBehaviour(status_hold=0.05)))
    await simulator.start_pty(str(tmp_path / "pty"))
    config = node_terminal(tmp_path, dev_node)
    bridge = Bridge(config, hotplug=False)
    # The daemon's own monitor (real netlink), with udev's run directory of a box without udevd
    bridge.hotplug = HotplugMonitor(TerminalMatcher(config), bridge._plugged, bridge._unplugged,
                                    udev_run=str(tmp_path / "run-udev"))
    await bridge.start()
    try:
        assert bridge.hotplug is None, "no udevd: run without hotplug"
        said = [r.getMessage() for r in caplog.records if "udevd is not running" in r.getMessage()]
        assert len(said) == 1 and "retried with backoff" in said[0], said
        os.symlink(os.path.realpath(tmp_path / "pty"), dev_node)  # the node appears
        await wait_state(bridge, "online", timeout=15)
    finally:
        await bridge.stop()
        await simulator.close()


async def test_a_node_that_appears_unannounced_is_used_after_a_recheck(tmp_path, dev_node,
                                                                        caplog):
    """udev runs (or its run directory is there) but never announces the node, e.g. udev
    events of another network namespace: the absent terminals' nodes are looked at again on a
    slow timer, and one there now is used."""
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05),
                                         link=LinkBehaviour(status_hold=0.05)))
    await simulator.start_pty(str(tmp_path / "pty"))
    config = node_terminal(tmp_path, dev_node)
    bridge = Bridge(config, hotplug=False)
    monitor = PipeMonitor()  # udev says nothing, ever
    bridge.hotplug = HotplugMonitor(TerminalMatcher(config), bridge._plugged, bridge._unplugged,
                                    monitor=monitor, enumerate_devices=list, settle=0.01)
    bridge.recheck_absent = 0.2
    await bridge.start()
    try:
        await wait_state(bridge, "offline")
        assert bridge.workers[POI].state()["detail"] == "device not plugged in"
        await asyncio.sleep(0.5)  # rechecked meanwhile: not there, still off
        assert bridge.workers[POI].state()["state"] == "offline"
        os.symlink(os.path.realpath(tmp_path / "pty"), dev_node)
        await wait_state(bridge, "online", timeout=5)
        said = [r.getMessage() for r in caplog.records if "udev never announced" in r.getMessage()]
        assert len(said) == 1 and dev_node in said[0], said
        await asyncio.sleep(0.5)  # its look at the nodes over, the daemon runs on
        assert bridge.exit_status == 0 and not bridge._stop.is_set()
    finally:
        await bridge.stop()
        await simulator.close()
        monitor.close()


async def given_to_a_and_left_to_it(bridge: Bridge, monitor: PipeMonitor, caplog: Any,
                                    a: str, b: str, a_pty: str, a_link: str,
                                    b_node: str) -> None:
    """A's adapter comes back as `b_node` (B's kernel name), which udev gives to A by its
    stable link `a_link`: A is online on it, and through several rechecks B is not switched
    on over it. (Which of the two opened the port first was a race: the switch-on is the
    fault.)"""
    os.symlink(a_pty, b_node)
    monitor.push(tty_event("add", a_link, b_node))
    async with asyncio.timeout(10):
        while not (bridge.hotplug.is_present(a)
                   and bridge.workers[a].state()["state"] == "online"):
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # several rechecks
    assert not [r.getMessage() for r in caplog.records
                if "udev never announced it" in r.getMessage()]
    assert bridge.workers[a].state()["state"] == "online", bridge.workers[a].state()
    assert bridge.workers[b].state()["state"] == "offline", bridge.workers[b].state()
    assert not bridge.hotplug.is_present(b)


async def test_the_recheck_leaves_a_node_udev_gave_another_terminal_alone(tmp_path, caplog):
    """Review of the 30-s recheck: terminal B, configured by a kernel name (ttyUSB0) and
    absent at start; terminal A's adapter, replugged, comes back under that very name (udev
    gives it to A by its stable link). The recheck saw B's path exist and opened it: B took
    A's port, A went offline ('in use by another process') and B said online while its
    identity check refused everything."""
    a, b = "V400m-324688179", "V400m-999999999"
    tag = uuid.uuid4().hex[:8]
    a_link = f"/dev/poi-bridge-test-byid-{tag}"  # A: a stable udev link (by-id, /dev/poi)
    b_node = f"/dev/poi-bridge-test-ttyUSB0-{tag}"  # B: a kernel name, absent at start
    sim = SimulatorServer(Scenario(poi_id=a, default=Behaviour(delay=0.05),
                                   link=LinkBehaviour(status_hold=0.05)))
    await sim.start_pty(str(tmp_path / "pty"))
    pty = os.path.realpath(tmp_path / "pty")
    os.symlink(pty, a_link)
    config = parse_config({"journal": str(tmp_path / "journal.sqlite3"), "mqtt": {"port": 1},
                           "terminals": [
                               {"poi_id": a, "link": {"kind": "serial", "device": a_link}},
                               {"poi_id": b, "link": {"kind": "serial", "device": b_node}}]})
    bridge = Bridge(config, hotplug=False)
    monitor = PipeMonitor()
    present = [tty_event("add", a_link, f"/dev/poi-bridge-test-ttyUSB1-{tag}")]
    bridge.hotplug = HotplugMonitor(TerminalMatcher(config), bridge._plugged, bridge._unplugged,
                                    monitor=monitor, enumerate_devices=lambda: list(present),
                                    settle=0.01)
    bridge.recheck_absent = 0.2
    await bridge.start()
    try:
        async with asyncio.timeout(10):
            while bridge.workers[a].state()["state"] != "online":
                await asyncio.sleep(0.05)
        monitor.push(tty_event("remove", a_link, f"/dev/poi-bridge-test-ttyUSB1-{tag}"))
        await asyncio.sleep(0.2)
        # A's adapter back under B's kernel name
        await given_to_a_and_left_to_it(bridge, monitor, caplog, a, b, pty, a_link, b_node)
    finally:
        await bridge.stop()
        await sim.close()
        monitor.close()
        for path in (a_link, b_node):
            if os.path.lexists(path):
                os.unlink(path)


async def rechecked_terminal(tmp_path, dev_node: str, *, replug_after: float,
                             recheck_absent: float):
    """A simulated terminal on a node under /dev (gone while unplugged, back `replug_after`
    s later), and a bridge whose udev events the test pushes and that looks at absent nodes
    every `recheck_absent` s: (simulator, bridge, monitor, the node's real path)."""
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05),
                                         link=LinkBehaviour(status_hold=0.05,
                                                            replug_after=replug_after)))
    await simulator.start_pty(dev_node)
    config = node_terminal(tmp_path, dev_node)
    bridge = Bridge(config, hotplug=False)
    monitor = PipeMonitor()
    node = os.path.realpath(dev_node)
    bridge.hotplug = HotplugMonitor(TerminalMatcher(config), bridge._plugged, bridge._unplugged,
                                    monitor=monitor, settle=0.01,
                                    enumerate_devices=lambda: [tty_event("add", dev_node, node)])
    bridge.recheck_absent = recheck_absent
    return simulator, bridge, monitor, node


async def test_a_terminal_unplugged_while_running_is_used_when_its_node_is_back_unannounced(
        tmp_path, dev_node, caplog):
    """The recheck covered only the terminals absent at start: one unplugged later whose node
    came back without a udev event (udev's events of another network namespace, a lost
    event) stayed offline until the daemon restarted. A node udev said was removed but that
    is still there is not taken for the terminal back: only one seen gone, then there."""
    simulator, bridge, monitor, node = await rechecked_terminal(
        tmp_path, dev_node, replug_after=1.0, recheck_absent=0.2)
    await bridge.start()
    try:
        await wait_state(bridge, "online")
        # udev says it went, yet its node is still there: not taken for it back
        monitor.push(tty_event("remove", dev_node, node))
        await wait_state(bridge, "offline")
        await asyncio.sleep(1.0)  # five rechecks
        assert bridge.workers[POI].state()["state"] == "offline"
        monitor.push(tty_event("add", dev_node, node))
        await wait_state(bridge, "online")
        # Unplugged for real: udev says so; back a second later, udev saying nothing
        simulator.unplug()
        monitor.push(tty_event("remove", dev_node, node))
        await wait_state(bridge, "offline")
        assert not os.path.lexists(dev_node)
        await wait_state(bridge, "online", timeout=10)
        assert simulator.replugs == 1 and os.path.exists(dev_node)
        said = [r.getMessage() for r in caplog.records if "udev never announced" in r.getMessage()]
        assert len(said) == 1 and dev_node in said[0], said
        await asyncio.sleep(0.5)  # its look at the nodes over, the daemon runs on
        assert bridge.exit_status == 0 and not bridge._stop.is_set()
    finally:
        await bridge.stop()
        await simulator.close()
        monitor.close()


async def test_a_replug_quicker_than_the_recheck_is_used_though_never_seen_gone(
        tmp_path, dev_node, caplog):
    """Review: udev's remove event was handled while the terminal's node was still there,
    and the terminal was back, unannounced, before the next recheck: its node was never seen
    gone, and a node there was never taken for it back, so it stayed offline until a restart.
    A node made since the unplug (another node than the one udev said went) is it back."""
    simulator, bridge, monitor, node = await rechecked_terminal(
        tmp_path, dev_node, replug_after=0.2, recheck_absent=1.5)
    await bridge.start()
    try:
        await wait_state(bridge, "online")
        monitor.push(tty_event("remove", dev_node, node))  # udev first, the node still there
        await wait_state(bridge, "offline")
        assert os.path.lexists(dev_node)
        simulator.unplug()  # gone, and back 0.2 s later: before any recheck looked
        async with asyncio.timeout(5):
            while not simulator.replugs:
                await asyncio.sleep(0.05)
        assert os.path.exists(dev_node)
        await wait_state(bridge, "online", timeout=10)
        said = [r.getMessage() for r in caplog.records if "udev never announced" in r.getMessage()]
        assert len(said) == 1 and dev_node in said[0], said
    finally:
        await bridge.stop()
        await simulator.close()
        monitor.close()


async def test_the_recheck_of_an_unplugged_terminal_leaves_a_node_udev_gave_another_alone(
        tmp_path, caplog):
    """As for a terminal absent at start (0548ddd): terminal B, configured by a kernel name
    (ttyUSB0), unplugged while running; terminal A's adapter, replugged, comes back under
    that very name, which udev gives to A by its stable link. The recheck leaves it to A."""
    a, b = "V400m-324688179", "V400m-999999999"
    tag = uuid.uuid4().hex[:8]
    a_link = f"/dev/poi-bridge-test-byid-{tag}"  # A: a stable udev link (by-id, /dev/poi)
    b_node = f"/dev/poi-bridge-test-ttyUSB0-{tag}"  # B: a kernel name
    a_sim = SimulatorServer(Scenario(poi_id=a, default=Behaviour(delay=0.05),
                                     link=LinkBehaviour(status_hold=0.05)))
    b_sim = SimulatorServer(Scenario(poi_id=b, default=Behaviour(delay=0.05),
                                     link=LinkBehaviour(status_hold=0.05, replug_after=3600)))
    await a_sim.start_pty(str(tmp_path / "pty-a"))
    await b_sim.start_pty(b_node)
    a_pty = os.path.realpath(tmp_path / "pty-a")
    os.symlink(a_pty, a_link)
    config = parse_config({"journal": str(tmp_path / "journal.sqlite3"), "mqtt": {"port": 1},
                           "terminals": [
                               {"poi_id": a, "link": {"kind": "serial", "device": a_link}},
                               {"poi_id": b, "link": {"kind": "serial", "device": b_node}}]})

    def b_event(action: str) -> dict[str, str]:
        return {**tty_event(action, "", b_node), "ID_SERIAL_SHORT": "999999999",
                "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/ttyUSB0"}

    bridge = Bridge(config, hotplug=False)
    monitor = PipeMonitor()
    a_first = f"/dev/poi-bridge-test-ttyUSB1-{tag}"
    present = [tty_event("add", a_link, a_first), b_event("add")]
    bridge.hotplug = HotplugMonitor(TerminalMatcher(config), bridge._plugged, bridge._unplugged,
                                    monitor=monitor, enumerate_devices=lambda: list(present),
                                    settle=0.01)
    bridge.recheck_absent = 0.2
    await bridge.start()
    try:
        async with asyncio.timeout(10):
            while not all(bridge.workers[t].state()["state"] == "online" for t in (a, b)):
                await asyncio.sleep(0.05)
        b_sim.unplug()  # B's cable out: its node goes
        monitor.push(b_event("remove"))
        monitor.push(tty_event("remove", a_link, a_first))  # A's adapter replugged...
        await asyncio.sleep(0.6)  # (B's node seen gone by the rechecks)
        assert not os.path.lexists(b_node)
        # ... back under B's kernel name, udev giving it to A
        await given_to_a_and_left_to_it(bridge, monitor, caplog, a, b, a_pty, a_link, b_node)
    finally:
        await bridge.stop()
        await a_sim.close()
        await b_sim.close()
        monitor.close()
        for path in (a_link, b_node):
            if os.path.lexists(path):
                os.unlink(path)

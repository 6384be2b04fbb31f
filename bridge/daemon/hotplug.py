"""Hotplug: which configured terminal is plugged in right now, learnt from udev.

Which terminal a device is, `TerminalMatcher` says (bridge/daemon/device_match.py); when,
`HotplugMonitor` here: a udev netlink monitor read from the asyncio loop (`loop.add_reader` on
its fd, draining `poll(0)`). It starts the monitor before enumerating the devices already
present, so nothing plugged in between is missed, and de-duplicates: a device seen by the
enumeration and again as an 'add' event is reported once, a repeated 'add' is ignored, and a
'remove' of a device it never saw is ignored. Events are collected for `settle` seconds and
applied per device with the final state winning, so a storm of hundreds of add/remove events (a
flaky cable, a hub reset) turns into at most one unplug and one plug per terminal, without
blocking the loop. If the kernel drops events (receive buffer overflow) the monitor
re-enumerates and reconciles.

Callback contract: `on_plug(poi_id, device)` when a terminal's device appears (or is back on a
different device node), `on_unplug(poi_id, device)` when it goes away; `device` is a
`DeviceInfo`.  Either may be a plain function or a coroutine function; calls are made one at a
time, in order, from a task on the loop, and an exception in one is logged and does not stop
the monitor.  For a terminal, plug and unplug strictly alternate, starting with plug.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.config import Config
from bridge.daemon import quiet
from bridge.daemon.device_match import (
    DeviceInfo,
    MatchResult,
    TerminalMatcher,
    describe_link,
)
from bridge.daemon.quiet import QuietRepeats

log = logging.getLogger(__name__)

DEFAULT_SETTLE = 0.1
# Longest a batch waits for a storm still being read before it is applied anyway.
DEFAULT_MAX_DELAY = 2.0
DEFAULT_RECEIVE_BUFFER = 8 * 1024 * 1024
# Events handled per wake-up of the reader; the rest wait for the next loop iteration so a storm
# cannot starve the terminals' I/O.
MAX_EVENTS_PER_READ = 256
# s: after a read error that is no overflow, udev's socket is read again this much later
READ_RETRY = 1.0

# Where systemd-udevd keeps its control socket: without it no udevd runs (a container, a
# minimal image), and pyudev's netlink socket opens all the same but never hears an event.
UDEV_RUN = "/run/udev"

# Actions after which the device exists; 'remove' means gone.  'unbind'/'offline' only detach
# a driver (a usb_device gets 'unbind' just before 'remove'): the node is still there.
_PRESENT_ACTIONS = frozenset({"add", "change", "bind", "move", "online"})
_IGNORED_ACTIONS = frozenset({"unbind", "offline"})


# --- the monitor ---------------------------------------------------------------------------------


class MonitorLike(Protocol):
    """What HotplugMonitor needs of a pyudev.Monitor (so tests can inject a fake)."""

    def fileno(self) -> int: ...

    def poll(self, timeout: float | None = None) -> Any: ...

    def start(self) -> None: ...


Callback = Callable[[str, DeviceInfo], Awaitable[None] | None]


@dataclass
class _Known:
    info: DeviceInfo
    poi_id: str | None


@dataclass
class _Pending:
    last: DeviceInfo
    saw_remove: bool = False


def _default_enumerate(context: Any) -> Callable[[], Iterable[Any]]:
    def enumerate_devices() -> Iterable[Any]:
        yield from context.list_devices(subsystem="tty")
        yield from context.list_devices(subsystem="usb", DEVTYPE="usb_device")
    return enumerate_devices


def udev_announces(device: str) -> bool:
    """Whether udev will tell the matcher about this configured serial device, so that "not
    plugged in" can be left to udev: a node not there yet under /dev (udev makes it when the
    device appears; a symlink to it is followed by the matcher), or a tty udev knows by the
    same name.  Not a pseudo-terminal or a path outside /dev, and not a node that exists
    but that no tty in sysfs backs under that name (a node made with mknod, a /dev without
    udev, something that is not a tty): udev never reports those as this terminal, so their
    workers are never shut off but retry the node with backoff."""
    path = os.path.realpath(device)
    if not path.startswith("/dev/") or path.startswith("/dev/pts/"):
        return False
    try:
        node = os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # in doubt, let the worker retry: shut off, it would never be opened
    if not stat.S_ISCHR(node.st_mode):
        return False
    sysfs = f"/sys/dev/char/{os.major(node.st_rdev)}:{os.minor(node.st_rdev)}"
    if os.path.basename(os.path.realpath(f"{sysfs}/subsystem")) != "tty":
        return False
    try:
        with open(f"{sysfs}/uevent", encoding="utf-8") as uevent:
            names = [line.strip().removeprefix("DEVNAME=") for line in uevent
                     if line.startswith("DEVNAME=")]
    except OSError:
        return False
    # The matcher compares udev's DEVNAME, which is the kernel's name for the node.
    return names == [path.removeprefix("/dev/")]


# What tells one device node from another made later under the same path: its target,
# inode, device number and change time (a pty or ttyUSB number comes back reused).
NodeIdentity = tuple[str, int, int, int]


def node_identity(path: str) -> NodeIdentity | None:
    """The identity of the node at `path` (a udev symlink followed), None if none is there."""
    try:
        real = os.path.realpath(path)
        node = os.stat(real)
    except OSError:
        return None
    return real, node.st_ino, node.st_rdev, node.st_ctime_ns


class UdevNotRunning(OSError):
    """No udevd: nothing would ever announce a terminal being plugged in."""


def udev_running(run_dir: str = UDEV_RUN) -> bool:
    """Whether systemd-udevd (or eudev) runs: its control socket is there."""
    return os.path.exists(os.path.join(run_dir, "control"))


class HotplugMonitor:
    """Tells the daemon when configured terminals are plugged in and out.

    `matcher`: a TerminalMatcher, or the Config to build one from.
    `monitor`: a pyudev.Monitor-like object (fileno(), poll(timeout), start()); by default a
    netlink monitor on `source` ("udev": events after udev's rules, with DEVLINKS and ID_*
    properties; "kernel": raw kernel events) filtered to tty and usb_device.
    `enumerate_devices`: returns the devices present now (pyudev Devices or property mappings);
    by default a pyudev enumeration of tty and usb_device devices.
    `settle`: seconds to collect events before applying them (the storm window); while the
    reader still has events queued the batch waits, up to `max_delay` seconds in all.
    `tag`: only look at devices carrying this udev tag (e.g. TAG, "poi-bridge", which
    udev/70-poi-bridge.rules and the generated rules set), filtered in the kernel socket.  Off
    by default: a terminal configured by a plain /dev/ttyS0 or /dev/ttyACM0 path, whose vendor
    no rule knows, has no tag and would never be seen.
    `udev_run`: udev's run directory; without its control socket start() raises
    UdevNotRunning rather than open a netlink socket nobody sends to (an injected `monitor`
    is not checked).
    """

    def __init__(self, matcher: TerminalMatcher | Config, on_plug: Callback, on_unplug: Callback,
                 *, monitor: MonitorLike | None = None,
                 enumerate_devices: Callable[[], Iterable[Any]] | None = None,
                 context: Any = None, source: str = "udev", settle: float = DEFAULT_SETTLE,
                 receive_buffer: int = DEFAULT_RECEIVE_BUFFER,
                 max_events_per_read: int = MAX_EVENTS_PER_READ,
                 max_delay: float = DEFAULT_MAX_DELAY, tag: str | None = None,
                 udev_run: str = UDEV_RUN) -> None:
        if not isinstance(matcher, TerminalMatcher):
            matcher = TerminalMatcher(matcher)
        if settle < 0:
            raise ValueError("settle must be >= 0 seconds")
        self.matcher = matcher
        self._on_plug = on_plug
        self._on_unplug = on_unplug
        self._monitor = monitor
        self._enumerate = enumerate_devices
        self._context = context
        self._source = source
        self._settle = settle
        self._receive_buffer = receive_buffer
        self._max_events = max(1, max_events_per_read)
        self._max_delay = max(max_delay, settle)
        self._tag = tag
        self._udev_run = udev_run

        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._devices: dict[str, _Known] = {}              # devpath -> last known state
        self._terminal_devices: dict[str, dict[str, DeviceInfo]] = {}  # poi_id -> devpath -> info
        self._current: dict[str, DeviceInfo] = {}          # poi_id -> device reported by on_plug
        self._pending: dict[str, _Pending] = {}
        self._flush_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._batch_started: float | None = None  # loop time of the oldest pending event
        self._backlog = False  # the last read stopped at max_events: more may be queued
        self._queue: asyncio.Queue[tuple[str, str, DeviceInfo]] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._resync_wanted = False
        self._warned_ambiguous: set[str] = set()
        # serial-link poi_id -> (vendor, product, serial) of the device it was last plugged in
        # on: the same adapter back under another kernel name is said (_unused_device)
        self._last_adapter: dict[str, tuple[str, str, str | None]] = {}
        # A flapping cable: a terminal's first unplug in full, the others counted
        # (quiet.LINK_LOSSES_QUIET), and the plug back of one only counted is as quiet
        self._unplugs_said = QuietRepeats(quiet.LINK_LOSSES_QUIET, self._unplugs_summed)
        self._unreadable_said = QuietRepeats(quiet.LINK_LOSSES_QUIET)  # by device path
        self._counted_unplug: dict[str, str] = {}  # poi_id -> the device it was counted on
        self.counters = {"events": 0, "ignored": 0, "coalesced": 0, "plugs": 0, "unplugs": 0,
                         "overflows": 0}

    # --- public ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._fd is not None

    def present(self) -> dict[str, DeviceInfo]:
        """poi_id -> the device it is plugged in on, for the terminals plugged in now."""
        return dict(self._current)

    def is_present(self, poi_id: str) -> bool:
        return poi_id in self._current

    def absent(self) -> list[str]:
        """The serial/USB terminals whose device is not plugged in now (configuration order).
        Right after start(), these are the ones to mark offline: on_unplug is only called for
        a terminal that was plugged in."""
        return [t.poi_id for t in self.matcher.hotplug_terminals if t.poi_id not in self._current]

    @property
    def monitor(self) -> MonitorLike | None:
        """The udev monitor being read (after start())."""
        return self._monitor

    async def start(self) -> None:
        """Start listening, then report the terminals already present.  Returns once on_plug
        has run for each of them."""
        if self._fd is not None:
            raise RuntimeError("HotplugMonitor is already running")
        if self._monitor is None and not udev_running(self._udev_run):
            raise UdevNotRunning(f"udevd is not running (no {self._udev_run}/control)")
        self._loop = asyncio.get_running_loop()
        monitor = self._monitor if self._monitor is not None else self._open_netlink()
        self._monitor = monitor
        start = getattr(monitor, "start", None)
        if start is not None:
            start()  # before enumerating: a device plugged in meanwhile is then an event
        if self._enumerate is None:
            self._enumerate = _default_enumerate(self._pyudev_context())
        self._queue = asyncio.Queue()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="hotplug callbacks")
        try:
            self._apply(self._enumerated(), initial=True)
            self._fd = monitor.fileno()
            self._loop.add_reader(self._fd, self._on_readable)
        except BaseException:
            self._fd = None
            await self.stop()
            raise
        present = ", ".join(sorted(self._current)) or "none"
        missing = self.absent()
        log.info("hotplug: watching udev for terminals; present: %s", present)
        for poi_id in missing:
            terminal = next(t for t in self.matcher.terminals if t.poi_id == poi_id)
            device = getattr(terminal.link, "device", None)
            if device and not udev_announces(device):
                # Its worker opens the node directly and says so if it cannot; udev will never
                # report it, so "not plugged in" would be wrong for a node that is there.
                continue
            log.warning("terminal %s: its device (%s) is not plugged in, or the device in "
                        "the configuration is wrong; it will be used as soon as it appears "
                        "(check the cable; `poi-bridge devices` lists what is connected and "
                        "the device to configure)", poi_id, describe_link(terminal))
        await self._queue.join()

    async def stop(self) -> None:
        """Stop listening; no callback runs after this returns."""
        self._unplugs_said.flush()
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._fd = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._pending.clear()
        self._batch_started = None
        self._backlog = False
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            try:
                await self._dispatcher
            except asyncio.CancelledError:
                pass
            self._dispatcher = None

    async def __aenter__(self) -> HotplugMonitor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_idle(self) -> None:
        """Until the collected events are applied and their callbacks have run."""
        while self._flush_handle is not None or self._pending:
            await asyncio.sleep(self._settle / 2 or 0)
        if self._queue is not None:
            await self._queue.join()

    def rematch(self, matcher: TerminalMatcher) -> None:
        """The terminals' links changed (the daemon followed terminals found on each other's
        links): every known device is matched again, without plug or unplug events, since no
        device came or went."""
        self.matcher = matcher
        self._terminal_devices.clear()
        self._current.clear()
        for devpath, known in list(self._devices.items()):
            match = matcher.match(known.info)
            self._devices[devpath] = _Known(known.info, match.poi_id)
            if match.poi_id is not None:
                self._terminal_devices.setdefault(match.poi_id, {})[devpath] = known.info
                self._current.setdefault(match.poi_id, known.info)

    def resync(self) -> None:
        """Re-enumerate and reconcile, e.g. after events were lost.  Runs on the next settle."""
        self._resync_wanted = True
        self._schedule_flush()

    # --- reading ---------------------------------------------------------------------------

    def _pyudev_context(self) -> Any:
        if self._context is None:
            import pyudev

            self._context = pyudev.Context()
        return self._context

    def _open_netlink(self) -> Any:
        import pyudev

        monitor = pyudev.Monitor.from_netlink(self._pyudev_context(), source=self._source)
        monitor.filter_by("tty")
        monitor.filter_by("usb", device_type="usb_device")
        if self._tag:
            monitor.filter_by_tag(self._tag)
        try:
            monitor.set_receive_buffer_size(self._receive_buffer)
        except (OSError, AttributeError) as exc:
            # Needs CAP_NET_ADMIN beyond net.core.rmem_max; the unit gives no capabilities.
            # An overflow is detected and repaired by re-enumerating, so this is no failure.
            log.info("hotplug: could not raise the udev receive buffer to %d bytes (%s; "
                     "normal under the unit: no CAP_NET_ADMIN); an event storm may overflow "
                     "it, which triggers a rescan",
                     self._receive_buffer, exc)
        return monitor

    def _enumerated(self) -> list[DeviceInfo]:
        assert self._enumerate is not None
        out = []
        for device in self._enumerate():
            try:
                info = DeviceInfo.from_device(device)
            except Exception as exc:  # one device's oddity must not hide the others
                self._unreadable(device, "the enumerated device", exc)
                continue
            if self._tag and self._tag not in info.tags:
                continue
            if self.matcher.match(info).relevant:
                out.append(info)
        return out

    def _on_readable(self) -> None:
        assert self._monitor is not None
        self._backlog = True
        for _ in range(self._max_events):
            try:
                event = self._monitor.poll(0)
            except OSError as exc:
                code = exc.errno if exc.errno is not None else self._socket_error()
                if code == errno.ENOBUFS:
                    self.counters["overflows"] += 1
                    log.warning("hotplug: udev events were lost (receive buffer overflow during "
                                "an event storm); rescanning the devices")
                    self.resync()
                    continue
                log.error("hotplug: reading udev events failed: %s; rescanning the devices, "
                          "and reading them again in %g s", exc, READ_RETRY)
                self._backlog = False
                self.resync()
                self._pause_reading()
                return
            if event is None:
                self._backlog = False
                return
            # An exception escaping into the event loop lost the event with no rescan: a USB
            # terminal's plug so lost left it offline until a restart (review rev4)
            try:
                info = DeviceInfo.from_device(event)
            except Exception as exc:
                self._unreadable(event, "an event of", exc)
                self.resync()
                continue
            try:
                self._receive(info)
            except Exception:
                log.exception("hotplug: handling the udev event of %s failed (a fault of the "
                              "bridge: please report it); rescanning the devices", info.devpath)
                self.resync()

    def _unreadable(self, device: Any, what: str, exc: Exception) -> None:
        """Said once a LINK_LOSSES_QUIET for each device: a rescan meets it again."""
        path = getattr(device, "device_path", None) or "?"
        log.log(logging.WARNING if self._unreadable_said.tell(path) else logging.DEBUG,
                "hotplug: %s %s could not be read (%s: %s); it is left out. If it is a "
                "terminal and stays unseen, look at `udevadm info --query=property "
                "--path=%s` for a property that is not UTF-8 (a local udev rule's or "
                "hwdb's)", what, path, type(exc).__name__, exc, path)

    def _socket_error(self) -> int | None:
        """The monitor socket's pending error, taken (SO_ERROR). pyudev raises on POLLERR
        before it reads, with no errno, and never reads: after a receive-buffer overflow the
        kernel's ENOBUFS, and POLLERR with it, stayed, and the loop called back at once, again
        and again (an ERROR line each, a core busy: review rv26)."""
        assert self._fd is not None
        try:
            with socket.socket(fileno=os.dup(self._fd)) as sock:
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or None
        except OSError:
            return None

    def _pause_reading(self) -> None:
        """An error that reading does not clear would call back at once, for ever: the
        rescan just asked for covers the devices meanwhile."""
        if self._fd is None or self._loop is None:
            return
        fd = self._fd
        self._loop.remove_reader(fd)

        def resume() -> None:
            if self._fd == fd and self._loop is not None:
                self._loop.add_reader(fd, self._on_readable)
        self._loop.call_later(READ_RETRY, resume)

    def _receive(self, info: DeviceInfo) -> None:
        self.counters["events"] += 1
        action = info.action or "add"
        if action in _IGNORED_ACTIONS:
            return
        if self._tag and self._tag not in info.tags:
            # The kernel-side filter does this for a real monitor; an injected one may not.
            self.counters["ignored"] += 1
            return
        if not self.matcher.match(info).relevant:
            self.counters["ignored"] += 1
            return
        if action == "move":
            old = info.properties.get("DEVPATH_OLD")
            if old:
                self._note(old, DeviceInfo.from_device({**info.properties, "DEVPATH": old,
                                                        "ACTION": "remove"}))
        self._note(info.devpath, info)

    def _note(self, devpath: str, info: DeviceInfo) -> None:
        pending = self._pending.get(devpath)
        if pending is None:
            self._pending[devpath] = _Pending(info, info.action == "remove")
        else:
            self.counters["coalesced"] += 1
            pending.last = info
            pending.saw_remove = pending.saw_remove or info.action == "remove"
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            if self._batch_started is None:
                self._batch_started = self._loop.time()
            self._flush_handle = self._loop.call_later(self._settle, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        assert self._loop is not None
        if self._backlog and self._fd is not None:
            # The last read stopped at max_events, so events may still be queued in the
            # socket: applying now would split one storm into several batches.  Read on (still
            # bounded), and wait for the rest unless the batch is already max_delay old.
            self._on_readable()
            started = self._batch_started if self._batch_started is not None else 0.0
            if self._backlog and self._loop.time() - started < self._max_delay:
                self._schedule_flush()
                return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._batch_started = None
        batch, self._pending = self._pending, {}
        if self._resync_wanted:
            self._resync_wanted = False
            self._reconcile(batch)
        changes = [(devpath, p.last, p.saw_remove) for devpath, p in batch.items()]
        self._apply_changes(changes)

    def _reconcile(self, batch: dict[str, _Pending]) -> None:
        """Turn a fresh enumeration into events: known devices that are gone become removes,
        present ones adds (which change nothing for devices already known).  Events were lost,
        so an event in the batch may be stale (a 'remove' whose later 'add' was dropped): the
        enumeration, taken after every event in the batch, decides presence for every device.
        The batch only adds that a device went away meanwhile, so a replug of a device that
        is back still gives unplug, then plug."""
        try:
            now = {info.devpath: info for info in self._enumerated()}
        except Exception:
            log.exception("hotplug: rescanning devices failed; relying on events only")
            return
        for devpath in dict.fromkeys([*self._devices, *batch]):  # in a stable order
            if devpath in now:
                continue
            known = self._devices.get(devpath)
            if known is None:
                del batch[devpath]  # seen only in lost-event times, and gone now
                continue
            batch[devpath] = _Pending(DeviceInfo.from_device(
                {**known.info.properties, "ACTION": "remove"}), True)
        for devpath, info in now.items():
            pending = batch.get(devpath)
            batch[devpath] = _Pending(DeviceInfo.from_device({**info.properties, "ACTION": "add"}),
                                      pending is not None and pending.saw_remove)

    # --- state -----------------------------------------------------------------------------

    def _apply(self, infos: Iterable[DeviceInfo], initial: bool = False) -> None:
        self._apply_changes([(info.devpath, info, False) for info in infos], initial=initial)

    def _apply_changes(self, changes: list[tuple[str, DeviceInfo, bool]],
                       initial: bool = False) -> None:
        lost: dict[str, set[str]] = {}
        gained: dict[str, list[DeviceInfo]] = {}
        for devpath, info, saw_remove in changes:
            known = self._devices.get(devpath)
            if info.action == "remove":
                if known is None:
                    log.debug("hotplug: remove of %s, a device never seen present: ignored",
                              devpath)
                    continue
                del self._devices[devpath]
                if known.poi_id is not None:
                    lost.setdefault(known.poi_id, set()).add(devpath)
                continue
            match = self.matcher.match(info)
            if not match.relevant:
                continue
            if known is not None and not saw_remove and known.poi_id == match.poi_id:
                # Already present (an enumerated device's own 'add', a repeated 'add', a
                # 'change' that changes nothing the bridge cares about).
                self._devices[devpath] = _Known(info, match.poi_id)
                if match.poi_id is not None:
                    self._terminal_devices.setdefault(match.poi_id, {})[devpath] = info
                    current = self._current.get(match.poi_id)
                    if current is not None and current.devpath == devpath:
                        self._current[match.poi_id] = info  # fresher properties, same device
                continue
            if known is not None and known.poi_id is not None:
                lost.setdefault(known.poi_id, set()).add(devpath)
            self._devices[devpath] = _Known(info, match.poi_id)
            if match.poi_id is None:
                self._unused_device(info, match, initial)
                continue
            gained.setdefault(match.poi_id, []).append(info)
        if lost:
            self._rematch_known({devpath for devpath, _, _ in changes}, lost, gained)
        for poi_id in sorted(set(lost) | set(gained)):
            self._update_terminal(poi_id, lost.get(poi_id, set()), gained.get(poi_id, []),
                                  initial)

    def _unused_device(self, info: DeviceInfo, match: MatchResult, initial: bool) -> None:
        """A device that is no configured terminal, once per appearance (a repeated add
        changes nothing): said when it is probably one that should be."""
        how = "present" if initial else "plugged in"
        if match.near:
            # The model of a configured terminal with another serial number: a technician who
            # swapped a broken terminal saw only "unplugged ... check its USB cable"
            poi_id = match.near[0]
            replaced = poi_id not in self._current
            if info.subsystem == "tty":
                change = f'device = "{info.config_device}"'
            else:
                change = f'link.serial = "{info.serial}"'
            log.warning("hotplug: %s is %s; %s. It is %s: change that terminal's poi_id and "
                        "%s in the configuration, or, for a new terminal, add a [[terminals]] "
                        "entry with %s; then restart (systemctl restart poi-bridge): README "
                        "\"Adding or replacing a terminal\"", info.describe(), how,
                        match.reason, f"probably a replacement for terminal {poi_id}"
                        if replaced else f"another terminal of the model of {poi_id} (which "
                        f"is plugged in too), or probably a replacement for it", change, change)
            return
        back = self._adapter_back(info)
        if back is not None:
            poi_id, stable = back
            log.warning("terminal %s's adapter is back as %s; configure %s (a kernel name "
                        "changes between plugs)", poi_id, info.devname, stable)
            return
        if info.tagged and info.subsystem == "tty":
            # A payment terminal by udev's rules that nobody configured: a new terminal.
            log.info("hotplug: %s, a payment terminal by the udev rules, is %s and no "
                     "configured terminal uses it. To bridge it, add a [[terminals]] entry "
                     "with device = \"%s\" and restart (systemctl restart poi-bridge): the "
                     "configuration is read only at start", info.describe(), how,
                     info.config_device)
        else:
            log.debug("hotplug: %s %s ignored: %s", info.action or "present", info.describe(),
                      match.reason)

    def _adapter_back(self, info: DeviceInfo) -> tuple[str, str] | None:
        """(poi_id, the path to configure) if `info` is the adapter a serial terminal, absent
        now, was last plugged in on, back under another node: its configured kernel name
        (/dev/ttyUSB0) is another adapter's, or none, now."""
        if info.subsystem != "tty" or not (info.vendor_id and info.product_id):
            return None
        adapter = (info.vendor_id, info.product_id, info.serial)
        for poi_id, last in self._last_adapter.items():
            if last == adapter and poi_id not in self._current:
                stable = sorted(info.devlinks, key=lambda link: (
                    not link.startswith("/dev/poi/"), not link.startswith("/dev/serial/by-id/"),
                    not link.startswith("/dev/serial/by-path/"), len(link)))
                return poi_id, stable[0] if stable else "its /dev/serial/by-path/ link"
        return None

    def _rematch_known(self, changed: set[str], lost: dict[str, set[str]],
                       gained: dict[str, list[DeviceInfo]]) -> None:
        """A terminal's device went away. A link made by hand (/etc/poi-bridge/terminal ->
        /dev/ttyUSB0) may meanwhile have been pointed at a device already present (the
        terminal moved to another adapter, then the old one was unplugged): no event announces
        that device again, so the devices already known are matched again, each configured
        link followed anew, and one that is now a terminal's (or no longer) counts as plugged
        in (or out) for it."""
        for devpath, known in list(self._devices.items()):
            if devpath in changed:
                continue
            match = self.matcher.match(known.info)
            if not match.relevant or match.poi_id == known.poi_id:
                continue
            self._devices[devpath] = _Known(known.info, match.poi_id)
            if known.poi_id is not None:
                lost.setdefault(known.poi_id, set()).add(devpath)
            if match.poi_id is not None:
                gained.setdefault(match.poi_id, []).append(known.info)

    def _update_terminal(self, poi_id: str, lost: set[str], gained: list[DeviceInfo],
                         initial: bool) -> None:
        devices = self._terminal_devices.setdefault(poi_id, {})
        for devpath in lost:
            devices.pop(devpath, None)
        for info in gained:
            devices[info.devpath] = info
        current = self._current.get(poi_id)
        if current is not None and current.devpath in lost:
            del self._current[poi_id]
            self._emit("unplug", poi_id, current)
            current = None
        if current is None and devices:
            newest = gained[-1] if gained else next(iter(devices.values()))
            self._current[poi_id] = newest
            self._emit("plug", poi_id, newest, initial=initial)
        if len(devices) > 1:
            if poi_id not in self._warned_ambiguous:
                self._warned_ambiguous.add(poi_id)
                nodes = ", ".join(sorted(d.devname or d.devpath for d in devices.values()))
                log.warning("terminal %s: %d devices match its configuration (%s); %s. "
                            "Set link.serial (USB; link.port if it reports no serial number); "
                            "for a serial link, a /dev/poi/ path, or "
                            "/dev/serial/by-id/ if the device reports a USB serial number, else "
                            "/dev/serial/by-path/ (its USB port), so exactly one device "
                            "matches", poi_id, len(devices), nodes, self._in_use(poi_id))
        else:
            self._warned_ambiguous.discard(poi_id)
        if not devices:
            del self._terminal_devices[poi_id]

    def _in_use(self, poi_id: str) -> str:
        """Which of a terminal's devices its worker opens: for a serial link through a symlink
        (a by-id name two adapters without serial number share) the one the link points to
        now, which udev sets to the last plugged in, not the first the monitor saw."""
        terminal = next((t for t in self.matcher.terminals if t.poi_id == poi_id), None)
        device = getattr(terminal.link, "device", None) if terminal is not None else None
        if device is None:
            return f"using {self._current[poi_id].devname}"
        target = self.matcher.points_to(device)
        return f"{device} points to {target} now" if target else f"using {device}"

    def _emit(self, kind: str, poi_id: str, info: DeviceInfo, initial: bool = False) -> None:
        if kind == "plug":
            self.counters["plugs"] += 1
            terminal = next((t for t in self.matcher.terminals if t.poi_id == poi_id), None)
            if (terminal is not None and terminal.link.kind == "serial" and info.vendor_id
                    and info.product_id):
                self._last_adapter[poi_id] = (info.vendor_id, info.product_id, info.serial)
            # (back on another device than the one unplugged: news, said in full)
            quiet_plug = self._counted_unplug.pop(poi_id, None) == info.describe()
            log.log(logging.DEBUG if quiet_plug else logging.INFO, "terminal %s: device %s %s",
                    poi_id, info.describe(), "present" if initial else "plugged in")
        else:
            self.counters["unplugs"] += 1
            if self._unplugs_said.tell(poi_id, info.describe()):
                self._counted_unplug.pop(poi_id, None)
                log.warning("terminal %s: device %s unplugged; the terminal is offline until "
                            "it is plugged back in (check its USB cable and power)", poi_id,
                            info.describe())
            else:
                self._counted_unplug[poi_id] = info.describe()
                log.debug("terminal %s: device %s unplugged again (counted)", poi_id,
                          info.describe())
        assert self._queue is not None
        self._queue.put_nowait((kind, poi_id, info))

    def _unplugs_summed(self, poi_id: Any, count: int, device: Any, interval: float) -> None:
        """The summary of a terminal's unplugs after the first (quiet.LINK_LOSSES_QUIET)."""
        log.warning("terminal %s: device %s unplugged %d more %s in the last %s: a loose USB "
                    "cable or adapter, a worn port, or the terminal's power? Check the cable "
                    "is firmly in at both ends, try another port or cable, and check its "
                    "power supply; %s", poi_id, device, count,
                    "time" if count == 1 else "times", quiet.window(interval),
                    "plugged in now" if poi_id in self._current
                    else "unplugged now: offline until it is plugged back in")

    async def _dispatch(self) -> None:
        assert self._queue is not None
        while True:
            kind, poi_id, info = await self._queue.get()
            callback = self._on_plug if kind == "plug" else self._on_unplug
            try:
                result = callback(poi_id, info)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                self._queue.task_done()
                raise
            except Exception:
                log.exception("terminal %s: the %s handler for %s failed", poi_id, kind,
                              info.devname or info.devpath)
            self._queue.task_done()

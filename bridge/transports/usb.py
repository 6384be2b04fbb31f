"""USB transport: a terminal's vendor-specific bulk interface, driven with pyusb (libusb-1.0).

Some terminals offer no serial port, only an interface with one bulk OUT and one bulk IN
endpoint. pyusb is blocking and knows nothing of hotplug, so:

- Transfers run in two threads owned by this transport: one for the IN endpoint, one for
  everything else (opening, OUT transfers, closing). A read waiting for the terminal never
  holds up a write, transfers in one direction never interleave, and several USB terminals
  do not compete for the event loop's shared thread pool.
- A read transfer blocks for at most READ_POLL; a libusb timeout only means "nothing yet", so
  read() simply starts another one. close() and cancellation therefore wait at most that long.
- A read() cancelled while its transfer is in flight does not lose the bytes: the transfer
  stays pending and the next read() collects its result.
- The device going away (libusb NO_DEVICE / NOT_FOUND / IO, i.e. ENODEV / ENOENT / EIO)
  becomes LinkClosed; learning that it is back is the hotplug monitor's job, and the worker
  reopens the transport. IO on a transfer is said as a bus error (a bad cable, mostly),
  not as an unplug: the device is usually still there.
- A stalled endpoint (EPIPE) is cleared with CLEAR_FEATURE(ENDPOINT_HALT) and the transfer
  retried, a few times, before the link is given up.

Errors and logs name the terminal and the endpoint, never the bytes carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from collections.abc import Collection
from typing import Any

import usb.core
import usb.util

from bridge.config import UsbLink
from bridge.daemon.udev_rules import same_serial
from bridge.transports.base import LinkClosed, Transport

log = logging.getLogger(__name__)
# pyusb raises the built-in NotImplementedError for libusb's LIBUSB_ERROR_NOT_SUPPORTED (no
# kernel drivers to detach or give back on this platform): an answer of the library, handled
NOT_SUPPORTED_BY_LIBUSB = NotImplementedError

READ_POLL = 0.25  # seconds a read transfer may block its thread (bounds close and cancel)
READ_SIZE = 16 * 1024  # bytes asked for per read transfer, rounded down to whole packets
STALL_RETRIES = 3  # clear_halt + retry this often per transfer before giving up
WRITE_TIMEOUTS = 3  # consecutive write timeouts without progress before giving up
CLOSE_TIMEOUT = 5.0  # s, beyond a write transfer in flight (it holds the interface until done)

# errno as pyusb's libusb1 backend sets it, and libusb's own codes for backends that leave
# errno unset: the device is gone (LIBUSB_ERROR_IO, _NO_DEVICE, _NOT_FOUND).
_GONE_ERRNOS = {errno.ENODEV, errno.ENOENT, errno.EIO}
_GONE_CODES = {-1, -4, -5}
_IO_CODE = -1  # LIBUSB_ERROR_IO
_PIPE_CODE = -9  # LIBUSB_ERROR_PIPE: the endpoint stalled
_TIMEOUT_CODE = -7  # LIBUSB_ERROR_TIMEOUT
_DENIED, _GONE = "denied", "gone"  # why _read_serial could not read a serial number
_PERMISSION_FIX = ("install the udev rules (70-poi-bridge.rules, or `poi-bridge udev-rules` "
                   "for this terminal) and replug it")


@dataclass(slots=True)
class _Opened:
    device: Any  # usb.core.Device
    ep_in: Any  # usb.core.Endpoint
    ep_out: Any
    detached: bool  # we detached a kernel driver and owe it a re-attach
    serial: str | None


class UsbTransport(Transport):
    """Bytes over the bulk endpoints of one interface of one USB device.

    `backend` is handed to usb.core.find(); None lets pyusb pick libusb-1.0 (tests pass a
    simulated backend). read() returns what one bulk IN transfer brought (at least one
    byte); write() returns once the device has taken every byte.
    """

    kind = "usb"

    def __init__(self, link: UsbLink, *, backend: Any = None,
                 close_timeout: float = CLOSE_TIMEOUT,
                 taken_serials: Collection[str] = (),
                 taken_ports: Collection[str] = ()) -> None:
        """`taken_serials`, `taken_ports`: the serial numbers and USB ports other terminals
        with these ids are configured with. A link with neither never takes one of those
        devices: it would hold its interface, and that terminal could not open it (nor would
        it be followed there)."""
        self.link = link
        self.backend = backend
        self.taken_serials = tuple(taken_serials)
        self.taken_ports = tuple(taken_ports)
        # The release waits for a write transfer in flight (up to the link's timeout): given
        # up on sooner, the interface is still claimed, and the next open says "in use"
        self.close_timeout = close_timeout + link.timeout + READ_POLL
        self._serial = link.serial  # configured, or once open the one the device reports
        self._opened: _Opened | None = None
        self._in_thread: ThreadPoolExecutor | None = None
        self._out_thread: ThreadPoolExecutor | None = None
        self._pending_read: asyncio.Future[bytes] | None = None
        self._lost: str | None = None  # why the device went away, while still open
        self._closing: asyncio.Task[None] | None = None
        self._reason = f"{self._who()} is not open"
        self._read_ms = _millis(min(link.timeout, READ_POLL))
        self._write_ms = _millis(link.timeout)

    # --- Transport interface ----------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._opened is not None and self._lost is None

    def describe(self) -> str:
        serial = f" serial {self._serial}" if self._serial else ""
        port = f" port {self.link.port}" if self.link.port else ""
        return f"usb {self._ids()}{serial}{port} interface {self.link.interface}"

    async def open(self) -> None:
        if self._opened is not None:
            return
        if self._closing is not None:
            await self._await_closing()  # the previous handle must be released first
        out = ThreadPoolExecutor(1, thread_name_prefix=f"usb-out-{self._ids()}")
        pending = asyncio.get_running_loop().run_in_executor(out, self._open_device)
        try:
            opened = await asyncio.shield(pending)
        except asyncio.CancelledError:
            # The thread finishes opening anyway: give back whatever it claimed.
            pending.add_done_callback(lambda done: self._abandon_open(done, out))
            raise
        except BaseException:
            out.shutdown(wait=False)
            raise
        self._opened = opened
        self._serial = opened.serial or self._serial
        self._out_thread = out
        self._in_thread = ThreadPoolExecutor(1, thread_name_prefix=f"usb-in-{self._ids()}")
        self._lost = None
        self._reason = f"{self._who()} was closed"

    async def read(self) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            opened = self._live()
            pending = self._pending_read
            if pending is None:
                size = _read_size(opened.ep_in)
                pending = loop.run_in_executor(self._in_thread, self._read_once, opened,
                                               size, self._read_ms)
                self._pending_read = pending
            try:
                # Shielded: if this read() is cancelled the transfer still completes, and
                # the next read() picks its bytes up instead of losing them.
                data = await asyncio.shield(pending)
            except LinkClosed as exc:
                raise self._lose(exc.reason) from None
            finally:
                if pending.done() and self._pending_read is pending:
                    self._pending_read = None
            if data:
                return data
            # Timed out (or a zero-length packet): nothing yet, poll again.

    async def write(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data).cast("B")
        timeouts = 0
        while view:
            opened = self._live()
            try:
                written = await loop.run_in_executor(self._out_thread, self._write_once,
                                                     opened, bytes(view), self._write_ms)
            except LinkClosed as exc:
                raise self._lose(exc.reason) from None
            if written:
                view = view[written:]  # a short write: send the rest
                timeouts = 0
                continue
            timeouts += 1
            if timeouts >= WRITE_TIMEOUTS:
                raise self._lose(
                    f"{self._who()} is not taking data: {timeouts} writes in a row timed out "
                    f"after {self.link.timeout:g} s each (terminal busy, hung or rebooting?)")

    async def close(self) -> None:
        opened = self._opened
        if opened is not None:
            self._opened = None
            self._reason = self._lost or f"{self._who()} was closed"
            self._closing = asyncio.get_running_loop().create_task(
                self._shut(opened, self._pending_read, self._in_thread, self._out_thread))
            self._pending_read = self._in_thread = self._out_thread = None
        if self._closing is not None:
            await self._await_closing()

    # --- opening (in the OUT thread) ----------------------------------------------------------

    def _open_device(self) -> _Opened:
        device, serial = self._find()
        who = self._who(serial)
        number = self.link.interface
        detached = False
        step = "reading its configuration"
        try:
            # Check the interface before changing anything: a wrong `interface` setting must
            # not unbind a kernel driver from some other interface.
            config, unconfigured = _configuration(device)
            ep_in, ep_out = self._endpoints(config, who)
            step = "checking for a kernel driver"
            if _kernel_driver_active(device, number):
                step = "detaching the kernel driver"
                device.detach_kernel_driver(number)
                detached = True
                log.info("%s: detached the kernel driver from interface %d (given back on "
                         "close)", who, number)
            if unconfigured:
                # No kernel driver configured it: take the first configuration, as the
                # kernel would. Linux refuses this while a driver holds an interface.
                step = "selecting its configuration"
                device.set_configuration(config)
            step = f"claiming interface {number}"
            usb.util.claim_interface(device, number)
        except usb.core.USBError as exc:
            self._release(device, detached)
            raise LinkClosed(self._open_failure(who, step, exc)) from None
        except BaseException:
            self._release(device, detached)
            raise
        return _Opened(device, ep_in, ep_out, detached, serial)

    def _find(self) -> tuple[Any, str | None]:
        """The configured device and its serial number (None if it has none or it is
        unreadable); LinkClosed saying why when there is no single match."""
        link = self.link
        try:
            found = list(usb.core.find(find_all=True, backend=self.backend,
                                       idVendor=link.vendor_id, idProduct=link.product_id))
        except usb.core.NoBackendError:
            raise LinkClosed("cannot use USB terminals: libusb-1.0 is not installed on this "
                             "computer (install the libusb-1.0-0 package)") from None
        except usb.core.USBError as exc:
            raise LinkClosed(f"cannot list the USB devices: {_text(exc)}") from None
        if not found:
            raise LinkClosed(f"{self._who()} is not connected (unplugged, switched off, or "
                             f"wrong vendor_id/product_id in the configuration)")
        if link.port is not None:
            found = self._at_port(found)
        if link.serial is None and len(found) == 1:
            serial, problem, why = _read_serial(found[0])  # to name it in logs, and not to
            if not self._may_be_taken(found[0], serial, why):  # take another terminal's
                return found[0], serial
            _dispose(found[0])
            port = _port_path(found[0])
            which = (f"is at port {port}, which the configuration gives another terminal"
                     if port is not None and port in self.taken_ports else
                     f"has serial {serial}, which the configuration gives another terminal"
                     if serial is not None else
                     f"does not let its serial number be read ({problem}), and it may be "
                     f"another terminal's (one of these ids is configured by serial)")
            raise LinkClosed(
                f"{self._who()} is not connected: the only USB terminal {self._ids()} here "
                f"{which} (set `serial` or `port` in this terminal's link configuration)")
        chosen = None
        alive: list[tuple[Any, str | None]] = []
        free: list[tuple[Any, str | None]] = []  # alive, and no other terminal's
        labels = []
        denied = False
        for device in found:
            serial, problem, why = _read_serial(device)
            if why != _GONE:  # (one unplugged while being looked at is not there)
                alive.append((device, serial))
                if not self._may_be_taken(device, serial, why):
                    free.append((device, serial))
                labels.append(_label(device, serial, problem))
                denied = denied or why == _DENIED
            if chosen is None and link.serial is not None and same_serial(link.serial, serial):
                chosen = device
            else:
                _dispose(device)  # reading the serial number opened it
        if chosen is not None:
            return chosen, link.serial
        if not alive:
            raise LinkClosed(f"{self._who()} is not connected (unplugged while it was "
                             f"being opened)")
        if link.serial is None:
            if len(free) == 1:
                # the others went away meanwhile, or are other terminals' (their serials are
                # configured): this is the one no other terminal claims (opens again on use)
                return free[0]
            if not free and not denied:
                raise LinkClosed(
                    f"{self._who()} is not connected: the USB terminal(s) {self._ids()} here "
                    f"({', '.join(labels)}) are configured for other terminals (set `serial` "
                    "or `port` in this terminal's link configuration)")
        if denied:
            # Without access the serial numbers cannot be read, so which device is this
            # terminal cannot be told: the cure is the udev rules, not the configuration.
            raise LinkClosed(
                f"permission denied reading the serial number of USB terminal(s) "
                f"{self._ids()} ({', '.join(labels)}), so {self._who()} cannot be found "
                f"among them: {_PERMISSION_FIX}")
        if link.serial is None:
            # A terminal without a serial number can be told only by where it is plugged in
            raise LinkClosed(
                f"{len(alive)} USB terminals {self._ids()} are connected ({', '.join(labels)});"
                f" set `serial`, or `port` as shown, in this terminal's link configuration to "
                f"choose one")
        raise LinkClosed(
            f"{self._who()} is not connected; found USB terminal(s) {self._ids()} with "
            f"{', '.join(labels)} instead (wrong serial in the configuration?)")

    def _at_port(self, found: list[Any]) -> list[Any]:
        """Of the devices with these ids, the one at the configured port (as a list, for
        the choice by serial that follows); LinkClosed naming where they are if none is."""
        here = [device for device in found if _port_path(device) == self.link.port]
        if here:
            return here
        places = []
        for device in found:
            port = _port_path(device)
            places.append(f"port {port}" if port else
                          f"bus {device.bus} address {device.address}, port unknown")
        raise LinkClosed(
            f"{self._who()} is not connected: no USB terminal {self._ids()} is plugged into "
            f"port {self.link.port}; found at {', '.join(places)} instead (plugged into "
            f"another port, or wrong `port` in the configuration?)")

    def _may_be_taken(self, device: Any, serial: str | None, why: str | None) -> bool:
        """Whether a device may be one another terminal is configured with: it is at one of
        their ports, its serial is one of theirs, or it has one that could not be read (not
        for lack of permission: opening it fails then anyway, saying so). Never for a link
        with a port: the device there is this terminal, whatever it reports."""
        if self.link.port is not None:
            return False
        if self.taken_ports and _port_path(device) in self.taken_ports:
            return True
        if not self.taken_serials:
            return False
        if serial is None:
            return bool(device.iSerialNumber) and why is None
        return any(same_serial(taken, serial) for taken in self.taken_serials)

    def _endpoints(self, config: Any, who: str) -> tuple[Any, Any]:
        number = self.link.interface
        interface = usb.util.find_descriptor(config, bInterfaceNumber=number)
        if interface is None:
            present = sorted({i.bInterfaceNumber for i in config})
            raise LinkClosed(
                f"{who} has no interface {number} (it has {', '.join(map(str, present))}); "
                f"check `interface` in the configuration")
        ep_in = usb.util.find_descriptor(interface, custom_match=_bulk(usb.util.ENDPOINT_IN))
        ep_out = usb.util.find_descriptor(interface, custom_match=_bulk(usb.util.ENDPOINT_OUT))
        if ep_in is None or ep_out is None:
            raise LinkClosed(
                f"{who} interface {number} has no bulk IN and OUT endpoint pair, so it is not "
                f"the terminal's data interface; check `interface` in the configuration")
        return ep_in, ep_out

    def _open_failure(self, who: str, step: str, exc: usb.core.USBError) -> str:
        if _gone(exc):
            return f"{who} disappeared while opening it (unplugged?)"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"permission denied opening {who}: {_PERMISSION_FIX}"
        if exc.errno == errno.EBUSY:
            return (f"{who} interface {self.link.interface} is in use by another program "
                    f"(a second poi-bridge?) or by a kernel driver ({step})")
        return f"cannot open {who} ({step}): {_text(exc)}"

    # --- transfers (in the IN and OUT threads) --------------------------------------------------

    def _read_once(self, opened: _Opened, size: int, timeout_ms: int) -> bytes:
        """One bulk IN transfer: its bytes, or b"" if nothing came within the timeout."""
        stalls = 0
        while True:
            try:
                return opened.ep_in.read(size, timeout_ms).tobytes()
            except usb.core.USBError as exc:
                if _timed_out(exc):
                    return b""
                if _stalled(exc) and stalls < STALL_RETRIES:
                    stalls += 1
                    self._clear_stall(opened, opened.ep_in, stalls)
                    continue
                raise LinkClosed(self._transfer_failure(opened.ep_in, exc, stalls)) from None

    def _write_once(self, opened: _Opened, data: bytes, timeout_ms: int) -> int:
        """One bulk OUT transfer: how many bytes the device took (0 on a timeout).

        After a stall the whole chunk is sent again: libusb does not say how much of a failed
        transfer got through, and a stalling device has normally refused the packet."""
        stalls = 0
        while True:
            try:
                return int(opened.ep_out.write(data, timeout_ms))
            except usb.core.USBError as exc:
                if _timed_out(exc):
                    return 0
                if _stalled(exc) and stalls < STALL_RETRIES:
                    stalls += 1
                    self._clear_stall(opened, opened.ep_out, stalls)
                    continue
                raise LinkClosed(self._transfer_failure(opened.ep_out, exc, stalls)) from None

    def _clear_stall(self, opened: _Opened, endpoint: Any, attempt: int) -> None:
        who = self._who()
        log.warning("%s: bulk %s endpoint 0x%02x stalled; clearing it and retrying (%d of %d)",
                    who, _direction(endpoint), endpoint.bEndpointAddress, attempt, STALL_RETRIES)
        try:
            opened.device.clear_halt(endpoint)
        except usb.core.USBError as exc:
            if _gone(exc):
                raise LinkClosed(f"{who} disappeared (unplugged?)") from None
            raise LinkClosed(f"{who}: cannot clear the stall of endpoint "
                             f"0x{endpoint.bEndpointAddress:02x}: {_text(exc)}") from None

    def _transfer_failure(self, endpoint: Any, exc: usb.core.USBError, stalls: int) -> str:
        who = self._who()
        where = f"bulk {_direction(endpoint)} endpoint 0x{endpoint.bEndpointAddress:02x}"
        if exc.errno == errno.EIO or (exc.errno is None and exc.backend_error_code == _IO_CODE):
            # An unplug fails transfers with NO_DEVICE; IO is the bus's own errors (CRC,
            # babble), mostly a bad cable or a terminal resetting, and it may be still there.
            return (f"USB I/O error on {who} {where} (if it repeats: a loose or bad USB "
                    f"cable, or the terminal resetting)")
        if _gone(exc):
            return f"{who} disappeared (unplugged?)"
        if _stalled(exc):
            return (f"{who} keeps stalling its {where} (cleared {stalls} times); switch the "
                    f"terminal off and on again")
        if exc.errno == errno.EOVERFLOW:
            return f"{who} sent more than a read asked for on its {where}; restarting the link"
        return f"USB error on {who} {where}: {_text(exc)}"

    # --- closing ----------------------------------------------------------------------------------

    def _release(self, device: Any, detached: bool) -> None:
        """Release the interface, give the kernel driver back, close the handle. Every step
        is attempted: after an unplug each of them fails, harmlessly."""
        number = self.link.interface
        with contextlib.suppress(usb.core.USBError):
            usb.util.release_interface(device, number)
        if detached:
            try:
                device.attach_kernel_driver(number)
            except (usb.core.USBError, NOT_SUPPORTED_BY_LIBUSB) as exc:  # as in _kernel_driver_active
                gone = isinstance(exc, usb.core.USBError) and _gone(exc)
                level = logging.DEBUG if gone else logging.WARNING  # unplugged: no driver to bind
                log.log(level, "%s: could not give interface %d back to its kernel driver: %s",
                        self._who(), number, _text(exc))
        _dispose(device)

    async def _shut(self, opened: _Opened, pending_read: asyncio.Future[bytes] | None,
                    in_thread: ThreadPoolExecutor | None,
                    out_thread: ThreadPoolExecutor | None) -> None:
        if pending_read is not None:
            # The interface must not be released under a transfer still in flight.
            with contextlib.suppress(Exception):
                await pending_read
        assert out_thread is not None
        try:
            # The OUT thread runs its jobs in order, so an unfinished write ends first.
            await asyncio.get_running_loop().run_in_executor(
                out_thread, self._release, opened.device, opened.detached)
        finally:
            out_thread.shutdown(wait=False)
            if in_thread is not None:
                in_thread.shutdown(wait=False)

    async def _await_closing(self) -> None:
        closing = self._closing
        assert closing is not None
        try:
            # Shielded: a caller cancelled while waiting must not abandon the release.
            async with asyncio.timeout(self.close_timeout):
                await asyncio.shield(closing)
        except TimeoutError:
            log.warning("%s: releasing the device takes longer than %g s", self._who(),
                        self.close_timeout)
        else:
            if self._closing is closing:
                self._closing = None

    def _abandon_open(self, done: asyncio.Future[_Opened], out: ThreadPoolExecutor) -> None:
        if not done.cancelled() and done.exception() is None:
            opened = done.result()
            out.submit(self._release, opened.device, opened.detached)
        out.shutdown(wait=False)

    # --- helpers ------------------------------------------------------------------------------

    def _live(self) -> _Opened:
        if self._opened is None:
            raise LinkClosed(self._reason)
        if self._lost is not None:
            raise LinkClosed(self._lost)
        return self._opened

    def _lose(self, reason: str) -> LinkClosed:
        """A transfer found the link broken: remember why (unless close() came first)."""
        if self._opened is not None:
            if self._lost is None:
                self._lost = reason
                log.debug("link lost: %s", reason)
            return LinkClosed(self._lost)
        return LinkClosed(self._reason)

    def _ids(self) -> str:
        return f"{self.link.vendor_id:04x}:{self.link.product_id:04x}"

    def _who(self, serial: str | None = None) -> str:
        serial = serial or self._serial
        return (f"USB terminal {self._ids()}" + (f" serial {serial}" if serial else "")
                + (f" at port {self.link.port}" if self.link.port else ""))


def _millis(seconds: float) -> int:
    return max(1, round(seconds * 1000))  # 0 would mean "wait forever" to libusb


def _read_size(endpoint: Any) -> int:
    # Whole packets only: a packet that does not fit the buffer is an overflow error.
    packet = endpoint.wMaxPacketSize & 0x7FF
    return max(1, READ_SIZE // packet) * packet if packet else READ_SIZE


def _bulk(direction: int) -> Any:
    def match(endpoint: Any) -> bool:
        return (usb.util.endpoint_type(endpoint.bmAttributes) == usb.util.ENDPOINT_TYPE_BULK
                and usb.util.endpoint_direction(endpoint.bEndpointAddress) == direction)
    return match


def _direction(endpoint: Any) -> str:
    return "IN" if usb.util.endpoint_direction(endpoint.bEndpointAddress) else "OUT"


def _kernel_driver_active(device: Any, number: int) -> bool:
    try:
        return bool(device.is_kernel_driver_active(number))
    except NOT_SUPPORTED_BY_LIBUSB:  # no kernel drivers on this platform
        return False


def _configuration(device: Any) -> tuple[Any, bool]:
    """The active configuration, or the first one and True if the device is unconfigured."""
    try:
        return device.get_active_configuration(), False
    except usb.core.USBError as exc:
        if _gone(exc):
            raise
    return device[0], True


def _port_path(device: Any) -> str | None:
    """Where the device is plugged in, as the kernel names it (sysfs, udev's sysname) and a
    link's `port` is written: 1-1.4 is bus 1, port 1, then port 4 of the hub there. None
    where the backend cannot say (libusb before 1.0.16, other backends, a root hub)."""
    try:
        numbers = device.port_numbers
        if not numbers or device.bus is None:
            return None
        return f"{int(device.bus)}-{'.'.join(str(int(n)) for n in numbers)}"
    except (AttributeError, TypeError, ValueError, NOT_SUPPORTED_BY_LIBUSB, usb.core.USBError):
        return None


def _label(device: Any, serial: str | None, problem: str) -> str:
    """A device as a message lists it, with its port to copy into the configuration."""
    if serial is None:
        return problem
    port = _port_path(device)
    return f"serial {serial}" + (f" (port {port})" if port else "")


def _read_serial(device: Any) -> tuple[str | None, str, str | None]:
    """The device's serial number, or None, why not (for a message) and, when it says more
    than the message, _DENIED (no permission to open it) or _GONE (it was unplugged)."""
    port = _port_path(device)
    place = f"bus {device.bus} address {device.address}" + (f", port {port}" if port else "")
    if not device.iSerialNumber:
        return None, f"no serial number ({place})", None
    try:
        # usb.util.get_langids, not Device.langids: that one turns every error, a
        # permission denied or an unplug alike, into "no langid".
        langids = usb.util.get_langids(device)
        if langids:
            return usb.util.get_string(device, device.iSerialNumber, langids[0]), "", None
        problem = "it has no string descriptors"
    except usb.core.USBError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return None, f"{place}: no permission", _DENIED
        if _gone(exc):
            return None, f"{place}: unplugged", _GONE
        problem = _text(exc)
    except ValueError as exc:
        problem = str(exc)
    return None, f"unreadable serial number ({place}: {problem})", None


def _dispose(device: Any) -> None:
    with contextlib.suppress(usb.core.USBError):
        usb.util.dispose_resources(device)


def _gone(exc: usb.core.USBError) -> bool:
    if exc.errno is not None:
        return exc.errno in _GONE_ERRNOS
    return exc.backend_error_code in _GONE_CODES


def _stalled(exc: usb.core.USBError) -> bool:
    return exc.errno == errno.EPIPE or (exc.errno is None and exc.backend_error_code == _PIPE_CODE)


def _timed_out(exc: usb.core.USBError) -> bool:
    return (isinstance(exc, usb.core.USBTimeoutError) or exc.errno == errno.ETIMEDOUT
            or (exc.errno is None and exc.backend_error_code == _TIMEOUT_CODE))


def _text(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


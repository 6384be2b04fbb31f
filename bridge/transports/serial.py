"""Serial transport: RS-232, USB-CDC (/dev/ttyACM*), USB-serial adapters (/dev/ttyUSB*) and
pseudo-terminals, all driven through the tty layer.

pyserial opens the device, takes the exclusive lock and sets the line (speed, framing, raw
mode). The event loop then drives the non-blocking file descriptor directly. We do not use
pyserial-asyncio-fast's transport for the byte moving: in 0.16 a write the kernel only partly
accepts leaves its writer registered, which then fails an assertion on every loop iteration
(home-assistant-libs/pyserial-asyncio-fast PR #36), and pyserial 3.5's own non-blocking
write() spins forever on EAGAIN when the kernel buffer is full (pyserial issue #280), freezing
the event loop. Driving the fd ourselves also shows the loss directly: when the device goes
away (USB unplug, pseudo-terminal master closed) the tty is hung up, reads return end-of-file
and writes fail with EIO, while pyserial's `is_open` stays True. Both become `LinkClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import grp
import logging
import os
import struct
import termios
import time
from collections.abc import Callable
from typing import NoReturn

import serial

from bridge.config import SerialLink
from bridge.transports.base import LinkClosed, Transport

log = logging.getLogger(__name__)

READ_CHUNK = 4096
MAX_UNREAD = 1 << 16  # bytes read ahead of a read() call, at most
DRAIN_LIMIT = 2.0  # seconds close() waits at most for output the line has not sent yet
DRAIN_MARGIN = 0.1  # on top of the queued bytes' line time (USB adapters' latency timer)
# s the line may take nothing (output the kernel holds not going down, or a write waiting for
# room while it does not) before the link is called held and ends
HELD_LINE_LIMIT = 10.0
DRAIN_POLL = 0.01  # seconds between looks at the output queue while draining
# Errors that mean the device itself is gone (unplugged, hung up, driver unbound).
_GONE_ERRNOS = {errno.EIO, errno.ENXIO, errno.ENODEV, errno.EPIPE}


class SerialTransport(Transport):
    """Bytes over one serial device. Build it with the link config; `open()` opens the port.

    read() returns whatever the kernel has (at least one byte). write() returns once the
    kernel has taken every byte. close() lets the line send what the kernel still holds (an
    ACK written just before, say) for about its line time at the configured speed, at most
    `drain_limit` seconds, then discards the rest, so a stalled line (hardware flow control
    held off, dead adapter) cannot make closing hang.
    """

    kind = "serial"

    def __init__(self, link: SerialLink, *, close_timeout: float = 5.0,
                 drain_limit: float = DRAIN_LIMIT, held_limit: float = HELD_LINE_LIMIT) -> None:
        self.link = link
        self.close_timeout = close_timeout
        self.drain_limit = drain_limit
        self.held_limit = held_limit
        # Armed while the kernel holds output for the line: it must go down (_check_queue)
        self._queue_check: asyncio.TimerHandle | None = None
        # What the kernel held when it was armed, plus every byte written since: the line
        # is held only if the queue has not gone below that (a later frame is no stall)
        self._queue_mark = 0
        self._port: serial.Serial | None = None
        self._fd: int | None = None
        self._reason = f"serial device {link.device} is not open"
        self._closing: asyncio.Future[None] | None = None
        # At most one pending read and one pending write: each registers the fd with the loop,
        # and a second registration would silently replace the first.
        self._read_waiter: asyncio.Future[None] | None = None
        # deliver()'s receiver, called by the loop's read callback, and what it raised there
        self._receiver: Callable[[bytes], None] | None = None
        self._receiver_failure: Exception | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._reading = False  # the fd is registered with the loop for reading
        self._received = bytearray()  # read from the fd, not yet returned by read()
        # Handed to write() and not yet taken by the kernel; kept when that write() is
        # cancelled (the worker cancels its writer before closing), and sent by close()
        self._unsent = bytearray()
        # Positions in the stream of bytes ever handed to write(): _unsent holds those from
        # _head to _handed; the last ones dropped with a lost or closed link are a range.
        self._head = self._handed = 0
        self._dropped = (0, 0)

    # --- Transport interface ----------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def describe(self) -> str:
        link = self.link
        flow = ", RTS/CTS" if link.rtscts else ""
        flow += ", XON/XOFF" if link.xonxoff else ""
        line = f"{link.bytesize}{link.parity}{link.stopbits:g}"
        return f"{link.device} at {link.baudrate} {line}{flow}"

    async def open(self) -> None:
        if self._fd is not None:
            return
        if self._closing is None:
            self._closing = _close_under_way(self.link.device)
        if self._closing is not None:
            # A previous close is still releasing the port; let it finish before reopening.
            await self._await_closing()
            if self._closing is not None:
                # (else the open fails on that close's flock as "in use by another process
                # (a second poi-bridge?)", a technician sent after the wrong cause)
                raise LinkClosed(
                    f"serial device {self.link.device}: this bridge's own close of it has not "
                    f"finished after {self.close_timeout:g} s (its driver is stuck: a wedged "
                    f"USB adapter? unplug it and plug it back); trying again")
        loop = asyncio.get_running_loop()
        # Opening a USB adapter talks to the device (line coding, modem lines) and can stall on
        # a wedged one, so it runs off the event loop.
        pending = loop.run_in_executor(None, self._open_port)
        try:
            port = await asyncio.shield(pending)
        except asyncio.CancelledError:
            pending.add_done_callback(_close_if_opened)  # do not leak the fd and its lock
            raise
        self._port = port
        self._fd = port.fileno()
        self._received.clear()  # nothing from an earlier connection survives a reopen
        self._forget_unsent()
        os.set_blocking(self._fd, False)
        self._closing = None
        self._reason = f"serial device {self.link.device} was closed"

    async def read(self) -> bytes:
        while True:
            if self._received:
                data = bytes(self._received)
                self._received.clear()
                if not self._reading and self._fd is not None:
                    self._resume_reading(self._fd)
                return data
            fd = self._fd
            if fd is None:
                raise await self._closed_error()
            await self._wait_readable(fd)

    async def deliver(self, receiver: Callable[[bytes], None]) -> NoReturn:
        """The loop's read callback hands each read to `receiver` itself: at 115200 baud a
        frame comes in a read every 10 ms or so, and waking a task for each (a future, a
        task step) cost more than the read (`make bench`, section 4c). This task only waits
        for the link's end, or for `receiver`'s exception."""
        if self._receiver is not None or self._read_waiter is not None:
            raise RuntimeError("read() is already in progress")
        self._receiver = receiver
        try:
            while True:
                if self._received:  # read before delivery began, or while it was paused
                    data = bytes(self._received)
                    self._received.clear()
                    receiver(data)
                fd = self._fd
                if fd is None:
                    raise await self._closed_error()
                await self._wait_readable(fd)
                failure, self._receiver_failure = self._receiver_failure, None
                if failure is not None:
                    break
        except asyncio.CancelledError:
            # Cancelled after the receiver raised, before this task ran to raise it (the
            # worker ends the reader when the writer's LinkClosed or an unplug comes in the
            # same pass): the failure is what ends it all the same, or it went unseen
            failure, self._receiver_failure = self._receiver_failure, None
            if failure is None:
                raise
        finally:
            self._receiver = None
        # Raised from this one line, cancelled or not: the worker tells bugs apart by where
        # they were raised, and two lines made one bug two, each with its traceback
        raise failure

    def output_queued(self) -> int:
        fd = self._fd
        return 0 if fd is None else (_output_queued(fd) or 0) + len(self._unsent)

    def write_nowait(self, data: bytes) -> int:
        fd = self._fd
        if fd is None or self._unsent:  # (after what an earlier write() still holds)
            return 0
        try:
            written = os.write(fd, data)
        except OSError:  # full (EAGAIN), or gone: write() waits, or reports the loss
            return 0
        self._queue_mark += written
        self._watch_queue(fd)
        return written

    async def write(self, data: bytes) -> None:
        """Returns once the kernel has taken every byte of `data` (and of what a cancelled
        write() left). Cancelled, it leaves the rest to be sent first by the next write() or
        by close(): a frame is not cut short on the line."""
        if self._fd is None:
            raise await self._closed_error()
        start = self._handed
        self._unsent += data
        self._handed = end = start + len(data)
        while True:
            if self._head >= end:  # (close() may have sent some of it meanwhile)
                dropped_from, dropped_to = self._dropped
                if dropped_from < end and dropped_to > start:  # not all reached the kernel
                    raise await self._closed_error()
                if self._fd is not None:
                    self._watch_queue(self._fd)
                return
            fd = self._fd
            if fd is None:
                raise await self._closed_error()
            try:
                self._write_unsent(fd)
            except OSError as exc:
                self._lose(_loss_detail(exc))
                continue
            if self._head < end:
                # The kernel buffer is full (slow line, flow control): wait until it has room.
                await self._wait_writable_unless_held(fd)

    async def close(self) -> None:
        # Bytes read ahead are dropped: whoever closes is done with this connection. (On a
        # loss, by contrast, they are still handed over before LinkClosed.)
        self._received.clear()
        fd = self._fd
        if fd is not None:
            try:
                await self._drain(fd)
            finally:  # (cancelled meanwhile too: the port is released all the same)
                if self._fd == fd:
                    self._reason = f"serial device {self.link.device} was closed"
                    self._start_closing()
        if self._closing is not None:
            await self._await_closing()

    # --- internals ----------------------------------------------------------------------------

    def _write_unsent(self, fd: int) -> None:
        """Write what the kernel takes of the unsent bytes now; OSError if the device is gone."""
        try:
            written = os.write(fd, self._unsent)
        except (BlockingIOError, InterruptedError):
            return
        del self._unsent[:written]
        self._head += written
        self._queue_mark += written

    def _forget_unsent(self) -> None:
        if self._unsent:
            self._dropped = (self._head, self._handed)
            self._unsent.clear()
        self._head = self._handed

    async def _drain(self, fd: int) -> None:
        """Wait, without blocking the loop, until the kernel has taken what write() still
        holds and sent the output it holds, for about those bytes' line time (plus a margin,
        at most drain_limit). Not tcdrain(): in a thread it cannot be given up on, and it
        waits as long as flow control holds the line. Returns at once when nothing waits
        (a pty has no output queue: its output goes straight to the other end) and when the
        device is gone (the queue cannot be read, or a write fails)."""
        queued = _output_queued(fd)
        if queued is None or not (queued or self._unsent):
            return
        allowed = min(self.drain_limit,
                      (queued + len(self._unsent)) * self.link.seconds_per_byte + DRAIN_MARGIN)
        deadline = time.monotonic() + allowed
        while self._fd == fd:
            if self._unsent:
                try:
                    self._write_unsent(fd)
                except OSError:
                    return  # gone: nothing more can be delivered
            queued = _output_queued(fd)
            if queued is None or not (queued or self._unsent):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("serial device %s: %d bytes still unsent after %.2f s when closing "
                            "it; discarded (flow control holding the line?)", self.link.device,
                            queued + len(self._unsent), allowed)
                return
            await asyncio.sleep(min(DRAIN_POLL, left))

    def _open_port(self) -> serial.Serial:
        link = self.link
        try:
            port = serial.Serial(
                port=link.device, baudrate=link.baudrate, bytesize=link.bytesize,
                parity=link.parity, stopbits=link.stopbits, rtscts=link.rtscts,
                xonxoff=link.xonxoff, timeout=0, write_timeout=0,
                # flock(LOCK_EX): a second bridge opening the same port gets a clear "in
                # use" instead of both stealing each other's bytes (TIOCEXCL, below, keeps
                # out the programs that take no lock)
                exclusive=True,
            )
        except serial.SerialException as exc:
            raise LinkClosed(_open_failure(link.device, exc)) from exc
        except ValueError as exc:
            raise LinkClosed(f"invalid settings for serial device {link.device}: {exc}") from exc
        except (OSError, termios.error) as exc:
            # pyserial converts only a failing os.open(); the modem-line ioctl (TIOCMBIS) and
            # tcsetattr/tcflush it runs next raise plainly when the device goes away meanwhile.
            # (SerialException is an OSError too, hence caught above first.)
            raise LinkClosed(_setup_failure(link.device, exc)) from exc
        # pyserial's timeout=0 sets VMIN=0, under which reading an empty line returns 0 bytes,
        # the same as a hang-up. With VMIN=1 an empty line gives EAGAIN, so 0 bytes always
        # means the device is gone.
        try:
            attrs = termios.tcgetattr(port.fd)
            attrs[6][termios.VMIN] = 1
            attrs[6][termios.VTIME] = 0
            termios.tcsetattr(port.fd, termios.TCSANOW, attrs)
            # Any further open(2) of the tty fails with EBUSY while the bridge has it: `cat`,
            # screen or a vendor tool would otherwise take the terminal's ACKs and answers
            # (root still gets in: CAP_SYS_ADMIN; ModemManager is kept off by the udev rule).
            # Not a pty (socat, a simulator): its flag outlives a daemon killed holding it,
            # and the restarted daemon, not root, would be refused until the pty is remade
            if not _is_pty(port.fd):
                fcntl.ioctl(port.fd, termios.TIOCEXCL)
        except (termios.error, OSError) as exc:
            _close_port(port)
            raise LinkClosed(_setup_failure(link.device, exc)) from exc
        return port

    async def _wait_readable(self, fd: int) -> None:
        """Wait until the loop's callback has read some bytes."""
        if self._read_waiter is not None:
            raise RuntimeError("read() is already in progress")
        waiter = asyncio.get_running_loop().create_future()
        self._read_waiter = waiter
        if not self._reading:
            self._resume_reading(fd)
        try:
            await waiter
        finally:
            self._read_waiter = None

    def _resume_reading(self, fd: int) -> None:
        asyncio.get_running_loop().add_reader(fd, self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        """The loop's callback reads, not the waiting coroutine: a frame arrives at 115200 baud
        in many small reads, and a readiness the loop reports again before the coroutine has
        run (level-triggered epoll) then costs one failed read, not a wake-up of the task.
        The fd stays registered between reads (registering anew costs two epoll calls) until
        MAX_UNREAD bytes wait for a reader that does not come."""
        fd = self._fd
        if fd is None:
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return  # reported ready, emptied since
        except OSError as exc:
            self._lose(_loss_detail(exc))
            return
        if not data:
            # Only a hung-up tty (unplug, pty master closed) reads as end-of-file here (an
            # empty line gives EAGAIN, see VMIN): pyserial's "device reports readiness to
            # read but returned no data".
            self._lose("the line hung up")
            return
        receiver = self._receiver
        if receiver is not None and not self._received:
            try:
                receiver(data)
            except Exception as exc:  # comes out of deliver(), in its task
                self._receiver = None  # what is read meanwhile waits in _received
                self._receiver_failure = exc
                waiter = self._read_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            return
        self._received += data
        waiter = self._read_waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif len(self._received) >= MAX_UNREAD:
            asyncio.get_running_loop().remove_reader(fd)
            self._reading = False

    async def _wait_writable(self, fd: int) -> None:
        if self._write_waiter is not None:
            raise RuntimeError("write() is already in progress")
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        loop.add_writer(fd, _wake, waiter)
        self._write_waiter = waiter
        try:
            await waiter
        finally:
            # Unregister only if the fd is still ours; after a close its number may already
            # belong to something else. _start_closing unregisters before closing.
            if self._fd == fd:
                loop.remove_writer(fd)
            self._write_waiter = None

    async def _wait_writable_unless_held(self, fd: int) -> None:
        """Wait for room in the kernel's buffer; a line that takes nothing for held_limit s
        (the terminal off with RTS/CTS: CTS low; an XOFF; a USB-CDC terminal refusing data)
        ends the link (_held). The kernel wakes a writer only once a few hundred bytes are
        free (32 s at 1200 baud): output it sends meanwhile counts as progress."""
        queued = _output_queued(fd)
        while True:
            try:
                async with asyncio.timeout(self.held_limit):
                    await self._wait_writable(fd)
                return
            except TimeoutError:
                if self._fd != fd:
                    return  # closed meanwhile: write() says so
                now = _output_queued(fd)
                if now is not None and queued is not None and now < queued:
                    queued = now  # slow, but moving (below the kernel's wake-up mark)
                    continue
                self._held()
                return

    def _watch_queue(self, fd: int) -> None:
        """Output the kernel has taken may still wait for a held line (a frame smaller than
        the driver's free buffer never makes write() wait): while the kernel holds some, it
        must go down within held_limit s. (A pty has no output queue: nothing to watch.)"""
        if self._queue_check is None:
            queued = _output_queued(fd)
            if queued:
                self._queue_mark = queued
                self._queue_check = asyncio.get_running_loop().call_later(
                    self.held_limit, self._check_queue, fd)

    def _check_queue(self, fd: int) -> None:
        self._queue_check = None
        if self._fd != fd:
            return
        now = _output_queued(fd)
        if not now:
            return  # all out (or the device gone: its read reports that)
        if now < self._queue_mark:  # some of it (or of what was written since) went out
            self._queue_mark = now
            self._queue_check = asyncio.get_running_loop().call_later(
                self.held_limit, self._check_queue, fd)
            return
        self._held()

    def _held(self) -> None:
        """The line has taken nothing for held_limit s: the link ends, its output dropped.
        Left so, it looked up while nothing crossed, and once the line moved again every
        frame queued meanwhile went out, a payment reported `unresolved` long since among
        them."""
        self._reason = (
            f"serial device {self.link.device} has taken no data for {self.held_limit:g} s: "
            "the terminal is off, or flow control (RTS/CTS, XON/XOFF) holds the line; check "
            "that the terminal is on, its cable, and the rtscts/xonxoff settings")
        log.warning("%s: %s", self.describe(), self._reason)
        self._start_closing()

    def _lose(self, detail: str) -> None:
        """The device is gone: record why (unless close() came first) and release the port."""
        if self._fd is not None:
            self._reason = f"serial device {self.link.device} disappeared (unplugged?): {detail}"
            log.debug("%s: %s", self.describe(), self._reason)
            self._start_closing()

    async def _closed_error(self) -> LinkClosed:
        # Returned only once the fd is really closed, so a reopen can follow at once.
        if self._closing is not None:
            await self._await_closing()
        return LinkClosed(self._reason)

    def _start_closing(self) -> None:
        """Detach the fd from the loop, wake pending calls and close the port in a thread."""
        fd, port = self._fd, self._port
        assert fd is not None and port is not None
        loop = asyncio.get_running_loop()
        if self._queue_check is not None:
            self._queue_check.cancel()
            self._queue_check = None
        if self._reading:
            loop.remove_reader(fd)
            self._reading = False
        if self._write_waiter is not None:
            loop.remove_writer(fd)
        for waiter in (self._read_waiter, self._write_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)  # the woken call sees _fd is None and raises
        self._fd = None
        self._port = None
        self._forget_unsent()
        # Drop output still unsent (close() has waited for it as long as it should): else the
        # kernel's close waits for it to drain (up to 30 s, forever while hardware flow control
        # holds the line). Only then: on a pty the flush would discard what the other end has
        # not read yet (a pty has no output queue; its TIOCOUTQ is always 0). Fails harmlessly
        # when hung up.
        if _output_queued(fd) != 0:
            with contextlib.suppress(termios.error, OSError):
                termios.tcflush(fd, termios.TCOFLUSH)
        self._closing = closing = loop.run_in_executor(None, _close_port, port)
        _CLOSES_UNDER_WAY[self.link.device] = closing
        closing.add_done_callback(functools.partial(_close_done, self.link.device))

    async def _await_closing(self) -> None:
        closing = self._closing
        assert closing is not None
        try:
            # Shielded: a caller cancelled while waiting must not abandon the close itself.
            await asyncio.wait_for(asyncio.shield(closing), self.close_timeout)
        except TimeoutError:
            log.warning("serial device %s: closing the port takes longer than %g s",
                        self.link.device, self.close_timeout)
        else:
            if self._closing is closing:
                self._closing = None


# Unix98 pty slaves (/dev/pts/N): character majors 136-143 (Documentation/admin-guide/devices)
_PTY_SLAVE_MAJORS = range(136, 144)


def _is_pty(fd: int) -> bool:
    return os.major(os.fstat(fd).st_rdev) in _PTY_SLAVE_MAJORS


def _output_queued(fd: int) -> int | None:
    """Bytes the kernel holds for the line (TIOCOUTQ), or None if it cannot say (gone)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _close_port(port: serial.Serial) -> None:
    # TIOCEXCL outlives the fd while the tty does (a pty whose terminal end stays open): the
    # daemon's own next open, as a user without CAP_SYS_ADMIN, would get EBUSY
    with contextlib.suppress(OSError, TypeError):  # (gone; or never opened: fd None)
        fcntl.ioctl(port.fd, termios.TIOCNXCL)
    try:
        port.close()
    except OSError as exc:  # the fd is released even when close reports an error
        log.debug("closing %s: %s", port.port, exc)


# Closes of a port still under way in their thread, by device: the worker makes a transport
# anew for each attempt, and the new one waits for the old one's close as well.
_CLOSES_UNDER_WAY: dict[str, asyncio.Future[None]] = {}


def _close_under_way(device: str) -> asyncio.Future[None] | None:
    closing = _CLOSES_UNDER_WAY.get(device)
    if closing is None or closing.done() or closing.get_loop() is not asyncio.get_running_loop():
        return None  # (one of an event loop gone: a test's, the port long closed)
    return closing


def _close_done(device: str, closing: asyncio.Future[None]) -> None:
    if _CLOSES_UNDER_WAY.get(device) is closing:
        del _CLOSES_UNDER_WAY[device]


def _close_if_opened(pending: asyncio.Future[serial.Serial]) -> None:
    if not pending.cancelled() and pending.exception() is None:
        _close_port(pending.result())


def _loss_detail(exc: OSError) -> str:
    if exc.errno in _GONE_ERRNOS:
        return exc.strerror or str(exc)
    return f"unexpected error {exc}"


def _setup_failure(device: str, exc: OSError | termios.error) -> str:
    """Say why setting up a port that did open failed."""
    if isinstance(exc, OSError):
        code, text = exc.errno, exc.strerror
    else:  # termios.error is not an OSError; its args are (errno, text)
        code, text = (*exc.args, None, None)[:2]
    if code in _GONE_ERRNOS:
        return (f"serial device {device} went away while opening it (unplugged or switched "
                f"off?): {text}")
    return f"cannot configure serial device {device}: {text or exc}"


def _open_failure(device: str, exc: serial.SerialException) -> str:
    """Say why a port would not open, in terms a store technician can act on."""
    code = exc.errno
    if code == errno.ENOENT:
        return (f"serial device {device} does not exist (terminal not plugged in or switched "
                f"off, or wrong device in the configuration)")
    if code == errno.EPERM:
        # Not the file mode (that is EACCES): the device cgroup of the shipped unit
        # (DevicePolicy=closed + DeviceAllow=) or its system call filter said no.
        group = _device_group(device)
        if group in UNIT_DEVICE_GROUPS:
            # Allowed by name, but systemd resolves char-NAME to its major number from
            # /proc/devices when the service starts: a driver loaded later is not in it.
            return (f"operation not permitted opening serial device {device}: the systemd "
                    f"sandbox of poi-bridge.service refused it although the unit allows "
                    f"{group} devices (DeviceAllow=char-{group}): the {group} driver was not "
                    f"loaded when the service started. `systemctl restart poi-bridge` lets "
                    f"it in; so that it is loaded at boot, install poi-bridge.modules-load as "
                    f"/usr/lib/modules-load.d/poi-bridge.conf (README, installing step 2)")
        return (f"operation not permitted opening serial device {device}: the systemd sandbox "
                f"of poi-bridge.service refused it (DevicePolicy=closed admits only the device "
                f"groups listed in DeviceAllow=; or SystemCallFilter=). Allow this device in a "
                f"drop-in: `systemctl edit poi-bridge`, add [Service] "
                f"DeviceAllow=char-{group} rw, then `systemctl restart poi-bridge` (the "
                f"{group} driver must be loaded by then)")
    if code == errno.EACCES:
        group = None
        with contextlib.suppress(OSError, KeyError):
            group = grp.getgrgid(os.stat(device).st_gid).gr_name
        owner = f" (owned by group '{group}')" if group else ""
        if group in SERIAL_DEVICE_GROUPS:
            return (f"permission denied opening serial device {device}{owner}: install the "
                    f"udev rule 70-poi-bridge.rules (it gives the poi-bridge group access) "
                    f"and replug, or add the poi-bridge user to group '{group}'")
        # root, tty, a group of its own: not one to join. The node is no serial port a
        # terminal's driver made, or one no rule covers.
        return (f"permission denied opening serial device {device}{owner}: the node is "
                f"covered by neither the udev rule 70-poi-bridge.rules (group poi-bridge) nor "
                f"the dialout group the poi-bridge user is in. Install the rules "
                f"`poi-bridge udev-rules --config FILE` prints for the configured terminals "
                f"as /etc/udev/rules.d/71-poi-bridge-local.rules and replug, or check the "
                f"device path in the configuration (`poi-bridge devices` lists the terminals "
                f"seen)")
    if code in (errno.EAGAIN, errno.EWOULDBLOCK):
        return (f"serial device {device} is in use by another process (a second poi-bridge "
                f"or a terminal program?)")
    if code == errno.EBUSY:
        return (f"serial device {device} is busy: another program has it open (a second "
                f"poi-bridge, or a terminal program such as screen, minicom or cat: `fuser -v "
                f"{device}` names it), or ModemManager is probing it (the udev rule "
                f"70-poi-bridge.rules sets ENV{{ID_MM_DEVICE_IGNORE}}=\"1\" to stop that)")
    if code in _GONE_ERRNOS:
        return f"serial device {device} is not answering (unplugged while opening?): {exc.strerror}"
    if code is None and "Could not configure port" in str(exc):
        return f"{device} is not a serial port ({exc})"
    return f"cannot open serial device {device}: {exc}"


# Groups that own serial ports for their users to join (Debian's dialout, uucp elsewhere).
SERIAL_DEVICE_GROUPS = frozenset({"dialout", "uucp"})

# The device groups systemd/poi-bridge.service admits (DeviceAllow=char-NAME rw).
UNIT_DEVICE_GROUPS = frozenset({"ttyUSB", "ttyACM", "ttyS", "usb_device"})


def _device_group(device: str) -> str:
    """The name DeviceAllow=char-NAME takes for this node: its driver as /proc/devices lists it
    (ttyUSB, ttyACM, ttyS, ttyAMA, pts...), else the node's name without its number."""
    node = os.path.realpath(device)
    guess = os.path.basename(node).rstrip("0123456789")
    try:
        major = os.major(os.stat(node).st_rdev)
        with open("/proc/devices", encoding="ascii") as table:
            names = []
            for line in table:
                if line.startswith("Block"):
                    break
                number, _, name = line.strip().partition(" ")
                if number == str(major):
                    names.append(name)
    except (OSError, ValueError):
        return guess or "NAME"
    # One major can carry several drivers (4: tty and ttyS): prefer the one the name shows.
    if guess in names or len(names) != 1:
        return guess or "NAME"
    return names[0]

"""Transports against real pseudo-terminals and a real TCP server on 127.0.0.1.

The test holds the terminal's end (the pty master, or the server's side of the socket) and
the transport opens the other end as it would a real device. Every wait is bounded, so a bug
shows as a failure, never as a hung test run.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import re
import random
import socket
import struct
import sys
import termios
import tty
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import serial

from bridge.config import SerialLink, TcpLink, UsbLink
from bridge.transports import Backoff, LinkClosed, Transport, TransportUnavailable, open_transport
from bridge.transports import serial as serial_module
from bridge.transports.serial import MAX_UNREAD, READ_CHUNK, SerialTransport
from bridge.transports.tcp import TcpTransport

STEP = 5.0  # upper bound for any single step; real steps take milliseconds


async def within(awaitable, seconds: float = STEP):
    return await asyncio.wait_for(awaitable, seconds)


def fds_open_on(path: str) -> list[int]:
    """Our file descriptors still pointing at `path` (a vanished pty shows as '(deleted)')."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd listdir itself used is gone by now
            continue
        if target in (path, f"{path} (deleted)"):
            found.append(int(name))
    return found


@pytest.fixture
async def loop_errors():
    """Everything reported to the loop's exception handler; a clean link loss reports nothing."""
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)


class Pty:
    """The terminal's side of a pseudo-terminal. The transport opens `path` (the slave)."""

    def __init__(self, *, raw: bool = True) -> None:
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        if raw:
            tty.setraw(slave)  # so nothing is mangled even before the transport configures it
        os.close(slave)
        os.set_blocking(self.master, False)
        self.closed = False

    async def _ready(self, *, writing: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        if writing:
            add, remove = loop.add_writer, loop.remove_writer
        else:
            add, remove = loop.add_reader, loop.remove_reader
        add(self.master, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            remove(self.master)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        async with asyncio.timeout(STEP):
            while view:
                try:
                    view = view[os.write(self.master, view):]
                except BlockingIOError:
                    await self._ready(writing=True)

    async def recv(self, size: int) -> bytes:
        got = bytearray()
        async with asyncio.timeout(STEP):
            while len(got) < size:
                try:
                    got += os.read(self.master, size - len(got))
                except BlockingIOError:
                    await self._ready(writing=False)
        return bytes(got)

    async def silent_for(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._ready(writing=False)
        except TimeoutError:
            return True
        return False

    def vanish(self) -> None:
        """The terminal goes away: closing the master hangs up the slave, like a USB unplug."""
        if not self.closed:
            os.close(self.master)
            self.closed = True


@pytest.fixture
def pty():
    peer = Pty()
    yield peer
    peer.vanish()


@pytest.fixture
async def serial_link(pty):
    transport = SerialTransport(SerialLink(device=pty.path))
    await within(transport.open())
    yield transport
    await within(transport.close())


async def read_exactly(transport: Transport, size: int) -> list[bytes]:
    """Read until `size` bytes arrived; returns the pieces read() handed back."""
    pieces: list[bytes] = []
    async with asyncio.timeout(STEP):
        while sum(map(len, pieces)) < size:
            pieces.append(await transport.read())
    return pieces


def payload(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


# --- serial: bytes ----------------------------------------------------------------------------


async def test_serial_bytes_both_ways(pty, serial_link):
    assert serial_link.is_open
    await within(serial_link.write(b"\x02hello\x03\x50"))
    assert await pty.recv(8) == b"\x02hello\x03\x50"
    await pty.send(b"\x06")
    assert await within(serial_link.read()) == b"\x06"


async def test_serial_11kb_payload_both_ways(pty, serial_link):
    data = payload(11 * 1024)
    # Terminal -> bridge: read() hands back what has arrived, without waiting for the rest.
    pieces, _ = await within(asyncio.gather(read_exactly(serial_link, len(data)), pty.send(data)))
    assert b"".join(pieces) == data
    assert len(pieces) >= 3
    # Bridge -> terminal: write() returns only when every byte is with the kernel.
    received, _ = await within(asyncio.gather(pty.recv(len(data)), serial_link.write(data)))
    assert received == data


async def test_serial_write_beyond_kernel_buffer_waits_without_freezing_the_loop(pty, serial_link):
    data = payload(256 * 1024)  # far more than a pty buffers (~12-20 KB)
    writing = asyncio.create_task(serial_link.write(data))
    ticks = 0
    for _ in range(20):
        await asyncio.sleep(0.01)
        ticks += 1
    # The terminal is not reading: write() waits, and the event loop keeps running meanwhile
    # (pyserial's own non-blocking write spins on EAGAIN and would freeze it).
    assert not writing.done() and ticks == 20
    # ... and says how much still waits to cross the line: a frame handed out now crosses
    # after it (its ACK time counts from then: README "Wire framing")
    assert serial_link.output_queued() > 200 * 1024
    assert await pty.recv(len(data)) == data
    await within(writing)
    assert serial_link.output_queued() == 0


async def test_serial_line_that_takes_nothing_ends_the_link_saying_why(pty, caplog):
    """A terminal switched off with RTS/CTS (CTS low), an XOFF, a USB-CDC terminal refusing
    data: the line takes nothing, and write() waited for ever. The link stayed up, nobody
    was told, and once the line moved again every frame queued meanwhile went out, a
    payment the register had long been told about among them (the transports audit). Here
    the line is held by stopping the port's output (tcflow TCOOFF)."""
    transport = SerialTransport(SerialLink(device=pty.path), held_limit=0.3)
    await within(transport.open())
    termios.tcflow(transport._fd, termios.TCOOFF)
    started = asyncio.get_running_loop().time()
    with pytest.raises(LinkClosed, match="has taken no data for 0.3 s: the terminal is off, "
                                         "or flow control"):
        await within(transport.write(payload(8192)))
    assert asyncio.get_running_loop().time() - started < 2.0
    assert not transport.is_open
    # Nothing of it crosses later: the port was closed with its output discarded (the
    # terminal's end reads nothing; with the port closed, a pty says EIO)
    await asyncio.sleep(0.3)
    try:
        crossed = os.read(pty.master, 65536)
    except (BlockingIOError, OSError):
        crossed = b""
    assert crossed == b""


class KernelQueue:
    """What TIOCOUTQ says for the port, set by the test: a pty has no output queue (its
    TIOCOUTQ is always 0), a UART or USB serial adapter does."""

    def __init__(self, monkeypatch, queued: int) -> None:
        from bridge.transports import serial as serial_module

        self.queued = queued
        monkeypatch.setattr(serial_module, "_output_queued", lambda fd: self.queued)


async def test_serial_output_the_kernel_holds_for_a_held_line_ends_the_link(pty, monkeypatch):
    """A frame smaller than the driver's free buffer never makes write() wait: on a held line
    it sat in the kernel, with its retransmissions, and went out when the line moved (the
    review of the first watchdog). Output the kernel holds must go down."""
    transport = SerialTransport(SerialLink(device=pty.path), held_limit=0.3)
    await within(transport.open())
    KernelQueue(monkeypatch, 5)  # what the write below leaves there: taken, never sent
    reading = asyncio.create_task(transport.read())
    assert transport.write_nowait(b"\x02{}\x03x") == 5
    with pytest.raises(LinkClosed, match="has taken no data for 0.3 s"):
        await within(reading)
    assert not transport.is_open


async def test_serial_output_the_kernel_sends_slowly_keeps_the_link(pty, monkeypatch):
    """A slow line sends what the kernel holds a little at a time: no held line, also while a
    write waits for room longer than held_limit (the kernel wakes a writer only once a few
    hundred bytes are free: 32 s at 1200 baud)."""
    transport = SerialTransport(SerialLink(device=pty.path), held_limit=0.3)
    await within(transport.open())
    queue = KernelQueue(monkeypatch, 4000)
    termios.tcflow(transport._fd, termios.TCOOFF)  # no room: the write waits ...
    writing = asyncio.create_task(transport.write(payload(8192)))
    for _ in range(8):  # ... for 1.2 s, four times held_limit, while the line moves
        await asyncio.sleep(0.15)
        queue.queued -= 300
    assert transport.is_open and not writing.done()
    termios.tcflow(transport._fd, termios.TCOON)
    assert await pty.recv(8192) == payload(8192)
    await within(writing)
    for _ in range(6):  # the rest leaves slowly: still no held line
        await asyncio.sleep(0.15)
        queue.queued = max(0, queue.queued - 400)
    assert transport.is_open
    await within(transport.close())


async def test_serial_line_that_moves_slowly_is_not_called_held(pty):
    """A slow line (the terminal reads little at a time) is no held one: the write waits as
    long as it takes, each piece the kernel can take again counting as progress."""
    transport = SerialTransport(SerialLink(device=pty.path), held_limit=0.3)
    await within(transport.open())
    data = payload(96 * 1024)
    writing = asyncio.create_task(transport.write(data))
    got = b""
    async with asyncio.timeout(30):
        while len(got) < len(data):
            await asyncio.sleep(0.1)
            got += await pty.recv(min(4096, len(data) - len(got)))
    assert got == data
    await within(writing)
    await within(transport.close())


async def test_serial_read_returns_available_bytes_without_waiting_for_more(pty, serial_link):
    await pty.send(b"\x02ab")
    assert b"".join(await read_exactly(serial_link, 3)) == b"\x02ab"
    pending = asyncio.create_task(serial_link.read())
    await asyncio.sleep(0.05)
    assert not pending.done()  # nothing has arrived, so read() waits
    await pty.send(b"c")
    assert await within(pending) == b"c"


async def test_serial_reads_ahead_a_bounded_amount_while_nobody_reads(pty, serial_link):
    # The loop's callback reads bytes as they arrive, also between read() calls; a consumer
    # that stops reading must not make it buffer without end: past MAX_UNREAD it leaves the
    # rest in the kernel, so the terminal's writes block, as on a real line.
    await pty.send(b"\x02")
    assert await within(serial_link.read()) == b"\x02"
    data = payload(MAX_UNREAD * 4)
    sending = asyncio.create_task(pty.send(data))
    await asyncio.sleep(0.3)
    assert not sending.done(), "the transport drained the line with nobody reading"
    assert len(serial_link._received) <= MAX_UNREAD + READ_CHUNK
    pieces, _ = await within(asyncio.gather(read_exactly(serial_link, len(data)), sending))
    assert b"".join(pieces) == data  # nothing lost or reordered across the pause


async def test_serial_bytes_that_came_before_a_hang_up_are_still_handed_over(
    pty, serial_link, loop_errors
):
    await pty.send(b"\x02")
    assert await within(serial_link.read()) == b"\x02"
    await pty.send(b"\x02last words\x03")
    await asyncio.sleep(0.05)  # read by the callback, no read() waiting
    pty.vanish()
    await asyncio.sleep(0.05)
    assert await within(serial_link.read()) == b"\x02last words\x03"
    with pytest.raises(LinkClosed):
        await within(serial_link.read())
    assert loop_errors == []


# --- serial: deliver(), the worker's way of reading ------------------------------------------

class Collector:
    """A deliver() receiver: keeps what it is handed, and whether a task was running then."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.data = bytearray()
        self.calls = 0
        self.in_task = 0
        self.fail_after = fail_after

    def __call__(self, data: bytes) -> None:
        self.calls += 1
        self.in_task += asyncio.current_task() is not None
        self.data += data
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise ValueError("the receiver's own bug")


async def test_serial_deliver_hands_every_byte_in_order_from_the_loops_read_callback(
        pty, serial_link, loop_errors):
    """A frame comes at 115200 baud as many small reads; deliver() hands each to the
    receiver from the loop's read callback (no task is running: no task step per read),
    bytes read before it began first, then everything in order."""
    await pty.send(b"\x02")
    assert await within(serial_link.read()) == b"\x02"  # the fd stays watched from now on
    await pty.send(b"early")
    await asyncio.sleep(0.05)  # read ahead by the callback, nobody reading
    received = Collector()
    delivering = asyncio.create_task(serial_link.deliver(received))
    data = payload(20_000)
    for start in range(0, len(data), 700):
        await pty.send(data[start:start + 700])
        await asyncio.sleep(0.002)
    async with asyncio.timeout(STEP):
        while len(received.data) < 5 + len(data):
            await asyncio.sleep(0.01)
    assert bytes(received.data) == b"early" + data
    assert received.calls > 3 and received.in_task == 1  # only the early bytes, from deliver
    assert not delivering.done()
    pty.vanish()
    with pytest.raises(LinkClosed) as lost:
        await within(delivering)
    assert lost.value.reason.startswith(f"serial device {pty.path} disappeared (unplugged?)")
    assert loop_errors == []


async def test_serial_deliver_raises_what_its_receiver_raised_and_loses_no_byte(
        pty, serial_link, loop_errors):
    """A receiver's exception comes out of deliver() in its own task (the worker's link task
    then fails and is reported), not into the loop's exception handler; bytes read after it
    wait for the next read()."""
    received = Collector(fail_after=1)
    delivering = asyncio.create_task(serial_link.deliver(received))
    await asyncio.sleep(0.05)
    await pty.send(b"one")
    with pytest.raises(ValueError, match="the receiver's own bug"):
        await within(delivering)
    assert bytes(received.data) == b"one"
    await pty.send(b"two")
    assert b"".join(await read_exactly(serial_link, 3)) == b"two"
    assert loop_errors == []


async def test_serial_deliver_cancelled_before_it_raised_its_receivers_failure_raises_it(
        pty, serial_link, loop_errors):
    """The receiver raised in the loop's read callback, and deliver()'s task was cancelled
    before it ran to raise that (the worker cancels the reader when the writer ends with
    LinkClosed, or the device is unplugged, in the same pass): the failure stayed on the
    transport, never logged, and the link counted as ended cleanly (review rv14). It comes
    out of deliver() instead of the cancellation."""
    delivering = None

    def cancelled_beside(data: bytes) -> None:
        # (the link's end, as the worker's _run_link cancels the reader: after this callback
        # has woken the task, before the task runs)
        asyncio.get_running_loop().call_soon(delivering.cancel)
        raise ValueError("the receiver's own bug")

    delivering = asyncio.create_task(serial_link.deliver(cancelled_beside))
    async with asyncio.timeout(STEP):  # (waiting for the line: the callback calls receivers)
        while serial_link._read_waiter is None:
            await asyncio.sleep(0.005)
    await pty.send(b"one")
    with pytest.raises(ValueError, match="the receiver's own bug"):
        await within(delivering)
    assert loop_errors == []


async def test_serial_deliver_raises_a_receivers_failure_from_one_place_cancelled_or_not(
        pty, serial_link, loop_errors):
    """The worker counts a bug by its type and where it was raised (its traceback's lines),
    logging its traceback once. deliver() raised a receiver's failure from one line, or from
    another when it had been cancelled meanwhile: the same bug counted as two, each with a
    traceback (review rv15)."""
    import traceback

    def where(exc: BaseException) -> list[tuple[str, int]]:
        return [(frame.f_code.co_filename, line)
                for frame, line in traceback.walk_tb(exc.__traceback__)]

    places = []
    for cancelled in (False, True):
        delivering = None

        def failing(data: bytes) -> None:
            if cancelled:
                asyncio.get_running_loop().call_soon(delivering.cancel)
            raise ValueError("the receiver's own bug")

        delivering = asyncio.create_task(serial_link.deliver(failing))
        async with asyncio.timeout(STEP):
            while serial_link._read_waiter is None:
                await asyncio.sleep(0.005)
        await pty.send(b"one")
        with pytest.raises(ValueError, match="the receiver's own bug") as raised:
            await within(delivering)
        places.append(where(raised.value))
    assert places[0] == places[1]
    assert loop_errors == []


async def test_serial_deliver_and_read_are_not_both_waiting(pty, serial_link):
    reading = asyncio.create_task(serial_link.read())
    await asyncio.sleep(0.05)
    with pytest.raises(RuntimeError, match="already in progress"):
        await within(serial_link.deliver(Collector()))
    await pty.send(b"x")
    assert await within(reading) == b"x"


async def test_serial_port_is_raw_even_on_a_cooked_pty():
    peer = Pty(raw=False)  # a fresh pty is cooked: line editing, echo, signals, CR->NL
    try:
        lflag_before = termios.tcgetattr(peer.master)[3]  # the master reports the slave's modes
        assert lflag_before & termios.ICANON and lflag_before & termios.ECHO
        transport = SerialTransport(SerialLink(device=peer.path))
        await within(transport.open())
        iflag, oflag, _cflag, lflag = termios.tcgetattr(peer.master)[:4]
        assert lflag & (termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN) == 0
        mangling = termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON | termios.ISTRIP
        assert iflag & mangling == 0
        assert oflag & termios.OPOST == 0

        # ETX, EOT, DLE, NAK, CR (and XON/XOFF, ^Z, DEL, ...) must pass untouched both ways.
        controls = bytes([0x03, 0x04, 0x10, 0x15, 0x0D, 0x0A, 0x11, 0x13, 0x1A, 0x1C, 0x7F, 0x00])
        data = controls + bytes(range(256)) + controls
        await peer.send(data)
        assert b"".join(await read_exactly(transport, len(data))) == data
        assert await peer.silent_for(0.2)  # nothing was echoed back to the terminal
        await within(transport.write(data))
        assert await peer.recv(len(data)) == data
        await within(transport.close())
    finally:
        peer.vanish()


# --- serial: closing and losing the device ----------------------------------------------------


async def test_serial_close_twice_then_calls_raise_link_closed(pty):
    transport = SerialTransport(SerialLink(device=pty.path))
    await within(transport.open())
    assert fds_open_on(pty.path)
    await within(transport.close())
    await within(transport.close())
    assert not transport.is_open
    assert fds_open_on(pty.path) == []
    with pytest.raises(LinkClosed, match="was closed"):
        await within(transport.read())
    with pytest.raises(LinkClosed, match="was closed"):
        await within(transport.write(b"x"))
    # The exclusive lock went with the fd: the port can be opened again.
    again = SerialTransport(SerialLink(device=pty.path))
    await within(again.open())
    await within(again.close())


async def test_serial_close_drops_bytes_read_ahead(pty, serial_link):
    await pty.send(b"\x02")
    assert await within(serial_link.read()) == b"\x02"
    await pty.send(b"\x02not for anyone\x03")
    await asyncio.sleep(0.05)  # read ahead by the callback
    await within(serial_link.close())
    with pytest.raises(LinkClosed, match="was closed"):
        await within(serial_link.read())


async def test_serial_close_wakes_a_pending_read(pty, serial_link):
    pending = asyncio.create_task(serial_link.read())
    await asyncio.sleep(0.05)
    await within(serial_link.close())
    with pytest.raises(LinkClosed, match="was closed"):
        await within(pending)


async def test_serial_close_wakes_a_pending_write(pty, serial_link):
    writing = asyncio.create_task(serial_link.write(payload(256 * 1024)))
    await asyncio.sleep(0.05)
    assert not writing.done()  # stuck: the terminal is not reading
    await within(serial_link.close())
    with pytest.raises(LinkClosed, match="was closed"):
        await within(writing)
    assert fds_open_on(pty.path) == []


async def test_serial_second_opener_is_refused(pty, serial_link):
    second = SerialTransport(SerialLink(device=pty.path))
    with pytest.raises(LinkClosed, match="in use by another process"):
        await within(second.open())
    assert not second.is_open
    await pty.send(b"\x05")  # the first owner is unaffected
    assert await within(serial_link.read()) == b"\x05"


def other_user_opens(path: str) -> Callable[[], str]:
    """A function that tries to open(2) `path` as another user than the bridge's: "opened",
    or the errno's number."""
    import subprocess
    import sys

    from .rig import as_nobody, python_env

    prefix = as_nobody("a second program opening the port")
    os.chmod(path, 0o666)  # (the user may open it: only the port's exclusivity refuses)
    probe = ("import os\ntry:\n    os.open(%r, os.O_RDWR | os.O_NOCTTY)\n    print('opened')\n"
             "except OSError as exc:\n    print(exc.errno)" % path)
    return lambda: subprocess.run([*prefix, sys.executable, "-c", probe], capture_output=True,
                                  text=True, cwd="/", env=python_env(),
                                  timeout=60).stdout.strip()


async def test_serial_port_is_refused_to_a_program_that_takes_no_lock(pty, monkeypatch):
    """pyserial's exclusive=True is an advisory flock: `cat`, screen or a vendor tool that
    opens the tty plainly got in beside the bridge, and whichever read first took the
    terminal's ACKs and answers (the transports audit). The port is opened TIOCEXCL too: a
    second open(2) fails with EBUSY (root, CAP_SYS_ADMIN, still gets through: hence the
    ModemManager rule in udev/). (A pty is left out, below: here one stands for a port.)"""
    from bridge.transports import serial as serial_module

    monkeypatch.setattr(serial_module, "_is_pty", lambda fd: False)
    other_opens = other_user_opens(pty.path)
    serial_link = SerialTransport(SerialLink(device=pty.path))
    await within(serial_link.open())
    assert other_opens() == str(errno.EBUSY)
    await pty.send(b"\x05")  # the owner is unaffected
    assert await within(serial_link.read()) == b"\x05"
    # Closed, the port is anyone's again, though the pty (the terminal's end open) lives on:
    # the daemon, which runs as its own user, opens it again after every relink
    await within(serial_link.close())
    assert other_opens() == "opened"


async def test_a_pty_is_not_made_exclusive(pty, serial_link):
    """A pty (socat, a simulator) keeps TIOCEXCL for as long as its other end is open, also
    after a daemon killed while holding it: the restarted daemon, not root, was refused
    EBUSY until the pty was made again (the review). A pty is left open to others."""
    assert other_user_opens(pty.path)() == "opened"


def test_pyserial_sees_a_vanished_pty_as_readable_but_empty(pty):
    """The kernel and pyserial behaviour the transport's loss detection relies on."""
    port = serial.Serial(pty.path, timeout=0)
    fd = port.fileno()
    pty.vanish()
    # The slave is hung up: select/epoll say "readable", the read finds end-of-file (some
    # kernels give EIO), and pyserial turns that into SerialException...
    with pytest.raises(serial.SerialException, match="returned no data|Input/output error"):
        port.read(1)
    # ...yet still believes the port is open.
    assert port.is_open
    try:
        assert os.read(fd, 1) == b""
    except OSError as exc:
        assert exc.errno == errno.EIO
    with pytest.raises(OSError) as written:
        os.write(fd, b"x")
    assert written.value.errno == errno.EIO
    port.close()


async def test_serial_pending_read_gets_link_closed_when_the_pty_vanishes(
    pty, serial_link, loop_errors
):
    pending = asyncio.create_task(serial_link.read())
    await asyncio.sleep(0.05)
    pty.vanish()
    with pytest.raises(LinkClosed) as lost:
        await within(pending)
    assert lost.value.reason.startswith(f"serial device {pty.path} disappeared (unplugged?)")
    assert not serial_link.is_open
    assert fds_open_on(pty.path) == []  # the fd is closed by the time LinkClosed is raised
    with pytest.raises(LinkClosed) as again:
        await within(serial_link.read())
    assert again.value.reason == lost.value.reason  # later calls keep the first reason
    with pytest.raises(LinkClosed):
        await within(serial_link.write(b"\x06"))
    assert loop_errors == []


async def test_serial_write_after_the_pty_vanished_gets_link_closed(pty, serial_link, loop_errors):
    pty.vanish()
    with pytest.raises(LinkClosed, match=r"disappeared \(unplugged\?\): Input/output error"):
        await within(serial_link.write(b"\x02payload\x03"))
    assert fds_open_on(pty.path) == []
    assert loop_errors == []


async def test_serial_open_missing_device(tmp_path):
    transport = SerialTransport(SerialLink(device=str(tmp_path / "ttyACM9")))
    with pytest.raises(LinkClosed, match=r"ttyACM9 does not exist"):
        await within(transport.open())
    assert not transport.is_open
    await within(transport.close())  # closing a transport that never opened is harmless


async def test_serial_open_something_that_is_not_a_serial_port(tmp_path):
    plain = tmp_path / "not-a-tty"
    plain.write_bytes(b"")
    with pytest.raises(LinkClosed, match="is not a serial port"):
        await within(SerialTransport(SerialLink(device=str(plain))).open())


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EACCES, ["permission denied", "owned by group", "70-poi-bridge.rules",
                        "poi-bridge udev-rules", "check the device path"]),
        # The shipped unit's device cgroup (or seccomp) refuses with EPERM, not EACCES. The
        # pty is a real node of the kernel's "pts" driver (major 136 in /proc/devices).
        (errno.EPERM, ["operation not permitted", "systemd sandbox of poi-bridge.service",
                       "DevicePolicy=closed", "`systemctl edit poi-bridge`",
                       "[Service] DeviceAllow=char-pts rw"]),
        (errno.EBUSY, ["busy", "another program has it open", "fuser -v", "ModemManager",
                       'ID_MM_DEVICE_IGNORE}="1"']),
        (errno.EAGAIN, ["in use by another process"]),
        (errno.ENXIO, ["not answering", "unplugged"]),
    ],
)
async def test_serial_open_failures_are_explained(pty, monkeypatch, code, expected):
    # These cannot be produced for real here (tests run as root, no ModemManager), so pyserial
    # raises them as it would on a store PC.
    def refuse(*_args, **_kwargs):
        raise serial.SerialException(code, f"could not open port {pty.path}: {os.strerror(code)}")

    monkeypatch.setattr(serial, "Serial", refuse)
    with pytest.raises(LinkClosed) as refused:
        await within(SerialTransport(SerialLink(device=pty.path)).open())
    for words in expected:
        assert words in refused.value.reason
    assert pty.path in refused.value.reason


async def test_serial_eacces_suggests_joining_only_a_serial_device_group(
        tmp_path, pty, monkeypatch):
    """A node owned by root or tty got "add the poi-bridge user to that group": a
    technician adding a daemon to root or tty. Only dialout (uucp) is a group to join;
    any other node is one neither the udev rule nor dialout covers."""
    import grp

    def refuse(*_args, **_kwargs):
        raise serial.SerialException(errno.EACCES, "could not open port: Permission denied")

    monkeypatch.setattr(serial, "Serial", refuse)
    reasons = {}
    for group in ("root", "tty", "dialout"):
        node = tmp_path / f"ttyUSB-{group}"
        node.write_bytes(b"")
        os.chown(node, -1, grp.getgrnam(group).gr_gid)
        with pytest.raises(LinkClosed) as refused:
            await within(SerialTransport(SerialLink(device=str(node))).open())
        reasons[group] = refused.value.reason
    assert "add the poi-bridge user to group 'dialout'" in reasons["dialout"]
    for group in ("root", "tty"):
        assert "add the poi-bridge user" not in reasons[group], reasons[group]
        assert "neither the udev rule" in reasons[group] and "dialout" in reasons[group]
        assert "poi-bridge udev-rules" in reasons[group]
        assert "check the device path" in reasons[group]


async def test_serial_eperm_and_eacces_get_different_advice(pty, monkeypatch):
    reasons = {}
    for code in (errno.EACCES, errno.EPERM):
        def refuse(*_args, code=code, **_kwargs):
            raise serial.SerialException(code, f"could not open port: {os.strerror(code)}")

        monkeypatch.setattr(serial, "Serial", refuse)
        with pytest.raises(LinkClosed) as refused:
            await within(SerialTransport(SerialLink(device=pty.path)).open())
        reasons[code] = refused.value.reason
    # Group membership or a udev rule cannot lift a cgroup or seccomp denial, and a drop-in
    # cannot fix a file mode: each errno gets only its own remedy.
    assert "DeviceAllow" not in reasons[errno.EACCES]
    assert "dialout" not in reasons[errno.EPERM] and "udev" not in reasons[errno.EPERM]


async def test_serial_eperm_on_a_group_the_unit_allows_says_restart_not_deviceallow(
        pty, monkeypatch):
    """The unit allows char-ttyUSB and char-ttyACM, resolved from /proc/devices when it
    starts: a terminal whose driver loaded after that (plugged in after `enable --now`)
    gets EPERM until a restart. Adding DeviceAllow= again would not help."""
    from bridge.transports import serial as serial_transport

    def refuse(*_args, **_kwargs):
        raise serial.SerialException(errno.EPERM, "could not open port: Operation not permitted")

    monkeypatch.setattr(serial, "Serial", refuse)
    monkeypatch.setattr(serial_transport, "_device_group", lambda _device: "ttyUSB")
    with pytest.raises(LinkClosed) as refused:
        await within(SerialTransport(SerialLink(device=pty.path)).open())
    reason = refused.value.reason
    assert "the ttyUSB driver was not loaded when the service started" in reason
    assert "`systemctl restart poi-bridge`" in reason and "modules-load" in reason
    assert "systemctl edit" not in reason and "add [Service]" not in reason


def test_the_device_groups_serial_knows_are_the_units():
    from bridge.transports.serial import UNIT_DEVICE_GROUPS

    unit = (Path(__file__).parent.parent / "systemd" / "poi-bridge.service").read_text()
    allowed = set(re.findall(r"^DeviceAllow=char-(\S+) rw$", unit, re.MULTILINE))
    assert allowed == UNIT_DEVICE_GROUPS


def test_serial_eperm_names_the_device_group_systemd_allows_by(tmp_path):
    from bridge.transports.serial import _device_group

    master, slave = os.openpty()
    try:
        link = tmp_path / "till-terminal"  # a hand-made link: the group of what it points to
        link.symlink_to(os.ttyname(slave))
        assert _device_group(str(link)) == "pts"
    finally:
        os.close(master)
        os.close(slave)
    # Not on this machine: the driver is the node's name without its number.
    assert _device_group("/dev/ttyAMA0") == "ttyAMA"
    if os.path.exists("/dev/ttyS0"):  # major 4 is both "tty" and "ttyS" in /proc/devices
        assert _device_group("/dev/ttyS0") == "ttyS"


@pytest.mark.parametrize(
    ("step", "raised"),
    [
        # pyserial lets these escape as they are: a plain OSError from the modem-line ioctl
        # (TIOCMBIS), termios.error from the tcflush at the end of its open().
        ("_update_dtr_state", OSError),
        ("_reset_input_buffer", termios.error),
    ],
)
async def test_serial_device_going_away_while_pyserial_opens_it(pty, monkeypatch, step, raised):
    # The terminal is unplugged between pyserial's os.open() and its next call on the fd: the
    # real pty is hung up at that moment, and the real kernel answers that call with EIO.
    original = getattr(serial.Serial, step)
    escaped: list[BaseException] = []

    def unplugged_meanwhile(port: serial.Serial) -> None:
        pty.vanish()
        try:
            original(port)
        except BaseException as exc:
            escaped.append(exc)
            raise

    monkeypatch.setattr(serial.Serial, step, unplugged_meanwhile)
    transport = SerialTransport(SerialLink(device=pty.path))
    with pytest.raises(LinkClosed) as gone:
        await within(transport.open())
    assert type(escaped[0]) is raised and escaped[0].args[0] == errno.EIO
    assert gone.value.reason == (f"serial device {pty.path} went away while opening it "
                                 f"(unplugged or switched off?): Input/output error")
    assert not transport.is_open
    assert fds_open_on(pty.path) == [], "pyserial closed the fd it had opened"


async def test_serial_reopens_after_replug_through_a_stable_symlink(tmp_path, loop_errors):
    # Like a udev symlink /dev/poi/ingenico-123 that follows the terminal to its new ttyACMn.
    first, second = Pty(), Pty()
    link = tmp_path / "ingenico-123"
    link.symlink_to(first.path)
    transport = SerialTransport(SerialLink(device=str(link)))
    try:
        await within(transport.open())
        first.vanish()
        with pytest.raises(LinkClosed, match="disappeared"):
            await within(transport.read())
        # While unplugged the symlink dangles.
        with pytest.raises(LinkClosed, match="does not exist"):
            await within(transport.open())
        (tmp_path / "next").symlink_to(second.path)
        os.replace(tmp_path / "next", link)
        await within(transport.open())
        assert transport.is_open
        await within(transport.write(b"\x05"))
        assert await second.recv(1) == b"\x05"
        await second.send(b"\x06")
        assert await within(transport.read()) == b"\x06"
    finally:
        await within(transport.close())
        first.vanish()
        second.vanish()
    assert loop_errors == []


def test_serial_describe():
    assert SerialTransport(SerialLink(device="/dev/poi/ingenico-123")).describe() == (
        "/dev/poi/ingenico-123 at 115200 8N1")
    link = SerialLink(device="/dev/ttyUSB0", baudrate=9600, bytesize=7, parity="E",
                      stopbits=1.5, rtscts=True)
    assert SerialTransport(link).describe() == "/dev/ttyUSB0 at 9600 7E1.5, RTS/CTS"


# --- TCP --------------------------------------------------------------------------------------


class LanTerminal:
    """A terminal on the LAN: a real asyncio server on 127.0.0.1 handing us its connections."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        self.connections = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, port: int = 0) -> None:
        async def accept(reader, writer):
            self._writers.append(writer)
            await self.connections.put((reader, writer))

        self.server = await asyncio.start_server(accept, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def accepted(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await within(self.connections.get())

    async def stop(self) -> None:
        for writer in self._writers:  # the terminal's side of every connection it accepted
            writer.close()
        self._writers.clear()
        if self.server is not None:
            self.server.close()
            await within(self.server.wait_closed())
            self.server = None

    def link(self) -> TcpLink:
        return TcpLink(host="127.0.0.1", port=self.port)


@pytest.fixture
async def terminal():
    peer = LanTerminal()
    await peer.start()
    yield peer
    await peer.stop()


@pytest.fixture
async def tcp_link(terminal):
    transport = TcpTransport(terminal.link())
    await within(transport.open())
    yield transport
    await within(transport.close())


def free_port() -> int:
    """A port nobody listens on (bound then released, so the kernel will refuse connects)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_tcp_bytes_both_ways(terminal, tcp_link):
    reader, writer = await terminal.accepted()
    assert tcp_link.is_open
    await within(tcp_link.write(b"\x00\x00\x00\x03abc"))
    assert await within(reader.readexactly(7)) == b"\x00\x00\x00\x03abc"
    data = payload(11 * 1024)
    writer.write(data)
    assert b"".join(await read_exactly(tcp_link, len(data))) == data
    await within(tcp_link.write(data))
    assert await within(reader.readexactly(len(data))) == data
    writer.close()


async def test_tcp_deliver_reads_for_its_receiver_until_the_link_ends(terminal, tcp_link):
    """Transport.deliver()'s default: read() in a loop, each piece to the receiver."""
    _, writer = await terminal.accepted()
    received = Collector()
    delivering = asyncio.create_task(tcp_link.deliver(received))
    data = payload(11 * 1024)
    writer.write(data)
    async with asyncio.timeout(STEP):
        while len(received.data) < len(data):
            await asyncio.sleep(0.01)
    assert bytes(received.data) == data
    writer.close()
    with pytest.raises(LinkClosed):
        await within(delivering)


async def test_tcp_read_returns_available_bytes_without_waiting_for_more(terminal, tcp_link):
    _reader, writer = await terminal.accepted()
    writer.write(b"ab")
    assert b"".join(await read_exactly(tcp_link, 2)) == b"ab"
    pending = asyncio.create_task(tcp_link.read())
    await asyncio.sleep(0.05)
    assert not pending.done()
    writer.write(b"c")
    assert await within(pending) == b"c"
    writer.close()


async def test_tcp_close_twice_and_a_pending_read_is_woken(terminal, tcp_link):
    await terminal.accepted()
    pending = asyncio.create_task(tcp_link.read())
    await asyncio.sleep(0.05)
    await within(tcp_link.close())
    await within(tcp_link.close())
    assert not tcp_link.is_open
    with pytest.raises(LinkClosed, match="was closed"):
        await within(pending)
    with pytest.raises(LinkClosed, match="was closed"):
        await within(tcp_link.write(b"x"))


async def test_tcp_connection_refused():
    transport = TcpTransport(TcpLink(host="127.0.0.1", port=free_port()))
    with pytest.raises(LinkClosed, match="refused the connection"):
        await within(transport.open())
    assert not transport.is_open


@pytest.mark.parametrize(
    "host", ["pos1..shop.lan", "pos1." + "x" * 64 + ".lan", "pos1\x00.shop.lan"])
async def test_tcp_host_that_is_not_a_host_name(host):
    # A typo in the configuration: asyncio raises UnicodeError (IDNA: an empty label, a label
    # over 63 characters) or ValueError (NUL byte) before any lookup, not an OSError.
    transport = TcpTransport(TcpLink(host=host, port=8443))
    with pytest.raises(LinkClosed) as bad:
        await within(transport.open())
    assert bad.value.reason.startswith(f"terminal host {host!r} is not a valid host name (")
    assert bad.value.reason.endswith("check `host` in the configuration")
    assert not transport.is_open


async def test_tcp_connect_timeout():
    # A listener with a full accept queue drops further SYNs, like a terminal that is off.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = TcpTransport(TcpLink(host="127.0.0.1", port=port), connect_timeout=0.3)
            try:
                await within(filler.open())
                fillers.append(filler)
            except LinkClosed as exc:
                assert "no answer from terminal at 127.0.0.1" in exc.reason
                assert "within 0.3 s" in exc.reason
                break
        else:
            pytest.fail("the accept queue never filled up")
    finally:
        for filler in fillers:
            await within(filler.close())
        listener.close()


async def test_tcp_peer_close_gives_link_closed(terminal, tcp_link, loop_errors):
    _reader, writer = await terminal.accepted()
    writer.write(b"\x06")
    writer.close()
    # Bytes sent before the close are still delivered, then the close is reported.
    assert await within(tcp_link.read()) == b"\x06"
    with pytest.raises(LinkClosed, match="closed the connection"):
        await within(tcp_link.read())
    assert not tcp_link.is_open
    with pytest.raises(LinkClosed, match="closed the connection"):
        await within(tcp_link.write(b"\x15"))
    assert loop_errors == []


async def test_tcp_peer_reset_gives_link_closed(terminal, tcp_link, loop_errors):
    _reader, writer = await terminal.accepted()
    pending = asyncio.create_task(tcp_link.read())
    await asyncio.sleep(0.05)
    # SO_LINGER 0 makes the close send RST, as a terminal rebooting mid-conversation may.
    linger_off = struct.pack("ii", 1, 0)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_off)
    writer.transport.abort()
    with pytest.raises(LinkClosed, match="broke: Connection reset by peer"):
        await within(pending)
    with pytest.raises(LinkClosed, match="reset by peer"):
        await within(tcp_link.write(b"\x06"))
    assert loop_errors == []


async def test_tcp_reopens_when_the_terminal_is_back(terminal):
    transport = TcpTransport(terminal.link())
    await within(transport.open())
    _reader, writer = await terminal.accepted()
    port = terminal.port
    writer.close()
    await terminal.stop()
    with pytest.raises(LinkClosed):
        await within(transport.read())
    with pytest.raises(LinkClosed, match="refused"):
        await within(transport.open())
    with pytest.raises(LinkClosed, match="refused"):  # the latest reason, not a stale one
        await within(transport.read())
    await terminal.start(port)  # back on the same address
    await within(transport.open())
    reader, writer = await terminal.accepted()
    await within(transport.write(b"\x05"))
    assert await within(reader.readexactly(1)) == b"\x05"
    writer.write(b"\x06")
    assert await within(transport.read()) == b"\x06"
    writer.close()
    await within(transport.close())


def test_tcp_describe():
    assert TcpTransport(TcpLink(host="10.0.0.7", port=8443)).describe() == "tcp 10.0.0.7:8443"
    assert TcpTransport(TcpLink(host="fe80::1", port=8443)).describe() == "tcp [fe80::1]:8443"


# --- the factory -------------------------------------------------------------------------------


def test_open_transport_builds_without_opening():
    serial_transport = open_transport(SerialLink(device="/dev/ttyACM0"))
    assert isinstance(serial_transport, SerialTransport) and serial_transport.kind == "serial"
    assert not serial_transport.is_open
    tcp_transport = open_transport(TcpLink(host="127.0.0.1", port=8443))
    assert isinstance(tcp_transport, TcpTransport) and tcp_transport.kind == "tcp"
    assert not tcp_transport.is_open


def test_open_transport_usb_loads_its_module_lazily(monkeypatch):
    link = UsbLink(vendor_id="0x0b00", product_id="0x0080")

    class FakeUsbTransport:
        def __init__(self, link, taken_serials=(), taken_ports=()):
            self.link, self.taken_serials = link, taken_serials

    monkeypatch.setitem(sys.modules, "bridge.transports.usb",
                        types.SimpleNamespace(UsbTransport=FakeUsbTransport))
    built = open_transport(link, taken_serials=("AAA111",))
    assert isinstance(built, FakeUsbTransport) and built.link is link
    assert built.taken_serials == ("AAA111",)


def test_open_transport_usb_missing_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bridge.transports.usb", None)  # import now fails
    with pytest.raises(TransportUnavailable, match="USB links need bridge.transports.usb"):
        open_transport(UsbLink(vendor_id=0x0B00, product_id=0x0080))


def test_open_transport_rejects_unknown_configs():
    with pytest.raises(TypeError, match="no transport"):
        open_transport(object())  # type: ignore[arg-type]


# --- Backoff -----------------------------------------------------------------------------------


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_grows_by_the_factor():
    top = Backoff(initial=0.5, maximum=30.0, factor=2.0, rng=FixedRandom(1.0))
    assert [top.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    bottom = Backoff(initial=0.5, maximum=30.0, factor=2.0, rng=FixedRandom(0.0))
    assert [bottom.next_delay() for _ in range(3)] == [0.25, 0.5, 1.0]  # never below half


def test_backoff_is_capped_even_after_a_very_long_outage():
    backoff = Backoff(initial=0.2, maximum=10.0, rng=FixedRandom(1.0))
    delays = [backoff.next_delay() for _ in range(5000)]  # ~14 h of retries at the cap
    assert max(delays) == 10.0
    assert delays[-1] == 10.0


def test_backoff_is_jittered():
    backoff = Backoff(initial=1.0, maximum=8.0, rng=random.Random(42))
    for _ in range(4):
        backoff.next_delay()
    capped = [backoff.next_delay() for _ in range(200)]
    assert all(4.0 <= delay <= 8.0 for delay in capped)
    assert len(set(capped)) > 150  # spread out, so many bridges do not retry in step
    assert min(capped) < 5.0 and max(capped) > 7.0


def test_backoff_reset_starts_over():
    backoff = Backoff(initial=0.5, maximum=30.0, rng=FixedRandom(1.0))
    for _ in range(10):
        backoff.next_delay()
    assert backoff.next_delay() == 30.0
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_each_link_kind_says_how_long_a_byte_takes_on_its_line(tmp_path):
    """The framers count a frame's ACK time from its last byte on the line (README "Wire
    framing"): the worker gives them the link's time per byte."""
    from bridge.config import TerminalConfig
    from bridge.daemon.journal import Journal
    from bridge.daemon.worker import TerminalWorker

    assert SerialLink(device="/dev/ttyS0").seconds_per_byte == pytest.approx(10 / 115200)
    assert SerialLink(device="/dev/ttyS0", baudrate=9600, bytesize=7, parity="E",
                      stopbits=2).seconds_per_byte == pytest.approx(11 / 9600)
    assert TcpLink(host="192.0.2.1", port=8443).seconds_per_byte == 0.0
    assert UsbLink(vendor_id=0x11CA, product_id=0x0219).seconds_per_byte == 0.0

    class Nobody:
        def deliver(self, result): ...
        def progress(self, event): ...
        def terminal_state(self, poi_id, state): ...

    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        for link, expected in (({"kind": "serial", "device": "/dev/ttyS0", "baudrate": 57600},
                                10 / 57600),
                               ({"kind": "tcp", "host": "192.0.2.1", "port": 8443}, 0.0)):
            config = TerminalConfig.model_validate({"poi_id": "V400m-1", "link": link})
            worker = TerminalWorker(config, journal, Nobody())
            assert worker.framer.seconds_per_byte == pytest.approx(expected)
    finally:
        journal.close()


class MovingLine:
    # (TIOCOUTQ stood in for: a pty has no output queue)
    """TIOCOUTQ of a line that sends `rate` bytes/s, never held; writes add to it."""
    def __init__(self, monkeypatch, rate: float) -> None:
        self.rate, self.q, self.t = rate, 0.0, asyncio.get_running_loop().time()
        monkeypatch.setattr(serial_module, "_output_queued", lambda fd: self.now())
        real = serial_module.os.write

        def write(fd, data):
            n = real(fd, data)
            self.now()
            self.q += n
            return n
        monkeypatch.setattr(serial_module.os, "write", write)

    def now(self) -> int:
        t = asyncio.get_running_loop().time()
        self.q = max(0.0, self.q - (t - self.t) * self.rate)
        self.t = t
        return math.ceil(self.q)  # (a byte in flight counts, as a USB adapter's URB does)


async def test_serial_frames_written_on_a_moving_line_are_no_held_line(pty, monkeypatch):
    """The review: the watch kept the queue it saw when armed, so a frame written since and
    still on the wire when it looked (10 s later) made a line that never stopped "held": the
    link closed and the frame on the wire was cut short."""
    transport = SerialTransport(SerialLink(device=pty.path), held_limit=1.0)
    await within(transport.open())
    MovingLine(monkeypatch, rate=960)          # 9600 baud, sending all the time
    assert transport.write_nowait(b"A" * 200) == 200   # frame 1: ~0.2 s of line time
    await asyncio.sleep(0.9)                  # frame 1 long gone, ACKed; frame 2 goes out
    assert transport.write_nowait(b"B" * 1500) == 1500  # ~1.6 s of line time
    await asyncio.sleep(0.3)                  # the watch armed by frame 1 looks (t=1.0)
    assert transport.is_open, transport._reason


async def test_serial_an_ack_then_a_frame_at_115200_is_no_held_line(pty, monkeypatch):
    """An ACK (1 byte) arms the watch; a frame on its way at 115200 baud when the watch looks
    (held_limit later) ended a line that never stopped."""
    transport = SerialTransport(SerialLink(device=pty.path), held_limit=1.0)
    await within(transport.open())
    MovingLine(monkeypatch, rate=11520)
    assert transport.write_nowait(b"\x06") == 1        # ACK: gone in 0.1 ms
    await asyncio.sleep(0.95)
    assert transport.write_nowait(b"F" * 1000) == 1000  # a 1 KB frame: 87 ms of line time
    await asyncio.sleep(0.1)
    assert transport.is_open, transport._reason

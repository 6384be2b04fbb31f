"""Closing a link delivers what was already handed to the transport, and never hangs.

The worker closes a link right after reading the frame that showed a terminal swap; that
frame's ACK was written just before. If the close threw it away the terminal would send the
frame again. The serial tests run against real pseudo-terminals; a line held off by flow
control (output that never leaves the UART) cannot be made with a pty, so that case stands
the kernel's output-queue count in.
"""

from __future__ import annotations

import asyncio
import select
import time

import pytest

from bridge.config import SerialLink, TcpLink
from bridge.transports import LinkClosed
from bridge.transports import serial as serial_module
from bridge.transports.serial import SerialTransport
from bridge.transports.tcp import TcpTransport

from .follow_rig import A, B, DeviceByHand, bridge_on, linked_to, wait_until
from .test_transports import Pty, fds_open_on, loop_errors, payload, within  # noqa: F401

ACK = b"\x06"


@pytest.fixture
def pty():
    peer = Pty()
    yield peer
    peer.vanish()


async def opened(pty: Pty, **line) -> SerialTransport:
    transport = SerialTransport(SerialLink(device=pty.path, **line))
    await within(transport.open())
    return transport


async def timed_close(transport: SerialTransport) -> float:
    started = time.monotonic()
    await within(transport.close())
    return time.monotonic() - started


def given_up_after(caplog) -> list[str]:
    """How long close() allowed the unsent output before it gave up, as its warning says:
    the deadline it set, exactly, where the seconds it took also count whatever a loaded
    machine adds (once 2.2 s for a cap of 0.5 s)."""
    return [m.split(" after ", 1)[1].split(" s ", 1)[0] for m in caplog.messages
            if "still unsent after" in m]


# --- serial -----------------------------------------------------------------------------------


@pytest.mark.parametrize("behind", [0, 8 * 1024], ids=["read-at-once", "reading-behind"])
async def test_serial_bytes_written_just_before_close_reach_the_terminal(pty, behind):
    """A frame by write() and an ACK taken by write_nowait(), then close() at once: the
    terminal reads both. The flush of the output on close used to discard what the terminal
    had not read yet: on a pty whatever waited beyond the reader's 4 KiB line buffer, on a
    real line whatever the UART had not sent (an ACK: the next few hundred microseconds)."""
    transport = await opened(pty)
    frame = b"\x02" + payload(behind + 300) + b"\x03"
    await within(transport.write(frame))
    assert transport.write_nowait(ACK) == 1
    await within(transport.close())
    assert await pty.recv(len(frame) + 1) == frame + ACK
    assert fds_open_on(pty.path) == []


async def test_serial_close_with_the_terminal_gone_returns_promptly(pty, loop_errors):  # noqa: F811
    """The other end vanished (an unplugged adapter, a closed pty) with our bytes unread:
    close() neither waits for them nor raises."""
    transport = await opened(pty)
    assert transport.write_nowait(ACK + payload(64)) == 65
    pty.vanish()
    assert await timed_close(transport) < 1.0
    assert not transport.is_open
    assert fds_open_on(pty.path) == []
    assert loop_errors == []


async def test_serial_close_with_nothing_pending_does_not_wait(pty):
    transport = await opened(pty)
    assert await timed_close(transport) < 0.5


async def test_serial_close_waits_for_queued_output_about_its_line_time(pty, monkeypatch,
                                                                        caplog):
    """Output the UART has not sent yet (TIOCOUTQ > 0) is waited for about as long as the
    line needs for it at the configured speed, then the rest is discarded, so the kernel's
    own close does not wait for it (up to 30 s, forever with flow control held off)."""
    transport = await opened(pty, baudrate=9600)
    flushed: list[int] = []
    monkeypatch.setattr(serial_module, "_output_queued", lambda fd: 480)  # never drains
    real_flush = serial_module.termios.tcflush
    monkeypatch.setattr(serial_module.termios, "tcflush",
                        lambda fd, which: (flushed.append(which), real_flush(fd, which)))
    took = await timed_close(transport)
    line_time = 480 * 10 / 9600  # 0.5 s at 9600 8N1
    assert took >= line_time, took  # (at most `within`'s 5 s: not the kernel's 30)
    assert given_up_after(caplog) == [f"{line_time + serial_module.DRAIN_MARGIN:.2f}"]
    assert serial_module.termios.TCOFLUSH in flushed
    assert fds_open_on(pty.path) == []


async def test_serial_close_of_a_line_held_off_is_capped(pty, monkeypatch, caplog):
    """However much is queued (64 KiB at 1200 baud is nine minutes), close() gives up at the
    cap and does not freeze the event loop meanwhile."""
    transport = SerialTransport(SerialLink(device=pty.path, baudrate=1200), drain_limit=0.5)
    await within(transport.open())
    monkeypatch.setattr(serial_module, "_output_queued", lambda fd: 65536)
    closing = asyncio.create_task(timed_close(transport))
    await within(asyncio.sleep(0.1))  # the loop runs on while close() waits
    assert not closing.done()
    took = await within(closing)
    assert took >= 0.5, took
    assert given_up_after(caplog) == ["0.50"]  # the cap, not the line's nine minutes
    assert fds_open_on(pty.path) == []


async def test_serial_close_cancelled_while_draining_still_releases_the_port(pty, monkeypatch):
    transport = await opened(pty, baudrate=1200)
    monkeypatch.setattr(serial_module, "_output_queued", lambda fd: 65536)
    closing = asyncio.create_task(transport.close())
    await asyncio.sleep(0.05)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(closing)
    assert not transport.is_open
    await within(transport.close())
    assert fds_open_on(pty.path) == []


async def stuck(pty: Pty, writing: asyncio.Task) -> None:
    """Until `writing` waits for room: the terminal is not reading."""
    assert await wait_until(lambda: select.select([pty.master], [], [], 0)[0] and not writing.done(),
                            timeout=5)


async def test_serial_a_write_cancelled_midway_is_finished_by_close(pty):
    """The worker cancels its writer task before it closes the link. What that write() was
    given and the kernel had not taken yet used to be dropped (the frame cut short on the
    line): close() sends it, as the terminal reads."""
    # (A cap far beyond the time to read it here: a paused machine once passed the default
    # 2 s before the test had read the 128 KiB, and close() rightly gave up on the rest.)
    transport = SerialTransport(SerialLink(device=pty.path), drain_limit=60)
    await within(transport.open())
    frame = b"\x02" + payload(128 * 1024) + b"\x03"
    writing = asyncio.create_task(transport.write(frame))
    await stuck(pty, writing)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    assert transport.write_nowait(ACK) == 0  # never ahead of the rest of the frame
    closing = asyncio.create_task(transport.close())
    assert await pty.recv(len(frame)) == frame
    await within(closing)
    assert fds_open_on(pty.path) == []


async def test_serial_after_a_cancelled_write_the_next_write_sends_its_rest_first(pty):
    transport = await opened(pty)
    frame = payload(128 * 1024)
    writing = asyncio.create_task(transport.write(frame))
    await stuck(pty, writing)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    writing = asyncio.create_task(transport.write(ACK))
    assert await pty.recv(len(frame) + 1) == frame + ACK
    await within(writing)
    await within(transport.close())


async def test_serial_close_of_a_write_the_terminal_never_reads_is_capped(
        pty, loop_errors, caplog):  # noqa: F811
    """Bounded however much waits (a pty has no line speed: only the cap holds here); the
    write() waiting meanwhile learns that the link closed under it."""
    transport = SerialTransport(SerialLink(device=pty.path), drain_limit=0.5)
    await within(transport.open())
    writing = asyncio.create_task(transport.write(payload(256 * 1024)))
    await stuck(pty, writing)
    took = await timed_close(transport)
    assert took >= 0.5, took
    assert given_up_after(caplog) == ["0.50"]  # the cap: a pty has no line time
    with pytest.raises(LinkClosed, match="was closed"):
        await within(writing)
    assert fds_open_on(pty.path) == []
    assert loop_errors == []


# --- end to end: the frame that shows a swap is acknowledged --------------------------------


async def test_the_ack_of_the_frame_that_showed_a_swap_reaches_the_device(tmp_path, mosquitto):
    """B's device is on A's port, B's port is empty. The device answers A's identity check
    naming B; A's worker closes the link at once to let B follow there. That answer's ACK,
    written just before, reaches the device: else it sends the answer again, to B now."""
    device = DeviceByHand(tmp_path / "port-a")
    try:
        async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port-a"),
                                                   B: str(tmp_path / "port-b")}) as bridge:
            assert await wait_until(lambda: "Diagnosis" in device.categories(), timeout=10)
            device.answer_check_as(B)
            named = [d for d in device.sent if "DiagnosisResponse" in d["SaleToPOIResponse"]]
            assert await wait_until(lambda: linked_to(bridge, B) == str(tmp_path / "port-a"),
                                    timeout=10)
            assert await wait_until(lambda: named[0] in device.acknowledged, timeout=5), \
                device.acknowledged
    finally:
        device.close()


# --- tcp: nothing to fix, kept so --------------------------------------------------------------


async def test_tcp_bytes_written_just_before_close_reach_the_terminal():
    """asyncio's close() sends what its buffer holds (close_timeout bounds it) and the
    kernel what the socket holds: a write whose drain() was cancelled is delivered too."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def terminal(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(await reader.read())  # until the bridge's FIN
        writer.close()

    server = await asyncio.start_server(terminal, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        transport = TcpTransport(TcpLink(host="127.0.0.1", port=port))
        await within(transport.open())
        frame = payload(4 * 1024 * 1024)  # more than the socket buffers take at once
        writing = asyncio.create_task(transport.write(frame))
        await asyncio.sleep(0)
        writing.cancel()
        await within(transport.close())
        assert (await within(got)) == frame
    finally:
        server.close()
        await within(server.wait_closed())


def slow_close(monkeypatch, seconds: float) -> None:
    """The port's close takes `seconds` in its thread (a wedged USB adapter's driver)."""
    real_close = serial_module._close_port
    monkeypatch.setattr(serial_module, "_close_port",
                        lambda port: (time.sleep(seconds), real_close(port)))


async def test_serial_a_new_transport_waits_for_the_old_ones_slow_close(pty, monkeypatch,
                                                                        caplog):
    """The worker makes a transport anew for each attempt: the old one's close, given up
    waiting for after close_timeout, still held the port's flock, and the new one's open
    failed as "in use by another process (a second poi-bridge ...)" (review rev4)."""
    slow_close(monkeypatch, 0.6)
    old = SerialTransport(SerialLink(device=pty.path), close_timeout=0.2)
    await within(old.open())
    await within(old.close())
    assert "closing the port takes longer than 0.2 s" in caplog.text
    new = SerialTransport(SerialLink(device=pty.path), close_timeout=2.0)
    await within(new.open())  # after the old close ended
    assert new.is_open
    await within(new.close())
    assert fds_open_on(pty.path) == []


async def test_serial_a_close_that_stays_stuck_is_named_as_ours(pty, monkeypatch):
    slow_close(monkeypatch, 1.0)
    old = SerialTransport(SerialLink(device=pty.path), close_timeout=0.1)
    await within(old.open())
    await within(old.close())
    new = SerialTransport(SerialLink(device=pty.path), close_timeout=0.1)
    with pytest.raises(LinkClosed, match="this bridge's own close of it has not finished "
                       r"after 0.1 s \(its driver is stuck"):
        await within(new.open())
    await within(asyncio.sleep(1.0))  # the close ends: the port opens again
    await within(new.open())
    assert new.is_open
    await within(new.close())

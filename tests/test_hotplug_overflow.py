"""A real udev receive-buffer overflow, as pyudev reports it (review rv26).

The kernel marks a netlink socket whose receive buffer overflowed with sk_err = ENOBUFS
(netlink_overrun), and poll() then reports POLLERR until a recvmsg() returns that error and
clears it. pyudev's Monitor.poll() polls first and raises OSError("Error while polling fd")
on POLLERR, with errno None, without ever calling recvmsg(): the error is never cleared.

Here a real pyudev.Monitor (libudev's own) gets, on its fd, a netlink socket overflowed the
same way (a NETLINK_USERSOCK multicast group we send to ourselves: same netlink_overrun and
datagram_poll code as NETLINK_KOBJECT_UEVENT). Needs CAP_NET_ADMIN (root) to send multicast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import pyudev
import pytest

from bridge.daemon.hotplug import HotplugMonitor
from bridge.daemon.device_match import TerminalMatcher
from tests.test_hotplug import CONFIG, Recorder

NETLINK_USERSOCK = 2
GROUP = 1 << 5


def overflowed_netlink_socket() -> socket.socket:
    receiver = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # kernel minimum
    receiver.bind((0, GROUP))
    sender = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
    sender.bind((0, 0))
    header = (16 + 64).to_bytes(4, "little") + bytes(12)  # nlmsghdr, then 64 bytes
    for _ in range(200):
        # The multicast is delivered first; the unicast part to port 0 (no kernel socket
        # on NETLINK_USERSOCK) is then refused, which is of no interest here.
        with contextlib.suppress(ConnectionRefusedError):
            sender.sendto(header + bytes(64), (0, GROUP))
    sender.close()
    return receiver


def real_monitor_on(sock: socket.socket) -> pyudev.Monitor:
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    monitor.start()  # libudev binds its socket; later start() calls are no-ops
    os.dup2(sock.fileno(), monitor.fileno())  # libudev's own fd now holds the overflow
    os.set_blocking(monitor.fileno(), False)
    return monitor


@pytest.fixture
def overflowed():
    try:
        sock = overflowed_netlink_socket()
    except PermissionError:
        pytest.skip("sending netlink multicast needs CAP_NET_ADMIN")
    yield sock
    sock.close()


def test_pyudev_poll_raises_without_errno_and_leaves_the_error(overflowed) -> None:
    monitor = real_monitor_on(overflowed)
    for _ in range(3):
        with pytest.raises(OSError) as raised:
            monitor.poll(0)
        assert raised.value.errno is None  # not ENOBUFS: HotplugMonitor's overflow branch
        assert "Error while polling fd" in str(raised.value)


async def test_an_overflow_is_repaired_once_not_spun_on(overflowed, caplog) -> None:
    monitor = real_monitor_on(overflowed)
    recorder = Recorder()
    hotplug = HotplugMonitor(TerminalMatcher(CONFIG), recorder.plug, recorder.unplug,
                             monitor=monitor, enumerate_devices=lambda: [])
    scans = 0
    original = hotplug._enumerated

    def counting():
        nonlocal scans
        scans += 1
        return original()

    hotplug._enumerated = counting  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="bridge.daemon.hotplug")
    await hotplug.start()
    await asyncio.sleep(1.0)
    await hotplug.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    print(f"in 1 s: {len(errors)} ERROR lines, {scans} rescans, "
          f"overflows counted {hotplug.counters['overflows']}")
    # One overflow: one warning and one rescan, then events are read again.
    assert len(errors) <= 1 and scans <= 3, errors[:2]


async def test_a_read_error_that_stays_is_not_spun_on(caplog) -> None:
    """Any other error that reading does not clear (the fd stays readable, poll() raises
    each time) called back at once, for ever: reading pauses READ_RETRY after each."""
    import errno

    from tests.test_hotplug import PipeMonitor

    class Broken(PipeMonitor):
        def poll(self, timeout=None):
            self.polls += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monitor = Broken()
    os.write(monitor._write, b"x")  # readable for good
    recorder = Recorder()
    hotplug = HotplugMonitor(TerminalMatcher(CONFIG), recorder.plug, recorder.unplug,
                             monitor=monitor, enumerate_devices=lambda: [])
    caplog.set_level(logging.INFO, logger="bridge.daemon.hotplug")
    await hotplug.start()
    await asyncio.sleep(1.5)
    await hotplug.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert 1 <= len(errors) <= 3 and monitor.polls <= 3, (len(errors), monitor.polls)

"""The simulator's pseudo-terminal as a cable: unplug, the replug gap, the --link symlink.

A technician (and the soak) unplugs simulated terminals; the simulator must behave like a
device and udev: the symlink goes away with the device and comes back pointing at the new
one, and pulling a cable that is already out changes nothing.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import LinkBehaviour, Scenario


def pty_fds() -> set[str]:
    """This process's open pseudo-terminal fds (masters are /dev/ptmx, slaves /dev/pts/N)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == "/dev/ptmx" or target.startswith("/dev/pts/"):
            found.add(f"{fd}->{target}")
    return found


async def wait_for(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_unplug_removes_the_symlink_and_replug_brings_it_back_on_a_new_pty(tmp_path):
    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(link=LinkBehaviour(replug_after=0.3)))
    await server.start_pty(link)
    try:
        first = os.readlink(link)
        assert Path(first).exists()
        server.unplug()
        assert server.unplugged
        assert not link.is_symlink(), "the symlink still points at the freed pseudo-terminal"
        await wait_for(lambda: server.replugs == 1)
        assert not server.unplugged
        second = os.readlink(link)
        assert Path(second).exists() and second == server.device
    finally:
        await server.close()
    assert not link.is_symlink()


async def test_unplug_during_the_replug_gap_changes_nothing(tmp_path):
    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(link=LinkBehaviour(replug_after=0.3)))
    before = pty_fds()
    await server.start_pty(link)
    try:
        server.unplug()
        await asyncio.sleep(0.1)
        server.unplug()  # the cable is already out
        await wait_for(lambda: server.replugs == 1)
        await asyncio.sleep(0.6)  # long enough for a wrongly scheduled second replug
        assert server.replugs == 1
        assert os.readlink(link) == server.device
        # Exactly the live pty's two ends are open: none dropped unread and left open.
        assert len(pty_fds() - before) == 2
    finally:
        await server.close()
    assert pty_fds() == before


async def test_the_replugged_pty_is_served(tmp_path):
    """A bridge opening the symlink after the replug talks to the simulator (bytes reach its
    framer), not to a pty that was abandoned."""
    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(link=LinkBehaviour(replug_after=0.2)))
    await server.start_pty(link)
    try:
        server.unplug()
        server.unplug()
        await wait_for(lambda: server.replugs == 1)
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        try:
            frames_before = server.frames_in
            request = b'{"SaleToPOIRequest":{}}'
            lrc = 0
            for byte in request + b"\x03":
                lrc ^= byte
            os.write(fd, b"\x02" + request + b"\x03" + bytes([lrc]))
            await wait_for(lambda: server.frames_in == frames_before + 1)
        finally:
            os.close(fd)
    finally:
        await server.close()

"""sd_notify client against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from bridge.daemon.notify import SystemdNotifier, run_watchdog, watchdog_interval_from_env


class FakeSystemd:
    """Receives notifications like PID 1 does and stamps each with its arrival time.

    A thread takes them as they come; count() also takes at once what is queued on the
    socket, so it is exact at the moment it is called (a datagram sent is queued before
    send returns), however late a loaded machine runs the thread."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.received: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                select.select([self.sock], [], [], 0.05)
                self._take()
            except (OSError, ValueError):  # closed
                return

    def _take(self) -> None:
        with self._lock:
            while True:
                try:
                    data = self.sock.recv(4096)
                except BlockingIOError:
                    return
                self.received.append((time.monotonic(), data.decode()))

    def count(self) -> int:
        """How many notifications were sent to the socket so far."""
        self._take()
        return len(self.received)

    def messages(self) -> list[str]:
        return [m for _, m in self.received]

    def wait_for(self, count: int, timeout: float = 2.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while self.count() < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.messages()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


async def until(condition, timeout: float = 10.0) -> None:
    """Poll for `condition`: a fixed sleep counts pings a loaded machine has not sent yet."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
def systemd_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "notify.sock"
    fake = FakeSystemd(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield fake
    fake.close()


def test_ready_status_stopping_reach_the_socket(systemd_socket: FakeSystemd) -> None:
    notifier = SystemdNotifier()
    assert notifier.enabled
    assert notifier.ready(status="2 terminals, broker connected")
    assert notifier.status("terminal V400m-324688179 offline:\n/dev/poi/x unplugged")
    assert notifier.extend_timeout(90)
    assert notifier.reloading()
    assert notifier.stopping(status="stopping: finishing 1 transaction")
    notifier.close()
    assert systemd_socket.wait_for(5) == [
        "READY=1\nSTATUS=2 terminals, broker connected",
        # A newline in the text must not start a new assignment.
        "STATUS=terminal V400m-324688179 offline: /dev/poi/x unplugged",
        "EXTEND_TIMEOUT_USEC=90000000",
        "RELOADING=1",
        "STOPPING=1\nSTATUS=stopping: finishing 1 transaction",
    ]


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"poi-bridge-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = SystemdNotifier()
        assert notifier.enabled
        assert notifier.ready()
        assert notifier.watchdog()
        assert fake.wait_for(2) == ["READY=1", "WATCHDOG=1"]
    finally:
        fake.close()


def test_disabled_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None


def test_unsupported_address_disables_with_warning(monkeypatch, caplog) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert "vsock:2:1234" in caplog.text


def test_send_failure_is_logged_not_raised(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    notifier = SystemdNotifier()
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, "a repeated failure must not flood the log"
    assert "READY=1" in warnings[0].getMessage()


def test_watchdog_interval_from_environment() -> None:
    me = os.getpid()
    assert watchdog_interval_from_env({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_from_env({"WATCHDOG_USEC": "30000000",
                                       "WATCHDOG_PID": str(me)}) == 30.0
    # Meant for another process (we are a child that inherited the environment).
    assert watchdog_interval_from_env({"WATCHDOG_USEC": "30000000",
                                       "WATCHDOG_PID": str(me + 1)}) is None
    assert watchdog_interval_from_env({}) is None
    assert watchdog_interval_from_env({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_from_env({"WATCHDOG_USEC": "soon"}) is None


async def test_watchdog_pings_at_half_the_timeout_while_the_loop_is_healthy(
        systemd_socket: FakeSystemd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2 -> ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier()
    assert notifier.watchdog_interval() == pytest.approx(0.2)
    sent: list[float] = []  # stamped by the loop as it pings, not by a thread that may lag
    ping = notifier.watchdog
    monkeypatch.setattr(notifier, "watchdog", lambda: (sent.append(time.monotonic()), ping())[1])
    task = asyncio.create_task(run_watchdog(notifier))
    await until(lambda: systemd_socket.count() >= 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert systemd_socket.messages()[:5] == ["WATCHDOG=1"] * 5
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    # Never sooner than the interval; at least one gap shows it is half the timeout, not the
    # whole (a loaded machine may stretch some gaps, not every one).
    assert all(gap > 0.099 for gap in gaps), gaps
    assert min(gaps) < 0.2, gaps


async def test_no_watchdog_pings_while_the_loop_is_blocked(systemd_socket: FakeSystemd) -> None:
    notifier = SystemdNotifier()
    interval = 0.05
    task = asyncio.create_task(run_watchdog(notifier, interval))
    await until(lambda: systemd_socket.count() >= 4)  # healthy: pinging

    before = systemd_socket.count()
    time.sleep(0.5)  # the event loop is stuck for 10 intervals
    assert systemd_socket.count() == before, "a blocked loop must not ping the watchdog"

    await until(lambda: systemd_socket.count() >= before + 3)  # resumes once the loop runs
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_health_check_withholds_pings(systemd_socket: FakeSystemd) -> None:
    notifier = SystemdNotifier()
    state = {"ok": True}
    checks: list[bool] = []

    def healthy() -> bool:
        checks.append(state["ok"])
        return state["ok"]

    task = asyncio.create_task(run_watchdog(notifier, 0.03, healthy=healthy))
    await until(lambda: systemd_socket.count() >= 3)
    state["ok"] = False
    count_at_failure = systemd_socket.count()
    await until(lambda: checks.count(False) >= 5)  # asked five times: unhealthy each time
    assert systemd_socket.count() == count_at_failure  # not one ping meanwhile
    state["ok"] = True
    await until(lambda: systemd_socket.count() >= count_at_failure + 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_task_returns_when_not_configured(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    await asyncio.wait_for(run_watchdog(SystemdNotifier()), timeout=1)


async def test_watchdog_task_returns_without_watchdog_usec(systemd_socket: FakeSystemd) -> None:
    await asyncio.wait_for(run_watchdog(SystemdNotifier()), timeout=1)
    assert systemd_socket.messages() == []

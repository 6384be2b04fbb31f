"""sd_notify without libsystemd: READY=1, STATUS=, STOPPING=1 and WATCHDOG=1 for systemd.

systemd (Type=notify, see systemd/poi-bridge.service) passes the address of its notification
socket in $NOTIFY_SOCKET: a file system path, or an abstract socket name written with a leading
'@'.  A notification is one AF_UNIX datagram of newline-separated VAR=value assignments.

The watchdog is pinged from a task on the event loop (`run_watchdog`), never from a thread: a
loop that is blocked (a synchronous call that hangs, a busy loop) stops pinging, and systemd
kills and restarts the daemon after WatchdogSec=.

Outside systemd (NOTIFY_SOCKET unset, e.g. `poi-bridge run` in a terminal) every call is a
no-op, so the daemon can call these unconditionally.  Sending never raises: a lost
notification is logged, the daemon carries on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# A datagram to PID 1 is delivered at once unless its queue is full; never stall the event
# loop for longer than this on it.
_SEND_TIMEOUT = 1.0


def _socket_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET as an AF_UNIX address, or None when it is not one this client speaks."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: a leading NUL byte instead of the '@'.
        return b"\0" + value[1:].encode()
    return None


def watchdog_interval_from_env(environ: Mapping[str, str] | None = None,
                               pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds systemd asks this process to honour (WatchdogSec=),
    from $WATCHDOG_USEC, or None when there is none for this process.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for: any other process
    (a child that inherited the environment) gets None.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("systemd watchdog: ignoring WATCHDOG_USEC=%r, not a number of microseconds",
                    usec)
        return None
    if value <= 0:
        return None
    wd_pid = env.get("WATCHDOG_PID", "")
    if wd_pid:
        try:
            if int(wd_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            log.warning("systemd watchdog: ignoring WATCHDOG_PID=%r, not a process id", wd_pid)
            return None
    return value / 1_000_000


class SystemdNotifier:
    """Client for systemd's notification socket.

    `address` defaults to $NOTIFY_SOCKET; `environ` (for the watchdog settings) to os.environ.
    `enabled` is False when there is no socket to talk to, and every method is then a no-op
    returning False.
    """

    def __init__(self, address: str | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        raw = address if address is not None else self._environ.get("NOTIFY_SOCKET", "")
        self._raw_address = raw
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("systemd notification socket %r is not an AF_UNIX path or @name; "
                        "running without systemd notifications (the unit's Type=notify start "
                        "will time out)", raw)
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def address(self) -> str:
        """$NOTIFY_SOCKET as given ('' when disabled), for log lines."""
        return self._raw_address if self.enabled else ""

    def watchdog_interval(self) -> float | None:
        """WatchdogSec= in seconds, if systemd set one for this process."""
        if not self.enabled:
            return None
        return watchdog_interval_from_env(self._environ)

    # --- the notifications ---------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Startup finished: systemd considers the unit started (and starts its dependents)."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """One line shown by `systemctl status poi-bridge`."""
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (so a slow stop is not mistaken for a hang)."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def watchdog(self) -> bool:
        """Keep-alive: must arrive at least once per WatchdogSec=."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time for the current start or stop (EXTEND_TIMEOUT_USEC=)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def notify(self, *assignments: str) -> bool:
        """Send raw VAR=value assignments in one datagram. True if it was sent."""
        if self._address is None:
            return False
        if not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(_SEND_TIMEOUT)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            # Log the first failure loudly, then quietly until one succeeds again: the
            # watchdog would otherwise repeat the same line every few seconds.
            level = logging.DEBUG if self._failed else logging.WARNING
            log.log(level, "systemd notification %s to %s failed: %s (is the service manager "
                    "gone? the unit's NotifyAccess= must allow the main process)",
                    assignments[0], self._raw_address, exc)
            self._failed = True
            self._close_socket()
            return False
        if self._failed:
            log.info("systemd notifications to %s work again", self._raw_address)
            self._failed = False
        return True

    def close(self) -> None:
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return " ".join(str(text).split())


async def run_watchdog(notifier: SystemdNotifier, interval: float | None = None, *,
                       healthy: Callable[[], bool] | None = None) -> None:
    """Ping WATCHDOG=1 every `interval` seconds from the running event loop, until cancelled.

    `interval` defaults to half of WatchdogSec= ($WATCHDOG_USEC), as systemd recommends.
    Returns at once when the notifier is disabled or systemd set no watchdog.  The pings come
    from the loop itself, so a blocked loop stops them.  `healthy`, when given, is asked before
    each ping; while it returns False no ping is sent (systemd then restarts the daemon after
    WatchdogSec=, which is the point: use it for "the loop runs but is stuck" conditions).
    """
    if not notifier.enabled:
        return
    if interval is None:
        timeout = notifier.watchdog_interval()
        if timeout is None:
            log.debug("systemd watchdog not enabled for this process (no WATCHDOG_USEC)")
            return
        interval = timeout / 2
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, got {interval!r}")
    log.info("systemd watchdog: pinging every %.1f s from the event loop", interval)
    was_healthy = True
    while True:
        ok = True
        if healthy is not None:
            try:
                ok = bool(healthy())
            except Exception:
                log.exception("systemd watchdog: health check raised; treating as unhealthy")
                ok = False
        if ok:
            notifier.watchdog()
            if not was_healthy:
                log.warning("systemd watchdog: health check passes again, pings resumed")
        elif was_healthy:
            log.error("systemd watchdog: health check failed, pings withheld: systemd will "
                      "restart poi-bridge unless it recovers within WatchdogSec")
        was_healthy = ok
        await asyncio.sleep(interval)

"""TCP transport: a terminal on the shop LAN, one connection per terminal, asyncio streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from bridge.addresses import host_port
from bridge.config import TcpLink
from bridge.transports.base import LinkClosed, Transport

log = logging.getLogger(__name__)

READ_CHUNK = 65536
# A terminal that loses power sends no FIN; without these the socket would look healthy for
# hours. Keepalive finds a dead peer on an idle link within about 35 s; the user timeout does
# the same while our data sits unacknowledged (keepalive does not probe then).
KEEPALIVE_IDLE = 20
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 35_000


class TcpTransport(Transport):
    """Bytes over one TCP connection. read() returns what has arrived (at least one byte);
    write() returns once every byte is in the kernel's socket buffer."""

    kind = "tcp"

    def __init__(self, link: TcpLink, *, connect_timeout: float = 10.0,
                 close_timeout: float = 2.0) -> None:
        self.link = link
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lost = False
        self._reason = f"connection to terminal at {self._where} is not open"

    @property
    def _where(self) -> str:
        return host_port(self.link.host, self.link.port)

    # --- Transport interface ----------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._writer is not None and not self._lost and not self._writer.is_closing()

    def describe(self) -> str:
        return f"tcp {self._where}"

    async def open(self) -> None:
        if self._writer is not None:
            if self.is_open:
                return
            await self.close()
        where = self._where
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.link.host, self.link.port)
        except TimeoutError:
            self._reason = (f"no answer from terminal at {where} within "
                            f"{self.connect_timeout:g} s (switched off, or wrong address?)")
        except ConnectionRefusedError:
            self._reason = (f"terminal at {where} refused the connection (is it on, and is "
                            f"{self.link.port} its port?)")
        except socket.gaierror as exc:
            self._reason = f"cannot resolve terminal host {self.link.host!r}: {exc.strerror}"
        except ValueError as exc:
            # Not even a name to look up: asyncio's IDNA step raises UnicodeError for an empty
            # label ("pos1..shop.lan") or one over 63 characters, ValueError for a NUL byte.
            self._reason = (f"terminal host {self.link.host!r} is not a valid host name ({exc}); "
                            f"check `host` in the configuration")
        except OSError as exc:
            self._reason = f"cannot connect to terminal at {where}: {exc.strerror or exc}"
        else:
            self._reader, self._writer = reader, writer
        if self._writer is None:
            raise LinkClosed(self._reason)
        _tune_socket(writer.get_extra_info("socket"))
        # With no high-water mark drain() waits until asyncio's buffer is empty, so write()
        # means "handed to the kernel", as it does for serial.
        writer.transport.set_write_buffer_limits(high=0)
        self._lost = False
        self._reason = f"connection to terminal at {where} was closed"

    async def read(self) -> bytes:
        reader = self._reader
        if reader is None or self._lost:
            raise LinkClosed(self._reason)
        try:
            data = await reader.read(READ_CHUNK)
        except OSError as exc:
            self._lose(f"connection to terminal at {self._where} broke: {exc.strerror or exc}")
        else:
            if data:
                return data
            self._lose(f"terminal at {self._where} closed the connection")
        raise LinkClosed(self._reason)

    async def write(self, data: bytes) -> None:
        writer, reader = self._writer, self._reader
        if writer is None or reader is None or self._lost:
            raise LinkClosed(self._reason)
        if reader.at_eof():
            # The terminal has hung up; bytes written now would only be answered by a reset.
            self._lose(f"terminal at {self._where} closed the connection")
            raise LinkClosed(self._reason)
        try:
            writer.write(data)
            await writer.drain()
        except OSError as exc:
            self._lose(f"connection to terminal at {self._where} broke: {exc.strerror or exc}")
            raise LinkClosed(self._reason) from None

    async def close(self) -> None:
        writer = self._writer
        if writer is None:
            return
        self._writer = self._reader = None
        self._lost = True
        writer.close()
        try:
            async with asyncio.timeout(self.close_timeout):
                await writer.wait_closed()
        except TimeoutError:
            # The peer does not take the rest of our output; do not wait for it.
            writer.transport.abort()
        except OSError:
            pass  # the connection had already failed; it is closed all the same

    # --- internals ----------------------------------------------------------------------------

    def _lose(self, reason: str) -> None:
        """Record why the link ended and release the socket now, not only at close()."""
        if self._lost:
            return  # close() or an earlier failure already gave the reason
        self._lost = True
        self._reason = reason
        log.debug("%s: %s", self.describe(), reason)
        if self._writer is not None:
            self._writer.transport.abort()


def _tune_socket(sock: socket.socket | None) -> None:
    if sock is None:
        return
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_COUNT),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), USER_TIMEOUT_MS),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)

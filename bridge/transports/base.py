"""The one small interface every transport implements: it only moves bytes.

Transports know nothing of frames or messages. A transport that loses its device (unplug,
EIO, a vanished pseudo-terminal, a closed socket) raises `LinkClosed` with a reason a
technician can act on; the worker then reopens it with `Backoff`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, NoReturn


class LinkClosed(Exception):
    """The link is gone; `reason` says why in words for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Transport(ABC):
    kind: ClassVar[str]

    @abstractmethod
    async def open(self) -> None:
        """Open the device or connection. Raises LinkClosed if it cannot be opened."""

    @abstractmethod
    async def read(self) -> bytes:
        """Wait for and return at least one byte. Raises LinkClosed when the link ends."""

    async def deliver(self, receiver: Callable[[bytes], None]) -> NoReturn:
        """Hand every byte read to `receiver`, in order, until the link ends (LinkClosed) or
        `receiver` raises (that exception comes out of here). This default reads in a loop;
        a transport whose loop callback does the reading (serial) calls `receiver` from
        there, without waking a task for each of a frame's many small reads."""
        while True:
            receiver(await self.read())

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Write all of `data`. Raises LinkClosed when the link ends."""

    def write_nowait(self, data: bytes) -> int:
        """Write what the device takes at once, without waiting, and say how many bytes that
        was: 0 when it takes none, or when this transport cannot write without waiting.
        write() carries on with the rest, and is the one that reports a lost link."""
        return 0

    def output_queued(self) -> int:
        """Bytes written and still waiting to cross the line (a serial port's kernel
        buffer, TIOCOUTQ): what the framer hands out next crosses after them."""
        return 0

    @abstractmethod
    async def close(self) -> None:
        """Close; safe to call twice and after LinkClosed."""

    @property
    @abstractmethod
    def is_open(self) -> bool: ...

    @abstractmethod
    def describe(self) -> str:
        """Where this transport points, for logs: '/dev/poi/ingenico-123 at 115200 8N1'."""


class Backoff:
    """Capped exponential backoff with full jitter, for reopening links and reconnecting."""

    def __init__(
        self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * self.factor**self._attempt)
        if ceiling < self.maximum:
            # Stop counting once capped: factor**attempt overflows a float after ~1000 tries.
            self._attempt += 1
        # Never below half the ceiling, so a fast-failing device is not hammered.
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def reset(self) -> None:
        self._attempt = 0

"""The simulated terminal on a real wire: a pseudo-terminal it creates, or a TCP port.

The same framers as the bridge run on this side. The link can misbehave on purpose: pace
bytes at a baud rate, put junk before frames, damage received frames (so the framer NAKs
them), and drop the link mid-transaction (close the pseudo-terminal, then come back on a new
one behind the same symlink, the way a replugged USB device comes back).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
import tty
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from bridge.protocol import crypto
from bridge.protocol.framing import FrameFailed, Framer, FrameReceived, FrameSent, make_framer
from bridge.protocol.framing.acknowledged import NAK, AcknowledgedFramer
from bridge.simulator.terminal import Answer, Scenario, SimulatedTerminal

log = logging.getLogger("poi_bridge.simulator")

# How long bytes this side wrote before a frame of the peer's arrived may still have been
# unread by the peer when it wrote that frame (its event loop was busy): a NAK among them
# may have reached it while that frame was out.
LINE_LAG = 1.0


class _Link(ABC):
    """One open connection: a pty master fd or a TCP stream."""

    @abstractmethod
    async def read(self) -> bytes: ...

    @abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class _PtyLink(_Link):
    def __init__(self, master: int, slave: int) -> None:
        self.master, self.slave = master, slave
        os.set_blocking(master, False)
        self._loop = asyncio.get_running_loop()

    async def read(self) -> bytes:
        while True:
            if self.master < 0:
                raise ConnectionResetError("pseudo-terminal closed")
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                data = None
            except OSError:  # EIO: nothing on the other side right now
                await asyncio.sleep(0.05)
                continue
            if data:
                return data
            fd = self.master
            ready = self._loop.create_future()
            self._loop.add_reader(fd, ready.set_result, None)
            try:
                await ready
            finally:
                if self.master == fd:  # not closed meanwhile (its number may be reused)
                    self._loop.remove_reader(fd)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.master < 0:
                raise ConnectionResetError("pseudo-terminal closed")
            try:
                written = os.write(self.master, view)
                view = view[written:]
            except BlockingIOError:
                fd = self.master
                ready = self._loop.create_future()
                self._loop.add_writer(fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    if self.master == fd:
                        self._loop.remove_writer(fd)

    def close(self) -> None:
        # Once only: a closed fd number is soon reused, and closing it again would close
        # somebody else's file.
        if self.master >= 0:
            self._loop.remove_reader(self.master)
            self._loop.remove_writer(self.master)
        for fd in (self.master, self.slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master = self.slave = -1


class _TcpLink(_Link):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        data = await self.reader.read(65536)
        if not data:
            raise ConnectionResetError("peer closed")
        return data

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


def open_pty(link_path: Path | None = None) -> tuple[int, int, str]:
    """A raw pseudo-terminal pair; the slave's name is what the bridge opens. With link_path,
    a symlink there points at the slave (moved atomically on every replug)."""
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo, no line editing: bytes pass as they are, before anyone opens it
    name = os.ttyname(slave)
    if link_path is not None:
        tmp = link_path.with_name(f".{link_path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, link_path)
    return master, slave, name


class SimulatorServer:
    def __init__(self, scenario: Scenario | None = None, framer: str = "stx-etx-lrc",
                 *, key: crypto.NexoKey | None = None, **framer_options: Any) -> None:
        self.terminal = SimulatedTerminal(scenario)
        self.key = key  # local encryption, as a terminal configured with this key does it
        self.scenario = self.terminal.scenario
        baud = self.scenario.link.baud
        if baud:  # its ACK deadlines count from a frame's last byte on the paced line (8N1)
            framer_options.setdefault("seconds_per_byte", 10 / baud)
        self._framer_name = framer
        self._framer_options = framer_options
        self.framer: Framer = make_framer(framer, **framer_options)
        self._link: _Link | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._write_lock = asyncio.Lock()
        self.link_path: Path | None = None
        self.device: str | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0  # whole frames read and dropped while muted
        self.replugs = 0
        self._closed = asyncio.Event()
        self._link_lost = asyncio.Event()
        self._muted_until = 0.0
        self._unplugged = False
        # An answer frame in flight -> the (SaleID, ServiceID) it answers; and when the peer
        # acknowledged an answer under each key (its framer sends that request no more)
        self._answering: dict[bytes, tuple[str, str]] = {}
        self._answer_acknowledged: dict[tuple[str, str], float] = {}
        # When (monotonic) this side last wrote a NAK byte: its framer's NAK of a damaged
        # frame, or one in the line noise it injects. Either makes the peer's framer send
        # its outstanding frame again, whatever ACK of this side's follows.
        self._naks_written: collections.deque[float] = collections.deque(maxlen=64)

    # --- serving ----------------------------------------------------------------------------

    async def start_pty(self, link_path: str | Path | None = None) -> str:
        """Create the pseudo-terminal and serve it in the background; returns the path to
        give the bridge (the symlink if one was asked for, else the pty itself)."""
        self.link_path = Path(link_path) if link_path else None
        self._new_pty()
        self._spawn(self._serve_pty())
        return str(self.link_path or self.device)

    def _new_pty(self) -> None:
        master, slave, self.device = open_pty(self.link_path)
        self._link = _PtyLink(master, slave)
        self._unplugged = False
        self.framer = make_framer(self._framer_name, **self._framer_options)
        log.info("simulated terminal %s on %s", self.scenario.poi_id, self.device)

    async def _serve_pty(self) -> None:
        while not self._closed.is_set():
            link = self._link
            assert link is not None
            reader = asyncio.create_task(self._read_loop(link))
            lost = asyncio.create_task(self._link_lost.wait())
            try:
                await asyncio.wait({reader, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Always end the reader here: a stranded one would later unregister an fd
                # number a newer pseudo-terminal may have reused.
                reader.cancel()
                lost.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                    await reader
            self.unplug()  # however the link ended, this pty is done with (no-op if unplugged)
            if self._closed.is_set():
                return
            self._link_lost.clear()
            await asyncio.sleep(self.scenario.link.replug_after)
            self._new_pty()
            self.replugs += 1

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        server = await asyncio.start_server(self._on_tcp, host, port)
        self._server = server
        return server.sockets[0].getsockname()[1]

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._link is not None:
            self._link.close()
        link = _TcpLink(reader, writer)
        self._link = link
        self.framer = make_framer(self._framer_name, **self._framer_options)
        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            await self._read_loop(link)
        link.close()

    def mute(self, seconds: float) -> None:
        """Play dead: read and drop everything (no ACK, no answer) for `seconds`. Each whole
        frame dropped is recorded in the terminal's ledger all the same (see _read_loop)."""
        self._muted_until = time.monotonic() + seconds

    @property
    def unplugged(self) -> bool:
        """The pseudo-terminal's cable is out (between an unplug and the replug)."""
        return self._unplugged

    def unplug(self) -> None:
        """Pull the cable: close the link now; a pseudo-terminal comes back, with a new name,
        after replug_after. The --link symlink goes with it, as udev removes /dev/poi/...
        when a device goes away: left in place it would point at a freed /dev/pts/N, which
        the kernel soon hands to another pseudo-terminal, and a bridge reopening it would be
        talking to somebody else. Pulling a cable that is already out changes nothing (it
        used to make the server drop the next pty unread and move on to a third)."""
        if self.device is not None:  # pseudo-terminal mode
            if self._unplugged:
                return
            self._unplugged = True
            if self.link_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.link_path.unlink()
        if self._link is not None:
            self._link.close()
        self._link_lost.set()

    async def close(self) -> None:
        self._closed.set()
        self._link_lost.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        if self._link is not None:
            self._link.close()
        if getattr(self, "_server", None) is not None:
            self._server.close()
        if self.link_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link_path.unlink()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the wire -----------------------------------------------------------------------------

    async def _read_loop(self, link: _Link) -> None:
        """Read one link connection until it ends. The framer hands up every good frame,
        retransmitted copies included (it does not de-duplicate): a frame byte-identical to
        the one received just before on this connection, within the framing's max_tries
        copies and the link's retransmit_window of the first copy, and before the peer
        acknowledged an answer to it, is flagged to the terminal as a possible link-level
        retransmission. The bridge's framer sends its frames one at a time, a frame again only
        while it has no ACK for it, max_tries times at most, each ack_timeout after the one
        before; and never once an answer under the request's IDs came (the frame reached the
        terminal: FrameWriter.answered); its ACK of that answer is written after any copy it
        wrote before. A reopened link starts with the bridge's identity check.

        Of every copy (the frame just before, byte for byte) the terminal is also told how
        long after that one it came, and how long this side's ACK of that one had been on
        the line by then: None if this side had not acknowledged it yet (both came in one
        read: its ACK was written after), or if this side wrote a NAK from LINE_LAG before
        that copy came until its ACK went out (the peer's framer sends its frame again on a
        NAK, even one this side's own line noise carried). The peer's framer sends a frame
        again only for want of an ACK: a copy after an ACK that had time to reach it is the
        request sent twice (judged by the reader of the ledger, who knows the peer's
        timings).

        While muted, this side reads and drops every byte: its framer sees none of them and
        nothing is written. A framer of its own, whose ACKs are thrown away, still finds the
        whole frames among them: each is recorded, unread (SimulatedTerminal.dropped), and
        counts as a copy as above, never acknowledged, so the peer's retransmission of a
        dropped frame, read once this side listens again, is flagged as one."""
        timer = asyncio.create_task(self._retransmit_loop(link))
        previous: bytes | None = None
        copies = 0
        first_at = 0.0  # when the first copy of `previous` was read (monotonic)
        previous_at = 0.0  # when `previous` (its latest copy) was read
        previous_acked: float | None = None  # when this side's ACK of it went out
        unread: Framer | None = None  # finds the frames dropped while muted
        try:
            while True:
                data = await link.read()
                now = time.monotonic()
                muted = now < self._muted_until
                if muted:
                    if unread is None:
                        unread = make_framer(self._framer_name, **self._framer_options)
                    events = unread.receive_data(data, now)
                    unread.data_to_send(now)  # its ACKs and NAKs: never written
                else:
                    unread = None
                    data = self._maybe_corrupt(data)
                    events = self.framer.receive_data(data, now)
                    await self._flush(link)  # the ACKs (and NAKs) of this read's frames
                flushed = time.monotonic()
                for event in events:  # in the order of their bytes on the line
                    if isinstance(event, FrameSent) and not muted:
                        self._acknowledged(event.payload, now)
                    elif isinstance(event, FrameReceived):
                        if muted:
                            self.frames_dropped += 1
                        else:
                            self.frames_in += 1
                        gap = acked_before = None
                        if event.payload == previous:
                            copies += 1
                            gap = now - previous_at
                            if previous_acked is not None and not self._nak_written(
                                    previous_at - LINE_LAG, previous_acked):
                                acked_before = now - previous_acked
                        else:
                            previous, copies, first_at = event.payload, 1, now
                        again = 1 < copies <= self._max_copies() \
                            and now - first_at <= self._retransmit_window()
                        if muted:
                            self._on_dropped(event.payload, retransmission=again, gap=gap,
                                             acked_before=acked_before)
                        else:
                            self._on_request(link, event.payload, retransmission=again,
                                             first_at=first_at, gap=gap,
                                             acked_before=acked_before)
                        # acknowledged once this read's ACKs are out (below), not before:
                        # a copy later in this read came before this side's ACK of it
                        previous_at, previous_acked = now, None
                if not muted and any(isinstance(event, FrameReceived) for event in events):
                    previous_acked = flushed
        finally:
            timer.cancel()

    def _nak_written(self, since: float, until: float) -> bool:
        return any(since <= at <= until for at in self._naks_written)

    def _retransmit_window(self) -> float:
        window = self.scenario.link.retransmit_window
        if window is not None:
            return window
        return self._max_copies() * self.framer.ack_timeout

    def _acknowledged(self, answer: bytes, now: float) -> None:
        """The peer acknowledged our frame `answer`: if it answered a request, the peer knows
        that request reached us."""
        key = self._answering.pop(answer, None)
        if key is not None:
            self._answer_acknowledged[key] = now

    def _max_copies(self) -> int:
        """How many times a peer with our framing settings transmits one frame."""
        return self.framer.max_tries if isinstance(self.framer, AcknowledgedFramer) else 1

    async def _retransmit_loop(self, link: _Link) -> None:
        while True:
            deadline = self.framer.next_deadline()
            if deadline is None:
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            for event in self.framer.handle_timeout(time.monotonic()):
                if isinstance(event, FrameFailed):
                    self._answering.pop(event.payload, None)
            await self._flush(link)

    def _maybe_corrupt(self, data: bytes) -> bytes:
        rate = self.scenario.link.corrupt_rate
        if rate and len(data) > 4 and self.terminal.rng.random() < rate:
            i = self.terminal.rng.randrange(1, len(data) - 1)
            return data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:]
        return data

    def _on_request(self, link: _Link, payload: bytes, *, retransmission: bool = False,
                    first_at: float | None = None, gap: float | None = None,
                    acked_before: float | None = None) -> None:
        """`first_at`: when the first copy of this frame was read (monotonic): a copy read
        after the peer acknowledged our answer to that request is not a retransmission."""
        try:
            document = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            log.warning("simulator: request is not JSON; ignored")
            return
        key = _ids(document)
        if retransmission and key is not None and first_at is not None \
                and self._answer_acknowledged.get(key, -1.0) >= first_at:
            retransmission = False
        if self.key is not None:
            try:
                document = crypto.decrypt_message(document, self.key)
            except crypto.CryptoError:
                # (a money request's header is in clear: its arrival is recorded)
                self.terminal.unreadable(document, time.time(), retransmission=retransmission,
                                         gap=gap, acked_before=acked_before)
                # What a real terminal answers when it cannot decrypt: plain JSON, no header.
                self._spawn(self._answer_at(link, Answer(time.time(), {
                    "errors": ["Nexo Service: crypto error (3)"], "ServiceID": "-NULL-"})))
                return
        reaction = self.terminal.handle(document, time.time(), retransmission=retransmission,
                                        gap=gap, acked_before=acked_before)
        if reaction.drop_link:
            self._spawn(self._drop_soon())
        for answer in reaction.answers:
            self._spawn(self._answer_at(link, answer))

    def _on_dropped(self, payload: bytes, *, retransmission: bool, gap: float | None,
                    acked_before: float | None) -> None:
        """A whole frame dropped unread while muted: recorded in the terminal's ledger,
        decrypted first when this side's key reads it (for what it asked)."""
        try:
            document = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return
        if self.key is not None:
            with contextlib.suppress(crypto.CryptoError):
                document = crypto.decrypt_message(document, self.key)
        log.info("simulated terminal %s (muted) dropped a frame unread",
                 self.scenario.poi_id)
        self.terminal.dropped(document, time.time(), retransmission=retransmission, gap=gap,
                              acked_before=acked_before)

    async def _drop_soon(self) -> None:
        await asyncio.sleep(0.05)  # let the ACK of the request go out first
        self.unplug()

    async def _answer_at(self, link: _Link, answer: Answer) -> None:
        await asyncio.sleep(max(0.0, answer.at - time.time()))
        if answer.obsolete or link is not self._link:
            return
        if answer.entry is not None and answer.entry.behaviour.drop_link:
            return
        document = answer.document
        if self.key is not None and ("SaleToPOIResponse" in document
                                     or "SaleToPOIRequest" in document):
            document = crypto.encrypt_message(document, self.key)
        payload = json.dumps(document, separators=(",", ":")).encode()
        answers = _ids(answer.document) if "SaleToPOIResponse" in answer.document else None
        if answers is not None:
            self._answering[payload] = answers
        rng = self.terminal.rng
        if self.scenario.link.garbage_rate and rng.random() < self.scenario.link.garbage_rate:
            junk = bytes(rng.choice(b"abc{}\x00\x15\x06\xff ") for _ in range(rng.randrange(1, 24)))
            await self._write(link, junk)
        self.framer.send_frame(payload, time.monotonic())
        self.frames_out += 1
        await self._flush(link)

    async def _flush(self, link: _Link) -> None:
        data = self.framer.data_to_send(time.monotonic())
        if data:
            await self._write(link, data)

    async def _write(self, link: _Link, data: bytes) -> None:
        async with self._write_lock:
            try:
                await self._write_paced(link, data)
            finally:
                # (conservatively: a frame's LRC byte can be 0x15 too)
                if NAK in data:
                    self._naks_written.append(time.monotonic())

    async def _write_paced(self, link: _Link, data: bytes) -> None:
        baud = self.scenario.link.baud
        if not baud:
            with contextlib.suppress(OSError):
                await link.write(data)
            return
        # 8N1: ten bit times a byte. Sleep against an absolute schedule, so pacing does
        # not drift with the event loop's own delays.
        start = time.monotonic()
        chunk = max(1, baud // 1000)  # 10 ms of line time per write
        for offset in range(0, len(data), chunk):
            piece = data[offset:offset + chunk]
            with contextlib.suppress(OSError):
                await link.write(piece)
            due = start + (offset + len(piece)) * 10 / baud
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


def _ids(document: Any) -> tuple[str, str] | None:
    """(SaleID, ServiceID) of a SaleToPOI message's header (in clear when encrypted too)."""
    if not isinstance(document, dict) or len(document) != 1:
        return None
    body = next(iter(document.values()))
    header = body.get("MessageHeader") if isinstance(body, dict) else None
    if not isinstance(header, dict):
        return None
    sale_id, service_id = header.get("SaleID"), header.get("ServiceID")
    if not isinstance(sale_id, str) or not isinstance(service_id, str):
        return None
    return sale_id, service_id

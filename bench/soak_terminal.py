"""A simulated terminal for the soak: `poi-bridge simulate --pty` plus a control channel.

Same flags and scenario as `python -m bridge simulate` (they are parsed by that command's own
parser and turned into a scenario by its own `build_scenario`, and a key by its own `_key`:
`--key-id`, `--key-version`, `--passphrase-file` make it encrypt as a terminal with that key
does), served by the same `SimulatorServer`; what this adds is a line-based control channel on standard input, so the
soak's chaos loop can pull the cable or freeze the terminal *without killing the process*
(a killed simulator would take its ledger, the shopper's side of the audit, with it):

    unplug SECONDS   close the pseudo-terminal now; a new one comes back behind the same
                     --link symlink after SECONDS (a replugged USB cable)
    mute SECONDS     play dead: read and drop every byte (no ACK, no answer) for SECONDS;
                     each whole frame dropped is in the ledger all the same (below)
    move PATH SECONDS
                     the cable goes to another port: close the pseudo-terminal now (unless it
                     is already out) and come back behind the symlink PATH instead, after
                     SECONDS (or when a pending replug was due). The old symlink is removed
                     only while it still points at this terminal's pseudo-terminal: the
                     terminal it was swapped with may already be plugged in there.
    stall SECONDS    freeze for SECONDS (the whole process: a terminal whose firmware hangs a
                     moment); bytes wait in the line and are all read afterwards, so frames
                     the bridge retransmitted for want of an ACK arrive more than once.
                     Prints "stalling SECONDS" on standard output first.
    ledger           write the ledger file now (the process keeps running)

SIGTERM (or the end of standard input, i.e. the soak went away) writes the ledger to
--ledger and exits, like `poi-bridge simulate`. The ledger is the simulator's (one entry per
money request, by "SaleID/ServiceID", a money request dropped while muted among them with
a receipt "dropped"), plus, under DROPPED_UNREAD (a name no such key can have: it has no
"/"), every frame dropped unread while muted, whatever its category.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bridge.cli_simulate import _key, add_parser, build_scenario
from bridge.protocol import crypto
from bridge.logging_setup import setup_logging
from bridge.simulator.server import SimulatorServer


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="soak_terminal")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["simulate", *argv])


DROPPED_UNREAD = "dropped_unread"


def write_ledger(server: SimulatorServer, path: Path | None) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**server.terminal.summary(),
                               DROPPED_UNREAD: server.terminal.dropped_unread}, indent=1))
    tmp.replace(path)


async def out_for(server: SimulatorServer, seconds: float, pull: Callable[[], None]) -> None:
    """Pull the cable (`pull`) for `seconds`. The server replugs after its scenario's
    replug_after, so that is set for this one unplug and put back once the new pty is up."""
    default = server.scenario
    server.scenario = default.model_copy(
        update={"link": default.link.model_copy(update={"replug_after": seconds})})
    replugs = server.replugs
    pull()
    try:
        while server.replugs == replugs:
            await asyncio.sleep(0.05)
    finally:
        server.scenario = default


async def unplug(server: SimulatorServer, seconds: float) -> None:
    if server.unplugged:
        print("soak_terminal: unplug ignored: already unplugged", file=sys.stderr, flush=True)
        return
    await out_for(server, seconds, server.unplug)


async def move(server: SimulatorServer, path: Path, seconds: float, *,
               after: set[asyncio.Task[None]]) -> None:
    """Pull the cable and plug it into the port behind `path` after `seconds` (a technician
    swapping two terminals' cables), once the unplugs or moves in `after` are done."""
    if after:
        await asyncio.wait(after)
    if server.unplugged:
        server.link_path = path  # out already (a dropped link): its replug goes there
        return

    def pull() -> None:
        old, server.link_path = server.link_path, None  # unplug() must not remove it blindly
        server.unplug()
        with contextlib.suppress(OSError):
            if old is not None and os.readlink(old) == server.device:
                old.unlink()
        server.link_path = path

    await out_for(server, seconds, pull)


async def control(server: SimulatorServer, ledger: Path | None, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    busy: set[asyncio.Task[None]] = set()
    while True:
        line = await reader.readline()
        if not line:
            stop.set()  # the soak is gone: save the ledger and leave
            return
        words = line.decode(errors="replace").split()
        if not words:
            continue
        try:
            if words[0] == "unplug":
                if any(not t.done() for t in busy):
                    continue  # already unplugged
                task = asyncio.create_task(unplug(server, float(words[1])))
                busy = {task}
            elif words[0] == "move":
                # after a pending unplug or move has replugged: then this one moves it
                task = asyncio.create_task(
                    move(server, Path(words[1]), float(words[2]), after=set(busy)))
                busy = {task}
            elif words[0] == "mute":
                server.mute(float(words[1]))
            elif words[0] == "stall":
                print(f"stalling {words[1]}", flush=True)  # the soak waits for this line
                time.sleep(min(float(words[1]), 10.0))  # noqa: ASYNC251 - the point
            elif words[0] == "ledger":
                write_ledger(server, ledger)
            elif words[0] == "rekey":
                # its key settings changed (a key rotation): what it reads and seals from now
                server.key = crypto.NexoKey(words[1], int(words[2]),
                                            Path(words[3]).read_text().rstrip("\n"))
        except (IndexError, ValueError):
            print(f"soak_terminal: bad control line {line!r}", file=sys.stderr, flush=True)


async def serve(args: argparse.Namespace) -> None:
    server = SimulatorServer(build_scenario(args), args.framer, key=_key(args))
    path = await server.start_pty(args.link)
    print(path, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    controller = asyncio.create_task(control(server, args.ledger, stop))
    await stop.wait()
    controller.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await controller
    await server.close()
    write_ledger(server, args.ledger)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    setup_logging("info")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

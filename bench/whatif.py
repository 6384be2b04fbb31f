"""The daemon with experimental patches applied at start-up: how much would a change buy?

    POI_BENCH_WHATIF=journal-normal,early-ack python -m bench.whatif run --config FILE

Used by `bench/run.py --what-if ...` only, to put numbers on the recommendations in the
benchmark report. Nothing in bridge/ is changed; results of a patched daemon are labelled
as such and are never the bridge's own figures.

  inflight        no limit on QoS 1 messages in flight (paho's default is 20)
  early-ack       the terminal worker ACKs a frame before processing it (ACK first, then
                  journal, parse, publish), instead of after
  journal-normal  SQLite synchronous=NORMAL instead of FULL (durable across a daemon crash,
                  not across a power cut) - to show the share of fsync in the latency
  no-state-flips  the terminal state topic is not republished when only busy/online and the
                  active transaction change (two retained publishes a payment fewer)
  no-sent-event   no "sent" event on registers/{SaleID}/event (it comes in the same step as
                  "accepted" when the terminal is idle: one publish a payment fewer)
  uvloop          the event loop of uvloop (libuv) instead of asyncio's pure-Python one
  orjson          orjson instead of the json module for the daemon's encoding and parsing

no-state-flips and no-sent-event are contract changes, measured here so the planners can
weigh them. uvloop and orjson are not dependencies of the bridge (measured, no gain above
the noise: bench/HISTORY.md): `.venv/bin/pip install uvloop orjson` to try them again.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time


def _inflight() -> None:
    import aiomqtt

    original = aiomqtt.Client.__init__

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["max_inflight_messages"] = 0
        original(self, *args, **kwargs)

    aiomqtt.Client.__init__ = __init__


def _early_ack() -> None:
    from bridge.daemon.worker import TerminalWorker

    async def _read_loop(self, transport):  # type: ignore[no-untyped-def]
        while True:
            data = await transport.read()
            events = self.framer.receive_data(data, time.monotonic())
            self.writer._write_ready.set()
            await asyncio.sleep(0)  # the writer task runs first: the ACK goes out now
            self._framer_events(events)
            self.writer._write_ready.set()

    TerminalWorker._read_loop = _read_loop


def _journal_normal() -> None:
    from bridge.daemon.journal import Journal

    original = Journal.__init__

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        if not kwargs.get("readonly"):
            self._db.execute("PRAGMA synchronous=NORMAL")

    def mark_delivered(self, message_ids):  # type: ignore[no-untyped-def]
        # the journal's own mark_delivered sets FULL back after its unsynced commit
        original_mark(self, message_ids)
        if not self._db.in_transaction:
            self._db.execute("PRAGMA synchronous=NORMAL")

    original_mark = Journal.mark_delivered
    Journal.__init__ = __init__
    Journal.mark_delivered = mark_delivered


def _no_state_flips() -> None:
    from bridge.daemon.mqtt import RegisterGateway

    original = RegisterGateway.terminal_state
    flipping = ("state", "active", "open_transactions")

    def terminal_state(self, poi_id, state):  # type: ignore[no-untyped-def]
        known = self._terminal_states.get(poi_id)
        if (known is not None and known["state"] in ("online", "busy")
                and state["state"] in ("online", "busy")
                and {k: v for k, v in known.items() if k not in flipping}
                == {k: v for k, v in state.items() if k not in flipping}):
            return
        original(self, poi_id, state)

    RegisterGateway.terminal_state = terminal_state


def _no_sent_event() -> None:
    from bridge.daemon.mqtt import RegisterGateway

    original = RegisterGateway.progress

    def progress(self, event):  # type: ignore[no-untyped-def]
        if event.event != "sent":
            original(self, event)

    RegisterGateway.progress = progress


def _need(module: str):  # type: ignore[no-untyped-def]
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"bench.whatif: {module} is not installed: .venv/bin/pip install "
                         f"{module}") from None


def _uvloop() -> None:
    uvloop = _need("uvloop")

    uvloop.install()  # asyncio.run() in the daemon's CLI then makes a uvloop loop


def _orjson() -> None:
    orjson = _need("orjson")

    from bridge.daemon import journal, mqtt, registers, worker
    from bridge.protocol import messages

    def compact(value, **_):  # type: ignore[no-untyped-def]
        return orjson.dumps(value).decode()

    # orjson's output is the compact, UTF-8 form the daemon writes with json.dumps
    registers.dumps = orjson.dumps
    mqtt.dumps = orjson.dumps
    journal._dumps = compact
    journal.json = type("J", (), {"loads": staticmethod(orjson.loads)})
    messages.json = type("J", (), {"loads": staticmethod(orjson.loads),
                                   "dumps": staticmethod(compact),
                                   "JSONDecodeError": orjson.JSONDecodeError})
    worker.json = type("J", (), {"dumps": staticmethod(compact)})


# (TCP_NODELAY and a faster nesting guard, once measured here, are now in the bridge.)
PATCHES = {  # applied in this order, whatever the order asked
    "inflight": _inflight,
    "early-ack": _early_ack,
    "journal-normal": _journal_normal,
    "no-state-flips": _no_state_flips,
    "no-sent-event": _no_sent_event,
    "uvloop": _uvloop,
    "orjson": _orjson,
}


def apply(names: list[str]) -> None:
    for name in names:
        if name not in PATCHES:
            raise SystemExit(f"bench.whatif: unknown patch {name!r}; known: {', '.join(PATCHES)}")
    for name, patch in PATCHES.items():
        if name in names:
            patch()

if __name__ == "__main__":
    apply([p for p in os.environ.get("POI_BENCH_WHATIF", "").split(",") if p])
    from bridge.cli import main

    raise SystemExit(main(sys.argv[1:]))

"""What the tests of terminals found on each other's links share: two terminals A and B,
simulated terminals and terminals driven by hand on pseudo-terminals, and a bridge started
on given links (see test_follow.py; test_status_from_journal.py drives a device by hand)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.protocol import crypto
from bridge.protocol.framing import FrameReceived, FrameSent, make_framer
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer, open_pty
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario


async def wait_until(condition: Any, timeout: float) -> bool:
    """Until `condition()` holds (True) or `timeout` s have passed (False), letting the
    daemon run meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True

A, B = "V400m-111", "V400m-222"
BASE = "poi/follow"


def simulator(poi_id: str, behaviour: Behaviour | None = None,
              key: crypto.NexoKey | None = None) -> SimulatorServer:
    return SimulatorServer(Scenario(poi_id=poi_id, default=behaviour or Behaviour(delay=0.05),
                                    link=LinkBehaviour(status_hold=0.05)), "stx-etx-lrc",
                           key=key)


# Terminals A and B set up with different keys (a store whose terminals do not share one)
PASSPHRASES = {A: "passphrase of terminal A", B: "passphrase of terminal B"}
KEYS = {poi_id: crypto.NexoKey(f"Key-{poi_id}", 1, phrase)
        for poi_id, phrase in PASSPHRASES.items()}


def key_configs(tmp_path: Path) -> dict[str, dict[str, Any]]:
    configs = {}
    for poi_id, phrase in PASSPHRASES.items():
        secret = tmp_path / f"passphrase-{poi_id}"
        secret.write_text(phrase)
        configs[poi_id] = {"identifier": f"Key-{poi_id}", "version": 1,
                           "passphrase_file": str(secret)}
    return configs


@contextlib.asynccontextmanager
async def bridge_on(tmp_path: Path, broker: Any, links: dict[str, str],
                    keys: dict[str, dict[str, Any]] | None = None,
                    previous_keys: dict[str, dict[str, Any]] | None = None,
                    **terminal: Any) -> AsyncIterator[Bridge]:
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": broker.host, "port": broker.port, "base_topic": BASE,
                 "client_id": "bridge-follow-test"},
        "terminals": [{"poi_id": poi_id, **terminal, "link": {"kind": "serial", "device": device},
                       **({"key": keys[poi_id]} if keys and poi_id in keys else {}),
                       **({"previous_key": previous_keys[poi_id]}
                          if previous_keys and poi_id in previous_keys else {})}
                      for poi_id, device in links.items()],
    }), hotplug=False)
    await bridge.start()
    try:
        # Subscribed before a test publishes: a request sent before the bridge's first
        # subscription (no session on the broker yet) is lost, and the test waits in vain
        assert await wait_until(lambda: bridge.gateway.connected, timeout=15)
        yield bridge
    finally:
        await bridge.stop()


def linked_to(bridge: Bridge, poi_id: str) -> str:
    return bridge.workers[poi_id].config.link.device


class DeviceByHand:
    """A terminal's end of a pseudo-terminal, driven by the test: it acknowledges what the
    bridge sends, answers nothing, and sends only what the test gives it."""

    def __init__(self, path: Path, framer: str = "stx-etx-lrc") -> None:
        self.master, self._slave, _ = open_pty(path)
        self.framer = make_framer(framer)
        self.received: list[dict[str, Any]] = []
        # The documents sent (as framed: encrypted if sent with a key), and those whose
        # frames the bridge acknowledged (with a framing that has ACKs)
        self.sent: list[dict[str, Any]] = []
        self.acknowledged: list[dict[str, Any]] = []
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    def categories(self) -> list[str]:
        return [next(iter(d.values()))["MessageHeader"]["MessageCategory"]
                for d in self.received]

    def send(self, *documents: dict[str, Any], key: crypto.NexoKey | None = None) -> None:
        """Frames of `documents`, written at once (one after the other as the framing lets)."""
        for document in documents:
            if key is not None:
                document = crypto.encrypt_message(document, key)
            self.sent.append(document)
            self.framer.send_frame(json.dumps(document).encode(), time.monotonic())
        self._flush()

    def answer_check_as(self, poi_id: str, *then: dict[str, Any]) -> None:
        """Answer the bridge's latest identity check naming `poi_id`, and send `then` right
        behind it."""
        check = [d for d in self.received if "DiagnosisRequest" in d["SaleToPOIRequest"]][-1]
        named = responses.simple_response(check)
        named["SaleToPOIResponse"]["MessageHeader"]["POIID"] = poi_id
        self.send(named, *then)

    def _readable(self) -> None:
        with contextlib.suppress(OSError):
            data = os.read(self.master, 4096)
            for event in self.framer.receive_data(data, time.monotonic()):
                if isinstance(event, FrameReceived):
                    self.received.append(json.loads(event.payload))
                elif isinstance(event, FrameSent):
                    self.acknowledged.append(json.loads(event.payload))
            self._flush()

    def _flush(self) -> None:
        data = self.framer.data_to_send()
        if data:
            os.write(self.master, data)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)
        os.close(self._slave)

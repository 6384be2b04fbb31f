"""Pieces the daemon tests assemble: a simulator process, a daemon process, a subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parents[1]
POI = "V400m-324688179"


def _copy(source: Any, log: Any) -> None:
    for line in source:
        log.write(line)
        log.flush()


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def as_nobody(what: str) -> list[str]:
    """The command prefix that runs a program as user nobody (65534), to show what another
    user than the daemon's sees; the test is skipped without root and setpriv, or when that
    user cannot read this checkout (one made in a root-only directory, as by mktemp -d)."""
    import shutil

    import pytest

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip(f"needs root and setpriv (util-linux) to run {what} as another user")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import bridge"],
                           capture_output=True, cwd="/", env=python_env(), timeout=60)
    if probe.returncode != 0:
        pytest.skip("another user cannot read this checkout")
    return prefix


class Simulator:
    """`poi-bridge simulate` as a real process on a pseudo-terminal behind a symlink."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.link = workdir / "terminal"
        self.ledger = workdir / "ledger.json"
        self.log = open(workdir / "simulator.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "simulate", "--pty", "--link", str(self.link),
             "--poi-id", POI, "--ledger", str(self.ledger), *args],
            stdout=subprocess.PIPE, stderr=self.log, env=python_env(), cwd=ROOT)
        line = self.process.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError("simulator did not start: " +
                               (workdir / "simulator.log").read_text()[-2000:])
        self.path = line

    def stop(self) -> dict[str, Any]:
        """Stop it and return its ledger: what the 'shopper' did, per transaction."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        self.log.close()
        return json.loads(self.ledger.read_text()) if self.ledger.exists() else {}


def write_config(workdir: Path, broker: Any, device: str, *, base: str = "poi-bridge",
                 terminal: dict[str, Any] | None = None, extra: str = "") -> Path:
    terminal = {"payment_timeout": 2.0, "status_timeout": 1.0, "poll_floor": 0.05,
                "reconcile_initial": 0.5, "reconcile_max_interval": 2.0, **(terminal or {})}
    lines = [
        f'journal = "{workdir / "journal.sqlite3"}"',
        'log_level = "debug"',
        extra,
        "[mqtt]",
        f'host = "{broker.host}"',
        f"port = {broker.port}",
        f'base_topic = "{base}"',
        'client_id = "poi-bridge-test"',
        "keepalive = 5",
        "health_interval = 1.0",
        "[[terminals]]",
        f'poi_id = "{POI}"',
        *(f"{k} = {json.dumps(v)}" for k, v in terminal.items()),
        "[terminals.link]",
        'kind = "serial"',
        f'device = "{device}"',
        "[terminals.framer]",
        'name = "stx-etx-lrc"',
        "ack_timeout = 0.3",
    ]
    path = workdir / "poi-bridge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fault_injected(workdir: Path, source: str) -> Path:
    """A directory holding `source` as sitecustomize.py: first on a Daemon's path
    (`path_first`), it injects a fault into the real daemon process as it starts."""
    directory = workdir / "fault"
    directory.mkdir(exist_ok=True)
    (directory / "sitecustomize.py").write_text(source)
    return directory


class Daemon:
    """`poi-bridge run` as a real process. With `file_size_limit`, no file the process writes
    may grow past that many bytes (RLIMIT_FSIZE): a full disk, for the journal. Its output
    then goes through a pipe, so the log file is not held to the limit."""

    def __init__(self, config: Path, workdir: Path, *, file_size_limit: int | None = None,
                 path_first: Path | None = None) -> None:
        """`path_first`: a directory put first on the daemon's PYTHONPATH (a sitecustomize.py
        there injects a fault into the real process)."""
        self.config = config
        self.log_path = workdir / "daemon.log"
        self.file_size_limit = file_size_limit
        self.env = python_env()
        if path_first is not None:
            self.env["PYTHONPATH"] = str(path_first) + os.pathsep + self.env["PYTHONPATH"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        command = [sys.executable, "-m", "bridge", "run", "--config", str(self.config)]
        log = open(self.log_path, "ab")  # noqa: SIM115
        if self.file_size_limit is None:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=self.env,
                                            cwd=ROOT)
            return self
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE,
                                        env=self.env, cwd=ROOT)
        # set from here (the interpreter is still starting): preexec_fn is unsafe beside
        # threads. Python ignores SIGXFSZ, so a write past it fails with EFBIG instead.
        limit = self.file_size_limit
        resource.prlimit(self.process.pid, resource.RLIMIT_FSIZE, (limit, limit))
        threading.Thread(target=_copy, args=(self.process.stderr, log), daemon=True).start()
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Subscriber:
    """A real MQTT client that records every message on the topics it subscribed to."""

    def __init__(self, broker: Any, topics: list[str], *, client_id: str = "observer",
                 persistent: bool = False) -> None:
        self.broker = broker
        self.topics = topics
        self.client_id = client_id
        self.persistent = persistent
        self.messages: list[tuple[str, Any, bool]] = []
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Subscriber:
        await self.connect()
        return self

    async def connect(self) -> None:
        self._client = aiomqtt.Client(self.broker.host, self.broker.port,
                                      identifier=self.client_id,
                                      clean_session=not self.persistent)
        await self._client.__aenter__()
        for topic in self.topics:
            await self._client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._read())

    async def disconnect(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)
        self._task = self._client = None

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    async def _read(self) -> None:
        assert self._client is not None
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self._client.messages:
                raw = message.payload
                try:
                    payload = json.loads(raw) if raw else None
                except (TypeError, ValueError):
                    payload = raw
                self.messages.append((message.topic.value, payload, message.retain))
                self._changed.set()

    async def publish(self, topic: str, payload: Any, **kwargs: Any) -> None:
        assert self._client is not None
        data = payload if isinstance(payload, bytes | str) else json.dumps(payload)
        await self._client.publish(topic, data, qos=1, **kwargs)

    def on(self, topic: str) -> list[Any]:
        return [p for t, p, _ in self.messages if t == topic]

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> Any:
        async def wait() -> Any:
            while True:
                for topic, payload, _retained in self.messages:
                    if predicate(topic, payload):
                        return payload
                self._changed.clear()
                await self._changed.wait()
        return await asyncio.wait_for(wait(), timeout)


async def bridge_online(broker: Any, base: str = "poi-bridge", timeout: float = 30.0) -> None:
    """Wait for the bridge's "online" on its state topic: it says so only once subscribed to
    the request topics. Its "connected to MQTT broker" line comes before that, and a request
    published in between reaches no one (the broker has no session to queue it for)."""
    async with Subscriber(broker, [f"{base}/bridge/state"], client_id="online-watcher") as sub:
        await sub.wait_for(lambda t, p: isinstance(p, dict) and p.get("state") == "online",
                           timeout)


async def payment_on_the_wire(sub: Subscriber, service_id: str, amount: float,
                              base: str = "poi-bridge") -> None:
    """Once the terminal is online, a payment of POS1 published and sent to it (a slow
    simulated terminal keeps it there: its row stays open in the journal)."""
    from bridge.simulator import responses

    await sub.wait_for(lambda t, p: t.endswith(f"/terminals/{POI}/state")
                       and p["state"] == "online")
    await sub.publish(f"{base}/terminals/{POI}/request",
                      responses.payment_request("POS1", service_id, POI, amount))
    await sub.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "sent")


def outcome_for(service_id: str, outcome: str | None = None):
    """A predicate: a register response for service_id (with that outcome, if given)."""
    def predicate(topic: str, payload: Any) -> bool:
        if not topic.endswith("/response") or not isinstance(payload, dict):
            return False
        info = payload.get("bridge") or {}
        ids = info.get("transaction") or {}
        return ids.get("service_id") == service_id and (
            outcome is None or info.get("outcome") == outcome)
    return predicate


def wait_until(condition: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False

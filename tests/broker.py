"""A real mosquitto broker for tests: its own config, port and persistence directory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def find_mosquitto() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    def __init__(self, workdir: Path, port: int | None = None, extra_config: str = "",
                 *, anonymous: bool = True, listener_options: str = "") -> None:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto); "
                               ".ci/run installs it")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.extra_config = extra_config
        self.anonymous = anonymous
        self.listener_options = listener_options
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        self.config_path.write_text(
            ""
            # As root, mosquitto would drop to the 'mosquitto' user, which cannot read the
            # test's private temporary directory (password file, persistence).
            + ("user root\n" if os.geteuid() == 0 else "")
            + "per_listener_settings false\n"
            f"allow_anonymous {'true' if self.anonymous else 'false'}\n"
            f"listener {self.port} {self.host}\n"
            f"{self.listener_options}\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            f"{self.extra_config}\n")

    def start(self) -> Mosquitto:
        self.write_config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the broker keeps writing to it
        self.process = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                        stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        """A clean stop (SIGTERM): mosquitto saves its persistence file."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

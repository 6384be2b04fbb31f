"""Requests set aside: a register's request whose handling made the daemon stop at once.

A step that fails half-way (a fault of the bridge, not of the disk: StepFailed) stops the
daemon before the request that caused it is acknowledged, so the broker delivers it again
at the next start, and it stops the daemon again: after five starts systemd gives up, and
every terminal of the store is offline for one bad request. As the daemon stops, the
request's digest is written here (a plain file beside the journal: the journal may be what
failed); from the next start a request with those exact bytes on that topic is refused,
not handled. Its step was taken back and its frame never written (frames go out after their
step's commit), so nothing was started by it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("poi_bridge.mqtt")

MOST_KEPT = 100  # entries; the oldest go first (a request is redelivered within minutes)


def set_aside_path(journal: Path) -> Path:
    return journal.with_name(journal.name + ".set-aside")


@dataclass(frozen=True, slots=True)
class SetAside:
    topic: str
    at: str  # when it stopped the daemon (UTC, ISO 8601)


class SetAsideRequests:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, SetAside] = {}  # sha256 of the payload, hex -> entry
        self._told: set[str] = set()  # logged once per start, however often redelivered
        self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read %s (%s): requests that stopped the bridge earlier are not "
                      "recognised and may stop it again; check the file's owner and mode",
                      self.path, exc)
            return
        for line in lines:
            try:
                entry = json.loads(line)
                self._entries[entry["digest"]] = SetAside(str(entry["topic"]), str(entry["at"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the stop that wrote it

    @staticmethod
    def digest(topic: str, payload: bytes) -> str:
        """Of the topic and the bytes: the same body on another topic (a command's, say) is
        another request."""
        return hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()

    def get(self, topic: str, payload: bytes) -> SetAside | None:
        return self._entries.get(self.digest(topic, payload)) if self._entries else None

    def entries(self) -> list[SetAside]:
        return list(self._entries.values())

    def first_time(self, topic: str, payload: bytes) -> bool:
        """Whether this start has not logged this request yet (it is refused every time)."""
        digest = self.digest(topic, payload)
        if digest in self._told:
            return False
        self._told.add(digest)
        return True

    def add(self, topic: str, payload: bytes) -> None:
        """Written and flushed to the disk before the daemon stops (os._exit skips
        everything): the whole file again, at most MOST_KEPT entries, replaced at once."""
        digest = self.digest(topic, payload)
        self._entries.pop(digest, None)
        self._entries[digest] = SetAside(topic, dt.datetime.now(dt.UTC).isoformat(
            timespec="seconds"))
        while len(self._entries) > MOST_KEPT:
            del self._entries[next(iter(self._entries))]
        text = "".join(json.dumps({"digest": d, "topic": e.topic, "at": e.at}) + "\n"
                       for d, e in self._entries.items())
        fresh = self.path.with_name(self.path.name + ".new")
        with open(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
            file.write(text.encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(fresh, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # (the rename itself, across a power cut)
        finally:
            os.close(directory)

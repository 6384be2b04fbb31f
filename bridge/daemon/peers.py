"""Another bridge on the same topics: two daemons (a second box, a test install left running)
on one broker with one `base_topic` both take every register request, and both charge it.

Each bridge names itself in its retained `{base}/bridge/state` document, and in its last
will: `instance` (random, new at every process start), `bridge_id` (random, made once per
journal and kept in it), `host`, `pid`, `client_id`, `journal`; its "online" document also
carries `announcement`, a count of its own announcements in this run. It subscribes to that
topic itself, and reads every document there as it comes off the socket (before any request
read after it is handled):

- its own instance: its own document. Requests are taken only once its latest "online" has
  come back from the broker: by then the broker has passed it every document published
  before, so of two bridges announcing at once the second sees the first (proof in the
  README, "Another bridge on the same topics").
- its own `bridge_id` and host, another instance, retained (sent as this bridge subscribed)
  or "offline": a previous run of this bridge (an "online" left by a SIGKILL or a power cut,
  the broker not having published the will yet). Ignored. A live "online" of that kind
  (published while this bridge listens) is another bridge: a box cloned from this one.
  Ignored likewise, retained or "offline": one of this host, client id and journal path
  whose process is gone (or has this one's pid, as pid 1 in a container): a run before the
  journal was replaced (moved aside after a power cut damaged it, say), whose new
  `bridge_id` the old document cannot know. (A live process there is another bridge.)
- any other instance, not "offline": another bridge. This bridge takes no new request (the
  intake refuses them, nothing sent to a terminal) until that bridge's "offline" (its will
  or its clean stop) comes, or the document is cleared; what is open is finished and
  reported. Both bridges back off: neither can tell which of the two is the store's.
- a document without `instance` (an older bridge; anything else) says nothing: ignored.

In a chain each store's broker carries `bridge/state` out to the central broker only (under
the store's prefix), never in: stores do not see each other's documents.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("poi_bridge.mqtt")

# How long a bridge waits for its own "online" to come back from the broker before it takes
# requests without the check (a broker whose ACL keeps the bridge from reading its state)
ANNOUNCE_TIMEOUT = 5.0
# s: another bridge with this one's client id, seen taking the connection from this one, is
# taken as gone once this bridge's connection has held this long. A broker keeps one
# connection per client id, handing the session to the newest: while both run they take it
# from each other about once a second. That one's "offline" may never reach this one (the
# session they share delivered it to itself), and this bridge then refused every request
# for good after the other had stopped (review). Only one seen taking turns: a bridge with
# the same client id on another broker, bridged to this one, never takes this connection,
# and may well be running (a second review).
SAME_CLIENT_ID_HELD = 30.0


def describe(document: dict[str, Any]) -> str:
    return (f"host {document.get('host', '?')} (pid {document.get('pid', '?')}, client id "
            f"{document.get('client_id', '?')!r}, journal {document.get('journal', '?')})")


class OtherBridges:
    """What this bridge has heard on its own state topic: the other bridges seen there, and
    whether its latest announcement has come back."""

    def __init__(self, *, bridge_id: str | None, client_id: str, journal: str,
                 topic: str, host: str | None = None) -> None:
        self.topic = topic
        self.identity: dict[str, Any] = {
            "instance": os.urandom(8).hex(), "bridge_id": bridge_id,
            "host": host or socket.gethostname(), "pid": os.getpid(),
            "client_id": client_id, "journal": journal}
        self.others: dict[str, dict[str, Any]] = {}  # instance -> its latest document
        self._announced = 0  # the latest own "online" published
        self._heard = 0  # the latest own "online" the broker passed back
        self._backed_off = False  # another bridge was seen: wait for a fresh echo to resume
        self.blind = False  # the check could not work on this connection (see ANNOUNCE_TIMEOUT)
        self.seen = 0  # other bridges seen in this run (for health and tests)
        # instances said in full (CRITICAL, then "gone offline"): one with this bridge's
        # client id comes and goes at every takeover; its returns are said at debug
        self._told: set[str] = set()
        self._twins: set[str] = set()  # instances heard with this bridge's client id
        self._taking_turns: set[str] = set()  # ... of those, heard before a takeover
        # Called when this bridge must say "online" again: the other's "offline", or a
        # cleared document, replaced its own
        self.on_reannounce: Callable[[], None] | None = None

    def online(self) -> dict[str, Any]:
        """A new "online" document: requests wait until it comes back (`heard_back`)."""
        self._announced += 1
        return {"state": "online", **self.identity, "announcement": self._announced}

    def offline(self) -> dict[str, Any]:
        return {"state": "offline", **self.identity}

    @property
    def heard_back(self) -> bool:
        return self._heard >= self._announced

    def go_blind(self) -> None:
        """The latest announcement did not come back: serve without the check."""
        self._heard = self._announced
        self.blind = True

    def refusal(self) -> str | None:
        """Why a new request may not start now, or None."""
        if self.others:
            names = "; ".join(describe(d) for d in self.others.values())
            return ("another poi-bridge serves this broker's topics too (" + names + "): so "
                    "that no payment is charged twice, this bridge takes no new request while "
                    "it runs. Nothing was sent to the terminal. Stop one of the two bridges, "
                    "then send the request again with a new ServiceID")
        if self._backed_off and not self.heard_back:
            return ("another poi-bridge served this broker's topics a moment ago: this "
                    "bridge is making sure it is gone. Nothing was sent to the terminal; "
                    "send the request again with a new ServiceID in a few seconds")
        return None

    def heard(self, payload: bytes, load: Callable[[bytes], Any], *,
              retained: bool = False) -> None:
        """A document on the state topic, as read off the socket: `retained`, the one the
        broker kept, sent as this bridge subscribed; else published while it listens."""
        if not payload:  # cleared: whoever was there is gone, as far as the broker says
            if self.others:
                log.warning("%s was cleared: the other bridge(s) are taken as gone; this "
                            "bridge says it is online again and takes requests once the "
                            "broker has passed that back", self.topic)
                self.others.clear()
            self._reannounce()
            return
        try:
            document = load(payload)
        except Exception:  # noqa: BLE001 - anyone's junk on the topic says nothing
            return
        if not isinstance(document, dict) or not isinstance(document.get("instance"), str):
            return  # an older bridge's document, or not a bridge's: says nothing
        instance, state = document["instance"], document.get("state")
        mine = self.identity
        if instance == mine["instance"]:
            announcement = document.get("announcement")
            if state == "online" and isinstance(announcement, int):
                self._heard = max(self._heard, min(announcement, self._announced))
                if self.heard_back and self._backed_off and not self.others:
                    self._backed_off = False
                    log.warning("no other poi-bridge on %s any more: this bridge takes "
                                "requests again", self.topic)
            return
        ours = document.get("bridge_id") == mine["bridge_id"] and mine["bridge_id"] is not None \
            and document.get("host") == mine["host"]
        # A previous run says nothing more once this one runs: an "online" published while
        # this bridge listens, with its journal's id, is a copy of it (a cloned disk)
        if (ours or _earlier_run_here(document, mine)) and (retained or state == "offline"):
            if state != "offline":
                log.info("%s still held the document of a previous run of this bridge "
                         "(pid %s, ended without saying offline): not another bridge",
                         self.topic, document.get("pid", "?"))
            elif not self.others:
                self._reannounce()  # (its will, published late, replaced this one's online)
            return
        if state == "offline":
            if self.others.pop(instance, None) is not None:
                log.log(logging.DEBUG if instance in self._taking_turns else logging.WARNING,
                        "the other poi-bridge, %s, has gone offline", describe(document))
            if not self.others:
                self._reannounce()  # its document replaced this one's
            return
        if self._takes_turns(document):
            self._twins.add(instance)
        # Another bridge. Its earlier runs (same journal and host) are over.
        for other in [i for i, d in self.others.items()
                      if (d.get("bridge_id"), d.get("host"))
                      == (document.get("bridge_id"), document.get("host"))]:
            del self.others[other]
        new = instance not in self.others
        self.others[instance] = document
        self._backed_off = True
        if new and instance in self._taking_turns and instance in self._told:
            log.debug("the other poi-bridge with this bridge's client id, %s, took the "
                      "connection again", describe(document))
        elif new:
            self.seen += 1
            self._told.add(instance)
            log.critical(
                "ANOTHER POI-BRIDGE ON THE SAME TOPICS: %s says it is %s on %s, beside this "
                "bridge, %s. Both would take every register request and charge it twice: "
                "this bridge refuses every new request (nothing is sent to a terminal; what "
                "is open is finished and reported) until the other is gone. Stop one of the "
                "two (systemctl stop poi-bridge on the box that must not serve this store), "
                "or give it its own mqtt.base_topic; if that bridge no longer runs and its "
                "document stays, clear it: mosquitto_pub -r -n -t %s",
                describe(document), state, self.topic, describe(mine), self.topic)

    def connection_taken(self) -> None:
        """The broker dropped this bridge's connection just after it came up, as it does
        when another client connects with its client id: the bridges with its client id
        heard so far share its broker, and take turns with it."""
        self._taking_turns |= self._twins

    def connection_held(self) -> None:
        """This bridge's connection has held SAME_CLIENT_ID_HELD s: no bridge with its client
        id is trying to connect to its broker (the broker would have handed it the session),
        so those seen taking turns with it are gone, whatever their last document said."""
        gone = [i for i, d in self.others.items()
                if self._takes_turns(d) and i in self._taking_turns]
        for instance in gone:
            log.warning("the other poi-bridge with this bridge's client id, %s, has not taken "
                        "the connection for %g s: it is taken as gone, and this bridge takes "
                        "requests again once the broker has passed its \"online\" back. If "
                        "it comes back, both stop taking requests again: give each bridge its "
                        "own mqtt.client_id, or stop one", describe(self.others.pop(instance)),
                        SAME_CLIENT_ID_HELD)
        if gone and not self.others:
            self._reannounce()

    def _takes_turns(self, document: dict[str, Any]) -> bool:
        """Whether `document` is of a bridge with this one's client id: on one broker, one
        connection of the two is up at a time (on two brokers bridged, both are)."""
        return document.get("client_id") == self.identity["client_id"]

    def _reannounce(self) -> None:
        if self.on_reannounce is not None:
            self.on_reannounce()


def _earlier_run_here(document: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Whether `document` is of a bridge that ran on this host, with this client id and this
    journal path, in a process that is gone: this bridge before its journal was replaced
    (a new journal, a new bridge_id). Two live bridges cannot share a client id on one
    broker for long, nor one journal path on one host (its lock), so a live process or any
    difference means another bridge."""
    pid = document.get("pid")
    if not (isinstance(pid, int) and pid > 0) or any(
            document.get(key) != mine[key] for key in ("host", "client_id", "journal")):
        return False
    if pid == mine["pid"]:
        return True  # this process, run again (pid 1 in a container): that one is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):  # EPERM: alive, another user's; or no pid
        return False
    return False

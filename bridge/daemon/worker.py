"""One worker per terminal: the thin async shell around the framer and the terminal session.

It opens the transport (and reopens it with backoff when the device goes away), feeds bytes
to the framer and messages to the session, fires the session's and the framer's timers, and
carries out the session's actions in order: Record -> journal, Send -> the frame writer
(frame_writer.py: framer -> transport, and the session told what was delivered),
Deliver/Progress -> the register side (the outlet). Everything runs on the event loop. No
action may overtake the record it depends on: frames (and the ACK of a terminal's answer) go
out through the journal's after_commit(), once the step's records are on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from bridge.config import TerminalConfig
from bridge.daemon.frame_writer import FrameWriter
from bridge.daemon import quiet
from bridge.daemon.journal import Journal, JournalGone
from bridge.daemon.quiet import QuietRepeats
from bridge.redaction import redact
from bridge.protocol import crypto
from bridge.protocol.framing import (
    FrameFailed,
    FrameResent,
    FrameReceived,
    FrameSent,
    FramingError,
    make_framer,
)
from bridge.protocol.messages import (MessageError, SaleToPOIRequest, SaleToPOIResponse, load_json,
                                     parse_message)
from bridge.protocol.actions import Action, Deliver, Log, Progress, Record, Send, Unmatched
from bridge.protocol.identity import OTHER_KEY, key_owner
from bridge.protocol.outcome import Outcome, dig, payment_amounts, short_authorisation
from bridge.protocol.session import SessionSettings, TerminalSession
from bridge.protocol.transaction import STAMP_FIELDS, Transaction, TxKey, TxState
from bridge.transports import (
    Backoff,
    LinkClosed,
    Transport,
    TransportUnavailable,
    open_transport,
)

# The events that say a frame went out: withheld when it could not (Worker._apply)
_SENT_EVENTS = frozenset({"sent", "abort_sent"})

log = logging.getLogger("poi_bridge.terminal")
# Crypto errors in a row, answering frames of ours under the key in use, that turn a terminal
# in a key rotation to its other key (see _on_frame)
KEY_REFUSALS_BEFORE_SWITCHING = 2


class SteadyClock:
    """The daemon's clock: the wall clock as it was when it was made, moved on by the
    monotonic clock only. Deadlines must not move when the system clock is stepped (NTP
    correcting a box that booted with a wrong clock): stepped back an hour, the status poll
    for a lost answer would have waited an hour. The daemon shares one between its
    terminals, the 48-hour ServiceID rule and pruning, so they all agree; and when it sees
    the wall clock stepped, it moves this clock, the journal's times of this run and the
    sessions' together (shift()), so that what is journaled is right at the next start."""

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall, self._monotonic = wall, monotonic
        self.started = wall()  # this run's first time: its stamps are from here on
        self._offset = self.started - monotonic()

    def __call__(self) -> float:
        return self._monotonic() + self._offset

    def drift(self) -> float:
        """How far the wall clock is from this one (a step of the system clock)."""
        return self._wall() - self()

    def shift(self, delta: float) -> None:
        self._offset += delta
        self.started += delta


def describe_transactions(transactions: list[Transaction], most: int = 5,
                          states: Mapping[TxKey, TxState] | None = None) -> str:
    """SaleID/ServiceID of the first few transactions, for a log line; with the state each
    was in (`states`, or its own)."""
    states = states or {}
    shown = ", ".join(f"{t.sale_id}/{t.service_id} ({states.get(t.key, t.state)})"
                      for t in transactions[:most])
    return shown + (f" and {len(transactions) - most} more" if len(transactions) > most else "")


MAX_TIMER_SLEEP = 60.0  # s: look at the deadlines again at least this often
LINK_PROVEN_AFTER = 10.0  # s: a link up this long (or that brought a frame) worked
# s: the same bug (its type and where it was raised) logs its traceback again after this
# long; meanwhile each repeat is one line, counted
FAILURE_NEWS_AFTER = 3600.0
TIMER_SLACK = 0.0005  # s: a deadline moved by less than this keeps the armed timer
TIMER_RETRY_AFTER_BUG = 0.5  # s: the first pause after a timer step failed, doubling to 10 s
# s: how long a followed terminal waits for the worker that had its new link to let go of it
RELINK_HANDOVER = 2.0
# What the bridge concluded of a money request by itself (`error`: from a crypto error,
# before 2026-12-01), which the terminal's own final answer, coming later, corrects (see
# TerminalWorker._correct)
CORRECTABLE = ("not_found", "error")
CHARGED = ("approved", "partially_approved")  # the outcomes where money moved
# s: further oversize frames this soon after one, and on while they keep coming at least
# this often (most often the same answer: its rest, read as a frame of its own, or the
# terminal sending it again unacknowledged), get no warning of their own (QuietRepeats);
# each is still told to the session, which may be waiting for it
OVERSIZE_QUIET = 5.0
NOT_CONNECTED_YET = "not connected yet"
# on_wrong_device's answer when following waits for the other terminal's own link to say who
# is there; the wrong device is reported only if it is still there FOLLOW_GRACE s later, and
# that link has spoken by then (asked again every FOLLOW_GRACE s until it has: its identity
# check is a chain of timers of its own, late on a stalled CPU)
FOLLOW_LATER = "later"
FOLLOW_GRACE = 2.0
# After this many of the other terminal's status_timeout (60 s by default) waiting for its
# link, the wait is logged once (at warning). That link decides within its identity check's
# status_timeout of opening, its device answering or not: twice that is no longer a slow link
# but a stuck one. (Its own: a fixed 60 s warned while a check configured longer still ran.)
FOLLOW_PATIENCE = 2.0


def _bug_of(task: asyncio.Task[Any]) -> BaseException | None:
    """What a finished link task raised other than its cancellation or the link's end."""
    if not task.done() or task.cancelled():
        return None
    exc = task.exception()
    return None if isinstance(exc, LinkClosed) else exc


class Outlet(Protocol):
    """Where a worker's results go: the MQTT side in the daemon, a list in tests."""

    def deliver(self, result: Deliver) -> None: ...

    def progress(self, event: Progress) -> None: ...

    def terminal_state(self, poi_id: str, state: dict[str, Any]) -> None: ...


def session_settings(config: TerminalConfig) -> SessionSettings:
    return SessionSettings(
        payment_timeout=config.payment_timeout,
        status_timeout=config.status_timeout,
        resync_attempts=config.resync_attempts,
        poll_floor=config.poll_floor,
        reconcile_initial=config.reconcile_initial,
        reconcile_max_interval=config.reconcile_max_interval,
        reconcile_deadline=config.reconcile_deadline,
        in_progress_limit=config.in_progress_wait,
    )



@functools.lru_cache(maxsize=64)
def _shown_identity(identity: str) -> str:
    """A worker's identity as its state document shows it (through the filter: "mismatch:
    <what the device said>" quotes a device). Cached: asked after every step, seldom new."""
    return redact(identity)

class TerminalWorker:
    def __init__(
        self,
        config: TerminalConfig,
        journal: Journal,
        outlet: Outlet,
        *,
        key: crypto.NexoKey | None = None,
        previous_key: crypto.NexoKey | None = None,
        transport_factory: Callable[[Any], Transport] = open_transport,
        clock: Callable[[], float] | None = None,
        backoff: Backoff | None = None,
        on_wrong_device: Callable[[str, str], TerminalWorker | str | None] | None = None,
        follow_waits: Callable[[str, str], bool] | None = None,
    ) -> None:
        """`on_wrong_device(poi_id, said)`: the device on this terminal's link says it is
        `said`; `said`'s worker when the daemon follows the terminals to their links
        (relink()), FOLLOW_LATER when that may come once `said`'s own link has spoken, else
        None. `follow_waits(poi_id, said)`: whether, after FOLLOW_LATER, that is still so
        (the wrong device is not reported meanwhile)."""
        self.config = config
        self.on_wrong_device = on_wrong_device
        self.follow_waits = follow_waits
        self.poi_id = config.poi_id
        self.journal = journal
        self.outlet = outlet
        # The key frames go with: `key`, or in a key rotation the terminal's other key
        # (previous_key) once it is the one the terminal uses (_use_key). Both are read.
        self.key = key
        self.keys = tuple(k for k in (key, previous_key) if k is not None)
        self._last_sent_key: crypto.NexoKey | None = None  # what the last frame went with
        self._heard_key: crypto.NexoKey | None = None  # the terminal's last message came with
        # crypto errors in a row that answered frames of ours under the key in use (_on_frame)
        self._key_refusals = 0
        self._turned_unheard = False  # the key turned since the terminal was last heard
        self._transport_factory = transport_factory
        self._clock = clock or SteadyClock()
        self._backoff = backoff or Backoff(initial=0.2, maximum=10.0)
        self.session = TerminalSession(config.poi_id, session_settings(config))
        # Every configured terminal's worker, by POIID (set by the daemon): a message on this
        # link that names another terminal is handed to it (_its_terminal)
        self.terminals: dict[str, TerminalWorker] = {}
        self.neighbours = {}
        fc = config.framer
        self.framer = make_framer(fc.name, max_frame_size=fc.max_frame_size,
                                  ack_timeout=fc.ack_timeout, max_tries=fc.max_tries,
                                  seconds_per_byte=config.link.seconds_per_byte)
        self._framer_due: float | None = None  # the framer's deadline the timer knows of
        self._transport: Transport | None = None
        # Send actions -> bytes on the link, and their delivery back to the session
        self.writer = FrameWriter(self.poi_id, self.framer, journal, self.session, self._apply,
                                  self._clock)
        self._timer: asyncio.TimerHandle | None = None
        # A timer step that failed (a bug) is tried again after a pause, not at once: its
        # deadline is still past, and the timer would fire again and again, the loop spinning
        self._timer_backoff = Backoff(initial=TIMER_RETRY_AFTER_BUG, maximum=10.0)
        self._timer_paused_until = 0.0  # (loop time)
        self._started = False
        self._oversize_said = QuietRepeats(OVERSIZE_QUIET)  # (one group: this link's)
        # A flapping link: its first loss in full, the others counted (quiet.LINK_LOSSES_QUIET);
        # grouped by "dropped" and "unplugged" (the hotplug monitor sums the unplugs up)
        self._losses_said = QuietRepeats(quiet.LINK_LOSSES_QUIET, self._losses_summed)
        self._loss_counted = False  # the last loss was only counted: its reopen is as quiet
        self._loss_at_debug = False  # ... and was said at debug: so is the link up again
        # Line noise: its first run said at info, then one warning per LINK_LOSSES_QUIET
        # while it goes on, with the bytes it held (counted here: the summary gets a count
        # of runs only)
        self._noise_said = QuietRepeats(quiet.LINK_LOSSES_QUIET, self._noise_summed)
        self._noise_unsaid = 0  # bytes of the runs counted since the last line about them
        # Bugs met (link task failures, timer steps that failed): how often each (its type
        # and where it was raised) was seen, and when its traceback was last logged, so that
        # a repeat is one line, not a traceback (see _log_bug)
        self._bugs_seen: dict[tuple[Any, ...], tuple[int, float]] = {}
        self._link_reason = NOT_CONNECTED_YET
        self._stopping = False
        self._daemon_stopping = False  # (daemon_stops(): no wrong device is reported)
        self._enabled_event = asyncio.Event()  # hotplug: clear while the device is unplugged
        self._enabled_event.set()
        self._disabled_event = asyncio.Event()
        self._relinked = asyncio.Event()  # the link to open changed: drop the one open now
        # Try the link now, not at the end of the retry pause: the device was plugged in
        # (again), or the link changed
        self._retry_now = asyncio.Event()
        self.link_closed = asyncio.Event()  # the link this worker opened last is closed
        self.link_closed.set()
        self._handed_over_by: asyncio.Event | None = None  # relink(): the previous holder
        self._tasks: list[asyncio.Task[None]] = []
        # Since the daemon started (the `terminals` command and `poi-bridge status` show them);
        # noise_bytes: bytes read that were no frame
        self.counters = {"frames_in": 0, "frames_out": 0, "framing_errors": 0,
                         "noise_bytes": 0, "reconnects": 0}
        self._answers_in = 0  # SaleToPOIResponses read in full on this worker's links
        self.identity = "unknown"  # confirmed | mismatch: <what it said> | unknown
        # Requests written to a device that had not said who it is (it did not answer the
        # identity check in time): asked about where they went, never followed elsewhere
        self.sent_unconfirmed: set[TxKey] = set()
        # Told (by the daemon) each time this terminal's state is published: a follow that
        # waits for this link to say who is there is decided again then
        self.on_state: Callable[[str], None] | None = None
        # The wrong device's report, FOLLOW_GRACE s after it named another terminal (or
        # later: _grace_over): one at a time, or a drop and reopen onto the same device
        # within the grace reported it twice
        self._grace_timer: asyncio.TimerHandle | None = None

    # --- public -----------------------------------------------------------------------------

    @property
    def neighbours(self) -> dict[str, crypto.NexoKey | None]:
        """The other terminals whose device could be found on this link (same link kind),
        with their keys: set by the daemon once every worker exists."""
        return self._neighbours

    @neighbours.setter
    def neighbours(self, terminals: dict[str, crypto.NexoKey | None]) -> None:
        self._neighbours = terminals
        # The keys a device that cannot take this terminal's is asked with, each once: in a
        # key rotation this terminal's other key first (named by its own POIID: the device
        # may be this terminal, holding that key); then each other terminal's key, and its
        # other key when it is in a rotation too ("<POIID>#other": its device may hold
        # either). A key already listed (terminals sharing one, a rotation's shared new
        # key) is not asked again, by whichever terminal names it (a review: a neighbour
        # whose key was ours took its own previous key off the list with it).
        entries = [self.poi_id] if len(self.keys) > 1 else []
        asked = list(self.keys)
        for poi_id in sorted(terminals):
            owner = self.terminals.get(poi_id)
            keys = owner.keys if owner is not None else (terminals[poi_id],)
            for entry, key in zip((poi_id, poi_id + OTHER_KEY), keys, strict=False):
                if key is None or any(crypto.same_key(key, seen) for seen in asked):
                    continue
                asked.append(key)
                entries.append(entry)
        self.session.identity.other_keys = tuple(entries)

    @property
    def online(self) -> bool:
        return self.session.link_up

    def state(self) -> dict[str, Any]:
        state = "offline" if not self.online else ("busy" if self.session.busy else "online")
        return {
            "state": state,
            "poi_id": self.poi_id,
            "link": self._transport.describe() if self._transport else None,
            # (an internal error's text may quote what the device sent: filtered too)
            "detail": _shown_identity(self._link_reason) if not self.online else "",
            "active": str(self.session.active) if self.session.active else None,
            # (what the device said it is, as the filter lets it out: the document is
            # retained, and read by every register and through a chain's bridge)
            "identity": _shown_identity(self.identity),
            # (while "unknown": 0, its first check is still out; more, checks went unanswered)
            "identity_checks_unanswered": self.session.identity.unanswered_since_open,
            # ... and why the last of them failed (the terminal's crypto error, no answer in
            # time...): `status` shows it, not only the log (through the filter: a device's
            # words may be in it). None while none has failed since the link opened.
            "identity_check_failed": _shown_identity(self.session.identity.unnamed_reason)
            if self.session.identity.unanswered_since_open else None,
            "open_transactions": len(self.session.open),
            # The key the terminal's last authenticated message came with, since the daemon
            # started (None before, and without a key): in a key rotation, which one it
            # holds; a chain removes previous_key once every terminal shows the new one.
            # Not secret: every encrypted message carries it in clear.
            "key": (f"{self._heard_key.identifier} v{self._heard_key.version}"
                    if self._heard_key else None),
        }

    def submit(self, request: SaleToPOIRequest, document: dict[str, Any], digest: str,
               asked_amounts: dict[str, Any] | None = None) -> None:
        self._apply(self.session.submit(request, document, digest, self._clock(),
                                        asked_amounts))

    def resync(self, txn: Transaction) -> None:
        earlier = [getattr(txn, name) for name in STAMP_FIELDS
                   if self.journal.stamped_by_earlier_run(txn.key, name, getattr(txn, name))]
        self._apply(self.session.resync(txn, self._clock(), earlier))

    def restore(self, transactions: list[Transaction]) -> None:
        if transactions:
            log.info("terminal %s: recovering %d open transaction(s) from the journal: %s",
                     self.poi_id, len(transactions), describe_transactions(transactions))
        self._apply(self.session.restore(transactions, self._clock(),
                                         self.journal.last_requests_sent(self.poi_id)))

    @property
    def tasks(self) -> list[asyncio.Task[Any]]:
        """What runs for the worker's life (its link loop): the daemon stops if one ends."""
        return list(self._tasks)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._link_loop(), name=f"link {self.poi_id}"),
        ]
        self._started = True
        self._rearm()
        self._publish_state()

    async def stop(self) -> None:
        self._stopping = True
        self._losses_said.flush()  # (before the link is closed: "online now" is still true)
        self._noise_said.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._transport is not None:
            await self._transport.close()
        self._oversize_said.flush()

    def daemon_stops(self) -> None:
        """The daemon is stopping: its drain and its goodbye on MQTT take seconds before
        stop(), and this link runs on meanwhile. No wrong device is reported from now on (the
        grace timer of one waiting for another terminal's link is cancelled): the daemon
        follows nothing while it stops, and an ERROR then sent a technician to replug for a
        swap the next start, finding the cables as they are, follows or reports itself."""
        self._daemon_stopping = True
        self._cancel_grace()

    def device_present(self, present: bool) -> None:
        """Hotplug: the device appeared or went away. While it is away the worker does not
        try to open it (no log spam); when it is back it is opened at once."""
        if present:
            self._backoff.reset()
            self._disabled_event.clear()
            self._enabled_event.set()
            if not self.online:  # (a pause after failed opens, e.g. permissions, ends)
                self._retry_now.set()
        else:
            self._enabled_event.clear()
            self._disabled_event.set()
            if not self.online and self._link_reason == NOT_CONNECTED_YET:
                self._link_reason = "device not plugged in"
                self._publish_state()

    @property
    def holds_unconfirmed_sends(self) -> bool:
        """Whether an open transaction's request went to a device not known to be this
        terminal: its link must not be swapped away from that device (see follow.py)."""
        self.sent_unconfirmed &= self.session.open.keys()
        return bool(self.sent_unconfirmed)

    @property
    def left_unnamed(self) -> bool:
        """Whether the device on the link was asked who it is and did not say (no answer in
        time, none naming a terminal, one that cannot be read): until it is asked again,
        nothing there says it is this terminal (see follow.py)."""
        identity = self.session.identity
        return self.online and identity.asked and identity.check is None and not identity.named

    def relink(self, link: Any, released: asyncio.Event | None = None) -> None:
        """Open `link` from now on instead of the configured one: this terminal was found
        there (its cable moved to another terminal's port). The link open now is dropped;
        open transactions are asked about on the new one, never sent again. `released`: set
        once the worker that holds `link` now has closed it (opened before, the device
        would be "in use" or "busy", and the log would say so)."""
        self.config = self.config.model_copy(update={"link": link})
        # Frames are timed at the speed of the link they go on (a port of another baud rate)
        self.framer.seconds_per_byte = link.seconds_per_byte
        self._handed_over_by = released
        self._cancel_grace()  # followed: the device here is no longer wrong
        self.session.following = True  # until the link is dropped: refusals say why
        self._backoff.reset()
        self._relinked.set()
        self._retry_now.set()
        # Where the terminal was just heard, a device is present; hotplug says otherwise if not.
        self.device_present(True)

    # --- actions ------------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        # The records and the messages owed to registers commit together (one fsync, shared
        # with the other steps of this loop pass), and only then do the frames go out: a Send
        # never overtakes the Record before it.
        # A frame is encoded (encrypted) here, before the commit, so that a request too large
        # for the link is refused in the same step, and its `sent` event (which the session
        # puts after the Send) is never published.
        sends: list[tuple[Send, bytes, crypto.NexoKey | None]] = []
        work = list(actions)  # a refusal's actions are appended and applied in this batch
        try:
            self._record(work, sends)
        except (sqlite3.Error, JournalGone):
            raise  # reported by the journal itself (on_failure)
        except Exception as exc:
            # The session decided (a result handled, a frame queued) and the journal took the
            # records back: left so, a result would reach no register and a transaction be
            # asked about by nobody until the next start. Stopping now (as after a failed
            # write) makes that start now: the terminal is taken up from the journal again.
            self.journal.step_failed(exc, f"terminal {self.poi_id}")
            raise
        for send, payload, key in sends:
            self.journal.after_commit(functools.partial(self._send, send, payload, key))
        self._publish_state()
        self._rearm()

    def _record(self, work: list[Action],
                sends: list[tuple[Send, bytes, crypto.NexoKey | None]]) -> None:
        """_apply's batch: records saved, results and events queued in the outbox, frames
        encoded (collected in `sends`), all or nothing."""
        withheld: set[TxKey] = set()
        with self.journal.batch():
            for action in work:
                if isinstance(action, Record):
                    self.journal.save(action.transaction)
                elif isinstance(action, Send):
                    # (An identity check may go with another terminal's key: see
                    # DeviceIdentity.next_key)
                    key = self._key_for(action.key_of)
                    payload, unwritable = self.writer.encode(action, key)
                    if unwritable is None:
                        sends.append((action, payload, key))
                        continue
                    withheld.add(TxKey(action.sale_id, action.service_id))
                    work += self.session.not_writable(action.service_id, unwritable,
                                                      self._clock(), action.sale_id)
                elif isinstance(action, Deliver):
                    self.outlet.deliver(action)
                    self._log_result_later(action)
                elif isinstance(action, Progress):
                    if withheld and action.event in _SENT_EVENTS \
                            and TxKey(action.sale_id, action.service_id) in withheld:
                        continue
                    self.outlet.progress(action)
                elif isinstance(action, Log):
                    log.log(logging.getLevelName(action.level.upper()), "%s", action.message)
                elif isinstance(action, Unmatched):
                    self._unmatched(action)

    def _unmatched(self, answer: Unmatched) -> None:
        """A final answer the session has no open transaction for. Known to the journal, it
        is a late copy. Unknown, the journal lost it (replaced, moved aside, its WAL deleted)
        while the terminal worked: the register must still hear what it was charged, and a
        repeat of its request must get this answer, never go to the terminal again."""
        key = TxKey(answer.sale_id, answer.service_id)
        known = self.journal.get(key)
        if known is not None and known.state is TxState.FINAL \
                and known.outcome in CORRECTABLE and known.category == answer.category \
                and known.poi_id == self.poi_id:
            # (only the word of the terminal the payment ran on corrects it: a record found
            # by a status request sent to another terminal is not, nor an answer read on
            # another terminal's link: one in clear on a keyless terminal's link, naming that
            # terminal and a keyed one's payment, turned its not_found into approved, a
            # review. A terminal's own device on another link is read by its own worker.)
            self._correct(known, answer)
            return
        if answer.found_by is not None:
            return  # a record a register asked for, and was told: nothing of ours to correct
        if known is not None:
            log.warning("terminal %s: ignored a late %s answer for %s/%s (%s): the transaction "
                        "is already %s%s%s", self.poi_id, answer.category, answer.sale_id,
                        answer.service_id, answer.detail,
                        known.state, f", {known.outcome}" if known.outcome else "",
                        "" if known.poi_id == self.poi_id else
                        f", and ran on terminal {known.poi_id}: not this terminal's to answer")
            return
        allowed = self.config.allowed_sale_ids
        if allowed is not None and answer.sale_id not in allowed:
            # (no request of that register can have reached this terminal: the intake
            # refuses it. Recorded, it would be published to that register, and answer its
            # later request under those IDs: a message written on the line, not the
            # terminal's answer to anything, a review)
            log.error("terminal %s: ignored a %s answer for %s/%s (%s), which the journal has "
                      "no record of: SaleID %s is not among the registers allowed to use this "
                      "terminal (allowed_sale_ids), so under this configuration no request of "
                      "its was sent here. If it was allowed before a restart and the journal "
                      "lost its record, check that sale on the terminal", self.poi_id,
                      answer.category, answer.sale_id, answer.service_id, answer.outcome,
                      answer.sale_id)
            return
        now = self._clock()
        header = (answer.response.get("SaleToPOIResponse") or {}).get("MessageHeader") or {}
        detail = "answered by the terminal; the journal had no record of the request"
        self.journal.save(Transaction(
            sale_id=answer.sale_id, service_id=answer.service_id, poi_id=self.poi_id,
            category=answer.category, request={"SaleToPOIRequest": {"MessageHeader": header}},
            digest="", created_at=now, updated_at=now, state=TxState.FINAL,
            outcome=answer.outcome, source="terminal", response=answer.response, detail=detail,
            extra={"unmatched": True}))
        log.error("terminal %s: answered %s %s/%s (%s), which the journal has no record of "
                  "(was it replaced or moved aside, or its -wal file deleted, while the bridge "
                  "ran?): the answer is recorded and published to the register; check the "
                  "journal's history", self.poi_id, answer.category, answer.sale_id,
                  answer.service_id, answer.outcome)
        self.outlet.deliver(Deliver(answer.sale_id, answer.service_id, self.poi_id,
                                    answer.category, answer.outcome, "terminal",
                                    answer.response, None))

    def _correct(self, known: Transaction, answer: Unmatched) -> None:
        """The terminal's own final answer to a money request the bridge had ended with a
        conclusion of its own (`not_found`: "never received, nothing charged"; `error`: a
        crypto error, say, which is not authenticated): the terminal's word wins, as a late
        answer does while the transaction is open. Recorded and published again under the
        same IDs, marked as a correction: the register may have charged the sale again
        meanwhile, on the bridge's word."""
        now = self._clock()
        outcome = answer.outcome
        if outcome == Outcome.APPROVED and known.category == "Payment" and short_authorisation(
                payment_amounts(known.request),
                dig(answer.response, "SaleToPOIResponse", "PaymentResponse")):
            outcome = Outcome.PARTIALLY_APPROVED.value  # (as when it answers in time: amounts_read)
        charged = outcome in CHARGED
        text = (f"correction: the terminal answered {outcome} after the bridge had "
                f"published {known.outcome} ({known.detail}); "
                + ("if the sale was charged again since, reverse one of the charges" if charged
                   else "nothing was charged by this request either way"))
        corrected = known.snapshot()
        corrected.outcome, corrected.source, corrected.response = outcome, "terminal", \
            answer.response
        corrected.detail, corrected.updated_at = text, now
        corrected.extra["corrected_from"] = known.outcome
        self.journal.save(corrected)
        # It did reach the terminal: a later NotFound about an earlier request is doubtful
        # again, as the journal's last_requests_sent now says too
        self.session.request_reached(known.category, known.sent_at, earlier_run=(
            self.journal.stamped_by_earlier_run(known.key, "sent_at", known.sent_at)))
        log.log(logging.ERROR if charged else logging.WARNING,
                "terminal %s: %s %s/%s answered %s by the terminal%s after the bridge had "
                "published %s: the register is sent the terminal's answer as a correction%s",
                self.poi_id, answer.category, answer.sale_id, answer.service_id, outcome,
                f" (its record, the answer to status request {answer.found_by})"
                if answer.found_by else "", known.outcome,
                "; if the sale was charged again since, reverse one of the charges"
                if charged else " (nothing was charged by it)")
        self.outlet.progress(Progress(answer.sale_id, answer.service_id, self.poi_id,
                                      "corrected", text))
        self.outlet.deliver(Deliver(answer.sale_id, answer.service_id, self.poi_id,
                                    answer.category, outcome, "terminal",
                                    answer.response, text, corrects=known.outcome))

    def _log_result_later(self, result: Deliver) -> None:
        """Logged in the next loop pass, after this pass's commit (scheduled by its first
        write) has sent the result: the line (0.1-0.25 ms, with its redaction) is not on the
        result's way to the register. Driven without a loop (the intake's fuzz test), now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._log_result(result)
        else:
            loop.call_soon(self._log_result, result)

    def _log_result(self, result: Deliver) -> None:
        if result.logged:
            # The session logged that event itself, once, at its level (an abandoned one an
            # error): this line would say the same again. Not every `unresolved` is such (a
            # register's status request answered NotFound about a payment still open): the
            # others are told here, a warning, as the register is told "do not charge again"
            return
        level = logging.WARNING if result.outcome in ("error", "unresolved") else logging.INFO
        log.log(level, "terminal %s: %s %s/%s -> %s (%s)%s", self.poi_id, result.category,
                result.sale_id, result.service_id, result.outcome, result.source,
                f": {result.error}" if result.error else "")

    def _key_for(self, key_of: str | None) -> crypto.NexoKey | None:
        """The key a frame goes with: the one in use, or the key of the terminal `key_of` an
        identity check is asked with (DeviceIdentity.next_key): this terminal's own other
        key in a key rotation when it names this terminal."""
        if key_of is None:
            return self.key
        if key_of == self.poi_id:
            return self._other_key
        # (the key that terminal is sent with: in a key rotation, the one its device was
        # last heard with; then its other key, OTHER_KEY)
        poi_id, other = key_owner(key_of)
        owner = self.terminals.get(poi_id)
        if owner is None:
            return self.neighbours.get(poi_id)
        return next((key for key in owner.keys if key is not owner.key), owner.key) \
            if other else owner.key

    def _send(self, action: Send, payload: bytes, key: crypto.NexoKey | None) -> None:
        """A frame whose step is committed (run by journal.after_commit) goes out (sealed
        with `key`)."""
        self._last_sent_key = key
        if action.purpose == "request" and self.identity != "confirmed":
            self.sent_unconfirmed.add(TxKey(action.sale_id, action.service_id))
        self._framer_events(self.writer.queue(action, payload))
        self.counters["frames_out"] += 1
        self.writer.kick()
        self._rearm()  # the frame's ACK deadline (sent after the step's commit, not within it)

    # --- the link -----------------------------------------------------------------------------

    async def _link_loop(self) -> None:
        while not self._stopping:
            await self._enabled_event.wait()
            self._relinked.clear()
            self._retry_now.clear()
            if self._handed_over_by is not None:
                released, self._handed_over_by = self._handed_over_by, None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(released.wait(), RELINK_HANDOVER)
            try:
                transport = self._transport_factory(self.config.link)
            except TransportUnavailable as exc:
                log.error("terminal %s: %s", self.poi_id, exc)
                self._link_reason = str(exc)
                self._publish_state()
                await asyncio.sleep(self._backoff.next_delay())
                continue
            # Opening: a terminal followed here waits for this link to close. A new event for
            # each: one handed out earlier stays set, however soon this worker opens again
            self.link_closed = asyncio.Event()
            try:
                await transport.open()
            except LinkClosed as exc:
                await self._link_down(transport, exc.reason, opened=False)
                continue
            except Exception as exc:  # noqa: BLE001 - a driver error no transport foresaw
                # Whatever a driver raises while a device goes away must not end this loop:
                # the terminal would stay offline, silently, until the daemon restarts.
                log.debug("terminal %s: opening the link failed", self.poi_id, exc_info=exc)
                await self._link_down(transport, f"unexpected error opening the link: {exc!r}",
                                      opened=False)
                continue
            self._transport = transport
            self._retry_now.clear()  # (a plug-in seen while opening: this is it)
            self.framer.reset()
            self.writer.reset()
            # (a loss said at info, with its open payments, is followed by its "link up":
            # a technician reading at info saw the link lost and never back)
            log.log(logging.DEBUG if self._loss_at_debug else logging.INFO,
                    "terminal %s: link up on %s", self.poi_id, transport.describe())
            self._link_reason = ""
            self._key_refusals, self._turned_unheard = 0, False  # (another device, perhaps)
            self._apply(self.session.link_is_up(self._clock()))
            answers_before, opened_at = self._answers_in, time.monotonic()
            reason, failed = await self._run_link(transport)
            # A link a bug of ours ended soon backs off as one that never worked: frames_in
            # counts a frame before it is handled, and a bug met on every frame reopened it at
            # once, ~20 times a second, the terminal flipping online/offline on MQTT. One up
            # LINK_PROVEN_AFTER worked, bug or not: a bug met once per payment, or after
            # hours, must not wait at the backoff's cap (left there by a terminal that refused
            # connections a while) to reopen; one met on every frame reopens once a period.
            if time.monotonic() - opened_at >= LINK_PROVEN_AFTER \
                    or (not failed and self._answers_in > answers_before):
                # The link worked: losing it now is news, reopen quickly. One that opens and
                # drops at once (a TCP peer serving someone else, a terminal in its boot
                # loader) keeps backing off instead of being reopened ten times a second,
                # also when it says something first that is no terminal's answer (a proxy's
                # "busy": any frame used to count).
                self._backoff.reset()
            self.counters["reconnects"] += 1
            await self._link_down(transport, reason, opened=True)

    async def _link_down(self, transport: Transport, reason: str, *, opened: bool) -> None:
        try:
            await transport.close()
        except Exception as exc:  # noqa: BLE001 - as in opening: the link loop must go on
            log.warning("terminal %s: closing the link failed (%r); it is reopened all the "
                        "same. If it does not come back, unplug and replug the terminal",
                        self.poi_id, exc)
        self.link_closed.set()
        if opened:
            open_then = list(self.session.open.values())
            states = {txn.key: txn.state for txn in open_then}  # as the link dropped
            actions = self.session.link_is_down(reason, self._clock())
            # Only those still open after the session's step: a request never sent (waiting
            # for the identity check) has just been refused, and is not asked about.
            asked = [txn for txn in open_then if txn.key in self.session.open]
            unplugged = self._disabled_event.is_set()
            self._loss_counted = not self._losses_said.tell(
                "unplugged" if unplugged else "dropped", reason)
            # Unplugged, the hotplug monitor has warned already: this says what is kept. A
            # loss only counted (a flapping link) is said at debug, unless payments were open:
            # which ones, and what becomes of them, is still told
            level = (logging.INFO if asked else logging.DEBUG) if self._loss_counted \
                else logging.INFO if unplugged else logging.WARNING
            self._loss_at_debug = level == logging.DEBUG
            log.log(level, "terminal %s: link lost: %s; %s%s", self.poi_id, reason,
                    "waiting for it to be plugged back in" if unplugged else "reopening",
                    f"; open: {describe_transactions(asked, states=states)}, asked about "
                    "by status poll once it is back, never sent again" if asked else "")
            self._link_reason = reason
            # Whatever is plugged in next must say who it is again (the session asks it).
            self.identity = "unknown"
            self._apply(actions)
        elif reason != self._link_reason:
            # (reopening after a loss only counted: part of the flapping the summary says)
            log.log(logging.DEBUG if self._loss_counted else logging.WARNING,
                    "terminal %s: cannot open link: %s; retrying", self.poi_id, reason)
            self._link_reason = reason
            self._publish_state()
        if not self._stopping:
            with contextlib.suppress(TimeoutError):  # a relink or a plug-in: at once
                await asyncio.wait_for(self._retry_now.wait(), self._backoff.next_delay())

    def _losses_summed(self, key: Any, count: int, last: Any, interval: float) -> None:
        """The summary of a flapping link's losses after the first (quiet.LINK_LOSSES_QUIET)."""
        # (summed up: what the link does next is said again)
        self._loss_counted = self._loss_at_debug = False
        if key == "unplugged":
            return  # (the hotplug monitor sums up the unplugs, naming the device)
        check = ("the network between them (cable, switch port, Wi-Fi) and the terminal's "
                 "power" if self.config.link.kind == "tcp" else
                 "the cable and the adapter, plugged firmly at both ends, and the terminal's "
                 "power supply")
        log.warning("terminal %s: link lost %d more %s in the last %s (the last: %s): a "
                    "loose cable or adapter, or a terminal restarting? Check %s; %s",
                    self.poi_id, count, "time" if count == 1 else "times",
                    quiet.window(interval), last, check,
                    f"{'online' if self.online else f'offline ({self._link_reason})'} "
                    f"{'as the bridge stops' if self._stopping else 'now'}")

    async def _run_link(self, transport: Transport) -> tuple[str, bool]:
        """Until the link ends: why it did, and whether a failure of ours (a bug) ended it."""
        reader = asyncio.create_task(self._read_loop(transport), name=f"read {self.poi_id}")
        writer = asyncio.create_task(self.writer.run(transport), name=f"write {self.poi_id}")
        unplugged = asyncio.create_task(self._disabled_event.wait())
        relinked = asyncio.create_task(self._relinked.wait())
        tasks = {reader, writer, unplugged, relinked}
        done: set[asyncio.Task[Any]] = set()
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                # (a finished task's exception is judged below: re-raised here, it ended the
                # link loop unseen, the terminal left "online" with nobody reading it)
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            # A bug met by a task while it was cancelled (serial: also one its receiver met
            # just before, see SerialTransport.deliver) has nobody else to tell, and is a bug
            # of this link: counted as one, or the same bug logged its traceback every time
            met_while_cancelled = [exc for exc in map(_bug_of, tasks - done) if exc is not None]
            for exc in met_while_cancelled:
                self._link_task_failed(exc)
        # Every bug of a finished task is logged, and is what ended the link: a LinkClosed
        # of the same pass (the reader's, the writer failing beside it) would hide it
        failures = [exc for exc in map(_bug_of, done) if exc is not None]
        for exc in failures:
            self._link_task_failed(exc)
        if failures:
            return f"internal error: {failures[0]!r}", True
        failed = bool(met_while_cancelled)
        cancelled = [task for task in done if task.cancelled() and task in (reader, writer)]
        if cancelled:  # (nobody asks for that but this function: a bug, the link reopened)
            log.error("terminal %s: the link's %s task ended cancelled, nobody having asked: "
                      "the link is reopened", self.poi_id, cancelled[0].get_name())
            return "internal error: a link task ended cancelled", True
        for task in done:
            if task.cancelled():
                continue
            exc = task.exception()
            if isinstance(exc, LinkClosed):
                return exc.reason, failed
        if relinked in done:
            return "its link changed (terminals found on each other's links)", failed
        return "device unplugged", failed

    def _link_task_failed(self, exc: BaseException) -> None:
        self._log_bug("link task failed", exc)

    def _log_bug(self, what: str, exc: BaseException, advice: str = "") -> None:
        """Its traceback the first time, and again once FAILURE_NEWS_AFTER has passed since
        it was last shown; the same failure meanwhile (a bug met on every frame, each reopen,
        each deadline) in one line, counted: the technician sees the bug, and the log is not
        flooded with copies of it. By time, not by what happened between: a bug met at the
        end of every link, or once per payment, came with a traceback each time when a link
        that worked, or a timer step that did, made it news again (review rv15)."""
        where = tuple((frame.f_code.co_filename, line)
                      for frame, line in traceback.walk_tb(exc.__traceback__))
        key = (type(exc), where)
        now = time.monotonic()
        seen, shown = self._bugs_seen.get(key, (0, now))
        seen += 1
        news = seen == 1 or now - shown >= FAILURE_NEWS_AFTER
        self._bugs_seen[key] = (seen, now if news else shown)
        if news:
            log.error("terminal %s: %s%s%s", self.poi_id, what,
                      f" ({seen} times now)" if seen > 1 else "", advice, exc_info=exc)
        else:
            log.error("terminal %s: %s again, as before (%d times now, its traceback logged "
                      "when it was last shown): %r%s", self.poi_id, what, seen, exc, advice)

    async def _read_loop(self, transport: Transport) -> None:
        """Until the link ends: the transport hands each read to _bytes_read (serial: from
        the loop's read callback, without a task step per read)."""
        self._framer_due = self.framer.next_deadline()
        await transport.deliver(self._bytes_read)

    def _bytes_read(self, data: bytes) -> None:
        # At 115200 baud a frame arrives in many small reads: most of them only feed the
        # framer, so wake the writer and move the timer only when something changed.
        try:
            self._framer_events(self.framer.receive_data(data, time.monotonic()))
        except Exception:
            # The link task fails and the link is reopened; till then another kick (the resend
            # timer's, a commit's) would send what the framer queued while reading, the ACK of
            # the frame whose handling failed among it: the terminal forgets an answer it saw
            # ACKed, one the bridge never recorded. Nothing of it goes out.
            self.writer.drop_unsent()
            raise
        if self.framer.has_data_to_send:
            # the ACK/NAK the framer queued goes out via the writer, once the answer it
            # acknowledges is journaled: the terminal may forget an answer it saw ACKed
            self.journal.after_commit(self.writer.kick)
        due = self.framer.next_deadline()
        if due != self._framer_due:  # e.g. a stalled frame's deadline
            self._framer_due = due
            self._rearm()

    def _oversize(self, event: FramingError) -> None:
        """A frame too big to keep (or noise that looked like one): if it was an answer, the
        session asks about it, without receipts (see TerminalSession.oversize). Every one is
        told to the session: one soon after another may be a new answer (a payment's, its
        ACK lost, that the framer would otherwise write again); only the warning is quiet."""
        limit = self.framer.max_frame_size
        if not self._oversize_said.tell("oversize"):
            log.debug("terminal %s: another oversize frame dropped (%s)", self.poi_id,
                      event.reason)
        else:
            log.warning("terminal %s: dropped a frame over max_frame_size (%d bytes) unread (%s): "
                        "if it was an answer, it is asked about by status poll, without receipts; "
                        "if this repeats, raise [terminals.framer] max_frame_size", self.poi_id,
                        limit, event.reason)
        waiting = self.session.awaiting_answer()
        self._apply_answer(waiting, self.session.oversize(
            f"the terminal sent a frame over max_frame_size ({limit} bytes), dropped unread",
            self._clock()))

    def _framer_events(self, events: list[Any]) -> None:
        # Line noise is summed and told once per run of it (at most once per read between
        # frames): garbage can make an error every few bytes, and a line and a session call
        # for each stalled the loop every terminal shares (seconds for a few MiB).
        # Likewise oversize frames: the first of a read is told (a line, the session asked
        # about what waits), the others of the same read only counted: noise can make an
        # oversize report every few bytes, and a session call for each stalled the loop
        # (2 s per 64 KiB read). One read rarely holds two answers that large.
        noise: list[FramingError] = []
        oversize_told = False
        oversize_more = 0
        for event in events:
            if isinstance(event, FramingError) and not event.reason.startswith("oversize frame"):
                noise.append(event)
                continue
            if noise:
                self._line_noise(noise)
                noise = []
            if isinstance(event, FrameReceived):
                self.counters["frames_in"] += 1
                self._on_frame(event.payload)
            elif isinstance(event, FramingError):
                self.counters["framing_errors"] += 1
                if oversize_told:
                    oversize_more += 1
                else:
                    oversize_told = True
                    self._oversize(event)
            elif isinstance(event, FrameResent):
                self.writer.resent(event)
            elif isinstance(event, FrameFailed):
                self.writer.failed(event)
            elif isinstance(event, FrameSent):
                # acknowledged by the terminal: an abort is answered now
                self.writer.acknowledged(event)
        if noise:
            self._line_noise(noise)
        if oversize_more:
            log.debug("terminal %s: %d more oversize frames dropped in the same read",
                      self.poi_id, oversize_more)

    def _line_noise(self, noise: list[FramingError]) -> None:
        """Errors in a row that are not oversize frames, counted and told as one."""
        self.counters["framing_errors"] += len(noise)
        dropped = sum(event.discarded for event in noise)
        self.counters["noise_bytes"] += dropped
        more = f" and {len(noise) - 1} more errors" if len(noise) > 1 else ""
        if self._noise_said.tell("noise"):
            # (a byte or two as a cable is plugged in is common: info, not a warning)
            log.info("terminal %s: %d bytes on its line were no frame (%s%s), dropped; if "
                     "this goes on, check the baud rate, the framer and the cable",
                     self.poi_id, dropped, noise[0].reason, more)
        else:
            self._noise_unsaid += dropped
            log.debug("terminal %s: line noise: %s%s (%d bytes dropped)", self.poi_id,
                      noise[0].reason, more, dropped)
        self.session.line_noise(dropped)  # (said if the identity check fails)

    def _noise_summed(self, key: Any, count: int, last: Any, interval: float) -> None:
        """Line noise that went on after its first run was said (quiet.LINK_LOSSES_QUIET)."""
        dropped, self._noise_unsaid = self._noise_unsaid, 0
        log.warning("terminal %s: line noise goes on: %d more bytes that were no frame in the "
                    "last %s (%d frames read since the daemon started): a wrong baud rate or "
                    "framer, a damaged cable, or another device on the port? Payments on it "
                    "may fail", self.poi_id, dropped, quiet.window(interval),
                    self.counters["frames_in"])

    def _on_frame(self, payload: bytes) -> None:
        now = self._clock()
        waiting = self.session.awaiting_answer()
        try:
            document = load_json(payload, max_size=self.framer.max_frame_size)
        except MessageError as exc:
            self._apply_answer(waiting, self.session.unusable(f"frame is not JSON: {exc}", now))
            return
        problem = crypto.terminal_crypto_error(document)
        if problem is not None:
            then = self._refused_under_key(now)
            self._apply_answer(waiting, self.session.refused(
                f"terminal {self.poi_id} cannot decrypt our message ({problem}); {then}", now))
            return
        if self.key is not None and not crypto.is_encrypted(document):
            # With a key configured only what the key authenticates is believed: anyone who
            # can write to the link (a terminal's LAN port, a tapped cable) could otherwise
            # forge an approval in clear. A payment is then asked about, as for garbage.
            self._apply_answer(waiting, self.session.unusable(
                f"terminal {self.poi_id} sent a message in clear although key "
                f"{self.key.identifier} v{self.key.version} is configured for it: not trusted "
                f"(its encryption switched off, or a message not from the terminal)"
                f"{self._swap_hint()}", now))
            return
        read_with: crypto.NexoKey | None = None  # (in clear)
        if crypto.is_encrypted(document):
            if self.key is None:
                message = self._another_terminals_message(document)
                if message is not None:
                    self._take(message, now)
                    return
                self._apply_answer(waiting, self.session.unusable(
                    "terminal sent an encrypted message but no key is configured for it"
                    f"{self._swap_hint()}", now))
                return
            read_with = crypto.key_named(document, self.keys) or self.key
            try:
                document = crypto.decrypt_message(document, read_with)
            except crypto.CryptoError as exc:
                message = self._another_terminals_message(document)
                if message is not None:
                    self._take(message, now)
                    return
                # The terminal acted on our request and answered: only we cannot read it. For
                # a payment that is no outcome, so it is asked about, never ended as an error.
                # Why it failed (bad padding, or an HMAC that does not verify) goes to our log
                # only: the session's text is journaled and published to registers, and the
                # Nonce is the sender's, XORed into the CBC IV, so telling the two apart there
                # would be a padding oracle for anyone on the link who reads a register's topics.
                which = f"key {read_with.identifier} v{read_with.version}"
                log.warning("terminal %s: its answer does not decrypt or verify with %s: %s",
                            self.poi_id, which, exc)
                self._apply_answer(waiting, self.session.unreadable(
                    f"cannot decrypt or verify the terminal's answer with {which}: check the "
                    f"key configured for this terminal{self._swap_hint()}", now))
                return
        try:
            message = parse_message(document)
        except MessageError as exc:
            self._apply_answer(waiting,
                               self.session.unusable(f"not a SaleToPOI message: {exc}", now))
            return
        forged = self._not_its_encryption(message, read_with)
        if forged is not None:
            self._apply_answer(waiting, self.session.unusable(forged, now))
            return
        header = message.message_header
        if read_with is not None and header is not None and header.poi_id == self.poi_id:
            # (its own message only: a neighbour's under a key this terminal shares in a
            # rotation says nothing of which key this terminal holds, a review)
            self._heard(read_with)
        self._take(message, now)

    def _refused_under_key(self, now: float) -> str:
        """The terminal refused a message with a crypto error: what to do about it, for the
        refusal's text. In a key rotation, the key in use is turned to the other one when
        such errors answer two frames of ours under it in a row: the terminal may have taken
        up the other key since. Only answers to frames of ours under the key in use count:
        the error is not authenticated, and a stray one (anyone on the line may write it)
        must not turn the bridge (reviews); nor one alone: a copy damaged on the line in a
        way its check byte missed is refused so too (the soak); nor while the device has
        named another terminal, nor during an identity check, which tries the keys itself
        (see the neighbours setter). Another terminal's device not named yet may turn it
        meanwhile, harmlessly: the key the state document shows is the one the terminal's
        own messages came with (_heard), and its next message under the key it holds turns
        it back. This is for what an identity check does not settle: status polls to a
        device left unnamed (the soak: a check's answer lost on the line left a terminal
        polled under the key it no longer held, its charged payment unresolved for good)."""
        key = f"key {self.key.identifier} v{self.key.version}" if self.key else "no key"
        if len(self.keys) > 1 and not self.identity.startswith("mismatch") \
                and self.session.identity.check is None \
                and not self.session.identity.stray_refusal_pending(now) \
                and self._last_sent_key is self.key and self.session.expects_answer():
            self._key_refusals += 1
        if self._key_refusals < KEY_REFUSALS_BEFORE_SWITCHING:
            return f"check the encryption key configured for it ({key}){self._swap_hint()}"
        self._key_refusals = 0
        other = self._other_key
        self._use_key(other, f"it could not decrypt a message sent with {key}")
        return (f"sent with {key}; the bridge sends with its other key, "
                f"{other.identifier} v{other.version}, from now")

    @property
    def _other_key(self) -> crypto.NexoKey | None:
        """In a key rotation, the terminal's key not in use (else the one in use)."""
        return next((key for key in self.keys if key is not self.key), self.key)

    def _not_its_encryption(self, message: Any, read_with: crypto.NexoKey | None) -> str | None:
        """Why a message read with this terminal's own settings (its key, or in clear) is not
        to be believed when it names another configured terminal with other settings: it
        would be taken as that terminal's word (its payment's outcome, a reason to follow
        it here), so anyone who can write to this link could forge an approval for a
        terminal whose key they do not hold (a review). A message of the other terminal's
        own device is read with its key (_another_terminals_message). None when it may be
        believed. `read_with`: the key it was read with (None: in clear)."""
        header = message.message_header
        said = header.poi_id if header is not None else None
        owner = self.terminals.get(said) if said and said != self.poi_id else None
        if owner is None or (any(crypto.same_key(read_with, key) for key in owner.keys)
                             if owner.keys else read_with is None):
            return None
        read = (f"authenticated by key {read_with.identifier} v{read_with.version} of "
                f"{self.poi_id}" if read_with is not None else "in clear")
        theirs = (f"key {owner.key.identifier} v{owner.key.version} is configured for it"
                  if owner.key is not None else "no key is configured for it")
        return (f"the device on this link sent a message naming terminal {said}, {read}, but "
                f"{theirs}: not trusted as {said}'s (a message not from {said}, or {said}'s "
                f"device set up with other encryption settings than configured); check which "
                f"device is on this link and the keys configured")

    def _take(self, message: Any, now: float) -> None:
        followed = self._check_identity(message)
        if not self.session.asked_for(message):
            owner = followed or self._its_terminal(message)
            if owner is not None:
                owner.receive_from_elsewhere(message)  # its own: not dropped here (ACKed)
                return
        header = message.message_header
        if isinstance(message, SaleToPOIResponse):
            self._answers_in += 1  # the link works (see _link_loop)
        if isinstance(message, SaleToPOIResponse) and header is not None and header.sale_id \
                and header.service_id:
            # An answer to the frame awaiting its ACK: that frame is delivered, not sent again
            # (a response only: a link that echoes our own bytes hands back the request)
            self._framer_events(self.writer.answered(TxKey(header.sale_id, header.service_id)))
        self._apply(self.session.receive(message, now))

    def _apply_answer(self, waiting: TxKey | None, actions: list[Action]) -> None:
        """Apply the session's `actions` for a frame from the terminal. `waiting`: the
        request that waited for its answer before (TerminalSession.awaiting_answer). If the
        session took the frame as that answer although it cannot read it (it does not
        decrypt, is over max_frame_size, is not JSON or no SaleToPOI message), the request's
        frame reached the terminal, whatever became of its ACK: it is not sent again (a
        payment would reach the terminal twice; the session asks about it by status poll
        instead). A message read in full counts only as a response under the frame's IDs
        (_take): a request handed back by a link that echoes is no answer."""
        if waiting is not None and self.session.awaiting_answer() != waiting:
            self._framer_events(self.writer.answered(waiting))
        self._apply(actions)

    def _its_terminal(self, message: Any) -> TerminalWorker | None:
        """The other terminal a message on this link names, when its device may be here: one
        of this link's kind that its own link has not confirmed. Its message is handed to it
        whether or not the two are followed yet (following may wait for its own link to
        answer) and after, until this link moves: a payment answer among them is its
        outcome. A terminal confirmed on its own link keeps to it (two devices say they are
        it: this one is not believed)."""
        header = message.message_header
        said = header.poi_id if header is not None else None
        if not said or said == self.poi_id or said not in self.neighbours:
            return None
        owner = self.terminals.get(said)
        return owner if owner is not None and owner.identity != "confirmed" else None

    def _another_terminals_message(self, document: Any) -> Any:
        """The message, if `document` is encrypted with the key of another terminal that
        could be on this link and names that terminal: its cable is in this terminal's port
        (the terminals use different keys). Authenticated by that key, it is as good as the
        terminal's word, and it is followed or reported like any wrong device's message."""
        for poi_id, configured in self.neighbours.items():
            owner = self.terminals.get(poi_id)
            # (every key of that terminal: in a key rotation its device may hold either)
            key = crypto.key_named(document, owner.keys if owner is not None else
                                   [configured] if configured is not None else [])
            if key is None or any(crypto.same_key(key, own) for own in self.keys):
                continue
            try:
                message = parse_message(crypto.decrypt_message(document, key))
            except (crypto.CryptoError, MessageError):
                continue
            header = message.message_header
            if header is not None and header.poi_id == poi_id:
                return message
        return None

    def _use_key(self, key: crypto.NexoKey, why: str) -> None:
        """From now on frames to the terminal go with `key`, its other key in a key rotation
        (previous_key): the one it uses, as its messages or its crypto errors show."""
        # (said once until the terminal is heard: behind a device that names nobody, the
        # key may turn back and forth every two refusals, a review)
        log.log(logging.DEBUG if self._turned_unheard else logging.INFO,
                "terminal %s: the bridge now sends with key %s v%d (%s): the terminal's key "
                "settings were changed, a key rotation under way? Once every terminal uses "
                "the new key, remove previous_key from the configuration", self.poi_id,
                key.identifier, key.version, why)
        self._turned_unheard = True
        self.key = key

    def _heard(self, key: crypto.NexoKey) -> None:
        """An authenticated message of this terminal's came under `key`: it holds that key.
        Frames go with it from now on, and the state document says so."""
        self._key_refusals = 0
        self._turned_unheard = False
        if key is not self.key:
            self._use_key(key, "its messages come with it")
        if key is not self._heard_key:
            self._heard_key = key
            self._publish_state()

    def _swap_hint(self) -> str:
        """For an answer this terminal's encryption settings cannot read: the device on the
        link may be another terminal, set up with another key (or none)."""
        others = [poi_id for poi_id, key in self.neighbours.items()
                  if not crypto.same_key(key, self.key)]
        if not others:
            return ""
        return (f"; or the device on this link is another terminal with other encryption "
                f"settings ({', '.join(sorted(others)[:3])}"
                f"{', ...' if len(others) > 3 else ''}): check which terminal is plugged in")

    def receive_from_elsewhere(self, message: Any) -> None:
        """A message of this terminal's device, read on another terminal's link just before
        the daemon followed them (see TerminalSession.receive_from_elsewhere)."""
        log.info("terminal %s: its message read on another link before following it there "
                 "is taken as its own", self.poi_id)
        self._apply(self.session.receive_from_elsewhere(message, self._clock()))

    def _check_identity(self, message: Any) -> TerminalWorker | None:
        """Every message a terminal sends names it (POIID): the configuration is confirmed by
        the terminal itself, and a terminal on the wrong port is reported, not ignored.
        Returns the worker of the terminal that sent it when the daemon follows it here."""
        header = message.message_header
        said = header.poi_id if header is not None else None
        if not said or said in ("N/A", "-NULL-"):
            return None
        self.session.terminal_named(said, self._clock())
        if said == self.poi_id:
            if self.identity != "confirmed":
                log.info("terminal %s: identity confirmed by the terminal", self.poi_id)
                self.identity = "confirmed"
                self._publish_state()
        elif self.identity != f"mismatch: {said}":
            self.identity = f"mismatch: {said}"
            self._cancel_grace()  # an earlier mismatch's: this one decides
            decided = self.on_wrong_device(self.poi_id, said) if self.on_wrong_device else None
            if isinstance(decided, TerminalWorker):
                self._publish_state()
                return decided  # followed: the daemon has said so
            if decided == FOLLOW_LATER:
                # Swapped cables: most often the other link says who is there a moment later
                # and both are followed. An error meanwhile would send a technician after a
                # swap the daemon handles; it is said if the device is still here then.
                loop = asyncio.get_running_loop()
                self._grace_timer = loop.call_later(FOLLOW_GRACE, self._grace_over, said,
                                                    loop.time(), False)
            else:
                self._report_wrong_device(said)
            self._publish_state()
        return None

    def _cancel_grace(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None

    def _grace_over(self, said: str, heard: float, warned: bool) -> None:
        """FOLLOW_GRACE s after the device here named `said` (at `heard`, loop time), or
        after the last time this was asked: the wrong device is reported, unless following
        still waits for `said`'s own link (then it is asked again later). It used to be
        reported after FOLLOW_GRACE whatever: on a stalled CPU `said`'s link had not spoken
        yet, and the error sent a technician after a swap the daemon followed a moment
        later."""
        self._grace_timer = None
        if not self._still_wrong(said):
            return
        if self.follow_waits is None or not self.follow_waits(self.poi_id, said):
            self._report_wrong_device(said)
            return
        loop = asyncio.get_running_loop()
        other = self.terminals.get(said, self)  # (said's identity check is what is waited for)
        if not warned and loop.time() - heard >= FOLLOW_PATIENCE * other.config.status_timeout:
            # (not the error: the daemon may still follow them once that link has spoken)
            warned = True
            log.warning("terminal %s: the device at %s says it is %s, and %s's own link has "
                        "not said in %.0f s which terminal is there: requests for %s are "
                        "refused meanwhile; the two are followed to each other's links, or "
                        "this is reported, once it has. If this lasts, check the device on "
                        "%s's link", self.poi_id, self._where(), said, said,
                        loop.time() - heard, self.poi_id, said)
        self._grace_timer = loop.call_later(FOLLOW_GRACE, self._grace_over, said, heard,
                                            warned)

    def _still_wrong(self, said: str) -> bool:
        """Whether the device here still names `said` and the wrong device is to be reported:
        not once followed, the link dropped, or the worker or the daemon stops."""
        return not (self._stopping or self._daemon_stopping
                    or self.identity != f"mismatch: {said}")

    def _where(self) -> str:
        return self._transport.describe() if self._transport else "?"

    def _report_wrong_device(self, said: str) -> None:
        self._grace_timer = None
        if not self._still_wrong(said):
            return
        log.error("terminal %s: the device at %s says it is %s: nothing is sent to it "
                  "(requests for %s are refused, status polls wait) until this is fixed; "
                  "check which terminal is plugged into which port, or the configuration, "
                  "then replug", self.poi_id, self._where(), said, self.poi_id)

    # --- timers -------------------------------------------------------------------------------

    def _rearm(self) -> None:
        """One loop timer for the earliest of the session's and the framer's deadlines, moved
        only when that deadline changed: cheaper than a task woken after every step."""
        if self._stopping or not self._started:
            return
        session_due = self.session.next_deadline()
        framer_due = self.framer.next_deadline() if self.online else None
        delay = MAX_TIMER_SLEEP
        if session_due is not None:
            delay = min(delay, session_due - self._clock())
        if framer_due is not None:
            delay = min(delay, framer_due - time.monotonic())
        loop = asyncio.get_running_loop()
        when = max(loop.time() + max(0.0, delay), self._timer_paused_until)
        timer = self._timer
        if timer is not None:
            if abs(timer.when() - when) < TIMER_SLACK:
                return
            timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        try:
            framer_due = self.framer.next_deadline() if self.online else None
            if framer_due is not None and framer_due <= time.monotonic():
                self._framer_events(self.framer.handle_timeout(time.monotonic()))
                # (a retransmission; the framer may hold an ACK waiting for a commit too)
                self.journal.after_commit(self.writer.kick)
            due = self.session.next_deadline()
            if due is not None and due <= self._clock():
                self._apply(self.session.tick(self._clock()))
        except Exception as exc:  # a timer must never die: the next deadline still has to fire
            # ... but not at once: the deadline that failed is still past. Paused, doubling,
            # the loop serves every other terminal meanwhile, and this one's deadlines (status
            # polls, ACK timeouts) are tried again, late, in case the bug was a passing one.
            self._log_bug("timer step failed", exc,
                          "; its deadlines (status polls, ACK timeouts) are tried again after "
                          "a pause. A bug of the bridge: report it with this log")
            self._timer_paused_until = asyncio.get_running_loop().time() \
                + self._timer_backoff.next_delay()
        else:
            if self._timer_paused_until:
                self._timer_paused_until = 0.0
                self._timer_backoff.reset()
        finally:
            self._rearm()

    def _publish_state(self) -> None:
        self.outlet.terminal_state(self.poi_id, self.state())
        if self.on_state is not None:
            self.on_state(self.poi_id)


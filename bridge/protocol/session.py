"""The per-terminal state machine: the seed's timeout-then-status-poll loop, without I/O.

A `TerminalSession` is fed events (a register's request, a message from the terminal, the
link going up or down, a frame the link could not deliver, the passing of time) and answers
with actions for the shell to carry out *in order*: `Record` (commit to the journal), `Send`
(write to the terminal), `Deliver` (a result for a register), `Progress` (an event for the
cashier's screen), `Log` (a line for the technician). A `Record` always comes before the
`Send` or `Deliver` that depends on it, so a crash between the two never loses a request
whose bytes went out, nor a result that was reported.

Rules (from the seed and REFERENCE.md section 2):
- one transaction at a time per terminal; another request meanwhile is refused with Busy,
  except Abort and TransactionStatus, which pass straight through (passthrough.py: what
  is done with them and with their answers);
- no answer within payment_timeout, a lost link, a frame the link could not deliver or an
  unusable answer: ask the terminal with a TransactionStatusRequest (fresh ServiceID);
- InProgress or Busy: ask again after a small floor, up to in_progress_limit from the
  request; Success: the outcome is in RepeatedMessageResponse; NotFound: final, the
  terminal never got it, unless another request of that category went to it since (it may
  remember only its latest: the outcome then stays unknown);
- after resync_attempts polls without a usable answer (not before payment_timeout), or
  InProgress past in_progress_limit, report `unresolved` and keep polling in the
  background with capped exponential backoff until reconcile_deadline;
- never re-send a request whose outcome is unknown;
- a newly opened link may hold another terminal (a swapped cable, ports renumbered): before
  anything else goes out on it, the device is asked who it is (a DiagnosisRequest; every
  answer carries its POIID; identity.py). A device that names another terminal gets no
  request and no status poll: a poll answered "NotFound" by the wrong device would end a
  payment that the right one charged as `not_found`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bridge.protocol import builders, passthrough
from bridge.protocol.actions import Action, Deliver, Log, Progress, Record, Send, Unmatched
from bridge.protocol.identity import BRIDGE_SALE_ID, DeviceIdentity
from bridge.protocol.messages import (
    Message,
    MessageHeader,
    SaleToPOIRequest,
    SaleToPOIResponse,
)
from bridge.protocol.outcome import (FINAL_MONEY_OUTCOMES, MONEY_CATEGORIES, Classification,
                                     Outcome, amounts_read, classify, payment_amounts,
                                     unresolved_error)
from bridge.protocol.status_answers import StatusAnswers
from bridge.protocol.transaction import Transaction, TxKey, TxState, trim_refused

@dataclass(frozen=True, slots=True)
class SessionSettings:
    payment_timeout: float = 120.0
    status_timeout: float = 30.0
    resync_attempts: int = 2
    poll_floor: float = 1.0  # least pause between two polls, against hot loops
    reconcile_initial: float = 10.0
    reconcile_max_interval: float = 600.0
    reconcile_deadline: float = 24 * 3600.0
    in_progress_limit: float = 600.0  # the longest a register waits while "in progress"


@dataclass(slots=True)
class _Probe:
    key: TxKey
    poll_id: str
    deadline: float


class TerminalSession(StatusAnswers):
    """Everything the bridge knows about one terminal's transactions, as a state machine."""

    def __init__(
        self,
        poi_id: str,
        settings: SessionSettings | None = None,
        new_service_id: Callable[[], str] = builders.new_service_id,
    ) -> None:
        self.poi_id = poi_id
        self.settings = settings or SessionSettings()
        self._new_service_id = new_service_id
        self.open: dict[TxKey, Transaction] = {}  # every transaction not yet final
        self.active: TxKey | None = None  # the one that owns the terminal
        self.link_up = False
        self.identity = DeviceIdentity(poi_id)  # which terminal is on the link (identity.py)
        self._probe: _Probe | None = None  # the one status poll on the wire
        self._poll_index: dict[str, TxKey] = {}
        # When a request of each category last went to this terminal (this run, and what the
        # journal held at restore): a terminal may remember only its latest request of a
        # category, so its NotFound about an earlier one proves nothing (see _status_answer).
        self.last_request_at: dict[str, float] = {}
        # The request sent last, and its category's last_request_at before it (not_writable)
        self._request_sent_before: tuple[TxKey, float | None] | None = None
        # Times an earlier run stamped (restored transactions', the journal's last requests):
        # right when they were written, they stay when this run's clock follows a step.
        self._earlier_stamps: set[float] = set()
        # When this run took the journal's open transactions over (restore): every request an
        # earlier run stamped went out before it, whatever its stamp says against this run's
        # clock (see _sent_or_recorded). A time of this run: it follows a clock step.
        self._restored_at: float | None = None
        # Bytes that came on the link as no frame while an identity check was on the wire
        # (the check's ServiceID, and how many): see line_noise
        self._noise_in_check: tuple[str, int] = ("", 0)

    # --- queries ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.active is not None

    @property
    def named(self) -> bool:
        """The device on this link has said who it is."""
        return self.identity.named

    @property
    def wrong_device(self) -> str | None:
        """The POIID the device on this link gave when it is not this terminal's: nothing
        is sent to it (requests are refused, polls wait)."""
        return self.identity.wrong_device

    @wrong_device.setter
    def wrong_device(self, poi_id: str | None) -> None:
        self.identity.wrong_device = poi_id

    @property
    def following(self) -> bool:
        """The daemon follows this terminal to another link (the device here said it is
        another configured terminal): what is refused meanwhile says so."""
        return self.identity.following

    @following.setter
    def following(self, value: bool) -> None:
        self.identity.following = value

    def next_deadline(self) -> float | None:
        times = [t.deadline for t in self.open.values() if t.deadline is not None]
        times += [t.next_poll_at for t in self.open.values() if t.next_poll_at is not None]
        if self._probe is not None:
            times.append(self._probe.deadline)
        if self.identity.check is not None:
            times.append(self.identity.check.deadline)
        if self.wrong_device is not None and self.identity.recheck_at is not None:
            times.append(self.identity.recheck_at)
        return min(times, default=None)

    # --- events -------------------------------------------------------------------------------

    def submit(
        self, request: SaleToPOIRequest, document: dict[str, Any], digest: str, now: float,
        asked_amounts: dict[str, Any] | None = None,
    ) -> list[Action]:
        """A register's request, already validated and checked for ServiceID reuse. For a
        status request about a Payment the journal holds, `asked_amounts` is that payment's
        AmountsReq (payment_amounts), read against the terminal's record."""
        header = request.message_header
        assert header is not None and header.sale_id and header.service_id
        category = str(header.message_category)
        txn = Transaction(
            sale_id=header.sale_id, service_id=header.service_id, poi_id=self.poi_id,
            category=category, request=document, digest=digest, created_at=now,
            updated_at=now, passthrough=category in passthrough.PASSTHROUGH_CATEGORIES,
        )
        if asked_amounts is not None:
            txn.extra["asked_amounts"] = asked_amounts
        if not self.link_up:
            return self._refuse(txn, header, "UnavailableDevice",
                                f"terminal {self.poi_id} is offline; nothing was sent: retry "
                                "with a new ServiceID once it is back online", now)
        if self.wrong_device is not None:
            return self._refuse(txn, header, "UnavailableDevice",
                                self.identity.wrong_device_text(), now)
        if not txn.passthrough and self.active is not None:
            return self._refuse(txn, header, "Busy",
                                f"terminal {self.poi_id} is busy with transaction {self.active}; "
                                "nothing was sent: retry with a new ServiceID once it ends", now)
        if txn.passthrough:
            return passthrough.submit(self, txn, request, header, now)
        self.open[txn.key] = txn
        self.active = txn.key
        accepted = self._progress(txn, "accepted")
        if self._probe is not None or self.identity.check is not None:
            # A background status poll or the identity check is on the wire; the request goes
            # out when it is answered.
            return [Record(txn.snapshot()), accepted]
        if not self.named:
            # The device has not said who it is (its identity check went unanswered, or was
            # refused): the request waits for a check that names it, or is refused (_pump).
            return [Record(txn.snapshot()), accepted, *self._pump(now)]
        record, *rest = self._send_request(txn, now)
        return [record, accepted, *rest]

    def shift_times(self, delta: float) -> None:
        """The daemon's clock moved by `delta` to follow a step of the system clock: the
        times this run set move with it, so each deadline stays as far off as it was. Those
        of an earlier run (a restored payment's stamps, its last requests sent) were right
        and stay, as in the journal: moved, a restored payment's time-outs lay `delta`
        further off, and its request looked sent after this run's, so the terminal's
        NotFound about it was believed. Told apart by where they came from, not by their
        value: a box that starts with its clock behind stamps this run's payments before
        an earlier run's."""
        def moved(stamp: float) -> float:
            return stamp if stamp in self._earlier_stamps else stamp + delta

        for txn in self.open.values():
            txn.shift_times(delta, keep=self._earlier_stamps)
        for category, sent_at in self.last_request_at.items():  # compared with txns' sent_at
            self.last_request_at[category] = moved(sent_at)
        if self._restored_at is not None:
            self._restored_at += delta
        if self._request_sent_before is not None and self._request_sent_before[1] is not None:
            key, before = self._request_sent_before
            self._request_sent_before = (key, moved(before))
        if self._probe is not None:
            self._probe.deadline += delta
        self.identity.shift_times(delta)  # its check, recheck and stray refusals' deadlines

    def terminal_named(self, poi_id: str, now: float | None = None) -> None:
        """The device on the link said who it is: the POIID of a message it sent (the shell
        tells, before receive(), for every message that carries one, with the time). Another
        terminal's: it is asked again later (next_deadline), whatever the message was, an
        answer to our check or not."""
        self.identity.named_as(poi_id)
        if self.wrong_device is not None and now is not None \
                and self.identity.recheck_at is None:
            self.identity.recheck_at = now + self.identity.recheck_pause

    def asked_for(self, message: Message) -> bool:
        """Whether `message` answers something this session sent on its link (an identity
        check, a status poll): such an answer is ours whichever device sent it."""
        header = message.message_header
        service_id = header.service_id if header else None
        return service_id in self._poll_index or self.identity.answers_a_check(message)

    def receive_from_elsewhere(self, message: Message, now: float) -> list[Action]:
        """A message this terminal's device sent on another terminal's link, read there just
        before the daemon followed the two terminals (its frame showed the swap, and the
        device, which got its acknowledgement, will not send it again). It names this
        terminal, so it is taken as its own: a payment's answer among them is the outcome.
        It says nothing of the device on this session's link."""
        header = message.message_header
        return self._received(message, header.sale_id if header else None,
                              header.service_id if header else None, now, own_device=True)

    def receive(self, message: Message, now: float) -> list[Action]:
        """A message from the terminal."""
        header = message.message_header
        sale_id = header.sale_id if header else None
        service_id = header.service_id if header else None
        if sale_id == BRIDGE_SALE_ID and service_id in self.identity.sent_ids:
            return self._naming_answered(service_id, now)
        if sale_id == BRIDGE_SALE_ID and message.category == "Diagnosis":
            # Another session's identity check, answered on this link (terminals followed
            # to each other's links), or an earlier run's: nothing of ours, but its POIID
            # names the device as well as an answer to our own check would.
            note = Log("debug", f"terminal {self.poi_id}: an identity check's answer not "
                                f"ours ({service_id})")
            if self.named and self.identity.check is not None:
                self.identity.named_meanwhile(now + self.settings.status_timeout)
                return [note, *self._pump(now)]
            return [note]
        check_ended = self.identity.check is not None and self.named
        if check_ended:
            # Another message said who the device is first (an event rejecting the check,
            # an answer the terminal sends again after a restart): no need to wait on.
            self.identity.check = None
        if (self.wrong_device is not None or not self.named) and service_id in self._poll_index:
            actions = self._status_answer_from_a_device_not_named(message, service_id, now)
        else:
            actions = self._received(message, sale_id, service_id, now)
        return actions + self._pump(now) if check_ended else actions

    def _received(self, message: Message, sale_id: str | None, service_id: str | None,
                  now: float, *, own_device: bool = False) -> list[Action]:
        header = message.message_header
        classification = classify(message)
        if service_id is not None and service_id in self._poll_index:
            key = self._poll_index[service_id]
            txn = self.open.get(key)
            if self._probe is not None and self._probe.poll_id == service_id:
                self._probe = None
            if txn is None:
                return [Log("debug", f"late status answer {service_id} for finished {key}"),
                        *self._pump(now)]
            return self._polled_answer(txn, classification, message, now) + self._pump(now)
        if service_id is not None and sale_id is not None:
            txn = self.open.get(TxKey(sale_id, service_id))
            if txn is not None:
                return self._original_answer(txn, classification, message, now) + self._pump(now)
        probed = self._probe_named_by(message, classification, own_device)
        if probed is not None:
            self._probe = None
            return self._polled_answer(probed, classification, message, now) + self._pump(now)
        if classification.category == "Event" and self.active is not None:
            txn = self.open[self.active]
            if txn.state is TxState.AWAITING_RESPONSE:
                # An event (e.g. Reject) where the response was expected: not an outcome.
                return self._unusable_answer(txn, classification.detail, now) + self._pump(now)
        if (isinstance(message, SaleToPOIResponse) and sale_id and service_id
                and sale_id != BRIDGE_SALE_ID and not classification.from_status
                and (self.wrong_device is None or own_device)
                and classification.category in MONEY_CATEGORIES
                and classification.outcome in FINAL_MONEY_OUTCOMES):
            return [Unmatched(sale_id, service_id, classification.category,
                              classification.outcome.value, message.to_document(),
                              classification.detail)]
        what = f"{message.category or 'unknown'} message"
        ids = f"SaleID={sale_id} ServiceID={service_id}" if header else "no MessageHeader"
        return [Log("warning", f"terminal {self.poi_id}: ignored {what} that matches no open "
                               f"transaction ({ids}): {classification.detail}")]

    def unusable(self, reason: str, now: float) -> list[Action]:
        """The terminal sent something that is not a SaleToPOI message (garbage, a plain
        error document). It can only be about what we are waiting for, if anything."""
        txn = self._waiting_transaction()
        if txn is None:
            return [Log("warning", f"terminal {self.poi_id}: unusable message ignored: {reason}")]
        return self._unusable_answer(txn, reason, now) + self._pump(now)

    def unreadable(self, reason: str, now: float) -> list[Action]:
        """The terminal answered, but we cannot read it (it does not decrypt). As an answer
        to the identity check it ends the check (a device is there, and answers); otherwise
        it is an unusable answer: a payment is asked about, never ended."""
        if self.identity.check is not None:
            return self._check_key_failed(
                f"the answer to the identity check cannot be read: {reason}", now)
        return self.unusable(reason, now)

    def refused(self, reason: str, now: float) -> list[Action]:
        """The terminal could not process something we sent (it could not decrypt it, say).
        Its crypto error names no message, and a device may owe several (what another
        terminal's worker sent it before the two were followed, identity checks asked with
        other keys): so it ends an identity check on the wire or, late, one that timed out;
        a status poll that met it counts as unanswered; and a payment waiting for its answer
        is asked about, never ended, for the error may be another message's and the terminal
        may be charging it. Another request ends as an error naming the cause."""
        if self.identity.check is not None and self.named:
            # The device named itself meanwhile: this ends the check, and names nothing
            self.identity.check = None
            return [Log("debug", f"terminal {self.poi_id}: a crypto error, taken as the answer "
                                 "to the identity check (the device has named itself)"),
                    *self._pump(now)]
        if self.identity.check is not None:
            return self._check_key_failed(f"the terminal refused the identity check: {reason}",
                                          now)
        if self.identity.stray_refusal_expected(now):
            return [Log("debug", f"terminal {self.poi_id}: a crypto error, taken as the answer "
                                 "to an identity check asked with another terminal's key")]
        if self._probe is not None:
            txn = self.open.get(self._probe.key)
            self._probe = None
            if txn is not None:
                return self._poll_failed(txn, reason, now, retry_in=self.settings.status_timeout)
        txn = self._waiting_transaction()
        if txn is None:
            if self.link_up and not self.named and self.identity.asked:
                # The answer to an identity check that timed out: taken as if in time, so
                # the other terminals' keys are tried (the device may be one of them)
                return self._check_key_failed(
                    f"the terminal refused the identity check: {reason}", now)
            # (Most often one owed for what another worker sent the device before a follow)
            return [Log("warning", f"terminal {self.poi_id}: a crypto error that answers "
                                   f"nothing the bridge waits for: {reason}")]
        if not txn.passthrough and txn.category in MONEY_CATEGORIES:
            return self._unusable_answer(
                txn, f"a crypto error, which names no message ({reason})", now) + self._pump(now)
        return self._finish(txn, Outcome.ERROR, None, "terminal", now, error=reason) + self._pump(now)

    def oversize(self, reason: str, now: float) -> list[Action]:
        """The terminal sent a frame larger than max_frame_size: dropped unread. It may have
        been an answer (receipts with a signature image make them big): a payment waiting
        for its answer is asked about, a status poll's counts as unanswered, and the polls
        about that transaction no longer ask for receipts (ReceiptReprintFlag), which would
        make each of their answers too big as well."""
        if self._probe is not None:
            txn = self.open.get(self._probe.key)
            self._probe = None
            if txn is not None:
                txn.extra["answer_too_big"] = True
                return self._poll_failed(txn, reason, now, retry_in=self.settings.poll_floor)
        txn = self._waiting_transaction()
        if txn is None:
            # (info: the worker has warned, once in OVERSIZE_QUIET; a terminal sends its
            # unacknowledged frame again, and each copy comes here)
            return [Log("info", f"terminal {self.poi_id}: {reason}; nothing was waiting "
                                "for an answer")]
        txn.extra["answer_too_big"] = True
        return self._unusable_answer(txn, reason, now) + self._pump(now)

    def line_noise(self, discarded: int) -> None:
        """The shell's framer dropped `discarded` bytes that were no frame. A device that
        sends no frames at all (a scale on the port, a wrong baud rate or framer) shows
        first as an identity check unanswered: that warning says the bytes came."""
        check = self.identity.check
        if check is None:
            return
        service_id, count = self._noise_in_check
        self._noise_in_check = (check.service_id,
                                discarded + (count if service_id == check.service_id else 0))

    def _unnamed(self, reason: str) -> Log:
        """The identity check on the wire failed (see DeviceIdentity.unnamed), with the bytes
        that were no frame meanwhile, if any came."""
        check = self.identity.check
        service_id, count = self._noise_in_check
        if check is not None and service_id == check.service_id and count:
            reason += (f"; received {count} bytes that were no frame: wrong device, baud "
                       "rate or framer?")
        return self.identity.unnamed(reason)

    def link_is_up(self, now: float) -> list[Action]:
        self.link_up = True
        self.identity.new_device()
        for txn in self.open.values():
            if txn.state in (TxState.POLLING, TxState.UNRESOLVED) and txn.next_poll_at is not None:
                txn.next_poll_at = min(txn.next_poll_at, now)  # ask at once after a replug
        return self._pump(now)

    def link_is_down(self, reason: str, now: float) -> list[Action]:
        self.link_up = False
        moving = (self.identity.wrong_device_text()
                  if self.following and self.wrong_device else None)
        self.identity.new_device()  # whatever is plugged in next must say who it is again
        actions: list[Action] = []
        if self._probe is not None:
            txn = self.open.get(self._probe.key)
            self._probe = None
            if txn is not None:
                actions += self._poll_failed(txn, f"link lost: {reason}", now,
                                             retry_in=self.settings.status_timeout)
        for txn in list(self.open.values()):
            if txn.state is TxState.ACCEPTED:
                text = moving or (f"terminal {self.poi_id} went offline before the request "
                                  "was sent; nothing was charged, retry with a new ServiceID")
                # A refusal answers in a terminal's failure shape, as every other one does
                response = builders.failure_response(builders.request_header(txn.request),
                                                     txn.category, "UnavailableDevice", text)
                actions += self._finish(txn, Outcome.REJECTED, response, "bridge", now,
                                        error=text)
            elif txn.state is TxState.AWAITING_RESPONSE:
                if txn.category == "Abort" and txn.passthrough:
                    actions += passthrough.abort_not_delivered(
                        self, txn, f"the link was lost before it confirmed the abort: "
                                   f"{reason}", now)
                elif txn.passthrough or txn.category not in MONEY_CATEGORIES:
                    actions += self._finish(txn, Outcome.ERROR, None, "bridge", now,
                                            error=f"link to terminal lost: {reason}")
                else:
                    # The answer may be lost; ask as soon as the link is back.
                    actions += self._to_polling(
                        txn, f"link lost while waiting: {reason}", now,
                        poll_at=now + self.settings.status_timeout)
        return actions

    def _sent_under(self, service_id: str, sale_id: str | None) -> Transaction | None:
        """The transaction whose request went out as `service_id` (of `sale_id`: a
        ServiceID is unique per SaleID only, and two registers may both use 7; None, the
        first of that ServiceID, for a caller that does not know the SaleID)."""
        if sale_id is not None:
            txn = self.open.get(TxKey(sale_id, service_id))
            return txn if txn is not None and txn.state is TxState.AWAITING_RESPONSE else None
        return next((t for t in self.open.values() if t.service_id == service_id
                     and t.state is TxState.AWAITING_RESPONSE), None)

    def frame_subject(self, service_id: str, sale_id: str | None = None) -> str:
        """What the frame sent under `service_id` (of `sale_id`) is, in a technician's words:
        a status poll or identity check goes under a ServiceID of its own, which names
        nothing they could look up."""
        check = self.identity.check
        if check is not None and check.service_id == service_id \
                and sale_id in (None, BRIDGE_SALE_ID):
            return "the identity check"
        probe = self._probe
        if probe is not None and probe.poll_id == service_id \
                and sale_id in (None, probe.key.sale_id):
            return f"the status poll about {probe.key}"
        txn = self._sent_under(service_id, sale_id)
        if txn is not None:
            return f"{txn.category} {txn.key}"
        if sale_id == BRIDGE_SALE_ID:
            # (one given up on already: poi-bridge/SnrcPJDWvh read as a transaction)
            return "a frame of the bridge's own (identity check or status poll)"
        return f"{sale_id}/{service_id}" if sale_id else service_id

    def is_identity_check(self, service_id: str, sale_id: str | None = None) -> bool:
        """Whether the frame sent under these IDs is the identity check still out: its
        failure is said by send_failed, in a warning of its own (with what to check)."""
        return (self.identity.check is not None and self.identity.check.service_id == service_id
                and sale_id in (None, BRIDGE_SALE_ID))

    def send_failed(self, service_id: str, reason: str, now: float,
                    sale_id: str | None = None) -> list[Action]:
        """The link layer gave up on a frame (no ACK after every try). `sale_id`: the
        SaleID the frame went under (see _sent_under)."""
        if self.is_identity_check(service_id, sale_id):
            return [self._unnamed(f"identity check not delivered: {reason}"),
                    *self._pump(now)]
        if self._probe is not None and self._probe.poll_id == service_id \
                and sale_id in (None, self._probe.key.sale_id):
            txn = self.open.get(self._probe.key)
            self._probe = None
            if txn is None:
                return self._pump(now)
            return self._poll_failed(txn, f"status poll not delivered: {reason}", now,
                                     retry_in=self.settings.poll_floor) + self._pump(now)
        txn = self._sent_under(service_id, sale_id)
        if txn is not None:
            if txn.category == "Abort" and txn.passthrough:
                return passthrough.abort_not_delivered(
                    self, txn, f"the terminal did not acknowledge it: {reason}", now)
            if txn.passthrough or txn.category not in MONEY_CATEGORIES:
                return self._finish(txn, Outcome.ERROR, None, "bridge", now,
                                    error=f"terminal did not acknowledge: {reason}")
            # The terminal may have read it and lost only our ACK: never re-send, ask.
            return self._to_polling(txn, f"request not acknowledged: {reason}", now,
                                    poll_at=now + self.settings.poll_floor) + self._pump(now)
        return [Log("debug", f"terminal {self.poi_id}: frame for {service_id} not delivered")]

    def frame_delivered(self, service_id: str, now: float,
                        sale_id: str | None = None) -> list[Action]:
        """The link layer delivered a frame: the terminal acknowledged it (or, on a link
        without ACKs, it was written). Only an Abort waits for this (its answer)."""
        txn = self._sent_under(service_id, sale_id)
        if txn is not None and txn.category == "Abort" and txn.passthrough:
            return passthrough.abort_delivered(self, txn, now)
        return []

    def frame_resent(self, service_id: str, sale_id: str | None = None) -> list[Action]:
        """The link sends the frame of `service_id` (of `sale_id`) again because the terminal
        said nothing in time or a NAK came (FrameResent): it may have read the copy before.
        (The journal's key keeps its first name, `resent_after_silence`.) A register's
        money request so sent is marked, and the mark journaled before the copy is written
        (what waits for a commit waits for this one too): a status record that says Busy
        then proves nothing (BUSY_RECORD_OF_A_COPY), whatever happens to the link, the
        answers or the daemon in between."""
        txn = self.open.get(TxKey(sale_id, service_id)) if sale_id is not None else next(
            (t for t in self.open.values() if t.service_id == service_id), None)
        if txn is None or txn.passthrough or txn.category not in MONEY_CATEGORIES:
            return []
        copies = txn.extra.get("resent_after_silence", 0) + 1
        txn.extra["resent_after_silence"] = copies
        return [Record(txn.snapshot()),
                Log("info", f"terminal {self.poi_id}: {txn.category} {txn.key} goes out "
                            f"again ({copies + 1} copies): the terminal did not acknowledge "
                            "in time or a NAK came (line noise can fake one), and it may have "
                            "read more than one")]

    def not_writable(self, service_id: str, reason: str, now: float,
                     sale_id: str | None = None) -> list[Action]:
        """A request of a register could not be written at all: its frame is over the link's
        max_frame_size, or it cannot be encrypted (`reason` says why and what to do).
        Nothing went to the terminal, so it is refused (`rejected`), not polled: a status
        poll would only learn NotFound, after a payment time-out. Nor does it count as sent:
        `sent_at` and `last_request_at` (which decide whether a later NotFound is believed)
        are put back. A status poll or identity check not writable is a frame not sent."""
        txn = self._sent_under(service_id, sale_id)
        if txn is None:
            return self.send_failed(service_id, reason, now, sale_id)
        self._never_reached(txn)
        txn.sent_at = None
        response = builders.failure_response(builders.request_header(txn.request),
                                             txn.category, "MessageFormat", reason)
        trim_refused(txn)  # (as every refusal's record: these are large by definition)
        return [Log("error", f"terminal {self.poi_id}: {txn.category} {txn.key} not sent: "
                             f"{reason}"),
                *self._finish(txn, Outcome.REJECTED, response, "bridge", now, error=reason),
                *self._pump(now)]

    def _never_reached(self, txn: Transaction) -> None:
        """`txn`'s request never reached the terminal (not written; or NotFound, believed):
        when it is its category's latest, `last_request_at` is put back to the one before,
        so that a NotFound about an earlier request is judged as if it had never gone out.
        (The journal's last_requests_sent leaves such requests out likewise.)"""
        previous = self._request_sent_before
        if previous is not None and previous[0] == txn.key \
                and self.last_request_at.get(txn.category) == txn.sent_at:
            if previous[1] is None:
                self.last_request_at.pop(txn.category, None)
            else:
                self.last_request_at[txn.category] = previous[1]

    def request_reached(self, category: str, sent_at: float | None, *,
                        earlier_run: bool = False) -> None:
        """A request of `category` sent at `sent_at` (`earlier_run`: stamped by an earlier
        run), believed never received (not_found), reached the terminal after all (its own
        answer came): it counts again as a request sent, undoing _never_reached."""
        if sent_at is None:
            return
        if earlier_run:
            self._earlier_stamps.add(sent_at)
        latest = self.last_request_at.get(category)
        if latest is None or self._went_out_after(sent_at, latest):
            self.last_request_at[category] = sent_at

    def tick(self, now: float) -> list[Action]:
        """Time has passed: fire whatever deadlines are due."""
        actions: list[Action] = []
        if self.identity.check is not None and self.identity.check.deadline <= now:
            actions.append(self._unnamed(
                f"no answer to the identity check within {self.settings.status_timeout:g} s"))
        if self._probe is not None and self._probe.deadline <= now:
            txn = self.open.get(self._probe.key)
            self._probe = None
            if txn is not None:
                actions += self._poll_failed(txn, "status poll not answered in time", now,
                                             retry_in=self.settings.poll_floor)
        for txn in list(self.open.values()):
            if txn.state is TxState.AWAITING_RESPONSE and txn.deadline is not None \
                    and txn.deadline <= now:
                if txn.category == "Abort" and txn.passthrough:
                    actions += passthrough.abort_not_delivered(
                        self, txn, "the link did not confirm its delivery within "
                                   f"{self.settings.status_timeout:g} s", now)
                elif txn.passthrough or txn.category not in MONEY_CATEGORIES:
                    actions += self._finish(
                        txn, Outcome.ERROR, None, "bridge", now,
                        error=f"terminal did not answer within {txn.deadline - txn.sent_at:g} s"
                        if txn.sent_at is not None else "terminal did not answer")
                else:
                    actions += self._to_polling(
                        txn, f"no response within {self.settings.payment_timeout:g} s", now,
                        poll_at=now)
        return actions + self._pump(now)

    def resync(self, txn: Transaction, now: float,
               earlier_stamps: Iterable[float] = ()) -> list[Action]:
        """Ask the terminal now about a transaction (the register's "re-sync"/"download");
        `earlier_stamps`: those of its stamps an earlier run wrote (see shift_times)."""
        current = self.open.get(txn.key)
        if current is None:
            if txn.state is not TxState.FINAL:
                return [Log("warning", f"resync of {txn.key}: not open on {self.poi_id}")]
            # Final already: ask again and republish; the journal's result stands if no answer.
            self._earlier_stamps.update(earlier_stamps)
            current = txn.snapshot()
            current.extra["reopened_from"] = {
                "outcome": txn.outcome, "source": txn.source, "response": txn.response,
                "detail": txn.detail,
            }
            current.state, current.unanswered_polls = TxState.POLLING, 0
            self.open[current.key] = current
        if current.state in (TxState.ACCEPTED, TxState.AWAITING_RESPONSE):
            return [Log("info", f"resync of {txn.key}: still waiting for the terminal's answer")]
        current.extra.pop("abandoned", None)  # asked again: unanswered, it is abandoned again
        current.next_poll_at = now
        return self._pump(now)

    def restore(self, transactions: list[Transaction], now: float,
                last_requests: dict[str, float] | None = None) -> list[Action]:
        """After a restart: every transaction the journal holds open, and when a request of
        each category last went to the terminal (`last_requests`). Their state on the
        terminal is unknown, so each is asked about; none is re-sent."""
        actions: list[Action] = []
        if self._restored_at is None:
            self._restored_at = now
        for category, sent_at in (last_requests or {}).items():
            if sent_at > self.last_request_at.get(category, -math.inf):
                self.last_request_at[category] = sent_at
            self._earlier_stamps.add(sent_at)
        for txn in transactions:
            self._earlier_stamps.update(txn.stamps())
            txn = txn.snapshot()
            self.open[txn.key] = txn
            for poll_id in txn.poll_ids:
                self._poll_index[poll_id] = txn.key
            if txn.category == "Abort" and txn.passthrough:
                # Not acknowledged before the restart (then it was answered already): the
                # register must hear that the payment may go on, not a bare error
                actions += passthrough.abort_not_delivered(
                    self, txn, "the bridge restarted before the terminal acknowledged it", now)
                continue
            if txn.passthrough or txn.category not in MONEY_CATEGORIES:
                actions += self._finish(txn, Outcome.ERROR, None, "bridge", now,
                                        error="the bridge restarted before the terminal answered")
                continue
            if txn.state is not TxState.UNRESOLVED:
                txn.state, txn.unanswered_polls = TxState.POLLING, 0
            # Asked at once when the link is up; restored before it opens (the daemon's
            # start), the terminal has status_timeout to come back before that counts as a
            # poll unanswered (link_is_up brings the poll forward).
            txn.deadline = None
            txn.next_poll_at = now if self.link_up else now + self.settings.status_timeout
            if txn.extra.get("abandoned"):
                # Given up on before the restart: asked once more (the terminal may know it
                # now), and still said to be given up on meanwhile (a repeat, a status
                # request); given up on again, it is not announced again (_abandon)
                actions.append(Record(txn.snapshot()))
                continue
            txn.detail = "recovering after restart"
            actions += [Record(txn.snapshot()), self._progress(txn, "recovering", txn.detail)]
        if self.active is None:
            # The payment that owned the terminal when the bridge stopped owns it again: a
            # new payment meanwhile would go out before it is asked about (the shopper may
            # still be at the PIN pad) and hold its polls up for a whole payment time-out.
            owners = [t for t in self.open.values() if t.state is TxState.POLLING
                      and "reopened_from" not in t.extra]
            if owners:
                self.active = max(owners, key=lambda t: t.created_at).key
        return actions + self._pump(now)

    # --- internals ----------------------------------------------------------------------------

    def _send_request(self, txn: Transaction, now: float) -> list[Action]:
        txn.state, txn.sent_at = TxState.AWAITING_RESPONSE, now
        # (put back by not_writable() if the request cannot be written after all)
        self._request_sent_before = (txn.key, self.last_request_at.get(txn.category))
        self.last_request_at[txn.category] = now
        txn.deadline, txn.updated_at = now + self.settings.payment_timeout, now
        return [
            Record(txn.snapshot()),
            Send(txn.request, txn.sale_id, txn.service_id, "request"),
            self._progress(txn, "sent",
                           f"awaiting terminal (up to {self.settings.payment_timeout:g} s)"),
        ]

    def _pump(self, now: float) -> list[Action]:
        """Send whatever is due, one status poll on the wire at a time."""
        if not self.link_up:
            return self._polls_that_cannot_go(f"terminal {self.poi_id} offline", now)
        if self._probe is not None or self.identity.check is not None:
            return []
        if not self.named and not self.identity.asked:
            return self._ask_name(now)
        if self.wrong_device is not None:
            return self._hold_for_the_right_terminal(now)
        active = self.open.get(self.active) if self.active else None
        if active is not None and active.state is TxState.ACCEPTED:
            if self.named:
                return self._send_request(active, now)
            if self.identity.may_ask_again():
                return self._ask_name(now)
            reason = self.identity.checks_failed_text()
            response = builders.failure_response(builders.request_header(active.request),
                                                 active.category,
                                                 "UnavailableDevice", reason)
            self.identity.unnamed_checks = 0  # the next request gets checks of its own
            return self._finish(active, Outcome.REJECTED, response, "bridge", now,
                                error=reason) + self._pump(now)
        if active is not None and active.state is TxState.AWAITING_RESPONSE:
            return []  # never disturb a terminal that is taking a payment
        due = self._polls_due(now)
        if not due:
            return []
        due.sort(key=lambda t: (t.key != self.active, t.next_poll_at))
        return self._send_poll(due[0], now)

    def _polls_due(self, now: float) -> list[Transaction]:
        return [t for t in self.open.values()
                if t.state in (TxState.POLLING, TxState.UNRESOLVED)
                and t.next_poll_at is not None and t.next_poll_at <= now]

    def _ask_name(self, now: float) -> list[Action]:
        return [self.identity.ask(self._new_service_id(), now + self.settings.status_timeout)]

    def _check_key_failed(self, reason: str, now: float) -> list[Action]:
        """The identity check failed on its key: asked again with the next other terminal's
        key (identity.next_key), or, every key tried, the device stays unnamed."""
        asked_with = self.identity.check.key_of if self.identity.check is not None else None
        key_of = self.identity.next_key(reason)
        if key_of is not None:
            return [self.identity.asking_with(key_of),
                    self.identity.ask(self._new_service_id(),
                                      now + self.settings.status_timeout, key_of=key_of)]
        if asked_with is not None:
            reason = "not read either"  # (the own key's failure comes first)
        return [self._unnamed(reason), *self._pump(now)]

    def _naming_answered(self, service_id: str, now: float) -> list[Action]:
        if not self.identity.answered(service_id):
            if self.named and self.identity.check is not None:
                # It names the device: the check asked since (with another terminal's key,
                # after a stray crypto error) is not waited for, nor called unnamed
                self.identity.named_meanwhile(now + self.settings.status_timeout)
                return self._pump(now)
            return [Log("debug", f"terminal {self.poi_id}: late answer to identity check "
                                 f"{service_id}")]
        if self.named:  # terminal_named() came first: ours, or wrong_device is set
            return self._pump(now)
        return [self._unnamed("the answer to the identity check carries no POIID"),
                *self._pump(now)]

    def _hold_for_the_right_terminal(self, now: float) -> list[Action]:
        """Another terminal is on the link: nothing goes to it but, now and then, the
        identity check again (it may have named another by a glitch, or been swapped back).
        A request that waited is refused (nothing was sent); a status poll waits, as for a
        terminal offline."""
        reason = self.identity.wrong_device_text()
        actions: list[Action] = []
        if self.link_up and self.identity.recheck_due(now):
            actions += [Log("info", f"terminal {self.poi_id}: asking the device on its link "
                                    f"again which terminal it is (it said {self.wrong_device})"),
                        *self._ask_name(now)]
        active = self.open.get(self.active) if self.active else None
        if active is not None and active.state is TxState.ACCEPTED:
            response = builders.failure_response(builders.request_header(active.request),
                                                 active.category,
                                                 "UnavailableDevice", reason)
            actions += self._finish(active, Outcome.REJECTED, response, "bridge", now,
                                    error=reason)
        return actions + self._polls_that_cannot_go(self.identity.wrong_device_poll_text(), now)

    def _polls_that_cannot_go(self, reason: str, now: float) -> list[Action]:
        """Status polls now due that nothing can be sent for (no link, or the wrong device
        on it): each counts as unanswered and is tried again after status_timeout."""
        actions: list[Action] = []
        for txn in self._polls_due(now):
            actions += self._poll_failed(txn, reason, now, retry_in=self.settings.status_timeout)
        return actions

    def _send_poll(self, txn: Transaction, now: float) -> list[Action]:
        poll_id = self._new_service_id()
        while poll_id in self._poll_index or TxKey(txn.sale_id, poll_id) in self.open:
            poll_id = self._new_service_id()
        self._poll_index[poll_id] = txn.key
        deadline = now + self.settings.status_timeout
        self._probe = _Probe(txn.key, poll_id, deadline)
        txn.poll_ids += (poll_id,)
        txn.polls_sent += 1
        txn.deadline, txn.next_poll_at, txn.updated_at = deadline, None, now
        document = builders.status_request(
            sale_id=txn.sale_id, service_id=poll_id, poi_id=self.poi_id,
            original_service_id=txn.service_id, original_category=txn.category,
            receipts=not txn.extra.get("answer_too_big"),
        )
        return [
            Record(txn.snapshot()),
            Send(document, txn.sale_id, poll_id, "status-poll"),
            self._progress(txn, "status_poll", f"asking the terminal (poll {txn.polls_sent})",
                           poll=txn.polls_sent),
        ]

    def _to_polling(self, txn: Transaction, reason: str, now: float, poll_at: float) -> list[Action]:
        txn.state, txn.deadline, txn.next_poll_at = TxState.POLLING, None, poll_at
        txn.unanswered_polls, txn.detail, txn.updated_at = 0, reason, now
        return [Record(txn.snapshot()), self._progress(txn, "awaiting_status", reason)]

    def _sent_or_recorded(self, txn: Transaction) -> float:
        """When `txn` went to the terminal (or, never sent, was recorded). An earlier run's
        stamp, against this run's clock, is no later than this run's start (restore): a box
        that starts with its clock behind (no battery-backed clock, NTP not yet there) would
        otherwise hold the terminal with a restored payment, and keep its register waiting,
        for as long as the clock is behind."""
        stamp = txn.sent_at if txn.sent_at is not None else txn.created_at
        if self._restored_at is not None and stamp in self._earlier_stamps:
            return min(stamp, self._restored_at)
        return stamp

    def _went_out_after(self, stamp: float, other: float) -> bool:
        """Whether the request stamped `stamp` went to the terminal after the one stamped
        `other`. A request of this run went out after any of an earlier run, whatever the
        stamps say (a box that starts with its clock behind stamps its requests before an
        earlier run's); two of one run, by their stamps."""
        earlier, other_earlier = stamp in self._earlier_stamps, other in self._earlier_stamps
        if earlier != other_earlier:
            return other_earlier
        return stamp > other

    def _patience_end(self, txn: Transaction) -> float:
        """Until when a payment may still be running on the terminal: payment_timeout after
        it was sent (or, never sent, recorded)."""
        return self._sent_or_recorded(txn) + self.settings.payment_timeout

    def _in_progress_end(self, txn: Transaction) -> float:
        """Until when the terminal's "in progress" holds the register: past it, the register
        is told `unresolved` and the bridge asks on in the background."""
        return self._sent_or_recorded(txn) + self.settings.in_progress_limit

    def _unresolved(self, txn: Transaction, why: str, now: float,
                    reason: str | None = None) -> list[Action]:
        """The register is told the outcome is unknown, and the terminal is free again; the
        transaction is asked about in the background (only while the terminal is idle)."""
        txn.state = TxState.UNRESOLVED
        txn.deadline, txn.updated_at = None, now
        txn.detail = reason or why
        txn.next_poll_at = now + self.settings.reconcile_initial
        if self.active == txn.key:
            self.active = None  # the register may close the sale as unpaid; we keep asking
        return [
            Record(txn.snapshot()),
            Deliver(txn.sale_id, txn.service_id, self.poi_id, txn.category,
                    Outcome.UNRESOLVED.value, "bridge", None,
                    unresolved_error(why, txn.category, txn.sale_id, txn.service_id,
                                     self.poi_id), logged=True),
            self._progress(txn, "unresolved", reason or why),
            # The one line of this event (`logged`: the shell logs no result line of its own
            # for it, the same text twice, at two levels)
            Log("warning", f"terminal {self.poi_id}: {txn.category} {txn.key} unresolved "
                           f"({reason or why}): the terminal may have charged it; the bridge "
                           "keeps asking it in the background and publishes the result"),
        ]

    def _poll_failed(self, txn: Transaction, reason: str, now: float, retry_in: float) -> list[Action]:
        """A status poll went unanswered (or could not be sent, or was unusable)."""
        txn.unanswered_polls += 1
        txn.deadline, txn.updated_at = None, now
        if not txn.extra.get("abandoned"):
            # (Given up on, its detail is the reason the register and a repeat are given:
            # a poll tried once more that could not go changes nothing of it)
            txn.detail = reason
        if "reopened_from" in txn.extra and txn.unanswered_polls >= self.settings.resync_attempts:
            return self._stored_result_stands(txn, f"the terminal did not answer the resync "
                                                   f"({reason})", now)
        if txn.state is TxState.POLLING and txn.unanswered_polls >= self.settings.resync_attempts \
                and now < self._patience_end(txn):
            # Not before the payment's own time is up: polls cut off by a flapping cable
            # ran out in a second or two, and a cashier told 'unresolved' may close the sale
            # while the shopper is still at the terminal. Asked again until then.
            txn.next_poll_at = min(now + max(retry_in, self.settings.poll_floor),
                                   self._patience_end(txn))
            return [Record(txn.snapshot()), self._progress(txn, "status_poll_failed", reason,
                                                           poll=txn.polls_sent)]
        if txn.state is TxState.POLLING and txn.unanswered_polls >= self.settings.resync_attempts:
            return self._unresolved(txn, f"{txn.unanswered_polls} status poll(s) unanswered "
                                         f"or not sent ({reason})", now, reason)
        if txn.state is TxState.UNRESOLVED:
            txn.reconcile_attempts += 1
            if now >= txn.created_at + self.settings.reconcile_deadline:
                return self._abandon(txn, (
                    "outcome unknown: the bridge stopped asking the terminal after "
                    f"reconcile_deadline ({self.settings.reconcile_deadline:g} s) without an "
                    f"answer ({reason}); check the acquirer's records or the terminal's own "
                    "transaction report before charging again. A resync (operator command) "
                    "asks the terminal once more"), now)
            backoff = self.settings.reconcile_initial * 2 ** txn.reconcile_attempts
            txn.next_poll_at = now + min(self.settings.reconcile_max_interval, backoff)
            return [Record(txn.snapshot())]
        txn.next_poll_at = now + max(retry_in, self.settings.poll_floor)
        return [Record(txn.snapshot()), self._progress(txn, "status_poll_failed", reason,
                                                       poll=txn.polls_sent)]

    def _original_answer(
        self, txn: Transaction, cls: Classification, message: Message, now: float
    ) -> list[Action]:
        document = message.to_document()
        if txn.passthrough:
            return passthrough.answered(self, txn, cls, message, now)
        if txn.category not in MONEY_CATEGORIES:
            # A non-money request ends success, failure or error. Busy or InProgress: the
            # terminal did not carry it out (busy with another), and nothing polls it, so a
            # failure, not a word that says "ask again" of a request that is final
            if cls.outcome in (Outcome.SUCCESS, Outcome.FAILURE, Outcome.ERROR):
                outcome = cls.outcome
            elif cls.outcome in (Outcome.BUSY, Outcome.IN_PROGRESS):
                outcome = Outcome.FAILURE
            else:
                # A money word or NotFound: an answer naming another category (a Payment's
                # header, a status answer) under this request's IDs is no result of it
                return self._unusable_answer(
                    txn, f"no {txn.category} result ({cls.detail})", now)
            return self._finish(txn, outcome, document, "terminal", now, detail=cls.detail)
        # (less authorised than asked: partial)
        cls = amounts_read(cls, payment_amounts(txn.request), document)
        if cls.outcome in FINAL_MONEY_OUTCOMES:
            return self._finish(txn, cls.outcome, document, "terminal", now, detail=cls.detail)
        # Busy carrying our own ServiceID may answer a retransmitted copy of a request the
        # terminal is already processing (our ACK was lost): not an outcome. Ask instead.
        return self._unusable_answer(txn, cls.detail, now)

    def _unusable_answer(self, txn: Transaction, reason: str, now: float) -> list[Action]:
        note = Log("warning", f"terminal {self.poi_id}: unusable answer for {txn.key}: {reason}")
        if txn.state in (TxState.POLLING, TxState.UNRESOLVED):
            # Asked about already: a stray non-outcome under its IDs (a Busy, a copy the
            # terminal sent again) changes nothing. Put back to polling, its counters and
            # reconcile backoff would start over and the register be told `unresolved` again.
            return [note]
        if txn.passthrough or txn.category not in MONEY_CATEGORIES:
            return [note, *self._finish(txn, Outcome.ERROR, None, "terminal", now,
                                        error=f"unusable answer from the terminal: {reason}")]
        return [note, *self._to_polling(txn, f"unusable answer: {reason}", now,
                                        poll_at=now + self.settings.poll_floor)]

    def _finish(
        self, txn: Transaction, outcome: Outcome, response: dict[str, Any] | None, source: str,
        now: float, *, detail: str = "", error: str | None = None,
    ) -> list[Action]:
        was_unresolved = txn.state is TxState.UNRESOLVED
        txn.extra.pop("reopened_from", None)
        self._close(txn, outcome.value, source, response, error or detail, now)
        event = "resolved" if was_unresolved else "completed"
        return [
            Record(txn.snapshot()),
            # The event first, so a cashier's screen never shows "sent" after the result.
            self._progress(txn, event, f"{outcome.value}" + (f": {txn.detail}" if txn.detail else "")),
            Deliver(txn.sale_id, txn.service_id, self.poi_id, txn.category, outcome.value,
                    source, response, error, accepted=not txn.passthrough),
        ]

    def _close(self, txn: Transaction, outcome: str, source: str,
               response: dict[str, Any] | None, detail: str, now: float) -> None:
        """Make a transaction final and forget it: no deadline, polls, probe or terminal."""
        txn.state, txn.outcome, txn.source, txn.response = TxState.FINAL, outcome, source, response
        txn.deadline = txn.next_poll_at = None
        txn.extra.pop("abandoned", None)
        txn.detail, txn.updated_at = detail, now
        self.open.pop(txn.key, None)
        for poll_id in txn.poll_ids:
            self._poll_index.pop(poll_id, None)
        if self._probe is not None and self._probe.key == txn.key:
            self._probe = None
        if self.active == txn.key:
            self.active = None

    def _refuse(self, txn: Transaction, header: MessageHeader, condition: str, text: str,
                now: float) -> list[Action]:
        """Refused before anything was sent. The refusal is recorded, so a copy of the same
        request delivered again (MQTT QoS 1 is at least once) gets the same answer instead of
        running on the terminal after the register was told 'rejected'."""
        response = builders.failure_response(header, txn.category, condition, text)
        txn.state, txn.outcome, txn.source = TxState.FINAL, Outcome.REJECTED.value, "bridge"
        txn.response, txn.detail, txn.updated_at = response, text, now
        trim_refused(txn)
        return [Record(txn.snapshot()),
                Deliver(txn.sale_id, txn.service_id, self.poi_id, txn.category,
                        Outcome.REJECTED.value, "bridge", response, text)]

    def awaiting_answer(self) -> TxKey | None:
        """The request on the wire whose answer the session waits for (a register's request
        or abort; not a status poll or identity check), if any. When a frame from the
        terminal ends that wait, the session took it as the answer: the request reached the
        terminal (the worker stops the framer sending it again)."""
        txn = self.open.get(self.active) if self.active else None
        return txn.key if txn is not None and txn.state is TxState.AWAITING_RESPONSE else None

    def expects_answer(self) -> bool:
        """Whether a frame of ours on the wire waits for the terminal's answer: a register's
        request, a status poll or an identity check."""
        return (self.awaiting_answer() is not None or self._probe is not None
                or self.identity.check is not None)

    def _waiting_transaction(self) -> Transaction | None:
        if self._probe is not None or self.identity.check is not None:
            return None  # cannot tell a garbled poll answer from a garbled response
        txn = self.open.get(self.active) if self.active else None
        return txn if txn is not None and txn.state is TxState.AWAITING_RESPONSE else None

    def _progress(self, txn: Transaction, event: str, detail: str = "",
                  poll: int | None = None) -> Progress:
        return Progress(txn.sale_id, txn.service_id, self.poi_id, event, detail, poll)

"""How a terminal session reads the terminal's answers to status polls: which transaction an
answer is about (its MessageReference, the record's header and category must name it; one
under a ServiceID of the terminal's own is matched by what it names), what each answer means
for the transaction (a record settles it; NotFound is "never received" only while no later
request of its category went to the terminal; InProgress and Busy are asked again), and what
is said when the bridge gives up on one or a resync finds nothing.

Part of TerminalSession (a mixin: TerminalSession(StatusAnswers)), kept apart so that each
file reads alone; it uses the session's state (open, settings, identity, _probe) and steps
(_finish, _poll_failed, _pump, ...). Pure, as the rest of the session: no I/O.
"""

from __future__ import annotations

import dataclasses

from bridge.protocol import builders
from bridge.protocol.actions import Action, Deliver, Log, Record
from bridge.protocol.messages import Message
from bridge.protocol.outcome import (BUSY_RECORD, BUSY_RECORD_OF_A_COPY, FINAL_MONEY_OUTCOMES,
                                     Classification, Outcome, amounts_read, classify,
                                     payment_amounts,
                                     other_subject, record_outcome, recovered_response,
                                     status_subjects)
from bridge.protocol.transaction import Transaction, TxState


class StatusAnswers:
    """The status-answer steps of TerminalSession."""

    def _status_answer_from_a_device_not_named(self, message: Message, service_id: str,
                                               now: float) -> list[Action]:
        """A status poll went out before the device said who it is (it did not answer the
        identity check), and its answer names another terminal, or none (no POIID, an empty
        one, "N/A"): a unit put in the terminal's place, say. Such a device may know nothing
        of our transactions: its NotFound would end a payment the right terminal charged as
        `not_found`, "nothing was charged". Only its own record of the transaction (a final
        outcome, for a request it was sent in the same way) is taken; anything else counts
        as unanswered."""
        cls = classify(message)
        if cls.outcome in FINAL_MONEY_OUTCOMES and cls.from_status:
            return self._received(message, None, service_id, now)
        key = self._poll_index[service_id]
        if self._probe is not None and self._probe.poll_id == service_id:
            self._probe = None
        if self.wrong_device is not None:
            source, why = f"{self.wrong_device}, another terminal", \
                self.identity.wrong_device_poll_text()
        else:
            source = "a device that has not said which terminal it is"
            why = (f"the answer came from a device that has not said which terminal it is "
                   f"({self.identity.unnamed_reason or 'it was not asked yet'}): only its "
                   "record of a final outcome is taken; check which terminal is plugged into "
                   "which port")
        actions: list[Action] = [Log("warning", f"terminal {self.poi_id}: the answer to a status "
                                                f"poll for {key} came from {source} "
                                                f"({cls.detail}); not taken")]
        txn = self.open.get(key)
        if txn is not None:
            actions += self._poll_failed(txn, why, now, retry_in=self.settings.status_timeout)
        return actions + self._pump(now)

    def _probe_named_by(self, message: Message, cls: Classification,
                        own_device: bool) -> Transaction | None:
        """The transaction of the status poll on the wire, when an answer under a ServiceID
        the terminal chose (the vendor guide's examples answer so) names it, by the
        MessageReference it echoes or its record's header, and nothing in it names another.
        Not from a device that named another terminal; from one that has not said which
        terminal it is, only its record of a final outcome (as the poll's own answer)."""
        if self._probe is None or (self.wrong_device is not None and not own_device):
            return None
        if not self.named and not own_device \
                and not (cls.outcome in FINAL_MONEY_OUTCOMES and cls.from_status):
            return None
        txn = self.open.get(self._probe.key)
        if txn is None or not any(s.names(txn.sale_id, txn.service_id)
                                  for s in status_subjects(message, cls)) \
                or other_subject(message, cls, txn.sale_id, txn.service_id,
                                 txn.category) is not None:
            return None
        return txn

    def _polled_answer(
        self, txn: Transaction, cls: Classification, message: Message, now: float
    ) -> list[Action]:
        """The answer to a status poll about `txn`: taken only if nothing in it says it is
        about another transaction. A terminal that answers about its latest one instead
        would otherwise settle this payment with another's record, or its NotFound end it
        as never received; it counts as unanswered, and is asked again."""
        other = other_subject(message, cls, txn.sale_id, txn.service_id, txn.category)
        if other is None:
            return self._status_answer(txn, cls, message, now)
        reason = f"the terminal's answer to the status poll is about another transaction ({other})"
        return [Log("warning", f"terminal {self.poi_id}: {reason}, not the {txn.category} "
                               f"{txn.key}: not taken"),
                *self._poll_failed(txn, reason, now, retry_in=self.settings.poll_floor)]

    def _status_answer(
        self, txn: Transaction, cls: Classification, message: Message, now: float
    ) -> list[Action]:
        # (less authorised than asked: partial)
        cls = amounts_read(cls, payment_amounts(txn.request), None)
        if cls.outcome in FINAL_MONEY_OUTCOMES and cls.from_status:
            return self._finish(txn, cls.outcome,
                                recovered_response(cls, builders.request_header(txn.request)),
                                "status-poll", now, detail=cls.detail)
        if "reopened_from" in txn.extra:
            # A resync of a finished transaction: only the terminal's own record of it may
            # replace the result the journal holds. A terminal that has forgotten it since
            # (NotFound, hours and many sales later) says nothing about what it charged.
            return self._stored_result_stands(
                txn, f"the terminal's answer to the resync is no outcome ({cls.detail})", now)
        later = self.last_request_at.get(txn.category)
        if cls.outcome is Outcome.NOT_FOUND and txn.sent_at is not None and later is not None \
                and self._went_out_after(later, txn.sent_at):
            # The vendor's NotFound names "the last such Request": a terminal that has taken
            # another request of this category since may have forgotten this one, charged or
            # not. Taken as "never received", the register would be told it may charge again.
            if txn.extra.get("abandoned"):
                # Said already (the terminal sent its answer again, or it was asked once more
                # after a restart): the register and the technician were told once, and
                # nothing has changed since.
                txn.deadline = None  # (the poll's)
                return [Log("debug", f"terminal {self.poi_id}: NotFound again about {txn.key}, "
                                     "no longer asked about")]
            return self._abandon(txn, (
                f"outcome unknown: the terminal answers NotFound, but it has taken another "
                f"{txn.category} request since this one and may remember only its latest, so "
                "NotFound no longer means it never got this one; check the acquirer's records "
                "or the terminal's own transaction report before charging again"), now)
        if cls.outcome is Outcome.NOT_FOUND:
            # Believed: the terminal never got it, so it is no later request that would make
            # an earlier one's NotFound doubtful (_never_reached)
            self._never_reached(txn)
            response = builders.failure_response(
                builders.request_header(txn.request), txn.category, "NotFound",
                "the terminal never received this transaction; nothing was charged")
            return self._finish(txn, Outcome.NOT_FOUND, response, "status-poll", now,
                                detail=cls.detail)
        if record_outcome(cls) is Outcome.DECLINED and cls.outcome is Outcome.BUSY:
            if not txn.extra.get("resent_after_silence"):
                # The terminal's own record of this ServiceID ends "Busy": it never started it.
                response = recovered_response(cls, builders.request_header(txn.request))
                return self._finish(txn, Outcome.DECLINED, response, "status-poll", now,
                                    detail=BUSY_RECORD)
            # The terminal may have got the request twice: Busy may be its answer to the
            # second copy, and "send it again" would charge twice. Asked again as for
            # InProgress, until the record changes or in_progress_limit.
            cls = dataclasses.replace(cls, detail=BUSY_RECORD_OF_A_COPY)
        if txn.extra.get("abandoned"):
            # No longer asked about, and the register was told so: a late answer that brings
            # no outcome changes nothing (it used to start the background polls again, and
            # to announce the abandon a second time at reconcile_deadline).
            txn.deadline = None  # (the poll's)
            return [Log("debug", f"terminal {self.poi_id}: a late answer about {txn.key}, no "
                                 f"longer asked about, brings no outcome ({cls.detail})")]
        if cls.outcome in (Outcome.IN_PROGRESS, Outcome.BUSY):
            if txn.state is TxState.UNRESOLVED:
                # In the background the register was told: asked again with the reconcile
                # backoff up to reconcile_deadline, not every poll_floor for ever (a hung
                # terminal), and without an event each time.
                # (classify's own text says "in progress" already: not said twice)
                still = cls.detail if "in progress" in cls.detail \
                    else f"still in progress on the terminal ({cls.detail})"
                return self._poll_failed(txn, still, now, retry_in=self.settings.poll_floor)
            if txn.state is TxState.POLLING and now >= self._in_progress_end(txn):
                # A register must have an answer it can plan for: a terminal that says
                # "in progress" for ever (hung) held the till with it.
                still = ("says the payment is in progress" if cls.detail != BUSY_RECORD_OF_A_COPY
                         else f"answers: {cls.detail},")
                return self._unresolved(txn, (
                    f"the terminal still {still} "
                    f"{now - self._sent_or_recorded(txn):.0f} s after it was sent "
                    f"(in_progress_limit {self.settings.in_progress_limit:g} s)"), now)
            txn.unanswered_polls = 0
            txn.deadline, txn.detail, txn.updated_at = None, cls.detail, now
            txn.next_poll_at = now + self.settings.poll_floor
            return [Record(txn.snapshot()),
                    self._progress(txn, "in_progress", cls.detail, poll=txn.polls_sent)]
        return self._poll_failed(txn, f"unusable status answer: {cls.detail}", now,
                                 retry_in=self.settings.poll_floor)

    def _stored_result_stands(self, txn: Transaction, reason: str, now: float) -> list[Action]:
        """A resync that brought no outcome: the transaction is final again as the journal
        had it (recorded, so the journal no longer holds it open), and that result is
        published again as a repeat publishes it. Why the terminal's answer did not replace
        it goes in the event: bridge.error beside a result that stands would read as a
        failure."""
        stored = txn.extra.pop("reopened_from")
        self._close(txn, stored["outcome"], stored["source"], stored["response"],
                    stored["detail"], now)
        outcome = stored["outcome"]
        note = f"{reason}; the stored result stands"
        return [Record(txn.snapshot()),
                self._progress(txn, "completed", f"{outcome}: {note}"),
                Log("info", f"terminal {self.poi_id}: resync of {txn.key}: {note} ({outcome})"),
                Deliver(txn.sale_id, txn.service_id, self.poi_id, txn.category, outcome,
                        "journal", stored["response"],
                        stored["detail"] if outcome in ("error", "rejected") else None)]

    def _abandon(self, txn: Transaction, detail: str, now: float) -> list[Action]:
        """The bridge stops asking about `txn`: its outcome cannot be learned from the
        terminal. Recorded and published as such (the register's response topic and the
        retained document said the bridge keeps asking): nothing more will come."""
        again = bool(txn.extra.get("abandoned"))
        txn.state, txn.deadline, txn.next_poll_at = TxState.UNRESOLVED, None, None
        txn.extra["abandoned"] = True
        txn.updated_at = now
        if self.active == txn.key:
            self.active = None
        if again:
            # Given up on before (asked once more after a restart): the register was told
            # then, with why, and is not told the same again at every restart
            return [Record(txn.snapshot()),
                    Log("info", f"terminal {self.poi_id}: transaction {txn.key}, given up on "
                                "before, is still unknown: no longer asked about")]
        txn.detail = detail
        return [
            Record(txn.snapshot()),
            self._progress(txn, "reconcile_abandoned", txn.detail),
            Deliver(txn.sale_id, txn.service_id, self.poi_id, txn.category,
                    Outcome.UNRESOLVED.value, "bridge", None, txn.detail, logged=True),
            # The one line of this event (see _unresolved)
            Log("error", f"terminal {self.poi_id}: {txn.category} {txn.key}: {txn.detail}"),
        ]

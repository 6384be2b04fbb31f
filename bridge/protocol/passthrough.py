"""A register's own Abort and TransactionStatus requests: what a session does with them.

They pass straight through a busy terminal (the seed's rule), and they are about another
transaction, named by their MessageReference. What this part of `TerminalSession` decides:
- an abort or status request about a payment the bridge still holds unsent (waiting for the
  identity check or a background status poll) is answered by the bridge: the terminal has
  never seen that payment, so its NotFound would say "nothing was charged" of a payment that
  goes out once the hold ends. An abort withdraws it; a status request is told InProgress;
- nothing goes to a device that has not said who it is (another terminal would stop its own
  payment, or answer NotFound about ours);
- the terminal's answer to a register's status request may settle a transaction the bridge
  is polling, but only with its record of a transaction of that category;
- a NotFound about a payment that did go to the terminal and is still open is no "nothing
  was charged": the register is told the outcome is unknown.

Functions of the session (they read and change its transactions through its own steps:
`_finish`, `_refuse`, `_status_answer`), split out so the core loop reads without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.protocol import builders
from bridge.protocol.actions import Action, Deliver, Log, Record, Send, Unmatched
from bridge.protocol.messages import (
    Message,
    MessageHeader,
    MessageReference,
    SaleToPOIRequest,
    SaleToPOIResponse,
)
from bridge.protocol.outcome import (BUSY_RECORD, BUSY_RECORD_OF_A_COPY, MONEY_CATEGORIES,
                                     FINAL_MONEY_OUTCOMES, Classification, Outcome,
                                     amounts_read, other_subject, payment_amounts,
                                     record_outcome, recovered_response, status_subjects)
from bridge.protocol.transaction import Transaction, TxKey, TxState

if TYPE_CHECKING:
    from bridge.protocol.session import TerminalSession

PASSTHROUGH_CATEGORIES = frozenset({"Abort", "TransactionStatus"})
# At most this many of a terminal's status and abort requests wait for their answers at
# once; another is refused Busy. Each open one is walked at every step (deadlines, polls
# due): a register sending thousands made every step of every terminal slower (20,000
# open: 16 ms a tick, 19 s of CPU within one status_timeout). A register waits for the
# answer to its last before it asks again; 16 leaves room for several registers at once.
MAX_OPEN_PASSTHROUGH = 16


def submit(session: TerminalSession, txn: Transaction, request: SaleToPOIRequest,
           header: MessageHeader, now: float) -> list[Action]:
    """A register's Abort or TransactionStatus, once the link is up and the device on it is
    not another terminal (TerminalSession.submit refused it otherwise)."""
    if txn.category == "Abort":
        ref = request.abort_request.message_reference if request.abort_request else None
        held = held_target(session, ref)
        if held is not None and not names_another_category(ref, held):
            return withdraw(session, txn, held, now)
    if txn.category == "TransactionStatus":
        ref = request.transaction_status_request.message_reference \
            if request.transaction_status_request else None
        held = held_target(session, ref)
        if held is not None and not names_another_category(ref, held):
            return held_status(session, txn, held, now)
    if not session.named:
        # Nothing goes to a device that has not said who it is: if it is another terminal,
        # an abort would stop that terminal's payment, and its NotFound would answer a
        # status request about ours.
        return session._refuse(txn, header, "UnavailableDevice",
                               session.identity.not_named_text(), now)
    waiting = sum(1 for other in session.open.values() if other.passthrough)
    if waiting >= MAX_OPEN_PASSTHROUGH:
        return session._refuse(
            txn, header, "Busy", f"terminal {session.poi_id} has {waiting} status and abort "
            "requests waiting for its answers already; nothing was sent: ask again, with a "
            "new ServiceID, once yours are answered", now)
    if txn.category == "Abort":
        # An abort gets no response of its own; the aborted transaction ends Failure/Aborted.
        # It is answered once the link says the terminal has it (its frame acknowledged, or
        # written where the framing has no ACK: abort_delivered), or as an error when the
        # frame is not (send_failed): a register told `success` of an abort the terminal
        # never got believes the payment stopped. The deadline is a safety net only: the
        # framer reports one or the other within max_tries * ack_timeout.
        session.open[txn.key] = txn
        txn.state, txn.sent_at = TxState.AWAITING_RESPONSE, now
        txn.deadline = now + session.settings.status_timeout
        txn.detail = "abort sent to the terminal; waiting for the link to confirm it"
        return [
            Record(txn.snapshot()),
            Send(txn.request, txn.sale_id, txn.service_id, "abort"),
            session._progress(txn, "abort_sent", abort_target(request)),
        ]
    session.open[txn.key] = txn
    txn.state, txn.sent_at = TxState.AWAITING_RESPONSE, now
    txn.deadline = now + session.settings.status_timeout
    return [
        Record(txn.snapshot()),
        Send(txn.request, txn.sale_id, txn.service_id, "passthrough"),
        session._progress(txn, "sent", "status request passed to the terminal"),
    ]


def reference_asked(status: Transaction) -> MessageReference | None:
    """The MessageReference of a register's TransactionStatusRequest, as it sent it."""
    body = status.request.get("SaleToPOIRequest", {}).get("TransactionStatusRequest")
    ref = body.get("MessageReference") if isinstance(body, dict) else None
    try:
        return MessageReference.model_validate(ref) if isinstance(ref, dict) else None
    except ValueError:  # checked on intake; an earlier run's record, say
        return None


def names_another_category(ref: MessageReference | None, txn: Transaction) -> bool:
    """Whether a MessageReference with `txn`'s IDs names another category: then it is about
    no transaction the bridge holds (a ServiceID is unique per SaleID, whatever the
    category), and an answer to it says nothing of `txn`."""
    return ref is not None and ref.message_category is not None \
        and str(ref.message_category) != txn.category


def held_target(session: TerminalSession, ref: MessageReference | None) -> Transaction | None:
    """The transaction an abort or a status request names, if the bridge still holds it
    unsent (waiting for the identity check or a background status poll): the terminal
    has never seen it."""
    if ref is None or ref.sale_id is None or ref.service_id is None:
        return None
    target = session.open.get(TxKey(ref.sale_id, ref.service_id))
    return target if target is not None and target.state is TxState.ACCEPTED else None


def held_status(session: TerminalSession, status: Transaction, held: Transaction,
                now: float) -> list[Action]:
    """A register's status request about a payment not yet sent. The terminal, asked,
    would say NotFound ("nothing was charged"), yet the payment goes out once the hold
    ends and may be charged: a register trusting NotFound could charge the shopper
    another way too. Answered by the bridge, in the shape of a terminal's InProgress."""
    if not session.named:
        why = f"waiting for terminal {session.poi_id} to say which terminal it is"
    else:
        why = "waiting for the terminal to answer a status poll"
    text = (f"{held.category} {held.key} has not been sent to terminal {session.poi_id} yet "
            f"({why}): it goes out once that ends, and its result follows under its own IDs"
            + ("; do not charge it another way meanwhile (an AbortRequest withdraws it)"
               if held.category in MONEY_CATEGORIES else " (an AbortRequest withdraws it)"))
    response = builders.failure_response(builders.request_header(status.request), status.category,
                                         "InProgress", text)
    return session._finish(status, Outcome.IN_PROGRESS, response, "bridge", now, detail=text)


def withdraw(session: TerminalSession, abort: Transaction, target: Transaction,
             now: float) -> list[Action]:
    """An abort of a payment not yet sent: it is never sent. Forwarding the abort would
    settle nothing; the payment would go out once the hold ends, after the register was
    told it was aborted."""
    money = target.category in MONEY_CATEGORIES
    text = ("aborted by the register before it was sent to the terminal; nothing was "
            + ("charged" if money else "done"))
    response = builders.failure_response(builders.request_header(target.request),
                                         target.category, "Aborted", text)
    abort.state, abort.outcome, abort.source = TxState.FINAL, Outcome.SUCCESS.value, "bridge"
    abort.detail = f"{target.key} had not been sent yet: withdrawn, nothing sent"
    # (non-money categories end success or failure, as the README has it)
    outcome = Outcome.ABORTED if money else Outcome.FAILURE
    return [
        *session._finish(target, outcome, response, "bridge", now, detail=text),
        Record(abort.snapshot()),
        Deliver(abort.sale_id, abort.service_id, session.poi_id, abort.category,
                Outcome.SUCCESS.value, "bridge", None, None),
    ]


def abort_delivered(session: TerminalSession, abort: Transaction, now: float) -> list[Action]:
    """The terminal has the abort (its frame acknowledged, or written on a link without
    ACKs): `success`, as the README says. Whether the payment it names ends `aborted` is
    that payment's own result."""
    return session._finish(abort, Outcome.SUCCESS, None, "bridge", now,
                           detail="abort delivered to the terminal")


def abort_not_delivered(session: TerminalSession, abort: Transaction, why: str,
                        now: float) -> list[Action]:
    """The abort's frame was not acknowledged after every try (or the link went, or never
    confirmed it): the terminal may not have it, and the payment it names goes on. An
    error that says so, never `success`."""
    ref = (abort.request.get("SaleToPOIRequest", {}).get("AbortRequest") or {}).get(
        "MessageReference") or {}
    target = f"{ref.get('SaleID')}/{ref.get('ServiceID')}" if isinstance(ref, dict) else "?"
    text = (f"the abort of {target} may not have reached terminal {session.poi_id} ({why}): "
            "the transaction it names may go on; its own result says how it ended. To stop "
            "it, send the abort again with a new ServiceID, or cancel on the terminal")
    return [Log("warning", f"terminal {session.poi_id}: abort {abort.key} not delivered: {why}"),
            *session._finish(abort, Outcome.ERROR, None, "bridge", now, error=text)]


def abort_target(request: SaleToPOIRequest) -> str:
    ref = request.abort_request.message_reference if request.abort_request else None
    if ref is None:
        return "abort sent"
    return f"abort of {ref.sale_id}/{ref.service_id} sent"


def answered(session: TerminalSession, status: Transaction, cls: Classification,
             message: Message, now: float) -> list[Action]:
    """The terminal's answer to a register's status request (`status`): passed on to the
    register, and applied to the transaction it is about when it settles it. An answer that
    says it is about another transaction than the one asked about (a terminal answering
    about its latest) is no outcome of it: told as an error that says so, the terminal's
    answer attached, as the bridge's own poll does not take it (_polled_answer)."""
    document = message.to_document()
    asked = reference_asked(status)
    # The payment asked about, while the bridge holds it (applied, it is no longer open):
    # its request says how much was asked for (amounts_read)
    held = session.open.get(TxKey(asked.sale_id, asked.service_id)) \
        if asked is not None and asked.sale_id and asked.service_id else None
    settled = apply_register_status(session, status, message, cls, now)
    if asked is not None and asked.sale_id and asked.service_id:
        named = str(asked.message_category) if asked.message_category is not None else None
        other = other_subject(message, cls, asked.sale_id, asked.service_id, named)
        if other is not None:
            # Another register's record (its receipts, its masked card) is not this one's to
            # read, as a status request naming it would not be (the intake refuses those)
            # (any of what the answer names: its echo may keep the asker's SaleID while the
            # record's header names another register's)
            foreign = next((s for s in status_subjects(message, cls)
                            if s.sale_id not in (None, asked.sale_id)), None)
            about = f"{foreign.where} names another register's transaction" if foreign \
                else str(other)
            return session._finish(
                status, Outcome.ERROR, None if foreign else document, "terminal", now,
                error=(f"the terminal answered about another transaction ({about}), not "
                       f"about the {named or 'transaction'} {asked.sale_id}/"
                       f"{asked.service_id} asked about: its answer is no outcome of that "
                       "one")) + settled
    # What the payment asked for: its request while the session holds it, else as the
    # journal held it when the status request came (a payment that ended, `not_found` say)
    amounts = payment_amounts(held.request) \
        if held is not None and not names_another_category(asked, held) \
        else status.extra.get("asked_amounts")
    cls = amounts_read(cls, amounts, None)  # (less authorised than asked: partial)
    if held is None:
        settled += record_of_an_ended(session, status, asked, cls)
    doubt = not_found_in_doubt(session, status, cls)
    if doubt is not None:
        return session._finish(status, Outcome.UNRESOLVED, None, "bridge", now,
                               error=doubt) + settled
    outcome = record_outcome(cls)  # a record saying Busy: declined, as the payment ends
    detail = BUSY_RECORD if outcome is not cls.outcome else cls.detail
    if outcome is not cls.outcome and _maybe_twice(session, status):
        # ... unless the terminal may have got that payment twice: then the record proves
        # nothing, and "send it again" could charge twice (BUSY_RECORD_OF_A_COPY)
        outcome, detail = cls.outcome, BUSY_RECORD_OF_A_COPY
    actions = session._finish(status, outcome, document, "terminal", now, detail=detail)
    return actions + settled


def record_of_an_ended(session: TerminalSession, status: Transaction,
                       asked: MessageReference | None, cls: Classification) -> list[Action]:
    """The terminal's record of a money transaction the session no longer holds, found by a
    register's status request: if the bridge ended it with a conclusion of its own
    (`not_found`), the terminal's word corrects it under its own IDs, as its late answer
    would (the shell decides, from the journal: TerminalWorker._unmatched). Told only to
    the asking register, the payment's own record kept "nothing was charged"."""
    if asked is None or not asked.sale_id or not asked.service_id \
            or not cls.from_status or cls.outcome not in FINAL_MONEY_OUTCOMES \
            or cls.category not in MONEY_CATEGORIES \
            or (asked.message_category is not None
                and str(asked.message_category) != cls.category):
        return []
    # The original response's shape; its header, when the record has none, as the
    # original request's would be answered
    header = MessageHeader.model_validate({
        "MessageClass": "Service", "MessageCategory": cls.category, "MessageType": "Request",
        "SaleID": asked.sale_id, "ServiceID": asked.service_id, "POIID": session.poi_id})
    return [Unmatched(asked.sale_id, asked.service_id, cls.category, cls.outcome.value,
                      recovered_response(cls, header), cls.detail, found_by=str(status.key))]


def _maybe_twice(session: TerminalSession, status: Transaction) -> bool:
    """Whether the transaction a register's status request asks about is one the bridge
    holds open and may have sent the terminal twice (TerminalSession._maybe_twice)."""
    ref = reference_asked(status)
    if ref is None or ref.sale_id is None or ref.service_id is None:
        return False
    txn = session.open.get(TxKey(ref.sale_id, ref.service_id))
    return txn is not None and bool(txn.extra.get("resent_after_silence"))


def apply_register_status(
    session: TerminalSession, status: Transaction, message: Message, cls: Classification,
    now: float,
) -> list[Action]:
    """A register's own status request (`status`) may settle a transaction the bridge is
    polling: with the terminal's record of it (a RepeatedMessageResponse; a NotFound or
    InProgress is left to the bridge's own polls), about the category of that
    transaction. The record names its category (its header, or its body's name); the
    register's reference and the answer's echo of it, when they name one, must name the
    same: a record of a Reversal under a Payment's IDs is no outcome of the Payment."""
    if not isinstance(message, SaleToPOIResponse) or not cls.from_status:
        return []
    body = message.transaction_status_response
    ref = body.message_reference if body else None
    if ref is None or ref.sale_id is None or ref.service_id is None:
        return []
    txn = session.open.get(TxKey(ref.sale_id, ref.service_id))
    if txn is None or txn.state not in (TxState.POLLING, TxState.UNRESOLVED):
        return []
    asked = reference_asked(status)
    named = {str(c) for c in (cls.category, ref.message_category,
                              asked.message_category if asked else None) if c is not None}
    if named != {txn.category}:
        others = "/".join(sorted(named - {txn.category}))
        return [Log("warning", f"terminal {session.poi_id}: the answer to status request "
                               f"{status.key} is about a {others} {txn.key}, not the "
                               f"{txn.category} {txn.key}: not applied to it")]
    # The record's own header, when it has one, must name it too (not the terminal's latest)
    other = other_subject(message, cls, txn.sale_id, txn.service_id, txn.category)
    if other is not None:
        return [Log("warning", f"terminal {session.poi_id}: the answer to status request "
                               f"{status.key}: {other}, not the {txn.category} {txn.key}: "
                               "not applied to it")]
    return session._status_answer(txn, cls, message, now)


def not_found_in_doubt(session: TerminalSession, status: Transaction,
                       cls: Classification) -> str | None:
    """Why a NotFound answering a register's own status request (`status`) is no
    "nothing was charged": the payment its MessageReference names went to this terminal
    and is still open (the answer, applied by apply_register_status, did not settle it),
    so the bridge has not concluded it was never received: it still waits for the answer,
    or the terminal may have forgotten it since it took another. None: the register may
    read NotFound as the terminal said it (the payment never went out, or the bridge
    holds it final)."""
    if cls.outcome is not Outcome.NOT_FOUND:
        return None
    # The register's request names it: a terminal's NotFound need not echo the reference
    ref = reference_asked(status)
    if ref is None or ref.sale_id is None or ref.service_id is None:
        return None
    payment = session.open.get(TxKey(ref.sale_id, ref.service_id))
    if payment is None or payment.sent_at is None \
            or payment.category not in MONEY_CATEGORIES \
            or names_another_category(ref, payment):  # then NotFound is true of it
        return None
    if payment.state is TxState.AWAITING_RESPONSE:
        where = ("the bridge is still waiting for the terminal's answer to it and will "
                 "publish its result under its own IDs")
    elif payment.extra.get("abandoned"):
        where = f"the bridge no longer asks about it ({payment.detail})"
    else:
        where = (f"the bridge keeps asking the terminal ({payment.detail}) and will publish "
                 "its result under its own IDs")
    return (f"outcome of {payment.category} {payment.key} unknown: the terminal answers "
            f"NotFound, but that {payment.category} was sent to it, so NotFound does not "
            f"show that nothing was charged; do not charge again: {where}")

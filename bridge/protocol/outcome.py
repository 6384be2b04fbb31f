"""What a response means for the register: one outcome word per answer.

`classify()` reads any message a terminal sends back (a direct response, a
TransactionStatusResponse whose outcome sits in RepeatedMessageResponse, an
EventNotification where a response was expected) and says what happened, in the words the
register API uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bridge.protocol.messages import (
    ErrorCondition,
    Message,
    MessageHeader,
    RecordHeader,
    Result,
    SaleToPOIRequest,
    SaleToPOIResponse,
    TransactionStatusResponse,
    response_header,
)
from bridge.redaction import redact

# Categories where money moves: their results are approved/declined, not success/failure.
MONEY_CATEGORIES = frozenset({"Payment", "Reversal", "StoredValue"})


class Outcome(StrEnum):
    APPROVED = "approved"
    # Only part of the amount moved (Result Partial: a gift card with too little on it, a
    # partial authorisation the acquirer allowed, a partial refund; or a Payment's Success
    # with less authorised than requested: amounts_read). Never "approved": a register that
    # knows only that word must not close the sale as paid in full.
    PARTIALLY_APPROVED = "partially_approved"
    DECLINED = "declined"
    CANCELLED = "cancelled"  # cancelled on the terminal (shopper or cashier at the terminal)
    ABORTED = "aborted"  # aborted from the register (AbortRequest)
    IN_PROGRESS = "in_progress"
    NOT_FOUND = "not_found"
    BUSY = "busy"
    ERROR = "error"  # the answer is unusable: no body, no Response, an event, a status without outcome
    SUCCESS = "success"  # non-money categories
    FAILURE = "failure"
    # Decided by the bridge, never by classify():
    UNRESOLVED = "unresolved"
    REJECTED = "rejected"

    @property
    def is_final(self) -> bool:
        return self not in (Outcome.IN_PROGRESS, Outcome.BUSY, Outcome.ERROR, Outcome.UNRESOLVED)


# The outcomes that end a money transaction (the terminal's own answer, or its record)
FINAL_MONEY_OUTCOMES = frozenset(
    {Outcome.APPROVED, Outcome.PARTIALLY_APPROVED, Outcome.DECLINED, Outcome.CANCELLED,
     Outcome.ABORTED}
)


@dataclass(frozen=True, slots=True)
class Classification:
    outcome: Outcome
    category: str | None  # the category the outcome is about (the original one, for a status)
    result: str | None
    error_condition: str | None
    detail: str
    # For a TransactionStatusResponse that carries the original outcome: its body key and body
    # ("PaymentResponse", {...}) and inner header, if the terminal sent one.
    repeated_body_key: str | None = None
    repeated_body: dict[str, Any] | None = None
    repeated_header: RecordHeader | None = None

    @property
    def from_status(self) -> bool:
        return self.repeated_body_key is not None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _shown(text: str | None) -> str | None:
    """A terminal's own text, as quoted in a detail: a detail is journaled, published (events,
    `transactions`, an error's `bridge.error`) and logged, and a terminal may put card data in
    any field. Redacted (bridge/redaction.py) and cut to 120 characters."""
    if text is None:
        return None
    shown = redact(text)
    return shown if len(shown) <= 120 else shown[:117] + "..."


def _outcome_of(category: str | None, result: str | None, condition: str | None) -> Outcome:
    money = category in MONEY_CATEGORIES
    if result == Result.PARTIAL and money:
        # Money moved, but less than asked (AuthorizedAmount, ReversedAmount say how much):
        # the register must get the rest another way, or reverse what was taken.
        return Outcome.PARTIALLY_APPROVED
    if result in (Result.SUCCESS, Result.PARTIAL):
        return Outcome.APPROVED if money else Outcome.SUCCESS
    if result != Result.FAILURE:
        return Outcome.ERROR
    if condition == ErrorCondition.IN_PROGRESS:
        return Outcome.IN_PROGRESS
    if condition == ErrorCondition.BUSY:
        return Outcome.BUSY
    if not money:
        return Outcome.FAILURE
    if condition == ErrorCondition.ABORTED:
        return Outcome.ABORTED
    if condition == ErrorCondition.CANCEL:
        return Outcome.CANCELLED
    return Outcome.DECLINED


def _classify_body(category: str | None, body: Any) -> Classification:
    response = body.get("Response") if isinstance(body, dict) else getattr(body, "response", None)
    if response is None:
        return Classification(Outcome.ERROR, category, None, None, "the response has no Response")
    if isinstance(response, dict):
        result, condition = _text(response.get("Result")), _text(response.get("ErrorCondition"))
    else:
        result, condition = _text(response.result), _text(response.error_condition)
    outcome = _outcome_of(category, result, condition)
    detail = f"{_shown(category) or 'unknown'} {_shown(result) or 'no Result'}"
    if condition:
        detail += f" / {_shown(condition)}"
    if outcome is Outcome.ERROR:
        detail = f"unknown Result {_shown(result)!r}" if result else "Response has no Result"
    return Classification(outcome, category, result, condition, detail)


def _classify_status(response: TransactionStatusResponse) -> Classification:
    status = response.response
    if status is None:
        return Classification(
            Outcome.ERROR, "TransactionStatus", None, None, "status response has no Response"
        )
    result, condition = _text(status.result), _text(status.error_condition)
    if result == Result.SUCCESS:
        repeated = response.repeated_message_response
        body_map = repeated.repeated_response_message_body if repeated else None
        key = next((k for k, v in (body_map or {}).items() if isinstance(v, dict)), None)
        if key is None:
            # Seen in vendor fixtures: "processed", yet nothing says how it ended.
            return Classification(
                Outcome.ERROR, "TransactionStatus", result, condition,
                "status says processed but carries no RepeatedMessageResponse",
            )
        header = repeated.message_header if repeated else None
        # The header's category, else the body's name (a header may name none)
        category = (
            str(header.message_category)
            if header is not None and header.message_category is not None
            else key.removesuffix("Response")
        )
        if category != key.removesuffix("Response"):
            # A record whose header names one category and whose body is of another (a
            # ReversalResponse under a Payment's header) is no outcome of either: read as
            # the header's, a reversal's Success settled the payment `approved`
            return Classification(
                Outcome.ERROR, category, result, condition,
                f"status poll: the record's header names {_shown(category)} but its body is "
                f"a {_shown(key)}",
                repeated_body_key=key, repeated_body=body_map[key], repeated_header=header,
            )
        inner = _classify_body(category, body_map[key])
        return Classification(
            inner.outcome, category, inner.result, inner.error_condition,
            f"status poll: {inner.detail}",
            repeated_body_key=key, repeated_body=body_map[key], repeated_header=header,
        )
    if condition == ErrorCondition.IN_PROGRESS:
        outcome, detail = Outcome.IN_PROGRESS, "transaction still in progress on the terminal"
    elif condition == ErrorCondition.BUSY:
        outcome, detail = Outcome.BUSY, "terminal busy; ask again"
    elif condition == ErrorCondition.NOT_FOUND:
        outcome, detail = Outcome.NOT_FOUND, "the terminal never received the transaction"
    else:
        outcome, detail = (Outcome.ERROR,
                           f"status poll failed: {_shown(result)} / {_shown(condition)}")
    return Classification(outcome, "TransactionStatus", result, condition, detail)


def classify(message: Message) -> Classification:
    """The outcome a terminal's answer means. Never raises on a parsed message."""
    if message.nexo_blob is not None:
        return Classification(
            Outcome.ERROR, message.category, None, None, "message is encrypted; decrypt it first"
        )
    if isinstance(message, SaleToPOIRequest):
        event = message.event_notification
        if event is not None:
            detail = f"terminal sent event {_shown(str(event.event_to_notify))}"
            if event.event_details:
                detail += f": {_shown(str(event.event_details))}"
            return Classification(Outcome.ERROR, "Event", None, None, detail)
        return Classification(
            Outcome.ERROR, message.category, None, None, "a request, not a response"
        )
    assert isinstance(message, SaleToPOIResponse)
    if message.event_notification is not None:
        event = message.event_notification
        return Classification(
            Outcome.ERROR, "Event", None, None,
            f"terminal sent event {_shown(str(event.event_to_notify))}"
        )
    if message.transaction_status_response is not None:
        return _classify_status(message.transaction_status_response)
    key = message.body_key()
    if key is None:
        return Classification(Outcome.ERROR, message.category, None, None, "response has no body")
    category = message.category if message.message_header else key.removesuffix("Response")
    return _classify_body(category, message.body())


# A money request the terminal's record says it answered Busy: it never started it. Told
# `declined` (final, nothing charged, send it again with a new ServiceID, as after a decline),
# with this detail: a cashier must not take it for a refused card.
BUSY_RECORD = ("the terminal's record says Busy: it did not start this transaction (it was "
               "busy with another); nothing was charged and the card was not refused: send "
               "it again with a new ServiceID")

# ... unless the request may have reached the terminal twice (the link sent it again after
# the terminal stayed silent: FrameResent, TerminalSession.frame_resent): then Busy may be
# its answer to the second copy while it ran the first, and "send it again" could charge
# twice.
BUSY_RECORD_OF_A_COPY = (
    "the terminal's record says Busy, but it may have got this request twice (the link sent "
    "it again after the terminal said nothing, or after a NAK, which line noise can fake), so "
    "Busy may answer the second copy while it ran the first: the bridge keeps asking")


def record_outcome(cls: Classification) -> Outcome:
    """The outcome a status answer's record of a transaction means: `declined` where the
    record of a money request says Busy (see BUSY_RECORD), as classify() says otherwise.
    The same whether the bridge's poll, a register's own status request or the journal
    reads it."""
    if cls.outcome is Outcome.BUSY and cls.from_status and cls.category in MONEY_CATEGORIES:
        return Outcome.DECLINED
    return cls.outcome


def dig(document: Any, *path: str) -> Any:
    """The value at `path` in a JSON document, None where any step is missing or no object."""
    for name in path:
        document = document.get(name) if isinstance(document, dict) else None
    return document


def amount_value(value: Any) -> int | float | None:
    """An amount as a document gives it, if it is a number (a bool is none)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def payment_amounts(request: Any) -> Any:
    """The AmountsReq of a Payment's request document (None if it has none)."""
    return dig(request, "SaleToPOIRequest", "PaymentRequest", "PaymentTransaction",
               "AmountsReq")


def amounts_read(cls: Classification, asked: Any, response: Any) -> Classification:
    """The classification of the terminal's answer about a Payment (`asked`: its request's
    AmountsReq, payment_amounts), once its amounts are read: Result Success with a
    PaymentResult.AmountsResp.AuthorizedAmount below the request's AmountsReq.RequestedAmount
    is `partially_approved`, as Result Partial is. Adyen's terminals show Approved for a
    partial authorisation and say it only by the amount ("if this is less than the requested
    amount", the register must collect the rest: docs.adyen.com/point-of-sale/
    partial-payments); told `approved`, a register closes the sale as paid in full.
    The response read is the status answer's record when `cls` is of one, else `response`'s
    PaymentResponse. Left as it is: no AuthorizedAmount, or not a number; as much as asked
    or more (a tip, cashback); amounts in different currencies (both named, and not the
    same). Every path that decides a Payment's outcome from an answer goes through here:
    the direct answer, the bridge's status poll, a register's status request, the
    journal's answer to one."""
    if cls.outcome is not Outcome.APPROVED or cls.category != "Payment":
        return cls
    short = short_authorisation(asked, cls.repeated_body if cls.from_status
                                else dig(response, "SaleToPOIResponse", "PaymentResponse"))
    if short is None:
        return cls
    return dataclasses.replace(cls, outcome=Outcome.PARTIALLY_APPROVED,
                               detail=f"{cls.detail}, but {short}")


def short_authorisation(asked: Any, body: Any) -> str | None:
    """"`authorised` of `requested` [currency] authorised" when a Payment's PaymentResponse
    body authorised less than its request's AmountsReq (`asked`) asked for, comparably (see
    amounts_read); else None."""
    moved = dig(body, "PaymentResult", "AmountsResp")
    requested = amount_value(dig(asked, "RequestedAmount"))
    authorised = amount_value(dig(moved, "AuthorizedAmount"))
    if requested is None or authorised is None or authorised >= requested:
        return None
    asked_currency, moved_currency = dig(asked, "Currency"), dig(moved, "Currency")
    if asked_currency is not None and moved_currency is not None \
            and asked_currency != moved_currency:
        return None  # (not comparable: the Result says it)
    currency = moved_currency if isinstance(moved_currency, str) else asked_currency
    of = f" {_shown(currency)}" if isinstance(currency, str) else ""
    return f"{authorised} of {requested}{of} authorised"


def recovered_response(
    classification: Classification, original_header: MessageHeader
) -> dict[str, Any]:
    """Rebuild the original response document from a status poll's RepeatedMessageResponse,
    so a register handles one shape whichever way the result arrived. The inner header is
    used when the terminal sent one, else the original request's header turned into a
    response header."""
    if classification.repeated_body_key is None or classification.repeated_body is None:
        raise ValueError("classification carries no repeated response")
    if classification.repeated_header is not None:
        header = classification.repeated_header.model_dump(
            mode="json", by_alias=True, exclude_unset=True
        )
        # A record's header may lack what a response's must have (RecordHeader): taken from
        # the original's, so the rebuilt response reads as one (the journal parses it again)
        own = response_header(original_header)
        for name in ("MessageCategory", "MessageType"):
            if header.get(name) is None:
                header[name] = own[name]
    else:
        header = response_header(original_header)
    return {
        "SaleToPOIResponse": {
            "MessageHeader": header,
            classification.repeated_body_key: classification.repeated_body,
        }
    }



@dataclass(frozen=True, slots=True)
class StatusSubject:
    """One thing a TransactionStatus answer says about which transaction it is about."""
    where: str  # "its MessageReference", "the record's header", "the record"
    sale_id: str | None
    service_id: str | None
    category: str | None

    def names(self, sale_id: str, service_id: str) -> bool:
        return self.sale_id == sale_id and self.service_id == service_id

    def contradicts(self, sale_id: str, service_id: str, category: str | None) -> bool:
        """Whether it names another transaction than `sale_id`/`service_id` of `category`
        (None: a question that named no category, which any category fits)."""
        return ((self.sale_id is not None and self.sale_id != sale_id)
                or (self.service_id is not None and self.service_id != service_id)
                or (category is not None and self.category is not None
                    and self.category != category))

    def __str__(self) -> str:
        # (the terminal's words, quoted in details and errors that are published: filtered)
        what = _shown(self.category) or "a transaction"
        if self.sale_id is None and self.service_id is None:
            return f"{self.where} names {what}"  # (a record's body: its category only)
        ids = _shown(f"{self.sale_id or '?'}/{self.service_id or '?'}")
        return f"{self.where} names {what} {ids}"


def status_subjects(message: Message, cls: Classification) -> list[StatusSubject]:
    """What a TransactionStatus answer says it is about: the MessageReference it echoes,
    the header of the record it carries, and the record's category (its body's name). A
    terminal asked about one transaction may answer about another (its latest): then its
    record is not the asked one's outcome, nor its NotFound a "never received" of it."""
    body = message.transaction_status_response if isinstance(message, SaleToPOIResponse) \
        else None
    if body is None:
        return []
    subjects = []
    ref = body.message_reference
    if ref is not None:
        subjects.append(StatusSubject(
            "its MessageReference", ref.sale_id, ref.service_id,
            str(ref.message_category) if ref.message_category is not None else None))
    header = cls.repeated_header
    if header is not None:
        named = header.message_category
        subjects.append(StatusSubject("the record's header", header.sale_id, header.service_id,
                                      str(named) if named is not None else None))
    if cls.repeated_body_key is not None:
        # Its body's name too, header or not: a ReversalResponse is no record of a Payment
        # whatever its header says
        subjects.append(StatusSubject("the record", None, None,
                                      cls.repeated_body_key.removesuffix("Response")))
    return subjects


def other_subject(message: Message, cls: Classification, sale_id: str, service_id: str,
                  category: str | None) -> StatusSubject | None:
    """What in a TransactionStatus answer says it is about another transaction than the one
    asked about (`sale_id`/`service_id` of `category`; None: any category), if anything.
    Such an answer is no outcome of the one asked about, whoever asked: the bridge's own
    poll, or a register's status request passed through."""
    return next((s for s in status_subjects(message, cls)
                 if s.contradicts(sale_id, service_id, category)), None)


def unresolved_error(why: str, category: str, sale_id: str, service_id: str,
                     poi_id: str) -> str:
    """What a register is told with `unresolved` while the bridge still asks the terminal:
    when it was first told, and again on a repeat of the request or a resync. It must not
    retry the sale as a new transaction meanwhile (REFERENCE 2: that is how duplicate
    charges happen), and the cashier needs a way to find out."""
    done, again = ("charged it", "charge this sale again") if category == "Payment" \
        else ("carried it out", f"send this {category} again")
    return (f"outcome unknown: {why}; the bridge keeps asking the terminal and will report "
            f"the result. The terminal may have {done}: do not {again} until the result is "
            "known. To know it: wait for the result under these IDs, or "
            f"{ask_its_status(sale_id, service_id, category, poi_id)}, and check the "
            "terminal's receipt or transaction report")


def ask_its_status(sale_id: str, service_id: str, category: str, poi_id: str) -> str:
    """How a register asks the terminal about a transaction whose outcome it does not know
    (told with `unresolved`, or when a retry of it is refused)."""
    return (f"ask its status (a TransactionStatusRequest whose MessageReference names SaleID "
            f"{sale_id}, ServiceID {service_id}, MessageCategory {category}, to terminal "
            f"{poi_id})")

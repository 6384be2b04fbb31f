"""Requests from registers and commands from operators, checked and routed.

Every request is answered, never dropped: a malformed one goes back to the register's
response topic with outcome `rejected` and a readable error when its SaleID can be read,
otherwise to `{base}/bridge/error`. Nothing here can disturb a transaction already stored.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pydantic import BaseModel

from bridge.config import Config
from bridge.daemon import quiet
from bridge.daemon.journal import Journal
from bridge.daemon.mqtt import RegisterGateway, Reply
from bridge.daemon.quiet import OTHERS, QuietRepeats, is_shared
from bridge.daemon.registers import (
    dumps,
    id_text,
    refusal_category,
    request_header,
    retained_state,
    shown_id,
    stored_result,
    summary,
    topic_safe,
)
from bridge.daemon.worker import TerminalWorker
from bridge.protocol import builders, jsontext
from bridge.protocol.messages import (
    DuplicateName,
    MessageError,
    NotStrictJson,
    SaleToPOIRequest,
    check_request_header,
    load_json,
    parse_message,
)
from bridge.protocol.outcome import (MONEY_CATEGORIES, Outcome, amounts_read, ask_its_status,
                                     classify, payment_amounts, record_outcome)
from bridge.protocol.actions import Deliver, Progress
from bridge.protocol.session import FINAL_MONEY_OUTCOMES
from bridge.protocol.transaction import (
    SERVICE_ID_REUSE_WINDOW,
    Reuse,
    Transaction,
    TxKey,
    TxState,
    check_reuse,
    first_difference,
    request_digest,
    trim_refused,
)
from bridge.redaction import quoted, redact, redact_json

log = logging.getLogger("poi_bridge.intake")

# What varies from one refusal of a kind to the next (a request's age, a JSON error's
# column, a value quoted from the request): not part of the kind
_VARYING = re.compile(r"\d+|\"[^\"]*\"|(?<![A-Za-z])'[^']*'")
# ... and an ID the refusal names unquoted after its label ("ServiceID S7 was already used",
# "MessageHeader.POIID P400Plus-9 does not match"): one register's repeats under new
# ServiceIDs were a kind, and a group, each
_NAMED_ID = re.compile(r"\b(ServiceID|SaleID|POIID|TransactionID|terminal) (?!['\"])\S+")


def _refusal_head(error: str) -> str:
    """A refusal's opening words, up to its first colon or parenthesis: what kind it is.
    Cut only once redacted: a card number cut in two passes the log's filter."""
    head = re.split(r": |\s\(", error, maxsplit=1)[0]
    return head if len(head) <= 80 else quoted(head, 80)


def _refusal_kind(error: str) -> str:
    return _VARYING.sub("#", _NAMED_ID.sub(r"\1 #", _refusal_head(error)))


COMMANDS = ("resync", "transactions", "terminals", "health")


# The `transactions` command's filters, with the values each can take (none: any string)
_TRANSACTION_FILTERS: dict[str, tuple[str, ...]] = {
    "state": tuple(state.value for state in TxState),
    # (an unresolved transaction has no outcome yet: that is its state)
    "outcome": tuple(outcome.value for outcome in Outcome if outcome is not Outcome.UNRESOLVED),
    "poi_id": (),
    "sale_id": (),
}
# What each command's body may hold besides "transaction" (echoed in the answer): any other
# key is a typo or a filter the command does not have, and is refused rather than ignored
COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "resync": ("sale_id", "service_id"),
    "transactions": (*_TRANSACTION_FILTERS, "limit"),
    "terminals": (),
    "health": (),
}


def _foreign_reference(request: SaleToPOIRequest) -> str | None:
    """Why an Abort or TransactionStatus request may not go to the terminal: it must name,
    in MessageReference, a transaction of the register that sends it. The terminal answers
    about any transaction, whoever made it, and its status answer carries that payment's
    card data: a register must not read, nor abort, another's through the bridge."""
    header = request.message_header
    assert header is not None
    category = str(header.message_category)
    if category == "TransactionStatus" and request.transaction_status_request is not None:
        reference = request.transaction_status_request.message_reference
        if reference is None:
            return ("TransactionStatusRequest without MessageReference: the terminal would "
                    "answer about its latest transaction, whoever made it; name the "
                    f"transaction (MessageReference SaleID {header.sale_id}, its ServiceID "
                    "and MessageCategory) and send it with a new ServiceID")
    elif category == "Abort" and request.abort_request is not None:
        reference = request.abort_request.message_reference
    else:
        return None
    if reference.sale_id != header.sale_id:
        return (f"{category}Request MessageReference.SaleID {reference.sale_id!r} is not this "
                f"request's SaleID {header.sale_id!r}: a register may ask about and abort "
                "only its own transactions; nothing was sent. Name one of them, with a new "
                "ServiceID")
    return None


class _Rows(list):  # type: ignore[type-arg]
    """A command's rows, and how many more matched than fit in one message (max_payload)."""
    omitted = 0


def _lenient_json(payload: bytes) -> Any:
    """The request as Python's json reads it (NaN, Infinity...), only to address its refusal;
    a string no answer can carry (a lone surrogate is no UTF-8) reads as null."""
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return jsontext.without_lone_surrogates(document)


def _any_header(document: Any) -> dict[str, Any]:
    """The MessageHeader of a SaleToPOI document of another kind (a register that published
    a SaleToPOIResponse as a request): its refusal still names the ServiceID it carried."""
    if isinstance(document, dict) and len(document) == 1:
        body = next(iter(document.values()))
        if isinstance(body, dict) and isinstance(body.get("MessageHeader"), dict):
            return body["MessageHeader"]
    return {}


def _readable_sale_id(document: Any) -> str | None:
    """The SaleID of a request we are about to refuse, if it can be read safely."""
    try:
        sale_id = document["SaleToPOIRequest"]["MessageHeader"]["SaleID"]
    except (KeyError, TypeError):
        return None
    return sale_id if isinstance(sale_id, str) and topic_safe(sale_id) and len(sale_id) <= 64 \
        else None


def _request_time_stamp(request: SaleToPOIRequest) -> tuple[dt.datetime | None, str | None]:
    """A request's SaleData.SaleTransactionID.TimeStamp, or what is wrong with it; (None,
    None) for a request other than a payment that carries none. A payment must say when the
    register built it: the 300-s rule (requests that waited in the broker are not started)
    depends on it. Any other request that says so (a Reversal: a refund) is held to that rule
    too: queued through a store's uplink outage, it ran when the link came back, perhaps
    after the cashier had refunded another way (a chain review). The stamp may lack a time
    zone (naive): Adyen's own .NET library writes it so."""
    if request.payment_request is not None:
        sale_tx = request.payment_request.sale_data.sale_transaction_id
        where = "PaymentRequest.SaleData.SaleTransactionID.TimeStamp"
        if sale_tx is None or not sale_tx.time_stamp:
            return None, (f"{where} is missing: a payment must say when the register built "
                          "it (ISO 8601, e.g. 2026-11-30T10:00:00.000Z)")
        text: Any = sale_tx.time_stamp
    else:
        key, body = request.body_key(), request.body()
        if isinstance(body, BaseModel):
            body = body.model_extra
        data = body.get("SaleData") if isinstance(body, dict) else None
        ids = data.get("SaleTransactionID") if isinstance(data, dict) else None
        text = ids.get("TimeStamp") if isinstance(ids, dict) else None
        if text is None:
            return None, None
        where = f"{key}.SaleData.SaleTransactionID.TimeStamp"
        if not isinstance(text, str):
            return None, (f"{where} is not an ISO 8601 date and time (e.g. "
                          "2026-11-30T10:00:00.000Z): it is no JSON string")
    try:
        stamp = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z"))
                                          else text)
    except ValueError:
        return None, (f"{where} {quoted(text, 40)!r} is not an ISO 8601 date and time (e.g. "
                      "2026-11-30T10:00:00.000Z)")
    return stamp, None


def _age(stamp: dt.datetime, now: float) -> float:
    """How old a TimeStamp is by this box's clock (negative: ahead of it). One without a time
    zone is read both as this box's local time and as UTC, and the reading closer to now
    counts: registers write either, and the 300-s rule must neither refuse a fresh payment
    for the zone's offset nor be switched off."""
    try:
        if stamp.tzinfo is not None:
            return now - stamp.timestamp()
        readings = (now - stamp.timestamp(), now - stamp.replace(tzinfo=dt.UTC).timestamp())
    except (ValueError, OverflowError, OSError):
        # A date the platform cannot place (.NET's DateTime.MinValue, 0001-01-01, what an
        # unset stamp becomes; 9999-12-31 east of UTC): as far off as it gets
        return math.inf if stamp.year < 2000 else -math.inf
    return min(readings, key=abs)


def _conflict_error(existing: Transaction, document: dict[str, Any], now: float) -> str:
    """Why a different request under a recorded transaction's SaleID and ServiceID is refused,
    with what stands under those IDs: the refusal is published on the same IDs, and must not
    read as the recorded transaction's outcome."""
    asked_of = request_header(document).get("POIID")
    if existing.extra.get("unmatched") and existing.poi_id != asked_of:
        return (f"ServiceID {existing.service_id} of SaleID {existing.sale_id} holds an answer "
                f"of terminal {existing.poi_id} the bridge had no request for; a request for "
                f"terminal {asked_of} under these IDs was not started. Use a new ServiceID")
    where = first_difference(existing.request, document) \
        if "retry_digest" not in existing.extra else \
        "its body (a refused request over 8 KB is kept as its header only)"
    recorded = f"state {existing.state}" + (f", outcome {existing.outcome}"
                                            if existing.outcome else "")
    when = "within 48 hours" if now - existing.created_at <= SERVICE_ID_REUSE_WINDOW else \
        "that is still open (its outcome is not known: the IDs are free again only once it ends)"
    return (f"ServiceID {existing.service_id} was already used by SaleID {existing.sale_id} "
            f"for a different request {when} (it differs at {where}); this request was "
            f"not started. The recorded {existing.category} under these IDs stands "
            f"({recorded}). Use a new ServiceID for a new request")


def _unnamed_sale(request: SaleToPOIRequest) -> str | None:
    """Why a Payment names no sale: an empty SaleTransactionID.TransactionID. The bridge
    knows a register's retry of a payment whose outcome is not known yet (under a new
    ServiceID) by its TransactionID (_charges_again); without one, such a retry would go to
    the terminal and could charge the sale twice. (A missing SaleTransactionID is refused
    before, for its TimeStamp.)"""
    payment = request.payment_request
    sale_tx = payment.sale_data.sale_transaction_id if payment is not None else None
    if sale_tx is not None and not sale_tx.transaction_id.strip():
        return ("PaymentRequest.SaleData.SaleTransactionID.TransactionID is empty: give the "
                "sale's own id (the bridge tells a retry of a payment whose outcome is not "
                "known yet by it, and refuses it so that the sale is not charged twice); not "
                "sent to the terminal")
    return None


# Where nexo puts a money request's Currency (merchant data such as SaleToAcquirerData may
# have fields of that name of its own, which the terminal passes on: not checked)
_CURRENCY_PATHS = (("PaymentRequest", "PaymentTransaction", "AmountsReq", "Currency"),
                   ("StoredValueRequest", "StoredValueData", "*", "Currency"))


def _currency_problem(request: SaleToPOIRequest, document: dict[str, Any]) -> str | None:
    """What is wrong with a Currency in a money category's request (Payment, Reversal,
    StoredValue), if anything. nexo's Currency is ISO 4217's alphabetic code: three
    upper-case letters. "EURO", "eur" or "€" would go to the terminal as sent, which
    refuses them, or, worse, reads them its own way: the register is told at once instead.
    Only nexo's own Currency fields are checked; one left out, or null, is the terminal's
    to judge, as an optional amount's null is."""
    header = request.message_header
    if header is None or str(header.message_category) not in MONEY_CATEGORIES:
        return None
    for path in _CURRENCY_PATHS:
        found: list[tuple[str, Any]] = [("", document.get("SaleToPOIRequest"))]
        for name in path:
            found = [(f"{where}[{i}]", item) for where, value in found
                     if isinstance(value, list) for i, item in enumerate(value)] \
                if name == "*" else \
                [(f"{where}.{name}" if where else name, value[name]) for where, value in found
                 if isinstance(value, dict) and name in value]
        for where, value in found:
            if value is None:
                continue
            if not isinstance(value, str) or len(value) != 3 or not value.isascii() \
                    or not value.isalpha() or not value.isupper():
                # Redacted before it is cut: track data or a card number cut in the middle
                # no longer looks like one to the log's filter, and its rest was shown
                shown = redact(json.dumps(value, ensure_ascii=False))
                shown = shown if len(shown) <= 24 else shown[:21] + "..."
                return (f"{where} {shown} is not a currency code: it must be ISO 4217's "
                        "alphabetic code, three upper-case letters (EUR, GBP, USD)")
    return None


def _amount_asked(document: Any) -> tuple[float, str] | None:
    """A recorded PaymentRequest's RequestedAmount and Currency (upper case), if readable."""
    try:
        asked = document["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"][
            "AmountsReq"]
        amount, currency = asked["RequestedAmount"], asked["Currency"]
    except (KeyError, TypeError):
        return None
    if isinstance(amount, bool) or not isinstance(amount, int | float) \
            or not isinstance(currency, str):
        return None
    value = _as_float(amount)
    return (value, currency.upper()) if value is not None else None


def _as_float(amount: Any) -> float | None:
    """float(amount), or None for an integer no double holds (refused on intake since: a
    request the journal recorded before must not make each retry check an internal error)."""
    try:
        return float(amount)
    except (OverflowError, TypeError, ValueError):
        return None


# What an open payment is doing, as its retry's refusal tells the register
_OPEN_STATES = {
    TxState.ACCEPTED: "is held by the bridge, to be sent to the terminal",
    TxState.AWAITING_RESPONSE: "was sent to the terminal, whose answer is awaited",
    TxState.POLLING: "got no answer yet: the bridge is asking the terminal about it",
    TxState.UNRESOLVED: "is unresolved: the terminal did not say whether it charged it; the "
                        "bridge keeps asking",
}


def _not_configured(poi_id: str) -> str:
    """Why nothing more comes of an open transaction whose terminal the configuration no
    longer has (removed, or its poi_id renamed): recover() logs it, and a register's retry or
    repeat of it is told so, not that the bridge is asking the terminal."""
    return (f"its terminal {poi_id} is no longer in this bridge's configuration (removed, or "
            f"its poi_id renamed), so the bridge cannot ask it and no result will come until "
            f"terminal {poi_id} is added back to the configuration (and the bridge restarted) "
            "so that the bridge can ask it")


def _retry_error(earlier: Transaction, transaction_id: str, asked: tuple[float, str], *,
                 configured: bool = True) -> str:
    """The refusal of a payment that repeats `earlier`, still open, under a new ServiceID:
    which payment, that it may have been charged, and what the cashier does. `configured`:
    whether earlier's terminal is still in the configuration (else nothing asks it)."""
    doing = _OPEN_STATES.get(earlier.state, f"is {earlier.state}")
    if earlier.extra.get("abandoned"):
        doing = ("is unresolved, and the bridge stopped asking the terminal about it (see "
                 "reconcile_deadline)")
    find_out = (f"Wait for the bridge's result for ServiceID {earlier.service_id}, or "
                f"{ask_its_status(earlier.sale_id, earlier.service_id, 'Payment', earlier.poi_id)}"
                ", and check that terminal's receipt or transaction report")
    if not configured:
        doing = f"is still open: {_not_configured(earlier.poi_id)}"
        find_out = "Check that terminal's receipt or transaction report"
    amount, currency = asked
    return (f"this payment was not started: it repeats the payment of TransactionID "
            f"{transaction_id} ({amount:g} {currency}) sent by SaleID {earlier.sale_id} as "
            f"ServiceID {earlier.service_id} to terminal {earlier.poi_id}, which {doing}. The "
            f"terminal may have charged it: do not charge this sale again now. {find_out}. If "
            f"the cashier knows it was not charged, send the payment again with a new "
            f"TransactionID and a new ServiceID")


class RequestIntake:
    def __init__(self, config: Config, journal: Journal, gateway: RegisterGateway,
                 workers: dict[str, TerminalWorker], *, health: Callable[[], dict[str, Any]],
                 clock: Callable[[], float] = time.time, wall: Callable[[], float] = time.time,
                 request_max_age: float = 300.0) -> None:
        self.config = config
        self.journal = journal
        self.gateway = gateway
        self.workers = workers
        self.topics = gateway.topics
        self._health = health
        # `clock` is the one the terminals' sessions stamp transactions with (the daemon's
        # steady clock): the 48-hour ServiceID window must be measured on it, or a step of
        # the system clock makes a payment of a minute ago look days old, and its repeat a
        # new payment. `wall` is the system clock, against which a register's TimeStamp is
        # judged.
        self._clock = clock
        self._wall = wall
        self.request_max_age = request_max_age
        self.rejected = 0
        # (keyed by terminal, sender and kind: past the groups' bound, by kind)
        self._refusals_said = QuietRepeats(quiet.REFUSALS_QUIET, self._refusals_summed,
                                           kind_of=lambda key: key[-1])

    # --- entry point --------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, reply: Reply) -> None:
        route = self.topics.parse_request_topic(topic)
        if route is None or route.problem is not None:
            return  # (the gateway refuses a request on a topic with a problem itself)
        if route.kind == "bridge":
            self._command(route.name, payload, reply)
        else:
            self._request(route.name, payload, reply, route.sale_id, topic)

    # --- register requests ----------------------------------------------------------------------

    def _reject(self, document: Any, poi_id: str, error: str, condition: str = "MessageFormat",
                reply: Reply | None = None, to_sale_id: str | None = None,
                conflict: dict[str, Any] | None = None, unread: bool = False,
                topic: str | None = None) -> None:
        """`unread`: refused before the journal was asked about its IDs (_request's checks
        of the document itself): a transaction recorded under them is flagged (`conflict`).
        `topic`: where the request came in (named in a refusal on bridge/error)."""
        self.rejected += 1
        header = request_header(document) or _any_header(document)
        sale_id = _readable_sale_id(document)
        if to_sale_id is not None and sale_id != to_sale_id:
            # The register listens on its topic's level whatever the nexo limit on a
            # SaleID (64): one too long to pay with is told so where it waits
            sale_id = to_sale_id if topic_safe(to_sale_id) else None
        # As the register wrote them, so that it can tell which request this answers: a
        # ServiceID sent as a number, a SaleID that cannot be a topic level
        service_id, sale_text = id_text(header.get("ServiceID")), id_text(header.get("SaleID"))
        # ... and as echoed (its topic, the log, a chain's head office): filtered before cut,
        # since a cut card number (15 of 16 digits, the last one Luhn's) passes the filter
        shown_service_id, shown_sale_text = (shown_id(header.get("ServiceID")),
                                             shown_id(header.get("SaleID")))
        if unread and conflict is None and sale_id and service_id:
            # Published under a recorded transaction's IDs, this refusal of another request
            # (malformed, another terminal's...) must not read as that transaction's result:
            # a register waiting for it took it for its answer (review rv25)
            existing = self.journal.get(TxKey(sale_id, service_id[:64]))
            if existing is not None:
                conflict = {"state": retained_state(existing.state),
                            "outcome": existing.outcome}
        # The body is named after the category when it can be read as one (letters and
        # digits, at most 64), else UnknownResponse: "Pay-ment" or "" must not name it, nor
        # leave the refusal without a response a register can read as a terminal's
        category = refusal_category(header.get("MessageCategory"))
        said_sale_id = sale_id or (repr(shown_sale_text) if sale_text else "?")
        said_service_id = repr(shown_service_id) if service_id and not service_id.isalnum() \
            else shown_service_id or "?"
        if self._refusals_said.tell((poi_id, sale_id or topic or said_sale_id,
                                     _refusal_kind(error)),
                                    (said_sale_id, said_service_id, _refusal_head(error))):
            log.warning("request for terminal %s refused: %s (SaleID=%s ServiceID=%s)",
                        poi_id, error, said_sale_id, said_service_id)
        response = None
        if sale_id is not None:
            echo = {k: v for k, v in header.items() if isinstance(v, str) and len(v) <= 128}
            if service_id and "ServiceID" not in echo:
                echo["ServiceID"] = shown_service_id
            if to_sale_id is not None:
                # Answered to the topic's register: its header says so too, as the bridge
                # part does (a register drops an answer whose SaleID is not its own)
                echo["SaleID"] = sale_id
            response = builders.failure_response(echo, category, condition, error)
        result = Deliver(sale_id or "", shown_service_id[:64], poi_id, category,
                         Outcome.REJECTED.value, "bridge", response, error, conflict)
        if sale_id is None:
            refusal: dict[str, Any] = {
                "status": "error", "error": error, "poi_id": poi_id,
                "topic": topic or self.topics.terminal_requests.replace("+", poi_id),
            }
            if sale_text:
                refusal["sale_id"] = shown_sale_text
            if service_id:
                refusal["service_id"] = shown_service_id
            self.gateway.enqueue(self.topics.bridge_error, refusal)
        else:
            self.gateway.deliver(result)

    def flush_repeats(self) -> None:
        """The bridge stops: the refusals counted since the last summary are logged now."""
        self._refusals_said.flush()

    def _refusals_summed(self, key: Any, count: int, last: Any, interval: float) -> None:
        """The summary of refusals like one logged in full (see quiet.REFUSALS_QUIET)."""
        said_sale_id, said_service_id, head = last
        if is_shared(key):  # (more senders, or kinds, than are counted apart)
            log.warning("refused %d more requests in the last %g s, from registers%s not "
                        "counted apart (too many at once); the last: from SaleID %s, "
                        "ServiceID %s (%s)", count, interval,
                        "" if key != OTHERS else " and for reasons", said_sale_id,
                        said_service_id, head)
            return
        poi_id = key[0]
        log.warning("request for terminal %s: refused %d more like this from SaleID %s in the "
                    "last %g s (%s)%s", poi_id, count, said_sale_id, interval, head,
                    f"; last ServiceID {said_service_id}" if said_service_id != "?" else "")

    def _request(self, poi_id: str, payload: bytes, reply: Reply,
                 topic_sale_id: str | None = None, topic: str | None = None) -> None:
        limit = self.config.mqtt.max_payload
        # Every refusal goes to the topic's register when the request names none it can read
        refuse = functools.partial(self._reject, to_sale_id=topic_sale_id, topic=topic)
        # (until the journal is asked about its IDs: see _reject)
        early = functools.partial(self._reject, to_sale_id=topic_sale_id, unread=True,
                                  topic=topic)
        twice: DuplicateName | None = None
        try:
            document = load_json(payload, max_size=limit, unique_names=True)
        except DuplicateName as exc:
            # Read as before names written twice were refused (the last value of each kept):
            # refused below, unless the journal took it then (a copy delivered again)
            document, twice = load_json(payload, max_size=limit), exc
        except NotStrictJson as exc:
            # Python's own reader takes NaN and the like: enough to answer on the register's
            # topic, not to send (a terminal, like any strict reader, would choke on it).
            early(_lenient_json(payload), poi_id, f"request is unusable: {exc}")
            return
        except MessageError as exc:
            early(None, poi_id, f"request is unusable: {exc}")
            return
        said = request_header(document).get("SaleID")
        if topic_sale_id is not None and isinstance(said, str) and said != topic_sale_id:
            # The topic's SaleID is the one the broker's ACL vouches for: the refusal goes
            # to that register, not to the one the header names (it may be forged). Past
            # this point a SaleID that can be read is the topic's; one that cannot (missing,
            # a number) is refused by the header checks, answered to the topic's register.
            early(document, poi_id, f"MessageHeader.SaleID {id_text(said)!r} is not the "
                                     f"topic's SaleID {topic_sale_id!r}: a register publishes "
                                     "only its own requests", "NotAllowed")
            return
        if twice is not None:
            if not self._known_repeat(document, poi_id):
                early(document, poi_id, f"request is unusable: {twice}")
            return
        try:
            request = parse_message(document)
        except MessageError as exc:
            if not self._known_repeat(document, poi_id):
                early(document, poi_id, f"not a valid SaleToPOIRequest: {exc}")
            return
        if not isinstance(request, SaleToPOIRequest):
            early(document, poi_id, "registers publish SaleToPOIRequest documents here")
            return
        if request.nexo_blob is not None or request.security_trailer is not None:
            early(document, poi_id, "send the request in clear: the bridge encrypts "
                                     "towards the terminal itself")
            return
        problems = check_request_header(request)
        if problems:
            if not self._known_repeat(document, poi_id):
                early(document, poi_id, "invalid header: " + "; ".join(problems))
            return
        header = request.message_header
        assert header is not None and header.sale_id and header.service_id
        if not topic_safe(header.sale_id):
            early(document, poi_id, "SaleID must not contain / + # or control characters")
            return
        if header.poi_id != poi_id:
            early(document, poi_id, f"MessageHeader.POIID {header.poi_id} does not match "
                                     f"the topic's terminal {poi_id}")
            return
        # What the journal knows comes first: a repeat of a known request is answered with
        # its result (approved, perhaps) even when the request is now too old to start, or
        # the bridge is stopping; the checks below are for requests that would start.
        digest = request_digest(document)
        existing = self.journal.get(TxKey(header.sale_id, header.service_id))
        reuse = check_reuse(existing, digest, self._clock(), document, poi_id)
        if reuse is Reuse.CONFLICT:
            assert existing is not None
            refuse(document, poi_id, _conflict_error(existing, document, self._clock()),
                   "NotAllowed",
                   conflict={"state": retained_state(existing.state),
                             "outcome": existing.outcome})
            return
        if reuse in (Reuse.REPEAT, Reuse.RETRY):
            assert existing is not None
            self._repeat(existing, " (the same request with a new TimeStamp)"
                         if reuse is Reuse.RETRY else "")
            return
        _, problem = _request_time_stamp(request)
        if problem is not None:
            refuse(document, poi_id, problem)
            return
        refusal = self._refusal(request, poi_id)
        if refusal is not None:
            self._refuse_recorded(request, document, digest, poi_id, *refusal)
            return
        # After _refusal: a retry of an open payment that writes its currency in lower case
        # (compared upper-cased there) is told first not to charge the sale again
        problem = _currency_problem(request, document)
        if problem is not None:
            refuse(document, poi_id, f"invalid currency: {problem}")
            return
        problem = _unnamed_sale(request)
        if problem is not None:
            refuse(document, poi_id, problem)
            return
        if request.transaction_status_request is not None \
                and self._status_from_journal(request, document, digest, poi_id):
            return
        self.workers[poi_id].submit(request, document, digest, self._asked_amounts(request))

    def _asked_amounts(self, request: SaleToPOIRequest) -> dict[str, Any] | None:
        """The AmountsReq of the Payment a status request asks about, when the journal holds
        it: the terminal's record is read against it (less authorised than asked is partial),
        also once the session no longer holds the payment (it ended `not_found`, say)."""
        body = request.transaction_status_request
        ref = body.message_reference if body is not None else None
        if ref is None or not ref.sale_id or not ref.service_id:
            return None
        asked = self.journal.get(TxKey(ref.sale_id, ref.service_id))
        if asked is None or asked.category != "Payment":
            return None
        amounts = payment_amounts(asked.request)
        return amounts if isinstance(amounts, dict) else None

    def _status_from_journal(self, request: SaleToPOIRequest, document: dict[str, Any],
                             digest: str, poi_id: str) -> bool:
        """A register's TransactionStatusRequest about a transaction the journal knows (its
        own: checked before). One that ended with a money outcome is answered from the
        journal, as the terminal would answer: a terminal restarted since, or another
        terminal, says NotFound, which reads 'nothing was charged'. One still open on another
        terminal is refused, naming it. False: the terminal is asked, as before."""
        body = request.transaction_status_request
        ref = body.message_reference if body is not None else None
        if ref is None or not ref.sale_id or not ref.service_id:
            return False
        asked = self.journal.get(TxKey(ref.sale_id, ref.service_id))
        if asked is None:
            return False
        if asked.state != TxState.FINAL:
            if asked.poi_id == poi_id:
                return False  # the terminal's answer may settle it (the session applies it)
            where = f"send the status request to terminal {asked.poi_id}" \
                if asked.poi_id in self.workers else _not_configured(asked.poi_id)
            self._refuse_recorded(
                request, document, digest, poi_id,
                f"transaction {asked.key} is open on terminal {asked.poi_id}, not on "
                f"{poi_id}: {where}; a new status request needs a new ServiceID", "NotAllowed")
            return True
        named = ref.message_category
        if asked.extra.get("unmatched") and asked.poi_id != poi_id:
            # A record without its request is its terminal's word only (see check_reuse):
            # not this terminal's to answer with, nor to be asked about (its NotFound would
            # read "nothing was charged" for a payment the other terminal approved)
            self._refuse_recorded(
                request, document, digest, poi_id,
                f"transaction {asked.key} is an answer of terminal {asked.poi_id} the bridge "
                f"had no request for: send the status request to terminal {asked.poi_id}, "
                "with a new ServiceID",
                "NotAllowed")
            return True
        if asked.category not in MONEY_CATEGORIES or asked.outcome not in FINAL_MONEY_OUTCOMES \
                or not isinstance(asked.response, dict) \
                or not isinstance(asked.response.get("SaleToPOIResponse"), dict) \
                or (named is not None and str(named) != asked.category):
            return False
        header = request.message_header
        assert header is not None and header.sale_id and header.service_id
        # MessageReference's own fields, as the header: no other name the register wrote.
        # Kept by their JSON names (exclude= works on field names: an extra named like one,
        # "service_id", took the field's value out with it)
        own = {field.alias for field in type(ref).model_fields.values() if field.alias}
        reference = {name: value for name, value in ref.model_dump(
            mode="json", by_alias=True, exclude_unset=True).items() if name in own}
        response = builders.status_response(header, reference, asked.response)
        # (less authorised than asked: partial, as when the terminal answers it)
        classification = amounts_read(classify(parse_message(response)),
                                      payment_amounts(asked.request), None)
        outcome = record_outcome(classification)  # (a record saying Busy: declined)
        detail = (f"answered from the journal: {asked.key} ended {asked.outcome} on terminal "
                  f"{asked.poi_id} ({classification.detail})")
        now = self._clock()
        txn = Transaction(
            sale_id=header.sale_id, service_id=header.service_id, poi_id=poi_id,
            category=str(header.message_category), request=document, digest=digest,
            created_at=now, updated_at=now, state=TxState.FINAL,
            outcome=outcome.value, source="journal", response=response,
            detail=detail, passthrough=True)
        self.journal.save(txn)
        self.gateway.progress(Progress(txn.sale_id, txn.service_id, poi_id, "completed",
                                       f"{txn.outcome}: {detail}"))
        self.gateway.deliver(Deliver(txn.sale_id, txn.service_id, poi_id, txn.category,
                                     txn.outcome, "journal", response))
        return True

    def _known_repeat(self, document: Any, poi_id: str) -> bool:
        """Answer, as a repeat, a request that fails today's checks but that the journal holds
        identical: a copy the broker delivers again (QoS 1) to a bridge whose rules became
        stricter since it took the first. Refusing it would tell the register that a payment
        it may have been charged for was rejected."""
        header = request_header(document)
        sale_id, service_id = header.get("SaleID"), header.get("ServiceID")
        if not isinstance(sale_id, str) or not isinstance(service_id, str):
            return False
        existing = self.journal.get(TxKey(sale_id, service_id))
        if check_reuse(existing, request_digest(document), self._clock(),
                       poi_id=poi_id) is not Reuse.REPEAT:
            return False
        assert existing is not None
        self._repeat(existing)
        return True

    def _refusal(self, request: SaleToPOIRequest, poi_id: str) -> tuple[str, str] | None:
        """Why a well-formed, new request cannot start here: (error, ErrorCondition)."""
        header = request.message_header
        assert header is not None
        if not self.gateway.accepting:
            return ("the bridge is shutting down; nothing was sent to the terminal; retry with "
                    "a new ServiceID once it is back", "UnavailableService")
        # Another bridge on these topics takes this request too: only what cannot charge
        # (an Abort, a status request, about this bridge's own transactions) goes on
        other = self.gateway.other_bridge
        if other is not None and request.abort_request is None \
                and request.transaction_status_request is None:
            return other, "UnavailableService"
        worker = self.workers.get(poi_id)
        if worker is None:
            return (f"unknown terminal {poi_id}: not in this bridge's configuration; nothing "
                    "was sent. Check the POIID in the topic and the request against the "
                    "bridge's configuration (`poi-bridge status` lists its terminals), then "
                    "retry with a new ServiceID", "UnavailableDevice")
        allowed = worker.config.allowed_sale_ids
        if allowed is not None and header.sale_id not in allowed:
            return (f"SaleID {header.sale_id} may not use terminal {poi_id} (its "
                    "allowed_sale_ids); nothing was sent. Send the request to a terminal this "
                    "register may use, with a new ServiceID", "NotAllowed")
        foreign = _foreign_reference(request)
        if foreign is not None:
            return foreign, "NotAllowed"
        stale = self._stale(request)
        if stale:
            return stale, "NotAllowed"
        again = self._charges_again(request)
        return (again, "NotAllowed") if again else None

    def _charges_again(self, request: SaleToPOIRequest) -> str | None:
        """Why a new Payment may not start: it is a retry, under a new ServiceID, of a
        payment of the same sale (SaleID, SaleTransactionID.TransactionID, amount and
        currency) whose outcome is not known yet, on any terminal. The terminal may have
        charged that one (REFERENCE 2: never re-send a payment whose state is unknown), so
        the register is told to wait for its result or ask about it. A different amount (a
        second card of a split tender) is no retry, nor is anything after the earlier one
        ended; a register that knows the earlier one was not charged sends a new
        TransactionID."""
        payment = request.payment_request
        header = request.message_header
        if payment is None or header is None or str(header.message_category) != "Payment":
            return None
        sale_tx = payment.sale_data.sale_transaction_id
        if sale_tx is None or not sale_tx.transaction_id:
            return None
        amounts = payment.payment_transaction.amounts_req
        for earlier in self.journal.open_payments(header.sale_id, sale_tx.transaction_id):
            said = _amount_asked(earlier.request)
            if earlier.service_id == header.service_id or said is None \
                    or said != (_as_float(amounts.requested_amount),
                                amounts.currency.upper()):
                continue
            return _retry_error(earlier, sale_tx.transaction_id, said,
                                configured=earlier.poi_id in self.workers)
        return None

    def _refuse_recorded(self, request: SaleToPOIRequest, document: dict[str, Any], digest: str,
                         poi_id: str, error: str, condition: str) -> None:
        """Refused before it could start, and recorded final as the session records its own
        refusals. A copy the broker delivers again (QoS 1 is at least once; a broker killed
        before it saved our acknowledgement sends it again, perhaps to the next start of the
        bridge, where it would no longer be refused) then gets the same answer, instead of
        running on the terminal after the register was told 'rejected'."""
        header = request.message_header
        assert header is not None and header.sale_id and header.service_id
        category, now = str(header.message_category), self._clock()
        txn = Transaction(
            sale_id=header.sale_id, service_id=header.service_id, poi_id=poi_id,
            category=category, request=document, digest=digest, created_at=now,
            updated_at=now, state=TxState.FINAL, outcome=Outcome.REJECTED.value,
            source="bridge", detail=error,
            response=builders.failure_response(header, category, condition, error))
        trim_refused(txn)
        self.journal.save(txn)
        self._reject(document, poi_id, error, condition)

    def _repeat(self, existing: Any, how: str = "") -> None:
        """An identical repeat, or the same request rebuilt with a new TimeStamp for a retry:
        answer with what is known, start nothing."""
        gone = existing.state != TxState.FINAL and existing.poi_id not in self.workers
        if existing.outcome is not None or existing.state == "unresolved":
            result = stored_result(existing)
            if gone and result.outcome == "unresolved":  # (not "the bridge keeps asking")
                result = replace(result, error=(
                    f"outcome unknown: {existing.detail}; {_not_configured(existing.poi_id)}. "
                    "The terminal may have charged it: do not charge this sale again; check "
                    "that terminal's receipt or transaction report"))
            self.gateway.deliver(result)
        said = f"already known{how}, state {existing.state}; nothing was started"
        if gone:  # the result the register waits for would never come, unsaid
            said += f"; {_not_configured(existing.poi_id)}"
        self.gateway.progress(Progress(existing.sale_id, existing.service_id, existing.poi_id,
                                       "duplicate", said))

    def _stale(self, request: SaleToPOIRequest) -> str | None:
        """A request that waited in the broker (while the bridge was away, or the store's
        uplink) longer than request_max_age must not start a payment the shopper no longer
        stands at, nor a refund the cashier may have given since. One stamped as far ahead is
        refused too: with the clocks that far apart the check cannot tell a stale request,
        and it would start once the time came."""
        stamp, _ = _request_time_stamp(request)
        if stamp is None:
            return None
        now = self._wall()
        age = _age(stamp, now)
        if abs(age) <= self.request_max_age:
            return None
        clock = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds")
        if stamp.tzinfo is None:
            clock += ", the stamp read as this box's local time or as UTC: it has no zone"
        if not math.isfinite(age):  # a date the platform cannot place (0001-01-01...)
            return (f"request's SaleTransactionID.TimeStamp {stamp.isoformat()[:40]} is "
                    f"centuries from this box's clock ({clock}): not started; set it to when "
                    "the register builds the request, and retry with a new ServiceID")
        if age > 0:
            return (f"request is {age:.0f} s old (SaleTransactionID.TimeStamp) by this box's "
                    f"clock ({clock}); requests older than {self.request_max_age:.0f} s are not "
                    "started. If the shopper is at the till now, the TimeStamp is not when the "
                    "request was built, or the register's clock or this box's is wrong: set it "
                    "right, then retry with a new ServiceID")
        return (f"request is stamped {-age:.0f} s in the future (SaleTransactionID.TimeStamp) "
                f"by this box's clock ({clock}); more than {self.request_max_age:.0f} s apart, "
                "the register's clock or this box's is wrong: set them right (NTP), then retry "
                "with a new ServiceID")

    # --- operator commands ------------------------------------------------------------------------

    def _command(self, command: str, payload: bytes, reply: Reply) -> None:
        # (an unknown command's name is the sender's writing: the topic is filtered too)
        topic = self.topics.bridge_response(redact(command))
        echo: Any = None
        try:
            body = load_json(payload, max_size=64 * 1024) if payload.strip() else {}
            if not isinstance(body, dict):
                raise MessageError("the command body must be a JSON object")
            # (answers reach every operator, and head office through a chain's bridge)
            echo = redact_json(body.get("transaction"))
            if command not in COMMANDS:
                raise MessageError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
            unknown = sorted(set(body) - {*COMMAND_KEYS[command], "transaction"})
            if unknown:
                takes = ", ".join(COMMAND_KEYS[command]) or "no key"
                raise MessageError(f"unknown key(s) {', '.join(quoted(k, 40) for k in unknown)}; "
                                   f"{command} takes {takes} (and transaction, echoed)")
            data = getattr(self, f"_cmd_{command}")(body)
        except MessageError as exc:
            # (the error quotes what was sent: a SaleID, key names)
            reply.send(topic, {"status": "error", "data": None, "error": redact(str(exc)),
                               "transaction": echo})
            return
        answer = {"status": "ok", "data": data, "error": None, "transaction": echo}
        if isinstance(data, _Rows) and data.omitted:
            answer["omitted"] = data.omitted
        reply.send(topic, answer)

    def _cmd_resync(self, body: dict[str, Any]) -> dict[str, Any]:
        sale_id, service_id = body.get("sale_id"), body.get("service_id")
        if not isinstance(sale_id, str) or not isinstance(service_id, str):
            raise MessageError("resync needs sale_id and service_id")
        return self.resync(sale_id, service_id)

    def resync(self, sale_id: str, service_id: str) -> dict[str, Any]:
        txn = self.journal.get(TxKey(sale_id, service_id))
        if txn is None:
            raise MessageError(f"no transaction {sale_id}/{service_id} in the journal")
        worker = self.workers.get(txn.poi_id)
        if worker is None:
            raise MessageError(f"terminal {txn.poi_id} of {sale_id}/{service_id} is no longer "
                               "configured")
        if txn.category not in ("Payment", "Reversal", "StoredValue"):
            self.gateway.deliver(stored_result(txn))
            return {**summary(txn), "action": "republished from the journal"}
        if not worker.online:
            self.gateway.deliver(stored_result(txn))
            return {**summary(txn), "action": "terminal offline: republished from the journal"}
        worker.resync(txn)
        return {**summary(txn), "action": "asking the terminal; the result follows on the "
                                          "register's response topic"}

    def _cmd_transactions(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        # A filter that cannot match (a typo, a value from the retained document's own
        # vocabulary) must say so: an empty or unfiltered list would read as an answer.
        filters = {k: body.get(k) for k in _TRANSACTION_FILTERS}
        for key, value in filters.items():
            if value is not None and not isinstance(value, str):
                raise MessageError(f"{key} must be a string")
            known = _TRANSACTION_FILTERS[key]
            if value is not None and known and value not in known:
                hint = ("; unresolved is a state: ask for state unresolved"
                        if (key, value) == ("outcome", "unresolved") else "")
                raise MessageError(f"{key} {quoted(value, 40)!r} is none of {', '.join(known)}{hint}")
        limit = body.get("limit", 100)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise MessageError("limit must be a whole number from 1 to 1000")
        rows = _Rows()
        # The answer within max_payload: its own keys and the echoed "transaction" beside
        room = self.config.mqtt.max_payload - 256 - len(dumps(body.get("transaction")))
        found = self.journal.transactions(limit=limit, **filters)
        for txn in found:
            row = summary(txn)
            room -= len(dumps(row)) + 1
            if room < 0:  # a broker bounding packets would drop the bridge for a bigger one
                rows.omitted = len(found) - len(rows)
                break
            rows.append(row)
        return rows

    def _cmd_terminals(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        # (the counters here, not in the state document: they change with every frame)
        return [{**worker.state(), "counters": dict(worker.counters)}
                for worker in self.workers.values()]

    def _cmd_health(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._health()


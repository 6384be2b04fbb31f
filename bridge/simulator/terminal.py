"""The simulated terminal's logic, without I/O: requests and time in, scheduled answers out.

It keeps a ledger of every transaction it has seen (what the shopper "did"), answers status
polls from it exactly as the seed describes, and misbehaves on purpose when a scenario says
so. The ledger is what the soak test audits the bridge against.

Every receipt of a money request (Payment, Reversal) is also recorded, by (SaleID,
ServiceID): a request whose key the terminal already has is not processed again (a real
terminal does not run a duplicate ServiceID twice), but the ledger says how many times, when,
and whether each repeat can be a link-level retransmission of the same frame (the wire layer
says so: see `handle`), with what the wire layer knows of a copy: how long after the copy
before it came, and whether this side had acknowledged that one. A repeat that cannot is the
bridge sending a payment twice. Requests it never processed (answered Busy, lost on purpose,
or unreadable: encrypted with a key it does not hold) are in the ledger too, by their
receipts: a payment that reached the wrong device, or reached this one twice, shows even when
nothing was charged. Only requests whose SaleID and ServiceID are strings are recorded (a
header with anything else there names no transaction). So are the money requests the wire
layer dropped unread while the terminal played dead (`mute`): a receipt "dropped", never
acknowledged; and every frame so dropped, whatever its category, is listed in
`dropped_unread` (a bridge that sent a payment again after such a drop, rather than asking
about it, shows there).

The terminal never forgets a transaction: a status poll about one it has is answered from
its ledger for as long as it runs, so a NotFound it records about a key always came before
that key arrived.
"""

from __future__ import annotations

import json
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bridge.simulator import responses

Decision = Literal["approve", "partial", "decline", "cancel", "busy"]


class Behaviour(BaseModel):
    """How the terminal handles one transaction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    decision: Decision = "approve"
    # For decision "partial" (Result Partial): the amount authorised, or reversed; half the
    # amount asked when unset
    authorised: float | None = Field(default=None, ge=0)
    delay: float = Field(default=0.0, ge=0, description="processing time in seconds")
    never_answer: bool = False  # decide, remember, but never send the response
    lose_request: bool = False  # behave as if the request never arrived (status: NotFound)
    in_progress_polls: int = Field(default=0, ge=0)  # answer InProgress to this many polls
    response_file: Path | None = None  # answer with this document, IDs rewritten
    drop_link: bool = False  # close the link right after reading the request
    # Selectors: which transaction this entry is for (none: the next one in arrival order).
    service_id: str | None = None
    amount: float | None = None
    # With amount: every amount from `amount` up to, not including, this one (the soak gives
    # each payment an amount of its own and picks the behaviour by the range of its kind)
    amount_below: float | None = None

    @model_validator(mode="after")
    def _amount_range(self) -> Behaviour:
        if self.amount_below is not None and (self.amount is None
                                              or self.amount_below <= self.amount):
            raise ValueError("amount_below needs an amount below it")
        return self

    def takes_amount(self, asked: Any) -> bool:
        """Whether this entry is for a request asking `asked`: that very amount, or with
        amount_below one in [amount, amount_below)."""
        if self.amount is None or asked is None:
            return False
        if self.amount_below is None:
            return bool(self.amount == asked)
        return isinstance(asked, int | float) and not isinstance(asked, bool) \
            and self.amount <= asked < self.amount_below


class LinkBehaviour(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    garbage_rate: float = Field(default=0.0, ge=0, le=1)  # chance of junk bytes before a frame
    corrupt_rate: float = Field(default=0.0, ge=0, le=1)  # chance a received frame is damaged (-> NAK)
    baud: int = Field(default=0, ge=0)  # pace written bytes at this rate (0: as fast as possible)
    status_hold: float = Field(default=0.5, ge=0)  # the terminal's own delay before InProgress
    replug_after: float = Field(default=1.0, ge=0)  # seconds between drop_link and the new link
    # How long after a frame's first copy arrived a byte-identical copy can still be the
    # peer's framer sending it again for want of an ACK: its max_tries x ack_timeout, plus
    # what may delay its writes. None: this side's own framer's max_tries x ack_timeout.
    retransmit_window: float | None = Field(default=None, gt=0)
    seed: int = 0


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    poi_id: str = "V400m-324688179"
    default: Behaviour = Behaviour()
    transactions: list[Behaviour] = Field(default_factory=list)
    link: LinkBehaviour = LinkBehaviour()

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls.model_validate(data)


@dataclass(slots=True)
class LedgerEntry:
    sale_id: str
    service_id: str
    category: str
    request: dict[str, Any]
    behaviour: Behaviour
    received_at: float
    completes_at: float
    response: dict[str, Any] | None = None  # set once the transaction completed
    outcome: str | None = None  # approve, partial, decline, cancel, abort, busy
    polls_answered: int = 0
    answered: bool = False  # the response was sent on the wire

    @property
    def charged(self) -> bool:
        return self.category == "Payment" and self.outcome in ("approve", "partial")


@dataclass(slots=True)
class Receipt:
    """One arrival of a money request at the terminal."""

    at: float
    retransmission: bool  # the wire layer says it can be a link-level copy of the frame before
    # what the terminal did: processed, busy, duplicate (ignored), lost, unreadable (a key it
    # does not hold), dropped (unread and unacknowledged: it was muted)
    answer: str
    # Of a byte-identical copy of the frame just before it (the wire layer's account, else
    # None): seconds since that copy arrived, and how long this side's ACK of it had been on
    # the line when this one came (None: not acknowledged yet, or a NAK this side wrote
    # around that ACK may have had the peer send the frame again)
    gap: float | None = None
    acked_before: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"at": round(self.at, 3), "retransmission": self.retransmission,
                "answer": self.answer, "gap": _rounded(self.gap),
                "acked_before": _rounded(self.acked_before)}


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _key(header: dict[str, Any]) -> tuple[str, str] | None:
    """(SaleID, ServiceID) of a request header; None unless both are strings (a list or a
    number there names no transaction, and is no dictionary key)."""
    sale_id, service_id = header.get("SaleID", ""), header.get("ServiceID", "")
    if not isinstance(sale_id, str) or not isinstance(service_id, str):
        return None
    return sale_id, service_id


@dataclass(slots=True)
class Answer:
    at: float
    document: dict[str, Any]
    entry: LedgerEntry | None = None  # a response that an abort may still replace

    @property
    def obsolete(self) -> bool:
        return self.entry is not None and self.entry.response is not self.document


@dataclass(slots=True)
class Reaction:
    answers: list[Answer] = field(default_factory=list)
    drop_link: bool = False


class SimulatedTerminal:
    def __init__(self, scenario: Scenario | None = None) -> None:
        self.scenario = scenario or Scenario()
        self.ledger: dict[tuple[str, str], LedgerEntry] = {}
        # every arrival of a money request, processed or not, by (SaleID, ServiceID)
        self.receipts: dict[tuple[str, str], list[Receipt]] = {}
        # what each money request asked, by (SaleID, ServiceID), from its first receipt:
        # (category, requested amount, currency, PaymentType: None when the request has none,
        # the register's SaleTransactionID.TransactionID)
        self.asked: dict[tuple[str, str], tuple[str, Any, Any, Any, Any]] = {}
        # every frame the wire layer dropped unread while muted, any category (dropped())
        self.dropped_unread: list[dict[str, Any]] = []
        # when a status poll about a key was answered NotFound (the terminal had no record)
        self.not_found: dict[tuple[str, str], list[float]] = {}
        self._script = list(self.scenario.transactions)
        self._current: LedgerEntry | None = None  # the payment the "shopper" is busy with
        self._last: LedgerEntry | None = None
        self.rng = random.Random(self.scenario.link.seed)

    # --- scripting ------------------------------------------------------------------------------

    def _behaviour_for(self, header: dict[str, Any], request: dict[str, Any]) -> Behaviour:
        amount = (request.get("PaymentRequest", {}).get("PaymentTransaction", {})
                  .get("AmountsReq", {}).get("RequestedAmount"))
        for i, entry in enumerate(self._script):
            if entry.service_id is not None and entry.service_id == header.get("ServiceID"):
                return self._script.pop(i)
            if entry.takes_amount(amount):
                return entry  # amount-keyed entries apply every time
        for i, entry in enumerate(self._script):
            if entry.service_id is None and entry.amount is None:
                return self._script.pop(i)
        return self.scenario.default

    def script(self, behaviour: Behaviour) -> None:
        self._script.append(behaviour)

    # --- the terminal -----------------------------------------------------------------------

    def handle(self, document: dict[str, Any], now: float, *,
               retransmission: bool = False, gap: float | None = None,
               acked_before: float | None = None) -> Reaction:
        """One request from the bridge. `retransmission`: the wire layer received this very
        frame just before, byte for byte, on the same link connection, with no other frame
        between, within the framer's max_tries copies and the link's retransmit_window, and
        before the bridge acknowledged an answer to it, so it can be the bridge's framer
        sending it again for want of an ACK (a link-level copy, not a second request).
        `gap`, `acked_before`: of such a copy, see Receipt (recorded, judged by the reader of
        the ledger).

        A real terminal names itself in every answer: its own POIID, not the request's."""
        reaction = self._answer(document, now, Receipt(now, retransmission, "processed", gap,
                                                       acked_before))
        for answer in reaction.answers:
            for root in answer.document.values():
                if isinstance(root, dict) and isinstance(root.get("MessageHeader"), dict):
                    root["MessageHeader"]["POIID"] = self.scenario.poi_id
        return reaction

    def _answer(self, document: dict[str, Any], now: float, receipt: Receipt) -> Reaction:
        request = document.get("SaleToPOIRequest")
        if not isinstance(request, dict) or not isinstance(request.get("MessageHeader"), dict):
            return Reaction()  # a real terminal answers junk with silence or an event
        header = request["MessageHeader"]
        category = header.get("MessageCategory")
        if category in ("Payment", "Reversal"):
            key = _key(header)
            if key is None:
                return Reaction()  # junk too: no transaction it could run or look up
            self._receipt(request, header, key, receipt)
            reaction, receipt.answer = self._money(document, request, header, now)
            return reaction
        if category == "TransactionStatus":
            return self._status(document, request, now)
        if category == "Abort":
            return self._abort(request, now)
        if category == "Diagnosis":
            return Reaction([Answer(now, responses.simple_response(document, body={
                "POIStatus": {"GlobalStatus": "OK", "PrinterStatus": "OK"},
                "LoggedSaleID": [header.get("SaleID", "")],
            }))])
        if category in ("Login", "Logout"):
            return Reaction([Answer(now, responses.simple_response(document))])
        return Reaction([Answer(now, responses.simple_response(document, result="Failure"))])

    def _receipt(self, request: dict[str, Any], header: dict[str, Any], key: tuple[str, str],
                 receipt: Receipt) -> None:
        receipts = self.receipts.setdefault(key, [])
        receipt.retransmission = receipt.retransmission and bool(receipts)
        receipts.append(receipt)
        if self.asked.get(key, (None, None))[1] is None:  # (unreadable: asked unknown)
            category = header.get("MessageCategory", "")
            body = request.get(f"{category}Request")
            body = body if isinstance(body, dict) else {}
            if category == "Payment":
                amounts = _dict(_dict(body.get("PaymentTransaction")).get("AmountsReq"))
                asked = (amounts.get("RequestedAmount"), amounts.get("Currency"),
                         _dict(body.get("PaymentData")).get("PaymentType"),
                         _dict(_dict(body.get("SaleData")).get("SaleTransactionID")).get(
                             "TransactionID"))
            else:
                asked = (body.get("ReversedAmount"), None, None, None)
            self.asked[key] = (category, *asked)

    def unreadable(self, document: dict[str, Any], now: float, *,
                   retransmission: bool = False, gap: float | None = None,
                   acked_before: float | None = None) -> None:
        """A request this terminal could not decrypt (encrypted with a key it does not hold):
        a real one answers a crypto error and does nothing else, but a money request's header
        travels in clear, so its arrival is recorded as a receipt (the bridge sent it to this
        device, perhaps the wrong one), if its IDs are strings."""
        request = document.get("SaleToPOIRequest") if isinstance(document, dict) else None
        header = request.get("MessageHeader") if isinstance(request, dict) else None
        if isinstance(header, dict) and header.get("MessageCategory") in ("Payment", "Reversal"):
            key = _key(header)
            if key is not None:
                self._receipt({}, header, key, Receipt(now, retransmission, "unreadable", gap,
                                                       acked_before))

    def dropped(self, document: Any, now: float, *, retransmission: bool = False,
                gap: float | None = None, acked_before: float | None = None) -> None:
        """A whole frame the wire layer read and dropped while the terminal played dead
        (muted: no ACK, no answer, nothing done). Listed in dropped_unread, whatever it is;
        a money request with string IDs also gets a receipt "dropped" (the wire layer's
        account of a copy as in handle). `document`: the frame as JSON, decrypted if the
        terminal's key reads it (else its header, in clear, is all there is)."""
        request = document.get("SaleToPOIRequest") if isinstance(document, dict) else None
        request = request if isinstance(request, dict) else {}
        header = _dict(request.get("MessageHeader"))
        category = header.get("MessageCategory")
        amounts = _dict(_dict(_dict(request.get("PaymentRequest")).get("PaymentTransaction"))
                        .get("AmountsReq"))
        self.dropped_unread.append({
            "at": round(now, 3), "category": category, "sale_id": header.get("SaleID"),
            "service_id": header.get("ServiceID"),
            "amount": amounts.get("RequestedAmount"), "currency": amounts.get("Currency")})
        key = _key(header)
        if category in ("Payment", "Reversal") and key is not None:
            self._receipt(request, header, key, Receipt(now, retransmission, "dropped", gap,
                                                        acked_before))

    def _money(self, document, request, header, now) -> tuple[Reaction, str]:
        """The reaction, and what the terminal did with the request (for its receipt)."""
        key = _key(header)
        assert key is not None  # (checked by _answer)
        behaviour = self._behaviour_for(header, request)
        if behaviour.lose_request:
            return Reaction(), "lost"
        if self._current is not None and now < self._current.completes_at:
            busy = responses.payment_response(document, "busy", now)
            return Reaction([Answer(now, busy)]), "busy"
        if key in self.ledger:
            # a terminal does not process a duplicate ServiceID twice (its receipt is kept)
            return Reaction(), "duplicate"
        entry = LedgerEntry(key[0], key[1], header["MessageCategory"], document, behaviour,
                            received_at=now, completes_at=now + behaviour.delay)
        self.ledger[key] = entry
        self._current = self._last = entry
        reaction = Reaction(drop_link=behaviour.drop_link)
        entry.outcome = behaviour.decision
        if behaviour.response_file is not None:
            canned = json.loads(Path(behaviour.response_file).read_text())
            entry.response = responses.rewrite_ids(canned, document)
        else:
            entry.response = responses.payment_response(document, behaviour.decision,
                                                         entry.completes_at,
                                                         authorised=behaviour.authorised)
        if not behaviour.never_answer and not behaviour.drop_link:
            reaction.answers.append(Answer(entry.completes_at, entry.response, entry))
            entry.answered = True
        return reaction, "processed"

    def _status(self, document, request, now) -> Reaction:
        ref = _dict(_dict(request.get("TransactionStatusRequest")).get("MessageReference"))
        key = _key(ref) if ref else None
        if ref:
            entry = self.ledger.get(key) if key is not None else None
        else:
            entry = self._last  # without MessageReference: the most recent transaction
        if entry is None:
            if key is not None:
                self.not_found.setdefault(key, []).append(now)
            return Reaction([Answer(now, responses.status_not_found(document))])
        hold = self.scenario.link.status_hold
        if now < entry.completes_at or entry.polls_answered < entry.behaviour.in_progress_polls:
            entry.polls_answered += 1
            # The terminal itself paces status polls: it holds InProgress answers a moment.
            at = min(entry.completes_at, now + hold) if now < entry.completes_at else now + hold
            return Reaction([Answer(at, responses.status_in_progress(document))])
        entry.polls_answered += 1
        assert entry.response is not None
        return Reaction([Answer(now, responses.status_success(document, entry.response))])

    def _abort(self, request, now) -> Reaction:
        key = _key(_dict(_dict(request.get("AbortRequest")).get("MessageReference")))
        entry = self.ledger.get(key) if key is not None else None
        if entry is None or entry.completes_at <= now:
            return Reaction()  # nothing to abort: the transaction already ended
        entry.outcome = "abort"
        entry.completes_at = now
        entry.response = responses.payment_response(entry.request, "abort", now)
        if entry.behaviour.never_answer or entry.behaviour.drop_link:
            return Reaction()
        return Reaction([Answer(now, entry.response)])

    def summary(self) -> dict[str, Any]:
        """The ledger as JSON, one entry per money request that arrived, processed or not.
        `received`: how many times the request arrived (1 normally); `receipts`: each arrival
        (time, whether it can be a link-level retransmission, what the terminal did with it),
        from the first, including arrivals refused Busy before the one that was processed.
        A request never processed (only refused Busy, lost on purpose, unreadable, dropped) has
        `outcome` None and is not charged. `amount`, `currency`: what the request asked;
        `authorised`: the amount the terminal's response says moved (Payment).
        `payment_type`: the PaymentType the request asked (None: it had none, which means
        Normal). `transaction_id`: the SaleTransactionID.TransactionID a Payment asked
        (the register's sale). `status_not_found`: when a status poll about it was answered
        NotFound (always before it arrived: the terminal never forgets one). A receipt
        "dropped" is a copy the terminal dropped unread while muted (dropped_unread lists
        every such frame, money or not)."""
        out: dict[str, Any] = {}
        for key in [*self.ledger, *(k for k in self.receipts if k not in self.ledger)]:
            entry = self.ledger.get(key)
            category, amount, currency, payment_type, transaction_id = self.asked.get(
                key, (entry.category if entry else "", None, None, None, None))
            authorised = None
            if entry is not None and entry.response is not None:
                body = entry.response.get("SaleToPOIResponse", {}).get(f"{category}Response", {})
                if category == "Payment":
                    authorised = body.get("PaymentResult", {}).get("AmountsResp", {}).get(
                        "AuthorizedAmount")
                else:
                    authorised = body.get("ReversedAmount")
            receipts = self.receipts.get(key, [])
            out[f"{key[0]}/{key[1]}"] = {
                "category": category, "outcome": entry.outcome if entry else None,
                "charged": entry.charged if entry else False,
                "answered": entry.answered if entry else False,
                "amount": amount, "currency": currency, "payment_type": payment_type,
                "transaction_id": transaction_id,
                "authorised": authorised,
                "received": len(receipts), "receipts": [r.as_json() for r in receipts],
                "status_not_found": [round(at, 3) for at in self.not_found.get(key, [])]}
        return out


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}

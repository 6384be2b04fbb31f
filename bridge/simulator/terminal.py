"""The simulated terminal's logic, without I/O: requests and time in, scheduled answers out.

It keeps a ledger of every transaction it has seen (what the shopper "did"), answers status
polls from it exactly as the seed describes, and misbehaves on purpose when a scenario says
so. The ledger is what the soak test audits the bridge against.

Every receipt of a money request (Payment, Reversal) is also recorded, by (SaleID,
ServiceID): a request whose key the terminal already has is not processed again (a real
terminal does not run a duplicate ServiceID twice), but the ledger says how many times, when,
and whether each repeat can be a link-level retransmission of the same frame (the wire layer
says so: see `handle`). A repeat that cannot is the bridge sending a payment twice.
"""

from __future__ import annotations

import json
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class LinkBehaviour(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    garbage_rate: float = Field(default=0.0, ge=0, le=1)  # chance of junk bytes before a frame
    corrupt_rate: float = Field(default=0.0, ge=0, le=1)  # chance a received frame is damaged (-> NAK)
    baud: int = Field(default=0, ge=0)  # pace written bytes at this rate (0: as fast as possible)
    status_hold: float = Field(default=0.5, ge=0)  # the terminal's own delay before InProgress
    replug_after: float = Field(default=1.0, ge=0)  # seconds between drop_link and the new link
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
    answer: str  # what the terminal did: processed, busy, duplicate (ignored), lost

    def as_json(self) -> dict[str, Any]:
        return {"at": round(self.at, 3), "retransmission": self.retransmission,
                "answer": self.answer}


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
            if entry.amount is not None and amount is not None and entry.amount == amount:
                return entry  # amount-keyed entries apply every time
        for i, entry in enumerate(self._script):
            if entry.service_id is None and entry.amount is None:
                return self._script.pop(i)
        return self.scenario.default

    def script(self, behaviour: Behaviour) -> None:
        self._script.append(behaviour)

    # --- the terminal -----------------------------------------------------------------------

    def handle(self, document: dict[str, Any], now: float, *,
               retransmission: bool = False) -> Reaction:
        """One request from the bridge. `retransmission`: the wire layer received this very
        frame just before, byte for byte, on the same link connection, with no other frame
        between and within the framer's max_tries copies, so it can be the bridge's framer
        sending it again for want of an ACK (a link-level copy, not a second request).

        A real terminal names itself in every answer: its own POIID, not the request's."""
        reaction = self._answer(document, now, retransmission)
        for answer in reaction.answers:
            for root in answer.document.values():
                if isinstance(root, dict) and isinstance(root.get("MessageHeader"), dict):
                    root["MessageHeader"]["POIID"] = self.scenario.poi_id
        return reaction

    def _answer(self, document: dict[str, Any], now: float,
                retransmission: bool = False) -> Reaction:
        request = document.get("SaleToPOIRequest")
        if not isinstance(request, dict) or not isinstance(request.get("MessageHeader"), dict):
            return Reaction()  # a real terminal answers junk with silence or an event
        header = request["MessageHeader"]
        category = header.get("MessageCategory")
        if category in ("Payment", "Reversal"):
            receipts = self.receipts.setdefault(
                (header.get("SaleID", ""), header.get("ServiceID", "")), [])
            receipt = Receipt(now, retransmission and bool(receipts), "processed")
            receipts.append(receipt)
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

    def _money(self, document, request, header, now) -> tuple[Reaction, str]:
        """The reaction, and what the terminal did with the request (for its receipt)."""
        key = (header.get("SaleID", ""), header.get("ServiceID", ""))
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
        ref = request.get("TransactionStatusRequest", {}).get("MessageReference")
        if ref:
            entry = self.ledger.get((ref.get("SaleID", ""), ref.get("ServiceID", "")))
        else:
            entry = self._last  # without MessageReference: the most recent transaction
        if entry is None:
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
        ref = request.get("AbortRequest", {}).get("MessageReference", {})
        entry = self.ledger.get((ref.get("SaleID", ""), ref.get("ServiceID", "")))
        if entry is None or entry.completes_at <= now:
            return Reaction()  # nothing to abort: the transaction already ended
        entry.outcome = "abort"
        entry.completes_at = now
        entry.response = responses.payment_response(entry.request, "abort", now)
        if entry.behaviour.never_answer or entry.behaviour.drop_link:
            return Reaction()
        return Reaction([Answer(now, entry.response)])

    def summary(self) -> dict[str, Any]:
        """The ledger as JSON. `received`: how many times the request arrived (1 normally);
        `receipts`: each arrival (time, whether it can be a link-level retransmission, what
        the terminal did with it), from the first, including arrivals refused Busy before
        the one that was processed."""
        return {
            f"{sale}/{service}": {"category": e.category, "outcome": e.outcome,
                                  "charged": e.charged, "answered": e.answered,
                                  "received": len(self.receipts.get((sale, service), [])),
                                  "receipts": [r.as_json() for r in
                                               self.receipts.get((sale, service), [])]}
            for (sale, service), e in self.ledger.items()
        }

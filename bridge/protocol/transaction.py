"""One transaction as the bridge tracks it, and the rules that decide whether a register's
request is new, a harmless repeat, or a refused reuse of a ServiceID.

A Transaction is plain data: the journal stores it, the terminal session changes it. Times
are wall-clock seconds (they must survive a restart of the daemon).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Container
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

SERVICE_ID_REUSE_WINDOW = 48 * 3600.0  # the seed: ServiceID unique per SaleID for 48 hours


class TxState(StrEnum):
    ACCEPTED = "accepted"  # recorded; not yet written to the terminal
    AWAITING_RESPONSE = "awaiting_response"  # written; waiting up to payment_timeout
    POLLING = "polling"  # outcome unknown; asking the terminal with status polls
    UNRESOLVED = "unresolved"  # reported unresolved; still polled in the background
    FINAL = "final"  # outcome known, recorded, reported

    @property
    def is_open(self) -> bool:
        return self is not TxState.FINAL


@dataclass(frozen=True, slots=True)
class TxKey:
    sale_id: str
    service_id: str

    def __str__(self) -> str:
        return f"{self.sale_id}/{self.service_id}"


@dataclass(slots=True)
class Transaction:
    sale_id: str
    service_id: str
    poi_id: str
    category: str
    request: dict[str, Any]
    digest: str
    created_at: float
    state: TxState = TxState.ACCEPTED
    updated_at: float = 0.0
    sent_at: float | None = None
    deadline: float | None = None  # end of the current wait (response or poll answer)
    next_poll_at: float | None = None
    poll_ids: tuple[str, ...] = ()
    polls_sent: int = 0
    unanswered_polls: int = 0  # consecutive polls without a usable answer
    reconcile_attempts: int = 0
    outcome: str | None = None
    source: str | None = None  # terminal, status-poll, bridge
    response: dict[str, Any] | None = None
    detail: str = ""
    passthrough: bool = False  # a register's own TransactionStatus or Abort: never polled
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> TxKey:
        return TxKey(self.sale_id, self.service_id)

    def stamps(self) -> list[float]:
        """Its stamps (not its deadlines) that are set."""
        return [value for name in STAMP_FIELDS if (value := getattr(self, name)) is not None]

    def shift_times(self, delta: float, keep: Container[float] = ()) -> None:
        """Move by `delta` the times this run set, after its clock moved to follow a step of
        the system clock (see SteadyClock.shift; the journal's shift_times moves the same):
        every stamp but those in `keep` (an earlier run's), and every deadline (this run set
        them all). A stamp of an earlier run was right and stays: moved, a restored
        payment's time-outs lay `delta` further off, and it looked sent after this run's."""
        for name in STAMP_FIELDS:
            value = getattr(self, name)
            if value is not None and value not in keep:
                setattr(self, name, value + delta)
        for name in DEADLINE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value + delta)

    def snapshot(self) -> Transaction:
        return replace(self, request=self.request, extra=dict(self.extra))


def request_digest(document: dict[str, Any]) -> str:
    """A fingerprint of a request, to tell an identical repeat from a different request that
    reuses the ServiceID. Key order and white space do not matter."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# A Transaction's times, all on the daemon's clock: stamps of what happened, and deadlines
STAMP_FIELDS = ("created_at", "updated_at", "sent_at")
DEADLINE_FIELDS = ("deadline", "next_poll_at")


class Reuse(StrEnum):
    NEW = "new"
    REPEAT = "repeat"  # identical request: answer with what is known, start nothing
    # The same request rebuilt for a retry, with a new SaleTransactionID.TimeStamp: a repeat
    RETRY = "retry"
    CONFLICT = "conflict"  # same SaleID+ServiceID, different request, within 48 h: refuse


def check_reuse(existing: Transaction | None, digest: str, now: float,
                document: dict[str, Any] | None = None, poi_id: str | None = None) -> Reuse:
    """How a request with `digest` (and, to tell a rebuilt retry, its `document`) for
    terminal `poi_id` relates to the transaction the journal has under the same SaleID and
    ServiceID. Past 48 h the IDs may be used again, but not while that transaction is open
    (unresolved, or given up on): a new request would replace the record of a payment the
    terminal may have charged."""
    if existing is None or (now - existing.created_at > SERVICE_ID_REUSE_WINDOW
                            and existing.state is TxState.FINAL):
        return Reuse.NEW
    if existing.extra.get("unmatched") and poi_id is not None and existing.poi_id != poi_id:
        # A terminal's answer kept without its request answers a request for that terminal
        # only: a message written in clear on a keyless terminal's link, under IDs a till
        # had not used yet, answered that till's later payment on a keyed terminal
        # `approved` from the journal, never sent to it (a review)
        return Reuse.CONFLICT
    if existing.digest == digest or existing.extra.get("unmatched"):
        # (the terminal's own answer, kept without the request the journal lost: whatever
        # comes under these IDs is answered with it, never sent again)
        return Reuse.REPEAT
    if document is None:
        return Reuse.CONFLICT
    kept = existing.extra.get("retry_digest")  # a large refused request: its header only
    same = retry_digest(document) == kept if kept is not None \
        else first_difference(existing.request, document) is None
    return Reuse.RETRY if same else Reuse.CONFLICT


# A refused request's record keeps the whole document up to this size (JSON text): enough
# for any real request. Past it only the header is kept, with a digest of the request less
# its TimeStamps (the full digest still recognises a repeat, this one a retry rebuilt with a
# new TimeStamp): refused requests (Busy, an unknown terminal, too old) are kept 48 h, and a
# register publishing large ones must not fill the box's disk with them.
REFUSED_REQUEST_KEPT = 8 * 1024


def trim_refused(txn: Transaction) -> None:
    """Keep of a request refused before it reached the terminal what REFUSED_REQUEST_KEPT
    allows."""
    document = txn.request
    if len(json.dumps(document, separators=(",", ":"), ensure_ascii=False)) \
            <= REFUSED_REQUEST_KEPT:
        return
    inner = document.get("SaleToPOIRequest")
    header = inner.get("MessageHeader") if isinstance(inner, dict) else None
    txn.extra["retry_digest"] = retry_digest(document)
    txn.request = {"SaleToPOIRequest": {"MessageHeader": header}}


def retry_digest(document: dict[str, Any]) -> str:
    """request_digest() of the request without each body's SaleTransactionID.TimeStamp, its
    numbers compared as first_difference() does: a register rebuilding 12.0 as 12 retries."""
    inner = document.get("SaleToPOIRequest")
    if not isinstance(inner, dict):
        return request_digest(_numbers_by_value(document))
    return request_digest(_numbers_by_value({"SaleToPOIRequest": {
        name: _without_time_stamp(body) for name, body in inner.items()}}))


def _numbers_by_value(value: Any) -> Any:
    """`value` with every whole float as an int (12.0 as 12), so equal numbers print alike.
    A document without such floats comes back printing as before: digests already journaled
    stay valid."""
    if isinstance(value, dict):
        return {key: _numbers_by_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers_by_value(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _without_time_stamp(body: Any) -> Any:
    data_key, ids_key, stamp_key = _TIME_STAMP_PATH
    data = body.get(data_key) if isinstance(body, dict) else None
    ids = data.get(ids_key) if isinstance(data, dict) else None
    if not isinstance(ids, dict) or stamp_key not in ids:
        return body
    unstamped = {k: v for k, v in ids.items() if k != stamp_key}
    return {**body, data_key: {**data, ids_key: unstamped}}


# Where a register's request carries the time it was built: a register that retries after a
# time-out often builds the request again, and only this changes.
_TIME_STAMP_PATH = ("SaleData", "SaleTransactionID", "TimeStamp")


def first_difference(recorded: Any, request: Any, path: tuple[str, ...] = ()) -> str | None:
    """The first place (a dotted path, no values: a technician may read it in a log) where
    `request` differs from `recorded`, not counting each body's SaleTransactionID.TimeStamp;
    None when they are the same request. Key order does not matter; 12 and 12.0 are equal."""
    if isinstance(recorded, dict) and isinstance(request, dict):
        for key in sorted(recorded.keys() | request.keys()):
            here = (*path, key)
            if len(here) == 5 and here[0] == "SaleToPOIRequest" and here[2:] == _TIME_STAMP_PATH:
                continue
            if key not in recorded or key not in request:
                return ".".join(here)
            found = first_difference(recorded[key], request[key], here)
            if found is not None:
                return found
        return None
    if isinstance(recorded, list) and isinstance(request, list):
        if len(recorded) != len(request):
            return ".".join(path) or "(the document)"
        for i, (a, b) in enumerate(zip(recorded, request, strict=True)):
            found = first_difference(a, b, (*path, f"[{i}]"))
            if found is not None:
                return found
        return None
    same = type(recorded) is type(request) or (
        isinstance(recorded, int | float) and isinstance(request, int | float)
        and not isinstance(recorded, bool) and not isinstance(request, bool))
    return None if same and recorded == request else (".".join(path) or "(the document)")

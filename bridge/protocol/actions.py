"""What a terminal session asks its shell to do, in order: the sans-I/O core's only output.

`Record` (commit to the journal) always comes before the `Send` (write to the terminal) or
`Deliver` (a result for a register) that depends on it; `Progress` is an event for the
cashier's screen, `Log` a line for the technician, `Unmatched` a terminal's final answer no
open transaction claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.protocol.transaction import Transaction


@dataclass(frozen=True, slots=True)
class Record:
    transaction: Transaction


@dataclass(frozen=True, slots=True)
class Send:
    document: dict[str, Any]
    sale_id: str
    service_id: str
    purpose: str  # request, status-poll, abort, passthrough, identify
    # An identity check encrypted with this other terminal's key rather than the link's own
    # (the device may be that terminal, on a swapped cable): see identity.py
    key_of: str | None = None


@dataclass(frozen=True, slots=True)
class Deliver:
    sale_id: str
    service_id: str
    poi_id: str
    category: str
    outcome: str
    source: str  # terminal, status-poll, bridge
    response: dict[str, Any] | None
    error: str | None = None
    # On the refusal of a different request reusing a transaction's SaleID and ServiceID:
    # what stands under those IDs ({"state", "outcome"}). Published under the same IDs, the
    # refusal must not read as that transaction's result.
    conflict: dict[str, Any] | None = None
    # On the terminal's final answer after the bridge had published a conclusion of its own
    # under those IDs (`not_found`, `error`): the outcome it corrects
    corrects: str | None = None
    # The transaction's `accepted` event went out, and with it a retained `in_progress`
    # document: a refusal that ends it after that must replace that document, or a register
    # that lost its response reads "in progress" there until the document expires.
    accepted: bool = False
    # The session logged this event itself, in one line of its own (an unresolved or
    # abandoned transaction): the shell adds no result line saying it again
    logged: bool = False


@dataclass(frozen=True, slots=True)
class Progress:
    sale_id: str
    service_id: str
    poi_id: str
    event: str
    detail: str = ""
    poll: int | None = None


@dataclass(frozen=True, slots=True)
class Log:
    level: str  # debug, info, warning, error
    message: str


@dataclass(frozen=True, slots=True)
class Unmatched:
    """The terminal's final answer to a money request this session has no open transaction
    for: a late copy of one it finished (the journal has it), or one the journal lost (it
    was replaced or moved aside while the terminal worked). The shell tells them apart: the
    second is recorded and published, so the register still hears what it was charged.
    `found_by`: the register's status request (its key) whose answer was this record, in
    the shape of the original response; then it only corrects a conclusion the bridge
    drew itself (`not_found`), the asking register having been told already."""
    sale_id: str
    service_id: str
    category: str
    outcome: str
    response: dict[str, Any]
    detail: str
    found_by: str | None = None


Action = Record | Send | Deliver | Progress | Log | Unmatched

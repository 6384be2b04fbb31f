"""The register-facing MQTT contract: topic names and payload shapes, in one place.

The README documents these shapes; registers in any language depend on them.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Any, NamedTuple

from bridge.protocol import jsontext
from bridge.protocol.actions import Deliver, Progress
from bridge.protocol.messages import HEADER_NAMES
from bridge.protocol.outcome import amount_value, dig, unresolved_error
from bridge.protocol.transaction import Transaction, TxKey
from bridge.redaction import redact

TOPIC_UNSAFE = frozenset("/+#\x00")

# What MQTT forbids in a topic name (wildcards, NUL, UTF-16 surrogates) and what mosquitto
# drops the connection for (control characters, Unicode non-characters).
_TOPIC_FORBIDDEN = re.compile(r"[+#\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")
MAX_TOPIC_BYTES = 65535


def topic_problem(topic: object) -> str | None:
    """Why `topic` cannot be published to, or None when it can."""
    if not isinstance(topic, str):
        return "it is not text"
    if not topic:
        return "it is empty"
    bad = _TOPIC_FORBIDDEN.search(topic)
    if bad is not None:
        return f"it contains {bad.group()!r}, which a topic to publish to may not"
    # (at most 4 bytes a character: most topics need no encoding to be measured)
    if len(topic) * 4 > MAX_TOPIC_BYTES and len(topic.encode()) > MAX_TOPIC_BYTES:
        return f"it is longer than MQTT's {MAX_TOPIC_BYTES} bytes"
    return None


def topic_safe(part: str | None) -> bool:
    """Whether an ID can stand as one level of an MQTT topic (None, a route without a
    SaleID, cannot)."""
    if not part:
        return False
    return len(part) <= 128 and _topic_safe_text(part)


# Asked of the same few SaleIDs for every event and result (1.4 % of the daemon's CPU at 64
# terminals before the cache); bounded, so IDs that come and go cost no memory that stays.
# Only IDs short enough to be one reach it: a register's request may carry a SaleID of up
# to mqtt.max_payload, and 4096 of those kept alive would be a gigabyte.
@functools.lru_cache(maxsize=4096)
def _topic_safe_text(part: str) -> bool:
    return TOPIC_UNSAFE.isdisjoint(part) and part.isprintable()


def id_text(value: Any) -> str:
    """An ID from a refused request's header, as text to echo (at most 128 characters): a
    string, or a whole number a register sent where a string belongs; else empty."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value[:128] if isinstance(value, str) else ""


def shown_id(value: Any) -> str:
    """id_text as the filter lets it out, filtered before it is cut: cut first, the part of
    a card number left at the cut (11 digits, say) is no longer one the filter knows."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return redact(value[:256])[:128] if isinstance(value, str) else ""


def refusal_category(value: Any) -> str:
    """The category a refusal gives a request's MessageCategory, which names its body
    ({category}Response): as sent when it can be read as one (letters and digits, at most
    the 64 characters a transaction records), else Unknown. A longer one would be recorded
    cut, and the body named after the whole one would escape the card-data filter, which
    looks for the body by the recorded name."""
    ok = isinstance(value, str) and len(value) <= 64 and value.isascii() and value.isalnum()
    return value if ok else "Unknown"


def request_header(document: Any) -> dict[str, Any]:
    """A request document's MessageHeader, or {} where it has none (a refused request)."""
    try:
        header = document["SaleToPOIRequest"]["MessageHeader"]
    except (KeyError, TypeError):
        return {}
    return header if isinstance(header, dict) else {}


_SECOND: list[Any] = [None, ""]  # the whole second _now_iso formatted last, and its text


def _now_iso(at: float | None = None) -> str:
    """`at` (default: now) as UTC ISO 8601 to the millisecond, "2026-11-22T10:02:00.010Z".
    A payment stamps several events and documents within one second: its date and time are
    formatted once (datetime's isoformat was 1 % of the daemon's CPU under load)."""
    moment = time.time() if at is None else at
    second = math.floor(moment)
    if second != _SECOND[0]:
        _SECOND[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_SECOND[1]}.{int((moment - second) * 1000):03d}Z"


def dumps(payload: Any) -> bytes:
    return jsontext.compact(payload)


@dataclass(frozen=True, slots=True)
class Topics:
    base: str

    @property
    def bridge_state(self) -> str:
        return f"{self.base}/bridge/state"

    @property
    def bridge_health(self) -> str:
        return f"{self.base}/bridge/health"

    @property
    def bridge_error(self) -> str:
        return f"{self.base}/bridge/error"

    @property
    def terminal_requests(self) -> str:
        return f"{self.base}/terminals/+/request"

    @property
    def terminal_requests_by_register(self) -> str:
        """.../request/{SaleID}: a broker ACL can tie the last level to the register's login
        (mosquitto's %u), and the bridge holds the header's SaleID to it."""
        return f"{self.base}/terminals/+/request/+"

    @property
    def bridge_requests(self) -> str:
        return f"{self.base}/bridge/request/+"

    @property
    def request_subscriptions(self) -> tuple[str, str]:
        """What the bridge subscribes to: every level under the request topics (`#` also
        matches .../request itself), so that a request published a level too deep, or with
        an empty last level, reaches the bridge and is refused with an answer instead of
        vanishing unheard. Nothing the bridge publishes lies under them."""
        return f"{self.base}/terminals/+/request/#", f"{self.base}/bridge/request/#"

    @property
    def former_subscriptions(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What an older bridge subscribed to, for each of request_subscriptions: kept in
        a persistent session, they would overlap the new ones (a broker may deliver a request
        once per matching subscription), and they are what is left when a broker's ACL
        refuses the new ones."""
        return ((self.terminal_requests, self.terminal_requests_by_register),
                (self.bridge_requests,))

    def terminal_state(self, poi_id: str) -> str:
        return f"{self.base}/terminals/{poi_id}/state"

    def register_response(self, sale_id: str) -> str:
        return f"{self.base}/registers/{sale_id}/response"

    def register_event(self, sale_id: str) -> str:
        return f"{self.base}/registers/{sale_id}/event"

    def transaction(self, sale_id: str, service_id: str) -> str:
        return f"{self.base}/transactions/{sale_id}/{service_id}"

    def bridge_response(self, command: str) -> str:
        return f"{self.base}/bridge/response/{command}"

    def parse_request_topic(self, topic: str) -> Route | None:
        """Route('terminal', POIID[, SaleID]) or Route('bridge', command) for a topic we
        subscribe to; one with a level too many, or an empty last level, carries the
        `problem` to refuse it with."""
        prefix = f"{self.base}/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        if len(parts) >= 3 and parts[0] == "terminals" and parts[2] == "request":
            if len(parts) == 3 or (len(parts) == 4 and parts[3]):
                return Route("terminal", parts[1], parts[3] if len(parts) == 4 else None)
            # (.../request/: an empty SaleID level is a topic problem, as a level too many)
            exactly = (f"{self.base}/terminals/{parts[1]}/request/{{SaleID}} (your SaleID as "
                       f"its last level) or {self.base}/terminals/{parts[1]}/request")
            return Route("terminal", parts[1], problem=_level_problem(parts[3:], "request",
                                                                      exactly))
        if len(parts) >= 2 and parts[:2] == ["bridge", "request"]:
            if len(parts) == 3 and parts[2]:
                return Route("bridge", parts[2])
            exactly = f"{self.base}/bridge/request/{{command}}"
            return Route("bridge", "/".join(parts[2:]),
                         problem=_level_problem(parts[2:], "command", exactly))
        return None


def _level_problem(levels: list[str], kind: str, exactly: str) -> str:
    """Why a request topic with `levels` after .../request is refused, and where to publish."""
    level = "SaleID" if kind == "request" else "command"
    if not levels:
        what = "it names no command"
    elif len(levels) == 1:
        what = f"its {level} level is empty"
    else:
        what = f"it has {len(levels)} levels after 'request'"
    if levels and not levels[-1]:
        what += " (a '/' too many at its end)"
    return f"{kind} topic refused, nothing was started: {what}; publish on exactly {exactly}"


class Route(NamedTuple):
    """Where a request came in: a terminal's request topic (with the sender's SaleID when it
    published on .../request/{SaleID}) or a command topic."""
    kind: str  # "terminal" or "bridge"
    name: str  # the POIID or the command
    sale_id: str | None = None
    problem: str | None = None  # why the topic is refused (a level too many, an empty one)


def transaction_ids(sale_id: str, service_id: str, poi_id: str, category: str) -> dict[str, str]:
    return {"sale_id": sale_id, "service_id": service_id, "poi_id": poi_id, "category": category}


def result_payload(result: Deliver, at: float | None = None,
                   amounts: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a register receives on registers/{SaleID}/response (`amounts`: see
    partial_amounts)."""
    inner = result.response.get("SaleToPOIResponse") if result.response else None
    return {"SaleToPOIResponse": inner, "bridge": _bridge_part(result, at, amounts)}


def _bridge_part(result: Deliver, at: float | None,
                 amounts: dict[str, Any] | None = None) -> dict[str, Any]:
    part = {
        "outcome": result.outcome,
        "source": result.source,
        "transaction": transaction_ids(result.sale_id, result.service_id, result.poi_id,
                                       result.category),
        # (a bridge's text that may quote a terminal's own: an error it sent, a key of a
        # frame it could not read; what reaches registers and head office passes the filter)
        "error": redact(result.error) if result.error else result.error,
        "at": _now_iso(at),
    }
    if result.conflict is not None:
        part["conflict"] = result.conflict
    if result.corrects is not None:
        part["corrects"] = result.corrects
    if amounts is not None:
        part["amounts"] = amounts
    return part


# Where a money category's amounts are: (asked, in its request body; moved, in its response
# body; the currency in each). StoredValue's are per item (StoredValueData): none here.
_AMOUNT_PATHS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...],
                               tuple[str, ...]]] = {
    "Payment": (("PaymentTransaction", "AmountsReq", "RequestedAmount"),
                ("PaymentResult", "AmountsResp", "AuthorizedAmount"),
                ("PaymentTransaction", "AmountsReq", "Currency"),
                ("PaymentResult", "AmountsResp", "Currency")),
    "Reversal": (("ReversedAmount",), ("ReversedAmount",), (), ()),
}


def partial_amounts(result: Deliver,
                    lookup: Callable[[TxKey], Transaction | None]) -> dict[str, Any]:
    """bridge.amounts of a partially_approved result: what the register asked for
    (`requested`, from its request, which `lookup` finds in the journal) and what moved
    (`approved`: AuthorizedAmount, or a Reversal's ReversedAmount), as the documents say them;
    null where they do not say (a StoredValue, an unreadable one). A register's own status
    request answered partially_approved gives those of the transaction it asked about."""
    response = dig(result.response, "SaleToPOIResponse")
    key, category = TxKey(result.sale_id, result.service_id), result.category
    status = dig(response, "TransactionStatusResponse")
    if isinstance(status, dict):
        bodies = dig(status, "RepeatedMessageResponse", "RepeatedResponseMessageBody")
        name = next((k for k, v in bodies.items() if isinstance(v, dict)), None) \
            if isinstance(bodies, dict) else None
        body = bodies[name] if name else None
        category = name.removesuffix("Response") if name else category
        asking = lookup(key)
        ref = dig(asking.request if asking else None, "SaleToPOIRequest",
                   "TransactionStatusRequest", "MessageReference")
        ref = ref if isinstance(ref, dict) else dig(status, "MessageReference")
        sale_id, service_id = dig(ref, "SaleID"), dig(ref, "ServiceID")
        key = TxKey(sale_id, service_id) if isinstance(sale_id, str) and isinstance(
            service_id, str) else None
    else:
        body = dig(response, f"{category}Response")
    asked, moved, asked_currency, moved_currency = _AMOUNT_PATHS.get(category, ((),) * 4)
    txn = lookup(key) if key is not None and asked else None
    request = dig(txn.request if txn else None, "SaleToPOIRequest", f"{category}Request")
    currency = dig(body, *moved_currency) if moved_currency else None
    if not isinstance(currency, str):
        currency = dig(request, *asked_currency) if asked_currency else None
    return {"requested": amount_value(dig(request, *asked)) if asked else None,
            "approved": amount_value(dig(body, *moved)) if moved else None,
            "currency": currency if isinstance(currency, str) else None}


def redacted_refusal(result: Deliver) -> Deliver:
    """A refusal as the register's own topics carry it. Its texts quote the refused request
    (an invalid ServiceID, MessageCategory, POIID, TimeStamp, a header's SaleID that is not
    the topic's) and a register that put a card number there would have it published back,
    and through a chain's bridge to head office: they pass the card-data filter, as on
    bridge/error. The SaleID, the level the register listens on, stays as it is; a category
    the filter changes names the body UnknownResponse, as one that cannot be read does, and
    so does any other name the filter would change (a body named after a category that is
    not the one recorded: nothing published carries a name the filter did not pass)."""
    category = redact(result.category)
    response = result.response
    inner = response.get("SaleToPOIResponse") if isinstance(response, dict) else None
    if isinstance(inner, dict):
        inner = dict(inner)
        header = inner.get("MessageHeader")
        if isinstance(header, dict):
            # MessageHeader's own fields only (the filter reads values, not names), as text
            inner["MessageHeader"] = {
                key: value if key == "SaleID" and value == result.sale_id else redact(value)
                for key, value in header.items()
                if key in HEADER_NAMES and isinstance(value, str)}
        body_name = f"{result.category}Response"
        if category != result.category and body_name in inner:
            inner["UnknownResponse"] = inner.pop(body_name)
        for name in [name for name in inner if redact(name) != name]:
            inner["UnknownResponse"] = inner.pop(name)
        for name, body in list(inner.items()):
            said = body.get("Response") if isinstance(body, dict) else None
            if isinstance(said, dict) and isinstance(said.get("AdditionalResponse"), str):
                inner[name] = {**body, "Response": {
                    **said, "AdditionalResponse": redact(said["AdditionalResponse"])}}
        response = {**response, "SaleToPOIResponse": inner}  # type: ignore[dict-item]
    return replace(result, service_id=redact(result.service_id), poi_id=redact(result.poi_id),
                   category=category, response=response,
                   error=redact(result.error) if result.error is not None else None)


def retained_state(state: str) -> str:
    """A journal state in the retained transactions/... document's words."""
    return state if state in ("unresolved", "final") else "in_progress"


def result_payload_bytes(result: Deliver, response_text: str, at: float | None = None,
                         amounts: dict[str, Any] | None = None) -> bytes:
    """dumps(result_payload(result, at, amounts)), made from `response_text`, the compact JSON
    of `result.response` the journal already encoded, when that is {"SaleToPOIResponse": ...}
    alone (the document then differs only by its last key, "bridge")."""
    return (response_text[:-1].encode() + b',"bridge":'
            + dumps(_bridge_part(result, at, amounts)) + b"}")


def splices_response(result: Deliver) -> bool:
    """Whether result_payload_bytes may build this result's document from its response."""
    response = result.response
    return (isinstance(response, dict) and len(response) == 1
            and isinstance(response.get("SaleToPOIResponse"), dict))


def event_payload(event: Progress, at: float | None = None) -> dict[str, Any]:
    """What a register receives on registers/{SaleID}/event (for the cashier's screen)."""
    payload: dict[str, Any] = {
        "event": event.event,
        "detail": redact(event.detail) if event.detail else event.detail,  # (as error above)
        "transaction": {"sale_id": event.sale_id, "service_id": event.service_id,
                        "poi_id": event.poi_id},
        "at": _now_iso(at),
    }
    if event.poll is not None:
        payload["poll"] = event.poll
    return payload


def transaction_payload(
    result: Deliver | None = None, *, state: str | None = None, ids: dict[str, str] | None = None,
    at: float | None = None,
) -> dict[str, Any]:
    """The retained transactions/{SaleID}/{ServiceID} document: latest state and result."""
    if result is not None:
        body = result_payload(result, at)
        body["state"] = "unresolved" if result.outcome == "unresolved" else "final"
        return body
    return {"SaleToPOIResponse": None, "state": state,
            "bridge": {"outcome": None, "source": None, "transaction": ids, "error": None,
                       "at": _now_iso(at)}}


def transaction_payload_from(response_payload: bytes, result: Deliver) -> bytes:
    """transaction_payload(result) serialised, made from the already serialised
    result_payload (the same document plus its last key, "state"), so a large terminal
    response is not encoded twice."""
    state = "unresolved" if result.outcome == "unresolved" else "final"
    return response_payload[:-1] + b',"state":"' + state.encode() + b'"}'


def is_final_document(payload: bytes) -> bool:
    """Whether a transactions/... document (as serialised above, "state" its last key) says
    the transaction ended. Read from its bytes: asked for each document published."""
    return payload.endswith(b'"state":"final"}')


def stored_result(txn: Transaction) -> Deliver:
    """A journal entry as the Deliver it was (for a repeat of a known request, or a resync)."""
    outcome = txn.outcome or "unresolved"
    error = txn.detail if outcome in ("error", "rejected") else None
    if outcome == "unresolved":
        # As the unresolved report said it: whether the bridge still asks the terminal
        # (a status request answered unresolved is final: its detail says it all)
        error = txn.detail if txn.extra.get("abandoned") or txn.state == "final" else \
            unresolved_error(txn.detail, txn.category, txn.sale_id, txn.service_id, txn.poi_id)
    return Deliver(txn.sale_id, txn.service_id, txn.poi_id, txn.category, outcome, "journal",
                   txn.response, error)


def summary(txn: Transaction) -> dict[str, Any]:
    """One line of the `transactions` command and `poi-bridge status`. Its detail passes the
    card-data filter: a recorded refusal's quotes the refused request as sent, and the
    command's answer reaches every operator and, through a chain's bridge, head office."""
    return {
        **transaction_ids(txn.sale_id, txn.service_id, txn.poi_id, txn.category),
        "state": str(txn.state),
        "outcome": txn.outcome,
        "source": txn.source,
        "polls": txn.polls_sent,
        "detail": redact(txn.detail) if isinstance(txn.detail, str) else txn.detail,
        "created_at": _now_iso(txn.created_at),
        "updated_at": _now_iso(txn.updated_at),
    }

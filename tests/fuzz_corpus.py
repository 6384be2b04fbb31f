"""The fuzz targets' corpora: the vendor's own messages (tests/fixtures/adyen, copies of
shared/fixtures/adyen), the register requests they answer, and mutations that keep most of
them valid, so that a target spends its time past the first check of what it fuzzes.

- `fixture_texts()`: the fixture files' bytes, as the vendor wrote them.
- `vendor_messages()`: each fixture as a whole SaleToPOI document (the body-only diagnosis
  response in its envelope).
- `register_requests(poi_id, now)`: the requests a register sends that the vendor's responses
  answer (same IDs, sale data, amounts), and the body-only abort and login fixtures in their
  envelopes, payments stamped `now`. Call it when an example is drawn (`requests_now`), not
  once at import: a request stamped at import is stale request_max_age later in a long run.
- `mutated(document)`: the document with up to three changes, most of which a parser takes
  (a string or number replaced, a name added, a list grown or shrunk) and some it must refuse
  (a name removed, a value of another type, a lone surrogate).
- `serialised(document)`: its JSON text in one of the layouts writers use.
- `damaged(data)`: bytes with a byte flipped, cut, inserted, deleted or repeated.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from .conftest import FIXTURES

# The fixtures holding only a message body, and the envelope it goes in.
_BODY_ONLY = {"java-abort-request.json": ("SaleToPOIRequest", "AbortRequest"),
              "java-login-request.json": ("SaleToPOIRequest", "LoginRequest"),
              "java-sale-to-poi-response-diagnosis.json": ("SaleToPOIResponse", None)}


@functools.cache
def fixture_texts() -> dict[str, bytes]:
    texts = {p.name: p.read_bytes() for p in sorted(FIXTURES.glob("*.json"))}
    if len(texts) < 11:
        raise RuntimeError(f"vendor fixtures missing in {FIXTURES}: see tests/fixtures/README.md")
    return texts


@functools.cache
def _fixture_documents() -> dict[str, Any]:
    return {name: json.loads(text) for name, text in fixture_texts().items()}


def vendor_messages() -> dict[str, dict[str, Any]]:
    """Each fixture as a whole SaleToPOIRequest/Response document (fresh copies)."""
    messages = {}
    for name, document in _fixture_documents().items():
        envelope, body = _BODY_ONLY.get(name, (None, None))
        if envelope is None:
            messages[name] = document
        elif body is None:  # the envelope's inside, header and all
            messages[name] = {envelope: document}
    return copy.deepcopy(messages)


def _request_header(response_header: dict[str, Any], poi_id: str) -> dict[str, Any]:
    return {**response_header, "MessageType": "Request", "POIID": poi_id}


def register_requests(poi_id: str, now: float) -> dict[str, dict[str, Any]]:
    """The register requests behind the vendor's messages, for terminal `poi_id`, payments
    stamped `now` (SaleTransactionID.TimeStamp, which the bridge checks against its clock)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    documents = _fixture_documents()
    requests: dict[str, dict[str, Any]] = {}
    for name, document in documents.items():
        inner = document.get("SaleToPOIResponse")
        if not isinstance(inner, dict) or "MessageHeader" not in inner:
            continue
        header = _request_header(inner["MessageHeader"], poi_id)
        if "PaymentResponse" in inner:
            answer = inner["PaymentResponse"]
            sale_data = copy.deepcopy(answer["SaleData"])
            sale_data["SaleTransactionID"]["TimeStamp"] = stamp
            amounts = (answer.get("PaymentResult") or {}).get("AmountsResp") or {}
            body = {"PaymentRequest": {"SaleData": sale_data, "PaymentTransaction": {
                "AmountsReq": {"Currency": amounts.get("Currency", "EUR"),
                               "RequestedAmount": amounts.get("AuthorizedAmount", 10.0)}}}}
        elif "ReversalResponse" in inner:
            answer = inner["ReversalResponse"]
            body = {"ReversalRequest": {
                "OriginalPOITransaction": {
                    "POITransactionID": answer["POIData"]["POITransactionID"]},
                "ReversalReason": "MerchantCancel", "ReversedAmount": answer["ReversedAmount"]}}
        elif "TransactionStatusResponse" in inner:
            reference = inner["TransactionStatusResponse"]["MessageReference"]
            header["SaleID"] = reference["SaleID"]  # a register asks about its own payment
            body = {"TransactionStatusRequest": {"MessageReference": reference,
                                                 "ReceiptReprintFlag": True}}
        else:
            continue
        requests[f"request for {name}"] = {"SaleToPOIRequest": {"MessageHeader": header, **body}}
    diagnosis = documents["java-sale-to-poi-response-diagnosis.json"]["MessageHeader"]
    requests["request for java-sale-to-poi-response-diagnosis.json"] = {"SaleToPOIRequest": {
        "MessageHeader": _request_header(diagnosis, poi_id),
        "DiagnosisRequest": {"HostDiagnosisFlag": False}}}
    # The body-only requests, under the header a register would give them
    abort = documents["java-abort-request.json"]
    login = documents["java-login-request.json"]
    sale_id = abort["MessageReference"]["SaleID"]
    for name, category, service_id, body in (
            ("java-abort-request.json", "Abort", "9001", abort),
            ("java-login-request.json", "Login", "9002", login)):
        header = {"ProtocolVersion": "3.0", "MessageClass": "Service",
                  "MessageCategory": category, "MessageType": "Request", "SaleID": sale_id,
                  "ServiceID": service_id, "POIID": poi_id}
        requests[name] = {"SaleToPOIRequest": {"MessageHeader": header,
                                               _BODY_ONLY[name][1]: body}}
    return copy.deepcopy(requests)


_NOW = st.just(0.0)


def requests_now(poi_id: str, ages: SearchStrategy[float] = _NOW,
                 category: str | None = None) -> SearchStrategy[dict[str, Any]]:
    """One of register_requests() (of `category`), stamped when the example is drawn (less
    `ages` seconds)."""
    names = sorted(name for name, request in register_requests(poi_id, 0.0).items()
                   if category in (None, request["SaleToPOIRequest"]["MessageHeader"][
                       "MessageCategory"]))
    return st.tuples(st.sampled_from(names), ages).map(
        lambda drawn: register_requests(poi_id, time.time() - drawn[1])[drawn[0]])


# --- mutations -----------------------------------------------------------------------------


@functools.cache
def _fixture_strings() -> tuple[str, ...]:
    """Every string in the fixtures, names and values: what a mutation puts in a string's
    place is often one a message really holds somewhere."""
    found: set[str] = set()
    pending: list[Any] = list(_fixture_documents().values())
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            found.update(value)
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, str):
            found.add(value)
    return tuple(sorted(found))


strings = st.one_of(st.sampled_from(_fixture_strings()), st.text(max_size=16),
                    st.sampled_from(["", " ", "x" * 300, "\u00e9\u20ac", "0", "null"]))
numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                    st.integers(-2**70, 2**70), st.sampled_from([0, -0.0, 15.25, 1e308, 2**63]))
json_values = st.recursive(
    st.none() | st.booleans() | numbers | strings,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
    max_leaves=8)

# What may change in a value of each type, weighted: most changes leave a document its parser
# takes (a string for a string, a number for a number, a name added); "retype" (a value of
# any type in its place) and "remove" mostly make one it must refuse. A lone surrogate, which
# no strict JSON reader takes, is rarer still.
_CHANGES = {
    str: ("string",) * 6 + ("retype", "remove", "surrogate"),
    int: ("number",) * 6 + ("retype", "remove"),
    float: ("number",) * 6 + ("retype", "remove"),
    dict: ("add",) * 6 + ("retype", "remove"),
    list: ("list",) * 6 + ("retype", "remove"),
}
_OTHER_CHANGES = ("retype", "remove")  # null, true and false


def _places(document: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in the document but the root's envelope name."""
    places: list[tuple[Any, Any]] = []
    pending = list(document.values()) if isinstance(document, dict) else [document]
    while pending:
        value = pending.pop()
        items = value.items() if isinstance(value, dict) else \
            enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            places.append((value, key))
            pending.append(child)
    return places


@st.composite
def mutated(draw: Any, document: Any, max_changes: int = 3) -> Any:
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(0, max_changes), label="changes")):
        places = _places(document)
        if not places:
            break
        container, key = draw(st.sampled_from(places))
        value = container[key]
        change = draw(st.sampled_from(_CHANGES.get(type(value), _OTHER_CHANGES)))
        if change == "string":
            container[key] = draw(strings)
        elif change == "surrogate":
            container[key] = value[:1] + "\ud800"
        elif change == "number":
            container[key] = draw(numbers)
        elif change == "add":
            value[draw(strings)] = draw(json_values)
        elif change == "list":
            if value and draw(st.booleans()):
                value.pop(draw(st.integers(0, len(value) - 1)))
            else:
                value.append(copy.deepcopy(value[0]) if value else draw(json_values))
        elif change == "remove":
            del container[key]
        else:
            container[key] = draw(json_values)
    return document


def serialised(document: Any) -> SearchStrategy[bytes]:
    """The document's JSON text as some writer lays it out (a lone surrogate is written as
    its \\u escape, which strict JSON readers refuse)."""
    return st.sampled_from([
        {"separators": (",", ":")}, {"indent": 2}, {"indent": "\t", "ensure_ascii": False},
        {}, {"separators": (", ", " : "), "sort_keys": True}]).map(
        lambda options: json.dumps(document, **options).encode("utf-8", "surrogatepass"))


@st.composite
def damaged(draw: Any, data: bytes) -> bytes:
    if not data:
        return draw(st.binary(max_size=8))
    at = draw(st.integers(0, len(data) - 1))
    how = draw(st.sampled_from(["flip", "cut", "insert", "delete", "repeat"]))
    if how == "flip":
        return data[:at] + bytes((data[at] ^ draw(st.integers(1, 255)),)) + data[at + 1:]
    if how == "cut":
        return data[:at]
    if how == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    end = draw(st.integers(at, min(len(data), at + 64)))
    if how == "delete":
        return data[:at] + data[end:]
    return data[:end] + data[at:end] + data[end:]

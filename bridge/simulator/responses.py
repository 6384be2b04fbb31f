"""The answers a terminal gives, built the way the seed's examples show them.

Pure functions from a request document to a response document: the simulator uses them, and
so do tests that need a terminal's words without running one.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import time
from typing import Any

OUTCOME_RESULTS: dict[str, tuple[str, str | None, str]] = {
    "approve": ("Success", None, "tid=46403161&message=APPROVED"),
    # Less than requested authorised (a gift card with too little on it): money moved
    "partial": ("Partial", None, "tid=46403161&message=PARTIALLY%20APPROVED"),
    "decline": ("Failure", "Refusal", "refusalReason=05%20Not%20approved&message=DECLINED"),
    "cancel": ("Failure", "Cancel", "refusalReason=101%20Shopper%20cancelled%20tx"),
    "abort": ("Failure", "Aborted", "refusalReason=104%20Merchant%20cancelled%20tx"),
    "busy": ("Failure", "Busy", "message=Terminal%20busy"),
}


def _response_header(request_header: dict[str, Any]) -> dict[str, Any]:
    header = dict(request_header)
    header["MessageType"] = "Response"
    return header


def _timestamp(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def payment_response(
    request: dict[str, Any], decision: str, now: float, *, receipts: bool = True,
    authorised: float | None = None,
) -> dict[str, Any]:
    """A PaymentResponse (or ReversalResponse) for `request`, with card data as terminals send
    it (masked PAN, expiry): the bridge must pass it on and must never log it. `authorised`:
    what a "partial" decision authorises (or reverses), half the amount asked by default."""
    inner = request["SaleToPOIRequest"]
    header = inner["MessageHeader"]
    category = header["MessageCategory"]
    result, condition, additional = OUTCOME_RESULTS[decision]
    response: dict[str, Any] = {"Result": result, "AdditionalResponse": additional}
    if condition:
        response["ErrorCondition"] = condition
    digest = hashlib.sha256(f"{header['SaleID']}/{header['ServiceID']}".encode()).hexdigest()
    body: dict[str, Any] = {
        "POIData": {
            "POIReconciliationID": "1000",
            "POITransactionID": {"TimeStamp": _timestamp(now), "TransactionID": digest[:20]},
        },
        "Response": response,
    }
    if category == "Payment":
        req = inner.get("PaymentRequest", {})
        amounts = req.get("PaymentTransaction", {}).get("AmountsReq", {})
        body["SaleData"] = copy.deepcopy(req.get("SaleData", {}))
        paid = _paid(amounts.get("RequestedAmount", 0), result, authorised)
        body["PaymentResult"] = {
            "AmountsResp": {
                "AuthorizedAmount": paid,
                "Currency": amounts.get("Currency", "EUR"),
            },
            "OnlineFlag": True,
            "PaymentInstrumentData": {
                "PaymentInstrumentType": "Card",
                "CardData": {
                    "EntryMode": ["ICC"],
                    "PaymentBrand": "mc",
                    "MaskedPan": "541333 **** 9999",
                    "SensitiveCardData": {"ExpiryDate": "0228", "CardSeqNumb": "01"},
                },
            },
        }
        if receipts and result in ("Success", "Partial"):
            body["PaymentReceipt"] = [
                {
                    "DocumentQualifier": qualifier,
                    "RequiredSignatureFlag": False,
                    "OutputContent": {
                        "OutputFormat": "Text",
                        "OutputText": [
                            {"Text": f"key=title&name={qualifier}", "EndOfLineFlag": True},
                            {"Text": "name=Card&value=%2a%2a%2a%2a9999&key=pan", "EndOfLineFlag": True},
                            {"Text": f"name=Amount&value={paid}",
                             "EndOfLineFlag": True},
                        ],
                    },
                }
                for qualifier in ("CashierReceipt", "CustomerReceipt")
            ]
    elif category == "Reversal" and result in ("Success", "Partial"):
        body["ReversedAmount"] = _paid(
            inner.get("ReversalRequest", {}).get("ReversedAmount", 0), result, authorised)
    return {"SaleToPOIResponse": {"MessageHeader": _response_header(header),
                                  f"{category}Response": body}}


def _paid(asked: Any, result: str, authorised: float | None) -> Any:
    """The amount a response says moved: all that was asked on Success, part on Partial."""
    if result == "Success":
        return asked
    if result != "Partial":
        return 0
    if authorised is not None:
        return authorised
    return round(asked / 2, 2) if isinstance(asked, (int, float)) else 0


def status_in_progress(status_request: dict[str, Any]) -> dict[str, Any]:
    """The seed's InProgress answer: Failure / InProgress, no RepeatedMessageResponse."""
    header = status_request["SaleToPOIRequest"]["MessageHeader"]
    return {"SaleToPOIResponse": {
        "MessageHeader": _response_header(header),
        "TransactionStatusResponse": {"Response": {
            "Result": "Failure", "ErrorCondition": "InProgress",
            "AdditionalResponse": "message=Uncompleted%20transaction"}},
    }}


def status_not_found(status_request: dict[str, Any]) -> dict[str, Any]:
    """The seed's NotFound answer, echoing category, SaleID and ServiceID asked about."""
    inner = status_request["SaleToPOIRequest"]
    ref = inner["TransactionStatusRequest"].get("MessageReference") or {}
    text = ("message=Message%20not%20found.%20Category%3d{c}%2c%20last%20such%20Request%20has"
            "%20SaleID%3d{s}%20ServiceID%3d{i}").format(
        c=ref.get("MessageCategory", "Payment"), s=ref.get("SaleID", ""), i=ref.get("ServiceID", ""))
    return {"SaleToPOIResponse": {
        "MessageHeader": _response_header(inner["MessageHeader"]),
        "TransactionStatusResponse": {"Response": {
            "Result": "Failure", "ErrorCondition": "NotFound", "AdditionalResponse": text}},
    }}


def status_success(
    status_request: dict[str, Any], original_response: dict[str, Any], *, inner_header: bool = True,
) -> dict[str, Any]:
    """The seed's Success answer: the original response inside RepeatedMessageResponse."""
    inner = status_request["SaleToPOIRequest"]
    original = original_response["SaleToPOIResponse"]
    body_key = next(k for k in original if k != "MessageHeader")
    repeated: dict[str, Any] = {"RepeatedResponseMessageBody": {body_key: original[body_key]}}
    if inner_header:
        repeated["MessageHeader"] = original["MessageHeader"]
    body: dict[str, Any] = {"Response": {"Result": "Success"}, "RepeatedMessageResponse": repeated}
    ref = inner["TransactionStatusRequest"].get("MessageReference")
    if ref:
        body["MessageReference"] = ref
    return {"SaleToPOIResponse": {
        "MessageHeader": _response_header(inner["MessageHeader"]),
        "TransactionStatusResponse": body,
    }}


def simple_response(request: dict[str, Any], *, result: str = "Success",
                    body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response for the non-money categories (Diagnosis, Login, Logout...)."""
    header = request["SaleToPOIRequest"]["MessageHeader"]
    content: dict[str, Any] = {"Response": {"Result": result}}
    content.update(body or {})
    return {"SaleToPOIResponse": {
        "MessageHeader": _response_header(header),
        f"{header['MessageCategory']}Response": content,
    }}


def rewrite_ids(response: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """A canned response file made to answer `request`: header IDs copied from the request."""
    out = copy.deepcopy(response)
    root = next(iter(out))
    header = out[root].setdefault("MessageHeader", {})
    req_header = request["SaleToPOIRequest"]["MessageHeader"]
    for key in ("SaleID", "ServiceID", "POIID", "MessageCategory", "MessageClass"):
        if key in req_header:
            header[key] = req_header[key]
    header["MessageType"] = "Response"
    return out


def payment_request(
    sale_id: str, service_id: str, poi_id: str, amount: float = 10.0, currency: str = "EUR",
    *, category: str = "Payment", now: float | None = None,
) -> dict[str, Any]:
    """A register's PaymentRequest as the Terminal API documents it (for clients and tests).
    Stamped with the current time (or `now`): the bridge refuses payment requests older than
    its request_max_age, as a real till's stale request would be."""
    stamp = _timestamp(time.time() if now is None else now)
    header = {
        "ProtocolVersion": "3.0", "MessageClass": "Service", "MessageCategory": category,
        "MessageType": "Request", "SaleID": sale_id, "ServiceID": service_id, "POIID": poi_id,
    }
    if category == "Payment":
        body = {"PaymentRequest": {
            "SaleData": {"SaleTransactionID": {"TransactionID": f"{sale_id}-{service_id}",
                                               "TimeStamp": stamp}},
            "PaymentTransaction": {"AmountsReq": {"Currency": currency, "RequestedAmount": amount}},
        }}
    elif category == "Reversal":
        body = {"ReversalRequest": {"OriginalPOITransaction": {"POITransactionID": {
            "TransactionID": "original", "TimeStamp": stamp}},
            "ReversalReason": "MerchantCancel", "ReversedAmount": amount}}
    else:
        body = {f"{category}Request": {}}
    return {"SaleToPOIRequest": {"MessageHeader": header, **body}}

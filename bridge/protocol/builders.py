"""Messages the bridge itself originates: status polls, identity checks, and the answers it
gives a register when it refuses a request. Everything built here passes `check_request_header`."""

from __future__ import annotations

import secrets
import string
from typing import Any

from bridge.protocol.messages import MessageHeader, response_header

_ALPHABET = string.ascii_letters + string.digits


def new_service_id(length: int = 10) -> str:
    """A fresh ServiceID: 10 random letters and digits (62^10 values), so collisions with a
    register's own IDs within the seed's 48-hour window are negligible."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def status_request(
    *, sale_id: str, service_id: str, poi_id: str, original_service_id: str,
    original_category: str, receipts: bool = True,
) -> dict[str, Any]:
    """A TransactionStatusRequest about one transaction, as the seed prescribes: receipts are
    asked for again so the register can print them if the original response was lost
    (`receipts` False: not, when an answer came too big to read: see TerminalSession.oversize)."""
    document = {
        "SaleToPOIRequest": {
            "MessageHeader": {
                "ProtocolVersion": "3.0",
                "MessageClass": "Service",
                "MessageCategory": "TransactionStatus",
                "MessageType": "Request",
                "SaleID": sale_id,
                "ServiceID": service_id,
                "POIID": poi_id,
            },
            "TransactionStatusRequest": {
                "ReceiptReprintFlag": True,
                "DocumentQualifier": ["CashierReceipt", "CustomerReceipt"],
                "MessageReference": {
                    "SaleID": sale_id,
                    "ServiceID": original_service_id,
                    "MessageCategory": original_category,
                },
            },
        }
    }
    if not receipts:
        body = document["SaleToPOIRequest"]["TransactionStatusRequest"]
        del body["ReceiptReprintFlag"], body["DocumentQualifier"]
    return document


def diagnosis_request(*, sale_id: str, service_id: str, poi_id: str) -> dict[str, Any]:
    """A DiagnosisRequest: harmless on any terminal, and its answer carries the POIID of the
    device that gave it (the bridge's identity check of a newly opened link)."""
    return {
        "SaleToPOIRequest": {
            "MessageHeader": {
                "ProtocolVersion": "3.0",
                "MessageClass": "Service",
                "MessageCategory": "Diagnosis",
                "MessageType": "Request",
                "SaleID": sale_id,
                "ServiceID": service_id,
                "POIID": poi_id,
            },
            "DiagnosisRequest": {"HostDiagnosisFlag": False},
        }
    }


def request_header(request: dict[str, Any]) -> MessageHeader:
    """The MessageHeader of a request the bridge holds (a register's, as it was recorded):
    what the answers the bridge gives in the terminal's place echo."""
    return MessageHeader.model_validate(request["SaleToPOIRequest"]["MessageHeader"])


def failure_response(
    header: MessageHeader | dict[str, Any], category: str, error_condition: str, text: str,
) -> dict[str, Any]:
    """A SaleToPOIResponse the bridge answers with itself (terminal busy, offline, refused):
    the same shape a terminal would send, so a register has one code path."""
    return {
        "SaleToPOIResponse": {
            "MessageHeader": response_header(header),
            f"{category}Response": {
                "Response": {
                    "Result": "Failure",
                    "ErrorCondition": error_condition,
                    "AdditionalResponse": text,
                }
            },
        }
    }


def status_response(
    request_header: MessageHeader, reference: dict[str, Any], original: dict[str, Any],
) -> dict[str, Any]:
    """A TransactionStatusResponse as a terminal answers one about a transaction it finished:
    Result Success, the original response in RepeatedMessageResponse. The bridge answers so
    from its journal, in the shape a register gets from the terminal."""
    inner = original["SaleToPOIResponse"]
    repeated: dict[str, Any] = {"RepeatedResponseMessageBody": {
        key: body for key, body in inner.items() if key.endswith("Response")}}
    if isinstance(inner.get("MessageHeader"), dict):
        repeated["MessageHeader"] = inner["MessageHeader"]
    return {
        "SaleToPOIResponse": {
            "MessageHeader": response_header(request_header),
            "TransactionStatusResponse": {
                "Response": {"Result": "Success"},
                "MessageReference": reference,
                "RepeatedMessageResponse": repeated,
            },
        }
    }

"""SaleToPOI (nexo / Terminal API) message models.

The bridge models what it interprets (headers, Response, MessageReference, the bodies of the
categories it drives) and keeps everything else as it came: every model allows extra fields,
and `to_document()` dumps only what was set, so a terminal's message survives parse ->
serialise as the same JSON object. Enumerations are open: a value the bridge does not know is
kept as a plain string instead of being rejected, because terminals in the field send them.
"""

from __future__ import annotations

import json
import math
import re
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from bridge.protocol import jsontext
from bridge.redaction import quoted

SERVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9]{1,10}\Z")
POIID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*-[A-Za-z0-9]+\Z")
MAX_NESTING = jsontext.MAX_NESTING


class MessageClass(StrEnum):
    SERVICE = "Service"
    DEVICE = "Device"
    EVENT = "Event"


class MessageCategory(StrEnum):
    PAYMENT = "Payment"
    REVERSAL = "Reversal"
    ABORT = "Abort"
    TRANSACTION_STATUS = "TransactionStatus"
    DIAGNOSIS = "Diagnosis"
    LOGIN = "Login"
    LOGOUT = "Logout"
    CARD_ACQUISITION = "CardAcquisition"
    INPUT = "Input"
    PRINT = "Print"
    DISPLAY = "Display"
    STORED_VALUE = "StoredValue"
    RECONCILIATION = "Reconciliation"
    GET_TOTALS = "GetTotals"
    BALANCE_INQUIRY = "BalanceInquiry"
    ADMIN = "Admin"
    ENABLE_SERVICE = "EnableService"
    EVENT = "Event"


class MessageType(StrEnum):
    REQUEST = "Request"
    RESPONSE = "Response"
    NOTIFICATION = "Notification"


class Result(StrEnum):
    SUCCESS = "Success"
    FAILURE = "Failure"
    PARTIAL = "Partial"


class ErrorCondition(StrEnum):
    ABORTED = "Aborted"
    BUSY = "Busy"
    CANCEL = "Cancel"
    DEVICE_OUT = "DeviceOut"
    IN_PROGRESS = "InProgress"
    INSERTED_CARD = "InsertedCard"
    INVALID_CARD = "InvalidCard"
    LOGGED_OUT = "LoggedOut"
    MESSAGE_FORMAT = "MessageFormat"
    NOT_ALLOWED = "NotAllowed"
    NOT_FOUND = "NotFound"
    PAYMENT_RESTRICTION = "PaymentRestriction"
    REFUSAL = "Refusal"
    UNAVAILABLE_DEVICE = "UnavailableDevice"
    UNAVAILABLE_SERVICE = "UnavailableService"
    UNREACHABLE_HOST = "UnreachableHost"
    WRONG_PIN = "WrongPIN"


E = TypeVar("E", bound=StrEnum)
# A known value becomes the enum member; an unknown one stays a string (left_to_right tries
# the enum first, so "Success" is Result.SUCCESS, and "Pending" is kept as "Pending").
Open = Annotated[E | str, Field(union_mode="left_to_right")]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class MessageHeader(_Open):
    protocol_version: str | None = Field(None, alias="ProtocolVersion")
    message_class: Open[MessageClass] | None = Field(None, alias="MessageClass")
    message_category: Open[MessageCategory] = Field(alias="MessageCategory")
    message_type: Open[MessageType] = Field(alias="MessageType")
    sale_id: str | None = Field(None, alias="SaleID")
    service_id: str | None = Field(None, alias="ServiceID")
    poi_id: str | None = Field(None, alias="POIID")
    device_id: str | None = Field(None, alias="DeviceID")


class RecordHeader(MessageHeader):
    """The header of a record a status answer carries (RepeatedMessageResponse): held less
    strictly than a message's own. A terminal that left out its MessageType or
    MessageCategory there made the whole answer unreadable, and a charged payment's outcome
    was never learned; the record's body names its category anyway (status_subjects)."""
    message_category: Open[MessageCategory] | None = Field(  # type: ignore[assignment]
        None, alias="MessageCategory")
    message_type: Open[MessageType] | None = Field(  # type: ignore[assignment]
        None, alias="MessageType")


# MessageHeader's own fields by their JSON names: all of a request's header that an answer the
# bridge gives in the terminal's place echoes
HEADER_NAMES = frozenset(field.alias for field in MessageHeader.model_fields.values()
                         if field.alias)


def response_header(header: MessageHeader | dict[str, Any]) -> dict[str, Any]:
    """A request's MessageHeader as an answer the bridge builds echoes it: MessageHeader's
    own fields, MessageType Response. The header may hold any other name, with any value
    (the model is open), and the card-data filter reads a refusal header's values, not its
    names: a register that wrote a card number as a name would have it published back on
    registers/{SaleID}/response, and through a chain's bridge at head office (review rv6)."""
    if isinstance(header, MessageHeader):
        header = header.model_dump(mode="json", by_alias=True, exclude_unset=True)
    echoed = {key: value for key, value in header.items() if key in HEADER_NAMES}
    echoed["MessageType"] = "Response"
    return echoed


class Response(_Open):
    result: Open[Result] = Field(alias="Result")
    error_condition: Open[ErrorCondition] | None = Field(None, alias="ErrorCondition")
    additional_response: str | None = Field(None, alias="AdditionalResponse")


class MessageReference(_Open):
    message_category: Open[MessageCategory] | None = Field(None, alias="MessageCategory")
    sale_id: str | None = Field(None, alias="SaleID")
    service_id: str | None = Field(None, alias="ServiceID")
    poi_id: str | None = Field(None, alias="POIID")
    device_id: str | None = Field(None, alias="DeviceID")


class _ResponseBody(_Open):
    response: Response | None = Field(None, alias="Response")


# --- request and response bodies the bridge drives -------------------------------------------

def _amount(value: Any) -> Any:
    """An amount in a request goes to the terminal as the register sent it, so it must be
    what a terminal reads as one: a JSON number (not a string pydantic would convert, not
    true/false), finite (load_json refuses NaN and Infinity, a dict built in Python may
    hold them), 0 or more. Only request bodies
    use this: amounts in what terminals send stay as they came."""
    if type(value) is bool or not isinstance(value, int | float):
        kind = {bool: "true/false", str: "a string", type(None): "null", list: "a list",
                dict: "an object"}.get(type(value), type(value).__name__)
        raise PydanticCustomError("amount_type", "must be a JSON number, e.g. 12.5, not {kind}",
                                  {"kind": kind})
    if isinstance(value, float) and not math.isfinite(value):  # (an int is always finite,
        # and math.isfinite() of one too large for a float raises OverflowError)
        raise PydanticCustomError("amount_finite", "must be a finite number, not {value}",
                                  {"value": json.dumps(value)})
    if value < 0:
        # (a number too long to be an amount may hold a card number the filter does not
        # see in so long a run: its first digits only)
        shown = str(value) if value > -10**12 else f"{str(value)[:7]}..."
        raise PydanticCustomError("amount_negative", "must be 0 or more, not {value}",
                                  {"value": quoted(shown, 24)})
    return value


Amount = Annotated[int | float, BeforeValidator(_amount)]
# Optional: absent, or null as some serialisers write an unset field, or a number.
OptionalAmount = Annotated[int | float | None,
                           BeforeValidator(lambda value: None if value is None else _amount(value))]


class AmountsReq(_Open):
    currency: str = Field(alias="Currency")
    requested_amount: Amount = Field(alias="RequestedAmount")
    cash_back_amount: OptionalAmount = Field(None, alias="CashBackAmount")
    tip_amount: OptionalAmount = Field(None, alias="TipAmount")
    paid_amount: OptionalAmount = Field(None, alias="PaidAmount")
    minimum_amount_to_deliver: OptionalAmount = Field(None, alias="MinimumAmountToDeliver")
    maximum_cash_back_amount: OptionalAmount = Field(None, alias="MaximumCashBackAmount")
    minimum_split_amount: OptionalAmount = Field(None, alias="MinimumSplitAmount")


class PaymentTransaction(_Open):
    amounts_req: AmountsReq = Field(alias="AmountsReq")


class SaleTransactionID(_Open):
    transaction_id: str = Field(alias="TransactionID")
    time_stamp: str | None = Field(None, alias="TimeStamp")


class SaleData(_Open):
    sale_transaction_id: SaleTransactionID | None = Field(None, alias="SaleTransactionID")


class PaymentRequest(_Open):
    sale_data: SaleData = Field(alias="SaleData")
    payment_transaction: PaymentTransaction = Field(alias="PaymentTransaction")


class PaymentResponse(_ResponseBody):
    pass


class ReversalRequest(_Open):
    original_poi_transaction: dict[str, Any] | None = Field(None, alias="OriginalPOITransaction")
    reversal_reason: str | None = Field(None, alias="ReversalReason")
    reversed_amount: OptionalAmount = Field(None, alias="ReversedAmount")


class ReversalResponse(_ResponseBody):
    pass


class AbortRequest(_Open):
    message_reference: MessageReference = Field(alias="MessageReference")
    abort_reason: str | None = Field(None, alias="AbortReason")


class TransactionStatusRequest(_Open):
    message_reference: MessageReference | None = Field(None, alias="MessageReference")
    receipt_reprint_flag: bool | None = Field(None, alias="ReceiptReprintFlag")
    document_qualifier: list[str] | None = Field(None, alias="DocumentQualifier")


class RepeatedMessageResponse(_Open):
    # The inner header is optional: vendors omit it (see the .NET status-response fixture).
    message_header: RecordHeader | None = Field(None, alias="MessageHeader")
    repeated_response_message_body: dict[str, Any] | None = Field(
        None, alias="RepeatedResponseMessageBody"
    )


class TransactionStatusResponse(_ResponseBody):
    message_reference: MessageReference | None = Field(None, alias="MessageReference")
    repeated_message_response: RepeatedMessageResponse | None = Field(
        None, alias="RepeatedMessageResponse"
    )


class DiagnosisRequest(_Open):
    host_diagnosis_flag: bool | None = Field(None, alias="HostDiagnosisFlag")


class DiagnosisResponse(_ResponseBody):
    logged_sale_id: list[str] | None = Field(None, alias="LoggedSaleID")
    poi_status: dict[str, Any] | None = Field(None, alias="POIStatus")


class LoginRequest(_Open):
    date_time: str | None = Field(None, alias="DateTime")
    sale_software: dict[str, Any] | None = Field(None, alias="SaleSoftware")
    operator_id: str | None = Field(None, alias="OperatorID")


class LoginResponse(_ResponseBody):
    poi_system_data: dict[str, Any] | None = Field(None, alias="POISystemData")


class LogoutRequest(_Open):
    maintenance_allowed: bool | None = Field(None, alias="MaintenanceAllowed")


class LogoutResponse(_ResponseBody):
    pass


class EventNotification(_Open):
    event_to_notify: str = Field(alias="EventToNotify")
    time_stamp: str | None = Field(None, alias="TimeStamp")
    event_details: str | None = Field(None, alias="EventDetails")
    rejected_message: str | None = Field(None, alias="RejectedMessage")


REQUEST_BODIES: dict[str, type[_Open]] = {
    "PaymentRequest": PaymentRequest,
    "ReversalRequest": ReversalRequest,
    "AbortRequest": AbortRequest,
    "TransactionStatusRequest": TransactionStatusRequest,
    "DiagnosisRequest": DiagnosisRequest,
    "LoginRequest": LoginRequest,
    "LogoutRequest": LogoutRequest,
}
RESPONSE_BODIES: dict[str, type[_Open]] = {
    "PaymentResponse": PaymentResponse,
    "ReversalResponse": ReversalResponse,
    "TransactionStatusResponse": TransactionStatusResponse,
    "DiagnosisResponse": DiagnosisResponse,
    "LoginResponse": LoginResponse,
    "LogoutResponse": LogoutResponse,
}
_ENVELOPE_KEYS = {"MessageHeader", "SecurityTrailer", "NexoBlob"}


class _Envelope(_Open):
    message_header: MessageHeader | None = Field(None, alias="MessageHeader")
    security_trailer: dict[str, Any] | None = Field(None, alias="SecurityTrailer")
    nexo_blob: str | None = Field(None, alias="NexoBlob")

    kind: Literal["SaleToPOIRequest", "SaleToPOIResponse"]  # set by subclasses
    # The document a parsed message came from: to_document() hands it back as it came,
    # instead of dumping the model again (a quarter of a millisecond for an 11 KB receipt).
    _source: dict[str, Any] | None = PrivateAttr(default=None)

    def body_key(self) -> str | None:
        """The key of the message body ('PaymentResponse', 'EventNotification', ...)."""
        for name, field in type(self).model_fields.items():
            if field.alias and field.alias not in _ENVELOPE_KEYS and name != "kind":
                if getattr(self, name) is not None:
                    return field.alias
        for key, value in (self.model_extra or {}).items():
            if key not in _ENVELOPE_KEYS and isinstance(value, dict):
                return key
        return None

    def body(self) -> Any:
        """The body: a model for the categories the bridge drives, else the raw dict."""
        key = self.body_key()
        if key is None:
            return None
        for name, field in type(self).model_fields.items():
            if field.alias == key:
                return getattr(self, name)
        return (self.model_extra or {}).get(key)

    @property
    def category(self) -> str | None:
        if self.message_header is not None:
            return str(self.message_header.message_category)
        key = self.body_key()
        for suffix in ("Request", "Response"):
            if key and key.endswith(suffix):
                return key[: -len(suffix)]
        return None

    def to_document(self) -> dict[str, Any]:
        """The message as a JSON document: for a parsed message the document it was parsed
        from (not to be modified), for one built here its dump."""
        if self._source is not None:
            return self._source
        inner = self.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"kind"})
        return {self.kind: inner}

    def to_bytes(self) -> bytes:
        return jsontext.compact(self.to_document())


class SaleToPOIRequest(_Envelope):
    kind: Literal["SaleToPOIRequest"] = Field("SaleToPOIRequest", exclude=True)
    payment_request: PaymentRequest | None = Field(None, alias="PaymentRequest")
    reversal_request: ReversalRequest | None = Field(None, alias="ReversalRequest")
    abort_request: AbortRequest | None = Field(None, alias="AbortRequest")
    transaction_status_request: TransactionStatusRequest | None = Field(
        None, alias="TransactionStatusRequest"
    )
    diagnosis_request: DiagnosisRequest | None = Field(None, alias="DiagnosisRequest")
    login_request: LoginRequest | None = Field(None, alias="LoginRequest")
    logout_request: LogoutRequest | None = Field(None, alias="LogoutRequest")
    # Terminals send event notifications (Reject, Shutdown...) inside a SaleToPOIRequest.
    event_notification: EventNotification | None = Field(None, alias="EventNotification")


class SaleToPOIResponse(_Envelope):
    kind: Literal["SaleToPOIResponse"] = Field("SaleToPOIResponse", exclude=True)
    payment_response: PaymentResponse | None = Field(None, alias="PaymentResponse")
    reversal_response: ReversalResponse | None = Field(None, alias="ReversalResponse")
    transaction_status_response: TransactionStatusResponse | None = Field(
        None, alias="TransactionStatusResponse"
    )
    diagnosis_response: DiagnosisResponse | None = Field(None, alias="DiagnosisResponse")
    login_response: LoginResponse | None = Field(None, alias="LoginResponse")
    logout_response: LogoutResponse | None = Field(None, alias="LogoutResponse")
    event_notification: EventNotification | None = Field(None, alias="EventNotification")


Message = SaleToPOIRequest | SaleToPOIResponse


class MessageError(ValueError):
    """The bytes are not a usable SaleToPOI message; the text says what and where."""


class NotStrictJson(MessageError):
    """JSON text but for what strict JSON does not have (NaN, Infinity, 1e400, an integer
    too long to read, a lone surrogate's escape): Python's own reader would take it."""


class DuplicateName(MessageError):
    """Valid JSON but for an object that holds a name twice (load_json(unique_names=True))."""


def load_json(raw: str | bytes, *, max_size: int | None = None,
              unique_names: bool = False) -> Any:
    """json.loads with the limits hostile input needs: size, nesting depth, encoding; with
    `unique_names`, DuplicateName for an object holding a name twice (the document read
    keeps the last value: `load_json` without it gives it)."""
    if max_size is not None and len(raw) > max_size:
        raise MessageError(f"message is {len(raw)} bytes, larger than the limit of {max_size}")
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageError(f"not UTF-8 text (bad byte at offset {exc.start})") from None
    # A byte-order mark, as Windows tools save UTF-8, is read past (RFC 8259 8.1 lets a
    # reader ignore it): refused, it read "Expecting value at line 1 column 1". Every reader
    # of a request (the intake, its refusals' echoes) comes here, so all see one document.
    raw = raw.removeprefix("\ufeff")
    try:
        document = jsontext.loads(raw)
    except json.JSONDecodeError as exc:
        # (a stray U+FEFF, a second mark or one pasted mid-text, is invisible in an editor)
        what = ("a byte-order mark (U+FEFF, invisible in most editors: save as UTF-8 without "
                "it)" if raw[exc.pos:exc.pos + 1] == "\ufeff" else exc.msg)
        raise MessageError(f"not valid JSON: {what} at line {exc.lineno} column {exc.colno}") from None
    except jsontext.JsonTextError as exc:
        raise NotStrictJson(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise MessageError(f"JSON nested deeper than {MAX_NESTING} levels") from None
    if jsontext.nests_too_deep(raw, document):
        raise MessageError(f"JSON nested deeper than {MAX_NESTING} levels")
    if unique_names:
        try:
            jsontext.check_unique_names(raw)
        except jsontext.DuplicateName as exc:
            raise DuplicateName(f"not valid JSON: {exc}") from None
    return document


# How many of a malformed message's problems its MessageError names (the rest counted)
PROBLEMS_NAMED = 3


def _where(err: dict[str, Any], root: str) -> str:
    return ".".join([root, *(str(p) for p in err["loc"])])


def parse_message(data: str | bytes | Any, *, max_size: int | None = None) -> Message:
    """Parse one SaleToPOIRequest or SaleToPOIResponse document; MessageError if it is not one."""
    # Bytes and text are parsed here; anything else is an already-parsed JSON value.
    document = load_json(data, max_size=max_size) if isinstance(data, str | bytes | bytearray) \
        else data
    if not isinstance(document, dict):
        raise MessageError(f"expected a JSON object, got {type(document).__name__}")
    roots = [k for k in ("SaleToPOIRequest", "SaleToPOIResponse") if k in document]
    if len(roots) != 1 or len(document) != 1:
        keys = ", ".join(sorted(map(str, document))) or "nothing"
        raise MessageError(
            f"expected one SaleToPOIRequest or SaleToPOIResponse object, found {keys}"
        )
    root = roots[0]
    inner = document[root]
    if not isinstance(inner, dict):
        raise MessageError(f"{root} must be an object, got {type(inner).__name__}")
    model = SaleToPOIRequest if root == "SaleToPOIRequest" else SaleToPOIResponse
    try:
        message = model.model_validate(inner)
    except ValidationError as exc:
        # Each problem named (a register fixing one at a time sent it again for each), up to
        # a few: the text goes back on the register's topic, the log and a chain's head office
        errors = exc.errors()
        named = "; ".join(f"{_where(err, root)}: {err['msg']}"
                          for err in errors[:PROBLEMS_NAMED])
        rest = len(errors) - PROBLEMS_NAMED
        more = f" (and {rest} more problem{'' if rest == 1 else 's'})" if rest > 0 else ""
        raise MessageError(f"{named}{more}") from None
    message._source = document
    return message


def check_request_header(message: Message) -> list[str]:
    """Problems with a request's header, by the seed's rules: the bridge only sends requests
    that pass (ServiceID 1-10 alphanumeric, POIID [model]-[serial], the body matches the
    category). Messages *from* terminals are not held to this: they vary in the field."""
    problems: list[str] = []
    if not isinstance(message, SaleToPOIRequest):
        return ["expected a SaleToPOIRequest"]
    header = message.message_header
    if header is None:
        return ["MessageHeader is missing"]
    if header.message_type != MessageType.REQUEST:
        problems.append(f"MessageHeader.MessageType must be Request, not {header.message_type}")
    if header.message_class not in (MessageClass.SERVICE, MessageClass.DEVICE):
        problems.append(
            f"MessageHeader.MessageClass must be Service or Device, not {header.message_class}"
        )
    if not header.sale_id or not header.sale_id.strip():
        problems.append("MessageHeader.SaleID is missing")
    elif len(header.sale_id) > 64 or not header.sale_id.isprintable():
        problems.append("MessageHeader.SaleID must be printable and at most 64 characters")
    if not header.service_id or not SERVICE_ID_PATTERN.match(header.service_id):
        problems.append("MessageHeader.ServiceID must be 1-10 letters or digits")
    if not header.poi_id or not POIID_PATTERN.match(header.poi_id):
        problems.append("MessageHeader.POIID must be [model]-[serial], e.g. V400m-324688179")
    key = message.body_key()
    expected = f"{header.message_category}Request"
    if key is None:
        problems.append(f"the request has no body (expected {expected})")
    elif key != expected:
        problems.append(f"MessageCategory {header.message_category} does not match body {key}")
    for name, body in (("AbortRequest", message.abort_request),
                       ("TransactionStatusRequest", message.transaction_status_request)):
        ref = body.message_reference if body is not None else None
        named = ref.message_category if ref is not None else None
        if named is not None and not isinstance(named, MessageCategory):
            # An open enum reads any text: "payment" would name no transaction the bridge
            # holds, and an abort of it would not stop the held "Payment" of those IDs.
            problems.append(f"{name}.MessageReference.MessageCategory {quoted(str(named), 40)!r} is no "
                            "MessageCategory (Payment, Reversal, ...: mind the capitals)")
    # body_key() names the first body it finds; a second one would reach the terminal too.
    bodies = [k for k in message.to_document()[message.kind] if _is_body_key(k)]
    if len(bodies) > 1:
        extra = ", ".join(k for k in bodies if k != expected)
        problems.append(f"a request carries one body, {expected}; remove {extra}")
    return problems


_REQUEST_BODY_KEYS = frozenset(
    field.alias for name, field in SaleToPOIRequest.model_fields.items()
    if field.alias and field.alias not in _ENVELOPE_KEYS and name != "kind"
)


def _is_body_key(key: str) -> bool:
    """Whether a key of a request names a message body: one the models know, or one named as
    nexo names bodies (CardAcquisitionRequest...). Other unknown keys are kept and sent."""
    return key in _REQUEST_BODY_KEYS or (
        key not in _ENVELOPE_KEYS and key.endswith(("Request", "Response", "Notification")))

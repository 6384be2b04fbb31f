"""Configuration: pydantic v2 models for the TOML file `poi-bridge run --config FILE` reads.

Every problem is reported with its place in the file (`terminals[1].link.baudrate: ...`), so
`poi-bridge check-config` can print them all at once.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from bridge.protocol.messages import POIID_PATTERN
from bridge.protocol.transaction import SERVICE_ID_REUSE_WINDOW

FRAMER_NAMES = ("stx-etx-lrc", "dle-crc16", "length-prefixed")
LINK_KINDS = ("serial", "tcp", "usb")

# What systemd/poi-bridge.service gives the daemon (tests/test_check_config.py holds them to
# the unit): its state directory (StateDirectory=, made by systemd at start) and its secrets,
# `LoadCredential=secret:/etc/poi-bridge/credentials`, which copies every regular file F of
# that directory to /run/credentials/poi-bridge.service/secret_F at start (systemd.exec(5);
# symlinks there are ignored). check-config, run before the service ever started, checks the
# file a credential will be made from.
STATE_DIRECTORY = Path("/var/lib/poi-bridge")
CREDENTIALS_DIRECTORY = Path("/run/credentials/poi-bridge.service")
CREDENTIAL_ID = "secret"
CREDENTIAL_SOURCE = Path("/etc/poi-bridge/credentials")


class SecretError(Exception):
    """A secret file named in the configuration cannot be read; the text says which."""


def credential_path(path: Path) -> Path:
    """Where a secret file named in the configuration is: a relative path names a systemd
    credential of the service (LoadCredential=), in $CREDENTIALS_DIRECTORY while it runs
    (else where the unit puts them, for check-config run beside it)."""
    if path.is_absolute():
        return path
    return Path(os.environ.get("CREDENTIALS_DIRECTORY") or CREDENTIALS_DIRECTORY) / path


def read_configured_secret(path: Path | None, what: str) -> str | None:
    """read_secret() of a file the configuration names: a relative path is a credential
    (credential_path). A path given on a command line is read as given."""
    return read_secret(None if path is None else credential_path(path), what)


def read_secret(path: Path | None, what: str) -> str | None:
    """A password file's content, as the daemon and the technician commands read it: the
    whole file, without its trailing line end, nor the byte order mark some Windows editors
    start a file with (read as part of the secret, a key that check-config passed matched
    no terminal)."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8-sig").rstrip("\r\n")
    except OSError as exc:
        raise SecretError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SecretError(f"{what} {path} is not UTF-8 text") from None


# --- numbers: TOML numbers, in a sensible range ----------------------------------------------

def _human(seconds: float) -> str:
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} s"


def _toml_value(kind: type) -> BeforeValidator:
    """Refuse, in a configuration file (parse_config's context), a number or boolean written
    as a string, and a fraction where a whole number is meant: pydantic would convert them,
    and "30" is as likely a typo as a number. Python callers (the `register --broker host:port`
    option) may still pass text."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if not (info.context or {}).get("toml"):
            return value
        key = info.field_name
        if kind is bool:
            if not isinstance(value, bool):
                raise PydanticCustomError(
                    "toml_bool", "must be true or false, without quotes: {key} = true",
                    {"key": key})
            return value
        if isinstance(value, bool):
            raise PydanticCustomError("toml_number", "must be a number, not true or false")
        if isinstance(value, str):
            raise PydanticCustomError(
                "toml_number", "must be a TOML number, written without quotes: {key} = "
                "{example}, not {key} = {given}",
                {"key": key, "example": value if _numeric(value) else 30,
                 "given": f'"{value}"'})
        if kind is int and isinstance(value, float):
            raise PydanticCustomError(
                "toml_whole_number", "must be a whole number, without a decimal point "
                "(got {given})", {"given": repr(value)})
        return value

    return BeforeValidator(check)


def _numeric(text: Any) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def _seconds(high: float, low: float = 0.0, *, why: str = "") -> Any:
    """A duration in seconds: a finite number in (low, high]. Without a bound a typo such as
    `payment_timeout = inf` passes, and a payment is then never polled."""

    def check(value: float, info: ValidationInfo) -> float:
        if not (math.isfinite(value) and low < value <= high):
            raise PydanticCustomError(
                "duration_range", "must be more than {low} s and at most {high} s "
                "({human}){why}; got {given}",
                {"low": f"{low:g}", "high": f"{high:g}", "human": _human(high), "why": why,
                 "given": f"{value:g}"})
        return value

    return Annotated[float, _toml_value(float), AfterValidator(check)]


def _count(low: int, high: int, *, why: str = "") -> Any:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise PydanticCustomError(
                "count_range", "must be at least {low} and at most {high}{why}; got {given}",
                {"low": low, "high": high, "why": why, "given": value})
        return value

    return Annotated[int, _toml_value(int), AfterValidator(check)]


Int = Annotated[int, _toml_value(int)]
Float = Annotated[float, _toml_value(float)]
Bool = Annotated[bool, _toml_value(bool)]


def _host(value: str) -> str:
    if not value or value != value.strip() or any(c.isspace() for c in value):
        raise PydanticCustomError(
            "host_spaces", "host {given} is empty or has spaces in it: write the name or "
            "address alone, e.g. host = \"10.0.0.5\" (the port has its own key)",
            {"given": f'"{value}"'})
    if "://" in value or value.count(":") == 1 or "[" in value or "]" in value:
        # (an IPv6 address has two colons or more, and is written here without brackets)
        raise PydanticCustomError(
            "host_url", "host {given} is not a host name or address: write the name or "
            "address alone, e.g. host = \"10.0.0.5\" (the port has its own key, TLS its own "
            "[mqtt.tls] table)", {"given": f'"{value}"'})
    return value


Host = Annotated[str, AfterValidator(_host)]


class _Strict(BaseModel):
    # Unknown keys in the configuration are typos; refuse them with their place.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _device_path(value: str) -> str:
    if not value or not value.isprintable():
        raise ValueError("must be a device path such as /dev/poi/ingenico-1234, printable "
                         "characters only")
    if not value.startswith("/"):
        # The daemon would open it from its working directory (/ under systemd): never there
        raise PydanticCustomError(
            "device_relative", "{given} is not an absolute path: write the full path, e.g. "
            "device = {example}", {"given": f'"{value}"', "example": (
                f'"/dev/{value}"' if "/" not in value else '"/dev/serial/by-id/..."')})
    return value


class SerialLink(_Strict):
    kind: Literal["serial"] = "serial"
    device: Annotated[str, AfterValidator(_device_path)] = Field(
        description="e.g. /dev/poi/ingenico-1234 or /dev/ttyACM0")
    baudrate: Int = Field(default=115200, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: Literal[1, 1.5, 2] = 1
    rtscts: Bool = False
    xonxoff: Bool = False

    @property
    def seconds_per_byte(self) -> float:
        """How long one byte takes on the line: start bit, data bits, parity, stop bits."""
        bits = 1 + self.bytesize + (self.parity != "N") + self.stopbits
        return bits / self.baudrate


class TcpLink(_Strict):
    kind: Literal["tcp"] = "tcp"
    host: Host
    port: Int = Field(gt=0, lt=65536)

    @property
    def seconds_per_byte(self) -> float:
        """Bytes leave at network speed: no time on the line worth counting."""
        return 0.0


def _hex16(value: int | str, info: ValidationInfo) -> int:
    # Unquoted, `vendor_id = 0b00` is a TOML binary number (0), and `true` a boolean: no
    # vendor has id 0, and the terminal would never be found.
    if isinstance(value, bool) or (value == 0 and info.field_name == "vendor_id"):
        raise PydanticCustomError(
            "usb_id_unquoted", "{given} is not a USB id ({what}): write it in quotes as lsusb "
            "shows it: {key} = \"0x0b00\"",
            {"given": str(value).lower(), "key": info.field_name,
             "what": "a boolean" if isinstance(value, bool) else
                     "unquoted, 0b00 is the TOML binary number 0"})
    number = int(value, 16) if isinstance(value, str) else value
    if not 0 <= number <= 0xFFFF:
        raise ValueError("must be a 16-bit USB id, e.g. 0x0b00")
    return number


def _usb_interface(value: int) -> int:
    if not 0 <= value <= 255:
        raise PydanticCustomError(
            "usb_interface", "must be a USB interface number, 0 to 255 (bInterfaceNumber in "
            "lsusb -v; 0 for most terminals); got {given}", {"given": value})
    return value


def _usb_serial(value: str | None) -> str | None:
    if value == "":
        raise PydanticCustomError(
            "usb_serial_empty", "is empty: write the terminal's serial number as `poi-bridge "
            "devices` lists it, or leave the key out to take the one device with these ids")
    return value


# The kernel's name of a USB device by where it is plugged in (its sysfs name, udev's
# sysname): bus, then the port on each hub from the root, e.g. 1-1.4
_USB_PORT = re.compile(r"[0-9]+-[0-9]+(\.[0-9]+)*")


def _usb_port(value: str | None) -> str | None:
    if value is not None and not _USB_PORT.fullmatch(value):
        raise PydanticCustomError(
            "usb_port", "{given} is not a USB port path: write it as the kernel names the "
            "device, bus-port.port..., e.g. port = \"1-1.4\" (bus 1, port 1, then port 4 of "
            "the hub there), as `poi-bridge devices` or the refusal to choose among "
            "terminals shows it", {"given": f'"{value}"'})
    return value


class UsbLink(_Strict):
    kind: Literal["usb"] = "usb"
    vendor_id: int
    product_id: int
    serial: Annotated[str | None, AfterValidator(_usb_serial)] = None
    # For terminals that report no serial number: the one plugged into this port is this one
    port: Annotated[str | None, AfterValidator(_usb_port)] = None
    interface: Annotated[int, _toml_value(int), AfterValidator(_usb_interface)] = 0
    # (a read waits at most this long, or 0.25 s, for bytes: far shorter, an idle terminal
    # was polled thousands of times a second, and a write gave up while the terminal was
    # busy for a moment)
    timeout: _seconds(
        60, 0.01, why="; shorter, an idle terminal is polled hundreds of times a second") = \
        Field(default=1.0, description="seconds per bulk transfer")

    @property
    def seconds_per_byte(self) -> float:
        """Bytes leave at USB speed: no time on the line worth counting."""
        return 0.0

    _ids = field_validator("vendor_id", "product_id", mode="before")(
        lambda cls, v, info: _hex16(v, info)  # noqa: ARG005
    )

    def same_model(self, other: object) -> bool:
        """Whether `other` is a USB link to the same kind of device and interface: only a
        serial number or a port can tell the two devices apart."""
        return isinstance(other, UsbLink) and (
            (self.vendor_id, self.product_id, self.interface)
            == (other.vendor_id, other.product_id, other.interface))


Link = Annotated[SerialLink | TcpLink | UsbLink, Field(discriminator="kind")]


class KeyConfig(_Strict):
    """Local encryption key shared with the terminal. The passphrase comes from a file or a
    systemd credential, never from this file, so the configuration can be shown freely."""

    identifier: str = Field(min_length=1)
    version: Int = Field(ge=0)
    passphrase_file: Path


# The smallest max_frame_size taken. A status answer holds the payment's whole record with its
# receipts: 11-12 KB as the vendor writes it (the Adyen fixtures), a third more encrypted. A
# frame over max_frame_size is dropped unread, so below this a payment the terminal approved
# would stay unresolved for good. (Tests of oversize frames lower it: it is read at validation.)
MIN_FRAME_SIZE = 32 * 1024


# Floors raised since a bridge ran without them: a configuration below one, which an earlier
# bridge ran, is refused by check-config, while `run` takes the floor and logs it
# (load_config's `raised`), so that an upgrade does not leave a store's tills without a bridge.
FLOOR_ERRORS = ("frame_size_floor", "reconcile_deadline_floor")


def _frame_size(value: int) -> int:
    if value < MIN_FRAME_SIZE:
        raise PydanticCustomError(
            FLOOR_ERRORS[0], "must be at least {floor} bytes; got {given}: a status answer "
            "holds the payment's record with its receipts (11-12 KB, more encrypted), and a "
            "frame over max_frame_size is dropped unread, which leaves an approved payment "
            "unresolved; leave the key out for the default, 65536",
            {"floor": MIN_FRAME_SIZE, "given": value})
    return value


class FramerConfig(_Strict):
    name: Literal["stx-etx-lrc", "dle-crc16", "length-prefixed"] = "stx-etx-lrc"
    ack_timeout: _seconds(60) = 2.0
    max_tries: _count(1, 10) = 3
    max_frame_size: Annotated[int, _toml_value(int), Field(le=16 * 1024 * 1024),
                              AfterValidator(_frame_size)] = 64 * 1024


class TerminalConfig(_Strict):
    poi_id: str = Field(description="[model]-[serial], e.g. V400m-324688179")
    link: Link
    framer: FramerConfig = FramerConfig()
    # Upper bounds no store needs to reach: the vendor's local time-out is 120 s, and with
    # these a terminal is busy at most payment_timeout + resync_attempts x status_timeout.
    payment_timeout: _seconds(3600, why="; the vendor's local time-out is 120 s") = 120.0
    status_timeout: _seconds(600) = 30.0
    resync_attempts: _count(1, 20) = 2
    poll_floor: _seconds(300) = Field(default=1.0, description="least pause between status polls")
    reconcile_initial: _seconds(3600) = 10.0
    reconcile_max_interval: _seconds(86400) = 600.0
    reconcile_deadline: _seconds(30 * 86400) = 24 * 3600.0
    # The longest a register waits while the terminal answers "in progress" (from the
    # request): then `unresolved`, and the bridge asks on in the background. Unset: 600 s,
    # or payment_timeout if that is longer.
    in_progress_limit: _seconds(7200) | None = None
    key: KeyConfig | None = None
    # A key rotation: the terminal's other key (the one it is moving from, or to), read as
    # well as `key`; the bridge sends with the one the terminal last used (see worker)
    previous_key: KeyConfig | None = None
    allowed_sale_ids: list[str] | None = None

    @property
    def in_progress_wait(self) -> float:
        """in_progress_limit, or its default: 600 s, or payment_timeout if that is longer."""
        if self.in_progress_limit is not None:
            return self.in_progress_limit
        return max(600.0, self.payment_timeout)

    @model_validator(mode="after")
    def _in_progress_after_the_timeout(self) -> TerminalConfig:
        if self.in_progress_limit is not None and self.in_progress_limit < self.payment_timeout:
            raise ValueError(
                f"in_progress_limit ({self.in_progress_limit:g} s) must be at least "
                f"payment_timeout ({self.payment_timeout:g} s): the first status poll goes "
                "at payment_timeout, and the register would be told unresolved at once")
        return self

    @model_validator(mode="after")
    def _previous_key_beside_a_key(self) -> TerminalConfig:
        if self.previous_key is None:
            return self
        if self.key is None:
            raise ValueError("previous_key is set without key: previous_key is the other key "
                             "of a key rotation, read beside [terminals.key]; set key too")
        if (self.previous_key.identifier, self.previous_key.version) == \
                (self.key.identifier, self.key.version):
            raise ValueError(
                f"previous_key has the identifier and version of key "
                f"({self.key.identifier!r} v{self.key.version}): a terminal names the key of a "
                "message by these two alone, so a rotation's keys must differ in one of them "
                "(the version, as the terminal's key settings count it)")
        return self

    @model_validator(mode="after")
    def _reconcile_deadline_after_unresolved(self) -> TerminalConfig:
        # A payment is unresolved at payment_timeout + resync_attempts status polls, or, one
        # the terminal keeps saying is in progress, at in_progress_limit; first asked about
        # in the background reconcile_initial later: a deadline before that gives it up at
        # once (session.py, its reconcile_deadline check; review rev6)
        polled = self.payment_timeout + self.resync_attempts * self.status_timeout
        unresolved = max(polled, self.in_progress_wait) + self.reconcile_initial
        if self.reconcile_deadline < unresolved:
            became = (f"payment_timeout {self.payment_timeout:g} + resync_attempts "
                      f"{self.resync_attempts} x status_timeout {self.status_timeout:g}"
                      if polled >= self.in_progress_wait else
                      f"in_progress_limit {self.in_progress_wait:g}"
                      + ("" if self.in_progress_limit is not None else " (its default)"))
            raise PydanticCustomError(
                FLOOR_ERRORS[1],
                f"reconcile_deadline ({self.reconcile_deadline:g} s) is shorter than the time "
                f"a payment takes to become unresolved and be asked about once more "
                f"({unresolved:g} s: {became} + reconcile_initial "
                f"{self.reconcile_initial:g}): "
                "an unresolved payment would be given up on at once; it is in seconds "
                "(86400 is a day)", {"floor": unresolved})
        return self

    @field_validator("allowed_sale_ids")
    @classmethod
    def _sale_ids(cls, values: list[str] | None) -> list[str] | None:
        if values == []:
            raise ValueError("is empty, which refuses every register: list the SaleIDs of the "
                             "registers that may use this terminal, or leave the key out to "
                             "allow every register")
        # A register's answers go to registers/{SaleID}/...: a SaleID that cannot be one
        # topic level is refused at every request, so allowing it allows nobody.
        from bridge.daemon.registers import topic_safe

        for value in values or ():
            if not topic_safe(value):
                raise ValueError(f"{value!r} cannot be a register's SaleID: it must be 1-128 "
                                 "printable characters without '/', '+' or '#' (it names the "
                                 "register's MQTT topics)")
        return values

    @field_validator("poi_id")
    @classmethod
    def _poi_id(cls, value: str) -> str:
        if not POIID_PATTERN.match(value):
            raise ValueError("POIID must be [model]-[serial], e.g. V400m-324688179")
        return value


class TlsConfig(_Strict):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: Bool = True

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _relative_is_a_credential(cls, value: Path | None) -> Path | None:
        # As for password_file: a relative path is a credential's name (the client key is a
        # secret), never a path from wherever the daemon or a command happens to run.
        return None if value is None else credential_path(value)

    def unreadable(self) -> list[str]:
        """The TLS files this process cannot read, each with why. Not a validation error:
        whoever loads the configuration (a technician's command, another user) may not be
        the daemon's user, a systemd credential exists only inside the service, and the
        daemon retries a file that is fixed while it runs."""
        problems = []
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is None:
                continue
            try:
                with path.open("rb"):
                    pass
            except OSError as exc:
                problems.append(f"mqtt.tls.{name}: cannot read {path}: {exc.strerror or exc}")
        return problems

    @model_validator(mode="after")
    def _key_needs_certificate(self) -> TlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file: the client key is only used "
                             "with its certificate")
        return self


# Room in an MQTT packet beside its payload (see MqttConfig.packet_limit)
PACKET_OVERHEAD = 3 * 65536


class MqttConfig(_Strict):
    host: Host = "localhost"
    port: Int = Field(default=1883, gt=0, lt=65536)
    base_topic: str = "poi-bridge"
    client_id: str = "poi-bridge"
    username: str | None = None
    password_file: Path | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    tls: TlsConfig | None = None

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_number(cls, value: Any) -> Any:
        """`protocol = 5` unquoted (a TOML integer) is MQTT 5, as "5" is; 3.1.1 cannot be a
        TOML number, and another number is said with the quoting to use."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return value
        if value == 5:
            return "5"
        raise PydanticCustomError(
            "mqtt_protocol", "must be \"3.1.1\" or \"5\", in quotes: protocol = \"3.1.1\" "
            "(got the number {given})", {"given": repr(value)})
    keepalive: Int = Field(default=30, ge=5, le=65535)  # a 16-bit field in MQTT
    max_payload: Int = Field(default=256 * 1024, ge=1024, le=268_435_455)  # MQTT's largest
    transaction_retention: _seconds(366 * 86400) = SERVICE_ID_REUSE_WINDOW
    health_interval: _seconds(3600) = 30.0
    # A broker that comes back without the bridge's session lost what it had not saved yet:
    # results delivered this long before are published again (README, "A broker that lost
    # its state"). Twice mosquitto's default autosave_interval (1800 s), its worst case.
    republish_window: _seconds(SERVICE_ID_REUSE_WINDOW) = 3600.0
    # At most this many messages (the newest) are published again then
    republish_limit: _count(1, 1_000_000) = 5000

    @property
    def packet_limit(self) -> int:
        """The largest MQTT packet the bridge takes (its MQTT 5 Maximum Packet Size) and
        publishes: max_payload and room for the topics (a topic and a ResponseTopic of 65535
        bytes at most each, correlation data and the rest)."""
        return self.max_payload + PACKET_OVERHEAD

    @field_validator("transaction_retention")
    @classmethod
    def _retention(cls, value: float) -> float:
        if value < SERVICE_ID_REUSE_WINDOW:
            raise ValueError(
                f"must be at least 48 hours ({SERVICE_ID_REUSE_WINDOW:.0f} s): the journal's "
                "record of a payment is what tells a register's repeat from a new payment "
                "within the 48-hour ServiceID rule; pruned sooner, a repeat would be charged "
                "again")
        return value

    @field_validator("base_topic")
    @classmethod
    def _base_topic(cls, value: str) -> str:
        wildcard = next((c for c in "#+" if c in value), None)
        why = ("it is empty" if not value
               else "it starts with '/'" if value.startswith("/")
               else "it ends with '/'" if value.endswith("/")
               else f"it holds the wildcard {wildcard!r}" if wildcard
               else "it holds a control character" if not value.isprintable()
               # (MQTT leaves topics that start with $ to the broker: mosquitto drops what a
               # client publishes to $SYS/..., and the bridge heard nothing, not even itself)
               else "it starts with '$', which brokers keep for their own topics ($SYS)"
               if value.startswith("$") else None)
        if why:
            raise ValueError(f"base_topic must be a plain topic prefix like 'poi/store-12': "
                             f"{why}")
        return value

    @field_validator("username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("username is empty: name the broker user the bridge logs in as, "
                             "or remove the key to log in without one")
        return value

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError("client_id must be a stable, printable name like "
                             "'poi-bridge-store-12': the broker keeps the bridge's session "
                             "(requests queued while it is away) under it")
        return value


# What a register's result adds around the terminal's answer (the bridge's part, the IDs)
FRAME_ROOM = 16 * 1024


class Config(_Strict):
    journal: Path = Path("/var/lib/poi-bridge/journal.sqlite3")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    mqtt: MqttConfig = MqttConfig()
    terminals: list[TerminalConfig] = Field(default_factory=list)

    @field_validator("terminals")
    @classmethod
    def _unique_terminals(cls, terminals: list[TerminalConfig]) -> list[TerminalConfig]:
        seen: dict[str, int] = {}
        for number, terminal in enumerate(terminals):
            if terminal.poi_id in seen:
                first = seen[terminal.poi_id]
                raise PydanticCustomError(
                    "duplicate_poi_id",
                    "terminal {poi_id} is configured twice, in terminals[{first}] and "
                    "terminals[{second}] (the {first_nth} and {second_nth} [[terminals]] "
                    "tables): keep one, or correct the other's poi_id",
                    {"poi_id": terminal.poi_id, "first": first, "second": number,
                     "first_nth": _nth(first + 1), "second_nth": _nth(number + 1)})
            seen[terminal.poi_id] = number
        return terminals

    @field_validator("terminals")
    @classmethod
    def _frames_fit_a_message(cls, terminals: list[TerminalConfig],
                              info: ValidationInfo) -> list[TerminalConfig]:
        # A terminal's answer goes to registers inside one MQTT packet, which the bridge
        # keeps within mqtt.packet_limit, the most it takes itself: a broker whose
        # max_packet_size matches (examples/mosquitto/mosquitto.conf) would otherwise
        # disconnect it for that packet, again at every reconnect, and no result would go out.
        mqtt = info.data.get("mqtt")
        if mqtt is None:
            return terminals
        limit = mqtt.packet_limit - FRAME_ROOM
        for number, terminal in enumerate(terminals):
            if terminal.framer.max_frame_size > limit:
                raise PydanticCustomError(
                    "frame_over_payload",
                    "terminals[{number}].framer.max_frame_size {size} is more than {limit}: "
                    "a terminal's answer is published to registers in one MQTT packet of at "
                    "most mqtt.max_payload + {overhead} bytes (the broker's max_packet_size "
                    "in examples/mosquitto/mosquitto.conf), the answer and {room} bytes "
                    "around it; raise mqtt.max_payload (and the broker's max_packet_size with "
                    "it) or lower max_frame_size",
                    {"number": number, "size": terminal.framer.max_frame_size,
                     "limit": limit, "overhead": PACKET_OVERHEAD, "room": FRAME_ROOM})
        return terminals

    def terminal(self, poi_id: str) -> TerminalConfig | None:
        return next((t for t in self.terminals if t.poi_id == poi_id), None)


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists each one with its place."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


def _place(loc: tuple[int | str, ...]) -> str:
    out = ""
    for number, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in LINK_KINDS and number and loc[number - 1] == "link":
            # The discriminator's branch name is noise to the reader; a key named like a
            # kind after it (a USB link's `serial`) is kept
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _nth(number: int) -> str:
    suffix = ("th" if 10 <= number % 100 <= 20
              else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th"))
    return f"{number}{suffix}"


# The tables of the file, by their path without list indexes, and what each may hold.
_TABLES: dict[tuple[str, ...], tuple[type[BaseModel], ...]] = {
    (): (Config,),
    ("mqtt",): (MqttConfig,),
    ("mqtt", "tls"): (TlsConfig,),
    ("terminals",): (TerminalConfig,),
    ("terminals", "link"): (SerialLink, TcpLink, UsbLink),
    ("terminals", "framer"): (FramerConfig,),
    ("terminals", "key"): (KeyConfig,),
    ("terminals", "previous_key"): (KeyConfig,),
}


def _header(table: tuple[str, ...]) -> str:
    if not table:
        return "the top level"
    if table == ("terminals",):
        return "[[terminals]]"
    return f"[{'.'.join(table)}]"


def _keys(table: tuple[str, ...]) -> set[str]:
    return {name for model in _TABLES.get(table, ()) for name in model.model_fields}


def _unknown_key(table: tuple[str, ...], key: str) -> str:
    """`mqtt.log_level: Extra inputs are not permitted`, said so a technician can act on it: in
    TOML a key belongs to the last table header above it, so a top-level key written after
    [mqtt] lands in [mqtt]."""
    text = f"unknown key {key} in {_header(table)}"
    for depth in range(len(table) - 1, -1, -1):  # the enclosing tables, nearest first
        parent = table[:depth]
        if key in _keys(parent):
            if not parent:
                return (f"{text}; {key} is a top-level key: move it above the first [table] "
                        "header (a key belongs to the last table header above it)")
            return (f"{text}; {key} is a {_header(parent)} key: move it above "
                    f"{_header(table)}, under the {_header(parent)} line (a key belongs to the "
                    "last table header above it)")
    for child in _TABLES:
        if child[:-1] == table and key in _keys(child):
            return f"{text}; {key} belongs in {_header(child)}: put it under that header"
    if table == ("terminals", "link"):
        kinds = [m.model_fields["kind"].default for m in _TABLES[table] if key in m.model_fields]
        if kinds:
            return f"{text}; {key} is a key of kind = \"{kinds[0]}\" links"
    near = difflib.get_close_matches(key, sorted(_keys(table)), n=1)
    if near:
        return f"{text}; did you mean {near[0]}?"
    return f"{text}; the keys there are: {', '.join(sorted(_keys(table)))}"


def _guess_kind(link: Any) -> str:
    if isinstance(link, dict):
        for model in _TABLES[("terminals", "link")]:
            required = {n for n, f in model.model_fields.items() if f.is_required()}
            if required and required <= link.keys():
                return f" (its keys are those of kind = \"{model.model_fields['kind'].default}\")"
    return ""


# What a path-valued key usually holds, to show with a path written as a number or boolean
_PATH_EXAMPLES = {"journal": "/var/lib/poi-bridge/journal.sqlite3"}


def _message(err: Any) -> str:
    kind, loc = err["type"], err["loc"]
    table = tuple(part for part in loc[:-1] if isinstance(part, str)
                  and not (part in LINK_KINDS and loc[loc.index(part) - 1] == "link"))
    if kind == "extra_forbidden":
        return _unknown_key(table, str(loc[-1]))
    kinds = " or ".join(", ".join(f'"{k}"' for k in LINK_KINDS).rsplit(", ", 1))
    if kind == "union_tag_not_found":
        return (f"kind is missing: a [terminals.link] table needs kind = {kinds}"
                f"{_guess_kind(err.get('input'))}")
    if kind == "union_tag_invalid":
        return (f"kind = {err['ctx'].get('tag')!r} is not a link kind: use kind = {kinds}")
    if kind == "missing":
        return f"{loc[-1]} is required in {_header(table)}"
    if kind == "string_type":  # a number or boolean where text is meant: quote it
        given = err.get("input")
        text = (f'"{str(given).lower() if isinstance(given, bool) else given}"'
                if isinstance(given, int | float) else '"..."')
        if isinstance(loc[-1], int):  # an item of a list
            return f"must be text: write it in quotes, {text}"
        return f"must be text: write it in quotes, {loc[-1]} = {text}"
    if kind == "path_type":  # a number or boolean where a file is meant
        example = _PATH_EXAMPLES.get(str(loc[-1]), "/path/to/file")
        return f'give a file path as a string, e.g. {loc[-1]} = "{example}"'
    if kind == "list_type" and loc == ("terminals",) and isinstance(err.get("input"), dict):
        return ("[terminals] is a single table: use [[terminals]], one table per terminal "
                "(its [terminals.link] and other tables under it)")
    if kind == "value_error":  # our own text: pydantic's "Value error, " before it says nothing
        return str(err["msg"]).removeprefix("Value error, ")
    return err["msg"]


def _raise_to_floors(data: dict, errors: list[Any], raised: list[str]) -> dict | None:
    """A copy of `data` with each value below a floor (FLOOR_ERRORS) set to that floor, each
    noted in `raised`; None if any other problem is among `errors`."""
    if not errors or any(err["type"] not in FLOOR_ERRORS for err in errors):
        return None
    data = copy.deepcopy(data)
    for err in errors:
        loc = err["loc"]  # the key's own, or the terminal's for its reconcile_deadline
        table, key = (loc[:-1], loc[-1]) if err["type"] == FLOOR_ERRORS[0] else (
            loc, "reconcile_deadline")
        holder: Any = data
        for part in table:
            holder = holder[part]
        floor = err["ctx"]["floor"]
        holder[key] = floor
        terminal = data["terminals"][err["loc"][1]]
        raised.append(f"{_place(err['loc'])} ({terminal.get('poi_id')}): {_message(err)}; the "
                      f"bridge runs with {key} = {floor:g} (check-config refuses this file: "
                      f"set {key} = {floor:g} or more)")
    return data


def parse_config(data: dict, source: str = "<config>", *,
                 raised: list[str] | None = None) -> Config:
    """The configuration in `data`, as read from a TOML file: numbers and booleans must be
    TOML numbers and booleans (not strings). Given `raised`, values below a floor added since
    an earlier bridge ran them (FLOOR_ERRORS) are taken at the floor, each noted there."""
    try:
        return Config.model_validate(data, context={"toml": True})
    except ValidationError as exc:
        errors = exc.errors()
        problems = [f"{_place(err['loc'])}: {_message(err)}" for err in errors]
    if raised is not None:
        notes: list[str] = []
        fixed = _raise_to_floors(data, errors, notes)
        if fixed is not None:
            # Raising a frame size lets the terminal's own checks run: they may find its
            # reconcile_deadline below its floor too
            config = parse_config(fixed, source, raised=notes)
            raised += notes
            return config
    raise ConfigError(source, problems)


def load_config(path: str | Path, *, raised: list[str] | None = None) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        problem = (f"not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line} (a TOML file "
                   "must be UTF-8: save it again as UTF-8, e.g. iconv -f latin1 -t utf-8)")
        raise ConfigError(str(path), [problem]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    return parse_config(data, str(path), raised=raised)


def load_config_as_run_does(path: str | Path, warn: Callable[[str], None]) -> Config:
    """The configuration as `run` takes it, for the technician's commands: a value below a
    floor added since an earlier bridge ran it (FLOOR_ERRORS) is taken at the floor and told
    to `warn` ("PATH: warning: ..."): they refused a file the daemon ran on, so were of no
    use on the boxes an upgrade left so. check-config alone refuses it."""
    raised: list[str] = []
    config = load_config(path, raised=raised)
    for note in raised:
        warn(f"{path}: warning: {note}")
    return config

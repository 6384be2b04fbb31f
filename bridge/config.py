"""Configuration: pydantic v2 models for the TOML file `poi-bridge run --config FILE` reads.

Every problem is reported with its place in the file (`terminals[1].link.baudrate: ...`), so
`poi-bridge check-config` can print them all at once.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bridge.protocol.transaction import SERVICE_ID_REUSE_WINDOW

POIID_PATTERN = re.compile(r"^[A-Za-z0-9]+(?:[A-Za-z0-9_]*)-[A-Za-z0-9]+\Z")
FRAMER_NAMES = ("stx-etx-lrc", "dle-crc16", "length-prefixed")


class SecretError(Exception):
    """A secret file named in the configuration cannot be read; the text says which."""


def read_secret(path: Path | None, what: str) -> str | None:
    """A password file's content, as the daemon and the technician commands read it: the
    first line, without its line end."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise SecretError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


class _Strict(BaseModel):
    # Unknown keys in the configuration are typos; refuse them with their place.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SerialLink(_Strict):
    kind: Literal["serial"] = "serial"
    device: str = Field(description="e.g. /dev/poi/ingenico-1234 or /dev/ttyACM0")
    baudrate: int = Field(default=115200, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: Literal[1, 1.5, 2] = 1
    rtscts: bool = False
    xonxoff: bool = False


class TcpLink(_Strict):
    kind: Literal["tcp"] = "tcp"
    host: str
    port: int = Field(gt=0, lt=65536)


def _hex16(value: int | str) -> int:
    number = int(value, 16) if isinstance(value, str) else value
    if not 0 <= number <= 0xFFFF:
        raise ValueError("must be a 16-bit USB id, e.g. 0x0b00")
    return number


class UsbLink(_Strict):
    kind: Literal["usb"] = "usb"
    vendor_id: int
    product_id: int
    serial: str | None = None
    interface: int = 0
    timeout: float = Field(default=1.0, gt=0, description="seconds per bulk transfer")

    _ids = field_validator("vendor_id", "product_id", mode="before")(
        lambda cls, v: _hex16(v)  # noqa: ARG005
    )


Link = Annotated[SerialLink | TcpLink | UsbLink, Field(discriminator="kind")]


class KeyConfig(_Strict):
    """Local encryption key shared with the terminal. The passphrase comes from a file or a
    systemd credential, never from this file, so the configuration can be shown freely."""

    identifier: str = Field(min_length=1)
    version: int = Field(ge=0)
    passphrase_file: Path


class FramerConfig(_Strict):
    name: Literal["stx-etx-lrc", "dle-crc16", "length-prefixed"] = "stx-etx-lrc"
    ack_timeout: float = Field(default=2.0, gt=0)
    max_tries: int = Field(default=3, ge=1)
    max_frame_size: int = Field(default=64 * 1024, ge=256)


class TerminalConfig(_Strict):
    poi_id: str = Field(description="[model]-[serial], e.g. V400m-324688179")
    link: Link
    framer: FramerConfig = FramerConfig()
    payment_timeout: float = Field(default=120.0, gt=0)
    status_timeout: float = Field(default=30.0, gt=0)
    resync_attempts: int = Field(default=2, ge=1)
    poll_floor: float = Field(default=1.0, gt=0, description="least pause between status polls")
    reconcile_initial: float = Field(default=10.0, gt=0)
    reconcile_max_interval: float = Field(default=600.0, gt=0)
    reconcile_deadline: float = Field(default=24 * 3600.0, gt=0)
    key: KeyConfig | None = None
    allowed_sale_ids: list[str] | None = None

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
    check_hostname: bool = True

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


class MqttConfig(_Strict):
    host: str = "localhost"
    port: int = Field(default=1883, gt=0, lt=65536)
    base_topic: str = "poi-bridge"
    client_id: str = "poi-bridge"
    username: str | None = None
    password_file: Path | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    tls: TlsConfig | None = None
    keepalive: int = Field(default=30, ge=5, le=65535)  # a 16-bit field in MQTT
    max_payload: int = Field(default=256 * 1024, ge=1024)
    transaction_retention: float = Field(default=SERVICE_ID_REUSE_WINDOW, gt=0)
    health_interval: float = Field(default=30.0, gt=0)

    @field_validator("transaction_retention")
    @classmethod
    def _retention(cls, value: float) -> float:
        if value < SERVICE_ID_REUSE_WINDOW:
            raise ValueError(
                f"must be at least 48 hours ({SERVICE_ID_REUSE_WINDOW:.0f} s): the journal's record of a payment is what tells a register's repeat from a "
                "new payment within the 48-hour ServiceID rule; pruned sooner, a repeat would "
                "be charged again")
        return value

    @field_validator("base_topic")
    @classmethod
    def _base_topic(cls, value: str) -> str:
        if (not value or value.startswith("/") or value.endswith("/")
                or any(c in value for c in "#+") or not value.isprintable()):
            raise ValueError("base_topic must be a plain topic prefix like 'poi/store-12'")
        return value

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError("client_id must be a stable, printable name like "
                             "'poi-bridge-store-12': the broker keeps the bridge's session "
                             "(requests queued while it is away) under it")
        return value


class Config(_Strict):
    journal: Path = Path("/var/lib/poi-bridge/journal.sqlite3")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    mqtt: MqttConfig = MqttConfig()
    terminals: list[TerminalConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_terminals(self) -> Config:
        seen: set[str] = set()
        for terminal in self.terminals:
            if terminal.poi_id in seen:
                raise ValueError(f"terminal {terminal.poi_id} is configured twice")
            seen.add(terminal.poi_id)
        return self

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
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("serial", "tcp", "usb") and out.endswith("link"):
            continue  # the discriminator's branch name is noise to the reader
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def parse_config(data: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_place(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(source, problems) from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    return parse_config(data, str(path))

"""A small register client over MQTT: what a till does, for people, the demo and tests.

It publishes a SaleToPOIRequest to the bridge and waits for the answer on its own response
topic, showing the progress events meanwhile. Registers in other languages do the same with
their MQTT library; the README documents the topics and payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.addresses import host_port
from bridge.config import MqttConfig, SecretError, read_configured_secret, read_secret
from bridge.daemon.mqtt import SetupError, login_refused
from bridge.daemon.mqtt import tls_context as daemon_tls_context
from bridge.daemon.mqtt_client import AcknowledgedClient, PublishRefused
from bridge.daemon.registers import Topics
from bridge.deployment import password_to_fix
from bridge.protocol.builders import new_service_id
from bridge.protocol.outcome import MONEY_CATEGORIES
from bridge.protocol.transaction import SERVICE_ID_REUSE_WINDOW, retry_digest
from bridge.simulator.responses import payment_request

# A CONNACK refusing the protocol version: 3.1.1's 1, MQTT 5's 0x84 (paho gives 0x84 for
# both to an MQTT 5 client). Such a broker is asked again in MQTT 3.1.1.
UNSUPPORTED_VERSION = frozenset({1, 0x84})


def cli_client_id() -> str:
    """The client id of a command-line or technician client: its own, one per process.

    Never `register-<SaleID>`: a till keeps its persistent session under that id, and a
    second connection with it would take the till off the broker and, with a clean session,
    throw away the results queued for it. Nor one fixed id for every technician: two of them
    at once would take turns kicking each other off."""
    return f"poi-bridge-cli-{socket.gethostname()}-{os.getpid()}"


class ConnectionSetupError(Exception):
    """What keeps a client from trying to connect at all (a password or TLS file it cannot
    use), in one line that names the file and what to check."""


class PublishRefusedByBroker(Exception):
    """An MQTT 5 broker acknowledged our publish with a refusal (its ACL: 0x87 Not
    authorized): it took nothing, and nobody received it. Said with the topic and the login,
    for the technician to log in as a user allowed there. (MQTT 3.1.1 cannot say so: the
    broker acknowledges and drops.)"""

    def __init__(self, topic: str, username: str | None, refused: PublishRefused) -> None:
        self.topic, self.username, self.reason = topic, username, refused.reason
        who = f"user {username!r}" if username else "a login without a user name"
        super().__init__(f"the broker refused the publish on {topic} for {who} "
                         f"({refused}): its ACL does not let this login publish there")


class ConnectionLost(aiomqtt.MqttError):
    """The client's connection to the broker ended while it was waiting for an answer. For
    a request already handed to the broker, nothing is known of its outcome: it may still be
    delivered to the bridge (its persistent session) and run."""


def read_password(path: Path | None, *, configured: bool = False) -> str | None:
    """The MQTT password in `password_file`, read as the daemon reads it: the whole file,
    without its trailing line end (see bridge.config.read_secret). A systemd credential of
    the service is named in the configuration by its path (/run/credentials/poi-bridge
    .service/...): it exists only while the service runs, and only root and the service may
    read it. `configured`: the path is the configuration's `mqtt.password_file` (a relative
    one names a credential, as for the daemon); else it was given on the command line."""
    try:
        if configured:
            return read_configured_secret(path, "the MQTT password file")
        return read_secret(path, "the MQTT password file")
    except SecretError as exc:
        if path is not None and path.is_absolute() and _missing(path):
            # no user may read it: a file never made (a by-hand user following advice
            # meant for an installed box), or a typing error in its name
            raise ConnectionSetupError(
                f"cannot read the MQTT password file {path}: it does not exist: create it, "
                "or leave out --password-file (mqtt.password_file in a configuration) for a "
                "broker that takes no login") from None
        raise ConnectionSetupError(
            f"{exc}; run as a user that may read it (root, for a systemd credential, which "
            "exists only while poi-bridge.service runs)") from None


def _missing(path: Path) -> bool:
    """Whether `path` is not there at all (not merely unreadable to this user)."""
    try:
        path.stat()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def tls_context(mqtt: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context of `mqtt.tls`, built as the daemon builds its own."""
    try:
        return daemon_tls_context(mqtt.tls)
    except SetupError as exc:
        raise ConnectionSetupError(str(exc)) from None


def configuration_names(mqtt: MqttConfig) -> dict[str, str]:
    """What a connection is made of, as the configuration names it: what connection_problem
    tells the technician to check."""
    return {"username": "mqtt.username", "password": password_to_fix(mqtt.password_file),
            "address": "mqtt.host and mqtt.port", "tls": "mqtt.tls"}


def option_names(mqtt: MqttConfig, args: Any) -> dict[str, str]:
    """configuration_names(), but what came from the command line (or from nowhere, without
    --config) named by its option: the technician fixes what they typed."""
    names = configuration_names(mqtt) if args.config else {}
    if getattr(args, "username", None) or not args.config:
        names["username"] = "--username"
    if getattr(args, "password_file", None):
        names["password"] = f"the password in --password-file {args.password_file}"
    elif not args.config:
        names["password"] = "--password-file (none given: no password was sent)"
    if getattr(args, "broker", None) or not args.config:
        names["address"] = "--broker"
    if not args.config or any(getattr(args, option, None) for option in (
            "tls", "ca_file", "cert_file", "key_file")):
        names["tls"] = "--tls, --ca-file, --cert-file, --key-file"
    return names


def connection_problem(exc: BaseException, mqtt: MqttConfig,
                       names: dict[str, str] | None = None) -> str:
    """What failed when connecting to the broker of `mqtt`, and what to check, named as
    `names` says (configuration_names by default)."""
    names = names or configuration_names(mqtt)
    broker = host_port(mqtt.host, mqtt.port)
    if isinstance(exc, ConnectionSetupError):
        return str(exc)
    if login_refused(exc):
        who = f"as user {mqtt.username!r}" if mqtt.username else "without a user name"
        return (f"the broker {broker} refused the login {who}: {exc}; check "
                f"{names['username']} and {names['password']} against the broker's password "
                "file and ACL")
    if isinstance(exc, aiomqtt.MqttCodeError):
        return f"the broker {broker} refused the connection: {exc}"
    tls = (f"TLS ({names['tls']}: the CA that signed the broker's certificate, the host name "
           "in it, the client certificate the broker wants)" if mqtt.tls is not None
           else f"whether the broker wants TLS ({names['tls']})")
    return (f"cannot connect to the broker {broker}: {str(exc) or type(exc).__name__}; "
            f"check that it runs, {names['address']}, and {tls}")


def command_line_login(username: str | None, password_file: Path | None) -> dict[str, Any]:
    """The --username and --password-file a command was given (those not given left out).
    A file named on the command line is read from where the technician is: made absolute,
    since a relative path in the configuration names a systemd credential."""
    login = {"username": username,
             "password_file": password_file.absolute() if password_file else None}
    return {key: value for key, value in login.items() if value is not None}


def refused_advice(base_topic: str, sale_id: str | None = None) -> str:
    """Whom to log in as when the broker refused a register's request (`sale_id`) or an
    operator command (None), as examples/mosquitto/acl has it."""
    if sale_id is None:
        return (f"log in as a user the broker's ACL lets publish on {base_topic}/bridge/"
                "request/+ (under examples/mosquitto/acl, the operator: --username operator "
                "--password-file FILE)")
    return ("log in as a user the broker's ACL lets publish there (under examples/mosquitto/"
            f"acl, only the register {sale_id} itself: --username {sale_id} --password-file "
            "FILE)")


def unseen_refusal(protocol: str | None) -> str:
    """Said where no answer came over MQTT 3.1.1: its broker cannot say it refused."""
    if protocol != "3.1.1":
        return ""
    return (" (this broker speaks MQTT 3.1.1 only, which cannot say it refused the publish: "
            "if its log shows \"Denied PUBLISH\" for this login, nothing reached the bridge; "
            "log in as a user its ACL allows there, with --username and --password-file)")


def partial_advice(info: dict[str, Any]) -> str:
    """What a till says of a `partially_approved` result (its `bridge` part): how much was
    taken of how much, and what to do. Never "paid": only part of the sale was."""
    amounts = _object(info.get("amounts"))
    requested, approved = amounts.get("requested"), amounts.get("approved")
    currency = f" {amounts['currency']}" if isinstance(amounts.get("currency"), str) else ""
    numbers = all(isinstance(n, (int, float)) and not isinstance(n, bool)
                  for n in (requested, approved))
    if numbers:
        taken = (f"{approved!r}{currency} of {requested!r}{currency} taken, "
                 f"{round(requested - approved, 6)!r}{currency} still to pay")
    else:
        taken = "an amount the bridge could not read was taken (see the terminal's response)"
    return (f"PARTIALLY APPROVED, NOT PAID IN FULL: {taken}; charge the rest another way, or "
            "reverse this payment")


def _object(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (a malformed part of a message)."""
    return value if isinstance(value, dict) else {}


def _refused_unrecorded(answer: dict[str, Any]) -> bool:
    """Whether `answer` is the bridge's own refusal of a request it did not take (nothing
    recorded under its IDs), not a conflict refusal nor a result."""
    info = _object(answer.get("bridge"))
    return (info.get("source") == "bridge" and info.get("outcome") == "rejected"
            and "conflict" not in info)


@dataclass(eq=False)
class _Waiter:
    """One request() call waiting for its answer. Answers name the request by its ServiceID
    alone, so what else tells ours apart lives here, per call."""

    future: asyncio.Future[dict[str, Any]]
    # its request moves money: `unresolved` is not its result (that follows under its IDs);
    # for any other request (a status request) it is
    money: bool
    # it differs from a request this client sent under its ServiceID before: the bridge
    # refuses it (`conflict`), and every other answer under these IDs is the earlier one's
    reused: bool
    # the bridge took its request (an `accepted` or `duplicate` event came while it waited):
    # a conflict refusal under these IDs then answers another request
    taken: bool = False

    def answered_by(self, info: dict[str, Any]) -> bool:
        """Whether a response with this `bridge` part is this call's final answer."""
        if "conflict" in info:
            return self.reused or not self.taken
        if self.reused:
            return False
        return info.get("outcome") != "unresolved" or not self.money


class RegisterClient:
    """A register's connection. By default, as a till: client id `register-<SaleID>` with a
    persistent session, so results published while it is away are queued for it. With
    `persistent=False` (a person or a tool looking in) the default id is `cli_client_id()`,
    so that it never takes over a till's session."""

    def __init__(self, host: str, port: int, sale_id: str, *, base_topic: str = "poi-bridge",
                 client_id: str | None = None, persistent: bool = True,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 on_malformed: Callable[[str, str], None] | None = None,
                 username: str | None = None, password: str | None = None,
                 tls_context: ssl.SSLContext | None = None, plain_topic: bool = False,
                 mqtt5: bool = False) -> None:
        self.host, self.port, self.sale_id = host, port, sale_id
        # MQTT 5 where the broker speaks it (else 3.1.1): only its PUBACK can say that the
        # broker refused a publish, which 3.1.1 takes and drops in silence
        self._mqtt5 = mqtt5
        self.protocol: str | None = None  # "5" or "3.1.1", once connected
        # Requests go to .../request/{SaleID}, which a broker ACL can tie to this register's
        # login; the plain .../request where the ACL allows only that (or the bridge is older)
        self._plain_topic = plain_topic
        self._login = {"username": username, "password": password, "tls_context": tls_context}
        self.username = username
        self.topics = Topics(base_topic)
        self._client_id = client_id or (f"register-{sale_id}" if persistent
                                        else cli_client_id())
        self._persistent = persistent
        self._on_event = on_event
        self._on_malformed = on_malformed  # (topic, what is wrong) of each message skipped
        self._client: AcknowledgedClient | None = None
        self._waiting: dict[str, _Waiter] = {}  # by ServiceID: one call at a time each
        # ServiceID -> (retry_digest, when) of the first request sent under it, for as long
        # as the bridge refuses a different one under it: an answer that comes later under
        # those IDs (the request timed out here, the broker delivers a copy again) is that
        # request's, never a different one's (oldest first; forgotten when the bridge
        # refused the request before taking it)
        self._sent: dict[str, tuple[str, float]] = {}
        self._commands: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.responses: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None
        self._lost: ConnectionLost | None = None  # set when the connection ended under us
        self.bridge_state: str | None = None  # the retained bridge/state, once seen
        self._bridge_state_seen = asyncio.Event()

    @classmethod
    def for_bridge(cls, mqtt: MqttConfig, sale_id: str, **options: Any) -> RegisterClient:
        """A client to the broker and base topic of a bridge's `[mqtt]` configuration, with
        its user name, password and TLS. ConnectionSetupError if a file cannot be used."""
        return cls(mqtt.host, mqtt.port, sale_id, base_topic=mqtt.base_topic,
                   username=mqtt.username,
                   password=read_password(mqtt.password_file, configured=True),
                   tls_context=tls_context(mqtt), mqtt5=True, **options)

    def _new_client(self, mqtt5: bool) -> AcknowledgedClient:
        options: dict[str, Any] = {"clean_session": not self._persistent}
        if mqtt5:
            properties = Properties(PacketTypes.CONNECT)
            if self._persistent:  # a till's session outlives the connection, as in 3.1.1
                properties.SessionExpiryInterval = 24 * 3600
            options = {"protocol": aiomqtt.ProtocolVersion.V5, "properties": properties,
                       "clean_start": not self._persistent}
        return AcknowledgedClient(self.host, self.port, identifier=self._client_id,
                                  **options, **self._login)

    async def __aenter__(self) -> RegisterClient:
        self._client = self._new_client(self._mqtt5)
        try:
            await self._client.__aenter__()
            self.protocol = "5" if self._mqtt5 else "3.1.1"
        except aiomqtt.MqttCodeError as exc:
            if not (self._mqtt5 and getattr(exc.rc, "value", exc.rc) in UNSUPPORTED_VERSION):
                raise
            self._client = self._new_client(False)  # a broker that speaks only 3.1.1
            await self._client.__aenter__()
            self.protocol = "3.1.1"
        await self._client.subscribe(f"{self.topics.base}/registers/{self.sale_id}/#", qos=1)
        await self._client.subscribe(f"{self.topics.base}/bridge/response/+", qos=1)
        await self._client.subscribe(self.topics.bridge_state, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        try:
            await self._read_messages()
        except Exception as exc:  # noqa: BLE001 - whatever ended it, the waiters must know
            # Without this, every request and command waiting for an answer would wait out
            # its whole timeout on a connection that is gone, and then say "no answer".
            self._lost = ConnectionLost(
                f"the connection to the broker was lost ({host_port(self.host, self.port)}: "
                f"{str(exc) or type(exc).__name__})")
            for future in [*(w.future for w in self._waiting.values()),
                           *self._commands.values()]:
                if not future.done():
                    future.set_exception(self._lost)
                    future.exception()  # (see AcknowledgedClient.fail_pending)
            assert self._client is not None
            self._client.fail_pending(self._lost)

    async def _read_messages(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            topic = message.topic.value
            try:
                payload = json.loads(message.payload)
            except (TypeError, ValueError):
                payload = None
            # A malformed message is skipped: it must not end the reader (and with it every
            # wait for an answer, reported as a lost connection).
            if not isinstance(payload, dict):
                if message.payload:  # (an empty one clears a retained message)
                    self._malformed(topic, "not a JSON object")
            elif topic == self.topics.bridge_state:
                self.bridge_state = payload.get("state")
                self._bridge_state_seen.set()
            elif topic.endswith("/event"):
                if not isinstance(payload.get("event"), str):
                    self._malformed(topic, 'no "event" in it')
                    continue
                if payload["event"] in ("accepted", "duplicate"):
                    service_id = _object(payload.get("transaction")).get("service_id")
                    waiter = self._waiting.get(service_id) if isinstance(service_id, str) \
                        else None
                    if waiter is not None:  # (it came after the request was sent: see request)
                        waiter.taken = True
                if self._on_event is not None:
                    self._on_event(payload)
            elif topic.endswith("/response") and "/registers/" in topic:
                self.responses.append(payload)
                info = _object(payload.get("bridge"))
                service_id = _object(info.get("transaction")).get("service_id")
                waiter = self._waiting.get(service_id) if isinstance(service_id, str) else None
                # A refusal of a different request reusing these IDs (`conflict`) is never
                # the transaction's result: it answers ours only if ours was the different one
                if waiter is not None and not waiter.future.done() and waiter.answered_by(info):
                    waiter.future.set_result(payload)
            elif "/bridge/response/" in topic:
                # Everyone asking the same command hears every answer on this topic (another
                # technician, head office through the chain bridge): ours echoes our token.
                token = payload.get("transaction")
                future = self._commands.get(token) if isinstance(token, str) else None
                if future is not None and not future.done():
                    future.set_result(payload)

    def _malformed(self, topic: str, problem: str) -> None:
        if self._on_malformed is not None:
            self._on_malformed(topic, problem)

    async def wait_for_bridge(self, timeout: float = 3.0) -> str | None:
        """The bridge's retained state ("online", "offline"), or None if no bridge has ever
        announced itself under this base topic (wrong base topic, or never started)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._bridge_state_seen.wait(), timeout)
        return self.bridge_state

    async def request(self, document: dict[str, Any], timeout: float = 300.0, *,
                      on_sending: Callable[[], None] | None = None,
                      on_published: Callable[[], None] | None = None) -> dict[str, Any]:
        """Publish a request and wait for its final answer. For a money request (Payment,
        Reversal, StoredValue) an `unresolved` report is shown as an event and waiting goes
        on, as a till would keep the sale open; for any other (a TransactionStatus request
        about a payment the bridge still holds) `unresolved` is the answer. `on_published` is
        called once the broker has taken the request, `on_sending` just before it is handed
        to the connection (from then on the broker may have it). TimeoutError when no answer came in
        time, ConnectionLost when the connection ended meanwhile: in both cases the request
        may still run (see the README, `register`).

        ValueError, before anything is sent, when this client is already waiting for the
        answer to a request under the same ServiceID: answers name only the ServiceID, so
        neither call could tell its answer from the other's. A different request under a
        ServiceID this client used within 48 h (unless the bridge refused that one before
        taking it) is sent, and its answer is the bridge's refusal (`bridge.conflict`): no
        other answer under those IDs is its own."""
        assert self._client is not None
        self._check_connected()
        header = document["SaleToPOIRequest"]["MessageHeader"]
        service_id = header["ServiceID"]
        if service_id in self._waiting:
            raise ValueError(
                f"not sent: this client is already waiting for the answer to a request under "
                f"ServiceID {service_id!r}, and an answer names only the ServiceID, so the two "
                "could not be told apart; wait for that call's answer, and use a new ServiceID "
                "for a new request")
        digest, now = retry_digest(document), time.monotonic()
        while self._sent and now - next(iter(self._sent.values()))[1] > SERVICE_ID_REUSE_WINDOW:
            del self._sent[next(iter(self._sent))]
        earlier = self._sent.get(service_id)
        category = header.get("MessageCategory")
        waiter = _Waiter(
            asyncio.get_running_loop().create_future(),
            # (a category that cannot be read may be a money one: never take `unresolved`)
            money=not isinstance(category, str) or category in MONEY_CATEGORIES,
            reused=earlier is not None and earlier[0] != digest)
        # No await until the publish is handed to the connection: any event or answer read
        # for this waiter came after the request was sent
        self._waiting[service_id] = waiter
        try:
            if on_sending is not None:
                on_sending()
            if earlier is None:
                self._sent[service_id] = (digest, now)
            topic = self.topics.base + f"/terminals/{header['POIID']}/request"
            if not self._plain_topic:
                topic += f"/{header['SaleID']}"
            try:
                await self._publish(topic, json.dumps(document))
            except PublishRefusedByBroker:
                if earlier is None:  # it went nowhere: nothing stands under these IDs
                    self._sent.pop(service_id, None)
                raise
            if on_published is not None:
                on_published()
            answer = await asyncio.wait_for(waiter.future, timeout)
            if earlier is None and not waiter.taken and _refused_unrecorded(answer):
                # refused before the bridge took it (a malformed request): nothing stands
                # under these IDs, and a corrected one runs there. Any other answer (from the
                # journal for a repeat, which comes BEFORE its `duplicate` event) means the
                # request stands: a different one under these IDs gets only its refusal.
                self._sent.pop(service_id, None)
            return answer
        finally:
            if self._waiting.get(service_id) is waiter:  # only its own
                del self._waiting[service_id]

    async def _publish(self, topic: str, payload: str) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement (10 s, as aiomqtt's
        own publish). PublishRefusedByBroker when an MQTT 5 broker refused it: nothing was
        sent on. aiomqtt.MqttError when no acknowledgement came: the broker may have it."""
        assert self._client is not None
        ack = self._client.publish_nowait(topic, payload.encode(), qos=1)
        try:
            await asyncio.wait_for(ack, 10)
        except PublishRefused as exc:
            raise PublishRefusedByBroker(topic, self.username, exc) from None
        except TimeoutError:
            raise aiomqtt.MqttError(
                f"the broker did not acknowledge the publish on {topic} within 10 s") from None

    def _check_connected(self) -> None:
        if self._lost is not None:
            raise self._lost

    async def pay(self, poi_id: str, amount: float, currency: str = "EUR", *,
                  service_id: str | None = None, transaction_id: str | None = None,
                  timeout: float = 300.0, on_sending: Callable[[], None] | None = None,
                  on_published: Callable[[], None] | None = None) -> dict[str, Any]:
        """Pay `amount` on terminal `poi_id` and wait for the result (see request()).

        `transaction_id` is the sale's order number (SaleTransactionID.TransactionID): give
        it, the same for every try of one sale. Without it every call is a new order
        (`<SaleID>-<ServiceID>`), and the bridge cannot catch a retry of an unfinished one:
        pressing "pay" again after `unresolved` or a timeout would charge the shopper again
        if the first went through."""
        document = payment_request(self.sale_id, service_id or new_service_id(), poi_id,
                                   amount, currency)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        sale = document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"]
        sale["TimeStamp"] = stamp
        if transaction_id is not None:
            sale["TransactionID"] = transaction_id
        return await self.request(document, timeout, on_sending=on_sending,
                                  on_published=on_published)

    async def command(self, command: str, body: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> dict[str, Any]:
        """Send an operator command and wait for its answer. The answers to everyone's
        commands come on one topic; ours is the one that echoes the unique token put in the
        body's "transaction" field (any "transaction" given in `body` is replaced)."""
        assert self._client is not None
        self._check_connected()
        token = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._commands[token] = future
        try:
            await self._publish(f"{self.topics.base}/bridge/request/{command}",
                                json.dumps({**(body or {}), "transaction": token}))
            return await asyncio.wait_for(future, timeout)
        finally:
            del self._commands[token]

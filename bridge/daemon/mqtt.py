"""The MQTT side: one connection to the store broker, kept up for the life of the daemon.

Results and events go through the journal's outbox: written before publishing, marked
delivered only once the broker acknowledged them (QoS 1), published again after every
reconnect and every restart. So a broker outage or a crash can delay a result, never lose
it; a register may see a message twice (each carries its SaleID/ServiceID), never zero
times. Retained states (bridge, terminals) are "latest wins" and are republished on every
reconnect, so nothing stays "offline" after a broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import socket
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge.addresses import host_port
from bridge.config import MqttConfig, TlsConfig
from bridge.daemon.journal import Journal, JournalGone, OutboxMessage
from bridge.daemon.mqtt_client import PipelinedClient, PublishRefused
from bridge.daemon.outbox import OUTBOX_WINDOW, OutboxPump
from bridge.daemon import peers as peer_rules
from bridge.daemon.peers import ANNOUNCE_TIMEOUT, OtherBridges
from bridge.daemon import quiet
from bridge.daemon.quiet import QuietRepeats, is_shared
from bridge.daemon.registers import (
    Topics,
    dumps,
    event_payload,
    id_text,
    is_final_document,
    partial_amounts,
    redacted_refusal,
    refusal_category,
    request_header,
    result_payload,
    result_payload_bytes,
    splices_response,
    topic_problem,
    topic_safe,
    transaction_payload,
    transaction_payload_from,
)
from bridge.daemon.set_aside import SetAside, SetAsideRequests
from bridge.deployment import password_to_fix
from bridge.protocol.actions import Deliver, Progress
from bridge.protocol.builders import failure_response
from bridge.protocol.messages import MessageError, load_json
from bridge.protocol.outcome import MONEY_CATEGORIES
from bridge.protocol.transaction import TxKey
from bridge.redaction import redact, redact_json
from bridge.transports import Backoff

log = logging.getLogger("poi_bridge.mqtt")

# Requests already queued are handled in one loop pass, and share its journal commit, up to
# this many: more would hold the first one's frame back for the others' handling (~1 ms each).
REQUESTS_PER_PASS = 4
# What a refusal on bridge/error quotes from the refused request
_ECHOED = ("error", "poi_id", "sale_id", "service_id", "topic", "transaction")

# (topic, payload, properties or None) -> None; the intake answers through `reply`.
RequestHandler = Callable[[str, bytes, "Reply"], Awaitable[None] | None]

class SetupError(Exception):
    """The connection cannot even be attempted (a TLS file, a client option): retried, since
    the file may be fixed while the bridge runs, and logged as something to fix."""


class JournalFailed(Exception):
    """The journal could not record a connection about to be made (Journal.note_connecting):
    its failure stops the daemon, and no CONNECT goes out meanwhile."""


def tls_context(tls: TlsConfig | None) -> ssl.SSLContext | None:
    """The client TLS context of `[mqtt.tls]`, for the daemon and the technician commands.
    Raises SetupError naming the file at fault: ssl's own errors name none."""
    if tls is None:
        return None
    try:
        context = ssl.create_default_context(
            cafile=str(tls.ca_file) if tls.ca_file else None)
    except (OSError, ValueError) as exc:  # (ssl.SSLError is an OSError)
        raise SetupError(f"TLS ca_file {tls.ca_file or '(system default)'} cannot be "
                         f"used: {_reason(exc)}; it must be the PEM certificate of the CA "
                         "that signed the broker's certificate") from None
    if tls.cert_file is not None:
        try:
            # The password callback runs only for a key encrypted with a passphrase: without
            # it OpenSSL would ask on the terminal (a technician's command stops there) or fail
            # with "Invalid argument" (the daemon), neither saying why.
            context.load_cert_chain(str(tls.cert_file),
                                    str(tls.key_file) if tls.key_file else None,
                                    password=_key_is_encrypted)
        except _EncryptedKey:
            raise SetupError(f"TLS key_file {tls.key_file or tls.cert_file} is encrypted with "
                             "a passphrase, which the bridge cannot type in: give it the key "
                             "unencrypted (openssl pkey -in KEY -out KEY.plain), readable only "
                             "by the poi-bridge user (file mode 0600, or LoadCredential= in "
                             "the unit)") from None
        except (OSError, ValueError) as exc:
            raise SetupError(f"TLS cert_file {tls.cert_file} with key_file "
                             f"{tls.key_file or '(in cert_file)'} cannot be used: "
                             f"{_reason(exc)}; they must be the bridge's PEM client "
                             "certificate and its own private key") from None
    context.check_hostname = tls.check_hostname
    return context


class _EncryptedKey(Exception):
    pass


def _key_is_encrypted() -> bytes:
    raise _EncryptedKey


# CONNACK codes by which a broker refuses the login itself: MQTT 3.1.1 4 (bad user name or
# password) and 5 (not authorised); MQTT 5 0x86, 0x87 and 0x8C (bad authentication method).
LOGIN_REFUSED = frozenset({4, 5, 0x86, 0x87, 0x8C})


def login_refused(exc: BaseException) -> bool:
    """Whether connecting failed because the broker refused the login (not the network).
    Only a CONNACK's code says so: paho's own error codes 4 and 5 (not connected,
    connection refused) come in the same MqttCodeError and mean something else."""
    code = getattr(exc, "rc", None)
    return isinstance(exc, MqttConnectError) and getattr(code, "value", code) in LOGIN_REFUSED


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _transaction_echo(payload: bytes) -> Any:
    """A command's "transaction", echoed in its answer as the intake does, or None."""
    try:
        body = load_json(payload, max_size=64 * 1024)
    except MessageError:
        return None
    return redact_json(body.get("transaction")) if isinstance(body, dict) else None


# A final transaction document expires this long after the daemon would have cleared it
# (its prune runs hourly): the expiry is the backstop, never the rule.
RETAINED_EXPIRY_SLACK = 2 * 3600.0


# The MQTT 5 session expiry the bridge asks for: the broker keeps its session this long while
# it is away (MQTT 3.1.1 sessions do not expire unless the broker is told to)
SESSION_EXPIRY = 24 * 3600


# A connection that ends this soon after it was made, SHORT_CONNECTIONS_SAID times in a row,
# is logged as a client id shared with another client
SHORT_CONNECTION = 5.0
SHORT_CONNECTIONS_SAID = 3
# How long the bridge waits for the broker to answer a SUBSCRIBE (or an UNSUBSCRIBE) before
# it gives the connection up
OPERATION_TIMEOUT = 10.0
# s: while the broker stays out of reach, how long and what waits is said again at most this
# often; the loss (or the first failure at start) is said at once, the retries between at
# debug. One line per retry (every 30 s) buried the rest of the journal in a long outage.
OUTAGE_REMINDER = 600.0


def _how_long(seconds: float) -> str:
    """A duration as a technician reads it: 45 s, 3 min 36 s, 2 h 5 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _plain_loss(exc: BaseException) -> str:
    """Why a connection ended, without the client library's words for it."""
    text = str(exc)
    if not text or "Disconnected during message iteration" in text:
        return "the connection closed: the broker stopped or restarted, or the network dropped"
    return text


def _refusals_summed(key: Any, count: int, last: Any, interval: float) -> None:
    if is_shared(key):  # (more topics than are counted apart)
        log.warning("refused %d more messages on request topics in the last %g s (on too "
                    "many topics to count each apart)", count, interval)
        return
    log.warning("refused %d more messages like this on %s in the last %g s", count, key[0],
                interval)


class Reply:
    """How to answer one incoming message: to a fixed topic, or to the MQTT 5 response topic
    with its correlation data when the requester gave one."""

    def __init__(self, gateway: RegisterGateway, response_topic: str | None,
                 correlation: bytes | None) -> None:
        self._gateway = gateway
        self.response_topic = response_topic
        self.correlation = correlation

    def send(self, topic: str, payload: dict[str, Any]) -> None:
        self._gateway.enqueue(self.response_topic or topic, payload, correlation=self.correlation,
                              meant_for=topic)


class RegisterGateway:
    def __init__(self, config: MqttConfig, journal: Journal, *, password: str | None = None,
                 backoff: Backoff | None = None) -> None:
        self.config = config
        self._broker = host_port(config.host, config.port)  # as the log names it
        self.topics = Topics(config.base_topic)
        self._transactions_prefix = self.topics.transaction("", "")[:-1]  # ".../transactions/"
        self._command_prefix = self.topics.bridge_requests[:-1]  # ".../bridge/request/"
        self.journal = journal
        self._password = password
        self._backoff = backoff or Backoff(initial=0.5, maximum=30.0)
        self._client: PipelinedClient | None = None
        self._connected = asyncio.Event()
        self._pump: OutboxPump | None = None
        # What the broker refused and is still pending, while no connection's pump holds it
        self._refused_before: set[int] = set()
        # Committed messages are published right after the commit that made them durable,
        # once the frames that commit released have gone to the terminals.
        journal.on_outbox_committed(self._run_pump)
        self._terminal_states: dict[str, dict[str, Any]] = {}  # latest, encoded when published
        self._state_dirty: set[str] = set()
        self._state_ready = asyncio.Event()
        # Set as a clean stop says each terminal offline: the workers and this connection's
        # state publisher run on until Bridge.stop ends them, and a terminal's answer
        # meanwhile put "online" back after the "offline", retained while the bridge is away
        self._states_stopped = False
        self._handler: RequestHandler | None = None
        # Requests that stopped the daemon at once before (refused, not handled again), and
        # the one being handled now (its topic and bytes: set aside if it stops the daemon)
        self.set_aside: SetAsideRequests | None = None
        self.handling: tuple[str, bytes] | None = None
        self._retained_seen: dict[str, bytes] = {}  # retained requests warned about: digests
        self._accepting = True
        self.reconnects = 0
        # Why the last attempt to connect failed, for `systemctl status`; None until one
        # fails, and again once connected
        self.broker_problem: str | None = None
        self.published = 0
        self.undeliverable = 0  # outbox messages given up on: no broker would take them
        # Between publishes of messages the broker refused: grows to a minute, not a hot loop
        self._refusal_backoff = Backoff(initial=2.0, maximum=60.0)
        self.health_source: Callable[[], dict[str, Any]] | None = None
        self._short_connections = 0  # connections in a row that the broker ended at once
        # ... past the error naming them, counted and said every LINK_LOSSES_QUIET
        self._takeovers_said = QuietRepeats(quiet.LINK_LOSSES_QUIET, self._takeovers_summed)
        self._left_at: float | None = None  # when this run's last connection ended
        # The last run did not record what the broker answered its connect (note_connecting)
        self._session_check_left = journal.session_check_left
        self.lost_state = 0  # connections that found the broker had lost the bridge's session
        # Another bridge on these topics: who this one is, whom it has seen (bridge.daemon.peers)
        self.peers = OtherBridges(bridge_id=journal.bridge_id, client_id=config.client_id,
                                  journal=str(journal.path), topic=self.topics.bridge_state)
        self.peers.on_reannounce = self._reannounce
        self._announced_here = False  # this connection has said "online" (see _serve)
        # A sender looping on a refused topic: its first refusal in full, then one line a
        # minute counting the others (each is still answered)
        # (keyed by topic and problem: past the groups' bound, by problem)
        self._refusals_said = QuietRepeats(quiet.REFUSALS_QUIET, _refusals_summed,
                                           kind_of=lambda key: key[1])

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def flush_repeats(self) -> None:
        """The bridge stops: the refusals counted since the last summary are logged now."""
        self._refusals_said.flush()
        self._takeovers_said.flush()

    @property
    def refused(self) -> int:
        """Messages the broker refused (MQTT 5), pending, waiting to be published again (also
        between connections, and on a new one until the broker takes them)."""
        return self._pump.held if self._pump is not None else len(self._refused_before)

    def set_request_handler(self, handler: RequestHandler) -> None:
        self._handler = handler

    # --- Outlet (called by terminal workers) ------------------------------------------------

    def deliver(self, result: Deliver) -> None:
        if result.outcome == "rejected":  # its texts quote the register's own writing
            result = redacted_refusal(result)
        # Only part was paid: what was asked and what moved, for the register to finish the sale
        amounts = partial_amounts(result, self.journal.get) \
            if result.outcome == "partially_approved" else None
        messages = []
        if topic_safe(result.sale_id):
            if splices_response(result):  # the journal encoded the response in this step
                payload = result_payload_bytes(
                    result, self.journal.response_text(result.response), amounts=amounts)
            else:
                payload = dumps(result_payload(result, amounts=amounts))
            messages.append((self.topics.register_response(result.sale_id), payload, 1, False))
            if (result.outcome != "rejected" or result.accepted) and \
                    topic_safe(result.service_id):
                # A refusal before `accepted` is no transaction: it must not overwrite a real
                # one's record. One after it ends the transaction whose in_progress
                # document stands there: its final document replaces that one.
                messages.append((self.topics.transaction(result.sale_id, result.service_id),
                                 transaction_payload_from(payload, result), 1, True))
        else:
            # (no register's topic: an answer the terminal sent for a SaleID that cannot be
            # one, heard by every operator, so every text in it passes the filter)
            messages.append((self.topics.bridge_error,
                             dumps(redact_json(result_payload(result))), 1, False))
        self.journal.enqueue(messages)

    def progress(self, event: Progress) -> None:
        if not topic_safe(event.sale_id):
            return
        messages = [(self.topics.register_event(event.sale_id), dumps(event_payload(event)), 1,
                     False)]
        if event.event == "accepted":
            ids = {"sale_id": event.sale_id, "service_id": event.service_id,
                   "poi_id": event.poi_id}
            messages.append((self.topics.transaction(event.sale_id, event.service_id),
                             dumps(transaction_payload(state="in_progress", ids=ids)), 1, True))
        self.journal.enqueue(messages)

    def terminal_state(self, poi_id: str, state: dict[str, Any]) -> None:
        if self._states_stopped:
            return  # (announce_offline said "offline": that document stands)
        if self._terminal_states.get(poi_id) == state:
            return  # called after every step; most steps change nothing here
        self._terminal_states[poi_id] = state
        self._state_dirty.add(poi_id)
        self._state_ready.set()

    def enqueue(self, topic: str, payload: dict[str, Any], *, retain: bool = False,
                correlation: bytes | None = None, meant_for: str | None = None) -> None:
        """Any other message that must not be lost (answers to commands, errors); the MQTT 5
        correlation data is kept with it, so that it goes out after a restart too.
        `meant_for`: the topic it would go to without the requester's response topic."""
        if (meant_for or topic) == self.topics.bridge_error:
            # A refusal there reaches every operator and, through a chain's bridge, head
            # office: the IDs and error it echoes are a register's own writing (a swiped
            # card's track data where its SaleID belongs), so they pass the log's filter.
            payload = {key: redact_json(value) if key in _ECHOED else value
                       for key, value in payload.items()}
        self.journal.enqueue([(topic, dumps(payload), 1, retain, correlation)])

    def _run_pump(self) -> None:
        if self._pump is not None:
            self._pump.run()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain_requests(self, timeout: float = 3.0) -> None:
        """On a clean stop: let the requests already received be answered (refused, so their
        registers hear at once) before the connection is closed. One still unhandled when
        the time is up is not acknowledged and comes again on the next start. No
        unsubscribe: the subscription must stay in our persistent session, so the broker
        queues what arrives after we disconnect and delivers it on the next start."""
        client = self._client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(timeout):
                while len(client.messages) > 0:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.05)  # the last one being handled

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def other_bridge(self) -> str | None:
        """Why no new request may start: another bridge serves these topics (or did a moment
        ago); None when this bridge is alone. Read by the intake for each new request."""
        return self.peers.refusal()

    def _state_heard(self, client: Any, userdata: Any, message: Any) -> None:
        """A document on {base}/bridge/state, as paho reads it off the socket: before any
        request read after it is handled (bridge.daemon.peers)."""
        # Subscribed at QoS 0 (_watch_state): nothing to acknowledge. (Acknowledging in here
        # wrote from inside paho's callback lock: a failed write closed the socket and took
        # that lock again, which hung the daemon.) Nothing may escape into paho's read path.
        try:
            self.peers.heard(message.payload or b"",
                             functools.partial(load_json, max_size=64 * 1024),
                             retained=bool(message.retain))
        except Exception:  # noqa: BLE001 - a fault here must not stop the MQTT side
            log.exception("reading a document on %s failed; ignored", self.topics.bridge_state)

    def _reannounce(self) -> None:
        asyncio.get_running_loop().call_soon(self._announce_again)

    def _announce_again(self) -> None:
        """Say "online" again: another bridge's "offline" (or a cleared document) replaced
        this one's. Before this connection's first "online", that one is still to come."""
        client = self._client
        if client is None or not self._announced_here or not self._accepting:
            return
        try:
            done = client.publish_nowait(self.topics.bridge_state, dumps(self.peers.online()),
                                         qos=1, retain=True)
        except aiomqtt.MqttError:
            return  # the next connection says it
        done.add_done_callback(lambda future: future.cancelled() or future.exception())

    # --- the connection -----------------------------------------------------------------------

    def _client_for(self) -> PipelinedClient:
        v5 = self.config.protocol == "5"
        options: dict[str, Any] = {}
        if v5:
            options["clean_start"] = False
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY  # keep our session while away
            # paho reads a whole packet into memory before max_payload can refuse it: two
            # 250 MB requests took the daemon to 820 MB. The broker drops a larger packet
            # for us instead; one a little over max_payload still gets its answer.
            props.MaximumPacketSize = self.config.packet_limit
            options["properties"] = props
        else:
            options["clean_session"] = False
        client = PipelinedClient(
            self.config.host, self.config.port,
            identifier=self.config.client_id,
            username=self.config.username, password=self._password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.topics.bridge_state, dumps(self.peers.offline()), qos=1,
                              retain=True),
            keepalive=self.config.keepalive,
            tls_context=tls_context(self.config.tls),
            max_queued_incoming_messages=10_000,
            # Small request/response messages: Nagle's delay cost tens of ms per payment.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            max_inflight_messages=OUTBOX_WINDOW,
            timeout=OPERATION_TIMEOUT,
            **options,
        )
        # (installed before connecting: what the broker kept for this session comes at once)
        client._client.message_callback_add(self.topics.bridge_state, self._state_heard)
        return client

    def _waiting(self, when: str) -> str:
        """What waits in the outbox for the broker, for the outage's lines."""
        try:
            count = self.journal.counts()["undelivered"]
        except sqlite3.Error:
            # (a journal read failing is met, and stops the daemon, where it matters)
            return f"what waits in the outbox is {when}"
        if count == 0:
            return "nothing waits in the outbox"
        return (f"{count} message{'s' if count != 1 else ''} waiting in the outbox (results, "
                f"events, answers) {'are' if count != 1 else 'is'} {when}")

    async def run(self) -> None:
        """Connect, serve, and reconnect with jittered backoff, until cancelled. Whatever
        goes wrong is logged and retried: the task must outlive a certificate being
        replaced, or a bug met by one message."""
        first = True
        # Since when the broker is out of reach (monotonic; None while connected), whether
        # that was said (with what to check), and when it was said last (OUTAGE_REMINDER)
        outage_since: float | None = None
        advised, said_at = False, 0.0
        # A refused login or a connection that cannot be set up is said at once, and then
        # again only if its text changes (a file half fixed) or after OUTAGE_REMINDER: an
        # ERROR every retry (30 s) paged someone 120 times an hour for one mistake
        problem_said: tuple[str, float] = ("", 0.0)

        def first_time(text: str, now: float) -> bool:
            nonlocal problem_said
            if text == problem_said[0] and now - problem_said[1] < OUTAGE_REMINDER:
                return False
            problem_said = (text, now)
            return True

        while True:
            connected_at: float | None = None  # once the broker took this connection
            client: PipelinedClient | None = None
            checked = False  # the broker's answer to this connection's CONNECT
            try:
                try:
                    client = self._client_for()
                except (OSError, ValueError) as exc:  # paho refuses an option
                    raise SetupError(_reason(exc)) from None
                if not self.journal.note_connecting():
                    raise JournalFailed
                async with client:
                    self._client = client
                    self.broker_problem = None
                    self._backoff.reset()
                    if not first:
                        self.reconnects += 1
                    first = advised = False
                    problem_said = ("", 0.0)
                    connected_at = time.monotonic()
                    if outage_since is None:
                        log.info("connected to MQTT broker %s", self._broker)
                    else:
                        # (not said at every turn of a client id taken in turns: the error
                        # of _note_short_connection said what goes on)
                        log.log(logging.DEBUG if self._short_connections
                                >= SHORT_CONNECTIONS_SAID else logging.INFO,
                                "connected to MQTT broker %s again, after %s out of "
                                "reach; %s", self._broker,
                                 _how_long(connected_at - outage_since),
                                 self._waiting("being sent now"))
                    outage_since = None
                    self._check_session(client)
                    self.journal.note_connected()  # (after the check: it reads the last one)
                    checked = True
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                self.broker_problem = "login refused" if login_refused(exc) else "unreachable"
                if isinstance(exc, MqttConnectError) and not checked:
                    # A CONNACK with an error code: the broker made no session (MQTT 3.1.1
                    # 3.2.2.2), nothing to publish again for it
                    checked = True
                    if not self._session_check_left:
                        self.journal.note_connect_refused()
                now = time.monotonic()
                # (also when dropped while still subscribing: the broker was reached, and a
                # twin with the same client id drops it there on a loaded machine)
                if connected_at is not None:
                    # Up to when the broker or the network dropped it: a twin's connection
                    # dropped while subscribing ends here only at OPERATION_TIMEOUT, and a
                    # slow broker's the bridge gave up on itself was no twin's (review rv18)
                    ended = (client and client.dropped_at) or now
                    self._note_short_connection(ended - connected_at)
                    # Past the error that named it, a run of takeovers is counted, and said
                    # every LINK_LOSSES_QUIET; a reconnection that then fails is an outage,
                    # said at once ("cannot reach", not advised yet)
                    in_turns = self._short_connections > SHORT_CONNECTIONS_SAID
                    outage_since, advised, said_at = ended, not in_turns, now
                    if in_turns:
                        self._takeovers_said.tell("taken")
                    log.log(logging.DEBUG if in_turns else logging.WARNING,
                            "lost the MQTT broker %s (%s); reconnecting. Results and "
                            "events are kept and sent once it is back; if it stays away, "
                            "check the broker (systemctl status mosquitto) and the network",
                            self._broker, _plain_loss(exc))
                elif login_refused(exc):
                    who = (f"as user {self.config.username!r}" if self.config.username
                           else "without a user name")
                    log.log(logging.ERROR if first_time(f"login {who} {exc}", now)
                            else logging.DEBUG,
                            "the MQTT broker %s refused the bridge's login %s: %s. Check "
                            "mqtt.username and %s against the broker's password file; the "
                            "bridge reads the password at start, so restart it once the file "
                            "is fixed (systemctl restart poi-bridge). Retrying meanwhile",
                            self._broker, who, exc,
                            password_to_fix(self.config.password_file))
                elif not advised:
                    outage_since = now if outage_since is None else outage_since
                    advised, said_at = True, now
                    # (a refused port or an unknown host name: the broker may run well,
                    # elsewhere than the configuration says)
                    log.warning("cannot reach MQTT broker %s: %s; retrying. Is the broker "
                                "running? (systemctl status mosquitto) Are mqtt.host and "
                                "mqtt.port in the configuration its address? Results are kept "
                                "and sent on reconnect", self._broker, exc)
                elif now - said_at >= OUTAGE_REMINDER:
                    said_at = now
                    log.warning("MQTT broker %s still out of reach after %s (%s); %s. "
                                "Retrying; is the broker running? (systemctl status "
                                "mosquitto)", self._broker,
                                _how_long(now - (outage_since or now)), exc,
                                self._waiting("sent once it is back"))
                else:
                    log.debug("cannot reach MQTT broker %s: %s; retrying",
                              self._broker, exc)
                if outage_since is None:  # (a login refused: results wait all the same)
                    outage_since = now
            except SetupError as exc:
                self.broker_problem = "connection cannot be set up (see the log)"
                log.log(logging.ERROR if first_time(str(exc), time.monotonic())
                        else logging.DEBUG,
                        "cannot set up the connection to MQTT broker %s: %s. Fix that; "
                        "the bridge tries again meanwhile", self._broker,
                        str(exc).rstrip("."))
            except MemoryError:
                raise  # no reconnect can help: the daemon stops, and systemd starts it again
            except JournalFailed:
                # (its commit failed: the daemon stops; a CONNECT now would go unrecorded)
                self.broker_problem = "stopping: the journal failed"
                if not self.journal.lost:
                    # The failure stops the daemon (on_failure) as a rule; should it not, the
                    # task's end does (a bridge up and off the broker helps no register)
                    log.critical("MQTT side: the journal could not record the connection "
                                 "about to be made; the bridge stops")
                    raise
                await asyncio.Event().wait()
            except JournalGone:
                # The journal's files were removed under the daemon: it saves what they hold
                # and then stops the daemon itself. Reconnecting would only fail on the next
                # write again, with a traceback each time (a review)
                self.broker_problem = "stopping: the journal is gone from its path"
                log.debug("MQTT side: the journal is gone from its path; waiting for the stop")
                await asyncio.Event().wait()
            except sqlite3.Error as exc:
                # A journal read failed (the outbox pump's, the health document's counts): no
                # reconnect can help, and the daemon would go on taking payments whose results
                # it cannot publish. It stops at once, as for any journal failure.
                self.journal.read_failed(exc)
                raise
            except Exception as exc:  # a bug: logged with its traceback, then reconnect
                self.broker_problem = "connection failed (see the log)"
                log.exception("the MQTT connection to %s failed: %s: %s; results are "
                              "kept and sent on reconnect", self._broker,
                              type(exc).__name__, exc)  # noqa: TRY401 - one line to read
            finally:
                if client is not None and client.reached and not checked:
                    # The CONNECT may have reached a broker that lost its state and made the
                    # session the next connection finds present: that one publishes again
                    self._session_check_left = True
                if self._client is not None:
                    self._left_at = time.time()
                self._client = None
                self._announced_here = False
                self._connected.clear()
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # A stop was asked and its cancellation swallowed on the way (Python 3.11's
                # asyncio.wait_for, inside aiomqtt, loses one that arrives as its future
                # completes); the connection ended since. Reconnecting would outlive the stop.
                raise asyncio.CancelledError
            await asyncio.sleep(self._backoff.next_delay())

    def _check_session(self, client: PipelinedClient) -> None:
        """A broker that answers the bridge's reconnect without its persistent session (the
        CONNACK's session-present flag 0) has lost its stored state: a crash or power cut
        before it saved its persistence file, persistence off, or the file removed. With it
        went what it had acknowledged and not yet passed on (results for a register that was
        away) and the retained transaction documents, which the journal holds as delivered:
        the recent ones are marked pending again, and the pump publishes them first.
        "Had a session" means: connected in this run, or, after a daemon restart, connected
        in an earlier one (the journal notes it at connect and every health_interval; one of
        an older bridge, only the last message the broker acknowledged tells). A first start
        has none: nothing to send. An MQTT 5 session the bridge left longer ago than its
        expiry (counted from the disconnect, up to a health_interval after the last note) is
        gone as agreed."""
        self._check_session_of(client)
        # (only once checked: a fault on the way leaves it to the next connection)
        self._session_check_left = False

    def _check_session_of(self, client: PipelinedClient) -> None:
        unchecked = self._session_check_left
        if client.session_present is not False:
            if unchecked:
                self._republish_after_unchecked_connect()
            return
        seen = self._left_at if self._left_at is not None else max(
            (at for at in (self.journal.last_connected_at(), self.journal.last_delivered_at())
             if at is not None), default=None)
        if seen is None or (self.config.protocol == "5" and time.time() - seen
                            > SESSION_EXPIRY + self.config.health_interval
                            and not unchecked):  # (a session an unchecked CONNECT made)
            return
        count = self._redeliver()
        window, limit = self.config.republish_window, self.config.republish_limit
        self.lost_state += 1
        log.error("the MQTT broker %s answered without the bridge's session (client id "
                  "%r): it lost its stored state (a crash or power cut before it saved its "
                  "persistence file, persistence off, or that file removed), and with it "
                  "results it had acknowledged and the retained transactions/... documents. "
                  "The bridge publishes %d message(s) again from its journal: the retained "
                  "document of each transaction it keeps and the register responses of the "
                  "last %.0f s (mqtt.republish_window)%s; registers take a repeated "
                  "SaleID/ServiceID result as the same result. Check the broker's persistence: "
                  "persistence true, a persistence_location, autosave_on_changes true, "
                  "autosave_interval 1 (examples/mosquitto/mosquitto.conf). A new broker or a "
                  "changed mqtt.client_id looks the same", self._broker,
                  self.config.client_id, count, window,
                  f", the newest {limit} only (mqtt.republish_limit)" if count >= limit else "")

    def _redeliver(self) -> int:
        """Mark pending again what a broker that lost its state lost (Journal.redeliver)."""
        return self.journal.redeliver(self._transactions_prefix,
                                      self.topics.register_response("")[:-len("/response")],
                                      time.time() - self.config.republish_window,
                                      self.config.republish_limit)

    def _republish_after_unchecked_connect(self) -> None:
        """An earlier CONNECT's answer went unchecked: the last run stopped after it
        (Journal.note_connecting), or its connection ended before the CONNACK came. The
        broker may have lost its state then and made the session found now at that CONNECT.
        Published again as for a lost state: registers take a repeat as the same result; a
        lost retained document stays lost otherwise."""
        count = self._redeliver()
        if count:
            log.warning("an earlier connection to the MQTT broker %s ended (the bridge's last "
                        "run stopped, or the connection was lost) before the bridge had "
                        "checked whether the broker had kept its session: in case the broker "
                        "had lost its stored state then (a power cut taking both down), the "
                        "bridge publishes %d message(s) again from its journal (the retained "
                        "transactions/... documents and the register responses of the last "
                        "%.0f s); registers take a repeated SaleID/ServiceID result as the "
                        "same result", self._broker, count, self.config.republish_window)

    def _takeovers_summed(self, key: Any, count: int, last: Any, interval: float) -> None:
        log.warning("the MQTT broker %s dropped the bridge %d more %s in the last %s, each "
                    "within %g s of connecting: another client with client id %r? (see the "
                    "error above); no request is taken while another bridge is seen",
                    self._broker, count, "time" if count == 1 else "times",
                    quiet.window(interval), SHORT_CONNECTION, self.config.client_id)

    def _note_short_connection(self, lasted: float) -> None:
        """Two clients with one client id take the session from each other, and the broker
        drops the older at once, again and again: each side saw only 'lost the MQTT
        broker' about once a second. A run of connections that the broker dropped within
        seconds is named for what it most likely is."""
        if lasted >= SHORT_CONNECTION:
            self._short_connections = 0
            return
        self._short_connections += 1
        self.peers.connection_taken()
        if self._short_connections == SHORT_CONNECTIONS_SAID:
            log.error("the MQTT broker %s dropped the bridge %d times in a row within %g s "
                      "of connecting: most likely another client uses the same client id "
                      "(%r), and each connection takes the other's session. Give every bridge "
                      "its own mqtt.client_id; look for a second daemon, or a copied "
                      "configuration, on this broker", self._broker,
                      self._short_connections, SHORT_CONNECTION, self.config.client_id)

    async def _serve(self, client: aiomqtt.Client) -> None:
        # Subscribed before saying "online": a register that waits for "online" and then
        # publishes must find a subscriber (on a broker that has never seen this bridge's
        # persistent session, nothing would queue a request for it).
        if self._accepting:
            # Its own state topic first: another bridge's document there is read before any
            # request (bridge.daemon.peers)
            await self._watch_state(client)
            # With MQTT 5 a request published with retain arrives flagged even while we are
            # subscribed, and is refused at once rather than after the next reconnect.
            options: dict[str, Any] = (
                {"options": SubscribeOptions(qos=1, retainAsPublished=True)}
                if self.config.protocol == "5" else {"qos": 1})
            await self._subscribe(client, options)
        announced = await self._announce_online(client)
        self._announced_here = True
        if self._accepting and announced:
            await self._hear_back()
        self._state_dirty = set(self._terminal_states)
        self._state_ready.set()
        self._connected.set()
        held = asyncio.get_running_loop().call_later(
            peer_rules.SAME_CLIENT_ID_HELD, self.peers.connection_held)
        tasks = [
            asyncio.create_task(self._receive(client), name="receive"),
            asyncio.create_task(self._publish_outbox(client), name="outbox"),
            asyncio.create_task(self._publish_states(client), name="terminal states"),
            asyncio.create_task(self._publish_health(client), name="health"),
        ]
        try:
            # Each runs for the connection's life: one that ended in any way ends it, and
            # the gateway reconnects. (FIRST_EXCEPTION does not wake for a task that ended
            # cancelled, and one cancelled with nobody asking left the connection serving
            # without it: review rv21.)
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled():
                    task.result()
            raise RuntimeError(f"the connection's {', '.join(sorted(t.get_name() for t in done))}"
                               " task ended (cancelled or returned)")
        finally:
            held.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task

    async def _watch_state(self, client: aiomqtt.Client) -> None:
        # QoS 0: the broker sends such a message at once, past the QoS 1 messages it holds
        # back for this client (max_inflight_messages, 20 by mosquitto's default). At QoS 1
        # the bridge's own "online" waited behind the requests queued for its session,
        # which it does not take before that "online" is back: with 20 or more queued, it
        # never came back in time (a review). The order of the documents on this one topic,
        # all the check needs, is kept either way.
        granted = await client.subscribe(self.topics.bridge_state, qos=0)
        code = granted[0] if isinstance(granted, list | tuple) and granted else None
        value = getattr(code, "value", code)
        if isinstance(value, int) and value >= 0x80:
            log.error("the MQTT broker refused the bridge's subscription to its own %s (%s): "
                      "it cannot see another bridge serving the same topics, which would "
                      "charge every payment twice. Let the bridge's user read it in the "
                      "broker's ACL (examples/mosquitto/acl)", self.topics.bridge_state, code)
            self.peers.go_blind()

    async def _announce_online(self, client: PipelinedClient) -> bool:
        """Say "online" on bridge/state, once the broker has taken it. Its PUBACK is read as
        the outbox's are (publish_nowait): aiomqtt's publish() takes a refusal (MQTT 5, an
        ACL that lets the bridge read its state topic but not write it) for a delivery.
        False when refused: that "online" never comes back to be heard (_hear_back)."""
        topic = self.topics.bridge_state
        try:
            await client.acknowledged(client.publish_nowait(
                topic, dumps(self.peers.online()), qos=1, retain=True))
        except PublishRefused as refusal:
            log.error("the MQTT broker refused the bridge's \"online\" on %s (%s): registers "
                      "waiting for it wait in vain, and the bridge cannot see another bridge "
                      "serving the same topics, which would charge every payment twice. Let "
                      "the bridge's user (%s) write that topic in the broker's ACL (topic "
                      "write %s, as in examples/mosquitto/acl); taking requests meanwhile",
                      topic, refusal, self.config.username or "anonymous", topic)
            self.peers.go_blind()
            return False
        return True

    async def _hear_back(self) -> None:
        """Requests are taken once the broker has passed this bridge's own "online" back: it
        has then passed every document published there before it (another bridge's)."""
        deadline = time.monotonic() + ANNOUNCE_TIMEOUT
        while not self.peers.heard_back:
            if time.monotonic() > deadline:
                log.error("the bridge's own %s did not come back from the MQTT broker within "
                          "%g s: it cannot see another bridge serving the same topics, which "
                          "would charge every payment twice. Let the bridge's user read that "
                          "topic in the broker's ACL (examples/mosquitto/acl); taking "
                          "requests meanwhile", self.topics.bridge_state, ANNOUNCE_TIMEOUT)
                self.peers.go_blind()
                return
            await asyncio.sleep(0.01)

    async def _subscribe(self, client: aiomqtt.Client, options: dict[str, Any]) -> None:
        """Subscribe to every level under the request topics, and drop the narrower
        subscriptions an older bridge left in this persistent session. A broker whose ACL
        refuses the new ones gets the older ones instead: requests on exact topics keep
        working, and an error says which line the ACL lacks."""
        option = options.get("options", options.get("qos"))
        wanted = self.topics.request_subscriptions
        granted = await client.subscribe([(topic, option) for topic in wanted])
        codes = list(granted) if isinstance(granted, list | tuple) else []
        superseded: list[str] = []
        for i, (topic, former) in enumerate(zip(wanted, self.topics.former_subscriptions,
                                                strict=True)):
            code = codes[i] if i < len(codes) else None
            value = getattr(code, "value", code)
            if isinstance(value, int) and value >= 0x80:
                log.error("the MQTT broker refused the bridge's subscription to %s (%s): "
                          "requests on a topic a level too deep go unanswered. Let the "
                          "bridge's user read it in the broker's ACL (topic read %s, as in "
                          "examples/mosquitto/acl); until then it subscribes to %s", topic,
                          code, topic, " and ".join(former))
                for narrower in former:
                    await client.subscribe(narrower, **options)
            else:
                superseded += former
        if superseded:
            await client.unsubscribe(superseded)

    async def _receive(self, client: PipelinedClient) -> None:
        taken = 0
        while True:
            if taken >= REQUESTS_PER_PASS:
                taken = 0
                await asyncio.sleep(0)  # let the pass's commit run: those frames go out now
            message = await client.next_message()
            taken += 1
            if self._handler is None:
                continue  # not acknowledged: delivered again once there is a handler
            payload = message.payload if isinstance(message.payload, bytes) else \
                str(message.payload or "").encode()
            props = getattr(message, "properties", None)
            response_topic = getattr(props, "ResponseTopic", None) if props else None
            correlation = getattr(props, "CorrelationData", None) if props else None
            if not message.topic.value.startswith(self._command_prefix):
                # A register's request is answered on its topics, never with its MQTT 5
                # response topic or correlation data (README): a refusal or an internal
                # error on bridge/error must not carry them either.
                response_topic = correlation = None
            elif response_topic is not None:
                response_topic = self._usable_response_topic(message.topic.value,
                                                             response_topic)
            reply = Reply(self, response_topic, correlation)
            if not payload:
                # Never a request: the sender clearing a retained one, as told. With MQTT
                # 3.1.1 the broker drops the retain flag towards a subscriber already
                # connected, so an empty message is ignored whatever its flag.
                log.debug("empty message on %s (a retained request cleared): ignored",
                          message.topic.value)
                self.journal.after_commit(functools.partial(client.ack, message))
                continue
            if message.retain:
                self._refuse_retained(message.topic.value, payload, reply)
                self.journal.after_commit(functools.partial(client.ack, message))
                continue
            route = self.topics.parse_request_topic(message.topic.value)
            if route is not None and route.problem is not None:
                # A level too many or an empty one (.../request/TILL1/x, .../request/TILL1/):
                # answered where requests nobody can be told apart by topic are answered
                if self._refusals_said.tell((message.topic.value, route.problem)):
                    log.warning("a message on %s was refused: %s", message.topic.value,
                                route.problem)
                self._refuse(message.topic.value, payload, reply, route.problem)
                self.journal.after_commit(functools.partial(client.ack, message))
                continue
            aside = self.set_aside.get(message.topic.value, payload) \
                if self.set_aside is not None else None
            if aside is not None:
                self._refuse_set_aside(message.topic.value, payload, reply, aside)
                self.journal.after_commit(functools.partial(client.ack, message))
                continue
            # While draining, requests are still handed on: the intake refuses them with an
            # answer. The acknowledgement follows the handling: a request the daemon dies
            # with, before it reached the journal, is delivered again on the next start.
            self.handling = (message.topic.value, payload)
            try:
                outcome = self._handler(message.topic.value, payload, reply)
                if asyncio.iscoroutine(outcome):
                    await outcome
            except (sqlite3.Error, JournalGone):
                # The journal failed (a read here; a failed write has reported itself): what
                # the handling decided cannot be trusted. Not acknowledged, not answered: the
                # daemon stops (run() reports it, as every journal read failing in this side),
                # and the broker delivers the request again after the restart.
                raise
            except Exception:  # one bad request must never take the bridge down
                log.exception("request on %s could not be handled", message.topic.value)
                self._internal_error(message.topic.value, payload, reply)
            finally:
                self.handling = None
            self.journal.after_commit(functools.partial(client.ack, message))

    def set_aside_handled(self) -> str | None:
        """The daemon stops at once, from a step that failed half-way: the request being
        handled, if any, is set aside (bridge.daemon.set_aside). Its topic, or None."""
        if self.handling is None or self.set_aside is None:
            return None
        topic, payload = self.handling
        try:
            self.set_aside.add(topic, payload)
        except OSError as exc:
            log.error("could not set aside the request on %s in %s (%s): it may stop the "
                      "bridge again at the next start", topic, self.set_aside.path, exc)
            return None
        return topic

    def _refuse_set_aside(self, topic: str, payload: bytes, reply: Reply,
                          aside: SetAside) -> None:
        """Refuse a request (or command) that stopped the daemon when it was handled. Its
        step was taken back before anything of it went out: what that means for its sender
        depends on what it was."""
        route = self.topics.parse_request_topic(topic)
        command = route is not None and route.kind == "bridge"
        stopped = (f"this {'command' if command else 'request'} stopped the bridge when it was "
                   f"handled ({aside.at}, a fault of the bridge: please report it with the log "
                   "of that time) and is not handled again")
        if self.set_aside is not None and self.set_aside.first_time(topic, payload):
            log.error("a %s on %s stopped the bridge at %s and was set aside: refused, not "
                      "handled again (nothing of it was done). Please report it with the log "
                      "of that time", "command" if command else "request", topic, aside.at)
        if command:
            self._refuse(topic, payload, reply, f"{stopped}; nothing of it was done")
            return
        try:
            header = request_header(load_json(payload, max_size=self.config.max_payload))
        except MessageError:
            header = {}
        sale_id, service_id = id_text(header.get("SaleID")), id_text(header.get("ServiceID"))
        known = self.journal.get(TxKey(sale_id, service_id)) if sale_id and service_id \
            else None
        if known is not None:
            # Its IDs were recorded before (this was a repeat, say): that transaction may
            # have run, whatever became of this copy
            error = (f"{stopped}; the bridge holds transaction {known.key} "
                     f"({known.state}{', ' + known.outcome if known.outcome else ''}): do not "
                     "charge again, ask with a TransactionStatus request about it")
            self._internal_error(topic, payload, reply, error=error)
        elif not isinstance(category := header.get("MessageCategory"), str) \
                or category in MONEY_CATEGORIES:  # (one that cannot be read may be one)
            error = (f"{stopped}: nothing was sent to the terminal and nothing was charged by "
                     "it. Send the sale again as a new request with a new ServiceID")
            self._internal_error(topic, payload, reply, error=error, outcome="rejected",
                                 condition="MessageFormat")
        else:
            # A status request or an abort names another transaction, which this one did
            # not touch: an abort did not reach the terminal, the payment goes on
            error = (f"{stopped}: nothing was sent to the terminal for it. Send it again with "
                     "a new ServiceID; a transaction it names is not affected by it (an abort "
                     "did not reach the terminal: that payment goes on) and its own result "
                     "follows under its own IDs")
            self._internal_error(topic, payload, reply, error=error, outcome="rejected",
                                 condition="MessageFormat")

    def _internal_error(self, topic: str, payload: bytes, reply: Reply, *,
                        error: str | None = None, outcome: str = "error",
                        condition: str = "UnavailableService") -> None:
        """The handling of a request failed (a bug): answered on bridge/error, and, for a
        request on a register's own topic (.../request/{SaleID}), on that register's response
        topic too, in the response shape with outcome `error`: a register that listens only
        there heard nothing. Not a transaction's result: no retained document. (`error`,
        `outcome`, `condition`: a request set aside is answered the same way.)"""
        error = error or (
            "internal error while handling the request (see the bridge's log); it may "
            "or may not have been started. Do not charge again: send the same request "
            "again unchanged (a request the bridge recorded is answered from its record, "
            "one it did not is started), or ask with a TransactionStatus request")
        reply.send(self.topics.bridge_error, {"status": "error", "error": error,
                                              "topic": topic})
        route = self.topics.parse_request_topic(topic)
        if route is None or route.kind != "terminal" or not topic_safe(route.sale_id):
            return
        try:
            header = request_header(load_json(payload, max_size=self.config.max_payload))
        except MessageError:
            header = {}
        category = refusal_category(header.get("MessageCategory"))
        service_id = id_text(header.get("ServiceID")) or ""
        echo = {key: value for key, value in header.items()
                if isinstance(value, str) and len(value) <= 128}
        echo.update(SaleID=route.sale_id, ServiceID=service_id)
        result = redacted_refusal(Deliver(
            route.sale_id, service_id[:64], route.name, category, outcome, "bridge",
            failure_response(echo, category, condition, error), error))
        self.journal.enqueue([(self.topics.register_response(route.sale_id),
                               dumps(result_payload(result)), 1, False)])

    def _refuse_retained(self, topic: str, payload: bytes, reply: Reply) -> None:
        """A request the broker keeps (published with retain) comes again at every
        subscription, so after each reconnect, and after the journal has forgotten it, it
        would run on the terminal again: none is handled. The answer goes where that kind of
        request's errors are documented; clearing the retained message is for its sender."""
        error = (f"requests must not be published with retain; nothing was started. The "
                 f"broker keeps this one and sends it again at every reconnect: clear it by "
                 f"publishing an empty retained message on {topic}")
        digest = hashlib.sha256(payload).digest()
        if self._retained_seen.get(topic) != digest:
            if len(self._retained_seen) >= 1024:  # topics are the sender's choice: bounded
                self._retained_seen.clear()
            self._retained_seen[topic] = digest
            log.warning("a retained request on %s was refused: nothing was started; its sender "
                        "must publish requests without retain, and clear this one", topic)
        self._refuse(topic, payload, reply, error)

    def _refuse(self, topic: str, payload: bytes, reply: Reply, error: str) -> None:
        """A request refused before the intake reads it: a command on its command's response
        topic; a terminal request, or a command on a topic that names none, on bridge/error
        (a topic that is not exactly a request topic ties the request to no register)."""
        route = self.topics.parse_request_topic(topic)
        if route is not None and route.kind == "bridge" and route.problem is None:
            reply.send(self.topics.bridge_response(redact(route.name)), {
                "status": "error", "data": None, "error": redact(error),
                "transaction": _transaction_echo(payload)})
        elif route is not None and route.kind == "bridge":
            reply.send(self.topics.bridge_error, {
                "status": "error", "error": error, "topic": topic,
                "transaction": _transaction_echo(payload)})
        else:
            # With the IDs as sent, as every refusal there has them when they can be read
            try:
                header = request_header(load_json(payload, max_size=self.config.max_payload))
            except MessageError:
                header = {}
            ids = {key: text for key, text in (("sale_id", id_text(header.get("SaleID"))),
                                               ("service_id", id_text(header.get("ServiceID"))))
                   if text}
            self.enqueue(self.topics.bridge_error, {
                "status": "error", "error": error,
                "poi_id": route.name if route is not None else None, "topic": topic, **ids})

    def _usable_response_topic(self, topic: str, response_topic: object) -> str | None:
        """The requester's MQTT 5 response topic, or None (the fixed topic) when it cannot be
        published to (stored as given, it made every publish of the answer fail), or lies
        outside {base}/bridge/response/: the bridge may publish where the requester may
        not (another register's results, the bridge's own request topics)."""
        problem = topic_problem(response_topic)
        prefix = self.topics.bridge_response("")
        if problem is None and not (isinstance(response_topic, str) and response_topic
                                    .startswith(prefix) and response_topic != prefix):
            problem = f"the bridge answers only under {prefix}"
        if problem is None:
            return response_topic  # type: ignore[return-value]
        log.warning("a message on %s names the response topic %.200r, which the bridge does "
                    "not answer on (%s): it is answered on the fixed topic instead. Fix the "
                    "ResponseTopic the sender sets", topic, response_topic, problem)
        return None

    async def _publish_outbox(self, client: PipelinedClient) -> None:
        """Publish the outbox in order as a pipeline: a new result goes out at once, without
        waiting for the acknowledgements of the messages before it, and in the loop pass
        that committed it (the journal runs the pump after every commit that added
        messages, once that commit's frames have gone to the terminals). Each
        message is marked delivered when the broker acknowledged it (marks are gathered into
        one write per loop pass); the ones still unacknowledged when the connection drops
        stay pending and go out again on the next connection, which starts from the oldest
        pending message."""
        pump = OutboxPump(self, client, self._refused_before)
        self._pump = pump
        try:
            pump.run()
            await pump.failed
        finally:
            pump.close()
            self._refused_before = pump.held_ids()
            self._pump = None

    def _properties_for(self, message: OutboxMessage) -> Properties | None:
        if self.config.protocol != "5":
            return None
        # A final document only: an open transaction (in_progress, or unresolved and still
        # asked about) stays in the journal however long, and its document on the broker too
        expires = message.retain and message.topic.startswith(self._transactions_prefix) \
            and is_final_document(message.payload)
        if message.correlation is None and not expires:
            return None
        properties = Properties(PacketTypes.PUBLISH)
        if message.correlation is not None:
            properties.CorrelationData = message.correlation
        if expires:
            # The daemon clears a transaction's retained document once the journal forgets
            # it; should that clearing be lost (a chain bridge's full queue drops it), the
            # broker, and an MQTT 5 bridge's other side, drop the document themselves. The
            # journal forgets a transaction transaction_retention after it ended (its
            # updated_at), and never while a message of it waits (Journal.prune); a final
            # document goes out at that end or later, and its expiry counts from then: it
            # never falls before that clearing.
            properties.MessageExpiryInterval = int(
                self.config.transaction_retention + RETAINED_EXPIRY_SLACK)
        return properties

    async def _publish_states(self, client: PipelinedClient) -> None:
        while True:
            await self._state_ready.wait()
            self._state_ready.clear()
            if self._states_stopped:
                # Woken before the stop, or by a reconnect during it: nothing more goes out.
                # (Not cancelled: a connection task that ends ends the connection, and the
                # "offline" documents go out on it.) publish_nowait queues at once, so a
                # state checked here is never queued after the "offline".
                self._state_dirty.clear()
                continue
            dirty, self._state_dirty = list(self._state_dirty), set()
            outcomes = await asyncio.gather(*(
                client.publish_nowait(self.topics.terminal_state(poi_id),
                                      dumps(self._terminal_states[poi_id]), qos=1, retain=True)
                for poi_id in dirty), return_exceptions=True)
            for poi_id, outcome in zip(dirty, outcomes, strict=True):
                if isinstance(outcome, PublishRefused):
                    # Not retried: the next change or reconnect publishes the state again.
                    log.error("the MQTT broker refused terminal %s's state on %s: %s; check "
                              "the broker's ACL for the bridge's user", poi_id,
                              self.topics.terminal_state(poi_id), outcome)
                elif isinstance(outcome, asyncio.CancelledError):
                    # Abandoned with a connection the outbox found gone (OutboxPump.close):
                    # every state goes out again on reconnect (_state_dirty). Raised, it
                    # ended the gateway's task cancelled, never to reconnect (review rv19).
                    continue
                elif isinstance(outcome, BaseException):
                    raise outcome

    async def _publish_health(self, client: aiomqtt.Client) -> None:
        # QoS 0: a broker queues no QoS 0 message for a client that is away, so a chain
        # bridge whose WAN is down does not fill its queue with stale copies (120 an hour
        # at the default interval) and drop payment results past its limit. The retained
        # copy still reaches head office when the link is back.
        while True:
            # The session's expiry counts from when the bridge left: this is the last time
            # it was here, for the next start (_check_session)
            self.journal.note_connected()
            if self.health_source is not None:
                await client.publish(self.topics.bridge_health, dumps(self.health_source()),
                                     qos=0, retain=True)
            await asyncio.sleep(self.config.health_interval)

    async def announce_offline(self, timeout: float = 2.0) -> None:
        """On a clean stop: flush what we can and say we are offline (the will covers crashes)."""
        self._states_stopped = True  # first: no terminal's state goes out after its "offline"
        client = self._client
        if client is None:
            return
        deadline = time.monotonic() + timeout
        # The pump has published what is pending: wait for the PUBACKs, but not for messages
        # the broker refused (they wait for its ACL to be fixed, and for the next start).
        while len(self.journal.pending(limit=self.refused + 1)) > self.refused \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Each terminal's retained state goes offline too: it said "online" (a register's
        # "terminal ready") for as long as the bridge was away. Not while another bridge
        # serves these topics: the documents may be its own.
        stopped = [] if self.peers.refusal() is not None else [
            client.publish(self.topics.terminal_state(poi_id),
                           dumps({**state, "state": "offline", "active": None,
                                  "detail": "the bridge stopped; requests wait in the broker "
                                            "until it is back"}), qos=1, retain=True)
            for poi_id, state in self._terminal_states.items()]
        with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(client.publish(
                    self.topics.bridge_state, dumps(self.peers.offline()), qos=1,
                    retain=True), *stopped), timeout=max(0.1, deadline - time.monotonic()))

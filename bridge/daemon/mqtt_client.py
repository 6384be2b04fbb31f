"""aiomqtt's client with a publish that does not wait, and requests acknowledged by hand.

aiomqtt's `publish()` is a coroutine that waits for the broker's acknowledgement, and each call
costs an asyncio.Event, a wait_for and a scan of every pending call: publishing each outbox
message that way meant one task per message and a cost growing with the number in flight.
`publish_nowait()` hands the message to paho at once and returns a future that the PUBACK
(QoS 1) resolves, so hundreds of messages can be in flight for the price of a dict entry each.

Incoming QoS 1 messages (register requests) are acknowledged only when `ack()` is called,
once the request is in the journal or has been answered: paho's default acknowledges on
receipt, so a daemon killed between the PUBACK and the journal commit, or stopped with
requests still queued, lost them. Unacknowledged, the broker delivers them again to our
persistent session on the next connection.

A plain PUBACK (two bytes: the message id) is handled without paho's decoder, which builds a
ReasonCode and a Properties object (a table of 27 names) for each one, 20-40 us on this
project's VM against under 1 us here (`make bench`, section 4c): with eight QoS 1 messages a
payment, paho's PUBACK handling was 14 % of the daemon's CPU under load. A QoS 1 message
without properties is also framed here, not by paho's publish() (`publish_nowait`), and its
PUBACK, reason code included, is read here. Any other PUBACK of a message paho published
(with properties, or aiomqtt's own) still goes through paho's handler, but for one with a
code MQTT 5 does not give PUBACK, which paho's decoder takes for a malformed packet (dropping
the connection): it is read as for a message framed here (0x80 or more: refused).

Packets are written to the socket as soon as paho has them, without waiting for the loop to
report the socket writable (`_on_socket_register_write`), as paho itself does without an
external loop; the socket is watched only when it is full.

It leans on aiomqtt and paho internals, kept here in one place: `_client` (the paho client),
`_queue` (aiomqtt's queue of incoming messages), `_loop` and `_disconnected`, the
`_on_connect`, `_on_publish` and `_on_socket_register_write` callbacks that aiomqtt
registers with it, and paho's `_handle_pubackcomp`, `_update_inflight`, `_inflight_messages`,
`_in_packet`, `_out_messages`, `_out_message_mutex`, `_do_on_publish`, `_sock`, `_protocol`,
`_mid_generate`, `_packet_queue`, `_in_messages`, `_packet_read` and `_loop_rc_handle`
(its loop_read is replaced).
tests/test_daemon_mqtt.py and tests/test_mqtt_client.py exercise them against a real broker
on every run, so a release that changes them fails there; pyproject.toml keeps both below
their next major version until it has passed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import struct
import time
import types
from typing import Any, NamedTuple

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.redaction import quoted

log = logging.getLogger("poi_bridge.mqtt")

# Shared by every plain PUBACK: "Success", no properties. Nothing downstream modifies them.
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


def _lean_update_inflight(client: paho.Client) -> paho.MQTTErrorCode:
    """paho's `_update_inflight`, run after every PUBACK, scans every message in flight for
    one waiting for a free slot: with a few hundred in flight that scan was 6 % of the
    daemon's CPU under load, and almost always found nothing. Messages waiting for a slot (or
    for a connection) are the ones in `_out_messages` not counted in flight: with none, the
    scan is skipped; otherwise paho's own runs."""
    if len(client._out_messages) <= client._inflight_messages:
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS
    return paho.Client._update_inflight(client)  # type: ignore[arg-type]


def publish_packet(topic: bytes, payload: bytes | bytearray, mid: int, retain: bool, *,
                   v5: bool) -> bytes:
    """An MQTT PUBLISH packet at QoS 1, not a duplicate (MQTT 3.1.1 and 5: section 3.3),
    with no properties under MQTT 5."""
    remaining = 2 + len(topic) + 2 + (1 if v5 else 0) + len(payload)
    length = bytearray()
    while True:  # the Remaining Length, 7 bits a byte, least significant first
        byte, remaining = remaining & 0x7F, remaining >> 7
        length.append(byte | 0x80 if remaining else byte)
        if not remaining:
            break
    return b"".join((bytes((0x32 | retain,)), length, len(topic).to_bytes(2, "big"), topic,
                     mid.to_bytes(2, "big"), b"\x00" if v5 else b"", payload))


def quiet_closed_socket_errors(loop: asyncio.AbstractEventLoop) -> None:
    """aiomqtt asks the loop to watch paho's socket for writing through call_soon_threadsafe;
    when the broker connection dies in between, the loop's add_writer meets a closed socket
    and asyncio logs the error with a traceback: EBADF when the descriptor was closed, or
    ValueError "Invalid file descriptor: -1" when paho's socket object was closed first (its
    fileno() is then -1). The connection loss itself is reported and handled (reconnect,
    outbox sent again), so this one becomes a line a technician can read; every other loop
    error is logged as before."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        callback = getattr(context.get("handle"), "_callback", None)
        closed = ((isinstance(exc, OSError) and exc.errno == errno.EBADF)
                  or (isinstance(exc, ValueError) and "file descriptor" in str(exc)))
        if (closed
                and getattr(callback, "__self__", None) is loop
                and getattr(callback, "__name__", "") in ("add_writer", "add_reader")):
            log.warning("the MQTT connection closed while a message was waiting to go out; "
                        "nothing is lost: it goes again after the reconnect")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class _BrokenConnectionAsWarning(logging.Filter):
    """paho logs a broker connection that breaks ('failed to receive on socket: [Errno 32]
    Broken pipe', at every broker restart) at ERROR, just before the daemon's own 'lost the
    MQTT broker ...; results are kept and sent on reconnect'. Nothing is lost and the daemon
    reconnects: a technician should not chase it as an error. Other paho errors stand."""

    MESSAGES = ("failed to receive on socket: %s", "timeout on socket: %s")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and record.msg in self.MESSAGES:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


# aiomqtt hands paho its "mqtt" logger (aiomqtt.client.MQTT_LOGGER) unless given another.
logging.getLogger("mqtt").addFilter(_BrokenConnectionAsWarning())


class UnlistedReason(NamedTuple):
    """A PUBACK failure code MQTT 5 does not define for PUBACK (0x81 Malformed packet, say):
    paho's ReasonCode refuses to name it, and the broker did not take the message."""

    value: int

    @property
    def is_failure(self) -> bool:  # as paho's ReasonCode says (_on_publish)
        return self.value >= 0x80

    def __str__(self) -> str:
        return "a failure MQTT 5 does not define for PUBACK"


def _puback_reason(code: int) -> Any:
    """A PUBACK's reason code as paho names it, or UnlistedReason where paho cannot."""
    try:
        return ReasonCode(PacketTypes.PUBACK, identifier=code)
    except (ValueError, KeyError):  # KeyError: no MQTT 5 code at all (0xA3-0xFF)
        return UnlistedReason(code)


# The codes MQTT 5 gives PUBACK (section 3.4.2.1): paho's decoder takes no other
_PUBACK_CODES = frozenset((0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99))


class PublishRefused(Exception):
    """The broker acknowledged a publish with an MQTT 5 failure reason code (0x80 or more,
    e.g. 0x87 Not authorized): it did not take the message. Not an MqttError: the connection
    itself is fine."""

    def __init__(self, reason: Any) -> None:
        self.code = int(getattr(reason, "value", 0x80))
        self.reason = str(reason)
        super().__init__(f"{self.reason} (reason code 0x{self.code:02x})")


class AcknowledgedClient(aiomqtt.Client):
    """aiomqtt's client, with a publish whose future says what the broker's acknowledgement
    said: aiomqtt's own `publish()` returns on any PUBACK, a refusal (MQTT 5, e.g. 0x87 Not
    authorized by the ACL) as if the broker had taken the message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: dict[int, asyncio.Future[None]] = {}
        # The CONNACK's session-present flag: whether the broker still had this client id's
        # persistent session (None until connected). aiomqtt does not keep it.
        self.session_present: bool | None = None
        # When the broker or the network ended the connection (not this client): how long a
        # connection lasted is measured to there, not to when its end reached the bridge's
        # loop (a subscription still waiting then ends only at its time-out)
        self.dropped_at: float | None = None
        # The connection to the broker was made (TCP, TLS): the CONNECT went or goes out
        # now, and the broker may have made this client id a session whatever follows
        self.reached = False

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.reached = True
        super()._on_socket_open(client, userdata, sock)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason_code: Any, properties: Any = None) -> None:
        if self.dropped_at is None and reason_code != paho.MQTT_ERR_SUCCESS:
            self.dropped_at = time.monotonic()
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    async def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        return await self._until_disconnected(super().subscribe(*args, **kwargs),
                                              "subscribing")

    async def unsubscribe(self, *args: Any, **kwargs: Any) -> None:
        await self._until_disconnected(super().unsubscribe(*args, **kwargs), "unsubscribing")

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        await self._until_disconnected(super().publish(*args, **kwargs), "publishing")

    async def acknowledged(self, sent: asyncio.Future[None]) -> None:
        """Wait for the acknowledgement of a `publish_nowait`, as `publish()` waits for its
        own (up to the client's time-out, and not past the connection's end: MqttError),
        but with what it said: PublishRefused for a refusal, which `publish()` takes for a
        delivery. (The bridge's "online" waits so before requests are taken.)"""
        try:
            await asyncio.wait_for(self._until_disconnected(sent, "publishing"),
                                   None if self.timeout == math.inf else self.timeout)
        except TimeoutError:
            raise aiomqtt.MqttError("Operation timed out") from None

    async def _until_disconnected(self, call: Any, doing: str) -> Any:
        """A SUBSCRIBE (UNSUBSCRIBE, QoS 1 PUBLISH) the connection took with it is never
        answered, and aiomqtt waits for its acknowledgement until its time-out (10 s): the
        bridge came back to the broker that much later, and two bridges with one client id
        were never named (each connection's end fell 10 s after its start). The call ends
        when the connection does, including a connection its own write found gone."""
        task = asyncio.ensure_future(call)
        try:
            await asyncio.wait({task, self._disconnected}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # (a stop: the call goes with it)
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task
        # (read here: aiomqtt's __aexit__ may not, and asyncio would call it never retrieved)
        ended = None if self._disconnected.cancelled() else self._disconnected.exception()
        raise aiomqtt.MqttError(f"the connection ended while {doing}") from ended

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags,
                    reason_code: Any, properties: Any = None) -> None:
        if not self._connected.done() and reason_code == paho.CONNACK_ACCEPTED:
            self.session_present = bool(flags.session_present)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                       properties: Any = None) -> asyncio.Future[None]:
        """Send now; the future completes when the broker has acknowledged the message (at
        once for QoS 0), with PublishRefused when an MQTT 5 broker acknowledged it with a
        failure reason code. Raises MqttCodeError when paho cannot take it (not connected)."""
        info = self._client.publish(topic, payload, qos, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if qos == 0 or info.is_published():
            future.set_result(None)
        else:
            self._acks[info.mid] = future
        return future

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        future = self._acks.pop(mid, None)
        if future is None:  # one of aiomqtt's own publish() calls
            super()._on_publish(client, userdata, mid, reason_code, properties)
        elif future.done():
            pass
        elif reason_code.is_failure:  # an acknowledgement, not a delivery (MQTT 5 only)
            future.set_exception(PublishRefused(reason_code))
        else:
            future.set_result(None)

    def fail_pending(self, exc: BaseException) -> None:
        """The connection is gone: whoever waits for an acknowledgement gets `exc`."""
        for future in self._acks.values():
            if not future.done():
                future.set_exception(exc)
                # Marked retrieved: one nobody awaits any more must not make asyncio print
                # "Future exception was never retrieved" with a traceback (an awaiter still
                # gets it raised)
                future.exception()
        self._acks.clear()


class PipelinedClient(AcknowledgedClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watching_write = False  # whether the loop watches the socket for writing
        self._client.manual_ack_set(True)
        self._client._handle_pubackcomp = self._pubackcomp  # type: ignore[method-assign]
        self._client.loop_read = self._loop_read  # type: ignore[method-assign]
        self._client._update_inflight = types.MethodType(  # type: ignore[method-assign]
            _lean_update_inflight, self._client)

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                       properties: Any = None) -> asyncio.Future[None]:
        """As AcknowledgedClient's, and a QoS 1 message without properties (every result,
        event and state but a transaction's document under MQTT 5) is framed here and
        handed to paho's send queue as bytes: paho's publish() builds a message object, an
        info object with a lock and a log line for each, and keeps the message for a resend
        its client never makes (a reconnect is a new client; the outbox sends again). That
        was 6 % of the daemon's CPU under load. The PUBACK is matched by its packet id."""
        client = self._client
        if qos != 1 or properties is not None or client._sock is None:
            return super().publish_nowait(topic, payload, qos=qos, retain=retain,
                                          properties=properties)
        topic_bytes = topic.encode()
        if not topic_bytes or b"+" in topic_bytes or b"#" in topic_bytes \
                or len(topic_bytes) > 0xFFFF:
            raise ValueError(f"not a topic one can publish to: {quoted(topic, 200)!r}")
        if not isinstance(payload, bytes | bytearray):
            raise TypeError("payload must be bytes")
        if len(payload) > 268_435_455 - 5 - len(topic_bytes):  # MQTT's largest packet
            raise ValueError("Payload too large.")
        mid = client._mid_generate()
        if mid in self._acks or mid in client._out_messages:  # 65535 in flight: wrapped round
            raise aiomqtt.MqttCodeError(paho.MQTT_ERR_QUEUE_SIZE, "Could not publish message")
        packet = publish_packet(topic_bytes, payload, mid, retain,
                                v5=client._protocol == paho.MQTTv5)
        future: asyncio.Future[None] = self._loop.create_future()
        self._acks[mid] = future
        client._packet_queue(paho.PUBLISH, packet, mid, 1)
        return future

    def _loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        """paho's loop_read (which aiomqtt's reader callback calls), counting the messages
        framed here as in flight too. paho reads at most as many packets per call as it
        has messages of its own in flight (`max_packets` is ignored): with none of its own,
        one packet per wake-up of the loop, and a burst of PUBACKs took a loop pass each
        (unpaced, a third fewer payments per second)."""
        client = self._client
        if client._sock is None:
            return paho.MQTTErrorCode.MQTT_ERR_NO_CONN
        reads = max(1, len(client._out_messages) + len(client._in_messages) + len(self._acks))
        for _ in range(reads):
            if client._sock is None:
                return paho.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = client._packet_read()
            if rc > 0:
                return client._loop_rc_handle(rc)
            if rc == paho.MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _pubackcomp(self, cmd: str) -> paho.MQTTErrorCode:
        """paho's `_handle_pubackcomp` for PUBACKs: one for a message framed here resolves its
        future (refused when an MQTT 5 reason code says so); a plain two-byte one for paho's
        own messages goes without paho's decoder, as does one refusing such a message with a
        code paho's decoder does not take; anything else goes through paho."""
        client = self._client
        packet = client._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) < 2:
            return paho.Client._handle_pubackcomp(client, cmd)  # type: ignore[arg-type]
        (mid,) = struct.unpack_from("!H", packet)
        with client._out_message_mutex:
            if mid in client._out_messages:  # sent by paho: with properties, or aiomqtt's
                if len(packet) == 2:
                    return client._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
                if packet[2] not in _PUBACK_CODES:
                    # paho's decoder raises MalformedPacket for it, which drops the
                    # connection (and the next one, the message sent again): a refusal
                    # (0x80 or more), else taken, as for a message framed here
                    return client._do_on_publish(mid, UnlistedReason(packet[2]),
                                                 _NO_PROPERTIES)
                return paho.Client._handle_pubackcomp(client, cmd)  # type: ignore[arg-type]
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            code = packet[2] if len(packet) > 2 else 0
            if code >= 0x80:  # an acknowledgement, not a delivery (MQTT 5 only); a code
                # MQTT 5 does not give PUBACK is refused all the same
                future.set_exception(PublishRefused(_puback_reason(code)))
            else:
                future.set_result(None)
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _on_socket_register_write(self, client: paho.Client, userdata: Any,
                                  sock: Any) -> None:
        """paho has packets to send. aiomqtt asks the loop to watch the socket and sends once
        it is reported writable: a wake-up byte through the loop's self-pipe, two epoll_ctl
        calls and two loop passes later, behind whatever else the loop has queued (a result
        waited for the next terminal's work). The socket almost always has room: send now,
        and watch it only when it had none. (paho also calls this from aiomqtt's connect
        thread: that call goes aiomqtt's way.)"""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            self._watching_write = True
            super()._on_socket_register_write(client, userdata, sock)
            return
        try:
            client.loop_write()
        except Exception as exc:  # as aiomqtt's writer: a broken connection, give up on it
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)
            return
        if client.want_write():  # the socket was full: wait until it can take more
            self._watching_write = True
            super()._on_socket_register_write(client, userdata, sock)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any,
                                    sock: Any) -> None:
        """paho has written everything. The loop watches the socket only when it was full:
        otherwise there is no writer to remove (and the loop's lookups to find none were
        2.5 % of the daemon's CPU under load, once per packet)."""
        if self._watching_write:
            self._watching_write = False
            super()._on_socket_unregister_write(client, userdata, sock)

    async def next_message(self) -> aiomqtt.Message:
        """The next incoming message: one already queued at once, without the task and the
        asyncio.wait that aiomqtt's iterator spends on every message (30 us), so that the
        requests of a burst are handled in one loop pass; otherwise wait for one (raises
        MqttError when the connection is lost)."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return await anext(self.messages)

    def ack(self, message: aiomqtt.Message) -> None:
        """The message has been handled (journaled or answered): the broker may forget it.
        Call in the order the messages arrived (MQTT wants PUBACKs in that order)."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def abandon_pending(self) -> None:
        """The connection is gone: what was not acknowledged stays in the outbox and is sent
        again on the next connection; nobody waits for these futures any more."""
        for future in self._acks.values():
            with contextlib.suppress(asyncio.InvalidStateError):
                future.cancel()
        self._acks.clear()

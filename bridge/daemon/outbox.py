"""The outbox publisher of one MQTT connection: what the journal committed, in order, under a
window of unacknowledged messages, and what the broker refuses held for another try.

Kept apart from the gateway (bridge/daemon/mqtt.py), which connects, subscribes and takes
requests: this is only the way out, and its rules for messages that will not go.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

from paho.mqtt.properties import Properties

from bridge.daemon.journal import OutboxMessage
from bridge.daemon.mqtt_client import PipelinedClient
from bridge.daemon.registers import topic_problem

if TYPE_CHECKING:
    from bridge.daemon.mqtt import RegisterGateway

log = logging.getLogger("poi_bridge.mqtt")

OUTBOX_WINDOW = 256  # outbox messages published and not yet acknowledged, at most


class OutboxPump:
    """One connection's outbox publisher: committed messages in order, at most OUTBOX_WINDOW
    unacknowledged. It runs as a plain call, after a commit or when the window frees up: a
    task woken by an event cost a loop pass, behind whatever else was queued.

    A message the broker refuses (an MQTT 5 PUBACK with a failure reason code, e.g. an ACL
    that does not let the bridge publish there) stays pending in the outbox and is published
    again after a delay growing to a minute (or on the next connection, which starts from
    the oldest pending message); the ones after it go on meanwhile.

    `refused_before`: what the broker refused on the connections before and is still
    pending. This connection publishes it again from the oldest pending message, so it is
    counted as published again until the broker takes it or refuses it anew: the count
    (status, metrics) does not drop to 0 at each reconnect."""

    def __init__(self, gateway: RegisterGateway, client: PipelinedClient,
                 refused_before: set[int] | frozenset[int] = frozenset()) -> None:
        self.gateway = gateway
        self.client = client
        self.packet_limit = gateway.config.packet_limit
        self.loop = asyncio.get_running_loop()
        self.failed: asyncio.Future[None] = self.loop.create_future()
        self.in_window = 0
        self.last_id = 0
        self.acked: list[int] = []
        self.closed = False
        # Refused messages, with the properties they are published with
        self.refused: dict[int, tuple[OutboxMessage, Properties | None]] = {}  # waiting
        self.retry: list[tuple[OutboxMessage, Properties | None]] = []  # due, oldest first
        self.retrying: set[int] = set(refused_before)  # published again, not yet acknowledged
        self.retry_timer: asyncio.TimerHandle | None = None
        # The newest message published on each retained topic through this connection
        self.retained_sent: dict[str, int] = {}

    @property
    def held(self) -> int:
        """Refused messages not yet taken: waiting, due, or published again and not yet
        acknowledged (the count must not drop to 0 while a round of them is in flight)."""
        return len(self.held_ids())

    def held_ids(self) -> set[int]:
        return self.refused.keys() | self.retrying | {m.id for m, _ in self.retry}

    def run(self) -> None:
        if self.closed or self.failed.done():
            return
        journal = self.gateway.journal
        try:
            while self.retry and self.in_window < OUTBOX_WINDOW:
                message, properties = self.retry.pop(0)
                if message.retain and self.retained_sent.get(message.topic, 0) > message.id:
                    self._replaced(message)
                    continue
                self._publish(message, properties)
            while self.in_window < OUTBOX_WINDOW:
                room = OUTBOX_WINDOW - self.in_window
                batch = journal.pending(limit=room, after_id=self.last_id)
                for message in batch:
                    self.last_id = message.id
                    self._publish(message, self.gateway._properties_for(message))
                if len(batch) < room:  # that was every committed message: no query for none
                    return
        except Exception as exc:  # the connection is gone: the serve loop reconnects
            if not self.failed.done():
                self.failed.set_exception(exc)

    def _publish(self, message: OutboxMessage, properties: Properties | None) -> None:
        problem = topic_problem(message.topic)
        if problem is None and len(message.payload) + len(message.topic) > self.packet_limit:
            # (the configuration keeps results within it; an older journal may not) A broker
            # bounding packets drops the connection for it, and the same message would
            # then go first again at every reconnect: nothing after it would ever go out.
            self._undeliverable(message, f"{len(message.payload)} bytes, more than the "
                                f"{self.packet_limit} the bridge publishes (mqtt.max_payload "
                                "and room for the topic)", "raise mqtt.max_payload and the "
                                "broker's max_packet_size, then resync it to publish it again")
            return
        if problem is not None:
            self._undeliverable(message, problem)
            return
        try:
            future = self.client.publish_nowait(message.topic, message.payload, qos=message.qos,
                                                retain=message.retain, properties=properties)
        except (ValueError, TypeError) as exc:  # paho refuses this one message
            self._undeliverable(message, str(exc))
            return
        self.in_window += 1
        future.add_done_callback(functools.partial(self._done, message, properties))
        if message.retain and message.id > self.retained_sent.get(message.topic, 0):
            self.retained_sent[message.topic] = message.id

    def _undeliverable(self, message: OutboxMessage, problem: str,
                       advice: str = "topics like this one come from a requester's MQTT 5 "
                                     "ResponseTopic: fix the sender") -> None:
        """A message no broker would take (a bad topic, kept by an older version): marked
        delivered so that it neither blocks the connection nor is tried forever. Its content
        stays in the journal, and the log says where."""
        journal = self.gateway.journal
        log.error("outbox message %d cannot be published on topic %.200r: %s. It is not sent "
                  "and not tried again; its content stays in the journal until the retention "
                  "prune (sqlite3 %s \"SELECT payload FROM outbox WHERE id = %d\"); %s",
                  message.id, message.topic, problem, journal.path, message.id, advice)
        self.gateway.undeliverable += 1
        self.retrying.discard(message.id)  # (given up: no longer held)
        self.loop.call_soon(journal.mark_delivered, [message.id])
        self._start_delays_over_if_none_held()

    def _done(self, message: OutboxMessage, properties: Properties | None,
              future: asyncio.Future[None]) -> None:
        if self.closed:
            return
        self.in_window -= 1
        if future.cancelled():
            return
        refusal = future.exception()
        if refusal is not None:
            self._refused(message, properties, refusal)
        else:
            if not self.acked:
                self.loop.call_soon(self._mark)
            self.acked.append(message.id)
            if self.retrying or self.refused or self.retry:  # only once something was refused
                self._after_refusals(message)
        if self.in_window == OUTBOX_WINDOW - 1:  # it was full: more may be waiting
            self.loop.call_soon(self.run)

    def _refused(self, message: OutboxMessage, properties: Properties | None,
                 refusal: BaseException) -> None:
        self.retrying.discard(message.id)
        if not message.topic.startswith(self.gateway.config.base_topic + "/"):
            # An answer to an MQTT 5 requester's own ResponseTopic, outside the bridge's
            # topics: its sender chose a topic the bridge may not publish to, and no change
            # on the bridge's side will make it go. Given up, as a topic no broker takes.
            self._undeliverable(message, f"refused by the broker: {refusal}")
            return
        self.refused[message.id] = (message, properties)
        if self.retry_timer is not None:
            return  # one line per round: the retry says how many
        gateway = self.gateway
        delay = gateway._refusal_backoff.next_delay()
        self.retry_timer = self.loop.call_later(delay, self._retry_refused)
        log.error("the MQTT broker refused the message on topic %.200r: %s. It stays in the "
                  "outbox, counted as undelivered, and is published again in %.0f s. Check "
                  "the broker's ACL for the bridge's user (%s): it must be allowed to publish "
                  "to %s/#", message.topic, refusal, delay,
                  gateway.config.username or "anonymous", gateway.config.base_topic)

    def _retry_refused(self) -> None:
        self.retry_timer = None
        if self.closed or not self.refused:
            return
        due = [self.refused[i] for i in sorted(self.refused)]
        self.refused.clear()
        topics = sorted({message.topic for message, _ in due})
        log.warning("publishing again %d message(s) the MQTT broker refused, on %d topic(s): "
                    "%s", len(due), len(topics), ", ".join(topics[:5])
                    + (", ..." if len(topics) > 5 else ""))
        self.retry = sorted(self.retry + due, key=lambda entry: entry[0].id)
        self.retrying.update(message.id for message, _ in due)
        self.run()

    def _replaced(self, message: OutboxMessage) -> None:
        """A refused retained message due again, when a newer one on its topic has gone to
        the broker since: published now it would come after that one and replace it (the
        broker keeps the last), an ended transaction shown in_progress, a cleared document
        back. It is marked delivered instead; the newer one, taken or refused in its turn,
        stands for it."""
        self.retrying.discard(message.id)
        if not self.acked:
            self.loop.call_soon(self._mark)
        self.acked.append(message.id)
        log.info("retained topic %s: an older message the broker refused is not published "
                 "again: a newer one went after it", message.topic)
        self._start_delays_over_if_none_held()

    def _after_refusals(self, message: OutboxMessage) -> None:
        """`message` was taken. A refused retained message on the same topic is older: sent
        again, it would replace the newer state (the retained topics are "latest wins"), so
        it is marked delivered instead. Once every retried message is taken, the delay
        starts small again."""
        self.retrying.discard(message.id)
        if message.retain:
            older = [i for i, (m, _) in self.refused.items()
                     if m.topic == message.topic and i < message.id]
            older += [m.id for m, _ in self.retry if m.topic == message.topic and m.id < message.id]
            if older:
                for message_id in older:
                    self.refused.pop(message_id, None)
                self.retry = [entry for entry in self.retry if entry[0].id not in older]
                self.retrying.difference_update(older)
                self.acked.extend(older)  # (the mark of `message` is already scheduled)
                log.info("retained topic %s: %d older message(s) the broker refused are "
                         "replaced by the newer one it took, and not published again",
                         message.topic, len(older))
        self._start_delays_over_if_none_held()

    def _start_delays_over_if_none_held(self) -> None:
        """Once no refused message is held (each taken, replaced by a newer one, or given
        up), the next refusal is retried after the first, short delay again."""
        if not self.retrying and not self.refused and not self.retry:
            self.gateway._refusal_backoff.reset()

    def _mark(self) -> None:
        ids, self.acked = self.acked, []
        if ids:
            self.gateway.journal.mark_delivered(ids)
            self.gateway.published += len(ids)

    def close(self) -> None:
        if self.retry_timer is not None:
            self.retry_timer.cancel()
        self.client.abandon_pending()
        self._mark()
        self.closed = True

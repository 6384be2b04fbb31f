"""A broker that crashes before saving its persistence file (mosquitto saves it only every
autosave_interval, 1800 s by default) forgets what it acknowledged: a result queued for a
register that was away, and the retained transaction documents. The journal holds them as
delivered. The bridge notices from the CONNACK (no session present although it had one)
and publishes them again from the journal: in the same run, and after a power cut that
restarts the daemon too. A first start does not (review rev1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt

from bridge.protocol.transaction import TxKey
from bridge.transports import Backoff
from tests.broker import Mosquitto

from .follow_rig import BASE, B, bridge_on, wait_until
from .rig import Subscriber, outcome_for
from .test_unresolved_retry import TILL, order, ready, terminals

# As Debian's main file leaves it: the persistence file is written every 30 minutes
SLOW_SAVE = "autosave_interval 1800"


def undelivered(journal: Path) -> int:
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL").fetchone()[0]
    finally:
        db.close()


def lost_state_errors(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and "lost its stored state" in r.getMessage()]


async def pay_while_register_is_away(bridge: Any, broker: Mosquitto, register: Subscriber,
                                     sim: Any, journal: Path) -> None:
    await ready(bridge)
    await register.connect()
    await register.publish(f"{BASE}/terminals/{B}/request/{TILL}", order("P1", B))
    await register.disconnect()  # the till is switched off meanwhile
    assert await wait_until(
        lambda: any(e.category == "Payment" for e in sim.terminal.ledger.values()), timeout=15)
    assert await wait_until(lambda: getattr(bridge.journal.get(TxKey(TILL, "P1")), "state",
                                            None) == "final", timeout=15)
    assert await wait_until(lambda: undelivered(journal) == 0, timeout=15)


async def published_again(bridge: Any, register: Subscriber, journal: Path) -> None:
    """The bridge saw the broker's lost state once, and the till got P1's result again."""
    answer = await register.wait_for(outcome_for("P1", "approved"), timeout=15)
    assert answer is not None
    assert await wait_until(lambda: undelivered(journal) == 0, timeout=15)
    assert bridge.gateway.lost_state == 1


async def retained_document(broker: Mosquitto) -> Any:
    async with Subscriber(broker, [f"{BASE}/transactions/{TILL}/+"],
                          client_id="downloader") as downloader:
        assert await wait_until(
            lambda: downloader.on(f"{BASE}/transactions/{TILL}/P1"), timeout=5), (
            "no retained transactions/TILL1/P1 document after the broker lost its state")
        return downloader.on(f"{BASE}/transactions/{TILL}/P1")[-1]


@contextlib.asynccontextmanager
async def slow_saving_broker(tmp_path: Path, caplog: Any) -> AsyncIterator[
        tuple[Mosquitto, Any, dict[str, str], Subscriber, Path]]:
    """A broker that saves every 30 minutes, the terminals, register TILL1 (not connected)
    and the journal's path."""
    broker = Mosquitto(tmp_path / "mosquitto", extra_config=SLOW_SAVE).start()
    caplog.set_level(logging.INFO)
    try:
        async with terminals(tmp_path) as (_, sim_b, links):
            register = Subscriber(broker, [f"{BASE}/registers/{TILL}/#"],
                                  client_id=f"register-{TILL}", persistent=True)
            yield broker, sim_b, links, register, tmp_path / "journal.sqlite3"
    finally:
        broker.kill()


async def test_a_broker_that_crashes_after_acknowledging_a_result_gets_it_again(
        tmp_path: Path, caplog: Any) -> None:
    rig = slow_saving_broker(tmp_path, caplog)
    async with rig as (broker, sim_b, links, register, journal), \
            bridge_on(tmp_path, broker, links) as bridge:
        # A first start, on a broker that never saw the bridge: nothing was lost
        assert bridge.gateway.lost_state == 0 and not lost_state_errors(caplog)
        await pay_while_register_is_away(bridge, broker, register, sim_b, journal)
        # The bridge waits 2-4 s before reconnecting: the till, switched on at once,
        # subscribes first and hears what the bridge publishes again
        bridge.gateway._backoff = Backoff(initial=4.0, maximum=4.0)
        broker.kill()  # crash / power cut: its persistence file is up to 30 min old
        broker.start()
        await register.connect()
        assert not bridge.gateway.connected, "the bridge reconnected before the till"
        await published_again(bridge, register, journal)
        await register.disconnect()
        document = await retained_document(broker)
        assert document["state"] == "final"
        assert document["bridge"]["outcome"] == "approved"
    logged = lost_state_errors(caplog)
    assert len(logged) == 1, caplog.messages
    assert "autosave_on_changes" in logged[0] and "republish_window" in logged[0], logged[0]
    # P1's retained document and its response (the count said -1 until the 17th session)
    assert "publishes 2 message(s) again" in logged[0], logged[0]


async def test_after_a_power_cut_the_restarted_daemon_publishes_again_what_the_broker_lost(
        tmp_path: Path, caplog: Any) -> None:
    async with slow_saving_broker(tmp_path, caplog) as (broker, sim_b, links, register,
                                                         journal):
        async with bridge_on(tmp_path, broker, links) as bridge:
            await pay_while_register_is_away(bridge, broker, register, sim_b, journal)
        # A daemon restart on a broker that kept everything: its session is there
        async with bridge_on(tmp_path, broker, links) as bridge:
            await ready(bridge)
            assert bridge.gateway.lost_state == 0
        # The box loses power: broker and daemon start again; the till came back first
        broker.kill()
        broker.start()
        await register.connect()
        async with bridge_on(tmp_path, broker, links) as bridge:
            await published_again(bridge, register, journal)
        await register.disconnect()
        document = await retained_document(broker)
        assert document["state"] == "final"
    assert len(lost_state_errors(caplog)) == 1, caplog.messages


async def test_a_quiet_day_then_a_power_cut_still_finds_the_broker_lost_its_state(
        tmp_path: Path, caplog: Any) -> None:
    """Review: after a restart, whether the broker still held the bridge's MQTT 5 session was
    judged from the last message it acknowledged, while the session's 24-hour expiry runs
    from the bridge's disconnect. A store with no payment for over a day, then a power cut
    taking broker and daemon together: no ERROR, nothing published again. The journal now
    keeps when the bridge was last connected (at connect, then every health_interval)."""
    from unittest import mock

    from bridge.daemon.journal import Journal

    from .test_daemon_mqtt import BASE as GATEWAY_BASE, eventually, running
    from .test_mqtt_faults import gateway_for

    caplog.set_level(logging.INFO)
    broker = Mosquitto(tmp_path / "mosquitto").start()
    journal = Journal(tmp_path / "journal.sqlite3")
    document = f"{GATEWAY_BASE}/transactions/{TILL}/P1"
    saturday = time.time() - 25 * 3600  # the last payment
    with mock.patch("time.time", return_value=saturday):
        journal.enqueue([(document, b'{"state":"final"}', 1, True)])
        journal.mark_delivered([m.id for m in journal.pending()])
    try:
        gateway = gateway_for(broker, journal, protocol="5", health_interval=0.2)
        async with running(gateway):  # the daemon up through the quiet day, until now
            await eventually(lambda: gateway.connected)
            first = journal.last_connected_at()
            await eventually(lambda: journal.last_connected_at() > first)  # kept fresh
        assert not lost_state_errors(caplog)
        broker.kill()  # the power cut: the broker's state is gone with its file
        for saved in (tmp_path / "mosquitto").glob("*.db"):
            saved.unlink()
        broker.start()
        gateway = gateway_for(broker, journal, protocol="5")  # the daemon starts again
        async with running(gateway):
            await eventually(lambda: gateway.connected)
            await eventually(lambda: not journal.pending())
        assert gateway.lost_state == 1
        assert len(lost_state_errors(caplog)) == 1, caplog.messages
        async with Subscriber(broker, [f"{GATEWAY_BASE}/transactions/#"],
                              client_id="downloader") as downloader:
            assert await wait_until(lambda: downloader.on(document), timeout=5)
        # A bridge away for longer than the session expiry finds it gone as agreed: no ERROR
        away = time.time() - 25 * 3600
        with journal._transaction() as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_connected'", (repr(away),))
            db.execute("UPDATE outbox SET delivered_at = ?", (away,))
        broker.kill()
        for saved in (tmp_path / "mosquitto").glob("*.db"):
            saved.unlink()
        broker.start()
        gateway = gateway_for(broker, journal, protocol="5")
        async with running(gateway):
            await eventually(lambda: gateway.connected)
        assert gateway.lost_state == 0
        assert len(lost_state_errors(caplog)) == 1, caplog.messages
    finally:
        journal.close()
        broker.kill()


async def test_the_example_brokers_save_what_they_acknowledged_at_once(tmp_path: Path) -> None:
    """examples/mosquitto/mosquitto.conf under Debian's main file: a retained transaction
    document the broker acknowledged is in its persistence file within seconds (not after
    autosave_interval's default 30 minutes), and still there after a SIGKILL. central.conf
    says the same."""
    from .test_example_store_broker import EXAMPLES, store_broker

    for name in ("mosquitto.conf", "central.conf"):
        settings = (EXAMPLES / name).read_text().splitlines()
        assert "autosave_on_changes true" in settings and "autosave_interval 1" in settings, name
    broker = store_broker(tmp_path).start()
    topic = f"poi-bridge/transactions/{TILL}/S1"
    saved = broker.workdir / "mosquitto.db"
    try:
        async with aiomqtt.Client(broker.host, broker.ports[0], username="poi-bridge",
                                  password="bridge-pw", identifier="saves") as client:
            await client.publish(topic, b'{"state": "final"}', qos=1, retain=True)
        assert await wait_until(lambda: saved.exists() and topic.encode() in saved.read_bytes(),
                                timeout=5), "the broker did not save the acknowledged message"
        broker.kill()
        broker.start()
        async with aiomqtt.Client(broker.host, broker.ports[0], username="operator",
                                  password="op-pw", identifier="reads") as client:
            await client.subscribe(topic, qos=1)
            async with asyncio.timeout(5):
                message = await anext(client.messages)
            assert message.payload == b'{"state": "final"}' and message.retain
    finally:
        broker.kill()

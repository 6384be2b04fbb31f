"""A power cut takes broker and daemon down; the broker comes back without its state. The
daemon's next start connects, sees no session present, marks what the broker lost pending
again (Journal.redeliver), and is killed before that is committed. Its CONNECT already made
the broker a new session for the bridge's client id: the start after that found a session
present and published nothing again, the retained transaction document and the result the
broker lost gone for good, without a line in the log (review rev3). The journal now
records, before each CONNECT, that its answer is yet to be checked: a start that finds that
row publishes again as for a lost state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from bridge.simulator import responses
from tests.broker import Mosquitto

from .rig import (POI, Daemon, Simulator, Subscriber, bridge_online, fault_injected,
                  outcome_for, wait_until, write_config)
from .test_broker_lost_state import undelivered

BASE = "poi-bridge"
RESPONSES = f"{BASE}/registers/POS1/#"

# SIGKILL right after redeliver() marked the messages pending, before the pass commits
KILLED_AFTER_REDELIVER = """
import os, signal
from pathlib import Path
from bridge.daemon import journal
_redeliver = journal.Journal.redeliver
def redeliver(self, *args, **kwargs):
    count = _redeliver(self, *args, **kwargs)
    Path(os.environ["REDELIVERED_MARK"]).write_text(str(count))
    os.kill(os.getpid(), signal.SIGKILL)
journal.Journal.redeliver = redeliver
"""


async def test_a_start_killed_before_recording_the_lost_state_leaves_it_for_the_next(
        tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", extra_config="autosave_interval 1800").start()
    sim = Simulator(tmp_path, "--delay", "0.2")
    config = write_config(tmp_path, broker, sim.link)
    journal = tmp_path / "journal.sqlite3"
    daemon = Daemon(config, tmp_path).start()
    try:
        async with Subscriber(broker, [RESPONSES], client_id="register-POS1",
                              persistent=True) as register:
            await bridge_online(broker)
            await asyncio.sleep(0.5)
            await register.publish(f"{BASE}/terminals/{POI}/request",
                                   responses.payment_request("POS1", "L1", POI, 3.0))
            assert await register.wait_for(outcome_for("L1", "approved"), timeout=30)
        assert wait_until(lambda: undelivered(journal) == 0, 15)
        daemon.kill()
        broker.kill()  # the power cut: the broker's state is 30 minutes old, i.e. none
        broker.start()
        mark = tmp_path / "redelivered"
        killed = Daemon(config, tmp_path,
                        path_first=fault_injected(tmp_path, KILLED_AFTER_REDELIVER))
        killed.env["REDELIVERED_MARK"] = str(mark)
        killed.start()
        assert wait_until(lambda: killed.process.poll() is not None, 30)
        # It saw the lost state and was killed before committing what it marked
        assert mark.read_text() == "2" and killed.process.returncode == -9
        assert undelivered(journal) == 0
        register = Subscriber(broker, [RESPONSES], client_id="register-POS1",
                              persistent=True)
        await register.connect()  # the till is back first
        daemon = Daemon(config, tmp_path).start()
        await bridge_online(broker)
        try:
            assert await register.wait_for(outcome_for("L1", "approved"), timeout=15), (
                "the result the broker lost was not published again")
        finally:
            await register.disconnect()
        async with Subscriber(broker, [f"{BASE}/transactions/POS1/+"],
                              client_id="downloader") as downloader:
            assert await asyncio.to_thread(
                wait_until, lambda: downloader.on(f"{BASE}/transactions/POS1/L1"), 5), (
                "the retained document of L1 is gone from the broker")
        assert wait_until(lambda: undelivered(journal) == 0, 15)
        assert wait_until(lambda: "before the bridge had checked whether the broker had kept its "
                          "session" in daemon.log(), 5), daemon.log()[-3000:]
        # Recorded as checked: the start after this one publishes nothing again
        assert daemon.terminate() == 0
        connects = daemon.log().count("connected to MQTT broker")
        daemon = Daemon(config, tmp_path).start()
        assert wait_until(lambda: daemon.log().count("connected to MQTT broker") > connects, 15)
        await bridge_online(broker)
        assert daemon.log().count("before the bridge had checked whether") == 1, daemon.log()[-3000:]
    finally:
        daemon.kill()
        sim.stop()
        broker.kill()


class ConnackDropper:
    """A TCP relay to the broker that, on the first connection only, passes the CONNECT on
    and drops the CONNACK, closing the connection: the broker made the session, the bridge
    never heard its answer (a connection lost at that instant)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ConnackDropper:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.host, self.port = "127.0.0.1", self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        up_reader, up_writer = await asyncio.open_connection(self.broker.host,
                                                             self.broker.port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                       drop: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if drop:  # the CONNACK: lost, and the connection with it
                        break
                    sink.write(data)
                    await sink.drain()
            for end in (sink, writer, up_writer):
                end.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, first))


async def test_a_connection_lost_before_its_connack_leaves_the_check_to_the_next(
        tmp_path: Path, caplog: Any) -> None:
    """The same within one run (review rev5): a CONNECT that reached a broker which lost its
    state, then a connection lost before its CONNACK; the next connection finds the session
    that CONNECT made, and published nothing again."""
    from bridge.daemon.journal import Journal

    from .test_daemon_mqtt import BASE as GATEWAY_BASE, eventually, running
    from .test_mqtt_faults import gateway_for

    caplog.set_level(logging.INFO)
    broker = Mosquitto(tmp_path / "mosquitto").start()  # it lost everything: a new one
    journal = Journal(tmp_path / "journal.sqlite3")
    document = f"{GATEWAY_BASE}/transactions/POS1/L1"
    journal.enqueue([(document, b'{"state":"final"}', 1, True)])
    journal.mark_delivered([m.id for m in journal.pending()])
    journal.note_connected()  # the bridge had a session there
    try:
        async with ConnackDropper(broker) as relay:
            gateway = gateway_for(relay, journal)
            async with running(gateway):
                # (aiomqtt waits its time-out for the CONNACK of a connection that ended)
                await eventually(lambda: gateway.connected, timeout=30)
                await eventually(lambda: not journal.pending())
            assert relay.connections == 2
        assert gateway.lost_state == 0  # (the second CONNACK said: session present)
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "before the bridge had checked whether" in r.getMessage()]
        assert len(said) == 1 and "publishes 1 message(s) again" in said[0], caplog.messages
        async with Subscriber(broker, [f"{GATEWAY_BASE}/transactions/#"],
                              client_id="downloader") as downloader:
            assert await asyncio.to_thread(wait_until, lambda: downloader.on(document), 5), (
                "the retained document the broker lost was not published again")
    finally:
        journal.close()
        broker.kill()


async def test_a_connect_that_cannot_be_recorded_does_not_go_out(tmp_path: Path) -> None:
    """note_connecting's commit failed (the disk): the daemon stops on it, and the CONNECT,
    which would make the broker a session nobody recorded, is not sent meanwhile."""
    from unittest import mock

    from bridge.daemon.journal import Journal
    from bridge.daemon.mqtt import JournalFailed

    from .test_mqtt_faults import gateway_for

    broker = Mosquitto(tmp_path / "mosquitto").start()
    journal = Journal(tmp_path / "journal.sqlite3")
    failures: list[BaseException] = []
    journal.on_failure(failures.append)
    journal.group_commits(asyncio.get_running_loop().call_soon)  # as the daemon's
    try:
        gateway = gateway_for(broker, journal)
        with mock.patch.object(journal, "_commit_unless_lost",
                               side_effect=sqlite3.OperationalError("disk I/O error")):
            task = asyncio.create_task(gateway.run())
            # (the failure stops the daemon; the task's end would too, should it not)
            with pytest.raises(JournalFailed):
                await asyncio.wait_for(task, 5)
        assert failures and not gateway.connected
        assert gateway.broker_problem == "stopping: the journal failed"
        assert journal.session_check_left is False
        assert not journal._db.execute(
            "SELECT 1 FROM meta WHERE key = 'session_check'").fetchall()
    finally:
        journal.close()
        broker.kill()


def test_an_unchecked_connect_is_checked_by_the_first_connack_only(tmp_path: Path) -> None:
    """Left by the run before, the unchecked CONNECT is settled by this run's first CONNACK,
    whatever it says: a first start's (nothing to publish) did not clear it, and every
    reconnect of the run then published the window again, with a warning (review rev5)."""
    from types import SimpleNamespace
    from unittest import mock

    from bridge.daemon.journal import Journal

    from .test_mqtt_faults import gateway_for

    journal = Journal(tmp_path / "journal.sqlite3")
    assert journal.note_connecting()
    journal.close()  # killed before the check
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        assert journal.session_check_left
        gateway = gateway_for(SimpleNamespace(host="127.0.0.1", port=1), journal)
        with mock.patch.object(journal, "redeliver", return_value=0) as redeliver:
            gateway._check_session(SimpleNamespace(session_present=False))  # nothing seen
            gateway._check_session(SimpleNamespace(session_present=True))  # a reconnect
        assert redeliver.call_count == 0
    finally:
        journal.close()


async def test_a_commit_whose_actions_write_still_notes_the_connect(tmp_path: Path) -> None:
    """The forced commit runs the pass's after_commit actions, and one that writes (a frame
    delivered, recorded) begins the next pass at once: the note was taken for a failed one,
    and the MQTT side stopped for good with the daemon up (review rev8)."""
    from bridge.daemon.journal import Journal

    journal = Journal(tmp_path / "journal.sqlite3")
    journal.group_commits(asyncio.get_running_loop().call_soon)
    try:
        journal.enqueue([("poi-bridge/registers/POS1/event", b"{}", 1, False)])
        journal.after_commit(lambda: journal.enqueue(
            [("poi-bridge/registers/POS1/event", b"{}", 1, False)]))
        assert journal.note_connecting()
        assert journal._group_open  # (the action's write: the next pass)
    finally:
        journal.close()


async def test_a_refused_login_leaves_nothing_to_publish_again(tmp_path: Path,
                                                               caplog: Any) -> None:
    """A CONNACK with an error code: the broker made no session. The bridge once took it
    for an unchecked CONNECT, and the connection after the password was fixed (in the run,
    or after the restart the log asks for) published an hour of results again (rev8)."""
    from bridge.daemon.journal import Journal

    from .test_daemon_mqtt import BASE as GATEWAY_BASE, eventually, running
    from .test_mqtt_faults import gateway_for
    from .test_mqtt_security import passwords

    caplog.set_level(logging.INFO)
    passwd = tmp_path / "passwd"
    passwords(passwd, {"poi-bridge": "right"})
    broker = Mosquitto(tmp_path / "mosquitto", extra_config=f"allow_anonymous false\n"
                       f"password_file {passwd}\n").start()
    # The bridge's session, as its last connection left it
    async with aiomqtt.Client(broker.host, broker.port, identifier="bridge-faults",
                              clean_session=False, username="poi-bridge", password="right"):
        pass
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.enqueue([(f"{GATEWAY_BASE}/transactions/POS1/L1", b'{"state":"final"}', 1, True)])
    journal.mark_delivered([m.id for m in journal.pending()])
    journal.note_connected()
    try:
        gateway = gateway_for(broker, journal, username="poi-bridge")
        gateway._password = "wrong"
        async with running(gateway):
            await eventually(lambda: gateway.broker_problem == "login refused")
            await asyncio.sleep(0.3)  # refused again, and again
        assert not journal._db.execute(
            "SELECT 1 FROM meta WHERE key = 'session_check'").fetchall()
        gateway = gateway_for(broker, journal, username="poi-bridge")
        gateway._password = "right"
        async with running(gateway):
            await eventually(lambda: gateway.connected)
            await asyncio.sleep(0.3)
        assert journal.pending() == [] and gateway.lost_state == 0
        assert not [m for m in caplog.messages if "checked whether" in m], caplog.messages
    finally:
        journal.close()
        broker.kill()


def test_an_unchecked_connect_then_a_day_away_still_publishes_again(tmp_path: Path) -> None:
    """MQTT 5: a session the bridge left more than a day ago expired as agreed, but one an
    unchecked CONNECT made is no such session: the retained documents lost with the
    broker's state are published again (review rev8)."""
    import time
    from types import SimpleNamespace
    from unittest import mock

    from bridge.daemon.journal import Journal

    from .test_mqtt_faults import gateway_for

    journal = Journal(tmp_path / "journal.sqlite3")
    with mock.patch("time.time", return_value=time.time() - 3 * 86400):
        journal.note_connected()
    assert journal.note_connecting()
    journal.close()
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        gateway = gateway_for(SimpleNamespace(host="127.0.0.1", port=1), journal,
                              protocol="5")
        with mock.patch.object(journal, "redeliver", return_value=1) as redeliver:
            gateway._check_session(SimpleNamespace(session_present=False))
        assert redeliver.call_count == 1
    finally:
        journal.close()

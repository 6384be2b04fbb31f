"""Found by review rv19: the MQTT task could end *cancelled* with nobody asking for it, and
Bridge._task_ended ignored a cancelled task, so the daemon stayed up without a broker
connection, READY and feeding systemd's watchdog, never to reconnect.

The path: paho has found its socket gone, aiomqtt has not said so yet; the outbox pump's
publish fails (not connected), and its close() abandons the PUBACK futures still waiting,
among them a terminal state's; _publish_states re-raised the CancelledError gather returned
for it, and _serve's task.result() raised it out of RegisterGateway.run."""

from __future__ import annotations

import asyncio

import aiomqtt
import paho.mqtt.client as paho

from bridge.daemon.journal import Journal
from bridge.daemon.mqtt_client import PipelinedClient

from .rig import POI
from .test_mqtt_faults import BASE, gateway_for


async def test_a_failed_outbox_publish_with_a_state_in_flight_never_ends_the_mqtt_task_cancelled(
        tmp_path, mosquitto, monkeypatch):
    """The outbox pump fails (paho: not connected) while a terminal's state waits for its
    PUBACK. pump.close() -> abandon_pending() cancels that state's future, _publish_states
    re-raises the CancelledError that gather returned, and _serve's `task.result()` may
    raise it out of RegisterGateway.run: the gateway's task then ends cancelled and never
    reconnects."""
    fail_next = {"on": False}
    original = PipelinedClient.publish_nowait

    def publish_nowait(self, topic, payload, **kw):
        if fail_next["on"] and "/registers/" in topic:
            fail_next["on"] = False  # as paho says once its socket is gone
            raise aiomqtt.MqttCodeError(paho.MQTT_ERR_NO_CONN, "Could not publish message")
        return original(self, topic, payload, **kw)

    monkeypatch.setattr(PipelinedClient, "publish_nowait", publish_nowait)
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal)
    task = asyncio.create_task(gateway.run(), name="mqtt")
    try:
        for round_ in range(30):
            for _ in range(500):
                if gateway.connected:
                    break
                await asyncio.sleep(0.02)
            assert gateway.connected, f"round {round_}: not reconnected"
            client = gateway._client
            gateway.terminal_state(POI, {"state": "busy", "round": round_})
            for _ in range(1000):  # until the state's publish waits for its PUBACK
                if client._acks:
                    break
                await asyncio.sleep(0)
            assert client._acks
            fail_next["on"] = True
            gateway.enqueue(f"{BASE}/registers/TILL1/response", {"n": round_})
            await asyncio.sleep(0.3)
            assert not task.cancelled(), (
                f"round {round_}: the MQTT task ended cancelled, nobody asked for it; "
                f"connected={gateway.connected}")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        journal.close()


def _bridge(tmp_path, mosquitto, fake_socket):
    from bridge.config import parse_config
    from bridge.daemon.app import Bridge
    from bridge.daemon.notify import SystemdNotifier

    notifier = SystemdNotifier(fake_socket, environ={"WATCHDOG_USEC": "400000"})
    config = parse_config({"journal": str(tmp_path / "journal.sqlite3"),
                           "mqtt": {"host": mosquitto.host, "port": mosquitto.port,
                                    "base_topic": BASE, "client_id": "rv19-bridge"}})
    return Bridge(config, hotplug=False, notifier=notifier)


async def test_a_daemon_task_cancelled_without_a_stop_stops_the_daemon_for_systemd(
        tmp_path, mosquitto, caplog):
    """Whatever cancels one of the daemon's long-lived tasks without a stop (the path above,
    or one not found yet), the daemon must not stay up feeding the watchdog: it stops with
    the exit status that makes systemd start it again."""
    from bridge.daemon.app import TASK_EXIT_STATUS

    from .test_notify import FakeSystemd

    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    bridge = _bridge(tmp_path, mosquitto, str(tmp_path / "notify.sock"))
    await bridge.start()
    try:
        mqtt = next(t for t in bridge._tasks if t.get_name() == "mqtt")
        mqtt.cancel()
        await asyncio.wait_for(bridge.wait_stopped(), 5)
        assert bridge.exit_status == TASK_EXIT_STATUS
        said = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
        assert any("mqtt task ended unexpectedly" in m and "no stop was asked" in m
                   for m in said), said
    finally:
        await bridge.stop()
        fake.close()


async def test_a_start_that_fails_after_its_tasks_began_is_not_called_an_unexpected_end(
        tmp_path, mosquitto, caplog):
    """start() raising after the tasks were made: asyncio.run cancels them as it unwinds.
    That is a failed start (its own error), not a task that ended unexpectedly."""
    from .test_notify import FakeSystemd

    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    bridge = _bridge(tmp_path, mosquitto, str(tmp_path / "notify.sock"))

    def ready(status):
        raise RuntimeError("a start that fails late")

    bridge.notifier.ready = ready
    try:
        try:
            await bridge.start()
        except RuntimeError:
            pass
        else:
            raise AssertionError("start() did not raise")
        assert bridge._tasks
        for task in bridge._tasks:
            task.cancel()
        await asyncio.gather(*bridge._tasks, return_exceptions=True)
        assert bridge.exit_status == 0
        assert not [r for r in caplog.records if r.levelname == "CRITICAL"]
    finally:
        await bridge.stop()
        fake.close()


async def test_a_connection_task_cancelled_alone_ends_the_connection(tmp_path, mosquitto):
    """Review rv21: asyncio.wait(FIRST_EXCEPTION) does not wake for a task that ended
    cancelled, so a connection whose terminal-state task was cancelled, nobody asking, went
    on serving without it (states never published again) and never reconnected."""
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal)
    task = asyncio.create_task(gateway.run(), name="mqtt")
    try:
        for _ in range(500):
            if gateway.connected:
                break
            await asyncio.sleep(0.02)
        assert gateway.connected
        (states,) = [t for t in asyncio.all_tasks() if t.get_name() == "terminal states"]
        states.cancel()
        for _ in range(500):
            if gateway.reconnects >= 1 and gateway.connected:
                break
            await asyncio.sleep(0.02)
        assert gateway.reconnects >= 1 and gateway.connected, (gateway.reconnects,
                                                               gateway.connected)
        assert [t for t in asyncio.all_tasks() if t.get_name() == "terminal states"
                and not t.done()], "the new connection publishes terminal states again"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        journal.close()

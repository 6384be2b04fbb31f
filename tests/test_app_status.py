"""The one-line status systemd shows (`systemctl status poi-bridge`, STATUS=)."""

from __future__ import annotations

from bridge.config import parse_config
from bridge.daemon.app import Bridge


def test_a_terminal_that_is_the_wrong_device_is_not_counted_online(tmp_path, monkeypatch):
    config = parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": "127.0.0.1", "port": 1},
        "terminals": [{"poi_id": poi, "link": {"kind": "serial", "device": f"/dev/null{i}"}}
                      for i, poi in enumerate(("V400m-1", "V400m-2", "V400m-3"))],
    })
    bridge = Bridge(config, hotplug=False)
    try:
        documents = {"V400m-1": {"state": "online", "identity": "confirmed"},
                     "V400m-2": {"state": "busy", "identity": "mismatch: V400m-999"},
                     "V400m-3": {"state": "offline", "identity": "unknown"}}
        for poi, worker in bridge.workers.items():
            monkeypatch.setattr(worker, "state", lambda poi=poi: {"poi_id": poi,
                                                                   **documents[poi]})
        line = bridge.status_line()
        assert line.startswith("1/3 terminals online (1 the wrong device: V400m-2), ")
        # not "unreachable" before the first attempt has even failed
        assert line.endswith("undelivered, connecting to the broker")
        bridge.gateway.broker_problem = "login refused"
        assert bridge.status_line().endswith(", broker login refused")
        documents["V400m-2"]["identity"] = "confirmed"
        assert bridge.status_line().startswith("2/3 terminals online, 0 in flight")
    finally:
        bridge.journal.close()


async def test_out_of_memory_where_no_task_awaits_it_stops_the_daemon(tmp_path, caplog):
    """A MemoryError inside aiomqtt's reader reached only the loop's exception handler: it
    was logged, and the MQTT connection stayed wedged while the watchdog was fed. The daemon
    stops now, with the exit status that makes systemd start it again. (Memory cannot be
    exhausted safely here: the loop is told of the error as asyncio would tell it.)"""
    import asyncio

    from bridge.daemon.app import TASK_EXIT_STATUS, stop_when_out_of_memory

    config = parse_config({"journal": str(tmp_path / "journal.sqlite3"),
                           "mqtt": {"host": "127.0.0.1", "port": 1}})
    bridge = Bridge(config, hotplug=False)
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    try:
        stop_when_out_of_memory(loop, bridge)
        loop.call_exception_handler({"message": "Task exception was never retrieved",
                                     "exception": ValueError("a bug elsewhere")})
        assert bridge.exit_status == 0  # logged, as before: not a reason to stop
        loop.call_exception_handler({"message": "Future exception was never retrieved",
                                     "exception": MemoryError()})
        assert bridge.exit_status == TASK_EXIT_STATUS
        await asyncio.wait_for(bridge.wait_stopped(), 1)
        assert any("out of memory" in m for m in caplog.messages)
    finally:
        loop.set_exception_handler(before)
        bridge.journal.close()


async def test_status_follows_the_broker_and_the_terminals_at_once(tmp_path, mosquitto):
    """STATUS= was refreshed only every 10 s: right after a start `systemctl status` said
    "0/1 terminals online ... connecting to the broker" for up to 10 s while both were up.
    It follows the broker's connection and a terminal's state at once (not every payment:
    busy and back changes nothing it shows)."""
    import asyncio

    from bridge.daemon.app import STATUS_INTERVAL
    from bridge.daemon.notify import SystemdNotifier
    from bridge.simulator.server import SimulatorServer
    from bridge.simulator.terminal import Behaviour, Scenario

    from .rig import POI

    class Recorded(SystemdNotifier):
        def __init__(self) -> None:
            super().__init__(address="")
            self.lines: list[str] = []

        def status(self, text: str) -> bool:
            self.lines.append(text)
            return True

    notifier = Recorded()
    simulator = SimulatorServer(Scenario(poi_id=POI, default=Behaviour(delay=0.05)),
                                ack_timeout=0.3)
    device = await simulator.start_pty(tmp_path / "terminal")
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
        "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device}}],
    }), hotplug=False, notifier=notifier)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await bridge.start()
    try:
        wanted = "1/1 terminals online, 0 in flight, 0 unresolved, 0 undelivered, broker connected"
        async with asyncio.timeout(STATUS_INTERVAL - 3):
            while wanted not in notifier.lines:
                await asyncio.sleep(0.02)
        assert loop.time() - started < STATUS_INTERVAL - 3
    finally:
        await bridge.stop()
        await simulator.close()

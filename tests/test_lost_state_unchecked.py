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
from pathlib import Path

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
        assert wait_until(lambda: "before it had recorded whether the broker had kept its "
                          "session" in daemon.log(), 5), daemon.log()[-3000:]
        # Recorded as checked: the start after this one publishes nothing again
        assert daemon.terminate() == 0
        connects = daemon.log().count("connected to MQTT broker")
        daemon = Daemon(config, tmp_path).start()
        assert wait_until(lambda: daemon.log().count("connected to MQTT broker") > connects, 15)
        await bridge_online(broker)
        assert daemon.log().count("before it had recorded whether") == 1, daemon.log()[-3000:]
    finally:
        daemon.kill()
        sim.stop()
        broker.kill()

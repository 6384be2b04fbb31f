"""A read of the journal that fails while the daemon runs (a damaged page, a read error)
stops it at once, as the README says: exit 3, a CRITICAL line. One in the MQTT side (the
outbox pump reading what to publish, the health document's counts) was taken for a lost
connection: the daemon reconnected for ever, said "online" each time, sent payments to the
terminal and published none of their results (the journal audit).

The read failure is injected into the real daemon process by a sitecustomize.py on its
path, once a flag file exists."""

from __future__ import annotations

import asyncio
import textwrap

from bridge.simulator import responses

from .rig import (POI, Daemon, Simulator, Subscriber, bridge_online, fault_injected, outcome_for,
                  wait_until)
from .rig import write_config as write_store_config

BASE = "poi-bridge"
REQUEST = f"{BASE}/terminals/{POI}/request/POS1"

FAULT = textwrap.dedent('''
    """Once the flag file exists, the journal's outbox read fails as a damaged page would."""
    import os
    import sqlite3

    from bridge.daemon import journal

    FLAG = os.path.join(os.path.dirname(__file__), "fail-reads")
    _pending = journal.Journal.pending


    def pending(self, *args, **kwargs):
        if os.path.exists(FLAG):
            raise sqlite3.DatabaseError("database disk image is malformed")
        return _pending(self, *args, **kwargs)


    journal.Journal.pending = pending
''')


async def test_a_journal_read_failing_in_the_mqtt_side_stops_the_daemon(tmp_path, mosquitto):
    fault = fault_injected(tmp_path, FAULT)
    sim = Simulator(tmp_path)
    daemon = Daemon(write_store_config(tmp_path, mosquitto, sim.link), tmp_path,
                    path_first=fault).start()
    try:
        async with Subscriber(mosquitto, [f"{BASE}/registers/POS1/#"],
                              client_id="register-POS1", persistent=True) as register:
            await bridge_online(mosquitto, BASE)
            await register.publish(REQUEST, responses.payment_request("POS1", "OK1", POI, 1.0))
            await register.wait_for(outcome_for("OK1", "approved"), timeout=30)
            (fault / "fail-reads").touch()
            await register.publish(REQUEST, responses.payment_request("POS1", "R1", POI, 1.0))
            assert await asyncio.to_thread(
                wait_until, lambda: daemon.process.poll() is not None, 30), \
                "a journal read failed and the daemon went on serving"
        assert daemon.process.returncode == 3
        log = daemon.log()
        assert "CRITICAL" in log and "a read failed: database disk image is malformed" in log
        assert "the MQTT connection to" not in log  # not taken for a lost connection
    finally:
        daemon.kill()
        sim.stop()

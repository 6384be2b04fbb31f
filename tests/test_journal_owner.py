"""Whose journal it is: one daemon holds it at a time, and its files belong to the daemon's
user. Real processes, a real simulator on a pseudo-terminal and real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3

from bridge.simulator import responses

from .rig import POI, Daemon, Simulator, Subscriber, wait_until, write_config
from .test_cli import cli

BASE = "poi-bridge"
REQUEST = f"{BASE}/terminals/{POI}/request"


def transaction_row(path, service_id):
    """Every column of the transaction's row: a status poll would change several."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT * FROM transactions WHERE service_id = ?",
                          (service_id,)).fetchall()


async def test_a_second_daemon_on_the_same_journal_refuses_before_touching_it(
        tmp_path, mosquitto):
    """A technician started `poi-bridge run` by hand beside the service: the second daemon
    took up the payment the first one owned, polled its terminal, and the two took the
    broker session from each other. It must refuse at once, exit 3, and say why."""
    sim = Simulator(tmp_path, "--delay", "30")  # the shopper takes her time: the row stays
    config = write_config(tmp_path, mosquitto, sim.link, terminal={"payment_timeout": 60.0})
    journal = tmp_path / "journal.sqlite3"
    first = Daemon(config, tmp_path).start()
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = Daemon(config, second_dir)
    third = Daemon(config, tmp_path / "third")
    try:
        async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
            await sub.wait_for(lambda t, p: t.endswith(f"/terminals/{POI}/state")
                               and p["state"] == "online")
            await sub.publish(REQUEST, responses.payment_request("POS1", "L1", POI, 5.0))
            await sub.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "sent")
        before = transaction_row(journal, "L1")
        assert len(before) == 1

        second.start()
        assert await asyncio.to_thread(second.process.wait, 15) == 3, second.log()[-3000:]
        said = second.log()
        assert (f"journal {journal} is in use by another poi-bridge process "
                f"(pid {first.process.pid})") in said, said
        assert "systemctl status poi-bridge" in said and "never run two" in said, said
        assert "recovering" not in said and "connected to MQTT broker" not in said, said
        assert transaction_row(journal, "L1") == before  # not taken up, not polled
        assert first.process.poll() is None

        # The technician's commands read the journal beside the daemon, unrefused.
        status = await asyncio.to_thread(cli, "status", "--config", str(config), "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert [t["service_id"] for t in report["open_transactions"]] == ["L1"], report

        # A daemon that died (SIGKILL) holds nothing: the next one starts and takes L1 up.
        first.kill()
        (tmp_path / "third").mkdir()
        third.start()
        assert await asyncio.to_thread(
            wait_until, lambda: "recovering 1 open transaction" in third.log()
            and "started:" in third.log(), 20), third.log()[-3000:]
        assert third.process.poll() is None
    finally:
        for daemon in (first, second, third):
            daemon.kill()
        sim.stop()

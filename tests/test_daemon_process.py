"""The daemon as a real process: crashes (SIGKILL), broker outages, the last will, SIGTERM.

The simulator is its own process too, so a daemon crash does not take the terminal with it,
just as on a store box.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import textwrap

from bridge.daemon.journal import Journal
from bridge.protocol.transaction import Transaction, TxState
from bridge.simulator import responses

from .rig import (POI, ROOT, Daemon, Simulator, Subscriber, bridge_online, outcome_for, wait_until,
                  write_config)
from .test_cli import cli

BASE = "poi-bridge"
REQUEST = f"{BASE}/terminals/{POI}/request"
JOURNAL_ROOM = 64 * 1024  # what the disk-full test leaves the journal to grow by


def journal_rows(workdir, service_id):
    db = sqlite3.connect(workdir / "journal.sqlite3")
    try:
        return db.execute("SELECT state, outcome, source FROM transactions WHERE service_id = ?",
                          (service_id,)).fetchall()
    finally:
        db.close()


async def test_kill_9_mid_payment_then_restart_recovers_the_outcome_exactly_once(
        tmp_path, mosquitto):
    # The terminal takes 2.5 s and its answer is lost: only the status poll can tell.
    sim = Simulator(tmp_path, "--delay", "2.5", "--never-answer")
    daemon = Daemon(write_config(tmp_path, mosquitto, sim.link,
                                 terminal={"payment_timeout": 10.0}), tmp_path).start()
    try:
        async with Subscriber(mosquitto, [f"{BASE}/registers/POS1/#", f"{BASE}/bridge/state"],
                              client_id="register-POS1", persistent=True) as register:
            await register.wait_for(lambda t, p: t.endswith("/bridge/state")
                                    and p.get("state") == "online")
            await asyncio.sleep(0.5)
            await register.publish(REQUEST, responses.payment_request("POS1", "K9", POI, 77.0))
            await register.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "sent")
            daemon.kill()  # the shopper is still entering the PIN
            assert journal_rows(tmp_path, "K9") == [("awaiting_response", None, None)]
            offline = await register.wait_for(lambda t, p: t.endswith("/bridge/state")
                                              and p.get("state") == "offline")
            assert offline["state"] == "offline"  # the last will
            assert offline["client_id"] == "poi-bridge-test" and offline["pid"] > 0
            daemon.start()
            answer = await register.wait_for(outcome_for("K9"), timeout=30)
            assert (answer["bridge"]["outcome"], answer["bridge"]["source"]) == (
                "approved", "status-poll")
            await asyncio.sleep(1.0)  # anything doubled would arrive now
            finals = [p for p in register.on(f"{BASE}/registers/POS1/response")
                      if p["bridge"]["transaction"]["service_id"] == "K9"]
            assert len(finals) == 1
        assert journal_rows(tmp_path, "K9") == [("final", "approved", "status-poll")]
    finally:
        daemon.kill()
        ledger = sim.stop()
    assert list(ledger) == ["POS1/K9"]
    entry = ledger["POS1/K9"]
    assert {k: entry[k] for k in ("category", "outcome", "charged", "answered")} == {
        "category": "Payment", "outcome": "approve", "charged": True, "answered": False}
    assert entry["received"] == 1  # asked about after the restart, never sent again
    assert "recovering 1 open transaction" in daemon.log()


async def test_nothing_lost_across_broker_outage_and_daemon_kill(tmp_path, mosquitto):
    """Payments in flight; the broker is stopped for longer than the payment time-out and
    restarted; the daemon is SIGKILLed and restarted. A register with a persistent session
    gets every result, and the retained transaction topics hold the right outcomes."""
    sim = Simulator(tmp_path, "--delay", "0.3", "--never-answer")
    daemon = Daemon(write_config(tmp_path, mosquitto, sim.link,
                                 terminal={"payment_timeout": 1.0}), tmp_path).start()
    register = Subscriber(mosquitto, [f"{BASE}/registers/POS1/response"],
                          client_id="register-POS1", persistent=True)
    try:
        await register.connect()
        await bridge_online(mosquitto)
        await register.publish(REQUEST, responses.payment_request("POS1", "N1", POI, 1.0))
        # N1 is on the terminal; its response will be "lost" (a fixed 0.4 s here was too
        # short on a loaded machine: the broker went before the request had reached the
        # daemon, and N1 ended rejected)
        assert await asyncio.to_thread(
            wait_until, lambda: [row[0] for row in journal_rows(tmp_path, "N1")]
            in (["awaiting_response"], ["polling"]), 30)
        await register.disconnect()
        mosquitto.stop()          # outage longer than the payment time-out
        await asyncio.sleep(2.5)
        daemon.kill()             # and the daemon dies while results wait in its outbox
        daemon.start()
        await asyncio.sleep(1.0)
        mosquitto.start()
        await register.connect()  # same client id, persistent session: queued results arrive
        answer = await register.wait_for(outcome_for("N1"), timeout=30)
        assert answer["bridge"]["outcome"] == "approved"
        async with Subscriber(mosquitto, [f"{BASE}/transactions/POS1/+"],
                              client_id="downloader") as downloader:
            retained = await downloader.wait_for(
                lambda t, p: t.endswith("/N1") and p.get("state") == "final", timeout=10)
            assert retained["bridge"]["outcome"] == "approved"
        await register.publish(REQUEST, responses.payment_request("POS1", "N2", POI, 2.0))
        assert (await register.wait_for(outcome_for("N2"), timeout=30))["bridge"][
            "outcome"] == "approved"
    finally:
        await register.disconnect()
        daemon.kill()
        ledger = sim.stop()
    charged = [k for k, v in ledger.items() if v["charged"]]
    assert sorted(charged) == ["POS1/N1", "POS1/N2"]


async def test_sigterm_drains_cleanly_and_says_offline(tmp_path, mosquitto):
    sim = Simulator(tmp_path, "--delay", "5")
    daemon = Daemon(write_config(tmp_path, mosquitto, sim.link,
                                 terminal={"payment_timeout": 30.0}), tmp_path).start()
    try:
        async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
            await sub.wait_for(lambda t, p: t.endswith("/bridge/state") and p["state"] == "online")
            await sub.wait_for(lambda t, p: t.endswith(f"/terminals/{POI}/state")
                               and p["state"] == "online")
            await sub.publish(REQUEST, responses.payment_request("POS1", "D1", POI, 1.0))
            await sub.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "sent")
            assert await asyncio.to_thread(daemon.terminate) == 0
            await sub.wait_for(lambda t, p: t.endswith("/bridge/state") and p["state"] == "offline")
        assert journal_rows(tmp_path, "D1") == [("awaiting_response", None, None)]
    finally:
        daemon.kill()
        sim.stop()


async def test_sighup_is_answered_in_the_log_and_the_daemon_goes_on(tmp_path, mosquitto):
    """SIGHUP's default action ended the daemon silently (a technician's `kill -HUP` to
    reload the configuration). It says the configuration is read only at start, and
    carries on: still online, still stopping cleanly on SIGTERM."""
    import signal

    sim = Simulator(tmp_path)
    daemon = Daemon(write_config(tmp_path, mosquitto, sim.link), tmp_path).start()
    try:
        async with Subscriber(mosquitto, [f"{BASE}/bridge/state"]) as sub:
            await sub.wait_for(lambda t, p: p["state"] == "online")
            daemon.process.send_signal(signal.SIGHUP)
            assert await asyncio.to_thread(
                wait_until, lambda: "systemctl restart poi-bridge" in daemon.log(), 10), \
                daemon.log()
            assert daemon.process.poll() is None, daemon.log()
            assert "configuration is read only at start" in daemon.log()
            assert await asyncio.to_thread(daemon.terminate) == 0
            await sub.wait_for(lambda t, p: p["state"] == "offline")
    finally:
        daemon.kill()
        sim.stop()


async def test_the_journal_is_readable_by_the_daemons_user_only_whatever_the_umask(
        tmp_path, mosquitto):
    """The journal holds what terminals answer (card data, masked or not, receipts). The
    unit sets UMask=0077; run by hand under the usual umask 022 the files were 0644,
    readable by every user of the box."""
    import os
    import stat

    old = os.umask(0o022)  # what the daemon inherits, as from a technician's shell
    try:
        sim = Simulator(tmp_path)
        daemon = Daemon(write_config(tmp_path, mosquitto, sim.link), tmp_path).start()
    finally:
        os.umask(old)
    try:
        async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
            await sub.wait_for(lambda t, p: t.endswith(f"/terminals/{POI}/state")
                               and p["state"] == "online")
            await sub.publish(REQUEST, responses.payment_request("POS1", "U1", POI, 1.0))
            await sub.wait_for(outcome_for("U1", "approved"))
        files = sorted(tmp_path.glob("journal.sqlite3*"))
        assert {f.name for f in files} >= {"journal.sqlite3", "journal.sqlite3-wal"}, files
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path, oct(path.stat().st_mode))
    finally:
        daemon.kill()
        sim.stop()


async def test_the_daemon_logs_what_check_config_would_say_about_the_box(tmp_path, mosquitto):
    """A second terminal configured on the first one's device: check-config says so, and
    now so does the log of a daemon started without running it first."""
    sim = Simulator(tmp_path)
    second = (f'[[terminals]]\npoi_id = "P400-1"\n[terminals.link]\nkind = "serial"\n'
              f'device = "{sim.link}"')
    daemon = Daemon(write_config(tmp_path, mosquitto, sim.link, extra=second), tmp_path).start()
    try:
        async with Subscriber(mosquitto, [f"{BASE}/bridge/state"]) as sub:
            await sub.wait_for(lambda t, p: p["state"] == "online")
        log = daemon.log_path.read_text()
        assert "ERROR" in log and "terminals[1].link.device:" in log, log
    finally:
        daemon.kill()
        sim.stop()


async def test_a_configuration_an_earlier_bridge_ran_still_runs_after_an_upgrade(
        tmp_path, mosquitto):
    """max_frame_size below 32 KiB and a reconcile_deadline shorter than a payment takes to
    become unresolved, refused since 2026-12-02, were run by earlier bridges: after a
    package upgrade the daemon exited 2 at start and the store's tills had no bridge. It
    runs with the floors and says so in its log; check-config still refuses the file."""
    sim = Simulator(tmp_path)
    config = write_config(tmp_path, mosquitto, sim.link, terminal={"reconcile_deadline": 1.0})
    config.write_text(config.read_text() + "max_frame_size = 16384\n")  # under [terminals.framer]
    assert cli("check-config", str(config)).returncode == 2
    daemon = Daemon(config, tmp_path).start()
    try:
        async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
            await sub.wait_for(lambda t, p: t.endswith(f"/terminals/{POI}/state")
                               and p["state"] == "online")
            await sub.publish(REQUEST, responses.payment_request("POS1", "F1", POI, 1.0))
            await sub.wait_for(outcome_for("F1", "approved"))
        log = daemon.log()
        warned = [line for line in log.splitlines() if "WARNING" in line and "runs with" in line]
        assert any(f"terminals[0].framer.max_frame_size ({POI})" in line
                   and "max_frame_size = 32768" in line for line in warned), log
        # in_progress_limit's default 600 (longer than write_config's 2 + 2 x 1) + 0.5
        assert any(f"terminals[0] ({POI})" in line and "reconcile_deadline = 600.5" in line
                   and "check-config refuses" in line for line in warned), log
    finally:
        daemon.kill()
        sim.stop()


async def test_corrupt_journal_stops_the_daemon_with_a_clear_error(tmp_path, mosquitto):
    (tmp_path / "journal.sqlite3").write_bytes(b"garbage" * 1000)
    daemon = Daemon(write_config(tmp_path, mosquitto, "/dev/null"), tmp_path).start()
    assert daemon.process.wait(timeout=15) == 3
    assert "will not overwrite it" in daemon.log()
    assert (tmp_path / "journal.sqlite3").read_bytes().startswith(b"garbage")


async def test_a_damaged_row_stops_the_daemon_with_the_journals_words_not_a_traceback(
        tmp_path, mosquitto):
    """SQLite checks no cell's contents: a byte damaged inside a row's JSON passes the
    quick_check at open, and reading the row at recovery raised JSONDecodeError, out of
    the daemon as a traceback (exit 1) at every start (the journal audit). It is the
    journal's unreadable-or-corrupt stop: exit 3, the row named, the file left as it is."""
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.save(Transaction(
        sale_id="POS1", service_id="D1", poi_id=POI, category="Payment",
        request=responses.payment_request("POS1", "D1", POI, 5.0), digest="d",
        created_at=1.0, updated_at=1.0, state=TxState.AWAITING_RESPONSE, sent_at=1.0))
    journal.close()
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    with db:
        db.execute("UPDATE transactions SET request = '{\"SaleToPOIRequest\": {\x01' "
                   "WHERE service_id = 'D1'")
    db.close()
    daemon = Daemon(write_config(tmp_path, mosquitto, "/dev/null"), tmp_path).start()
    assert daemon.process.wait(timeout=15) == 3
    log = daemon.log()
    assert "Traceback" not in log, log
    assert "transaction POS1/D1" in log and "is unreadable or corrupt" in log, log
    assert journal_rows(tmp_path, "D1") == [("awaiting_response", None, None)]


async def test_technician_status_and_resync_commands_against_a_running_daemon(tmp_path, mosquitto):
    sim = Simulator(tmp_path, "--delay", "0.1")
    config = write_config(tmp_path, mosquitto, sim.link)
    daemon = Daemon(config, tmp_path).start()
    try:
        async with Subscriber(mosquitto, [f"{BASE}/registers/POS1/response"],
                              client_id="register-POS1") as register:
            await bridge_online(mosquitto)
            await register.publish(REQUEST, responses.payment_request("POS1", "T7", POI, 4.0))
            await register.wait_for(outcome_for("T7", "approved"))

            status = await asyncio.to_thread(cli, "status", "--config", str(config), "--json")
            assert status.returncode == 0, status.stderr
            report = json.loads(status.stdout)
            assert report["daemon"] == "running"
            assert report["terminals"][0]["poi_id"] == POI
            assert report["terminals"][0]["state"] == "online"
            assert report["counts"] == {"in_flight": 0, "unresolved": 0, "undelivered": 0}

            text = await asyncio.to_thread(cli, "status", "--config", str(config))
            assert f"terminal {POI}: online" in text.stdout.decode()

            resync = await asyncio.to_thread(cli, "resync", "POS1", "T7", "--config",
                                             str(config), "--wait", "20")
            assert resync.returncode == 0, resync.stderr
            assert "POS1/T7: approved (source status-poll)" in resync.stdout.decode()
            unknown = await asyncio.to_thread(cli, "resync", "POS1", "nope", "--config",
                                              str(config))
            assert unknown.returncode == 2 and b"no transaction POS1/nope" in unknown.stderr
    finally:
        daemon.kill()
        sim.stop()
    # With the daemon gone, status still reads the journal and says so.
    offline = cli("status", "--config", str(config), "--json")
    assert json.loads(offline.stdout)["daemon"] == "not reachable over MQTT"


async def test_a_journal_that_cannot_be_written_stops_the_daemon_and_nothing_is_lost(
        tmp_path, mosquitto):
    """The disk fills up under the journal, played by a file-size limit on the daemon
    process. The daemon must not go on from decisions it could not record (a terminal's
    answer whose record was lost would still be ACKed by the next frame, and its result would
    reach no register): it stops with status 3 and says why. Restarted with room, every
    payment the terminal charged reaches the register with its outcome, and a result is
    repeated only as the same message, the one in flight when the daemon stopped."""
    # A journal of 1 MB that may grow by JOURNAL_ROOM: once the WAL cannot be copied into it
    # any more, the WAL is never started over and soon meets the limit too.
    path = tmp_path / "journal.sqlite3"
    filler = Journal(path)
    filler.mark_delivered(filler.enqueue([("old/result", b"x" * 1000, 1, False)] * 1000))
    filler.close()
    sim = Simulator(tmp_path, "--delay", "0.05")
    config = write_config(tmp_path, mosquitto, sim.link, terminal={"payment_timeout": 3.0})
    daemon = Daemon(config, tmp_path,
                    file_size_limit=path.stat().st_size + JOURNAL_ROOM).start()
    register = Subscriber(mosquitto, [f"{BASE}/registers/POS1/response", f"{BASE}/bridge/state"],
                          client_id="register-POS1", persistent=True)
    sent: list[str] = []
    try:
        await register.connect()
        await register.wait_for(lambda t, p: t.endswith("/bridge/state")
                                and p.get("state") == "online")
        while daemon.process.poll() is None and len(sent) < 60:
            service_id = f"F{len(sent)}"
            await register.publish(REQUEST, responses.payment_request("POS1", service_id, POI,
                                                                      1.0))
            sent.append(service_id)
            with contextlib.suppress(TimeoutError):
                await register.wait_for(outcome_for(service_id), timeout=2)
        assert await asyncio.to_thread(daemon.process.wait, 15) == 3, daemon.log()[-3000:]
        assert "stopping at once: the journal" in daemon.log()
        assert "cannot be written" in daemon.log()
        answered_before = [p["bridge"]["transaction"]["service_id"]
                           for p in register.on(f"{BASE}/registers/POS1/response")]
        assert len(set(answered_before)) >= 5, "the limit must be met after some payments"

        daemon = Daemon(config, tmp_path).start()  # room again
        for service_id in sent:  # "unresolved" may come first; the outcome follows it
            await register.wait_for(lambda t, p, s=service_id: outcome_for(s)(t, p)
                                    and p["bridge"]["outcome"] != "unresolved", timeout=30)
        await asyncio.sleep(1.0)  # anything doubled would arrive now
    finally:
        await register.disconnect()
        daemon.kill()
        ledger = sim.stop()
    results: dict[str, list[dict]] = {}
    for payload in register.on(f"{BASE}/registers/POS1/response"):
        if payload["bridge"]["outcome"] != "unresolved":
            results.setdefault(payload["bridge"]["transaction"]["service_id"], []).append(payload)
    assert set(results) == set(sent)
    # A result the broker acknowledged just before the stop, whose delivery mark could not be
    # written, goes out once more at the next start (the README's rule: a register may see a
    # message twice). It must be that same message again, never a second decision, and only
    # for what was in flight at the stop: payments here go one at a time.
    repeated = {s: p for s, p in results.items() if len(p) > 1}
    assert {s: p for s, p in repeated.items() if any(q != p[0] for q in p)} == {}, \
        "two different results for one payment"
    assert set(repeated) <= set(answered_before[-2:]), "results published again long after"
    assert all(len(p) == 2 for p in repeated.values()), "a result published more than twice"
    charged = {key.split("/")[1] for key, entry in ledger.items() if entry["charged"]}
    approved = {s for s, p in results.items() if p[0]["bridge"]["outcome"] == "approved"}
    assert approved == charged, "an approval without a charge, or a charge without a result"


async def test_no_room_at_start_leaves_the_journal_as_it_is(tmp_path, mosquitto):
    """The disk filled while the bridge was stopped: it stops with status 3 and says to make
    room. It must not call the journal corrupt, whose advice (move it aside, begin a new one)
    would orphan the payments the journal holds open."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.enqueue([("poi-bridge/registers/POS1/response", b"{}", 1, False)])  # owed
    journal.close()
    before = path.read_bytes()
    daemon = Daemon(write_config(tmp_path, mosquitto, "/dev/null"), tmp_path,
                    file_size_limit=1024).start()
    assert await asyncio.to_thread(daemon.process.wait, 15) == 3
    log = daemon.log()
    assert "cannot be used" in log and "df -h" in log, log[-2000:]
    assert "Move it aside" not in log
    assert path.read_bytes() == before


def test_a_journal_write_failing_at_start_up_is_a_clear_stop(tmp_path, monkeypatch, caplog):
    """Open transactions are taken up again before the daemon runs; if their first write
    fails (the disk filled meanwhile), the same advice and status, not a traceback."""
    from bridge import cli_daemon
    from bridge.daemon import app

    full = sqlite3.connect(":memory:")  # SQLite's own "database or disk is full"
    full.execute("CREATE TABLE t (x)")
    full.execute("PRAGMA max_page_count=2")
    try:
        full.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.OperationalError as exc:
        error = exc

    async def run_bridge(*args, **kwargs):
        raise error

    monkeypatch.setattr(app, "run_bridge", run_bridge)
    config = write_config(tmp_path, type("B", (), {"host": "127.0.0.1", "port": 1})(),
                          "/dev/null")
    monkeypatch.setattr(cli_daemon, "setup_logging", lambda level: None)
    args = type("A", (), {"config": str(config)})()
    old = os.umask(0o022)
    try:
        assert cli_daemon.run_daemon(args) == 3
    finally:
        os.umask(old)  # run_daemon sets the daemon's 077: not for the tests after this one
    assert "cannot be used (database or disk is full, SQLITE_FULL)" in caplog.text


def test_the_open_file_limit_is_raised_or_said_to_be_too_low(tmp_path):
    """With `ulimit -n 12` the daemon said READY and then failed everything with 'Too many
    open files', retried for ever. At start it now raises its soft limit to the hard one,
    and says so at once when even that is too low. (A process of its own: limits are per
    process, and a hard limit once lowered stays lowered.)"""
    import subprocess
    import sys

    script = textwrap.dedent("""
        import logging, resource, sys
        from bridge.cli_daemon import _raise_open_file_limit, open_files_needed
        from bridge.config import parse_config
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        config = parse_config({"terminals": [{"poi_id": "A-1", "link": {
            "kind": "tcp", "host": "h", "port": 1}}]})
        soft, hard = (int(x) for x in sys.argv[1:])
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        _raise_open_file_limit(config, logging.getLogger("t"))
        print("soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0], open_files_needed(config))
    """)
    for soft, hard in ((16, 4096), (12, 12)):
        out = subprocess.run([sys.executable, "-c", script, str(soft), str(hard)], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        if hard == 4096:
            assert "soft 4096" in out and "open files allowed" not in out, out
        else:
            assert "soft 12" in out, out
            assert "only 12 open files allowed" in out and "LimitNOFILE=" in out, out


def stopped_at_once(tmp_path, monkeypatch, caplog, exc: BaseException) -> tuple[str, list[str]]:
    """stop_at_once(exc) for a bridge of its journal path: its CRITICAL line and what it
    told systemd (os._exit raising SystemExit, checked to be the journal's status)."""
    import logging
    import types

    import pytest

    from bridge.daemon import app

    said: list[str] = []
    bridge = types.SimpleNamespace(
        config=types.SimpleNamespace(journal=tmp_path / "journal.sqlite3"),
        notifier=types.SimpleNamespace(stopping=said.append),
        gateway=types.SimpleNamespace(set_aside_handled=lambda: None))

    def exit_(status: int) -> None:
        raise SystemExit(status)

    monkeypatch.setattr(app.os, "_exit", exit_)
    monkeypatch.setattr(app.logging, "shutdown", lambda: None)
    with caplog.at_level(logging.CRITICAL), pytest.raises(SystemExit) as stopped:
        app.stop_at_once(bridge, exc)
    assert stopped.value.code == app.JOURNAL_EXIT_STATUS
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    return line, said


def test_a_step_that_failed_half_way_stops_with_words_of_its_own(tmp_path, monkeypatch,
                                                                 caplog):
    """A step that failed half-way for a reason of its own stopped the daemon with the disk
    failure's words ("cannot be written or read ... check the disk"): a technician looked at
    the wrong thing (found by a review). It says it is a fault of the bridge, to report."""
    from bridge.daemon.journal import StepFailed

    line, said = stopped_at_once(tmp_path, monkeypatch, caplog, StepFailed(
        "a step of terminal V400m-1 failed half-way: RuntimeError('x')"))
    assert "a step of terminal V400m-1 failed half-way" in line
    assert "fault of the bridge" in line and "report it" in line
    assert "cannot be written" not in line and "df -h" not in line
    assert said == ["internal error: a step of terminal V400m-1 failed half-way: "
                    "RuntimeError('x')"]


def test_a_journal_held_locked_by_another_program_is_not_called_a_disk_problem(
        tmp_path, monkeypatch, caplog):
    """Another program holding the journal's write lock past busy_timeout stopped the daemon
    with "Check the disk (df -h ...)": the technician looked at the disk, not at the sqlite3
    shell left in a transaction (the journal audit). The line says find it and end it."""
    journal = Journal(tmp_path / "journal.sqlite3")
    journal._db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(tmp_path / "journal.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # a technician's sqlite3 shell in a write transaction
    try:
        journal._db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        locked = exc
    finally:
        other.execute("ROLLBACK")
        other.close()
        journal.close()
    line, _ = stopped_at_once(tmp_path, monkeypatch, caplog, locked)
    assert "is locked by another process" in line and "fuser -v" in line, line
    assert "df -h" not in line and "stopping at once: the journal" in line, line


async def test_a_clean_stop_leaves_each_terminal_offline_in_its_retained_state(
        tmp_path, mosquitto):
    """A terminal's retained state said "online" after the bridge had stopped (only
    bridge/state went offline): a register showing "terminal ready" from it sent requests
    that waited in the broker (the MQTT contract review). A clean stop now sets each
    terminal's document offline; the next start makes it online again."""
    sim = Simulator(tmp_path)
    daemon = Daemon(write_config(tmp_path, mosquitto, sim.link), tmp_path).start()
    state_topic = f"{BASE}/terminals/{POI}/state"
    try:
        async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
            await sub.wait_for(lambda t, p: t == state_topic and p["state"] == "online")
            assert await asyncio.to_thread(daemon.terminate) == 0
            await sub.wait_for(lambda t, p: t.endswith("/bridge/state") and p["state"] == "offline")
        # what a register subscribing now is given: the retained documents
        async with Subscriber(mosquitto, [state_topic], client_id="late") as late:
            retained = await late.wait_for(lambda t, p: t == state_topic)
            assert retained["state"] == "offline", retained
            assert "the bridge stopped" in retained["detail"], retained
            assert retained["poi_id"] == POI and retained["active"] is None, retained
        daemon.start()
        async with Subscriber(mosquitto, [state_topic], client_id="after") as after:
            await after.wait_for(lambda t, p: p["state"] == "online")
        assert await asyncio.to_thread(daemon.terminate) == 0
    finally:
        daemon.kill()
        sim.stop()

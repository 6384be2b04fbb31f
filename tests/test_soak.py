"""The fault-injection soak (bench/soak.py), short, as part of the normal test suite.

Five simulated terminals, two registers paying continuously, and a seeded chaos loop (broker
kill -9 and restarts, daemon SIGKILL and SIGTERM, terminals unplugged and frozen, two
terminals' cables swapped (the daemon must follow them), registers going away), ending with
a fixed finale (bench/soak.py, Soak.finale): a terminal that hangs as a payment is sent to
it, then plays dead (muted: what it drops unread is in its ledger) as two more are, a Busy
refusal whose answer is lost, the daemon frozen while a payment it will refuse reaches it
and mosquitto killed -9 meanwhile, a SIGTERM of the daemon while the registers pay, and a
power blip (a terminal unplugged and the daemon restarted while it is away). Then
every payment is audited: the terminals' ledgers against what the registers were told
against the journal (and mosquitto's own log, to tell a request the broker lost in a kill -9
from one the bridge acknowledged and dropped); a payment charged by another terminal than
the one it was addressed to fails it too. `make soak` runs the long version.

Every link is encrypted (--keys shared: one key for all the terminals), so the chaos goes
through the encrypted paths too; a passphrase found in any file the run leaves (logs,
journal, broker files, ledgers, audit) fails it. Not yet --keys per-terminal, which would
also make the daemon ask swapped devices with the other terminals' keys: two of its first
four 100-s runs failed on the faults in tests/test_follow_keys_found.py (bench/HISTORY.md,
soak runs), fixed since (f5d9d8d) but not soaked with keys again. `make soak` runs without
keys unless told.

One soak run (about 80 s) is shared by the tests marked slow below; the audit itself
(bench/soak.py, audit) is also tested on constructed inputs, in a moment each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import soak as soak_module
from tests.broker import find_mosquitto

ROOT = Path(__file__).resolve().parents[1]
MONEY = ("lost", "doubled", "phantom", "wrong_terminal", "disputed", "crashed")


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    work = tmp_path_factory.mktemp("soak")
    audit = work / "audit.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "15", "--seed", "6",
         "--terminals", "5", "--registers", "2", "--chaos-interval", "1.5", "--settle", "40",
         "--stall", "15", "--keys", "shared", "--workdir", str(work / "run"),
         "--json", str(audit)],
        check=False, capture_output=True, text=True, timeout=400, cwd=ROOT)
    if not audit.exists():
        pytest.fail(f"the soak did not finish (exit {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(audit.read_text())
    result["exit"] = proc.returncode
    result["output"] = proc.stdout
    result["daemon_log"] = (work / "run" / "daemon.log").read_text(errors="replace")
    return result


def _problems(result: dict[str, Any], *kinds: str, tag: str | None = None) -> list[dict[str, Any]]:
    return [p for p in result["problems"] if p["kind"] in kinds
            and (tag is None or p.get("tag") == tag)]


def _text(problems: list[dict[str, Any]], result: dict[str, Any]) -> str:
    return "\n".join(p["text"] for p in problems) + "\n" + result["output"][-3000:]


@pytest.mark.slow
def test_soak_exits_0(soak: dict[str, Any]) -> None:
    """The soak's own verdict: exit status 0 only when the audit found nothing fatal (tagged
    problems included) and the daemon stopped cleanly at the end."""
    assert soak["exit"] == 0, soak["output"][-6000:]
    assert soak["daemon_exit"] == 0, soak["daemon_stop"]


@pytest.mark.slow
def test_soak_ran_payments_through_every_kind_of_fault(soak: dict[str, Any]) -> None:
    counts = soak["counts"]
    assert counts["payments"] >= 20, soak["output"]
    assert counts.get("charged", 0) >= 5, soak["output"]
    assert counts.get("approved", 0) >= 5 and counts.get("declined", 0) >= 1, soak["output"]
    for kind in ("broker_kill9", "daemon_kill9", "daemon_sigterm", "terminal_unplug",
                 "terminal_stall", "power_blip", "terminal_swap"):
        assert soak["chaos"].get(kind, 0) >= 1, (kind, soak["chaos"])
    assert soak["daemon_starts"] >= 4
    # the daemon found the swapped terminals on each other's links and followed them
    assert soak["swaps"] >= 1 and soak["follows"] >= 1, (soak["swaps"], soak["follows"])
    assert soak["keys"] == "shared"


@pytest.mark.slow
def test_soak_leaves_no_key_material_in_its_files(soak: dict[str, Any]) -> None:
    assert soak["counts"].get("leaked", 0) == 0, _text(_problems(soak, "leaked"), soak)
    assert "KEY MATERIAL LEAKED" in soak["output"]  # the check ran


@pytest.mark.slow
def test_soak_no_payment_lost_doubled_phantom_disputed_or_stuck(soak: dict[str, Any]) -> None:
    """The invariants: every charge reported as approved, nothing reported approved that was
    not charged, nothing charged twice, register and journal agree, every request answered,
    nothing left half-way in the journal. Tagged or not: a tag names the known bridge bug a
    problem looks like (the tests below say which one failed), it excuses nothing."""
    bad = _problems(soak, *MONEY, "stuck")
    assert not bad, _text(bad, soak)


@pytest.mark.slow
def test_soak_report_says_what_settling_saw(soak: dict[str, Any]) -> None:
    """The report names what was left when settling ended (it used to say only "the bridge
    had not settled", even when the bridge had: a result the broker lost in a kill -9 left
    its register waiting until the resync)."""
    state = soak["settle_state"]
    assert "open in the journal" in state and "undelivered" in state, state
    if not soak["settled"]:
        assert f"note: settling gave up with {state}" in soak["output"], soak["output"][-3000:]


@pytest.mark.slow
def test_soak_every_terminal_comes_back_after_a_restart_while_unplugged(
        soak: dict[str, Any]) -> None:
    """A serial terminal on a node udev does not manage (a pty), absent when the daemon
    starts, is opened when it appears (fixed in e7fc2da; found by the power blip). With udev
    netlink the daemon's hotplug path is what is tested; without it (containers) the worker's
    own reopen backoff is, and a terminal left offline is as much a failure there."""
    offline = [p for p in _problems(soak, "stuck") if p.get("tag") == "left_offline"
               or "offline for the bridge" in p["text"]]
    assert not offline, _text(offline, soak)
    assert soak["terminals_offline_at_end"] == []
    assert soak["offline_episodes"] == []


@pytest.mark.slow
def test_soak_every_request_sent_during_a_restart_is_answered(soak: dict[str, Any]) -> None:
    """Requests published while the daemon drains or restarts are answered: refused while
    draining, or queued by the broker for the persistent session until the next start."""
    dropped = [p for p in _problems(soak, "lost") if p.get("tag") in (
        "dropped_while_draining", "unsubscribed_while_draining")]
    assert not dropped, _text(dropped, soak)


@pytest.mark.slow
def test_soak_no_charge_reported_declined_after_a_busy_answer(soak: dict[str, Any]) -> None:
    """A terminal slow to ACK reads the request twice and answers the second copy Busy with
    the payment's own ServiceID: that is not 'declined' (fixed in e7fc2da)."""
    lost = _problems(soak, "lost", tag="busy_taken_for_declined")
    assert not lost, _text(lost, soak)


@pytest.mark.slow
def test_soak_a_busy_refusal_learnt_by_status_poll_is_reported(soak: dict[str, Any]) -> None:
    """A status answer saying the original ended Busy is final, not a reason to poll forever
    (fixed in e7fc2da)."""
    stuck = _problems(soak, "stuck", tag="busy_status_polled_forever")
    assert not stuck, _text(stuck, soak)


@pytest.mark.slow
def test_soak_a_refused_request_delivered_again_is_not_started(soak: dict[str, Any]) -> None:
    """A refused request that the broker delivers again (QoS 1: at least once) is refused
    again, never started (fixed in e7fc2da)."""
    redelivered = _problems(soak, *MONEY, tag="redelivered_refusal")
    assert not redelivered, _text(redelivered, soak)


# --- the audit on constructed inputs ------------------------------------------------------------

POI = "V400m-100000"


def fake_soak(tmp_path: Path, *payments: Any, terminals: tuple[str, ...] = (POI,),
              daemon_started: tuple[float, ...] = (0.0,)) -> Any:
    """What audit() reads of a Soak, for payments made by one register (TILL1)."""
    register = SimpleNamespace(sale_id="TILL1", client_id="soak-register-TILL1",
                               payments={p.service_id: p for p in payments}, aborts={},
                               stray=[], connects=1,
                               request_topic=lambda poi: f"poi-bridge/terminals/{poi}/request")
    terms = [SimpleNamespace(poi_id=poi, unplugs=[], unplugged_at=lambda moment: False,
                             plugged_at=Path(f"/dev/poi/{poi}"), dropped_unread=[])
             for poi in terminals]
    return SimpleNamespace(
        broker=SimpleNamespace(log_path=tmp_path / "no-broker-log"), registers=[register],
        terminals=terms, offline_episodes=[], broker_kills=[], daemon_terms=[], crashes=[],
        # duration 0: the floor (approvals per register and second) asks nothing of these
        # few payments; the tests of the floor give a duration
        events=[], swaps=[], args=SimpleNamespace(seed=0, duration=0.0), settle_state="settled",
        daemon=SimpleNamespace(starts=len(daemon_started), started_at=list(daemon_started)),
        daemon_freezes=[], workdir=tmp_path)


def paid(service_id: str, outcome: str | None = "approved", source: str = "terminal",
         error: str | None = None) -> Any:
    """A payment the register made, and the final outcome it was told."""
    payment = soak_module.Payment("TILL1", service_id, POI, "approve", 10.0, time.time())
    if outcome is not None:
        payment.outcomes.append((time.time(), outcome, source))
        payment.first_final, payment.first_final_at = outcome, time.time()
        payment.first_final_source, payment.first_final_error = source, error
        # an approved result carries the amount (AuthorizedAmount), as the bridge hands it
        payment.first_final_amount = payment.amount if outcome == "approved" else None
    return payment


def row(service_id: str, outcome: str = "approved", state: str = "final",
        detail: str = "") -> dict[str, Any]:
    return {"sale_id": "TILL1", "service_id": service_id, "poi_id": POI,
            "category": "Payment", "state": state, "outcome": outcome, "source": "terminal",
            "detail": detail, "created_at": 0.0, "updated_at": 0.0, "polls_sent": 0,
            "reconcile_attempts": 0, "next_poll_at": None}


def ledger_entry(*receipts: tuple[Any, ...], charged: bool = True,
                 amount: float = 10.0, status_not_found: tuple[float, ...] = ()
                 ) -> dict[str, Any]:
    """A simulated terminal's ledger entry (SimulatedTerminal.summary) of a payment of
    `amount` (what paid() asks), processed unless no receipt says "processed". A receipt:
    (at, retransmission, answer[, gap, acked_before]): a copy's gap since the copy before,
    and how long the terminal's ACK of that copy had been out (None: not acknowledged)."""
    processed = any(answer == "processed" for _, _, answer, *_ in receipts)
    outcome = ("approve" if charged else "decline") if processed else None
    return {"category": "Payment", "outcome": outcome, "charged": charged and processed,
            "answered": processed, "amount": amount, "currency": "EUR",
            "authorised": (amount if charged else 0) if processed else None,
            "received": len(receipts),
            "receipts": [_receipt(*receipt) for receipt in receipts],
            "status_not_found": list(status_not_found)}


def _receipt(at: float, again: bool, answer: str, gap: float | None = None,
             acked_before: float | None = None) -> dict[str, Any]:
    return {"at": at, "retransmission": again, "answer": answer, "gap": gap,
            "acked_before": acked_before}


def run_audit(soak: Any, ledgers: dict[str, Any], rows: list[dict[str, Any]], *,
              daemon_exit: int | None = 0, states: dict[str, Any] | None = None,
              healthy_for: float = 60.0, **extra: Any) -> dict[str, Any]:
    states = {t.poi_id: {"poi_id": t.poi_id, "state": "online"}
              for t in soak.terminals} if states is None else states
    return soak_module.audit(soak, ledgers, rows, [{"pending_total": 0}], settled=True,
                             daemon_exit=daemon_exit, terminal_states=states,
                             healthy_for=healthy_for, **extra)


def kinds(result: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(p["kind"], p.get("tag")) for p in result["problems"]]


def test_audit_a_clean_payment_passes(tmp_path):
    soak = fake_soak(tmp_path, paid("P1"))
    result = run_audit(soak, {POI: {"TILL1/P1": ledger_entry((1.0, False, "processed"))}},
                       [row("P1")])
    assert result["problems"] == []


def test_audit_flags_a_payment_the_bridge_wrote_to_its_terminal_twice(tmp_path):
    """The terminal received P1 a second time, not as a link-level retransmission of the same
    frame: the bridge sent the payment twice. The terminal ignored the repeat, a real one
    might not: doubled, although only one charge is in the ledger."""
    soak = fake_soak(tmp_path, paid("P1"))
    ledger = {"TILL1/P1": ledger_entry((1.0, False, "processed"), (3.5, False, "duplicate"))}
    result = run_audit(soak, {POI: ledger}, [row("P1")])
    assert kinds(result) == [("doubled", None)], result["problems"]
    assert "reached terminal V400m-100000 2 times" in result["problems"][0]["text"]
    assert soak_module.report(result) is False


OTHER = "V400m-100001"


def test_audit_flags_a_payment_charged_by_another_terminal_than_the_one_addressed(tmp_path):
    """After swapped cables, P1 addressed to V400m-100000 was charged by V400m-100001's
    simulator (each simulator keeps its own ledger wherever its cable is): the bridge sent
    it to the wrong device. Not phantom (something charged it), not doubled (once): a
    wrong terminal, which fails the soak."""
    soak = fake_soak(tmp_path, paid("P1"), terminals=(POI, OTHER))
    ledgers = {POI: {}, OTHER: {"TILL1/P1": ledger_entry((1.0, False, "processed"))}}
    result = run_audit(soak, ledgers, [row("P1")])
    assert kinds(result) == [("wrong_terminal", None)], result["problems"]
    assert result["counts"]["wrong_terminal"] == 1
    assert f"charged by terminal {OTHER}" in result["problems"][0]["text"]
    assert soak_module.report(result) is False
    # the daemon said it sent without an answer to its identity check: named, still fatal
    log = "2026-11-30 19:32:42,477 WARNING poi_bridge.terminal: terminal V400m-100000: no " \
        "answer to the identity check within 1 s; sending what waits without knowing which " \
        "terminal is on the link\n"
    unchecked = soak_module.identity_check_timeouts(log)
    assert list(unchecked) == [POI]
    at = unchecked[POI][0]
    ledgers = {POI: {}, OTHER: {"TILL1/P1": ledger_entry((at + 0.01, False, "processed"))}}
    result = run_audit(soak, ledgers, [row("P1")], unchecked=unchecked)
    assert kinds(result) == [("wrong_terminal", "sent_without_identity")], result["problems"]
    assert soak_module.report(result) is False


def test_audit_flags_a_payment_that_reached_another_terminal_uncharged(tmp_path):
    """Declined by the wrong terminal, charged nowhere: the request still went to a
    device it was not addressed to."""
    soak = fake_soak(tmp_path, paid("P1", "declined"), terminals=(POI, OTHER))
    ledgers = {POI: {}, OTHER: {"TILL1/P1": ledger_entry((1.0, False, "processed"),
                                                         charged=False)}}
    result = run_audit(soak, ledgers, [row("P1", "declined")])
    assert kinds(result) == [("wrong_terminal", None)], result["problems"]
    assert f"received, not charged by terminal {OTHER}" in result["problems"][0]["text"]


def test_audit_flags_swapped_terminals_the_bridge_did_not_follow(tmp_path):
    """The simulators' cables were swapped; the bridge still has each terminal on its
    configured link (whose device says it is the other one): stuck. Followed (each on the
    link its simulator is plugged in at, identity confirmed), nothing to say."""
    soak = fake_soak(tmp_path, terminals=(POI, OTHER))
    first, second = soak.terminals
    first.plugged_at, second.plugged_at = Path("/dev/poi/b"), Path("/dev/poi/a")

    def states(link_first: str, link_second: str, identity: str) -> dict[str, Any]:
        return {t.poi_id: {"poi_id": t.poi_id, "state": "online", "identity": identity,
                           "link": f"{link} at 115200 8N1"}
                for t, link in ((first, link_first), (second, link_second))}

    result = run_audit(soak, {POI: {}, OTHER: {}}, [],
                       states=states("/dev/poi/a", "/dev/poi/b", "mismatch: x"))
    assert kinds(result) == [("stuck", None), ("stuck", None)], result["problems"]
    assert "swapped cables not followed" in result["problems"][0]["text"]
    result = run_audit(soak, {POI: {}, OTHER: {}}, [],
                       states=states("/dev/poi/b", "/dev/poi/a", "confirmed"))
    assert result["problems"] == []


def _wait_for(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_swapped_simulators_are_at_each_others_ports_and_back(tmp_path):
    """The soak's terminal_swap with real simulators (bench/soak_terminal.py): each comes
    back behind the other's configured link, the soak's bookkeeping says so, and a second
    swap puts them back; one of the two frozen (stall) while the other is already plugged
    in at its port does not take that port away from it."""
    import random

    terminals = [soak_module.Terminal(i, tmp_path, 1, random.Random(i)) for i in range(2)]
    a, b = terminals

    def on(terminal: Any, path: Path) -> bool:
        """Whether `terminal`'s simulator is the one behind `path` now: the symlink leads
        to the pseudo-terminal it opened last (numbers are reused)."""
        said = re.findall(rf"simulated terminal {terminal.poi_id} on (\S+)",
                          (terminal.dir / "simulator.log").read_text())
        try:
            return bool(said) and os.readlink(path) == said[-1]
        except OSError:
            return False

    try:
        for terminal in terminals:
            terminal.start()
        for terminal in terminals:
            terminal.wait_started()
        assert on(a, a.configured_link) and on(b, b.configured_link)
        soak_module.swap_cables(a, b, 1.0)
        assert (a.plugged_at, b.plugged_at) == (b.configured_link, a.configured_link)
        _wait_for(lambda: on(a, b.configured_link) and on(b, a.configured_link),
                  "the simulators did not come back at each other's ports")
        b.control("stall 1.5")  # b reads its move 1.5 s late; a is back at b's port by then
        soak_module.swap_cables(a, b, 0.3)
        assert (a.plugged_at, b.plugged_at) == (a.configured_link, b.configured_link)
        _wait_for(lambda: on(a, a.configured_link) and on(b, b.configured_link),
                  "the simulators did not go back to their own ports")
        time.sleep(0.5)  # nothing comes undone afterwards
        assert on(a, a.configured_link) and on(b, b.configured_link)
        assert a.unplugs and b.unplugs
    finally:
        for terminal in terminals:
            terminal.stop()


def test_audit_accepts_link_level_retransmissions(tmp_path):
    """Copies the bridge's framer sent again for want of an ACK (a stalled terminal reads
    them all, before it could acknowledge the first) are the link layer's business, not a
    second payment."""
    soak = fake_soak(tmp_path, paid("P1"))
    ledger = {"TILL1/P1": ledger_entry((1.0, False, "processed"), (1.0, True, "busy", 0.0),
                                       (1.1, True, "busy", 0.1, 0.05))}
    result = run_audit(soak, {POI: ledger}, [row("P1")])
    assert result["problems"] == []
    assert result["counts"]["retransmitted_requests"] == 1


def test_audit_takes_a_copy_for_the_link_layers_only_before_the_terminal_acknowledged_it(
        tmp_path):
    """Review of 265750f: any byte-identical copy within 5.5 s of the first (retry span plus
    the longest daemon freeze plus a second) passed as the framer's. The bridge's framer
    sends a frame again only for want of an ACK: a copy after the terminal's ACK of the one
    before had time to reach it, or later than the retry span (2 x 0.5 s) and a second
    after it, is the payment sent twice (a bridge re-sending at payment_timeout, 2 s,
    instead of polling), unless one of the soak's own daemon freezes spans the gap."""
    cases = {  # receipt of the copy: (at, retransmission flag, answer, gap, acked_before)
        "P1": ((102.0, True, "duplicate", 2.0, 1.95), "doubled"),  # re-sent after the ACK
        "P2": ((100.6, True, "duplicate", 0.6, None), None),        # no ACK yet: the framer's
        "P3": ((100.5, True, "duplicate", 0.5, 0.02), None),        # crossed our ACK
        "P4": ((102.5, True, "duplicate", 2.5, None), "doubled"),   # beyond the retry span
        "P5": ((203.0, True, "duplicate", 3.0, 2.9), None),         # a daemon freeze spans it
        "P6": ((100.3, True, "duplicate"), "doubled"),              # no gap recorded: unproven
    }
    payments = [paid(sid) for sid in cases]
    soak = fake_soak(tmp_path, *payments)
    soak.daemon_freezes = [(200.2, 202.9)]  # (SIGSTOP, SIGCONT), wall clock
    ledger = {f"TILL1/{sid}": ledger_entry((copy[0] - copy[3] if len(copy) > 3 else 100.0,
                                            False, "processed"), copy)
              for sid, (copy, _) in cases.items()}
    result = run_audit(soak, {POI: ledger}, [row(sid) for sid in cases])
    assert sorted((p["kind"], p["key"]) for p in result["problems"]) == sorted(
        (kind, f"TILL1/{sid}") for sid, (_, kind) in cases.items() if kind), result["problems"]
    text = next(p["text"] for p in result["problems"] if p["key"] == "TILL1/P1")
    assert "acknowledged" in text, text
    assert soak_module.report(result) is False
    # without the freeze, P5 is a second request too
    soak.daemon_freezes = []
    result = run_audit(soak, {POI: ledger}, [row(sid) for sid in cases])
    assert ("doubled", "TILL1/P5") in [(p["kind"], p["key"]) for p in result["problems"]]


def test_a_daemon_freeze_is_recorded_as_it_happened(tmp_path):
    """The audit judges a late copy by the freezes the soak really made (SIGSTOP to
    SIGCONT, wall clock), not by a blanket allowance."""
    import asyncio
    import signal as signals

    args = soak_module.parse_args(["--terminals", "1", "--registers", "1",
                                   "--workdir", str(tmp_path)])
    soak = soak_module.Soak(args, tmp_path)
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        soak.daemon.process = stand_in
        before = time.time()
        asyncio.run(soak._daemon_freeze(0.3))
        after = time.time()
        [(stopped, resumed)] = soak.daemon_freezes
        assert before <= stopped < resumed <= after and resumed - stopped >= 0.3
        assert stand_in.poll() is None  # SIGCONT sent: still running
    finally:
        stand_in.send_signal(signals.SIGKILL)
        stand_in.wait()


def test_audit_flags_a_final_outcome_the_journal_has_no_row_for(tmp_path):
    """The register was told approved (or refused Busy by the terminal's session, which is
    journaled) and the journal has no row: register and journal disagree."""
    busy = "terminal V400m-100000 is busy with transaction TILL1/P0"
    soak = fake_soak(tmp_path, paid("P1"), paid("P2", "rejected", "bridge", busy))
    result = run_audit(soak, {POI: {"TILL1/P1": ledger_entry((1.0, False, "processed"))}}, [])
    assert kinds(result) == [("disputed", None), ("disputed", None)], result["problems"]
    assert "journal has no row" in result["problems"][0]["text"]
    assert soak_module.report(result) is False


SHUTTING_DOWN = ("the bridge is shutting down; nothing was sent to the terminal; retry with "
                 "a new ServiceID once it is back")


def test_audit_excuses_only_a_shutdown_refusal_and_only_while_the_daemon_drains(tmp_path):
    """The soak's registers send valid, fresh requests to configured terminals: of the
    refusals the intake answers without a journal row only "shutting down" can come their
    way, and only while a daemon drains after a SIGTERM of the soak's. Any other (stale,
    unknown terminal, ServiceID reused, invalid...) with no journal row, or a shutdown
    refusal the bridge stamped outside every SIGTERM, is register and journal disagreeing.
    (The audit used to excuse thirteen refusal texts, at any time.)"""
    others = [
        "unknown terminal V400m-9: not in this bridge's configuration",
        "invalid header: MessageHeader.ServiceID is missing",
        "request is 412 s old (SaleTransactionID.TimeStamp) by this box's clock (...)",
        ("ServiceID P5 was already used by SaleID TILL1 for a different request within 48 "
         "hours; use a new ServiceID"),
    ]
    payments = [paid(f"P{i}", "rejected", "bridge", error) for i, error in enumerate(others)]
    during, outside = (paid("D1", "rejected", "bridge", SHUTTING_DOWN),
                       paid("D2", "rejected", "bridge", SHUTTING_DOWN))
    soak = fake_soak(tmp_path, *payments, during, outside)
    sigterm = time.time()
    during.first_final_stamp = sigterm + 0.3  # the bridge's bridge.at, while it drained
    outside.first_final_stamp = sigterm + 30
    soak.daemon_terms = [(sigterm, sigterm + 1.5)]
    result = run_audit(soak, {POI: {}}, [])
    assert sorted(p["key"] for p in result["problems"]) == sorted(
        [f"TILL1/P{i}" for i in range(len(others))] + ["TILL1/D2"]), result["problems"]
    assert {p["kind"] for p in result["problems"]} == {"disputed"}
    assert soak_module.report(result) is False
    # the same words from elsewhere than the bridge's refusal are no excuse either
    odd = paid("P9", "declined", "terminal", SHUTTING_DOWN)
    odd.first_final_stamp = sigterm + 0.3
    soak = fake_soak(tmp_path, odd)
    soak.daemon_terms = [(sigterm, sigterm + 1.5)]
    assert kinds(run_audit(soak, {POI: {}}, [])) == [("disputed", None)]


def test_the_register_keeps_the_bridges_stamp_and_the_approved_amount(tmp_path):
    """What the audit compares comes from the register's document as the bridge builds it
    (bridge/daemon/registers.py, result_payload): bridge.at and the AuthorizedAmount."""
    import random

    from bridge.daemon.registers import result_payload
    from bridge.protocol.actions import Deliver
    from bridge.simulator.responses import payment_request, payment_response

    soak = SimpleNamespace(terminals=[], args=SimpleNamespace(registers=1))
    register = soak_module.Register(soak, 0, random.Random(0))
    payment = soak_module.Payment("TILL1", "P1", POI, "approve_slow", 10.5, time.time())
    register.payments["P1"] = payment
    at = 1796220000.25
    response = payment_response(payment_request("TILL1", "P1", POI, 10.5), "approve", at)
    register._on_message(json.dumps(result_payload(
        Deliver("TILL1", "P1", POI, "Payment", "approved", "terminal", response), at)))
    assert payment.first_final == "approved"
    assert payment.first_final_amount == 10.5
    assert payment.first_final_stamp == pytest.approx(at, abs=0.002)
    assert soak_module.amount_problems(payment, {}) == []


@pytest.mark.parametrize("daemon_exit, stop", [(1, None), (-9, None),
                                               (None, "did not exit within 20 s of SIGTERM; killed")])
def test_audit_a_bad_final_daemon_exit_is_a_crash(tmp_path, daemon_exit, stop):
    soak = fake_soak(tmp_path, paid("P1"))
    result = run_audit(soak, {POI: {"TILL1/P1": ledger_entry((1.0, False, "processed"))}},
                       [row("P1")], daemon_exit=daemon_exit,
                       **({"daemon_stop": stop} if stop else {}))
    assert kinds(result) == [("crashed", None)], result["problems"]
    assert "final stop" in result["problems"][0]["text"]
    if stop:
        assert stop in result["problems"][0]["text"]


@pytest.mark.parametrize("code, fault", [(0, False), (-15, False), (None, True), (1, True),
                                         (4, True), (-9, True)])
def test_a_mid_run_sigterm_needing_a_kill_or_ending_in_error_is_a_crash(code, fault):
    problem = soak_module.sigterm_problem(code, 7)
    assert (problem is not None) == fault
    if fault:
        assert "start #7" in problem and ("killed" in problem if code is None
                                          else f"status {code}" in problem)


def test_audit_explains_a_payment_the_bridge_gave_up_on_by_design(tmp_path):
    """A NotFound after the terminal took another payment leaves the payment unresolved, no
    longer asked about (the terminal may remember only its latest): the bridge's designed last
    word, not a row it forgot. The 600-s soak with seed 8 failed 'stuck 2' on it. A row
    unresolved for any other reason, everything back, is still stuck."""
    given_up = paid("P1", outcome=None)
    given_up.outcomes.append((time.time(), "unresolved", "bridge"))
    waiting = paid("P2", outcome=None)
    waiting.outcomes.append((time.time(), "unresolved", "bridge"))
    soak = fake_soak(tmp_path, given_up, waiting)
    detail = ("outcome unknown: the terminal answers NotFound, but it has taken another "
              "Payment request since this one and may remember only its latest, so NotFound "
              "no longer means it never got this one")
    rows = [dict(row("P1", outcome=None, state="unresolved", detail=detail),
                 extra='{"abandoned": true}'),
            dict(row("P2", outcome=None, state="unresolved", detail="status poll not answered "
                     "in time"), extra="{}")]
    result = run_audit(soak, {POI: {}}, rows)
    assert [(p["kind"], p["key"]) for p in result["problems"]] == [("stuck", "TILL1/P2")]
    [note] = [e for e in result["explained"] if e.startswith("TILL1/P1")]
    assert "by design" in note and "never received" in note


def test_audit_explains_a_busy_record_of_a_payment_sent_twice(tmp_path):
    """A payment whose frame went out again (a NAK, or no ACK in time) and whose record on the
    terminal says Busy ends unresolved at in_progress_limit: Busy may answer the second copy
    while the first was charged. Seed 53 failed 'stuck 1' on it once a NAK counted too. The
    same text without the journal's mark of a second copy is still stuck."""
    copied, unmarked = paid("P1", outcome=None), paid("P2", outcome=None)
    for p in (copied, unmarked):
        p.outcomes.append((time.time(), "unresolved", "bridge"))
    soak = fake_soak(tmp_path, copied, unmarked)
    detail = ("still in progress on the terminal (the terminal's record says Busy, but it may "
              "have got this request twice (the link sent it again ...): the bridge keeps "
              "asking)")
    rows = [dict(row(sid, outcome=None, state="unresolved", detail=detail), extra=extra)
            for sid, extra in (("P1", '{"resent_after_silence": 1}'), ("P2", "{}"))]
    ledgers = {POI: {f"TILL1/{sid}": ledger_entry((1.0, False, "busy"), charged=False)
                     for sid in ("P1", "P2")}}
    result = run_audit(soak, ledgers, rows)
    assert [(p["kind"], p["key"]) for p in result["problems"]] == [("stuck", "TILL1/P2")]
    [note] = [e for e in result["explained"] if e.startswith("TILL1/P1")]
    assert "by design" in note and "Busy" in note


def test_audit_tags_only_the_offline_episode_not_what_is_stuck_on_that_terminal(tmp_path):
    """The known bug left_offline is the terminal kept offline after a restart while it was
    unplugged. A journal row stuck on that terminal is its own problem, untagged: the tag
    used to cover every stuck row on any terminal that was ever offline."""
    payment = paid("P1", outcome=None)
    soak = fake_soak(tmp_path, payment, daemon_started=(0.0, 50.0))
    soak.terminals[0].unplugged_at = lambda moment: moment == 50.0  # away at start #2
    soak.offline_episodes.append({"poi_id": POI, "wall": 60.0, "started_while_unplugged": True,
                                  "text": f"terminal {POI} offline for the bridge for 16 s"})
    states = {POI: {"poi_id": POI, "state": "offline", "detail": "not plugged in"}}
    stuck_row = row("P1", outcome=None, state="polling", detail="asking the terminal")
    result = run_audit(soak, {POI: {}}, [stuck_row], states=states)
    assert sorted(kinds(result), key=str) == [("stuck", "left_offline"),
                                              ("stuck", "left_offline"),
                                              ("stuck", None)], result["problems"]
    [row_problem] = [p for p in result["problems"] if p["key"] == "TILL1/P1"]
    assert "still polling" in row_problem["text"] and row_problem["tag"] is None
    assert soak_module.report(result) is False


def test_audit_does_not_tag_an_offline_terminal_the_daemon_did_not_start_without(tmp_path):
    """Offline although the daemon started with the terminal plugged in: not the known bug."""
    soak = fake_soak(tmp_path, paid("P1"))
    soak.offline_episodes.append({"poi_id": POI, "wall": 60.0, "started_while_unplugged": False,
                                  "text": f"terminal {POI} offline for the bridge for 16 s"})
    result = run_audit(soak, {POI: {"TILL1/P1": ledger_entry((1.0, False, "processed"))}},
                       [row("P1")], states={POI: {"poi_id": POI, "state": "offline"}})
    assert kinds(result) == [("stuck", None), ("stuck", None)], result["problems"]


def test_audit_names_a_shutdown_refusal_that_ran_after_all(tmp_path):
    """Refused while the daemon drained ('the bridge is shutting down', not journaled), then
    delivered again to the next daemon and charged: lost and disputed, and tagged with what
    it is, not with the session-refusal bug e7fc2da fixed."""
    error = "the bridge is shutting down; nothing was sent to the terminal, retry in a moment"
    payment = paid("P1", "rejected", "bridge", error)
    payment.outcomes.append((time.time(), "approved", "status-poll"))
    payment.conflicts.append("rejected then approved (status-poll)")
    result = run_audit(fake_soak(tmp_path, payment),
                       {POI: {"TILL1/P1": ledger_entry((1.0, False, "processed"))}},
                       [row("P1")])
    assert sorted(kinds(result)) == [("disputed", "redelivered_unjournaled_refusal"),
                                     ("disputed", "redelivered_unjournaled_refusal"),
                                     ("lost", "redelivered_unjournaled_refusal")]
    assert soak_module.report(result) is False


def test_the_broker_log_follows_requests_on_either_request_topic(tmp_path):
    """Half the soak's registers publish on .../request/{SaleID} (as RegisterClient does):
    the replay of mosquitto's log must take those as requests too, and not the commands."""
    from bench.soak import BrokerLog

    path = tmp_path / "mosquitto.log"
    path.write_text("\n".join([
        "100: poi-bridge-soak 1 poi-bridge/terminals/+/request",
        "101: Received PUBLISH from soak-register-TILL1 (d0, q1, r0, m1, "
        "'poi-bridge/terminals/V-1/request', ... (400 bytes))",
        "101: Received PUBLISH from soak-register-TILL2 (d0, q1, r0, m1, "
        "'poi-bridge/terminals/V-2/request/TILL2', ... (410 bytes))",
        "101: Received PUBLISH from operator (d0, q1, r0, m2, "
        "'poi-bridge/bridge/request/resync', ... (40 bytes))",
        "102: Sending PUBLISH to poi-bridge-soak (d0, q1, r0, m7, "
        "'poi-bridge/terminals/V-2/request/TILL2', ... (410 bytes))",
        "102: Received PUBACK from poi-bridge-soak (Mid: 7, RC:0)",
    ]) + "\n")
    log = BrokerLog(path)
    assert [(e["client"], e["what"]) for e in log.entries] == [
        ("soak-register-TILL1", "'poi-bridge/terminals/V-1/request', ... (400 bytes))"),
        ("soak-register-TILL2", "'poi-bridge/terminals/V-2/request/TILL2', ... (410 bytes))")]
    assert log.entries[1]["acked"] == 102 and log.entries[0]["acked"] is None


def test_the_broker_log_keeps_the_bridge_subscribed_through_its_wider_request_filter(tmp_path):
    """Since 8b5246a the bridge subscribes to .../request/# and then unsubscribes the
    narrower filters an older bridge took. The replay took that UNSUBSCRIBE as "no longer
    subscribed", and a request the broker lost in a kill -9 (explained) was reported LOST
    by "the bridge had unsubscribed" (make soak, seed 1, at 08c6a07)."""
    from bench.soak import BrokerLog

    path = tmp_path / "mosquitto.log"
    path.write_text("\n".join([
        "100: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
        "100: poi-bridge-soak poi-bridge/terminals/+/request",
        "100: poi-bridge-soak poi-bridge/terminals/+/request/+",
        "101: Received PUBLISH from soak-register-TILL1 (d0, q1, r0, m1, "
        "'poi-bridge/terminals/V-1/request', ... (400 bytes))",
        "102: mosquitto version 2.0.11 starting",
    ]) + "\n")
    (entry,) = BrokerLog(path).entries
    assert entry["bridge_subscribed"] is True
    assert entry["dropped"] == 102  # lost by the broker's restart, not routed to nobody
    path.write_text("\n".join([
        "100: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
        "100: poi-bridge-soak poi-bridge/terminals/+/request/#",
        "101: Received PUBLISH from soak-register-TILL1 (d0, q1, r0, m1, "
        "'poi-bridge/terminals/V-1/request', ... (400 bytes))",
    ]) + "\n")
    assert BrokerLog(path).entries[0]["bridge_subscribed"] is False


def test_the_broker_log_knows_a_restarted_broker_lost_the_bridge_session(tmp_path):
    """A broker killed -9 before it saved the bridge's subscriptions restarts without its
    session (CONNACK session-present 0) and routes a register's request to nobody until the
    bridge subscribes again. The replay kept the bridge subscribed through the restart, gave
    the next delivery of that topic to the lost request, and reported it LOST as "the bridge
    acknowledged it and never answered" (make soak, seed 62, at 9aeb54e)."""
    from bench.soak import BrokerLog

    request = ("Received PUBLISH from soak-register-TILL3 (d0, q1, r0, m2, "
               "'poi-bridge/terminals/V-2/request', ... (424 bytes))")
    lost = [
        "99: Saving in-memory database to /x/mosquitto.db.",
        "100: Sending CONNACK to poi-bridge-soak (0, 0)",
        "100: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
        "101: mosquitto version 2.0.11 starting",  # killed -9 before a save after 100
        f"102: {request}",
        "103: Sending CONNACK to poi-bridge-soak (0, 0)",
        "103: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
        f"104: {request.replace('m2,', 'm3,')}",
        "104: Sending PUBLISH to poi-bridge-soak (d0, q1, r0, m9, "
        "'poi-bridge/terminals/V-2/request', ... (424 bytes))",
        "104: Received PUBACK from poi-bridge-soak (Mid: 9, RC:0)",
    ]
    path = tmp_path / "mosquitto.log"
    path.write_text("\n".join(lost) + "\n")
    first, second = BrokerLog(path).entries
    assert first["bridge_subscribed"] is False and first["session_lost"] is True
    assert first["sent"] is None and first["acked"] is None  # not the next one's delivery
    assert second["sent"] == second["acked"] == 104 and second["session_lost"] is False
    # Saved after the bridge subscribed: the restarted broker keeps its session and queues
    kept = lost[:3] + ["100: Saving in-memory database to /x/mosquitto.db."] + lost[3:5]
    path.write_text("\n".join(kept) + "\n")
    (entry,) = BrokerLog(path).entries
    assert entry["bridge_subscribed"] is True and entry["session_lost"] is False
    # A CONNACK without the session, no restart logged: the broker holds no subscription of
    # the bridge's, but only a restart excuses that (review of 4174d77: this case was taken
    # for a lost session, and excused a bridge that dropped its own)
    path.write_text("\n".join(lost[1:3] + ["101: Sending CONNACK to poi-bridge-soak (0, 0)",
                                            f"102: {request}"]) + "\n")
    (entry,) = BrokerLog(path).entries
    assert entry["bridge_subscribed"] is False and entry["session_lost"] is False
    assert entry["reconnected_without_session"] is True
    # A refused CONNACK (session present 0, reason 5: not authorised) changes no session:
    # the broker keeps the bridge's subscriptions and queues for it
    path.write_text("\n".join(lost[1:3] + ["101: Sending CONNACK to poi-bridge-soak (0, 5)",
                                            f"102: {request}"]) + "\n")
    (entry,) = BrokerLog(path).entries
    assert entry["bridge_subscribed"] is True and entry["session_lost"] is False
    assert entry["reconnected_without_session"] is False


def _soak_with_broker_log(tmp_path, lines):
    """One payment (TILL1/P1, 424 bytes, never answered), and the broker's log around it:
    `lines(t)` for the second t it was sent at."""
    payment = paid("P1", outcome=None)
    payment.size = 424
    soak = fake_soak(tmp_path, payment)
    log = tmp_path / "mosquitto.log"
    log.write_text("\n".join(lines(int(payment.sent_at))) + "\n")
    soak.broker.log_path = log
    return soak


def _bridge_back_without_its_session(restart: bool):
    """The bridge subscribed (not saved since), then, with or without a broker restart
    between, a CONNACK without its session; P1 published before it subscribed again."""
    topic = f"'poi-bridge/terminals/{POI}/request', ... (424 bytes))"
    return lambda t: [
        f"{t - 20}: mosquitto version 2.0.11 starting",
        f"{t - 10}: Sending CONNACK to poi-bridge-soak (0, 0)",
        f"{t - 10}: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
        *([f"{t - 2}: mosquitto version 2.0.11 starting"] if restart else []),
        f"{t - 1}: Sending CONNACK to poi-bridge-soak (0, 0)",
        f"{t}: Received PUBLISH from soak-register-TILL1 (d0, q1, r0, m2, {topic}",
        f"{t + 1}: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
    ]


def test_audit_excuses_a_request_routed_to_nobody_only_after_a_broker_restart(tmp_path):
    """Review of 4174d77: the audit excused a request routed to nobody after any CONNACK
    with session-present 0, so a bridge that lost its own session (a clean start, a session
    expiry of 0: a fault of the bridge's), with no broker restart in the log, passed as "the
    broker restarted without the bridge's session". Only a logged restart excuses it; without
    one the request is LOST, saying that the bridge came back without its session."""
    restarted = run_audit(_soak_with_broker_log(tmp_path, _bridge_back_without_its_session(
        restart=True)), {POI: {}}, [])
    assert restarted["problems"] == []
    [note] = [e for e in restarted["explained"] if e.startswith("TILL1/P1")]
    assert "broker restarted without the bridge's session" in note
    not_restarted = run_audit(_soak_with_broker_log(tmp_path, _bridge_back_without_its_session(
        restart=False)), {POI: {}}, [])
    assert kinds(not_restarted) == [("lost", None)], not_restarted["problems"]
    assert not [e for e in not_restarted["explained"] if e.startswith("TILL1/P1")]
    text = not_restarted["problems"][0]["text"]
    assert "without its session" in text and "no restart" in text, text


# --- --keys: the soak's terminals and bridge with local encryption ---------------------------

def test_soak_keys_per_terminal_and_shared_are_named_by_file_only(tmp_path):
    """--keys per-terminal gives each terminal a key of its own, --keys shared one key for
    all; the passphrase is only in its file (mode 0600), the configuration and the
    simulator's command line name the file."""
    import random

    for mode, distinct in (("per-terminal", 3), ("shared", 1)):
        work = tmp_path / mode
        work.mkdir()
        terminals = [soak_module.Terminal(i, work, 1, random.Random(i)) for i in range(3)]
        keys = soak_module.make_keys(terminals, work, mode)
        assert len(keys) == distinct == len({t.key.identifier for t in terminals})
        for key in keys:
            assert key.passphrase_file.read_text() == key.passphrase + "\n"
            assert key.passphrase_file.stat().st_mode & 0o777 == 0o600
            said = " ".join(key.simulator_args() + key.config_lines())
            assert str(key.passphrase_file) in said and key.passphrase not in said
            assert key.passphrase not in repr(key)
    terminals = [soak_module.Terminal(0, tmp_path / "none", 1, random.Random(0))]
    assert soak_module.make_keys(terminals, tmp_path / "none", "none") == []
    assert terminals[0].key is None


def test_soak_finds_a_passphrase_written_anywhere_in_its_workdir(tmp_path):
    import random

    terminals = [soak_module.Terminal(i, tmp_path, 1, random.Random(i)) for i in range(2)]
    keys = soak_module.make_keys(terminals, tmp_path, "per-terminal")
    (tmp_path / "daemon.log").write_text("2026-11-30 INFO bridge: all well\n")
    assert soak_module.leaked_keys(tmp_path, keys) == []  # its own files are not leaks
    (terminals[1].dir / "simulator.log").write_text(f"debug: key {keys[1].passphrase}\n")
    leaks = soak_module.leaked_keys(tmp_path, keys)
    assert leaks == [f"terminal1/simulator.log holds the passphrase of {keys[1].identifier}"]
    assert keys[1].passphrase not in leaks[0]


def test_soak_terminal_with_a_key_answers_only_what_its_key_reads(tmp_path):
    """bench/soak_terminal.py takes the key the soak gives it: a request in clear gets the
    plain crypto error a real terminal answers; one encrypted with its key gets an encrypted
    answer that the key reads (so the soak's bridge and terminals really encrypt)."""
    import random
    import select
    import tty

    from bridge.protocol import crypto
    from bridge.protocol.framing import FrameReceived, make_framer
    from bridge.simulator import responses

    terminal = soak_module.Terminal(0, tmp_path, 1, random.Random(0))
    terminal.garbage_rate = terminal.corrupt_rate = 0.0
    (key,) = soak_module.make_keys([terminal], tmp_path, "per-terminal")
    nexo = crypto.NexoKey(key.identifier, 1, key.passphrase)
    framer = make_framer("stx-etx-lrc")
    terminal.start()
    fd = -1
    try:
        terminal.wait_started()
        fd = os.open(terminal.configured_link, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)

        def ask(document: dict[str, Any]) -> dict[str, Any]:
            framer.send_frame(json.dumps(document).encode(), time.monotonic())
            os.write(fd, framer.data_to_send())
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if select.select([fd], [], [], 0.2)[0]:
                    for event in framer.receive_data(os.read(fd, 4096), time.monotonic()):
                        if isinstance(event, FrameReceived):
                            os.write(fd, framer.data_to_send())  # the ACK
                            return json.loads(event.payload)
                os.write(fd, framer.data_to_send())  # ACKs, if the frame was not the answer
            raise AssertionError("the simulated terminal did not answer")

        clear = responses.payment_request("TILL1", "K1", terminal.poi_id, 10.0)
        assert "crypto error" in json.dumps(ask(clear))
        answer = ask(crypto.encrypt_message(
            responses.payment_request("TILL1", "K2", terminal.poi_id, 10.0), nexo))
        assert "NexoBlob" in json.dumps(answer), answer
        read = crypto.decrypt_message(answer, nexo)
        assert read["SaleToPOIResponse"]["MessageHeader"]["ServiceID"] == "K2"
        # --keys rotation's terminal_rekey: the device takes up another key while it runs
        (tmp_path / "next").mkdir()
        other = soak_module.make_keys([terminal], tmp_path / "next", "per-terminal")[0]
        terminal.control(f"rekey {key.identifier} 2 {other.passphrase_file}")
        newer = crypto.NexoKey(key.identifier, 2, other.passphrase)
        assert "crypto error" in json.dumps(ask(crypto.encrypt_message(
            responses.payment_request("TILL1", "K3", terminal.poi_id, 10.0), nexo)))
        answer = ask(crypto.encrypt_message(
            responses.payment_request("TILL1", "K4", terminal.poi_id, 10.0), newer))
        read = crypto.decrypt_message(answer, newer)
        assert read["SaleToPOIResponse"]["MessageHeader"]["ServiceID"] == "K4"
    finally:
        if fd >= 0:
            os.close(fd)
        terminal.stop()


def test_soak_keys_rotation_gives_each_terminal_two_versions_configured_both_ways(tmp_path):
    """--keys rotation: each device holds version 1 of its own key and takes up version 2
    at a terminal_rekey event; the configuration holds both, half of the terminals with the
    new one as `key`, half with it as `previous_key` (set ahead)."""
    import random

    terminals = [soak_module.Terminal(i, tmp_path, 1, random.Random(i)) for i in range(2)]
    keys = soak_module.make_keys(terminals, tmp_path, "rotation")
    assert len(keys) == 4 and len({key.passphrase for key in keys}) == 4
    for terminal in terminals:
        assert (terminal.key.version, terminal.rekey_to.version) == (1, 2)
        assert terminal.key.identifier == terminal.rekey_to.identifier
        assert "--key-version 1" in " ".join(terminal.key.simulator_args())
    lines = [[line for key, table in zip(t.configured_keys, ("key", "previous_key"))
              for line in key.config_lines(table)] for t in terminals]
    assert lines[0][0] == lines[1][0] == "[terminals.key]" and "version = 2" == lines[0][2]
    assert lines[0][4] == "[terminals.previous_key]" and "version = 1" == lines[0][6]
    assert "version = 1" == lines[1][2] and "version = 2" == lines[1][6]


MIDSAVE_DB = "/tmp/x/mosquitto.db"
MIDSAVE_TOPIC = f"'poi-bridge/terminals/{POI}/request', ... (424 bytes))"


def _bridge_connects_first(at: int) -> list[str]:
    """The bridge's first connection to a broker (no session yet), and its subscription."""
    return [
        f"{at}: New client connected from 127.0.0.1:39637 as poi-bridge-soak (p2, c0, k30).",
        f"{at}: Sending CONNACK to poi-bridge-soak (0, 0)",
        f"{at}: Received SUBSCRIBE from poi-bridge-soak",
        f"{at}: \tpoi-bridge/terminals/+/request/# (QoS 1)",
        f"{at}: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
        f"{at}: Sending SUBACK to poi-bridge-soak",
    ]


def _killed_during_the_save(t: int) -> list[str]:
    return [
        f"{t - 12}: mosquitto version 2.0.11 starting",
        f"{t - 4}: Saving in-memory database to {MIDSAVE_DB}.",
        *_bridge_connects_first(t - 3),
        # announced, then killed -9 while writing: the file on disk is the one of t - 4
        f"{t - 2}: Saving in-memory database to {MIDSAVE_DB}.",
        f"{t - 1}: mosquitto version 2.0.11 starting",
        f"{t}: New client connected from 127.0.0.1:57449 as poi-bridge-soak (p2, c0, k30).",
        f"{t}: Sending CONNACK to poi-bridge-soak (0, 0)",
        f"{t}: Received PUBLISH from soak-register-TILL1 (d0, q1, r0, m1, {MIDSAVE_TOPIC}",
        f"{t}: Sending PUBACK to soak-register-TILL1 (m1, rc0)",
        f"{t + 1}: Received SUBSCRIBE from poi-bridge-soak",
        f"{t + 1}: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
    ]


def test_the_first_connack_after_a_restart_is_the_restarts_doing(tmp_path):
    """mosquitto 2.0.11 logs "Saving in-memory database" before it writes the file, so a
    kill -9 during the write leaves the older file (without a session the bridge had just
    made) while the replay holds it saved. The restarted broker answered the bridge's
    reconnect "(0, 0)", and the audit blamed the bridge, saying its log had no restart
    (review rv16; the lines are a real broker's, killed -9 right after the save line)."""
    result = run_audit(_soak_with_broker_log(tmp_path, _killed_during_the_save), {POI: {}}, [])
    # README: "never reached the bridge" where mosquitto's log shows that restart
    assert kinds(result) == [], [p["text"] for p in result["problems"]]
    [note] = [e for e in result["explained"] if e.startswith("TILL1/P1")]
    assert "restarted" in note


def _published_before_the_bridge_came_back(t: int) -> list[str]:
    """As above, but the register is back before the bridge (still in its reconnect
    backoff): the request comes between the broker's start and the bridge's CONNACK."""
    before = [line for line in _killed_during_the_save(t) if not line.startswith(f"{t}: ")
              and not line.startswith(f"{t + 1}: ")]
    return before + [
        f"{t}: Received PUBLISH from soak-register-TILL1 (d0, q1, r0, m1, {MIDSAVE_TOPIC}",
        f"{t}: Sending PUBACK to soak-register-TILL1 (m1, rc0)",
        f"{t + 1}: New client connected from 127.0.0.1:57449 as poi-bridge-soak (p2, c0, k30).",
        f"{t + 1}: Sending CONNACK to poi-bridge-soak (0, 0)",
        f"{t + 1}: Received SUBSCRIBE from poi-bridge-soak",
        f"{t + 1}: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
    ]


def _queued_in_the_save_the_kill_cut_short(t: int) -> list[str]:
    """The request is queued for the bridge (not yet sent: the bridge is busy), the broker
    announces a save, is killed -9 while writing it, and comes back without the session."""
    return [
        f"{t - 12}: mosquitto version 2.0.11 starting",
        *_bridge_connects_first(t - 3),
        f"{t}: Received PUBLISH from soak-register-TILL1 (d0, q1, r0, m1, {MIDSAVE_TOPIC}",
        f"{t}: Sending PUBACK to soak-register-TILL1 (m1, rc0)",
        f"{t + 1}: Saving in-memory database to {MIDSAVE_DB}.",  # killed -9 while writing
        f"{t + 2}: mosquitto version 2.0.11 starting",
        f"{t + 3}: New client connected from 127.0.0.1:57449 as poi-bridge-soak (p2, c0, k30).",
        f"{t + 3}: Sending CONNACK to poi-bridge-soak (0, 0)",
        f"{t + 3}: Received SUBSCRIBE from poi-bridge-soak",
        f"{t + 3}: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
    ]


def test_what_a_broker_restarted_without_the_bridges_session_held_is_not_blamed_on_the_bridge(
        tmp_path):
    """The CONNACK "(0, 0)" after a restart proves the broker had no session of the bridge's,
    so nothing was queued for it: neither a request taken after the broker started and
    before the bridge came back (the replay held the bridge subscribed, from the save line
    the kill cut short), nor one queued before that save. Both were called LOST ("never
    answered"), review rv17; both never reached the bridge."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    routed = _soak_with_broker_log(tmp_path / "a", _published_before_the_bridge_came_back)
    result = run_audit(routed, {POI: {}}, [])
    assert kinds(result) == [], [p["text"] for p in result["problems"]]
    [note] = [e for e in result["explained"] if e.startswith("TILL1/P1")]
    assert "restarted without the bridge's session" in note
    lost_save = _soak_with_broker_log(tmp_path / "b", _queued_in_the_save_the_kill_cut_short)
    lost_save.broker_kills = [lost_save.registers[0].payments["P1"].sent_at + 1.5]
    result = run_audit(lost_save, {POI: {}}, [])
    assert kinds(result) == [], [p["text"] for p in result["problems"]]
    [note] = [e for e in result["explained"] if e.startswith("TILL1/P1")]
    assert "killed -9" in note


# --- the audit's holes of 2026-12-02, each shown caught ----------------------------------------

GIVEN_UP = ("outcome unknown: the terminal answers NotFound, but it has taken another Payment "
            "request since this one and may remember only its latest, so NotFound no longer "
            "means it never got this one")
BUSY_COPY = ("still in progress on the terminal (the terminal's record says Busy, but it may "
             "have got this request twice (the link sent it again ...): the bridge keeps "
             "asking)")


def _unresolved(service_id: str, detail: str = "status poll not answered in time",
                extra: str = "{}") -> tuple[Any, dict[str, Any]]:
    """A payment the register was told `unresolved` about, and its journal row."""
    payment = paid(service_id, outcome=None)
    payment.outcomes.append((time.time(), "unresolved", "bridge"))
    return payment, dict(row(service_id, outcome=None, state="unresolved", detail=detail),
                         extra=extra)


def test_audit_a_charged_payment_the_register_knows_only_as_unresolved_is_lost(tmp_path):
    """The terminal charged it and the register was told only "unresolved, check": the
    result never reached it. The bridge's excuses (NotFound after another payment; a Busy
    record of a copy) used to pass it as explained, ignoring the ledger's charge. Lost,
    unless the terminal answered the bridge NotFound about it after it had charged it (it
    forgot it: the bridge could not learn it): then explained, under a count of its own that
    the report prints loudly. A NotFound from before the charge (P3: asked before the
    payment arrived) excuses nothing: the terminal could have told a later poll the result.
    Review of 265750f: this test had P3's NotFound before its charge, and passed it."""
    (p1, r1), (p2, r2), (p3, r3), (p4, r4) = (
        _unresolved("P1", GIVEN_UP, '{"abandoned": true}'),
        _unresolved("P2", BUSY_COPY, '{"resent_after_silence": 1}'),
        _unresolved("P3", GIVEN_UP, '{"abandoned": true}'),
        _unresolved("P4", GIVEN_UP, '{"abandoned": true}'))
    ledgers = {POI: {"TILL1/P1": ledger_entry((1.0, False, "processed")),
                     "TILL1/P2": ledger_entry((1.0, False, "processed")),
                     "TILL1/P3": ledger_entry((1.0, False, "processed"),
                                              status_not_found=(0.5,)),
                     "TILL1/P4": ledger_entry((1.0, False, "processed"),
                                              status_not_found=(0.5, 2.0))}}
    result = run_audit(fake_soak(tmp_path, p1, p2, p3, p4), ledgers, [r1, r2, r3, r4])
    assert sorted((p["kind"], p["key"]) for p in result["problems"]) == [
        ("lost", "TILL1/P1"), ("lost", "TILL1/P2"), ("lost", "TILL1/P3")], result["problems"]
    p3_text = next(p["text"] for p in result["problems"] if p["key"] == "TILL1/P3")
    assert "before" in p3_text and "NotFound" in p3_text, p3_text
    assert result["counts"]["charged_unresolved"] == 4
    assert result["counts"]["charged_unlearnable"] == 1
    [note] = [e for e in result["explained"] if e.startswith("TILL1/P4")]
    assert "CHARGED" in note and "NotFound" in note
    assert soak_module.report(result) is False
    # P4 alone passes, and says so in its own count and a loud line
    result = run_audit(fake_soak(tmp_path, p4), {POI: {"TILL1/P4": ledgers[POI]["TILL1/P4"]}},
                       [r4])
    assert result["problems"] == []
    assert soak_module.report(result) is True


def test_audit_a_notfound_before_the_charge_excuses_nothing(tmp_path):
    """Review of 265750f (F1), with a real SimulatedTerminal: it never forgets a ledger
    entry, so every NotFound it records about a charged key came before the charge, and any
    later poll would have been told the result. The register knows P3 only as unresolved:
    lost, whatever NotFound is on record."""
    from bridge.protocol import builders
    from bridge.simulator.responses import payment_request
    from bridge.simulator.terminal import Behaviour, Scenario, SimulatedTerminal

    terminal = SimulatedTerminal(Scenario(poi_id=POI, default=Behaviour(delay=0.2)))

    def poll(service_id: str, at: float) -> str:
        return json.dumps(terminal.handle(builders.status_request(
            sale_id="TILL1", service_id=service_id, poi_id=POI, original_service_id="P3",
            original_category="Payment"), at).answers[0].document)

    assert "NotFound" in poll("S1", 100.0)  # asked before it arrived
    terminal.handle(payment_request("TILL1", "P2", POI, 10.0), 100.5)  # another payment
    terminal.handle(payment_request("TILL1", "P3", POI, 10.0), 101.0)  # P3 charged
    later = poll("S2", 110.0)
    assert "Success" in later and "NotFound" not in later  # learnable at any time now
    p3, r3 = _unresolved("P3", GIVEN_UP, '{"abandoned": true}')
    ledgers = {POI: terminal.summary()}
    assert ledgers[POI]["TILL1/P3"]["charged"]
    assert ledgers[POI]["TILL1/P3"]["status_not_found"] == [100.0]
    result = run_audit(fake_soak(tmp_path, paid("P2"), p3), ledgers, [row("P2"), r3])
    assert kinds(result) == [("lost", None)], result["problems"]
    assert result["problems"][0]["key"] == "TILL1/P3"
    assert result["counts"].get("charged_unlearnable", 0) == 0
    assert soak_module.report(result) is False


def test_report_prints_a_charged_payment_it_explains(tmp_path, capsys):
    payment, journal_row = _unresolved("P3", GIVEN_UP, '{"abandoned": true}')
    ledger = {POI: {"TILL1/P3": ledger_entry((1.0, False, "processed"), status_not_found=(2.0,))}}
    assert soak_module.report(run_audit(fake_soak(tmp_path, payment), ledger, [journal_row]))
    out = capsys.readouterr().out
    assert re.search(r"of them charged\s+1\n\s+\.\.\. terminal said NotFound\s+1\n", out), out
    assert "!!! 1 payment(s) CHARGED that the register knows only as unresolved" in out


def test_audit_unresolved_with_too_little_health_is_incomplete_not_a_pass(tmp_path):
    """An unresolved payment (nothing excuses it) when settling had less than 15 s with
    everything back passed silently. It is now 'audit incomplete', which fails the run;
    charged or not. With 15 s or more it is stuck (or lost, if charged), as before."""
    (p1, r1), (p2, r2) = _unresolved("P1"), _unresolved("P2")
    ledgers = {POI: {"TILL1/P2": ledger_entry((1.0, False, "processed"))}}
    soak = fake_soak(tmp_path, p1, p2)
    result = run_audit(soak, ledgers, [r1, r2], healthy_for=10.0)
    assert sorted((p["kind"], p["key"]) for p in result["problems"]) == [
        ("incomplete", "TILL1/P1"), ("incomplete", "TILL1/P2")], result["problems"]
    assert "only 10 s" in result["problems"][0]["text"]
    assert soak_module.report(result) is False
    result = run_audit(soak, ledgers, [r1, r2], healthy_for=15.0)
    assert sorted((p["kind"], p["key"]) for p in result["problems"]) == [
        ("lost", "TILL1/P2"), ("stuck", "TILL1/P1")], result["problems"]


def test_audit_sees_requests_a_simulator_only_answered_busy(tmp_path):
    """The ledgers as real simulated terminals write them (SimulatedTerminal.summary): a
    payment for V400m-100000 that reached V400m-100001's device while it was taking another
    payment (answered Busy, nothing charged) is a WRONG TERMINAL; a payment that reached its
    terminal twice, both times answered Busy, is DOUBLED. Both left no trace in the ledgers
    before: a simulator recorded only the requests it processed."""
    from bridge.simulator.responses import payment_request
    from bridge.simulator.terminal import Behaviour, Scenario, SimulatedTerminal

    ours, theirs = (SimulatedTerminal(Scenario(poi_id=poi, default=Behaviour(delay=5.0)))
                    for poi in (POI, OTHER))
    theirs.handle(payment_request("TILL1", "P0", OTHER, 10.0), 100.0)  # takes P0
    theirs.handle(payment_request("TILL1", "P1", POI, 10.0), 101.0)  # wrong device: Busy
    ours.handle(payment_request("TILL1", "P3", POI, 10.0), 100.0)  # takes P3
    ours.handle(payment_request("TILL1", "P2", POI, 10.0), 101.0)  # Busy
    ours.handle(payment_request("TILL1", "P2", POI, 10.0), 103.0)  # Busy again: sent twice
    payments = [paid("P0"), paid("P1", "rejected"), paid("P2", "rejected"), paid("P3")]
    payments[0].poi_id = OTHER
    rows = [dict(row("P0"), poi_id=OTHER), row("P1", "rejected"), row("P2", "rejected"),
            row("P3")]
    result = run_audit(fake_soak(tmp_path, *payments, terminals=(POI, OTHER)),
                       {POI: ours.summary(), OTHER: theirs.summary()}, rows)
    assert sorted((p["kind"], p["key"]) for p in result["problems"]) == [
        ("doubled", "TILL1/P2"), ("wrong_terminal", "TILL1/P1")], result["problems"]
    wrong = next(p["text"] for p in result["problems"] if p["kind"] == "wrong_terminal")
    assert f"received, not charged by terminal {OTHER} (not processed: busy)" in wrong


def test_audit_compares_amounts(tmp_path):
    """The amount the terminal read and charged is the register's, and an approved result
    carries it (AuthorizedAmount): amounts were never compared."""
    cases = {
        "asked another amount": (paid("P1"), ledger_entry((1.0, False, "processed"),
                                                          amount=1.0)),
        "charged another amount": (paid("P2"), dict(ledger_entry((1.0, False, "processed")),
                                                    authorised=9.99)),
        "told another amount": (paid("P3"), ledger_entry((1.0, False, "processed"))),
        "told no amount": (paid("P4"), ledger_entry((1.0, False, "processed"))),
        "another currency": (paid("P5"), dict(ledger_entry((1.0, False, "processed")),
                                              currency="USD")),
    }
    cases["told another amount"][0].first_final_amount = 1.0
    cases["told no amount"][0].first_final_amount = None
    payments = [payment for payment, _ in cases.values()]
    ledgers = {POI: {payment.key: entry for payment, entry in cases.values()}}
    result = run_audit(fake_soak(tmp_path, *payments), ledgers,
                       [row(p.service_id) for p in payments])
    assert {(p["kind"], p["key"]) for p in result["problems"]} == {
        ("wrong_amount", p.key) for p in payments}, result["problems"]
    texts = "\n".join(p["text"] for p in result["problems"])
    for said in ("was asked for 1.0", "charged 9.99", "told approved (terminal) for 1.0",
                 "with no AuthorizedAmount", "currency 'USD'"):
        assert said in texts, (said, texts)
    assert soak_module.report(result) is False


def test_audit_has_a_floor_an_empty_or_all_refused_run_fails(tmp_path):
    """Nothing lost in a run that paid nothing, or in which everything was refused, proves
    nothing: fewer approvals than 0.05 per register and second of chaos fails the run, as
    does a terminal addressed 12 times or more that approved none."""
    def run(*payments: Any, duration: float = 100.0) -> dict[str, Any]:
        soak = fake_soak(tmp_path, *payments, terminals=(POI, OTHER))
        soak.args.duration = duration
        ledger = {POI: {}, OTHER: {}}
        for p in payments:
            if p.first_final == "approved":
                ledger[p.poi_id][p.key] = ledger_entry((1.0, False, "processed"))
        return run_audit(soak, ledger, [dict(row(p.service_id, p.first_final or "rejected"),
                                             poi_id=p.poi_id) for p in payments])

    empty = run()
    assert kinds(empty) == [("too_few", None)] and "no payment" in empty["problems"][0]["text"]
    assert soak_module.report(empty) is False
    refused = run(*(paid(f"P{i}", "declined") for i in range(8)))
    assert kinds(refused) == [("too_few", None)], refused["problems"]
    assert "only 0 payment(s) approved" in refused["problems"][0]["text"]
    enough = [paid(f"P{i}") for i in range(5)]  # ceil(0.05 x 1 register x 100 s)
    for p in enough:
        p.poi_id = OTHER
    assert run(*enough)["problems"] == []
    assert kinds(run(*enough[:4])) == [("too_few", None)]
    # V400m-100000 addressed 12 times, approved none: the bridge never used it
    unused = run(*enough, *(paid(f"Q{i}", "rejected") for i in range(12)))
    assert kinds(unused) == [("too_few", None)], unused["problems"]
    assert f"terminal {POI}: none of the 12 payments" in unused["problems"][0]["text"]
    assert soak_module.parse_args(["--duration", "10"]).duration == 10
    with pytest.raises(SystemExit):
        soak_module.parse_args(["--duration", "5"])


def test_the_finales_sigterm_is_judged(tmp_path):
    """Soak.sigterm_while_paying (`systemctl restart` during business) waited for the daemon
    to end and never looked at how: a daemon that exits with an error status on that SIGTERM
    passed. It is judged as every SIGTERM of the chaos is (sigterm_problem). A real process
    stands in for the daemon (exit status 3 on SIGTERM); the registers pay with no broker
    (their publishes are uncertain), the bridge's readiness is not waited for."""
    args = soak_module.parse_args(["--terminals", "2", "--registers", "1",
                                   "--workdir", str(tmp_path)])
    soak = soak_module.Soak(args, tmp_path)
    soak.daemon.command = [sys.executable, "-c", (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")]

    async def ready(timeout: float, *, terminals: bool = True) -> None:
        return None

    soak.wait_bridge_ready = ready
    soak.daemon.start()
    try:
        _wait_for(lambda: "ready" in soak.daemon.log_path.read_text(), "the stand-in did not "
                  "start")
        import asyncio

        asyncio.run(soak.sigterm_while_paying())
        assert soak.crashes == ["the daemon (start #1) exited with status 3 after SIGTERM"], \
            soak.crashes
        assert soak.daemon.starts == 2 and soak.daemon_terms
        assert sum(len(r.payments) for r in soak.registers) == 11
    finally:
        soak.daemon.kill()


def test_soak_finds_key_material_derived_from_a_passphrase(tmp_path):
    """KEY MATERIAL LEAKED looked only for the passphrase. The keys bridge/protocol/crypto.py
    derives from it (PBKDF2: HMAC key, AES key, IV) are as secret: found in hex, base64 or
    raw, in any file of the run, they fail it too."""
    import base64
    import random

    from bridge.protocol import crypto

    terminals = [soak_module.Terminal(0, tmp_path, 1, random.Random(0))]
    (key,) = soak_module.make_keys(terminals, tmp_path, "per-terminal")
    nexo = crypto.NexoKey(key.identifier, 1, key.passphrase)
    log = tmp_path / "daemon.log"
    log.write_text("2026-12-02 INFO all well\n")
    assert soak_module.leaked_keys(tmp_path, [key]) == []
    for leak, what in ((nexo._aes_key.hex(), "the derived AES key"),
                       (base64.b64encode(nexo._hmac_key).decode(), "the derived HMAC key"),
                       (nexo._iv.hex().upper(), "the derived IV")):
        log.write_text(f"2026-12-02 DEBUG cipher {leak}\n")
        assert soak_module.leaked_keys(tmp_path, [key]) == [
            f"daemon.log holds {what} of {key.identifier}"], leak
    (tmp_path / "journal.sqlite3").write_bytes(b"\x00" * 40 + nexo._aes_key + b"\x00" * 40)
    log.unlink()
    assert soak_module.leaked_keys(tmp_path, [key]) == [
        f"journal.sqlite3 holds the derived AES key of {key.identifier}"]


# --- the review of 265750f: what its audit still let through ------------------------------------

def test_audit_fails_on_any_money_request_no_register_sent(tmp_path):
    """Review of 265750f (F3): ledger entries no register sent were ignored unless they were
    charged Payments, and the payment type was never read. The bridge reversing a payment
    on its own (money back to the card while the register was told approved), a payment no
    register sent that was declined, a register's payment sent as a Refund, or a Reversal
    under a register's payment's IDs, each fails the run as unsolicited. The soak's
    registers send only Payments, PaymentType absent (Normal)."""
    from bridge.simulator.responses import payment_request
    from bridge.simulator.terminal import Behaviour, Scenario, SimulatedTerminal

    terminal = SimulatedTerminal(Scenario(poi_id=POI, default=Behaviour(delay=0.0),
                                          transactions=[Behaviour(amount=20.0,
                                                                  decision="decline")]))
    terminal.handle(payment_request("TILL1", "P1", POI, 10.0), 100.0)
    terminal.handle(payment_request("TILL1", "X1", POI, 10.0, category="Reversal"), 101.0)
    refund = payment_request("TILL1", "P2", POI, 10.0)
    refund["SaleToPOIRequest"]["PaymentRequest"]["PaymentData"] = {"PaymentType": "Refund"}
    terminal.handle(refund, 102.0)  # the register asked for a Normal payment
    terminal.handle(payment_request("TILL1", "Q8", POI, 10.0), 103.0)  # charged, nobody's
    terminal.handle(payment_request("TILL1", "Q9", POI, 20.0), 104.0)  # declined, nobody's
    terminal.handle(payment_request("TILL1", "P4", POI, 10.0, category="Reversal"), 105.0)
    normal = payment_request("TILL1", "P5", POI, 10.0)
    normal["SaleToPOIRequest"]["PaymentRequest"]["PaymentData"] = {"PaymentType": "Normal"}
    terminal.handle(normal, 106.0)
    ledgers = {POI: terminal.summary()}
    assert ledgers[POI]["TILL1/P2"]["payment_type"] == "Refund"
    assert ledgers[POI]["TILL1/P1"]["payment_type"] is None
    payments = [paid("P1"), paid("P2"), paid("P4", "declined"), paid("P5")]
    result = run_audit(fake_soak(tmp_path, *payments), ledgers,
                       [row("P1"), row("P2"), row("P4", "declined"), row("P5")])
    assert sorted((p["kind"], p["key"]) for p in result["problems"]) == [
        ("unsolicited", "TILL1/P2"), ("unsolicited", "TILL1/P4"), ("unsolicited", "TILL1/Q8"),
        ("unsolicited", "TILL1/Q9"), ("unsolicited", "TILL1/X1")], result["problems"]
    texts = {p["key"]: p["text"] for p in result["problems"]}
    assert "Refund" in texts["TILL1/P2"] and "Reversal" in texts["TILL1/X1"]
    assert "no register sent (CHARGED" in texts["TILL1/Q8"]
    assert "no register sent (not charged" in texts["TILL1/Q9"]
    assert soak_module.report(result) is False


def test_audit_has_a_floor_per_register(tmp_path):
    """Review of 265750f (F6): the floor was global and per terminal, so a register every
    payment of which was refused (every one of the plain-topic registers, say) passed when
    the others approved enough. A register with TERMINAL_FLOOR_PAYMENTS payments or more
    and no approval fails the run as too few."""
    soak = fake_soak(tmp_path, *[paid(f"P{i}") for i in range(20)])
    soak.args.duration = 100.0
    till2 = SimpleNamespace(**vars(soak.registers[0]))
    till2.sale_id, till2.client_id = "TILL2", "soak-register-TILL2"
    refused = {}
    for i in range(soak_module.TERMINAL_FLOOR_PAYMENTS):
        payment = paid(f"R{i}", "rejected")
        payment.sale_id = "TILL2"
        refused[payment.service_id] = payment
    till2.payments = refused
    soak.registers.append(till2)
    ledgers = {POI: {f"TILL1/P{i}": ledger_entry((1.0, False, "processed")) for i in range(20)}}
    rows = [row(f"P{i}") for i in range(20)] + [
        dict(row(p.service_id, "rejected"), sale_id="TILL2") for p in refused.values()]
    result = run_audit(soak, ledgers, rows)
    assert kinds(result) == [("too_few", None)], result["problems"]
    assert "register TILL2: none of the 12 payments" in result["problems"][0]["text"]
    assert soak_module.report(result) is False
    # one approval is enough; so is having fewer payments than the floor asks of a register
    first = refused["R0"]
    first.first_final, first.first_final_amount = "approved", first.amount
    ledgers[POI]["TILL2/R0"] = ledger_entry((1.0, False, "processed"))
    rows[20] = dict(row("R0"), sale_id="TILL2")
    assert run_audit(soak, ledgers, rows)["problems"] == []
    del till2.payments["R0"], ledgers[POI]["TILL2/R0"]
    del rows[20]
    assert run_audit(soak, ledgers, rows)["problems"] == []


def _redelivered_after_a_clean_restart() -> list[str]:
    """mosquitto's log of `bench/soak.py --seed 5 --terminals 1 --registers 20 --duration
    20` (workdir /tmp/soak.Nvsz/w3, lines 3401-3738 abridged): two registers' requests of
    the same topic and size are in flight to the bridge (m373, m374) when the broker is
    stopped cleanly; it saves, restarts, the bridge comes back with its session, and the
    broker sends both again with their own message IDs (d1)."""
    topic = "'poi-bridge/terminals/V400m-100000/request', ... (426 bytes))"
    return [
        "1796228390: poi-bridge-soak 1 poi-bridge/terminals/+/request/#",
        f"1796228402: Received PUBLISH from soak-register-TILL1 (d0, q1, r0, m21, {topic}",
        f"1796228402: Sending PUBLISH to poi-bridge-soak (d0, q1, r0, m373, {topic}",
        f"1796228402: Received PUBLISH from soak-register-TILL5 (d0, q1, r0, m21, {topic}",
        f"1796228402: Sending PUBLISH to poi-bridge-soak (d0, q1, r0, m374, {topic}",
        "1796228402: mosquitto version 2.0.11 terminating",
        "1796228402: Saving in-memory database to /tmp/soak.Nvsz/w3/mosquitto//mosquitto.db.",
        "1796228407: mosquitto version 2.0.11 starting",
        "1796228408: New client connected from 127.0.0.1:34247 as poi-bridge-soak (p2, c0, k5).",
        "1796228408: Sending CONNACK to poi-bridge-soak (1, 0)",
        f"1796228408: Sending PUBLISH to poi-bridge-soak (d1, q1, r0, m373, {topic}",
        f"1796228408: Sending PUBLISH to poi-bridge-soak (d1, q1, r0, m374, {topic}",
        "1796228408: Received PUBACK from poi-bridge-soak (Mid: 373, RC:0)",
        "1796228408: Received PUBACK from poi-bridge-soak (Mid: 374, RC:0)",
    ]


def test_the_broker_log_gives_each_redelivery_to_its_own_request(tmp_path):
    """The replay gave a redelivery (d1) to the oldest request of its topic and size sent
    and not acknowledged, whatever its message ID: both redeliveries went to TILL1's
    request, and the second PUBACK crashed the audit (list.remove: x not in list), so
    the run ended with no verdict, no banner and no audit.json. A redelivery keeps its
    message ID: it goes to the request that ID was sent for."""
    path = tmp_path / "mosquitto.log"
    path.write_text("\n".join(_redelivered_after_a_clean_restart()) + "\n")
    till1, till5 = soak_module.BrokerLog(path).entries
    assert (till1["client"], till5["client"]) == ("soak-register-TILL1", "soak-register-TILL5")
    for entry in (till1, till5):
        assert entry["saved"] and entry["dropped"] is None, entry
        assert entry["sent"] == 1796228402 and entry["acked"] == 1796228408, entry


def test_a_crash_of_the_audit_itself_fails_the_run_loudly(tmp_path, monkeypatch, capsys):
    """An exception inside the audit ended the soak with a bare traceback: no verdict, no
    banner, no audit.json. It ends it with a banner of its own, an audit.json that says so,
    the workdir kept, and exit status 1. The soak's processes are not started here: the
    run hands the real audit a journal row it cannot read."""
    work = tmp_path / "run"

    async def run(self: Any) -> dict[str, Any]:
        return soak_module.judged(self, {}, [{"sale_id": "TILL1"}], [{"pending_total": 0}],
                                  settled=True, daemon_exit=0, terminal_states={},
                                  healthy_for=60.0)

    monkeypatch.setattr(soak_module.Soak, "run", run)
    code = soak_module.main(["--terminals", "1", "--registers", "1", "--workdir", str(work)])
    out = capsys.readouterr().out
    assert code == 1
    assert "SOAK FAILED: the audit itself crashed" in out, out
    assert "Traceback" in out and "KeyError" in out, out
    result = json.loads((work / "audit.json").read_text())
    assert "KeyError" in result["audit_crashed"]
    assert work.is_dir()


async def test_a_payment_written_again_after_the_terminals_ack_is_doubled(tmp_path):
    """Review of 265750f (F4), on a real pseudo-terminal with the soak's settings: the
    terminal ACKs the request and gives no answer in time (late_response, 2.4 s); a bridge
    that re-sends the payment at payment_timeout (2 s) instead of polling writes the same
    bytes again. Flagged by the wire layer as a possible retransmission (byte for byte,
    within its window), it passed the audit; with --keys none nothing else sees it. The
    terminal had acknowledged the copy before: doubled."""
    import asyncio

    from bridge.simulator.responses import payment_request
    from bridge.simulator.server import SimulatorServer
    from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario
    from tests.test_simulator_link import _frame, _read_until, wait_for

    link = tmp_path / "terminal"
    amount, _, behaviour = soak_module.KINDS["late_response"]
    server = SimulatorServer(Scenario(
        poi_id=POI, transactions=[Behaviour(amount=amount, **behaviour)],
        link=LinkBehaviour(retransmit_window=soak_module.RETRANSMIT_WINDOW)))
    await server.start_pty(link)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    os.set_blocking(fd, False)
    try:
        frame = _frame(json.dumps(payment_request("TILL1", "P1", POI, amount),
                                  separators=(",", ":")).encode())
        os.write(fd, frame)
        await _read_until(fd, None, b"\x06")  # the terminal ACKed copy 1
        await asyncio.sleep(2.0)  # payment_timeout of soak.toml
        os.write(fd, frame)  # the application sends the payment again
        await wait_for(lambda: server.frames_in == 2)
        ledger = server.terminal.summary()
    finally:
        os.close(fd)
        await server.close()
    receipts = ledger["TILL1/P1"]["receipts"]
    assert [r["retransmission"] for r in receipts] == [False, True]
    payment = paid("P1")
    payment.amount = payment.first_final_amount = amount
    result = run_audit(fake_soak(tmp_path, payment), {POI: ledger}, [row("P1")])
    assert kinds(result) == [("doubled", None)], result["problems"]
    assert soak_module.report(result) is False


# --- a muted terminal's dropped frames, and amounts of their own --------------------------------

def test_audit_flags_a_payment_sent_again_blind_after_a_copy_the_terminal_dropped(tmp_path):
    """A muted terminal reads nothing and acknowledges nothing: a copy of a dropped frame
    that comes within the framer's retry span is its retransmission (the terminal's ledger
    flags it, acked_before None); the payment reaching it again otherwise, after a dropped
    copy, is a blind re-send (the bridge sent the payment again instead of asking about it):
    doubled, said so. So is the register's sale sent again under another ServiceID."""
    cases = {  # receipts (at, flagged, answer[, gap, acked_before]) -> what the audit says
        "P1": [(100.0, False, "dropped"), (100.5, True, "processed", 0.5, None)],
        "P2": [(100.0, False, "dropped"), (100.5, True, "dropped", 0.5, None),
               (101.0, True, "processed", 0.5, None)],
        "P3": [(100.0, False, "dropped"), (103.0, False, "processed")],
        "P4": [(100.0, False, "dropped"), (102.6, True, "processed", 2.6, None)],
        # sent again after the terminal's ACK, while it was muted: doubled, not blind
        "P5": [(100.0, False, "processed"), (102.5, True, "dropped", 2.5, 2.45)],
    }
    payments = [paid(sid) for sid in cases] + [paid("P6", "declined")]
    payments[-1].transaction_id = "TILL1-P6"
    ledger = {f"TILL1/{sid}": ledger_entry(*receipts) for sid, receipts in cases.items()}
    ledger["TILL1/P6"] = dict(ledger_entry((100.0, False, "dropped")), transaction_id="TILL1-P6")
    ledger["TILL1/Q6"] = dict(ledger_entry((104.0, False, "processed")),
                              transaction_id="TILL1-P6")
    rows = [row(sid) for sid in cases] + [row("P6", "declined")]
    result = run_audit(fake_soak(tmp_path, *payments), {POI: ledger}, rows)
    found = {(p["kind"], p["key"]): p["text"] for p in result["problems"]}
    assert sorted(found) == [("doubled", "TILL1/P3"), ("doubled", "TILL1/P4"),
                             ("doubled", "TILL1/P5"), ("doubled", "TILL1/P6"),
                             ("unsolicited", "TILL1/Q6")], result["problems"]
    for key in ("TILL1/P3", "TILL1/P4", "TILL1/P6"):
        assert "BLIND RE-SEND" in found[("doubled", key)], found[("doubled", key)]
    assert "BLIND RE-SEND" not in found[("doubled", "TILL1/P5")]
    assert "under ServiceID Q6" in found[("doubled", "TILL1/P6")]
    assert soak_module.report(result) is False


async def test_a_payment_sent_again_after_a_muted_terminal_dropped_it_is_a_blind_resend(
        tmp_path):
    """On a real pseudo-terminal with the soak's settings: the terminal is muted (the soak's
    terminal_freeze) as a payment's frame comes; once it listens again, the framer's copy
    0.5 s later is read and passes. Another payment's frame is dropped too, and its copy
    comes 2.5 s later (a bridge that re-sends the payment at payment_timeout instead of
    polling for it): the terminal saw it once, so the audit saw nothing; now it is doubled,
    a blind re-send."""
    import asyncio

    from bridge.simulator.responses import payment_request
    from bridge.simulator.server import SimulatorServer
    from bridge.simulator.terminal import LinkBehaviour, Scenario
    from tests.test_simulator_link import _frame, wait_for

    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(
        poi_id=POI, link=LinkBehaviour(retransmit_window=soak_module.RETRANSMIT_WINDOW)))
    await server.start_pty(link)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    try:
        first, second = (_frame(json.dumps(payment_request("TILL1", sid, POI, 10.0),
                                           separators=(",", ":")).encode())
                         for sid in ("P1", "P2"))
        server.mute(0.4)
        os.write(fd, first)
        await asyncio.sleep(soak_module.ACK_TIMEOUT)
        os.write(fd, first)  # the framer's copy: no ACK came
        await wait_for(lambda: server.frames_in == 1)
        server.mute(1.0)
        os.write(fd, second)
        await asyncio.sleep(2.5)
        os.write(fd, second)  # the payment sent again, not asked about
        await wait_for(lambda: server.frames_in == 2)
        ledger = server.terminal.summary()
    finally:
        os.close(fd)
        await server.close()
    assert [r["answer"] for r in ledger["TILL1/P2"]["receipts"]] == ["dropped", "processed"]
    result = run_audit(fake_soak(tmp_path, paid("P1"), paid("P2")), {POI: ledger},
                       [row("P1"), row("P2")])
    assert [(p["kind"], p["key"]) for p in result["problems"]] == [
        ("doubled", "TILL1/P2")], result["problems"]
    assert "BLIND RE-SEND" in result["problems"][0]["text"]


def test_soak_terminal_records_what_it_dropped_while_muted(tmp_path):
    """bench/soak_terminal.py writes every frame it dropped while muted into its ledger
    file (the money requests among them as receipts, with the amount its key reads), and
    the soak takes the list of them apart from the payments."""
    import random
    import tty

    from bridge.protocol import crypto
    from bridge.simulator import responses
    from tests.test_simulator_link import _frame

    terminal = soak_module.Terminal(0, tmp_path, 1, random.Random(0))
    terminal.garbage_rate = terminal.corrupt_rate = 0.0
    (key,) = soak_module.make_keys([terminal], tmp_path, "per-terminal")
    nexo = crypto.NexoKey(key.identifier, 1, key.passphrase)
    terminal.start()
    fd = -1
    try:
        terminal.wait_started()
        fd = os.open(terminal.configured_link, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        terminal.control("mute 3")
        time.sleep(1.0)  # the control line is read
        sealed = crypto.encrypt_message(
            responses.payment_request("TILL1", "K1", terminal.poi_id, 1234.56), nexo)
        os.write(fd, _frame(json.dumps(sealed, separators=(",", ":")).encode()))
        time.sleep(0.5)
    finally:
        if fd >= 0:
            os.close(fd)
        ledger = terminal.stop()
    assert ledger is not None and list(ledger) == ["TILL1/K1"], ledger
    entry = ledger["TILL1/K1"]
    assert [r["answer"] for r in entry["receipts"]] == ["dropped"], entry
    assert (entry["amount"], entry["currency"], entry["charged"]) == (1234.56, "EUR", False)
    assert [(d["category"], d["service_id"], d["amount"])
            for d in terminal.dropped_unread] == [("Payment", "K1", 1234.56)]


def _register_pair(tmp_path: Path) -> tuple[list[Any], Any]:
    """Two of the soak's registers (TILL1, TILL2) and one of its simulated terminals, as
    the soak sets them up (its KINDS, its scenario)."""
    import random
    from collections import Counter

    from bridge.simulator.terminal import Scenario, SimulatedTerminal

    terminal = soak_module.Terminal(0, tmp_path, 1, random.Random(0))
    holder = SimpleNamespace(terminals=[terminal], args=SimpleNamespace(registers=2),
                             payments_of_kind=Counter())
    tills = [soak_module.Register(holder, i, random.Random(i)) for i in range(2)]
    return tills, SimulatedTerminal(Scenario.model_validate(terminal.scenario()))


def test_audit_catches_two_payments_of_one_kind_given_each_others_results(tmp_path):
    """The soak's amounts picked the terminal's behaviour by kind, one amount per kind: a
    bridge that handed TILL1's payment the result of TILL2's payment of the same kind (and
    back) passed every check, amounts included. Every payment has an amount of its own now:
    the register is told an AuthorizedAmount that is not its payment's."""
    import asyncio

    from bridge.daemon.registers import result_payload
    from bridge.protocol.actions import Deliver
    from bridge.simulator.responses import payment_request

    tills, simulator = _register_pair(tmp_path)
    x, y = (asyncio.run(till.pay(simulator_terminal, "approve"))
            for till, simulator_terminal in zip(tills, [SimpleNamespace(poi_id=POI)] * 2,
                                                strict=True))
    assert x.kind == y.kind == "approve"
    for at, payment in ((100.0, x), (110.0, y)):
        simulator.handle(payment_request(payment.sale_id, payment.service_id, POI,
                                         payment.amount), at)
    response = {p.key: simulator.ledger[(p.sale_id, p.service_id)].response for p in (x, y)}
    # the swap: each register gets the other payment's result under its own IDs
    for till, payment, other in ((tills[0], x, y), (tills[1], y, x)):
        till._on_message(json.dumps(result_payload(Deliver(
            payment.sale_id, payment.service_id, POI, "Payment", "approved", "terminal",
            response[other.key]), 120.0)))
    soak = fake_soak(tmp_path)
    soak.registers = tills
    rows = [dict(row(p.service_id), sale_id=p.sale_id) for p in (x, y)]
    result = run_audit(soak, {POI: simulator.summary()}, rows)
    # (and each result names the other's sale: see the declined pair below)
    assert sorted((p["kind"], p["key"]) for p in result["problems"]) == [
        ("wrong_amount", x.key), ("wrong_amount", y.key),
        ("wrong_sale", x.key), ("wrong_sale", y.key)], result["problems"]
    text = next(p["text"] for p in result["problems"]
                if p["key"] == x.key and p["kind"] == "wrong_amount")
    assert f"the amount of {y.key}" in text, text
    assert soak_module.report(result) is False
    # each told its own result: nothing to say
    x.first_final_amount, y.first_final_amount = x.amount, y.amount
    x.sales_told, y.sales_told = ([("approved", "terminal", p.transaction_id)] for p in (x, y))
    assert run_audit(soak, {POI: simulator.summary()}, rows)["problems"] == []


def test_every_payment_has_an_amount_of_its_own_and_its_kinds_behaviour(tmp_path):
    """The soak's terminals pick a payment's behaviour by its kind's range of amounts, and
    no two payments of a run share an amount (up to 10000 of a kind)."""
    _, simulator = _register_pair(tmp_path)
    from bridge.simulator.responses import payment_request

    seen: set[float] = set()
    for kind, (_, _, behaviour) in soak_module.KINDS.items():
        for nth in (0, 1, 57, 9999):
            amount = soak_module.payment_amount(kind, nth)
            assert amount not in seen and round(amount, 2) == amount, (kind, nth, amount)
            seen.add(amount)
            request = payment_request("TILL1", "X", POI, amount)["SaleToPOIRequest"]
            chosen = simulator._behaviour_for(request["MessageHeader"], request)
            assert chosen.model_dump(include=set(behaviour)) == behaviour, (kind, amount)


# --- results with no amount of their own: the sale they name ------------------------------------

def _declined_pair(tmp_path: Path) -> tuple[list[Any], list[Any], Any, dict[str, Any]]:
    """Two declined payments (TILL1's, TILL2's: AuthorizedAmount 0 in both results), run on
    one of the soak's simulated terminals, and each one's result as the bridge hands it to a
    register: the terminal's own answer (source terminal) and the record a status poll
    learnt (source status-poll, the RepeatedMessageResponse rebuilt: recovered_response)."""
    import asyncio

    from bridge.protocol.builders import request_header, status_request
    from bridge.protocol.messages import parse_message
    from bridge.protocol.outcome import classify, recovered_response
    from bridge.simulator.responses import payment_request

    tills, simulator = _register_pair(tmp_path)
    payments = [asyncio.run(till.pay(SimpleNamespace(poi_id=POI), "decline")) for till in tills]
    results: dict[str, Any] = {}
    for at, p in ((100.0, payments[0]), (110.0, payments[1])):
        request = payment_request(p.sale_id, p.service_id, POI, p.amount)
        direct = simulator.handle(request, at).answers[0].document
        poll = status_request(sale_id=p.sale_id, service_id=f"S{p.service_id}", poi_id=POI,
                              original_service_id=p.service_id, original_category="Payment")
        record = simulator.handle(poll, at + 5).answers[0].document
        results[p.key] = {"terminal": direct, "status-poll": recovered_response(
            classify(parse_message(record)), request_header(request))}
        assert soak_module.authorised_amount(direct["SaleToPOIResponse"]) == 0
    return tills, payments, simulator, results


def _told(till: Any, payment: Any, response: dict[str, Any], source: str,
          outcome: str = "declined") -> None:
    """`till` receives `response` as the result of `payment` (under its IDs), as the bridge
    publishes it (bridge/daemon/registers.py, result_payload)."""
    from bridge.daemon.registers import result_payload
    from bridge.protocol.actions import Deliver

    till._on_message(json.dumps(result_payload(Deliver(
        payment.sale_id, payment.service_id, POI, "Payment", outcome, source, response),
        120.0)))


def _audit_pair(tmp_path: Path, tills: list[Any], payments: list[Any], simulator: Any,
                outcome: str = "declined") -> dict[str, Any]:
    soak = fake_soak(tmp_path)
    soak.registers = tills
    rows = [dict(row(p.service_id, outcome), sale_id=p.sale_id) for p in payments]
    return run_audit(soak, {POI: simulator.summary()}, rows)


def test_audit_catches_two_declined_payments_given_each_others_results(tmp_path):
    """A declined result carries AuthorizedAmount 0, whatever was asked: a bridge that
    handed TILL1's declined payment TILL2's declined result (and back) passed every check,
    the amounts' included. The terminal echoes the request's SaleData in every answer about
    a Payment (its status record too): the result names another sale than the payment's
    own (SaleTransactionID.TransactionID), and the run fails as wrong_sale, naming whose."""
    tills, (x, y), simulator, results = _declined_pair(tmp_path)
    _told(tills[0], x, results[y.key]["terminal"], "terminal")
    _told(tills[1], y, results[x.key]["status-poll"], "status-poll")
    assert x.first_final == y.first_final == "declined"
    result = _audit_pair(tmp_path, tills, [x, y], simulator)
    assert sorted((p["kind"], p["key"]) for p in result["problems"]) == [
        ("wrong_sale", x.key), ("wrong_sale", y.key)], result["problems"]
    text = {p["key"]: p["text"] for p in result["problems"]}
    assert f"'{y.transaction_id}' (the sale of {y.key})" in text[x.key], text
    assert f"(status-poll) for sale '{x.transaction_id}' (the sale of {x.key})" in text[y.key]
    assert soak_module.report(result) is False


def test_audit_passes_results_that_name_their_own_sale_and_says_how_many_it_compared(tmp_path):
    """Each payment told its own result, directly and again from a status poll: nothing to
    say. A refusal the bridge made itself names no sale (its own words, no SaleData): not
    compared, and not a problem."""
    from bridge.protocol.builders import failure_response

    tills, (x, y), simulator, results = _declined_pair(tmp_path)
    for till, p in zip(tills, (x, y), strict=True):
        _told(till, p, results[p.key]["terminal"], "terminal")
        _told(till, p, results[p.key]["status-poll"], "status-poll")
    result = _audit_pair(tmp_path, tills, [x, y], simulator)
    assert result["problems"] == [] and result["counts"]["sales_compared"] == 4, result
    assert soak_module.report(result) is True
    refusal = failure_response(results[x.key]["terminal"]["SaleToPOIResponse"]["MessageHeader"],
                               "Payment", "Busy", "terminal busy")
    _told(tills[0], x, refusal, "bridge")
    assert soak_module.sale_told(refusal["SaleToPOIResponse"]) is None
    result = _audit_pair(tmp_path, tills, [x, y], simulator)
    assert result["problems"] == [] and result["counts"]["sales_compared"] == 4, result

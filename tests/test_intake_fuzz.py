"""The MQTT request handler under arbitrary input: it never raises, answers every request
exactly once (on the register's topic or the bridge's error topic), and never leaves a
half-written transaction behind.

The corpus: the register requests the vendor's fixtures answer (fuzz_corpus), stamped when
each example is drawn and changed the way fuzz_corpus changes documents, or damaged at the
byte level; the fixture files themselves (terminals' answers, refused here); arbitrary bytes
and JSON. Each example's answer is tallied: a request that passed every check of the
handler reaches the terminal's session, which refuses it only because this rig's terminal is
offline."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from bridge.config import parse_config
from bridge.daemon.intake import RequestIntake
from bridge.daemon.journal import Journal
from bridge.daemon.mqtt import RegisterGateway, Reply
from bridge.daemon.worker import TerminalWorker
from bridge.protocol.transaction import TxKey, TxState
from bridge.simulator import responses

from .fuzz_corpus import damaged, fixture_texts, mutated, requests_now, serialised
from .fuzzing import fuzz_settings, tallied, tally

POI = "V400m-324688179"
REACHED = "reached the terminal's session"  # (after the category: "Payment reached...")


class Rig:
    def __init__(self, path, max_payload: int = 4096, request_max_age: float = 300.0) -> None:
        self.config = parse_config({
            "journal": str(path), "mqtt": {"max_payload": max_payload},
            "terminals": [{"poi_id": POI, "link": {"kind": "tcp", "host": "127.0.0.1",
                                                    "port": 9}}]})
        self.journal = Journal(path)
        self.gateway = RegisterGateway(self.config.mqtt, self.journal)
        workers = {POI: TerminalWorker(self.config.terminals[0], self.journal, self.gateway)}
        self.intake = RequestIntake(self.config, self.journal, self.gateway, workers,
                                    health=dict, request_max_age=request_max_age)

    def handle(self, topic: str, payload: bytes) -> list:
        before = self.journal.pending(limit=100_000)
        self.intake.handle(topic, payload, Reply(self.gateway, None, None))
        after = self.journal.pending(limit=100_000)
        return after[len(before):]


# Most requests stamped now; some near and past the handler's limit (300 s) either way, one
# centuries off.
AGES = st.sampled_from([0.0] * 6 + [250.0, -250.0, 400.0, -400.0, 10.0**10])
arbitrary_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=3),
    max_leaves=15).map(lambda v: json.dumps({"SaleToPOIRequest": v}).encode())
# Weighted towards the register requests, payments most, changed at the JSON level: most of
# those pass every check, which a change at the byte level seldom leaves a request able to.
payloads = st.sampled_from([
    *[requests_now(POI, AGES).flatmap(mutated).flatmap(serialised)] * 2,
    *[requests_now(POI, AGES, "Payment").flatmap(mutated).flatmap(serialised)] * 2,
    requests_now(POI, AGES).flatmap(serialised).flatmap(damaged),
    st.sampled_from(sorted(fixture_texts().values())).flatmap(
        lambda text: st.just(text) | damaged(text)),
    st.binary(max_size=200),
    arbitrary_json,
]).flatmap(lambda payload: payload)
terminals = st.sampled_from([POI, POI, POI, "P400Plus-1", "x"])  # only POI is configured


def answered_once(journal: Path, payload: bytes, terminal: str,
                  request_max_age: float = 300.0) -> str:
    """Hand `payload` to a fresh handler; check that it is answered once and nothing is left
    half-written. Returns what it reached ("Payment reached the terminal's session"...), or
    why it was refused."""
    rig = Rig(journal, request_max_age=request_max_age)
    try:
        answers = rig.handle(f"poi-bridge/terminals/{terminal}/request", payload)
        assert len(answers) == 1, answers
        topic = answers[0].topic
        assert topic == "poi-bridge/bridge/error" or (
            topic.startswith("poi-bridge/registers/") and topic.endswith("/response"))
        body = json.loads(answers[0].payload)
        error = (body.get("bridge") or body)["error"]
        assert error
        # The terminal is offline in this rig: nothing can have been accepted. A valid request
        # is recorded only as its refusal (final), so a redelivered copy gets the same answer.
        recorded = rig.journal.transactions(limit=10)
        assert all((t.state, t.outcome) == ("final", "rejected") for t in recorded)
        assert rig.journal.open_transactions() == []
    finally:
        rig.journal.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{journal}{suffix}").unlink(missing_ok=True)
    if f"terminal {POI} is offline; nothing was sent" in error:
        return f"{body['SaleToPOIResponse']['MessageHeader']['MessageCategory']} {REACHED}"
    if topic == "poi-bridge/bridge/error":
        return "refused on the error topic"
    return "refused: too old or too far ahead" if "TimeStamp" in error and (
        " s old " in error or " in the future " in error) else "refused"


@fuzz_settings(400)
@given(payload=payloads, terminal=terminals)
# Found by this fuzzer: a bare JSON scalar reached parse_message as a parsed value and crashed.
@example(payload=b"0", terminal=POI)
@example(payload=b'"text"', terminal=POI)
def test_every_request_is_answered_once_and_nothing_half_written(tmp_path, payload, terminal):
    tally(answered_once(tmp_path / "journal.sqlite3", payload, terminal))


def test_the_targets_payments_reach_the_session_early_and_late_in_a_run(tmp_path):
    """The target fuzzes the whole handler: a good share of its inputs pass every check and
    reach the terminal's session, payments (the requests whose age the handler checks)
    among them, as many late in a run as early. Its one valid payment used to be stamped
    once, at import: 1 input in 400 reached the session, and none after request_max_age
    (300 s) of a `make fuzz` run (600 s). Late in a run, in small: a handler whose
    request_max_age is 2 s, fed the target's inputs for 4 s."""
    with tallied() as reached:
        test_every_request_is_answered_once_and_nothing_half_written(tmp_path=tmp_path)
    total = sum(reached.values())
    assert sum(n for what, n in reached.items() if what.endswith(REACHED)) >= total / 20, reached
    assert reached[f"Payment {REACHED}"] >= total / 100, reached

    start = time.monotonic()
    late: collections.Counter[str] = collections.Counter()

    @fuzz_settings(40)
    @given(payload=payloads)
    def one_round(payload):
        what = answered_once(tmp_path / "late.sqlite3", payload, POI, request_max_age=2.0)
        if time.monotonic() - start >= 2.5:
            late[what] += 1

    while time.monotonic() - start < 4.0:
        one_round()
    assert late[f"Payment {REACHED}"] > 0, late


@fuzz_settings(200)
@given(command=st.sampled_from(["resync", "transactions", "terminals", "health", "nope"]),
       payload=st.binary(max_size=100) | st.sampled_from(
           [b"", b"{}", b'{"sale_id": 1}', b'{"limit": -1}', b'{"state": ["x"]}']))
def test_operator_commands_always_answer(tmp_path, command, payload):
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        answers = rig.handle(f"poi-bridge/bridge/request/{command}", payload)
        assert len(answers) == 1
        assert answers[0].topic == f"poi-bridge/bridge/response/{command}"
        assert json.loads(answers[0].payload)["status"] in ("ok", "error")
    finally:
        rig.journal.close()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"journal.sqlite3{suffix}").unlink(missing_ok=True)


def test_requests_arriving_while_draining_are_refused_with_an_answer(tmp_path):
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        rig.gateway.stop_accepting()
        doc = responses.payment_request("POS1", "D1", POI)
        (answer,) = rig.handle(f"poi-bridge/terminals/{POI}/request", json.dumps(doc).encode())
        assert answer.topic == "poi-bridge/registers/POS1/response"
        body = json.loads(answer.payload)
        assert body["bridge"]["outcome"] == "rejected"
        assert "shutting down" in body["bridge"]["error"]
    finally:
        rig.journal.close()


def test_a_repeat_of_a_known_payment_gets_its_result_even_when_too_old_or_draining(tmp_path):
    """A register re-sends a payment to fetch its result (or the broker redelivers it) after
    more than request_max_age, or while the bridge is stopping: the journal's result is the
    answer. Refused as too old, the register would be told 'rejected' for a payment the
    shopper paid, and might take it again."""
    import datetime as dt
    import time

    from bridge.protocol.transaction import Transaction, TxState, request_digest

    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        then = time.time() - 400
        doc = responses.payment_request("POS1", "S1", POI)
        doc["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
            "TimeStamp"] = dt.datetime.fromtimestamp(then, dt.UTC).isoformat()
        rig.journal.save(Transaction(
            sale_id="POS1", service_id="S1", poi_id=POI, category="Payment", request=doc,
            digest=request_digest(doc), created_at=then, updated_at=then + 5,
            state=TxState.FINAL, outcome="approved", source="terminal"))
        # A new payment that old is still refused: the check is for requests that would start.
        fresh = json.loads(json.dumps(doc).replace('"S1"', '"S2"'))
        (answer,) = rig.handle(f"poi-bridge/terminals/{POI}/request", json.dumps(fresh).encode())
        body = json.loads(answer.payload)
        assert body["bridge"]["outcome"] == "rejected" and "400 s old" in body["bridge"]["error"]
        for draining in (False, True):
            if draining:
                rig.gateway.stop_accepting()
            answers = rig.handle(f"poi-bridge/terminals/{POI}/request", json.dumps(doc).encode())
            results = [json.loads(a.payload) for a in answers if a.topic.endswith("/response")]
            assert [r["bridge"]["outcome"] for r in results] == ["approved"], results
            events = [json.loads(a.payload)["event"] for a in answers if a.topic.endswith("/event")]
            assert events == ["duplicate"]
    finally:
        rig.journal.close()


def test_a_step_of_the_system_clock_does_not_make_a_repeat_a_new_payment(tmp_path):
    """The box booted with its clock three days behind and NTP set it right while the daemon
    ran. The terminals' sessions stamp transactions with the daemon's steady clock (still
    three days behind); the 48-hour ServiceID rule must be measured on the same clock, or an
    identical repeat of a payment approved a minute ago is taken for a new payment and sent
    to the terminal again."""
    import time

    from bridge.daemon.app import Bridge
    from bridge.daemon.worker import SteadyClock
    from bridge.protocol.transaction import Transaction, TxState, request_digest

    behind = time.time() - 3 * 86400
    clock = SteadyClock(wall=lambda: behind)
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        rig.intake = RequestIntake(rig.config, rig.journal, rig.gateway, rig.intake.workers,
                                   health=dict, clock=clock)
        doc = responses.payment_request("POS1", "S1", POI)  # the register's clock is right
        rig.journal.save(Transaction(
            sale_id="POS1", service_id="S1", poi_id=POI, category="Payment", request=doc,
            digest=request_digest(doc), created_at=clock(), updated_at=clock(),
            state=TxState.FINAL, outcome="approved", source="terminal"))
        answers = rig.handle(f"poi-bridge/terminals/{POI}/request", json.dumps(doc).encode())
        results = [json.loads(a.payload) for a in answers if a.topic.endswith("/response")]
        assert [r["bridge"]["outcome"] for r in results] == ["approved"]
        events = [json.loads(a.payload)["event"] for a in answers if a.topic.endswith("/event")]
        assert events == ["duplicate"]
        assert rig.journal.get(TxKey("POS1", "S1")).outcome == "approved"  # not overwritten
    finally:
        rig.journal.close()
    # And the daemon gives its terminals, its intake and its pruning that one clock.
    config = parse_config({"journal": str(tmp_path / "daemon.sqlite3"), "terminals": [
        {"poi_id": POI, "link": {"kind": "tcp", "host": "127.0.0.1", "port": 9}}]})
    bridge = Bridge(config, hotplug=False)
    try:
        assert bridge.intake._clock is bridge.clock
        assert all(worker._clock is bridge.clock for worker in bridge.workers.values())
    finally:
        bridge.journal.close()


def test_a_request_refused_while_stopping_and_delivered_again_is_not_run(tmp_path):
    """Seen in a soak: a payment refused while the bridge drained ("shutting down"), the
    broker killed before it saved the bridge's acknowledgement, and the request delivered
    again to the next start of the bridge, which ran it: the register had been told
    'rejected', and the shopper was charged. The refusal is recorded now, so the copy gets
    the same answer."""
    path = tmp_path / "journal.sqlite3"
    doc = responses.payment_request("POS1", "S1", POI)
    rig = Rig(path)
    try:
        rig.gateway.stop_accepting()
        (answer,) = rig.handle(f"poi-bridge/terminals/{POI}/request", json.dumps(doc).encode())
        refused = json.loads(answer.payload)["bridge"]
        assert refused["outcome"] == "rejected" and "new ServiceID" in refused["error"]
    finally:
        rig.journal.close()
    again = Rig(path)  # the next start, on the same journal
    try:
        answers = again.handle(f"poi-bridge/terminals/{POI}/request", json.dumps(doc).encode())
        results = [json.loads(a.payload) for a in answers if a.topic.endswith("/response")]
        assert [r["bridge"]["outcome"] for r in results] == ["rejected"]
        assert "shutting down" in results[0]["bridge"]["error"]
        events = [json.loads(a.payload)["event"] for a in answers if a.topic.endswith("/event")]
        assert events == ["duplicate"]
        assert not again.intake.workers[POI].session.open  # nothing started
        stored = again.journal.get(TxKey("POS1", "S1"))
        assert (stored.state, stored.outcome) == (TxState.FINAL, "rejected")
    finally:
        again.journal.close()

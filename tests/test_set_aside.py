"""A request whose handling stops the daemon at once (a step that failed half-way: a fault
of the bridge) is never acknowledged, so the broker delivered it again at every start and
it stopped the daemon again, until systemd gave up and the store's terminals were offline
(the crypto audit found one: `"NexoBlob": null`). It is set aside as the daemon stops: from
the next start it is refused, on the register's topics, and everything else goes on.

The fault is injected into the real daemon process by a sitecustomize.py on its path."""

from __future__ import annotations

import asyncio
import json
import textwrap

from bridge.daemon.set_aside import MOST_KEPT, SetAsideRequests, set_aside_path
from bridge.protocol import builders
from bridge.simulator import responses

from .follow_rig import A, bridge_on, simulator
from .follow_rig import BASE as HAND_BASE
from .rig import (POI, Daemon, Simulator, Subscriber, bridge_online, fault_injected, outcome_for,
                  wait_until, write_config)

BASE = "poi-bridge"
REQUEST = f"{BASE}/terminals/{POI}/request/POS1"

FAULT = textwrap.dedent('''
    """A step of any request with a ServiceID POISON... fails half-way in this process."""
    import bridge.daemon.frame_writer as frame_writer

    _encode = frame_writer.FrameWriter.encode


    def encode(self, action, key):
        if action.service_id.startswith("POISON"):
            raise RuntimeError("injected fault")
        return _encode(self, action, key)


    frame_writer.FrameWriter.encode = encode
''')


async def test_a_request_that_stopped_the_daemon_is_refused_at_the_next_start(
        tmp_path, mosquitto):
    fault = fault_injected(tmp_path, FAULT)
    sim = Simulator(tmp_path)
    daemon = Daemon(write_config(tmp_path, mosquitto, sim.link), tmp_path,
                    path_first=fault).start()
    try:
        async with Subscriber(mosquitto, [f"{BASE}/registers/POS1/#", f"{BASE}/bridge/error"],
                              client_id="register-POS1", persistent=True) as register:
            await bridge_online(mosquitto, BASE)
            poison = responses.payment_request("POS1", "POISON1", POI, 12.5)
            await register.publish(REQUEST, poison)
            assert await asyncio.to_thread(wait_until, lambda: daemon.process.poll() is not None,
                                           30), "the fault did not stop the daemon"
            assert daemon.process.returncode == 3
            assert "is set aside: from the next start it is refused" in daemon.log()
            kept = SetAsideRequests(set_aside_path(tmp_path / "journal.sqlite3")).entries()
            assert [entry.topic for entry in kept] == [REQUEST], kept
            # Started again, as systemd does: the broker delivers the request again
            daemon.start()
            refused = await register.wait_for(outcome_for("POISON1"), timeout=30)
            assert refused["bridge"]["outcome"] == "rejected", refused
            assert "stopped the bridge when it was handled" in refused["bridge"]["error"]
            assert "nothing was charged" in refused["bridge"]["error"]
            error = await register.wait_for(
                lambda t, p: t.endswith("/bridge/error") and "stopped the bridge" in p["error"])
            assert error["topic"] == REQUEST
            # ... and the daemon goes on: the next sale is paid
            await register.publish(REQUEST, responses.payment_request("POS1", "OK1", POI, 3.0))
            paid = await register.wait_for(outcome_for("OK1"), timeout=30)
            assert paid["bridge"]["outcome"] == "approved", paid
            assert daemon.process.poll() is None
            assert daemon.log().count("was set aside: refused, not handled again") == 1
    finally:
        daemon.kill()
        ledger = sim.stop()
    assert "POS1/POISON1" not in ledger and "POS1/OK1" in ledger


def test_the_set_aside_file_keeps_the_latest_and_survives_a_line_cut_short(tmp_path):
    path = set_aside_path(tmp_path / "journal.sqlite3")
    assert path.name == "journal.sqlite3.set-aside"
    requests = SetAsideRequests(path)
    for n in range(MOST_KEPT + 5):
        requests.add(f"t/{n}", b"request %d" % n)
    assert path.stat().st_mode & 0o777 == 0o600
    with path.open("a") as file:
        file.write('{"digest": "ab')  # the stop cut it short
    again = SetAsideRequests(path)
    assert [e.topic for e in again.entries()] == [f"t/{n}" for n in range(5, MOST_KEPT + 5)]
    assert again.get("t/4", b"request 4") is None and again.get("t/5", b"request 5").topic == "t/5"
    assert again.get("t/4", b"request 5") is None  # (the same bytes on another topic)
    assert again.first_time("t/5", b"request 5") and not again.first_time("t/5", b"request 5")


async def test_a_request_set_aside_whose_ids_the_journal_holds_is_no_nothing_charged(
        tmp_path, mosquitto):
    """A repeat of a recorded payment, its handling having stopped the daemon: its IDs ran
    as a transaction of their own, so the refusal must not say "nothing was charged":
    `error`, naming the transaction the journal holds, to be asked about."""
    sim = simulator(A)
    port = await sim.start_pty(tmp_path / "port-a")
    topic = f"{HAND_BASE}/terminals/{A}/request/TILL1"
    payload = json.dumps(responses.payment_request("TILL1", "P1", A, 4.0)).encode()
    try:
        async with bridge_on(tmp_path, mosquitto, {A: port}), \
                Subscriber(mosquitto, [f"{HAND_BASE}/registers/TILL1/#"]) as register:
            await register.publish(topic, payload)
            paid = await register.wait_for(outcome_for("P1"), timeout=30)
            assert paid["bridge"]["outcome"] == "approved"
        # (as a stop in the handling of its repeat would have left it)
        SetAsideRequests(set_aside_path(tmp_path / "journal.sqlite3")).add(topic, payload)
        async with bridge_on(tmp_path, mosquitto, {A: port}), \
                Subscriber(mosquitto, [f"{HAND_BASE}/registers/TILL1/#"]) as register:
            await register.publish(topic, payload)
            told = await register.wait_for(outcome_for("P1", "error"), timeout=30)
            assert "stopped the bridge when it was handled" in told["bridge"]["error"]
            assert "the bridge holds transaction TILL1/P1 (final, approved)" in \
                told["bridge"]["error"]
            assert "nothing was charged" not in told["bridge"]["error"]
    finally:
        await sim.close()


async def test_a_status_request_set_aside_says_the_payment_it_names_goes_on(
        tmp_path, mosquitto):
    """A status request (or an abort) has IDs of its own: refused with "nothing was charged,
    send the sale again" while the payment it named was being charged, a till could charge
    the shopper twice (the review of the set-aside). It is told that the transaction it
    names is not affected, and that payment's own result follows."""
    fault = fault_injected(tmp_path, FAULT)
    sim = Simulator(tmp_path, "--delay", "6")
    daemon = Daemon(write_config(tmp_path, mosquitto, sim.link,
                                 terminal={"payment_timeout": 30.0}), tmp_path,
                    path_first=fault).start()
    try:
        async with Subscriber(mosquitto, [f"{BASE}/registers/POS1/#"],
                              client_id="register-POS1", persistent=True) as register:
            await bridge_online(mosquitto, BASE)
            await register.publish(REQUEST, responses.payment_request("POS1", "P1", POI, 30.0))
            await register.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "sent")
            await register.publish(REQUEST, builders.status_request(
                sale_id="POS1", service_id="POISON2", poi_id=POI, original_service_id="P1",
                original_category="Payment"))
            assert await asyncio.to_thread(
                wait_until, lambda: daemon.process.poll() is not None, 30)
            daemon.start()
            refused = await register.wait_for(outcome_for("POISON2"), timeout=30)
            error = refused["bridge"]["error"]
            assert refused["bridge"]["outcome"] == "rejected", refused
            assert "nothing was charged" not in error and "send the sale again" not in error
            assert "a transaction it names is not affected by it" in error, error
            paid = await register.wait_for(outcome_for("P1"), timeout=60)
            assert paid["bridge"]["outcome"] == "approved", paid
    finally:
        daemon.kill()
        sim.stop()


async def test_a_command_set_aside_is_refused_on_its_own_response_topic(tmp_path, mosquitto):
    """An operator's command whose handling stopped the daemon (a resync, say) is refused
    as a command, on bridge/response/{command}: "nothing of it was done", no word of a
    sale; the same body on a register's topic is another request."""
    sim = simulator(A)
    port = await sim.start_pty(tmp_path / "port-a")
    body = {"sale_id": "TILL1", "service_id": "P1", "transaction": "t-1"}
    topic = f"{HAND_BASE}/bridge/request/resync"
    SetAsideRequests(set_aside_path(tmp_path / "journal.sqlite3")).add(
        topic, json.dumps(body).encode())
    try:
        async with bridge_on(tmp_path, mosquitto, {A: port}), \
                Subscriber(mosquitto, [f"{HAND_BASE}/bridge/response/#"]) as operator:
            await operator.publish(topic, json.dumps(body))
            answer = await operator.wait_for(
                lambda t, p: t.endswith("/bridge/response/resync"), timeout=30)
            assert answer["status"] == "error" and answer["transaction"] == "t-1", answer
            assert "this command stopped the bridge" in answer["error"], answer
            assert "nothing of it was done" in answer["error"], answer
            assert "charged" not in answer["error"], answer
    finally:
        await sim.close()

"""A follow that waited for the other terminal's own link (FOLLOW_LATER) is decided again
whenever what it waited for changes, and the wrong device is reported once.

B's cable is in A's port. When A's link hears B while B's own link is up and has not said
yet who is there, A waits (identity "mismatch: B"). It used to be decided again only when
B's link named A: a B port left empty (nothing answers there), going away, holding a third
terminal or a device that never says who it is left A waiting, and B refusing every
payment, until the daemon restarted.

B's link says who is there by a chain of timers of its own (opening, its identity check, the
answer). A's error waited a fixed 2 s (FOLLOW_GRACE) for it: on a stalled CPU B's link had
not spoken by then, and A reported a swap the daemon followed a moment later. A's report now
waits for B's link to have spoken, with one warning if that takes long (FOLLOW_PATIENCE)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.config import TerminalConfig, parse_config
from bridge.daemon import worker as worker_module
from bridge.daemon.app import Bridge
from bridge.daemon.follow import awaits_its_own_link
from bridge.daemon.journal import Journal
from bridge.daemon.worker import FOLLOW_GRACE, TerminalWorker
from bridge.register_client import RegisterClient
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer, open_pty
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .follow_rig import A, B, BASE, DeviceByHand, bridge_on, linked_to, wait_until

THIRD = "P400Plus-999"  # a terminal that is not in the configuration
WAITED = f"not followed: {B}'s own link has not said yet which terminal is there"


def errors(caplog: Any, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and text in r.getMessage()]


@contextlib.asynccontextmanager
async def b_heard_on_a(tmp_path: Path, broker: Any, port_b: str, sim_b: SimulatorServer,
                       **options: Any) -> AsyncIterator[Bridge]:
    """A bridge with A on port A and B on `port_b`; once B's link is up (its identity check
    asked), B's device (`sim_b`) appears on port A and names B there: A waits for B's link."""
    port_a = tmp_path / "port-a"
    async with bridge_on(tmp_path, broker, {A: str(port_a), B: port_b}, **options) as bridge:
        assert await wait_until(lambda: bridge.workers[B].online, timeout=10)
        await sim_b.start_pty(port_a)
        bridge.workers[A].device_present(True)  # (plugged in: opened now, not after a pause)
        assert await wait_until(lambda: bridge.workers[A].identity == f"mismatch: {B}"
                                or linked_to(bridge, B) == str(port_a), timeout=10)
        yield bridge


async def b_is_followed_and_paid(bridge: Bridge, broker: Any, sim_b: SimulatorServer,
                                 port_a: Path) -> None:
    """B ends up on port A, confirmed there, and a payment to it is approved by its device."""
    assert await wait_until(lambda: linked_to(bridge, B) == str(port_a)
                            and bridge.workers[B].identity == "confirmed", timeout=15), \
        {p: (w.identity, w.config.link.device) for p, w in bridge.workers.items()}
    async with RegisterClient(broker.host, broker.port, "TILL1", base_topic=BASE,
                              persistent=False) as till:
        answer = await till.pay(B, 12.5, timeout=15)
    assert answer["bridge"]["outcome"] == "approved", answer
    assert [e.category for e in sim_b.terminal.ledger.values()].count("Payment") == 1


def warnings(caplog: Any, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


async def past(moment: float, caplog: Any, *, error: str | None = None) -> None:
    """Until the loop's clock is past `moment` (every timer due by then has fired), and an
    error containing `error` is logged if one is given."""
    loop = asyncio.get_running_loop()
    assert await wait_until(lambda: loop.time() > moment
                            and (error is None or errors(caplog, error)),
                            timeout=moment - loop.time() + 5), errors(caplog, "")


async def b_link_names(device_b: DeviceByHand, poi_id: str) -> None:
    """The device on B's port answers B's identity check, naming `poi_id`."""
    assert await wait_until(lambda: "Diagnosis" in device_b.categories(), timeout=10)
    device_b.answer_check_as(poi_id)


def terminal_b() -> SimulatorServer:
    return SimulatorServer(Scenario(poi_id=B, default=Behaviour(delay=0.05),
                                    link=LinkBehaviour(status_hold=0.05, replug_after=0.1)),
                           "stx-etx-lrc")


async def test_b_port_left_empty_from_the_start(tmp_path, mosquitto, caplog):
    """B's cable moved into A's port, nothing plugged into B's serial port: the port opens
    but nothing answers there (no ACK, no answer). Once B's identity check has failed, B's
    link holds no device that said it is B: the terminals are followed."""
    master, slave, _ = open_pty(tmp_path / "port-b")  # a port with no cable: nobody reads
    sim_b = terminal_b()
    try:
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            async with b_heard_on_a(tmp_path, mosquitto, str(tmp_path / "port-b"), sim_b,
                                    status_timeout=2) as bridge:
                await b_is_followed_and_paid(bridge, mosquitto, sim_b, tmp_path / "port-a")
                assert linked_to(bridge, A) == str(tmp_path / "port-b")
        assert any(WAITED in m for m in caplog.messages), caplog.messages
        assert not errors(caplog, f"says it is {B}"), errors(caplog, "")
    finally:
        await sim_b.close()
        os.close(master)
        os.close(slave)


async def test_b_port_going_away_after_the_start(tmp_path, mosquitto, caplog):
    """B's port held a device that had not answered yet when A heard B; then B's port goes
    away (unplugged): B's link cannot hold B, the terminals are followed at once."""
    device_b = DeviceByHand(tmp_path / "port-b")
    sim_b = terminal_b()
    closed = False
    try:
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            async with b_heard_on_a(tmp_path, mosquitto, str(tmp_path / "port-b"),
                                    sim_b) as bridge:
                assert bridge.workers[A].identity == f"mismatch: {B}"
                assert linked_to(bridge, B) == str(tmp_path / "port-b")
                device_b.close()
                closed = True
                (tmp_path / "port-b").unlink()  # (as udev removes its /dev/poi name)
                await b_is_followed_and_paid(bridge, mosquitto, sim_b, tmp_path / "port-a")
        assert "Payment" not in device_b.categories()
        assert not errors(caplog, f"says it is {B}"), errors(caplog, "")
    finally:
        if not closed:
            device_b.close()
        await sim_b.close()


async def test_b_port_holding_a_third_unconfigured_terminal(tmp_path, mosquitto, caplog):
    """B's port holds a terminal the configuration does not know: B reports it (once), and
    A, waiting for B's link, is followed there, where it reports the same stranger (once).
    B is served on A's port; nothing goes to the stranger."""
    device_b = DeviceByHand(tmp_path / "port-b")
    sim_b = terminal_b()
    try:
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            async with b_heard_on_a(tmp_path, mosquitto, str(tmp_path / "port-b"),
                                    sim_b) as bridge:
                assert bridge.workers[A].identity == f"mismatch: {B}"
                device_b.answer_check_as(THIRD)
                await b_is_followed_and_paid(bridge, mosquitto, sim_b, tmp_path / "port-a")
                # A, now on port B, asks the stranger who it is
                assert await wait_until(
                    lambda: device_b.categories().count("Diagnosis") >= 2, timeout=10)
                device_b.answer_check_as(THIRD)
                assert await wait_until(
                    lambda: bridge.workers[A].identity == f"mismatch: {THIRD}", timeout=10)
                assert await wait_until(
                    lambda: len(errors(caplog, f"{A}: the device at")) >= 1, timeout=10)
        assert "Payment" not in device_b.categories()
        assert not errors(caplog, f"says it is {B}"), errors(caplog, "")
        for poi_id in (A, B):
            said = errors(caplog, f"terminal {poi_id}: the device at")
            assert len(said) == 1 and f"says it is {THIRD}" in said[0], errors(caplog, "")
    finally:
        device_b.close()
        await sim_b.close()


@pytest.mark.parametrize("answer", ["never", "without-poiid"])
async def test_b_port_holding_a_device_that_does_not_say_who_it_is(tmp_path, mosquitto,
                                                                   caplog, answer):
    """B's port holds a device that acknowledges frames but never answers the identity
    check, or answers it without a POIID: it has not said it is B, and B's device has named
    B on A's port. Once that check is over, the terminals are followed; no payment goes to
    the device that did not name itself."""
    device_b = DeviceByHand(tmp_path / "port-b")
    sim_b = terminal_b()
    try:
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            async with b_heard_on_a(tmp_path, mosquitto, str(tmp_path / "port-b"), sim_b,
                                    status_timeout=2) as bridge:
                if answer == "without-poiid":
                    check = [d for d in device_b.received
                             if "DiagnosisRequest" in d["SaleToPOIRequest"]][-1]
                    unnamed = responses.simple_response(check)
                    del unnamed["SaleToPOIResponse"]["MessageHeader"]["POIID"]
                    device_b.send(unnamed)
                await b_is_followed_and_paid(bridge, mosquitto, sim_b, tmp_path / "port-a")
        assert any(WAITED in m for m in caplog.messages), caplog.messages
        assert "Payment" not in device_b.categories()
        assert not errors(caplog, f"says it is {B}"), errors(caplog, "")
    finally:
        device_b.close()
        await sim_b.close()


async def test_the_wrong_device_is_reported_once_after_a_fast_drop_and_reopen(
        tmp_path, mosquitto, caplog):
    """A hears B (waiting for B's link, which has not answered), its link drops and reopens
    at once onto the same device, which names B again. The first wait's timer found the
    second mismatch and reported it, and the second's reported it again."""
    device_b = DeviceByHand(tmp_path / "port-b")  # acknowledges, answers nothing
    sim_b = terminal_b()
    loop = asyncio.get_running_loop()
    try:
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            async with b_heard_on_a(tmp_path, mosquitto, str(tmp_path / "port-b"),
                                    sim_b) as bridge:
                worker = bridge.workers[A]
                assert worker.identity == f"mismatch: {B}"
                first_heard = loop.time()
                sim_b.unplug()  # back after 0.1 s, a new pseudo-terminal at the same path
                assert await wait_until(lambda: worker.identity == "unknown", timeout=5)
                assert await wait_until(lambda: sim_b.replugs == 1, timeout=5)
                worker.device_present(True)
                assert await wait_until(lambda: worker.identity == f"mismatch: {B}",
                                        timeout=5)
                heard_again = loop.time()
                # (the first wait's timer is still armed: the case to show)
                assert heard_again - first_heard < FOLLOW_GRACE
                # B's link says B is there too (two devices say they are B): A's report is
                # due, not waiting for B's link any more
                await b_link_names(device_b, B)
                # Every timer armed so far has fired by then.
                await past(heard_again + FOLLOW_GRACE + 0.5, caplog, error=f"says it is {B}")
                assert worker.identity == f"mismatch: {B}"  # (still: never followed)
        assert len(errors(caplog, f"says it is {B}")) == 1, errors(caplog, "")
    finally:
        device_b.close()
        await sim_b.close()



@contextlib.asynccontextmanager
async def b_link_slow_to_answer(tmp_path: Path, broker: Any,
                                caplog: Any) -> AsyncIterator[tuple[Bridge, DeviceByHand,
                                                                    SimulatorServer]]:
    """B's device names B on A's port; the device on B's port (driven by hand) has not
    answered B's identity check FOLLOW_GRACE later (a stalled CPU, a slow device), and no
    error is logged meanwhile (it sent a technician after a swap the daemon followed a
    moment later). Yields the bridge, the device on B's port and B's device."""
    on_port_b = DeviceByHand(tmp_path / "port-b")
    sim_b = terminal_b()
    loop = asyncio.get_running_loop()
    try:
        async with b_heard_on_a(tmp_path, broker, str(tmp_path / "port-b"), sim_b) as bridge:
            assert bridge.workers[A].identity == f"mismatch: {B}"
            await past(loop.time() + FOLLOW_GRACE + 0.5, caplog)
            assert not errors(caplog, f"says it is {B}"), errors(caplog, "")
            assert bridge.workers[B].identity == "unknown"  # (still: the case to show)
            yield bridge, on_port_b, sim_b
    finally:
        on_port_b.close()
        await sim_b.close()


async def test_b_link_slow_to_say_who_is_there_is_waited_for(tmp_path, mosquitto, caplog):
    """Cables swapped, B's link slow to say who is there: once A's device on B's port
    answers B's identity check, the terminals are followed, and no error is logged."""
    with caplog.at_level(logging.INFO, logger="poi_bridge"):
        async with b_link_slow_to_answer(tmp_path, mosquitto, caplog) as (
                bridge, device_a, sim_b):
            await b_link_names(device_a, A)
            await b_is_followed_and_paid(bridge, mosquitto, sim_b, tmp_path / "port-a")
            assert linked_to(bridge, A) == str(tmp_path / "port-b")
    assert any(WAITED in m for m in caplog.messages), caplog.messages
    assert not errors(caplog, f"says it is {B}"), errors(caplog, "")


async def test_the_wrong_device_is_reported_once_b_link_says_b_is_there_too(
        tmp_path, mosquitto, caplog):
    """B's link slow to say who is there, then the device on B's port names B too: two
    devices say they are B. A reports its wrong device then (once), not before, and is not
    followed."""
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.INFO, logger="poi_bridge"):
        async with b_link_slow_to_answer(tmp_path, mosquitto, caplog) as (
                bridge, device_b, _):
            await b_link_names(device_b, B)
            assert await wait_until(lambda: bridge.workers[B].identity == "confirmed",
                                    timeout=10)
            await past(loop.time() + FOLLOW_GRACE + 0.5, caplog, error=f"says it is {B}")
            assert bridge.workers[A].identity == f"mismatch: {B}"  # not followed
            assert linked_to(bridge, A) == str(tmp_path / "port-a")
            assert linked_to(bridge, B) == str(tmp_path / "port-b")
    said = errors(caplog, f"says it is {B}")
    assert len(said) == 1 and said[0].startswith(f"terminal {A}: "), errors(caplog, "")
    assert any(f"{B} is also confirmed on its own link" in m for m in caplog.messages)


async def test_a_long_wait_for_b_link_is_said_once(tmp_path, mosquitto, caplog,
                                                   monkeypatch):
    """B's link does not say who is there for FOLLOW_PATIENCE (shortened here): A says so
    once, at warning, and keeps waiting, without an error (the daemon may still follow
    them); when B's link speaks the terminals are followed."""
    patience = FOLLOW_GRACE * 1.5
    loop = asyncio.get_running_loop()
    long_wait = f"{B}'s own link has not said in"
    with caplog.at_level(logging.INFO, logger="poi_bridge"):
        async with b_link_slow_to_answer(tmp_path, mosquitto, caplog) as (
                bridge, device_a, sim_b):
            # (in B's status_timeouts; asked at A's next grace, FOLLOW_GRACE * 2 after B named)
            monkeypatch.setattr(worker_module, "FOLLOW_PATIENCE",
                                patience / bridge.workers[B].config.status_timeout)
            assert await wait_until(lambda: warnings(caplog, long_wait),
                                    timeout=patience + FOLLOW_GRACE + 5), caplog.messages
            # Two more grace periods: still waiting, said once
            await past(loop.time() + 2 * FOLLOW_GRACE + 0.5, caplog)
            assert bridge.workers[A].identity == f"mismatch: {B}"
            await b_link_names(device_a, A)
            await b_is_followed_and_paid(bridge, mosquitto, sim_b, tmp_path / "port-a")
    said = warnings(caplog, long_wait)
    assert len(said) == 1 and said[0].startswith(f"terminal {A}: the device at"), said
    assert not errors(caplog, f"says it is {B}"), errors(caplog, "")


async def test_stopping_while_a_waits_for_b_link_reports_no_wrong_device(
        tmp_path, mosquitto, caplog):
    """The daemon stopped while A waited for B's slow link: stop() drains the requests (up to
    3 s) and says goodbye on MQTT (up to 2 s) before it stops the workers, and _follow_waits
    said "no longer waiting" from the first moment of the stop. A's grace timer, due during
    the drain, logged the wrong device at ERROR: a technician sent to replug after a swap the
    next start follows (found by review rv14). Here the drain lasts past that moment."""
    drained_past: list[float] = []
    with caplog.at_level(logging.INFO, logger="poi_bridge"):
        async with b_link_slow_to_answer(tmp_path, mosquitto, caplog) as (bridge, _, _):
            worker = bridge.workers[A]
            assert worker._grace_timer is not None  # (A waits: its timer is armed)
            due = worker._grace_timer.when()
            real_drain = bridge.gateway.drain_requests

            async def slow_drain() -> None:  # requests still coming in while A's grace ends
                await real_drain()
                await past(due + 0.2, caplog)
                drained_past.append(due)

            bridge.gateway.drain_requests = slow_drain
            # (bridge_on stops the bridge as this block ends)
    assert drained_past, "the drain did not outlast A's grace"
    assert not errors(caplog, f"says it is {B}"), errors(caplog, "")


async def test_the_long_wait_is_measured_by_b_own_status_timeout(tmp_path, caplog):
    """B's link decides within its identity check's status_timeout: the long wait's warning
    comes after twice that. It came after a fixed 60 s, while a check configured longer (40 s
    here: 80 s) was still legitimately running (review rv14). Asked as A's grace timer asks,
    A's device having named B 70 s, then 85 s, before."""
    def terminal(poi_id: str, **settings: Any) -> TerminalWorker:
        config = TerminalConfig.model_validate({
            "poi_id": poi_id, "link": {"kind": "serial", "device": str(tmp_path / poi_id)},
            **settings})
        return TerminalWorker(config, journal, outlet=None)

    loop = asyncio.get_running_loop()
    long_wait = f"{B}'s own link has not said in"
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        a, b = terminal(A), terminal(B, status_timeout=40)
        a.terminals = {A: a, B: b}
        a.follow_waits = lambda poi_id, said: True  # (B's link has not spoken)
        a.identity = f"mismatch: {B}"
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            a._grace_over(B, loop.time() - 70, False)
            assert not warnings(caplog, long_wait), warnings(caplog, long_wait)
            a._grace_over(B, loop.time() - 85, False)
            assert warnings(caplog, long_wait)
        a._cancel_grace()
    finally:
        journal.close()


async def test_a_refusal_b_link_cannot_change_is_reported_without_waiting_for_it(
        tmp_path, caplog):
    """A (serial) hears B's device while B's own link (TCP) is up and has not said who is
    there. Terminals on links of two kinds are never followed, whatever B's link says: A
    waited for it all the same (FOLLOW_LATER), its error held back until B's link spoke, or
    the long-wait warning saying "followed ... once it has" (review rv14, finding 3)."""
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": "127.0.0.1", "port": 1, "base_topic": BASE},
        "terminals": [{"poi_id": A, "link": {"kind": "serial",
                                              "device": str(tmp_path / "port-a")}},
                      {"poi_id": B, "link": {"kind": "tcp", "host": "127.0.0.1", "port": 1}}],
    }), hotplug=False)
    a, b = bridge.workers[A], bridge.workers[B]
    loop = asyncio.get_running_loop()
    try:
        b.session.link_is_up(loop.time())  # (as B's worker once its link opened)
        assert awaits_its_own_link(b)  # (B's link undecided: the case to show)
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            a._check_identity(SimpleNamespace(message_header=SimpleNamespace(poi_id=B)))
            assert a.identity == f"mismatch: {B}"
            assert not bridge._follow_waits(A, B)
            # (at once now; never later than A's grace, whatever B's link does meanwhile)
            assert await wait_until(lambda: errors(caplog, f"says it is {B}"),
                                    timeout=FOLLOW_GRACE + 1), caplog.messages
            assert awaits_its_own_link(b)  # B's link has still not said
        assert any("on a tcp link, and this is a serial link" in m for m in caplog.messages)
    finally:
        a._cancel_grace()
        bridge.journal.close()

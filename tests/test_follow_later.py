"""A follow that waited for the other terminal's own link (FOLLOW_LATER) is decided again
whenever what it waited for changes, and the wrong device is reported once.

B's cable is in A's port. When A's link hears B while B's own link is up and has not said
yet who is there, A waits (identity "mismatch: B"). It used to be decided again only when
B's link named A: a B port left empty (nothing answers there), going away, holding a third
terminal or a device that never says who it is left A waiting, and B refusing every
payment, until the daemon restarted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.daemon.app import Bridge
from bridge.daemon.worker import FOLLOW_GRACE
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
                # Every timer armed so far has fired by then.
                assert await wait_until(lambda: loop.time() > heard_again + FOLLOW_GRACE + 0.5
                                        and errors(caplog, f"says it is {B}"),
                                        timeout=FOLLOW_GRACE + 5)
                assert worker.identity == f"mismatch: {B}"  # (still: never followed)
        assert len(errors(caplog, f"says it is {B}")) == 1, errors(caplog, "")
    finally:
        device_b.close()
        await sim_b.close()

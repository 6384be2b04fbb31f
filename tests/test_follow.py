"""Terminals found on each other's links (swapped cables) are followed there, and each
terminal's payments, new or open, reach its own device only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.daemon.worker import TerminalWorker
from bridge.daemon.device_match import TerminalMatcher
from bridge.daemon.follow import partner_to_follow, waits_for_its_own_link
from bridge.daemon.hotplug import HotplugMonitor
from bridge.protocol.transaction import TxKey, TxState
from bridge.register_client import RegisterClient
from bridge.simulator.responses import payment_response
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .follow_rig import (A, B, BASE, KEYS, DeviceByHand, bridge_on, key_configs, linked_to,
                         simulator, wait_until)


# --- the decision -------------------------------------------------------------------------

@dataclass
class Holder:
    poi_id: str
    identity: str
    online: bool
    kind: str = "serial"
    holds_unconfirmed_sends: bool = False
    left_unnamed: bool = False

    device: str | None = None

    @property
    def config(self) -> Any:
        return SimpleNamespace(link=SimpleNamespace(
            kind=self.kind, device=self.device or f"/dev/tty-{self.poi_id}",
            host=self.poi_id, port=8443))


def decide(partner: Holder | None) -> tuple[str | None, str]:
    workers = {A: Holder(A, f"mismatch: {B}", True)}
    if partner is not None:
        workers[B] = partner
    found, why_not = partner_to_follow(workers, A, B)
    return (found.poi_id if found is not None else None), why_not


def test_a_partner_whose_link_holds_another_device_or_none_is_followed():
    assert decide(Holder(B, f"mismatch: {A}", True)) == (B, "")  # the cables swapped
    assert decide(Holder(B, "mismatch: V400m-999", True)) == (B, "")  # a third on its link
    assert decide(Holder(B, "unknown", False)) == (B, "")  # nothing on its link


@pytest.mark.parametrize("partner,why", [
    (None, "not a terminal in the configuration"),
    (Holder(B, "confirmed", True), "two devices say they are"),
    (Holder(B, "unknown", True), "has not said yet"),
    (Holder(B, "unknown", False, kind="tcp"), "on a tcp link, and this is a serial link"),
    # a payment went to that device before it said who it is: asked about there
    (Holder(B, f"mismatch: {A}", True, holds_unconfirmed_sends=True),
     "sent a request to its device before the device said who it is"),
    # both configured on one device: they would be followed back and forth for ever
    (Holder(B, f"mismatch: {A}", True, device=f"/dev/tty-{A}"), "may lead to the same device"),
])
def test_a_partner_that_may_be_on_its_own_link_is_not_followed(partner, why):
    found, why_not = decide(partner)
    assert found is None and why in why_not, why_not


def test_usb_twins_at_different_ports_are_followed_as_two_devices():
    """Two terminals of one model configured by port, their cables swapped: two devices, so
    each is followed to the other's port (one USB id pair once said they may be one)."""
    usb = {"kind": "usb", "vendor_id": "0x11ca", "product_id": "0x0219"}
    config = parse_config({"terminals": [
        {"poi_id": A, "link": {**usb, "port": "1-1.4"}},
        {"poi_id": B, "link": {**usb, "port": "1-1.5"}},
        {"poi_id": "V400m-9", "link": usb}]})
    links = {t.poi_id: t.link for t in config.terminals}

    def holder(poi_id: str, identity: str) -> SimpleNamespace:
        return SimpleNamespace(poi_id=poi_id, identity=identity, online=True,
                               holds_unconfirmed_sends=False, left_unnamed=False,
                               config=SimpleNamespace(link=links[poi_id]))

    workers = {A: holder(A, f"mismatch: {B}"), B: holder(B, f"mismatch: {A}")}
    assert partner_to_follow(workers, A, B) == (workers[B], "")
    workers["V400m-9"] = holder("V400m-9", f"mismatch: {A}")
    found, why_not = partner_to_follow(workers, "V400m-9", A)
    assert found is None and "may lead to the same device" in why_not, why_not


@pytest.mark.parametrize("a,b,waits", [
    (Holder(A, f"mismatch: {B}", True), Holder(B, "unknown", True), True),
    # refused whatever B's link says next: reported now, not once it has spoken (rv14, 3)
    (Holder(A, f"mismatch: {B}", True), Holder(B, "unknown", True, kind="tcp"), False),
    (Holder(A, f"mismatch: {B}", True), Holder(B, "unknown", True, device=f"/dev/tty-{A}"),
     False),
    (Holder(A, f"mismatch: {B}", True, holds_unconfirmed_sends=True),
     Holder(B, "unknown", True), False),
    (Holder(A, f"mismatch: {B}", True), Holder(B, f"mismatch: {A}", True), False),
])
def test_the_decision_waits_for_b_link_only_when_nothing_else_refuses_it(a, b, waits):
    assert waits_for_its_own_link({A: a, B: b}, A, B) is waits
    assert waits_for_its_own_link({A: a}, A, B) is False


def test_a_terminal_followed_to_a_slower_link_times_its_frames_at_that_links_speed(tmp_path):
    """relink() changed the link the worker opens, but its framer kept the first link's
    seconds per byte: followed from a 115200-baud port to one at 9600, each frame's ACK
    deadline (line time + ack_timeout) was twelve times too short, and a large frame was
    sent again, and given up, while its bytes were still on the wire."""
    from bridge.daemon.journal import Journal
    from bridge.transports import Backoff

    from .test_terminal_worker import RecordingOutlet

    config = parse_config({"journal": str(tmp_path / "journal.sqlite3"), "terminals": [
        {"poi_id": A, "link": {"kind": "serial", "device": "/dev/tty-a"}},
        {"poi_id": B, "link": {"kind": "serial", "device": "/dev/tty-b", "baudrate": 9600}}]})
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        worker = TerminalWorker(config.terminals[0], journal, RecordingOutlet(),
                                backoff=Backoff(initial=0.05, maximum=0.2))
        assert worker.framer.seconds_per_byte == pytest.approx(10 / 115200)
        worker.relink(config.terminals[1].link)
        assert worker.framer.seconds_per_byte == pytest.approx(10 / 9600)
        # what that speed decides: a 6300-byte frame's ACK is awaited past its line time
        worker.framer.send_frame(b"x" * 6300, 0.0)
        worker.framer.data_to_send(0.0)
        assert worker.framer.next_deadline() >= 6300 * 10 / 9600
    finally:
        journal.close()


# --- the daemon ---------------------------------------------------------------------------

async def test_swapped_cables_are_followed_and_each_terminal_gets_its_own_payments(
        tmp_path, mosquitto, caplog, monkeypatch):
    """A's cable is in B's port and B's in A's: both links hold the other terminal. The
    daemon swaps the two links instead of refusing both terminals until the cables are put
    back, and says so; each payment reaches its own terminal."""
    handed: list[asyncio.Event] = []  # what each terminal waited for: its new link released
    relink = TerminalWorker.relink
    monkeypatch.setattr(TerminalWorker, "relink", lambda self, link, released=None: (
        handed.append(released), relink(self, link, released))[-1])
    sim_a, sim_b = simulator(A), simulator(B)
    port_a = await sim_a.start_pty(tmp_path / "port-a")
    port_b = await sim_b.start_pty(tmp_path / "port-b")
    try:
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            async with bridge_on(tmp_path, mosquitto, {A: port_b, B: port_a}) as bridge:
                assert await wait_until(lambda: all(
                    w.identity == "confirmed" for w in bridge.workers.values()), timeout=15)
                # Each link handed over stays released once closed, though the worker that
                # closed it has opened another since: a shared event, cleared at that open,
                # left the other terminal waiting the full RELINK_HANDOVER (4 runs in 10)
                assert len(handed) == 2 and all(event.is_set() for event in handed)
                assert (linked_to(bridge, A), linked_to(bridge, B)) == (port_a, port_b)
                assert bridge.workers[A].state()["link"].startswith(port_a)
                async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                          base_topic=BASE, persistent=False) as till:
                    for poi_id, amount in ((A, 10.0), (B, 20.0), (A, 30.0)):
                        answer = await till.pay(poi_id, amount, timeout=15)
                        assert answer["bridge"]["outcome"] == "approved", answer
        said = [m for m in caplog.messages if "following them" in m]
        assert said, caplog.messages
        # Each waited for the other to let go of its new link before opening it.
        assert not [m for m in caplog.messages if "in use" in m], caplog.messages
        # No error sends the technician after a swap the daemon followed: the first link to
        # answer waits a moment for the other's (the soak counted 115 such errors in 600 s).
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], \
            [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        # (whichever link answered first: A's, holding B, or B's, holding A)
        assert any(f"{there} is on serial {port}, the link {here} was using: following them"
                   in said[0] and f"Put the cables back ({here} is configured on serial "
                   f"{port}, {there} on serial {other})" in said[0]
                   for here, there, port, other in ((A, B, port_b, port_a),
                                                    (B, A, port_a, port_b))), said
        # Each terminal was charged its own payments only, once each.
        assert sorted(e.request["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"][
            "AmountsReq"]["RequestedAmount"] for e in sim_a.terminal.ledger.values()
            if e.category == "Payment") == [10.0, 30.0]
        assert [e.request["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"][
            "AmountsReq"]["RequestedAmount"] for e in sim_b.terminal.ledger.values()
            if e.category == "Payment"] == [20.0]
    finally:
        await sim_a.close()
        await sim_b.close()


async def test_a_terminal_moved_to_an_empty_port_is_followed_and_the_other_waits(
        tmp_path, mosquitto):
    """B's cable was moved into A's port, and B's own port is empty: B is followed to A's
    port; A, whose device is nowhere, waits on B's old port (offline), as if unplugged."""
    sim_b = simulator(B)
    port_a = await sim_b.start_pty(tmp_path / "port-a")
    empty = str(tmp_path / "port-b")  # nothing there
    try:
        async with bridge_on(tmp_path, mosquitto, {A: port_a, B: empty}) as bridge:
            assert await wait_until(lambda: bridge.workers[B].identity == "confirmed",
                                    timeout=15)
            assert (linked_to(bridge, A), linked_to(bridge, B)) == (empty, port_a)
            assert not bridge.workers[A].online
            async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                      base_topic=BASE, persistent=False) as till:
                assert (await till.pay(B, 5.0, timeout=15))["bridge"]["outcome"] == "approved"
                refused = await till.pay(A, 6.0, timeout=15)
                assert refused["bridge"]["outcome"] == "rejected"
                assert "offline" in refused["bridge"]["error"]
        assert len(sim_b.terminal.ledger) == 1
    finally:
        await sim_b.close()


async def test_an_unknown_terminal_on_the_link_is_not_followed(tmp_path, mosquitto, caplog):
    """A device that is none of the configured terminals: nothing moves, and the terminal
    refuses requests as before (nothing is sent to that device)."""
    stranger = simulator("P400Plus-999")
    port = await stranger.start_pty(tmp_path / "port-a")
    try:
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            async with bridge_on(tmp_path, mosquitto, {A: port}) as bridge:
                assert await wait_until(
                    lambda: bridge.workers[A].identity == "mismatch: P400Plus-999", timeout=15)
                assert linked_to(bridge, A) == port
        assert any("not followed: P400Plus-999 is not a terminal in the configuration" in m
                   for m in caplog.messages), caplog.messages
        assert any("says it is P400Plus-999: nothing is sent to it" in m
                   for m in caplog.messages), caplog.messages
    finally:
        await stranger.close()


async def test_a_payment_open_when_the_cables_were_swapped_is_asked_on_its_terminal(
        tmp_path, mosquitto):
    """A's payment is on its way when the daemon stops (its answer lost); the cables are
    swapped before it starts again. The payment is asked about on A's device, on its new link, never sent
    again, and B's device never sees it."""
    sim_a = simulator(A, Behaviour(never_answer=True, delay=0.05))
    sim_b = simulator(B)
    port_a = await sim_a.start_pty(tmp_path / "port-a")
    port_b = await sim_b.start_pty(tmp_path / "port-b")
    try:
        async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1", base_topic=BASE) \
                as till:
            async with bridge_on(tmp_path, mosquitto, {A: port_a, B: port_b},
                                 payment_timeout=30) as bridge:
                assert await wait_until(lambda: all(
                    w.identity == "confirmed" for w in bridge.workers.values()), timeout=15)
                paying = asyncio.create_task(till.pay(A, 42.0, service_id="OPEN1", timeout=30))
                assert await wait_until(lambda: any(
                    t.state is TxState.AWAITING_RESPONSE
                    for t in bridge.journal.open_transactions(A)), timeout=10)
            # The cables are swapped while the daemon is down.
            async with bridge_on(tmp_path, mosquitto, {A: port_b, B: port_a},
                                 payment_timeout=30) as bridge:
                answer = await asyncio.wait_for(paying, 30)
                assert linked_to(bridge, A) == port_a
        assert (answer["bridge"]["outcome"], answer["bridge"]["source"]) == \
            ("approved", "status-poll"), answer
        assert [key for key, e in sim_a.terminal.ledger.items() if e.category == "Payment"] \
            == [("TILL1", "OPEN1")]
        assert not [e for e in sim_b.terminal.ledger.values() if e.category == "Payment"]
        assert len(sim_a.terminal.receipts[("TILL1", "OPEN1")]) == 1
    finally:
        await sim_a.close()
        await sim_b.close()


async def test_tcp_terminals_whose_addresses_swapped_are_followed_with_hotplug_running(
        tmp_path, mosquitto):
    """DHCP gave two TCP terminals each other's addresses, on a box whose udev monitor runs
    (for its USB or serial terminals). Following them, the daemon took the monitor's word
    on whether a TCP terminal's device is present, which it never is: both terminals stayed
    offline until a restart (the diff review's case)."""
    from .test_hotplug import PipeMonitor

    sim_a, sim_b = simulator(A), simulator(B)
    port_a, port_b = await sim_a.start_tcp(), await sim_b.start_tcp()
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "base_topic": BASE,
                 "client_id": "bridge-follow-test"},
        "terminals": [{"poi_id": A, "link": {"kind": "tcp", "host": "127.0.0.1",
                                              "port": port_b}},
                      {"poi_id": B, "link": {"kind": "tcp", "host": "127.0.0.1",
                                              "port": port_a}}],
    }), hotplug=False)
    monitor = PipeMonitor()
    bridge.hotplug = HotplugMonitor(TerminalMatcher(bridge.config), bridge._plugged,
                                    bridge._unplugged, monitor=monitor,
                                    enumerate_devices=list, settle=0.01)
    await bridge.start()
    try:
        assert await wait_until(lambda: bridge.gateway.connected and all(
            w.identity == "confirmed" for w in bridge.workers.values()), timeout=15), \
            [w.state() for w in bridge.workers.values()]
        assert bridge.workers[A].config.link.port == port_a
        async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1", base_topic=BASE,
                                  persistent=False) as till:
            for poi_id in (A, B):
                answer = await till.pay(poi_id, 7.0, timeout=15)
                assert answer["bridge"]["outcome"] == "approved", answer
    finally:
        await bridge.stop()
        monitor.close()
        await sim_a.close()
        await sim_b.close()


async def b_pays_then_its_cable_moves(tmp_path: Path, broker: Any, till: RegisterClient,
                                      sim_b: SimulatorServer, keys: dict | None = None,
                                      device_framing: str = "stx-etx-lrc", **options: Any
                                      ) -> tuple[asyncio.Task, dict[str, Any], DeviceByHand]:
    """B's payment OPEN1 reaches B's device, which does not answer, and the daemon stops;
    B's cable is pulled from port B and put into port A (a DeviceByHand there). Returns the
    register's pay() still waiting, the request as the device got it, and the device."""
    port_b = str(sim_b.link_path)
    async with bridge_on(tmp_path, broker, {B: port_b}, keys, payment_timeout=30,
                         **options) as bridge:
        assert await wait_until(lambda: bridge.workers[B].identity == "confirmed", timeout=15)
        paying = asyncio.create_task(till.pay(B, 42.0, service_id="OPEN1", timeout=30))
        assert await wait_until(lambda: ("TILL1", "OPEN1") in sim_b.terminal.ledger,
                                timeout=10)
    await sim_b.close()
    return (paying, sim_b.terminal.ledger[("TILL1", "OPEN1")].request,
            DeviceByHand(tmp_path / "port-a", device_framing))


@contextlib.asynccontextmanager
async def b_paying_with_its_cable_in_port_a(tmp_path: Path, broker: Any,
                                            keys: dict | None, b_key: Any
                                            ) -> AsyncIterator[tuple[Bridge, RegisterClient,
                                                                     asyncio.Task, dict,
                                                                     DeviceByHand]]:
    """b_pays_then_its_cable_moves, then the bridge started again with A (port A, where B's
    device now is) and B (its port empty), once B's device there was asked who it is.
    Yields the bridge, the register, its pay() of OPEN1 still waiting, the request as the
    device got it, and the device."""
    sim_b = simulator(B, Behaviour(never_answer=True, delay=0.05), key=b_key)
    port_b = await sim_b.start_pty(tmp_path / "port-b")
    device = None
    try:
        async with RegisterClient(broker.host, broker.port, "TILL1", base_topic=BASE) as till:
            paying, request, device = await b_pays_then_its_cable_moves(
                tmp_path, broker, till, sim_b, keys)
            try:
                async with bridge_on(tmp_path, broker, {A: str(tmp_path / "port-a"), B: port_b},
                                     keys, payment_timeout=30) as bridge:
                    assert await wait_until(lambda: "Diagnosis" in device.categories(),
                                            timeout=10)
                    yield bridge, till, paying, request, device
            finally:
                paying.cancel()
    finally:
        if device is not None:
            device.close()
        await sim_b.close()


@pytest.mark.parametrize("encrypted", [False, True], ids=["in-clear", "different-keys"])
async def test_the_answer_that_shows_the_swap_is_its_terminals_outcome(tmp_path, mosquitto,
                                                                      caplog, encrypted):
    """B's payment is on its way when B's cable is moved to A's port; B's device sends its
    answer again there (a terminal repeats a frame that got no ACK), before the bridge has
    asked who it is. That frame shows the swap. It used to be acknowledged and dropped: the
    terminal never sends it again, and the payment waited on a status poll that a terminal
    which has forgotten it (restarted) can never answer. It is B's outcome, as received. A
    payment for A waiting meanwhile is refused, saying A is looked for elsewhere (it used to
    say nothing was sent "until a technician checks" the ports). With a key of its own on
    each terminal, A's key cannot read B's answer: it is read with B's key, which
    authenticates it, instead of being taken for an unreadable answer."""
    keys = key_configs(tmp_path) if encrypted else None
    async with b_paying_with_its_cable_in_port_a(
            tmp_path, mosquitto, keys, KEYS[B] if encrypted else None) as (
            bridge, till, paying, request, device):
        # A payment for A waits for the identity check meanwhile.
        waiting = asyncio.create_task(till.pay(A, 7.0, service_id="WAIT1", timeout=20))
        assert await wait_until(lambda: bridge.workers[A].session.active is not None,
                                timeout=10)
        device.send(payment_response(request, "approve", time.time()),
                    key=KEYS[B] if encrypted else None)
        answer = await asyncio.wait_for(paying, 20)
        refused = await asyncio.wait_for(waiting, 20)
        assert linked_to(bridge, B) == str(tmp_path / "port-a")
    assert refused["bridge"]["outcome"] == "rejected", refused
    assert "the bridge now looks for V400m-111 on the link where it expected V400m-222" \
        in refused["bridge"]["error"], refused
    assert (answer["bridge"]["outcome"], answer["bridge"]["source"]) == \
        ("approved", "terminal"), answer
    assert "Payment" not in device.categories()  # never sent again
    # B waited for A to let go of port A: no "in use by another process" to mislead
    assert not [m for m in caplog.messages if "in use" in m], caplog.messages


@pytest.mark.parametrize("keyed", ["only-b-has-a-key", "each-its-own-key"])
async def test_a_message_naming_a_terminal_without_its_key_is_not_its_word(tmp_path,
                                                                          mosquitto, caplog,
                                                                          keyed):
    """B has a key; whoever can write to A's link (a tapped cable, A's LAN port) sends an
    approval of B's open payment naming B, in clear (A has no key) or authenticated with A's
    key (each has its own). It was taken as B's word: B's payment approved, B followed onto
    A's port (a review). It is not B's: B's payment stays open, B stays where it is, and the
    log says why."""
    keys = key_configs(tmp_path)
    if keyed == "only-b-has-a-key":
        keys = {B: keys[B]}
    async with b_paying_with_its_cable_in_port_a(tmp_path, mosquitto, keys, KEYS[B]) as (
            bridge, _till, paying, request, device):
        device.send(payment_response(request, "approve", time.time()),
                    key=KEYS[A] if keyed == "each-its-own-key" else None)
        assert await wait_until(lambda: paying.done() or any(
            f"naming terminal {B}" in m for m in caplog.messages), timeout=10), caplog.messages
        await asyncio.sleep(0.5)  # (time for a wrong turn to show)
        assert not paying.done(), paying.result()
        held = bridge.journal.get(TxKey("TILL1", "OPEN1"))
        assert held is not None and held.state.is_open, held
        assert held.response is None, held.response
        assert linked_to(bridge, B) != str(tmp_path / "port-a")
    said = next(m for m in caplog.messages if f"naming terminal {B}" in m)
    assert ("in clear" if keyed == "only-b-has-a-key" else f"of {A}") in said, said
    assert f"not trusted as {B}'s" in said, said


async def test_three_terminals_whose_cables_went_round_are_followed_pair_by_pair(
        tmp_path, mosquitto):
    """A's cable in B's port, B's in C's, C's in A's: no two links simply hold each other's
    terminals, yet following one pair puts one terminal on its own device and leaves the
    other two holding each other's, which are followed in turn."""
    c = "V400m-333"
    sims = {poi_id: simulator(poi_id) for poi_id in (A, B, c)}
    ports = {poi_id: await sim.start_pty(tmp_path / f"port-{poi_id}")
             for poi_id, sim in sims.items()}
    try:
        async with bridge_on(tmp_path, mosquitto, {A: ports[B], B: ports[c], c: ports[A]}) \
                as bridge:
            assert await wait_until(lambda: all(
                w.identity == "confirmed" for w in bridge.workers.values()), timeout=20), \
                {p: w.identity for p, w in bridge.workers.items()}
            assert {p: linked_to(bridge, p) for p in (A, B, c)} == ports
            async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                      base_topic=BASE, persistent=False) as till:
                for poi_id in (A, B, c):
                    answer = await till.pay(poi_id, 3.0, timeout=15)
                    assert answer["bridge"]["outcome"] == "approved", answer
        for poi_id, sim in sims.items():
            assert [e.category for e in sim.terminal.ledger.values()].count("Payment") == 1
    finally:
        for sim in sims.values():
            await sim.close()


async def test_every_frame_the_swapped_device_sends_before_the_link_moves_goes_to_its_terminal(
        tmp_path, mosquitto):
    """B's device, moved to A's port, answers A's identity check (naming B: the swap is
    found) and sends its pending payment answer again right behind it, in the same read (a
    framing without ACKs). Only the first frame used to be handed to B; the payment answer
    went to A's session, was logged 'ignored' and dropped (the diff review's case)."""
    lp = {"framer": {"name": "length-prefixed"}}
    sim_b = SimulatorServer(Scenario(poi_id=B, default=Behaviour(never_answer=True, delay=0.05),
                                     link=LinkBehaviour(status_hold=0.05)), "length-prefixed")
    port_b = await sim_b.start_pty(tmp_path / "port-b")
    device = None
    try:
        async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1", base_topic=BASE) \
                as till:
            paying, request, device = await b_pays_then_its_cable_moves(
                tmp_path, mosquitto, till, sim_b, device_framing="length-prefixed", **lp)
            async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port-a"), B: port_b},
                                 payment_timeout=30, **lp):
                assert await wait_until(lambda: "Diagnosis" in device.categories(), timeout=10)
                device.answer_check_as(B, payment_response(request, "approve", time.time()))
                answer = await asyncio.wait_for(paying, 20)
        assert (answer["bridge"]["outcome"], answer["bridge"]["source"]) == \
            ("approved", "terminal"), answer
        assert "Payment" not in device.categories()
    finally:
        if device is not None:
            device.close()
        await sim_b.close()


async def test_a_terminal_followed_to_a_link_being_opened_waits_for_that_open(
        tmp_path, mosquitto, caplog):
    """Cables swapped, and B's own link is slow to open (a USB device enumerating, a slow TCP
    connect). A's link answers first and the two are followed while B is still opening what
    is now A's link: A used to open it at once, and one of the two found it "in use by
    another process". A waits for B's open to end and B to let go of it."""
    from bridge.transports.serial import SerialTransport

    class SlowToOpen(SerialTransport):
        async def open(self) -> None:
            await asyncio.sleep(1.0)
            await super().open()

    sim_a, sim_b = simulator(A), simulator(B)
    port_a = await sim_a.start_pty(tmp_path / "port-a")
    port_b = await sim_b.start_pty(tmp_path / "port-b")
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "base_topic": BASE,
                 "client_id": "bridge-follow-test"},
        "terminals": [{"poi_id": A, "link": {"kind": "serial", "device": port_b}},
                      {"poi_id": B, "link": {"kind": "serial", "device": port_a}}],
    }), hotplug=False)
    bridge.workers[B]._transport_factory = SlowToOpen
    try:
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            await bridge.start()
            assert await wait_until(lambda: all(
                w.identity == "confirmed" for w in bridge.workers.values()), timeout=15), \
                {p: w.identity for p, w in bridge.workers.items()}
        assert (linked_to(bridge, A), linked_to(bridge, B)) == (port_a, port_b)
        assert not [m for m in caplog.messages if "in use" in m], caplog.messages
    finally:
        await bridge.stop()
        await sim_a.close()
        await sim_b.close()


async def test_the_swapped_devices_answer_reaches_its_terminal_before_the_follow_is_decided(
        tmp_path, mosquitto):
    """Cables swapped: B's device on A's port, A's device on B's port. B's device answers
    first, naming B, and sends its pending payment answer right behind it; A's device has
    not answered on B's port yet, so following waits for it (FOLLOW_LATER). The payment
    answer went to A's session meanwhile and was dropped (the review of the late commits):
    it is B's, and reaches B at once, followed or not."""
    lp = {"framer": {"name": "length-prefixed"}}
    sim_b = SimulatorServer(Scenario(poi_id=B, default=Behaviour(never_answer=True, delay=0.05),
                                     link=LinkBehaviour(status_hold=0.05)), "length-prefixed")
    port_b = await sim_b.start_pty(tmp_path / "port-b")
    device = device_a = None
    try:
        async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1", base_topic=BASE) \
                as till:
            paying, request, device = await b_pays_then_its_cable_moves(
                tmp_path, mosquitto, till, sim_b, device_framing="length-prefixed", **lp)
            device_a = DeviceByHand(Path(port_b), "length-prefixed")  # A's device, silent
            async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port-a"), B: port_b},
                                 payment_timeout=30, **lp) as bridge:
                assert await wait_until(lambda: "Diagnosis" in device.categories()
                                        and "Diagnosis" in device_a.categories(), timeout=10)
                device.answer_check_as(B, payment_response(request, "approve", time.time()))
                answer = await asyncio.wait_for(paying, 10)
                assert bridge.workers[A].identity == f"mismatch: {B}"  # not followed yet
        assert (answer["bridge"]["outcome"], answer["bridge"]["source"]) == \
            ("approved", "terminal"), answer
    finally:
        for hand in (device, device_a):
            if hand is not None:
                hand.close()
        await sim_b.close()

"""Terminals set up with keys of their own, cables swapped: the device on a link cannot take
that terminal's key, so the identity check is asked again with the other terminals' keys,
and the answer, read with the key that worked, names the terminal that is there. The
daemon then follows them as it does terminals sharing a key."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from bridge.protocol import crypto
from bridge.register_client import RegisterClient

from .follow_rig import A, B, BASE, KEYS, bridge_on, key_configs, linked_to, simulator, wait_until


def amounts(sim) -> list[float]:
    return sorted(e.request["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"][
        "AmountsReq"]["RequestedAmount"] for e in sim.terminal.ledger.values()
        if e.category == "Payment")


@contextlib.asynccontextmanager
async def each_device_on_its_own_key(tmp_path) -> AsyncIterator[tuple[Any, Any, str, str]]:
    """A's and B's simulated devices, each holding its terminal's own key, on ports A and
    B. Yields the two simulators and the two ports."""
    sim_a, sim_b = simulator(A, key=KEYS[A]), simulator(B, key=KEYS[B])
    try:
        port_a = await sim_a.start_pty(tmp_path / "port-a")
        port_b = await sim_b.start_pty(tmp_path / "port-b")
        yield sim_a, sim_b, port_a, port_b
    finally:
        await sim_a.close()
        await sim_b.close()


async def both_found_on_their_own_devices(bridge: Any, port_a: str, port_b: str) -> None:
    """Both terminals confirmed by their devices, A's link now port A and B's port B."""
    assert await wait_until(lambda: all(
        w.identity == "confirmed" for w in bridge.workers.values()), timeout=15), \
        {p: w.identity for p, w in bridge.workers.items()}
    assert (linked_to(bridge, A), linked_to(bridge, B)) == (port_a, port_b)


async def both_found_and_paid(bridge: Any, broker: Any, port_a: str, port_b: str) -> None:
    """both_found_on_their_own_devices, then a payment of 10.00 on A and 20.00 on B, each
    approved (amounts() tells on which device each ran)."""
    await both_found_on_their_own_devices(bridge, port_a, port_b)
    async with RegisterClient(broker.host, broker.port, "TILL1", base_topic=BASE,
                              persistent=False) as till:
        for poi_id, amount in ((A, 10.0), (B, 20.0)):
            answer = await till.pay(poi_id, amount, timeout=15)
            assert answer["bridge"]["outcome"] == "approved", answer


async def test_swapped_terminals_with_different_keys_are_followed_and_paid_on_their_own(
        tmp_path, mosquitto, caplog):
    """Each device answered the other terminal's check (encrypted with the other key) with
    a crypto error that names nobody: both terminals refused every payment until the cables
    were put back. Asked with the other key, each device names itself, and both are
    followed."""
    keys = key_configs(tmp_path)
    async with each_device_on_its_own_key(tmp_path) as (sim_a, sim_b, port_a, port_b):
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            async with bridge_on(tmp_path, mosquitto, {A: port_b, B: port_a}, keys) as bridge:
                await both_found_and_paid(bridge, mosquitto, port_a, port_b)
        assert [m for m in caplog.messages if "following them" in m], caplog.messages
        assert any(f"asking which terminal it is with {B}'s key" in m for m in caplog.messages)
        assert (amounts(sim_a), amounts(sim_b)) == ([10.0], [20.0])
        # No key material in any line (the passphrases are the tests' own)
        assert not [m for m in caplog.messages if "passphrase of terminal" in m]


async def test_a_terminal_in_a_key_rotation_is_found_and_only_its_own_device_sets_its_key(
        tmp_path, mosquitto, caplog):
    """A is in a key rotation (key v2, previous_key v1) and its device still holds v1; the
    cables of A and B are swapped. B's device refuses A's check with a crypto error, which
    turned A to its other key as if A's terminal had said so (a review); A is asked with
    its other key and then with B's, B's device names B, and the two are followed. Only A's
    own device, under v1, sets the key A is sent with and the state document shows."""
    keys = key_configs(tmp_path)
    (tmp_path / "new-a").write_text("the new passphrase of terminal A")
    rotated = {A: {**keys[A], "version": 2, "passphrase_file": str(tmp_path / "new-a")}}
    async with each_device_on_its_own_key(tmp_path) as (sim_a, _sim_b, port_a, port_b):
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            async with bridge_on(tmp_path, mosquitto, {A: port_b, B: port_a},
                                 {**keys, **rotated}, previous_keys={A: keys[A]}) as bridge:
                await both_found_on_their_own_devices(bridge, port_a, port_b)
                async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                          base_topic=BASE, persistent=False) as till:
                    answer = await till.pay(A, 10.0, timeout=15)
                assert answer["bridge"]["outcome"] == "approved", answer
                assert bridge.workers[A].state()["key"] == f"Key-{A} v1"
                assert bridge.workers[B].state()["key"] == f"Key-{B} v1"
        switched = [m for m in caplog.messages if "now sends with key" in m]
        assert switched == [m for m in switched if "its messages come with it" in m], switched
        assert len(switched) == 1 and f"terminal {A}:" in switched[0], switched
        assert amounts(sim_a) == [10.0]


async def test_swapped_terminals_both_in_a_key_rotation_are_found_at_the_start(
        tmp_path, mosquitto):
    """Both terminals in a key rotation (key v2, previous_key v1), both devices still on v1,
    their cables swapped before the daemon starts, so neither has been heard. Each link asks
    the device with its own two keys, then with the other terminal's key and other key: the
    other key reads it (a check asked with each terminal's `key` alone found neither, and
    both stayed refused)."""
    keys = key_configs(tmp_path)
    rotated = {}
    for poi_id in (A, B):
        (tmp_path / f"new-{poi_id}").write_text(f"the new passphrase of {poi_id}")
        rotated[poi_id] = {**keys[poi_id], "version": 2,
                           "passphrase_file": str(tmp_path / f"new-{poi_id}")}
    async with each_device_on_its_own_key(tmp_path) as (sim_a, sim_b, port_a, port_b):
        async with bridge_on(tmp_path, mosquitto, {A: port_b, B: port_a}, rotated,
                             previous_keys=keys) as bridge:
            await both_found_and_paid(bridge, mosquitto, port_a, port_b)
        assert (amounts(sim_a), amounts(sim_b)) == ([10.0], [20.0])


async def test_a_terminal_in_a_key_rotation_moved_into_another_ones_port_is_found(
        tmp_path, mosquitto):
    """B is in a key rotation (key v2, previous_key v1), its device holds v1 and was heard
    so on B's port; then its cable goes into A's port (A's device is nowhere). A's link asks
    the device with B's key: the one B's device was heard with (v1), not B's `key` (v2),
    which it cannot read (a device in a rotation behind a swapped cable was never found)."""
    keys = key_configs(tmp_path)
    (tmp_path / "new-b").write_text("the new passphrase of terminal B")
    rotated = {B: {**keys[B], "version": 2, "passphrase_file": str(tmp_path / "new-b")}}
    sim_b = simulator(B, key=KEYS[B])
    port_b = await sim_b.start_pty(tmp_path / "port-b")
    port_a = tmp_path / "port-a"
    try:
        async with bridge_on(tmp_path, mosquitto, {A: str(port_a), B: port_b},
                             {**keys, **rotated}, previous_keys={B: keys[B]}) as bridge:
            assert await wait_until(lambda: bridge.workers[B].state()["key"] == f"Key-{B} v1",
                                    timeout=15)
            # B's cable pulled from port B and put into port A
            sim_b.link_path = None
            sim_b.unplug()
            os.unlink(port_b)
            sim_b.link_path = port_a
            assert await wait_until(lambda: linked_to(bridge, B) == str(port_a), timeout=20), \
                {p: w.identity for p, w in bridge.workers.items()}
            assert await wait_until(lambda: bridge.workers[B].identity == "confirmed",
                                    timeout=15)
            async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                      base_topic=BASE, persistent=False) as till:
                paid = await till.pay(B, 20.0, timeout=15)
        assert paid["bridge"]["outcome"] == "approved", paid
        assert amounts(sim_b) == [20.0]
    finally:
        await sim_b.close()


async def test_a_terminal_moved_into_another_ones_port_with_its_own_key_is_found(
        tmp_path, mosquitto):
    """B's device in A's port, nothing in B's: B is found there with B's key and followed,
    so B takes payments again; A, whose device is nowhere, is offline, and nothing of A's
    reaches B's device."""
    keys = key_configs(tmp_path)
    sim_b = simulator(B, key=KEYS[B])
    port_b = await sim_b.start_pty(tmp_path / "port-b")
    try:
        empty = str(tmp_path / "port-a")  # A's device is nowhere
        async with bridge_on(tmp_path, mosquitto, {A: port_b, B: empty}, keys) as bridge:
            assert await wait_until(lambda: bridge.workers[B].identity == "confirmed",
                                    timeout=15)
            assert linked_to(bridge, B) == port_b
            async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                      base_topic=BASE, persistent=False) as till:
                paid = await till.pay(B, 20.0, timeout=15)
                refused = await till.pay(A, 5.0, timeout=15)
        assert paid["bridge"]["outcome"] == "approved", paid
        assert refused["bridge"]["outcome"] == "rejected", refused
        assert "offline" in refused["bridge"]["error"], refused
        assert amounts(sim_b) == [20.0]
    finally:
        await sim_b.close()


async def test_a_device_no_configured_key_reads_is_refused_naming_what_was_tried(
        tmp_path, mosquitto):
    """A device set up with a key none of the terminals has: every key is tried, none is
    read, and a payment is refused (nothing sent) saying why with the terminal's own key,
    which others were tried, and that it may be another terminal."""
    keys = key_configs(tmp_path)
    stranger = crypto.NexoKey("Key-other", 1, "a passphrase nobody configured")
    sim = simulator(A, key=stranger)
    port = await sim.start_pty(tmp_path / "port-x")
    try:
        empty = str(tmp_path / "port-b")
        async with bridge_on(tmp_path, mosquitto, {A: port, B: empty}, keys) as bridge:
            async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                      base_topic=BASE, persistent=False) as till:
                refused = await till.pay(A, 5.0, timeout=20)
            assert bridge.workers[A].identity == "unknown"
        assert refused["bridge"]["outcome"] == "rejected", refused
        error = refused["bridge"]["error"]
        assert "cannot decrypt our message" in error, error
        assert f"key Key-{A} v1" in error, error
        assert f"asked again with {B}'s key (in case it is that terminal): not read " \
            "either" in error, error
        assert "a passphrase" not in error
        assert not sim.terminal.ledger  # nothing reached the device
    finally:
        await sim.close()

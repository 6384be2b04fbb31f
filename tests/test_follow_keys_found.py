"""What the soak with a key per terminal found (bench/soak.py --keys per-terminal, seeds 31,
33 and 34, 2026-11-30): the identity check asked again with the other terminals' keys
(617025e) takes a plain crypto error, which names no ServiceID, as the answer to whatever
the link waits for at that moment. Each test plays the order of frames the soak saw, with a
device driven by hand; each failed on the code before the fix that follows it.

The first: after a follow, a device's plain crypto error (its late answer to what the other
terminal's worker sent on that port with the other key) came just before its answer to the
check, which named the terminal: the check was asked again with every other key, the device
(which has its own key) refused each one, and the last refusal logged "the terminal refused
the identity check ... no payment goes to the device until it says which terminal it is",
a few milliseconds after "identity confirmed by the terminal", while payments went to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import pytest

from bridge.protocol import crypto
from bridge.simulator import responses

from .follow_rig import A, B, KEYS, DeviceByHand, bridge_on, key_configs, wait_until

CRYPTO_ERROR = {"errors": ["Nexo Service: crypto error (3)"], "ServiceID": "-NULL-"}


async def test_a_device_that_names_itself_during_the_key_rotation_is_not_called_unnamed(
        tmp_path, mosquitto, caplog):
    keys = key_configs(tmp_path)
    device = DeviceByHand(tmp_path / "port-a")
    try:
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            async with bridge_on(tmp_path, mosquitto,
                                 {A: str(tmp_path / "port-a"), B: str(tmp_path / "port-b")},
                                 keys) as bridge:
                assert await wait_until(lambda: len(device.received) >= 1, timeout=15)
                own_check = crypto.decrypt_message(device.received[0], KEYS[A])
                assert "DiagnosisRequest" in own_check["SaleToPOIRequest"]
                # a crypto error left over from before: the bridge asks with B's key
                device.send(CRYPTO_ERROR)
                assert await wait_until(lambda: len(device.received) >= 2, timeout=15)
                with pytest.raises(crypto.CryptoError):
                    crypto.decrypt_message(device.received[1], KEYS[A])
                # the answer to the first check names A: the device is A
                named = responses.simple_response(own_check)
                named["SaleToPOIResponse"]["MessageHeader"]["POIID"] = A
                device.send(named, key=KEYS[A])
                assert await wait_until(lambda: bridge.workers[A].identity == "confirmed",
                                        timeout=15)
                confirmed_at = len(caplog.messages)
                # A cannot read the check sent with B's key, and says so
                device.send(CRYPTO_ERROR)
                identity = bridge.workers[A].session.identity
                assert await wait_until(lambda: identity.check is None, timeout=15)
                assert bridge.workers[A].identity == "confirmed"
                after = caplog.messages[confirmed_at:]
                assert not [m for m in after if "until it says which terminal it is" in m], \
                    after
                assert identity.unnamed_checks == 0
        assert len([d for d in device.received if json.dumps(d).count("NexoBlob")]) == 2
    finally:
        device.close()


async def test_a_crypto_error_to_a_check_with_another_key_does_not_end_a_payment(
        tmp_path, mosquitto):
    """Found by the soak (--keys per-terminal, seeds 33 and 34, lost: 'terminal charged,
    register told error'). After a follow, the device had not yet answered two messages the
    other terminal's worker had sent it on that port with the other key: its two crypto
    errors came first. The first started the round of checks with the other keys, the second
    ended it (B's check taken as refused); then the device answered the bridge's own check,
    naming A, so the payment went out; then came the device's crypto error to B's check
    (it answers in the order it received), taken as the payment's answer: 'error
    (terminal): cannot decrypt our message', and the device's approval of the payment, a
    moment later, was ignored as late: charged, and the register told error."""
    from bridge.register_client import RegisterClient

    from .follow_rig import BASE

    keys = key_configs(tmp_path)
    device = DeviceByHand(tmp_path / "port-a")
    try:
        async with bridge_on(tmp_path, mosquitto,
                             {A: str(tmp_path / "port-a"), B: str(tmp_path / "port-b")},
                             keys) as bridge:
            assert await wait_until(lambda: len(device.received) >= 1, timeout=15)
            own_check = crypto.decrypt_message(device.received[0], KEYS[A])
            device.send(CRYPTO_ERROR)  # two left over from before the follow
            assert await wait_until(lambda: len(device.received) >= 2, timeout=15)
            device.send(CRYPTO_ERROR)  # (taken as the answer to B's check)
            assert await wait_until(lambda: bridge.workers[A].session.identity.check is None,
                                    timeout=15)
            named = responses.simple_response(own_check)
            named["SaleToPOIResponse"]["MessageHeader"]["POIID"] = A
            device.send(named, key=KEYS[A])  # then its answer to the bridge's check: it is A
            assert await wait_until(lambda: bridge.workers[A].identity == "confirmed",
                                    timeout=15)
            async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                      base_topic=BASE, persistent=False) as till:
                paying = asyncio.create_task(till.pay(A, 12.5, timeout=20))

                def payment_request() -> dict | None:
                    for document in device.received[2:]:
                        with contextlib.suppress(crypto.CryptoError):
                            document = crypto.decrypt_message(document, KEYS[A])
                            if "PaymentRequest" in document["SaleToPOIRequest"]:
                                return document
                    return None

                assert await wait_until(lambda: payment_request() is not None, timeout=15)
                # In the order it received them: B's check, which it cannot read, then the
                # payment, which it approves (and charges)
                device.send(CRYPTO_ERROR)
                device.send(responses.payment_response(payment_request(), "approve",
                                                       time.time()), key=KEYS[A])
                answer = await paying
        assert answer["bridge"]["outcome"] == "approved", answer["bridge"]
    finally:
        device.close()


async def test_a_late_crypto_error_to_the_identity_check_still_tries_the_other_keys(
        tmp_path, mosquitto, caplog):
    """Found by the soak (--keys per-terminal, seed 34, stuck: four terminals not followed
    for 27 s). At a daemon start B's device, on A's link, answered A's identity check only
    after status_timeout (the box busy, the device slow): its crypto error came with no check
    on the wire, was logged as 'ERROR ... cannot decrypt our message' and dropped, so B's key
    was never tried. With no request for A, nothing asked again: A stayed 'identity unknown',
    and the terminal whose link held A's device was never followed ('not followed: A's own
    link has not said yet which terminal is there')."""
    keys = key_configs(tmp_path)
    device = DeviceByHand(tmp_path / "port-a")  # B's device, which only B's key reads
    try:
        async with bridge_on(tmp_path, mosquitto,
                             {A: str(tmp_path / "port-a"), B: str(tmp_path / "port-b")},
                             keys, status_timeout=1.0) as bridge:
            identity = bridge.workers[A].session.identity
            assert await wait_until(lambda: len(device.received) >= 1, timeout=15)
            assert await wait_until(lambda: identity.unnamed_checks >= 1, timeout=15)
            device.send(CRYPTO_ERROR)  # B's device's late answer to A's check
            answered = 1

            def asked_with_b() -> bool:
                """Whether a check with B's key came; each one with A's key is answered
                with a crypto error, as B's device would."""
                nonlocal answered
                for document in device.received[answered:]:
                    answered += 1
                    try:
                        crypto.decrypt_message(document, KEYS[B])
                        return True
                    except crypto.CryptoError:
                        device.send(CRYPTO_ERROR)
                return False

            assert await wait_until(asked_with_b, timeout=10), (
                len(device.received), [m for m in caplog.messages if "V400m" in m][-5:])
    finally:
        device.close()

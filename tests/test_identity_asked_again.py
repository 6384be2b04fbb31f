"""A device that named another terminal once is asked again who it is.

Nothing is sent to a device that named another terminal (no payment, no status poll). It
used to be never asked again either: a device that answered one identity check for another
terminal (a glitch) shut its terminal out until a technician replugged it, though its next
answer would have named it (review rv5). It is now asked again after a pause that doubles
(identity.RECHECK_FIRST, RECHECK_MAX); a DiagnosisRequest is harmless on any terminal. So is
one that named another terminal in a message nothing asked for (an event), while its terminal
is idle and nothing else is due (review rv6).
"""

from __future__ import annotations

import pytest

from bridge.protocol import identity

from .follow_rig import A, DeviceByHand, bridge_on, wait_until


def event_naming(poi_id: str) -> dict:
    return {"SaleToPOIRequest": {
        "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Event",
                          "MessageCategory": "Event", "MessageType": "Notification",
                          "ServiceID": "E1", "DeviceID": "1", "SaleID": "any",
                          "POIID": poi_id},
        "EventNotification": {"TimeStamp": "2026-12-01T05:00:00Z",
                              "EventToNotify": "Shutdown"}}}


@pytest.mark.parametrize("how", ["check", "event"])
async def test_a_device_that_named_another_terminal_once_is_asked_again(tmp_path, mosquitto,
                                                                         monkeypatch, how):
    """`check`: its answer to the identity check named another terminal; `event`: a message
    nothing asked for did, the terminal confirmed and idle, nothing else due."""
    monkeypatch.setattr(identity, "RECHECK_FIRST", 1.0)
    port = tmp_path / "port-a"
    device = DeviceByHand(port)
    try:
        async with bridge_on(tmp_path, mosquitto, {A: str(port)}, status_timeout=1) as bridge:
            assert await wait_until(lambda: "Diagnosis" in device.categories(), 10)
            if how == "check":
                device.answer_check_as("V400m-999")  # once
            else:
                device.answer_check_as(A)
                assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 5)
                device.send(event_naming("V400m-999"))  # another unit, for a moment
            assert await wait_until(lambda: bridge.workers[A].identity.startswith("mismatch"), 5)
            # asked again after RECHECK_FIRST (here 1 s)
            asked = device.categories().count("Diagnosis")
            assert await wait_until(lambda: device.categories().count("Diagnosis") > asked, 10), \
                (device.categories(), bridge.workers[A].session.identity.recheck_at,
                 bridge.workers[A].session.next_deadline())
            assert set(device.categories()) == {"Diagnosis"}  # nothing else went to it
            device.answer_check_as(A)  # the device names its terminal now
            assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 5)
    finally:
        device.close()

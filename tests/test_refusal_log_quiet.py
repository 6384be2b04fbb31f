"""A register looping on a bad request wrote one WARNING per refusal, ~585 a minute (35,000
an hour), burying everything else in the journal (field review, 2026-12-02). Against a real
mosquitto and a real bridge: every request is still answered, but each sender and kind of
refusal is logged in full once, then counted in at most one summary line per interval; and
the groups are bounded, however many SaleIDs a sender makes up. (The interval, a minute in
the daemon, is scaled down to 1 s.)"""

from __future__ import annotations

import asyncio
import logging
import re

from bridge.daemon import quiet
from bridge.simulator import responses

from .rig import POI, Subscriber
from .test_daemon_mqtt import BASE, Store, default_scenario, eventually, request_topic

UNKNOWN = "V400m-999999999"


def _counted(messages: list[str], pattern: str) -> int:
    return sum(int(m.group(1)) for m in map(re.compile(pattern).search, messages) if m)


async def test_a_register_looping_on_refused_requests_is_logged_once_then_counted(
        tmp_path, mosquitto, caplog, monkeypatch):
    monkeypatch.setattr(quiet, "REFUSALS_QUIET", 1.0)
    caplog.set_level(logging.WARNING, logger="poi_bridge")
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/registers/#", f"{BASE}/bridge/error"]) as sub:
        for n in range(30):  # not JSON, as one register's loop sends it
            await sub.publish(f"{request_topic()}/POS1", '{"SaleToPOIRequest": {')
        for n in range(20):  # to a terminal this bridge does not have
            await sub.publish(f"{request_topic(UNKNOWN)}/POS2",
                              responses.payment_request("POS2", f"U{n}", UNKNOWN))
        for n in range(20):  # on a topic a level too deep (refused by the MQTT side)
            await sub.publish(f"{request_topic()}/POS3/x",
                              responses.payment_request("POS3", f"D{n}", POI))
        # Every one is still answered, as before
        await eventually(lambda: len(sub.on(f"{BASE}/registers/POS1/response")) == 30
                         and len(sub.on(f"{BASE}/registers/POS2/response")) == 20
                         and len(sub.on(f"{BASE}/bridge/error")) == 20)
        # The counts come at the end of the interval, also once the loop has stopped
        await eventually(lambda: _counted(caplog.messages, r"refused (\d+) more like this "
                                          r"from SaleID POS1 ") == 29
                         and _counted(caplog.messages, r"refused (\d+) more like this from "
                                      r"SaleID POS2 ") == 19
                         and _counted(caplog.messages, r"refused (\d+) more messages like "
                                      r"this on \S+/POS3/x ") == 19, timeout=5)
    said = caplog.messages
    pos1 = [m for m in said if "POS1" in m]
    assert len([m for m in pos1 if "refused: request is unusable: not valid JSON" in m]) == 1
    # One summary per interval at most: the 30 were sent within one or two intervals
    summaries = [m for m in pos1 if "more like this" in m]
    assert 1 <= len(summaries) <= 2, pos1
    assert all(m.startswith(f"request for terminal {POI}: refused ")
               and m.endswith("(request is unusable)") for m in summaries), summaries
    pos2 = [m for m in said if "POS2" in m]
    assert len([m for m in pos2 if f"refused: unknown terminal {UNKNOWN}" in m]) == 1, pos2
    assert any("last ServiceID U19" in m for m in pos2), pos2
    deep = [m for m in said if "/POS3/x" in m]
    assert len([m for m in deep if "was refused: request topic refused" in m]) == 1, deep
    assert len(said) <= 3 + 6, said  # three first lines, at most two summaries each


async def test_made_up_sale_ids_do_not_grow_the_groups_or_the_log(
        tmp_path, mosquitto, caplog, monkeypatch):
    """A sender making up a SaleID per request opens a group per request: past
    max_groups (64) the rest share one, counted in one summary. (An interval long enough
    for all 100 to come within it.)"""
    monkeypatch.setattr(quiet, "REFUSALS_QUIET", 4.0)
    caplog.set_level(logging.WARNING, logger="poi_bridge")
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
        for n in range(100):
            await sub.publish(f"{request_topic()}/R{n}", "not json")
        await eventually(lambda: sum(len(sub.on(f"{BASE}/registers/R{n}/response"))
                                     for n in range(100)) == 100)
        await eventually(lambda: any("too many at once" in m for m in caplog.messages),
                         timeout=8)
        await asyncio.sleep(0.1)
    full = [m for m in caplog.messages if " refused: request is unusable" in m]
    assert len(full) == 64 + 1, len(full)  # the groups held, and the first of the others
    assert _counted(caplog.messages, r"refused (\d+) more requests in the last") == 35, \
        caplog.messages[-3:]

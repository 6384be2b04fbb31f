"""A register looping on a bad request wrote one WARNING per refusal, ~585 a minute (35,000
an hour), burying everything else in the journal (field review, 2026-12-02). Against a real
mosquitto and a real bridge: every request is still answered, but each sender and kind of
refusal is logged in full once, then counted in at most one summary line per interval; and
the groups are bounded, however many SaleIDs a sender makes up. (The interval, a minute in
the daemon, is scaled down to 1 s.)"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from bridge.daemon import quiet
from bridge.daemon.intake import _conflict_error, _refusal_kind
from bridge.protocol.transaction import Transaction, TxState, request_digest
from bridge.simulator import responses

from .rig import POI, Subscriber
from .test_daemon_mqtt import BASE, Store, default_scenario, eventually, request_topic
from .test_intake_fuzz import Rig

BASE_DEFAULT = "poi-bridge"  # (the intake rig's configuration leaves base_topic as it comes)

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


def _named(caplog, word: str) -> list[str]:
    return [m for m in caplog.messages if word in m]


def test_another_registers_refusal_is_named_after_a_flood_of_made_up_senders(tmp_path, caplog):
    """Review: once the groups held 64 made-up senders, every new one shared OTHERS and only
    the first of those was logged in full: a real register's refusal of another kind then
    left no line naming it. Past the bound, the first of each kind is still logged in full.
    (The intake alone, on a real journal.)"""
    rig = Rig(tmp_path / "j.sqlite3")
    caplog.set_level(logging.INFO, logger="poi_bridge")
    topic = f"{BASE_DEFAULT}/terminals/{POI}/request"
    try:
        for n in range(64):  # one client making up a SaleID per bad request
            rig.handle(f"{topic}/BOT{n}", b"{not json")
        stale = responses.payment_request("TILL7", "S1", POI)  # stamped long ago
        stale["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
            "TimeStamp"] = "2020-01-01T00:00:00+00:00"
        rig.handle(f"{topic}/TILL7", json.dumps(stale).encode())
        other = responses.payment_request("TILL8", "S9", "P400Plus-9")  # another terminal's
        assert rig.handle(f"{topic}/TILL8", json.dumps(other).encode())  # (answered)
        for n in (64, 65):  # the flood's kind past the bound: its first in full, then counted
            rig.handle(f"{topic}/BOT{n}", b"{not json")
    finally:
        rig.journal.close()
    assert len(_named(caplog, "SaleID=TILL7")) == 1, _named(caplog, "TILL7")
    (till8,) = _named(caplog, "SaleID=TILL8")
    assert "MessageHeader.POIID P400Plus-9 does not match" in till8, till8
    assert len(_named(caplog, "SaleID=BOT64")) == 1 and not _named(caplog, "BOT65"), \
        _named(caplog, "BOT6")


def test_a_refusals_kind_leaves_out_the_ids_the_register_wrote():
    """The kind of a refusal groups one register's repeats: text it quotes from the request
    without quotes (a ServiceID, a POIID) made each repeat a kind, and a group, of its own:
    logged in full every time, and the groups filled by one register."""
    def kind(service_id: str, poi_id: str) -> tuple[str, str]:
        document = responses.payment_request("TILL1", service_id, poi_id)
        used = Transaction(sale_id="TILL1", service_id=service_id, poi_id=POI,
                           category="Payment", request=document,
                           digest=request_digest(document), created_at=0.0, updated_at=0.0,
                           state=TxState.FINAL, outcome="approved")
        again = responses.payment_request("TILL1", service_id, poi_id, 99.0)
        return (_refusal_kind(_conflict_error(used, again, 60.0)),
                _refusal_kind(f"MessageHeader.POIID {poi_id} does not match the topic's "
                              f"terminal {POI}"))
    assert kind("S1", "P400Plus-1") == kind("QX", "V400m-2")


async def test_repeats_still_counted_are_logged_when_the_bridge_stops(
        tmp_path, mosquitto, caplog):
    """Review: a register looping on a bad request, the bridge stopped within the minute:
    the count of the repeats was never logged. Bridge.stop logs each count held."""
    caplog.set_level(logging.WARNING, logger="poi_bridge")
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
        for _ in range(30):
            await sub.publish(f"{request_topic()}/POS1", '{"SaleToPOIRequest": {')
        for n in range(5):  # on a topic a level too deep (refused by the MQTT side)
            await sub.publish(f"{request_topic()}/POS3/x",
                              responses.payment_request("POS3", f"D{n}", POI))
        await eventually(lambda: len(sub.on(f"{BASE}/registers/POS1/response")) == 30)
        await eventually(lambda: len(_named(caplog, "/POS3/x")) == 1)
        await asyncio.sleep(0.2)  # (the last of the five handled)
        assert not _named(caplog, "more like this"), _named(caplog, "more like this")
    # (stopped: well within the minute)
    assert _counted(caplog.messages, r"refused (\d+) more like this from SaleID POS1 ") == 29, \
        _named(caplog, "POS1")
    assert _counted(caplog.messages, r"refused (\d+) more messages like this on \S+/POS3/x ") \
        == 4, _named(caplog, "POS3")

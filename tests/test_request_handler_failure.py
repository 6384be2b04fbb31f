"""A request whose handling fails (review rev1, second part): a bug is answered on the
register's own response topic too, not only on bridge/error, which a register that listens
only on its own topics never hears; a journal that cannot be read while the request is
checked stops the daemon (the journal's failure listener) instead of acknowledging it."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiomqtt

from bridge.daemon.journal import Journal
from bridge.daemon.registers import topic_safe
from bridge.simulator import responses

from .follow_rig import BASE, B, bridge_on, wait_until
from .rig import POI, Subscriber
from .test_daemon_mqtt import BASE as GATEWAY_BASE, eventually, request_topic, running
from .test_mqtt_faults import gateway_for
from .test_terminal_request_correlation_data import answer_on
from .test_unresolved_retry import TILL, order, ready, terminals


def broken(*_: Any, **__: Any) -> None:
    raise RuntimeError("a bug")


async def answer_after_a_bug(tmp_path: Path, mosquitto: Any,
                            request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """What the register gets on its response topic for `request` (for terminal B) when the
    handling fails, and the simulated terminal B."""
    async with terminals(tmp_path) as (_, sim_b, links), \
            bridge_on(tmp_path, mosquitto, links) as bridge, \
            Subscriber(mosquitto, [f"{BASE}/registers/{TILL}/#"]) as register:
        await ready(bridge)
        bridge.gateway.set_request_handler(broken)
        await register.publish(f"{BASE}/terminals/{B}/request/{TILL}", request)
        answer = await register.wait_for(
            lambda t, p: t == f"{BASE}/registers/{TILL}/response", timeout=15)
        return answer, sim_b


async def test_a_request_whose_handling_fails_is_answered_on_the_registers_topic(
        tmp_path: Path, mosquitto: Any) -> None:
    answer, sim_b = await answer_after_a_bug(tmp_path, mosquitto, order("E1", B))
    info = answer["bridge"]
    assert (info["outcome"], info["source"]) == ("error", "bridge"), answer
    assert info["transaction"]["service_id"] == "E1", answer
    assert "internal error" in info["error"] and "Do not charge again" in info["error"]
    header = answer["SaleToPOIResponse"]["MessageHeader"]
    assert (header["SaleID"], header["ServiceID"]) == (TILL, "E1"), answer
    assert not sim_b.terminal.ledger  # nothing was started


async def test_a_journal_read_that_fails_stops_the_daemon_instead_of_acknowledging(
        tmp_path: Path, mosquitto: Any, monkeypatch: Any) -> None:
    failures: list[BaseException] = []
    async with terminals(tmp_path) as (_, sim_b, links), \
            Subscriber(mosquitto, [f"{BASE}/registers/{TILL}/#", f"{BASE}/bridge/error"]) \
            as register:
        async with bridge_on(tmp_path, mosquitto, links) as bridge:
            await ready(bridge)
            bridge.journal.on_failure(failures.append)

            def unreadable(*_: Any, **__: Any) -> None:
                raise sqlite3.DatabaseError("database disk image is malformed")

            monkeypatch.setattr(bridge.journal, "get", unreadable)
            monkeypatch.setattr(bridge.journal, "open_payments", unreadable)
            await register.publish(f"{BASE}/terminals/{B}/request/{TILL}", order("J1", B))
            assert await wait_until(lambda: failures, timeout=15), (
                "a journal read failed and the failure listener (which stops the daemon) "
                "was not told")
            assert isinstance(failures[0], sqlite3.DatabaseError)
            # (in the daemon the listener ends the process; here the MQTT side, which no
            # reconnect can help, stops the bridge: it is not left serving)
            await asyncio.wait_for(bridge.wait_stopped(), 15)
            monkeypatch.undo()
        # The journal can be read again (the disk was fixed, the daemon started again): the
        # request, never acknowledged, comes again and is paid
        async with bridge_on(tmp_path, mosquitto, links):
            answer = await register.wait_for(
                lambda t, p: t.endswith("/response") and isinstance(p, dict), timeout=30)
        assert answer["bridge"]["outcome"] == "approved", answer
        assert not [p for t, p, _ in register.messages if t.endswith("/bridge/error")]
        assert [service for (_, service), e in sim_b.terminal.ledger.items()
                if e.category == "Payment"] == ["J1"]


def test_no_sale_id_is_not_topic_safe():
    """topic_safe(None) is False, as it was before be69c79 cached it: the cache made it
    len(None), a TypeError (the plain terminal topic's route has no SaleID: below)."""
    assert topic_safe(None) is False
    assert topic_safe("") is False


async def test_a_bug_on_the_plain_terminal_topic_is_answered_and_acknowledged(
        tmp_path: Path, mosquitto: Any, caplog: Any) -> None:
    """A request on .../terminals/{POIID}/request (no SaleID level) whose handling fails is
    answered on bridge/error. Since be69c79 the answer raised TypeError (topic_safe(None),
    asked of the route's SaleID), the request was never acknowledged, and the broker
    delivered it again at every reconnect."""
    journal = Journal(tmp_path / "journal.sqlite3")
    gateway = gateway_for(mosquitto, journal)
    gateway.set_request_handler(broken)
    try:
        async with running(gateway), aiomqtt.Client(
                mosquitto.host, mosquitto.port, identifier="register") as register:
            await register.subscribe(f"{GATEWAY_BASE}/bridge/error", qos=1)
            await eventually(lambda: gateway.connected)
            request = json.dumps(responses.payment_request("POS1", "C1", POI)).encode()
            for _ in range(2):
                await register.publish(request_topic(), request, qos=1)
                message = await answer_on(register, f"{GATEWAY_BASE}/bridge/error")
                assert "internal error" in message.payload.decode()
            await asyncio.sleep(0.5)
    finally:
        journal.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR
              and "could not be handled" not in r.getMessage()]
    assert not errors, [(r.getMessage(), r.exc_text) for r in errors]

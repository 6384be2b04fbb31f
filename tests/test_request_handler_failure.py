"""A request whose handling fails (review rev1, second part): a bug is answered on the
register's own response topic too, not only on bridge/error, which a register that listens
only on its own topics never hears; a journal that cannot be read while the request is
checked stops the daemon (the journal's failure listener) instead of acknowledging it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from .follow_rig import BASE, B, bridge_on, wait_until
from .rig import Subscriber
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
            bridge_on(tmp_path, mosquitto, links) as bridge, \
            Subscriber(mosquitto, [f"{BASE}/registers/{TILL}/#", f"{BASE}/bridge/error"]) \
            as register:
        await ready(bridge)
        bridge.journal.on_failure(failures.append)

        def unreadable(*_: Any, **__: Any) -> None:
            raise sqlite3.DatabaseError("database disk image is malformed")

        monkeypatch.setattr(bridge.journal, "get", unreadable)
        monkeypatch.setattr(bridge.journal, "open_payments", unreadable)
        await register.publish(f"{BASE}/terminals/{B}/request/{TILL}", order("J1", B))
        assert await wait_until(lambda: failures, timeout=15), (
            "a journal read failed and the failure listener (which stops the daemon) was "
            "not told")
        assert isinstance(failures[0], sqlite3.DatabaseError)
        # The journal can be read again (the disk was fixed, the daemon started again): the
        # request, never acknowledged, comes again and is paid
        monkeypatch.undo()
        answer = await register.wait_for(
            lambda t, p: t.endswith("/response") and isinstance(p, dict), timeout=30)
        assert answer["bridge"]["outcome"] == "approved", answer
        assert not [p for t, p, _ in register.messages if t.endswith("/bridge/error")]
        assert [service for (_, service), e in sim_b.terminal.ledger.items()
                if e.category == "Payment"] == ["J1"]

"""The 300-s rule: a payment that waited in the broker is not started. Its TimeStamp with a
zone, or without one (Adyen's .NET library writes it so), read as local time or UTC."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from bridge.simulator import responses

from .test_intake_fuzz import POI, Rig


@pytest.fixture
def berlin(monkeypatch):
    """This box in a zone an hour off UTC, so that local time and UTC readings differ."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def answer_to(tmp_path, stamp: str | None, service_id: str = "A1") -> dict:
    document = responses.payment_request("POS1", service_id, POI)
    sale_tx = document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"]
    if stamp is None:
        del sale_tx["TimeStamp"]
    else:
        sale_tx["TimeStamp"] = stamp
    rig = Rig(tmp_path / f"journal-{service_id}.sqlite3")
    try:
        published = rig.handle(f"poi-bridge/terminals/{POI}/request",
                               json.dumps(document).encode())
    finally:
        rig.journal.close()
    (answer,) = [json.loads(m.payload) for m in published if m.topic.endswith("/response")]
    return answer["bridge"]


def naive(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S")  # as Adyen's .NET library writes a DateTime


@pytest.mark.usefixtures("berlin")
def test_a_stamp_without_zone_is_fresh_as_local_time_or_as_utc(tmp_path):
    now_utc = dt.datetime.now(dt.UTC)
    now_local = dt.datetime.now()
    assert abs((now_local - now_utc.replace(tzinfo=None)).total_seconds()) > 1800  # (TZ works)
    for n, stamp in enumerate((naive(now_local), naive(now_utc), now_utc.isoformat(),
                               now_utc.strftime("%Y-%m-%dT%H:%M:%S.000z"))):  # (RFC 3339 z)
        bridge = answer_to(tmp_path, stamp, f"F{n}")
        # not refused for its age: the rig's terminal is offline, and that is what it says
        assert "offline" in (bridge["error"] or ""), (stamp, bridge)


@pytest.mark.usefixtures("berlin")
def test_a_stamp_without_zone_that_is_old_either_way_is_refused(tmp_path):
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    for n, moment in enumerate((old.astimezone().replace(tzinfo=None),
                                old.replace(tzinfo=None))):
        bridge = answer_to(tmp_path, naive(moment), f"O{n}")
        assert bridge["outcome"] == "rejected"
        assert "s old" in bridge["error"] and "it has no zone" in bridge["error"], bridge


def test_a_missing_or_unreadable_stamp_is_refused(tmp_path):
    assert "is missing" in answer_to(tmp_path, None, "M1")["error"]
    assert "is not an ISO 8601" in answer_to(tmp_path, "30/11/2026 10:00", "M2")["error"]


def test_a_stamp_the_platform_cannot_place_is_refused_not_a_crash(tmp_path):
    """.NET's DateTime.MinValue, what an unset stamp serialises to: a naive datetime's
    timestamp() raised ValueError out of the intake, and the register heard nothing."""
    for n, stamp in enumerate(("0001-01-01T00:00:00", "0001-01-01T00:00:00Z",
                               "9999-12-31T23:59:59")):
        bridge = answer_to(tmp_path, stamp, f"X{n}")
        assert bridge["outcome"] == "rejected", bridge
        assert ("centuries from this box's clock" in bridge["error"]
                or " s in the future" in bridge["error"] or " s old" in bridge["error"]), bridge

"""The 300-s rule: a payment that waited in the broker is not started. Its TimeStamp with a
zone, or without one (Adyen's .NET library writes it so), read as local time or UTC."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

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


def _other_request(category: str, service_id: str, stamp: Any) -> dict:
    """A request of another category than Payment, with the SaleData a register may give it
    (a TimeStamp of `stamp`; none at all for ABSENT)."""
    document = responses.payment_request("POS1", service_id, POI)
    request = document["SaleToPOIRequest"]
    request["MessageHeader"]["MessageCategory"] = category
    sale_data = request.pop("PaymentRequest")["SaleData"]
    body: dict[str, Any] = {"Reversal": {
        "OriginalPOITransaction": {"SaleID": "POS1", "POITransactionID": {
            "TransactionID": "8815EXAMPLE", "TimeStamp": "2026-11-30T10:00:00.000Z"}},
        "ReversalReason": "MerchantCancel"}}.get(category, {})
    if stamp is not ABSENT:
        sale_data["SaleTransactionID"]["TimeStamp"] = stamp
        body["SaleData"] = sale_data
    request[f"{category}Request"] = body
    return document


ABSENT = object()


def other_answer(tmp_path, category: str, stamp: Any, service_id: str) -> dict:
    rig = Rig(tmp_path / f"journal-{service_id}.sqlite3")
    try:
        published = rig.handle(f"poi-bridge/terminals/{POI}/request", json.dumps(
            _other_request(category, service_id, stamp)).encode())
    finally:
        rig.journal.close()
    (answer,) = [json.loads(m.payload) for m in published if m.topic.endswith("/response")]
    return answer["bridge"]


@pytest.mark.parametrize("category", ["Reversal", "CardAcquisition"])
def test_another_request_that_says_when_it_was_built_is_held_to_the_rule(tmp_path, category):
    """A refund queued through a store's uplink outage ran when the link came back, maybe
    after the cashier had refunded another way (a chain review): a request of any category
    that carries SaleData.SaleTransactionID.TimeStamp is refused when it is more than 300 s
    old (or ahead), as a payment is; one that carries none runs, as before."""
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)).isoformat()
    refused = other_answer(tmp_path, category, old, "R1")
    assert refused["outcome"] == "rejected", refused
    assert "s old (SaleTransactionID.TimeStamp)" in refused["error"], refused
    assert "requests older than 300 s are not started" in refused["error"], refused
    ahead = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)).isoformat()
    assert " s in the future" in other_answer(tmp_path, category, ahead, "R2")["error"]
    # Fresh, or without a stamp: not refused for its age (the rig's terminal is offline,
    # and that is what it says)
    fresh = dt.datetime.now(dt.UTC).isoformat()
    for n, stamp in enumerate((fresh, ABSENT)):
        bridge = other_answer(tmp_path, category, stamp, f"F{n}")
        assert "offline" in (bridge["error"] or ""), (stamp, bridge)
    # A stamp that cannot be read is said to be so, not taken as none
    for n, stamp in enumerate(("30/11/2026 10:00", 1764496800)):
        bridge = other_answer(tmp_path, category, stamp, f"U{n}")
        assert bridge["outcome"] == "rejected", bridge
        assert f"{category}Request.SaleData.SaleTransactionID.TimeStamp" in bridge["error"]
        assert "is not an ISO 8601 date and time" in bridge["error"], bridge


def test_a_request_refused_for_its_age_says_to_retry_with_a_new_service_id(tmp_path):
    """A user copied the README's example, its TimeStamp days old: refused, and recorded,
    so the copy sent again with the stamp corrected under the same ServiceID got the same
    refusal and a `duplicate` event. Each age refusal says what to do: a new ServiceID."""
    moments = (dt.datetime.now(dt.UTC) - dt.timedelta(days=11),
               dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30))
    for n, stamp in enumerate([m.isoformat() for m in moments] + ["0001-01-01T00:00:00Z"]):
        bridge = answer_to(tmp_path, stamp, f"T{n}")
        assert bridge["outcome"] == "rejected", bridge
        assert bridge["error"].endswith("retry with a new ServiceID"), bridge
    old = answer_to(tmp_path, moments[0].isoformat(), "T9")["error"]
    assert "the TimeStamp is not when the request was built" in old, old


def test_the_readme_example_says_to_stamp_it_now():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.index('"TimeStamp": "2026-11-22T10:00:00.000Z"')
    after = readme[example:example + 800]
    assert "set `TimeStamp` to now" in after and "new ServiceID" in after, after

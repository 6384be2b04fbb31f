"""Currency codes were not checked: a request with "Currency": "EURO" or "eur" went to the
terminal as sent. A money category's request whose Currency is not three upper-case letters
(ISO 4217's alphabetic code) is refused, naming the field."""

from __future__ import annotations

from bridge.simulator import responses

from .follow_rig import A, BASE, bridge_on, simulator, wait_until
from .rig import Subscriber, outcome_for

TILL = "TILL1"


async def test_a_currency_that_is_no_iso_4217_code_is_refused_naming_the_field(
        tmp_path, mosquitto):
    sim = simulator(A)
    try:
        link = await sim.start_pty(tmp_path / "port")
        async with bridge_on(tmp_path, mosquitto, {A: link}) as bridge, \
                Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
            assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 15)
            topic = f"{BASE}/terminals/{A}/request/{TILL}"
            for service_id, currency in (("C1", "EURO"), ("C2", "eur"), ("C3", "€"),
                                         ("C4", "E1R"), ("C5", 978), ("C6", "ÉUR")):
                await sub.publish(topic, responses.payment_request(TILL, service_id, A, 5.0,
                                                                   currency))
                answer = await sub.wait_for(outcome_for(service_id), timeout=15)
                info = answer["bridge"]
                assert info["outcome"] == "rejected", answer
                if service_id == "C5":  # not text at all: the message's own model says so
                    continue
                error = info["error"]
                assert "PaymentRequest.PaymentTransaction.AmountsReq.Currency" in error, error
                assert "three upper-case letters" in error, error
                assert answer["SaleToPOIResponse"]["PaymentResponse"]["Response"][
                    "ErrorCondition"] == "MessageFormat"
            # a StoredValue's items carry theirs
            stored = responses.payment_request(TILL, "V1", A, category="StoredValue")
            stored["SaleToPOIRequest"]["StoredValueRequest"] = {"StoredValueData": [
                {"StoredValueTransactionType": "Load", "ItemAmount": 10, "Currency": "usd"}]}
            await sub.publish(topic, stored)
            info = (await sub.wait_for(outcome_for("V1"), timeout=15))["bridge"]
            assert info["outcome"] == "rejected"
            assert "StoredValueRequest.StoredValueData[0].Currency" in info["error"], info
            await sub.publish(topic, responses.payment_request(TILL, "C9", A, 5.0, "EUR"))
            ok = await sub.wait_for(outcome_for("C9"), timeout=15)
            assert ok["bridge"]["outcome"] == "approved", ok
        assert [service for (_, service) in sim.terminal.ledger] == ["C9"]
    finally:
        await sim.close()


def test_only_nexos_own_currency_fields_are_checked_and_null_is_left_to_the_terminal():
    """The second diff review: every key named Currency at any depth was checked, so
    merchant data the terminal passes on (SaleToAcquirerData) with a field of that name of
    its own was refused, and so was a StoredValue item's null Currency (an activation with
    no amount)."""
    from bridge.daemon.intake import _currency_problem
    from bridge.protocol.messages import parse_message
    from bridge.simulator import responses

    payment = responses.payment_request("POS1", "S1", "V400m-1", 12.5)
    body = payment["SaleToPOIRequest"]["PaymentRequest"]
    body["SaleData"]["SaleToAcquirerData"] = {"metadata": {"Currency": "eur"}}
    assert _currency_problem(parse_message(payment), payment) is None
    body["PaymentTransaction"]["AmountsReq"]["Currency"] = "eur"
    assert _currency_problem(parse_message(payment), payment).startswith(
        'PaymentRequest.PaymentTransaction.AmountsReq.Currency "eur" is not a currency code')
    stored = {"SaleToPOIRequest": {
        "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Service",
                          "MessageCategory": "StoredValue", "MessageType": "Request",
                          "SaleID": "POS1", "ServiceID": "S2", "POIID": "V400m-1"},
        "StoredValueRequest": {"SaleData": {"SaleTransactionID": {
            "TransactionID": "o-1", "TimeStamp": "2026-12-01T00:00:00.000Z"}},
            "StoredValueData": [{"StoredValueTransactionType": "Activate",
                                 "Currency": None}, {"Currency": "usd"}]}}}
    assert _currency_problem(parse_message(stored), stored) == (
        'StoredValueRequest.StoredValueData[1].Currency "usd" is not a currency code: it '
        "must be ISO 4217's alphabetic code, three upper-case letters (EUR, GBP, USD)")


def test_card_data_sent_as_a_currency_leaves_nothing_of_it_in_the_log():
    """Field review: the value shown in the refusal was cut to 21 characters before the
    log's filter saw it, and card data cut in the middle no longer looks like card data:
    ";[redacted]=25..." showed the expiry year of track 2, "%B[redacted]^D..." the holder's
    name of track 1. Redacted first, then cut: the line as the daemon's handler writes it."""
    import logging

    from bridge.daemon.intake import _currency_problem
    from bridge.protocol.messages import parse_message
    from bridge.redaction import RedactingFilter

    pan = "4111111111111111"
    track2 = f";{pan}=25121010000000000000?"
    track1 = f"%B{pan}^DOE/JOHN^2512101000000000000000000?"
    for value, fragments in ((track2, ("=25", "2512", "4111", "1111")),
                             (track1, ("^D", "DOE", "JOHN", "2512", "4111", "1111")),
                             (pan, ("4111", "1111"))):
        payment = responses.payment_request("POS1", "S1", "V400m-1", 12.5, value)
        error = _currency_problem(parse_message(payment), payment)
        assert error is not None and "is not a currency code" in error, value
        record = logging.LogRecord("poi_bridge.intake", logging.WARNING, __file__, 0,
                                   "request for terminal %s refused: %s (SaleID=%s ServiceID=%s)",
                                   ("V400m-1", f"invalid currency: {error}", "POS1", "S1"), None)
        RedactingFilter().filter(record)
        line = record.getMessage()
        assert "[redacted]" in line, line
        for fragment in fragments:
            assert fragment not in line, (fragment, line)

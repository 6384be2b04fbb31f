"""Requests published on a topic a level too deep, or with an empty last level, against a real
mosquitto and a real bridge: each is refused with an answer on bridge/error that names the topic
problem and where to publish, never dropped unheard; and the bridge's wider subscriptions keep
working under the example broker ACL."""

from __future__ import annotations

import asyncio
import json
import logging

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.simulator import responses

from .rig import POI, Subscriber, outcome_for
from .test_daemon_mqtt import BASE, Store, default_scenario, eventually, request_topic
from .test_mqtt_security import Client, answer, start_bridge, store_under_the_example_acl

EXACTLY = (f"publish on exactly {BASE}/terminals/{POI}/request/{{SaleID}} (your SaleID as its "
           f"last level) or {BASE}/terminals/{POI}/request")


async def test_a_request_a_level_too_deep_is_refused_on_bridge_error(tmp_path, mosquitto):
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/bridge/error", f"{BASE}/registers/#",
                                   f"{BASE}/bridge/response/#"]) as sub:
        cases = {
            f"{request_topic()}/POS1/extra": "it has 2 levels after 'request'",
            f"{request_topic()}/POS1/": "it has 2 levels after 'request' (a '/' too many at "
                                        "its end)",
        }
        for n, (topic, what) in enumerate(cases.items()):
            await sub.publish(topic, responses.payment_request("POS1", f"T{n}", POI))
            refusal = await sub.wait_for(
                lambda t, p, topic=topic: t.endswith("/bridge/error") and p["topic"] == topic)
            assert refusal == {
                "status": "error", "poi_id": POI, "topic": topic, "sale_id": "POS1",
                "service_id": f"T{n}",
                "error": f"request topic refused, nothing was started: {what}; {EXACTLY}"}
        # A command a level too deep, or naming none: on bridge/error too, its echo with it
        for topic, what in {f"{BASE}/bridge/request/health/x": "it has 2 levels after 'request'",
                            f"{BASE}/bridge/request": "it names no command"}.items():
            await sub.publish(topic, {"transaction": topic})
            refusal = await sub.wait_for(
                lambda t, p, topic=topic: t.endswith("/bridge/error") and p["topic"] == topic)
            assert refusal == {
                "status": "error", "topic": topic, "transaction": topic,
                "error": f"command topic refused, nothing was started: {what}; publish on "
                         f"exactly {BASE}/bridge/request/{{command}}"}
        # Nothing started, nothing answered on the register's own topics; exact topics work
        assert not [t for t, _, _ in sub.messages if "/registers/" in t]
        await sub.publish(f"{request_topic()}/POS1", responses.payment_request("POS1", "P1", POI))
        assert (await sub.wait_for(outcome_for("P1")))["bridge"]["outcome"] == "approved"


async def test_an_older_bridges_narrower_subscriptions_are_dropped(tmp_path, mosquitto):
    """The bridge's persistent session still holds the subscriptions an older version made:
    overlapping the new `#` ones, mosquitto delivers an MQTT 5 request once for each. Each
    request is handled once: one answer, no `duplicate` event."""
    session = Properties(PacketTypes.CONNECT)
    session.SessionExpiryInterval = 3600
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="bridge-under-test",
                              protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                              properties=session) as older:
        for topic in (f"{BASE}/terminals/+/request", f"{BASE}/terminals/+/request/+",
                      f"{BASE}/bridge/request/+"):
            await older.subscribe(topic, qos=1)
    bridge, simulator = await start_bridge(tmp_path, mosquitto, base_topic=BASE, protocol="5",
                                           client_id="bridge-under-test")
    await bridge.start()
    try:
        await eventually(lambda: bridge.gateway.connected and bridge.workers[POI].online)
        assert bridge.gateway.connected and bridge.workers[POI].online
        async with Subscriber(mosquitto, [f"{BASE}/registers/#",
                                          f"{BASE}/bridge/response/#"]) as sub:
            await sub.publish(f"{request_topic()}/POS1",
                              responses.payment_request("POS1", "D1", POI))
            await sub.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "completed")
            await sub.publish(f"{BASE}/bridge/request/health", {"transaction": "h1"})
            await sub.wait_for(lambda t, p: t.endswith("/response/health"))
            # A later request's answer: everything about D1 and h1 has come by then
            await sub.publish(request_topic(), responses.payment_request("POS1", "D2", POI))
            await sub.wait_for(outcome_for("D2"))
            assert len([p for t, p, _ in sub.messages if outcome_for("D1")(t, p)]) == 1
            assert len(sub.on(f"{BASE}/bridge/response/health")) == 1
            events = [p["event"] for p in sub.on(f"{BASE}/registers/POS1/event")]
            assert "duplicate" not in events, events
    finally:
        await bridge.stop()
        await simulator.close()


async def test_under_the_example_acl_the_bridge_hears_a_command_a_level_too_deep(
        tmp_path, caplog):
    """The example ACL must let the bridge's login read what it now subscribes to: mosquitto
    2.0.11 grants the `#` subscription anyway, and then drops, unheard, each message the
    login may not read."""
    caplog.set_level(logging.WARNING)
    users = {"POS1": "pos1-pw", "operator": "operator-pw"}
    async with store_under_the_example_acl(tmp_path, users=users) as (bridge, _, broker), \
            Client(broker, "POS1", "pos1-pw", ["poi-bridge/registers/POS1/#"]) as pos1, \
            Client(broker, "operator", "operator-pw", ["poi-bridge/bridge/#"]) as operator:
        await operator.client.publish("poi-bridge/bridge/request/health/x",
                                      b'{"transaction": "x1"}', qos=1)
        await pos1.client.publish(f"poi-bridge/terminals/{POI}/request/POS1",
                                  _json("POS1", "A1", POI), qos=1)
        assert (await answer(pos1, "A1"))["bridge"]["outcome"] == "approved"
        refusal = await _received(operator, "poi-bridge/bridge/error")
        assert refusal["topic"] == "poi-bridge/bridge/request/health/x"
        assert refusal["transaction"] == "x1" and "2 levels after 'request'" in refusal["error"]
    assert "refused the bridge's subscription" not in caplog.text


def _json(sale_id: str, service_id: str, poi_id: str) -> str:
    return json.dumps(responses.payment_request(sale_id, service_id, poi_id))


async def _received(client: Client, topic: str) -> dict:
    async with asyncio.timeout(10):
        while True:
            for got, payload in client.messages:
                if got == topic:
                    return json.loads(payload)
            await asyncio.sleep(0.05)


PAN = "4111111111111111"  # a Luhn-valid card number


def _with(service_id: str, **header) -> dict:
    request = responses.payment_request("POS1", service_id, POI)
    request["SaleToPOIRequest"]["MessageHeader"].update(header)
    return request


async def test_a_refusal_on_the_registers_topics_echoes_no_card_data(tmp_path, mosquitto):
    """A refusal on registers/{SaleID}/response quoted the refused request's invalid fields
    as sent: a card number a register put in its ServiceID, MessageCategory, POIID,
    TimeStamp, another SaleID or a terminal's level was published back, and through a
    chain's bridge to head office. They pass the card-data filter, as on bridge/error; the
    register still reads what was wrong, and its SaleID (the topic level) stays."""
    stamp = _with("S5")
    stamp["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
        "TimeStamp"] = PAN
    abort = _with("S7", MessageCategory="Abort")
    del abort["SaleToPOIRequest"]["PaymentRequest"]
    abort["SaleToPOIRequest"]["AbortRequest"] = {
        "MessageReference": {"MessageCategory": "Payment", "SaleID": f"POS1 {PAN}",
                             "ServiceID": "S1"}, "AbortReason": "x"}
    sent = [  # (topic, request, what the error still says)
        (request_topic(), _with("S1", SaleID=f"POS9-{PAN}"), "may not use terminal"),
        (request_topic(), _with(PAN), "ServiceID must be 1-10 letters or digits"),
        (request_topic(), _with("S2", MessageCategory=PAN), "does not match body PaymentRequest"),
        (request_topic(), _with("S3", MessageCategory=f"card {PAN}"), "card [redacted]"),
        (request_topic(), _with("S4", POIID=f"V400m-{PAN}"), "does not match the topic's"),
        (request_topic(), stamp, "is not an ISO 8601 date and time"),
        (f"{request_topic()}/POS1", _with("S6", SaleID=f"POS1 {PAN}"), "is not the topic's"),
        (request_topic(), abort, "a register may ask about and abort only its own"),
        (f"{BASE}/terminals/V400m-{PAN}/request/POS1", _with("S8", POIID=f"V400m-{PAN}"),
         "unknown terminal V400m-[redacted]"),
    ]
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/registers/#", f"{BASE}/transactions/#",
                                   f"{BASE}/bridge/error"]) as sub:
        refusals = []
        for topic, request, said in sent:
            count = len(sub.messages)
            await sub.publish(topic, request)
            await sub.wait_for(lambda t, p, count=count: len(sub.messages) > count)
            topic, refusal, _ = sub.messages[count]
            refusals.append(refusal)
            assert refusal["bridge"]["outcome"] == "rejected", refusal
            assert said in refusal["bridge"]["error"], refusal
            assert PAN not in json.dumps(_without_sale_id(refusal, topic)), refusal
        # The SaleID level is where the register listens: unchanged, as in its answer
        assert sub.messages[0][0] == f"{BASE}/registers/POS9-{PAN}/response"
        assert refusals[0]["bridge"]["transaction"]["sale_id"] == f"POS9-{PAN}"
        assert refusals[0]["bridge"]["error"].startswith(
            f"SaleID POS9-[redacted] may not use terminal {POI} (its allowed_sale_ids)")
        # A category the filter changed names the body as one that cannot be read
        assert set(refusals[2]["SaleToPOIResponse"]) == {"MessageHeader", "UnknownResponse"}
        assert refusals[2]["SaleToPOIResponse"]["MessageHeader"]["MessageCategory"] \
            == "[redacted]"
        assert refusals[1]["bridge"]["transaction"]["service_id"] == "[redacted]"
        # Nothing else was published: no event, no transaction document, nothing elsewhere
        assert len(sub.messages) == len(sent), sub.messages


def _without_sale_id(refusal: dict, topic: str) -> dict:
    """The refusal but for its SaleID, where it is the topic's level (kept by design)."""
    level = topic.split("/")[-2]
    refusal = json.loads(json.dumps(refusal))
    header = (refusal.get("SaleToPOIResponse") or {}).get("MessageHeader")
    for ids in ([header] if header else []) + [refusal["bridge"]["transaction"]]:
        assert ids.get("SaleID", ids.get("sale_id")) == level, refusal
        ids.pop("SaleID", None), ids.pop("sale_id", None)
    return refusal


async def test_a_recorded_refusal_in_the_transactions_command_echoes_no_card_data(
        tmp_path, mosquitto):
    """A refusal recorded in the journal (so that a copy delivered again gets the same
    answer) is listed by the `transactions` command on bridge/response/transactions, which
    every operator and, through a chain's bridge, head office reads: its detail quoted the
    request as sent."""
    abort = _with("R1", MessageCategory="Abort")
    del abort["SaleToPOIRequest"]["PaymentRequest"]
    abort["SaleToPOIRequest"]["AbortRequest"] = {
        "MessageReference": {"MessageCategory": "Payment", "SaleID": f"POS1 {PAN}",
                             "ServiceID": "S1"}, "AbortReason": "x"}
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/registers/#",
                                   f"{BASE}/bridge/response/#"]) as sub:
        await sub.publish(f"{request_topic()}/POS1", abort)
        await sub.wait_for(lambda t, p: t.endswith("/response") and "bridge" in p)
        await sub.publish(f"{BASE}/bridge/request/transactions",
                          {"sale_id": "POS1", "transaction": "t1"})
        answer = await sub.wait_for(lambda t, p: t.endswith("/response/transactions"))
        (row,) = answer["data"]
        assert (row["service_id"], row["outcome"]) == ("R1", "rejected"), row
        assert "MessageReference.SaleID 'POS1 [redacted]' is not this request's SaleID" \
            in row["detail"], row
        assert PAN not in json.dumps(answer), answer


async def test_a_commands_echoed_transaction_on_bridge_error_carries_no_card_data(
        tmp_path, mosquitto):
    """The diff review: a command refused for its topic echoed the operator's `transaction`
    unfiltered on bridge/error, which head office reads through a chain's bridge."""
    card = "4111111111111111"
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/bridge/error"]) as sub:
        topic = f"{BASE}/bridge/request/health/x"
        await sub.publish(topic, {"transaction": f"op-{card}"})
        refusal = await sub.wait_for(lambda t, p: p.get("topic") == topic)
        assert card not in json.dumps(refusal), refusal
        assert refusal["transaction"].startswith("op-"), refusal



async def test_a_commands_answer_echoes_its_transaction_through_the_card_filter(
        tmp_path, mosquitto):
    """bridge/response/{command} reaches every operator and head office through a chain's
    bridge, as bridge/error does: its echoed `transaction` passed unfiltered (the notes of
    2026-12-02), answered, refused by the intake, and refused for being retained alike."""
    token = {"op": "t-2", "card": int(PAN), "pan": "x", "text": f"op-{PAN}", "n": 3}
    redacted = {"op": "t-2", "card": "[redacted]", "pan": "[redacted]", "text": "op-[redacted]",
                "n": 3}
    answers: list[tuple[str, dict]] = []
    async with Subscriber(mosquitto, [f"{BASE}/bridge/response/#"]) as sub:
        # retained before the daemon subscribes: it comes to the daemon flagged so
        await sub.publish(f"{BASE}/bridge/request/health", {"transaction": token}, retain=True)
        async with Store(tmp_path, mosquitto, default_scenario()):
            await sub.wait_for(lambda t, p: len(sub.messages) > 0)
            answers.append(sub.messages[0][:2])
            await sub.publish(f"{BASE}/bridge/request/health", b"", retain=True)
            for command, body in (("health", {}), ("health", {"what": 1}), ("nosuch", {})):
                await sub.publish(f"{BASE}/bridge/request/{command}",
                                  {**body, "transaction": token})
                await sub.wait_for(lambda t, p: len(sub.messages) > len(answers))
                answers.append(sub.messages[len(answers)][:2])
    assert [(topic, reply["status"]) for topic, reply in answers] == [
        (f"{BASE}/bridge/response/health", "error"), (f"{BASE}/bridge/response/health", "ok"),
        (f"{BASE}/bridge/response/health", "error"), (f"{BASE}/bridge/response/nosuch", "error")]
    assert "retain" in answers[0][1]["error"], answers[0]
    for _, reply in answers:
        assert PAN not in json.dumps(reply), reply
        assert reply["transaction"] == redacted, reply


async def test_a_commands_error_and_topic_quote_no_card_data(tmp_path, mosquitto):
    """The review of 2026-12-03: a command's error on bridge/response quoted what was sent as
    it was (resync's "no transaction SALEID/..." with track data for a SaleID, a key name),
    and an unknown command named as a card number was answered on a topic naming it."""
    track = f"B{PAN}^DOE/JOHN^2512101"
    async with Subscriber(mosquitto, [f"{BASE}/bridge/response/#"]) as sub, \
            Store(tmp_path, mosquitto, default_scenario()):
        for command, body in (("resync", {"sale_id": track, "service_id": "1"}),
                              ("health", {f"k{PAN}": 1}), (PAN, {})):
            count = len(sub.messages)
            await sub.publish(f"{BASE}/bridge/request/{command}", {**body, "transaction": "t"})
            await sub.wait_for(lambda t, p: len(sub.messages) > count)
            topic, reply, _ = sub.messages[count]
            assert PAN not in topic and PAN not in json.dumps(reply), (topic, reply)
            assert reply["status"] == "error" and reply["transaction"] == "t", reply
            assert "[redacted]" in topic + reply["error"], (topic, reply)


async def test_bridge_error_echoes_no_card_number_as_poiid_nor_in_a_structured_transaction(
        tmp_path, mosquitto):
    """bridge/error, which head office reads, echoed the POIID topic level as it was (a card
    number typed where the terminal's name belongs came back in clear) and a command's
    `transaction` only through the filter when it was text: a card number as a JSON number,
    or inside an object or list, came back too. Ordinary POIIDs and tokens stay readable."""
    async def next_error(sub, topic: str, payload) -> dict:
        count = len(sub.messages)
        await sub.publish(topic, payload)
        await sub.wait_for(lambda t, p: len(sub.messages) > count)
        return sub.messages[count][1]

    token = {"op": "t-1", "n": 7, "card": int(PAN), "cards": ["x", f"{PAN[:4]} {PAN[4:8]} "
                                                                    f"{PAN[8:12]} {PAN[12:]}"],
             "nested": {"pan": int(PAN), "expiry_date": "12/29"}, "ok": True, "none": None}
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/bridge/error"]) as sub:
        # No SaleID readable (the intake's refusal) and a topic a level too deep (refused
        # before the intake): both name the terminal of the topic
        for payload, level in ((b"not json", ""), (responses.payment_request("POS1", "T1", PAN),
                                                   "/POS1/extra")):
            refusal = await next_error(sub, f"{BASE}/terminals/{PAN}/request{level}", payload)
            assert PAN not in json.dumps(refusal), refusal
            assert refusal["poi_id"] == "[redacted]", refusal
            readable = await next_error(sub, f"{request_topic()}{level}", payload)
            assert readable["poi_id"] == POI, readable
        command = f"{BASE}/bridge/request/health/x"
        refusal = await next_error(sub, command, {"transaction": token})
        assert PAN not in json.dumps(refusal) and "12/29" not in json.dumps(refusal), refusal
        assert refusal["transaction"] == {
            "op": "t-1", "n": 7, "card": "[redacted]", "cards": ["x", "[redacted]"],
            "nested": {"pan": "[redacted]", "expiry_date": "[redacted]"}, "ok": True,
            "none": None}, refusal
        assert (await next_error(sub, command, {"transaction": int(PAN)}))[
            "transaction"] == "[redacted]"
        assert (await next_error(sub, command, {"transaction": 42}))["transaction"] == 42
        assert (await next_error(sub, command, {"transaction": ["hq", 1.5]}))[
            "transaction"] == ["hq", 1.5]


async def test_an_empty_sale_id_level_is_refused_naming_the_topic_problem(tmp_path, mosquitto):
    """README table, bridge/error: a request on a topic "with an empty last level" is refused
    with an error that "names the problem and the exact topics to publish on"; .../request/
    is such a topic (the empty level is the SaleID's). It was refused as a header SaleID
    that is not the topic's, echoing the topic without its '/' (review rv2)."""
    topic = f"{request_topic()}/"
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/bridge/error", f"{BASE}/registers/#"]) as sub:
        await sub.publish(topic, responses.payment_request("POS1", "E1", POI))
        refusal = await sub.wait_for(lambda t, p: t.endswith("/bridge/error"))
        assert refusal["topic"] == topic, refusal
        assert "publish on exactly" in refusal["error"], refusal["error"]
        assert refusal == {
            "status": "error", "poi_id": POI, "topic": topic, "sale_id": "POS1",
            "service_id": "E1",
            "error": "request topic refused, nothing was started: its SaleID level is empty "
                     f"(a '/' too many at its end); {EXACTLY}"}
        # Nothing started: the exact topic works, and E1 was not taken
        await sub.publish(f"{request_topic()}/POS1", responses.payment_request("POS1", "P1", POI))
        assert (await sub.wait_for(outcome_for("P1")))["bridge"]["outcome"] == "approved"
        assert not [p for t, p, _ in sub.messages if "/registers/" in t and (
            p.get("transaction") or p["bridge"]["transaction"])["service_id"] == "E1"]

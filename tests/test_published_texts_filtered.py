"""Texts that reach topics others read pass the card-data filter, whoever wrote them: a
terminal's own error text, a key of a frame it could not read, the POIID it says it has, an
answer it sent for a SaleID that cannot be a topic level, a register's Abort reference, a
refusal sent to an MQTT 5 response topic. Each was published as it came (the review of
2026-12-03, its probe made a test): against a real mosquitto, a scripted terminal on a TCP
link, every message under the base topic read back.

Not covered, by design: a register's own results carry what the terminal sent; the MQTT 5
correlation data is the requester's own token, echoed as it came."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.daemon.registers import shown_id
from bridge.simulator import responses

POI = "V400m-324688179"
BASE = "poi/store-7"
PAN = "4111111111111111"
TRACK1 = f"B{PAN}^DOE/JOHN^2512101"
TRACK2 = f";{PAN}=2512101?"


def _as_response(request: dict[str, Any]) -> dict[str, Any]:
    header = dict(request["SaleToPOIRequest"]["MessageHeader"])
    header["MessageType"] = "Response"
    return header


def scripted_answer(case: str, request: dict[str, Any]) -> dict[str, Any] | None:
    """What the terminal sends back for one request (None: nothing)."""
    header = request.get("SaleToPOIRequest", {}).get("MessageHeader", {})
    category = header.get("MessageCategory")
    if header.get("SaleID") == "poi-bridge":  # the identity check
        said = _as_response(request)
        if case == "its POIID":
            said["POIID"] = PAN
        return {"SaleToPOIResponse": {"MessageHeader": said,
                                      "DiagnosisResponse": {"Response": {"Result": "Success"}}}}
    if case == "its error text":
        return {"errors": [f"Nexo Service: crypto error (3) {TRACK1}"], "ServiceID": "-NULL-"}
    if case == "a key of its frame":
        return {"SaleToPOIResponse": {"MessageHeader": _as_response(request)}, PAN: TRACK2}
    if case == "an unmatched answer" and category == "Payment":
        said = _as_response(request)
        said["SaleID"], said["ServiceID"] = TRACK1, "X1"
        return {"SaleToPOIResponse": {"MessageHeader": said, "PaymentResponse": {
            "Response": {"Result": "Success", "AdditionalResponse": f"x={TRACK2}"},
            "PaymentResult": {"PaymentInstrumentData": {"CardData": {"MaskedPan": PAN}}}}}}
    if category in ("Abort", "Payment"):
        return None
    return responses.simple_response(request)


async def _terminal(case: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
    """A length-prefixed terminal on TCP that answers as `scripted_answer` says."""
    try:
        while True:
            size = int.from_bytes(await reader.readexactly(4), "big")
            answer = scripted_answer(case, json.loads(await reader.readexactly(size)))
            if answer is not None:
                data = json.dumps(answer).encode()
                writer.write(len(data).to_bytes(4, "big") + data)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass


async def _what_others_read(case: str, client: aiomqtt.Client) -> None:
    """Publish what the case needs; the terminal does the rest."""
    request_topic = f"{BASE}/terminals/{POI}/request/POS1"
    if case in ("its error text", "a key of its frame"):
        await client.publish(request_topic, json.dumps(
            responses.payment_request("POS1", "D1", POI, category="Diagnosis")), qos=1)
        await client.publish(request_topic, json.dumps(
            responses.payment_request("POS1", "P1", POI)), qos=1)
    elif case == "an unmatched answer":
        await client.publish(request_topic, json.dumps(
            responses.payment_request("POS1", "P1", POI)), qos=1)
    elif case == "an abort reference":
        abort = responses.payment_request("POS1", "A1", POI, category="Abort")
        abort["SaleToPOIRequest"]["AbortRequest"] = {"MessageReference": {
            "SaleID": "POS1", "ServiceID": TRACK2, "MessageCategory": "Payment"},
            "AbortReason": "x"}
        await client.publish(request_topic, json.dumps(abort), qos=1)
    elif case == "its POIID":
        await client.publish(f"{BASE}/bridge/request/terminals", "{}", qos=1)
    elif case == "a response topic":
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = f"{BASE}/bridge/response/op/1"
        await client.publish(f"{BASE}/bridge/request/health/{PAN}", '{"transaction": 1}',
                             qos=1, properties=properties)


@pytest.mark.parametrize("case", ["its error text", "a key of its frame", "its POIID",
                                  "an unmatched answer", "an abort reference",
                                  "a response topic"])
async def test_no_card_data_reaches_a_topic_others_read(tmp_path, mosquitto, case):
    server = await asyncio.start_server(
        lambda reader, writer: _terminal(case, reader, writer), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "base_topic": BASE,
                 "client_id": "bridge-under-test", "protocol": "5"},
        "terminals": [{"poi_id": POI, "link": {"kind": "tcp", "host": "127.0.0.1", "port": port},
                       "framer": {"name": "length-prefixed"}, "payment_timeout": 1.5,
                       "status_timeout": 0.8, "poll_floor": 0.05}],
    }))
    seen: list[tuple[str, str]] = []
    await bridge.start()
    try:
        async with asyncio.timeout(10):
            while not (bridge.gateway.connected and bridge.workers[POI].identity != "unknown"):
                await asyncio.sleep(0.02)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="observer",
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(f"{BASE}/#", qos=1)

            async def collect() -> None:
                async for message in client.messages:
                    seen.append((message.topic.value, message.payload.decode()))
            collecting = asyncio.create_task(collect())
            await asyncio.sleep(0.3)
            await _what_others_read(case, client)
            await asyncio.sleep(4)  # payments time out, are polled, end unresolved
            collecting.cancel()
    finally:
        await bridge.stop()
        server.close()
    # What the case is about was published (else the test proves nothing) ...
    texts = [topic + " " + payload for topic, payload in seen
             if "/request" not in topic]  # (not the requests the test itself sent)
    expected = {"its error text": "crypto error", "a key of its frame": "[redacted]",
                "its POIID": '"identity": "mismatch: [redacted]"',
                "an unmatched answer": "/bridge/error", "an abort reference": "abort of POS1/",
                "a response topic": "/bridge/response/op/1"}[case]
    assert any(expected in text or expected in text.replace('":"', '": "') for text in texts), \
        texts
    # ... and carried no card data, in a topic or a payload
    leaked = [text for text in texts if PAN in text]
    assert not leaked, leaked


def test_an_id_is_filtered_before_it_is_cut():
    """Cut at 128 first, a card number across the cut left 11 of its digits, which the
    filter no longer knows as one."""
    said = "till no. " * 12 + "xxxxxxxx " + PAN
    assert len(said) > 128 and PAN[:11] in said[:128]
    assert PAN[:11] not in shown_id(said)
    assert shown_id("POS1") == "POS1" and shown_id(12) == "12" and shown_id(None) == ""


# A card number across the 64- and 128-character cuts (11 of its digits before each): a
# refused request's ServiceID as a register wrote it
ACROSS_64 = "till no. " * 5 + "xxxxxxx " + PAN
ACROSS_128 = "till no. " * 12 + "xxxxxxxx " + PAN


@pytest.mark.parametrize("service_id", [ACROSS_64, ACROSS_128], ids=["across 64", "across 128"])
def test_a_refused_service_id_is_filtered_before_it_is_cut(tmp_path, caplog, service_id):
    """Review: the refusal of a request with an unusable ServiceID recorded it cut to 64
    (bridge.transaction.service_id), echoed it cut to 128 (MessageHeader.ServiceID) and
    logged it so, each cut before the filter: 11 or more digits of a card number went out
    on the register's topic (and so to head office) and into the log. From those digits
    and Luhn's check digit the rest of a card number is a short guess."""
    from .test_intake_fuzz import POI as RIG_POI, Rig
    assert PAN[:11] in service_id[:64] or PAN[:11] in service_id[:128]
    caplog.set_level(logging.INFO, logger="poi_bridge")
    request = responses.payment_request("POS1", "S1", RIG_POI)
    request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"] = service_id
    rig = Rig(tmp_path / "j.sqlite3")
    try:
        (answer,) = rig.handle(f"poi-bridge/terminals/{RIG_POI}/request/POS1",
                               json.dumps(request).encode())
    finally:
        rig.journal.close()
    body = json.loads(answer.payload)
    assert answer.topic == "poi-bridge/registers/POS1/response"
    assert "ServiceID must be" in body["bridge"]["error"], body  # (the refusal meant)
    said = [answer.payload.decode(), *caplog.messages]
    assert not [text for text in said if PAN[:11] in text], said
    # What is left is still the register's writing, up to the card number
    assert body["bridge"]["transaction"]["service_id"].startswith("till no. till no.")
    assert body["SaleToPOIResponse"]["MessageHeader"]["ServiceID"].startswith("till no.")

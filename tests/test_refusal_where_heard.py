"""Found by a review of the README's MQTT contract against the daemon: a refusal must reach
the register where it listens, and say which of its messages it answers.

- A SaleID longer than a nexo header allows (64) on `.../request/{SaleID}` was refused on
  bridge/error only: the register, listening on its own topics, waited for its time-out.
- bridge/error's `topic` named the plain request topic, not the one the request came on.
- A SaleToPOIResponse document published as a request was refused with ServiceID "", though
  its header named one."""

from __future__ import annotations

import json
from pathlib import Path

from bridge.simulator import responses

from .test_intake_fuzz import POI, Rig

ERROR_TOPIC = "poi-bridge/bridge/error"


def test_a_sale_id_too_long_for_a_header_is_refused_on_the_registers_own_topic(
        tmp_path: Path) -> None:
    sale_id = "S" * 65
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        doc = responses.payment_request(sale_id, "L1", POI)
        answers = rig.handle(f"poi-bridge/terminals/{POI}/request/{sale_id}",
                             json.dumps(doc).encode())
        assert [a.topic for a in answers] == [f"poi-bridge/registers/{sale_id}/response"], \
            [(a.topic, a.payload[:200]) for a in answers]
        answer = json.loads(answers[0].payload)
        assert answer["bridge"]["outcome"] == "rejected", answer["bridge"]
        assert "at most 64 characters" in answer["bridge"]["error"], answer["bridge"]
        assert answer["bridge"]["transaction"]["service_id"] == "L1", answer["bridge"]
        header = answer["SaleToPOIResponse"]["MessageHeader"]
        assert (header["SaleID"], header["ServiceID"]) == (sale_id, "L1"), header
    finally:
        rig.journal.close()


def test_a_refusal_on_bridge_error_names_the_topic_the_request_came_on(tmp_path: Path) -> None:
    # 200 characters: more than a topic level the bridge answers on (128), so bridge/error
    # (with dashes: a long run of letters and digits is taken for key material and redacted)
    sale_id = "till-" * 40
    topic = f"poi-bridge/terminals/{POI}/request/{sale_id}"
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        answers = rig.handle(topic, json.dumps(
            responses.payment_request(sale_id, "L2", POI)).encode())
        assert [a.topic for a in answers] == [ERROR_TOPIC], [a.topic for a in answers]
        refusal = json.loads(answers[0].payload)
        assert refusal["topic"] == topic, refusal
        assert refusal["service_id"] == "L2", refusal
        # the plain topic is still named as itself
        plain = f"poi-bridge/terminals/{POI}/request"
        (answer,) = rig.handle(plain, b"{not json")
        assert json.loads(answer.payload)["topic"] == plain, answer.payload
    finally:
        rig.journal.close()


def test_a_response_document_published_as_a_request_is_refused_under_its_service_id(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        request = responses.payment_request("POS1", "R7", POI)
        header = dict(request["SaleToPOIRequest"]["MessageHeader"], MessageType="Response")
        document = {"SaleToPOIResponse": {"MessageHeader": header, "PaymentResponse": {
            "Response": {"Result": "Success"}}}}
        (answer,) = rig.handle(f"poi-bridge/terminals/{POI}/request/POS1",
                               json.dumps(document).encode())
        assert answer.topic == "poi-bridge/registers/POS1/response", answer.topic
        body = json.loads(answer.payload)
        assert "SaleToPOIRequest documents" in body["bridge"]["error"], body["bridge"]
        assert body["bridge"]["transaction"]["service_id"] == "R7", body["bridge"]
        assert body["bridge"]["transaction"]["category"] == "Payment", body["bridge"]
        # on the plain topic (no SaleID to answer to): bridge/error names it too
        (refusal,) = rig.handle(f"poi-bridge/terminals/{POI}/request",
                                json.dumps(document).encode())
        assert refusal.topic == ERROR_TOPIC
        assert json.loads(refusal.payload)["service_id"] == "R7", refusal.payload
    finally:
        rig.journal.close()

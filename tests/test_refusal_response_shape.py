"""README "A response": a refusal (outcome rejected) carries a SaleToPOIResponse built like a
terminal's failure, its body named after the request's category, UnknownResponse when that
cannot be read; null only when there is no response to show (unresolved, an abort
acknowledgement). A request held for the identity check and refused when the link dropped,
and one whose MessageCategory is not a name ("Pay-ment", ""), were refused with null
(review rv2)."""

from __future__ import annotations

import json

import pytest

from bridge.simulator import responses

from .test_intake_fuzz import POI, Rig
from .test_session import Harness


def test_a_request_refused_when_the_link_drops_before_it_was_sent_has_a_response():
    h = Harness(link_up=False)
    h.do(h.session.link_is_up(h.now))          # identity check on the wire, not answered
    h.submit("POS1", "S1")                      # held: accepted, waiting for the check
    down = h.do(h.session.link_is_down("unplugged", h.now))
    (refused,) = h.delivers(down)
    assert refused.outcome == "rejected"
    assert refused.response is not None, "SaleToPOIResponse null on a refusal"
    inner = refused.response["SaleToPOIResponse"]
    assert inner["MessageHeader"]["ServiceID"] == "S1"
    assert inner["MessageHeader"]["MessageType"] == "Response"
    said = inner["PaymentResponse"]["Response"]
    assert (said["Result"], said["ErrorCondition"]) == ("Failure", "UnavailableDevice")
    assert said["AdditionalResponse"] == refused.error
    assert "went offline before the request was sent" in refused.error


@pytest.mark.parametrize("category", ["Pay-ment", "", "Paymént"])
def test_a_category_that_is_no_name_is_refused_with_an_unknown_response(tmp_path, category):
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        doc = responses.payment_request("POS1", "C1", POI)
        doc["SaleToPOIRequest"]["MessageHeader"]["MessageCategory"] = category
        (answer,) = rig.handle(f"poi-bridge/terminals/{POI}/request/POS1",
                               json.dumps(doc).encode())
        body = json.loads(answer.payload)
        assert answer.topic == "poi-bridge/registers/POS1/response"
        assert body["bridge"]["outcome"] == "rejected"
        assert body["SaleToPOIResponse"] is not None, body
        said = body["SaleToPOIResponse"]["UnknownResponse"]["Response"]
        assert (said["Result"], said["ErrorCondition"]) == ("Failure", "MessageFormat")
        assert body["SaleToPOIResponse"]["MessageHeader"]["ServiceID"] == "C1"
        assert body["bridge"]["transaction"]["category"] == "Unknown", body["bridge"]
    finally:
        rig.journal.close()

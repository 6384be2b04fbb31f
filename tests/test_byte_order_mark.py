"""A request whose JSON starts with a UTF-8 byte-order mark (as Windows tools save it) was
refused "not valid JSON: Expecting value at line 1 column 1", a message that does not say
why. JSON readers may ignore one (RFC 8259 section 8.1): the bridge takes it as the same
request without the mark, against a real mosquitto and a simulated terminal."""

from __future__ import annotations

import json

import pytest

from bridge.protocol.messages import DuplicateName, MessageError, load_json
from bridge.protocol.transaction import request_digest
from bridge.simulator import responses

from .rig import POI, Subscriber, outcome_for
from .test_daemon_mqtt import BASE, Store, default_scenario, request_topic

BOM = "\ufeff".encode()


def test_one_leading_byte_order_mark_is_read_past_and_nothing_else_changes():
    request = responses.payment_request("POS1", "B1", POI)
    text = json.dumps(request)
    for marked in (BOM + text.encode(), "\ufeff" + text):
        assert load_json(marked) == request
        assert request_digest(load_json(marked)) == request_digest(request)
    # The other limits still read the text after the mark
    with pytest.raises(DuplicateName):
        load_json(BOM + b'{"a": 1, "a": 2}', unique_names=True)
    with pytest.raises(MessageError, match="nested deeper than 64"):
        load_json(BOM + b"[" * 65 + b"]" * 65)
    with pytest.raises(MessageError, match="larger than the limit of 10"):
        load_json(BOM + b'{"a": 12}', max_size=10)  # the mark counts: it was sent
    # One mark only: a second is not JSON, and the error names it (it is invisible)
    with pytest.raises(MessageError, match=r"not valid JSON: a byte-order mark \(U\+FEFF, "
                       r"invisible in most editors: save as UTF-8 without it\) at line 1 "
                       r"column 1$"):
        load_json(BOM + BOM + text.encode())
    with pytest.raises(MessageError, match=r"byte-order mark .* at line 2 column 3$"):
        load_json(b'{"a": 1,\n  ' + BOM + b'"b": 2}')
    with pytest.raises(MessageError, match="^not valid JSON: Expecting value at line 1"):
        load_json(b"nope")


async def test_a_request_and_a_command_with_a_byte_order_mark_are_answered(tmp_path, mosquitto):
    async with Store(tmp_path, mosquitto, default_scenario()), \
            Subscriber(mosquitto, [f"{BASE}/registers/+/response", f"{BASE}/bridge/error",
                                   f"{BASE}/bridge/response/#"]) as sub:
        payment = responses.payment_request("POS1", "B1", POI, 1.0)
        await sub.publish(request_topic(), BOM + json.dumps(payment).encode())
        assert (await sub.wait_for(outcome_for("B1")))["bridge"]["outcome"] == "approved"
        await sub.publish(f"{BASE}/bridge/request/health", BOM + b'{"transaction": "b-1"}')
        answer = await sub.wait_for(lambda t, p: t.endswith("/bridge/response/health")
                                    and p.get("transaction") == "b-1")
        assert answer["status"] == "ok", answer
        assert not sub.on(f"{BASE}/bridge/error"), sub.messages

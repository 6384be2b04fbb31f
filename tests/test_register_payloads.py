"""The payload shapes registers depend on (bridge/daemon/registers.py)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from bridge.daemon.registers import (
    dumps,
    result_payload,
    transaction_payload,
    transaction_payload_from,
)
from bridge.protocol.session import Deliver

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(outcome=st.sampled_from(["approved", "declined", "unresolved", "error"]),
       body=st.none() | st.dictionaries(st.text(), json_values, max_size=4),
       error=st.none() | st.text())
def test_the_retained_transaction_document_is_the_response_plus_its_state(outcome, body, error):
    """The transaction topic's bytes are made from the response topic's bytes (one encoding
    of a large terminal answer): they must equal encoding transaction_payload() itself."""
    response = None if body is None else {"SaleToPOIResponse": body}
    result = Deliver("TILL1", "S1", "V400m-1", "Payment", outcome, "terminal", response, error)
    at = 1_800_000_000.25
    made = transaction_payload_from(dumps(result_payload(result, at)), result)
    assert made == dumps(transaction_payload(result, at=at))
    assert json.loads(made)["state"] == ("unresolved" if outcome == "unresolved" else "final")

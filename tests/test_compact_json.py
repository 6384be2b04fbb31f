"""jsontext.compact, the text of everything the bridge publishes, journals and frames:
the same bytes json.dumps(separators=(",", ":"), ensure_ascii=False) wrote before it, for
every value a SaleToPOI document, an event or a transaction record can hold."""

from __future__ import annotations

import json
from enum import StrEnum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.protocol import jsontext


def before(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# What the bridge's documents hold: text (any character, control ones included), integers
# a double carries, plain decimal amounts, booleans, null, nested
plain_floats = st.decimals(min_value=-10**9, max_value=10**9, places=2,
                           allow_nan=False, allow_infinity=False).map(float)
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | plain_floats | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=30)


@given(values)
def test_the_same_text_as_json_dumps(value):
    assert jsontext.compact(value) == before(value)


class State(StrEnum):
    FINAL = "final"


def test_what_orjson_does_not_take_goes_through_json():
    huge = {"n": 10**30, "m": -(10**25)}  # beyond 64 bits: orjson refuses them
    assert jsontext.compact(huge) == before(huge) == b'{"n":1000000000000000000000000000000,' \
        b'"m":-10000000000000000000000000}'
    keyed = {1: "a", None: "b"}  # names that are not strings
    assert jsontext.compact(keyed) == before(keyed) == b'{"1":"a","null":"b"}'
    assert jsontext.compact({"state": State.FINAL, "ids": ("a", 1)}) \
        == before({"state": State.FINAL, "ids": ("a", 1)}) == b'{"state":"final","ids":["a",1]}'


def test_a_lone_surrogate_is_refused_as_before():
    """No UTF-8 encoder takes one; jsontext refuses it on the way in, and on the way out it
    is an error, not text a register cannot read."""
    with pytest.raises(UnicodeEncodeError):
        before({"x": "\ud800"})
    with pytest.raises(UnicodeEncodeError):
        jsontext.compact({"x": "\ud800"})


def test_non_ascii_and_control_characters_as_json_writes_them():
    value = {"name": "Café €5 ✓", "ctl": "a\nb\tc\x00\x1f\x7f\"\\/"}
    assert jsontext.compact(value) == before(value)
    assert "Café €5 ✓".encode() in jsontext.compact(value)

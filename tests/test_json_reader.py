"""jsontext.loads reads most texts through orjson and the rest through the strict json reader:
for every text, valid or not, it must give what the strict reader alone gives (the same
document, or an error of the same kind and text). The strict reader is what the bridge's
error messages to registers and its refusals of NaN, 1e400 and lone surrogates were built on."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.protocol import jsontext

from .fuzzing import fuzz_settings


def strict(text):
    try:
        return "ok", jsontext._strict_loads(text)
    except (ValueError, RecursionError) as exc:
        return type(exc), str(exc)


def either(text):
    try:
        return "ok", jsontext.loads(text)
    except (ValueError, RecursionError) as exc:
        return type(exc), str(exc)


def same_document(a, b):
    """Equal, and of the same types all the way down (1 and 1.0 and True are == in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_document(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_document(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def assert_same(text):
    expected, got = strict(text), either(text)
    if expected[0] == "ok":
        assert got[0] == "ok", (text, got)
        assert same_document(got[1], expected[1]), text
    else:
        assert got == expected, text


numbers = (st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.integers(-2**64 - 5, 2**64 + 5) | st.integers(-10**400, 10**400))
texts = st.text(max_size=12)
values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=25)


@fuzz_settings(400)
@given(values, st.booleans())
def test_valid_documents_read_the_same(value, pretty):
    text = json.dumps(value, indent=1 if pretty else None, ensure_ascii=pretty)
    assert_same(text)


# pieces that change the reading: numbers at the 64-bit edges, constants Python's json takes
# and JSON does not, escapes of surrogates, whitespace JSON does not have, a BOM, duplicates
pieces = st.sampled_from([
    "9223372036854775807", "-9223372036854775808", "-9223372036854775809",
    "18446744073709551615", "18446744073709551616", "1" + "0" * 30, "1e400", "-1e400",
    "1.5e-400", "-0", "-0.0", "0.1", "1E2", "NaN", "Infinity", "-Infinity",
    '"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"', '"\\u0000"', '"\x01"', "\ufeff", "\x0c",
    "\x0b", " ", "\n", "{", "}", "[", "]", ",", ":", '"a"', "true", "nul", "1.", ".5", "01",
    '{"a":1,"a":2}', '"1234567890123456789"', "\u00e9", "\\", '"'])


@fuzz_settings(1500)
@given(st.lists(pieces, min_size=1, max_size=8))
def test_any_text_reads_the_same_or_fails_the_same(parts):
    assert_same("".join(parts))


@pytest.mark.parametrize("text", [
    '{"Amount": 12345678901234567890123}',  # beyond 64 bits: orjson would make it a float
    '[-9223372036854775809, 18446744073709551616]',
    '{"n": 1e400}', '[NaN]', '"\\ud800"', '\ufeff{}', "[1] x", "",
    '{"a": 1, "b": 2, "a": 3}', '[' * 3000 + ']' * 3000,
])
def test_texts_at_the_edges(text):
    assert_same(text)


def test_an_integer_beyond_64_bits_stays_an_integer():
    assert jsontext.loads('{"Amount": 12345678901234567890123}') \
        == {"Amount": 12345678901234567890123}
    assert type(jsontext.loads("[18446744073709551616]")[0]) is int

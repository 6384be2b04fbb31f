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
    """Equal, and of the same types all the way down (1 and 1.0 and True are == in Python).
    Walked without recursion: the documents may nest as deep as JSON readers go."""
    pending = [(a, b)]
    while pending:
        a, b = pending.pop()
        if type(a) is not type(b):
            return False
        if isinstance(a, dict):
            if list(a) != list(b):
                return False
            pending.extend((a[k], b[k]) for k in a)
        elif isinstance(a, list):
            if len(a) != len(b):
                return False
            pending.extend(zip(a, b))
        elif isinstance(a, float) and a != a:
            if b == b:
                return False
        elif a != b:
            return False
    return True


def assert_same(text):
    expected, got = strict(text), either(text)
    shown = text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"
    if expected[0] == "ok":
        assert got[0] == "ok", (shown, got)
        assert same_document(got[1], expected[1]), shown
    else:
        assert got == expected, shown


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


def _nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize("depth", [799, 800, 1000, 1010, 1024, 1025, 3000])
def test_deep_nesting_reads_as_the_strict_reader_reads_it(depth, kind):
    """orjson reads up to 1024 levels; the strict reader stops with RecursionError near
    Python's recursion limit (1000 levels, less the caller's stack). In between, loads gave a
    document the strict reader refuses (8f9b0e0), and crypto.decrypt_message, which checks
    no depth after it, handed it on. A text with that many brackets goes to the strict
    reader."""
    assert_same(_nested(depth, kind))


def test_the_vendor_fixtures_take_the_fast_path(monkeypatch):
    """The depth check does not send a real message to the strict reader: the largest vendor
    fixture (11 KB) holds 92 brackets."""
    from .conftest import FIXTURES

    def refuse(text):
        raise AssertionError("read by the strict reader")

    monkeypatch.setattr(jsontext, "_strict_loads", refuse)
    fixtures = sorted(FIXTURES.glob("*.json"))
    assert max(path.stat().st_size for path in fixtures) > 11_000
    for path in fixtures:
        text = path.read_text(encoding="utf-8")
        assert jsontext.loads(text) == json.loads(text), path.name

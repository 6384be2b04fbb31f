"""The JSON reader (jsontext.loads: orjson, and the strict reader for what orjson must not
decide) on the vendor's messages: as written, changed and written out by other writers, and
with text spliced in where it changes the reading (numbers at the 64-bit edges, NaN, escapes
of surrogates, a BOM, names twice...). For every text it gives what the strict reader alone
gives: the same document, or an error of the same kind and text.

test_json_reader.py holds the same property on generated documents and on pieces alone."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from .fuzz_corpus import fixture_texts, mutated, serialised, vendor_messages
from .fuzzing import fuzz_settings, tallied, tally
from .test_json_reader import assert_same, pieces, strict

texts = st.sampled_from(sorted(t.decode("utf-8") for t in fixture_texts().values()))
written = st.sampled_from(sorted(vendor_messages().items())).map(lambda i: i[1]).flatmap(
    mutated).flatmap(serialised).map(lambda b: b.decode("utf-8", "surrogatepass"))


@st.composite
def spliced(draw: Any, text: str) -> str:
    """`text` with a piece that changes the reading put in, or a stretch of it removed or
    repeated (the text between two points of it)."""
    at = draw(st.integers(0, len(text)))
    end = draw(st.integers(at, min(len(text), at + 40)))
    how = draw(st.sampled_from(["insert", "replace", "delete", "repeat"]))
    if how == "insert":
        return text[:at] + draw(pieces) + text[at:]
    if how == "replace":
        return text[:at] + draw(pieces) + text[end:]
    if how == "delete":
        return text[:at] + text[end:]
    return text[:end] + text[at:end] + text[end:]


reader_inputs = st.one_of(texts, written, st.one_of(texts, written).flatmap(spliced))


@fuzz_settings(300)
@given(reader_inputs)
def test_vendor_texts_read_the_same_or_fail_the_same(text):
    tally("read" if strict(text)[0] == "ok" else "refused")
    assert_same(text)


def test_most_of_the_targets_texts_are_documents_and_some_are_refused():
    """The target reads real messages (orjson's fast path, the one the daemon takes) most of
    the time, and texts the strict reader refuses some of the time."""
    with tallied() as reached:
        test_vendor_texts_read_the_same_or_fail_the_same()
    total = reached["read"] + reached["refused"]
    assert total >= 100, reached
    assert reached["read"] >= total / 2, reached
    assert reached["refused"] >= total / 20, reached

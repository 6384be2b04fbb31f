"""The message parser on the vendor's messages and the requests they answer, mutated so that
most still parse: what parses writes out and parses back to an equal model, and what does
not is refused with MessageError, the one error parse_message documents.

(test_messages.py's test_parser_never_raises_anything_but_message_error feeds it arbitrary
bytes and text: none of them ever parsed, so nothing past the JSON reader was fuzzed there.)"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from bridge.protocol.jsontext import lone_surrogate
from bridge.protocol.messages import MessageError, parse_message

from .fuzz_corpus import (
    damaged,
    mutated,
    requests_now,
    serialised,
    vendor_messages,
)
from .fuzzing import fuzz_settings, tallied, tally
from .test_json_reader import same_document

POI = "V400m-324688179"

documents = st.one_of(st.sampled_from(sorted(vendor_messages().items())).map(lambda i: i[1]),
                      requests_now(POI)).flatmap(mutated)
# Mostly JSON text, as it comes from a link or a broker; some documents already read (what
# parse_message also takes: in the bridge always from the strict JSON reader, so never with
# a lone surrogate, which no UTF-8 text can carry); some text damaged at the byte level,
# which rarely parses.
parser_inputs = st.sampled_from(["text", "text", "text", "document", "damaged"]).flatmap(
    lambda form: documents.flatmap(serialised) if form == "text"
    else documents.filter(lambda d: not lone_surrogate(d)) if form == "document"
    else documents.flatmap(serialised).flatmap(damaged))


def _dump(message: Any) -> dict[str, Any]:
    """The model's own fields and extras, written out (not the document it was read from)."""
    return message.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"kind"})


@fuzz_settings(300)
@given(parser_inputs)
def test_what_parses_round_trips_and_the_rest_is_refused_with_message_error(raw):
    try:
        message = parse_message(raw)
    except MessageError as exc:
        tally("refused")
        assert str(exc)  # says what is wrong
        return
    tally("parsed")
    text = message.to_bytes()
    again = parse_message(text)
    assert again == message
    assert type(again) is type(message)
    # the same document, of the same types all the way down (1 and 1.0 and True are == )
    assert same_document(again.to_document(), message.to_document())
    # the model's fields and extras themselves hold what was read: written out and read back
    # (as for a message the bridge builds) they are the same
    rebuilt = type(message).model_validate(_dump(message))
    assert _dump(rebuilt) == _dump(message)
    assert rebuilt.body_key() == message.body_key()


def test_most_of_the_targets_inputs_parse_and_some_are_refused():
    """The target spends its time past the JSON reader: at least half its inputs parse (and
    some are refused, so that path is fuzzed too). Of the 900 arbitrary inputs of
    test_messages.py's parser target in one run, none parsed."""
    with tallied() as reached:
        test_what_parses_round_trips_and_the_rest_is_refused_with_message_error()
    total = reached["parsed"] + reached["refused"]
    assert total >= 100, reached
    assert reached["parsed"] >= total / 2, reached
    assert reached["refused"] >= total / 20, reached

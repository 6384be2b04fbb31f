"""JSON text as RFC 8259 defines it, read strictly.

Python's json module also reads NaN, Infinity and -Infinity, turns a number too large for a
float (1e400) into inf, reads the same number written as a whole one (1 and 400 zeros) as an
int no double holds, refuses an integer of more than 4300 digits with a bare ValueError,
and reads "\ud800" as a lone surrogate that no UTF-8 encoder takes. A value like those, passed on, would be written back as NaN or Infinity, which
registers in other languages cannot parse. Here each is a JsonTextError that says what it is.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import orjson

from bridge.redaction import quoted


class JsonTextError(ValueError):
    """The text is not valid JSON, or holds a number no JSON reader can carry."""


class DuplicateName(JsonTextError):
    """One object holds a name twice: readers disagree on which value counts."""


def _constant(token: str) -> Any:
    raise JsonTextError(f"{token} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonTextError(f"number {_digits_shown(text)} is too large")
    return value


def _digits_shown(text: str) -> str:
    """A number too large, as an error quotes it: whole when short (1e400, -2.5E+999), else
    its first 6 characters. More, and the digits of a card number could be among them (in
    a run too long to be one, which the card-data filter lets pass)."""
    if len(text) <= 20 and sum(ch.isdigit() for ch in text) <= 12:
        return text
    return text[:6] + "..."


def _integer(text: str) -> int:
    """An integer as a double can hold it: 1 followed by 400 zeros is 1e400 written whole,
    which a reader that takes numbers as doubles (JavaScript's, most registers') makes
    Infinity or refuses, and float() of it raises OverflowError later."""
    value = int(text)
    if len(text) > 300:  # (a double holds every integer of up to 308 digits)
        try:
            float(value)
        except OverflowError:
            raise JsonTextError(f"number {_digits_shown(text)} is too large") from None
    return value


# One decoder for every call: json.loads(...) with hooks would build one each time. The
# float hook runs once per number with a fraction or exponent, the int hook once per whole
# number (a handful per message).
_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_finite,
                            parse_int=_integer)


# orjson reads what _DECODER reads, 3 times as fast (the parse was 8 % of the daemon's CPU at
# 64 terminals), with two differences. An integer beyond 64 bits comes back a float: a text
# holding 19 digits in a row (such an integer needs them; so does a long string of digits,
# which then merely takes the slower way) is read by _DECODER.
# And orjson reads 1024 levels of nesting, where _DECODER stops with RecursionError short of
# Python's recursion limit (1000 frames, its caller's included): a text with this many
# brackets and braces (so at least twice as many bytes) may nest that deep, and is read by
# _DECODER too. One with fewer nests less deep, which _DECODER reads as long as its caller
# is under 190 frames deep (the daemon's readers: a few dozen). The vendor's 11 KB
# messages (tests/fixtures/adyen) hold 92.
# One translation finds both: digits become "1", brackets and braces "[", the rest " " (two
# bytes.count() calls over the text made the 11 KB fixture's read 35 % slower: review rv16).
_DIGITS_AND_BRACKETS = bytes(0x31 if 0x30 <= b <= 0x39 else 0x5B if b in b"[{" else 0x20
                             for b in range(256))
_LONG_DIGIT_RUN = b"1" * 19
# How deep a SaleToPOI document may nest, in the clear or inside an encrypted envelope (the
# vendor's deepest nest about 8): deeper is hostile or broken, refused before validation
MAX_NESTING = 64
_MANY_BRACKETS = 800


def loads(text: str) -> Any:
    """json.loads, refusing what is not JSON; JsonTextError (or json.JSONDecodeError, itself
    a ValueError, with its position) says why. RecursionError is left to the caller."""
    data = text.encode("utf-8", "surrogatepass")
    shape = data.translate(_DIGITS_AND_BRACKETS)
    if _LONG_DIGIT_RUN not in shape and (len(data) < 2 * _MANY_BRACKETS
                                         or shape.count(b"[") < _MANY_BRACKETS):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # not JSON, or not JSON every reader takes (NaN, 1e400, "\ud800"): the
            # strict reader says which, with its position
    return _strict_loads(text)


def _strict_loads(text: str) -> Any:
    try:
        document = _DECODER.decode(text)
    except ValueError as exc:
        if isinstance(exc, JsonTextError | json.JSONDecodeError):
            raise
        # int() refuses more digits than sys.get_int_max_str_digits() (a CPU guard)
        raise JsonTextError(f"an integer of more than {sys.get_int_max_str_digits()} "
                            "digits") from None
    # "\ud800" alone reads as a lone surrogate, which is no character: it cannot be written
    # as UTF-8 (the journal, the digest, the terminal's frame would each fail on it). Only
    # a text with a surrogate's escape (\ud800-\udfff, a pair included) is walked.
    if ("\\ud" in text or "\\uD" in text) and lone_surrogate(document):
        raise JsonTextError("a \\u escape of a lone UTF-16 surrogate (\\ud800-\\udfff) is "
                            "no character")
    return document


def nests_too_deep(text: str, document: Any) -> bool:
    """Whether `document`, read from `text`, nests deeper than MAX_NESTING (walked only when
    the text holds more brackets than that)."""
    return text.count("{") + text.count("[") > MAX_NESTING \
        and not nests_within(document, MAX_NESTING)


def nests_within(value: Any, limit: int) -> bool:
    """Whether a parsed document nests at most `limit` containers deep. Walked level by
    level, without recursion, with exact type checks (json.loads makes only dicts and lists):
    it runs on every terminal answer, and must cost less than parsing it. json.loads itself
    stops a nesting bomb with RecursionError."""
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return False
        below = []
        for node in level:
            for child in (node.values() if type(node) is dict else node):
                kind = type(child)
                if kind is dict or kind is list:
                    below.append(child)
        level = below
    return True


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                shown = quoted(name, 43)
                raise DuplicateName(f"the name {shown!r} appears twice in one object (JSON "
                                    "readers disagree on which one counts)")
            seen.add(name)
    return document


# Slower than _DECODER (a Python call per object): for a register's request, not for every
# frame a terminal sends.
_UNIQUE_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_finite,
                                   parse_int=_integer, object_pairs_hook=_unique_names)


def check_unique_names(text: str) -> None:
    """DuplicateName if an object of `text` (which loads() has read) holds a name twice.
    RFC 8259 leaves such a text's meaning to the reader: Python's keeps the last value,
    others keep the first or refuse it."""
    _UNIQUE_DECODER.decode(text)


def lone_surrogate(value: Any) -> bool:
    """Whether a parsed document holds a string no UTF-8 encoder takes."""
    pending = [value]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def without_lone_surrogates(value: Any) -> Any:
    """`value` with each string no UTF-8 encoder takes read as null (a key holding one is
    dropped); `value` itself when it holds none."""
    if not lone_surrogate(value):
        return value
    if isinstance(value, dict):
        return {k: without_lone_surrogates(v) for k, v in value.items() if not lone_surrogate(k)}
    if isinstance(value, list):
        return [without_lone_surrogates(v) for v in value]
    return None  # a string holding one


def compact(value: Any) -> bytes:
    """`value` as compact JSON text in UTF-8, non-ASCII characters as they are: what the
    bridge publishes, journals and frames. orjson writes it, 10 to 20 times as fast as
    json.dumps (which was 8 % of the daemon's CPU under load); a value orjson does not take
    (an integer beyond 64 bits, a name that is not a string) goes through json.dumps, whose
    text for everything else is the same (floats aside: 1e16 there is 1e+16)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

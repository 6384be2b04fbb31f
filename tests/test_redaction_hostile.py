"""redact() on hostile text: the same result as ever, at a cost that grows with the text only.

A terminal's or register's text reaches redact() (event details, error conditions, header
fields) and every terminal shares the one event loop, so a text that makes the filter's regexes
rescan a run of digits from each of its characters would stall every payment: 64 KiB of
`1%1%...` cost 34 s, `1 1 ... ;1234567*` over a minute, before _digits_sub() and _mask_sub().

Two kinds of proof, neither timed:
- differential: on many small texts, the linear rewrites give what the original whole-text
  substitutions (_DIGITS.sub, _MASKED.sub, still in the module) and the original card number
  search (copied below) give, also through redact() as a whole;
- structural: on each hostile family, the number of anchored regex tries (and of whole card
  checks) does not grow with the text, each of them one scan of its run; and the 64 KiB texts
  are redacted, to the exact expected text, within the test run.
"""

from __future__ import annotations

import random
from collections import Counter
from contextlib import ExitStack
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import redaction
from bridge.redaction import REDACTED, redact

SIZE = 64 * 1024


def _fill(unit: str, length: int) -> str:
    return (unit * (length // len(unit) + 1))[:length]


def _padded(size: int, head: str, unit: str, tail: str = "") -> str:
    """head, then unit repeated, then tail: size characters in all."""
    return head + _fill(unit, size - len(head) - len(tail)) + tail


# The original implementations the rewrites replace, as the reference of the old behaviour.

def _reference_card_numbers(groups: list[str], seps: list[str], lo: int, hi: int) -> set[int]:
    n, i, found_groups = len(groups), lo, set()
    while i < hi:
        found = -1
        for j in redaction._candidates(groups, seps, i, hi, redaction._CARD_GROUPS_ONLY):
            if redaction._a_card("".join(groups[i:j + 1]), False):
                found = j
        if found == i and ((i > 0 and seps[i - 1] == ".") or (i < n - 1 and seps[i] == ".")):
            found = -1
        if found >= 0:
            found_groups.update(range(i, found + 1))
        i += 1
    return found_groups


def _reference_mask_sub(text: str) -> str:
    return redaction._MASKED.sub(redaction._masked, text)


def _reference_digits_sub(text: str) -> str:
    return redaction._DIGITS.sub(redaction._digits, text)


def _outcome(function, *args):
    """A result or the exception's type: the rewrites must fail where the original did (it
    raises IndexError in _glued() on a run with an empty group glued to a letter, as
    `1%\t+4111111111111111a`: a defect of its own, left to its own fix)."""
    try:
        return "result", function(*args)
    except Exception as error:  # noqa: BLE001 (compared, not hidden)
        return "error", type(error).__name__


def _reference_redact(text: str) -> str:
    with ExitStack() as stack:
        for name, original in (("_card_numbers", _reference_card_numbers),
                               ("_mask_sub", _reference_mask_sub),
                               ("_digits_sub", _reference_digits_sub)):
            stack.enter_context(mock.patch.object(redaction, name, original))
        return redact(text)


# Alphabets built from what the patterns care about: digits, their separators, mask
# characters, letters that glue or start hex (0x), track separators and URL escapes.
DIGIT_PIECES = list("0123456789 .+%/_\t\n,-=Dda?F;") + [
    "%3d", "%3f", "%20", ", ", "%1", "1%", "1 ", "4111111111111111", "5413330089600010",
    "=2512", "4111 1111 1111 1111", "3782 822463 10005", "0.",
]
MASK_PIECES = list("0123456789*#Xx -aAb;é") + [
    "0x", "0X1", "0xA", "1 ", "1-", "4111 11** **** 1111", "4111 1111 1111 *111",
    "411111111111*111", "**** ", "#",
]
ALL_PIECES = DIGIT_PIECES + MASK_PIECES + ['"PAN": "', "expiryDate=", "^DOE/JOHN^", "B"]


def _texts(pieces: list[str]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), max_size=40).map("".join)


@settings(max_examples=1000, deadline=None)
@given(_texts(DIGIT_PIECES))
def test_digits_sub_is_the_original_substitution(text):
    assert _outcome(redaction._digits_sub, text) == _outcome(_reference_digits_sub, text)


@settings(max_examples=1000, deadline=None)
@given(_texts(MASK_PIECES))
def test_mask_sub_is_the_original_substitution(text):
    assert _outcome(redaction._mask_sub, " " + text) == _outcome(_reference_mask_sub, " " + text)
    assert _outcome(redaction._mask_sub, text) == _outcome(_reference_mask_sub, text)


@settings(max_examples=1000, deadline=None)
@given(_texts(ALL_PIECES))
def test_redact_is_the_original_redact(text):
    assert _outcome(redact, text) == _outcome(_reference_redact, text)


@pytest.mark.parametrize("seed", range(4))
def test_redact_is_the_original_redact_on_random_texts(seed):
    rng = random.Random(seed)
    for _ in range(1500):
        pieces = rng.choice((DIGIT_PIECES, MASK_PIECES, ALL_PIECES))
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 50)))
        assert _outcome(redact, text) == _outcome(_reference_redact, text), text


def test_card_numbers_are_the_original_ones():
    """Its Luhn check from running sums, and the _candidates() it skips, change nothing."""
    rng = random.Random(11)
    for _ in range(6000):
        count = rng.randint(1, 24)
        groups = [rng.choice(("", "0", "1", "12", "411", "4111", "1111", "822463", "10005",
                              "4111111111111111", "5413330089600010", "0010", "5", "000000",
                              "0000", "3782", "3056", "930902", "5904", "2199999999999998"))
                  if rng.random() < 0.7 else
                  "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 19)))
                  for _ in range(count)]
        seps = [rng.choice((" ", ".", "-", "/", "%", ", ", "%20", "_", "\t", "+"))
                for _ in range(count - 1)]
        lo = rng.randint(0, 1)
        hi = count - rng.randint(0, 1)
        assert redaction._card_numbers(groups, seps, lo, hi) == \
            _reference_card_numbers(groups, seps, lo, hi), (groups, seps, lo, hi)


# The hostile families, each of a given size, with the exact text redact() gives (the
# original's, checked against the original implementation when these were written).
def _hostile(size: int) -> dict[str, tuple[str, str]]:
    half = size // 2
    return {
        # 1. _DIGITS: a run whose digits all follow a `%` has no end; each digit began a rescan.
        "1%": (_fill("1%", size), _fill("1%", size)),
        "1 %": (_fill("1 %", size), _fill("1 %", size)),
        "%1": (_fill("%1", size), _fill("%1", size)),
        "a card, then 1 %": (_padded(size, "4111111111111111 ", "1 %"),
                             REDACTED + " " + _padded(size, "4111111111111111 ", "1 %")[17:]),
        "%1, then a card": (_padded(size, "", "%1", " 4111 1111 1111 1111"),
                            _padded(size, "", "%1", " 4111 1111 1111 1111")[:-19] + REDACTED),
        # 2. _MASKED: each separator in a run of groups began a scan of the rest of the run.
        "1 , then 7 digits and a mask": (_padded(size, "", "1 ", ";1234567*"),
                                         _padded(size, "", "1 ", ";1234567*")),
        "1 , then a mask that shows too much": (
            _padded(size, "", "1 ", ";4111 1111 1111 *111"),
            _padded(size, "", "1 ", ";4111 1111 1111 *111")[:-19] + "4111 11** **** *111"),
        "1-, then a mask that shows too much": (
            _padded(size, "", "1-", ";411111111111*111"),
            _padded(size, "", "1-", ";411111111111*111")[:-16] + "411111*******111"),
        "a glued run of 1 , then a mask": (
            _padded(size, "a", "1 ", ";4111 1111 1111 *111"),
            _padded(size, "a", "1 ", ";4111 1111 1111 *111")[:-19] + "4111 11** **** *111"),
        "0x1 , then a mask": ("_" + "0x1 " * (size // 4 - 5) + "4111 1111 1111 *111",
                              "_" + "0x1 " * (size // 4 - 5) + "4111 11** **** *111"),
        # 3. _card_numbers: each group of `1 1 1 ...` began seven Luhn checks.
        "1 ": (_fill("1 ", size), _fill("1 ", size)),
        "1 , a card between": (
            _fill("1 ", half) + "; 4111 1111 1111 1111 ;" + _fill("1 ", half - 23),
            _fill("1 ", half) + "; " + REDACTED + " ;" + _fill("1 ", half - 23)),
        "1 , a card inside": (
            _fill("1 ", half) + "5413330089600010 " + _fill("1 ", half - 17),
            _fill("1 ", half) + REDACTED + " " + _fill("1 ", half - 17)),
    }


HOSTILE = _hostile(SIZE)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_text_of_64_kib_is_redacted_as_ever(name):
    text, expected = HOSTILE[name]
    assert len(text) == SIZE
    assert redact(text) == expected


class _Counting:
    """A compiled pattern whose search and match calls are counted."""

    def __init__(self, pattern, counts: Counter, name: str):
        self._pattern, self._counts, self._name = pattern, counts, name

    def search(self, *args):
        self._counts[self._name + ".search"] += 1
        return self._pattern.search(*args)

    def match(self, *args):
        self._counts[self._name + ".match"] += 1
        return self._pattern.match(*args)


def _tries(text: str) -> Counter:
    """How often redact() starts a regex scan of a run, or checks a card number whole."""
    counts: Counter = Counter()
    a_card = redaction._a_card

    def counted_a_card(number, strict):
        counts["_a_card"] += 1
        return a_card(number, strict)

    with ExitStack() as stack:
        for name in ("_DIGITS", "_DIGITS_REACH", "_MASKED", "_MASK_STARTS",
                     "_MASK_RUN_OF_GROUPS", "_MASK_INNER_HEADS"):
            stack.enter_context(mock.patch.object(
                redaction, name, _Counting(getattr(redaction, name), counts, name)))
        stack.enter_context(mock.patch.object(redaction, "_a_card", counted_a_card))
        redact(text)
    return counts


@pytest.mark.parametrize("name", HOSTILE)
def test_the_tries_on_a_hostile_text_do_not_grow_with_it(name):
    """Each run is scanned a fixed number of times, whatever its length (each scan a regex
    over the run, no backtracking into it from its other characters): so the cost is linear.
    The same family at 4 KiB and at 64 KiB makes the same tries."""
    assert _tries(_hostile(4096)[name][0]) == _tries(HOSTILE[name][0])

"""Card data and key material never reach a log line.

The bridge logs IDs, categories and outcomes, not message bodies; this filter is the second
line of defence for whatever slips into a message anyway (an event's details, an exception
text): card numbers, track data, sensitive card fields, cardholder data, encrypted blobs and
key material are replaced before the line is written.

A field is recognised by its name, case-insensitively, in every shape a log line may carry it:
JSON (`"expiryDate": "12/2025"`, also escaped inside a JSON string), a Python repr
(`'ExpiryDate': '2512'`) and key=value, plain or URL-encoded (`expiryDate=12%2f2025`, as in
a terminal's AdditionalResponse). Card numbers (Luhn-checked, also grouped by spaces, dashes,
dots, `+`, `%20`, and, in the groups a card number is written in, `/`, `_`, tabs, line ends or
`, `) and track data (track 1 `B...^NAME^...`, track 2 with `=` or EMV `D`, with or without
sentinels) are recognised by their shape wherever they are; digits glued to letters
(P4111111111111111, POS14111111111111111) count when they also start as issued cards do. The
digits of a decimal number (3.4111111111111111) do not: an amount's fraction must survive. A masked card number (also one in
groups, as 4111 11** **** 1111) that shows more than the first six (eight, of 16 digits or
more) and the last four digits is masked down to the first six and last four.

It runs on every log record, so it must stay cheap: each pattern starts with a character class
the regex engine can skip ahead on, and each runs only when a cheap test finds that the line
could hold what it looks for (a field name before a `:` or `=`, a long enough run of digits or
of base64). Field names also match in snake_case.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from itertools import accumulate

REDACTED = "[redacted]"

# Field names whose value is never logged, whatever its shape (compared case-insensitively).
# Secrets and key material:
_SECRET_FIELDS = ("SensitiveCardData", "TrackData", "TrackValue", "Track1", "Track2", "Track3",
                  "NexoBlob", "Hmac", "Nonce", "Passphrase", "Password", "KeyValue")
# Card data (PCI DSS: PAN, expiry, service code; sensitive authentication data: track, CVC,
# PIN block) and identifiers tied to one card (alias, token, payment account reference):
_CARD_FIELDS = ("PAN", "CardNumber", "ExpiryDate", "ExpiryMonth", "ExpiryYear", "Expiry",
                "ExpDate", "CardSeqNumb", "ServiceCode", "CVC", "CVC2", "CVV", "CVV2", "CSC",
                "SecurityCode", "CardSecurityCode", "CardVerificationCode",
                "CardVerificationValue", "PIN", "PinBlock", "EncryptedPinBlock", "Alias",
                "PaymentAccountReference", "TokenValue")
# Cardholder and shopper personal data. Names may hold spaces in a plain key=value line.
_PERSON_FIELDS = ("ShopperEmail", "Email", "ShopperTelephone", "TelephoneNumber", "ShopperIP")
_NAME_FIELDS = ("CardHolderName", "HolderName", "ShopperName", "FirstName", "LastName")
_FIELD_NAMES = _SECRET_FIELDS + _CARD_FIELDS + _PERSON_FIELDS + _NAME_FIELDS


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _names(fields: tuple[str, ...]) -> str:
    """An alternation of the names, longest first, each also in snake_case (a Python repr)."""
    alternatives = (re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_?", f) for f in fields)
    return "|".join(sorted(alternatives, key=lambda f: (-len(f), f)))


# A value: a JSON or repr string (also one escaped inside a JSON string), an object or array
# (one level of nesting; deeper ones fail here and their inner fields are matched one by one),
# or a bare token up to the next delimiter. A quoted value cut off by a log line's end is
# taken up to that end.
_QUOTED = (r'b?"[^"\\]*(?:\\.[^"\\]*)*"'
           r"|b?'[^'\\]*(?:\\.[^'\\]*)*'"
           r'|\\"[^"\\]*(?:\\[^"][^"\\]*)*\\"'
           r"|\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}"
           r"|\[[^\[\]]*(?:\[[^\[\]]*\][^\[\]]*)*\]"
           r"|[\"'][^\"'\n]*(?=\n|\Z)")
_BARE = r"[^\s\"'\\,;&{}\[\]()<>]+"
# A name in a plain key=value line: words up to the next `key=` or `key:`. A word runs on
# through an apostrophe between letters (O'BRIEN), as through `%20` and hyphens.
_WORD = _BARE + r"(?:'" + _BARE + r")*"
_WORDS = _WORD + r"(?:[ +](?![\w.%-]*(?:[:=]|%3[aAdD]))" + _WORD + r"){0,4}"
# The character before the name (not part of a longer word) is matched rather than looked
# behind at, so the engine only tries at non-word characters; redact() prepends a space.
# A passphrase or password may hold spaces and any punctuation: written bare, nothing says
# where it ends (a `}`, `, "` or `&` may be its own), so its value runs to the line's end. A
# quoted one ends at its quote (_QUOTED); a JSON literal (`"Password": null, "Response": ...`)
# ends where the document goes on with its next field or closing brackets, so that the rest
# of a logged answer stays readable.
_PHRASE_FIELDS = ("Passphrase", "Password")
_PHRASE = (r"(?:(?:null|true|false)(?=\s*(?:,\s*[\"'][\w.-]*[\"']\s*:|[}\]]+\s*(?:[,}\]]|$)))"
           r"|[^\n]+)")
_FIELDS = re.compile(
    r"(?P<head>[^\w](?:(?P<name>(?i:" + _names(_NAME_FIELDS) + r"))|(?P<phrase>(?i:"
    + _names(_PHRASE_FIELDS) + r"))|(?i:"
    + _names(tuple(f for f in _SECRET_FIELDS if f not in _PHRASE_FIELDS)
             + _CARD_FIELDS + _PERSON_FIELDS) + r"))"
    r"(?:\\?[\"']|%2[27])?\s*(?:[:=]|%3[aAdD])\s*)"
    r"(?P<value>" + _QUOTED + r"|(?(name)" + _WORDS + "|(?(phrase)" + _PHRASE + "|" + _BARE
    + r")))")

# The cheap test that decides whether _FIELDS runs at all: read backwards from each `:` or `=`
# (on the reversed line, where the separator is the rare first character the engine skips to),
# the word before it is compared with the field names. URL-encoded separators (%3a, %3d) let
# _FIELDS run unconditionally.
_REVERSED_NAMES = frozenset(n[::-1] for f in _FIELD_NAMES for n in (f.lower(), _snake(f)))
_WORD_BEFORE_SEPARATOR = re.compile(r"[:=]\s*(?:[\\\"']|22%|72%)*([a-z0-9_]+)")

# Track 1: format code B, PAN, ^NAME^, expiry, service code, discretionary data (the `%` start
# sentinel may be there or not; `^` may be URL-encoded).
_TRACK1 = re.compile(r"(?a)B\d{12,19}(?:\^|%5[eE])[^\n^]{0,80}?(?:\^|%5[eE])"
                     r"[^\s?\"'&,;<>]{0,80}(?:\?|%3[fF])?")
# A run of digits and single separators long enough to hold a card number (_digits() looks
# for card numbers in it) and, when it ends in 12-19 digits followed by `=` (or the EMV `D` of
# tag 57) and an expiry, the rest of track 2 data: service code, discretionary data, F padding.
# Sentinels are optional, separators maybe URL-encoded.
_DIGITS = re.compile(r"(?a)(?P<run>\d[\d .+%/_\t\r\n,-]{10,}(?<!%)\d)"
                     r"(?P<track>(?:[=Dd]|%3[dD])\d{4}[0-9A-Fa-f]{0,40}(?:\?|%3[fF])?)?")
# _DIGITS.sub() would cost, where a run holds no digit its end can be (1%1%1%...: each `%1`
# fails (?<!%)), a scan to the run's end from each of its digits: quadratic. Where the run from
# one digit has no end, the runs from its later digits (the same characters, fewer of them)
# have none either; _digits_sub() therefore finds a run's reach once, possessively, with
# _DIGITS_REACH, and tries _DIGITS only at its first digit, then goes on after the run.
_DIGITS_REACH = re.compile(r"(?a)\d[\d .+%/_\t\r\n,-]{10,}+")
_GROUPS = re.compile(r"(%20|, |\r\n|[^0-9])")
_SEPARATORS = frozenset(" .+-/_\t\n\r") | {"%20", ", ", "\r\n"}
# Separators that join only the groups a card number is written in (4111/1111/1111/1111, the
# last group 1-4 digits, Amex 3782/822463/10005, Diners 3056/930902/5904): a path, a date or a list of numbers is no
# card number. A dot joins card-like groups (3-6 digits) only, so that a decimal is none.
_CARD_GROUPS_ONLY = frozenset("/_\t\n\r") | {", ", "\r\n"}
# A masked card number: digits and mask characters, not glued to letters or digits, maybe in
# groups joined by spaces or dashes (4111 11** **** 1111), with the groups around it. _masked()
# finds the masks in it and decides whether they show too much.
_MASK_PAN = (r"(?!0[xX][0-9A-Fa-f])"  # (0x...: hex, no mask)
             r"(?P<pan>(?:[0-9]+[ -])*[0-9]*[*#Xx][0-9*#Xx]*"
             r"(?:[ -][0-9*#Xx]+)*)(?![0-9A-Za-z*#])")
_MASKED = re.compile(r"(?P<head>[^0-9A-Za-z*#])" + _MASK_PAN)
# _MASKED tried from each of its heads costs, inside a long run of groups (1 1 1 ... 1), a
# scan of the rest of the run from each separator: quadratic. Yet what a head inside a run of
# groups finds follows from what the head at the run's start found: the same groups, fewer of
# them, so where that one failed these fail too (and where it matched, the match took them,
# but for a last group that fails alone). _mask_sub() therefore tries, with _MASK_STARTS, only
# heads that start a run of groups (a character that is no digit, mask character or letter
# other than a separator, or a separator not after a group), at most once per run. The run's
# inner heads are tried, one by one with _MASKED, only where its start could not be tried at
# all (glued to a letter, at the text's start, or a hex number 0x...: `blocked`), up to the
# first of them that can be.
_MASK_HEAD = r"(?<![0-9*#Xx])[ -]|[^0-9A-Za-z*# -]"
_MASK_STARTS = re.compile(r"(?P<head>" + _MASK_HEAD + r")" + _MASK_PAN
                          + r"|(?P<blocked>(?:" + _MASK_HEAD + r")(?=0[xX][0-9A-Fa-f])"
                          r"|(?:(?<=[A-WYZa-wyz])|\A)(?=[0-9*#Xx]))")
_MASK_RUN_OF_GROUPS = re.compile(r"[0-9*#Xx]++(?:[ -][0-9*#Xx]++)*+")
_MASK_INNER_HEADS = re.compile(r"[ -](?!0[xX][0-9A-Fa-f])")
_MASK_GROUPS = re.compile(r"([ -])")
_MASK_SEPARATORS = frozenset(" -")  # they join card groups only
_MASK_CHARACTERS = "*#Xx"
_A_MASK_CHARACTER = re.compile(r"[*#Xx]")
_ESCAPE_BEFORE = re.compile(r"(?:%[0-9A-Fa-f]{2}|\\[A-Za-z])\Z")
# Long base64 (or hex) runs: ciphertexts, derived keys. The character before the run is matched
# (as for _FIELDS) so that a run is scanned once, not from each of its characters. A run
# without a digit is words joined by `+` (a URL-encoded message), not a key: random base64 of
# 40 characters has no digit once in a thousand.
_BLOB = re.compile(r"(?P<head>[^A-Za-z0-9+/])[A-Za-z0-9+/]{40,}={0,2}")
_A_DIGIT = re.compile(r"[0-9]")
# Cheap tests that decide whether _DIGITS and _BLOB run at all: the line's UTF-8 bytes mapped
# to 0 (a character of the pattern's run) or x (any other), searched for a long enough run.
_RUN_CHARACTERS = "0123456789 .+%-/_\t\r\n,"  # what a card number's run may be made of
_DIGIT_RUN = bytes(48 if chr(b) in _RUN_CHARACTERS else 120 for b in range(256))
# For masks: digits to 0, mask characters to 1, spaces and dashes to 2. A mask shows too much
# only where seven digits run up to a mask character (00000001), or five follow one, or digits
# stand between two (_DIGITS_AFTER_A_MASK, which the engine finds by its literal start `10`);
# a mask showing the first six and last four (411111******1111) does not even start _MASKED.
# A mask in groups (4111 1111 1111 *111) is looked at so, with the separators dropped, only
# where the line has two groups of four and the start of a third (or Amex's four and six).
_MASK_RUN = bytes(48 if chr(b) in "0123456789" else 49 if chr(b) in _MASK_CHARACTERS
                  else 50 if chr(b) in " -" else 120 for b in range(256))
_DIGITS_AFTER_A_MASK = re.compile(rb"10(?:0000|0{0,3}1)")
_DIGITS_AND_MASKS_ALIKE = bytes.maketrans(b"1", b"0")
_BLOB_RUN = bytes(48 if chr(b).isascii() and chr(b).isalnum() or chr(b) in "+/" else 120
                  for b in range(256))


# Each digit's value, and its value doubled, the digits of the product summed (7: 14, 1 + 4 =
# 5), for the Luhn check in _card_numbers().
_DIGIT_VALUE = bytes.maketrans(b"0123456789", bytes(range(10)))
_DOUBLED_VALUE = bytes.maketrans(b"0123456789", bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))


def _luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _no_issuer(number: str) -> bool:
    """A number (or mask) whose first six digits, the issuer's number, are all zeros, as in a
    zero-padded counter (0000000000001x), is no card number."""
    return number.startswith("000000")


def _issued(number: str) -> bool:
    """Whether a number is as long and starts as issued payment cards do: 16-19 digits from 2
    to 6 (Mastercard's 2-series and Mir, JCB and Diners, Visa, Mastercard and Maestro,
    Discover and UnionPay), 15 from 34 or 37 (American Express), 14 from 30 or 36 (Diners),
    13 from 4 (Visa). The stricter test for digits glued to letters or after a decimal point,
    which are mostly identifiers, times and fractions: a millisecond or microsecond time
    starts with 1, a zero-padded one or a fraction below 0.1 with 0."""
    n = len(number)
    return ("2" <= number[0] <= "6" if n >= 16 else number[:2] in ("34", "37") if n == 15
            else number[:2] in ("30", "36") if n == 14 else number[0] == "4")


def _a_card(number: str, strict: bool) -> bool:
    """Whether a number of 13-19 digits is a card number: Luhn-checked, not one digit
    throughout, not _no_issuer(); and if strict, _issued() (tested first: it is cheaper)."""
    return ((not strict or _issued(number)) and _luhn_ok(number) and len(set(number)) > 1
            and not _no_issuer(number))


def _card_groups(groups: list[str]) -> bool:
    """Whether the groups are those a card number is written in: 4111 1111 1111 1111 (the last
    group 1-4 digits, so 13-19 digits in all), Amex 3782 822463 10005 or Diners 3056 930902
    5904."""
    lengths = [len(g) for g in groups]
    return lengths in ([4, 6, 5], [4, 6, 4]) or 1 <= lengths[-1] <= 4 and all(
        n == 4 for n in lengths[:-1])


def _candidates(groups: list[str], seps: list[str], i: int, hi: int,
                card_groups_only: frozenset[str]) -> Iterator[int]:
    """Each j (before hi) for which groups i to j may be one card number: 13-19 characters in
    one group or in groups joined by one and the same separator. The card_groups_only
    separators join only the groups a card number is written in, a dot only card-like groups
    (3-6 digits)."""
    total, sep = 0, seps[i] if i < len(seps) else None
    for j in range(i, hi):
        if j > i and (seps[j - 1] != sep or sep not in _SEPARATORS
                      or sep == "." and not all(3 <= len(g) <= 6 for g in (groups[i], groups[j]))
                      or sep in card_groups_only and len(groups[i]) != 4):
            return
        total += len(groups[j])
        if total > 19:
            return
        if total >= 13 and (j == i or sep not in card_groups_only
                            or _card_groups(groups[i:j + 1])):
            yield j


def _card_numbers(groups: list[str], seps: list[str], lo: int, hi: int) -> set[int]:
    """The digit groups (from lo to before hi) that make up card numbers: _candidates() of
    13-19 digits passing the Luhn check, save a run of one digit (0000000000000) and
    _no_issuer() ones, and the digits of a decimal number."""
    n, i, found_groups = len(groups), lo, set()
    # _a_card(groups i to j, False), for each candidate, from the run's digits: the Luhn check
    # from running sums (each digit's own value, or doubled where a number ending at an even,
    # or at an odd, offset doubles it), then one digit throughout and _no_issuer() on a slice.
    # No join, no loop over a candidate's digits. And where _candidates() would walk on from
    # group i (a separator that joins groups follows it) but no 13-19 digits from its start
    # on are a card, whatever the groups, it need not run from i at all.
    offsets = list(accumulate(map(len, groups), initial=0))
    digits = "".join(groups).encode("ascii")
    size = len(digits)
    values, doubled = digits.translate(_DIGIT_VALUE), digits.translate(_DOUBLED_VALUE)
    sums = []
    for parity in (0, 1):  # doubled at even offsets (a number ending at an even one), odd
        mixed = bytearray(values)
        mixed[parity::2] = doubled[parity::2]
        sums.append(list(accumulate(mixed, initial=0)))

    def a_card(begin: int, end: int) -> bool:
        running = sums[end % 2]
        if (running[end] - running[begin]) % 10:
            return False
        number = digits[begin:end]
        return number.count(number[:1]) < len(number) and not number.startswith(b"000000")

    while i < hi:
        found, begin = -1, offsets[i]
        if i >= len(seps) or seps[i] not in _SEPARATORS or any(
                a_card(begin, end) for end in range(begin + 13, min(begin + 19, size) + 1)):
            for j in _candidates(groups, seps, i, hi, _CARD_GROUPS_ONLY):
                if a_card(begin, offsets[j + 1]):
                    found = j
        if found == i and ((i > 0 and seps[i - 1] == ".") or (i < n - 1 and seps[i] == ".")):
            # The digits of a decimal number, an amount's among them: a float computed by a
            # register (2.2199999999999998) has 16 fraction digits, which the Luhn check
            # passes one time in ten (the second diff review: card-like ones were blanked)
            found = -1
        if found >= 0:
            found_groups.update(range(i, found + 1))
        # Even after a find, the next group is tried: it may start a card number reaching
        # past this one's end (in `10 20 30 4111 1111 1111 1111` the first ends in `4111 1111`).
        i += 1
    return found_groups


def _glued_left(groups: list[str], seps: list[str], hi: int) -> tuple[int, int] | None:
    """For a first group glued to letters: a cut k and a last group j such that the first
    group's digits from k on, with groups 1 to j (before hi), are a card number. Whole, the
    group may start one written in groups (P4111 1111 1111 1111); only part of it (the
    letters' identifier may end in digits of its own: POS1|4111111111111111), it must be one
    alone."""
    found = [j for j in _candidates(groups, seps, 0, min(hi, 19), _SEPARATORS)
             if _a_card("".join(groups[:j + 1]), True)]
    if found:
        return 0, found[-1]
    first = groups[0]
    for k in range(max(1, len(first) - 19), len(first) - 12):
        if _a_card(first[k:], True):
            return k, 0
    return None


def _glued_right(groups: list[str], seps: list[str], lo: int) -> tuple[int, int] | None:
    """For a last group glued to letters: a first group i (from lo) and a length m such that
    groups i on, the last one's first m digits only, are a card number: the whole last group
    ending one written in groups, or its start one alone (4111111111111111|X)."""
    last = len(groups) - 1
    near = max(lo, last - 18)  # (no card has more digits)
    for i in range(near, last + 1):
        if last - near in _candidates(groups[near:], seps[near:], i - near, last - near + 1,
                                      _SEPARATORS) and _a_card("".join(groups[i:]), True):
            return i, len(groups[last])
    for m in range(min(len(groups[last]), 19), 12, -1):
        if _a_card(groups[last][:m], True):
            return last, m
    return None


def _split(groups: list[str], seps: list[str], k: int, at: int) -> None:
    """Group k split in two at character `at` (nothing between them), in place."""
    groups[k:k + 1] = [groups[k][:at], groups[k][at:]]
    seps.insert(k, "")


# An Adyen TransactionID: four letters and digits, then a millisecond time, zero-padded to
# fifteen digits (4r7i001556529591000): an identifier, even where the last of the four is a
# digit that makes a card-like number with the time.
_ADYEN_ID = re.compile(r"(?a)[A-Za-z0-9]{4}00\d{13}")
_AN_ISSUER_DIGIT = re.compile(r"[2-6]")


def _adyen_id(text: str, start: int, digits: int) -> bool:
    """Whether the `digits` glued to letters at `start` end an Adyen TransactionID."""
    begin, end = start + digits - 19, start + digits
    return (begin >= 0 and _ADYEN_ID.fullmatch(text, begin, end) is not None
            and (begin == 0 or not text[begin - 1].isalnum())
            and (end == len(text) or not text[end].isalnum()))


def _glued(groups: list[str], seps: list[str], redacted: set[int], left: bool, right: bool,
           text: str, start: int) -> None:
    """The card numbers _glued_left() and _glued_right() find where the run is glued to
    letters (on the left, on the right), added to `redacted`, in place; a group cut in two
    becomes two groups with nothing between them. Each runs only where a card could start as
    _issued() ones do, a cheap test: a glued run is most often an identifier."""
    first = groups[0]
    if left and _AN_ISSUER_DIGIT.search(first, 0, max(1, len(first) - 12)) \
            and not _adyen_id(text, start, len(first)):
        free = min(redacted, default=len(groups))
        cut = _glued_left(groups, seps, free) if sum(map(len, groups[:free])) >= 13 else None
        if cut is not None and cut[0] > 0:
            _split(groups, seps, 0, cut[0])
            shifted = {k + 1 for k in redacted}
            redacted.clear()
            redacted.update(shifted, range(1, cut[1] + 2))
        elif cut is not None:
            redacted.update(range(cut[1] + 1))
    last = len(groups) - 1
    if right and last not in redacted:
        free = max(redacted, default=-1) + 1
        if sum(map(len, groups[free:])) >= 13 and any(
                "2" <= group[:1] <= "6" for group in groups[max(free, last - 18):]):
            # ([:1]: two separators in a row, "\t+", leave an empty group between them)
            cut = _glued_right(groups, seps, free)
            if cut is not None:
                if cut[1] < len(groups[last]):
                    _split(groups, seps, last, cut[1])  # the head stays at `last`
                redacted.update(range(cut[0], last + 1))


def _digits(match: re.Match[str]) -> str:
    run, track = match.group("run"), match.group("track")
    parts = _GROUPS.split(run)
    groups, seps = parts[0::2], parts[1::2]
    # Digits glued to letters are mostly part of an identifier (an Adyen TransactionID is four
    # letters and digits, then fifteen digits), so there a card number must also be _issued()
    # (the stricter test), and may take only the glued group's end (POS1|4111111111111111) or
    # start (4111111111111111|X); a %xx or \x escape before them is no letter.
    text, start, end = match.string, match.start(), match.end()
    lo = int(start > 0 and text[start - 1].isalpha()
             and not _ESCAPE_BEFORE.search(text, max(0, start - 3), start))
    hi = len(groups) - int(track is None and end < len(text) and text[end].isalpha())
    redacted = _card_numbers(groups, seps, lo, hi) if sum(map(len, groups)) >= 13 else set()
    if lo or hi < len(groups):
        _glued(groups, seps, redacted, bool(lo), hi < len(groups), text, start)
    is_track = track is not None and len(groups[-1]) >= 12
    if is_track:
        redacted.add(len(groups) - 1)
    if not redacted:
        return match.group(0)
    out: list[str] = []
    for k, group in enumerate(groups):
        if k not in redacted:
            out.append(group)
        elif k == 0 or k - 1 not in redacted:
            out.append(REDACTED)
        if k < len(seps) and not (k in redacted and k + 1 in redacted):
            out.append(seps[k])
    if track is not None and not is_track:
        out.append(track)
    return "".join(out)


# A field's name ending an absolute path, followed by the system's error text for it
# (/etc/poi-bridge/credentials/mqtt-password: Permission denied): that is a file and why it
# cannot be used, which the technician needs. Nothing else after such a path is spared:
# key=value shapes (acquirer/ExpiryDate=12/29, key/KeyValue=...) are fields.
_ABSOLUTE_PATH_BEFORE = re.compile(r"(?:\A|\s)/[\w./-]*\Z")
_PATH_ERRORS = tuple(sorted({": " + os.strerror(n) for n in range(1, 200)
                             if not os.strerror(n).startswith("Unknown error")}))
_WORD_END = re.compile(r"\w*")


def _field(match: re.Match[str]) -> str:
    value = match.group("value")
    head = match.group("head")
    at = match.start("head") + 1  # the name's first character
    if _ABSOLUTE_PATH_BEFORE.search(match.string, max(0, at - 256), at) \
            and match.string.startswith(_PATH_ERRORS, _WORD_END.match(match.string, at).end()):
        return match.group(0)
    if value[0] in "{[":  # an object or array becomes a string in the same quoting
        quote = '\\"' if '\\"' in head else "'" if "'" in head else '"'
    else:
        quote = value[:2] if value.startswith('\\"') else value[0] if value[0] in "\"'" else ""
    return head + quote + REDACTED + quote


def _shown(mask: str) -> tuple[int, int]:
    """How many digits a mask shows before its first mask character and after its last."""
    return (len(mask) - len(mask.lstrip("0123456789")),
            len(mask) - len(mask.rstrip("0123456789")))


def _shows_too_much(mask: str) -> bool:
    """A mask may show the first six digits (eight, of 16 or more) and the last four, nothing
    between."""
    first, last = _shown(mask)
    return not (first + last == sum(ch.isdigit() for ch in mask) and last <= 4
                and (first <= 6 or first <= 8 and len(mask) >= 16)) and not _no_issuer(mask)


def _masked(match: re.Match[str]) -> str:
    """Each mask in the match that shows too much, masked down to the first six digits and the
    last four. Where the groups leave open which of them a mask is (2026 4111 11** **** 1111),
    the longest _candidates() with the mask character are taken: it is fine if one of them
    is, else the first of them is masked down. A card number without a mask is _DIGITS'."""
    pan = match.group("pan")
    parts = _MASK_GROUPS.split(pan)
    groups, seps = parts[0::2], parts[1::2]
    start = 0
    while start < len(groups):
        masked_at = next((k for k in range(start, len(groups))
                          if _A_MASK_CHARACTER.search(groups[k])), None)
        if masked_at is None:
            break
        windows = [(i, j, "".join(groups[i:j + 1]))
                   for i in range(max(start, masked_at - 4), masked_at + 1)
                   for j in _candidates(groups, seps, i, len(groups), _MASK_SEPARATORS)
                   if j >= masked_at]
        longest = max((len(mask) for _, _, mask in windows), default=0)
        windows = [window for window in windows if len(window[2]) == longest]
        fine = [j for _, j, mask in windows if not _shows_too_much(mask)]
        if fine or not windows:
            start = fine[0] + 1 if fine else masked_at + 1
            continue
        i, j, mask = windows[0]
        fill = next(ch for ch in mask if ch in _MASK_CHARACTERS)
        first, last = (min(n, most) for n, most in zip(_shown(mask), (6, 4)))
        mask = mask[:first] + fill * (len(mask) - first - last) + mask[len(mask) - last:]
        for k in range(i, j + 1):
            groups[k], mask = mask[:len(groups[k])], mask[len(groups[k]):]
        start = j + 1
    return match.group("head") + "".join(g + s for g, s in zip(groups, seps + [""]))


def _shows_too_much_here(masks: bytes) -> bool:
    """The cheap test for a mask that shows too much, on the line mapped by _MASK_RUN."""
    return b"00000001" in masks or _DIGITS_AFTER_A_MASK.search(masks) is not None


def _card_groups_here(masks: bytes) -> bool:
    """The cheap test for a mask in groups, on the line mapped by _MASK_RUN."""
    groups = masks.translate(_DIGITS_AND_MASKS_ALIKE)
    return b"00002000020" in groups or b"0000200000020" in groups


def _mask_sub(text: str) -> str:
    """_MASKED.sub(_masked, text), the same matches replaced, each head tried at most once."""
    out: list[str] = []
    done = pos = 0
    while (match := _MASK_STARTS.search(text, pos)) is not None:
        if match.group("blocked") is None:
            found: re.Match[str] | None = match
            pos = match.end()
        else:  # a run of groups whose start cannot be tried: its inner heads can
            start = match.end()
            end = _MASK_RUN_OF_GROUPS.match(text, start).end()
            head = _MASK_INNER_HEADS.search(text, start, end + 3)
            found = (_MASKED.match(text, head.start())
                     if head is not None and head.start() < end else None)
            pos = found.end() if found is not None else end
        if found is not None:
            out += text[done:found.start()], _masked(found)
            done = found.end()
    out.append(text[done:])
    return "".join(out)


def _digits_sub(text: str) -> str:
    """_DIGITS.sub(_digits, text), the same matches replaced, each run scanned once."""
    out: list[str] = []
    done = pos = 0
    while (reach := _DIGITS_REACH.search(text, pos)) is not None:
        match = _DIGITS.match(text, reach.start())
        if match is None:
            pos = reach.end()
            continue
        out += text[done:match.start()], _digits(match)
        done = pos = match.end()
    out.append(text[done:])
    return "".join(out)


def _blob(match: re.Match[str]) -> str:
    if not _A_DIGIT.search(match.group(0)):
        return match.group(0)
    return match.group("head") + REDACTED


def redact(text: str) -> str:
    """`text` with card data, cardholder data and key material replaced by REDACTED. Never
    raises: it runs inside every log call and on what the bridge publishes, and a bug met on
    some odd text must not make either fail. It then scrubs every run of digits instead."""
    try:
        return _redact(text)
    except Exception:  # (a bug: the text is still not let out as it is)
        return _SCRUB.sub(REDACTED, _BLOB.sub(_blob, " " + text)[1:])


# Of a long text to be quoted, what is filtered before the cut: the cut falls at or after it
_QUOTE_READ = 4096


def quoted(text: str, limit: int, more: str = "...") -> str:
    """Untrusted `text` as a message quotes it: filtered (redact), then cut to `limit`
    characters, `more` marking a cut. Cut first, the part of a card number left before the
    cut (15 digits of 16, say) is no longer one the filter knows, and it went out as it was.
    Of a long text only the first _QUOTE_READ characters are filtered, less any run of
    digits the reading cut into."""
    read = text if len(text) <= _QUOTE_READ else text[:_QUOTE_READ].rstrip(_RUN_CHARACTERS)
    shown = redact(read)
    if read is text and len(shown) <= limit:
        return shown
    return shown[:max(limit - len(more), 0)] + more


# What redact() falls back to after a bug: any run of 6 digits or more, separators between
_SCRUB = re.compile(r"\d[\d .+%/_\t\r\n,=^-]{4,}\d")


def _redact(text: str) -> str:
    if "%3" in text or not _REVERSED_NAMES.isdisjoint(
            _WORD_BEFORE_SEPARATOR.findall(text.lower()[::-1])):
        text = _FIELDS.sub(_field, " " + text)[1:]
    if "^" in text or "%5" in text:
        text = _TRACK1.sub(REDACTED, text)
    raw = text.encode("utf-8", "surrogatepass")
    masks = raw.translate(_MASK_RUN)
    if b"1" in masks and (_shows_too_much_here(masks) or _card_groups_here(masks)
                          and _shows_too_much_here(masks.replace(b"2", b""))):
        text = _mask_sub(" " + text)[1:]
    if b"000000000000" in raw.translate(_DIGIT_RUN):
        text = _digits_sub(text)
    if b"0" * 40 in raw.translate(_BLOB_RUN):
        text = _BLOB.sub(_blob, " " + text)[1:]
    return text



def redact_json(value: object) -> object:
    """`value`, JSON a register wrote, as the bridge may publish it back (a quoted ID, a
    command's echoed "transaction"): each text through the filter, inside objects and lists
    too; a number the filter would change (a card number sent as a JSON number) and a member
    the filter hides by its name ("expiry_date") become REDACTED."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_json(item) for item in value]
    if isinstance(value, dict):
        return {redact(key): REDACTED if _names_hidden_data(key) else redact_json(item)
                for key, item in value.items()}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return REDACTED if any(redact(text) != text for text in _number_texts(value)) else value
    return value  # true, false, null


def _number_texts(value: int | float) -> list[str]:
    """How a number could show a card number: as written, and, for a float (the filter
    leaves decimals alone: an amount's fraction must survive), its whole part and its
    digits without the point and exponent (4111111111111111.0, 4.111111111111111e+18)."""
    text = json.dumps(value)
    if isinstance(value, int):
        return [text]
    mantissa = repr(value).partition("e")[0].replace(".", "").lstrip("-")
    texts = [text, mantissa]
    if value.is_integer():
        texts.append(str(int(value)))
    return texts


def _names_hidden_data(key: str) -> bool:
    """Whether the filter hides a member named `key` whatever its value (PAN, Password)."""
    member = json.dumps({key: ""})
    return redact(member) != member

class RedactingFilter(logging.Filter):
    """Rewrites each record's final message; attach it to every handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True

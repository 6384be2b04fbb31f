"""Card data and key material never reach a log line.

The bridge logs IDs, categories and outcomes, not message bodies; this filter is the second
line of defence for whatever slips into a message anyway (an event's details, an exception
text): card numbers, track data, sensitive card fields, encrypted blobs and key material are
replaced before the line is written.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"


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


# 13-19 digits, optionally grouped by single spaces or dashes: a card number's shape.
_PAN = re.compile(r"(?<![\d.])(?:\d[ -]?){12,18}\d(?![\d.])")
# Track 1 (%B...^NAME^...?) and track 2 (;PAN=YYMM...?) data.
_TRACK = re.compile(r"%B\d{12,19}\^[^?\n]{0,80}\??|;?\d{12,19}=\d{4}[^?\s\"']{0,40}\??")
# JSON fields that carry secrets or card data, whatever their value's shape.
_FIELDS = re.compile(
    r'("?(?:SensitiveCardData|TrackData|NexoBlob|Hmac|Nonce|Passphrase|passphrase|'
    r'ExpiryDate|CardSeqNumb|PAN|CardNumber|Track1|Track2|Track3|KeyValue)"?\s*[:=]\s*)'
    r'("(?:[^"\\]|\\.)*"|\{[^{}]*\}|[^\s,}]+)')
# Long base64 runs: ciphertexts, derived keys.
_BLOB = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{40,}={0,2}")


def _pan(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return REDACTED if 13 <= len(digits) <= 19 and _luhn_ok(digits) else match.group(0)


def redact(text: str) -> str:
    text = _FIELDS.sub(lambda m: m.group(1) + '"' + REDACTED + '"', text)
    text = _TRACK.sub(REDACTED, text)
    text = _PAN.sub(_pan, text)
    return _BLOB.sub(REDACTED, text)


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

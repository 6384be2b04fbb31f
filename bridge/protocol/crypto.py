"""Local message encryption compatible with Adyen's "NexoCrypto" (AdyenCryptoVersion 1).

Sans-I/O: everything here works on parsed JSON documents (dicts) and bytes.

The scheme, as the terminals and Adyen's client libraries implement it:

* key material: PBKDF2-HMAC-SHA1(passphrase, salt b"AdyenNexoV1Salt", 4000 iterations,
  80 bytes) -> bytes 0-32 HMAC key, 32-64 AES-256 key, 64-80 IV;
* the whole document (``{"SaleToPOIResponse": {...}}``, MessageHeader included) is serialised
  to JSON bytes, encrypted with AES-256-CBC and PKCS7 padding under IV = derived IV XOR a
  random 16-byte Nonce, and authenticated with HMAC-SHA256 over the *plaintext* bytes;
* on the wire the MessageHeader travels in clear next to the ciphertext::

    {"SaleToPOIResponse": {"MessageHeader": {...}, "NexoBlob": b64(ciphertext),
     "SecurityTrailer": {"AdyenCryptoVersion": 1, "KeyIdentifier": ..., "KeyVersion": ...,
                         "Nonce": b64(nonce), "Hmac": b64(hmac)}}}

The HMAC covers the exact decrypted bytes (a terminal's JSON need not be compact: Adyen's own
test vector is spaced), so decryption verifies before it parses. Only the ciphertext is
authenticated; the clear MessageHeader and the envelope's top-level name are not, so after
decryption they are checked against the authenticated copy.

Errors are all :class:`CryptoError` (a ``ValueError``) subclasses whose messages are meant for
a technician and never contain a passphrase or derived key. Note that the scheme authenticates
the plaintext rather than the ciphertext (MAC-then-encrypt), so a padding error is reported
before the HMAC is checked: that is inherent to the wire format.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hmac
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from bridge.protocol import jsontext
from bridge.redaction import quoted

__all__ = [
    "ADYEN_CRYPTO_VERSION",
    "CryptoError",
    "DecryptionFailed",
    "InvalidTrailer",
    "KeyRing",
    "MalformedEnvelope",
    "MissingTrailer",
    "NexoKey",
    "TamperedMessage",
    "TerminalCryptoError",
    "UnknownKey",
    "decrypt_message",
    "encrypt_message",
    "is_encrypted",
    "serialise_document",
    "terminal_crypto_error",
]

ADYEN_CRYPTO_VERSION = 1
KDF_SALT = b"AdyenNexoV1Salt"
KDF_ITERATIONS = 4000
NONCE_SIZE = 16
HMAC_SIZE = 32
_BLOCK = 16
ENVELOPE_NAMES = ("SaleToPOIRequest", "SaleToPOIResponse")

# How much of an untrusted value an error message may quote.
_QUOTE_LIMIT = 80


# --- errors ------------------------------------------------------------------------------------

class CryptoError(ValueError):
    """A message could not be encrypted, decrypted or verified. Never carries key material."""


class MalformedEnvelope(CryptoError):
    """The document is not a SaleToPOI envelope at all, or its NexoBlob is not usable text."""


class TerminalCryptoError(MalformedEnvelope):
    """The terminal answered with its plain-JSON crypto error instead of a SaleToPOI message."""


class MissingTrailer(CryptoError):
    """The envelope has no SecurityTrailer (absent or null) or no NexoBlob."""


class InvalidTrailer(CryptoError):
    """The SecurityTrailer is present but unusable (types, base64, crypto version, sizes)."""


class UnknownKey(CryptoError):
    """No configured key matches the message's KeyIdentifier / KeyVersion."""

    def __init__(self, message: str, identifier: str, version: int) -> None:
        super().__init__(message)
        self.identifier = identifier
        self.version = version


class TamperedMessage(CryptoError):
    """The HMAC does not verify, or the clear parts disagree with the authenticated payload."""


class DecryptionFailed(CryptoError):
    """The ciphertext does not decrypt (bad padding, bad length): usually a wrong passphrase."""


def _quote(value: Any) -> str:
    """An untrusted value, shortened and made safe for one log line."""
    return quoted(repr(value), _QUOTE_LIMIT)


def _printable(text: str, limit: int = 200) -> str:
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return quoted(cleaned, limit)


# --- keys --------------------------------------------------------------------------------------

class NexoKey:
    """One terminal encryption key: its identifier, version and the material derived from it.

    The passphrase is used once, to derive the key material, and is not kept. Neither repr()
    nor str() shows any of it.
    """

    __slots__ = ("_identifier", "_version", "_hmac_key", "_aes_key", "_iv")

    def __init__(self, identifier: str, version: int, passphrase: str | bytes) -> None:
        if not isinstance(identifier, str) or not identifier:
            raise ValueError("NexoKey identifier must be a non-empty string")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"NexoKey version must be a non-negative integer, "
                             f"not {_quote(version)}")
        if isinstance(passphrase, str):
            secret = passphrase.encode("utf-8")
        elif isinstance(passphrase, (bytes, bytearray, memoryview)):
            secret = bytes(passphrase)
        else:
            raise TypeError("NexoKey passphrase must be str or bytes")
        if not secret:
            raise ValueError(f"NexoKey {identifier!r} v{version}: the passphrase is empty")
        material = PBKDF2HMAC(algorithm=hashes.SHA1(), length=80, salt=KDF_SALT,
                              iterations=KDF_ITERATIONS).derive(secret)
        self._identifier = identifier
        self._version = version
        self._hmac_key = material[0:32]
        self._aes_key = material[32:64]
        self._iv = material[64:80]

    @property
    def identifier(self) -> str:
        return self._identifier

    @property
    def version(self) -> int:
        return self._version

    def __repr__(self) -> str:
        return f"NexoKey(identifier={self._identifier!r}, version={self._version})"

    __str__ = __repr__

    # internal primitives ----------------------------------------------------------------------

    def _mac(self, plaintext: bytes) -> bytes:
        return hmac.digest(self._hmac_key, plaintext, "sha256")

    def _cipher(self, nonce: bytes) -> Cipher:
        iv = bytes(a ^ b for a, b in zip(self._iv, nonce, strict=True))
        return Cipher(algorithms.AES(self._aes_key), modes.CBC(iv))


def same_key(one: NexoKey | None, other: NexoKey | None) -> bool:
    """Whether two terminals' encryption settings are the same: both without a key, or the
    same identifier, version and passphrase (its derived material compared in constant
    time, so nothing of it is learnt from how long the comparison takes)."""
    if one is None or other is None:
        return one is other
    return (one.identifier == other.identifier and one.version == other.version
            and hmac.compare_digest(one._hmac_key + one._aes_key + one._iv,
                                    other._hmac_key + other._aes_key + other._iv))


class KeyRing:
    """Several keys, looked up by (KeyIdentifier, KeyVersion) as a message's trailer names them."""

    def __init__(self, keys: Iterable[NexoKey] = ()) -> None:
        self._keys: dict[tuple[str, int], NexoKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: NexoKey) -> None:
        if not isinstance(key, NexoKey):
            raise TypeError(f"KeyRing holds NexoKey objects, not {type(key).__name__}")
        slot = (key.identifier, key.version)
        if slot in self._keys:
            raise ValueError(f"KeyRing already holds key {key.identifier!r} v{key.version}")
        self._keys[slot] = key

    def get(self, identifier: str, version: int) -> NexoKey | None:
        return self._keys.get((identifier, version))

    def __contains__(self, slot: object) -> bool:
        return slot in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[NexoKey]:
        return iter(list(self._keys.values()))

    def __repr__(self) -> str:
        slots = ", ".join(f"{i!r} v{v}" for i, v in self._keys)
        return f"KeyRing([{slots}])"


def _find_key(keys: KeyRing | NexoKey, identifier: str, version: int) -> NexoKey:
    if isinstance(keys, NexoKey):
        if keys.identifier == identifier and keys.version == version:
            return keys
        configured = f"{keys.identifier!r} v{keys.version}"
    elif isinstance(keys, KeyRing):
        found = keys.get(identifier, version)
        if found is not None:
            return found
        configured = ", ".join(f"{k.identifier!r} v{k.version}" for k in keys) or "none"
    else:
        raise TypeError(f"keys must be a NexoKey or a KeyRing, not {type(keys).__name__}")
    raise UnknownKey(
        f"message is encrypted with KeyIdentifier {_quote(identifier)} KeyVersion {version}, "
        f"but no such key is configured (configured: {configured})",
        identifier, version)


# --- helpers -----------------------------------------------------------------------------------

def serialise_document(document: Any) -> bytes:
    """The deterministic plaintext bytes of a document: compact JSON, key order kept, UTF-8.

    These are the bytes that get encrypted and HMAC'd.
    """
    try:
        text = json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise CryptoError(f"document cannot be serialised as JSON: {exc}") from None


def _envelope(document: Any) -> tuple[str, dict[str, Any]]:
    """(name, body) of a {"SaleToPOIRequest"|"SaleToPOIResponse": {...}} document."""
    if not isinstance(document, Mapping):
        raise MalformedEnvelope(
            f"expected a SaleToPOIRequest or SaleToPOIResponse object, "
            f"got {type(document).__name__}")
    names = [name for name in document if name in ENVELOPE_NAMES]
    if len(names) != 1 or len(document) != 1:
        keys = ", ".join(_quote(k) for k in list(document)[:5]) or "nothing"
        raise MalformedEnvelope(
            f"expected exactly one SaleToPOIRequest or SaleToPOIResponse member, got {keys}")
    name = names[0]
    body = document[name]
    if not isinstance(body, Mapping):
        raise MalformedEnvelope(f"{name} is {type(body).__name__}, not an object")
    return name, body  # type: ignore[return-value]


def is_encrypted(document: Any) -> bool:
    """True if the document is a SaleToPOI envelope carrying a NexoBlob or a SecurityTrailer.

    A plain message with ``"SecurityTrailer": null`` (as terminals send) is not encrypted. A
    half-encrypted one (trailer without blob, or blob without trailer) counts as encrypted, so
    that decrypt_message() reports it instead of it passing as a plain message.
    """
    try:
        _, body = _envelope(document)
    except CryptoError:
        return False
    # (a null NexoBlob, as a register library writing every optional field sends, is none)
    return body.get("NexoBlob") is not None or body.get("SecurityTrailer") is not None


def key_named(document: Any, keys: Iterable[NexoKey]) -> NexoKey | None:
    """The one of `keys` whose KeyIdentifier and KeyVersion the document's SecurityTrailer
    names (a terminal in a key rotation may use either of its keys), or None: not named,
    or no trailer this can read (decrypt_message says what is wrong with it)."""
    try:
        _, body = _envelope(document)
    except CryptoError:
        return None
    trailer = body.get("SecurityTrailer")
    if not isinstance(trailer, Mapping):
        return None
    named = (trailer.get("KeyIdentifier"), trailer.get("KeyVersion"))
    return next((key for key in keys if (key.identifier, key.version) == named), None)


def _b64(value: Any, what: str, error: type[CryptoError]) -> bytes:
    if not isinstance(value, str):
        raise error(f"{what} must be a base64 string, not {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise error(f"{what} is not valid base64: {_quote(value)}") from None


def terminal_crypto_error(document: Any) -> str | None:
    """A readable description if `document` is a terminal's plain-JSON crypto error, else None.

    A terminal that cannot decrypt or verify a message answers with something like
    ``{"errors": ["Nexo Service: crypto error (3)"], "ServiceID": "-NULL-"}`` instead of a
    SaleToPOIResponse. Anything else (a SaleToPOI document, a non-dict, other errors) gives None.
    """
    if not isinstance(document, Mapping) or any(name in document for name in ENVELOPE_NAMES):
        return None
    errors = document.get("errors")
    if isinstance(errors, str):
        errors = [errors]
    if not isinstance(errors, list):
        return None
    texts = [_printable(e) for e in errors if isinstance(e, str)]
    if not any("crypto" in t.lower() for t in texts):
        return None
    return "terminal reports crypto error: " + "; ".join(t for t in texts[:5] if t)


# --- encrypt / decrypt -------------------------------------------------------------------------

def encrypt_message(document: dict[str, Any], key: NexoKey, *,
                    nonce: bytes | None = None) -> dict[str, Any]:
    """Encrypt a {"SaleToPOIRequest"|"SaleToPOIResponse": {...}} document under `key`.

    Returns the wire envelope: the MessageHeader copied in clear, the NexoBlob and the
    SecurityTrailer. `nonce` (16 bytes) is for tests; by default a fresh random one is used.
    The input document is not modified.
    """
    if not isinstance(key, NexoKey):
        raise TypeError(f"key must be a NexoKey, not {type(key).__name__}")
    name, body = _envelope(document)
    if is_encrypted(document):
        raise CryptoError(f"{name} is already encrypted (it has a NexoBlob or SecurityTrailer)")
    header = body.get("MessageHeader")
    if not isinstance(header, Mapping):
        raise CryptoError(f"{name} has no MessageHeader object to send in clear")
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    elif not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_SIZE:
        raise CryptoError(f"nonce must be {NONCE_SIZE} bytes")
    nonce = bytes(nonce)

    if "NexoBlob" in body or "SecurityTrailer" in body:  # (null: the envelope's own, below)
        document = {name: {k: v for k, v in body.items()
                           if k not in ("NexoBlob", "SecurityTrailer")}}
    plaintext = serialise_document(document)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = key._cipher(nonce).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()

    return {name: {
        "MessageHeader": copy.deepcopy(dict(header)),
        "NexoBlob": base64.b64encode(ciphertext).decode("ascii"),
        "SecurityTrailer": {
            "AdyenCryptoVersion": ADYEN_CRYPTO_VERSION,
            "KeyIdentifier": key.identifier,
            "KeyVersion": key.version,
            "Nonce": base64.b64encode(nonce).decode("ascii"),
            "Hmac": base64.b64encode(key._mac(plaintext)).decode("ascii"),
        },
    }}


def decrypt_message(document: Any, keys: KeyRing | NexoKey) -> dict[str, Any]:
    """Decrypt and verify an encrypted envelope; return the plaintext document.

    The key is chosen by the SecurityTrailer's KeyIdentifier / KeyVersion. Raises only
    CryptoError subclasses for anything wrong with `document` (TypeError if `keys` is neither a
    NexoKey nor a KeyRing, which is a programming error).
    """
    problem = terminal_crypto_error(document)
    if problem is not None:
        raise TerminalCryptoError(problem)
    name, body = _envelope(document)

    trailer = body.get("SecurityTrailer")
    if trailer is None:
        raise MissingTrailer(f"{name} has no SecurityTrailer: the message is not encrypted")
    if "NexoBlob" not in body:
        raise MissingTrailer(f"{name} has a SecurityTrailer but no NexoBlob")
    if not isinstance(trailer, Mapping):
        raise InvalidTrailer(f"SecurityTrailer is {type(trailer).__name__}, not an object")

    crypto_version = trailer.get("AdyenCryptoVersion")
    if type(crypto_version) is not int or crypto_version != ADYEN_CRYPTO_VERSION:
        raise InvalidTrailer(f"unsupported AdyenCryptoVersion {_quote(crypto_version)} "
                             f"(only {ADYEN_CRYPTO_VERSION} is supported)")
    identifier = trailer.get("KeyIdentifier")
    if not isinstance(identifier, str) or not identifier:
        raise InvalidTrailer(f"SecurityTrailer KeyIdentifier must be a non-empty string, "
                             f"not {_quote(identifier)}")
    version = trailer.get("KeyVersion")
    if type(version) is not int:
        raise InvalidTrailer(f"SecurityTrailer KeyVersion must be an integer, "
                             f"not {_quote(version)}")
    nonce = _b64(trailer.get("Nonce"), "SecurityTrailer Nonce", InvalidTrailer)
    if len(nonce) != NONCE_SIZE:
        raise InvalidTrailer(f"SecurityTrailer Nonce is {len(nonce)} bytes, "
                             f"expected {NONCE_SIZE}")
    mac = _b64(trailer.get("Hmac"), "SecurityTrailer Hmac", InvalidTrailer)
    if len(mac) != HMAC_SIZE:
        raise InvalidTrailer(f"SecurityTrailer Hmac is {len(mac)} bytes, expected {HMAC_SIZE}")
    ciphertext = _b64(body["NexoBlob"], "NexoBlob", MalformedEnvelope)

    key = _find_key(keys, identifier, version)
    which = f"key {_quote(identifier)} v{version}"
    if not ciphertext or len(ciphertext) % _BLOCK:
        raise DecryptionFailed(f"NexoBlob is {len(ciphertext)} bytes, not a non-zero multiple "
                               f"of {_BLOCK}: the message is truncated or corrupt")
    decryptor = key._cipher(nonce).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plaintext = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise DecryptionFailed(
            f"NexoBlob does not decrypt with {which} (invalid padding): usually the "
            f"passphrase differs from the terminal's, or the message is corrupt") from None
    if not hmac.compare_digest(key._mac(plaintext), mac):
        raise TamperedMessage(f"Hmac does not verify with {which}: wrong key or tampered message")

    try:
        text = plaintext.decode("utf-8-sig")
        inner = jsontext.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecryptionFailed(f"decrypted payload is not UTF-8 JSON: {exc}") from None
    # As deep as a message in the clear may be (load_json): the envelope's own depth was
    # checked, what it carried was not, and 65 to about 950 levels went on to validation
    if jsontext.nests_too_deep(text, inner):
        raise DecryptionFailed(
            f"decrypted payload nested deeper than {jsontext.MAX_NESTING} levels")
    if not isinstance(inner, dict) or list(inner) != [name] or not isinstance(inner[name], dict):
        got = (", ".join(_quote(k) for k in list(inner)[:5]) if isinstance(inner, dict)
               else type(inner).__name__)
        raise TamperedMessage(f"the envelope is a {name} but the authenticated payload is {got}")
    clear_header = body.get("MessageHeader")
    inner_header = inner[name].get("MessageHeader")
    if clear_header is not None and inner_header is not None:
        try:
            agree = clear_header == inner_header
        except RecursionError:
            agree = False
        if not agree:
            raise TamperedMessage("the clear MessageHeader does not match the encrypted one")
    return inner

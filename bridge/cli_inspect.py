"""`poi-bridge inspect FILE|-`: what is in a captured SaleToPOI message, for technicians."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bridge.config import SecretError, read_secret
from bridge.protocol import crypto
from bridge.protocol.framing import FRAMERS, FrameReceived, FramingError, make_framer
from bridge.protocol.messages import MessageError, load_json, parse_message
from bridge.protocol.outcome import classify
from bridge.redaction import redact

MAX_INPUT = 16 * 1024 * 1024


class InspectError(Exception):
    """One line for stderr: what is wrong and where."""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect", help="summarise a SaleToPOI message (or a captured frame stream)",
        description="Read one SaleToPOI message (JSON) from FILE or standard input, validate "
                    "it and print what it says. Exit status 2 if it is not a usable message.")
    p.add_argument("file", metavar="FILE|-", help="the message, or - for standard input")
    p.add_argument("--json", action="store_true", help="print one JSON object per message")
    p.add_argument("--frame", choices=sorted(FRAMERS), metavar="NAME",
                   help=f"the input is raw bytes captured on the wire, framed with NAME "
                        f"({', '.join(sorted(FRAMERS))})")
    p.add_argument("--key-id", help="key identifier, to decrypt an encrypted message")
    p.add_argument("--key-version", type=int, help="key version")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--passphrase", help="key passphrase (for a bench; prefer "
                                             "--passphrase-file on a store box)")
    secret.add_argument("--passphrase-file", type=Path,
                        help="file holding the passphrase: the whole file, without its "
                             "trailing line end")
    p.set_defaults(handler=run)


def _read_input(name: str) -> bytes:
    try:
        if name == "-":
            data = sys.stdin.buffer.read(MAX_INPUT + 1)
        else:
            with open(name, "rb") as handle:
                data = handle.read(MAX_INPUT + 1)
    except OSError as exc:
        raise InspectError(f"{name}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_INPUT:
        raise InspectError(f"{name}: larger than {MAX_INPUT // (1024 * 1024)} MiB")
    return data


def _key(args: argparse.Namespace) -> crypto.NexoKey | None:
    wanted = [args.key_id is not None, args.key_version is not None,
              args.passphrase is not None or args.passphrase_file is not None]
    if not any(wanted):
        return None
    if not all(wanted):
        raise InspectError("decrypting needs --key-id, --key-version and a passphrase")
    passphrase = args.passphrase
    if passphrase is not None:
        # (a command line is readable by every user of the box, in ps and /proc, and kept
        # in the shell's history: a store box's key passphrase must not go there)
        print("poi-bridge inspect: warning: --passphrase shows the passphrase to every user "
              "of this machine (ps) and leaves it in the shell's history; on a store box use "
              "--passphrase-file", file=sys.stderr)
    if args.passphrase_file is not None:
        try:  # read as the daemon reads its secrets
            passphrase = read_secret(args.passphrase_file, "the passphrase file")
        except SecretError as exc:
            raise InspectError(str(exc)) from None
    try:
        return crypto.NexoKey(args.key_id, args.key_version, passphrase)
    except (ValueError, TypeError) as exc:
        raise InspectError(f"unusable key: {exc}") from None


def payloads_from_frames(data: bytes, framer_name: str,
                         source: str) -> tuple[list[bytes], int, list[str]]:
    """The frames' payloads, the bytes discarded as noise and the framer's reasons for it."""
    framer = make_framer(framer_name, max_frame_size=MAX_INPUT)
    payloads, noise, reasons = [], 0, []
    events = framer.receive_data(data, 0.0)
    # The end of the capture is the end of the input: a frame still incomplete there (a
    # length header whose payload was cut short) would otherwise hold every byte after its
    # header. Let the framer's stall timeout pass, as on a live link when no byte follows:
    # it rejects the candidate and rescans what followed it, until nothing more is pending.
    deadline = framer.next_deadline()
    while deadline is not None:
        events += framer.handle_timeout(deadline)
        deadline = framer.next_deadline()
    # A framing delimited by its start bytes has no stall timeout: a frame cut short at the
    # very end stays pending. A whole frame after it, as the next one on a live link, makes
    # the framer discard it and report how much; that frame itself is not the capture's.
    probe = b"{}"
    ending = framer.receive_data(framer.encode(probe), 0.0)
    if ending and ending[-1] == FrameReceived(probe):
        events += ending[:-1]
    for event in events:
        if isinstance(event, FrameReceived):
            payloads.append(event.payload)
        elif isinstance(event, FramingError):
            noise += event.discarded
            if event.reason not in reasons:
                reasons.append(event.reason)
    if not payloads:
        raise InspectError(f"{source}: no complete {framer_name} frame found "
                           f"({len(data)} bytes, {noise} discarded as noise)")
    return payloads, noise, reasons


def summarise(raw: bytes, key: crypto.NexoKey | None, source: str) -> dict[str, Any]:
    try:
        document = load_json(raw)
    except MessageError as exc:
        raise InspectError(f"{source}: {exc}") from None
    problem = crypto.terminal_crypto_error(document)
    if problem is not None:
        raise InspectError(f"{source}: not a SaleToPOI message: {problem} (the terminal could "
                           "not decrypt; check the key configured on both sides)")
    encrypted = crypto.is_encrypted(document)
    if encrypted:
        if key is None:
            raise InspectError(f"{source}: the message is encrypted; give --key-id, "
                               "--key-version and a passphrase to read it")
        try:
            document = crypto.decrypt_message(document, key)
        except crypto.CryptoError as exc:
            raise InspectError(f"{source}: cannot decrypt: {exc}") from None
    try:
        message = parse_message(document)
    except MessageError as exc:
        raise InspectError(f"{source}: {exc}") from None
    verdict = classify(message)
    header = message.message_header
    # The terminal's own texts are printed as the detail quotes them: redacted, for a terminal
    # may put card data in any field, and a technician's output gets pasted into tickets.
    # The header's texts too: a captured register request may carry a swiped card's track
    # data in its SaleID or MessageCategory.
    (result, condition, category, outcome_category, sale_id, service_id, poi_id, message_type,
     body) = (
        None if text is None else redact(text)
        for text in (verdict.result, verdict.error_condition, message.category, verdict.category,
                     header.sale_id if header else None, header.service_id if header else None,
                     header.poi_id if header else None,
                     str(header.message_type) if header else None, message.body_key()))
    return {
        "kind": message.kind,
        "category": category,
        "message_type": message_type,
        "sale_id": sale_id,
        "service_id": service_id,
        "poi_id": poi_id,
        "body": body,
        "result": result,
        "error_condition": condition,
        "outcome": verdict.outcome.value,
        "outcome_category": outcome_category,
        "detail": verdict.detail,
        "encrypted": encrypted,
    }


def _human(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['kind']}  {summary['category']} {summary['message_type'] or ''}".rstrip(),
        f"  SaleID {summary['sale_id']}  ServiceID {summary['service_id']}  "
        f"POIID {summary['poi_id']}",
    ]
    if summary["encrypted"]:
        lines.append("  decrypted: HMAC verified")
    if summary["result"] is not None or summary["error_condition"] is not None:
        condition = f" / {summary['error_condition']}" if summary["error_condition"] else ""
        lines.append(f"  Result {summary['result']}{condition}")
    lines.append(f"  outcome: {summary['outcome']}  ({summary['detail']})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    source = "stdin" if args.file == "-" else args.file
    try:
        key = _key(args)
        data = _read_input(args.file)
        payloads, noise, reasons = (payloads_from_frames(data, args.frame, source)
                                    if args.frame else ([data], 0, []))
        summaries = []
        for n, payload in enumerate(payloads, 1):
            where = f"{source} frame {n}" if args.frame else source
            summary = summarise(payload, key, where)
            if args.frame:  # the capture's noise, so a script sees a frame cut short too
                summary["noise"] = noise
            summaries.append(summary)
    except InspectError as exc:
        print(f"poi-bridge inspect: {exc}", file=sys.stderr)
        return 2
    if noise:
        # Said even when frames were found: a frame cut short is a message that was (partly)
        # on the wire, not one that was never sent.
        print(f"poi-bridge inspect: {source}: {noise} bytes discarded as noise "
              f"(no frame: {'; '.join(reasons)})", file=sys.stderr)
    for summary in summaries:
        print(json.dumps(summary) if args.json else _human(summary))
    return 0

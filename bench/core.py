"""Section 4: the sans-I/O core in-process, no I/O: framers and SaleToPOI messages."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from bench.common import FIXTURE, compact, payment_request, poi_id, sale_id
from bridge.protocol.framing import FRAMERS, FrameReceived, make_framer
from bridge.protocol.messages import load_json, parse_message

SERIAL_CHUNK = 115  # bytes per read when a 115200-baud line is read every millisecond


def rate(fn: Callable[[], Any], seconds: float) -> float:
    """Calls per second: batches sized to ~1/10 of the time, the median batch counts."""
    fn()
    batch = 1
    while True:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        took = time.perf_counter() - start
        if took >= seconds / 10 or batch >= 1 << 22:
            break
        batch *= 2
    per_call = [took / batch]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(per_call) < 3:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        per_call.append((time.perf_counter() - start) / batch)
    per_call.sort()
    return 1.0 / per_call[len(per_call) // 2]


def payloads() -> dict[str, bytes]:
    request = payment_request(sale_id(0), "ab12345678", poi_id(0), 12.5)
    return {
        "request": compact(request),
        "fixture": FIXTURE.read_bytes(),  # the vendor's file as it is (pretty-printed)
        "fixture_compact": compact(json.loads(FIXTURE.read_bytes())),
    }


def framers(seconds: float) -> list[dict[str, Any]]:
    rows = []
    for name in FRAMERS:
        for label, payload in payloads().items():
            sender = make_framer(name)
            frame = sender.encode(payload)
            receiver = make_framer(name)
            events = receiver.receive_data(frame, 0.0)
            receiver.data_to_send()
            assert [e.payload for e in events if isinstance(e, FrameReceived)] == [payload], name
            chunks = [frame[i:i + SERIAL_CHUNK] for i in range(0, len(frame), SERIAL_CHUNK)]

            def decode_whole(r=receiver, f=frame) -> None:
                r.receive_data(f, 0.0)
                r.data_to_send()

            def decode_chunks(r=receiver, cs=chunks) -> None:
                for c in cs:
                    r.receive_data(c, 0.0)
                r.data_to_send()

            encode = rate(lambda s=sender, p=payload: s.encode(p), seconds)
            whole = rate(decode_whole, seconds)
            chunked = rate(decode_chunks, seconds)
            rows.append({
                "framer": name, "payload": label, "payload_bytes": len(payload),
                "frame_bytes": len(frame),
                "encode_per_s": round(encode), "decode_per_s": round(whole),
                "decode_115B_chunks_per_s": round(chunked),
                "encode_MB_s": round(encode * len(payload) / 1e6, 1),
                "decode_MB_s": round(whole * len(payload) / 1e6, 1),
            })
    return rows


def messages(seconds: float) -> list[dict[str, Any]]:
    rows = []
    for label, raw in payloads().items():
        if label == "fixture_compact":
            continue
        message = parse_message(raw)
        out = message.to_bytes()
        assert json.loads(out) == json.loads(raw), label  # the round trip keeps every field
        document = json.loads(raw)
        parse = rate(lambda r=raw: parse_message(r), seconds)
        load = rate(lambda r=raw: load_json(r), seconds)
        serialise = rate(lambda m=message: m.to_bytes(), seconds)
        both = rate(lambda r=raw: parse_message(r).to_bytes(), seconds)
        plain = rate(lambda r=raw: json.dumps(json.loads(r), separators=(",", ":"),
                                              ensure_ascii=False).encode(), seconds)
        loads = rate(lambda r=raw: json.loads(r), seconds)
        validate = rate(lambda d=document: parse_message(d), seconds)
        rows.append({
            "message": label, "bytes": len(raw),
            "parse_to_bytes_per_s": round(both),
            "json_loads_dumps_per_s": round(plain),
            "slowdown_vs_json": round(plain / both, 1),
            "parse_message_per_s": round(parse),
            "validate_dict_per_s": round(validate),
            "load_json_per_s": round(load),
            "json_loads_per_s": round(loads),
            "to_bytes_per_s": round(serialise),
            "us_parse_to_bytes": round(1e6 / both, 1),
            "us_load_json": round(1e6 / load, 1),
            "us_json_loads": round(1e6 / loads, 1),
        })
    return rows


def run(seconds: float) -> dict[str, Any]:
    return {"framers": framers(seconds), "messages": messages(seconds)}

"""The acknowledged framers against a model of the terminal and the line (review rv10).

Each transmission the bridge writes is read by the terminal intact (it ACKs), damaged (it
NAKs) or not at all (silence); a reply may be lost, and otherwise arrives, in order, within
ack_timeout of the write. A request read intact may be answered (a response under its IDs,
after its ACK: FrameWriter.answered). On top of that, line noise may read as a NAK at any
moment: no framer can tell such a byte from the terminal's NAK.

Checked: an ACK is never credited to a frame it does not answer (an abort told delivered
that the terminal NAKed); a NAK of one frame never sends another again (a payment the
terminal read intact, written twice); no frame is written after it is reported sent or
failed, or after the bridge has read an ACK of it; a frame the terminal ACKed in time is
not given up; every frame settles. The framer is driven as the FrameWriter drives it: what
data_to_send(now) returns is written between events."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.protocol.framing import (DleCrc16Framer, FrameFailed, FrameResent, FrameSent,
                                     StxEtxLrcFramer)

T = 1.0
NAMES = ["A", "B", "C"]

reply = st.tuples(st.sampled_from(["intact", "damaged", "missed"]),
                  st.booleans(),                      # the terminal's reply lost
                  st.floats(0.01, 0.95),              # its delay, a fraction of T
                  st.sampled_from([None, 0.0, 0.3]))  # an answer (intact only): delay after ACK
noise = st.lists(st.floats(0.0, 8.0), max_size=3)     # when line noise reads as a NAK


def run(cls, plan, noise_at=(), max_tries=3) -> None:
    framer = cls(ack_timeout=T, max_tries=max_tries)
    payload = {n: f'{{"req":"{n}"}}'.encode() for n in NAMES}
    enc = {n: framer.encode(payload[n]) for n in NAMES}
    by_payload = {v: k for k, v in payload.items()}
    for n in NAMES:
        framer.send_frame(payload[n], 0.0)
    plan = list(plan)
    wire: list[tuple[float, str, str | None]] = []  # (due, "ack"/"nak"/"answer", frame)
    noise_due = sorted(noise_at)
    done: dict[str, str] = {}
    acked_read: set[str] = set()  # frames whose ACK the bridge has read
    intact: set[str] = set()
    log: list = []
    now = 0.0

    def handle(events, cause):
        for e in events:
            log.append((round(now, 3), e, cause))
            n = by_payload[e.payload]
            if isinstance(e, (FrameSent, FrameFailed)):
                assert n not in done, log
                done[n] = type(e).__name__
            if isinstance(e, FrameSent):
                assert n in intact, f"{n} reported sent, never read intact: {log}"
                if cause is not None and cause[0] == "ack":
                    assert cause[1] == n, f"ACK of {cause[1]} credited to {n}: {log}"
            if isinstance(e, FrameFailed):
                assert n not in acked_read, f"{n} given up although its ACK was read: {log}"
            if isinstance(e, FrameResent) and cause is not None and cause[1] is not None:
                assert cause[1] == n, f"{cause[0]} of {cause[1]} sent {n} again: {log}"

    def drain():
        out = framer.data_to_send(now)
        for n in NAMES:
            for _ in range(out.count(enc[n])):
                assert n not in done and n not in acked_read, (
                    f"{n} written after {done.get(n) or 'its ACK was read'}: {log}")
                fate, lost, delay, answer = plan.pop(0) if plan else ("missed", True, 0.5, None)
                log.append((round(now, 3), "write", n, fate, lost))
                if fate == "intact":
                    intact.add(n)
                if fate != "missed" and not lost:
                    # ACKs and NAKs in order (each within T of its write); answers whenever
                    due = max([now + delay * T] + [w[0] for w in wire if w[1] != "answer"])
                    wire.append((due, "ack" if fate == "intact" else "nak", n))
                    if fate == "intact" and answer is not None:
                        wire.append((due + answer, "answer", n))
                    wire.sort(key=lambda w: w[0])

    def read(kind, n):
        if kind == "answer":
            if framer.awaiting_ack:
                handle(framer.answered(payload[n], now), None)
            return
        if kind == "ack" and framer.awaiting_ack and framer._current[0] == payload[n]:
            acked_read.add(n)  # (white box: which frame the framer would credit it to)
        handle(framer.receive_data(b"\x06" if kind == "ack" else b"\x15", now), (kind, n))

    drain()
    for _ in range(400):
        if set(done) == set(NAMES):
            break
        nexts = [w[0] for w in wire] + noise_due[:1]
        nexts += [d for d in [framer.next_deadline()] if d is not None]
        if not nexts:
            break
        now = max(now, min(nexts))
        while (wire and wire[0][0] <= now) or (noise_due and noise_due[0] <= now):
            if noise_due and (not wire or noise_due[0] <= wire[0][0]):
                noise_due.pop(0)
                read("nak", None)  # line noise
            else:
                _, kind, n = wire.pop(0)
                read(kind, n)
            drain()
        d = framer.next_deadline()
        if d is not None and d <= now:
            handle(framer.handle_timeout(now), None)
            drain()
    assert set(done) == set(NAMES), (done, log)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([StxEtxLrcFramer, DleCrc16Framer]), st.lists(reply, max_size=12))
def test_a_truthful_terminal_on_a_quiet_line(cls, plan) -> None:
    run(cls, plan)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([StxEtxLrcFramer, DleCrc16Framer]), st.lists(reply, max_size=12),
       noise, st.sampled_from([1, 2, 3]))
def test_a_truthful_terminal_on_a_noisy_line(cls, plan, noise_at, max_tries) -> None:
    run(cls, plan, noise_at, max_tries)

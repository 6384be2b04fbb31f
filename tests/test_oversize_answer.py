"""An answer too big for the link's max_frame_size (receipts with a signature image, say)
used to be dropped in silence: the payment waited its whole payment_timeout, and its status
polls asked for the receipts again, so each answer was too big as well and the payment
ended unresolved. The payment is now asked about at once, without receipts."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import time

import pytest

from bridge.protocol.actions import Log
from bridge.protocol.framing import make_framer
from bridge.protocol.transaction import TxKey, TxState
from bridge.register_client import RegisterClient
from bridge.simulator import responses

from .follow_rig import A, BASE, DeviceByHand, bridge_on, wait_until
from .test_session import SETTINGS, Harness, request_of

TOO_BIG = "x" * 6000  # over the 4096-byte max_frame_size of these tests


pytestmark = pytest.mark.usefixtures("small_frames")


def padded(document: dict) -> dict:
    body = document["SaleToPOIResponse"]["PaymentResponse"]
    body["PaymentReceipt"] = [{"DocumentQualifier": "CustomerReceipt",
                               "OutputContent": {"OutputText": [{"Text": TOO_BIG}]}}]
    return document


def test_a_payment_whose_answer_was_too_big_is_asked_about_without_receipts():
    h = Harness()
    h.submit("R1", "S1")
    asked = h.do(h.session.oversize("frame over max_frame_size", h.now))
    assert h.session.open[TxKey("R1", "S1")].state is TxState.POLLING
    assert any(isinstance(a, Log) and "unusable answer" in a.message for a in asked)
    h.advance(SETTINGS.poll_floor)
    poll = h.last_poll()["SaleToPOIRequest"]["TransactionStatusRequest"]
    assert "ReceiptReprintFlag" not in poll and "DocumentQualifier" not in poll
    assert poll["MessageReference"]["ServiceID"] == "S1"


def test_a_status_answer_too_big_counts_as_unanswered_and_the_next_poll_asks_no_receipts():
    h = Harness()
    h.submit("R1", "S1")
    h.advance(SETTINGS.payment_timeout + 1)  # no answer: polled, with receipts
    first = h.last_poll()["SaleToPOIRequest"]["TransactionStatusRequest"]
    assert first["ReceiptReprintFlag"] is True
    h.do(h.session.oversize("frame over max_frame_size", h.now))
    txn = h.session.open[TxKey("R1", "S1")]
    assert txn.unanswered_polls == 1 and txn.extra["answer_too_big"] is True
    h.advance(SETTINGS.poll_floor)
    assert "ReceiptReprintFlag" not in h.last_poll()["SaleToPOIRequest"][
        "TransactionStatusRequest"]
    original = responses.payment_response(request_of(h), "approve", h.now)
    (result,) = h.delivers(h.answer(responses.status_success(h.last_poll(), original)))
    assert (result.outcome, result.source) == ("approved", "status-poll")


def test_without_anything_waiting_an_oversize_frame_is_only_logged():
    h = Harness()
    (note,) = h.do(h.session.oversize("frame over max_frame_size", h.now))
    assert isinstance(note, Log) and note.level == "info"  # (the worker warns, once in 5 s)


async def test_a_payment_answer_too_big_for_the_link_is_recovered_by_a_status_poll(
        tmp_path, mosquitto, caplog):
    """End to end: the terminal's answer (6 KB of receipt) is over max_frame_size 4096; the
    bridge polls at once, without receipts, and the register gets the payment's outcome
    well within its payment_timeout (60 s here)."""
    device = DeviceByHand(tmp_path / "port-a")
    try:
        with caplog.at_level(logging.WARNING, logger="poi_bridge"):
            async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port-a")},
                                 framer={"max_frame_size": 4096},
                                 payment_timeout=60) as bridge:
                assert await wait_until(lambda: "Diagnosis" in device.categories(), 10)
                device.answer_check_as(A)
                assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 10)
                async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                          base_topic=BASE, persistent=False) as till:
                    paying = asyncio.create_task(till.pay(A, 12.5, timeout=20))
                    assert await wait_until(lambda: "Payment" in device.categories(), 10)
                    request = [d for d in device.received if "PaymentRequest" in
                               d["SaleToPOIRequest"]][-1]
                    answer = responses.payment_response(request, "approve", 0)
                    # Written past the device's framer, which would hold what follows
                    # until the frame is acknowledged (the bridge never acknowledges it)
                    once = make_framer("stx-etx-lrc")
                    once.send_frame(json.dumps(padded(copy.deepcopy(answer))).encode(),
                                    time.monotonic())
                    frame = once.data_to_send()
                    os.write(device.master, frame)
                    assert await wait_until(
                        lambda: "TransactionStatus" in device.categories(), 10)
                    # and again, as a terminal does with a frame nobody acknowledged: the
                    # same answer, not asked about twice (the diff review: a second warning,
                    # and the poll on the wire counted unanswered)
                    os.write(device.master, frame)
                    assert await wait_until(lambda: bridge.workers[A].counters[
                        "framing_errors"] >= 3, 10)  # (both copies read: 2 events each)
                    poll = [d for d in device.received
                            if "TransactionStatusRequest" in d["SaleToPOIRequest"]][-1]
                    assert "ReceiptReprintFlag" not in poll["SaleToPOIRequest"][
                        "TransactionStatusRequest"]
                    device.send(responses.status_success(poll, answer))
                    result = await paying
        assert (result["bridge"]["outcome"], result["bridge"]["source"]) == \
            ("approved", "status-poll"), result
        dropped = [m for m in caplog.messages if "over max_frame_size (4096 bytes)" in m
                   and "raise [terminals.framer] max_frame_size" in m]
        assert len(dropped) == 1, caplog.messages
    finally:
        device.close()


async def test_an_oversize_frame_sent_again_is_warned_about_once(tmp_path, caplog):
    """README "Wire framing": the warning is not repeated for further oversize frames within
    5 s (most often the terminal sending its unacknowledged frame again). Each is still told
    to the session (one may be a new answer); its own line when nothing waits is not a
    second warning per copy (found by review rv12)."""
    from .test_busy_record_after_nak import HandTerminal, worker_paying

    class Quiet(HandTerminal):
        def answer(self, request, category, ack):
            pass

    caplog.set_level(logging.INFO)
    path = tmp_path / "terminal"
    device = Quiet(path, "stx-etx-lrc")
    seen = []
    try:
        async with worker_paying(tmp_path, path, "stx-etx-lrc", {"max_frame_size": 4096},
                                 prepare=lambda worker: seen.append(worker), pays=False):
            worker = seen[0]
            notice = device.framer.encode(b'{"notice":"' + b"A" * 6000 + b'"}')
            for _ in range(3):  # the terminal's frame, unacknowledged, sent again twice
                before = worker.counters["framing_errors"]
                os.write(device.master, notice)
                assert await wait_until(
                    lambda: worker.counters["framing_errors"] > before, 5)
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING and "max_frame_size" in r.getMessage()]
        assert len(warnings) == 1, "\n".join(warnings)
        assert sum("nothing was waiting" in r.getMessage() for r in caplog.records) == 3
    finally:
        device.close()


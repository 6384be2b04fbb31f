"""The ACK of a terminal's answer must not reach the terminal before the answer's
record is committed (found by a review) (README Design: "Whatever depends on the writes waits for that commit:
... the ACK of a terminal's answer"). The writer task flushes the framer's whole output
buffer whenever `_write_ready` is set; `_on_timer` sets it (a retransmission due) without
waiting for the commit. When the answer's bytes and the retransmission deadline are seen in
the same loop pass, the reader's step runs, then the writer's, and only then the commit: the
ACK is written while the journal still says awaiting_response."""

from __future__ import annotations

import asyncio
import json
import os
import select
import sqlite3
import time

from bridge.simulator import responses

from .follow_rig import A, DeviceByHand, bridge_on, wait_until

ACK = 0x06


async def test_the_ack_of_an_answer_is_not_written_before_its_record_is_committed(
        tmp_path, mosquitto):
    from bridge.register_client import RegisterClient

    device = DeviceByHand(tmp_path / "port-a")
    journal = tmp_path / "journal.sqlite3"
    seen: list[tuple[bytes, list]] = []
    try:
        async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port-a")},
                             payment_timeout=30,
                             framer={"ack_timeout": 0.3, "max_tries": 5}) as bridge:
            assert await wait_until(lambda: "Diagnosis" in device.categories(), 10)
            device.answer_check_as(A)
            worker = bridge.workers[A]
            assert await wait_until(lambda: worker.identity == "confirmed", 10)
            # From now on the device acknowledges nothing: the payment's frame stays
            # outstanding, and the bridge retransmits it every ack_timeout
            device._flush = lambda: None
            transport = worker._transport

            def rows():
                db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
                try:
                    return db.execute("SELECT service_id, state FROM transactions "
                                      "WHERE category = 'Payment'").fetchall()
                finally:
                    db.close()

            real_write, real_nowait = transport.write, transport.write_nowait

            async def write(data):
                if data.endswith(bytes([ACK])):
                    seen.append((bytes(data), rows()))
                return await real_write(data)

            def write_nowait(data):
                if data.endswith(bytes([ACK])):
                    seen.append((bytes(data), rows()))
                return real_nowait(data)

            transport.write, transport.write_nowait = write, write_nowait

            async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                      base_topic="poi/follow", persistent=False) as till:
                paying = asyncio.create_task(till.pay(A, 12.5, timeout=20))
                assert await wait_until(lambda: "Payment" in device.categories(), 10)
                request = [d for d in device.received
                           if "PaymentRequest" in d["SaleToPOIRequest"]][-1]
                device.framer.data_to_send()  # (the ACKs it would have sent: dropped)
                answer = responses.payment_response(request, "approve", time.time())

                def answer_late_in_one_pass():
                    # The loop is busy (a burst of other work) past the retransmission
                    # deadline, while the terminal's answer arrives: the next pass sees both
                    time.sleep(0.5)
                    device.framer.send_frame(
                        json.dumps(answer).encode(), time.monotonic())
                    os.write(device.master, device.framer.data_to_send())
                    # (a pty hands the bytes to its other end a moment later: wait for them)
                    select.select([transport._fd], [], [], 2.0)

                asyncio.get_running_loop().call_soon(answer_late_in_one_pass)
                result = await paying
                assert result["bridge"]["outcome"] == "approved"
    finally:
        device.close()
    service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
    assert seen, "no ACK written"
    early = [(data, state) for data, state in seen
             if (service_id, "final") not in state]
    assert not early, ("ACK of the answer written while the journal held the payment as "
                       f"{early[0][1]} (bytes written: {early[0][0][:30]!r}...{early[0][0][-3:]!r})")

"""A device that never says who it is (no POIID in its answers, an empty one, "N/A")
replaces terminal A while A's payment is open: its NotFound about the payment says nothing
of it. It used to end the payment as not_found ("nothing was charged"), though A charged it
(review rv5); it now counts as a poll unanswered, as an answer naming another terminal."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.protocol.transaction import TxKey
from bridge.register_client import RegisterClient
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .follow_rig import A, BASE, DeviceByHand, bridge_on, wait_until


def unnamed(document, poi_id):
    header = document["SaleToPOIResponse"]["MessageHeader"]
    if poi_id is None:
        header.pop("POIID", None)
    else:
        header["POIID"] = poi_id
    return document


@pytest.mark.parametrize("poi_id", [None, "", "N/A"], ids=["missing", "empty", "N/A"])
async def test_not_found_from_a_device_that_never_named_itself_is_not_believed(
        tmp_path, mosquitto, poi_id):
    old = SimulatorServer(Scenario(poi_id=A, default=Behaviour(never_answer=True, delay=0.05),
                                   link=LinkBehaviour(status_hold=0.05)), "stx-etx-lrc")
    port = await old.start_pty(tmp_path / "port-a")
    new = None
    try:
        async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1", base_topic=BASE) \
                as till:
            async with bridge_on(tmp_path, mosquitto, {A: port}, payment_timeout=30,
                                 status_timeout=1, poll_floor=0.1) as bridge:
                assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 15)
                paying = asyncio.create_task(till.pay(A, 12.0, service_id="OLD1", timeout=60))
                assert await wait_until(lambda: len(old.terminal.ledger) == 1, 10)
                assert next(iter(old.terminal.ledger.values())).charged
                await old.close()  # A leaves (charged, its answer never sent)
                new = DeviceByHand(Path(port))
                assert await wait_until(lambda: "Diagnosis" in new.categories(), 10)
                check = [d for d in new.received if "DiagnosisRequest" in d["SaleToPOIRequest"]][-1]
                new.send(unnamed(responses.simple_response(check), poi_id))
                # the device answers the status poll about A's payment, naming nobody
                assert await wait_until(lambda: "TransactionStatus" in new.categories(), 10)
                poll = [d for d in new.received
                        if "TransactionStatusRequest" in d["SaleToPOIRequest"]][-1]
                new.send(unnamed(responses.status_not_found(poll), poi_id))
                await wait_until(lambda: paying.done(), 5)
                txn = bridge.journal.get(TxKey("TILL1", "OLD1"))
                paying.cancel()
        assert txn.outcome != "not_found", (txn.state, txn.outcome, txn.detail)
    finally:
        if new is not None:
            new.close()
        await old.close()

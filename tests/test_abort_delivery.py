"""An Abort was answered `success` as soon as it was handed to the link, even when its frame
was never acknowledged (no ACK after every try): a register then believed the terminal had
stopped the payment. It is answered `success` once the terminal has it (its frame
acknowledged; on a link without ACKs, written), and `error` when the frame is not delivered,
the link goes first, or the link never confirms it."""

from __future__ import annotations

from bridge.protocol.transaction import TxKey
from bridge.simulator import responses

from .follow_rig import A, BASE, DeviceByHand, bridge_on, wait_until
from .rig import Subscriber, outcome_for
from .test_session import Harness, abort_of

TILL = "TILL1"


def test_an_abort_whose_frame_is_not_acknowledged_is_no_success():
    h = Harness()
    h.submit("R1", "S1")
    actions = h.submit("R1", "A1", doc=abort_of("R1", "S1"))
    assert [s.purpose for s in h.sends(actions)] == ["abort"]
    assert h.delivers(actions) == [], "answered before the terminal had it"
    (failed,) = h.delivers(h.do(h.session.send_failed("A1", "no ACK within 2 s", h.now)))
    assert (failed.service_id, failed.outcome) == ("A1", "error")
    assert "may not have reached terminal" in failed.error and "R1/S1" in failed.error
    assert "send the abort again with a new ServiceID" in failed.error
    assert [d.outcome for d in h.delivers() if d.service_id == "A1"] == ["error"]
    assert h.session.active == TxKey("R1", "S1")  # the payment goes on, and is waited for


def test_an_abort_is_answered_when_delivered_or_not_confirmed_in_time():
    h = Harness()
    h.submit("R1", "S1")
    h.submit("R1", "A1", doc=abort_of("R1", "S1", "A1"))
    (done,) = h.delivers(h.do(h.session.frame_delivered("A1", h.now)))
    assert (done.outcome, done.error) == ("success", None)
    assert h.delivers(h.do(h.session.frame_delivered("A1", h.now))) == []  # once
    # the link goes before the frame was acknowledged
    h.submit("R1", "A2", doc=abort_of("R1", "S1", "A2"))
    lost = [d for d in h.delivers(h.do(h.session.link_is_down("EIO", h.now)))
            if d.service_id == "A2"]
    assert [d.outcome for d in lost] == ["error"] and "link was lost" in lost[0].error


class WithholdsAbortAcks(DeviceByHand):
    """A terminal's end that acknowledges every frame but an Abort's while `withhold`."""

    withhold = True

    def _flush(self) -> None:
        last = self.received[-1]["SaleToPOIRequest"] if self.received else {}
        if self.withhold and "AbortRequest" in last:
            self.framer.data_to_send()  # its ACK, never sent
            return
        super()._flush()


async def test_an_abort_the_terminal_never_acknowledged_is_reported_as_an_error(
        tmp_path, mosquitto):
    """End to end: the abort's frame goes out max_tries times unacknowledged. The register
    is told `error` (the payment may go on), never `success`; acknowledged, `success`."""
    device = WithholdsAbortAcks(tmp_path / "port")
    try:
        async with bridge_on(tmp_path, mosquitto, {A: str(tmp_path / "port")},
                             framer={"ack_timeout": 0.2, "max_tries": 2}) as bridge, \
                Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
            assert await wait_until(lambda: "Diagnosis" in device.categories(), timeout=10)
            device.answer_check_as(A)
            assert await wait_until(lambda: bridge.workers[A].identity == "confirmed", 10)
            topic = f"{BASE}/terminals/{A}/request/{TILL}"
            await sub.publish(topic, responses.payment_request(TILL, "P1", A, 12.5))
            assert await wait_until(lambda: "Payment" in device.categories(), timeout=10)
            abort = abort_of(TILL, "P1", "A1")
            abort["SaleToPOIRequest"]["MessageHeader"]["POIID"] = A
            await sub.publish(topic, abort)
            answer = await sub.wait_for(outcome_for("A1"), timeout=10)
            assert answer["bridge"]["outcome"] == "error", answer
            assert "may not have reached terminal" in answer["bridge"]["error"]
            assert device.categories().count("Abort") == 2  # max_tries, none acknowledged
            device.withhold = False
            again = abort_of(TILL, "P1", "A2")
            again["SaleToPOIRequest"]["MessageHeader"]["POIID"] = A
            await sub.publish(topic, again)
            assert (await sub.wait_for(outcome_for("A2"), timeout=10))["bridge"][
                "outcome"] == "success"
            assert [p["bridge"]["outcome"] for p in sub.on(f"{BASE}/registers/{TILL}/response")
                    if p["bridge"]["transaction"]["service_id"] == "A1"] == ["error"]
    finally:
        device.close()


# --- the second diff review: frames matched by SaleID and ServiceID, and written ones -------

def test_a_frame_of_another_registers_request_under_the_same_service_id_touches_nothing_else():
    """A ServiceID is unique per SaleID only: TILL1's payment 7 is on the terminal and
    TILL2's abort 7 is queued behind it. The payment's ACK answered TILL2's abort `success`
    before its frame went, and the abort's failure then sent the payment to polling; a
    request of TILL2 too large once encrypted was refused as TILL1's payment (told
    "nothing was charged" while the terminal charged it)."""
    h = Harness()
    h.submit("TILL1", "7")
    h.submit("TILL2", "7", doc=abort_of("TILL2", "S9", "7"))
    assert h.delivers(h.do(h.session.frame_delivered("7", h.now, "TILL1"))) == []
    (failed,) = h.delivers(h.do(h.session.send_failed("7", "no ACK", h.now, "TILL2")))
    assert (failed.sale_id, failed.outcome) == ("TILL2", "error")
    assert h.session.open[TxKey("TILL1", "7")].state.value == "awaiting_response"
    h.submit("TILL2", "8", doc=abort_of("TILL2", "S9", "8"))
    (refused,) = h.delivers(h.do(h.session.not_writable("7", "too big", h.now, "TILL2")) +
                            h.do(h.session.not_writable("8", "too big", h.now, "TILL2")))
    assert (refused.sale_id, refused.service_id, refused.outcome) == ("TILL2", "8", "rejected")
    assert h.session.open[TxKey("TILL1", "7")].state.value == "awaiting_response"


async def test_on_a_link_without_acks_an_abort_is_answered_only_once_written(tmp_path):
    """Length-prefixed framing reports a frame sent as it queues it: the abort was answered
    `success` before anything was written, and a write that then failed (the peer gone)
    could not take it back. It is answered once the transport has written it."""
    import asyncio

    from bridge.config import TerminalConfig
    from bridge.daemon.journal import Journal
    from bridge.daemon.worker import TerminalWorker
    from bridge.transports.base import LinkClosed, Transport

    from .test_terminal_worker import RecordingOutlet

    class Blocked(Transport):
        """A link whose writes do not complete until `release`, then fail if `fail`: the
        peer going away under a write, which a pseudo-terminal cannot be made to do."""

        def __init__(self) -> None:
            self.release, self.fail, self.frames = asyncio.Event(), False, b""

        async def open(self) -> None: ...

        async def read(self) -> bytes:
            await asyncio.Event().wait()
            return b""

        async def write(self, data: bytes) -> None:
            await self.release.wait()
            if self.fail:
                raise LinkClosed("EIO writing")
            self.frames += data

        def write_nowait(self, data: bytes) -> int:
            return 0

        async def close(self) -> None: ...

        @property
        def is_open(self) -> bool:
            return True

        def describe(self) -> str:
            return "blocked test link"

    from bridge.protocol.messages import parse_message
    from bridge.protocol.transaction import request_digest

    async def abort_over(link: Blocked, journal: str) -> list[str]:
        config = TerminalConfig.model_validate({
            "poi_id": "V400m-1", "link": {"kind": "tcp", "host": "127.0.0.1", "port": 1},
            "framer": {"name": "length-prefixed"}})
        outlet = RecordingOutlet()
        worker = TerminalWorker(config, Journal(tmp_path / journal), outlet,
                                transport_factory=lambda _link: link)
        worker.session.identity.named = True  # (the device has named itself)
        worker.session.link_up = True
        worker._transport = link
        writer = asyncio.create_task(worker.writer.run(link))
        try:
            document = abort_of("R1", "S1", "A1")
            worker.submit(parse_message(document), document, request_digest(document))
            await asyncio.sleep(0.05)
            assert [r.outcome for r in outlet.results if r.service_id == "A1"] == [], \
                "answered before anything was written"
            link.release.set()
            await asyncio.wait({writer}, timeout=5)
            await asyncio.sleep(0.05)
            return [r.outcome for r in outlet.results if r.service_id == "A1"]
        finally:
            writer.cancel()

    written = Blocked()
    assert await abort_over(written, "j1.sqlite3") == ["success"]
    assert b"AbortRequest" in written.frames
    lost = Blocked()
    lost.fail = True  # the write fails: no success (the link going down answers it error)
    assert await abort_over(lost, "j2.sqlite3") == []


def test_an_abort_not_yet_acknowledged_at_a_restart_says_the_payment_may_go_on():
    """Restored from the journal still waiting for its ACK, an abort ended with the generic
    "the bridge restarted before the terminal answered": the register could not tell that
    the payment it names may go on and that the abort should be sent again."""
    h = Harness()
    h.submit("R1", "S1")
    h.submit("R1", "A1", doc=abort_of("R1", "S1", "A1"))
    held = [t.snapshot() for t in h.session.open.values()]
    again = Harness()
    actions = again.do(again.session.restore(held, again.now))
    (told,) = [d for d in again.delivers(actions) if d.service_id == "A1"]
    assert told.outcome == "error"
    assert "may not have reached terminal" in told.error and "R1/S1" in told.error
    assert "bridge restarted" in told.error and "send the abort again" in told.error
    assert TxKey("R1", "S1") in again.session.open  # the payment is asked about

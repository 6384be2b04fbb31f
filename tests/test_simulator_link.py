"""The simulator's pseudo-terminal as a cable: unplug, the replug gap, the --link symlink.

A technician (and the soak) unplugs simulated terminals; the simulator must behave like a
device and udev: the symlink goes away with the device and comes back pointing at the new
one, and pulling a cable that is already out changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from bridge.protocol import builders, jsontext
from bridge.protocol.framing import FrameReceived, make_framer
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario


def pty_fds() -> set[str]:
    """This process's open pseudo-terminal fds (masters are /dev/ptmx, slaves /dev/pts/N)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == "/dev/ptmx" or target.startswith("/dev/pts/"):
            found.add(f"{fd}->{target}")
    return found


async def wait_for(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_unplug_removes_the_symlink_and_replug_brings_it_back_on_a_new_pty(tmp_path):
    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(link=LinkBehaviour(replug_after=0.3)))
    await server.start_pty(link)
    try:
        first = os.readlink(link)
        assert Path(first).exists()
        server.unplug()
        assert server.unplugged
        assert not link.is_symlink(), "the symlink still points at the freed pseudo-terminal"
        await wait_for(lambda: server.replugs == 1)
        assert not server.unplugged
        second = os.readlink(link)
        assert Path(second).exists() and second == server.device
    finally:
        await server.close()
    assert not link.is_symlink()


async def test_unplug_during_the_replug_gap_changes_nothing(tmp_path):
    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(link=LinkBehaviour(replug_after=0.3)))
    before = pty_fds()
    await server.start_pty(link)
    try:
        server.unplug()
        await asyncio.sleep(0.1)
        server.unplug()  # the cable is already out
        await wait_for(lambda: server.replugs == 1)
        await asyncio.sleep(0.6)  # long enough for a wrongly scheduled second replug
        assert server.replugs == 1
        assert os.readlink(link) == server.device
        # Exactly the live pty's two ends are open: none dropped unread and left open.
        assert len(pty_fds() - before) == 2
    finally:
        await server.close()
    assert pty_fds() == before


async def test_the_replugged_pty_is_served(tmp_path):
    """A bridge opening the symlink after the replug talks to the simulator (bytes reach its
    framer), not to a pty that was abandoned."""
    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(link=LinkBehaviour(replug_after=0.2)))
    await server.start_pty(link)
    try:
        server.unplug()
        server.unplug()
        await wait_for(lambda: server.replugs == 1)
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        try:
            frames_before = server.frames_in
            request = b'{"SaleToPOIRequest":{}}'
            lrc = 0
            for byte in request + b"\x03":
                lrc ^= byte
            os.write(fd, b"\x02" + request + b"\x03" + bytes([lrc]))
            await wait_for(lambda: server.frames_in == frames_before + 1)
        finally:
            os.close(fd)
    finally:
        await server.close()


# --- every receipt of a money request is counted ------------------------------------------------

def _frame(payload: bytes) -> bytes:
    lrc = 0
    for byte in payload + b"\x03":
        lrc ^= byte
    return b"\x02" + payload + b"\x03" + bytes([lrc])


def test_the_terminal_counts_a_repeated_payment_and_processes_it_once():
    """A second receipt of a (SaleID, ServiceID) is not processed again (nor is it charged
    twice), but the ledger says it came, when, and whether the wire layer saw a link-level
    retransmission in it; one refused Busy before the copy that was processed counts too."""
    import json

    from bridge.simulator.responses import payment_request
    from bridge.simulator.terminal import Behaviour, SimulatedTerminal

    terminal = SimulatedTerminal(Scenario(default=Behaviour(decision="approve", delay=1.0)))
    first = payment_request("POS1", "S1", "V400m-1", 10.0)
    assert terminal.handle(first, 100.0).answers  # processing: answers at 101
    # a copy while the terminal is busy with it: Busy, with the payment's own ServiceID
    assert terminal.handle(json.loads(json.dumps(first)), 100.2, retransmission=True).answers
    assert terminal.handle(first, 105.0).answers == []  # a duplicate ServiceID: ignored
    entry = terminal.summary()["POS1/S1"]
    assert entry["charged"] and entry["received"] == 3
    assert [(r["at"], r["retransmission"], r["answer"]) for r in entry["receipts"]] == [
        (100.0, False, "processed"), (100.2, True, "busy"), (105.0, False, "duplicate")]

    # refused Busy first (another payment on the terminal), processed on its second receipt
    other = payment_request("POS1", "S2", "V400m-1", 10.0)
    assert terminal.handle(other, 200.0).answers
    late = payment_request("POS1", "S3", "V400m-1", 10.0)
    terminal.handle(late, 200.5)  # Busy: the terminal is taking S2
    terminal.handle(late, 202.0)  # processed
    entry = terminal.summary()["POS1/S3"]
    assert entry["received"] == 2 and [r["answer"] for r in entry["receipts"]] == [
        "busy", "processed"]
    # the first receipt of a key is never a retransmission, whatever the wire layer says
    terminal.handle(payment_request("POS1", "S4", "V400m-1", 10.0), 300.0, retransmission=True)
    assert terminal.summary()["POS1/S4"]["receipts"][0]["retransmission"] is False


async def test_the_wire_layer_flags_link_level_retransmissions(tmp_path):
    """The simulator's framer hands up every good copy of a frame (it does not de-duplicate);
    the server flags a copy as a possible link-level retransmission only when it is byte for
    byte the frame received just before on the same connection, within max_tries copies. A
    copy after another frame (the bridge's framer sends one frame at a time) or beyond
    max_tries is a second request."""
    import json

    from bridge.simulator.responses import payment_request

    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(link=LinkBehaviour(replug_after=0.2)))
    await server.start_pty(link)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    try:
        def send(document: dict) -> None:
            os.write(fd, _frame(json.dumps(document, separators=(",", ":")).encode()))

        pay = payment_request("POS1", "R1", server.scenario.poi_id, 10.0)
        diagnosis = {"SaleToPOIRequest": {"MessageHeader": {
            "ProtocolVersion": "3.0", "MessageClass": "Service", "MessageCategory": "Diagnosis",
            "MessageType": "Request", "SaleID": "poi-bridge", "ServiceID": "D1",
            "POIID": server.scenario.poi_id}, "DiagnosisRequest": {"HostDiagnosisFlag": False}}}
        for document in (pay, pay, pay, pay, diagnosis, pay):
            want = server.frames_in + 1
            send(document)
            await wait_for(lambda want=want: server.frames_in == want)
        receipts = server.terminal.summary()["POS1/R1"]["receipts"]
        assert [r["retransmission"] for r in receipts] == [False, True, True, False, False]
    finally:
        os.close(fd)
        await server.close()


async def test_a_paced_answer_is_not_sent_again_while_it_is_still_going_out():
    """The simulator paces its writes at its baud rate, and its framer's ACK time counted
    from the start of the write: an answer longer than ack_timeout on the line went out
    twice, a duplicate frame no real terminal sends (review rv16)."""
    baud = 9600  # 1 ms a byte: a ~400-byte Diagnosis answer takes ~0.4 s on the line
    sim = SimulatorServer(Scenario(default=Behaviour(delay=0.0), link=LinkBehaviour(baud=baud)),
                          "stx-etx-lrc", ack_timeout=0.2)
    port = await sim.start_tcp()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    bridge = make_framer("stx-etx-lrc", ack_timeout=5.0)  # the bridge side, ACKing each frame
    request = builders.diagnosis_request(sale_id="S", service_id="1", poi_id="P")
    bridge.send_frame(jsontext.compact(request), time.monotonic())
    writer.write(bridge.data_to_send(time.monotonic()))
    received: list[bytes] = []
    try:
        async with asyncio.timeout(3):
            while True:
                data = await asyncio.wait_for(reader.read(4096), 1.5)
                for event in bridge.receive_data(data, time.monotonic()):
                    if isinstance(event, FrameReceived):
                        received.append(event.payload)
                writer.write(bridge.data_to_send(time.monotonic()))  # our ACKs
    except TimeoutError:
        pass
    finally:
        writer.close()
        await sim.close()
    answers = [p for p in received if b"DiagnosisResponse" in p]
    assert answers, received
    line_time = len(answers[0]) * 10 / baud
    assert line_time > 0.2, line_time  # longer than the simulator's ack_timeout
    # One answer, ACKed as soon as its last byte arrived: it was never late
    assert len(answers) == 1, f"{len(answers)} copies of a {len(answers[0])}-byte answer"


# --- what the audit of the soak reads: every request, its amounts, bounded retransmissions ----

def test_the_ledger_lists_every_money_request_even_one_never_processed():
    """A request the terminal answered Busy (it was taking another), one it lost on purpose
    and one it could not read (another key) never become transactions, but they reached the
    device: the ledger lists them, by their receipts, uncharged, with what they asked. The
    soak's audit finds a payment on the wrong (busy) device, or sent twice, only there."""
    import json

    from bridge.simulator.responses import payment_request
    from bridge.simulator.terminal import SimulatedTerminal

    terminal = SimulatedTerminal(Scenario(
        default=Behaviour(decision="approve", delay=1.0),
        transactions=[Behaviour(amount=50.0, lose_request=True)]))
    assert terminal.handle(payment_request("POS1", "P0", "V400m-1", 10.0), 100.0).answers
    busy = terminal.handle(payment_request("POS1", "P1", "V400m-1", 12.5), 100.5).answers
    assert "Busy" in json.dumps(busy[0].document)
    terminal.handle(payment_request("POS1", "P2", "V400m-1", 50.0), 102.0)  # lost
    poll = builders.status_request(sale_id="POS1", service_id="S9", poi_id="V400m-1",
                                   original_service_id="P2", original_category="Payment")
    assert "NotFound" in json.dumps(terminal.handle(poll, 103.0).answers[0].document)
    sealed = {"SaleToPOIRequest": {"MessageHeader": payment_request(
        "POS1", "P3", "V400m-1")["SaleToPOIRequest"]["MessageHeader"], "NexoBlob": "x"}}
    terminal.unreadable(sealed, 104.0)
    ledger = terminal.summary()
    assert ledger["POS1/P0"]["charged"] and ledger["POS1/P0"]["outcome"] == "approve"
    assert (ledger["POS1/P0"]["amount"], ledger["POS1/P0"]["currency"],
            ledger["POS1/P0"]["authorised"]) == (10.0, "EUR", 10.0)
    for key, answer, amount in (("POS1/P1", "busy", 12.5), ("POS1/P2", "lost", 50.0),
                                ("POS1/P3", "unreadable", None)):
        assert key in ledger, (key, sorted(ledger))
        entry = ledger[key]
        assert (entry["outcome"], entry["charged"], entry["amount"]) == (None, False, amount)
        assert [r["answer"] for r in entry["receipts"]] == [answer], entry
    assert ledger["POS1/P2"]["status_not_found"] == [103.0]
    assert ledger["POS1/P0"]["status_not_found"] == []


async def test_a_request_the_terminal_cannot_decrypt_is_recorded_as_received(tmp_path):
    """With local encryption, a payment encrypted with another key (another terminal's: the
    bridge sent it to the wrong device) gets the plain crypto error, and a receipt: its
    header is in clear."""
    import json

    from bridge.protocol import crypto
    from bridge.simulator.responses import payment_request

    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(), key=crypto.NexoKey("Mine", 1, "one passphrase"))
    await server.start_pty(link)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    try:
        other = crypto.NexoKey("Theirs", 1, "another passphrase")
        sealed = crypto.encrypt_message(payment_request("POS1", "W1", "V400m-9", 10.0), other)
        os.write(fd, _frame(json.dumps(sealed, separators=(",", ":")).encode()))
        await wait_for(lambda: server.frames_in == 1)
        entry = server.terminal.summary()["POS1/W1"]
        assert not entry["charged"] and [r["answer"] for r in entry["receipts"]] == [
            "unreadable"]
    finally:
        os.close(fd)
        await server.close()


async def test_a_copy_beyond_the_retransmit_window_is_a_second_request(tmp_path):
    """The bridge's framer sends a frame again only for want of an ACK, max_tries times at
    most, each ack_timeout after the one before: a byte-identical copy that comes later than
    that (retransmit_window) is the payment sent a second time, not a link-level copy."""
    import json

    from bridge.simulator.responses import payment_request

    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(link=LinkBehaviour(retransmit_window=0.4)))
    await server.start_pty(link)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    try:
        frame = _frame(json.dumps(payment_request("POS1", "T1", server.scenario.poi_id, 10.0),
                                  separators=(",", ":")).encode())
        for pause in (0.0, 0.1, 0.6):  # a quick copy, then one far too late
            await asyncio.sleep(pause)
            want = server.frames_in + 1
            os.write(fd, frame)
            await wait_for(lambda want=want: server.frames_in == want)
        receipts = server.terminal.summary()["POS1/T1"]["receipts"]
        assert [r["retransmission"] for r in receipts] == [False, True, False]
    finally:
        os.close(fd)
        await server.close()


async def test_a_copy_after_the_bridge_acknowledged_the_answer_is_a_second_request(tmp_path):
    """Once the bridge has read an answer under the request's IDs it sends the request no
    more (its framer takes the frame as delivered), and it writes its ACK of that answer
    after any copy it wrote before: a copy read after that ACK, however soon, is a second
    request. The same copy before the answer is acknowledged is a link-level one."""
    import json

    from bridge.simulator.responses import payment_request

    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(default=Behaviour(delay=0.0)))
    await server.start_pty(link)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    os.set_blocking(fd, False)
    bridge = make_framer("stx-etx-lrc")
    try:
        async def answer() -> None:
            """Read until the terminal's answer frame (its ACK of our frame comes first)."""
            async with asyncio.timeout(5):
                while True:
                    try:
                        data = os.read(fd, 4096)
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
                        continue
                    if any(isinstance(e, FrameReceived)
                           for e in bridge.receive_data(data, time.monotonic())):
                        return

        for service_id, acknowledge in (("A1", False), ("A2", True)):
            frame = _frame(json.dumps(payment_request(
                "POS1", service_id, server.scenario.poi_id, 10.0),
                separators=(",", ":")).encode())
            os.write(fd, frame)
            await answer()
            ack = bridge.data_to_send(time.monotonic())  # our ACK of the answer
            assert ack == b"\x06"
            want = server.frames_in + 1
            # the same frame again, after our ACK of the answer or just before it
            os.write(fd, ack + frame if acknowledge else frame + ack)
            await wait_for(lambda want=want: server.frames_in == want)
            receipts = server.terminal.summary()[f"POS1/{service_id}"]["receipts"]
            assert [r["retransmission"] for r in receipts] == [False, not acknowledge], (
                service_id, receipts)
    finally:
        os.close(fd)
        await server.close()


# --- what the audit needs to tell the framer's copy from a second request ------------------------

async def _read_until(fd: int, framer, want: bytes | None = None, *,
                      frame: bool = False, timeout: float = 3.0) -> bytes:
    """Read the simulator's side of the line until `want` is among the bytes, or until a
    whole frame came (`frame`); returns what was read."""
    got = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            got += data
            events = framer.receive_data(data, time.monotonic()) if framer else []
            if (want is not None and want in got) or (
                    frame and any(isinstance(e, FrameReceived) for e in events)):
                return got


async def test_each_copy_says_how_long_after_the_one_before_and_whether_it_was_acknowledged(
        tmp_path):
    """Review of 265750f (F4): a copy was flagged a retransmission up to retransmit_window
    after the first, so the payment written again 2 s after the terminal ACKed it (a bridge
    re-sending at payment_timeout instead of polling) passed as the framer's copy. Each copy
    now says its gap since the copy before and how long the terminal's ACK of that copy had
    been on the line when it came (None: the terminal had not acknowledged it yet: both
    were in one read, as from a terminal that hung while the framer sent them)."""
    import json

    from bridge.simulator.responses import payment_request

    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(default=Behaviour(delay=5.0, never_answer=True),
                                      link=LinkBehaviour(retransmit_window=6.0)))
    await server.start_pty(link)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    os.set_blocking(fd, False)
    try:
        c1, c2 = (_frame(json.dumps(payment_request("POS1", service_id, server.scenario.poi_id,
                                                    10.0), separators=(",", ":")).encode())
                  for service_id in ("C1", "C2"))
        os.write(fd, c1)
        await _read_until(fd, None, b"\x06")  # the terminal's ACK of it
        await asyncio.sleep(1.5)
        os.write(fd, c1)  # the application sends the same payment again
        await wait_for(lambda: server.frames_in == 2)
        os.write(fd, c2 * 2)  # two copies before the terminal could ACK the first
        await wait_for(lambda: server.frames_in == 4)
        ledger = server.terminal.summary()
    finally:
        os.close(fd)
        await server.close()
    first, again = ledger["POS1/C1"]["receipts"]
    assert first["gap"] is None and first["acked_before"] is None
    assert again["retransmission"] is True  # byte for byte, within the window
    assert 1.5 <= again["gap"] < 2.5, again
    assert again["acked_before"] is not None and 1.4 <= again["acked_before"] <= again["gap"]
    _, copy = ledger["POS1/C2"]["receipts"]
    assert copy["retransmission"] is True and copy["acked_before"] is None, copy
    assert 0 <= copy["gap"] < 0.5, copy


async def test_an_ack_a_nak_of_the_terminals_may_have_undone_does_not_count(tmp_path):
    """A NAK this side wrote around its ACK of a copy (its framer's, for a damaged frame, or
    one in the line noise it injects) makes the bridge's framer send the frame again,
    legitimately, even though the ACK went out: that copy is recorded as not acknowledged.
    The same copy after an ACK with no NAK about it is recorded as acknowledged."""
    import json

    from bridge.simulator.responses import payment_request

    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(default=Behaviour(delay=5.0, never_answer=True),
                                      link=LinkBehaviour(retransmit_window=6.0)))
    await server.start_pty(link)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    os.set_blocking(fd, False)
    try:
        # (the intact case first: the other one's NAK would count against it for LINE_LAG)
        for service_id, damaged_first in (("N2", False), ("N1", True)):
            payload = json.dumps(payment_request("POS1", service_id, server.scenario.poi_id,
                                                 10.0), separators=(",", ":")).encode()
            good = _frame(payload)
            damaged = good[:-1] + bytes([good[-1] ^ 0x01])
            want = server.frames_in + 1
            # a copy damaged on the line (NAKed), then one intact (ACKed), in one read
            os.write(fd, (damaged if damaged_first else b"") + good)
            await _read_until(fd, None, b"\x06")
            await wait_for(lambda want=want: server.frames_in == want)
            await asyncio.sleep(0.8)  # a slow bridge acts on the NAK late
            os.write(fd, good)
            await wait_for(lambda want=want: server.frames_in == want + 1)
            copy = server.terminal.summary()[f"POS1/{service_id}"]["receipts"][-1]
            assert copy["retransmission"] is True, copy
            if damaged_first:
                assert copy["acked_before"] is None, copy
            else:
                assert copy["acked_before"] is not None and copy["acked_before"] >= 0.7, copy
    finally:
        os.close(fd)
        await server.close()


async def test_a_request_with_ids_that_are_not_text_does_not_silence_the_terminal(tmp_path):
    """Review of 265750f (F5): an encrypted money request whose clear header has a SaleID
    that is not a string raised TypeError (unhashable) in the terminal's receipt and ended
    the pseudo-terminal's serving loop: the terminal never answered again. The crypto error
    still goes out, nothing is recorded under such IDs, and the next frame is read; the
    same request in clear is ignored as junk, and the terminal goes on."""
    import json

    from bridge.protocol import crypto
    from bridge.simulator.responses import payment_request

    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(default=Behaviour(delay=0.0)),
                             key=crypto.NexoKey("Mine", 1, "one passphrase"))
    await server.start_pty(link)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    os.set_blocking(fd, False)
    bridge = make_framer("stx-etx-lrc")
    try:
        sealed = {"SaleToPOIRequest": {"MessageHeader": {
            "MessageCategory": "Payment", "SaleID": ["TILL1"], "ServiceID": "P1"},
            "NexoBlob": "x"}}
        os.write(fd, _frame(json.dumps(sealed).encode()))
        await _read_until(fd, bridge, frame=True)  # the crypto error
        os.write(fd, bridge.data_to_send(time.monotonic()))  # our ACK of it
        good = crypto.encrypt_message(payment_request("POS1", "G1", server.scenario.poi_id,
                                                      10.0), server.key)
        os.write(fd, _frame(json.dumps(good, separators=(",", ":")).encode()))
        await wait_for(lambda: server.frames_in == 2)
        await wait_for(lambda: "POS1/G1" in server.terminal.summary())
        assert list(server.terminal.summary()) == ["POS1/G1"]
    finally:
        os.close(fd)
        await server.close()

    from bridge.simulator.terminal import SimulatedTerminal

    terminal = SimulatedTerminal()
    clear = payment_request("POS1", "P1", "V400m-1", 10.0)
    clear["SaleToPOIRequest"]["MessageHeader"]["ServiceID"] = {"id": 1}
    assert terminal.handle(clear, 100.0).answers == []
    assert terminal.handle(payment_request("POS1", "P2", "V400m-1", 10.0), 101.0).answers
    assert list(terminal.summary()) == ["POS1/P2"]
    # a status poll or an abort naming such IDs finds nothing (and records no NotFound)
    poll = builders.status_request(sale_id="POS1", service_id="S1", poi_id="V400m-1",
                                   original_service_id="P2", original_category="Payment")
    poll["SaleToPOIRequest"]["TransactionStatusRequest"]["MessageReference"]["SaleID"] = [1]
    assert "NotFound" in json.dumps(terminal.handle(poll, 102.0).answers[0].document)
    abort = {"SaleToPOIRequest": {"MessageHeader": {"MessageCategory": "Abort"},
                                  "AbortRequest": {"MessageReference": {"SaleID": [1]}}}}
    assert terminal.handle(abort, 103.0).answers == []
    assert terminal.summary()["POS1/P2"]["status_not_found"] == []


# --- what a muted terminal drops, and scenario entries for a range of amounts ---------------------

async def test_a_frame_dropped_while_muted_is_in_the_ledger_unread(tmp_path):
    """A muted terminal (`mute`: it plays dead) reads and drops every byte: a money request
    it dropped left no trace, so a bridge that then sent the payment again, as a new request
    rather than a status poll, showed one copy in the ledger. Every whole frame it drops is
    now recorded, unread (no ACK went out), with its IDs and what it asked; a copy of a
    dropped frame that comes once the terminal listens again is flagged as the framer's
    copy of it (byte for byte, never acknowledged: acked_before None)."""
    import json

    from bridge.simulator.responses import payment_request

    link = tmp_path / "terminal"
    server = SimulatorServer(Scenario(default=Behaviour(delay=0.0)),
                             ack_timeout=0.5)
    await server.start_pty(link)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    os.set_blocking(fd, False)
    try:
        diagnosis = {"SaleToPOIRequest": {"MessageHeader": {
            "ProtocolVersion": "3.0", "MessageClass": "Service", "MessageCategory": "Diagnosis",
            "MessageType": "Request", "SaleID": "poi-bridge", "ServiceID": "D1",
            "POIID": server.scenario.poi_id}, "DiagnosisRequest": {"HostDiagnosisFlag": False}}}
        pay = _frame(json.dumps(payment_request("POS1", "M1", server.scenario.poi_id, 12.5),
                                separators=(",", ":")).encode())
        server.mute(0.6)
        os.write(fd, _frame(json.dumps(diagnosis).encode()) + b"\x06junk")
        await asyncio.sleep(0.1)
        os.write(fd, pay)
        await asyncio.sleep(0.7)  # the terminal listens again; nothing was answered
        try:
            unexpected = os.read(fd, 4096)
        except BlockingIOError:
            unexpected = b""
        assert unexpected == b"", unexpected
        assert (server.frames_in, server.frames_dropped) == (0, 2)
        os.write(fd, pay)  # the bridge's framer sends it again for want of an ACK
        await wait_for(lambda: server.frames_in == 1)
        ledger = server.terminal.summary()
    finally:
        os.close(fd)
        await server.close()
    entry = ledger["POS1/M1"]
    assert (entry["category"], entry["amount"], entry["currency"]) == ("Payment", 12.5, "EUR")
    dropped, read = entry["receipts"]
    assert (dropped["answer"], dropped["retransmission"]) == ("dropped", False), dropped
    assert (read["answer"], read["retransmission"]) == ("processed", True), read
    assert 0.6 <= read["gap"] < 1.5 and read["acked_before"] is None, read
    assert entry["charged"]
    assert [(d["category"], d["sale_id"], d["service_id"], d["amount"], d["currency"])
            for d in server.terminal.dropped_unread] == [
        ("Diagnosis", "poi-bridge", "D1", None, None), ("Payment", "POS1", "M1", 12.5, "EUR")]
    assert all(isinstance(d["at"], float) for d in server.terminal.dropped_unread)


def test_a_scenario_entry_can_take_a_range_of_amounts():
    """`amount` alone picks that amount; with `amount_below`, every amount from `amount` up
    to (not including) `amount_below`: the soak gives each payment an amount of its own and
    picks the terminal's behaviour by the kind's range."""
    import pydantic

    from bridge.simulator.responses import payment_request
    from bridge.simulator.terminal import SimulatedTerminal

    terminal = SimulatedTerminal(Scenario(transactions=[
        Behaviour(amount=300.0, amount_below=400.0, decision="decline"),
        Behaviour(amount=500.0, decision="cancel")]))
    asked = (300.0, 300.01, 399.99, 400.0, 299.99, 500.0, 500.01, "350")
    for i, amount in enumerate(asked):
        terminal.handle(payment_request("POS1", f"R{i}", "V400m-1", amount), 100.0 + 10 * i)
    ledger = terminal.summary()
    assert [ledger[f"POS1/R{i}"]["outcome"] for i in range(len(asked))] == [
        "decline", "decline", "decline", "approve", "approve", "cancel", "approve", "approve"]
    for bad in ({"amount_below": 5.0}, {"amount": 5.0, "amount_below": 5.0}):
        try:
            Behaviour(**bad)
        except pydantic.ValidationError:
            continue
        raise AssertionError(f"{bad} was taken")

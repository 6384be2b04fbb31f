"""Local encryption end to end: the bridge and a simulated terminal sharing a key over a pty;
and a terminal with another key, whose "crypto error" must read as a configuration error."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from bridge.config import TerminalConfig
from bridge.daemon.journal import Journal
from bridge.daemon.worker import TerminalWorker
from bridge.protocol import crypto
from bridge.protocol.messages import parse_message
from bridge.protocol.transaction import request_digest
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario
from bridge.transports import Backoff

from .test_terminal_worker import POI, RecordingOutlet

KEY = crypto.NexoKey("CryptoKeyIdentifier12345", 1, "p@ssw0rd123456")


@contextlib.asynccontextmanager
async def worker_beside_a_terminal(tmp_path, bridge_key, terminal_key, behaviour: Behaviour,
                                   outlet: RecordingOutlet | None = None, *,
                                   failures: list[BaseException] | None = None,
                                   previous_key: crypto.NexoKey | None = None
                                   ) -> AsyncIterator[tuple[TerminalWorker, RecordingOutlet,
                                                            SimulatorServer]]:
    """A worker with `bridge_key` (and `previous_key`) online beside a simulated terminal
    with `terminal_key`; `failures` collects the journal's step failures (the daemon stops
    at once on one)."""
    simulator = SimulatorServer(Scenario(poi_id=POI, default=behaviour,
                                         link=LinkBehaviour(status_hold=0.05)),
                                "stx-etx-lrc", key=terminal_key, ack_timeout=0.3)
    path = await simulator.start_pty(tmp_path / "terminal")
    config = TerminalConfig.model_validate({
        "poi_id": POI, "link": {"kind": "serial", "device": path},
        "framer": {"ack_timeout": 0.3}, "payment_timeout": 1.5, "status_timeout": 0.8,
        "poll_floor": 0.05})
    outlet = outlet or RecordingOutlet()
    journal = Journal(tmp_path / "journal.sqlite3")
    if failures is not None:
        journal.on_failure(failures.append)
    outlet.journal = journal
    worker = TerminalWorker(config, journal, outlet, key=bridge_key, previous_key=previous_key,
                            backoff=Backoff(initial=0.05, maximum=0.2))
    await worker.start()
    try:
        await outlet.state_is("online")
        yield worker, outlet, simulator
    finally:
        await worker.stop()
        await simulator.close()
        journal.close()


async def pay(worker: TerminalWorker, outlet: RecordingOutlet, service_id: str,
              shape: Callable[[dict], None] | None = None):
    """One payment of 25.00 from register POS1; `shape` changes the request document first."""
    doc = responses.payment_request("POS1", service_id, POI, 25.0)
    if shape is not None:
        shape(doc)
    worker.submit(parse_message(doc), doc, request_digest(doc))
    return await outlet.result_for(service_id, timeout=15)


async def run_payment(tmp_path, bridge_key, terminal_key, behaviour: Behaviour,
                      outlet: RecordingOutlet | None = None, *,
                      shape: Callable[[dict], None] | None = None,
                      failures: list[BaseException] | None = None,
                      previous_key: crypto.NexoKey | None = None):
    """One payment through a worker (see worker_beside_a_terminal and pay)."""
    async with worker_beside_a_terminal(tmp_path, bridge_key, terminal_key, behaviour, outlet,
                                        failures=failures, previous_key=previous_key) as (
            worker, outlet, simulator):
        return await pay(worker, outlet, "E1", shape), simulator


async def test_encrypted_payment_with_the_same_key(tmp_path):
    result, simulator = await run_payment(tmp_path, KEY, KEY, Behaviour(delay=0.05))
    assert (result.outcome, result.source) == ("approved", "terminal")
    # The register gets the decrypted response; the terminal decrypted our request.
    assert result.response["SaleToPOIResponse"]["PaymentResponse"]["Response"]["Result"] == "Success"
    assert "NexoBlob" not in result.response["SaleToPOIResponse"]
    assert ("POS1", "E1") in simulator.terminal.ledger


async def test_a_request_with_null_encryption_fields_is_encrypted_and_paid(tmp_path):
    """The audit: `"NexoBlob": null` (a register library writing every optional field) passed
    the intake, then counted as already encrypted: the worker's step failed, the daemon
    stopped at once, and the broker gave it the same request again at every start."""
    failures: list[BaseException] = []

    def nulls(doc: dict) -> None:
        doc["SaleToPOIRequest"]["NexoBlob"] = None
        doc["SaleToPOIRequest"]["SecurityTrailer"] = None

    result, simulator = await run_payment(tmp_path, KEY, KEY, Behaviour(delay=0.05),
                                          shape=nulls, failures=failures)
    assert failures == []
    assert (result.outcome, result.source) == ("approved", "terminal")
    assert ("POS1", "E1") in simulator.terminal.ledger


async def test_a_request_that_cannot_be_encrypted_is_refused_without_stopping_the_daemon(
        tmp_path, caplog):
    """A request the worker cannot encrypt (here one carrying a SecurityTrailer of its own,
    which the intake refuses today, as a journal record of an earlier version or any later
    path could bring it) is refused, as a frame too large is: nothing sent, the register
    told why. It used to fail the worker's step, which stops the whole daemon."""
    failures: list[BaseException] = []

    def trailer(doc: dict) -> None:
        doc["SaleToPOIRequest"]["SecurityTrailer"] = {"AdyenCryptoVersion": 1}

    with caplog.at_level(logging.ERROR, logger="poi_bridge"):
        result, simulator = await run_payment(tmp_path, KEY, KEY, Behaviour(delay=0.05),
                                              shape=trailer, failures=failures)
    assert failures == []
    assert (result.outcome, result.source) == ("rejected", "bridge")
    assert "cannot be encrypted" in result.error and "nothing was charged" in result.error
    assert ("POS1", "E1") not in simulator.terminal.ledger
    said = [r.getMessage() for r in caplog.records if "E1 not sent" in r.getMessage()]
    assert len(said) == 1 and "cannot be encrypted" in said[0], said


async def test_encrypted_status_poll_recovery(tmp_path):
    result, _ = await run_payment(tmp_path, KEY, KEY, Behaviour(delay=0.05, never_answer=True))
    assert (result.outcome, result.source) == ("approved", "status-poll")


async def test_wrong_key_is_a_configuration_error_not_a_decline(tmp_path):
    other = crypto.NexoKey("CryptoKeyIdentifier12345", 1, "another passphrase")
    result, simulator = await run_payment(tmp_path, KEY, other, Behaviour(delay=0.05))
    # The terminal cannot read the identity check either: the payment is never sent to a
    # device that has not said who it is, and the refusal says why
    assert result.outcome == "rejected"
    assert "cannot decrypt our message" in result.error and "nothing was sent" in result.error
    assert f"terminal {POI}" in result.error and "CryptoKeyIdentifier12345 v1" in result.error
    assert "p@ssw0rd" not in result.error and "another passphrase" not in result.error
    assert simulator.terminal.ledger == {}  # nothing was charged


async def test_the_state_document_says_why_the_identity_check_failed(tmp_path):
    """The log said the terminal cannot decrypt our message, and which key to check;
    `status`, reading the state document, said only "1 identity check unanswered" (it was
    answered: with a crypto error). The document carries the last failure's reason."""
    other = crypto.NexoKey("CryptoKeyIdentifier12345", 1, "another passphrase")
    async with worker_beside_a_terminal(tmp_path, KEY, other, Behaviour(delay=0.05)) as (
            worker, outlet, _):
        assert worker.state()["identity_check_failed"] is None  # (none failed yet)
        result = await pay(worker, outlet, "E1")
        assert result.outcome == "rejected"
        state = worker.state()
        assert state["identity_checks_unanswered"] >= 1, state
        failed = state["identity_check_failed"]
        assert "cannot decrypt our message" in failed, state
        assert "CryptoKeyIdentifier12345 v1" in failed, state
        assert "p@ssw0rd" not in failed and "another passphrase" not in failed


NEW_KEY = crypto.NexoKey("CryptoKeyIdentifier12345", 2, "a new passphrase")


async def test_a_terminal_still_on_the_previous_key_of_a_rotation_is_paid(tmp_path, caplog):
    """A key rotation: the bridge has the new key (v2) and the previous one (v1); the
    terminal's settings still hold v1 alone. Its crypto error to the first message under v2
    turns the bridge to v1, and the payment goes through, with a line saying so."""
    with caplog.at_level(logging.INFO, logger="poi_bridge"):
        result, simulator = await run_payment(tmp_path, NEW_KEY, KEY, Behaviour(delay=0.05),
                                              previous_key=KEY)
    assert (result.outcome, result.source) == ("approved", "terminal"), result
    assert ("POS1", "E1") in simulator.terminal.ledger
    said = [m for m in caplog.messages if "now sends with key" in m]
    assert len(said) == 1 and "CryptoKeyIdentifier12345 v1" in said[0], said
    assert "a new passphrase" not in caplog.text and "p@ssw0rd" not in caplog.text


async def test_a_terminal_already_on_the_new_key_of_a_rotation_is_paid(tmp_path, caplog):
    """The other order: the bridge still sends with v1 (its `key`) and has v2 as
    previous_key (the next one, set ahead), while the terminal was moved to v2 already."""
    with caplog.at_level(logging.INFO, logger="poi_bridge"):
        result, _ = await run_payment(tmp_path, KEY, NEW_KEY, Behaviour(delay=0.05),
                                      previous_key=NEW_KEY)
    assert (result.outcome, result.source) == ("approved", "terminal"), result
    assert any("now sends with key CryptoKeyIdentifier12345 v2" in m
               for m in caplog.messages), caplog.messages


async def test_a_terminal_answering_with_the_other_key_of_a_rotation_is_answered_so(
        tmp_path, caplog, monkeypatch):
    """A terminal that reads both keys of a rotation but seals with v1 alone: the bridge
    reads each answer with the key its trailer names (not only `key`, v2), and sends with
    v1 from then on, as the terminal does."""
    decrypt = crypto.decrypt_message
    both = crypto.KeyRing([KEY, NEW_KEY])

    def terminal_reads_both(document, keys):
        return decrypt(document, both if keys is KEY else keys)

    monkeypatch.setattr(crypto, "decrypt_message", terminal_reads_both)
    with caplog.at_level(logging.INFO, logger="poi_bridge"):
        result, _ = await run_payment(tmp_path, NEW_KEY, KEY, Behaviour(delay=0.05),
                                      previous_key=KEY)
    assert (result.outcome, result.source) == ("approved", "terminal"), result
    said = [m for m in caplog.messages if "now sends with key" in m]
    assert len(said) == 1, said
    assert "v1 (its messages come with it)" in said[0], said
    assert not [m for m in caplog.messages if "cannot decrypt" in m], caplog.messages


async def test_a_terminal_that_takes_up_the_new_key_mid_run_misses_one_request_only(
        tmp_path, caplog):
    """The terminal's settings change to v2 while the bridge runs on v1 with v2 as
    previous_key: the next payment, sent with v1, meets its crypto error. The terminal never
    read it, and it is not sent again blind: it is asked about with v2 and reported as the
    terminal answers (not charged). The bridge sends with v2 from then on."""
    results = {}
    async with worker_beside_a_terminal(tmp_path, KEY, KEY, Behaviour(delay=0.05),
                                        previous_key=NEW_KEY) as (worker, outlet, simulator):
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            for service_id in ("E1", "E2", "E3"):
                if service_id == "E2":
                    simulator.key = NEW_KEY  # the back office's new settings reach it
                results[service_id] = await pay(worker, outlet, service_id)
    assert (results["E1"].outcome, results["E1"].source) == ("approved", "terminal")
    assert (results["E2"].outcome, results["E2"].source) == ("not_found", "status-poll"), \
        results["E2"]
    assert ("POS1", "E2") not in simulator.terminal.ledger  # never read, never charged
    assert (results["E3"].outcome, results["E3"].source) == ("approved", "terminal")
    assert worker.key is NEW_KEY
    assert any("now sends with key CryptoKeyIdentifier12345 v2" in m for m in caplog.messages)
    # The state document says which key the terminal's messages came with: none before its
    # first (not known yet), v1, then v2 from its first message under it
    shown = [state["key"] for state in outlet.states]
    assert shown[0] is None, shown
    assert [key for key in dict.fromkeys(shown) if key] == [
        "CryptoKeyIdentifier12345 v1", "CryptoKeyIdentifier12345 v2"], shown


CRYPTO_ERROR = b'{"errors":["Nexo Service: crypto error (3)"],"ServiceID":"-NULL-"}'


async def test_a_stray_crypto_error_does_not_turn_the_bridge_to_the_other_key(tmp_path,
                                                                            caplog):
    """A crypto error names no message and is not authenticated: anyone who can write to
    the line can send one. One that answers nothing the bridge waits for turned it to the
    other key of a rotation, and the next payment went with a key the terminal does not
    hold (a review). Only one that answers a frame of ours under the key in use does."""
    async with worker_beside_a_terminal(tmp_path, KEY, KEY, Behaviour(delay=0.05),
                                        previous_key=NEW_KEY) as (worker, outlet, simulator):
        first = await pay(worker, outlet, "E1")
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            worker._on_frame(CRYPTO_ERROR)  # (as the framer hands a frame's payload over)
            assert worker.key is KEY
            second = await pay(worker, outlet, "E2")
    assert [(r.outcome, r.source) for r in (first, second)] == [("approved", "terminal")] * 2
    assert not [m for m in caplog.messages if "now sends with key" in m], caplog.messages


async def test_one_crypto_error_to_a_frame_of_ours_does_not_turn_the_key(tmp_path, caplog):
    """A copy of a request damaged on the line in a way its check byte misses is refused
    with a crypto error too, while the terminal reads another copy and charges: one crypto
    error turned a confirmed terminal in a key rotation to its other key (the soak with
    --keys rotation). It takes two in a row, with no message of the terminal's between."""
    async with worker_beside_a_terminal(tmp_path, KEY, KEY, Behaviour(delay=0.4),
                                        previous_key=NEW_KEY) as (worker, outlet, simulator):
        first = await pay(worker, outlet, "E1")
        doc = responses.payment_request("POS1", "E2", POI, 25.0)
        worker.submit(parse_message(doc), doc, request_digest(doc))
        for _ in range(100):
            if worker.session.expects_answer():
                break
            await asyncio.sleep(0.01)
        assert worker.session.expects_answer()
        with caplog.at_level(logging.INFO, logger="poi_bridge"):
            worker._on_frame(CRYPTO_ERROR)  # (the answer to a damaged copy, say)
            assert worker.key is KEY
            second = await outlet.result_for("E2", timeout=15)
    assert [(r.outcome, r.source) for r in (first, second)] == [("approved", "terminal")] * 2
    assert not [m for m in caplog.messages if "now sends with key" in m], caplog.messages


def workers_sharing_a_journal(tmp_path, journal: Journal,
                              keys: dict[str, tuple]) -> dict[str, TerminalWorker]:
    """Workers of the terminals `keys` names ({POIID: (key, previous_key)}), on serial
    links that are not opened, set up with each other as the daemon does (terminals, then
    neighbours)."""
    workers = {}
    for poi_id, (key, previous) in keys.items():
        config = TerminalConfig.model_validate({
            "poi_id": poi_id, "link": {"kind": "serial", "device": str(tmp_path / poi_id)}})
        workers[poi_id] = TerminalWorker(config, journal, RecordingOutlet(), key=key,
                                         previous_key=previous)
    for worker in workers.values():
        worker.terminals = workers
    for worker in workers.values():
        worker.neighbours = {other.poi_id: other.key for other in workers.values()
                             if other is not worker}
    return workers


async def test_another_terminals_message_under_a_shared_key_leaves_the_key_in_use(tmp_path):
    """A chain-wide rotation: A has the new key (v2) and the old one (v1) as previous_key,
    B has not moved yet (v1). B's device on A's link (swapped cables) sends under v1: that
    says nothing of which key A's terminal holds, and turned A to v1 (a review)."""
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        workers = workers_sharing_a_journal(tmp_path, journal, {
            POI: (NEW_KEY, KEY), "V400m-222": (KEY, None)})
        a, b = workers[POI], workers["V400m-222"]
        request = responses.payment_request("POS1", "B1", b.poi_id, 5.0)
        answer = responses.payment_response(request, "approve", 0)
        a._on_frame(json.dumps(crypto.encrypt_message(answer, KEY)).encode())
        assert a.key is NEW_KEY
        # Its own message under v1 does turn it: the terminal holds v1
        answer["SaleToPOIResponse"]["MessageHeader"]["POIID"] = POI
        a._on_frame(json.dumps(crypto.encrypt_message(answer, KEY)).encode())
        assert a.key is KEY
    finally:
        journal.close()


def test_a_device_is_asked_with_every_key_of_a_rotation_each_once(tmp_path):
    """A chain moving every terminal from a key of its own to one shared new key: each has
    the new key and its old one as previous_key. A device behind a swapped cable may hold
    its old key: A's link asks with A's old key, then each other terminal's old key, and
    never the shared new key twice (a review: a neighbour whose key was A's was left out
    with its old key too)."""
    old = {poi_id: crypto.NexoKey(f"Old-{poi_id}", 1, f"old {poi_id}")
           for poi_id in (POI, "V400m-222", "V400m-333")}
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        workers = workers_sharing_a_journal(tmp_path, journal, {
            poi_id: (NEW_KEY, key) for poi_id, key in old.items()})
        a = workers[POI]
        asked = a.session.identity.other_keys
        assert asked == (POI, "V400m-222#other", "V400m-333#other"), asked
        assert [a._key_for(entry) for entry in asked] == list(old.values())
    finally:
        journal.close()


def test_a_stray_crypto_error_is_not_counted_towards_turning_the_key(tmp_path):
    """A crypto error the session knows to be the answer to an identity check it gave up
    (asked with another terminal's key) is no refusal of ours: it counted, and one more
    (a damaged copy) turned the key (a review)."""
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        worker = workers_sharing_a_journal(tmp_path, journal, {POI: (KEY, NEW_KEY)})[POI]
        worker.identity = "confirmed"
        worker._last_sent_key = worker.key
        worker.session.expects_answer = lambda: True  # (a status poll on the wire, say)
        worker.session.identity.stray_refusals = 1
        worker.session.identity.strays_until = worker._clock() + 60
        worker._on_frame(CRYPTO_ERROR)  # the stray
        worker._on_frame(CRYPTO_ERROR)  # one refusal of ours: not two in a row
        assert worker.key is KEY
        worker._on_frame(CRYPTO_ERROR)  # two: the terminal holds the other key
        assert worker.key is NEW_KEY
    finally:
        journal.close()


async def test_encrypted_terminal_without_a_key_configured(tmp_path):
    result, _ = await run_payment(tmp_path, None, KEY, Behaviour(delay=0.05))
    # The terminal expects encrypted requests and refuses our clear identity check: the
    # payment is refused, saying no key is configured, and no payment happened.
    assert result.outcome == "rejected"
    assert "(no key)" in result.error and "nothing was sent" in result.error


async def test_an_answer_that_cannot_be_decrypted_is_asked_about_not_ended(tmp_path,
                                                                         monkeypatch):
    """The terminal took the payment and answered, but its answer does not decrypt (damaged
    on the way, say): that is no outcome. The bridge asks by status poll, and the shopper's
    payment is reported approved, not ended as an error."""
    seal = crypto.encrypt_message
    damaged: list[str] = []

    def damage_the_payment_response(document, key):
        sealed = seal(document, key)
        inner = sealed.get("SaleToPOIResponse", {})
        if "PaymentResponse" in document.get("SaleToPOIResponse", {}) and not damaged:
            blob = inner["NexoBlob"]
            inner["NexoBlob"] = ("B" if blob[0] == "A" else "A") + blob[1:]
            damaged.append(blob)
        return sealed

    # Only the simulated terminal seals responses; the bridge seals requests.
    monkeypatch.setattr(crypto, "encrypt_message", damage_the_payment_response)
    result, simulator = await run_payment(tmp_path, KEY, KEY, Behaviour(delay=0.05))
    assert damaged, "the payment's response was not damaged: the test proves nothing"
    assert (result.outcome, result.source) == ("approved", "status-poll")
    assert ("POS1", "E1") in simulator.terminal.ledger


async def test_an_answer_in_clear_is_not_believed_when_a_key_is_configured(tmp_path,
                                                                        monkeypatch):
    """Whoever can write to the link can forge an answer in clear: the request's header (its
    SaleID and ServiceID) travels in clear. The terminal declined; a clear copy saying
    Success must not become an approval. The payment is asked about, and the terminal's own
    (encrypted) record says declined."""
    import copy

    seal = crypto.encrypt_message
    forged: list[dict] = []

    def forge_the_payment_response(document, key):
        body = document.get("SaleToPOIResponse", {})
        if "PaymentResponse" in body and not forged:
            fake = copy.deepcopy(document)
            fake["SaleToPOIResponse"]["PaymentResponse"]["Response"] = {"Result": "Success"}
            forged.append(fake)
            return fake  # in clear
        return seal(document, key)

    monkeypatch.setattr(crypto, "encrypt_message", forge_the_payment_response)
    result, simulator = await run_payment(tmp_path, KEY, KEY,
                                          Behaviour(delay=0.05, decision="decline"))
    assert forged, "no answer was forged: the test proves nothing"
    assert (result.outcome, result.source) == ("declined", "status-poll")
    assert not simulator.terminal.ledger[("POS1", "E1")].charged


class JournalReadingOutlet(RecordingOutlet):
    """Records, with each event, the detail the journal holds for the transaction then."""

    def __init__(self) -> None:
        super().__init__()
        self.journaled: list[str] = []

    def progress(self, event) -> None:
        super().progress(event)
        self.journaled += [txn.detail for txn in self.journal.transactions()]


def break_the_padding(sealed: dict) -> None:
    """The last byte of the second-to-last block flipped: the last block's padding is wrong."""
    body = sealed["SaleToPOIResponse"]
    blob = bytearray(base64.b64decode(body["NexoBlob"]))
    blob[-17] ^= 0x5A
    body["NexoBlob"] = base64.b64encode(bytes(blob)).decode()


def break_the_hmac(sealed: dict) -> None:
    """A bit of the Nonce flipped (it is XORed into the IV): one plaintext bit of the first
    block changes, the padding stays valid, and the HMAC does not verify."""
    trailer = sealed["SaleToPOIResponse"]["SecurityTrailer"]
    nonce = bytearray(base64.b64decode(trailer["Nonce"]))
    nonce[3] ^= 0x01
    trailer["Nonce"] = base64.b64encode(bytes(nonce)).decode()


async def test_why_an_answer_does_not_decrypt_is_not_told_to_registers(tmp_path, monkeypatch,
                                                                      caplog):
    """Whoever can write to the link chooses the Nonce, which is XORed into the CBC IV. If a
    register could tell "invalid padding" from "Hmac does not verify" (in an event's detail,
    a result, the journal), it would have a padding oracle. Both read the same there; the
    reason is in the daemon's log only."""
    seal = crypto.encrypt_message
    seen: dict[str, tuple] = {}
    for name, damage in (("padding", break_the_padding), ("hmac", break_the_hmac)):
        damaged: list[str] = []

        def damage_the_payment_response(document, key, damage=damage, damaged=damaged):
            sealed = seal(document, key)
            if "PaymentResponse" in document.get("SaleToPOIResponse", {}) and not damaged:
                damage(sealed)
                damaged.append(name)
            return sealed

        monkeypatch.setattr(crypto, "encrypt_message", damage_the_payment_response)
        outlet = JournalReadingOutlet()
        (tmp_path / name).mkdir()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="poi_bridge.terminal"):
            result, _ = await run_payment(tmp_path / name, KEY, KEY, Behaviour(delay=0.05),
                                          outlet=outlet)
        assert damaged, "the payment's response was not damaged: the test proves nothing"
        assert (result.outcome, result.source) == ("approved", "status-poll")
        texts = ([e.detail for e in outlet.events], outlet.journaled,
                 [(r.outcome, r.error) for r in outlet.results])
        told = "\n".join(text for part in texts for item in part for text in
                         (item if isinstance(item, tuple) else (item,)) if text)
        for word in ("padding", "Hmac", "HMAC", "tampered", "corrupt"):
            assert word not in told
        assert ("cannot decrypt or verify the terminal's answer with key "
                "CryptoKeyIdentifier12345 v1") in told
        # The daemon's log says why, naming the terminal and the key, never its material.
        reasons = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                   and "does not decrypt or verify" in r.getMessage()]
        assert len(reasons) == 1 and POI in reasons[0]
        assert "CryptoKeyIdentifier12345 v1" in reasons[0]
        assert ("invalid padding" if name == "padding" else "Hmac does not verify") in reasons[0]
        assert "p@ssw0rd" not in "\n".join(r.getMessage() for r in caplog.records)
        seen[name] = {text for text in told.splitlines() if "decrypt" in text}
    assert seen["padding"] == seen["hmac"]

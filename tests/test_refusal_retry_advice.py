"""A refusal the journal records (so that a copy the broker delivers again gets the same
answer) answers every later request under the same SaleID and ServiceID too: each says a
retry needs a new ServiceID. A register that resent "terminal ... is offline; nothing was
sent" under the same ServiceID once the terminal was back got the same refusal again (a
README walk-through). A refusal that is not recorded does not say it: the same ServiceID,
corrected, is taken."""

from __future__ import annotations

import json
import time

from bridge.config import parse_config
from bridge.daemon.intake import RequestIntake
from bridge.daemon.journal import Journal
from bridge.daemon.mqtt import RegisterGateway, Reply
from bridge.daemon.worker import TerminalWorker
from bridge.protocol import builders
from bridge.protocol.transaction import Transaction, TxKey, TxState, request_digest
from bridge.simulator import responses

from .test_intake_fuzz import POI
from .test_session import Harness, abort_of

OTHER = "P400Plus-275000001"  # not in the rig's configuration


class Rig:
    """test_intake_fuzz's rig (its terminal offline), the terminal for registers POS1 and
    POS2 only."""

    def __init__(self, path) -> None:
        config = parse_config({
            "journal": str(path),
            "terminals": [{"poi_id": POI, "allowed_sale_ids": ["POS1", "POS2"],
                           "link": {"kind": "tcp", "host": "127.0.0.1", "port": 9}}]})
        self.journal = Journal(path)
        self.gateway = RegisterGateway(config.mqtt, self.journal)
        workers = {POI: TerminalWorker(config.terminals[0], self.journal, self.gateway)}
        self.intake = RequestIntake(config, self.journal, self.gateway, workers, health=dict)

    def refusal(self, document: dict, poi_id: str = POI) -> str:
        """The refusal of `document`, sent on `poi_id`'s topic for its SaleID."""
        header = document["SaleToPOIRequest"]["MessageHeader"]
        header["POIID"] = poi_id
        before = self.journal.pending(limit=1000)
        self.intake.handle(f"poi-bridge/terminals/{poi_id}/request/{header['SaleID']}",
                           json.dumps(document).encode(), Reply(self.gateway, None, None))
        published = self.journal.pending(limit=1000)[len(before):]
        (answer,) = [json.loads(m.payload) for m in published if m.topic.endswith("/response")]
        assert answer["bridge"]["outcome"] == "rejected", answer
        return answer["bridge"]["error"]

    def recorded(self, document: dict) -> bool:
        header = document["SaleToPOIRequest"]["MessageHeader"]
        return self.journal.get(TxKey(header["SaleID"], header["ServiceID"])) is not None

    def save(self, service_id: str, poi_id: str, state: TxState, **extra) -> None:
        request = responses.payment_request("POS1", service_id, poi_id, 12.5)
        self.journal.save(Transaction(
            sale_id="POS1", service_id=service_id, poi_id=poi_id, category="Payment",
            request=request, digest=request_digest(request), created_at=time.time(),
            updated_at=time.time(), state=state, source="terminal", extra=extra,
            outcome="approved" if state is TxState.FINAL else None))


def status_about(service_id: str, about: str, sale_id: str = "POS1") -> dict:
    return builders.status_request(sale_id=sale_id, service_id=service_id, poi_id=POI,
                                   original_service_id=about, original_category="Payment")


def test_each_refusal_the_journal_records_says_a_retry_needs_a_new_service_id(tmp_path):
    rig = Rig(tmp_path / "journal.sqlite3")
    try:
        old = responses.payment_request("POS1", "A1", POI, now=time.time() - 3600)
        no_reference = status_about("A6", "A1")
        del no_reference["SaleToPOIRequest"]["TransactionStatusRequest"]["MessageReference"]
        rig.save("A8", OTHER, TxState.AWAITING_RESPONSE)  # open on another terminal
        rig.save("A9", OTHER, TxState.FINAL, unmatched=True)  # that terminal's word only
        rig.save("B1", POI, TxState.AWAITING_RESPONSE)  # open here: retried below
        retry = responses.payment_request("POS1", "B2", POI, 12.5)
        retry["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
            "TransactionID"] = "POS1-B1"
        cases = {
            "too old": (old, POI),
            "offline": (responses.payment_request("POS1", "A2", POI), POI),
            "unknown terminal": (responses.payment_request("POS1", "A3", "V400m-999"),
                                 "V400m-999"),
            "SaleID not allowed": (responses.payment_request("POS9", "A4", POI), POI),
            "another's transaction": (abort_of("POS2", "S1", "A5"), POI),
            "no MessageReference": (no_reference, POI),
            "open elsewhere": (status_about("A7", "A8"), POI),
            "another terminal's answer": (status_about("A10", "A9"), POI),
            "a retry of an open payment": (retry, POI),
        }
        cases["another's transaction"][0]["SaleToPOIRequest"]["AbortRequest"][
            "MessageReference"]["SaleID"] = "POS1"
        for name, (document, poi_id) in cases.items():
            error = rig.refusal(document, poi_id)
            assert rig.recorded(document), (name, error)
            assert "new ServiceID" in error, (name, error)
        unknown = rig.refusal(responses.payment_request("POS1", "A11", "V400m-999"),
                              "V400m-999")
        assert "Check the POIID in the topic and the request against the bridge's " \
               "configuration (`poi-bridge status` lists its terminals)" in unknown, unknown
        # Not recorded: said without it, and the same ServiceID, corrected, is taken
        lower = responses.payment_request("POS1", "C1", POI, currency="eur")
        error = rig.refusal(lower)
        assert not rig.recorded(lower) and "new ServiceID" not in error, error
        error = rig.refusal(responses.payment_request("POS1", "C1", POI))
        assert error.startswith(f"terminal {POI} is offline"), error
    finally:
        rig.journal.close()


def test_each_refusal_the_session_records_says_a_retry_needs_a_new_service_id():
    h = Harness()
    h.submit("R1", "S1")
    busy = h.submit("R2", "S2")
    for n in range(16):
        h.submit("R1", f"A{n}", doc=abort_of("R1", "S1", f"A{n}"))
    too_many = h.submit("R1", "A99", doc=abort_of("R1", "S1", "A99"))
    wrong = Harness()
    wrong.session.wrong_device = "P400Plus-111"  # (not following: a technician checks)
    on_the_wrong_device = wrong.submit("R1", "S1")
    offline = Harness(link_up=False).submit("R1", "S1")
    for actions in (busy, too_many, on_the_wrong_device, offline):
        (refusal,) = h.delivers(actions)
        assert refusal.outcome == "rejected", refusal
        assert actions[0].transaction.state is TxState.FINAL  # (recorded)
        assert "new ServiceID" in refusal.error, refusal.error

"""The 'previous run of this bridge' rules of bridge.daemon.peers, found wanting by a
review (unit level, no broker): a live clone of this box must count as another bridge; a
container's pid 1 and an absurd pid must not make a previous run look alive or raise."""

from __future__ import annotations

import json
import os

from bridge.daemon.peers import OtherBridges

JOURNAL = "/var/lib/poi-bridge/journal.sqlite3"


def peers(bridge_id="bid-1", host="store-12"):
    return OtherBridges(bridge_id=bridge_id, client_id="poi-bridge", journal=JOURNAL,
                        topic="t", host=host)


def test_a_cloned_box_announcing_live_is_another_bridge():
    """Box B is a disk clone of box A (same journal file -> same bridge_id, same hostname),
    with its own client id. B's *live* "online" (announcement 1, then 2...) is published
    while A runs: no previous run of A can announce after A started, yet A ignores it."""
    a = peers()
    a.online()  # A announced
    clone = {"state": "online", "instance": "i-clone", "bridge_id": "bid-1",
             "host": "store-12", "pid": 4242, "client_id": "poi-bridge-2",
             "journal": JOURNAL, "announcement": 1}
    a.heard(json.dumps(clone).encode(), json.loads)
    clone["announcement"] = 2
    a.heard(json.dumps(clone).encode(), json.loads)
    assert a.refusal() is not None, "a live clone is taken for A's own previous run"


def test_container_pid_1_earlier_run_after_journal_replaced_is_not_another_bridge():
    """In a container the daemon is pid 1 in every run: the previous run's document (same
    host i.e. the container's hostname, client id, journal path; old bridge_id) carries this
    process's own pid, so the 'process gone' test says 'alive' and blocks the store."""
    me = peers(bridge_id="new-journal")
    earlier = {"state": "online", "instance": "i-old", "bridge_id": "old-journal",
               "host": "store-12", "pid": os.getpid(), "client_id": "poi-bridge",
               "journal": JOURNAL, "announcement": 1}
    me.heard(json.dumps(earlier).encode(), json.loads, retained=True)
    assert me.refusal() is None, me.refusal()


def test_a_huge_pid_does_not_raise_out_of_heard():
    """heard() runs inside paho's read path: it must not raise on anyone's document."""
    me = peers(bridge_id="new-journal")
    doc = {"state": "online", "instance": "i-x", "bridge_id": "other", "host": "store-12",
           "pid": 2 ** 80, "client_id": "poi-bridge", "journal": JOURNAL}
    me.heard(json.dumps(doc).encode(), json.loads, retained=True)
    assert me.refusal() is not None  # not known to be gone: another bridge

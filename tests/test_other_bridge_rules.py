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


def test_a_bridge_with_this_ones_client_id_is_gone_once_the_connection_has_held():
    """Review: a copied configuration (same client id, own journal) ran beside the store's
    bridge; the two took the broker's session from each other, and the other's "offline"
    went to the session they shared, never to this bridge. After the copy had stopped,
    this bridge refused every request until restarted. The broker keeps one connection
    per client id: this one held SAME_CLIENT_ID_HELD s, so no such bridge is connecting."""
    me = peers()
    reannounced = []
    me.on_reannounce = lambda: reannounced.append(1)
    me.online()
    me.heard(json.dumps({**me.identity, "state": "online", "announcement": 1}).encode(),
             json.loads)  # (its own "online" came back: it takes requests)
    assert me.refusal() is None
    twin = {"state": "online", "instance": "i-twin", "bridge_id": "bid-2", "host": "store-12",
            "pid": 4242, "client_id": "poi-bridge", "journal": "/tmp/copy.sqlite3",
            "announcement": 1}
    other = {**twin, "instance": "i-other", "bridge_id": "bid-3", "client_id": "poi-bridge-9"}
    me.heard(json.dumps(twin).encode(), json.loads)
    me.heard(json.dumps(other).encode(), json.loads)
    assert me.refusal() is not None
    # Never seen taking the connection: a twin on another broker bridged to this one (a
    # second review), which may well still run
    me.connection_held()
    assert set(me.others) == {"i-twin", "i-other"} and reannounced == []
    me.connection_taken()  # the broker dropped this bridge just after it came up
    me.connection_held()  # the other, with its own client id, may well still run
    assert set(me.others) == {"i-other"} and reannounced == []
    assert me.refusal() is not None
    me.heard(json.dumps({**other, "state": "offline"}).encode(), json.loads)
    assert me.others == {} and reannounced == [1]
    # Nothing taken until this bridge's "online" has come back after the other's went
    me.online()
    assert "making sure it is gone" in (me.refusal() or "")
    me.heard(json.dumps({**me.identity, "state": "online", "announcement": 2}).encode(),
             json.loads)
    assert me.refusal() is None


def test_a_twin_taking_the_connection_in_turns_is_said_once(caplog):
    """Each takeover publishes the twin's will ("offline") and then its "online" again:
    about once a second each, a CRITICAL and a WARNING of ~700 characters, for as long as
    both ran. Said in full once; its comings and goings after that at debug."""
    import logging
    caplog.set_level(logging.DEBUG, logger="poi_bridge")
    me = peers()
    twin = {"state": "online", "instance": "i-twin", "bridge_id": "bid-2", "host": "store-12",
            "pid": 4242, "client_id": "poi-bridge", "journal": "/tmp/copy.sqlite3"}
    me.heard(json.dumps(twin).encode(), json.loads)
    for _ in range(5):
        me.connection_taken()  # (each takeover: its will, then its "online" again)
        me.heard(json.dumps({**twin, "state": "offline"}).encode(), json.loads)
        me.heard(json.dumps(twin).encode(), json.loads)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelno for r in loud] == [logging.CRITICAL], [r.getMessage() for r in loud]
    assert me.refusal() is not None  # (still there: still refusing)

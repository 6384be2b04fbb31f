"""The one-line status systemd shows (`systemctl status poi-bridge`, STATUS=)."""

from __future__ import annotations

from bridge.config import parse_config
from bridge.daemon.app import Bridge


def test_a_terminal_that_is_the_wrong_device_is_not_counted_online(tmp_path, monkeypatch):
    config = parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": "127.0.0.1", "port": 1},
        "terminals": [{"poi_id": poi, "link": {"kind": "serial", "device": f"/dev/null{i}"}}
                      for i, poi in enumerate(("V400m-1", "V400m-2", "V400m-3"))],
    })
    bridge = Bridge(config, hotplug=False)
    try:
        documents = {"V400m-1": {"state": "online", "identity": "confirmed"},
                     "V400m-2": {"state": "busy", "identity": "mismatch: V400m-999"},
                     "V400m-3": {"state": "offline", "identity": "unknown"}}
        for poi, worker in bridge.workers.items():
            monkeypatch.setattr(worker, "state", lambda poi=poi: {"poi_id": poi,
                                                                   **documents[poi]})
        line = bridge.status_line()
        assert line.startswith("1/3 terminals online (1 the wrong device: V400m-2), ")
        # not "unreachable" before the first attempt has even failed
        assert line.endswith("undelivered, connecting to the broker")
        bridge.gateway.broker_problem = "login refused"
        assert bridge.status_line().endswith(", broker login refused")
        documents["V400m-2"]["identity"] = "confirmed"
        assert bridge.status_line().startswith("2/3 terminals online, 0 in flight")
    finally:
        bridge.journal.close()

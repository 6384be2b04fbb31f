"""An IPv6 broker or terminal is named [ADDRESS]:PORT in every line a technician reads: the
daemon's log and the CLI's output wrote `::1:1883`, which reads as an address alone, while
the CLI's connection errors already wrote `[::1]:1883` (the form `--broker` takes back).
Real processes for the CLI, a real mosquitto on ::1 for the daemon."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

from bridge.config import parse_config
from bridge.daemon.app import Bridge
from bridge.daemon.journal import Journal

from .broker import Mosquitto, free_port
from .rig import ROOT, python_env
from .test_cli import cli
from .test_daemon_mqtt import eventually

POI = "V400m-324688179"


def _bare_ipv6(text: str, port: int) -> list[str]:
    """The places `text` names ::1 or fd00::5 with `port` without brackets."""
    return re.findall(rf"(?<!\[)(?:::1|fd00::5):{port}\b", text)


def test_check_config_names_an_ipv6_broker_and_terminal_in_brackets(tmp_path):
    path = tmp_path / "poi-bridge.toml"
    path.write_text(f'journal = "{tmp_path}/journal.sqlite3"\n'
                    '[mqtt]\nhost = "::1"\nport = 1883\n'
                    '[[terminals]]\npoi_id = "V400m-1"\n[terminals.link]\nkind = "tcp"\n'
                    'host = "fd00::5"\nport = 8443\n')
    done = cli("check-config", str(path))
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr
    assert "broker [::1]:1883," in out and "V400m-1: tcp [fd00::5]:8443," in out, out
    assert not _bare_ipv6(out, 1883) and not _bare_ipv6(out, 8443), out


def test_status_names_an_ipv6_broker_in_brackets(tmp_path):
    port = free_port()  # nobody listens: the broker cannot be asked
    path = tmp_path / "poi-bridge.toml"
    path.write_text(f'journal = "{tmp_path}/journal.sqlite3"\n'
                    f'[mqtt]\nhost = "::1"\nport = {port}\n'
                    '[[terminals]]\npoi_id = "V400m-1"\n[terminals.link]\nkind = "tcp"\n'
                    'host = "fd00::5"\nport = 8443\n')
    Journal(tmp_path / "journal.sqlite3").close()  # the daemon ran here once
    done = cli("status", "--config", str(path))
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 2, out
    assert f"(broker [::1]:{port})" in out, out
    assert not _bare_ipv6(out, port), out


async def test_the_daemon_logs_an_ipv6_broker_in_brackets(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="poi_bridge")
    caplog.set_level(logging.DEBUG, logger="poi_bridge.mqtt")  # (each retry's line too)
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.host = "::1"
    broker.start()
    config = parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "mqtt": {"host": "::1", "port": broker.port, "client_id": "ipv6-bridge"},
        # (a terminal nobody serves: its worker retries, the broker side runs all the same)
        "terminals": [{"poi_id": POI, "link": {"kind": "tcp", "host": "::1",
                                               "port": free_port()}}],
    })
    bridge = Bridge(config)
    await bridge.start()
    where = f"[::1]:{broker.port}"
    try:
        await eventually(lambda: bridge.gateway.connected)
        await eventually(lambda: any(f"connected to MQTT broker {where}" in m
                                     for m in caplog.messages))
        broker.kill()
        await eventually(lambda: any(f"lost the MQTT broker {where}" in m
                                     for m in caplog.messages))
        await eventually(lambda: any(f"cannot reach MQTT broker {where}" in m
                                     for m in caplog.messages))
    finally:
        await bridge.stop()
        broker.kill()
    said = caplog.messages
    assert any("started" in m and f"broker {where}" in m for m in said), said
    assert not [m for m in said if _bare_ipv6(m, broker.port)], said


def test_a_simulated_terminal_says_its_ipv6_address_in_brackets():
    """`poi-bridge simulate --tcp [::1]:0`: the line a technician copies into the
    configuration's test (and types back into --tcp)."""
    process = subprocess.Popen([sys.executable, "-m", "bridge", "simulate", "--tcp", "[::1]:0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=python_env(), cwd=ROOT)
    try:
        line = process.stdout.readline().decode()
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert re.search(r"listening on \[::1\]:\d+$", line.strip()), line

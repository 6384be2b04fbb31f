"""The technician's commands take a configuration below a floor added since an earlier bridge
ran it (max_frame_size under 32 KiB, a short reconcile_deadline) as `run` takes it: at the
floor, with a warning on stderr. They refused it, while the daemon ran on it, so `status`,
`resync`, `devices`, `udev-rules` and `register --config` were of no use on a box the bridge
served."""

from __future__ import annotations

import json
from pathlib import Path

from .rig import POI
from .test_cli_tools import BASE, cli, running_bridge


def below_floors(tmp_path: Path, mosquitto, device: str) -> Path:
    """A configuration an earlier bridge ran: both values below their floors."""
    path = tmp_path / "poi-bridge.toml"
    path.write_text(
        f'journal = "{tmp_path / "journal.sqlite3"}"\n'
        f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n'
        f'base_topic = "{BASE}"\n'
        f'[[terminals]]\npoi_id = "{POI}"\nreconcile_deadline = 24\n'
        f'[terminals.link]\nkind = "serial"\ndevice = "{device}"\n'
        '[terminals.framer]\nmax_frame_size = 16384\n')
    return path


def assert_warned(command: str, config: Path, stderr: bytes) -> None:
    """Both values named, with the terminal and what to set, as `run` logs them."""
    said = stderr.decode()
    lines = said.splitlines()
    frame = [line for line in lines if "max_frame_size (" in line]
    deadline = [line for line in lines if f"terminals[0] ({POI})" in line]
    assert len(frame) == 1 and len(deadline) == 1, said
    prefix = f"poi-bridge {command}: {config}: warning: "
    assert frame[0].startswith(f"{prefix}terminals[0].framer.max_frame_size ({POI}): must be "
                               "at least 32768 bytes; got 16384"), said
    assert "set max_frame_size = 32768 or more" in frame[0], said
    assert deadline[0].startswith(f"{prefix}terminals[0] ({POI}): reconcile_deadline (24 s)"), said
    assert "check-config refuses this file" in deadline[0], said
    assert "Traceback" not in said, said


async def test_the_technicians_commands_take_a_configuration_run_takes(tmp_path, mosquitto):
    config = below_floors(tmp_path, mosquitto, str(tmp_path / "terminal"))
    assert (await cli("check-config", str(config))).returncode == 2  # refused there still
    async with running_bridge(tmp_path, mosquitto):  # its simulator's pty at tmp_path/terminal
        status = await cli("status", "--config", config, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["daemon"] == "running"
        assert_warned("status", config, status.stderr)

        listed = await cli("register", "--config", config, "terminals")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)[0]["poi_id"] == POI
        assert_warned("register", config, listed.stderr)

        # resync reaches the daemon (which answers that it holds no such transaction)
        resync = await cli("resync", "TILL1", "nope", "--config", config, "--wait", "5")
        assert resync.returncode == 2 and b"no transaction TILL1/nope" in resync.stderr, \
            resync.stderr
        assert_warned("resync", config, resync.stderr)

        devices = await cli("devices", "--config", config, "--json")
        assert devices.returncode == 0, devices.stderr
        [terminal] = json.loads(devices.stdout)["terminals"]
        assert terminal["poi_id"] == POI and terminal["present"] is True, terminal
        assert_warned("devices", config, devices.stderr)


async def test_udev_rules_takes_a_configuration_run_takes(tmp_path, mosquitto):
    config = below_floors(tmp_path, mosquitto, "/dev/poi/verifone-324688179")
    rules = await cli("udev-rules", "--config", config)
    assert rules.returncode == 0, rules.stderr
    assert b'SYMLINK+="poi/verifone-324688179"' in rules.stdout, rules.stdout
    assert_warned("udev-rules", config, rules.stderr)

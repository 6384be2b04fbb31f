"""A technician's command whose standard output is closed early (`poi-bridge devices --all |
head`) ends quietly with status 141, as `ls | head` does: no BrokenPipeError traceback."""

from __future__ import annotations

import asyncio
import fcntl
import subprocess
import sys

import pytest

from bridge.register_client import RegisterClient

from .rig import POI, ROOT, python_env
from .test_cli_tools import BASE, config_file, running_bridge

F_SETPIPE_SZ = 1031  # Linux: a pipe this small fills after a few KiB of output


def closed_early(*args: str, read: int = 0, buffered: bool = False) -> tuple[int, str]:
    """Run `poi-bridge ARGS` with standard output a pipe that is closed after `read` bytes
    (at once with 0: before the command has printed anything). Returns (exit status,
    stderr)."""
    env = python_env()
    if buffered:  # as from a shell: block-buffered, written when the buffer fills or at exit
        del env["PYTHONUNBUFFERED"]
    with subprocess.Popen([sys.executable, "-m", "bridge", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, cwd=ROOT) as process:
        fcntl.fcntl(process.stdout.fileno(), F_SETPIPE_SZ, 4096)
        if read:
            assert len(process.stdout.read(read)) == read
        process.stdout.close()
        stderr = process.stderr.read().decode()
        return process.wait(timeout=60), stderr


def many_terminals(tmp_path) -> str:
    """A configuration whose udev rules are far more than a pipe holds."""
    lines = [f'journal = "{tmp_path / "journal.sqlite3"}"']
    for n in range(100):
        lines += ["[[terminals]]", f'poi_id = "V400m-{324688100 + n}"', "[terminals.link]",
                  'kind = "serial"', f'device = "/dev/poi/verifone-{324688100 + n}"']
    path = tmp_path / "many.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_output_cut_after_a_few_bytes_ends_quietly(tmp_path):
    # Buffered, as from a shell (unbuffered, Python drops the rest of a partial write of
    # one large string silently: nothing would be tested).
    status, stderr = closed_early("udev-rules", "--config", many_terminals(tmp_path),
                                  read=400, buffered=True)
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert status == 141


@pytest.mark.parametrize("args", [
    ("devices", "--json"), ("devices", "--all"),
    ("inspect", "tests/fixtures/adyen/dotnet-pospayment-cancelled.json"),
    ("inspect", "--json", "tests/fixtures/adyen/dotnet-pospayment-cancelled.json"),
])
@pytest.mark.parametrize("buffered", [False, True])
def test_output_closed_before_anything_is_printed_ends_quietly(args, buffered):
    status, stderr = closed_early(*args, buffered=buffered)
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert status == 141


async def test_the_commands_that_ask_the_daemon_end_quietly_too(tmp_path, mosquitto):
    """status, resync and register print the daemon's answers: a closed pipe there is not
    "cannot connect to the broker" (BrokenPipeError is an OSError)."""
    async with running_bridge(tmp_path, mosquitto):
        async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                                  base_topic=BASE) as till:
            paid = await till.pay(POI, 5.0, service_id="P1", timeout=30)
        assert paid["bridge"]["outcome"] == "approved"
        config = str(config_file(tmp_path, mosquitto, {}))
        for args in (("status", "--config", config), ("status", "--config", config, "--json"),
                     ("register", "--config", config, "terminals"),
                     ("register", "--config", config, "--sale-id", "TILL1", "transactions"),
                     ("resync", "TILL1", "P1", "--config", config)):
            status, stderr = await asyncio.to_thread(closed_early, *args)
            assert "Traceback" not in stderr and "cannot connect" not in stderr, (args, stderr)
            assert status == 141, (args, stderr)

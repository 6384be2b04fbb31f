"""A journal whose disk takes seconds to fsync (an SD card wearing out) held up the whole
daemon without a word in the log: payments slowed, terminals sent their answers again, and
a technician had nothing to look at. A slow commit is now said once, naming the journal and
the disk to check; the others are counted. Over a real slow fsync (bench/slow_fsync.c, an
LD_PRELOAD shim) in a real process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WRITES = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from bridge.daemon.journal import Journal
journal = Journal(sys.argv[1])
for n in range(3):
    journal.enqueue([("poi/registers/POS1/events", b"{}", 1, False)])
journal.close()
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the slow-disk shim")
    built = tmp_path_factory.mktemp("shim") / "slow_fsync.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(built),
                    str(ROOT / "bench" / "slow_fsync.c"), "-ldl"], check=True)
    return built


def _log_of_writes(tmp_path: Path, shim: Path, fsync_ms: int) -> str:
    env = {**os.environ, "LD_PRELOAD": str(shim), "SLOW_FSYNC_MS": str(fsync_ms),
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", WRITES, str(tmp_path / "journal.sqlite3")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_slow_commit_is_said_once_then_counted(tmp_path, shim):
    said = _log_of_writes(tmp_path, shim, 1100)
    full = [line for line in said.splitlines() if "a commit took" in line]
    assert len(full) == 1, said
    assert full[0].startswith("WARNING journal ") and "journal.sqlite3" in full[0], full
    assert "SD card" in full[0] and "dmesg" in full[0], full
    # The later ones (at least the two writes after the first slow one), summed up at close
    summed = [line for line in said.splitlines() if "more commits of 1 s or more" in line]
    assert len(summed) == 1, said
    assert int(summed[0].split(": ", 1)[1].split()[0]) >= 2, summed


def test_a_disk_of_ordinary_speed_says_nothing(tmp_path, shim):
    said = _log_of_writes(tmp_path, shim, 0)
    assert "commit took" not in said and "more commit" not in said, said

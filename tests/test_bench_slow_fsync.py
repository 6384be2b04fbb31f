"""bench/slow_fsync.c, the slow disk of the benchmark's what-ifs: it slows the journal's
fsyncs, and only those."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMED = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
os.write(fd, b"x")
started = time.perf_counter()
os.fsync(fd)
print(time.perf_counter() - started)
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the shim")
def test_the_shim_slows_the_journals_fsync_and_nothing_else(tmp_path):
    shim = tmp_path / "slow_fsync.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim),
                    str(ROOT / "bench" / "slow_fsync.c"), "-ldl"], check=True)
    env = {**os.environ, "LD_PRELOAD": str(shim), "SLOW_FSYNC_MS": "200"}

    def fsync_seconds(name: str) -> float:
        out = subprocess.run([sys.executable, "-c", TIMED, str(tmp_path / name)], env=env,
                             check=True, capture_output=True, text=True).stdout
        return float(out)

    assert fsync_seconds("journal.sqlite3-wal") >= 0.2
    assert fsync_seconds("mosquitto.db") < 0.2

"""`make fuzz` (bench/fuzz.sh, tests/fuzzing.py) fuzzes every hypothesis test it names, and
says "no failure found" only when each of them ran and passed.

It used to run each whole-file target with max_examples=10**9 under `timeout`: the file's first
test took all the time, the others never ran, and a timeout, a collection error or "no tests
ran" all read as "no failure found" (exit 0)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "bench" / "fuzz.sh"

pytestmark = pytest.mark.slow


def _fuzz(tmp_path: Path, *targets: str, seconds: float = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, PY=sys.executable)
    env.pop("POI_BRIDGE_FUZZ", None)
    return subprocess.run(["bash", str(FUZZ), str(seconds), *targets], check=False,
                          cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_every_hypothesis_test_of_a_file_runs_for_its_own_time(tmp_path):
    ran = tmp_path / "ran"
    ran.mkdir()
    target = _write(tmp_path / "test_passing.py", f"""
        import pytest
        from pathlib import Path
        from hypothesis import given, strategies as st
        from tests.fuzzing import fuzz_settings

        RAN = Path({str(ran)!r})

        @fuzz_settings(20)
        @given(st.integers())
        def test_first(x):
            (RAN / "first").touch()

        @pytest.mark.parametrize("n", [1, 2])
        @fuzz_settings(20)
        @given(st.binary())
        def test_second(n, data):
            (RAN / f"second-{{n}}").touch()

        @fuzz_settings(20)
        @given(st.text())
        def test_third(s):
            (RAN / "third").touch()

        def test_not_hypothesis():
            (RAN / "plain").touch()
    """)
    result = _fuzz(tmp_path, str(target))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # each hypothesis test ran (the first one did not take all the time), the plain one is
    # not a fuzz target
    assert sorted(p.name for p in ran.iterdir()) == ["first", "second-1", "second-2", "third"]
    summary = out[out.index("== fuzz summary"):]
    for name in ("test_first", "test_second[1]", "test_second[2]", "test_third"):
        line = next(line for line in summary.splitlines() if line.endswith("::" + name))
        status, examples, seconds = line.split()[:3]
        assert status == "ok" and int(examples) >= 20, line
        assert float(seconds.rstrip("s")) >= 1, line  # its own time, spent in full
    assert "all 4 hypothesis tests ran and passed" in summary


def test_a_failure_found_makes_the_run_fail_loudly(tmp_path):
    target = _write(tmp_path / "test_failing.py", """
        from hypothesis import given, strategies as st
        from tests.fuzzing import fuzz_settings

        @fuzz_settings(50)
        @given(st.integers(0, 1000))
        def test_passes(x):
            pass

        @fuzz_settings(50)
        @given(st.integers(0, 1000))
        def test_crc_init_changed(x):
            assert x < 900
    """)
    result = _fuzz(tmp_path, str(target))
    out = result.stdout
    assert result.returncode != 0, out
    assert "x=900" in out and "@reproduce_failure" in out  # hypothesis' report, shrunk
    assert "FUZZING FAILED" in out
    assert any(line.split()[:1] == ["FAILED"] and line.endswith("::test_crc_init_changed")
               for line in out.splitlines()), out
    assert any(line.split()[:1] == ["ok"] and line.endswith("::test_passes")
               for line in out.splitlines()), out
    assert "no failure found" not in out


def test_a_collection_error_or_nothing_to_fuzz_fails_the_run(tmp_path):
    broken = _write(tmp_path / "test_broken.py", """
        from bridge.protocol.framing.dle_crc16 import no_such_name
    """)
    plain = _write(tmp_path / "test_plain.py", """
        def test_not_hypothesis():
            pass
    """)
    for target, why in ((str(broken), "pytest exit 2"),
                        (str(plain), "names no hypothesis test"),
                        (f"{plain}::test_missing", "pytest exit 4")):
        result = _fuzz(tmp_path, target)
        out = result.stdout
        assert result.returncode != 0, (target, out)
        assert "FUZZING FAILED" in out and why in out, (target, out)
        assert "no failure found" not in out

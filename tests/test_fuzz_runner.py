"""`make fuzz` (`python -m tests.fuzzing SECONDS`, tests/fuzzing.py) fuzzes every hypothesis
test it names, and says "no failure found" only when each of them ran and passed.

It used to run each whole-file target with max_examples=10**9 under `timeout`: the file's first
test took all the time, the others never ran, and a timeout, a collection error or "no tests
ran" all read as "no failure found" (exit 0)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis._settings import _CI_VARS

from tests import fuzzing

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _environment(**extra: str) -> dict[str, str]:
    """This environment, without the runner's variables or any that make hypothesis load
    its "ci" profile (this suite may run under CI)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _CI_VARS and not k.startswith("POI_BRIDGE_FUZZ")}
    return dict(env, PYTHONPATH=str(ROOT), **extra)


def _fuzz(tmp_path: Path, *targets: str, seconds: float = 1,
          **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.fuzzing", str(seconds), *targets],
                          check=False, cwd=tmp_path, env=_environment(**env),
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
        from tests.fuzzing import fuzz_settings, tally

        RAN = Path({str(ran)!r})

        @fuzz_settings(20)
        @given(st.integers())
        def test_first(x):
            (RAN / "first").touch()
            tally("even" if x % 2 == 0 else "odd")

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
    # what test_first's examples reached, under its line, in all and in its time's second half
    lines = summary.splitlines()
    first = next(i for i, line in enumerate(lines) if line.endswith("::test_first"))
    examples = int(lines[first].split()[1])
    reached = {what: (int(count), int(late)) for what, count, late in re.findall(
        r"(even|odd) (\d+) \((\d+) in the second half\)", lines[first + 1])}
    assert set(reached) == {"even", "odd"}, lines[first + 1]
    assert sum(count for count, _ in reached.values()) == examples
    assert 0 < sum(late for _, late in reached.values()) < examples


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


def test_a_failure_found_is_kept_and_replayed_even_under_ci(tmp_path):
    """hypothesis loads its "ci" profile wherever a CI variable is set, and that profile has no
    database: a failure `make fuzz` found there was kept nowhere, though the README said it was
    kept in .hypothesis/ and replayed first. The runner names the database itself."""
    target = _write(tmp_path / "test_kept.py", """
        import os
        from hypothesis import Phase, given, settings, strategies as st
        from tests.fuzzing import fuzz_settings

        # REPLAY_ONLY: run nothing but the examples the database holds
        @settings(fuzz_settings(50),
                  **({"phases": [Phase.reuse]} if os.environ.get("REPLAY_ONLY") else {}))
        @given(st.integers(0, 1000))
        def test_crc_init_changed(x):
            assert x < 900
    """)
    found = _fuzz(tmp_path, str(target), CI="true")
    assert found.returncode != 0 and "x=900" in found.stdout, found.stdout
    kept = [p for p in (tmp_path / ".hypothesis" / "examples").rglob("*") if p.is_file()]
    assert kept, "the failure was not saved"
    # `make test` in the same directory (no CI: its profile has the default database) replays
    # it without generating anything
    replay = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(target)], check=False, cwd=tmp_path,
                            env=_environment(REPLAY_ONLY="1"),
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 1 and "x=900" in replay.stdout, replay.stdout


def test_make_fuzz_runs_every_fuzz_target():
    """`make fuzz` runs the runner on its TARGETS: each exists, and every test file written as a
    fuzz target (tests/test_*fuzz*.py with a hypothesis test) is one of them."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\nfuzz:"):].split("\n\n")[0]
    assert "-m tests.fuzzing $(FUZZ_SECONDS)" in recipe, recipe
    files = {target.split("::")[0] for target in fuzzing.TARGETS}
    assert all((ROOT / f).is_file() for f in files), files
    written_as_targets = set()
    for path in sorted((ROOT / "tests").glob("test_*fuzz*.py")):
        text = path.read_text()
        if "@given" in text and path.name != "test_fuzz_runner.py":
            written_as_targets.add(f"tests/{path.name}")
    assert written_as_targets <= files, written_as_targets - files

"""How hard the hypothesis targets push, and the `make fuzz` runner.

In `make test` each target runs the modest number of examples its `@fuzz_settings(n)` names.
`make fuzz` runs `python -m tests.fuzzing SECONDS [TARGET...]` (TARGETS below when none are
named): every hypothesis test the targets name gets SECONDS of its own. A whole file is one
target, and each of its hypothesis tests (each parametrization too) gets its own SECONDS, one
after the other.

How a test spends its time: under POI_BRIDGE_FUZZ=1 this module is also loaded as a pytest
plugin (`-p tests.fuzzing`), which runs the test in rounds of its `n` examples, each round a
complete hypothesis run with a fresh seed, until the test's time is spent. A failure ends the
rounds with hypothesis' usual report (shrunk falsifying example, reproduce blob, saved in
.hypothesis/examples under the directory it runs in, so the next `make test` there replays it
first). The runner names that database itself: hypothesis' own "ci" profile, loaded wherever
a CI variable is set, has none. Nothing stops a test in the middle of a round, so nothing can
cut a failure short and be read as "no failure found".

What the examples reached: a target calls `tally("parsed")` and the like, and the summary
shows each test's counts, and how many came in the second half of its time (a corpus that
never reaches the code it is for, or stops reaching it late in a run, shows there).

The runner exits 0 only if every hypothesis test of every target ran at least one example and
passed. A failure, a collection error, a target that names no hypothesis test, a test that did
not run, a run that had to be stopped: each is named in the summary, and the exit is 1.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, is_hypothesis_test, settings
from hypothesis.configuration import storage_directory
from hypothesis.database import DirectoryBasedExampleDatabase

FUZZING = os.environ.get("POI_BRIDGE_FUZZ") == "1"
SECONDS_ENV = "POI_BRIDGE_FUZZ_SECONDS"  # each test's time, set by the runner
REPORT_ENV = "POI_BRIDGE_FUZZ_REPORT"  # where the plugin writes what it collected and ran

STARTUP_GRACE = 120.0  # seconds for a target's pytest to start and collect on a busy machine
TEST_GRACE = 120.0  # beyond its time, for a test's last round and the shrinking of a failure

ROOT = Path(__file__).resolve().parents[1]
# What `make fuzz` fuzzes: the three framer decoders, the message parser and its JSON reader
# (and the nesting guard), the decryptor, the MQTT request handler, the session's invariants.
TARGETS = (
    "tests/test_framing_properties.py",
    "tests/test_framer_fuzz.py",
    "tests/test_messages.py::test_parser_never_raises_anything_but_message_error",
    "tests/test_messages.py::test_arbitrary_envelopes_parse_or_fail_cleanly_and_classify_without_raising",
    "tests/test_messages.py::test_the_nesting_guard_agrees_with_the_true_depth",
    "tests/test_parser_fuzz.py",
    "tests/test_json_reader.py",
    "tests/test_json_reader_fuzz.py",
    "tests/test_crypto.py::test_decrypt_raises_only_crypto_errors_on_junk",
    "tests/test_intake_fuzz.py",
    "tests/test_session_fuzz.py",
)


def fuzz_settings(examples: int) -> settings:
    """`examples` per run; under `make fuzz`, rounds of `examples` until the test's time is
    spent, each round with a fresh seed (even where a CI profile derandomizes)."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large],
        print_blob=True,  # a failure prints the blob to paste into @reproduce_failure
        # Under the runner, the database hypothesis uses by default (.hypothesis/examples)
        # whatever the profile (its "ci" one has none): a failure found is kept there, and
        # replayed first by the next run in this directory, fuzzing or `make test`.
        **({"derandomize": False, "database": DirectoryBasedExampleDatabase(
            storage_directory("examples", intent_to_write=False).path)} if FUZZING else {}),
    )


# --- what the examples reached -----------------------------------------------------------

_counts: collections.Counter[str] = collections.Counter()
_late_counts: collections.Counter[str] = collections.Counter()
_late_from: float | None = None  # (monotonic) when the second half of a test's time begins


def tally(what: str) -> None:
    """Count an example as having reached `what` ("parsed", "refused", "reached the
    session"...): `make fuzz`'s summary shows each test's counts, and those of its second
    half, and a test can check its target's with `tallied()`."""
    _counts[what] += 1
    if _late_from is not None and time.monotonic() >= _late_from:
        _late_counts[what] += 1


@contextlib.contextmanager
def tallied() -> Iterator[collections.Counter[str]]:
    """The tallies of what runs inside the block (and only those)."""
    global _counts
    outer, _counts = _counts, collections.Counter()
    try:
        yield _counts
    finally:
        outer.update(_counts)
        _counts = outer


# --- the pytest plugin (loaded with `-p tests.fuzzing` by the runner) ----------------------


def _write(record: dict) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


def _fuzzed(item) -> bool:
    return callable(getattr(item, "obj", None)) and is_hypothesis_test(item.obj)


def pytest_collection_modifyitems(config, items) -> None:
    """Under the runner, only the hypothesis tests of a target run; the runner learns which."""
    if not (FUZZING and os.environ.get(SECONDS_ENV)):
        return
    kept = [item for item in items if _fuzzed(item)]
    dropped = [item for item in items if not _fuzzed(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    for item in kept:
        _write({"collected": item.nodeid})


def pytest_pyfunc_call(pyfuncitem):
    """Run a hypothesis test in rounds until its time is spent, counting the examples."""
    budget = os.environ.get(SECONDS_ENV)
    if not (FUZZING and budget and _fuzzed(pyfuncitem)):
        return None
    handle = pyfuncitem.obj.hypothesis
    inner = handle.inner_test
    examples = rounds = 0

    @functools.wraps(inner)  # keeps the name, source and digest hypothesis keys its database by
    def counted(*args, **kwargs):
        __tracebackhide__ = True
        nonlocal examples
        examples += 1
        return inner(*args, **kwargs)

    funcargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    outcome = "failed"
    start = time.monotonic()
    global _late_from
    _counts.clear()
    _late_counts.clear()
    _late_from = start + float(budget) / 2
    handle.inner_test = counted
    try:
        while True:
            pyfuncitem.obj(**funcargs)
            rounds += 1
            if time.monotonic() - start >= float(budget):
                break
        outcome = "passed"
    finally:
        handle.inner_test = inner
        _late_from = None
        _write({"nodeid": pyfuncitem.nodeid, "outcome": outcome, "examples": examples,
                "rounds": rounds, "seconds": round(time.monotonic() - start, 2),
                "tallies": {what: [count, _late_counts[what]]
                            for what, count in sorted(_counts.items())}})
    return True


# --- the runner ----------------------------------------------------------------------------


def _read(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT first, so pytest prints what it has; then kill."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_target(target: str, seconds: float, python: str = sys.executable) -> dict:
    """Fuzz one target (a file, a node id, maybe with pytest options); each of its hypothesis
    tests gets `seconds`. Returns the pytest exit code, what was collected, what ran, and
    whether the run had to be stopped."""
    with tempfile.TemporaryDirectory(prefix="poi-fuzz-") as tmp:
        report = Path(tmp) / "report.jsonl"
        path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
        env = dict(os.environ, POI_BRIDGE_FUZZ="1", PYTHONPATH=path,  # (the plugin)
                   **{SECONDS_ENV: str(seconds), REPORT_ENV: str(report)})
        command = [python, "-m", "pytest", "-q", "-rfE", "-p", "tests.fuzzing",
                   *shlex.split(target)]
        print(f"== fuzzing {target}: {seconds:g} s for each hypothesis test", flush=True)
        start = time.monotonic()
        proc = subprocess.Popen(command, env=env)
        stopped = False
        try:
            while proc.poll() is None:
                collected = sum("collected" in r for r in _read(report))
                if time.monotonic() - start > STARTUP_GRACE + collected * (seconds + TEST_GRACE):
                    stopped = True
                    _stop(proc)
                    break
                time.sleep(0.5)
        except BaseException:
            _stop(proc)
            raise
        records = _read(report)
    return {"target": target, "rc": proc.returncode, "stopped": stopped,
            "collected": [r["collected"] for r in records if "collected" in r],
            "ran": {r["nodeid"]: r for r in records if "nodeid" in r}}


_RC = {1: "tests failed", 2: "interrupted or collection error", 3: "pytest internal error",
       4: "usage error (a target that does not exist?)", 5: "no tests ran"}


def summarize(results: list[dict]) -> tuple[list[str], list[str]]:
    """The summary lines, one per test, and the problems (empty if every test ran and passed)."""
    lines: list[str] = []
    problems: list[str] = []
    for result in results:
        target, rc = result["target"], result["rc"]
        if result["stopped"]:
            problems.append(f"{target}: stopped, still running after its time and "
                            f"{TEST_GRACE:g} s of grace per test (a hang, or a failure still "
                            "shrinking: hypothesis saved it in .hypothesis/)")
        if not result["collected"]:
            why = ("it names no hypothesis test" if rc in (0, 5)
                   else f"pytest exit {rc}: {_RC.get(rc, 'crashed')}")
            problems.append(f"{target}: nothing fuzzed ({why}); see the output above")
            lines.append(f"  {'NOT RUN':<8} {'':>10} {'':>10}  {target}")
            continue
        for nodeid in result["collected"]:
            ran = result["ran"].get(nodeid)
            if ran is None:
                status, detail = "NOT RUN", f"{'-':>10} {'-':>10}"
                problems.append(f"{nodeid}: did not run (pytest exit {rc})")
            else:
                ok = ran["outcome"] == "passed" and ran["examples"] > 0
                status = "ok" if ok else ("FAILED" if ran["outcome"] != "passed" else "NO EXAMPLES")
                detail = f"{ran['examples']:>10} {ran['seconds']:>9.1f}s"
                if not ok:
                    problems.append(f"{nodeid}: {status.lower()} after {ran['examples']} "
                                    f"examples in {ran['seconds']:.1f} s"
                                    + (" (its falsifying example is above)"
                                       if status == "FAILED" else ""))
            lines.append(f"  {status:<8} {detail}  {nodeid}")
            if ran and ran.get("tallies"):
                lines.append(f"  {'':<8} {'':>10} {'':>10}    reached: " + ", ".join(
                    f"{what} {count} ({late} in the second half)"
                    for what, (count, late) in ran["tallies"].items()))
        if rc != 0 and not result["stopped"] and all(
                result["ran"].get(n, {}).get("outcome") == "passed" for n in result["collected"]):
            problems.append(f"{target}: pytest exit {rc} ({_RC.get(rc, 'crashed')}) although "
                            "every test passed; see the output above")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m tests.fuzzing SECONDS [TARGET...]  (default: every target "
              "of tests/fuzzing.py's TARGETS)", file=sys.stderr)
        return 2
    seconds = float(args[0])
    targets = args[1:] or [str(ROOT / target) for target in TARGETS]
    results = []
    try:
        for target in targets:
            results.append(run_target(target, seconds))
    except KeyboardInterrupt:
        print("\n!! interrupted", flush=True)
        interrupted = True
    else:
        interrupted = False
    lines, problems = summarize(results)
    if interrupted:
        problems.append(f"interrupted: {len(targets) - len(results)} of {len(targets)} "
                        "targets not fuzzed")
    tested = sum(len(r["collected"]) for r in results)
    print(f"\n== fuzz summary: {tested} hypothesis tests in {len(results)} targets, "
          f"{seconds:g} s each")
    print(f"  {'status':<8} {'examples':>10} {'time':>10}  test")
    print("\n".join(lines))
    if problems:
        print(f"\n!! FUZZING FAILED: {len(problems)} problem(s) (only a test that ran and "
              "passed is a pass):")
        for problem in problems:
            print(f"!!   {problem}")
        return 1
    print(f"\n   no failure found: all {tested} hypothesis tests ran and passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/stages.py: the stage breakdown of one payment's time.

The tool wraps the daemon's own functions to take its time stamps; if one of them is renamed
or stops being on the path, a stage loses its stamps. The run below fails then, instead of
the tool quietly printing a shorter table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.stages import STAGES, breakdown
from tests.broker import find_mosquitto

ROOT = Path(__file__).resolve().parents[1]


def test_the_stages_follow_each_other_and_add_up_to_the_end_to_end_time():
    t = 100.0
    stamps = [
        ("request taken", "S1", t + 0.002), ("request handled", "S1", t + 0.003),
        ("frame released", "S1", t + 0.004), ("device write", None, t + 0.0045),
        ("device write", None, t + 0.7),  # the ACK of the answer, later: not this stage
        ("answer complete", "S1", t + 0.600), ("answer handled", "S1", t + 0.602),
        ("result published", "S1", t + 0.6035),
        ("request taken", "S2", t + 5.0),  # another payment's stamps are not taken
    ]
    result = breakdown([("S1", t, t + 0.605)], stamps, floor_ms=590.0)
    stages = {name: result[name]["p50_ms"] for name, _, _ in STAGES}
    assert stages == pytest.approx({
        "register -> bridge (MQTT)": 2.0,
        "request checked, session step, journal writes": 1.0,
        "commit (fsync) -> frame released": 1.0,
        "frame -> device": 0.5,
        "terminal: request in, answer's last byte out": 595.5,
        "answer handled (parse, session, journal writes)": 2.0,
        "commit (fsync) -> result handed to paho": 1.5,
        "paho -> broker -> register": 1.5,
    })
    assert sum(stages.values()) == pytest.approx(result["end to end"]["p50_ms"])
    assert result["terminal beyond the floor"]["p50_ms"] == pytest.approx(5.5)
    assert result["added (end to end - floor)"]["p50_ms"] == pytest.approx(15.0)


def test_a_payment_missing_a_stamp_is_left_out():
    stamps = [("request taken", "S1", 1.0), ("request handled", "S1", 1.1)]
    assert breakdown([("S1", 0.9, 2.0)], stamps, floor_ms=0.0)["end to end"]["n"] == 0


@pytest.mark.slow
def test_every_stage_is_stamped_in_a_real_run(tmp_path):
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    out = tmp_path / "stages.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.stages", "--payments", "3", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["responses"]) == {"small", "fixture"}
    for name, data in result["responses"].items():
        for stage, summary in data["stages"].items():
            assert summary["n"] == 3, f"{name}: stage {stage!r} lost its stamps"
        assert data["stages"]["end to end"]["p50_ms"] > data["floor_ms"]
    assert "answer handled" in proc.stdout

"""The benchmark's verdicts: one target judged over several rounds of section 1."""

from __future__ import annotations

import pytest

from bench.run import render, targets, targets_over_rounds


def _row(n: int, response: str, added_p99: float, ratio_p99: float = 1.1,
         cpu_pct: float = 40.0) -> dict:
    wire = 603.3 if response == "fixture" else 207.6
    return {
        "terminals": n, "response": response,
        "wire": {"wire_ms": wire, "floor_ms": wire - 14.0, "request_frame_bytes": 648,
                 "response_frame_bytes": 6300},
        "bridge": {"added_p99_ms": added_p99, "added_p99_pct_of_wire": added_p99 / wire * 100,
                   "payments_per_s": 100.0,
                   "daemon": {"cpu_ms_per_payment": 4.0, "cpu_pct_core": cpu_pct,
                              "peak_rss_kb": 50_000}},
        "baseline": {"added_p99_ms": 5.0, "process": {"cpu_ms_per_payment": 2.0}},
        "bridge_minus_baseline_p99_ms": added_p99 - 5.0,
        "ratio_p50": 1.02, "ratio_p99": ratio_p99,
    }


def _round(added_32_small: float, ratio_64: float) -> list[dict]:
    return [_row(32, "small", added_32_small), _row(32, "fixture", 20.0),
            _row(64, "small", 80.0, ratio_p99=ratio_64, cpu_pct=90.0),
            _row(64, "fixture", 30.0)]


def _by_name(merged: list[dict], start: str) -> dict:
    (found,) = [t for t in merged if t["target"].startswith(start)]
    return found


def test_each_target_gets_its_range_and_the_rounds_it_passed():
    results = {"latency_rounds": [_round(4.0, 1.4), _round(30.0, 1.6), _round(4.5, 1.3)]}
    results["latency"] = results["latency_rounds"][0]
    merged = targets_over_rounds(results)
    assert len(merged) == len(targets(results))
    p99 = _by_name(merged, "bridge-added p99 at 32 terminals (small")
    assert (p99["min"], p99["max"], p99["passed"], p99["rounds"]) == (4.0, 30.0, 2, 3)
    assert p99["verdict"] == "MIXED"
    ratio = _by_name(merged, "end-to-end p99 bridge/baseline, small, 64")
    assert (ratio["min"], ratio["max"], ratio["verdict"]) == (1.3, 1.6, "MIXED")
    fixture = _by_name(merged, "bridge-added p99 at 32 terminals (fixture")
    assert fixture["verdict"] == "FAIL" and fixture["passed"] == 0
    ratio_50 = _by_name(merged, "end-to-end p50 bridge/baseline, small, 32")
    assert ratio_50["verdict"] == "PASS" and ratio_50["passed"] == 3
    text = render({"machine": {"date": "d", "cpu": "c", "cores": 2, "implementation": "CPython",
                               "python": "3.11", "mosquitto": "m", "kernel": "k",
                               "loadavg_at_start": [0]},
                   "mode": "full", "targets_over_rounds": merged})
    assert "Targets over 3 rounds" in text and "MIXED" in text and "2/3" in text


def test_one_round_has_no_summary_and_rounds_must_judge_the_same_targets():
    assert targets_over_rounds({"latency": _round(4.0, 1.4)}) == []
    assert targets_over_rounds({"latency_rounds": [_round(4.0, 1.4)]}) == []
    uneven = {"latency_rounds": [_round(4.0, 1.4), _round(4.0, 1.4)[:2]]}
    with pytest.raises(ValueError):
        targets_over_rounds(uneven)

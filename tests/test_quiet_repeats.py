"""QuietRepeats on a clock the test moves (no event loop: summaries come at the next tell or
at flush). The log lines built on it say how long their count covers; at a stop that is the
part of the interval gone by, not the whole interval (review: "line noise ... in the last
10 minutes" for 40 s of it, sending a technician through ten minutes of logs)."""

from __future__ import annotations

from bridge.daemon.quiet import QuietRepeats, window


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _quiet(interval: float) -> tuple[QuietRepeats, Clock, list[tuple]]:
    clock, said = Clock(), []
    repeats = QuietRepeats(interval, lambda *summary: said.append(summary), clock=clock)
    return repeats, clock, said


def test_a_full_interval_is_summed_up_with_the_interval():
    repeats, clock, said = _quiet(600.0)
    assert repeats.tell("noise", "a") is True
    clock.now += 10
    assert repeats.tell("noise", "b") is False
    clock.now += 600  # the interval is over: summed at the next tell
    assert repeats.tell("noise", "c") is False
    assert said == [("noise", 1, "b", 600.0)]
    assert window(said[0][3]) == "10 minutes"


def test_a_stop_within_the_interval_gives_the_time_gone_by_in_whole_seconds():
    repeats, clock, said = _quiet(600.0)
    repeats.tell("noise")
    clock.now += 5
    repeats.tell("noise", "x")
    clock.now += 36.2  # stopped 41.2 s after the first
    repeats.flush()
    assert said == [("noise", 1, "x", 42.0)]
    assert window(said[0][3]) == "42 s"


def test_a_stop_in_a_later_interval_counts_from_that_intervals_start():
    repeats, clock, said = _quiet(60.0)
    repeats.tell("k")
    clock.now += 30
    repeats.tell("k", 1)
    clock.now += 40  # 70 s: the first interval is summed, the second began at 60 s
    repeats.tell("k", 2)
    clock.now += 55  # 125 s: the second is summed, a third began at 120 s
    repeats.tell("k", 3)
    clock.now += 7.5  # stopped at 132.5 s: 12.5 s into the third
    repeats.flush()
    assert said == [("k", 1, 1, 60.0), ("k", 1, 2, 60.0), ("k", 1, 3, 13.0)]


def test_a_stop_within_a_second_keeps_the_fraction():
    repeats, clock, said = _quiet(1.0)
    repeats.tell("k")
    clock.now += 0.25
    repeats.tell("k")
    repeats.flush()
    assert said == [("k", 1, None, 0.25)] and window(0.25) == "0.25 s"


def test_nothing_counted_nothing_said_at_a_stop():
    repeats, clock, said = _quiet(600.0)
    repeats.tell("k")
    clock.now += 3
    repeats.flush()
    assert said == []


def test_windows_read_as_a_technician_says_them():
    assert window(60.0) == "1 minute"
    assert window(600.0) == "10 minutes"
    assert window(125.0) == "2 min 5 s"
    assert window(45.0) == "45 s"

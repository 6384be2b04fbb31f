"""Log lines that repeat, kept few: the first of a kind in full, then at most one summary line
per interval for as long as they go on.

A register looping on a bad request wrote one warning per refusal, ~585 a minute, burying
everything else in the journal; a terminal resending an oversize frame, one per copy. Each
event still happens (the register still gets its refusal): only the log is made quiet.

Repeats are grouped by a key the caller chooses (who sent it, and what kind of event it is).
A group lives while its events keep coming: the first is logged in full by the caller; those
within `interval` after it are counted, and when the interval is over the count is logged as
one summary (if any came), and the next interval starts. An interval with none ends the group,
so the next one is logged in full again. The groups are bounded (`max_groups`): past that,
new keys share a group per kind of event (`kind_of`), whose first is still logged in full
and whose summary is about all of them: the keys are the sender's choice, and a register
making up a SaleID per request must not grow memory, yet another register's refusal of
another kind must still leave a line naming it. Past `max_groups` kinds too, one group,
OTHERS, holds the rest. A clean stop reports the counts still held (`flush`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

# s: a sender refused again and again for the same reason (a register looping on a bad
# request) gets its first refusal logged in full, then one line per this long counting the
# others (each is still answered): the intake's and the MQTT side's
REFUSALS_QUIET = 60.0
# s: a terminal whose connection flaps (a loose cable: lost, back, lost...) gets its first
# loss logged in full, then one line per this long counting the others: the worker's link
# losses, the hotplug monitor's unplugs
LINK_LOSSES_QUIET = 600.0
OTHERS = ("(others)",)  # the group of keys met once max_groups were held (+ their kind)

# (key, how many more, the caller's note of the last one, the time they came in: the interval,
# or at a stop the part of it gone by) -> logs the summary
Summary = Callable[[Hashable, int, Any, float], None]


@dataclass(slots=True)
class _Group:
    until: float  # (clock) when this group's interval ends
    count: int = 0  # events since the interval began, after the first one logged in full
    last: Any = None  # the caller's note of the last of them (its ServiceID, say)
    timer: asyncio.TimerHandle | None = None


class QuietRepeats:
    """`tell(key, note)` for each event: True when the caller logs it in full; False when it
    was counted, for the summary at the end of the interval (`summary`, called from a timer
    on the running event loop, or, without one, at the next tell). Without `summary`,
    repeats are only counted (the caller may log them at debug)."""

    def __init__(self, interval: float, summary: Summary | None = None, *,
                 max_groups: int = 64, clock: Callable[[], float] = time.monotonic,
                 kind_of: Callable[[Hashable], Hashable] | None = None) -> None:
        self.interval = interval
        self._summary = summary
        self._max_groups = max_groups
        self._clock = clock
        self._kind_of = kind_of
        self._groups: dict[Hashable, _Group] = {}

    def tell(self, key: Hashable, note: Any = None) -> bool:
        now = self._clock()
        if key not in self._groups:
            key = self._room_for(key)
        group = self._settle(key, now)
        if group is None:
            self._groups[key] = group = _Group(until=now + self.interval)
            self._arm(key, group, now)
            return True
        group.count += 1
        group.last = note
        return False

    def flush(self) -> None:
        """The bridge stops: each count still held is reported now (its interval would
        have ended after the process), and the timers are cancelled. The summary is given
        the time its count covers, so far, not the whole interval: "in the last 10 minutes"
        for repeats of the last 40 s would send a technician looking too far back."""
        now = self._clock()
        groups, self._groups = self._groups, {}
        for key, group in groups.items():
            if group.timer is not None:
                group.timer.cancel()
            if group.count and self._summary is not None:
                covered = now - (group.until - self.interval)
                if covered >= 1:  # (whole seconds past one: the log says "37 s")
                    covered = float(math.ceil(covered))
                self._summary(key, group.count, group.last, min(self.interval, covered))

    def _room_for(self, key: Hashable) -> Hashable:
        """The group a new `key` is counted in: its own while fewer than max_groups are
        held; else its kind's shared one (OTHERS + (kind,)), while fewer than max_groups
        kinds are; else OTHERS."""
        shared = sum(1 for held in self._groups if is_shared(held))
        if len(self._groups) - shared < self._max_groups:
            return key
        if self._kind_of is None:
            return OTHERS
        kind = (*OTHERS, self._kind_of(key))
        return kind if kind in self._groups or shared < self._max_groups else OTHERS

    def _settle(self, key: Hashable, now: float) -> _Group | None:
        """The group of `key` with the intervals over by `now` summed up; None if it ended."""
        group = self._groups.get(key)
        while group is not None and now >= group.until:
            if group.count == 0:
                del self._groups[key]
                if group.timer is not None:
                    group.timer.cancel()
                return None
            if self._summary is not None:
                self._summary(key, group.count, group.last, self.interval)
            group.count, group.last = 0, None
            group.until += self.interval
        return group

    def _arm(self, key: Hashable, group: _Group, now: float) -> None:
        """The summary is due at the end of the interval even if nothing else comes: a loop
        that stopped must still be told, with its count."""
        if self._summary is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # driven without a loop: summed up at the next tell
        group.timer = loop.call_later(max(0.0, group.until - now), self._due, key)

    def _due(self, key: Hashable) -> None:
        now = self._clock()
        group = self._settle(key, now)
        if group is not None:
            self._arm(key, group, now)


def window(interval: float) -> str:
    """An interval as a summary names it: "10 minutes", "45 s", "2 min 5 s"."""
    if interval >= 60 and interval % 60 == 0:
        minutes = interval / 60
        return f"{minutes:g} minute{'' if minutes == 1 else 's'}"
    if interval >= 60:
        return f"{int(interval // 60)} min {interval % 60:.0f} s"
    return f"{interval:g} s"


def is_shared(key: Hashable) -> bool:
    """Whether `key` is a group of keys met once max_groups were held: OTHERS, or OTHERS
    and a kind (its last item)."""
    return isinstance(key, tuple) and key[:1] == OTHERS

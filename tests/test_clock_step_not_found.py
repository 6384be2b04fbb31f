"""A clock step followed after a restart leaves alone the times of a payment of an earlier run.
Moved by the step, its sent_at looked later than that of a payment this run sent since, so a
NotFound about it was believed: `not_found`, "nothing was charged", for a payment the
terminal got and may have charged (the terminal remembers only its latest request).

The earlier run's stamps are told apart by where they came from (the journal at restore), not
by their values: a box that booted with its clock behind stamps this run's payments before
the earlier run's, and once the run has lasted long enough, the earlier run's stamps lie
within this run's span (a step 900 s after the start, 600 s behind: the diff review's case)."""

from __future__ import annotations

import itertools

import pytest

from bridge.protocol.actions import Record
from bridge.protocol.session import TerminalSession
from bridge.simulator import responses

from .test_session import POI, SETTINGS, Harness, request_of

BEHIND = 3600.0  # the box restarts with its clock an hour behind (no RTC); NTP sets it later


@pytest.mark.parametrize("behind,ran", [(0.0, 0.0), (BEHIND, 0.0), (600.0, 60.0),
                                        (600.0, 900.0)])
def test_a_restored_unresolved_payment_is_not_called_not_found_after_a_clock_step(behind, ran):
    h = Harness()
    h.submit("R1", "S1")
    for seconds in (120, 30, 1, 30):  # no answer, polls unanswered: unresolved
        h.advance(seconds)
    (record,) = [a.transaction for a in h.log if isinstance(a, Record)][-1:]
    assert record.state == "unresolved"
    # The daemon restarts (power cut) with the wall clock BEHIND s behind
    ids = itertools.count(1)
    fresh = Harness(link_up=False)
    fresh.session = TerminalSession(POI, SETTINGS, new_service_id=lambda: f"X{next(ids)}")
    fresh.now = fresh.started = h.now + 60 - behind
    # as worker.restore: the journal's last requests sent, with its open payments
    fresh.do(fresh.session.restore([record], fresh.now, dict(h.session.last_request_at)))
    fresh.plug_in()
    fresh.advance(30)  # the poll about S1 goes unanswered (the terminal is slow to boot)
    # The terminal is free (S1 unresolved): the next sale's payment S2 goes to it, approved
    fresh.submit("R1", "S2")
    fresh.answer(responses.payment_response(request_of(fresh, "R1", "S2"), "approve", fresh.now))
    fresh.now += ran  # the bridge runs on; NTP sets the clock only now, and the daemon
    fresh.session.shift_times(behind)  # follows the step (Bridge.follow_clock_step)
    fresh.now += behind
    s1 = fresh.session.open[record.key]
    assert s1.sent_at == record.sent_at  # the earlier run's stamp was right: it stays
    polls = fresh.sends(fresh.advance(600), "status-poll")
    assert polls, "S1 was not asked about again"
    told = fresh.answer(responses.status_not_found(fresh.last_poll()))
    (result,) = fresh.delivers(told)
    # S2 went to the terminal after S1: its NotFound about S1 may be forgetting
    assert (result.service_id, result.outcome) == ("S1", "unresolved"), result

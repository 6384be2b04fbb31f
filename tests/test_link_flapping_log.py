"""A terminal whose connection flaps (a loose cable: lost, back, lost, back...) wrote a
WARNING for every loss, burying everything else a technician looks for. The first loss is
still a WARNING in full; the further losses of that terminal within the window
(quiet.LINK_LOSSES_QUIET, 10 minutes in the daemon, scaled down here) are counted and said
in one summary line per window, the terminal named, with what to check; a loss with open
payments still names them; and once a window passes without one, the next loss is a
WARNING in full again. Over a real pseudo-terminal (the worker) and udev events read from a
real fd (the hotplug monitor)."""

from __future__ import annotations

import asyncio
import logging
import re

from bridge.daemon import quiet
from bridge.simulator.terminal import Behaviour

from .test_daemon_mqtt import eventually
from .test_hotplug import PipeMonitor, Recorder, as_pyudev, ingenico_tty, make
from .test_terminal_worker import POI, Rig, scenario

WINDOW = 4.0  # s: the window, scaled down from 10 minutes (five flaps take under 2 s)


def _counted(messages: list[str], pattern: str) -> int:
    return sum(int(m.group(1)) for m in map(re.compile(pattern).search, messages) if m)


async def test_a_flapping_link_is_one_warning_then_counted(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(quiet, "LINK_LOSSES_QUIET", WINDOW)
    caplog.set_level(logging.DEBUG, logger="poi_bridge.terminal")  # (the counted ones too)
    # The first payment: never answered by itself, so it is open when the link drops
    async with Rig(tmp_path, scenario(Behaviour(never_answer=True, delay=0.05)),
                   payment_timeout=5.0) as rig:
        for flap in range(5):
            if flap == 2:
                rig.pay("S1")
                async with asyncio.timeout(5):  # the request is on the terminal
                    while ("POS1", "S1") not in rig.simulator.terminal.ledger:
                        await asyncio.sleep(0.01)
            rig.simulator.unplug()  # the cable drops out, and is back 0.3 s later
            await rig.outlet.state_is("offline")
            await rig.outlet.state_is("online")
        lost = [r for r in caplog.records if "link lost" in r.getMessage()]
        assert len(lost) == 5, [r.getMessage() for r in lost]
        # The first in full; the others at debug, but for the loss with the payment on the
        # line, which still names it
        assert [r.levelno for r in lost] == [logging.WARNING, logging.DEBUG, logging.INFO,
                                             logging.DEBUG, logging.DEBUG], lost
        assert "POS1/S1 (awaiting_response), asked about by status poll once it is back" \
            in lost[2].getMessage()
        # Back after a counted loss is as quiet: "link up" said once after the first, and
        # after the loss said at info with its payment (at info, the link read as never back)
        ups = [r.levelno for r in caplog.records if "link up on" in r.getMessage()]
        assert ups == [logging.INFO, logging.INFO, logging.DEBUG, logging.INFO, logging.DEBUG,
                       logging.DEBUG], ups
        # The four further losses, in one summary line at the end of the window (or two)
        await eventually(lambda: _counted(caplog.messages, r"link lost (\d+) more times? ") == 4,
                         timeout=2 * WINDOW + 5)
        summaries = [r for r in caplog.records if " more time" in r.getMessage()]
        assert 1 <= len(summaries) <= 2 and all(r.levelno == logging.WARNING
                                                for r in summaries), summaries
        said = summaries[0].getMessage()
        assert said.startswith(f"terminal {POI}: link lost "), said
        assert f"in the last {WINDOW:g} s" in said and "cable" in said and "online now" in said
        # A window without a loss ends the count: the next loss is said in full again
        await asyncio.sleep(2 * WINDOW + 0.5)
        before = len(caplog.records)
        rig.simulator.unplug()
        await rig.outlet.state_is("offline")
        await rig.outlet.state_is("online")
        again = [r for r in caplog.records[before:] if "link lost" in r.getMessage()]
        assert [r.levelno for r in again] == [logging.WARNING], again
        assert [r.levelno for r in caplog.records[before:]
                if "link up on" in r.getMessage()] == [logging.INFO]
        result = await rig.outlet.result_for("S1")
        assert (result.outcome, result.source) == ("approved", "status-poll")
    # Over the whole run: the first loss, the summaries, the loss after the quiet window,
    # and a failed reopen after each of the two losses said (the pty not back yet) at most:
    # the reopens failed after a counted loss are as quiet as it
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([m for m in warnings if "link lost: " in m]) == 2, warnings
    assert len([m for m in warnings if "cannot open link" in m]) <= 2, warnings
    assert len(warnings) <= 2 + 2 + 2, warnings


async def test_a_summary_said_at_the_stop_says_so(tmp_path, caplog, monkeypatch):
    """The losses counted when the bridge stops are summed up then: "online now" at the
    stop read as if the terminal stayed served."""
    monkeypatch.setattr(quiet, "LINK_LOSSES_QUIET", 60.0)
    async with Rig(tmp_path, scenario(Behaviour())) as rig:
        for _ in range(2):
            rig.simulator.unplug()
            await rig.outlet.state_is("offline")
            await rig.outlet.state_is("online")
        assert not [m for m in caplog.messages if " more time" in m]
    summaries = [m for m in caplog.messages if "link lost 1 more time" in m]
    assert len(summaries) == 1, caplog.messages
    assert summaries[0].endswith("; online as the bridge stops"), summaries


async def test_a_flapping_usb_cable_is_one_unplug_warning_then_counted(caplog, monkeypatch):
    monkeypatch.setattr(quiet, "LINK_LOSSES_QUIET", WINDOW)
    caplog.set_level(logging.DEBUG, logger="bridge.daemon.hotplug")
    terminal = "Desk3500-12345678"
    monitor = PipeMonitor()
    recorder = Recorder()
    hotplug = make(monitor, recorder, present=[ingenico_tty("")])
    await hotplug.start()
    try:
        for _ in range(6):  # unplugged and back, six times: each seen apart (not a storm)
            for action in ("remove", "add"):
                monitor.push(as_pyudev(ingenico_tty(action)))
                await asyncio.sleep(0.05)
                await hotplug.wait_idle()
        # Every unplug and plug still reaches the daemon: only the log is quiet
        assert recorder.calls == [("plug", terminal, "/dev/ttyACM0")] + [
            ("unplug", terminal, "/dev/ttyACM0"), ("plug", terminal, "/dev/ttyACM0")] * 6
        await eventually(lambda: _counted(caplog.messages, r"unplugged (\d+) more times? ") == 5,
                         timeout=2 * WINDOW + 5)
    finally:
        await hotplug.stop()
        monitor.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    unplugged = [m for m in warnings if "unplugged;" in m]
    assert len(unplugged) == 1 and "check its USB cable" in unplugged[0], warnings
    summaries = [m for m in warnings if " more time" in m]
    assert 1 <= len(summaries) <= 2, warnings
    assert summaries[0].startswith(f"terminal {terminal}: device "), summaries
    assert f"in the last {WINDOW:g} s" in summaries[0] and "plugged in now" in summaries[0]
    # The plugs back after a counted unplug are as quiet as the unplugs
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
             and "plugged in" in r.getMessage() and " more time" not in r.getMessage()]
    assert len(infos) == 1, infos

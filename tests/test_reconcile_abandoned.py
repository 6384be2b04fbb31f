"""At reconcile_deadline the bridge stops asking about an unresolved payment: what it
published before (the unresolved report, the retained document) said it keeps asking and will
report; the record and the documents must now say it stopped, and what to do."""

from __future__ import annotations

from bridge.simulator import responses
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario

from .rig import POI, Subscriber, outcome_for
from .test_daemon_mqtt import BASE, Store, request_topic


async def test_an_abandoned_payment_says_so_in_its_document_and_to_a_repeat(tmp_path, mosquitto):
    # The terminal drops the link on reading the payment and stays away: no poll can go
    scenario = Scenario(poi_id=POI, default=Behaviour(drop_link=True),
                        link=LinkBehaviour(status_hold=0.05, replug_after=120))
    async with Store(tmp_path, mosquitto, scenario, resync_attempts=1, reconcile_initial=0.3,
                     in_progress_limit=1.5, reconcile_max_interval=0.5,
                     reconcile_deadline=4), \
            Subscriber(mosquitto, [f"{BASE}/registers/#", f"{BASE}/transactions/#"]) as sub:
        payment = responses.payment_request("POS1", "D1", POI, 5.0)
        await sub.publish(request_topic(), payment)
        first = await sub.wait_for(outcome_for("D1", "unresolved"))
        assert "keeps asking" in first["bridge"]["error"]
        await sub.wait_for(lambda t, p: t.endswith("/event")
                           and p["event"] == "reconcile_abandoned", timeout=20)
        document = f"{BASE}/transactions/POS1/D1"
        retained = await sub.wait_for(lambda t, p: t == document
                                      and "stopped asking" in (p["bridge"]["error"] or ""))
        assert retained["state"] == "unresolved"
        assert "acquirer" in retained["bridge"]["error"]
        # an identical repeat is answered with the same: nothing more will come
        await sub.publish(request_topic(), payment)
        repeat = await sub.wait_for(lambda t, p: outcome_for("D1", "unresolved")(t, p)
                                    and p["bridge"]["source"] == "journal")
        assert "stopped asking" in repeat["bridge"]["error"], repeat


async def test_unresolved_and_abandoned_are_one_line_each(tmp_path, mosquitto, caplog):
    """Field review: at reconcile_deadline one event was logged twice, the same ~600
    characters as an ERROR and as a WARNING, its reason stuttering ("still in progress on
    the terminal (transaction still in progress on the terminal)"); its first unresolved
    report, twice at WARNING. One line each, the abandoned one an ERROR."""
    import logging

    from .test_daemon_mqtt import default_scenario

    caplog.set_level(logging.WARNING, logger="poi_bridge")
    # The terminal never answers the payment and says "in progress" to every poll
    scenario = default_scenario(never_answer=True, in_progress_polls=100_000)
    async with Store(tmp_path, mosquitto, scenario, in_progress_limit=1.5, resync_attempts=1,
                     reconcile_initial=0.3, reconcile_max_interval=0.5,
                     reconcile_deadline=4), \
            Subscriber(mosquitto, [f"{BASE}/registers/#"]) as sub:
        await sub.publish(request_topic(), responses.payment_request("POS1", "I1", POI, 5.0))
        await sub.wait_for(outcome_for("I1", "unresolved"))
        await sub.wait_for(lambda t, p: t.endswith("/event")
                           and p["event"] == "reconcile_abandoned", timeout=20)
        said = [(r.levelname, r.getMessage()) for r in caplog.records
                if "POS1/I1" in r.getMessage()]
    unresolved, abandoned = said  # nothing else at warning or above about it
    assert unresolved[0] == "WARNING" and " unresolved (" in unresolved[1], unresolved
    assert abandoned[0] == "ERROR" and "stopped asking" in abandoned[1], abandoned
    assert abandoned[1].startswith(f"terminal {POI}: Payment POS1/I1: outcome unknown"), abandoned
    assert "(transaction still in progress on the terminal);" in abandoned[1], abandoned
    assert "in progress on the terminal (transaction still" not in abandoned[1], abandoned

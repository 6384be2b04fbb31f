"""The MQTT contract against a real mosquitto broker, with the bridge and a simulated terminal
on a real pseudo-terminal. Every topic of the README, every malformed-request case."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import json

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import MqttConfig, parse_config
from bridge.daemon.app import Bridge
from bridge.daemon.journal import Journal
from bridge.daemon.mqtt import RegisterGateway
from bridge.protocol.messages import parse_message
from bridge.protocol.transaction import Transaction, TxKey, TxState, request_digest
from bridge.simulator import responses
from bridge.simulator.server import SimulatorServer
from bridge.simulator.terminal import Behaviour, LinkBehaviour, Scenario
from bridge.transports import Backoff

from .rig import POI, Subscriber, outcome_for

BASE = "poi/store-7"


@contextlib.asynccontextmanager
async def running(gateway: RegisterGateway):
    """The gateway's connection loop, for the duration of the block."""
    task = asyncio.create_task(gateway.run())
    try:
        yield gateway
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(condition, timeout: float = 10.0) -> None:
    """Wait until `condition()` holds; fail the test if it does not within `timeout`. (It
    returned quietly at the time-out until the seventeenth session: every wait on it then
    asserted nothing unless a check followed.)"""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"not so within {timeout:g} s: {condition}")
        await asyncio.sleep(0.02)


class Store:
    """A bridge and its simulated terminal, in this process, talking to mosquitto."""

    def __init__(self, tmp_path, broker, scenario: Scenario, **terminal) -> None:
        self.tmp_path, self.broker, self.scenario = tmp_path, broker, scenario
        self.terminal = {"payment_timeout": 1.5, "status_timeout": 0.8, "poll_floor": 0.05,
                         **terminal}
        self.simulator = SimulatorServer(scenario, "stx-etx-lrc", ack_timeout=0.3)

    async def __aenter__(self) -> Store:
        device = await self.simulator.start_pty(self.tmp_path / "terminal")
        self.config = parse_config({
            "journal": str(self.tmp_path / "journal.sqlite3"),
            "mqtt": {"host": self.broker.host, "port": self.broker.port, "base_topic": BASE,
                     "client_id": "bridge-under-test", "health_interval": 0.5,
                     "max_payload": 64 * 1024},
            "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device},
                           "framer": {"ack_timeout": 0.3},
                           "allowed_sale_ids": ["POS1", "POS2", "POS3"], **self.terminal}],
        })
        self.bridge = Bridge(self.config)
        await self.bridge.start()
        for _ in range(200):
            if self.bridge.workers[POI].online and self.bridge.gateway.connected:
                break
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.bridge.stop()
        await self.simulator.close()


def default_scenario(**kwargs) -> Scenario:
    return Scenario(poi_id=POI, default=Behaviour(**{"delay": 0.05, **kwargs}),
                    link=LinkBehaviour(status_hold=0.05))


def request_topic(poi: str = POI) -> str:
    return f"{BASE}/terminals/{poi}/request"


async def test_states_are_retained_and_a_payment_flows_through_every_topic(tmp_path, mosquitto):
    async with Store(tmp_path, mosquitto, default_scenario()):
        # A register that connects late still sees the retained states.
        async with Subscriber(mosquitto, [f"{BASE}/#"]) as sub:
            await sub.wait_for(lambda t, p: t == f"{BASE}/bridge/state" and p.get("state") == "online")
            state = await sub.wait_for(lambda t, p: t == f"{BASE}/terminals/{POI}/state")
            assert state["state"] == "online" and state["poi_id"] == POI
            health = await sub.wait_for(lambda t, p: t == f"{BASE}/bridge/health")
            assert set(health) >= {"uptime", "terminals", "journal", "broker_reconnects"}
            assert set(health["journal"]) == {"in_flight", "unresolved", "undelivered"}

            await sub.publish(request_topic(), responses.payment_request("POS1", "S1", POI, 9.5))
            answer = await sub.wait_for(outcome_for("S1"))
            assert answer["bridge"]["outcome"] == "approved"
            assert answer["bridge"]["source"] == "terminal"
            assert answer["bridge"]["transaction"] == {
                "sale_id": "POS1", "service_id": "S1", "poi_id": POI, "category": "Payment"}
            assert answer["SaleToPOIResponse"]["PaymentResponse"]["Response"]["Result"] == "Success"
            events = [p["event"] for p in sub.on(f"{BASE}/registers/POS1/event")]
            await sub.wait_for(lambda t, p: t.endswith("/event") and p["event"] == "completed")
            events = [p["event"] for p in sub.on(f"{BASE}/registers/POS1/event")]
            assert events[:2] == ["accepted", "sent"] and "completed" in events
            retained = await sub.wait_for(
                lambda t, p: t == f"{BASE}/transactions/POS1/S1" and p.get("state") == "final")
            assert retained["bridge"]["outcome"] == "approved"

        # The retained transaction is the register's "download": a new client gets it.
        async with Subscriber(mosquitto, [f"{BASE}/transactions/POS1/S1"], client_id="late") as late:
            got = await late.wait_for(lambda t, p: True)
            assert got["bridge"]["outcome"] == "approved" and got["state"] == "final"


async def test_result_recovered_by_status_poll_carries_the_original_response(tmp_path, mosquitto):
    async with Store(tmp_path, mosquitto, default_scenario(never_answer=True)):
        async with Subscriber(mosquitto, [f"{BASE}/registers/POS1/#"]) as sub:
            await sub.publish(request_topic(), responses.payment_request("POS1", "S2", POI, 3.0))
            answer = await sub.wait_for(outcome_for("S2"))
            assert (answer["bridge"]["outcome"], answer["bridge"]["source"]) == (
                "approved", "status-poll")
            assert "PaymentResponse" in answer["SaleToPOIResponse"]
            polls = [p for p in sub.on(f"{BASE}/registers/POS1/event") if p["event"] == "status_poll"]
            assert polls and polls[0]["poll"] == 1


def rejected(sale_id: str, service_id: str | None = None):
    def predicate(topic, payload):
        if topic != f"{BASE}/registers/{sale_id}/response" or not isinstance(payload, dict):
            return False
        info = payload["bridge"]
        return info["outcome"] == "rejected" and (
            service_id is None or info["transaction"]["service_id"] == service_id)
    return predicate


async def test_a_refusal_on_bridge_error_echoes_no_card_data(tmp_path, mosquitto):
    """bridge/error reaches every operator and head office: a register that put a swiped
    card's track data where its SaleID belongs, a card number as its ServiceID and in its
    MessageCategory, is told which request was refused and why without the card data."""
    pan = "4111111111111111"
    track2 = f";{pan}=29121010000012300000?"
    async with Store(tmp_path, mosquitto, default_scenario()):
        async with Subscriber(mosquitto, [f"{BASE}/bridge/error"]) as sub:
            swiped = responses.payment_request(f"POS1/{track2}", "S1", POI)
            swiped["SaleToPOIRequest"]["MessageHeader"]["ServiceID"] = pan
            swiped["SaleToPOIRequest"]["MessageHeader"]["MessageCategory"] = f"card {pan}"
            await sub.publish(request_topic(), swiped)
            err = await sub.wait_for(lambda t, p: t.endswith("/bridge/error"))
            assert pan not in json.dumps(err) and "=2912" not in json.dumps(err), err
            assert err["poi_id"] == POI and err["sale_id"] == "POS1/;[redacted]"
            assert err["service_id"] == "[redacted]"
            assert "ServiceID must be 1-10" in err["error"]
            assert "MessageCategory card [redacted] does not match body" in err["error"]


async def test_every_malformed_request_is_answered(tmp_path, mosquitto):
    async with Store(tmp_path, mosquitto, default_scenario(delay=0.8)):
        async with Subscriber(mosquitto, [f"{BASE}/registers/+/response",
                                          f"{BASE}/bridge/error"]) as sub:
            # not JSON, and no SaleID to be read: the bridge's error topic
            await sub.publish(request_topic(), b"\x00not json{")
            err = await sub.wait_for(lambda t, p: t.endswith("/bridge/error"))
            assert "not valid JSON" in err["error"] or "not UTF-8" in err["error"]
            assert err["poi_id"] == POI

            # JSON but not a SaleToPOIRequest
            await sub.publish(request_topic(), {"hello": "world"})
            await sub.wait_for(lambda t, p: t.endswith("/bridge/error") and
                               "expected one SaleToPOIRequest" in p["error"])

            # oversize payload
            await sub.publish(request_topic(), b"{" + b" " * (70 * 1024) + b"}")
            await sub.wait_for(lambda t, p: t.endswith("/bridge/error") and
                               "larger than the limit" in p["error"])

            # a nesting bomb
            await sub.publish(request_topic(), b"[" * 10000 + b"]" * 10000)
            await sub.wait_for(lambda t, p: t.endswith("/bridge/error") and
                               "nested" in p["error"])

            # an invalid header, SaleID readable: back to that register
            bad = responses.payment_request("POS1", "waytoolongserviceid", POI)
            await sub.publish(request_topic(), bad)
            answer = await sub.wait_for(rejected("POS1"))
            assert "ServiceID must be 1-10" in answer["bridge"]["error"]
            cond = answer["SaleToPOIResponse"]["PaymentResponse"]["Response"]["ErrorCondition"]
            assert cond == "MessageFormat"

            # a SaleID that cannot be a topic level: bridge/error, with the IDs as sent, so
            # that the register can tell which request it was
            slashed = responses.payment_request("POS/1", "S1", POI)
            await sub.publish(request_topic(), slashed)
            err = await sub.wait_for(lambda t, p: t.endswith("/bridge/error")
                                     and p.get("sale_id") == "POS/1")
            assert err["service_id"] == "S1" and "SaleID must not contain" in err["error"]

            # a ServiceID sent as a number: refused on the register's topic, echoing it
            numbered = responses.payment_request("POS1", "N1", POI)
            numbered["SaleToPOIRequest"]["MessageHeader"]["ServiceID"] = 4711
            await sub.publish(request_topic(), numbered)
            answer = await sub.wait_for(rejected("POS1", "4711"))
            assert answer["SaleToPOIResponse"]["MessageHeader"]["ServiceID"] == "4711"

            # an unknown enum in a register's header is kept but refused where it matters
            odd = responses.payment_request("POS1", "E1", POI)
            odd["SaleToPOIRequest"]["MessageHeader"]["MessageClass"] = "Weird"
            await sub.publish(request_topic(), odd)
            await sub.wait_for(rejected("POS1", "E1"))

            # a terminal this bridge does not have
            unknown = responses.payment_request("POS1", "U1", "P400Plus-999")
            await sub.publish(request_topic("P400Plus-999"), unknown)
            answer = await sub.wait_for(rejected("POS1", "U1"))
            assert "unknown terminal P400Plus-999" in answer["bridge"]["error"]

            # the header names another terminal than the topic
            await sub.publish(request_topic(), unknown)
            answer = await sub.wait_for(lambda t, p: rejected("POS1", "U1")(t, p) and
                                        "does not match" in p["bridge"]["error"])

            # a register the terminal does not serve
            await sub.publish(request_topic(), responses.payment_request("POS9", "X1", POI))
            answer = await sub.wait_for(rejected("POS9", "X1"))
            assert "may not use terminal" in answer["bridge"]["error"]

            # an encrypted request: registers send clear, the bridge encrypts
            enc = responses.payment_request("POS1", "C1", POI)
            enc["SaleToPOIRequest"]["NexoBlob"] = "abcd"
            await sub.publish(request_topic(), enc)
            await sub.wait_for(rejected("POS1", "C1"))

            # Busy: a second payment while one is open
            b1 = responses.payment_request("POS1", "B1", POI, 1.0)
            await sub.publish(request_topic(), b1)
            await sub.publish(request_topic(), responses.payment_request("POS2", "B2", POI, 2.0))
            busy = await sub.wait_for(rejected("POS2", "B2"))
            assert busy["SaleToPOIResponse"]["PaymentResponse"]["Response"][
                "ErrorCondition"] == "Busy"
            assert (await sub.wait_for(outcome_for("B1")))["bridge"]["outcome"] == "approved"

            # duplicate ServiceID with a different request: refused, saying what stands under
            # those IDs (the refusal is published on them); stored result untouched
            await sub.publish(request_topic(), responses.payment_request("POS1", "B1", POI, 99.0))
            dup = await sub.wait_for(lambda t, p: rejected("POS1", "B1")(t, p))
            assert "already used" in dup["bridge"]["error"]
            assert "AmountsReq.RequestedAmount" in dup["bridge"]["error"]
            assert "(state final, outcome approved)" in dup["bridge"]["error"]
            assert dup["SaleToPOIResponse"]["PaymentResponse"]["Response"][
                "ErrorCondition"] == "NotAllowed"
            # the same request rebuilt for a retry (a new TimeStamp): the known result
            rebuilt = copy.deepcopy(b1)
            rebuilt["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
                "TimeStamp"] = "2020-01-01T00:00:00.000Z"  # (too old to start: answered anyway)
            await sub.publish(request_topic(), rebuilt)
            retried = await sub.wait_for(lambda t, p: outcome_for("B1", "approved")(t, p)
                                         and p["bridge"]["source"] == "journal")
            assert retried["SaleToPOIResponse"]["PaymentResponse"]["Response"][
                "Result"] == "Success"
            # an identical repeat: the known result again, from the journal, nothing started
            await sub.publish(request_topic(), b1)
            again = await sub.wait_for(lambda t, p: outcome_for("B1", "approved")(t, p)
                                       and p["bridge"]["source"] == "journal")
            assert again["SaleToPOIResponse"]["PaymentResponse"]["Response"]["Result"] == "Success"

            # a payment that waited in the broker too long is not started
            stale = responses.payment_request("POS3", "T1", POI)
            stale["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"][
                "TimeStamp"] = "2020-01-01T00:00:00.000Z"
            await sub.publish(request_topic(), stale)
            answer = await sub.wait_for(rejected("POS3", "T1"))
            assert "old" in answer["bridge"]["error"]
            assert "this box's clock (20" in answer["bridge"]["error"]  # what to compare

            # the 300-s rule needs a TimeStamp it can read: none or unreadable is refused; one
            # without a zone is read as local time or UTC; one as far in the future (clocks
            # apart) is refused: never silently started
            future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
            for service_id, stamp, said in (
                    ("Z1", None, "is missing"),
                    ("Z2", "30/11/2026 10:00", "is not an ISO 8601 date and time"),
                    ("Z3", "2020-11-30T10:00:00", "it has no zone"),  # old, either way
                    ("Z4", future.isoformat(timespec="milliseconds"), "in the future")):
                odd = responses.payment_request("POS3", service_id, POI)
                sale_tx = odd["SaleToPOIRequest"]["PaymentRequest"]["SaleData"][
                    "SaleTransactionID"]
                if stamp is None:
                    del sale_tx["TimeStamp"]
                else:
                    sale_tx["TimeStamp"] = stamp
                await sub.publish(request_topic(), odd)
                answer = await sub.wait_for(rejected("POS3", service_id))
                assert said in answer["bridge"]["error"], answer["bridge"]["error"]


async def test_bridge_commands(tmp_path, mosquitto):
    async with Store(tmp_path, mosquitto, default_scenario()) as store:
        async with Subscriber(mosquitto, [f"{BASE}/bridge/response/+",
                                          f"{BASE}/registers/POS1/response"]) as sub:
            await sub.publish(request_topic(), responses.payment_request("POS1", "K1", POI))
            await sub.wait_for(outcome_for("K1"))

            await sub.publish(f"{BASE}/bridge/request/terminals", {"transaction": 7})
            answer = await sub.wait_for(lambda t, p: t.endswith("/response/terminals"))
            assert answer["status"] == "ok" and answer["transaction"] == 7
            assert answer["data"][0]["poi_id"] == POI

            await sub.publish(f"{BASE}/bridge/request/transactions", {"state": "final"})
            answer = await sub.wait_for(lambda t, p: t.endswith("/response/transactions"))
            assert [t["service_id"] for t in answer["data"]] == ["K1"]

            await sub.publish(f"{BASE}/bridge/request/health", {})
            answer = await sub.wait_for(lambda t, p: t.endswith("/response/health"))
            assert answer["data"]["terminals"] == {POI: "online"}

            before = len(sub.on(f"{BASE}/registers/POS1/response"))
            await sub.publish(f"{BASE}/bridge/request/resync",
                              {"sale_id": "POS1", "service_id": "K1", "transaction": "r1"})
            answer = await sub.wait_for(lambda t, p: t.endswith("/response/resync"))
            assert answer["status"] == "ok" and answer["transaction"] == "r1"
            await sub.wait_for(lambda t, p: outcome_for("K1")(t, p) and
                               p["bridge"]["source"] == "status-poll")
            assert len(sub.on(f"{BASE}/registers/POS1/response")) > before

            await sub.publish(f"{BASE}/bridge/request/resync", {"sale_id": "POS1",
                                                                "service_id": "nope"})
            answer = await sub.wait_for(lambda t, p: t.endswith("/response/resync")
                                        and p["status"] == "error")
            assert "no transaction POS1/nope" in answer["error"]

            await sub.publish(f"{BASE}/bridge/request/frobnicate", {})
            answer = await sub.wait_for(lambda t, p: t.endswith("/response/frobnicate"))
            assert answer["status"] == "error" and "unknown command" in answer["error"]

            # transactions filters that cannot match say so, instead of an empty or
            # unfiltered list that reads as an answer
            for n, (body, said) in enumerate((
                    ({"state": "in_progress"}, "state 'in_progress' is none of accepted, "
                                               "awaiting_response, polling, unresolved, final"),
                    ({"outcome": "paid"}, "outcome 'paid' is none of approved"),
                    ({"outcome": "unresolved"}, "unresolved is a state: ask for state "
                                                "unresolved"),
                    ({"stat": "final"}, "unknown key(s) stat"),
                    ({"limit": True}, "limit must be a whole number"))):
                await sub.publish(f"{BASE}/bridge/request/transactions",
                                  {**body, "transaction": f"f{n}"})
                answer = await sub.wait_for(lambda t, p, n=n: t.endswith("/response/transactions")
                                            and p["transaction"] == f"f{n}")
                assert answer["status"] == "error" and said in answer["error"], answer
            # every command refuses a key it does not take, instead of ignoring it
            for command, body, said in (
                    ("health", {"verbose": True}, "unknown key(s) verbose; health takes no key"),
                    ("terminals", {"poi_id": "X"}, "unknown key(s) poi_id; terminals takes no "
                                                   "key (and transaction, echoed)"),
                    ("resync", {"sale_id": "POS1", "service_id": "S1", "force": True},
                     "unknown key(s) force; resync takes sale_id, service_id")):
                await sub.publish(f"{BASE}/bridge/request/{command}",
                                  {**body, "transaction": f"k-{command}"})
                answer = await sub.wait_for(
                    lambda t, p, c=command: t.endswith(f"/response/{c}")
                    and p["transaction"] == f"k-{c}")
                assert answer["status"] == "error" and said in answer["error"], answer
        assert store.bridge.intake.rejected == 0


async def test_mqtt5_response_topic_and_correlation_data_are_honoured(tmp_path, mosquitto):
    async with Store(tmp_path, mosquitto, default_scenario()) as store:
        store.bridge.gateway.config = store.bridge.gateway.config.model_copy(
            update={"protocol": "5"})
        # reconnect as MQTT 5
        for task in store.bridge._tasks:
            if task.get_name() == "mqtt":
                task.remove_done_callback(store.bridge._task_ended)  # (asked: no failure)
                task.cancel()
        store.bridge._tasks.append(asyncio.create_task(store.bridge.gateway.run(), name="mqtt"))
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="v5-client",
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(f"{BASE}/bridge/response/#", qos=1)
            await client.subscribe(f"{BASE}/registers/#", qos=1)
            for _ in range(100):
                if store.bridge.gateway.connected:
                    break
                await asyncio.sleep(0.05)

            async def ask(response_topic: str, correlation: bytes) -> aiomqtt.Message:
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = response_topic
                props.CorrelationData = correlation
                await client.publish(f"{BASE}/bridge/request/terminals", b"{}", qos=1,
                                     properties=props)
                async with asyncio.timeout(10):
                    async for message in client.messages:
                        assert message.properties.CorrelationData == correlation
                        assert json.loads(message.payload)["status"] == "ok"
                        return message

            mine = f"{BASE}/bridge/response/v5-client/1"
            assert (await ask(mine, b"req-42")).topic.value == mine
            # Outside {base}/bridge/response/ the bridge would publish where the requester
            # may not (another register's results): the fixed topic is used instead.
            for elsewhere in (f"{BASE}/registers/TILL1/response", "my/replies",
                              f"{BASE}/bridge/response/"):
                answer = await ask(elsewhere, b"req-43")
                assert answer.topic.value == f"{BASE}/bridge/response/terminals", elsewhere


async def test_broker_down_at_boot_terminals_keep_working_and_results_wait(tmp_path, mosquitto):
    """The bridge starts while the broker is down; the terminal side works regardless, and a
    result produced meanwhile is published, retained, once the broker is back."""
    mosquitto.stop()
    async with Store(tmp_path, mosquitto, default_scenario()) as store:
        assert store.bridge.workers[POI].online and not store.bridge.gateway.connected
        # A request that reached the bridge before the outage (here handed straight to the
        # terminal's worker, as the broker is unreachable).
        doc = responses.payment_request("POS1", "Q1", POI, 5.0)
        store.bridge.workers[POI].submit(parse_message(doc), doc, request_digest(doc))
        for _ in range(100):
            if store.bridge.journal.counts()["in_flight"] == 0:
                break
            await asyncio.sleep(0.05)
        assert store.bridge.journal.counts()["undelivered"] > 0
        mosquitto.start()
        async with Subscriber(mosquitto, [f"{BASE}/transactions/POS1/Q1"]) as sub:
            got = await sub.wait_for(lambda t, p: p.get("state") == "final", timeout=30)
            assert got["bridge"]["outcome"] == "approved"
        for _ in range(100):
            if store.bridge.journal.counts()["undelivered"] == 0:
                break
            await asyncio.sleep(0.05)
        assert store.bridge.journal.counts()["undelivered"] == 0


async def test_an_empty_message_on_a_request_topic_is_ignored(tmp_path, mosquitto):
    """How a sender clears a retained request, as the README tells it to. With MQTT 3.1.1 the
    broker drops the retain flag towards a subscriber already connected, so the bridge sees
    a plain empty message: it must neither answer it as bad JSON nor run a command."""
    async with Store(tmp_path, mosquitto, default_scenario()):
        async with Subscriber(mosquitto, [f"{BASE}/bridge/error", f"{BASE}/bridge/response/+",
                                          f"{BASE}/registers/POS1/response"]) as sub:
            await sub.publish(request_topic(), b"", retain=True)
            await sub.publish(request_topic(), b"")
            await sub.publish(f"{BASE}/bridge/request/transactions", b"", retain=True)
            await sub.publish(f"{BASE}/bridge/request/transactions", b"")
            # handled in order: once these are answered, the empty ones were seen
            await sub.publish(request_topic(), b"not json")
            await sub.wait_for(lambda t, p: t.endswith("/bridge/error"))
            await sub.publish(f"{BASE}/bridge/request/health", {"transaction": "marker"})
            await sub.wait_for(lambda t, p: t.endswith("/response/health"))
            errors = sub.on(f"{BASE}/bridge/error")
            assert len(errors) == 1 and "not valid JSON" in errors[0]["error"], errors
            assert sub.on(f"{BASE}/bridge/response/transactions") == []
            await sub.publish(request_topic(), responses.payment_request("POS1", "E1", POI))
            assert (await sub.wait_for(outcome_for("E1")))["bridge"]["outcome"] == "approved"


@pytest.mark.parametrize("payload", [b" ", b"null", b"[]", b'{"SaleToPOIRequest": []}'])
async def test_junk_requests_never_disturb_a_payment_in_flight(tmp_path, mosquitto, payload):
    async with Store(tmp_path, mosquitto, default_scenario(delay=0.5)):
        async with Subscriber(mosquitto, [f"{BASE}/registers/POS1/response",
                                          f"{BASE}/bridge/error"]) as sub:
            await sub.publish(request_topic(), responses.payment_request("POS1", "J1", POI))
            await sub.publish(request_topic(), payload)
            await sub.wait_for(lambda t, p: t.endswith("/bridge/error"))
            answer = await sub.wait_for(outcome_for("J1"))
            assert answer["bridge"]["outcome"] == "approved"


async def test_retained_transactions_are_cleared_after_the_retention_period(tmp_path, mosquitto):
    old = responses.payment_request("POS1", "OLD1", POI)
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.save(Transaction(sale_id="POS1", service_id="OLD1", poi_id=POI, category="Payment",
                             request=old, digest=request_digest(old), created_at=1000.0,
                             updated_at=1000.0, state=TxState.FINAL, outcome="approved"))
    journal.close()
    async with Subscriber(mosquitto, []) as publisher:
        await publisher.publish(f"{BASE}/transactions/POS1/OLD1", {"state": "final"}, retain=True)
    async with Store(tmp_path, mosquitto, default_scenario()) as store:
        for _ in range(100):
            if store.bridge.journal.get(TxKey("POS1", "OLD1")) is None and \
                    store.bridge.journal.counts()["undelivered"] == 0:
                break
            await asyncio.sleep(0.05)
        assert store.bridge.journal.get(TxKey("POS1", "OLD1")) is None
        async with Subscriber(mosquitto, [f"{BASE}/transactions/#"], client_id="late") as sub:
            await asyncio.sleep(0.5)
            assert sub.on(f"{BASE}/transactions/POS1/OLD1") == []


async def test_a_request_is_acknowledged_only_once_handled(tmp_path, mosquitto):
    """A request whose handling never finished (the daemon died before the journal commit)
    is not acknowledged, so the broker delivers it again to the bridge's persistent session
    on the next connection. paho's default, acknowledging on receipt, lost it."""

    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, base_topic=BASE,
                        client_id="bridge-ack-test")
    journal = Journal(tmp_path / "journal.sqlite3")
    seen: list[bytes] = []
    dying = asyncio.Event()

    async def dies_mid_request(topic: str, payload: bytes, reply) -> None:
        seen.append(payload)
        dying.set()
        await asyncio.Event().wait()  # the process is gone before it gets further

    async def handles(topic: str, payload: bytes, reply) -> None:
        seen.append(payload)

    first = RegisterGateway(config, journal, backoff=Backoff(initial=0.05, maximum=0.2))
    first.set_request_handler(dies_mid_request)
    async with running(first), Subscriber(mosquitto, [f"{BASE}/bridge/state"]) as register:
        await register.wait_for(lambda t, p: p.get("state") == "online")
        request = responses.payment_request("POS1", "K1", POI)
        await register.publish(f"{BASE}/terminals/{POI}/request", request)
        await asyncio.wait_for(dying.wait(), 10)
    assert len(seen) == 1

    second = RegisterGateway(config, journal, backoff=Backoff(initial=0.05, maximum=0.2))
    second.set_request_handler(handles)
    try:
        async with running(second):
            await eventually(lambda: len(seen) >= 2)
    finally:
        journal.close()
    assert len(seen) == 2, "the unacknowledged request was not delivered again"
    assert json.loads(seen[1]) == json.loads(seen[0])


async def test_online_is_said_only_once_requests_can_be_taken(tmp_path, mosquitto, monkeypatch):
    """A register that waits for bridge/state "online" and then publishes must be answered,
    even on a broker that has never seen the bridge's session and with a slow SUBACK: the
    bridge subscribes before it says "online" (it used to say it first)."""
    from bridge.daemon.mqtt_client import PipelinedClient

    original = PipelinedClient.subscribe

    async def slow_subscribe(self, *args, **kwargs):
        await asyncio.sleep(0.5)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(PipelinedClient, "subscribe", slow_subscribe)
    async with Subscriber(mosquitto, [f"{BASE}/bridge/state", f"{BASE}/registers/POS1/#"],
                          client_id="eager-register") as register:
        simulator = SimulatorServer(default_scenario(), "stx-etx-lrc", ack_timeout=0.3)
        device = await simulator.start_pty(tmp_path / "terminal")
        config = parse_config({
            "journal": str(tmp_path / "journal.sqlite3"),
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "base_topic": BASE,
                     "client_id": "bridge-first-start"},
            "terminals": [{"poi_id": POI, "link": {"kind": "serial", "device": device}}],
        })
        bridge = Bridge(config)
        await bridge.start()
        try:
            await register.wait_for(lambda t, p: t.endswith("/bridge/state")
                                    and p.get("state") == "online")
            await register.publish(request_topic(),
                                   responses.payment_request("POS1", "EAGER1", POI))
            answer = await register.wait_for(
                lambda t, p: t == f"{BASE}/registers/POS1/response", timeout=15)
            assert answer["bridge"]["transaction"]["service_id"] == "EAGER1"
        finally:
            await bridge.stop()
            await simulator.close()


async def test_a_request_is_acknowledged_only_once_its_writes_are_committed(tmp_path, mosquitto,
                                                                          monkeypatch):
    """With the daemon's grouped commits, the PUBACK of a register's request waits for the
    commit of what handling it wrote: the broker forgets a request only once the journal
    would survive a crash with it."""
    import sqlite3

    from bridge.daemon.mqtt_client import PipelinedClient

    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.group_commits(asyncio.get_running_loop().call_soon)
    other = sqlite3.connect(path)
    committed_at_ack: list[int] = []
    original_ack = PipelinedClient.ack

    def ack(self, message):
        (count,) = other.execute("SELECT COUNT(*) FROM outbox WHERE topic = ?",
                                 (f"{BASE}/bridge/error",)).fetchone()
        committed_at_ack.append(count)
        original_ack(self, message)

    monkeypatch.setattr(PipelinedClient, "ack", ack)

    def handles(topic: str, payload: bytes, reply) -> None:
        reply.send(f"{BASE}/bridge/error", {"status": "error", "error": "seen"})

    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, base_topic=BASE,
                        client_id="bridge-ack-after-commit")
    gateway = RegisterGateway(config, journal, backoff=Backoff(initial=0.05, maximum=0.2))
    gateway.set_request_handler(handles)
    try:
        async with running(gateway), Subscriber(
                mosquitto, [f"{BASE}/bridge/state", f"{BASE}/bridge/error"]) as register:
            await register.wait_for(lambda t, p: p.get("state") == "online")
            # published together, so that several are handled in one pass
            await asyncio.gather(*(register.publish(f"{BASE}/terminals/{POI}/request",
                                                    {"n": n}) for n in range(6)))
            await eventually(lambda: len(committed_at_ack) >= 6
                             and len(register.on(f"{BASE}/bridge/error")) >= 6)
    finally:
        other.close()
        journal.close()
    assert len(committed_at_ack) == 6
    # each request's answer was on disk when its PUBACK went: the n-th saw n+1 or more
    assert all(count >= n + 1 for n, count in enumerate(committed_at_ack)), committed_at_ack


async def test_a_message_is_published_once_committed_and_not_before(tmp_path, mosquitto):
    """The outbox publisher takes committed messages only, and is woken by the commit: woken
    by the write, it found nothing yet and slept on, and the result waited for the next one."""
    from .test_journal_grouped import Passes

    journal = Journal(tmp_path / "journal.sqlite3")
    passes = Passes()
    journal.group_commits(passes)
    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, base_topic=BASE,
                        client_id="bridge-publish-after-commit")
    gateway = RegisterGateway(config, journal, backoff=Backoff(initial=0.05, maximum=0.2))
    topic = f"{BASE}/registers/POS1/response"
    try:
        async with running(gateway), Subscriber(
                mosquitto, [f"{BASE}/bridge/state", topic]) as register:
            await register.wait_for(lambda t, p: p.get("state") == "online")
            gateway.enqueue(topic, {"n": 1})
            await asyncio.sleep(0.3)
            assert register.on(topic) == [], "published before it was committed"
            passes.next()
            await register.wait_for(lambda t, p: t == topic, timeout=5)
            assert register.on(topic) == [{"n": 1}]
    finally:
        journal.close()


async def test_more_messages_than_the_publish_window_all_go_out_in_order(tmp_path, mosquitto):
    """At most OUTBOX_WINDOW messages wait for the broker's acknowledgement; as they are
    acknowledged the rest follow, in order, and every one is marked delivered."""
    from bridge.daemon.outbox import OUTBOX_WINDOW

    journal = Journal(tmp_path / "journal.sqlite3")
    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, base_topic=BASE,
                        client_id="bridge-window")
    gateway = RegisterGateway(config, journal, backoff=Backoff(initial=0.05, maximum=0.2))
    topic = f"{BASE}/registers/POS1/event"
    count = 2 * OUTBOX_WINDOW + 10
    try:
        async with running(gateway), Subscriber(
                mosquitto, [f"{BASE}/bridge/state", topic]) as register:
            await register.wait_for(lambda t, p: p.get("state") == "online")
            with journal.batch():  # one commit: all of them pending at once
                for n in range(count):
                    gateway.enqueue(topic, {"n": n})
            await register.wait_for(lambda t, p: p == {"n": count - 1}, timeout=20)
            assert [p["n"] for p in register.on(topic)] == list(range(count))
            await eventually(lambda: not journal.pending())
            assert journal.pending() == [] and gateway.published >= count
    finally:
        journal.close()

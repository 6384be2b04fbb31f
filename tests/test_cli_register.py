"""`poi-bridge register`, the technician's register, as a real process against a real broker.

It pays through a running bridge; it says at once, instead of after its whole timeout, when
no bridge has ever announced itself on the base topic it was given (the usual mistake: the
default --base-topic against a bridge configured with another); and it warns when the bridge
is offline (the request then waits in the broker for the bridge's persistent session).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time

import aiomqtt
import pytest

from bridge.register_client import RegisterClient

from .rig import POI, ROOT, python_env
from .test_cli_tools import BASE, config_file, running_bridge


async def register(mosquitto, *args: str, timeout: float = 60) -> tuple[int, str, str, float]:
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "register", "--broker",
        f"{mosquitto.host}:{mosquitto.port}", *args, env=python_env(), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode(), time.monotonic() - started


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, env=python_env(), cwd=ROOT, timeout=60, check=False)


async def test_pay_through_a_running_bridge(tmp_path, mosquitto):
    async with running_bridge(tmp_path, mosquitto):
        code, out, err, _ = await register(mosquitto, "--base-topic", BASE, "--sale-id",
                                           "TILL9", "pay", "--terminal", POI, "--amount",
                                           "4.20", "--timeout", "30")
        assert code == 0, err
        assert out.startswith("TILL9/") and f"on {POI}: approved (source terminal)" in out
        assert ". accepted" in err and ". completed" in err  # the events, for the person
        code, out, err, _ = await register(mosquitto, "--base-topic", BASE, "--sale-id",
                                           "TILL9", "transactions")
        assert code == 0, err
        listed = json.loads(out)
        assert [t["sale_id"] for t in listed] == ["TILL9"]
        assert listed[0]["outcome"] == "approved"


async def test_transactions_lists_this_registers_own(tmp_path, mosquitto):
    """`register --sale-id TILL2 transactions` listed every register's transactions."""
    async with running_bridge(tmp_path, mosquitto):
        for sale_id in ("TILL1", "TILL2"):
            async with RegisterClient(mosquitto.host, mosquitto.port, sale_id, base_topic=BASE,
                                      persistent=False) as till:
                await till.pay(POI, 1.0, timeout=30)
        code, out, err, _ = await register(mosquitto, "--base-topic", BASE, "--sale-id",
                                           "TILL2", "transactions")
        assert code == 0, err
        assert [t["sale_id"] for t in json.loads(out)] == ["TILL2"]
        code, out, err, _ = await register(mosquitto, "--base-topic", BASE, "--sale-id",
                                           "TILL1", "transactions", "--state", "final")
        assert code == 0, err
        assert [t["sale_id"] for t in json.loads(out)] == ["TILL1"]  # with --state too


async def test_a_base_topic_no_bridge_uses_is_reported_at_once(mosquitto):
    code, out, err, took = await register(mosquitto, "--base-topic", "nobody/here", "pay",
                                          "--terminal", POI, "--amount", "1", "--timeout", "60")
    assert code == 2
    assert "no bridge has announced itself on nobody/here/bridge/state" in err
    assert "--base-topic" in err
    assert took < 20, "waited for the request's timeout instead of saying what is wrong"


async def pay_through_a_stand_in(mosquitto, answer, *options: str, state: str = "online",
                                 login: tuple[str, ...] = ()):
    """`register LOGIN --sale-id TILL9 pay --terminal POI OPTIONS` against a stand-in for a
    bridge in `state`: `await answer(client, request)` answers the request it publishes.
    Returns register()'s result and the request."""
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="bridge") as bridge:
        await bridge.publish(f"{BASE}/bridge/state", json.dumps({"state": state}), qos=1,
                             retain=True)
        await bridge.subscribe(f"{BASE}/terminals/+/request/+", qos=1)
        running = asyncio.create_task(register(
            mosquitto, "--base-topic", BASE, *login, "--sale-id", "TILL9", "pay", "--terminal",
            POI, *options))
        async with asyncio.timeout(30):
            async for message in bridge.messages:
                request = json.loads(message.payload)
                break
        await answer(bridge, request)
    return await running, request


@pytest.mark.parametrize("options,topic", [
    ((), f"{BASE}/terminals/{POI}/request/TILL9"),
    (("--plain-topic",), f"{BASE}/terminals/{POI}/request"),
])
async def test_requests_go_to_the_registers_own_topic_or_the_plain_one(mosquitto, options,
                                                                      topic):
    """A register publishes on .../request/{SaleID}, which a broker ACL ties to its login;
    --plain-topic where the ACL allows only the plain one (or the bridge is older)."""
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="bridge") as bridge:
        await bridge.publish(f"{BASE}/bridge/state", json.dumps({"state": "online"}), qos=1,
                             retain=True)
        await bridge.subscribe(f"{BASE}/terminals/#", qos=1)
        running = asyncio.create_task(register(
            mosquitto, "--base-topic", BASE, "--sale-id", "TILL9", *options, "pay",
            "--terminal", POI, "--amount", "1", "--timeout", "1"))
        async with asyncio.timeout(30):
            async for message in bridge.messages:
                assert message.topic.value == topic
                break
        code, _, err, _ = await running
    assert code == 3, err  # no answer came: outcome unknown


async def no_answer(bridge: aiomqtt.Client, request: dict) -> None:
    pass


async def approve(bridge: aiomqtt.Client, request: dict) -> None:
    service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
    await bridge.publish(f"{BASE}/registers/TILL9/response", json.dumps({"bridge": {
        "outcome": "approved", "source": "terminal",
        "transaction": {"sale_id": "TILL9", "service_id": service_id, "poi_id": POI}}}), qos=1)


async def test_an_offline_bridge_is_named_and_the_request_still_goes(mosquitto):
    # What the broker keeps after a bridge died: its last will, retained.
    (code, _, err, _), request = await pay_through_a_stand_in(
        mosquitto, no_answer, "--amount", "1", "--timeout", "2", state="offline")
    header = request["SaleToPOIRequest"]["MessageHeader"]
    assert header["SaleID"] == "TILL9"
    assert "the bridge is offline; the request waits in the broker" in err
    assert_outcome_unknown(code, err, "TILL9", header["ServiceID"])


OPERATOR = "--username operator --password-file /etc/poi-bridge/operator-password"


def assert_outcome_unknown(code: int, err: str, sale_id: str, service_id: str, *,
                           config: str | None = None, operator: bool = False) -> None:
    """A payment handed to the broker whose answer did not come: the request may still be
    charged (it waits in the bridge's persistent session), so the technician must be told
    the IDs, not to pay again, and how to find out; with an exit status of its own.

    How to find out is said in commands that run as they stand: with the `config` the
    payment was made with, `status` and `resync`; without one, `register` again on the same
    broker and base topic (tests pay with `--base-topic BASE`). As the operator only after
    a login (`operator`), as the example ACL wants: a by-hand user without one has no
    operator password file, and the command would fail on it."""
    assert code == 3, err
    assert f"SaleID {sale_id} ServiceID {service_id}" in err  # said when it was published
    assert "OUTCOME UNKNOWN" in err and "Do NOT pay again" in err
    login = f" {OPERATOR}" if operator else ""
    if config is not None:
        assert f"poi-bridge status --config {config}{login}   " in err, err
        assert f"poi-bridge resync {sale_id} {service_id} --config {config}{login}   " in err, err
    else:
        assert "--config" not in err, err
        assert f"--base-topic {BASE}{login} --sale-id {sale_id} transactions   " in err, err
        assert (f"--base-topic {BASE}{login} --sale-id {sale_id} resync --service-id "
                f"{service_id}   ") in err, err
    assert err.count(OPERATOR) == (2 if operator else 0), err
    assert "Traceback" not in err and "is the bridge running?" not in err


async def test_the_lookup_after_outcome_unknown_logs_in_as_the_operator_after_a_login(
        tmp_path, mosquitto):
    """A till that logged in (the example ACL: it may pay, not ask) is told to look the
    payment up as the operator."""
    password = tmp_path / "till-password"
    password.write_text("secret\n")
    (code, _, err, _), request = await pay_through_a_stand_in(
        mosquitto, no_answer, "--amount", "1", "--timeout", "2",
        login=("--username", "TILL9", "--password-file", str(password)))
    assert_outcome_unknown(code, err, "TILL9",
                           request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"],
                           operator=True)


@pytest.mark.parametrize("username", [None, "poi-bridge"], ids=["no-login", "login"])
async def test_the_lookup_after_outcome_unknown_names_the_configuration_paid_with(
        tmp_path, mosquitto, username):
    """With --config, status and resync take the same configuration; as the operator only if
    the configuration logs in (mqtt.username)."""
    login = {}
    if username:
        (tmp_path / "password").write_text("secret\n")
        login = {"username": username, "password_file": str(tmp_path / "password")}
    config = config_file(tmp_path, mosquitto, login)
    (code, _, err, _), request = await pay_through_a_stand_in(
        mosquitto, no_answer, "--amount", "1", "--timeout", "2", login=("--config", str(config)))
    assert_outcome_unknown(code, err, "TILL9",
                           request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"],
                           config=str(config), operator=username is not None)


async def test_a_password_file_that_does_not_exist_is_said_so(tmp_path, mosquitto):
    """Not "run as a user that may read it": no user can, the file is not there."""
    missing = tmp_path / "operator-password"
    code, _, err, _ = await register(mosquitto, "--base-topic", BASE, "--username",
                                     "operator", "--password-file", str(missing), "terminals")
    assert code == 2, err
    assert (f"the MQTT password file {missing}: it does not exist: create it, or leave out "
            "--password-file") in err, err
    assert "run as a user" not in err and "Traceback" not in err


async def test_transactions_prints_an_empty_list_as_a_list(tmp_path, mosquitto):
    """No transaction for this SaleID: `[]`, as a script reading the list expects, not the
    bridge's whole answer around it."""
    async with running_bridge(tmp_path, mosquitto):
        code, out, err, _ = await register(mosquitto, "--base-topic", BASE, "--sale-id",
                                           "NOBODY", "transactions")
    assert code == 0, err
    assert json.loads(out) == [], out


async def test_a_lost_broker_connection_mid_payment_is_outcome_unknown_at_once(mosquitto):
    """The CLI's own connection drops after the payment went to the broker: the request is
    queued for the bridge and may be charged. It used to wait out its whole timeout and then
    say "no answer in time (is the bridge running?)", exit 2, without the ServiceID."""
    async def lose_the_broker(bridge: aiomqtt.Client, request: dict) -> None:
        mosquitto.kill()  # the broker goes away with the payment in its hands
        with contextlib.suppress(aiomqtt.MqttError):
            await bridge.__aexit__(None, None, None)

    (code, _, err, took), request = await pay_through_a_stand_in(
        mosquitto, lose_the_broker, "--amount", "3.10", "--timeout", "40")
    assert_outcome_unknown(code, err, "TILL9",
                           request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"])
    assert "connection to the broker was lost" in err
    assert took < 30, "waited for the payment's timeout on a connection that was gone"


async def test_a_malformed_event_is_skipped_and_the_answer_still_comes(mosquitto):
    """A non-object event ended the client's reader: the payment was then reported OUTCOME
    UNKNOWN, "connection to the broker was lost", with the connection fine."""
    async def answer(bridge: aiomqtt.Client, request: dict) -> None:
        for junk in (b"not json", b"[1, 2]", b'"text"', b"{}", b'{"event": 1}'):
            await bridge.publish(f"{BASE}/registers/TILL9/event", junk, qos=1)
        await bridge.publish(f"{BASE}/registers/TILL9/response", b"[]", qos=1)
        service_id = request["SaleToPOIRequest"]["MessageHeader"]["ServiceID"]
        await bridge.publish(f"{BASE}/registers/TILL9/event", json.dumps(
            {"event": "accepted", "detail": "after the junk",
             "transaction": {"sale_id": "TILL9", "service_id": service_id}}), qos=1)
        await approve(bridge, request)

    (code, out, err, _), _ = await pay_through_a_stand_in(mosquitto, answer, "--amount", "1",
                                                          "--timeout", "20")
    assert code == 0, err
    assert f"on {POI}: approved" in out
    assert ". accepted after the junk" in err  # still reading
    assert err.count("skipped a malformed message") == 1, err
    assert (f"skipped a malformed message on {BASE}/registers/TILL9/event (not a JSON "
            "object); any more are skipped silently") in err
    assert "Traceback" not in err and "lost" not in err


async def test_pay_shows_the_amount_as_the_request_carries_it(mosquitto):
    """An amount of 0.001 was shown as "EUR 0.00" (rounded to cents), not what was sent."""
    (code, _, err, _), request = await pay_through_a_stand_in(
        mosquitto, approve, "--amount", "0.001", "--timeout", "20")
    assert code == 0, err
    sent = request["SaleToPOIRequest"]["PaymentRequest"]["PaymentTransaction"]["AmountsReq"]
    assert sent["RequestedAmount"] == 0.001
    assert f"on terminal {POI}, EUR 0.001\n" in err, err


async def test_broker_option_takes_a_host_alone_or_host_and_port(tmp_path, mosquitto):
    """`--broker localhost` said "--broker: Input should be a valid integer" (the host was
    taken for the port). A host alone keeps the configuration's port (1883 without one)."""
    config = config_file(tmp_path, mosquitto, {})
    for broker in ("localhost", f"localhost:{mosquitto.port}", f"127.0.0.1:{mosquitto.port}"):
        done = await asyncio.to_thread(run_cli, "register", "--config", str(config), "--broker",
                                       broker, "--base-topic", "nobody/here", "terminals")
        # It connected: the broker was asked for the bridge's retained state.
        assert done.returncode == 2 and "no bridge has announced itself" in done.stderr, (
            broker, done.stderr)
    done = await asyncio.to_thread(run_cli, "register", "--broker", "localhost:notaport",
                                   "terminals")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--broker: 'notaport' is not a port number" in done.stderr, done.stderr


@pytest.mark.parametrize("amount", ["-1", "nan", "inf", "-0.01", "twelve"])
def test_pay_refuses_an_amount_that_is_not_a_finite_number_of_0_or_more(amount):
    done = run_cli("register", "--broker", "127.0.0.1:9", "pay", "--terminal", POI,
                   f"--amount={amount}")
    assert done.returncode == 2
    assert (f"argument --amount: {amount!r} is not an amount: give a finite number of 0 "
            "or more, e.g. 12.50") in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "cannot connect" not in done.stderr


@pytest.mark.parametrize("options, said", [
    (["--sale-id", "TILL#1", "pay", "--terminal", POI, "--amount", "1"], "--sale-id 'TILL#1'"),
    (["pay", "--terminal", "V400m+1", "--amount", "1"], "--terminal 'V400m+1'"),
    (["pay", "--terminal", "V" * 70000, "--amount", "1"], "--terminal 'VVVV"),
    (["pay", "--terminal", POI, "--amount", "1", "--service-id", "x" * 70],
     "--service-id 'xxxx"),
    (["pay", "--terminal", POI, "--amount", "1", "--timeout", "nan"], "is not a time-out"),
    (["pay", "--terminal", POI, "--amount", "1", "--timeout", "0"], "is not a time-out"),
    (["--broker", "localhost:\u00b9\u2078\u2078\u00b3", "terminals"], "is not a port number"),
])
def test_ids_and_options_the_bridge_would_refuse_are_refused_before_sending(options, said):
    """A wildcard in a topic made paho raise (a traceback); an ID the bridge refuses under
    another ID (cut to 64, or on bridge/error) was waited for and reported OUTCOME UNKNOWN;
    a time-out of nan published a payment and gave up at once."""
    broker = [] if options[0] == "--broker" else ["--broker", "127.0.0.1:9"]
    done = run_cli("register", *broker, *options)
    assert done.returncode == 2, done.stderr
    assert said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "cannot connect" not in done.stderr


async def test_acting_as_a_till_by_hand_leaves_the_tills_session_alone(mosquitto):
    """`register --sale-id TILL1` once connected as `register-TILL1` with a clean session: the
    id a till keeps its persistent session under. The till was taken off the broker and the
    results queued for it while it was away were thrown away. The command has its own id."""
    async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1", base_topic=BASE):
        pass  # the till subscribes, then goes away: its session and subscription are kept
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="bridge") as bridge:
        await bridge.publish(f"{BASE}/registers/TILL1/response", json.dumps(
            {"bridge": {"outcome": "approved", "transaction": {"service_id": "S1"}}}), qos=1)
    code, _, err, _ = await register(mosquitto, "--base-topic", BASE, "--sale-id", "TILL1",
                                     "terminals")
    assert code == 2 and "no bridge has announced itself" in err  # it did connect, though
    async with RegisterClient(mosquitto.host, mosquitto.port, "TILL1",
                              base_topic=BASE) as till:
        async with asyncio.timeout(10):
            while not till.responses:
                await asyncio.sleep(0.05)
    assert till.responses[0]["bridge"]["transaction"]["service_id"] == "S1"
    log = mosquitto.log_path.read_text()
    assert f" as poi-bridge-cli-{socket.gethostname()}-" in log, log


def test_an_ipv6_broker_is_named_in_brackets():
    """`::1:1883` reads as an address alone; `[::1]:1883`, as --broker takes it, is the
    address and its port, and can be typed back."""
    with socket.socket(socket.AF_INET6) as sock:  # a port nothing listens on
        try:
            sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
        port = sock.getsockname()[1]
    done = run_cli("register", "--broker", f"[::1]:{port}", "terminals")
    assert done.returncode == 2, done.stderr
    assert f"cannot connect to the broker [::1]:{port}: " in done.stderr, done.stderr

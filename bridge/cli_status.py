"""`poi-bridge status` and `poi-bridge resync`: the technician's view of a running bridge."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiomqtt

from bridge.addresses import host_port
from bridge.cli_register import seconds
from bridge.config import ConfigError, load_config_as_run_does
from bridge.daemon.disk_room import short_of_room
from bridge.daemon.journal import Journal, JournalError
from bridge.daemon.registers import summary
from bridge.register_client import (
    ConnectionSetupError,
    PublishRefusedByBroker,
    RegisterClient,
    cli_client_id,
    command_line_login,
    connection_problem,
    option_names,
    partial_advice,
    refused_advice,
    unseen_refusal,
)


def _login_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--username", help="log in as this user instead of the "
                        "configuration's mqtt.username (the bridge's own login, which a broker "
                        "ACL may not let send commands: e.g. operator)")
    parser.add_argument("--password-file", type=Path, metavar="FILE",
                        help="that user's password: the whole file, without its trailing line "
                             "end")


def add_parser(subparsers: Any) -> None:
    status = subparsers.add_parser(
        "status", help="terminals, open and unresolved transactions",
        description="Read the journal and ask the running daemon (over MQTT) how it stands. "
                    "Exit status 0 when the daemon answered, 1 when the broker was reached "
                    "but no daemon answered, 2 when the broker could not be asked or "
                    "refused the question (its ACL: log in as the operator), or the "
                    "configuration or journal cannot be read.")
    status.add_argument("--config", required=True)
    _login_options(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=run_status)
    resync = subparsers.add_parser(
        "resync", help="ask the terminal now about a transaction and republish its result",
        description="The manual 'download' of a sale: the running daemon polls the terminal "
                    "for SALEID/SERVICEID and publishes the result to the register again.")
    resync.add_argument("sale_id", metavar="SALEID")
    resync.add_argument("service_id", metavar="SERVICEID")
    resync.add_argument("--config", required=True)
    _login_options(resync)
    resync.add_argument("--wait", type=seconds, default=60.0,
                        help="seconds to wait for the result (default 60)")
    resync.add_argument("--json", action="store_true")
    resync.set_defaults(handler=run_resync)


def _load(args: argparse.Namespace, command: str) -> Any:
    """The configuration, its login replaced by --username and --password-file if given."""
    try:
        config = load_config_as_run_does(
            args.config, lambda line: print(f"poi-bridge {command}: {line}", file=sys.stderr))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.path}: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    login = command_line_login(args.username, args.password_file)
    return config.model_copy(update={"mqtt": config.mqtt.model_copy(update=login)})


class _NoAnswer(Exception):
    """The broker took the command (as far as it said), the daemon did not answer it."""

    def __init__(self, protocol: str | None) -> None:
        self.protocol = protocol


async def _ask_daemon(config: Any, *commands: str,
                      timeout: float = 3.0) -> dict[str, dict[str, Any]]:
    """The daemon's answer to each command, by name. ConnectionSetupError or
    aiomqtt.MqttError when the broker could not be reached or refused us (see
    connection_problem), PublishRefusedByBroker when it refused a command, _NoAnswer when
    nobody answered."""
    async with RegisterClient.for_bridge(config.mqtt, "poi-bridge-cli", persistent=False,
                                         client_id=cli_client_id()) as client:
        try:  # (asked at once: each answer within the one timeout)
            answers = await asyncio.gather(*(client.command(command, None, timeout=timeout)
                                             for command in commands))
        except TimeoutError:
            raise _NoAnswer(client.protocol) from None
        return dict(zip(commands, answers, strict=True))


def run_status(args: argparse.Namespace) -> int:
    config = _load(args, "status")
    try:
        journal = Journal(config.journal, readonly=True)
    except JournalError as exc:
        print(f"poi-bridge status: {exc}", file=sys.stderr)
        return 2
    counts = journal.counts()
    open_txns = [summary(t) for t in journal.open_transactions()]
    journal.close()
    terminals: dict[str, Any] = {}
    health: dict[str, Any] = {}
    problem = None  # the broker could not be asked: the daemon's state is not known
    note = None
    try:
        answers = asyncio.run(_ask_daemon(config, "terminals", "health"))
        terminals, health = answers["terminals"], answers["health"].get("data") or {}
        daemon = "running"
    except _NoAnswer as exc:
        daemon = "not reachable over MQTT"
        note = (f"no daemon answered on {config.mqtt.base_topic}/bridge/response/terminals "
                f"(the broker took the question): is poi-bridge running (systemctl status "
                f"poi-bridge), and is its mqtt.base_topic {config.mqtt.base_topic}?"
                + unseen_refusal(exc.protocol))
    except PublishRefusedByBroker as exc:
        problem = f"{exc}; {refused_advice(config.mqtt.base_topic)}"
        daemon = "unknown: the broker refused the question"
    except (ConnectionSetupError, aiomqtt.MqttError, OSError) as exc:
        problem = connection_problem(exc, config.mqtt, option_names(config.mqtt, args))
        daemon = "unknown: the broker could not be asked"
    report = {
        "journal": str(config.journal), "counts": counts, "open_transactions": open_txns,
        # (a daemon short of room waits off the broker: it cannot answer for itself)
        "journal_disk_short": short_of_room(config.journal),
        "daemon": daemon, "mqtt_error": problem,
        "terminals": terminals.get("data") or [
            {"poi_id": t.poi_id, "state": "unknown"} for t in config.terminals],
        # Another bridge on these topics: the daemon takes no new request while it is seen
        # (bridge.daemon.peers), and its terminals still read "online"
        "other_bridges": health.get("other_bridges") or [],
    }
    status = 2 if problem else 1 if note else 0
    if args.json:
        print(json.dumps(report, indent=1))
        if problem or note:
            print(f"poi-bridge status: {problem or note}", file=sys.stderr)
        return status
    print(f"daemon: {report['daemon']}  (broker {host_port(config.mqtt.host, config.mqtt.port)})")
    if problem or note:
        print(f"  {problem or note}")
    if report["journal_disk_short"] and daemon == "running":
        # (it waits for room only at a start: running, it goes on until a commit fails)
        print(f"  JOURNAL DISK NEARLY FULL: {report['journal_disk_short']}: make room now; a "
              "commit that fails stops the daemon, which then takes no payment until there is")
    elif report["journal_disk_short"]:
        print(f"  JOURNAL DISK FULL: {report['journal_disk_short']}: the daemon takes no "
              "payment until there is room; make room, and it starts by itself")
    if report["other_bridges"]:
        print(f"  REFUSING EVERY NEW REQUEST: another poi-bridge serves these topics too "
              f"({'; '.join(map(str, report['other_bridges']))}); both refuse, so that no "
              "payment is charged twice. Stop one of the two (systemctl stop poi-bridge on "
              "the box that must not serve this store), or give it its own mqtt.base_topic "
              "and mqtt.client_id")
    print(f"journal {report['journal']}: {counts['in_flight']} in flight, "
          f"{counts['unresolved']} unresolved, {counts['undelivered']} messages not yet "
          "delivered to the broker")
    for terminal in report["terminals"]:
        detail = f" ({terminal['detail']})" if terminal.get("detail") else ""
        identity = terminal.get("identity")
        state = terminal["state"]
        unanswered = terminal.get("identity_checks_unanswered")
        if state in ("online", "busy") and identity == "unknown" and unanswered == 0:
            # Just plugged in: its first identity check is out, nothing has failed yet
            state = (f"{state}, identity check in progress (requests wait for the terminal "
                     "to say which terminal it is)")
        elif state in ("online", "busy") and identity == "unknown":
            # The link is up, but the device has not said it is this terminal (the daemon's
            # state document): every request is refused, so not "online" to a technician.
            # (A daemon older than the count does not say how many; older than the reason,
            # not why: a crypto error is an answer, so "failed", not "unanswered", with it.)
            failed = terminal.get("identity_check_failed")
            counted = "" if not isinstance(unanswered, int) else (
                f"{unanswered} identity check{'' if unanswered == 1 else 's'} "
                + (f"failed (the last: {failed}); " if isinstance(failed, str) and failed
                   else "unanswered; "))
            state = (f"identity not confirmed: {counted}requests are refused until the "
                     "terminal answers one (check the framer, key and cable)")
        elif state in ("online", "busy") and isinstance(identity, str) \
                and identity.startswith("mismatch"):
            # (the link is up, but no request is taken: "online" above it read as all well)
            state = "link up, but the wrong terminal: every request is refused (see below)"
        print(f"  terminal {terminal['poi_id']}: {state}{detail}")
        counters = terminal.get("counters") or {}  # (a daemon older than them has none)
        if counters.get("noise_bytes"):
            print(f"    line noise: {counters['noise_bytes']} bytes that were no frame "
                  f"({counters.get('framing_errors', 0)} framing errors) and "
                  f"{counters.get('frames_in', 0)} frames read since the daemon started; many "
                  "such bytes: a wrong baud rate or framer, a damaged cable, or another "
                  "device on the port")
        rotating = next((t for t in config.terminals
                         if t.poi_id == terminal["poi_id"] and t.previous_key), None)
        if rotating is not None and terminal.get("state") != "unknown":
            new, old = (f"{k.identifier} v{k.version}"
                        for k in (rotating.key, rotating.previous_key))
            heard = terminal.get("key")
            print("    key rotation: " + (
                "the terminal has not been heard from since the daemon started: which key it "
                "holds is not known yet" if not heard else
                f"the terminal still holds the old key ({old}, its previous_key)" if heard == old
                else f"the terminal holds the new key ({new}); previous_key {old} may go once "
                "every terminal does" if heard == new else
                f"the terminal's messages come with {heard}, which this configuration does "
                "not hold (the daemon runs with another: restart it)"))
        if isinstance(identity, str) and identity.startswith("mismatch"):
            said = identity.partition(":")[2].strip() or "another terminal"
            print(f"    IDENTITY MISMATCH: the device on this terminal's link says it is "
                  f"{said}: every request for {terminal['poi_id']} is refused until this is "
                  "fixed; check which terminal is plugged into which port (or the "
                  "configuration), then replug")
    for txn in open_txns:
        print(f"  {txn['state']:>17}  {txn['sale_id']}/{txn['service_id']} on {txn['poi_id']} "
              f"{txn['category']}, {txn['polls']} poll(s): {txn['detail']}")
    if not open_txns:
        print("  no open transactions")
    return status


async def _resync(args: argparse.Namespace, config: Any) -> int:
    async with RegisterClient.for_bridge(config.mqtt, args.sale_id, persistent=False,
                                         client_id=cli_client_id()) as client:
        try:
            answer = await client.command("resync", {"sale_id": args.sale_id,
                                                     "service_id": args.service_id})
        except TimeoutError:
            print("poi-bridge resync: the daemon did not answer (is it running?)"
                  + unseen_refusal(client.protocol), file=sys.stderr)
            return 2
        if answer.get("status") != "ok":
            print(f"poi-bridge resync: {answer.get('error')}", file=sys.stderr)
            return 2
        print(answer["data"]["action"], file=sys.stderr)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.wait
        while loop.time() < deadline:
            for result in client.responses:
                ids = result["bridge"]["transaction"]
                if ids["service_id"] == args.service_id:
                    info = result["bridge"]
                    print(json.dumps(result, indent=1) if args.json else
                          f"{args.sale_id}/{args.service_id}: {info['outcome']} "
                          f"(source {info['source']})"
                          + (f": {partial_advice(info)}"
                             if info["outcome"] == "partially_approved" else ""))
                    return 0
            await asyncio.sleep(0.1)
    print("poi-bridge resync: no result within the wait; the bridge keeps trying",
          file=sys.stderr)
    return 1


def run_resync(args: argparse.Namespace) -> int:
    config = _load(args, "resync")
    try:
        return asyncio.run(_resync(args, config))
    except PublishRefusedByBroker as exc:
        print(f"poi-bridge resync: {exc}; {refused_advice(config.mqtt.base_topic)}",
              file=sys.stderr)
        return 2
    except TimeoutError:  # (an OSError: before the connection errors)
        print("poi-bridge resync: the daemon did not answer (is it running?)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # standard output closed (`| head`): bridge.cli ends quietly
    except (ConnectionSetupError, aiomqtt.MqttError, OSError) as exc:
        names = option_names(config.mqtt, args)
        print(f"poi-bridge resync: {connection_problem(exc, config.mqtt, names)}",
              file=sys.stderr)
        return 2

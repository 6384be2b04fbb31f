"""The fault-injection soak: many terminals, several registers, chaos, then an audit.

    PYTHONPATH=. .venv/bin/python bench/soak.py                # ~3 minutes, seed 1
    PYTHONPATH=. .venv/bin/python bench/soak.py --duration 900 --seed 7 --terminals 12

What runs (all real processes, as on a store box):

- mosquitto on a free port with persistence (tests/broker.py);
- N simulated terminals (bench/soak_terminal.py: `poi-bridge simulate --pty --link ...` with a
  control channel on stdin), each on its own pseudo-terminal behind a symlink, each with a
  ledger of what the shopper did, some with line noise (garbage_rate) and damaged frames
  (corrupt_rate, which the framer NAKs);
- the bridge, `python -m bridge run --config soak.toml`, short time-outs;
- with `--keys shared` or `--keys per-terminal`, local encryption on every link: the
  terminals and the bridge's configuration share one key, or each terminal has its own (so
  a swapped cable puts a device the terminal's key cannot read on its link, and the bridge
  must ask it again with the other terminals' keys to follow it); with `--keys rotation`,
  each terminal's own key in two versions, as in a key rotation: its device holds version 1,
  the configuration has both (half with the new one as `key` and version 1 as
  `previous_key`, half the other way round), and a chaos event (terminal_rekey) makes a
  device take up version 2 while the bridge runs. The passphrases are
  random, written to files in the workdir's keys/ (mode 0600) and named only by path; after
  the run every other file in the workdir is searched for them (a hit fails the run as
  leaked);
- R registers (MQTT clients, persistent sessions, one SaleID each) paying continuously. The
  amount's range picks the terminal's behaviour for that payment (approve, decline, response
  lost, link dropped mid-payment, request lost, slow, in progress, busy...), see KINDS; within
  it every payment of the run has an amount of its own (payment_amount), so a result handed
  to another payment, even one of the same kind, carries an amount that is not its own. A
  register never re-sends a payment: every payment has a fresh ServiceID and
  SaleTransactionID; when it gets `unresolved` it goes on with the next sale and keeps
  listening for the final outcome; sometimes it aborts a slow payment from the register
  (AbortRequest);
- a chaos loop driven by random.Random(seed): kill -9 (and clean restarts of) mosquitto,
  SIGKILL (and SIGTERM) of the daemon, terminals unplugged for a while and replugged,
  two terminals' cables swapped (each simulator plugged back in at the other's configured
  link; the daemon's configuration unchanged, so it must follow them, and follow them back),
  terminals frozen (no ACK, no answer: every frame they drop unread is in their ledgers all
  the same, a money request as a receipt "dropped"), registers going away and coming back.

The chaos always ends the same way (the finale): a SIGTERM of the daemon while the registers
pay (`systemctl restart` during business), then a power blip (a terminal drops off and the
daemon is SIGKILLed and restarted while it is away), then quiet.

Then everything is brought back, the bridge is given time to resolve what is open and deliver
its outbox, and each payment is audited three ways: the terminals' ledgers (what was
charged), what the registers were told, and what the journal holds; mosquitto's own log
(log_type all, replayed) tells a request the broker lost in a kill -9 (before its next
autosave) from one the bridge acknowledged and then dropped. Exit status 1, with a loud
banner, if anything is

  lost      charged but not reported approved (a charged payment the register was told
            only `unresolved` about included, whatever the bridge's reason, unless the
            terminal answered the bridge NotFound about it after it had charged it, i.e. it
            forgot it: that one is explained, under a count of its own, printed loudly; the
            simulator never forgets one, so with it that never happens), a request never
            answered, a result never delivered (unless mosquitto demonstrably lost it in a
            kill -9),
  doubled   charged twice, charged on two terminals, or a money request that reached its
            terminal a second time other than as a link-level retransmission of the same
            frame (the terminal's ledger counts every receipt, processed or answered Busy,
            lost on purpose, unreadable, or dropped unread while the terminal was muted; it
            does not process a repeated ServiceID, a real terminal might). A copy is the
            framer's only if the simulator flagged it (byte for byte the frame just before,
            within max_tries and RETRANSMIT_WINDOW, before the bridge acknowledged the
            terminal's answer) and it came before the terminal's ACK of the copy before could
            reach the bridge (an ACK a NAK of the terminal's may have undone does not count;
            a dropped copy was never acknowledged) within COPY_GAP_MAX of it, or one of the
            soak's own daemon freezes spans the gap (link_level_copy). A BLIND RE-SEND is
            the case that only the muted terminal's record of what it dropped shows: the
            payment reached the terminal again, other than as such a copy, after a copy it
            had dropped unread (the bridge sent the payment again instead of asking about
            it), or the register's sale (its SaleTransactionID) came again under a ServiceID
            no register sent (that request is unsolicited too),
  unsolicited
            a money request in a terminal's ledger that no register sent, whatever its
            category and whatever became of it (charged or not: a Reversal moves money too),
            or a register's payment that reached a terminal as another category or with a
            PaymentType other than Normal (the soak's registers send only Payments, with no
            PaymentType),
  phantom   reported approved but not charged,
  wrong terminal
            charged by (or a money request reached, even one answered Busy or unreadable)
            another terminal than the one the payment was addressed to (POIID): the bridge
            sent it to the wrong device,
  wrong amount
            a terminal read another amount or currency than the register asked, charged
            another amount, or an approved result does not carry the amount asked
            (AuthorizedAmount); every payment's amount is its own, so this is also how a
            payment given another's request or result (of the same kind too) shows; the
            payment the amount belongs to is named,
  wrong sale
            a result the register received for a payment (final or not) names another sale
            than the payment's own: the SaleData.SaleTransactionID.TransactionID it carries,
            which the terminal echoes from the request in its every answer about a Payment
            (approved, declined, cancelled, aborted, Busy; a status poll's record too, which
            the bridge hands on rebuilt as the PaymentResponse), is another payment's (each
            has its own). This is how two results with no amount of their own (a declined,
            cancelled or aborted one authorises 0) handed to each other's payments show; the
            payment the sale belongs to is named. Not covered: what the bridge says in its
            own words (its refusals, Busy or offline included, `unresolved`, a status poll's
            `not_found`, which carries no PaymentResponse): no SaleData, nothing to compare
            (the report counts the results compared),
  disputed  register and journal disagree (a final outcome at the register with no journal
            row counts, except a "shutting down" refusal the bridge produced while draining
            after a SIGTERM: the only refusal before journaling the soak's registers can
            get), or two different final outcomes,
  stuck     a journal row not final or unresolved, an outbox message never delivered, an
            unresolved transaction the bridge did not resolve although everything was back
            (except one it gave up on by design: the terminal's NotFound came after it had
            taken another payment, so it may have forgotten this one; explained instead),
            a terminal the bridge keeps offline although it is plugged in, or keeps on a
            link whose device says it is another terminal (swapped cables not followed),
  incomplete
            an unresolved payment nothing explains when everything was back for less than
            HEALTHY_ENOUGH seconds: the audit cannot tell whether the bridge would have
            resolved it,
  crashed   the daemon or a simulated terminal exited on its own, a SIGTERM of the chaos
            (the finale's too) had to be followed by SIGKILL or ended in an error status, or
            the daemon's final SIGTERM did not end with exit status 0,
  leaked    (with --keys) a key's passphrase, or key material derived from it (hex, base64
            or raw), in a log, the journal, the broker's files, a ledger or the audit,
  too few   the floor: no payment, fewer approved than APPROVALS_PER_REGISTER_SECOND per
            register and second of chaos, or a terminal addressed, or a register that paid,
            TERMINAL_FLOOR_PAYMENTS times or more with none approved (nothing is lost in a
            run that proves nothing).

Anything left unresolved is listed with the reason. Problems that are symptoms of a bridge
bug already found are tagged with it (KNOWN_BUGS); they still fail the run. An exception
inside the audit itself ends the run with its own banner ("SOAK FAILED: the audit itself
crashed"), an audit.json that holds the traceback, the workdir kept, and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import calendar
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiomqtt

from bench.soak_terminal import DROPPED_UNREAD
from bridge.protocol.outcome import dig
from bridge.simulator.responses import payment_request
from tests.broker import Mosquitto, find_mosquitto

BASE = "poi-bridge"
HERE = Path(__file__).resolve().parent

# --- what a payment does on the terminal, chosen by its amount ------------------------------------

# kind: (base amount, weight, scenario behaviour). A kind's scenario entry takes every amount
# from its base up to KIND_SPAN above it (amount_below), so the register picks the terminal's
# behaviour by the range, and each payment has an amount of its own in it (payment_amount).
KINDS: dict[str, tuple[float, int, dict[str, Any]]] = {
    "approve": (1000.0, 30, {"decision": "approve", "delay": 0.2}),
    "approve_slow": (1100.0, 6, {"decision": "approve", "delay": 1.2}),
    "decline": (2000.0, 10, {"decision": "decline", "delay": 0.2}),
    "cancel": (2100.0, 3, {"decision": "cancel", "delay": 0.3}),
    "busy": (2200.0, 2, {"decision": "busy", "delay": 0.1}),
    # the terminal refuses it (Busy) and that answer is lost: only a status poll can tell
    "busy_response_lost": (2300.0, 1, {"decision": "busy", "delay": 0.1,
                                       "never_answer": True}),
    "response_lost": (3000.0, 8, {"decision": "approve", "delay": 0.3, "never_answer": True}),
    "response_lost_decline": (3100.0, 3, {"decision": "decline", "delay": 0.3,
                                          "never_answer": True}),
    "late_response": (3200.0, 3, {"decision": "approve", "delay": 2.4}),
    "in_progress": (3300.0, 3, {"decision": "approve", "delay": 0.5, "never_answer": True,
                                "in_progress_polls": 3}),
    "very_slow": (3400.0, 2, {"decision": "approve", "delay": 4.0, "never_answer": True}),
    "link_drop": (4000.0, 5, {"decision": "approve", "delay": 0.3, "drop_link": True}),
    "link_drop_decline": (4100.0, 2, {"decision": "decline", "delay": 0.3, "drop_link": True}),
    "request_lost": (5000.0, 3, {"decision": "approve", "lose_request": True}),
}
# The width of a kind's range of amounts: a cent apart, 10000 payments of a kind have
# amounts of their own (then they come round again).
KIND_SPAN = 100.0


def payment_amount(kind: str, nth: int) -> float:
    """The amount of the run's `nth` payment (from 0) of `kind`: its base plus nth cents,
    within KIND_SPAN. Unique in the run (the kinds' ranges do not meet), so a result or a
    request handed to another payment of the same kind shows by its amount."""
    return round(KINDS[kind][0] + (nth % round(KIND_SPAN * 100)) / 100, 2)

ABORTABLE = {"approve_slow", "late_response", "very_slow"}
ABORT_CHANCE = 0.25

CHAOS_KINDS: dict[str, float] = {  # kind -> weight
    "broker_kill9": 1.0,
    "broker_restart": 0.4,
    "daemon_kill9": 1.5,
    "daemon_sigterm": 0.5,
    "daemon_freeze": 0.5,  # SIGSTOP/SIGCONT: the box hangs a moment (VM paused, swap storm)
    "terminal_unplug": 3.0,
    # A technician swaps two terminals' cables (or swaps them back): the daemon must follow.
    "terminal_swap": 2.5,
    "terminal_freeze": 1.5,
    "terminal_stall": 1.0,
    "register_away": 1.0,
    # The store's power flickers: a terminal drops off and the box (the daemon) restarts
    # while it is away.
    "power_blip": 0.5,
}

# The daemon's framing on every terminal link (soak.toml): a frame goes out max_tries times
# at most, each copy ack_timeout after the one before found no ACK (or at once on a NAK).
ACK_TIMEOUT = 0.5
MAX_TRIES = 3
# What a loaded box may add to the daemon's timings (its event loop busy a moment).
LINK_SLACK = 1.0
# A copy of a request frame is the daemon's framer's (link_level_copy) only if it came
# within this long of the copy before it...
COPY_GAP_MAX = (MAX_TRIES - 1) * ACK_TIMEOUT + LINK_SLACK
# ... before the terminal's ACK of that copy could have reached the daemon: an ACK out for
# less than this when the copy came may have crossed it on the line, or waited behind a busy
# event loop. Or one of the soak's own daemon freezes spans the gap (its timer fires on
# waking, before it reads the ACK).
ACK_CROSSING = ACK_TIMEOUT
# The longest the chaos freezes the daemon (SIGSTOP: daemon_freeze, 0.3 + 5 / 2 s; the
# finale's freeze while mosquitto is killed, about 2.7 s).
DAEMON_FREEZE_MAX = 3.0
# The simulators flag a byte-identical copy of the frame just before as a possible
# retransmission up to this long after its first copy (bridge/simulator/server.py): an outer
# bound, the framer's retry span with the longest freeze in it. The audit judges each flagged
# copy on its own (link_level_copy), against the freezes the soak really made.
RETRANSMIT_WINDOW = MAX_TRIES * ACK_TIMEOUT + DAEMON_FREEZE_MAX + LINK_SLACK

OPEN_STATES = ("accepted", "awaiting_response", "polling")
# what the soak's state watcher counts as out of service: offline, or on a link whose device
# says it is another terminal (identity mismatch: the bridge refuses its payments)
OUT = ("offline", "wrong device")
OFFLINE_LIMIT = 15.0  # the worker's reopen backoff is 10 s at most
# autosave_interval 1, counted in whole seconds: a kill -9 loses up to ~2 s of changes
BROKER_LOSS_WINDOW = 2.5


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def clock(at: float) -> str:
    """Wall-clock time of day with milliseconds, as in the daemon's log lines."""
    return time.strftime("%H:%M:%S", time.localtime(at)) + f",{int(at % 1 * 1000):03d}"


def iso_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


# --- the pieces ------------------------------------------------------------------------------------

class Terminal:
    """One simulated terminal process (bench/soak_terminal.py)."""

    def __init__(self, index: int, workdir: Path, seed: int, rng: random.Random) -> None:
        self.index = index
        self.poi_id = f"V400m-{100000 + index}"
        self.dir = workdir / f"terminal{index}"
        self.dir.mkdir(parents=True, exist_ok=True)
        # The daemon's configuration names this path for this terminal, always; the
        # simulator is plugged in at `plugged_at`, another terminal's path after a swap.
        self.configured_link = self.dir / "tty"
        self.plugged_at = self.configured_link
        self.ledger_path = self.dir / "ledger.json"
        self.garbage_rate = rng.choice([0.0, 0.0, 0.05, 0.15, 0.3])
        self.corrupt_rate = rng.choice([0.0, 0.0, 0.03, 0.08, 0.15])
        self.replug_after = rng.choice([0.3, 1.0, 2.5, 4.0])
        self.seed = seed * 1000 + index
        self.process: subprocess.Popen[bytes] | None = None
        self.unplugged_until = 0.0
        self.frozen_until = 0.0
        self.unplugs: list[tuple[float, float]] = []  # (from, until), monotonic
        self.offline_reported = False
        # Local encryption (--keys): the key this terminal encrypts with, wherever its cable
        # goes; the daemon's configuration gives the same key to this POIID.
        self.key: SoakKey | None = None
        # --keys rotation: the configuration's key and previous_key, and the key the device
        # takes up at a terminal_rekey event (None once it has)
        self.configured_keys: list[SoakKey] = []
        self.rekey_to: SoakKey | None = None
        # every frame it dropped unread while muted, any category (from its ledger file)
        self.dropped_unread: list[dict[str, Any]] = []

    def unplug(self, seconds: float) -> None:
        self._away(seconds)
        self.control(f"unplug {seconds:.2f}")

    def move(self, path: Path, seconds: float) -> None:
        """Pull the cable and plug it in at `path` (another terminal's port) after
        `seconds`."""
        self._away(seconds)
        self.plugged_at = path
        self.control(f"move {path} {seconds:.2f}")

    def _away(self, seconds: float) -> None:
        now = time.monotonic()
        self.unplugged_until = now + seconds
        self.unplugs.append((now, now + seconds))

    async def stall(self, seconds: float) -> None:
        """Freeze the simulator process for `seconds`; returns once it has begun."""
        assert self.process is not None and self.process.stdout is not None
        self.control(f"stall {seconds:.2f}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), 5)

    def unplugged_at(self, moment: float) -> bool:
        return any(a <= moment <= b + 0.5 for a, b in self.unplugs)

    def scenario(self) -> dict[str, Any]:
        return {
            "poi_id": self.poi_id,
            "default": {"decision": "approve", "delay": 0.2},
            "transactions": [{"amount": amount, "amount_below": amount + KIND_SPAN,
                              **behaviour} for amount, _, behaviour in KINDS.values()],
            "link": {"garbage_rate": self.garbage_rate, "corrupt_rate": self.corrupt_rate,
                     "replug_after": self.replug_after, "seed": self.seed,
                     "retransmit_window": RETRANSMIT_WINDOW},
        }

    def start(self) -> None:
        path = self.dir / "scenario.json"
        path.write_text(json.dumps(self.scenario(), indent=1))
        stderr = open(self.dir / "simulator.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "soak_terminal.py"), "--pty", "--link",
             str(self.plugged_at), "--poi-id", self.poi_id, "--scenario", str(path), "--ledger",
             str(self.ledger_path), *(self.key.simulator_args() if self.key else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=python_env(),
            cwd=ROOT)
        stderr.close()

    def wait_started(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        if not self.process.stdout.readline():
            raise RuntimeError(f"terminal {self.poi_id} did not start: "
                               + (self.dir / "simulator.log").read_text()[-2000:])

    def control(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def stop(self) -> dict[str, Any] | None:
        """SIGTERM: the simulator writes its ledger and exits. Returns its money requests;
        the frames it dropped unread while muted go to dropped_unread."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.ledger_path.exists():
            return None  # it died without writing one: reported as a crash
        ledger = json.loads(self.ledger_path.read_text())
        self.dropped_unread = ledger.pop(DROPPED_UNREAD, [])
        return ledger


@dataclass(frozen=True)
class SoakKey:
    """A local encryption key of the soak: its passphrase lives only in `passphrase_file`
    (and in memory here, for the leak check); everything else names the file."""

    identifier: str
    passphrase_file: Path
    passphrase: str = field(repr=False)
    version: int = 1

    def simulator_args(self) -> list[str]:
        return ["--key-id", self.identifier, "--key-version", str(self.version),
                "--passphrase-file", str(self.passphrase_file)]

    def config_lines(self, table: str = "key") -> list[str]:
        return [f"[terminals.{table}]", f'identifier = "{self.identifier}"',
                f"version = {self.version}", f'passphrase_file = "{self.passphrase_file}"']


KEY_MODES = ("none", "shared", "per-terminal", "rotation")


def make_keys(terminals: list[Terminal], workdir: Path, mode: str) -> list[SoakKey]:
    """Give `terminals` keys as `mode` says (KEY_MODES): none, one for all, or one each.
    The passphrases are random (the chaos stays seeded: nothing of it depends on them)."""
    if mode == "none":
        return []
    folder = workdir / "keys"
    folder.mkdir(mode=0o700, exist_ok=True)

    def new_key(name: str, version: int = 1) -> SoakKey:
        path = folder / f"{name}-v{version}.passphrase"
        passphrase = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(passphrase + "\n")
        return SoakKey(f"SoakKey-{name}", path, passphrase, version)

    if mode == "shared":
        keys = [new_key("shared")]
        for terminal in terminals:
            terminal.key = keys[0]
        return keys
    if mode == "rotation":
        keys = []
        for terminal in terminals:
            old, new = new_key(terminal.poi_id, 1), new_key(terminal.poi_id, 2)
            terminal.key, terminal.rekey_to = old, new
            # Half set up with the new key ahead (the bridge first), half the other way
            terminal.configured_keys = [new, old] if terminal.index % 2 == 0 else [old, new]
            keys += [old, new]
        return keys
    for terminal in terminals:
        terminal.key = new_key(terminal.poi_id)
    return [t.key for t in terminals if t.key is not None]


def key_material(key: SoakKey) -> dict[str, list[bytes]]:
    """What of `key` must never be written anywhere, by name: the passphrase, and the
    material bridge/protocol/crypto.py derives from it (PBKDF2-HMAC-SHA1, its salt and
    iterations: 80 bytes, the HMAC key, the AES key and the IV), each as raw bytes, as hex
    (either case), as base64 (standard and URL-safe, with and without padding) and as a
    Python bytes literal."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    from bridge.protocol import crypto

    material = PBKDF2HMAC(algorithm=hashes.SHA1(), length=80, salt=crypto.KDF_SALT,
                          iterations=crypto.KDF_ITERATIONS).derive(key.passphrase.encode())
    found = {"the passphrase": [key.passphrase.encode()]}
    for name, part in (("the derived key material", material),
                       ("the derived HMAC key", material[0:32]),
                       ("the derived AES key", material[32:64]),
                       ("the derived IV", material[64:80])):
        b64 = base64.b64encode(part)
        url = base64.urlsafe_b64encode(part)
        found[name] = list(dict.fromkeys([
            part, part.hex().encode(), part.hex().upper().encode(), b64, url,
            b64.rstrip(b"="), url.rstrip(b"="), repr(part)[2:-1].encode()]))
    return found


def leaked_keys(workdir: Path, keys: list[SoakKey]) -> list[str]:
    """Every file under `workdir` but the passphrase files that holds a passphrase or key
    material derived from it (key_material; the daemon's and the simulators' logs, the
    journal, the broker's log and database, the ledgers, the audit), each named with the
    key's identifier, never the secret."""
    own = {key.passphrase_file for key in keys}
    secrets_of = {key.identifier: key_material(key) for key in keys}
    found = []
    for path in sorted(workdir.rglob("*")):
        if path in own or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for identifier, material in secrets_of.items():
            found += [f"{path.relative_to(workdir)} holds {what} of {identifier}"
                      for what, forms in material.items()
                      if any(form in data for form in forms)]
    return found


def swap_cables(one: Terminal, other: Terminal, seconds: float) -> None:
    """A technician swaps two terminals' cables: both are unplugged and each comes back on
    the port the other one was on (the first after `seconds`, the second after about half
    that: either one may be back first). The daemon's configuration is unchanged: it must
    find each terminal on the other's link and follow them (and follow them back when a
    later swap puts them back)."""
    here, there = one.plugged_at, other.plugged_at
    one.move(there, seconds)
    other.move(here, 0.3 + seconds / 2)


class Daemon:
    """`python -m bridge run` as a process that the chaos kills and restarts."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config = config
        self.command = [sys.executable, "-m", "bridge", "run", "--config", str(config)]
        self.log_path = workdir / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at: list[float] = []  # monotonic

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            out.write(f"\n===== soak: daemon start #{self.starts + 1} at {iso_now()} =====\n"
                      .encode())
            out.flush()
            self.process = subprocess.Popen(self.command, stdout=out, stderr=out,
                                            env=python_env(), cwd=ROOT)
        self.starts += 1
        self.started_at.append(time.monotonic())

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_since_start(self) -> str:
        """The daemon's log since its latest start."""
        text = self.log_path.read_text(errors="replace")
        return text[text.rfind("===== soak: daemon start #"):]

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=15)

    def terminate(self) -> int | None:
        if not self.running:
            return None
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.wait_stopped()

    def wait_stopped(self, timeout: float = 20) -> int | None:
        """The exit status once the process ends; None if it had to be killed after
        `timeout` seconds (see sigterm_problem)."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


def sigterm_problem(code: int | None, start: int) -> str | None:
    """How a SIGTERM of the chaos (`systemctl restart`) ended daemon start #`start`, when that
    is a fault: it had to be killed (`code` None), or it exited with an error. Death by the
    signal itself (-15, a SIGTERM before the daemon set up its handlers) is a clean stop,
    as systemd counts it."""
    if code is None:
        return f"the daemon (start #{start}) did not exit within 20 s of SIGTERM; killed"
    if code not in (0, -signal.SIGTERM):
        return f"the daemon (start #{start}) exited with status {code} after SIGTERM"
    return None


@dataclass
class Payment:
    sale_id: str
    service_id: str
    poi_id: str
    kind: str
    amount: float
    sent_at: float  # wall clock, like the journal
    size: int = 0  # bytes published (to find it in the broker's log)
    publish: str = "pending"  # ok | uncertain (the publish call failed: may or may not be there)
    outcomes: list[tuple[float, str, str]] = field(default_factory=list)  # (at, outcome, source)
    first_final: str | None = None
    first_final_at: float | None = None
    first_final_source: str | None = None
    first_final_error: str | None = None  # the bridge's error text with it, if any
    first_final_stamp: float | None = None  # when the bridge produced it (bridge.at)
    # the AuthorizedAmount of the response that came with it (None: the response had none)
    first_final_amount: Any = None
    transaction_id: str | None = None  # the register's SaleTransactionID.TransactionID
    # (outcome, source, TransactionID) of each result the register received that names a
    # sale (sale_told): the terminal's answers do, the bridge's own words do not
    sales_told: list[tuple[str, str, Any]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    abort_id: str | None = None
    resync_at: float | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def key(self) -> str:
        return f"{self.sale_id}/{self.service_id}"

    @property
    def saw_unresolved(self) -> bool:
        return any(o == "unresolved" for _, o, _ in self.outcomes)

    @property
    def final_via_resync(self) -> bool:
        return (self.resync_at is not None and self.first_final_at is not None
                and self.first_final_at >= self.resync_at)


def bridge_stamp(text: Any) -> float | None:
    """bridge.at of a register's document ("2026-11-22T10:02:00.010Z", UTC) as a wall-clock
    time; None if it has none."""
    if not isinstance(text, str) or not text.endswith("Z"):
        return None
    try:
        whole, _, millis = text[:-1].partition(".")
        return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(
            millis or 0) / 1000
    except ValueError:
        return None


def result_says(response: Any, *path: str) -> Any:
    """What the PaymentResponse of a register's document says at `path` (the bridge hands
    one shape whichever way it learnt the result: the terminal's answer, or its record a
    status poll brought back, rebuilt by bridge/protocol/outcome.py, recovered_response);
    None if it says nothing there (no PaymentResponse: the bridge's own status words)."""
    return dig(response, "PaymentResponse", *path)


def authorised_amount(response: Any) -> Any:
    """The AuthorizedAmount a register's PaymentResponse carries; None if none."""
    return result_says(response, "PaymentResult", "AmountsResp", "AuthorizedAmount")


def sale_told(response: Any) -> Any:
    """The sale a register's PaymentResponse names (SaleData.SaleTransactionID.
    TransactionID: the terminal echoes the request's SaleData in its every answer about a
    Payment, whatever the outcome); None if none (a refusal the bridge made itself)."""
    return result_says(response, "SaleData", "SaleTransactionID", "TransactionID")


class Register:
    """A till: one SaleID, a persistent MQTT session, one payment at a time."""

    def __init__(self, soak: Soak, index: int, rng: random.Random) -> None:
        self.soak = soak
        self.index = index
        self.sale_id = f"TILL{index + 1}"
        self.client_id = f"soak-register-{self.sale_id}"
        self.rng = rng
        self.payments: dict[str, Payment] = {}
        self.aborts: dict[str, list[str]] = defaultdict(list)  # abort ServiceID -> outcomes
        self.stray: list[dict[str, Any]] = []  # responses for ServiceIDs we never sent
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.present = asyncio.Event()
        self.present.set()
        self.counter = 0
        self.connects = 0
        self.home = [t for i, t in enumerate(soak.terminals) if i % soak.args.registers == index]
        self._session: asyncio.Task[None] | None = None
        # Half the registers publish on .../request/{SaleID}, as RegisterClient does; half on
        # the plain .../request, as a register in another language may
        self.own_topic = index % 2 == 1

    def request_topic(self, poi_id: str) -> str:
        topic = f"{BASE}/terminals/{poi_id}/request"
        return f"{topic}/{self.sale_id}" if self.own_topic else topic

    # -- the MQTT session --

    def start_session(self) -> None:
        self._session = asyncio.create_task(self._session_loop(), name=f"{self.sale_id} session")

    async def stop_session(self) -> None:
        if self._session is not None:
            self._session.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._session
        self._session = None
        self.connected.clear()

    async def _session_loop(self) -> None:
        broker = self.soak.broker
        while True:
            try:
                async with aiomqtt.Client(broker.host, broker.port, identifier=self.client_id,
                                          clean_session=False, keepalive=5,
                                          timeout=5) as client:
                    await client.subscribe(f"{BASE}/registers/{self.sale_id}/response", qos=1)
                    self.client = client
                    self.connects += 1
                    self.connected.set()
                    async for message in client.messages:
                        self._on_message(message.payload)
            except aiomqtt.MqttError:
                pass
            finally:
                self.client = None
                self.connected.clear()
            await asyncio.sleep(0.3)

    def _on_message(self, raw: Any) -> None:
        try:
            payload = json.loads(raw)
            info = payload["bridge"]
            service_id = info["transaction"]["service_id"]
            outcome, source = info["outcome"], info["source"]
            error = info.get("error")
            stamp = bridge_stamp(info.get("at"))
            response = payload.get("SaleToPOIResponse")
            amount, sale = authorised_amount(response), sale_told(response)
        except (TypeError, ValueError, KeyError, AttributeError):
            self.stray.append({"raw": repr(raw)[:200]})
            return
        now = time.time()
        payment = self.payments.get(service_id)
        if payment is None:
            if service_id in self.aborts:
                self.aborts[service_id].append(outcome)
            else:
                self.stray.append(payload)
            return
        payment.outcomes.append((now, outcome, source))
        if sale is not None:
            payment.sales_told.append((outcome, source, sale))
        if outcome != "unresolved":
            if payment.first_final is None:
                payment.first_final, payment.first_final_at = outcome, now
                payment.first_final_source, payment.first_final_error = source, error
                payment.first_final_stamp, payment.first_final_amount = stamp, amount
            elif outcome != payment.first_final:
                payment.conflicts.append(f"{payment.first_final} then {outcome} ({source})")
        payment.answered.set()

    async def go_away(self, seconds: float) -> None:
        """Close the till's MQTT session (cleanly) for a while; results queue in the broker."""
        self.present.clear()
        await self.stop_session()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.start_session()
            self.present.set()

    # -- paying --

    def _choose(self) -> tuple[Terminal, str]:
        terminal = (self.rng.choice(self.home) if self.home and self.rng.random() < 0.85
                    else self.rng.choice(self.soak.terminals))
        names = list(KINDS)
        kind = self.rng.choices(names, weights=[KINDS[k][1] for k in names])[0]
        return terminal, kind

    async def _publish(self, topic: str, document: dict[str, Any]) -> str:
        client = self.client
        if client is None:
            return "uncertain"
        try:
            await asyncio.wait_for(client.publish(topic, json.dumps(document), qos=1), 5)
            return "ok"
        except (aiomqtt.MqttError, TimeoutError):
            return "uncertain"

    async def pay_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.present.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connected.wait(), 1.0)
            if not self.connected.is_set() or stop.is_set():
                continue
            terminal, kind = self._choose()
            think = self.rng.uniform(0.05, 0.5)
            abort = kind in ABORTABLE and self.rng.random() < ABORT_CHANCE
            abort_after = self.rng.uniform(0.3, 1.5)
            await asyncio.sleep(think)
            if stop.is_set() or not self.connected.is_set():
                continue
            payment = await self.pay(terminal, kind)
            if abort:
                try:
                    await asyncio.wait_for(payment.answered.wait(), abort_after)
                except TimeoutError:
                    await self._abort(payment)
            # Wait for the first answer (final or unresolved); a till then goes on either way.
            waiter = asyncio.create_task(payment.answered.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, timeout=30,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()

    async def pay(self, terminal: Terminal, kind: str) -> Payment:
        """Publish one payment with a fresh ServiceID and sale (never re-sent), of an amount
        no other payment of the run has (payment_amount)."""
        self.counter += 1
        service_id = f"P{self.counter}"
        amount = payment_amount(kind, self.soak.payments_of_kind[kind])
        self.soak.payments_of_kind[kind] += 1
        document = payment_request(self.sale_id, service_id, terminal.poi_id, amount)
        sale = document["SaleToPOIRequest"]["PaymentRequest"]["SaleData"]["SaleTransactionID"]
        sale["TimeStamp"] = iso_now()
        payment = Payment(self.sale_id, service_id, terminal.poi_id, kind, amount, time.time(),
                          len(json.dumps(document)), transaction_id=sale["TransactionID"])
        self.payments[service_id] = payment
        payment.publish = await self._publish(self.request_topic(terminal.poi_id), document)
        return payment

    async def _abort(self, payment: Payment) -> None:
        self.counter += 1
        abort_id = f"A{self.counter}"
        payment.abort_id = abort_id
        self.aborts[abort_id] = []
        document = {"SaleToPOIRequest": {
            "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Service",
                              "MessageCategory": "Abort", "MessageType": "Request",
                              "SaleID": self.sale_id, "ServiceID": abort_id,
                              "POIID": payment.poi_id},
            "AbortRequest": {"AbortReason": "MerchantAbort", "MessageReference": {
                "MessageCategory": "Payment", "SaleID": self.sale_id,
                "ServiceID": payment.service_id, "POIID": payment.poi_id}}}}
        await self._publish(self.request_topic(payment.poi_id), document)


@dataclass
class ChaosEvent:
    at: float  # seconds since the start of the chaos
    wall: float
    kind: str
    target: str
    seconds: float
    skipped: bool = False


# --- the soak ----------------------------------------------------------------------------------------

class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        setup_rng = random.Random(f"{args.seed}-setup")
        # log_type all: every PUBLISH/PUBACK, so the audit can tell who lost a request
        self.broker = Mosquitto(workdir / "mosquitto", extra_config="log_type all")
        self.terminals = [Terminal(i, workdir, args.seed, setup_rng)
                          for i in range(args.terminals)]
        self.keys = make_keys(self.terminals, workdir, args.keys)
        self.config_path = workdir / "soak.toml"
        self.journal_path = workdir / "journal.sqlite3"
        self.daemon = Daemon(self.config_path, workdir)
        # how many payments of each kind the registers made so far (payment_amount)
        self.payments_of_kind: Counter[str] = Counter()
        self.registers = [Register(self, i, random.Random(f"{args.seed}-register-{i}"))
                          for i in range(args.registers)]
        self.events: list[ChaosEvent] = []
        self.swaps: list[tuple[float, str, str]] = []  # (wall clock, terminal, terminal)
        self.broker_down = False
        self.daemon_down = False
        self.broker_kills: list[float] = []  # wall-clock times of kill -9
        self.daemon_terms: list[tuple[float, float]] = []  # (SIGTERM sent, process gone)
        # (SIGSTOP, SIGCONT) of every freeze of the daemon's, wall clock
        self.daemon_freezes: list[tuple[float, float]] = []
        self._chaos_tasks: set[asyncio.Task[None]] = set()
        self.t0 = 0.0
        self.healthy_since = 0.0
        self.settle_state = "not settled yet"  # what settle() saw last, for the report
        self.crashes: list[str] = []
        self.dead_terminals: set[str] = set()
        self.term_state: dict[str, tuple[str, float, str]] = {}  # state, since, detail
        self.offline_episodes: list[dict[str, Any]] = []
        self.broker_up_at = 0.0

    # -- set-up --

    def write_config(self) -> None:
        lines = [
            f'journal = "{self.journal_path}"',
            f'log_level = "{self.args.log_level}"',
            "[mqtt]",
            f'host = "{self.broker.host}"',
            f"port = {self.broker.port}",
            f'base_topic = "{BASE}"',
            'client_id = "poi-bridge-soak"',
            "keepalive = 5",
            "health_interval = 5.0",
        ]
        for terminal in self.terminals:
            lines += [
                "[[terminals]]",
                f'poi_id = "{terminal.poi_id}"',
                "payment_timeout = 2.0",
                # A Busy record of a payment whose frame went out twice (a NAK, or silence)
                # is asked about as InProgress up to this limit, then reported unresolved:
                # within the settling time, not at the default's 600 s.
                "in_progress_limit = 20.0",
                "status_timeout = 1.0",
                "poll_floor = 0.05",
                "resync_attempts = 2",
                "reconcile_initial = 0.5",
                "reconcile_max_interval = 2.0",
                "[terminals.link]",
                'kind = "serial"',
                f'device = "{terminal.configured_link}"',
                "[terminals.framer]",
                'name = "stx-etx-lrc"',
                f"ack_timeout = {ACK_TIMEOUT}",
                f"max_tries = {MAX_TRIES}",
                *(terminal.key.config_lines() if terminal.key and not terminal.configured_keys
                  else []),
                *(line for key, table in zip(terminal.configured_keys,
                                             ("key", "previous_key"), strict=False)
                  for line in key.config_lines(table)),
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    async def start(self) -> None:
        log(f"workdir {self.workdir}")
        await asyncio.to_thread(self.broker.start)
        for terminal in self.terminals:
            terminal.start()
        for terminal in self.terminals:
            await asyncio.to_thread(terminal.wait_started)
        self.write_config()
        self.daemon.start()
        await self.wait_bridge_ready(timeout=60)
        for register in self.registers:
            register.start_session()
        for register in self.registers:
            await asyncio.wait_for(register.connected.wait(), 30)
        log(f"up: broker :{self.broker.port}, {len(self.terminals)} terminals, bridge, "
            f"{len(self.registers)} registers")

    async def wait_bridge_ready(self, timeout: float, *, terminals: bool = True) -> None:
        """Until the bridge says online and (with `terminals`) every terminal is online."""
        want = {t.poi_id for t in self.terminals} if terminals else set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                async with aiomqtt.Client(self.broker.host, self.broker.port,
                                          identifier="soak-observer", timeout=5) as client:
                    await client.subscribe(f"{BASE}/terminals/+/state", qos=1)
                    await client.subscribe(f"{BASE}/bridge/state", qos=1)
                    online: set[str] = set()
                    bridge = False
                    async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
                        async for message in client.messages:
                            payload = json.loads(message.payload)
                            topic = message.topic.value
                            if topic.endswith("/bridge/state"):
                                bridge = payload.get("state") == "online"
                            elif payload.get("state") in ("online", "busy"):
                                online.add(payload["poi_id"])
                            else:
                                online.discard(payload.get("poi_id"))
                            if bridge and online >= want:
                                return
            except (aiomqtt.MqttError, TimeoutError):
                await asyncio.sleep(0.5)
        raise RuntimeError("the bridge did not come up with every terminal online; see "
                           f"{self.daemon.log_path}")

    # -- chaos --

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._chaos_tasks.add(task)
        task.add_done_callback(self._chaos_tasks.discard)

    async def chaos_loop(self, stop: asyncio.Event) -> None:
        rng = self.rng
        # (a kind of its own for --keys rotation only: the other modes keep their sequences)
        chaos = {**CHAOS_KINDS, **({"terminal_rekey": 0.6} if self.args.keys == "rotation"
                                   else {})}
        kinds = list(chaos)
        weights = [chaos[k] for k in kinds]
        first = kinds[:]  # every kind once, in a seeded order, then weighted draws
        rng.shuffle(first)
        while not stop.is_set():
            # Every draw happens whatever the state, so a seed gives one sequence of events.
            pause = min(rng.expovariate(1 / self.args.chaos_interval),
                        4 * self.args.chaos_interval)
            drawn = rng.choices(kinds, weights=weights)[0]
            kind = first.pop(0) if first else drawn
            seconds = rng.uniform(0.3, 5.0)
            terminal = rng.choice(self.terminals)
            # the terminal whose cable a swap exchanges with `terminal`'s (never itself)
            n = len(self.terminals)
            partner = self.terminals[(terminal.index + rng.randrange(1, n)) % n] \
                if n > 1 else None
            register = rng.choice(self.registers)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            if stop.is_set():
                return
            target = {"terminal_unplug": terminal.poi_id, "terminal_freeze": terminal.poi_id,
                      "daemon_freeze": "daemon",
                      "terminal_stall": terminal.poi_id,
                      "power_blip": terminal.poi_id,
                      "terminal_rekey": terminal.poi_id,
                      "register_away": register.sale_id,
                      "terminal_swap": f"{terminal.poi_id}<->{partner and partner.poi_id}",
                      }.get(kind, kind.split("_")[0])
            event = ChaosEvent(time.monotonic() - self.t0, time.time(), kind, target,
                               round(seconds, 2))
            self.events.append(event)
            now = time.monotonic()
            if kind == "broker_kill9" or kind == "broker_restart":
                if self.broker_down:
                    event.skipped = True
                else:
                    self.broker_down = True
                    self._spawn(self._broker_outage(kind == "broker_kill9", seconds))
            elif kind == "daemon_freeze":
                if self.daemon_down:
                    event.skipped = True
                else:
                    self.daemon_down = True
                    self._spawn(self._daemon_freeze(0.3 + seconds / 2))
            elif kind in ("daemon_kill9", "daemon_sigterm"):
                if self.daemon_down:
                    event.skipped = True
                else:
                    self.daemon_down = True
                    self._spawn(self._daemon_outage(kind == "daemon_kill9", seconds * 0.6))
            elif kind == "terminal_unplug":
                if terminal.unplugged_until > now:
                    event.skipped = True
                else:
                    terminal.unplug(seconds)
            elif kind == "terminal_swap":
                if partner is None or max(terminal.unplugged_until,
                                          partner.unplugged_until) > now:
                    event.skipped = True
                else:
                    self.swap(terminal, partner, seconds)
            elif kind == "terminal_freeze":
                terminal.frozen_until = max(terminal.frozen_until, now + seconds)
                terminal.control(f"mute {seconds:.2f}")
            elif kind == "terminal_stall":
                stall = 0.4 + seconds / 3  # 0.5 to 2 s
                terminal.frozen_until = max(terminal.frozen_until, now + stall)
                self._spawn(terminal.stall(stall))
            elif kind == "register_away":
                if not register.present.is_set():
                    event.skipped = True
                else:
                    self._spawn(register.go_away(seconds * 1.5))
            elif kind == "power_blip":
                if self.daemon_down or terminal.unplugged_until > now:
                    event.skipped = True
                else:
                    self.power_blip(terminal, 4.0 + seconds)
            elif kind == "terminal_rekey":
                # The back office's new key reaches the device (its settings change while
                # it runs): the bridge must find it out and send with it
                new = terminal.rekey_to
                if new is None:
                    event.skipped = True
                else:
                    terminal.key, terminal.rekey_to = new, None
                    terminal.control(f"rekey {new.identifier} {new.version} "
                                     f"{new.passphrase_file}")
            if self.args.verbose:
                log(f"chaos +{event.at:6.1f}s {kind} {target} {seconds:.1f}s"
                    + (" (skipped: already out)" if event.skipped else ""))

    def swap(self, one: Terminal, other: Terminal, seconds: float) -> None:
        swap_cables(one, other, seconds)
        self.swaps.append((time.time(), one.poi_id, other.poi_id))

    def power_blip(self, terminal: Terminal, seconds: float) -> None:
        """The terminal drops off the box and the daemon is SIGKILLed and restarted while
        it is away (the daemon comes back before the terminal does)."""
        terminal.unplug(seconds)
        self.daemon_down = True
        self._spawn(self._daemon_outage(True, 1.0, delay=0.3))

    async def wait_terminals_back(self) -> None:
        back = max([t.unplugged_until for t in self.terminals]
                   + [t.frozen_until for t in self.terminals] + [time.monotonic()])
        # + the longest replug_after of a drop_link transaction
        await asyncio.sleep(max(0.0, back - time.monotonic()) + 4.5)

    async def wait_terminals_online(self) -> None:
        """Until the bridge has every terminal online again, or OFFLINE_LIMIT has passed
        since they were all plugged in (check_offline then reports the ones still out)."""
        deadline = self.healthy_since + OFFLINE_LIMIT + 1
        while time.monotonic() < deadline:
            states = [self.term_state.get(t.poi_id, ("?", 0.0, ""))[0] for t in self.terminals]
            if all(st in ("online", "busy") for st in states):
                return
            await asyncio.sleep(0.5)

    async def finale(self) -> None:
        """The chaos always ends the same way, after the payments have stopped, each step on
        a terminal of its own that has nothing open:

        1. a terminal hangs for 2 s just as a payment is sent to it; then it plays dead
           (mute) as two more are, for 0.8 s (the daemon's framer sends the frame again for
           want of an ACK, and a copy is read once the terminal listens again) and for 2.5 s
           (every copy dropped unread: the daemon must ask about the payment, not send it
           again; its ledger lists what it dropped, so a blind re-send fails the run);
        2. a terminal refuses a payment (Busy) and that answer is lost on the wire;
        3. the daemon freezes (SIGSTOP) while a payment for a busy terminal reaches it, and
           mosquitto is killed -9 before the daemon acknowledges it;
        4. a restart during business: the daemon gets SIGTERM (`systemctl restart`) and the
           registers pay at that very moment; the daemon is started again a second later;
        5. a power blip: a terminal drops off, the daemon is SIGKILLed and restarted while
           it is away; then quiet, so that a recovery which only a *later* daemon restart
           would bring about is seen for what it is.
        """
        idle = await self.idle_terminals()
        if len(idle) < 3:
            log(f"finale: only {len(idle)} idle terminal(s); steps 1-3 need 3, skipped")
        else:
            await self.stall_during_payment(idle[0])
            for seconds in (0.8, 2.5):
                await self.muted_during_payment(idle[0], seconds)
            await self.busy_answer_lost(idle[1])
            await self.refusal_then_broker_kill(idle[2])
        await self.sigterm_while_paying()
        # not the terminal of step 2: what happens to it must stay visible
        others = [t for t in self.terminals if len(idle) < 3 or t is not idle[1]]
        terminal = self.rng.choice(others)
        seconds = 8.0
        self.events.append(ChaosEvent(time.monotonic() - self.t0, time.time(), "power_blip",
                                      terminal.poi_id, seconds))
        log(f"finale: power blip: {terminal.poi_id} unplugged for {seconds:g} s, daemon "
            "SIGKILLed and restarted meanwhile")
        self.power_blip(terminal, seconds)

    async def idle_terminals(self) -> list[Terminal]:
        """Online terminals with nothing open in the journal (waits up to 20 s for some)."""
        deadline = time.monotonic() + 20
        while True:
            busy = await asyncio.to_thread(self._terminals_with_open_transactions)
            ready = [t for t in self.terminals if t.poi_id not in busy
                     and self.term_state.get(t.poi_id, ("?",))[0] == "online"]
            if len(ready) >= min(3, len(self.terminals)) or time.monotonic() > deadline:
                return ready
            await asyncio.sleep(0.5)

    def _note(self, kind: str, target: str, seconds: float) -> None:
        self.events.append(ChaosEvent(time.monotonic() - self.t0, time.time(), kind, target,
                                      seconds))

    async def stall_during_payment(self, terminal: Terminal) -> None:
        """The bridge gets no ACK and sends the request frame again (max_tries); the terminal,
        once awake, reads every copy. Nothing may be charged that the register is not told
        about."""
        log(f"finale: {terminal.poi_id} hangs for 2 s as a payment is sent to it")
        self._note("terminal_stall", terminal.poi_id, 2.0)
        await terminal.stall(2.0)
        payment = await self.registers[0].pay(terminal, "approve_slow")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(payment.answered.wait(), 20)
        await asyncio.sleep(2.0)  # the terminal's own answer comes 1.2 s after it woke up

    async def muted_during_payment(self, terminal: Terminal, seconds: float) -> None:
        """The terminal plays dead for `seconds` (mute: it reads and drops every byte, no
        ACK, no answer) as a payment is sent to it. What it dropped unread is in its ledger,
        so a copy that is not the framer's retransmission of a dropped frame shows."""
        log(f"finale: {terminal.poi_id} plays dead for {seconds:g} s as a payment is sent to "
            "it")
        self._note("terminal_freeze", terminal.poi_id, seconds)
        terminal.frozen_until = max(terminal.frozen_until, time.monotonic() + seconds)
        terminal.control(f"mute {seconds:.2f}")
        payment = await self.registers[0].pay(terminal, "approve")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(payment.answered.wait(), 20)
        await asyncio.sleep(1.0)

    async def busy_answer_lost(self, terminal: Terminal) -> None:
        """Only a status poll can tell the outcome, and it says: refused, Busy. That is an
        outcome (nothing charged), to be reported."""
        log(f"finale: {terminal.poi_id} refuses a payment (Busy) and the answer is lost")
        payment = await self.registers[0].pay(terminal, "busy_response_lost")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(payment.answered.wait(), 6)

    async def refusal_then_broker_kill(self, terminal: Terminal) -> None:
        """The box freezes for a moment (SIGSTOP) while a request is on its way to the
        bridge; mosquitto saves it as in flight, and is killed -9 before the bridge's
        acknowledgement; the bridge wakes up and refuses the request (Busy: its terminal is
        taken); the restarted broker delivers it again (QoS 1 is at least once). The register
        was told "rejected, nothing was sent": nothing may be charged for it now."""
        register = self.registers[-1]
        daemon = self.daemon.process
        assert daemon is not None
        log(f"finale: the daemon freezes while a payment for the busy {terminal.poi_id} "
            "reaches it, mosquitto is killed -9 meanwhile")
        first = await register.pay(terminal, "very_slow")  # takes the terminal for 4 s+
        await asyncio.sleep(0.3)
        self._note("daemon_freeze", "daemon", 2.7)
        self.daemon_down = True
        stopped = time.time()
        daemon.send_signal(signal.SIGSTOP)
        try:
            second = await register.pay(terminal, "approve")
            await asyncio.sleep(2.5)  # mosquitto saves once a second: the request, in flight
            self._note("broker_kill9", "broker", 2.0)
            self.broker_down = True
            self.broker_kills.append(time.time())
            await asyncio.to_thread(self.broker.kill)
        finally:
            daemon.send_signal(signal.SIGCONT)
            self.daemon_freezes.append((stopped, time.time()))
            self.daemon_down = False
        await asyncio.sleep(2.0)
        await asyncio.to_thread(self.broker.start)
        self.broker_up_at = time.monotonic()
        self.broker_down = False
        await self.wait_bridge_ready(timeout=60, terminals=False)
        for payment in (first, second):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(payment.answered.wait(), 10)
        await asyncio.sleep(3.0)

    async def sigterm_while_paying(self) -> None:
        log("finale: SIGTERM to the daemon while the registers pay")
        self._note("daemon_sigterm", "daemon", 1.0)
        await self.wait_bridge_ready(timeout=60, terminals=False)
        await asyncio.sleep(1.0)
        self.daemon_down = True
        assert self.daemon.process is not None
        sent = time.time()
        self.daemon.process.send_signal(signal.SIGTERM)
        # A burst first (several requests in the daemon's MQTT client at once), then spread
        # over the first ~150 ms of the drain. A terminal already taken answers Busy, which
        # is an answer too.
        await asyncio.gather(*(
            self.registers[i % len(self.registers)].pay(
                self.terminals[i % len(self.terminals)], "approve")
            for i in range(6)))
        for i, pause in enumerate((0.005, 0.01, 0.02, 0.04, 0.08)):
            register = self.registers[i % len(self.registers)]
            await register.pay(self.terminals[i % len(self.terminals)], "approve")
            await asyncio.sleep(pause)
        code = await asyncio.to_thread(self.daemon.wait_stopped, 20)
        self.daemon_terms.append((sent, time.time()))
        # judged as every SIGTERM of the chaos is (_daemon_outage)
        problem = sigterm_problem(code, self.daemon.starts)
        if problem is not None:
            self.crashes.append(problem)
            log(f"!!! {problem}")
        await asyncio.sleep(1.0)
        self.daemon.start()
        self.daemon_down = False
        await self.wait_bridge_ready(timeout=60, terminals=False)
        await asyncio.sleep(1.0)

    def _terminals_with_open_transactions(self) -> set[str]:
        db = sqlite3.connect(f"file:{self.journal_path}?mode=ro", uri=True, timeout=5)
        try:
            return {r[0] for r in db.execute(
                "SELECT DISTINCT poi_id FROM transactions WHERE state != 'final'")}
        finally:
            db.close()

    async def watch_states(self) -> None:
        """Follow the bridge's terminal state topics (retained, republished on change)."""
        while True:
            try:
                async with aiomqtt.Client(self.broker.host, self.broker.port,
                                          identifier="soak-watch", timeout=5,
                                          keepalive=5) as client:
                    await client.subscribe(f"{BASE}/terminals/+/state", qos=1)
                    async for message in client.messages:
                        payload = json.loads(message.payload)
                        poi_id = payload.get("poi_id")
                        state = payload.get("state")
                        identity = payload.get("identity") or ""
                        if identity.startswith("mismatch") and state != "offline":
                            # on a link whose device is another terminal: not usable either
                            state = "wrong device"
                        detail = payload.get("detail") or (
                            f"identity {identity} on {payload.get('link')}"
                            if state == "wrong device" else "")
                        old = self.term_state.get(poi_id)
                        since = time.monotonic() if old is None or \
                            (old[0] in OUT) != (state in OUT) else old[1]
                        self.term_state[poi_id] = (state, since, detail)
            except (aiomqtt.MqttError, ValueError):
                await asyncio.sleep(0.5)

    def check_offline(self) -> None:
        """A terminal the bridge keeps offline although it is plugged in, the daemon is up
        and the broker is up, for longer than the worker's reopen backoff (10 s at most)."""
        now = time.monotonic()
        if self.daemon_down or self.broker_down or not self.daemon.started_at:
            return
        for terminal in self.terminals:
            state = self.term_state.get(terminal.poi_id)
            if state is None or state[0] not in OUT:
                terminal.offline_reported = False
                continue
            since = max(state[1], terminal.unplugged_until, self.daemon.started_at[-1],
                        self.broker_up_at)
            if now - since > OFFLINE_LIMIT and not terminal.offline_reported:
                terminal.offline_reported = True
                started = self.daemon.started_at[-1]
                note = (" The daemon was started while it was unplugged."
                        if terminal.unplugged_at(started) else "")
                said = f"poi_bridge: terminal {terminal.poi_id} is not plugged in"
                if said in self.daemon.log_since_start():
                    note += (f" At start #{self.daemon.starts} the daemon logged '{said}' and "
                             "has not opened it since.")
                what = ("on a link whose device is another terminal (swapped cables not "
                        "followed)" if state[0] == "wrong device" else "offline")
                self.offline_episodes.append({
                    "poi_id": terminal.poi_id, "wall": time.time(),
                    "started_while_unplugged": terminal.unplugged_at(started)
                    and state[0] == "offline",
                    "text": f"terminal {terminal.poi_id} {what} for the bridge for "
                            f"{now - since:.0f} s although plugged in, with the daemon (start "
                            f"#{self.daemon.starts}) and the broker up (bridge says: "
                            f"{state[2] or 'no detail'}).{note}"})
                log(f"!!! {self.offline_episodes[-1]['text']}")

    async def _broker_outage(self, kill9: bool, seconds: float) -> None:
        try:
            if kill9:
                self.broker_kills.append(time.time())
                await asyncio.to_thread(self.broker.kill)
            else:
                await asyncio.to_thread(self.broker.stop)
            await asyncio.sleep(seconds)
        finally:
            await asyncio.to_thread(self.broker.start)
            self.broker_up_at = time.monotonic()
            self.broker_down = False

    async def _daemon_freeze(self, seconds: float) -> None:
        process = self.daemon.process
        stopped = None
        try:
            if process is not None and process.poll() is None:
                stopped = time.time()
                process.send_signal(signal.SIGSTOP)
                await asyncio.sleep(seconds)
        finally:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
            if stopped is not None:
                self.daemon_freezes.append((stopped, time.time()))
            self.daemon_down = False

    async def _daemon_outage(self, kill9: bool, seconds: float, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        try:
            if kill9:
                await asyncio.to_thread(self.daemon.kill)
            else:
                sent = time.time()
                code = await asyncio.to_thread(self.daemon.terminate)
                self.daemon_terms.append((sent, time.time()))
                problem = sigterm_problem(code, self.daemon.starts)
                if problem is not None:
                    self.crashes.append(problem)
                    log(f"!!! {problem}")
            await asyncio.sleep(seconds)
        finally:
            self.daemon.start()
            self.daemon_down = False

    # -- the run --

    def check_processes(self) -> None:
        """A process that died when the chaos did not kill it is a finding."""
        if not self.daemon_down and self.daemon.process is not None \
                and self.daemon.process.poll() is not None:
            code = self.daemon.process.returncode
            self.crashes.append(f"the daemon exited on its own with status {code} "
                                f"(start #{self.daemon.starts}); restarted")
            log(f"!!! {self.crashes[-1]}")
            self.daemon.start()
        for terminal in self.terminals:
            if terminal.process is not None and terminal.process.poll() is not None \
                    and terminal.poi_id not in self.dead_terminals:
                self.dead_terminals.add(terminal.poi_id)
                self.crashes.append(f"simulated terminal {terminal.poi_id} exited with status "
                                    f"{terminal.process.returncode}; see {terminal.dir}")
                log(f"!!! {self.crashes[-1]}")

    async def run(self) -> dict[str, Any]:
        await self.start()
        self.t0 = time.monotonic()
        stop_chaos, stop_paying = asyncio.Event(), asyncio.Event()
        watcher = asyncio.create_task(self.watch_states())
        chaos = asyncio.create_task(self.chaos_loop(stop_chaos))
        payers = [asyncio.create_task(r.pay_loop(stop_paying)) for r in self.registers]
        next_report = time.monotonic() + 15
        while time.monotonic() - self.t0 < self.args.duration:
            await asyncio.sleep(0.5)
            for task in [chaos, *payers]:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            self.check_processes()
            self.check_offline()
            if time.monotonic() >= next_report:
                next_report += 15
                log(f"+{time.monotonic() - self.t0:5.0f}s payments {self.payment_count()}, "
                    f"chaos events {len(self.events)}")
        log(f"chaos off after {time.monotonic() - self.t0:.0f}s; bringing everything back")
        stop_chaos.set()
        await chaos
        while self._chaos_tasks:  # outages in progress finish (and restart what they stopped)
            await asyncio.gather(*list(self._chaos_tasks), return_exceptions=True)
        # Terminals come back on their own (unplug and freeze are timed); wait them out.
        await self.wait_terminals_back()
        stop_paying.set()
        await asyncio.gather(*payers)
        if self.args.finale:
            await self.finale()
            while self._chaos_tasks:
                await asyncio.gather(*list(self._chaos_tasks), return_exceptions=True)
            await self.wait_terminals_back()
        self.check_processes()
        self.healthy_since = time.monotonic()  # broker, daemon and every terminal are up
        for register in self.registers:
            await register.present.wait()
        settled = await self.settle()
        await self.resync_missing()
        await self.wait_terminals_online()
        self.check_processes()
        self.check_offline()
        watcher.cancel()
        states = await self.terminal_states()
        healthy_for = time.monotonic() - self.healthy_since
        log("stopping the bridge (SIGTERM) and collecting the terminals' ledgers")
        daemon_stop = None
        if self.daemon.running:
            exit_code = await asyncio.to_thread(self.daemon.terminate)
            if exit_code is None:
                daemon_stop = "did not exit within 20 s of SIGTERM; killed"
        else:
            exit_code = None if self.daemon.process is None else self.daemon.process.returncode
            daemon_stop = (f"was not running when the soak stopped it (exit status "
                           f"{exit_code}, start #{self.daemon.starts})")
        rows, outbox = await asyncio.to_thread(self.read_journal)
        ledgers = {}
        for terminal in self.terminals:
            ledger = await asyncio.to_thread(terminal.stop)
            if ledger is None:
                self.crashes.append(f"simulated terminal {terminal.poi_id} left no ledger "
                                    f"(exit {terminal.process and terminal.process.returncode})"
                                    "; its charges are unknown")
                ledger = {}
            ledgers[terminal.poi_id] = ledger
        for register in self.registers:
            await register.stop_session()
        await asyncio.to_thread(self.broker.stop)
        daemon_log = self.daemon.log_path.read_text(errors="replace")
        return judged(self, ledgers, rows, outbox, settled=settled, daemon_exit=exit_code,
                      daemon_stop=daemon_stop, terminal_states=states, healthy_for=healthy_for,
                      follows=daemon_log.count("following them"),
                      unchecked=identity_check_timeouts(daemon_log))

    async def terminal_states(self) -> dict[str, dict[str, Any]]:
        """The bridge's retained state topic of every terminal, as it stands now."""
        states: dict[str, dict[str, Any]] = {}
        try:
            async with aiomqtt.Client(self.broker.host, self.broker.port,
                                      identifier="soak-states", timeout=5) as client:
                await client.subscribe(f"{BASE}/terminals/+/state", qos=1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(3):
                        async for message in client.messages:
                            payload = json.loads(message.payload)
                            states[payload.get("poi_id", message.topic.value)] = payload
                            if len(states) == len(self.terminals):
                                break
        except aiomqtt.MqttError as exc:
            log(f"could not read the terminal states: {exc}")
        return states

    def payment_count(self) -> int:
        return sum(len(r.payments) for r in self.registers)

    def _journal_state(self) -> tuple[int, int, set[tuple[str, str]]]:
        db = sqlite3.connect(f"file:{self.journal_path}?mode=ro", uri=True, timeout=5)
        try:
            (open_count,) = db.execute(
                "SELECT COUNT(*) FROM transactions WHERE state != 'final'").fetchone()
            (pending,) = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL").fetchone()
            finals = {(s, i) for s, i in db.execute(
                "SELECT sale_id, service_id FROM transactions WHERE state = 'final'")}
            return open_count, pending, finals
        finally:
            db.close()

    async def settle(self) -> bool:
        """Give the bridge time to resolve everything open and deliver its outbox, and the
        registers time to receive what was queued for them. Gives up after --settle seconds,
        or when nothing has moved for --stall seconds (reconcile polls every 2 s at most)."""
        deadline = time.monotonic() + self.args.settle
        started = moved = time.monotonic()
        last = None
        while time.monotonic() < deadline:
            try:
                open_count, pending, finals = await asyncio.to_thread(self._journal_state)
            except sqlite3.Error as exc:
                log(f"journal not readable yet: {exc}")
                await asyncio.sleep(1)
                continue
            waiting = [p for r in self.registers for p in r.payments.values()
                       if p.first_final is None]
            missing = [p for p in waiting if (p.sale_id, p.service_id) in finals]
            state = (open_count, len(waiting), len(missing))
            self.settle_state = (f"{open_count} open in the journal, {pending} undelivered, "
                                 f"{len(waiting)} payments without a final outcome at the "
                                 f"register ({len(missing)} of them final in the journal)")
            if state != last:
                log(f"settling: {self.settle_state}")
                last, moved = state, time.monotonic()
            if open_count == 0 and pending == 0 and not missing \
                    and time.monotonic() - started > 3:
                if not waiting:
                    return True
                if time.monotonic() - started > 10:
                    return True  # what is left never reached the bridge; the audit says why
            self.check_offline()
            if time.monotonic() - moved > self.args.stall:
                log(f"nothing moved for {self.args.stall:g} s: giving up settling")
                return False
            await asyncio.sleep(0.5)
        log("settle time is up")
        return False

    async def resync_missing(self) -> None:
        """A register that has no final outcome for a payment the journal knows asks the
        bridge (the documented 'download' button); the audit says why it had to."""
        _, _, finals = await asyncio.to_thread(self._journal_state)
        todo = [p for r in self.registers for p in r.payments.values()
                if p.first_final is None and (p.sale_id, p.service_id) in finals]
        if not todo:
            return
        log(f"{len(todo)} payment(s) final in the journal but not at the register: resync")
        async with aiomqtt.Client(self.broker.host, self.broker.port,
                                  identifier="soak-operator", timeout=5) as client:
            for payment in todo:
                payment.resync_at = time.time()
                await client.publish(f"{BASE}/bridge/request/resync", json.dumps(
                    {"sale_id": payment.sale_id, "service_id": payment.service_id}), qos=1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(p.first_final is None for p in todo):
            await asyncio.sleep(0.5)

    def read_journal(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        db = sqlite3.connect(f"file:{self.journal_path}?mode=ro", uri=True, timeout=5)
        db.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in db.execute(
                "SELECT sale_id, service_id, poi_id, category, state, outcome, source, detail, "
                "created_at, updated_at, polls_sent, reconcile_attempts, next_poll_at, extra "
                "FROM transactions")]
            outbox = []
            for r in db.execute("SELECT id, topic, payload, created_at, delivered_at "
                                "FROM outbox WHERE topic LIKE '%/response'"):
                try:
                    info = json.loads(r["payload"])["bridge"]
                except (ValueError, KeyError, TypeError):
                    continue
                outbox.append({"id": r["id"], "topic": r["topic"],
                               "service_id": info["transaction"]["service_id"],
                               "sale_id": info["transaction"]["sale_id"],
                               "outcome": info["outcome"], "created_at": r["created_at"],
                               "delivered_at": r["delivered_at"]})
            # results (not progress events) the broker never acknowledged
            (pending,) = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL "
                "AND topic LIKE '%/response'").fetchone()
            outbox.append({"pending_total": pending})
            return rows, outbox
        finally:
            db.close()


# --- the audit ---------------------------------------------------------------------------------------

def _near(moments: list[float], at: float | None, before: float, after: float) -> bool:
    """Whether `at` falls in [m - before, m + after] for one of the moments."""
    return at is not None and any(m - before <= at <= m + after for m in moments)


class BrokerLog:
    """mosquitto's own account (log_type all) of every register request: received from the
    register, saved to its persistence file, lost in a kill -9, sent on to the bridge,
    acknowledged by the bridge, and whether the bridge was subscribed to requests at the
    time. The broker does not log payloads, so the log is replayed the way the broker
    queues: a request is told apart by topic and size, a delivery to the bridge goes to the
    oldest request still queued with that topic and size (first in, first out), and a
    restart drops what arrived after the last "Saving in-memory database" (a kill -9 loses
    what was not saved yet). Payments are paired with the requests received from their
    register in order."""

    BRIDGE = "poi-bridge-soak"
    REQUESTS = f"{BASE}/terminals/+/request"
    # Any of these routes every register request to the bridge
    REQUEST_FILTERS = (REQUESTS, f"{REQUESTS}/+", f"{REQUESTS}/#")

    def __init__(self, path: Path) -> None:
        self.entries: list[dict[str, Any]] = []
        queued: list[dict[str, Any]] = []
        by_mid: dict[str, dict[str, Any]] = {}
        subscribed = False
        filters: set[str] = set()  # the bridge's subscriptions that take register requests
        saved_filters: set[str] = set()  # ... as the broker's last save holds them
        # Why the bridge is not subscribed: it unsubscribed, or the broker restarted without
        # its session (killed -9 before it had saved the bridge's subscriptions), or the
        # bridge came back without its session to a broker that had not restarted (a clean
        # start, a session expiry of 0: the bridge's own fault, never excused)
        session_lost = False
        reconnected_without_session = False
        # A broker start since the bridge's last CONNACK: the next one without its session is
        # the restart's doing, whatever the saves said (mosquitto logs "Saving ..." before it
        # writes; a kill -9 during the write leaves the older file)
        restarted = False
        since_restart: list[dict[str, Any]] = []  # queued meanwhile, as the last save said
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        for line in lines:
            stamp, _, text = line.partition(": ")
            if not stamp.isdigit():
                continue
            at = int(stamp)
            if text.startswith("Received PUBLISH from ") and self._a_request(text):
                client = text[len("Received PUBLISH from "):].split(" (", 1)[0]
                if client == self.BRIDGE:
                    continue
                entry = {"client": client, "what": self._what(text), "received": at,
                         "bridge_subscribed": subscribed, "saved": False, "dropped": None,
                         "sent": None, "acked": None,
                         "session_lost": session_lost and not subscribed,
                         "reconnected_without_session": reconnected_without_session
                         and not subscribed}
                self.entries.append(entry)
                if subscribed:  # else the broker routes it to nobody
                    queued.append(entry)
                    if restarted:
                        since_restart.append(entry)
            elif text.startswith(f"{self.BRIDGE} 1 ") and text[len(self.BRIDGE) + 3:] \
                    in self.REQUEST_FILTERS:
                # the third line of the broker's SUBSCRIBE report (since 8b5246a the bridge
                # takes .../request/#, and drops the narrower filters older bridges took)
                filters.add(text[len(self.BRIDGE) + 3:])
                subscribed, session_lost, reconnected_without_session = True, False, False
            elif text.startswith(f"{self.BRIDGE} ") and text[len(self.BRIDGE) + 1:] \
                    in self.REQUEST_FILTERS:
                filters.discard(text[len(self.BRIDGE) + 1:])  # ... and of its UNSUBSCRIBE
                subscribed, session_lost = bool(filters), False
                reconnected_without_session = False
            elif text.startswith("Saving in-memory database"):
                for entry in queued:
                    entry["saved"] = True
                saved_filters = set(filters)
            elif text.startswith("mosquitto version") and text.endswith("starting"):
                for entry in [e for e in queued if not e["saved"]]:
                    entry["dropped"] = at  # arrived after the last save: gone with the kill
                    queued.remove(entry)
                by_mid.clear()
                # The restarted broker knows the bridge's subscriptions as last saved: none,
                # if it was killed before it saved them (then it routes requests to nobody
                # until the bridge, told "no session" in its CONNACK, subscribes again)
                session_lost = session_lost or bool(filters - saved_filters)
                filters = set(saved_filters)
                subscribed = bool(filters)
                restarted = True
                since_restart = []
            elif text.startswith(f"Sending CONNACK to {self.BRIDGE} (1, 0)"):
                restarted = False
            elif text.startswith(f"Sending CONNACK to {self.BRIDGE} (0, 0)"):
                # session present 0, connection accepted (a refused one, "(0, 5)", changes no
                # session): whatever the replay thought, the broker holds no subscription of
                # the bridge's now. Only a restart (above) excuses that; subscriptions the
                # broker still held when the bridge reconnected are ones the bridge dropped.
                if restarted:
                    session_lost = session_lost or bool(filters)
                    # The restarted broker had no session of the bridge's: nothing queued for
                    # it survived. A request it took since it started (a register reconnects
                    # first) went to nobody; one queued before, in the save the kill cut
                    # short, was lost with that save. Neither was ever sent to the bridge.
                    for entry in [e for e in queued if e["sent"] is None]:
                        queued.remove(entry)
                        if any(entry is e for e in since_restart):
                            entry["bridge_subscribed"], entry["session_lost"] = False, True
                        else:
                            entry["dropped"] = at
                else:
                    reconnected_without_session = reconnected_without_session or bool(filters)
                restarted = False
                filters.clear()
                subscribed = False
            elif text.startswith(f"Sending PUBLISH to {self.BRIDGE} (") and self._a_request(text):
                what = self._what(text)
                mid = text.split(", m", 1)[1].split(",", 1)[0]
                entry = None
                if " (d1," in text:
                    # A redelivery keeps its message ID (across a restart too, from the
                    # broker's save): it is the request that ID was sent for, not merely the
                    # oldest of its topic and size (two registers' requests can be both)
                    sent = [e for e in queued if e["what"] == what and e["sent"] is not None
                            and e["acked"] is None]
                    entry = next((e for e in sent if e.get("mid") == mid), None) or next(
                        (e for e in sent if not any(e is o for o in by_mid.values())), None)
                entry = entry or next((e for e in queued if e["what"] == what
                                       and e["sent"] is None), None)
                if entry is not None:
                    entry["sent"] = entry["sent"] or at
                    entry["mid"] = mid
                    by_mid[mid] = entry
            elif text.startswith(f"Received PUBACK from {self.BRIDGE} (Mid: "):
                mid = text.split("(Mid: ", 1)[1].split(",", 1)[0]
                entry = by_mid.pop(mid, None)
                if entry is not None:
                    entry["acked"] = at
                    # by identity: two requests' entries can be equal dicts
                    queued[:] = [e for e in queued if e is not entry]

    @staticmethod
    def _a_request(text: str) -> bool:
        """A publish on a terminal's request topic: .../request or .../request/{SaleID}."""
        topic = text[text.index("'") + 1:].split("'", 1)[0] if "'" in text else ""
        parts = topic.split("/")
        return "terminals" in parts and (parts[-1] == "request" or parts[-2:-1] == ["request"])

    @staticmethod
    def _what(text: str) -> str:
        """Topic and size: "'poi-bridge/terminals/X/request', ... (426 bytes))"."""
        return text[text.index("'"):]

    def match(self, registers: list[Register]) -> dict[str, dict[str, Any]]:
        """Payment key -> its request in the broker's log (greedy, in order, per register:
        the broker receives one client's publishes in the order they were made)."""
        found: dict[str, dict[str, Any]] = {}
        for register in registers:
            mine = [e for e in self.entries if e["client"] == register.client_id]
            used = 0
            for payment in sorted(register.payments.values(), key=lambda p: p.sent_at):
                what = f"'{register.request_topic(payment.poi_id)}', ... ({payment.size} bytes))"
                for i in range(used, len(mine)):
                    entry = mine[i]
                    if entry["received"] > payment.sent_at + 3:
                        break
                    if entry["what"] == what and entry["received"] >= int(payment.sent_at) - 1:
                        found[payment.key] = entry
                        used = i + 1
                        break
        return found


def given_up_by_design(row: dict[str, Any]) -> bool:
    """An unresolved journal row the bridge stopped asking about because the terminal's
    NotFound came after it had taken another request of the category (it may remember only
    its latest: see the session's _status_answer): no answer can settle it any more."""
    try:
        extra = json.loads(row.get("extra") or "{}")
    except ValueError:
        return False
    return bool(extra.get("abandoned")) and "may remember only its latest" in (
        row.get("detail") or "")


def busy_record_of_a_copy(row: dict[str, Any]) -> bool:
    """An unresolved journal row of a payment whose frame the link sent more than once (the
    terminal said nothing in time, or a NAK came), and whose record on the terminal says
    Busy: Busy may answer the second copy while the first was charged, so no answer of the
    terminal can settle it (BUSY_RECORD_OF_A_COPY in bridge/protocol/outcome.py)."""
    try:
        extra = json.loads(row.get("extra") or "{}")
    except ValueError:
        return False
    return bool(extra.get("resent_after_silence")) and "may have got this request twice" in (
        row.get("detail") or "")


NOT_FOUND_IN_LOG = {"received": None, "bridge_subscribed": None, "saved": False,
                    "dropped": None, "sent": None, "acked": None, "session_lost": False,
                    "reconnected_without_session": False}
FATAL = ("lost", "doubled", "phantom", "wrong_terminal", "wrong_amount", "wrong_sale",
         "unsolicited", "stuck", "disputed", "crashed", "leaked", "incomplete", "too_few")
# The floor: a run in which fewer payments were approved than this, per register and second
# of chaos, fails as too_few (under the chaos, 100-s runs got 0.36 to 0.41: seeds 83 and 84,
# 2026-12-02), as does a terminal that was addressed, or a register that paid, this many
# times or more and got none of them approved.
APPROVALS_PER_REGISTER_SECOND = 0.05
TERMINAL_FLOOR_PAYMENTS = 12
# Seconds of health (broker, daemon, every terminal back) after which an unresolved payment
# is the bridge's to have resolved; with less, the audit cannot tell and says so.
HEALTHY_ENOUGH = 15.0
CURRENCY = "EUR"  # the registers' (bridge/simulator/responses.py, payment_request)
BUSY_DETAIL = "terminal busy: the payment was not started"  # the session's words
# Symptoms of bridge bugs the soak has found, by tag (reported to the bridge's owner):
KNOWN_BUGS = {
    "busy_taken_for_declined": "(fixed in e7fc2da) a Busy answer carrying the payment's own "
                               "ServiceID (the terminal's answer to a retransmitted copy of the "
                               "request) was taken as 'declined, not started' while the "
                               "terminal approved the first copy",
    "busy_status_polled_forever": "(fixed in e7fc2da) a status answer whose original ended "
                                  "Failure/Busy was taken as 'terminal busy, ask again': "
                                  "polled every poll_floor forever, never reported",
    "redelivered_refusal": "(fixed in e7fc2da) a refused request (Busy, offline...) was not "
                           "journaled, so a QoS 1 redelivery of it ran on the terminal "
                           "although the register had been told 'rejected'",
    "redelivered_unjournaled_refusal": "a request the intake refused without journaling it "
                                       "('the bridge is shutting down', while draining after "
                                       "SIGTERM) was delivered again by the broker (QoS 1: "
                                       "its in-flight copy survived a kill -9 in its autosave "
                                       "window) to the next daemon, which ran it on the "
                                       "terminal although the register had been told "
                                       "'rejected' (e7fc2da journals only the session's "
                                       "refusals)",
    "sent_without_identity": "(fixed in a151e50) the device on a terminal's link did not "
                             "answer the identity "
                             "check within status_timeout, and the bridge sent the waiting "
                             "payment anyway ('sending what waits without knowing which "
                             "terminal is on the link'): with the cables swapped, another "
                             "terminal charged it (found by terminal_swap, seed 1)",
    "left_offline": "(fixed in e7fc2da) a serial terminal on a node udev does not manage, "
                    "absent when the daemon started, was never reopened",
    "unsubscribed_while_draining": "(since bc9f762) the daemon unsubscribes from requests when "
                                   "it drains after SIGTERM; a persistent session keeps "
                                   "messages only for its subscriptions, so every request "
                                   "published until the next start subscribes again is "
                                   "accepted by the broker and delivered to nobody",
    "dropped_while_draining": "requests acknowledged (QoS 1) by the daemon as it drains after "
                              "SIGTERM and never answered: before e7fc2da all of them "
                              "(RegisterGateway._receive skipped them); since, those still "
                              "queued in the MQTT client when Bridge.stop() cancels the MQTT "
                              "task after announce_offline()",
}


# The intake's refusals (bridge/daemon/intake.py: outcome rejected, source bridge) that the
# soak's registers can get, by their error text. They send only valid requests, with fresh
# ServiceIDs and a timestamp of now, to configured terminals, with no SaleID restriction:
# of the refusals answered before (or without) a journal row (unusable, invalid, ServiceID
# reused, unknown terminal, SaleID not allowed, stale by request_max_age's 300 s) the chaos
# can cause only the one of a daemon draining after SIGTERM. That one is journaled since
# (_refuse_recorded), which makes its excuse, below, a narrow one.
NEVER_JOURNALED = tuple(re.compile(pattern) for pattern in (
    r"the bridge is shutting down; nothing was sent to the terminal",
))


def never_journaled(payment: Payment) -> bool:
    """Whether the register's final outcome reads as one of the intake's refusals the
    soak's registers can get (NEVER_JOURNALED): names what a problem looks like."""
    error = payment.first_final_error or ""
    return (payment.first_final == "rejected" and payment.first_final_source == "bridge"
            and any(pattern.match(error) for pattern in NEVER_JOURNALED))


def refused_while_draining(payment: Payment, daemon_terms: list[tuple[float, float]]) -> bool:
    """never_journaled, and produced by the bridge (bridge.at; else when the register got
    it) while a daemon drained after a SIGTERM of the soak's: the only time the intake says
    it is shutting down."""
    at = payment.first_final_stamp if payment.first_final_stamp is not None \
        else payment.first_final_at
    return never_journaled(payment) and at is not None and any(
        sent - 0.5 <= at <= gone + 0.5 for sent, gone in daemon_terms)


def repeated_receipts(ledgers: dict[str, dict[str, Any]]
                      ) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(terminal, key, receipts) of every money request a terminal received more than once
    (bridge/simulator/terminal.py records each receipt, and whether it can be a link-level
    retransmission of the frame before it)."""
    return [(poi_id, key, entry["receipts"]) for poi_id, ledger in ledgers.items()
            for key, entry in ledger.items() if len(entry.get("receipts") or []) > 1]


def link_level_copy(receipt: dict[str, Any], freezes: list[tuple[float, float]]) -> bool:
    """Whether a repeated receipt of a money request can be the daemon's framer sending the
    frame again (not the request sent twice). The simulator's wire layer flags it possible
    (byte for byte the frame just before on the same connection, within max_tries copies
    and RETRANSMIT_WINDOW, before the daemon acknowledged the terminal's answer to it) and
    says how long after the copy before it came (`gap`) and how long the terminal's ACK of
    that copy had been on the line (`acked_before`; None: not acknowledged yet, or undone by
    a NAK of the terminal's). The framer sends a frame again only for want of an ACK: so the
    terminal had not acknowledged the copy before (or its ACK was out for less than
    ACK_CROSSING) and the copy came within COPY_GAP_MAX of it; or a freeze of the daemon's
    (`freezes`: SIGSTOP, SIGCONT, wall clock) spans the gap. A copy without a gap (a ledger
    of an older simulator) proves nothing."""
    gap = receipt.get("gap")
    if not receipt.get("retransmission") or gap is None:
        return False
    at = receipt["at"]
    if any(stopped <= at and resumed >= at - gap for stopped, resumed in freezes):
        return True
    acked = receipt.get("acked_before")
    return (acked is None or acked < ACK_CROSSING) and gap <= COPY_GAP_MAX


def blind_resends(receipts: list[dict[str, Any]], freezes: list[tuple[float, float]]
                  ) -> list[dict[str, Any]]:
    """The receipts of a money request (one terminal's, in arrival order) that came right
    after a copy the terminal had dropped unread while muted (answer "dropped"), other than
    as the daemon's framer's copy of it (link_level_copy): the bridge, which had no word of
    that copy, sent the payment again instead of asking about it. A dropped copy was never
    acknowledged, so the framer's retransmission of it within the retry span passes."""
    return [receipt for before, receipt in zip(receipts, receipts[1:], strict=False)
            if before.get("answer") == "dropped" and not link_level_copy(receipt, freezes)]


def receipt_text(receipt: dict[str, Any]) -> str:
    """A receipt in a few words: when, what the terminal did, and of a copy its timing."""
    text = f"{clock(receipt['at'])} {receipt.get('answer')}"
    if receipt.get("gap") is not None:
        acked = receipt.get("acked_before")
        text += (f" ({'flagged ' if receipt.get('retransmission') else ''}copy "
                 f"{receipt['gap']:.2f} s after the one before, "
                 + ("which the terminal had not acknowledged)" if acked is None else
                    f"{acked:.2f} s after the terminal acknowledged it)"))
    elif receipt.get("retransmission"):
        text += " (flagged retransmission)"
    return text


IDENTITY_TIMEOUT = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ \S+: terminal (\S+): no answer to "
    r"the identity check within", re.MULTILINE)


def identity_check_timeouts(daemon_log: str) -> dict[str, list[float]]:
    """Terminal -> when (wall clock) the daemon gave up waiting for the identity check's
    answer on its link and sent what waited without knowing which terminal was there."""
    found: dict[str, list[float]] = defaultdict(list)
    for stamp, millis, poi_id in IDENTITY_TIMEOUT.findall(daemon_log):
        at = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
        found[poi_id].append(at)
    return dict(found)


def not_followed(terminal: Terminal, state: dict[str, Any]) -> bool:
    """Whether the bridge's state for `terminal` has it on another link than the one its
    simulator is plugged in at, or on a link whose device says it is another terminal."""
    link = state.get("link")
    return ((link is not None and not str(link).startswith(f"{terminal.plugged_at} "))
            or str(state.get("identity", "")).startswith("mismatch"))


def busy_loop_tag(row: dict[str, Any]) -> str | None:
    """A transaction the bridge keeps polling because the status says the original was
    refused Busy."""
    return "busy_status_polled_forever" if "/ Busy" in (row.get("detail") or "") else None


def what_it_did(entry: dict[str, Any]) -> str:
    """A terminal's ledger entry in a few words: its outcome, or, for a request it never
    processed, what it answered each receipt (busy, lost, unreadable...)."""
    if entry.get("outcome") is not None:
        return str(entry["outcome"])
    return "not processed: " + ", ".join(r.get("answer", "?")
                                         for r in entry.get("receipts") or [])


def whose(what: str, value: Any, owners: dict[Any, str] | None, payment: Payment) -> str:
    """A note naming the payment `value` (an amount, a sale) belongs to, e.g. " (the sale
    of TILL2/P7)", when it is another payment's (`owners`: value -> payment key, every
    payment's being its own); else an empty string."""
    owner = (owners or {}).get(value) if isinstance(value, int | float | str) else None
    return f" (the {what} of {owner})" if owner and owner != payment.key else ""


def amount_problems(payment: Payment, entries: dict[str, dict[str, Any]],
                    owners: dict[Any, str] | None = None) -> list[str]:
    """What is wrong with the amounts of `payment`: each terminal that received it (its
    ledger entry, by POIID) read the amount and currency the register asked; one that
    charged it authorised that amount; an approved result at the register carries it
    (AuthorizedAmount). Every payment of a run has an amount of its own (payment_amount):
    `owners` (amount -> payment key) names the payment a wrong amount is of, i.e. whose
    request or result this payment was given."""
    def of(amount: Any) -> str:
        return whose("amount", amount, owners, payment)

    found = []
    for poi, entry in entries.items():
        if entry.get("category") != "Payment":
            continue
        asked = entry.get("amount")
        if asked is not None and asked != payment.amount:
            found.append(f"terminal {poi} was asked for {asked!r}{of(asked)}, the register "
                         f"asked for {payment.amount!r}")
        if entry.get("currency") not in (None, CURRENCY):
            found.append(f"terminal {poi} was asked for currency {entry['currency']!r}, the "
                         f"register asked for {CURRENCY}")
        if entry.get("charged") and entry.get("authorised") != payment.amount:
            found.append(f"terminal {poi} charged {entry.get('authorised')!r}"
                         f"{of(entry.get('authorised'))}, the register asked for "
                         f"{payment.amount!r}")
    if payment.first_final == "approved" and payment.first_final_amount != payment.amount:
        found.append(f"the register was told approved ({payment.first_final_source}) for "
                     f"{payment.first_final_amount!r}{of(payment.first_final_amount)} "
                     f"(AuthorizedAmount), it asked for {payment.amount!r}"
                     if payment.first_final_amount is not None else
                     f"the register was told approved ({payment.first_final_source}) with no "
                     f"AuthorizedAmount; it asked for {payment.amount!r}")
    return found


def sale_problems(payment: Payment, owners: dict[Any, str] | None = None) -> list[str]:
    """The results the register received for `payment` that name another sale than its own
    (SaleTransactionID.TransactionID): the bridge handed it another payment's result. Of
    use where amounts cannot tell (a declined, cancelled or aborted result authorises 0,
    whatever was asked). `owners` (TransactionID -> payment key) names whose result it was.
    A result that names no sale (the bridge's own words) is not judged here."""
    if payment.transaction_id is None:
        return []
    return [f"the register was told {outcome} ({source}) for sale {sale!r}"
            f"{whose('sale', sale, owners, payment)}, its own is {payment.transaction_id!r}"
            for outcome, source, sale in payment.sales_told if sale != payment.transaction_id]


def request_problems(payment: Payment, entries: dict[str, dict[str, Any]]) -> list[str]:
    """What a terminal that received `payment` (its ledger entry, by POIID) was asked that
    the register did not ask: the soak's registers send Payments only, with no PaymentType
    (which means Normal): a Reversal under the payment's IDs, or a Refund, is money moved
    that no register asked for."""
    found = []
    for poi, entry in entries.items():
        category = entry.get("category")
        if category != "Payment":
            found.append(f"terminal {poi} received a {category or 'request'} under the IDs of "
                         f"the register's Payment ({what_it_did(entry)})")
        elif entry.get("payment_type") not in (None, "Normal"):
            found.append(f"terminal {poi} was asked for PaymentType "
                         f"{entry.get('payment_type')!r} ({what_it_did(entry)}); the register "
                         "asked for a Normal payment")
    return found


def floor_problems(soak: Soak, payments: list[Payment], counts: Counter[str]) -> list[str]:
    """Why the run proves too little: no payment at all, fewer approved than
    APPROVALS_PER_REGISTER_SECOND for its registers and duration, or a terminal addressed,
    or a register that paid, TERMINAL_FLOOR_PAYMENTS times or more with none approved (an
    all-refused run, a terminal the bridge never used, a register whose requests never ran,
    e.g. on one of the two request topics, would otherwise pass: nothing in it is lost)."""
    duration = float(soak.args.duration)
    floor = math.ceil(APPROVALS_PER_REGISTER_SECOND * len(soak.registers) * duration)
    found = []
    if duration > 0 and not payments:
        found.append(f"no payment was made in {duration:g} s")
    elif counts["approved"] < floor or counts["charged"] < floor:
        found.append(f"only {counts['approved']} payment(s) approved and {counts['charged']} "
                     f"charged of {len(payments)}; at least {floor} expected "
                     f"({APPROVALS_PER_REGISTER_SECOND:g} per register and second of chaos, "
                     f"{len(soak.registers)} registers, {duration:g} s)")
    addressed = Counter(p.poi_id for p in payments)
    approved = Counter(p.poi_id for p in payments if p.first_final == "approved")
    found += [f"terminal {poi}: none of the {n} payments addressed to it was approved"
              for poi, n in sorted(addressed.items())
              if n >= TERMINAL_FLOOR_PAYMENTS and not approved[poi]]
    made = Counter(p.sale_id for p in payments)
    approved = Counter(p.sale_id for p in payments if p.first_final == "approved")
    found += [f"register {sale_id}: none of the {n} payments it made was approved"
              for sale_id, n in sorted(made.items())
              if n >= TERMINAL_FLOOR_PAYMENTS and not approved[sale_id]]
    return found


def audit(soak: Soak, ledgers: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
          outbox: list[dict[str, Any]], *, settled: bool, daemon_exit: int | None,
          terminal_states: dict[str, dict[str, Any]], healthy_for: float,
          daemon_stop: str | None = None, follows: int = 0,
          unchecked: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Payment by payment: the terminals' ledgers vs the registers vs the journal.

    `daemon_exit` is the daemon's exit status after the final SIGTERM (None: there was
    none; `daemon_stop` says why): anything but 0 is a crash. `follows`: how many times the
    daemon logged that it followed two terminals to each other's links; `unchecked`: per
    terminal, when the daemon logged that its link's device did not answer the identity
    check and it sent what waited anyway (identity_check_timeouts)."""
    pending_total = outbox.pop()["pending_total"]
    traces = BrokerLog(soak.broker.log_path).match(soak.registers)
    journal = {(r["sale_id"], r["service_id"]): r for r in rows}
    deliveries: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for o in outbox:
        deliveries[(o["sale_id"], o["service_id"])].append(o)
    charged_at: dict[str, list[str]] = defaultdict(list)  # "SALE/SVC" -> terminals that charged
    seen_at: dict[str, list[str]] = defaultdict(list)
    for poi_id, ledger in ledgers.items():
        for key, entry in ledger.items():
            seen_at[key].append(poi_id)
            if entry.get("charged"):
                charged_at[key].append(poi_id)
    payments = [p for r in soak.registers for p in r.payments.values()]
    by_key = {p.key: p for p in payments}
    owners = {p.amount: p.key for p in payments}  # every payment's amount is its own
    by_sale = {p.transaction_id: p for p in payments if p.transaction_id}  # and its sale
    sale_owners = {sale: p.key for sale, p in by_sale.items()}
    repeats = repeated_receipts(ledgers)
    counts: Counter[str] = Counter()
    problems: list[dict[str, Any]] = []
    explained: list[str] = []
    unresolved_notes: list[str] = []
    offline = {poi for poi, st in terminal_states.items() if st.get("state") == "offline"}
    # Where the bridge has each terminal at the end vs where its simulator is plugged in
    # (after swaps, another terminal's configured link).
    misplaced = [t for t in soak.terminals if t.poi_id not in offline
                 and not_followed(t, terminal_states.get(t.poi_id, {}))]
    offline |= {t.poi_id for t in soak.terminals if t.poi_id not in terminal_states}
    last_start = soak.daemon.started_at[-1] if soak.daemon.started_at else None
    # the known bug's signature: the daemon (re)started while the terminal was unplugged
    started_unplugged = {t.poi_id for t in soak.terminals
                         if last_start is not None and t.unplugged_at(last_start)}

    def problem(kind: str, payment: Payment | None, text: str, *, poi_id: str | None = None,
                key: str | None = None, tag: str | None = None) -> None:
        """`tag` names a known bug the problem is a symptom of (see KNOWN_BUGS)."""
        counts[kind] += 1
        poi_id = poi_id or (payment.poi_id if payment else None)
        key = key or (payment.key if payment else None)
        where = (f"{payment.key} on {payment.poi_id} ({payment.kind}, sent "
                 f"{clock(payment.sent_at)})") if payment else ""
        problems.append({"kind": kind, "poi_id": poi_id, "key": key, "tag": tag,
                         "text": f"{where}: {text}" if where else text})

    for p in payments:
        counts["payments"] += 1
        key = (p.sale_id, p.service_id)
        row = journal.get(key)
        charged_on = charged_at.get(p.key, [])
        charged = bool(charged_on)
        if len(charged_on) > 1:
            problem("doubled", p, f"charged on {len(charged_on)} terminals: {charged_on}")
        # Each simulator's ledger is its own (by its POIID), wherever its cable was: a
        # payment in another terminal's ledger went out on the wrong device.
        elsewhere = [poi for poi in seen_at.get(p.key, []) if poi != p.poi_id]
        arrived = [r["at"] for poi in elsewhere
                   for r in ledgers[poi][p.key].get("receipts") or []]
        blind = [t for t in (unchecked or {}).get(p.poi_id, [])
                 if any(at - 5 <= t <= at + 0.5 for at in arrived)]
        if elsewhere:
            problem("wrong_terminal", p, f"addressed to {p.poi_id}, "
                    + "; ".join(f"{'charged' if poi in charged_on else 'received, not charged'}"
                                f" by terminal {poi} ({what_it_did(ledgers[poi][p.key])}) at "
                                + ", ".join(clock(r["at"]) for r in
                                            ledgers[poi][p.key].get("receipts") or [])
                                for poi in elsewhere)
                    + ": the bridge sent the payment to another terminal's device"
                    + (f" (the daemon logged 'no answer to the identity check' for {p.poi_id} "
                       f"at {clock(blind[0])})" if blind else ""),
                    tag="sent_without_identity" if blind else None)
        for text in amount_problems(p, {poi: ledgers[poi][p.key]
                                        for poi in seen_at.get(p.key, [])}, owners):
            problem("wrong_amount", p, text)
        counts["sales_compared"] += len(p.sales_told)
        for text in sale_problems(p, sale_owners):
            problem("wrong_sale", p, text)
        for text in request_problems(p, {poi: ledgers[poi][p.key]
                                         for poi in seen_at.get(p.key, [])}):
            problem("unsolicited", p, text)
        final = p.first_final
        # Told "rejected" but the journal has it as something else: it ran after all.
        redelivered = "redelivered_refusal" if final == "rejected" and row is not None \
            and row["outcome"] != "rejected" else None
        if redelivered and never_journaled(p):
            redelivered = "redelivered_unjournaled_refusal"
        if p.conflicts:
            problem("disputed", p, "register got different final outcomes: "
                    + "; ".join(p.conflicts), tag=redelivered)
        if final is not None:
            counts[final] += 1
            if p.final_via_resync:
                counts["recovered_by_resync"] += 1
                ours = [d for d in deliveries.get(key, []) if row is not None
                        and d["outcome"] == row["outcome"] and d["delivered_at"] is not None]
                first = min((d["delivered_at"] for d in ours), default=None)
                if _near(soak.broker_kills, first, BROKER_LOSS_WINDOW, 0.5):
                    explained.append(f"{p.key}: the result was acknowledged by the broker at "
                                     f"{clock(first)}, less than {BROKER_LOSS_WINDOW} s before "
                                     "a mosquitto kill -9 (inside its autosave window), so the "
                                     "broker most likely lost it; the register's resync "
                                     "brought it")
                else:
                    problem("lost", p, f"journal final {row and row['outcome']} (acknowledged "
                            f"by the broker at {first}) never reached the register; only "
                            "resync brought it")
            if final == "approved" and not charged:
                problem("phantom", p, "register told approved, terminal did not charge "
                        f"(ledger: {ledgers.get(p.poi_id, {}).get(p.key)})")
            elif final != "approved" and charged:
                busy = row is not None and row["detail"] == BUSY_DETAIL
                problem("lost", p, f"terminal charged, register told {final} "
                        f"(outcomes {[(o, s) for _, o, s in p.outcomes]}; journal "
                        f"{row and (row['state'], row['outcome'], row['source'], row['detail'])})",
                        tag="busy_taken_for_declined" if busy else redelivered
                        or ("sent_without_identity" if blind else None))
            if row is None and not refused_while_draining(p, soak.daemon_terms):
                problem("disputed", p, f"register got final {final} ({p.first_final_source}"
                        f"{': ' + p.first_final_error if p.first_final_error else ''}), the "
                        "journal has no row for it")
            elif row is not None and row["state"] == "final" and row["outcome"] != final:
                problem("disputed", p, f"register acted on {final}, journal says "
                        f"{row['outcome']} ({row['source']}: {row['detail']})",
                        tag=redelivered)
            elif row is not None and row["state"] != "final":
                problem("disputed", p, f"register got final {final}, journal row is "
                        f"{row['state']} ({row['detail']})", tag=redelivered)
            continue
        # No final outcome at the register.
        if row is None:
            if charged:
                problem("lost", p, "terminal charged, the journal has no row, register has "
                        "no answer")
            else:
                trace = traces.get(p.key, NOT_FOUND_IN_LOG)
                near_kill = _near(soak.broker_kills, p.sent_at, BROKER_LOSS_WINDOW, 0.5)
                # when the bridge got it (whole seconds in the broker's log), else when sent
                got = trace["sent"] if trace["sent"] is not None else p.sent_at
                during_drain = any(int(a) - 1 <= got <= b + 1 for a, b in soak.daemon_terms)
                seen = (f"broker log: received {trace['received']} (bridge subscribed: "
                        f"{trace['bridge_subscribed']}), saved {trace['saved']}, dropped by a "
                        f"restart {trace['dropped']}, sent to the bridge {trace['sent']}, "
                        f"acknowledged by the bridge {trace['acked']}")
                if trace["acked"] is not None:
                    problem("lost", p, "the bridge acknowledged the request (QoS 1 PUBACK) but "
                            "never answered nor journaled it"
                            + (" (it arrived while the daemon was draining after SIGTERM)"
                               if during_drain else "") + f"; {seen}",
                            tag="dropped_while_draining" if during_drain else None)
                elif p.publish == "uncertain" and trace["received"] is None:
                    counts["never_reached_bridge"] += 1
                    explained.append(f"{p.key}: the register's publish failed (broker outage) "
                                     "and the broker never logged it; nothing charged")
                elif trace["dropped"] is not None and near_kill:
                    counts["never_reached_bridge"] += 1
                    explained.append(f"{p.key}: request published at {clock(p.sent_at)}, not "
                                     "yet saved by mosquitto when it was killed -9, so the "
                                     "broker lost it before the bridge could have it; nothing "
                                     f"charged ({seen})")
                elif trace["received"] is not None and trace["session_lost"] \
                        and trace["dropped"] is None and trace["sent"] is None:
                    counts["never_reached_bridge"] += 1
                    explained.append(f"{p.key}: request published at {clock(p.sent_at)} to a "
                                     "broker restarted without the bridge's session (killed "
                                     "-9 before it saved the bridge's subscriptions), before "
                                     "the bridge subscribed again: routed to nobody; nothing "
                                     f"charged ({seen})")
                elif trace["received"] is not None and trace["reconnected_without_session"] \
                        and trace["dropped"] is None and trace["sent"] is None:
                    problem("lost", p, "the broker took the request after the bridge had come "
                            "back without its session (CONNACK session-present 0, no restart "
                            "of the broker in its log: the bridge dropped its own session, "
                            "e.g. a clean start or a session expiry of 0) and before it "
                            f"subscribed again, so nobody ever got it; {seen}")
                elif trace["received"] is not None and trace["bridge_subscribed"] is False \
                        and trace["dropped"] is None and trace["sent"] is None:
                    problem("lost", p, "the broker took the request while the bridge had no "
                            "subscription to requests (it had unsubscribed), so nobody ever "
                            f"got it; {seen}", tag="unsubscribed_while_draining")
                else:
                    problem("lost", p, "request acknowledged by the broker but never answered "
                            f"and not in the journal; {seen}")
            continue
        if row["state"] == "unresolved":
            counts["unresolved"] += 1
            if not p.saw_unresolved:
                problem("lost", p, "journal says unresolved but the register never got the "
                        "unresolved report")
            ledger_entry = next((ledgers[poi][p.key] for poi in seen_at.get(p.key, [])), None)
            why = (f"journal unresolved after {row['polls_sent']} polls, "
                   f"{row['reconcile_attempts']} reconcile attempts; last: {row['detail']}; "
                   f"terminal ledger: {ledger_entry or 'never received (nothing charged)'}")
            if p.poi_id in offline:
                why += (f"; the bridge still has terminal {p.poi_id} offline "
                        f"({terminal_states.get(p.poi_id, {}).get('detail', 'no state')})")
            unresolved_notes.append(f"{p.key} on {p.poi_id} ({p.kind}): {why}")
            if charged:
                # The terminal produced a result and the register knows only "unresolved,
                # check": that result never reached it. Only where the terminal told the
                # bridge it had no record of it after it had charged it (it forgot it: a
                # NotFound the bridge may no longer take for "never received") can the bridge
                # not learn it: counted on its own. A NotFound from before the charge excuses
                # nothing: any later poll would have been told the result. (The simulator
                # never forgets a transaction: all its NotFounds come before.)
                counts["charged_unresolved"] += 1
                charged_since = min((r["at"] for poi in charged_on
                                     for r in ledgers[poi][p.key].get("receipts") or []
                                     if r.get("answer") == "processed"), default=None)
                said = sorted(at for poi in charged_on
                              for at in ledgers[poi][p.key].get("status_not_found") or [])
                forgot = [at for at in said if charged_since is not None and at > charged_since]
                if given_up_by_design(row) and forgot:
                    counts["charged_unlearnable"] += 1
                    explained.append(f"{p.key}: CHARGED by {charged_on}, the register told "
                                     "only unresolved: the terminal answered NotFound to the "
                                     f"bridge's status poll at {clock(forgot[0])}, after it "
                                     f"had charged it at {clock(charged_since)}, and had taken "
                                     "another payment since, so the bridge stopped asking and "
                                     "told the register to check the acquirer's records; "
                                     f"terminal ledger: {ledger_entry}")
                elif given_up_by_design(row) or busy_record_of_a_copy(row) \
                        or healthy_for >= HEALTHY_ENOUGH:
                    excuse = (f" (the bridge gave up: NotFound after another payment, but the "
                              f"terminal's NotFound at {clock(said[-1])} came before it charged "
                              f"it at {clock(charged_since or 0)}: any later poll would have "
                              "been told the result)"
                              if given_up_by_design(row) and said else
                              " (the bridge gave up: NotFound after another payment, but the "
                              "terminal never answered NotFound about it)"
                              if given_up_by_design(row) else
                              " (the bridge says the terminal's record is Busy, but the "
                              "terminal charged it)" if busy_record_of_a_copy(row) else "")
                    problem("lost", p, f"terminal charged it, the register was told only "
                            f"unresolved{excuse}: {why}", tag=busy_loop_tag(row))
                else:
                    problem("incomplete", p, f"terminal charged it, the register was told only "
                            f"unresolved, and everything was back for only {healthy_for:.0f} s "
                            f"(< {HEALTHY_ENOUGH:g}): the audit cannot tell whether the bridge "
                            f"would have resolved it: {why}")
            elif given_up_by_design(row):
                # The bridge's last word, not a row it forgot: nothing the terminal can say
                # will settle it, and the register was told to check the acquirer.
                explained.append(f"{p.key}: left unresolved by design: the terminal answered "
                                 "NotFound after it had taken another payment, so the bridge "
                                 "stopped asking and told the register to check the "
                                 f"acquirer's records; terminal ledger: "
                                 f"{ledger_entry or 'never received (nothing charged)'}")
            elif busy_record_of_a_copy(row):
                explained.append(f"{p.key}: left unresolved by design: its frame went out "
                                 "more than once (a NAK, or no ACK in time) and the terminal's "
                                 "record says Busy, which may answer the second copy while "
                                 "it ran the first; the register was told to check; terminal "
                                 f"ledger: {ledger_entry or 'never received (nothing charged)'}")
            elif healthy_for >= HEALTHY_ENOUGH:
                problem("stuck", p, f"still unresolved {healthy_for:.0f} s after the terminal, "
                        f"the broker and the bridge were all back: {why}",
                        tag=busy_loop_tag(row))
            else:
                problem("incomplete", p, f"still unresolved, and everything was back for only "
                        f"{healthy_for:.0f} s (< {HEALTHY_ENOUGH:g}): the audit cannot tell "
                        f"whether the bridge would have resolved it: {why}")
            continue
        if row["state"] == "final":
            problem("lost", p, f"journal final {row['outcome']} but the register never got it "
                    "(even after resync)")
            continue
        counts["no_final"] += 1  # accepted / awaiting_response / polling: stuck, below

    for row in rows:
        key = f"{row['sale_id']}/{row['service_id']}"
        if row["state"] in OPEN_STATES:
            problem("stuck", by_key.get(key), f"journal row {key} ({row['category']}) still "
                    f"{row['state']} after {row['polls_sent']} status polls: {row['detail']}",
                    poi_id=row["poi_id"], key=key, tag=busy_loop_tag(row))
        elif row["category"] == "Payment" and key not in by_key:
            problem("doubled", None, f"journal has payment {key} that no register sent",
                    poi_id=row["poi_id"], key=key)
    # what the muted terminals dropped unread (the audit judges the money requests' copies)
    counts["dropped_unread"] = sum(len(t.dropped_unread) for t in soak.terminals)
    counts["dropped_unread_money"] = sum(
        1 for ledger in ledgers.values() for entry in ledger.values()
        for r in entry.get("receipts") or [] if r.get("answer") == "dropped")
    for poi_id, key, receipts in repeats:
        counts["retransmitted_requests"] += 1
        bad = [r for r in receipts[1:] if not link_level_copy(r, soak.daemon_freezes)]
        blind = blind_resends(receipts, soak.daemon_freezes)
        if blind:
            problem("doubled", by_key.get(key),
                    f"BLIND RE-SEND: request {key} reached terminal {poi_id} again after the "
                    "terminal had dropped a copy of it unread while muted (never acknowledged), "
                    f"{len(blind)} time(s) other than as the framer's retransmission of it "
                    f"(not byte for byte the frame just before, or more than "
                    f"{COPY_GAP_MAX:g} s after it with no freeze of the daemon's between): the "
                    "bridge sent the payment again instead of asking about it: "
                    + "; ".join(receipt_text(r) for r in receipts), poi_id=poi_id, key=key)
        elif bad:
            problem("doubled", by_key.get(key),
                    f"request {key} reached terminal {poi_id} {len(receipts)} times, "
                    f"{len(bad)} of them not as a link-level retransmission of the frame "
                    "before (not the frame just before, or after the terminal had "
                    f"acknowledged it, or more than {COPY_GAP_MAX:g} s after it, with no "
                    "freeze of the daemon's between; the terminal ignored the repeat, a real "
                    "one might charge it): " + "; ".join(receipt_text(r) for r in receipts),
                    poi_id=poi_id, key=key)
    # The register's sale sent again under a ServiceID no register sent: doubled (and
    # unsolicited, below); a blind re-send if a copy of the payment was dropped unread first.
    for poi_id, ledger in ledgers.items():
        for key, entry in ledger.items():
            p = by_sale.get(entry.get("transaction_id"))
            if key in by_key or p is None:
                continue
            came = [r["at"] for r in entry.get("receipts") or []]
            dropped = [r["at"] for poi in seen_at.get(p.key, [])
                       for r in ledgers[poi][p.key].get("receipts") or []
                       if r.get("answer") == "dropped" and came and r["at"] < min(came)]
            problem("doubled", p, ("BLIND RE-SEND: " if dropped else "")
                    + f"the register's sale {p.transaction_id} reached terminal {poi_id} again "
                    f"as {key}, under ServiceID {key.split('/', 1)[1]} that no register sent"
                    + (f" (after a copy of {p.key} was dropped unread while muted at "
                       f"{clock(min(dropped))})" if dropped else "")
                    + ": " + "; ".join(receipt_text(r) for r in entry.get("receipts") or []),
                    poi_id=poi_id, key=p.key)
    for poi_id, ledger in ledgers.items():
        for key, entry in ledger.items():
            if key not in by_key:
                # Whatever it is and whatever became of it: the bridge sent a money request
                # of its own making (a Reversal of a payment a register was told approved
                # moves the money back as surely as a second charge moves it out)
                problem("unsolicited", None, f"terminal {poi_id} received "
                        f"{entry.get('category') or 'a money request'} {key}, which no "
                        f"register sent ({'CHARGED' if entry.get('charged') else 'not charged'}"
                        f": {what_it_did(entry)}; receipts: "
                        + "; ".join(receipt_text(r) for r in entry.get("receipts") or [])
                        + ")", poi_id=poi_id, key=key)
    if pending_total:
        problem("stuck", None, f"{pending_total} result(s) left in the outbox, never delivered "
                "to the broker")
    for poi_id in sorted(offline):
        state = terminal_states.get(poi_id, {})
        problem("stuck", None, f"terminal {poi_id} is still offline for the bridge "
                f"({state.get('detail') or 'no state published'}) although its simulator has "
                f"been plugged in for {healthy_for:.0f} s", poi_id=poi_id,
                tag="left_offline" if poi_id in started_unplugged else None)
    for terminal in misplaced:
        state = terminal_states[terminal.poi_id]
        problem("stuck", None, f"terminal {terminal.poi_id}: the bridge uses "
                f"{state.get('link')} (identity {state.get('identity')}) although its "
                f"simulator is plugged in at {terminal.plugged_at}: swapped cables not followed",
                poi_id=terminal.poi_id)
    for register in soak.registers:
        for abort_id, outcomes in register.aborts.items():
            counts["aborts_sent"] += 1
            if not outcomes and (register.sale_id, abort_id) in journal:
                problem("lost", None, f"{register.sale_id}/{abort_id}: abort journaled, never "
                        "answered")
        for stray in register.stray:
            problem("disputed", None, f"{register.sale_id} got a response for a ServiceID it "
                    f"never sent: {json.dumps(stray)[:200]}")
    for crash in soak.crashes:
        problem("crashed", None, crash)
    if daemon_exit != 0:
        problem("crashed", None, "the daemon's final stop (SIGTERM) did not end with exit "
                "status 0: " + (f"exit status {daemon_exit}" if daemon_exit is not None
                                else daemon_stop or "no exit status"))
    for episode in soak.offline_episodes:
        # Only the offline episode itself carries the tag: a journal row stuck on the same
        # terminal is judged on its own (above), whatever happened to the terminal.
        problem("stuck", None, episode["text"], poi_id=episode["poi_id"],
                tag="left_offline" if episode.get("started_while_unplugged") else None)
    counts["charged"] = sum(1 for k in charged_at if k in by_key)
    for text in floor_problems(soak, payments, counts):
        problem("too_few", None, text)
    chaos = Counter(e.kind for e in soak.events if not e.skipped)
    skipped = Counter(e.kind for e in soak.events if e.skipped)
    return {
        "seed": soak.args.seed, "duration": soak.args.duration,
        "terminals": len(soak.terminals), "registers": len(soak.registers),
        "counts": dict(counts), "chaos": dict(chaos), "chaos_skipped": dict(skipped),
        "problems": problems, "explained": explained, "unresolved": unresolved_notes,
        "settled": settled, "settle_state": soak.settle_state, "daemon_exit": daemon_exit,
        "daemon_stop": daemon_stop, "daemon_starts": soak.daemon.starts,
        "swaps": len(soak.swaps), "follows": follows,
        "daemon_freezes": [[round(a, 3), round(b, 3)] for a, b in soak.daemon_freezes],
        "terminals_offline_at_end": sorted(offline),
        "dropped_unread": {t.poi_id: t.dropped_unread for t in soak.terminals
                           if t.dropped_unread},
        "offline_episodes": soak.offline_episodes,
        "register_connects": {r.sale_id: r.connects for r in soak.registers},
        "workdir": str(soak.workdir),
    }


class AuditCrashed(Exception):
    """An exception inside the audit itself (its traceback is the message): the run has no
    verdict, which is a failure as loud as any."""


def judged(soak: Soak, ledgers: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
           outbox: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """audit(), with an exception inside it raised as AuditCrashed."""
    try:
        return audit(soak, ledgers, rows, outbox, **options)
    except Exception as exc:
        raise AuditCrashed(traceback.format_exc()) from exc


def audit_crashed(soak: Soak, workdir: Path, args: argparse.Namespace, trace: str,
                  started: float) -> int:
    """The audit crashed: a banner, an audit.json that says so, the workdir kept, exit 1."""
    result = {"seed": args.seed, "duration": args.duration, "keys": args.keys,
              "audit_crashed": trace, "workdir": str(workdir),
              "wall_seconds": round(time.monotonic() - started, 1)}
    with contextlib.suppress(OSError):
        (workdir / "audit.json").write_text(json.dumps(result, indent=1))
        (workdir / "chaos.json").write_text(json.dumps(
            [dataclasses.asdict(e) for e in soak.events], indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    print()
    print("!" * 76)
    print("!!! SOAK FAILED: the audit itself crashed; nothing was judged")
    print(f"!!! seed {args.seed}; logs, journal and ledgers kept in {workdir}")
    print("!" * 76)
    print(trace)
    return 1


def report(result: dict[str, Any]) -> bool:
    c = Counter(result["counts"])
    rows = [
        ("payments", c["payments"]), ("charged (ledgers)", c["charged"]),
        ("approved", c["approved"]), ("declined", c["declined"]),
        ("cancelled", c["cancelled"]), ("aborted", c["aborted"]),
        ("not_found", c["not_found"]), ("rejected (busy/offline)", c["rejected"]),
        ("error", c["error"]), ("unresolved at the end", c["unresolved"]),
        ("  of them charged", c["charged_unresolved"]),
        ("  ... terminal said NotFound", c["charged_unlearnable"]),
        ("never reached the bridge", c["never_reached_bridge"]),
        ("recovered by resync", c["recovered_by_resync"]),
        ("aborts sent", c["aborts_sent"]),
        ("results whose sale was compared", c["sales_compared"]),
        ("terminal swaps (cables)", result.get("swaps", 0)),
        ("followed by the daemon (log)", result.get("follows", 0)),
        ("requests retransmitted (link)", c["retransmitted_requests"]),
        ("frames dropped unread (muted)", c["dropped_unread"]),
        ("  of them money requests", c["dropped_unread_money"]),
        ("LOST", c["lost"]), ("DOUBLED", c["doubled"]), ("PHANTOM", c["phantom"]),
        ("WRONG TERMINAL", c["wrong_terminal"]), ("WRONG AMOUNT", c["wrong_amount"]),
        ("WRONG SALE (another's result)", c["wrong_sale"]),
        ("UNSOLICITED", c["unsolicited"]),
        ("STUCK", c["stuck"]), ("DISPUTED", c["disputed"]), ("CRASHED", c["crashed"]),
        ("AUDIT INCOMPLETE", c["incomplete"]), ("TOO FEW APPROVED (floor)", c["too_few"]),
    ]
    if result.get("keys", "none") != "none":
        rows.append(("KEY MATERIAL LEAKED", c["leaked"]))
    print()
    print(f"soak audit: seed {result['seed']}, {result['duration']:g} s of chaos, "
          f"{result['terminals']} terminals, {result['registers']} registers, "
          f"daemon started {result['daemon_starts']}x"
          + (f", keys {result['keys']}" if result.get("keys", "none") != "none" else ""))
    print("-" * 48)
    for name, value in rows:
        print(f"  {name:<32} {value:>8}")
    print("-" * 48)
    print("  chaos events")
    for kind in [*CHAOS_KINDS, *(k for k in result["chaos"] if k not in CHAOS_KINDS)]:
        skipped = result["chaos_skipped"].get(kind, 0)
        print(f"    {kind:<30} {result['chaos'].get(kind, 0):>8}"
              + (f"  (+{skipped} skipped: already out)" if skipped else ""))
    print("-" * 48)
    if result["unresolved"]:
        print("unresolved at the end, and why:")
        for line in result["unresolved"]:
            print("  " + line)
    if result["explained"]:
        print(f"explained ({len(result['explained'])}):")
        for line in result["explained"][:50]:
            print("  " + line)
    if c["charged_unlearnable"]:
        # Not a failure (the terminal's own NotFound left the bridge nothing to learn), but
        # money moved that the register does not know of: never silent.
        print(f"!!! {c['charged_unlearnable']} payment(s) CHARGED that the register knows only "
              "as unresolved (the terminal answered NotFound): see 'explained' above")
    if not result["settled"]:
        # Not a failure by itself: what it left is judged payment by payment above (a result
        # the broker lost in a kill -9 leaves its register waiting until the resync).
        print(f"note: settling gave up with {result['settle_state']}")
    bad: dict[str, list[str]] = defaultdict(list)
    tags: Counter[str] = Counter()
    for item in result["problems"]:
        if item["kind"] in FATAL:
            bad[item["kind"]].append(item["text"] + (f"  [{item['tag']}]" if item.get("tag")
                                                     else ""))
            if item.get("tag"):
                tags[item["tag"]] += 1
    if bad:
        print()
        print("!" * 76)
        print("!!! SOAK FAILED: " + ", ".join(f"{k} {len(v)}" for k, v in bad.items()))
        print(f"!!! seed {result['seed']}; logs, journal and ledgers kept in {result['workdir']}")
        print("!" * 76)
        for kind, lines in bad.items():
            print(f"{kind.upper()}:")
            for line in lines[:40]:
                print("  " + line)
            if len(lines) > 40:
                print(f"  ... and {len(lines) - 40} more")
        for tag, n in tags.items():
            print(f"[{tag}] ({n}): known bridge bug: {KNOWN_BUGS.get(tag, '?')}")
        return False
    print("soak passed: nothing lost, doubled, phantom, on a wrong terminal, of a wrong amount, "
          "of another sale, unsolicited, disputed, stuck or crashed, the audit complete, above "
          "the floor of approvals"
          + (", no key material leaked" if result.get("keys", "none") != "none" else ""))
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=100.0,
                   help="seconds of payments under chaos (default 100; the finale and "
                        "settling follow: about 3 minutes in all)")
    p.add_argument("--seed", type=int, default=1, help="seed for chaos and registers")
    p.add_argument("--terminals", type=int, default=8)
    p.add_argument("--registers", type=int, default=4)
    p.add_argument("--chaos-interval", type=float, default=2.5,
                   help="mean seconds between chaos events")
    p.add_argument("--keys", choices=KEY_MODES, default="none",
                   help="local encryption on the terminals' links: none (default), one key "
                        "shared by all, one per terminal (swapped cables then put a device "
                        "with another key on a link), or rotation (one per terminal in two "
                        "versions, key and previous_key, devices taking up the second while "
                        "the bridge runs); passphrase files in the workdir's keys/")
    p.add_argument("--settle", type=float, default=60.0,
                   help="at most this long for the bridge to resolve what is open at the end")
    p.add_argument("--no-finale", dest="finale", action="store_false",
                   help="do not end the chaos with a power blip (terminal unplugged and the "
                        "daemon restarted while it is away)")
    p.add_argument("--stall", type=float, default=20.0,
                   help="stop settling when nothing has moved for this long")
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir, "
                                                "removed when the soak passes)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir even on success")
    p.add_argument("--log-level", default="info", choices=["debug", "info"],
                   help="the daemon's log level")
    p.add_argument("--json", type=Path, help="write the audit as JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="print each chaos event")
    args = p.parse_args(argv)
    if args.terminals < 1 or args.registers < 1:
        p.error("need at least one terminal and one register")
    if args.duration < 10:
        # (the audit's floor of approvals scales with it: a shorter run proves nothing)
        p.error("--duration must be at least 10 s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The registers' MQTT clients lose the broker on purpose; paho's complaints are noise.
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)
    if find_mosquitto() is None:
        print("soak: mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    # (absolute: the configuration's device paths must be, and the daemon runs from ROOT)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="poi-soak-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, workdir)
    started = time.monotonic()
    crash = None
    try:
        result = asyncio.run(soak.run())
    except AuditCrashed as exc:
        crash = str(exc)
    finally:
        # Whatever happened, leave no process behind.
        soak.daemon.kill()
        for terminal in soak.terminals:
            if terminal.process is not None and terminal.process.poll() is None:
                terminal.process.kill()
        soak.broker.kill()
    if crash is not None:
        return audit_crashed(soak, workdir, args, crash, started)
    try:
        ok = conclude(soak, workdir, args, result, started)
    except Exception:  # noqa: BLE001 (the leak search and the report are the audit's too)
        return audit_crashed(soak, workdir, args, traceback.format_exc(), started)
    if ok and args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def conclude(soak: Soak, workdir: Path, args: argparse.Namespace, result: dict[str, Any],
             started: float) -> bool:
    """The audit's files, the leak search, and the report: whether the run passed."""
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    result["keys"] = args.keys
    (workdir / "audit.json").write_text(json.dumps(result, indent=1))
    (workdir / "chaos.json").write_text(json.dumps([dataclasses.asdict(e) for e in soak.events],
                                                   indent=1))
    leaks = leaked_keys(workdir, soak.keys)  # the audit just written included
    if leaks:
        result["problems"] += [{"kind": "leaked", "poi_id": None, "key": None, "tag": None,
                                "text": leak} for leak in leaks]
        result["counts"]["leaked"] = len(leaks)
        (workdir / "audit.json").write_text(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    ok = report(result)
    print(f"wall time {result['wall_seconds']} s")
    return ok


if __name__ == "__main__":
    raise SystemExit(main())

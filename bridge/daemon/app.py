"""The daemon: journal, terminal workers, the MQTT side, hotplug and systemd, tied together.

Start-up order matters: the journal is opened first (a bad journal stops everything before
any terminal is touched), open transactions are handed back to their terminals' sessions,
workers start, then the broker connection; READY=1 goes to systemd once all of that stands.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge import __version__
from bridge.addresses import host_port
from bridge.config import (
    Config,
    SecretError,
    TerminalConfig,
    UsbLink,
    credential_path,
    read_configured_secret,
)
from bridge.daemon.device_match import DeviceInfo, TerminalMatcher, describe_link
from bridge.daemon.disk_room import wait_for_room
from bridge.daemon.follow import partner_to_follow, waits_for_its_own_link
from bridge.daemon.worker import FOLLOW_LATER
from bridge.daemon.hotplug import (
    HotplugMonitor, NodeIdentity, UdevNotRunning, node_identity, udev_announces)
from bridge.daemon.intake import RequestIntake
from bridge.daemon.journal import Journal, JournalGone, StepFailed
from bridge.daemon.journal_files import journal_files, unusable
from bridge.daemon.mqtt import RegisterGateway
from bridge.daemon.mqtt_client import quiet_closed_socket_errors
from bridge.daemon.notify import SystemdNotifier, run_watchdog
from bridge.daemon.peers import describe as describe_bridge
from bridge.daemon.set_aside import SetAsideRequests, set_aside_path
from bridge.daemon.worker import TerminalWorker, SteadyClock, describe_transactions
from bridge.protocol import crypto
from bridge.protocol.transaction import TxKey
from bridge.transports import open_transport

log = logging.getLogger("poi_bridge")

PRUNE_INTERVAL = 3600.0
PRUNE_STEP = 200  # rows of each table forgotten per loop pass
CLOCK_CHECK_INTERVAL = 5.0  # s between looks at the system clock
CLOCK_STEP = 30.0  # s: a difference this large is a step of the system clock, not drift
JOURNAL_EXIT_STATUS = 3  # the journal cannot be opened, or no longer written
# The journal's files were removed or replaced under the daemon: systemd must not start it
# again (the unit's RestartPreventExitStatus=), a technician puts the saved copy back first
JOURNAL_LOST_EXIT_STATUS = 5
TASK_EXIT_STATUS = 4  # one of the daemon's long-lived tasks ended: systemd starts it again
STOP_GRACE = 2.0  # s: how long a stop waits for its tasks to end after cancelling them
STOP_TRIES = 3  # cancellations before a task that will not end is left behind
# The journal's open runs SQLite's quick_check, which reads the whole file: 500 MB of
# payments (about 40 KB each with their receipts and messages) took 9-19 s from a cold page
# cache on a development VM's disk (26-58 MB/s; 0.3-0.5 s warm), so 2 MB/s is taken for a
# store box's slow flash. A large journal (a busy store, a long transaction_retention, a long
# broker outage) would then outlast the unit's TimeoutStartSec=60, and systemd would kill
# every start of it. Before the open the daemon asks systemd (EXTEND_TIMEOUT_USEC) for that
# time and START_ALLOWANCE more, the unit's own budget for the rest of the start.
JOURNAL_CHECK_RATE = 2e6  # bytes/s
START_ALLOWANCE = 60.0  # s
STATUS_INTERVAL = 10.0


def load_key(terminal: TerminalConfig, which: str = "key") -> crypto.NexoKey | None:
    """The terminal's key (`which`: "key" or "previous_key"), passphrase read from its
    file. A relative path names a systemd credential (LoadCredential=), looked up in
    $CREDENTIALS_DIRECTORY."""
    configured = getattr(terminal, which)
    if configured is None:
        return None
    try:
        passphrase = read_configured_secret(configured.passphrase_file,
                                            f"{which.replace('_', ' ')} passphrase file")
    except SecretError as exc:
        raise SystemExit(f"terminal {terminal.poi_id}: {exc}") from None
    assert passphrase is not None
    if not passphrase:  # (NexoKey's ValueError was a traceback from Bridge.__init__)
        raise SystemExit(
            f"terminal {terminal.poi_id}: {which.replace('_', ' ')} passphrase file "
            f"{credential_path(configured.passphrase_file)} is empty: write the passphrase "
            f"of key {configured.identifier!r} version {configured.version} into it, as "
            "the terminal is configured with, then start the bridge again")
    return crypto.NexoKey(configured.identifier, configured.version, passphrase)


def _taken(terminal: TerminalConfig, config: Config) -> dict[str, tuple[str, ...]]:
    """For a USB terminal: the serials and ports its twins (other terminals of its ids) are
    configured with, whose devices a link with neither must not take."""
    link = terminal.link
    if not isinstance(link, UsbLink):
        return {}
    # (one composite device may hold two terminals on two interfaces: not twins)
    twins = [t.link for t in config.terminals if t is not terminal and link.same_model(t.link)]
    return {"taken_serials": tuple(twin.serial for twin in twins if twin.serial),
            "taken_ports": tuple(twin.port for twin in twins if twin.port)}


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the daemon's %s task failed", task.get_name(), exc_info=task.exception())


class Bridge:
    def __init__(self, config: Config, *, mqtt_password: str | None = None,
                 hotplug: HotplugMonitor | None | bool = True,
                 notifier: SystemdNotifier | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        """`hotplug`: True builds a udev monitor for the serial/USB terminals, False runs
        without one (workers then just retry their device with backoff), or pass one in."""
        self.config = config
        self.notifier = notifier or SystemdNotifier()
        self.started = time.time()
        self._allow_for_journal_check(config.journal)
        self.journal = Journal(config.journal)
        self.gateway = RegisterGateway(config.mqtt, self.journal, password=mqtt_password)
        self.gateway.set_aside = SetAsideRequests(set_aside_path(config.journal))
        # One steady clock for everything that stamps or compares the journal's times: the
        # terminals' sessions, the 48-hour ServiceID rule and pruning must agree, or a step
        # of the system clock makes a payment of a minute ago look days old to one of them.
        self.clock = SteadyClock(wall)
        self.workers: dict[str, TerminalWorker] = {
            t.poi_id: TerminalWorker(t, self.journal, self.gateway, key=load_key(t),
                                     previous_key=load_key(t, "previous_key"),
                                     clock=self.clock, on_wrong_device=self._wrong_device,
                                     follow_waits=self._follow_waits,
                                     transport_factory=functools.partial(
                                         open_transport, **_taken(t, config)))
            for t in config.terminals
        }
        # A terminal whose device is on another terminal's link, waiting for that terminal's
        # own link to say who is there (FOLLOW_LATER) -> that terminal
        self._awaited: dict[str, str] = {}
        self._deciding_again = False
        # STATUS= now, not at the next interval (_status_loop); what it last showed
        self._status_wanted: asyncio.Event | None = None
        self._status_shown: dict[str, tuple[bool, str]] = {}  # poi_id -> (online, identity)
        for worker in self.workers.values():
            worker.terminals = self.workers
            worker.on_state = self._state_changed
            worker.neighbours = {
                other.poi_id: other.key for other in self.workers.values()
                if other is not worker and other.config.link.kind == worker.config.link.kind}
        self.intake = RequestIntake(config, self.journal, self.gateway, self.workers,
                                    health=self.health, clock=self.clock, wall=wall)
        self.gateway.set_request_handler(self.intake.handle)
        self.gateway.health_source = self.health
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self.exit_status = 0
        if hotplug is True:
            matcher = TerminalMatcher(config)
            hotplug = HotplugMonitor(matcher, self._plugged, self._unplugged) \
                if matcher.hotplug_terminals else None
        self.hotplug: HotplugMonitor | None = hotplug or None
        # Serial terminals switched off, waiting for udev to say their node is there, whose
        # node is also looked at every recheck_absent s (_recheck_absent): poi_id -> the node,
        # and the identity of the node that was there when udev said it went (None: any node
        # there counts). That very node still there is not the terminal back; a node made
        # since (a replug quicker than a recheck) is.
        self._awaited_nodes: dict[str, tuple[str, NodeIdentity | None]] = {}
        self._recheck: asyncio.Task[None] | None = None

    def _wrong_device(self, poi_id: str, said: str) -> TerminalWorker | str | None:
        """The device on `poi_id`'s link says it is `said`: follow both terminals to their
        devices if `said`'s own link cannot hold it (see bridge.daemon.follow). `said`'s
        worker when followed; FOLLOW_LATER when that waits for `said`'s own link."""
        if self._stopping:
            return None
        self._awaited.pop(poi_id, None)
        worker = self.workers[poi_id]
        partner, why_not = partner_to_follow(self.workers, poi_id, said)
        if partner is None:
            log.info("terminal %s: the device on its link says it is %s; not followed: %s",
                     poi_id, said, why_not)
            # (only when nothing else refuses it: a refusal that link cannot change, e.g.
            # other link kinds, is reported now, not once that link has spoken; review rv14)
            if waits_for_its_own_link(self.workers, poi_id, said):
                self._awaited[poi_id] = said  # decided again when said's state changes
                return FOLLOW_LATER
            return None
        # Both links move: what waited for either of them is over (a third device naming
        # one of these two is a second device saying so, reported by its own terminal)
        self._awaited = {waiting: awaited for waiting, awaited in self._awaited.items()
                         if not {waiting, awaited} & {poi_id, said}}
        here, there = describe_link(worker.config), describe_link(partner.config)
        here_link, there_link = worker.config.link, partner.config.link
        worker.relink(there_link, released=partner.link_closed)
        partner.relink(here_link, released=worker.link_closed)
        if self.hotplug is not None:
            self.hotplug.rematch(TerminalMatcher([w.config for w in self.workers.values()]))
            for moved in (worker, partner):
                link = moved.config.link
                if link.kind == "tcp":
                    continue  # (no device to watch: it stays enabled)
                device = getattr(link, "device", None)
                if device is None or udev_announces(device):  # (else udev never says)
                    moved.device_present(self.hotplug.is_present(moved.poi_id))
        # (After an earlier follow the links in use are not the configured ones: say both)
        configured = {t.poi_id: describe_link(t) for t in self.config.terminals}
        log.warning("terminal %s is on %s, the link %s was using: following them, %s now uses "
                    "%s and %s uses %s, until the daemon restarts. Put the cables back (%s is "
                    "configured on %s, %s on %s), or change their [terminals.link] in the "
                    "configuration", said, here, poi_id, said, here, poi_id, there,
                    poi_id, configured.get(poi_id), said, configured.get(said))
        return self.workers[partner.poi_id]

    def _follow_waits(self, poi_id: str, said: str) -> bool:
        """Whether following `poi_id` to `said`'s link (FOLLOW_LATER) still waits for `said`'s
        own link to say who is there: the worker's report of the wrong device waits with it.
        Also while that link's change is about to be decided again (_decide_again, soon)."""
        if self._stopping or self._awaited.get(poi_id) != said:
            return False
        return self._deciding_again or waits_for_its_own_link(self.workers, poi_id, said)

    def _state_changed(self, poi_id: str) -> None:
        """`poi_id`'s state was published: a follow that waits for its link is decided again,
        once the step that changed it is over."""
        self._refresh_status(poi_id)
        if not self._deciding_again and poi_id in self._awaited.values():
            self._deciding_again = True
            asyncio.get_running_loop().call_soon(self._decide_again)

    def _decide_again(self) -> None:
        """Each follow that waited for a link which has now spoken (named a terminal, or did
        not say who it is when asked), dropped or failed to open is decided again: it used to
        be only when that link named the waiting terminal, and otherwise the terminal whose
        device had named it refused every payment until the daemon restarted."""
        self._deciding_again = False
        for poi_id, said in list(self._awaited.items()):
            if self._stopping or self._awaited.get(poi_id) != said:
                continue  # (decided meanwhile: both followed in this pass)
            worker = self.workers[poi_id]
            if worker.identity != f"mismatch: {said}" or worker.session.following:
                del self._awaited[poi_id]  # its link dropped or moves: its next device decides
                continue
            if waits_for_its_own_link(self.workers, poi_id, said):
                continue
            # (not followed: the worker's grace timer reports the wrong device, now that
            # _follow_waits says no more, or has)
            self._wrong_device(poi_id, said)

    # (The hotplug monitor logs each plug and unplug; the worker, what it keeps open.)
    def _plugged(self, poi_id: str, device: DeviceInfo) -> None:
        present = self._present(poi_id, True)
        self.workers[poi_id].device_present(present)
        if present:
            self._awaited_nodes.pop(poi_id, None)

    def _unplugged(self, poi_id: str, device: DeviceInfo) -> None:
        present = self._present(poi_id, False)
        self.workers[poi_id].device_present(present)
        node = getattr(self.workers[poi_id].config.link, "device", None)
        if not present and node:
            # (a node back without its udev event would leave it offline for good)
            self._await_node(poi_id, node, node_identity(node))

    def _present(self, poi_id: str, said: bool) -> bool:
        """Whether `poi_id`'s device is there, by the monitor's state when the event is
        handled: an event queued before terminals were followed to each other's links
        names the terminal the device belonged to then."""
        return self.hotplug.is_present(poi_id) if self.hotplug is not None else said

    # s between looks at the nodes of terminals switched off (_recheck_absent)
    recheck_absent = 30.0

    async def _start_hotplug(self) -> None:
        if self.hotplug is None:
            return
        try:
            await self.hotplug.start()
        except UdevNotRunning as exc:
            # pyudev's netlink socket opens without udevd too, and would wait for ever for
            # the plug event of a terminal missing at start.
            log.warning("%s: a container or a minimal image? Running without hotplug: "
                        "terminals whose device is missing are retried with backoff",  exc)
            self.hotplug = None
            return
        except (OSError, ImportError) as exc:
            # Containers and some test boxes have no udev netlink: run without hotplug.
            log.warning("udev hotplug unavailable (%s): terminals are retried with backoff "
                        "instead", exc)
            self.hotplug = None
            return
        for poi_id in self.hotplug.absent():
            link = self.workers[poi_id].config.link
            device = getattr(link, "device", None)
            if device and not udev_announces(device):
                # A node udev does not manage (a pseudo-terminal, a path outside /dev): no
                # event will ever say it is back, so the worker's own retries cover it.
                continue
            self.workers[poi_id].device_present(False)  # the monitor has said so in the log
            if device:
                self._await_node(poi_id, device, None)

    def _await_node(self, poi_id: str, node: str, gone: NodeIdentity | None) -> None:
        """Look at `poi_id`'s node every recheck_absent s until it is there (another node
        than `gone`, the one udev said went) or udev says it."""
        if self._stopping:
            return
        self._awaited_nodes[poi_id] = (node, gone)
        if self._recheck is None or self._recheck.done():
            # (not one for the life of the daemon: it ends once each is there, or plugged in)
            if self._recheck is not None:
                self._tasks.remove(self._recheck)
            self._recheck = asyncio.create_task(self._recheck_absent(), name="recheck absent")
            self._recheck.add_done_callback(_log_failure)
            self._tasks.append(self._recheck)

    async def _recheck_absent(self) -> None:
        """Belt and braces for udev: a terminal switched off, absent at start or unplugged
        since, waiting for its node, is used once its node exists though no udev event said
        so (udevd's events going to another network namespace, a node made by hand)."""
        awaited = self._awaited_nodes
        while awaited:
            await asyncio.sleep(self.recheck_absent)
            # The nodes udev gave to terminals plugged in now: a kernel name (ttyUSB0) that
            # appears may be another terminal's adapter, back under that number (review)
            taken = set() if self.hotplug is None else {
                os.path.realpath(info.devname)
                for info in self.hotplug.present().values() if info.devname}
            for poi_id, (node, gone) in list(awaited.items()):
                there = node_identity(node)
                if self.hotplug is None or self.hotplug.is_present(poi_id):
                    del awaited[poi_id]  # udev said it, and says the rest
                elif there is None:
                    awaited[poi_id] = (node, None)  # gone: once there again, it is back
                elif there != gone and os.path.realpath(node) not in taken:
                    del awaited[poi_id]
                    log.warning("terminal %s: its device %s is there now, but udev never "
                                "announced it (is systemd-udevd running?); using it", poi_id,
                                node)
                    self.workers[poi_id].device_present(True)

    def _allow_for_journal_check(self, path: Path) -> None:
        """Ask systemd for the time the journal's check at open may take (see
        JOURNAL_CHECK_RATE), so that a large journal does not make every start time out.
        Nothing outside systemd; a small journal's ask is within the unit's own timeout."""
        check = journal_check_time(path)
        if check <= 0 or not self.notifier.enabled:
            return
        if check > 10:
            log.info("journal %s: %.0f MB, its check at start may take up to %.0f s on slow "
                     "storage; asking systemd to wait that long", path,
                     check * JOURNAL_CHECK_RATE / 1e6, check)
        self.notifier.extend_timeout(check + START_ALLOWANCE)

    def status_line(self) -> str:
        documents = [w.state() for w in self.workers.values()]
        # A terminal that said it is another device is up but refuses every request: not
        # online to a technician reading `systemctl status`.
        wrong = [d["poi_id"] for d in documents
                 if str(d.get("identity", "")).startswith("mismatch")]
        usable = sum(d["state"] in ("online", "busy") and d["poi_id"] not in wrong
                     for d in documents)
        counts = self.journal.counts()
        problem = self.gateway.broker_problem
        broker = ("broker connected" if self.gateway.connected
                  else f"broker {problem}" if problem else "connecting to the broker")
        if self.gateway.refused:
            broker += f", {self.gateway.refused} refused by the broker (its ACL?)"
        return (f"{usable}/{len(documents)} terminals online"
                + (f" ({len(wrong)} the wrong device: {', '.join(wrong[:3])})" if wrong else "")
                + f", {counts['in_flight']} in flight, {counts['unresolved']} unresolved, "
                f"{counts['undelivered']} undelivered, {broker}")

    async def _status_loop(self) -> None:
        """STATUS= every STATUS_INTERVAL, and at once when the broker connects or a terminal
        goes online or offline or its identity changes (not for each payment): right after
        a start `systemctl status` showed "0/1 terminals online, connecting" for 10 s."""
        self._status_wanted = asyncio.Event()
        while True:
            self._status_wanted.clear()
            self._status_shown = {poi_id: self._terminal_shown(poi_id)
                                  for poi_id in self.workers}
            self.notifier.status(self.status_line())
            waits = [asyncio.ensure_future(self._status_wanted.wait())]
            if not self.gateway.connected:
                waits.append(asyncio.ensure_future(self.gateway._connected.wait()))
            try:
                await asyncio.wait(waits, timeout=STATUS_INTERVAL,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    def _terminal_shown(self, poi_id: str) -> tuple[bool, str]:
        """What of a terminal STATUS= shows (but the journal's counts)."""
        worker = self.workers[poi_id]
        return worker.online, str(worker.identity)

    def _refresh_status(self, poi_id: str) -> None:
        """`poi_id`'s state was published (twice a payment: busy and back): STATUS= again if
        what it shows of that terminal changed. Only that one is looked at: all of them, at
        64 terminals, cost every payment 20-40 us."""
        if self._status_wanted is not None \
                and self._terminal_shown(poi_id) != self._status_shown.get(poi_id):
            self._status_wanted.set()

    def health(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "uptime": round(time.time() - self.started, 1),
            "terminals": {poi: w.state()["state"] for poi, w in self.workers.items()},
            "journal": self.journal.counts(),
            "broker_reconnects": self.gateway.reconnects,
            "published": self.gateway.published,
            "undeliverable": self.gateway.undeliverable,
            "refused_by_broker": self.gateway.refused,
            "rejected_requests": self.intake.rejected,
            # Other bridges serving these topics: while there is one, no new request starts
            "other_bridges": [describe_bridge(d) for d in self.gateway.peers.others.values()],
        }

    def recover(self) -> int:
        """Give every open transaction in the journal back to its terminal's session."""
        recovered = 0
        open_transactions = self.journal.open_transactions()
        for poi_id, worker in self.workers.items():
            mine = [t for t in open_transactions if t.poi_id == poi_id]
            worker.restore(mine)
            recovered += len(mine)
        orphans = {t.poi_id for t in open_transactions} - set(self.workers)
        for poi_id in sorted(orphans):
            log.error("the journal holds open transactions for terminal %s, which is no longer "
                      "configured: add it back to resolve them", poi_id)
        return recovered

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            # The tasks asyncio.run cancels now did not end unexpectedly (_task_ended)
            self._stopping = True
            raise

    async def _start(self) -> None:
        self.recover()
        self.journal.start_checkpoints()
        # From here on the steps of one loop pass share a journal commit (see Journal).
        self.journal.group_commits(asyncio.get_running_loop().call_soon)
        for worker in self.workers.values():
            await worker.start()
            for task in worker.tasks:  # (its link loop ended: the terminal would stay offline)
                task.add_done_callback(self._task_ended)
        await self._start_hotplug()
        for name, coroutine in (("mqtt", self.gateway.run()), ("prune", self._prune_loop()),
                                ("clock", self._clock_loop()),
                                ("watchdog", run_watchdog(self.notifier)),
                                ("status", self._status_loop())):
            task = asyncio.create_task(coroutine, name=name)
            task.add_done_callback(self._task_ended)
            self._tasks.append(task)
        # What start-up built (modules, models, configuration) lives as long as the daemon:
        # keep it out of the collector's full passes, which otherwise walk it every time.
        gc.freeze()
        # READY=1 only now: the journal is open, open transactions are back with their
        # terminals, and the devices present have been enumerated.
        self.notifier.ready(self.status_line())
        log.info("poi-bridge %s started: %d terminal(s), journal %s, broker %s", __version__,
                 len(self.workers), self.config.journal,
                 host_port(self.config.mqtt.host, self.config.mqtt.port))

    async def _clock_loop(self) -> None:
        while True:
            await asyncio.sleep(CLOCK_CHECK_INTERVAL)
            self.follow_clock_step()

    def follow_clock_step(self) -> float:
        """When the system clock was stepped (NTP setting a box that started with a wrong
        clock), move the daemon's clock, the journal's times of this run and the sessions'
        with it, keeping each time-out as far off as it was. Left alone, this run's stamps
        stayed off by the step: at the next start, payments of minutes ago looked days old,
        were pruned, and a register's retry of one was sent to the terminal again."""
        delta = self.clock.drift()
        if abs(delta) < CLOCK_STEP:
            return 0.0
        rows = self.journal.shift_times(delta, self.clock.started, self.clock())
        for worker in self.workers.values():
            worker.session.shift_times(delta)
        self.clock.shift(delta)
        log.warning("the system clock was stepped by %+.0f s while the bridge ran: its own "
                    "clock and the times of %d journal row(s) follow it; time-outs under way "
                    "keep their length. A box without a battery-backed clock should start the "
                    "bridge after NTP has set the time (systemctl enable "
                    "systemd-time-wait-sync, with the README's drop-in that bounds its wait)",
                    delta, rows)
        return delta

    async def _prune_loop(self) -> None:
        def retained(key: TxKey) -> str:
            return self.gateway.topics.transaction(key.sale_id, key.service_id)

        while True:
            cutoff = self.clock() - self.config.mqtt.transaction_retention
            # A step of PRUNE_STEP rows at a time, each its own loop pass: an hour of a busy
            # store's payments (11 KB answers) deleted at once held every terminal and
            # register for 1-2 s
            while self.journal.prune(cutoff, PRUNE_STEP, retained) >= PRUNE_STEP:
                await asyncio.sleep(0)
            await asyncio.sleep(PRUNE_INTERVAL)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        """Each of these tasks runs for the life of the daemon. One that ended left a daemon
        that still says READY and pets the watchdog but, say, never reconnects to the
        broker: better stopped, with an exit status that makes systemd start it again."""
        if self._stopping:
            return
        if self.journal.lost:  # (a write refused: the journal stops the daemon once saved)
            log.debug("the daemon's %s task ended while the lost journal is saved",
                      task.get_name())
            return
        # A cancellation nobody asked for (no stop) ends a task as surely as an exception
        exc = (asyncio.CancelledError("cancelled, though no stop was asked")
               if task.cancelled() else task.exception())
        if exc is None and task.get_name() == "watchdog":
            return  # it returns at once when systemd set no watchdog
        log.critical("the daemon's %s task ended unexpectedly (%s): stopping, with exit "
                     "status %d so that systemd starts the bridge again; open transactions "
                     "stay in the journal", task.get_name(),
                     f"{type(exc).__name__}: {exc}" if exc else "it returned",
                     TASK_EXIT_STATUS, exc_info=exc)
        self.exit_status = TASK_EXIT_STATUS
        self.request_stop()

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def _end_tasks(self) -> None:
        """Cancel the daemon's tasks and wait for them to end. A cancellation can be lost on
        the way (Python 3.11's asyncio.wait_for, inside aiomqtt, swallows one that arrives as
        its future completes: seen in a soak, a SIGTERM then waited for the broker to go
        away): a task still running after a grace period is cancelled again, and one that
        survives every try is named in the log instead of holding the stop for ever."""
        pending = set(self._tasks)
        for _ in range(STOP_TRIES):
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=STOP_GRACE)
            if not pending:
                return
        log.error("stopping: task(s) %s did not end after %d cancellations; stopping without "
                  "them", ", ".join(sorted(t.get_name() for t in pending)), STOP_TRIES)

    async def stop(self) -> None:
        """Drain: take no new requests, keep in-flight state in the journal, say offline."""
        self._stopping = True
        for worker in self.workers.values():
            # (before the drain: a wrong device reported now would send a technician after
            # a swap this daemon no longer follows and the next start finds again)
            worker.daemon_stops()
        open_now = [t for w in self.workers.values() for t in w.session.open.values()]
        log.info("stopping: no new requests; %s", "open transactions stay in the journal and "
                 f"are asked about on the next start: {describe_transactions(open_now)}"
                 if open_now else "no transaction is open")
        self.notifier.stopping("stopping: open transactions stay in the journal")
        self.gateway.stop_accepting()
        await self.gateway.drain_requests()
        if self.hotplug is not None:
            await self.hotplug.stop()
        await self.gateway.announce_offline()
        # (one that failed has been logged by _task_ended: its exception is not raised again)
        await self._end_tasks()
        for worker in self.workers.values():
            await worker.stop()
        # Nothing more is refused: the counts held for the next summary are logged now, or
        # a register looping on a bad request within the last minute is never counted
        self.intake.flush_repeats()
        self.gateway.flush_repeats()
        self.journal.close()
        self.notifier.close()


def journal_check_time(path: os.PathLike[str] | str) -> float:
    """Seconds the journal's check at open may take on slow storage: its file and its WAL
    at JOURNAL_CHECK_RATE (0 for a journal not there yet)."""
    database, wal = journal_files(Path(path))[:2]
    size = 0
    for file in (database, wal):
        try:
            size += file.stat().st_size
        except OSError:  # (missing, or unreadable: the open says so)
            pass
    return size / JOURNAL_CHECK_RATE


def stop_at_once(bridge: Bridge, exc: BaseException) -> None:
    """The journal failed to record a step, or to read (disk full, I/O error, a damaged
    file): the process ends now, as a crash would, so nothing is sent or published from a
    state the journal does not hold. Going on was worse: a terminal's answer whose record
    was lost would still be ACKed with the next frame, and its result would reach no
    register. A restart takes the open transactions up from the journal again, and the
    status polls ask the terminals what happened: the path every SIGKILL test exercises.
    So does a step that failed half-way for a reason of its own (StepFailed): a fault of
    the bridge, not of the disk, and said so."""
    if isinstance(exc, StepFailed):
        # The request being handled, if that is where it failed, would stop the bridge
        # again at every start (never acknowledged, the broker delivers it again)
        aside = bridge.gateway.set_aside_handled()
        log.critical("stopping at once: %s. The journal took that step's records back while "
                     "the terminal's session had moved on, so the bridge starts again from "
                     "the journal: its open transactions are taken up again and the "
                     "terminals are asked what happened.%s This is a fault of the bridge, not "
                     "of the disk: please report it with this log. systemd restarts the "
                     "bridge, and after 5 failed starts in 5 minutes gives up: then "
                     "`systemctl reset-failed poi-bridge; systemctl start poi-bridge`.", exc,
                     f" The request on {aside} being handled is set aside: from the next "
                     "start it is refused, not handled again." if aside else "")
        bridge.notifier.stopping(f"internal error: {exc}")
        logging.shutdown()
        os._exit(JOURNAL_EXIT_STATUS)
    if isinstance(exc, JournalGone):  # (the journal said what became of it, and what to do)
        log.critical("stopping at once: nothing more is sent or published, its record would "
                     "go to a journal no later start reads (exit status %d)",
                     JOURNAL_LOST_EXIT_STATUS)
        bridge.notifier.stopping(f"the journal is gone from its path: {exc}")
        logging.shutdown()
        os._exit(JOURNAL_LOST_EXIT_STATUS)
    name = getattr(exc, "sqlite_errorname", None) or ""
    # Another program holding the journal locked is no disk problem (journal.unusable says
    # who and what to do); anything else most likely is
    fix = unusable(bridge.config.journal, exc) + "." \
        if isinstance(exc, sqlite3.Error) and name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) \
        else (f"Its disk is full: make room (df -h {bridge.config.journal.parent}); started "
              "again, the bridge waits for room, off the broker, and then goes on by itself."
              if name.startswith("SQLITE_FULL") or "disk is full" in str(exc)
              else f"Check the disk (df -h {bridge.config.journal.parent}, dmesg).")
    log.critical("stopping at once: the journal %s cannot be written or read (%s). Nothing "
                 "is sent or published from what it could not record; at the next start its open "
                 "transactions are taken up again and the terminals are asked what happened. "
                 "%s systemd restarts the bridge, and after 5 failed starts in 5 minutes gives "
                 "up: then `systemctl reset-failed poi-bridge` and start it once that is "
                 "fixed.", bridge.config.journal, exc, fix)
    bridge.notifier.stopping(f"the journal cannot be written or read: {exc}")
    logging.shutdown()  # flush the line above: os._exit flushes nothing
    os._exit(JOURNAL_EXIT_STATUS)


def stop_when_out_of_memory(loop: asyncio.AbstractEventLoop, bridge: Bridge) -> None:
    """A MemoryError where no task awaits it (inside aiomqtt's reader) was only logged, and
    the MQTT connection stayed wedged while the watchdog was still fed: no result went out
    and no request came in. The daemon stops instead, and systemd starts it again."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)
        if isinstance(context.get("exception"), MemoryError) and not bridge.exit_status:
            log.critical("out of memory (%s): stopping, with exit status %d so that systemd "
                         "starts the bridge again; open transactions stay in the journal. "
                         "Check what else uses the box's memory (free -m) and the unit's "
                         "MemoryMax=", context.get("message"), TASK_EXIT_STATUS)
            bridge.exit_status = TASK_EXIT_STATUS
            bridge.request_stop()

    loop.set_exception_handler(handler)


async def run_bridge(config: Config, *, mqtt_password: str | None = None) -> None:
    # (before the journal is opened: taking its open transactions up writes to it)
    await wait_for_room(config.journal, SystemdNotifier())
    bridge = Bridge(config, mqtt_password=mqtt_password)
    bridge.journal.on_failure(functools.partial(stop_at_once, bridge))
    loop = asyncio.get_running_loop()
    quiet_closed_socket_errors(loop)
    stop_when_out_of_memory(loop, bridge)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bridge.request_stop)
    # SIGHUP's default action ended the daemon without a word (`kill -HUP`, `systemctl
    # reload` habits): it reads its configuration only at start, so say so and go on.
    loop.add_signal_handler(signal.SIGHUP, log.warning,
                            "SIGHUP received: ignored, the bridge goes on as it was. Its "
                            "configuration is read only at start: systemctl restart poi-bridge")
    await bridge.start()
    try:
        await bridge.wait_stopped()
    finally:
        await bridge.stop()
    if bridge.exit_status:
        raise SystemExit(bridge.exit_status)

"""check-config's checks beyond the file: what only this box can tell (secrets that exist,
a journal that can be kept, two terminals on one device). Kept apart from bridge/config.py,
which only reads and validates the configuration file itself."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import grp
import os
import pwd
import re
import stat
from pathlib import Path

from bridge.addresses import host_port
from bridge.config import (
    CREDENTIAL_ID,
    CREDENTIAL_SOURCE,
    CREDENTIALS_DIRECTORY,
    STATE_DIRECTORY,
    Config,
    SerialLink,
    TcpLink,
    UsbLink,
    credential_path,
)
from bridge.daemon.journal_files import journal_files, user_name
from bridge.daemon.udev_rules import udev_serial

DAEMON_USER = "poi-bridge"  # User= of systemd/poi-bridge.service


def deployment_problems(config: Config, *, for_daemon: bool = False
                        ) -> tuple[list[str], list[str]]:
    """(errors, warnings) about `config` on this box, each "place: what to do": what the
    daemon would refuse at start, or run with and mishandle. An error is certain (a secret
    that does not exist, a journal that cannot be kept); a warning is what this user cannot
    check for the daemon's user (a file it may not read, a directory it may not write).
    `for_daemon`: said by the daemon at its start, where this user is the daemon's."""
    errors: list[str] = []
    warnings: list[str] = []
    if not config.terminals:
        errors.append("terminals: no [[terminals]] configured: the bridge would answer every "
                      "request 'unknown terminal'; add a [[terminals]] table for each terminal "
                      "(see examples/poi-bridge.toml)")
    errors += _shared_links(config)
    warnings += _usb_without_serial_beside_its_twin(config)
    warnings += _status_timeout_within_link_retries(config)
    warnings += _timeouts_within_line_time(config)
    if not for_daemon:  # (the daemon says it itself: "not plugged in", when it starts)
        warnings += _devices_not_there(config)
    warnings += _usb_serial_ports_by_kernel_name(config)
    for number, terminal in enumerate(config.terminals):
        for which in ("key", "previous_key"):
            configured = getattr(terminal, which)
            if configured is not None:
                _check_secret(f"terminals[{number}].{which}.passphrase_file",
                              credential_path(configured.passphrase_file), errors, warnings,
                              for_daemon=for_daemon)
    if config.mqtt.password_file is not None:
        _check_secret("mqtt.password_file", credential_path(config.mqtt.password_file),
                      errors, warnings, for_daemon=for_daemon)
    if config.mqtt.tls is not None:
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(config.mqtt.tls, name)
            if path is not None:  # read at every connection, retried: never fatal at start
                _check_secret(f"mqtt.tls.{name}", path, warnings, warnings, content=False,
                              fatal="the daemon cannot connect to the broker without it",
                              for_daemon=for_daemon)
                if name == "key_file":  # (a private key, as a password; a path that
                    # cannot be looked at says nothing: _others_may_read)
                    _check_private(f"mqtt.tls.{name}", path, "the bridge's TLS private key",
                                   warnings)
    _check_journal(config.journal, errors, warnings, for_daemon=for_daemon)
    return errors, warnings


def _this_user() -> str:
    """This process's user, as `uid N (name)`."""
    return f"uid {os.geteuid()} ({user_name(os.geteuid())})"


def _link_identity(link: SerialLink | TcpLink | UsbLink) -> tuple[tuple, str]:
    if isinstance(link, SerialLink):
        path = os.path.normpath(link.device)
        return ("serial", os.path.realpath(path)), f"device {link.device}"
    if isinstance(link, TcpLink):
        return ("tcp", link.host.lower(), link.port), f"tcp {host_port(link.host, link.port)}"
    # A serial as the device reports it ("AB 12") and as udev writes it ("AB_12") both find
    # the device (device_match.same_serial): one device, compared in udev's spelling
    serial = None if link.serial is None else udev_serial(link.serial) or link.serial
    # (two at different ports are two devices, with or without serial numbers)
    return (("usb", link.vendor_id, link.product_id, serial, link.port, link.interface),
            f"usb {link.vendor_id:04x}:{link.product_id:04x}"
            + (f" serial {link.serial}" if link.serial else "")
            + (f" port {link.port}" if link.port else "")
            + f" interface {link.interface}")


def _shared_links(config: Config) -> list[str]:
    """Two terminals on one device (or TCP address): the second worker would find it held by
    the first ("in use by another process") and never reach its terminal."""
    seen: dict[tuple, int] = {}
    problems = []
    for number, terminal in enumerate(config.terminals):
        identity, what = _link_identity(terminal.link)
        if identity in seen:
            first = seen[identity]
            link = terminal.link
            key = ("device" if isinstance(link, SerialLink) else
                   "host" if isinstance(link, TcpLink) else "port" if link.port else "serial")
            problems.append(
                f"terminals[{number}].link.{key}: {what} is also the link of terminals[{first}] "
                f"({config.terminals[first].poi_id}): one device holds one terminal, and the "
                f"second worker would find it in use; give {terminal.poi_id} its own device "
                "(ls -l /dev/poi/, or poi-bridge devices)")
        else:
            seen[identity] = number
    return problems


def _usb_without_serial_beside_its_twin(config: Config) -> list[str]:
    """A USB terminal configured without `serial` or `port` takes the one device with its
    ids that no other terminal is configured with: beside a terminal of the same model, that
    holds only while the other's serial or port is right and no third such device is
    plugged in. (Twins told apart by port, serial numbers or not, are no problem.)"""
    problems = []
    usb = [(n, t) for n, t in enumerate(config.terminals) if isinstance(t.link, UsbLink)]
    for number, terminal in usb:
        link = terminal.link
        if link.serial is not None or link.port is not None:
            continue
        twins = [t.poi_id for n, t in usb if n != number and link.same_model(t.link)
                 and (t.link.serial is not None or t.link.port is not None)]
        if twins:
            problems.append(
                f"terminals[{number}].link: {terminal.poi_id} has no serial, and "
                f"{', '.join(twins)} has the same usb {link.vendor_id:04x}:"
                f"{link.product_id:04x}: {terminal.poi_id} takes the one device with these "
                f"ids that no other terminal is configured with, and stays offline beside a "
                f"third one or a mistyped serial; set its serial, or its port if it reports "
                f"none (poi-bridge devices lists them)")
    return problems


def _devices_not_there(config: Config) -> list[str]:
    """A serial device under /dev that does not exist now: a terminal unplugged, or a wrong
    path, which the daemon can only report as "not plugged in". A warning: udev makes the
    node when the terminal is plugged in."""
    out = []
    for number, terminal in enumerate(config.terminals):
        link = terminal.link
        if (isinstance(link, SerialLink) and link.device.startswith("/dev/")
                and not os.path.exists(link.device)):
            out.append(f"terminals[{number}].link.device: {link.device} does not exist now "
                       f"({terminal.poi_id}): the terminal is unplugged or switched off, or "
                       f"the path is wrong; `poi-bridge devices` lists the terminals plugged "
                       f"in and the device to configure for each (ls -l /dev/poi/)")
    return out


# Kernel names of USB serial ports: given in plug order, so another after a replug or a reboot
_USB_TTY = re.compile(r"/dev/tty(USB|ACM)[0-9]+")
_STABLE_LINK_DIRS = ("/dev/poi", "/dev/serial/by-id", "/dev/serial/by-path")


def _usb_serial_ports_by_kernel_name(config: Config) -> list[str]:
    """A serial link on /dev/ttyUSB0 or /dev/ttyACM0: its adapter, replugged, may come back as
    /dev/ttyUSB1 and the terminal stays offline. udev's links name the adapter itself."""
    out = []
    for number, terminal in enumerate(config.terminals):
        link = terminal.link
        if not (isinstance(link, SerialLink) and _USB_TTY.fullmatch(link.device)):
            continue
        now = [os.path.join(d, name) for d in _STABLE_LINK_DIRS if os.path.isdir(d)
               for name in sorted(os.listdir(d))
               if os.path.realpath(os.path.join(d, name)) == link.device]
        out.append(f"terminals[{number}].link.device: {link.device} ({terminal.poi_id}) is the "
                   f"kernel's name of a USB serial port, which changes between plugs (the "
                   f"adapter back as another ttyUSB/ttyACM number leaves the terminal "
                   f"offline); configure its /dev/poi/ or /dev/serial/by-id/ link instead"
                   + (f" ({', '.join(now)})" if now else
                      " (ls -l /dev/poi/ /dev/serial/by-id/, or poi-bridge devices)"))
    return out


def _status_timeout_within_link_retries(config: Config) -> list[str]:
    """A status poll given up on (status_timeout) while the link still sends its frame again
    reaches the terminal late, after the next payment; its NotFound is then read against a
    terminal that has taken another payment since, and the first payment is left unresolved
    (the soak's seed 8, with 1 s against 3 x 0.5 s). The defaults are 30 s against 3 x 2 s."""
    problems = []
    for number, terminal in enumerate(config.terminals):
        framer = terminal.framer
        if framer.name == "length-prefixed":
            continue  # no acknowledgement, no retries
        retries = framer.ack_timeout * framer.max_tries
        if terminal.status_timeout <= retries:
            problems.append(
                f"terminals[{number}].status_timeout: {terminal.status_timeout:g} s is not more "
                f"than the link's own tries of one frame ({framer.max_tries} x ack_timeout "
                f"{framer.ack_timeout:g} s): a status poll would count as unanswered while "
                "it may still reach the terminal, and a payment could be left unresolved "
                "that the terminal knows; make status_timeout longer")
    return problems


# The largest answer a terminal commonly sends: a payment's response, or a status answer
# holding the payment's record with its receipts (11-12 KB as the vendor writes them, the
# Adyen fixtures), a third more encrypted.
COMMON_ANSWER_BYTES = 16 * 1024


def _timeouts_within_line_time(config: Config) -> list[str]:
    """A slow serial line takes long to carry a big answer: 16 KB at 9600 baud take 17 s, at
    2400 baud 68 s. The bridge's time-outs count from the request, whatever is still on the
    wire: a status_timeout (30 s) shorter than the answer's line time gives up on every poll
    whose answer is big, and leaves the payment unresolved."""
    problems = []
    for number, terminal in enumerate(config.terminals):
        line_time = COMMON_ANSWER_BYTES * terminal.link.seconds_per_byte
        if line_time == 0:
            continue  # TCP, USB: no line time worth counting
        for name in ("status_timeout", "payment_timeout"):
            limit = getattr(terminal, name)
            if limit < 2 * line_time:
                problems.append(
                    f"terminals[{number}].{name}: {limit:g} s is less than twice the time an "
                    f"answer of {COMMON_ANSWER_BYTES // 1024} KB (a payment's record with "
                    f"its receipts) takes on this link ({line_time:.0f} s at "
                    f"{terminal.link.baudrate} baud): such answers would come after the "
                    f"bridge stopped waiting for them; make {name} at least "
                    f"{2 * line_time:.0f} s, or the link faster")
    return problems


def credential_source(path: Path) -> Path | None:
    """The file LoadCredential=secret:/etc/poi-bridge/credentials makes `path` from, if it is
    one of the unit's credentials."""
    if path.parent != CREDENTIALS_DIRECTORY or not path.name.startswith(f"{CREDENTIAL_ID}_"):
        return None
    return CREDENTIAL_SOURCE / path.name[len(CREDENTIAL_ID) + 1:]


def password_to_fix(password_file: Path | None) -> str:
    """The MQTT password a technician must check when the broker refuses the login, named by
    the file to edit: for a systemd credential, the file it is copied from at each start
    (the copy in /run/credentials exists only while the service runs, and is replaced)."""
    if password_file is None:
        return "mqtt.password_file (none is set: no password was sent)"
    path = credential_path(password_file)
    source = credential_source(path)
    if source is not None:
        return (f"the password in {source} (mqtt.password_file {password_file} is the "
                "systemd credential made from it at each start of poi-bridge.service)")
    return f"the password in mqtt.password_file ({path})"


# Where a local unit file or drop-in may name a credential of its own (systemctl edit,
# systemctl edit --full): the unit search path's directories, each unit and its drop-ins
_UNIT_DIRECTORIES = ("/etc/systemd/system", "/run/systemd/system", "/etc/systemd/system.control",
                     "/run/systemd/system.control", "/run/systemd/transient",
                     "/usr/local/lib/systemd/system", "/usr/lib/systemd/system",
                     "/lib/systemd/system")
UNIT_DROP_INS = tuple(Path(d) / name for d in _UNIT_DIRECTORIES
                      for name in ("poi-bridge.service.d", "service.d"))
# (the shipped unit, in /usr/lib, loads the credentials check-config knows already)
UNIT_FILES = tuple(Path(d) / "poi-bridge.service" for d in _UNIT_DIRECTORIES
                   if d != "/usr/lib/systemd/system")
_CREDENTIAL_LINE = re.compile(r"^\s*(Load|Set|Import)Credential(?:Encrypted)?\s*=\s*(\S+)",
                              re.MULTILINE)


def _drop_in_loads(credential: str) -> bool:
    """Whether a local unit file or drop-in loads, sets or imports a credential of that
    name: by its ID, an ID_ directory load (LoadCredential=ID:/a/directory makes ID_FILE),
    or an ImportCredential= glob."""
    files = list(UNIT_FILES)
    for directory in UNIT_DROP_INS:
        with contextlib.suppress(OSError):
            files += sorted(directory.glob("*.conf"))
    for file in files:
        try:
            text = file.read_text(errors="replace")
        except OSError:
            continue
        for kind, value in _CREDENTIAL_LINE.findall(text):
            name = value.split(":", 1)[0]
            if name == credential or credential.startswith(name + "_") or (
                    kind == "Import" and fnmatch.fnmatchcase(credential, name)):
                return True
    return False


def _check_secret(place: str, path: Path, errors: list[str], warnings: list[str], *,
                  content: bool = True,
                  fatal: str = "the daemon stops at start without it",
                  for_daemon: bool = False) -> None:
    """A file the daemon reads as its own user: missing is an error (`errors`); unreadable by
    this user is a warning, since check-config may run as another user than the daemon."""
    who = (f"as {_this_user()}, the user this daemon runs as: let it read the file"
           if for_daemon else
           f"as uid {os.geteuid()}; the daemon reads it as its own user (poi-bridge under the "
           "shipped unit): check that user can, or run check-config as root")
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = f"cannot read {path}: {exc.strerror or exc}"
        if exc.errno in (errno.EACCES, errno.EPERM):
            warnings.append(f"{place}: {reason} ({who})")
            return
        source = credential_source(path) if exc.errno == errno.ENOENT else None
        if source is not None:
            _check_credential_source(place, path, source, errors, warnings, content=content,
                                     fatal=fatal)
            return
        if exc.errno == errno.ENOENT and path.is_relative_to(CREDENTIALS_DIRECTORY):
            loads = f"LoadCredential={CREDENTIAL_ID}:{CREDENTIAL_SOURCE} makes " \
                f"{CREDENTIALS_DIRECTORY}/{CREDENTIAL_ID}_<file>"
            if _drop_in_loads(path.name):
                warnings.append(
                    f"{place}: {reason}: a credential a drop-in of the unit loads ({loads} "
                    "for the shipped one): it exists only while the service runs and cannot "
                    "be checked here")
                return
            # (said OK, then the service failed at each start: review rev6)
            meant = CREDENTIALS_DIRECTORY / f"{CREDENTIAL_ID}_{path.name}"
            try:  # (its directory is root's alone: a daemon or a user cannot look)
                there = (CREDENTIAL_SOURCE / path.name).exists()
            except OSError:
                there = False
            hint = f"; {CREDENTIAL_SOURCE / path.name} exists: did you mean {meant}?" \
                if there else ""
            errors.append(f"{place}: {reason}: a credential neither the shipped unit ({loads}) "
                          f"nor a drop-in of it loads{hint} ({fatal})")
            return
        errors.append(f"{place}: {reason} ({fatal})")
        return
    if not for_daemon and not path.is_relative_to(CREDENTIALS_DIRECTORY):
        denied = _daemon_cannot_read(path)
        if denied is not None:
            fix = (f"name the credential systemd makes from it instead: "
                   f"{CREDENTIALS_DIRECTORY}/{CREDENTIAL_ID}_{path.name}"
                   if path.parent == CREDENTIAL_SOURCE else
                   f"put it in {CREDENTIAL_SOURCE} and name "
                   f"{CREDENTIALS_DIRECTORY}/{CREDENTIAL_ID}_{path.name}, or let "
                   f"{DAEMON_USER} read it")
            errors.append(f"{place}: {denied}: {fix} ({fatal})")
            return
    if content:
        _check_content(place, path, data, errors)
        _check_private(place, path, "a secret", warnings)


def _daemon_cannot_read(path: Path) -> str | None:
    """Why the daemon's user cannot read `path` by its permission bits (a root-only file
    check-config, run as root, reads fine), or None: it can, or that user is not on this box."""
    try:
        user = pwd.getpwnam(DAEMON_USER)
    except KeyError:
        return None
    if user.pw_uid == 0:
        return None
    return _user_may_not(user, f"user {DAEMON_USER}, whom the daemon runs as,", path, "read",
                         (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH))


def _daemon_cannot_make_in(ancestor: Path) -> str | None:
    """Why the daemon's user cannot make a directory in `ancestor` by its permission bits
    (root, running check-config, can: /var/lib), or None. That user is the unit's User=;
    on a box without it, `ancestor`'s owner, as whom the daemon would have to run."""
    try:
        user = pwd.getpwnam(DAEMON_USER)
        whose = f"user {DAEMON_USER}, whom the daemon runs as,"
    except KeyError:
        try:
            user = pwd.getpwuid(ancestor.stat().st_uid)
        except (KeyError, OSError):
            return None
        whose = (f"user {user.pw_name}, owner of {ancestor} (this box has no user "
                 f"{DAEMON_USER}, whom the shipped unit runs the daemon as),")
    if user.pw_uid == 0:
        return None
    return _user_may_not(user, whose, ancestor, "write in",
                         (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH),
                         (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH))


def _user_may_not(user: pwd.struct_passwd, whose: str, path: Path, verb: str,
                  *needed: tuple[int, int, int]) -> str | None:
    """Why `user` may not `verb` `path` by its permission bits and its parents' (each of
    `needed`: the owner, group and other bits of one permission), or None: it may, or `path`
    cannot be looked at."""
    try:
        cannot_enter = _cannot_enter_parents(path, user, whose)
        info = path.stat()
    except OSError:
        return None
    if cannot_enter:
        return cannot_enter
    if not all(_allows(user, info, bits) for bits in needed):
        return f"{whose} may not {verb} {_shown(path, info)}"
    return None


def _cannot_enter_parents(path: Path, user: pwd.struct_passwd, whose: str) -> str | None:
    """The first directory above `path` that `user` may not pass through (raises OSError)."""
    for directory in reversed(Path(os.path.abspath(path)).parents):
        info = directory.stat()
        if not _allows(user, info, (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
            return f"{whose} may not enter {_shown(directory, info)}"
    return None


def _allows(user: pwd.struct_passwd, info: os.stat_result, bits: tuple[int, int, int]) -> bool:
    """Whether `info`'s permission bits give `user` the (owner, group, other) `bits`."""
    mine, ours, anyone = bits
    if info.st_uid == user.pw_uid:
        return bool(info.st_mode & mine)
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    if info.st_gid in groups:
        return bool(info.st_mode & ours)
    return bool(info.st_mode & anyone)


def _shown(where: Path, info: os.stat_result) -> str:
    return (f"{where} ({stat.filemode(info.st_mode)} {user_name(info.st_uid)}:"
            f"{_group_name(info.st_gid)})")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _check_credential_source(place: str, path: Path, source: Path, errors: list[str],
                             warnings: list[str], *, content: bool, fatal: str) -> None:
    made = (f"{path} is made by systemd at each start from {source} "
            f"(LoadCredential={CREDENTIAL_ID}:{CREDENTIAL_SOURCE} in poi-bridge.service)")
    try:
        if source.is_symlink():
            errors.append(f"{place}: {made}, but {source} is a symlink, which systemd ignores "
                          "in a LoadCredential= directory: put the file itself there")
            return
        data = source.read_bytes()
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            warnings.append(f"{place}: {made}; cannot read {source}: {exc.strerror} (as uid "
                            f"{os.geteuid()}: that directory is root-only; run check-config "
                            "as root to check it)")
        elif exc.errno == errno.ENOENT:
            errors.append(f"{place}: {made}, and {source} does not exist: install it there, "
                          f"root-only (install -m600 FILE {source}); {fatal}")
        else:
            errors.append(f"{place}: {made}; cannot read {source}: {exc.strerror or exc}")
        return
    if content:
        _check_content(place, source, data, errors)
        _check_private(place, source, "a secret", warnings)


def _others_may_read(path: Path) -> str | None:
    """The mode of `path` ("0644") when any user of the box may read it, else None. Its group
    may: a secret outside the credentials directory is root:poi-bridge 0640, so that the
    daemon's user can read it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    return f"{mode:04o}" if mode & stat.S_IROTH else None


def _check_private(place: str, path: Path, what: str, warnings: list[str]) -> None:
    mode = _others_may_read(path)
    if mode is not None:
        warnings.append(f"{place}: {path} (mode {mode}) may be read by any user of this box, "
                        f"and holds {what}: chmod o-r {path}")


def _check_content(place: str, path: Path, data: bytes, errors: list[str]) -> None:
    try:
        text = data.decode("utf-8-sig")  # (as the daemon reads it: read_secret)
    except UnicodeDecodeError:
        errors.append(f"{place}: {path} is not UTF-8 text: the daemon cannot read it; write "
                      "the secret again as plain UTF-8 text")
        return
    if not text.rstrip("\r\n"):
        errors.append(f"{place}: {path} is empty: it must hold the secret (the whole file, "
                      "without its trailing line end)")


# Kernel and runtime file systems: nothing written there outlives a reboot, or can be written.
_NOT_A_DISK = (Path("/proc"), Path("/sys"), Path("/dev"), Path("/run/credentials"))
_LOST_AT_RESTART = (Path("/tmp"), Path("/var/tmp"), Path("/run"), Path("/dev/shm"))


def _check_journal(journal: Path, errors: list[str], warnings: list[str], *,
                   for_daemon: bool = False) -> None:
    """The journal must be a file the daemon can create and write, on a disk: it holds the
    payments across crashes and restarts."""
    place = "journal"
    # A relative path is taken from the daemon's working directory: its own, said at its
    # start; for check-config, the unit's, / (it sets no WorkingDirectory=), not the
    # technician's, where the service never looks
    path = Path(os.path.abspath(journal if for_daemon else Path("/") / journal))
    if not journal.is_absolute():
        where = ("the daemon takes it from its working directory (/ under systemd)"
                 if for_daemon else
                 f"poi-bridge.service runs the daemon from /, where it opens {path}")
        warnings.append(f"{place}: {journal} is relative: {where}; write the full path, e.g. "
                        f"{STATE_DIRECTORY}/journal.sqlite3")
    if any(path.is_relative_to(top) for top in _NOT_A_DISK):
        errors.append(f"{place}: {path} is not on a disk (a kernel or runtime file system): "
                      f"the journal keeps payments across restarts; use "
                      f"{STATE_DIRECTORY}/journal.sqlite3")
        return
    try:
        _check_journal_path(path, place, errors, warnings, for_daemon)
    except PermissionError as exc:  # (pathlib's exists() and is_dir() raise it in 3.11)
        # The unit's StateDirectoryMode=0700 keeps everyone but root and the daemon's user
        # out of /var/lib/poi-bridge once the service has run.
        warnings.append(f"{place}: cannot look at {path} as {_this_user()}, the user this "
                        f"daemon runs as ({exc.strerror}): it cannot open the journal there"
                        if for_daemon else
                        f"{place}: cannot look at {path} as uid {os.geteuid()} "
                        f"({exc.strerror}): the daemon's user may; run check-config as root "
                        "to check it")


def _check_journal_path(path: Path, place: str, errors: list[str],
                        warnings: list[str], for_daemon: bool) -> None:
    if path.is_dir():
        errors.append(f"{place}: {path} is a directory: name the journal file in it, e.g. "
                      f"{path}/journal.sqlite3")
        return
    directory = path.parent
    if not directory.exists():
        if directory == STATE_DIRECTORY:
            return  # StateDirectory=: systemd makes it, owned by the daemon's user, at start
        _check_directory_to_make(path, place, errors, warnings, for_daemon)
        return
    if not directory.is_dir():
        errors.append(f"{place}: {directory} is not a directory, so {path} cannot be made")
        return
    if _read_only(directory):
        errors.append(f"{place}: {directory} is on a read-only file system: keep the journal "
                      f"in {STATE_DIRECTORY}/")
        return
    for file in journal_files(path)[:3]:  # (the lock file holds a pid, nothing private)
        _check_private(place, file, "the terminals' answers (card data, receipts)", warnings)
    target = path if path.exists() else directory
    mode = os.R_OK | os.W_OK if target == path else os.W_OK | os.X_OK
    if not os.access(target, mode):
        what = f"cannot write {path}" if target == path else f"cannot write in {directory}"
        if os.geteuid() == 0:
            errors.append(f"{place}: {what}, even as root")
        elif for_daemon:  # (opening the journal then says whose it is, and the chown)
            warnings.append(f"{place}: {what} as {_this_user()}, the user this daemon runs as")
        else:
            warnings.append(f"{place}: {what} (as uid {os.geteuid()}; the daemon writes it as "
                            "its own user: check that user can)")
    if not for_daemon or os.geteuid() == 0:  # (a daemon as its own user: see above)
        _check_journal_owner(path, place, warnings)
    if not path.is_relative_to(STATE_DIRECTORY):
        warnings.append(f"{place}: {_outside_state_directory(path, directory)}")


def _read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_directory_to_make(path: Path, place: str, errors: list[str],
                             warnings: list[str], for_daemon: bool) -> None:
    """The journal's directory is missing: the journal makes it when it opens (mode 0700),
    which is said, since a typo in the path makes one too; an error only if it cannot."""
    directory = path.parent
    ancestor = directory
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        errors.append(f"{place}: {ancestor} is not a directory, so {path} cannot be made")
        return
    read_only = _read_only(ancestor)
    keep = (f"create {directory}, owned by the daemon's user, or keep the journal in "
            f"{STATE_DIRECTORY}/ (the unit's StateDirectory=, which systemd makes)")
    if read_only:
        errors.append(f"{place}: directory {directory} does not exist, and cannot be made: "
                      f"{ancestor} is on a read-only file system; {keep}")
        return
    # check-config as root (the README's way) can write where the daemon's user cannot: a
    # mistyped /var/lib/poi-brige passed, and the daemon refused it at start. Judged for
    # that user (systemd makes the state directory itself, owned by it)
    denied = _daemon_cannot_make_in(ancestor) \
        if os.geteuid() == 0 and not for_daemon \
        and not directory.is_relative_to(STATE_DIRECTORY) else None
    if denied is not None:
        errors.append(f"{place}: directory {directory} does not exist, and the daemon cannot "
                      f"make it: {denied} (root, running check-config, may); {keep}")
    elif os.access(ancestor, os.W_OK | os.X_OK):
        warnings.append(f"{place}: directory {directory} does not exist: the daemon creates it "
                        "(mode 0700) when it opens the journal; check that the path is the "
                        "one meant")
    elif for_daemon or os.geteuid() == 0:
        who = f"as {_this_user()}, the user this daemon runs as" if for_daemon else "even as root"
        errors.append(f"{place}: directory {directory} does not exist, and cannot be made: "
                      f"cannot write in {ancestor} {who}; {keep}")
    else:
        warnings.append(f"{place}: directory {directory} does not exist: the daemon creates it "
                        f"(mode 0700) if its user can write in {ancestor} (uid {os.geteuid()} "
                        f"cannot); else {keep}")
        return
    if not path.is_relative_to(STATE_DIRECTORY):
        warnings.append(f"{place}: {_outside_state_directory(path, directory)}")


def _outside_state_directory(path: Path, directory: Path) -> str:
    lost = next((top for top in _LOST_AT_RESTART if path.is_relative_to(top)), None)
    return (f"{path} is outside {STATE_DIRECTORY}: under the shipped unit "
            "(ProtectSystem=strict) the daemon may write only there; elsewhere add "
            f"ReadWritePaths={directory} in a drop-in (systemctl edit poi-bridge)"
            + (f"; and {lost} does not keep files across restarts (PrivateTmp=, tmpfs), "
               "which loses the payments it holds" if lost else ""))


def _check_journal_owner(path: Path, place: str, warnings: list[str]) -> None:
    """Journal files another user than the unit's made (a technician ran the daemon by hand
    as root once): the service, as that user, cannot open them and stops with status 3."""
    try:
        daemon = pwd.getpwnam(DAEMON_USER)
    except KeyError:
        return  # the daemon's user is not on this box: not installed as the unit runs it
    others = []
    for file in journal_files(path):
        try:
            owner = file.stat().st_uid
        except OSError:
            continue
        if owner != daemon.pw_uid:
            others.append((file, user_name(owner)))
    if others:
        warnings.append(
            f"{place}: {'; '.join(f'{file} is owned by {name}' for file, name in others)}, "
            f"not by {DAEMON_USER}, the user the shipped unit runs the daemon as: it cannot "
            "open them and stops at start with exit status 3 (files left by running the daemon "
            f"by hand as root?): chown {DAEMON_USER}: "
            f"{' '.join(str(file) for file, _ in others)}")

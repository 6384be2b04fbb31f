"""The shipped systemd unit, sysusers and tmpfiles snippets, checked by systemd's own tools."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bridge.config import Config

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "poi-bridge.service"
SYSUSERS = ROOT / "systemd" / "poi-bridge.sysusers"
TMPFILES = ROOT / "systemd" / "poi-bridge.tmpfiles"
MODULES = ROOT / "systemd" / "poi-bridge.modules-load"
TIME_WAIT = ROOT / "systemd" / "time-wait-sync-bounded.conf"
HOST_UNITS = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                   "(apt-get install systemd)")


def unit_settings(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values in order (systemd allows a key several times)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)


def verify_root(tmp_path: Path, unit_text: str, with_binary: bool = True) -> Path:
    """An image root for `systemd-analyze verify --root`: the host's unit library (so
    sysinit.target and friends resolve), the unit under test, and an executable where ExecStart
    points, since the daemon is not installed on the build machine."""
    root = tmp_path / "root"
    if not HOST_UNITS.is_dir():
        pytest.fail(f"{HOST_UNITS} missing: the systemd package is incomplete")
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / UNIT.name).write_text(unit_text)
    if with_binary:
        exec_start = unit_settings(UNIT)["Service"]["ExecStart"][0].split()[0]
        binary = root / exec_start.lstrip("/")
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o755)
    return root


@needs_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    root = verify_root(tmp_path, UNIT.read_text())
    result = run(ANALYZE, "verify", f"--root={root}", root / "etc/systemd/system" / UNIT.name)
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings (exit 0): clean means no output at all.
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


@needs_analyze
def test_verify_would_catch_mistakes(tmp_path: Path) -> None:
    """The clean result above means something: the same check flags a typo and a missing
    binary."""
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes")
    root = verify_root(tmp_path, broken, with_binary=False)
    result = run(ANALYZE, "verify", f"--root={root}", root / "etc/systemd/system" / UNIT.name)
    assert "Unknown key 'ProtectHomes'" in result.stderr
    assert "/opt/poi-bridge/bin/poi-bridge is not executable" in result.stderr
    assert result.returncode != 0


@needs_analyze
def test_security_exposure_is_at_most_2() -> None:
    result = run(ANALYZE, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}",
                 UNIT)
    match = re.search(r"Overall exposure level for poi-bridge\.service:\s*([0-9]+\.[0-9]+)\s+(\S+)",
                      result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stderr  # --threshold makes a worse score fail
    passed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("✓")}
    for setting in ("NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=",
                    "SystemCallFilter=~@privileged", "RestrictAddressFamilies=~AF_PACKET",
                    "CapabilityBoundingSet=~CAP_SYS_ADMIN", "MemoryDenyWriteExecute="):
        assert setting in passed, f"{setting} not hardened:\n{result.stdout}"


def test_unit_has_the_service_contract() -> None:
    service = unit_settings()["Service"]

    def one(key: str) -> str:
        values = service.get(key)
        assert values, f"{key}= missing"
        return values[-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30"
    assert one("Restart") == "on-failure"
    assert float(one("RestartSec")) > 0
    assert one("User") == one("Group") == "poi-bridge"
    assert one("StateDirectory") == "poi-bridge"
    assert one("ConfigurationDirectory") == "poi-bridge"
    assert one("ExecStart") == ("/opt/poi-bridge/bin/poi-bridge run --config "
                                "/etc/poi-bridge/poi-bridge.toml")
    # A bound on memory, well above the 80 MB the daemon is held to in bench/ (README)
    assert one("MemoryMax").endswith("M") and int(one("MemoryMax")[:-1]) >= 4 * 80
    # The daemon's default journal lives in the state directory systemd creates for it.
    assert Config().journal.parent == Path("/var/lib") / one("StateDirectory")
    # Started after the clock is set (where the box says so): the journal's times start right.
    after = " ".join(unit_settings()["Unit"]["After"]).split()
    assert "time-sync.target" in after and "network-online.target" in after


def test_unit_device_and_network_policy() -> None:
    service = unit_settings()["Service"]
    assert service["DevicePolicy"] == ["closed"]
    allowed = {value.split()[0]: value.split()[1] for value in service["DeviceAllow"]}
    for group in ("char-ttyUSB", "char-ttyACM", "char-usb_device"):
        assert allowed.get(group) == "rw", f"DeviceAllow={group} rw missing"
    # Real device nodes, including ones that appear after start: no private /dev.
    assert service.get("PrivateDevices", ["no"])[-1] in ("no", "false", "0")
    families = " ".join(service["RestrictAddressFamilies"]).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)
    assert service["SystemCallFilter"][0] == "@system-service"
    assert service["CapabilityBoundingSet"] == [""]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes")):
        assert service[key] == [value], key


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-tmpfiles is not installed")
def test_credentials_directory_comes_from_tmpfiles(tmp_path: Path) -> None:
    credential = unit_settings()["Service"]["LoadCredential"][0]
    credential_id, _, source = credential.partition(":")
    assert credential_id and source.startswith("/etc/poi-bridge/")
    result = run("systemd-tmpfiles", f"--root={tmp_path}", "--create", TMPFILES)
    assert result.returncode == 0, result.stderr
    made = tmp_path / source.lstrip("/")
    assert made.is_dir(), "LoadCredential= fails the start if its directory is missing"
    assert made.stat().st_mode & 0o777 == 0o700, "the secrets directory must be root-only"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                    reason="systemd-sysusers is not installed")
def test_sysusers_creates_the_user_in_dialout(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "group").write_text("root:x:0:\ndialout:x:20:\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    result = run("systemd-sysusers", f"--root={tmp_path}", SYSUSERS)
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":")
             for line in (etc / "passwd").read_text().splitlines() if line}
    groups = {line.split(":")[0]: line.split(":")
              for line in (etc / "group").read_text().splitlines() if line}
    user = users["poi-bridge"]
    assert user[6] in ("/usr/sbin/nologin", "/sbin/nologin"), "a system user, no login shell"
    assert 0 < int(user[2]) < 1000
    assert groups["poi-bridge"][2] == user[3], "primary group poi-bridge"
    assert "poi-bridge" in groups["dialout"][3].split(","), "member of dialout"
    assert groups["dialout"][2] == "20", "the existing dialout group is reused"


def test_modules_load_registers_the_device_classes() -> None:
    modules = [line.strip() for line in MODULES.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    # usbserial registers the ttyUSB major, cdc_acm the ttyACM major that DeviceAllow names.
    assert modules == ["usbserial", "cdc_acm"]


def test_the_wait_for_ntp_is_bounded_so_the_bridge_starts_without_internet() -> None:
    """The unit starts after time-sync.target, and the README has a box without a battery
    clock enable systemd-time-wait-sync, which Debian ships to wait for ever: a store whose
    internet was down at boot never started the bridge (the deployment audit). The shipped
    drop-in bounds it, and the README installs it where systemd reads it."""
    assert "time-sync.target" in unit_settings(UNIT)["Unit"]["After"]
    host = HOST_UNITS / "systemd-time-wait-sync.service"
    if host.exists():  # (why the drop-in exists: the host's own wait has no limit)
        assert unit_settings(host)["Service"]["TimeoutStartSec"] == ["infinity"]
    (bound,) = unit_settings(TIME_WAIT)["Service"]["TimeoutStartSec"]
    assert bound.endswith("s") and 0 < int(bound[:-1]) <= 120, bound
    readme = (ROOT / "README.md").read_text()
    assert ("install -D -m644 systemd/time-wait-sync-bounded.conf \\\n    /usr/lib/systemd/system/"
            "systemd-time-wait-sync.service.d/poi-bridge.conf") in readme


@needs_analyze
def test_the_bounded_wait_for_ntp_verifies(tmp_path: Path) -> None:
    root = verify_root(tmp_path, UNIT.read_text())
    drop_in = root / "usr/lib/systemd/system/systemd-time-wait-sync.service.d"
    drop_in.mkdir(parents=True)
    (drop_in / "poi-bridge.conf").write_text(TIME_WAIT.read_text())
    host = HOST_UNITS / "systemd-time-wait-sync.service"
    if not host.exists():
        pytest.skip("this systemd has no systemd-time-wait-sync.service")
    binary = root / unit_settings(host)["Service"]["ExecStart"][0].split()[0].lstrip("/")
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    done = run(ANALYZE, "verify", f"--root={root}", "systemd-time-wait-sync.service")
    # (a mistake in the drop-in, an unknown key say, is a warning naming its file)
    assert done.returncode == 0 and "poi-bridge.conf" not in done.stderr, done.stderr

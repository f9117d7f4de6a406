"""The doctor's rules and its look at the system: pure functions of what it read, unit-tested.

Kept apart from :mod:`mn_secd.commands.doctor`'s checks, which gather the facts (``stat``, ``/proc``,
``systemctl show``, the BSF's Date header) and turn these verdicts into lines.
"""

from __future__ import annotations

import enum
import grp
import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

#: The unit the daemon runs as, and the groups its (dynamic) user has when the unit cannot be asked.
UNIT = "mn-secd.service"

DEFAULT_SERVICE_GROUPS = ("dialout",)
#: A clock before this is surely wrong (this code did not exist before it).
CLOCK_FLOOR = datetime(2025, 1, 1, tzinfo=UTC)
#: Clock skew against the BSF's Date header that makes key lifetimes unreliable (warn / fail).
SKEW_WARN = 60.0
SKEW_FAIL = 3600.0


class Verdict(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


def device_allowed(port: str, device_allow: Sequence[str], *, major_name: str | None) -> bool:
    """Does a ``DeviceAllow=`` list (``systemctl show`` form: ``/dev/x rw``, ``char-ttyUSB rw``) let the
    unit read and write ``port``? ``major_name`` is the driver name /proc/devices gives its major."""
    wanted = {os.path.abspath(port), os.path.realpath(port)}
    for entry in device_allow:
        spec, _, access = entry.strip().partition(" ")
        if "r" not in access or "w" not in access:
            continue
        if spec.startswith("/dev/") and {spec, os.path.realpath(spec)} & wanted:
            return True
        if spec.startswith("char-") and major_name is not None:
            pattern = spec[len("char-") :]
            if pattern == major_name or (pattern.endswith("*") and major_name.startswith(pattern[:-1])):
                return True
    return False


def dropin_device_allow(path: Path) -> list[str]:
    """The ``DeviceAllow=`` values a unit drop-in sets (``/dev/x rw``), [] if it cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.partition("=")[2].strip() for line in lines if line.startswith("DeviceAllow=")]


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What the doctor found about keeping sessions across restarts (``check_session`` gathers it)."""

    persist: bool  # [gba] persist_session
    directory: Path | None  # where sessions are kept; None: nowhere
    source: str = ""  # what chose it: "StateDirectory=", "[gba] state_directory", "$STATE_DIRECTORY"
    directory_problem: str | None = None  # why the daemon could not keep sessions there
    kept: str = "no session"  # what is kept there now
    key_path: Path = Path()
    key_present: bool | None = None  # None: not visible to this user
    key_problem: str | None = None  # systemd-creds could not open it (checked as root)
    unit_loads_key: bool | None = None  # the generator's drop-in is in the unit; None: no unit to ask


def session_verdict(facts: SessionFacts) -> tuple[Verdict, str, str]:
    """(verdict, detail, fix) of the session line: where sessions are kept, and what a restart costs."""
    setup = "mn-secd setup-sealing (as root), then systemctl daemon-reload && systemctl restart mn-secd"
    if facts.directory is None:
        return (
            Verdict.WARN,
            "no state directory (not under the unit's StateDirectory=, no [gba] state_directory): nothing is "
            "kept, every restart costs a bootstrap",
            "run the daemon as mn-secd.service, or set [gba] state_directory",
        )
    where = f"{facts.directory} ({facts.source})"
    if facts.directory_problem is not None:
        return (
            Verdict.FAIL,
            f"{where}: {facts.directory_problem}: nothing is kept across restarts",
            "let systemd make it (StateDirectory=), or give the daemon's user a directory of its own (mode 0700)",
        )
    where += f" holds {facts.kept}; GBA_U sessions are resumed from the card after a restart"
    if not facts.persist:
        return (
            Verdict.OK,
            f"{where}; GBA_ME sessions are not kept (persist_session = false: a restart costs one bootstrap)",
            "",
        )
    key = facts.key_path
    if facts.key_present is None:
        return Verdict.WARN, f"{where}; persist_session = true, and {key} is not visible to this user", "run as root"
    if not facts.key_present:
        return (
            Verdict.WARN,
            f"{where}; persist_session = true but there is no session-sealing key ({key}): GBA_ME sessions are "
            "not kept",
            setup,
        )
    if facts.key_problem is not None:
        return (
            Verdict.FAIL,
            f"{where}; the session-sealing key {key} does not open ({facts.key_problem}): systemd cannot hand "
            "it to the unit, which then fails to start",
            "mn-secd setup-sealing --force, then systemctl restart mn-secd",
        )
    if facts.unit_loads_key is False:
        return (
            Verdict.WARN,
            f"{where}; the session-sealing key {key} is there, but the unit does not load it yet: GBA_ME "
            "sessions are not kept",
            "systemctl daemon-reload && systemctl restart mn-secd",
        )
    return (
        Verdict.OK,
        f"{where}; GBA_ME sessions are sealed under the session-sealing key ({key}, which systemd hands the "
        "unit) and resumed after a restart",
        "",
    )


def clock_verdict(now: datetime, bsf_date: datetime | None) -> tuple[Verdict, str]:
    """Is the system clock plausible? Against a floor, and against the BSF's ``Date`` when it sent one."""
    if now < CLOCK_FLOOR:
        return Verdict.FAIL, f"the system clock says {now:%Y-%m-%d %H:%M}Z, before {CLOCK_FLOOR:%Y-%m-%d}"
    if bsf_date is None:
        return Verdict.OK, f"{now:%Y-%m-%d %H:%M:%S}Z (no BSF Date header to compare with)"
    skew = (now - bsf_date).total_seconds()
    text = f"{now:%Y-%m-%d %H:%M:%S}Z, {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the BSF's clock"
    if abs(skew) >= SKEW_FAIL:
        return Verdict.FAIL, text
    return (Verdict.WARN if abs(skew) >= SKEW_WARN else Verdict.OK), text


def udp_port_users(port: int, proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, name) of each process with a UDP socket bound to ``port`` (any address), where visible."""
    inodes: set[str] = set()
    for table in ("udp", "udp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    users: list[tuple[int, str]] = []
    for entry in os.listdir(proc) if inodes else []:
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(proc / entry / "fd")
            name = (proc / entry / "comm").read_text().strip()
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                link = os.readlink(proc / entry / "fd" / fd)
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                users.append((int(entry), name))
                break
    return users


def driver_name(rdev: int) -> str | None:
    try:
        text = Path("/proc/devices").read_text()
    except OSError:
        return None
    section = text.split("Block devices:")[0]
    for line in section.splitlines():
        number, _, name = line.strip().partition(" ")
        if number.isdigit() and int(number) == os.major(rdev):
            return name.strip()
    return None


def systemctl_show(*properties: str) -> dict[str, str] | None:
    """``systemctl show`` of the unit, or None when systemd is not running here."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return None
    try:
        done = subprocess.run(
            ["systemctl", "show", UNIT, *(f"--property={p}" for p in properties)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    shown: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        shown[key] = (shown[key] + "\n" + value) if key in shown else value
    return shown


def bus_path(unit: str) -> str:
    """The unit's D-Bus object path (sd_bus_path_encode: every octet but [A-Za-z0-9] as _xx)."""
    encoded = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}" for b in unit.encode())
    return f"/org/freedesktop/systemd1/unit/{encoded}"


def unit_credentials() -> list[tuple[str, str, bool]] | None:
    """The unit's ``LoadCredential=`` and ``LoadCredentialEncrypted=`` entries as (name, source,
    encrypted), drop-ins included; None when systemd cannot be asked or has no such unit.

    Asked over D-Bus with busctl: ``systemctl show`` prints these properties as "[unprintable]".
    """
    if not Path("/run/systemd/system").is_dir() or shutil.which("busctl") is None:
        return None
    argv = ["busctl", "--json=short", "get-property", "org.freedesktop.systemd1", bus_path(UNIT)]
    argv += ["org.freedesktop.systemd1.Service", "LoadCredential", "LoadCredentialEncrypted"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
        plain, encrypted = (json.loads(line)["data"] for line in done.stdout.splitlines())
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return None
    if done.returncode != 0:
        return None
    return [(str(n), str(p), False) for n, p in plain] + [(str(n), str(p), True) for n, p in encrypted]


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)

"""The Debian package on a clean bookworm tree, under systemd 252 as PID 1 (./dev system-test).

One container, one story, in order: `dpkg -i` (nothing starts; pyscard is there, and without
pcscd `uicc readers` says so), the lab (simulated modem and BSF as units), the documented
configuration, `systemctl enable --now`, an AE gets a key, the journal, reload, a virtual card in
pcscd's reader (during the watchdog's wait), the watchdog, stop, `mn-secd doctor` (all ok, then a
port changed without daemon-reload), a GBA_ME session sealed under the session-sealing key across
a restart, the SIM PIN as a credential (right, then wrong), a missing credential, a missing port,
a port the device policy refuses, upgrade, remove, purge. Everything is checked with systemd's own
tools (systemctl show, journalctl -o export) and dpkg; the AE is `mn-secd key` from the package;
what the daemon cost the card and the BSF is read from the lab modem's log and the lab BSF's
counters.

Inputs (./dev system-test sets them): MN_SECD_SYSTEM_TEST_DEB (the .deb from ./dev dist),
MN_SECD_SYSTEM_TEST_BASE (a debootstrapped bookworm tree), MN_SECD_SYSTEM_TEST_WHEELS (wheels of
mn-secd[sim] for the lab venv).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from nspawn import Machine, booted

from mn_secd.sim.milenage import Milenage
from mn_secd.sim.profile import load_profile, save_profile
from mn_secd.sim.vicc import UICC_ATR

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
UNIT = "mn-secd.service"
NAF = "in-cse.lab.example"
OTHER_NAF = "other.lab.example"
MODEM_LINK = "/run/lab/modem"
PSK_PATH = "/etc/mn-secd/psk/ae-lab.psk"
LAB_DROPIN = "/etc/systemd/system/mn-secd.service.d/lab.conf"
CONFIG = "/etc/mn-secd/mn-secd.toml"
STATE = "/var/lib/private/mn-secd"  # StateDirectory=mn-secd of a DynamicUser unit
SESSION_KEY = "/etc/credstore.encrypted/mn-secd-session-key"
GENERATED = "/run/systemd/generator/mn-secd.service.d"
PIN_PATH = "/etc/mn-secd/pin/sim.pin"
PIN_DROPIN = "/etc/systemd/system/mn-secd.service.d/pin.conf"
SIM_PIN = "73915864"


def _forms(raw: bytes) -> tuple[bytes, ...]:
    """A secret as it could be written: raw, hex (both cases), base64."""
    return raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw)


def _input(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the system test with ./dev system-test")
    path = Path(value)
    assert path.exists(), path
    return path


class Lab:
    """What the story's steps share: the machine and what earlier steps learned."""

    def __init__(self, machine: Machine, deb: Path) -> None:
        self.m = machine
        self.deb = deb
        self.pty = ""
        self.psk = secrets.token_bytes(32)
        self.keys: list[str] = []
        self.btid = ""
        self.pid = ""
        self.usim_pty = ""  # the second lab modem's, with the USIM-only card (GBA_ME)
        self.active_since = 0.0  # host monotonic seconds when the daemon became active

    def config(
        self,
        port: str,
        *,
        nafs: tuple[str, ...] = (NAF, OTHER_NAF),
        extra_ae: bool = False,
        persist_session: bool = False,
        pin_file: str | None = None,
    ) -> str:
        pin = f'pin_file = "{pin_file}"\n' if pin_file is not None else ""
        text = f"""# Configured by the system test, as an operator would.
[modem]
port = "{port}"
{pin}
[gba]
bsf_url = "http://127.0.0.1:8080"
refresh_jitter = 0.0
start_jitter = 0.0
min_forced_interval = 1.0
persist_session = {"true" if persist_session else "false"}

[control]
addresses = ["127.0.0.1"]

[[ae]]
identity = "ae-lab"
psk_file = "ae-lab.psk"
naf = [{", ".join(f'"{n}"' for n in nafs)}]
may_force_bootstrap = true
"""
        if extra_ae:
            text += '\n[[ae]]\nidentity = "ae-two"\npsk_file = "ae-two.psk"\nnaf = ["in-cse.lab.example"]\n'
        self.m.path(CONFIG).write_text(text)
        return text

    def key(self, naf: str = NAF, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.m.run(
            "mn-secd", "key", "--naf", naf, "--identity", "ae-lab", "--psk-file", PSK_PATH, "--json",
            "--reveal-key", check=check, timeout=60,
        )  # fmt: skip

    def wait_key(self, naf: str = NAF, timeout: float = 60) -> dict[str, Any]:
        """A key as soon as the daemon has one (a daemon just started may answer 5.03 until it has a card)."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.key(naf, check=False)
            if answer.returncode == 0:
                key: dict[str, Any] = json.loads(answer.stdout)
                return key
            if time.monotonic() > deadline:
                raise AssertionError(f"no key: {answer.stderr}\n{self.journal_text()}")
            time.sleep(0.5)

    def wait_status(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.m.show(UNIT, "StatusText")["StatusText"]
            if re.search(pattern, text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"STATUS never matched {pattern!r}; last: {text!r}\n{self.journal_text()}")

    def journal_text(self, unit: str = UNIT) -> str:
        return self.m.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout[-4000:]

    def journal_entries(self, *args: str) -> list[dict[str, Any]]:
        out = self.m.run("journalctl", "--no-pager", "-o", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_journal(self, pattern: str, *, since: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.m.run("journalctl", "--no-pager", "-o", "cat", "-u", UNIT, "--since", since).stdout
            if re.search(pattern, text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"no journal line matching {pattern!r}:\n{self.journal_text()}")

    def clock(self) -> str:
        """The container's wall clock, for journalctl --since."""
        return self.m.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()

    def start_modem(self, name: str, card: str, *args: str, pin: str | None = None) -> str:
        """Another lab modem as a unit ``lab-<name>``, with a copy of ``etc/sim/<card>`` made at its first
        start (its PIN lock on with ``pin``: written into the profile, not on the unit's command line,
        which the journal keeps); its pty, opened to the serial group as udev would (the pty changes
        with every start of the unit)."""
        profile = f"/var/lib/lab/{name}.toml"
        if not self.m.path(profile).exists():
            save_profile(self.m.path(profile), replace(load_profile(ROOT / "etc" / "sim" / card), pin=pin))
        link = f"/run/lab-{name}/modem"
        self.m.run("systemctl", "stop", f"lab-{name}", check=False)
        self.m.run("systemctl", "reset-failed", f"lab-{name}", check=False)
        self.m.run(
            "systemd-run", f"--unit=lab-{name}", f"--property=RuntimeDirectory=lab-{name}",
            "/opt/lab/bin/mn-secd", "sim", "modem", "--card", profile, "--link", link, *args,
        )  # fmt: skip
        pty, deadline = "", time.monotonic() + 30
        while not pty.startswith("/dev/pts/") and time.monotonic() < deadline:
            pty = self.m.run("readlink", link, check=False).stdout.strip()
            time.sleep(0.2)
        assert pty.startswith("/dev/pts/"), self.journal_text(f"lab-{name}")
        self.m.run("chgrp", "dialout", pty)
        self.m.run("chmod", "0660", pty)
        return pty

    def modem_log(self, name: str, pattern: str) -> int:
        """How many lines of the lab modem ``name``'s log (all its runs) match ``pattern``."""
        text = self.m.run("journalctl", "--no-pager", "-o", "cat", "-u", f"lab-{name}").stdout
        return len(re.findall(pattern, text))

    def wait_for_modem_log(self, name: str, pattern: str, count: int, timeout: float = 10) -> None:
        """Until the modem's log has ``count`` such lines (journald may write a moment late); never more."""
        deadline = time.monotonic() + timeout
        while self.modem_log(name, pattern) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        assert self.modem_log(name, pattern) == count, self.journal_text(f"lab-{name}")

    def bsf_counters(self) -> dict[str, int]:
        """The lab BSF's counters (Ub requests, challenges, successes, Zn requests)."""
        script = (
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/lab/counters').read().decode())"
        )
        counters: dict[str, int] = json.loads(self.m.run("python3", "-c", script).stdout)
        return counters

    def doctor(self, *args: str) -> tuple[int, dict[str, dict[str, str]]]:
        """``mn-secd doctor --config CONFIG --json`` as root in the container: (exit status, checks by name)."""
        done = self.m.run("mn-secd", "doctor", "--config", CONFIG, "--json", *args, check=False, timeout=120)
        report = json.loads(done.stdout)
        assert report["ok"] is (done.returncode == 0), report
        return done.returncode, {c["check"]: c for c in report["checks"]}

    def restart_with(self, port: str, **kwargs: Any) -> None:
        """Stop, reconfigure, let the generator see the port, and start (without waiting for success)."""
        self.m.run("systemctl", "stop", UNIT)
        self.m.run("systemctl", "reset-failed", UNIT, check=False)
        self.config(port, **kwargs)
        self.m.run("systemctl", "daemon-reload")
        self.m.run("systemctl", "start", "--no-block", UNIT)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    deb = _input("MN_SECD_SYSTEM_TEST_DEB")
    base = _input("MN_SECD_SYSTEM_TEST_BASE")
    wheels = _input("MN_SECD_SYSTEM_TEST_WHEELS")
    with booted(base, name=f"mn-secd-systest-{os.getpid()}") as machine:
        stage = machine.path("/root/systest")
        stage.mkdir(parents=True)
        shutil.copy(deb, stage / deb.name)
        shutil.copytree(wheels, stage / "wheels")
        shutil.copytree(ROOT / "etc" / "sim", machine.path("/var/lib/lab/subscribers"))
        shutil.copy(ROOT / "etc" / "sim" / "card-isim.toml", machine.path("/var/lib/lab/card-isim.toml"))
        yield Lab(machine, deb)


def test_install_does_not_start_an_unconfigured_daemon(lab: Lab) -> None:
    m = lab.m
    out = m.run("dpkg", "-i", f"/root/systest/{lab.deb.name}", timeout=300)
    assert "neither enabled nor started" in out.stdout + out.stderr
    assert "systemctl enable --now mn-secd" in out.stdout + out.stderr
    assert m.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "disabled"
    assert m.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "inactive"
    # the runtime needs nothing of a tool chain
    for tool in ("gcc", "cc", "make", "autoconf", "pip"):
        assert m.run("sh", "-c", f"command -v {tool}", check=False).returncode != 0, tool
    assert m.run("mn-secd", "--help").stdout.startswith("usage: mn-secd")
    lab_only = m.run("mn-secd", "sim", "bsf", "--subscribers", "x", check=False)  # no [sim] extra in the package
    assert lab_only.returncode == 2 and "needs the Python package 'aiohttp'" in lab_only.stderr, lab_only.stderr
    assert m.path("/usr/share/man/man1/mn-secd.1.gz").exists()
    documentation = m.show(UNIT, "Documentation")["Documentation"]
    assert documentation.startswith("file:/"), documentation
    for link in documentation.split():
        assert m.path(link.removeprefix("file:")).is_file(), link  # the unit's docs are where it says
    assert m.path("/usr/share/mn-secd/udev/90-mn-secd-modem.rules").exists()
    assert m.run("dpkg-query", "-W", "-f=${Conffiles}", "mn-secd").stdout.strip().startswith(CONFIG)
    # The shipped configuration, left as it is, is refused with one line naming the key at fault.
    check = m.run("mn-secd", "check-config", "--config", CONFIG, check=False)
    assert check.returncode == 1 and re.search(r"mn-secd\.toml: (modem\.port|ae\[0\]\.psk_file)", check.stderr)


def test_pyscard_is_in_the_package_and_without_pcscd_readers_say_so(lab: Lab) -> None:
    """A gateway with a PC/SC reader compiles nothing: pyscard is in the venv, libpcsclite1 a dependency."""
    m = lab.m
    m.run("/opt/mn-secd/bin/python", "-c", "import smartcard.scard, smartcard.System")
    depends = m.run("dpkg-query", "-W", "-f=${Depends}|${Suggests}", "mn-secd").stdout
    assert "libpcsclite1" in depends.partition("|")[0] and "pcscd" in depends.partition("|")[2], depends
    m.run("systemctl", "stop", "pcscd.socket", "pcscd.service")  # as on a gateway without pcscd
    readers = m.run("mn-secd", "uicc", "readers", check=False)
    assert readers.returncode == 1 and readers.stdout == "", readers
    assert readers.stderr.count("\n") == 1 and "pcsc-unavailable" in readers.stderr, readers.stderr
    assert "is pcscd running?" in readers.stderr and "Traceback" not in readers.stderr


def test_the_lab_modem_and_bsf_run_as_units(lab: Lab) -> None:
    m = lab.m
    m.run("python3", "-m", "venv", "/opt/lab")
    m.run(
        "/opt/lab/bin/pip", "install", "--quiet", "--no-index", "--find-links", "/root/systest/wheels",
        "mn-secd[sim]", timeout=300,
    )  # fmt: skip
    m.run(
        "systemd-run", "--unit=lab-modem", "--property=RuntimeDirectory=lab",
        "/opt/lab/bin/mn-secd", "sim", "modem", "--card", "/var/lib/lab/card-isim.toml", "--link", MODEM_LINK,
    )  # fmt: skip
    m.run(
        "systemd-run", "--unit=lab-bsf", "/opt/lab/bin/mn-secd", "sim", "bsf",
        "--subscribers", "/var/lib/lab/subscribers", "--listen", "127.0.0.1:8080",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not lab.pty and time.monotonic() < deadline:
        lab.pty = m.run("readlink", MODEM_LINK, check=False).stdout.strip()
        time.sleep(0.2)
    assert lab.pty.startswith("/dev/pts/"), m.run("journalctl", "-u", "lab-modem", "--no-pager").stdout
    # What udev does for a real modem's tty: the serial group may open it.
    m.run("chgrp", "dialout", lab.pty)
    m.run("chmod", "0660", lab.pty)
    for unit in ("lab-modem.service", "lab-bsf.service"):
        assert m.show(unit, "ActiveState")["ActiveState"] == "active", unit


def test_configured_it_starts_with_status_and_ready(lab: Lab) -> None:
    m = lab.m
    lab.config(lab.pty)
    psk = m.path(PSK_PATH)
    psk.parent.mkdir(mode=0o700)
    psk.write_bytes(lab.psk)
    psk.chmod(0o600)
    dropin = m.path(LAB_DROPIN)
    dropin.parent.mkdir(parents=True)
    dropin.write_text(f"[Service]\nLoadCredential=ae-lab.psk:{PSK_PATH}\n")
    # docs/INSTALL.md: check the configuration inside the service's sandbox
    m.run(
        "systemd-run", "--pipe", "--wait", "--quiet", "-p", "DynamicUser=yes", "-p", "SupplementaryGroups=dialout",
        "-p", f"LoadCredential=ae-lab.psk:{PSK_PATH}", "/usr/bin/mn-secd", "check-config", "--config", CONFIG,
    )  # fmt: skip
    m.run("systemctl", "enable", "--now", UNIT, timeout=120)
    lab.active_since = time.monotonic()
    props = m.show(
        UNIT, "ActiveState", "SubState", "MainPID", "StatusText", "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic", "DropInPaths", "DeviceAllow", "WatchdogUSec",
    )  # fmt: skip
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["StatusText"], props  # the daemon's own STATUS= text
    ready_ms = (int(props["ActiveEnterTimestampMonotonic"]) - int(props["ExecMainStartTimestampMonotonic"])) / 1000
    print(f"\nREADY=1 {ready_ms:.0f} ms after the daemon's exec (TimeoutStartSec=60 s); STATUS={props['StatusText']}")
    assert 0 < ready_ms < 60_000
    # the generator turned [modem] port into the device policy; the pty has no device unit to bind to
    assert "/run/systemd/generator/mn-secd.service.d/50-modem-port.conf" in props["DropInPaths"], props
    assert props["DeviceAllow"] == f"{lab.pty} rw", props
    assert props["WatchdogUSec"] == "30s"
    lab.pid = props["MainPID"]
    status = lab.wait_status(r"^bootstrapped until ")
    print(f"STATUS={status}")


def test_an_ae_gets_a_key(lab: Lab) -> None:
    for naf in (NAF, OTHER_NAF):
        answer = json.loads(lab.key(naf).stdout)
        assert answer["naf_fqdn"] == naf
        assert re.fullmatch(r"[0-9a-f]{64}", answer["key"]), answer.keys()
        assert answer["btid"].endswith("pub.3gppnetwork.org") or "@" in answer["btid"]
        lab.keys.append(answer["key"])
        lab.btid = answer["btid"]


def test_journal_has_structured_fields_and_no_secret(lab: Lab) -> None:
    m = lab.m
    entries = lab.journal_entries("-u", UNIT)
    events = {e.get("EVENT") for e in entries if e.get("_PID") == lab.pid}
    assert {"card.found", "control.up"} <= events, events
    assert any("BTID_HASH" in e for e in entries), "no entry carries BTID_HASH"
    assert not any(lab.btid in str(e.get("MESSAGE", "")) for e in entries), "a B-TID in a log line"
    export = m.run("journalctl", "--no-pager", "-o", "export", timeout=120).stdout.encode("utf-8", "surrogateescape")
    secrets_ = {"psk": lab.psk}
    for i, key in enumerate(lab.keys):
        secrets_[f"key{i}"] = bytes.fromhex(key)
    for name, raw in secrets_.items():
        for form in (raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw)):
            assert form not in export, f"the {name} is in the journal"
    # ... nor in any file the service or the package wrote
    for where in ("/var/lib/private", "/opt/mn-secd", "/var/log", "/etc/systemd"):
        for path in m.path(where).rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                for name, raw in secrets_.items():
                    assert raw not in data and raw.hex().encode() not in data, f"the {name} is in {path}"


def test_reload_keeps_the_pid_and_applies_an_ae_change(lab: Lab) -> None:
    m = lab.m
    since = lab.clock()
    lab.config(lab.pty, nafs=(NAF,))  # ae-lab loses other.lab.example
    m.run("systemctl", "reload", UNIT)
    lab.wait_journal(r"(?i)reload", since=since)
    assert m.show(UNIT, "MainPID")["MainPID"] == lab.pid
    refused = lab.key(OTHER_NAF, check=False)
    assert refused.returncode != 0 and re.search(r"4\.03|not (authori[sz]ed|allowed)", refused.stderr), refused
    assert json.loads(lab.key(NAF).stdout)["naf_fqdn"] == NAF  # and the keys survived the reload
    events = [e for e in lab.journal_entries("-u", UNIT, "--since", since) if e.get("EVENT") == "control.reload"]
    assert events, "no EVENT=control.reload"


def test_a_card_in_pcscds_virtual_reader_is_read_through_the_package(lab: Lab) -> None:
    """pcscd with vsmartcard's vpcd reader, the lab's software UICC in it (`mn-secd sim vicc`); the
    package's own pyscard lists the reader and reads the card. (Runs in the watchdog test's wait.)"""
    m = lab.m
    shutil.copy(ROOT / "etc" / "sim" / "card-isim.toml", m.path("/var/lib/lab/vicc.toml"))
    m.run("systemctl", "start", "pcscd.socket")
    m.run(
        "systemd-run", "--unit=lab-vicc", "/opt/lab/bin/mn-secd", "sim", "vicc",
        "--card", "/var/lib/lab/vicc.toml", "--wait", "60",
    )  # fmt: skip
    try:
        listed, deadline = "", time.monotonic() + 30
        while time.monotonic() < deadline:  # the first client starts pcscd, whose vpcd the card then finds
            listed = m.run("mn-secd", "uicc", "readers", "--reader", "Virtual PCD", check=False).stdout
            if f"card, ATR {UICC_ATR.hex().upper()}" in listed:
                break
            time.sleep(0.5)
        assert f"card, ATR {UICC_ATR.hex().upper()}" in listed and "picks 'Virtual PCD" in listed, listed
        info = m.run("mn-secd", "uicc", "info", "--reader", "Virtual PCD", timeout=60).stdout
        assert load_profile(ROOT / "etc" / "sim" / "card-isim.toml").iccid in info, info
    finally:
        m.run("systemctl", "stop", "lab-vicc", check=False)


def test_the_watchdog_is_fed_for_more_than_twice_watchdogsec(lab: Lab) -> None:
    m = lab.m
    remaining = lab.active_since + 2 * 30 + 3 - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
    props = m.show(
        UNIT, "ActiveState", "MainPID", "NRestarts", "WatchdogTimestampMonotonic", "ActiveEnterTimestampMonotonic"
    )
    assert props["ActiveState"] == "active" and props["MainPID"] == lab.pid and props["NRestarts"] == "0", props
    now_us = int(float(m.run("cat", "/proc/uptime").stdout.split()[0]) * 1e6)
    last_ping = int(props["WatchdogTimestampMonotonic"])
    assert last_ping > int(props["ActiveEnterTimestampMonotonic"]) + 30_000_000, props  # pinged after the 1st period
    assert now_us - last_ping < 30_000_000, props  # and recently


def test_stop_is_a_success(lab: Lab) -> None:
    m = lab.m
    m.run("systemctl", "stop", UNIT)
    props = m.show(UNIT, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, props


def test_doctor_under_systemd_sees_the_generators_dropin_and_a_port_changed_without_daemon_reload(
    lab: Lab,
) -> None:
    m = lab.m
    code, checks = lab.doctor()
    assert code == 0, checks
    healthy = ("config", "port", "access", "systemd", "holders", "modem", "sim", "transport", "card")
    for name in (*healthy, "bsf-dns", "bsf", "clock", "control", "session"):
        assert checks[name]["status"] == "ok", checks[name]
    assert f"checked with {UNIT}'s 1 credential" in checks["config"]["detail"], checks["config"]  # ae-lab.psk
    device = checks["systemd"]["detail"]
    assert f"may open {lab.pty} (DevicePolicy=closed" in device, device
    assert f"DeviceAllow= from mn-secd-generator's {GENERATED}/50-modem-port.conf" in device, device
    assert "GBA_U yes" in checks["card"]["detail"] and "AKAv1-MD5" in checks["bsf"]["detail"]
    assert "/var/lib/mn-secd (StateDirectory=) holds a GBA_U session record" in checks["session"]["detail"]
    text = m.run("mn-secd", "doctor", "--config", CONFIG, timeout=120)  # the same as lines, exit 0
    lines = text.stdout.splitlines()
    assert [line.split()[1] for line in lines] == list(checks) and all(line.startswith("ok") for line in lines)

    # [modem] port changed, and systemd not told: the unit would still allow (and bind to) the old one
    lab.usim_pty = lab.start_modem("usim", "card-usim-mnc3.toml")
    lab.config(lab.usim_pty)
    code, checks = lab.doctor()
    assert code == 1 and checks["systemd"]["status"] == "fail", checks["systemd"]
    assert f"allows {lab.pty} rw, but [modem] port is {lab.usim_pty}" in checks["systemd"]["detail"]
    assert checks["systemd"]["fix"].startswith("systemctl daemon-reload")
    assert all(checks[name]["status"] == "ok" for name in ("port", "modem", "sim", "card", "bsf"))
    m.run("systemctl", "daemon-reload")
    code, checks = lab.doctor()
    assert code == 0 and f"may open {lab.usim_pty}" in checks["systemd"]["detail"], checks["systemd"]


def test_a_gba_me_session_sealed_under_the_session_key_survives_a_restart(lab: Lab) -> None:
    """persist_session with the USIM-only card: `mn-secd setup-sealing`, systemd hands the key over,
    a restart costs the card and the BSF nothing, the state directory holds nothing in the clear,
    and `mn-secd forget` brings a fresh bootstrap back."""
    m = lab.m
    lab.config(lab.usim_pty, persist_session=True)
    m.run("systemctl", "daemon-reload")
    _, checks = lab.doctor()  # before the key exists: what it means and what to run
    assert checks["session"]["status"] == "warn" and "no session-sealing key" in checks["session"]["detail"]
    assert checks["session"]["fix"].startswith("mn-secd setup-sealing")
    assert not m.path(f"{GENERATED}/50-session-key.conf").exists()

    made = m.run("mn-secd", "setup-sealing")
    assert "a new 256-bit session-sealing key" in made.stdout and "daemon-reload" in made.stdout, made.stdout
    assert oct(m.path(SESSION_KEY).stat().st_mode & 0o777) == "0o600"
    assert oct(m.path(SESSION_KEY).parent.stat().st_mode & 0o777) == "0o700"
    m.run("systemctl", "daemon-reload")
    assert f"{GENERATED}/50-session-key.conf" in m.show(UNIT, "DropInPaths")["DropInPaths"]
    _, checks = lab.doctor()
    assert checks["session"]["status"] == "ok", checks["session"]
    assert "GBA_ME sessions are sealed under the session-sealing key" in checks["session"]["detail"]
    # What the generator relies on in systemd 252: a credential without a path that is not in the
    # store is not loaded (the unit runs), one that does not open fails the unit (243/CREDENTIALS).
    probe = ["systemd-run", "--wait", "--quiet", "--collect", "-p", "DynamicUser=yes"]
    m.run(*probe, "-p", "LoadCredentialEncrypted=mn-secd-absent", "/bin/true")
    damaged = m.path("/etc/credstore.encrypted/mn-secd-damaged")
    damaged.write_bytes(m.path(SESSION_KEY).read_bytes()[:-4])
    assert m.run(*probe, "-p", "LoadCredentialEncrypted=mn-secd-damaged", "/bin/true", check=False).returncode == 243
    damaged.unlink()
    opened = m.run("systemd-creds", "decrypt", "--transcode=base64", "--name=mn-secd-session-key", SESSION_KEY, "-")
    session_key = base64.b64decode(opened.stdout)
    assert len(session_key) == 32

    m.run("systemctl", "start", UNIT)
    first = lab.wait_key()
    assert first["gba_mode"] == "gba-me"
    sealed = m.path(f"{STATE}/gba-session.cred")
    deadline = time.monotonic() + 10
    while not sealed.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sealed.exists(), lab.journal_text()
    lab.wait_for_modem_log("usim", r"AUTHENTICATE \(3G context\)", 1)
    counters = lab.bsf_counters()
    old_pid = m.show(UNIT, "MainPID")["MainPID"]

    m.run("systemctl", "restart", UNIT)
    status = lab.wait_status(r"resumed from the last run")
    assert m.show(UNIT, "MainPID")["MainPID"] != old_pid and "gba-me" in status, status
    again = json.loads(lab.key().stdout)
    assert (again["btid"], again["key"], again["expires"]) == (first["btid"], first["key"], first["expires"])
    time.sleep(1)  # anything the restart cost would be in the modem's log by now
    assert lab.modem_log("usim", r"AUTHENTICATE") == 1  # no AUTHENTICATE since the first bootstrap
    assert lab.bsf_counters() == counters  # no Ub request (and no Zn)

    # What is on disk is sealed: not Ks, not the NAF key, not the session-sealing key, not the B-TID.
    profile = load_profile(ROOT / "etc" / "sim" / "card-usim-mnc3.toml")
    _, ck, ik, _ = Milenage(profile.k, profile.opc).f2345(base64.b64decode(first["btid"].partition("@")[0]))
    secrets_ = {"Ks": ck + ik, "NAF key": bytes.fromhex(first["key"]), "session-sealing key": session_key}
    files = [p for p in m.path(STATE).rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["gba-session.cred"], files
    for path in files:
        data = path.read_bytes()
        assert first["btid"].encode() not in data
        for name, raw in secrets_.items():
            assert not any(form in data for form in _forms(raw)), f"the {name} is in {path}"
    export = m.run("journalctl", "--no-pager", "-o", "export", timeout=120).stdout.encode("utf-8", "surrogateescape")
    for name, raw in secrets_.items():
        assert not any(form in export for form in _forms(raw)), f"the {name} is in the journal"

    forgot = m.run("mn-secd", "forget")
    assert "removed a sealed GBA_ME session" in forgot.stdout and not sealed.exists(), forgot.stdout
    m.run("systemctl", "restart", UNIT)
    fresh = lab.wait_key()  # an AE asking: the bootstrap does not wait for the jitter
    assert fresh["btid"] != first["btid"] and fresh["key"] != first["key"]
    lab.wait_for_modem_log("usim", r"AUTHENTICATE \(3G context\)", 2)
    assert lab.bsf_counters()["successes"] == counters["successes"] + 1
    m.run("systemctl", "stop", UNIT)


def test_the_sim_pin_as_a_credential_unlocks_once_and_a_wrong_one_is_tried_once(lab: Lab) -> None:
    m = lab.m
    pty = lab.start_modem("pin", "card-isim.toml", pin=SIM_PIN)
    pin = m.path(PIN_PATH)
    pin.parent.mkdir(mode=0o700)
    pin.write_text(SIM_PIN + "\n")
    pin.chmod(0o600)
    m.path(PIN_DROPIN).write_text(f"[Service]\nLoadCredential=sim.pin:{PIN_PATH}\n")  # docs/INSTALL.md
    lab.config(pty, pin_file="sim.pin")
    m.run("systemctl", "daemon-reload")
    started = time.monotonic()
    m.run("systemctl", "start", "--no-block", UNIT)
    assert lab.wait_key()["naf_fqdn"] == NAF  # unlocked, bootstrapped, serving
    print(f"\nPIN-locked SIM: the first key {time.monotonic() - started:.1f} s after systemctl start")
    assert lab.modem_log("pin", r"AT\+CPIN: PIN accepted") == 1
    assert lab.modem_log("pin", r"AT\+CPIN: ") == 1

    # A wrong PIN in the credential: one attempt, and STATUS says how many are left.
    m.run("systemctl", "stop", UNIT)
    pin.write_text("11112222\n")
    pty = lab.start_modem("pin", "card-isim.toml", pin=SIM_PIN)  # the card powered up again
    lab.config(pty, pin_file="sim.pin")
    m.run("systemctl", "daemon-reload")
    restarts = m.show(UNIT, "NRestarts")["NRestarts"]
    m.run("systemctl", "start", "--no-block", UNIT)
    status = lab.wait_status(r"^degraded: .*refused the PIN from pin_file")
    assert re.search(r"\(2 (PIN )?attempts left\)", status), status
    time.sleep(5)  # the daemon goes on trying to open the card, without entering the PIN again
    assert lab.modem_log("pin", r"AT\+CPIN: PIN refused") == 1 and lab.modem_log("pin", r"AT\+CPIN: ") == 2
    # It waits for the card ([modem] modem_wait) before READY=1 in degraded mode, and never exits over it.
    props = m.show(UNIT, "ActiveState", "NRestarts", "StatusText")
    assert props["ActiveState"] in ("activating", "active") and props["NRestarts"] == restarts, props
    assert "2 attempts left" in props["StatusText"] or "2 PIN attempts left" in props["StatusText"], props
    export = m.run("journalctl", "--no-pager", "-o", "export", timeout=120).stdout
    for secret in (SIM_PIN, "11112222"):  # standing alone, not inside a longer number (a timestamp)
        assert not re.search(rf"(?<!\d){secret}(?!\d)", export), f"the PIN {secret} is in the journal"
    assert 'CPIN="' not in export
    m.run("systemctl", "stop", UNIT)
    m.path(PIN_DROPIN).unlink()
    lab.config(lab.pty)
    m.run("systemctl", "daemon-reload")


def test_a_missing_credential_file_is_refused_by_systemd(lab: Lab) -> None:
    m = lab.m
    since = lab.clock()
    m.path(PSK_PATH).rename(m.path(PSK_PATH + ".away"))
    try:
        m.run("systemctl", "reset-failed", UNIT, check=False)
        assert m.run("systemctl", "start", UNIT, check=False).returncode != 0
        props = m.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
        assert props["Result"] == "exit-code" and props["ExecMainStatus"] == "243", props  # 243 = CREDENTIALS
        text = m.run("journalctl", "--no-pager", "-o", "cat", "-u", UNIT, "--since", since).stdout
        assert "credential" in text.lower(), text
        code, checks = lab.doctor()  # the doctor says so before anyone starts the unit
        assert code == 1 and checks["config"]["status"] == "fail", checks["config"]
        assert f"systemd cannot load {UNIT}'s credentials (ae-lab.psk)" in checks["config"]["detail"]
    finally:
        m.run("systemctl", "stop", UNIT, check=False)
        m.path(PSK_PATH + ".away").rename(m.path(PSK_PATH))


def test_an_ae_without_its_credential_names_the_key(lab: Lab) -> None:
    """The daemon's own check: an [[ae]] whose psk_file is nowhere; exits 1 and systemd retries."""
    since = lab.clock()
    lab.restart_with(lab.pty, extra_ae=True)
    text = lab.wait_journal(r"ae\[1\]\.psk_file", since=since)
    assert "ae-two.psk" in text
    lab.wait_journal(r"(?i)scheduled restart job|restart counter", since=since, timeout=20)


def test_a_missing_modem_port_is_a_clear_error(lab: Lab) -> None:
    since = lab.clock()
    lab.restart_with("/dev/pts/77")
    text = lab.wait_journal(r"modem\.port: no such device: /dev/pts/77", since=since)
    assert "Traceback" not in text
    lab.wait_journal(r"(?i)scheduled restart job|restart counter", since=since, timeout=20)  # Restart=on-failure


def test_a_port_outside_the_device_policy_names_deviceallow(lab: Lab) -> None:
    """A device the unit does not allow: DevicePolicy=closed refuses the open with EPERM.

    A pty cannot show it (systemd always allows char-pts), so the "port" is the container's
    /dev/net/tun behind a symlink outside /dev, which the generator does not turn into DeviceAllow=.
    """
    m = lab.m
    m.run("chmod", "0666", "/dev/net/tun")  # nothing but the device policy stands in the way
    m.run("ln", "-sf", "/dev/net/tun", "/run/lab/port")
    probe = m.run(
        "systemd-run", "--wait", "--pipe", "--quiet", "-p", "DevicePolicy=closed", "-p", "DynamicUser=yes",
        "/bin/sh", "-c", "exec 3< /dev/net/tun", check=False,
    )  # fmt: skip
    if probe.returncode == 0:
        # Seen on a Firecracker VM whose kernel has no cgroup BPF device filter: systemd accepts the
        # policy and cannot enforce it. The message itself is covered by tests/unit/test_serial_open.py.
        pytest.skip("this kernel does not enforce DevicePolicy= (a closed unit opened /dev/net/tun): no EPERM")
    since = lab.clock()
    lab.restart_with("/run/lab/port")
    status = lab.wait_status(r"DeviceAllow=/run/lab/port rw")
    assert status.startswith("degraded:") and "Operation not permitted" in status, status
    lab.wait_journal(r"DeviceAllow=/run/lab/port rw", since=since)


def test_upgrade_keeps_config_and_dropins_and_restarts(lab: Lab, tmp_path: Path) -> None:
    m = lab.m
    lab.restart_with(lab.pty)
    lab.wait_status(r"^bootstrapped until ")
    before = hashlib.sha256(m.path(CONFIG).read_bytes()).hexdigest()
    old_pid = m.show(UNIT, "MainPID")["MainPID"]
    # the same package with a higher version: what an upgrade through the repository looks like
    unpacked = tmp_path / "deb"
    subprocess.run(["dpkg-deb", "-R", str(lab.deb), str(unpacked)], check=True)
    control = unpacked / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: (.*)$", r"Version: \1+systest1", control.read_text(), flags=re.M))
    new_deb = m.path("/root/systest/mn-secd-upgrade.deb")
    subprocess.run(["dpkg-deb", "--build", "-Zxz", str(unpacked), str(new_deb)], check=True, capture_output=True)
    out = m.run("dpkg", "-i", "/root/systest/mn-secd-upgrade.deb", timeout=300)
    assert "neither enabled nor started" not in out.stdout + out.stderr  # that is for a first install
    assert m.run("dpkg-query", "-W", "-f=${Version}", "mn-secd").stdout.endswith("+systest1")
    assert hashlib.sha256(m.path(CONFIG).read_bytes()).hexdigest() == before
    assert m.path(LAB_DROPIN).exists()
    assert m.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    props = m.show(UNIT, "ActiveState", "MainPID")
    assert props["ActiveState"] == "active" and props["MainPID"] != old_pid, props  # restarted on the new code
    # The upgrade cost no bootstrap: the GBA_U session kept in StateDirectory= was resumed.
    assert lab.wait_status(r"^bootstrapped until ").endswith("; resumed from the last run)")
    assert json.loads(lab.key(NAF).stdout)["naf_fqdn"] == NAF


def test_remove_stops_and_disables(lab: Lab) -> None:
    m = lab.m
    m.run("dpkg", "-r", "mn-secd", timeout=300)
    assert m.run("systemctl", "is-active", UNIT, check=False).stdout.strip() in ("inactive", "unknown")
    assert not m.path("/etc/systemd/system/multi-user.target.wants/mn-secd.service").is_symlink()
    assert not m.path("/opt/mn-secd").exists()
    assert not m.path("/usr/bin/mn-secd").exists()
    assert m.path(CONFIG).exists()  # remove keeps the configuration
    assert "50-modem-port.conf" not in m.run("systemctl", "show", UNIT, "-p", "DropInPaths").stdout


def test_purge_removes_what_the_package_created(lab: Lab) -> None:
    m = lab.m
    assert m.path("/var/lib/private/mn-secd").exists()  # the StateDirectory= systemd made
    assert m.path(SESSION_KEY).exists()  # made by `mn-secd setup-sealing`
    m.run("dpkg", "--purge", "mn-secd", timeout=300)
    for gone in (CONFIG, "/var/lib/private/mn-secd", "/var/lib/mn-secd", "/lib/systemd/system/mn-secd.service"):
        assert not m.path(gone).exists() and not m.path(gone).is_symlink(), gone
    assert not m.path(SESSION_KEY).exists()  # the session-sealing key has nothing left to open
    assert m.run("dpkg-query", "-W", "mn-secd", check=False).returncode != 0
    # the operator's own files stay
    assert m.path(PSK_PATH).exists() and m.path(LAB_DROPIN).exists()

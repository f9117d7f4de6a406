"""``mn-secd doctor``: what stands between a new gateway and working GBA keys, one line per check.

The first hour with a new gateway goes into finding out which of a dozen things is wrong: the port,
its permissions, ModemManager, the modem, the SIM's PIN, a modem that will not pass AUTHENTICATE,
the BSF, the clock, the control socket. This command checks them in that order and prints, for each,
``ok``, ``warn``, ``fail`` or ``skip`` with the concrete fix; ``--json`` gives the same to tooling.
The exit status is 1 when any check fails.

It looks and never changes anything: no PIN is entered, nothing is written to the card, and no
AUTHENTICATE is sent (each spends a sequence number) unless ``--with-aka`` asks for one GBA_ME
bootstrap (one AUTHENTICATE in the 3G context, which writes nothing to the card). Ub is checked with
the protocol's own unauthenticated first request, whose answer is the BSF's 401 challenge: the BSF
fetches a vector, the card sees nothing. Run it as root to see every other process (as the service
user, only that user's processes are visible), and stop the daemon first to check the modem: two
programs on one AT port corrupt each other's answers, so the modem checks are skipped while the
daemon holds it.

The checks are a list of steps (:func:`steps`), each a coroutine on a :class:`Doctor`; a card
reached another way than through the modem's AT port brings its own steps in place of the modem's
(:func:`card_path_steps`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from mn_secd.card_identity import CardIdentity
from mn_secd.client.keys import KeyServiceClient
from mn_secd.commands.bootstrap import describe
from mn_secd.commands.check_config import DEFAULT_CONFIG
from mn_secd.commands.doctor_rules import (
    DEFAULT_SERVICE_GROUPS,
    UNIT,
    SessionFacts,
    Verdict,
    clock_verdict,
    device_allowed,
    driver_name,
    dropin_device_allow,
    group_name,
    session_verdict,
    systemctl_show,
    udp_port_users,
    unit_credentials,
    user_name,
)
from mn_secd.commands.setup_sealing import check_key
from mn_secd.config import Config, ControlConfig, GbaConfig, load_config, load_pin
from mn_secd.control.payloads import mask_impi
from mn_secd.control.registry import load_registry
from mn_secd.errors import (
    ConfigError,
    KeyServiceRefused,
    MnSecdError,
    SealingUnavailable,
    TransportUnavailable,
    UiccAbsent,
    UiccBusy,
)
from mn_secd.gba import digest
from mn_secd.gba.sealing import CREDSTORE, SESSION_KEY_CREDENTIAL
from mn_secd.gba.session import bootstrap
from mn_secd.gba.session_store import RECORD_FILE, SEALED_FILE
from mn_secd.gba.ub import UbClient, UbRequest, tls_verification, user_agent
from mn_secd.naf_keys import GbaMode, GbaPolicy
from mn_secd.nai import bsf_url
from mn_secd.secret import SecretBytes
from mn_secd.systemd_generator import DROPIN as GENERATOR_DROPIN
from mn_secd.systemd_generator import SESSION_KEY_DROPIN
from mn_secd.uicc import at, files
from mn_secd.uicc.card import open_card, read_pin_counters, read_sim_state
from mn_secd.uicc.channel import CardChannel
from mn_secd.uicc.holders import PortHolder, port_holders
from mn_secd.uicc.options import ModemConfig, TransportChoice
from mn_secd.uicc.pin import READY_STATES, SIM_PIN, SIM_PUK, PinKeeper
from mn_secd.uicc.reader import ReaderSource, survey_readers
from mn_secd.uicc.serial import CLI_SYNC_SECONDS, AtPort
from mn_secd.uicc.transport import ApduTransport, PathFinding, open_transport

#: systemd's exit status when a unit's credentials cannot be set up (systemd.exec(5), 243/CREDENTIALS).
EXIT_CREDENTIALS = 243
#: Seconds per modem command in the doctor (a silent modem must not hold it up for long).
COMMAND_TIMEOUT = 3.0
HTTP_TIMEOUT = 5.0
DTLS_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: what was checked, how it went, and what to do about it."""

    name: str
    verdict: Verdict
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.verdict.value:<4}  {self.name:<9}  {self.detail}"
        return text + (f" -- fix: {self.fix}" if self.fix else "")


# --- the doctor ----------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What to check: from the configuration file, or from ``--port`` and ``--bsf``."""

    config_path: str | None
    port: str | None
    bsf_url: str | None
    with_aka: bool
    config: Config | None = None
    modem: ModemConfig | None = None
    gba: GbaConfig = field(default_factory=GbaConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    credstore: Path = CREDSTORE  # where mn-secd setup-sealing puts the session-sealing key


@dataclass
class Doctor:
    """The checks so far, and what earlier checks learnt for the later ones."""

    settings: Settings
    checks: list[Check] = field(default_factory=list)
    port_usable: bool = False  # the port exists and nobody else talks on it
    daemon_holds_port: bool = False
    at_port: AtPort | None = None  # open while the modem checks run
    sim_ready: bool = False
    transport: ApduTransport | None = None
    identity: CardIdentity | None = None
    bsf_date: datetime | None = None

    def add(self, name: str, verdict: Verdict, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, verdict, detail, fix))

    @property
    def failed(self) -> bool:
        return any(c.verdict is Verdict.FAIL for c in self.checks)


async def check_config(doc: Doctor) -> None:
    """The configuration, and the PSK and PIN files it names as the daemon will read them.

    Under systemd those are usually the unit's credentials (``LoadCredential=``, or encrypted),
    which exist only inside the unit: then the file is parsed here against stand-ins named as the
    unit's credentials, and checked in full by ``mn-secd check-config`` in a transient unit given
    the unit's own credentials by systemd (as root; nothing of them reaches this process).
    """
    s = doc.settings
    if s.config_path is None:
        doc.add("config", Verdict.SKIP, f"no --config: checking --port {s.port}")
        return
    credentials = None
    if not os.environ.get("CREDENTIALS_DIRECTORY") and os.geteuid() == 0:
        credentials = await asyncio.to_thread(unit_credentials)
    try:
        if credentials:
            with _stand_ins(name for name, _, _ in credentials):
                config = load_config(s.config_path)
            await asyncio.to_thread(_check_in_unit_sandbox, s.config_path, credentials)
        else:
            config = load_config(s.config_path)
            load_registry(config.aes, source=str(config.path))
            pin = load_pin(config)
            if pin is not None:
                pin.wipe()
    except ConfigError as exc:
        doc.add("config", Verdict.FAIL, str(exc), "correct that key; `mn-secd check-config` re-checks the file")
        return
    except UnitCheckFailed as exc:
        doc.add("config", Verdict.FAIL, str(exc), exc.fix)
        return
    s.config, s.gba, s.control = config, config.gba, config.control
    s.modem = replace(config.modem, port=s.port or config.modem.port)
    s.bsf_url = s.bsf_url or config.gba.bsf_url
    pin_note = ", a PIN file" if config.pin_file is not None else ""
    n = len(credentials or ())
    where = f"; checked with {UNIT}'s {n} credential{'' if n == 1 else 's'}" if n else ""
    doc.add("config", Verdict.OK, f"{config.path} is valid ({len(config.aes)} AEs{pin_note}{where})")


class UnitCheckFailed(Exception):
    """``check-config`` in the transient unit refused the configuration, or systemd could not give the
    transient unit the service's credentials (exit 243/CREDENTIALS); ``fix`` says what to do."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


@contextlib.contextmanager
def _stand_ins(names: Iterable[str]) -> Iterator[None]:
    """``$CREDENTIALS_DIRECTORY`` with a placeholder file (0600, not a secret) per credential name, for
    the length of a parse that only looks for those files."""
    with tempfile.TemporaryDirectory(prefix="mn-secd-doctor-") as directory:
        for name in names:
            if "/" not in name and name not in (".", ".."):
                fd = os.open(Path(directory) / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, b"stand-in")
                os.close(fd)
        saved = os.environ.get("CREDENTIALS_DIRECTORY")
        os.environ["CREDENTIALS_DIRECTORY"] = directory
        try:
            yield
        finally:
            if saved is None:
                del os.environ["CREDENTIALS_DIRECTORY"]
            else:
                os.environ["CREDENTIALS_DIRECTORY"] = saved


def _check_in_unit_sandbox(config_path: str, credentials: list[tuple[str, str, bool]]) -> None:
    """``mn-secd check-config`` as the service's dynamic user, with the service's credentials."""
    argv = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", "-p", "DynamicUser=yes"]
    for name, source, encrypted in credentials:
        argv += ["-p", f"LoadCredential{'Encrypted' if encrypted else ''}={name}:{source}"]
    argv += ["--", sys.executable, "-m", "mn_secd", "check-config", "--config", os.path.abspath(config_path)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UnitCheckFailed(f"could not check the configuration in a transient unit: {exc}", "") from None
    if done.returncode == EXIT_CREDENTIALS:
        raise UnitCheckFailed(
            f"systemd cannot load {UNIT}'s credentials ({', '.join(n for n, _, _ in credentials)}): a "
            "LoadCredential= file is missing, or an encrypted one does not open; the unit would not start",
            "journalctl -u mn-secd shows what systemd said at the last start",
        )
    if done.returncode != 0:
        line = next((x for x in reversed(done.stderr.splitlines()) if x.strip()), f"exit status {done.returncode}")
        raise UnitCheckFailed(
            f"with {UNIT}'s credentials: {line.removeprefix('mn-secd check-config: ')}",
            "correct that key or credential; `mn-secd check-config` re-checks the file",
        )


def _service_groups() -> tuple[str, ...]:
    shown = systemctl_show("SupplementaryGroups")
    groups = tuple((shown or {}).get("SupplementaryGroups", "").split())
    return groups or DEFAULT_SERVICE_GROUPS


async def check_port(doc: Doctor) -> None:
    modem = doc.settings.modem
    if modem is None or modem.port is None:
        doc.add("port", Verdict.SKIP, "no port to check (give --config FILE or --port PATH)")
        return
    path = modem.port
    try:
        st = os.stat(path)
    except OSError as exc:
        doc.add(
            "port",
            Verdict.FAIL,
            f"{path}: {exc.strerror}",
            "plug the modem in and find its AT port (ls -l /dev/serial/by-id/); set [modem] port",
        )
        return
    if not stat.S_ISCHR(st.st_mode):
        doc.add("port", Verdict.FAIL, f"{path} is not a character device", "point [modem] port at the modem's tty")
        return
    owner, group = user_name(st.st_uid), group_name(st.st_gid)
    real = os.path.realpath(path)
    shown = path if real == path else f"{path} -> {real}"
    doc.add("port", Verdict.OK, f"{shown}: character device, {owner}:{group}, mode {stat.S_IMODE(st.st_mode):04o}")
    doc.port_usable = True
    _check_access(doc, path, st)
    _check_device_allow(doc, path, st)


def _check_access(doc: Doctor, path: str, st: os.stat_result) -> None:
    if os.geteuid() != 0:
        user = user_name(os.geteuid())
        if os.access(path, os.R_OK | os.W_OK):
            doc.add("access", Verdict.OK, f"this user ({user}) can open it")
        else:
            group = group_name(st.st_gid)
            doc.add("access", Verdict.FAIL, f"this user ({user}) cannot open it", f"add {user} to group {group}")
        return
    groups = _service_groups()
    group = group_name(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    if (group in groups and mode & 0o060 == 0o060) or mode & 0o006 == 0o006:
        doc.add("access", Verdict.OK, f"the service user (groups {', '.join(groups)}) can open it")
    else:
        doc.add(
            "access",
            Verdict.FAIL,
            f"the service user (groups {', '.join(groups)}) cannot open it ({group}, mode {mode:04o})",
            f'give the port GROUP="{groups[0]}", MODE="0660" in a udev rule (udev/90-mn-secd-modem.rules)',
        )


def _check_device_allow(doc: Doctor, path: str, st: os.stat_result) -> None:
    shown = systemctl_show("LoadState", "DevicePolicy", "DeviceAllow", "DropInPaths")
    if shown is None:
        doc.add("systemd", Verdict.SKIP, "systemd is not running here: DeviceAllow= not checked")
        return
    if shown.get("LoadState") != "loaded":
        doc.add(
            "systemd", Verdict.WARN, f"{UNIT} is not installed", "install the package or the unit (docs/INSTALL.md)"
        )
        return
    policy = shown.get("DevicePolicy", "auto")
    allow = [line for line in shown.get("DeviceAllow", "").splitlines() if line.strip()]
    major = driver_name(st.st_rdev)
    dropins = shown.get("DropInPaths", "").split()
    generated = next((d for d in dropins if d.endswith(f"/{UNIT}.d/{GENERATOR_DROPIN}")), None)
    configured = doc.settings.config.modem.port if doc.settings.config is not None else None
    written_for = dropin_device_allow(Path(generated)) if generated is not None else []
    if configured is not None and written_for and not device_allowed(configured, written_for, major_name=None):
        doc.add(
            "systemd",
            Verdict.FAIL,
            f"mn-secd-generator's {generated} allows {'; '.join(written_for)}, but [modem] port is {configured}: "
            "systemd has not read the configuration since the port changed",
            "systemctl daemon-reload (the generator writes its drop-in from [modem] port), then "
            "systemctl restart mn-secd",
        )
        return
    if policy == "auto" or device_allowed(path, allow, major_name=major):
        sources = [
            ("mn-secd-generator's " if d == generated else "") + d
            for d in dropins
            if device_allowed(path, dropin_device_allow(Path(d)), major_name=major)
        ]
        source = f"; DeviceAllow= from {', '.join(sources)}" if sources and policy != "auto" else ""
        doc.add("systemd", Verdict.OK, f"{UNIT} may open {path} (DevicePolicy={policy}{source})")
    else:
        doc.add(
            "systemd",
            Verdict.FAIL,
            f"{UNIT}'s DeviceAllow= ({'; '.join(allow) or 'none'}) does not cover {path}",
            f"add 'DeviceAllow={path} rw' in a drop-in (systemctl edit mn-secd), or let mn-secd-generator "
            "write it from [modem] port",
        )


async def check_holders(doc: Doctor) -> None:
    modem = doc.settings.modem
    if modem is None or modem.port is None or not doc.port_usable:
        doc.add("holders", Verdict.SKIP, "no port")
        return
    holders: list[PortHolder] = await asyncio.to_thread(port_holders, modem.port)
    ours = [h for h in holders if h.is_mn_secd]
    others = [h for h in holders if not h.is_mn_secd]
    seen = "" if os.geteuid() == 0 else " (as this user; run as root to see every process)"
    if others:
        doc.port_usable = False
        doc.add(
            "holders",
            Verdict.FAIL,
            "held by " + ", ".join(h.describe() for h in others),
            others[0].advice,
        )
    elif ours:
        doc.port_usable, doc.daemon_holds_port = False, True
        doc.add(
            "holders",
            Verdict.WARN,
            f"mn-secd runs on this port ({', '.join(h.describe() for h in ours)}): modem checks skipped",
            "stop it to check the modem (systemctl stop mn-secd); `mn-secd status` shows what it sees",
        )
    else:
        doc.add("holders", Verdict.OK, f"no other process holds it{seen}")


async def check_modem(doc: Doctor) -> None:
    modem = doc.settings.modem
    if modem is None or modem.port is None or not doc.port_usable:
        doc.add("modem", Verdict.SKIP, "the port is not free to use")
        return
    port = AtPort(
        modem.port,
        baud=modem.baud,
        command_timeout=min(modem.command_timeout, COMMAND_TIMEOUT),
        sync_for=CLI_SYNC_SECONDS,  # a modem a few seconds after power-up is waited for, not failed
    )
    try:
        await port.open()
    except MnSecdError as exc:
        doc.add(
            "modem",
            Verdict.FAIL,
            f"no answer to AT: {exc}",
            "check that this is the modem's AT port (not its NMEA, diagnostic or QMI port) and the baud rate",
        )
        return
    doc.at_port = port
    try:
        lines = await port.command(at.Command("ATI", bare=_ANY_LINE))
    except MnSecdError:
        lines = []
    name = " ".join(line.strip() for line in lines[:2]) or "(no ATI text)"
    doc.add("modem", Verdict.OK, f"answers AT: {name}")


_ANY_LINE = re.compile(r".+")


async def check_sim(doc: Doctor) -> None:
    port = doc.at_port
    if port is None:
        doc.add("sim", Verdict.SKIP, "the modem is not reachable")
        return
    try:
        state = await read_sim_state(port)
    except UiccAbsent as exc:
        doc.add("sim", Verdict.FAIL, str(exc), "insert the SIM (with the modem off), or check its tray")
        return
    except UiccBusy as exc:
        doc.add("sim", Verdict.WARN, str(exc), "run the doctor again in a few seconds")
        return
    except MnSecdError as exc:
        doc.add("sim", Verdict.FAIL, f"AT+CPIN? failed: {exc}", "see the modem's manual for the error")
        return
    if state in READY_STATES:
        doc.sim_ready = True
        doc.add("sim", Verdict.OK, f"+CPIN: {state}")
        return
    counters = await read_pin_counters(port)
    has_pin_file = doc.settings.config is not None and doc.settings.config.pin_file is not None
    refusal = PinKeeper(_placeholder_pin() if has_pin_file else None).decide(state, counters)
    left = f"{counters.pin} PIN attempts left ({counters.source})" if counters.pin is not None else "attempts unknown"
    if refusal is None and state == SIM_PIN:
        doc.add("sim", Verdict.WARN, f"+CPIN: {state}, {left}: the daemon will enter the PIN from pin_file once")
        return
    assert refusal is not None
    detail = f"+CPIN: {state}" + (f", {left}" if state != SIM_PUK else "") + f": {refusal}"
    doc.add("sim", Verdict.FAIL, detail, refusal.remedy or "see docs/MODEMS.md")


def _placeholder_pin() -> SecretBytes:
    return SecretBytes(b"0000")  # only to ask "would the daemon enter it?": never sent anywhere


async def check_transport(doc: Doctor) -> None:
    """Both ways to the card, each probed on its own (and closed again), then the daemon's choice."""
    port, modem = doc.at_port, doc.settings.modem
    if port is None or modem is None or not doc.sim_ready:
        doc.add("transport", Verdict.SKIP, "no SIM ready to probe")
        return
    findings: list[PathFinding] = []
    try:
        for path in (TransportChoice.CGLA, TransportChoice.CSIM):
            with contextlib.suppress(TransportUnavailable):
                await (await open_transport(port, path, files.USIM_AID_PREFIX, findings=findings)).close()
        doc.transport = await open_transport(port, modem.transport, files.USIM_AID_PREFIX)
    except TransportUnavailable as exc:
        tried = "; ".join(f.describe() for f in findings)
        doc.add(
            "transport",
            Verdict.FAIL,
            f"{exc} [probed: {tried}]",
            'no GBA through this modem\'s AT port: with transport = "auto" the daemon takes any path that '
            "works; otherwise a modem with AT+CGLA or an unrestricted AT+CSIM is needed",
        )
        return
    except MnSecdError as exc:
        doc.add("transport", Verdict.FAIL, f"probe failed: {exc.kind}: {exc}", "see docs/MODEMS.md")
        return
    tried = "; ".join(f.describe() for f in findings)
    doc.add("transport", Verdict.OK, f"the daemon would use {doc.transport.name} ({tried})")


async def check_card(doc: Doctor) -> None:
    port, modem, transport = doc.at_port, doc.settings.modem, doc.transport
    if port is None or modem is None or transport is None:
        doc.add("card", Verdict.SKIP, "no transport to the card")
        return

    async def imsi() -> str:
        return at.parse_cimi(await port.command(at.cimi()))

    try:
        identity = await CardChannel(transport).read_identity(modem.application, imsi_source=imsi)
    except MnSecdError as exc:
        doc.add("card", Verdict.FAIL, f"{exc.kind}: {exc}", "see docs/UICC.md")
        return
    doc.identity = identity
    doc.add("card", Verdict.OK, _card_summary(identity))


def _card_summary(identity: CardIdentity) -> str:
    apps = ", ".join(f"{app.value} {aid[:7].hex().upper()}..." for app, aid in identity.applications)
    return (
        f"{apps}; using {identity.application.value}; IMPI {mask_impi(identity.impi)}; "
        f"GBA_U {'yes' if identity.gba_u else 'no (GBA_ME)'}"
    )


def _bsf_url(doc: Doctor) -> str | None:
    if doc.settings.bsf_url:
        return doc.settings.bsf_url
    if doc.identity is not None:
        return bsf_url(doc.identity.imsi, doc.identity.mnc_length)
    return None


async def check_bsf_dns(doc: Doctor) -> None:
    url = _bsf_url(doc)
    if url is None:
        doc.add("bsf-dns", Verdict.SKIP, "no BSF URL (give --bsf URL, or let the card's IMSI name it)")
        return
    host = urlsplit(url).hostname or ""
    try:
        async with asyncio.timeout(HTTP_TIMEOUT):
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        doc.add(
            "bsf-dns",
            Verdict.FAIL,
            f"{host} does not resolve ({getattr(exc, 'strerror', None) or 'timeout'})",
            "check the gateway's DNS (resolvectl status) and the data connection, or set [gba] bsf_url",
        )
        return
    addresses = sorted({str(info[4][0]) for info in infos})
    doc.add("bsf-dns", Verdict.OK, f"{host} resolves to {', '.join(addresses[:3])}")


async def check_bsf(doc: Doctor) -> None:
    url = _bsf_url(doc)
    if url is None or any(c.name == "bsf-dns" and c.verdict is Verdict.FAIL for c in doc.checks):
        doc.add("bsf", Verdict.SKIP, "no BSF to ask")
        return
    parts = urlsplit(url)
    impi = doc.identity.impi if doc.identity is not None else "doctor@mn-secd.invalid"
    request = UbRequest(
        digest.initial_authorization(impi, parts.hostname or "", parts.path or "/"), user_agent(GbaMode.GBA_ME)
    )
    try:
        async with httpx.AsyncClient(
            timeout=HTTP_TIMEOUT, follow_redirects=False, trust_env=False, verify=tls_verification(url)
        ) as client:
            response = await client.get(url, headers=request.headers())
    except httpx.HTTPError as exc:
        doc.add(
            "bsf",
            Verdict.FAIL,
            f"{url}: {type(exc).__name__}",
            "check that the BSF URL and port are right and reachable",
        )
        return
    with contextlib.suppress(TypeError, ValueError):
        doc.bsf_date = parsedate_to_datetime(response.headers.get("date", "")).astimezone(UTC)
    if response.status_code != 401 and doc.identity is None:
        doc.add(
            "bsf",
            Verdict.WARN,
            f"{url} answers HTTP ({response.status_code} {response.reason_phrase}) for a placeholder IMPI: "
            "reachable, but the challenge was not checked (the card was not read)",
            "run the doctor with the card readable (stop the daemon) to see the BSF's challenge for this IMPI",
        )
        return
    if response.status_code != 401:
        doc.add(
            "bsf",
            Verdict.FAIL,
            f"{url} answered {response.status_code} {response.reason_phrase} to Ub's first request, not 401",
            "check the URL: a BSF answers the first Ub request with a Digest AKA challenge (TS 24.109 4.4.2)",
        )
        return
    try:
        challenges = digest.parse_challenges(response.headers.get_list("www-authenticate"))
    except MnSecdError as exc:
        doc.add("bsf", Verdict.FAIL, f"{url}: unreadable WWW-Authenticate ({exc})", "ask the BSF's operator")
        return
    offered = sorted({c.algorithm for c in challenges})
    aka = [a for a in offered if a.upper().startswith("AKAV")]
    if not aka:
        doc.add(
            "bsf",
            Verdict.FAIL,
            f"401 without a Digest AKA challenge (offers: {', '.join(offered) or 'none'})",
            "this is not a BSF",
        )
        return
    unknown = "" if doc.identity is not None else " (for a placeholder IMPI: the card was not read)"
    doc.add("bsf", Verdict.OK, f"{url} answers Ub with a 401 challenge: {', '.join(aka)}{unknown}")


async def check_clock(doc: Doctor) -> None:
    verdict, detail = clock_verdict(datetime.now(UTC), doc.bsf_date)
    fix = (
        "" if verdict is Verdict.OK else "synchronise the clock (timedatectl set-ntp true; check NTP reaches a server)"
    )
    doc.add("clock", verdict, detail, fix)


async def check_control(doc: Doctor) -> None:
    control = doc.settings.control
    for address in control.addresses:
        await _check_control_address(doc, address, control.port)


async def _check_control_address(doc: Doctor, address: str, port: int) -> None:
    where = f"{'[' + address + ']' if ':' in address else address}:{port}"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((address, port))
    except OSError as exc:
        in_use = exc.errno == errno.EADDRINUSE
    else:
        doc.add("control", Verdict.OK, f"{where} is free for the daemon")
        return
    finally:
        probe.close()
    if not in_use:
        doc.add(
            "control",
            Verdict.FAIL,
            f"{where}: cannot listen there",
            "set [control] addresses to local addresses this host has",
        )
        return
    users = ", ".join(f"{name} (pid {pid})" for pid, name in udp_port_users(port)) or "a process not visible here"
    if await _mn_secd_answers(address, port):
        doc.add("control", Verdict.OK, f"{where}: mn-secd answers there ({users})")
    else:
        doc.add(
            "control",
            Verdict.FAIL,
            f"{where} is taken by something else: {users}",
            "stop that program, or set another [control] port",
        )


async def _mn_secd_answers(address: str, port: int) -> bool:
    """A DTLS-PSK handshake with an identity no AE has: mn-secd refuses it at once; others stay silent."""
    client = KeyServiceClient("mn-secd-doctor", os.urandom(16), address, port, handshake_timeout=DTLS_TIMEOUT)
    try:
        async with asyncio.timeout(DTLS_TIMEOUT + 2):
            await client.status()
    except KeyServiceRefused:
        return True
    except (MnSecdError, TimeoutError, OSError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    return True


async def check_session(doc: Doctor) -> None:
    """Where sessions are kept across restarts, and with persist_session the session-sealing key."""
    s = doc.settings
    if s.config is None:
        doc.add("session", Verdict.SKIP, "no configuration to check")
        return
    shown = systemctl_show("LoadState", "StateDirectory", "DropInPaths")
    unit = shown if shown is not None and shown.get("LoadState") == "loaded" else None
    facts = SessionFacts(s.gba.persist_session, None, key_path=s.credstore / SESSION_KEY_CREDENTIAL)
    if s.gba.state_directory is not None:
        facts = replace(facts, directory=s.gba.state_directory, source="[gba] state_directory")
    elif os.environ.get("STATE_DIRECTORY"):
        facts = replace(facts, directory=s.gba.state_path(os.environ), source="$STATE_DIRECTORY")
    elif unit is not None and unit.get("StateDirectory"):
        facts = replace(facts, directory=Path("/var/lib") / unit["StateDirectory"].split()[0], source="StateDirectory=")
    if facts.directory is not None:
        problem, kept = _state_directory_facts(facts.directory, by_systemd=facts.source == "StateDirectory=")
        facts = replace(facts, directory_problem=problem, kept=kept)
    if s.gba.persist_session:
        try:
            present: bool | None = facts.key_path.is_file()
        except PermissionError:
            present = None
        facts = replace(facts, key_present=present)
        if present and os.geteuid() == 0:
            try:
                await asyncio.to_thread(check_key, facts.key_path)
            except SealingUnavailable as exc:
                facts = replace(facts, key_problem=str(exc))
        if unit is not None:
            facts = replace(
                facts,
                unit_loads_key=any(d.endswith(f"/{SESSION_KEY_DROPIN}") for d in unit.get("DropInPaths", "").split()),
            )
    verdict, detail, fix = session_verdict(facts)
    doc.add("session", verdict, detail, fix)


def _state_directory_facts(path: Path, *, by_systemd: bool) -> tuple[str | None, str]:
    """(why the daemon could not keep sessions in ``path``, what is kept there now)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if by_systemd:
            return None, "nothing yet (systemd makes it when the unit starts)"
        if not os.access(path.parent, os.W_OK):
            return f"missing, and {path.parent} is not writable by this user", ""
        return None, "nothing yet (the daemon makes it, mode 0700)"
    except OSError as exc:
        return f"cannot be looked at ({exc.strerror})", ""
    if not stat.S_ISDIR(info.st_mode):
        return "not a directory", ""
    if info.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}), so the daemon refuses it", ""
    if not by_systemd and not os.access(path, os.W_OK):
        return "not writable by this user", ""
    try:
        names = set(os.listdir(path))
    except PermissionError:
        return None, "what this user cannot see (run as root)"
    files = ((RECORD_FILE, "a GBA_U session record"), (SEALED_FILE, "a sealed GBA_ME session"))
    return None, " and ".join(what for name, what in files if name in names) or "no session"


async def check_aka(doc: Doctor) -> None:
    if not doc.settings.with_aka:
        return
    modem = doc.settings.modem
    if modem is None or doc.identity is None:
        doc.add("aka", Verdict.SKIP, "the card was not read")
        return
    await release_port(doc)
    try:
        async with UbClient(_bsf_url(doc), timeout=HTTP_TIMEOUT, retries=0) as ub:
            card = await open_card(modem)
            try:
                session = await bootstrap(card, ub, GbaPolicy.GBA_ME_ONLY)
            finally:
                await card.close()
    except (MnSecdError, ValueError) as exc:
        doc.add(
            "aka", Verdict.FAIL, f"{getattr(exc, 'kind', 'error')}: {exc}", "the line above names the side at fault"
        )
        return
    try:
        summary = describe(session, time.time()).replace("\n", "; ")
    finally:
        session.wipe()
    doc.add("aka", Verdict.OK, f"one GBA_ME bootstrap: {summary.replace(session.btid, '#' + session.btid_hash)}")


async def release_port(doc: Doctor) -> None:
    """Close the transport and the AT port the modem checks opened (nothing to report)."""
    transport, doc.transport = doc.transport, None
    if transport is not None:
        await transport.close()
    port, doc.at_port = doc.at_port, None
    if port is not None:
        await port.close()


Step = Callable[[Doctor], Awaitable[None]]

#: The card's path through the modem's AT port: the port (with the service user's access and
#: DeviceAllow=), who else holds it, the modem, the SIM, the transport, the card.
MODEM_STEPS: tuple[Step, ...] = (check_port, check_holders, check_modem, check_sim, check_transport, check_card)


async def check_reader(doc: Doctor) -> None:
    """pcscd, the reader ``[modem] reader`` names, and a card in it (nothing is connected)."""
    modem = doc.settings.modem
    assert modem is not None and modem.reader is not None
    try:
        survey = await survey_readers(modem.reader)
    except MnSecdError as exc:
        fix = "install pcscd and pyscard (python3-pyscard, or the [pcsc] extra) and start pcscd"
        doc.add("reader", Verdict.FAIL, f"{exc.kind}: {exc}", fix)
        return
    known = ", ".join(repr(r.name) for r in survey.readers) or "none"
    if survey.chosen is None:
        detail = f"{survey.problem or 'no reader matches'} (readers: {known})"
        doc.add("reader", Verdict.FAIL, detail, "set [modem] reader to a part of one reader's name")
    elif survey.problem is not None:
        doc.add("reader", Verdict.FAIL, str(survey.problem), "put the SIM into the reader")
    else:
        doc.add("reader", Verdict.OK, f"{survey.chosen.name!r} holds a card (ATR {survey.chosen.atr.hex().upper()})")
        doc.sim_ready = True


async def check_reader_card(doc: Doctor) -> None:
    """The card in the reader, read as the daemon reads it (exclusive access for a moment)."""
    modem = doc.settings.modem
    if modem is None or not doc.sim_ready:
        doc.add("card", Verdict.SKIP, "no card in a reader")
        return
    source = ReaderSource(modem)
    try:
        await source.open()
        transport = await source.open_transport()
        try:
            identity = await CardChannel(transport).read_identity(modem.application)
        finally:
            await transport.close()
    except MnSecdError as exc:
        doc.add("card", Verdict.FAIL, f"{exc.kind}: {exc}", "see docs/PCSC.md")
        return
    finally:
        await source.close()
    doc.identity = identity
    doc.add("card", Verdict.OK, f"{_card_summary(identity)}; over {transport.name}")


#: The card in a PC/SC reader: pcscd and the reader, then the card over its transport.
READER_STEPS: tuple[Step, ...] = (check_reader, check_reader_card)


def card_path_steps(settings: Settings) -> tuple[Step, ...]:
    """The checks for the way the daemon reaches the card: the modem's AT port, or with
    ``[modem] transport = "pcsc"`` a PC/SC reader."""
    if settings.modem is not None and settings.modem.uses_reader:
        return READER_STEPS
    return MODEM_STEPS


def steps(settings: Settings) -> tuple[Step, ...]:
    """Every check after the configuration's (which says how the card is reached), in the order an
    operator meets the problems on a new gateway."""
    return (
        *card_path_steps(settings),
        release_port,  # the modem is done with; --with-aka opens it its own way
        check_bsf_dns,
        check_bsf,
        check_clock,
        check_control,
        check_session,
        check_aka,
    )


async def examine(settings: Settings) -> Doctor:
    doc = Doctor(settings)
    try:
        await check_config(doc)
        for step in steps(settings):
            await step(doc)
    finally:
        await release_port(doc)
    return doc


# --- the command ---------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.description = (
        "Check, in order, everything the daemon needs on this gateway and print one line per check "
        "(ok / warn / fail / skip) with the fix. Never enters a PIN, never writes to the card, and "
        "sends no AUTHENTICATE unless --with-aka. Exit status 1 if any check fails."
    )
    parser.add_argument("--config", help=f"the daemon's configuration (e.g. {DEFAULT_CONFIG})")
    parser.add_argument("--port", help="the modem's AT port (overrides the config)")
    parser.add_argument("--bsf", metavar="URL", help="the BSF's URL (overrides the config; default: from the IMSI)")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    parser.add_argument(
        "--with-aka", action="store_true", help="also run one GBA_ME bootstrap (one AUTHENTICATE on the card)"
    )
    parser.set_defaults(handler=run)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.config is None and args.port is None:
        raise ConfigError("(command line)", "--config", "give --config FILE, or --port PATH (and usually --bsf URL)")
    modem = ModemConfig(args.port) if args.port is not None else None
    return Settings(args.config, args.port, args.bsf, args.with_aka, modem=modem)


def run(args: argparse.Namespace) -> int:
    doc = asyncio.run(examine(settings_from(args)))
    if args.json:
        checks = [{"check": c.name, "status": c.verdict.value, "detail": c.detail, "fix": c.fix} for c in doc.checks]
        report = {"ok": not doc.failed, "checks": checks}
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for check in doc.checks:
            print(check.line())
    return 1 if doc.failed else 0

"""The daemon's configuration: one TOML file, validated up front, with errors that name the key.

An operator editing ``/etc/mn-secd/mn-secd.toml`` on a gateway gets exactly one line back when
something is wrong (``mn-secd.toml: gba.http_timeout: expected a number, got "soon"``), so every
check here raises :class:`~mn_secd.errors.ConfigError` with the file and the dotted key. Unknown
keys are errors, not warnings: a misspelt ``refresh_margn`` silently falling back to the default is
exactly the kind of mistake that only shows up months later.

Secrets never live in this file. Each AE's pre-shared key is in its own file, and so is the SIM
PIN (``[modem] pin_file``, optional), found in ``$CREDENTIALS_DIRECTORY`` first (systemd
``LoadCredential=``) and then next to the config file, and refused when anyone else could read or
replace it (:mod:`mn_secd.control.pskfile`). This module checks where such a file is and who may
read it; the key service (:mod:`mn_secd.control.registry`) reads a PSK file's contents,
:func:`load_pin` the PIN's.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mn_secd.control import pskfile
from mn_secd.errors import ConfigError, InvalidNafId, PcscUnavailable, UnsupportedUaProtocol
from mn_secd.gba.planner import BootstrapTiming, Span
from mn_secd.naf_keys import GbaPolicy
from mn_secd.secret import SecretBytes
from mn_secd.ua import UaId, normalise_fqdn
from mn_secd.uicc.options import ApplicationChoice, ModemConfig, TransportChoice

LOG_LEVELS = ("debug", "info", "warning", "error")
#: The [modem] keys a file may set; ModemConfig's polling and reopening pace keep their defaults.
MODEM_KEYS = ("port", "baud", "transport", "application", "command_timeout", "reader", "pin_file")
#: A share of the key lifetime in the configuration: "33%", "12.5 %".
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")
#: Used when an ``[[ae]]`` entry has no ``ua`` key: oneM2M's mandatory DTLS suite.
DEFAULT_UA = ("dtls-psk",)


_TIMING = BootstrapTiming()


@dataclass(frozen=True)
class GbaConfig:
    mode: GbaPolicy = GbaPolicy.AUTO
    bsf_url: str | None = None  # None: derived from the IMSI (bsf.mncXXX.mccYYY.pub.3gppnetwork.org)
    refresh_margin: Span = _TIMING.refresh_margin
    refresh_jitter: Span = _TIMING.refresh_jitter
    retry_interval: Span = _TIMING.retry_interval
    max_retry_interval: float = _TIMING.max_retry_interval
    min_forced_interval: float = _TIMING.min_forced_interval
    http_timeout: float = 10.0  # the budget of one bootstrap attempt at the BSF, retries included
    retries: int = 3
    require_rspauth: bool = False  # refuse a 200 OK without rspauth (a wrong one is always refused)
    # Session continuity across restarts (README "Session continuity", docs/SESSIONS.md).
    start_jitter: float = _TIMING.start_jitter
    persist_session: bool = False  # keep a GBA_ME session (sealed under the session-sealing key) for the next start
    state_directory: Path | None = None  # None: $STATE_DIRECTORY (systemd's StateDirectory=)

    def timing(self) -> BootstrapTiming:
        """The keystore's bootstrap timing from this section (the rest keeps the planner's defaults)."""
        return BootstrapTiming(
            refresh_margin=self.refresh_margin,
            refresh_jitter=self.refresh_jitter,
            retry_interval=self.retry_interval,
            max_retry_interval=self.max_retry_interval,
            min_forced_interval=self.min_forced_interval,
            start_jitter=self.start_jitter,
        )

    def state_path(self, environ: Mapping[str, str]) -> Path | None:
        """Where sessions are kept: ``state_directory``, else systemd's ``$STATE_DIRECTORY`` (its first
        entry), else nowhere."""
        if self.state_directory is not None:
            return self.state_directory
        first = environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(first) if first else None


@dataclass(frozen=True)
class ControlConfig:
    addresses: tuple[str, ...] = ("127.0.0.1", "::1")
    port: int = 5684
    max_peers: int = 256  # established DTLS sessions per address
    idle_timeout: float = 300.0
    max_handshakes: int = 256  # DTLS handshakes in progress per address (cookie verified)
    max_observations: int = 8  # observations of /key per AE


@dataclass(frozen=True)
class AeConfig:
    identity: str  # the DTLS PSK identity the AE presents
    psk_file: Path  # resolved: $CREDENTIALS_DIRECTORY/<name>, else relative to the config file
    naf: tuple[str, ...]  # normalised FQDNs, or "*.domain" wildcards
    ua: tuple[str, ...]  # Ua security protocol ids as written (hex or a named form), all parseable
    may_force_bootstrap: bool = False


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    path: Path
    modem: ModemConfig
    gba: GbaConfig
    control: ControlConfig
    aes: tuple[AeConfig, ...]
    log: LogConfig
    pin_file: Path | None = None  # [modem] pin_file, resolved like an AE's psk_file


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(file, "(file)", f"cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(file, "(file)", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "(syntax)", f"not valid TOML: {exc}") from None


def load_gba_config(path: str | os.PathLike[str]) -> GbaConfig:
    """Only the ``[gba]`` section of ``path``, validated: for commands run beside the unit (``forget``,
    ``setup-sealing``), where the PSK and PIN files the rest names are the unit's credentials."""
    return _gba(_Table(str(path), "", _read_toml(path)).table("gba"))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate ``path``; raises :class:`ConfigError` naming the first key at fault."""
    cfg_path = Path(path)
    file = str(path)
    data = _read_toml(path)
    top = _Table(file, "", data)
    config_dir = cfg_path.absolute().parent
    modem_table = top.table("modem", required=True)
    pin_file = _pin_file(modem_table, config_dir)
    modem = _modem(modem_table)
    gba = _gba(top.table("gba"))
    control = _control(top.table("control"))
    log = _log(top.table("log"))
    aes = _aes(file, config_dir, top.array_of_tables("ae"))
    top.finish()
    return Config(path=cfg_path, modem=modem, gba=gba, control=control, aes=aes, log=log, pin_file=pin_file)


def check_modem_port(config: Config) -> None:
    """The serial port must exist when the daemon starts (a typo here is a config error).

    A modem that exists but does not answer yet is a different matter: the daemon waits for it. With
    a PC/SC reader there is no port: pyscard must be installed instead (a reader that is not plugged
    in yet, or a pcscd that is not running yet, is waited for like a silent modem).
    """
    if config.modem.uses_reader:
        from mn_secd.uicc.pcsc import load_pyscard  # only a reader's configuration needs the PC/SC module

        try:
            load_pyscard()
        except PcscUnavailable as exc:
            raise ConfigError(str(config.path), "modem.transport", str(exc)) from None
        return
    port = config.modem.port
    assert port is not None  # ModemConfig requires it for every AT transport
    if not os.path.exists(port):
        raise ConfigError(str(config.path), "modem.port", f"no such device: {port}")
    mode = os.stat(port).st_mode
    if not stat.S_ISCHR(mode):
        raise ConfigError(str(config.path), "modem.port", f"not a character device: {port}")


def load_pin(config: Config) -> SecretBytes | None:
    """The SIM PIN from ``[modem] pin_file``, in a wipeable buffer (None when no pin_file is set).

    The file holds the PIN's 4 to 8 digits, a trailing newline allowed; the same ownership and mode
    checks as a PSK file. A wrong file is a ConfigError that never shows what the file holds.
    """
    if config.pin_file is None:
        return None
    buffer = pskfile.read_secret_file(config.pin_file, "modem.pin_file", what="the PIN file", limit=16)
    digits = buffer.strip()
    try:
        if not (digits.isdigit() and 4 <= len(digits) <= 8):
            raise ConfigError(str(config.pin_file), "modem.pin_file", "must hold the SIM PIN: 4 to 8 digits")
        return SecretBytes(digits)
    finally:
        for temporary in (buffer, digits):  # SecretBytes holds its own copy; these go
            temporary[:] = bytes(len(temporary))


def resolve_psk_file(name: str, config_dir: Path) -> list[Path]:
    """Where a ``psk_file`` (or ``pin_file``) value is looked for, in order.

    A relative name is tried in ``$CREDENTIALS_DIRECTORY`` (what ``LoadCredential=`` fills) and then
    next to the config file, so the same config works under systemd and in a development checkout.
    """
    candidate = Path(name)
    if candidate.is_absolute():
        return [candidate]
    tried: list[Path] = []
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        tried.append(Path(creds) / candidate)
    tried.append(config_dir / candidate)
    return tried


# --- sections ------------------------------------------------------------------------------------


def _pin_file(t: _Table, config_dir: Path) -> Path | None:
    if t.optional_string("pin_file") is None:
        return None
    return _credential_file(t, "pin_file", config_dir, hint="a file holding the SIM PIN", what="the PIN file")


def _modem(t: _Table) -> ModemConfig:
    transport = TransportChoice(t.choice("transport", ModemConfig.transport, tuple(TransportChoice)))
    if transport is TransportChoice.PCSC:
        reader: str | None = t.required_string("reader", hint='a part of the PC/SC reader\'s name, e.g. "uTrust 3700"')
        for key in ("port", "baud"):
            if t.data.get(key) is not None:
                raise t.error(key, 'not used with transport = "pcsc" (the card is in a PC/SC reader)')
        port = None
    else:
        port = t.required_string("port", hint="the modem's AT port, e.g. /dev/ttyUSB2")
        if t.data.get("reader") is not None:
            raise t.error("reader", 'only used with transport = "pcsc"')
        reader = None
    modem = ModemConfig(
        port=port,
        baud=t.integer("baud", ModemConfig.baud, minimum=1),
        transport=transport,
        application=ApplicationChoice(t.choice("application", ModemConfig.application, tuple(ApplicationChoice))),
        command_timeout=t.number("command_timeout", ModemConfig.command_timeout, positive=True),
        reader=reader,
    )
    t.finish()
    return modem


def _gba(t: _Table) -> GbaConfig:
    mode = GbaPolicy(t.choice("mode", GbaConfig.mode.value, tuple(p.value for p in GbaPolicy)))
    bsf_url = t.optional_string("bsf_url")
    if bsf_url is not None:
        parts = urlsplit(bsf_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise t.error("bsf_url", f"expected an http:// or https:// URL, got {_show(bsf_url)}")
    gba = GbaConfig(
        mode=mode,
        bsf_url=bsf_url,
        refresh_margin=t.span("refresh_margin", GbaConfig.refresh_margin),
        refresh_jitter=t.span("refresh_jitter", GbaConfig.refresh_jitter),
        retry_interval=t.span("retry_interval", GbaConfig.retry_interval),
        max_retry_interval=t.number("max_retry_interval", GbaConfig.max_retry_interval, positive=True),
        min_forced_interval=t.number("min_forced_interval", GbaConfig.min_forced_interval),
        http_timeout=t.number("http_timeout", GbaConfig.http_timeout, positive=True),
        retries=t.integer("retries", GbaConfig.retries, minimum=0),
        require_rspauth=t.boolean("require_rspauth", GbaConfig.require_rspauth),
        start_jitter=t.number("start_jitter", GbaConfig.start_jitter),
        persist_session=t.boolean("persist_session", GbaConfig.persist_session),
        state_directory=_state_directory(t),
    )
    t.finish()
    return gba


def _state_directory(t: _Table) -> Path | None:
    value = t.optional_string("state_directory")
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute():
        raise t.error("state_directory", f"expected an absolute path, got {_show(value)}")
    return path


def _control(t: _Table) -> ControlConfig:
    addresses = t.string_list("addresses", ControlConfig.addresses, nonempty=True)
    for i, address in enumerate(addresses):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise t.error(f"addresses[{i}]", f"expected an IP address, got {_show(address)}") from None
    if len(set(addresses)) != len(addresses):
        raise t.error("addresses", "lists an address twice")
    control = ControlConfig(
        addresses=addresses,
        port=t.integer("port", ControlConfig.port, minimum=1, maximum=65535),
        max_peers=t.integer("max_peers", ControlConfig.max_peers, minimum=1),
        idle_timeout=t.number("idle_timeout", ControlConfig.idle_timeout, positive=True),
        max_handshakes=t.integer("max_handshakes", ControlConfig.max_handshakes, minimum=1),
        max_observations=t.integer("max_observations", ControlConfig.max_observations, minimum=0),
    )
    t.finish()
    return control


def _log(t: _Table) -> LogConfig:
    log = LogConfig(level=t.choice("level", LogConfig.level, LOG_LEVELS))
    t.finish()
    return log


def _aes(file: str, config_dir: Path, tables: list[_Table]) -> tuple[AeConfig, ...]:
    seen: dict[str, int] = {}
    aes: list[AeConfig] = []
    for index, t in enumerate(tables):
        identity = t.required_string("identity", hint="the AE's DTLS PSK identity")
        if identity in seen:
            raise t.error("identity", f"{_show(identity)} is already used by ae[{seen[identity]}]")
        seen[identity] = index
        psk_file = _psk_file(t, config_dir)
        naf = tuple(_naf_pattern(t, i, p) for i, p in enumerate(t.string_list("naf", None, nonempty=True)))
        ua = t.string_list("ua", DEFAULT_UA, nonempty=True)
        for i, text in enumerate(ua):
            try:
                UaId.parse(text)
            except UnsupportedUaProtocol as exc:
                raise t.error(f"ua[{i}]", str(exc)) from None
        aes.append(
            AeConfig(
                identity=identity,
                psk_file=psk_file,
                naf=naf,
                ua=ua,
                may_force_bootstrap=t.boolean("may_force_bootstrap", False),
            )
        )
        t.finish()
    return tuple(aes)


def _naf_pattern(t: _Table, index: int, pattern: str) -> str:
    """An exact FQDN or ``*.domain`` (any name below the domain), stored in normalised form."""
    wildcard = pattern.startswith("*.")
    try:
        name = normalise_fqdn(pattern[2:] if wildcard else pattern)
    except InvalidNafId:
        raise t.error(f"naf[{index}]", f"expected a host name or *.domain, got {_show(pattern)}") from None
    return f"*.{name}" if wildcard else name


def _psk_file(t: _Table, config_dir: Path) -> Path:
    return _credential_file(t, "psk_file", config_dir, hint="a file holding the AE's pre-shared key")


def _credential_file(t: _Table, key: str, config_dir: Path, *, hint: str, what: str = "the PSK file") -> Path:
    """A secret's file (an AE's PSK, the SIM PIN): found as :func:`resolve_psk_file` says, non-empty,
    and passing :func:`mn_secd.control.pskfile.file_problem`."""
    name = t.required_string(key, hint=hint)
    tried = resolve_psk_file(name, config_dir)
    found = next((p for p in tried if p.exists()), None)
    if found is None:
        where = ", ".join(str(p) for p in tried)
        raise t.error(key, f"no such file (looked for {where})")
    try:
        fd = os.open(found, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise t.error(key, f"cannot open {found}: {exc.strerror or exc}") from None
    try:
        problem = pskfile.file_problem(fd, found, what)
        empty = os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    if problem is not None:
        raise t.error(key, f"{found}: {problem}")
    if empty:
        raise t.error(key, f"{found} is empty")
    return found


# --- typed access to one TOML table ----------------------------------------------------------------


class _Table:
    """One TOML table being validated: typed getters that remember which keys were consumed."""

    def __init__(self, file: str, prefix: str, data: dict[str, Any]) -> None:
        self.file = file
        self.prefix = prefix
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def _get(self, name: str) -> Any:
        self.used.add(name)
        return self.data.get(name)

    def table(self, name: str, *, required: bool = False) -> _Table:
        value = self._get(name)
        if value is None:
            if required:
                raise self.error(name, f"missing section [{self.key(name)}]")
            value = {}
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table [{self.key(name)}], got {_show(value)}")
        return _Table(self.file, self.key(name), value)

    def array_of_tables(self, name: str) -> list[_Table]:
        value = self._get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(name, f"expected [[{self.key(name)}]] entries, got {_show(value)}")
        return [_Table(self.file, f"{self.key(name)}[{i}]", v) for i, v in enumerate(value)]

    def required_string(self, name: str, *, hint: str) -> str:
        value = self._get(name)
        if value is None:
            raise self.error(name, f"missing ({hint})")
        return self._string(name, value)

    def optional_string(self, name: str) -> str | None:
        value = self._get(name)
        return None if value is None else self._string(name, value)

    def _string(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_show(value)}")
        if not value.strip():
            raise self.error(name, "must not be empty")
        return value.strip()

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.optional_string(name)
        if value is None:
            return default
        if value.lower() not in choices:
            allowed = ", ".join(f'"{c}"' for c in choices)
            raise self.error(name, f"expected one of {allowed}, got {_show(value)}")
        return value.lower()

    def number(self, name: str, default: float, *, positive: bool = False) -> float:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"expected a number, got {_show(value)}")
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise self.error(name, f"expected a finite number, got {_show(value)}")
        if positive and number <= 0:
            raise self.error(name, f"must be greater than 0, got {_show(value)}")
        if number < 0:
            raise self.error(name, f"must not be negative, got {_show(value)}")
        return number

    def span(self, name: str, default: Span) -> Span:
        """Seconds (a number), or a share of the key lifetime (a string such as ``"33%"``)."""
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, str):
            match = _PERCENT.fullmatch(value.strip())
            if match is None:
                raise self.error(name, f'expected a number of seconds or a share such as "33%", got {_show(value)}')
            share = float(match[1]) / 100.0
            if share > 1.0:
                raise self.error(name, f"a share of the key lifetime cannot exceed 100%, got {_show(value)}")
            return Span(share=share)
        return Span(seconds=self.number(name, 0.0))

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {_show(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise self.error(name, f"must be {bounds}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {_show(value)}")
        return value

    def string_list(self, name: str, default: tuple[str, ...] | None, *, nonempty: bool = False) -> tuple[str, ...]:
        value = self._get(name)
        if value is None:
            if default is None:
                raise self.error(name, "missing (a list of strings)")
            return default
        if not isinstance(value, list):
            raise self.error(name, f"expected a list of strings, got {_show(value)}")
        if nonempty and not value:
            raise self.error(name, "must list at least one entry")
        return tuple(self._string(f"{name}[{i}]", v) for i, v in enumerate(value))

    def finish(self) -> None:
        """Reject keys nobody asked for, suggesting the nearest known key (typos are the usual cause)."""
        for name in self.data:
            if name not in self.used:
                import difflib  # only a file with a mistake in it needs the suggestion; the daemon never does

                close = difflib.get_close_matches(name, sorted(self.used), n=1)
                hint = f" (did you mean {_show(close[0])}?)" if close else ""
                raise self.error(name, f"unknown key{hint}")


def _show(value: Any) -> str:
    """A value as the operator wrote it, shortened: strings quoted, TOML spellings for the rest."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "a list" if value else "an empty list"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: Every key each section accepts, for documentation and for the example file's test.
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "modem": MODEM_KEYS,
    "gba": tuple(f.name for f in fields(GbaConfig)),
    "control": tuple(f.name for f in fields(ControlConfig)),
    "ae": tuple(f.name for f in fields(AeConfig)),
    "log": tuple(f.name for f in fields(LogConfig)),
}

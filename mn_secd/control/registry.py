"""The AE registry: who may ask the key service for what.

Each local Application Entity is known by the PSK identity it presents in its DTLS handshake. The
registry maps that identity to the AE's pre-shared key (read from its own file) and to its access
list: the NAF FQDNs (exact, or ``*.domain`` for any name below the domain) and the Ua security
protocol ids it may ask keys for, and whether it may force a re-bootstrap.

Authorisation is decided from the identity that completed the DTLS handshake and nothing else: a
request can name a NAF, never who is asking. The registry is swapped whole on SIGHUP; the DTLS
server looks PSKs up through :class:`RegistryCredentials`, which always reads the current one.

PSK files hold the key verbatim (binary-safe, no trailing newline is stripped), 1 to 64 octets:
64 is what our patched tinydtls can hold (see :mod:`mn_secd.dtls`; upstream's held
16). A file others could read or replace is refused (:mod:`mn_secd.control.pskfile`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiocoap.credentials import CredentialsMap

from mn_secd.control.pskfile import read_psk_file as read_psk_file
from mn_secd.dtls import MAX_IDENTITY_LENGTH
from mn_secd.errors import ConfigError, InvalidNafId, NotAuthorised, UnsupportedUaProtocol
from mn_secd.ua import UaId, normalise_fqdn


class AeSpec(Protocol):
    """What the registry needs of one configured AE (:class:`mn_secd.config.AeConfig` has it)."""

    @property
    def identity(self) -> str: ...
    @property
    def psk_file(self) -> Path: ...
    @property
    def naf(self) -> tuple[str, ...]: ...
    @property
    def ua(self) -> tuple[str, ...]: ...
    @property
    def may_force_bootstrap(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class AeEntry:
    """One AE: its identity, PSK and access list (patterns normalised, Ua ids parsed)."""

    identity: str
    psk: bytes = field(repr=False)
    naf_patterns: tuple[str, ...]
    ua_ids: tuple[UaId, ...]
    may_force_bootstrap: bool = False

    def allows_naf(self, naf_fqdn: str) -> bool:
        """``naf_fqdn`` must already be normalised (:func:`mn_secd.ua.normalise_fqdn`)."""
        return any(naf_matches(pattern, naf_fqdn) for pattern in self.naf_patterns)

    def allows_ua(self, ua: UaId) -> bool:
        return ua in self.ua_ids


def naf_matches(pattern: str, naf_fqdn: str) -> bool:
    """Exact match, or ``*.domain`` matching any name strictly below ``domain``."""
    if pattern.startswith("*."):
        return naf_fqdn.endswith(pattern[1:])
    return naf_fqdn == pattern


class AeRegistry:
    """The AEs known to the key service, by PSK identity. Immutable: a reload builds a new one."""

    def __init__(self, entries: Iterable[AeEntry] = ()) -> None:
        self._entries: dict[str, AeEntry] = {}
        for entry in entries:
            if entry.identity in self._entries:
                raise ValueError(f"AE identity {entry.identity!r} is listed twice")
            self._entries[entry.identity] = entry

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[AeEntry]:
        return iter(self._entries.values())

    def get(self, identity: object) -> AeEntry | None:
        return self._entries.get(identity) if isinstance(identity, str) else None

    def authenticate(self, identity: object) -> AeEntry:
        """The entry of a DTLS-authenticated identity; NotAuthorised if it is not (or no longer) known."""
        entry = self.get(identity)
        if entry is None:
            raise NotAuthorised("this DTLS identity is not a registered AE")
        return entry

    def authorise_key(self, identity: object, naf_fqdn: str, ua: UaId) -> AeEntry:
        """Raise NotAuthorised unless the AE may have keys for this (normalised) NAF and Ua id."""
        entry = self.authenticate(identity)
        if not entry.allows_naf(naf_fqdn):
            raise NotAuthorised(f"AE {entry.identity!r} is not authorised for NAF {naf_fqdn}")
        if not entry.allows_ua(ua):
            raise NotAuthorised(f"AE {entry.identity!r} is not authorised for Ua protocol {ua.hex}")
        return entry

    def authorise_bootstrap(self, identity: object) -> AeEntry:
        entry = self.authenticate(identity)
        if not entry.may_force_bootstrap:
            raise NotAuthorised(f"AE {entry.identity!r} may not force a re-bootstrap")
        return entry

    def find_psk(self, identity: bytes) -> AeEntry | None:
        """The entry for an identity as it arrives in a handshake (bytes), if any."""
        try:
            return self._entries.get(identity.decode("utf-8"))
        except UnicodeDecodeError:
            return None

    def stale_identities(self, newer: AeRegistry) -> set[str]:
        """Identities whose sessions must end when ``newer`` replaces this registry (gone or changed)."""
        return {identity for identity, entry in self._entries.items() if newer._entries.get(identity) != entry}


class RegistryCredentials(CredentialsMap):  # type: ignore[misc]
    """aiocoap's credentials map, answered from the live registry at every handshake.

    The claim a handshake yields is the AE's identity (a ``str``), which the resources read back
    through :func:`mn_secd.dtls.authenticated_claim`.
    """

    def __init__(self, registry: AeRegistry) -> None:
        super().__init__()
        self.registry = registry

    def __bool__(self) -> bool:
        return True  # an empty dict would be replaced by aiocoap (mn_secd.dtls, fix 7)

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, str]:
        entry = self.registry.find_psk(identity)
        if entry is None:
            raise KeyError(identity)
        return entry.psk, entry.identity


def load_registry(aes: Sequence[AeSpec], *, source: str = "configuration") -> AeRegistry:
    """Build the registry from the configured AEs, reading each PSK file.

    Raises :class:`ConfigError` naming the file (the PSK file, or ``source`` for the access lists)
    and the AE; nothing about a key's content ever goes into the message.
    """
    entries: list[AeEntry] = []
    seen: set[str] = set()
    for ae in aes:
        key = f"ae[{ae.identity}]"
        if ae.identity in seen:
            raise ConfigError(source, f"{key}.identity", "listed twice")
        seen.add(ae.identity)
        if not 1 <= len(ae.identity.encode("utf-8")) <= MAX_IDENTITY_LENGTH:
            raise ConfigError(source, f"{key}.identity", f"must be 1 to {MAX_IDENTITY_LENGTH} octets of UTF-8")
        entries.append(
            AeEntry(
                identity=ae.identity,
                psk=read_psk_file(Path(ae.psk_file), f"{key}.psk_file"),
                naf_patterns=tuple(_naf_pattern(source, f"{key}.naf[{i}]", p) for i, p in enumerate(ae.naf)),
                ua_ids=tuple(_ua(source, f"{key}.ua[{i}]", u) for i, u in enumerate(ae.ua)),
                may_force_bootstrap=bool(ae.may_force_bootstrap),
            )
        )
    return AeRegistry(entries)


def _naf_pattern(source: str, key: str, pattern: str) -> str:
    wildcard = pattern.startswith("*.")
    try:
        name = normalise_fqdn(pattern[2:] if wildcard else pattern)
    except InvalidNafId:
        raise ConfigError(source, key, f"expected a host name or *.domain, got {pattern!r}") from None
    return f"*.{name}" if wildcard else name


def _ua(source: str, key: str, text: str) -> UaId:
    try:
        return UaId.parse(text)
    except UnsupportedUaProtocol as exc:
        raise ConfigError(source, key, str(exc)) from None

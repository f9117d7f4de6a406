"""The seams between mn_secd's layers, named in one place.

Each layer is written and tested against these protocols, so the card can be a real UICC behind a
modem or a software card behind the emulator, and the key service does not care how keys are made.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from mn_secd.gba.ua import UaId
from mn_secd.uicc.auth import AkaResult, AuthContext


class Application(enum.StrEnum):
    """Which UICC application answers for us."""

    ISIM = "isim"
    USIM = "usim"


@dataclass(frozen=True, slots=True)
class CardIdentity:
    """What the daemon knows about the card after start-up; ICCID + IMPI identify the key owner."""

    iccid: str
    imsi: str
    mnc_length: int
    impi: str
    application: Application
    aid: bytes
    gba_u: bool  # the card offers the GBA security context (UST service 68 / IST service 2)
    transport: str  # "csim" or "cgla"
    applications: tuple[tuple[Application, bytes], ...] = ()  # every 3GPP application found in EF_DIR

    @property
    def mcc(self) -> str:
        return self.imsi[:3]

    @property
    def mnc(self) -> str:
        return self.imsi[3 : 3 + self.mnc_length]


class CardEventKind(enum.StrEnum):
    REMOVED = "removed"  # the card went away (URC, +CME ERROR: 10, port gone)
    INSERTED = "inserted"  # a card is back: identity re-read, may be the same card
    CHANGED = "changed"  # a different ICCID/IMPI than before


@dataclass(frozen=True, slots=True)
class CardEvent:
    kind: CardEventKind
    identity: CardIdentity | None = None


class CardAccess(Protocol):
    """The daemon's view of the UICC (implemented by :class:`mn_secd.uicc.card.Card`)."""

    async def identity(self) -> CardIdentity:
        """Read (once, then cached until the card changes) the card's identity."""

    async def authenticate(self, rand: bytes, autn: bytes, context: AuthContext) -> AkaResult:
        """Run exactly one AUTHENTICATE; never resent, even after a timeout."""

    async def gba_naf_derivation(self, naf_id: bytes, impi: str) -> bytes:
        """GBA_U NAF derivation mode: Ks_ext_NAF from the card (it keeps Ks)."""

    async def write_gba_bootstrap_params(self, btid: str, lifetime: str) -> None:
        """Store B-TID and key lifetime in EF_GBABP after a GBA_U bootstrap (TS 31.102 4.2.79)."""

    def subscribe(self, callback: Callable[[CardEvent], None]) -> Callable[[], None]:
        """Be told of removal, insertion and change; returns an unsubscribe function."""


class GbaMode(enum.StrEnum):
    GBA_ME = "gba-me"
    GBA_U = "gba-u"


class GbaPolicy(enum.StrEnum):
    AUTO = "auto"  # GBA_U when the card can, GBA_ME otherwise
    GBA_ME_ONLY = "gba-me"
    GBA_U_ONLY = "gba-u"


@dataclass(frozen=True, slots=True)
class NafKey:
    """The key answer handed to an AE: everything but Ks itself."""

    naf_fqdn: str
    ua_id: UaId
    naf_id: bytes
    btid: str
    key: bytes = field(repr=False)  # Ks_NAF (GBA_ME) or Ks_ext_NAF (GBA_U), 32 octets
    expires: datetime  # timezone-aware UTC
    gba_mode: GbaMode


class KeyEventKind(enum.StrEnum):
    REFRESHED = "refreshed"  # a new bootstrap replaced the key
    WIPED = "wiped"  # keys were wiped (card removed or changed, shutdown)


@dataclass(frozen=True, slots=True)
class KeyEvent:
    kind: KeyEventKind
    btid: str | None = None


@dataclass(frozen=True, slots=True)
class KeyServiceStatus:
    """What ``status`` shows: no secrets, the IMPI masked by the caller that renders it."""

    card_present: bool
    impi: str | None
    bootstrapped: bool
    btid: str | None
    expires: datetime | None
    gba_mode: GbaMode | None
    last_error: str | None


class KeyProvider(Protocol):
    """What the key service asks of the keystore (implemented by :class:`mn_secd.gba.keystore.KeyStore`)."""

    async def get_key(self, naf_fqdn: str, ua_id: UaId, force: bool = False) -> NafKey:
        """A NAF key from cache or after one (single-flight) bootstrap; ``force`` re-bootstraps first."""

    async def force_bootstrap(self) -> None:
        """Re-bootstrap now (rate-limited: raises BootstrapRateLimited)."""

    def status(self) -> KeyServiceStatus: ...

    def subscribe(self, callback: Callable[[KeyEvent], None]) -> Callable[[], None]:
        """Be told when keys are refreshed or wiped; returns an unsubscribe function."""

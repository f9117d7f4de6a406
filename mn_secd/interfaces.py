"""The seams between mn_secd's layers, as protocols, named in one place.

Each layer is written and tested against these, so the card can be a real UICC behind a modem or a
software card behind the emulator, and the key service does not care how keys are made. The values
that cross the seams live in the leaf modules :mod:`mn_secd.aka`, :mod:`mn_secd.card_identity` and
:mod:`mn_secd.naf_keys`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from mn_secd.aka import AkaResult, AuthContext
from mn_secd.card_identity import CardEvent, CardIdentity, GbaBootstrapParams
from mn_secd.naf_keys import KeyEvent, KeyServiceStatus, NafKey
from mn_secd.ua import UaId


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

    async def read_gba_bootstrap_params(self) -> GbaBootstrapParams:
        """EF_GBABP as the card holds it, read without any AUTHENTICATE (a GBA_U session resumed at start)."""

    def subscribe(self, callback: Callable[[CardEvent], None]) -> Callable[[], None]:
        """Be told of removal, insertion and change; returns an unsubscribe function."""


class KeyProvider(Protocol):
    """What the key service asks of the keystore (implemented by :class:`mn_secd.gba.keystore.KeyStore`)."""

    async def get_key(self, naf_fqdn: str, ua_id: UaId, force: bool = False) -> NafKey:
        """A NAF key from cache or after one (single-flight) bootstrap; ``force`` re-bootstraps first."""

    async def force_bootstrap(self) -> None:
        """Re-bootstrap now (rate-limited: raises BootstrapRateLimited)."""

    def status(self) -> KeyServiceStatus: ...

    def subscribe(self, callback: Callable[[KeyEvent], None]) -> Callable[[], None]:
        """Be told when keys are refreshed or wiped; returns an unsubscribe function."""

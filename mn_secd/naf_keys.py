"""NAF keys as the keystore hands them out, the events of their life, and the status shown to AEs.

The keystore (:mod:`mn_secd.gba`) produces these, the key service (:mod:`mn_secd.control`) encodes
them for AEs and the client library (:mod:`mn_secd.client`) decodes them again, so they sit below
all three.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from mn_secd.ua import UaId


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
    #: Something the operator should know although keys are served (e.g. a BSF answer accepted
    #: without rspauth).
    warning: str | None = None

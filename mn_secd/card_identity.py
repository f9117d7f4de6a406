"""What the rest of mn_secd knows about a UICC: its applications, its identity, and its comings and goings.

Whatever reaches the card (a modem's AT port, a PC/SC reader) reports in these terms, and the
keystore and the daemon act on them without knowing how the card was reached.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
    transport: str  # how APDUs reach the card: "csim", "cgla" (a modem's AT port) or "pcsc" (a reader)
    applications: tuple[tuple[Application, bytes], ...] = ()  # every 3GPP application found in EF_DIR

    @property
    def mcc(self) -> str:
        return self.imsi[:3]

    @property
    def mnc(self) -> str:
        return self.imsi[3 : 3 + self.mnc_length]


@dataclass(frozen=True, slots=True)
class GbaBootstrapParams:
    """EF_GBABP (TS 31.102 4.2.79): RAND, written by the card at a GBA bootstrap AUTHENTICATE; B-TID
    and key lifetime, written by the ME after the BSF's 200 OK. Empty parts read as empty."""

    rand: bytes
    btid: str
    lifetime: str


class CardEventKind(enum.StrEnum):
    REMOVED = "removed"  # the card went away (URC, +CME ERROR: 10, port gone)
    INSERTED = "inserted"  # a card is back: identity re-read, may be the same card
    CHANGED = "changed"  # a different ICCID/IMPI than before


@dataclass(frozen=True, slots=True)
class CardEvent:
    kind: CardEventKind
    identity: CardIdentity | None = None

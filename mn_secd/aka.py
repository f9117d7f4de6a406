"""What one AKA run is made of and what it can end in, shared by the card and the Ub layers.

The card (:mod:`mn_secd.uicc`) runs AUTHENTICATE and reports the outcome; the Ub exchange
(:mod:`mn_secd.gba.ub`) takes RAND and AUTN from the BSF's nonce and answers the BSF according to
that outcome. Neither depends on the other: both speak these values.

The three outcomes the network cares about are values, not exceptions: success, a synchronisation
failure carrying AUTS, and a MAC failure (the network is not authentic) -- TS 33.102 6.3.3, and
TS 31.102 7.1.2 for how the card reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

#: RAND and AUTN are 128 bits each (TS 33.102 6.3.2).
RAND_LEN = 16
AUTN_LEN = 16


class AuthContext(IntEnum):
    """P2 of AUTHENTICATE: b8 set (specific reference data) and the security context (TS 31.102 7.1.2)."""

    UMTS = 0x81  # 3G context: GBA_ME
    GBA = 0x84  # GBA context: GBA_U (bootstrapping and NAF derivation modes)


@dataclass(frozen=True, slots=True)
class AkaSuccess:
    """The card accepted the challenge. In the GBA context only RES is returned (the card keeps Ks)."""

    res: bytes
    ck: bytes | None = None
    ik: bytes | None = None
    kc: bytes | None = None

    def __repr__(self) -> str:  # never show key material, not even in a debugger's repr
        return f"AkaSuccess(res_len={len(self.res)}, keys={'yes' if self.ck else 'no'})"


@dataclass(frozen=True, slots=True)
class AkaSyncFailure:
    """The SQN was not fresh: the card sent AUTS = (SQN_MS ⊕ AK*) ‖ MAC-S for a resync."""

    auts: bytes


@dataclass(frozen=True, slots=True)
class AkaMacFailure:
    """SW 98 62: the AUTN's MAC is wrong, so the challenge did not come from our home network."""


AkaResult = AkaSuccess | AkaSyncFailure | AkaMacFailure

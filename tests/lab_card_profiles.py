"""Card profiles the UICC tests share, on public TS 35.208 test keys, and the AUTN that fits them.

The card layer is tried the same way over an in-memory transport (tests/unit/test_card_channel.py)
and over the pty modem (tests/integration/test_uicc_pty.py); both use these cards.
"""

from __future__ import annotations

from mn_secd.sim.milenage import Milenage, generate_autn
from mn_secd.sim.profile import CardProfile

K = bytes.fromhex("465b5ce8b199b49faa5f0a2ee238a6bc")  # TS 35.208 test set 1
OPC = bytes.fromhex("cd63cb71954a9f4e48a5994e37a02baf")
#: An ISIM beside the USIM, GBA_U, a 2-digit MNC.
ISIM_CARD = CardProfile(
    iccid="89882110000000000018", imsi="001010000000001", mnc_length=2, k=K, opc=OPC, isim=True, gba_u=True
)
#: A USIM only, a 3-digit MNC and a 19-digit ICCID.
MNC3_CARD = CardProfile(
    iccid="8901150123456789012",
    imsi="310150123456789",
    mnc_length=3,
    k=bytes.fromhex("fec86ba6eb707ed08905757b1bb44b8f"),
    opc=bytes.fromhex("5a8d38864820197c3394b92613b20b91"),  # TS 35.208 test set 3
)
RAND = bytes.fromhex("23553cbe9637a89d218ae64dae47bf35")


def challenge(profile: CardProfile, seq: int, rand: bytes = RAND) -> bytes:
    """AUTN for SQN = SEQ || IND 0 (5-bit IND): fresh for a new card whenever seq >= 1 grows."""
    return generate_autn(Milenage(profile.k, profile.opc), rand, (seq << 5).to_bytes(6, "big"), profile.amf)

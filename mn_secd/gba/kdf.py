"""The GBA key derivation function (TS 33.220 Annex B) and the keys built with it.

Pure functions over bytes: the same code serves the daemon (Ks_NAF in GBA_ME), the software UICC
(Ks_ext_NAF / Ks_int_NAF in GBA_U) and the reference BSF on Zn, so both ends cannot drift apart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import unicodedata

FC_GBA = 0x01
LABEL_GBA_ME = b"gba-me"
LABEL_GBA_U = b"gba-u"
TMPI_UA_ID = bytes.fromhex("0100000100")
TMPI_DOMAIN = "tmpi.bsf.3gppnetwork.org"


def encode_string(value: str) -> bytes:
    """Strings enter the KDF as UTF-8 after NFKC normalisation (Annex B.2.1)."""
    return unicodedata.normalize("NFKC", value).encode("utf-8")


def kdf(key: bytes, fc: int, *params: bytes) -> bytes:
    """HMAC-SHA-256(key, FC ‖ P0 ‖ L0 ‖ P1 ‖ L1 ‖ ...), Li a 2-octet big-endian length."""
    if not 0 <= fc <= 0xFF:
        raise ValueError("FC is one octet")
    s = bytearray([fc])
    for p in params:
        if len(p) > 0xFFFF:
            raise ValueError("a KDF parameter is at most 65535 octets")
        s += p
        s += len(p).to_bytes(2, "big")
    return hmac.new(key, bytes(s), hashlib.sha256).digest()


def ks_naf(ks: bytes, rand: bytes, impi: str, naf_id: bytes) -> bytes:
    """Ks_NAF (GBA_ME) or Ks_ext_NAF (GBA_U): the same computation with label ``gba-me``."""
    _check_inputs(ks, rand)
    return kdf(ks, FC_GBA, LABEL_GBA_ME, rand, encode_string(impi), naf_id)


def ks_int_naf(ks: bytes, rand: bytes, impi: str, naf_id: bytes) -> bytes:
    """Ks_int_NAF (GBA_U only; stays in the UICC), label ``gba-u``."""
    _check_inputs(ks, rand)
    return kdf(ks, FC_GBA, LABEL_GBA_U, rand, encode_string(impi), naf_id)


def tmpi(ks: bytes, rand: bytes, impi: str, bsf_name: str) -> str:
    """The temporary IMPI of Annex B.4: base64 of 24 KDF octets, at the TMPI domain."""
    _check_inputs(ks, rand)
    bsf_id = encode_string(bsf_name) + TMPI_UA_ID
    digest = kdf(ks, FC_GBA, LABEL_GBA_ME, rand, encode_string(impi), bsf_id)[:24]
    return base64.b64encode(digest).decode("ascii") + "@" + TMPI_DOMAIN


def _check_inputs(ks: bytes, rand: bytes) -> None:
    if len(ks) != 32:
        raise ValueError("Ks is CK ‖ IK, 32 octets")
    if len(rand) != 16:
        raise ValueError("RAND is 16 octets")

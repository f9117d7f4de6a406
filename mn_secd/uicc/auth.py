"""AUTHENTICATE (INS 88) command building and response parsing, sans-IO (TS 31.102 7.1.2).

The outcomes the network cares about are the values of :mod:`mn_secd.aka` (success, a
synchronisation failure carrying AUTS, a MAC failure), not exceptions. Only outcomes that say "the
card would not run it" or "the answer is garbage" raise.
"""

from __future__ import annotations

from mn_secd.aka import AUTN_LEN, RAND_LEN, AkaMacFailure, AkaResult, AkaSuccess, AkaSyncFailure, AuthContext
from mn_secd.errors import ApduParseError, AuthenticateRefused, CardStatusError

INS_AUTHENTICATE = 0x88
TAG_SUCCESS = 0xDB
TAG_SYNC_FAILURE = 0xDC
TAG_GBA_BOOTSTRAP = 0xDD
TAG_GBA_NAF_DERIVATION = 0xDE

SW_OK = 0x9000
SW_MAC_FAILURE = 0x9862
#: Status words that mean "this card will not run this AUTHENTICATE" rather than "bad answer".
REFUSING_SW = frozenset({0x6985, 0x9864, 0x6982, 0x6A81, 0x6A86, 0x6B00, 0x6D00, 0x6E00, 0x6981})


def build_authenticate(rand: bytes, autn: bytes, context: AuthContext) -> bytes:
    """AUTHENTICATE for the 3G context or the GBA bootstrapping mode (CLA 00; channel bits set later)."""
    if len(rand) != RAND_LEN or len(autn) != AUTN_LEN:
        raise ValueError("RAND and AUTN are 16 octets each")
    body = bytes([16]) + rand + bytes([16]) + autn
    if context is AuthContext.GBA:
        body = bytes([TAG_GBA_BOOTSTRAP]) + body
    return bytes([0x00, INS_AUTHENTICATE, 0x00, int(context), len(body)]) + body + b"\x00"


def build_gba_naf_derivation(naf_id: bytes, impi: str) -> bytes:
    """AUTHENTICATE in GBA NAF-derivation mode: ``DE | L NAF_Id | L IMPI``."""
    impi_bytes = impi.encode("utf-8")
    if len(naf_id) > 0xFF or len(impi_bytes) > 0xFF:
        raise ValueError("NAF_Id and IMPI are at most 255 octets here")
    body = bytes([TAG_GBA_NAF_DERIVATION, len(naf_id)]) + naf_id + bytes([len(impi_bytes)]) + impi_bytes
    if len(body) > 0xFF:
        raise ValueError("NAF derivation command too long for a short APDU")
    return bytes([0x00, INS_AUTHENTICATE, 0x00, int(AuthContext.GBA), len(body)]) + body + b"\x00"


def _lv(data: bytes, offset: int, what: str) -> tuple[bytes, int]:
    if offset >= len(data):
        raise ApduParseError(f"AUTHENTICATE response truncated before {what}")
    length = data[offset]
    end = offset + 1 + length
    if end > len(data):
        raise ApduParseError(f"AUTHENTICATE response truncated inside {what}")
    return data[offset + 1 : end], end


def parse_authenticate_response(data: bytes, sw: int, context: AuthContext) -> AkaResult:
    """Turn the card's answer to :func:`build_authenticate` into a typed outcome."""
    if sw == SW_MAC_FAILURE:
        return AkaMacFailure()
    if sw in REFUSING_SW:
        raise AuthenticateRefused(f"card refused AUTHENTICATE (SW {sw:04X})")
    if sw != SW_OK:
        raise CardStatusError("AUTHENTICATE", sw)
    if not data:
        raise ApduParseError("AUTHENTICATE answered 9000 without data")
    tag = data[0]
    if tag == TAG_SYNC_FAILURE:
        auts, _ = _lv(data, 1, "AUTS")
        if len(auts) != 14:
            raise ApduParseError(f"AUTS must be 14 octets, got {len(auts)}")
        return AkaSyncFailure(auts)
    if tag != TAG_SUCCESS:
        raise ApduParseError(f"unknown AUTHENTICATE response tag {tag:02X}")
    res, offset = _lv(data, 1, "RES")
    if not 4 <= len(res) <= 16:
        raise ApduParseError(f"RES must be 4..16 octets, got {len(res)}")
    if context is AuthContext.GBA:
        return AkaSuccess(res)
    ck, offset = _lv(data, offset, "CK")
    ik, offset = _lv(data, offset, "IK")
    if len(ck) != 16 or len(ik) != 16:
        raise ApduParseError("CK and IK must be 16 octets each")
    kc: bytes | None = None
    if offset < len(data):
        kc, offset = _lv(data, offset, "Kc")
        if len(kc) != 8:
            raise ApduParseError("Kc must be 8 octets")
    return AkaSuccess(res, ck, ik, kc)


def parse_naf_derivation_response(data: bytes, sw: int) -> bytes:
    """Ks_ext_NAF from a GBA NAF-derivation answer ``DB 20 <32 octets>``."""
    if sw in REFUSING_SW:
        raise AuthenticateRefused(f"card refused GBA NAF derivation (SW {sw:04X}); bootstrap first")
    if sw != SW_OK:
        raise CardStatusError("AUTHENTICATE (GBA NAF derivation)", sw)
    if len(data) < 1 or data[0] != TAG_SUCCESS:
        raise ApduParseError("GBA NAF derivation answer does not start with DB")
    key, end = _lv(data, 1, "Ks_ext_NAF")
    if len(key) != 32 or end != len(data):
        raise ApduParseError("Ks_ext_NAF must be exactly 32 octets")
    return key

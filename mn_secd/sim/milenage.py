"""Milenage (3GPP TS 35.206): the AKA functions f1, f1*, f2-f5, f5* over AES-128.

Shared by the software UICC (card side) and the reference BSF (home network side), so both ends of
the simulated world compute with one implementation, checked against all TS 35.208 test sets.

Bit 0 is the most significant bit of byte 0; every rotation amount is a whole number of bytes, so
rot(x, r) is a byte rotation towards the front.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16
SQN_LEN = 6
AMF_LEN = 2
#: f1* (MAC-S in AUTS) is always computed with this AMF (TS 33.102 6.3.3).
RESYNC_AMF = b"\x00\x00"

#: RES lengths TS 33.102 6.3.2 allows (32 to 128 bits), in octets; Milenage's f2 gives 8.
MIN_RES_LEN, MAX_RES_LEN, MILENAGE_RES_LEN = 4, 16, 8

# Rotation amounts r1..r5 in bytes (64, 0, 32, 64, 96 bits) and the last byte of c1..c5.
_R1, _R2, _R3, _R4, _R5 = 8, 0, 4, 8, 12
_C1, _C2, _C3, _C4, _C5 = 0x00, 0x01, 0x02, 0x04, 0x08
#: The lab cards' RES extension beyond 8 octets (not TS 35.206): an f2-like block with its own constant.
_C_RES_EXT = 0x10


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _rot(x: bytes, nbytes: int) -> bytes:
    return x[nbytes:] + x[:nbytes]


def _with_c(x: bytes, c: int) -> bytes:
    return x[:-1] + bytes([x[-1] ^ c])


def _check(name: str, value: bytes, length: int) -> None:
    if len(value) != length:
        raise ValueError(f"{name} must be {length} octets, got {len(value)}")


def _aes(k: bytes, block: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(k), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def opc_from_op(k: bytes, op: bytes) -> bytes:
    """OPc = OP ⊕ E_K(OP): the per-subscriber value cards normally store instead of OP."""
    _check("K", k, BLOCK)
    _check("OP", op, BLOCK)
    return _xor(op, _aes(k, op))


class Milenage:
    """The Milenage functions for one subscriber (K, OPc).

    The key material is held privately and never shown by ``repr``.
    """

    __slots__ = ("_k", "_opc")

    def __init__(self, k: bytes, opc: bytes) -> None:
        _check("K", k, BLOCK)
        _check("OPc", opc, BLOCK)
        self._k = bytes(k)
        self._opc = bytes(opc)

    def __repr__(self) -> str:
        return "Milenage(<keys hidden>)"

    def _e(self, block: bytes) -> bytes:
        return _aes(self._k, block)

    def _temp(self, rand: bytes) -> bytes:
        _check("RAND", rand, BLOCK)
        return self._e(_xor(rand, self._opc))

    def _out1(self, rand: bytes, sqn: bytes, amf: bytes) -> bytes:
        _check("SQN", sqn, SQN_LEN)
        _check("AMF", amf, AMF_LEN)
        temp = self._temp(rand)
        in1 = sqn + amf + sqn + amf
        x = _xor(temp, _with_c(_rot(_xor(in1, self._opc), _R1), _C1))
        return _xor(self._e(x), self._opc)

    def _out(self, temp: bytes, r: int, c: int) -> bytes:
        return _xor(self._e(_with_c(_rot(_xor(temp, self._opc), r), c)), self._opc)

    def f1(self, rand: bytes, sqn: bytes, amf: bytes) -> bytes:
        """MAC-A, the network authentication code carried in AUTN (8 octets)."""
        return self._out1(rand, sqn, amf)[:8]

    def f1star(self, rand: bytes, sqn: bytes, amf: bytes) -> bytes:
        """MAC-S, the resynchronisation code carried in AUTS (8 octets)."""
        return self._out1(rand, sqn, amf)[8:]

    def f2345(self, rand: bytes, res_length: int = MILENAGE_RES_LEN) -> tuple[bytes, bytes, bytes, bytes]:
        """(RES, CK 16, IK 16, AK 6) for one RAND; RES has ``res_length`` octets (4 to 16).

        TS 35.206's f2 gives 8 octets, which is what every TS 35.208 test set checks. So that the lab
        can exercise the other lengths TS 33.102 allows, a shorter RES is the leading octets of f2's,
        and a longer one continues with the leading octets of one more block computed like f2's with
        a constant of its own (``c`` ending in 0x10). That extension is this simulation's, not a
        standard's: both ends of the simulated world (card and BSF) compute it here.
        """
        if not MIN_RES_LEN <= res_length <= MAX_RES_LEN:
            raise ValueError(f"RES must be {MIN_RES_LEN} to {MAX_RES_LEN} octets, not {res_length}")
        temp = self._temp(rand)
        out2 = self._out(temp, _R2, _C2)
        ck = self._out(temp, _R3, _C3)
        ik = self._out(temp, _R4, _C4)
        res = out2[8:]
        if res_length > MILENAGE_RES_LEN:
            res += self._out(temp, _R2, _C_RES_EXT)[: res_length - MILENAGE_RES_LEN]
        return res[:res_length], ck, ik, out2[:6]

    def f5star(self, rand: bytes) -> bytes:
        """AK*, the anonymity key that conceals SQN_MS in AUTS (6 octets)."""
        return self._out(self._temp(rand), _R5, _C5)[:6]


def generate_autn(m: Milenage, rand: bytes, sqn: bytes, amf: bytes) -> bytes:
    """AUTN = (SQN ⊕ AK) ‖ AMF ‖ MAC-A, as the home network builds it."""
    ak = m.f2345(rand)[3]
    return _xor(sqn, ak) + amf + m.f1(rand, sqn, amf)


def build_auts(m: Milenage, rand: bytes, sqn_ms: bytes) -> bytes:
    """AUTS = (SQN_MS ⊕ AK*) ‖ MAC-S, as the card answers a stale challenge."""
    _check("SQN_MS", sqn_ms, SQN_LEN)
    return _xor(sqn_ms, m.f5star(rand)) + m.f1star(rand, sqn_ms, RESYNC_AMF)


def verify_auts(m: Milenage, rand: bytes, auts: bytes) -> bytes | None:
    """SQN_MS recovered from AUTS, or None when MAC-S is wrong (compared in constant time)."""
    _check("AUTS", auts, SQN_LEN + 8)
    sqn_ms = _xor(auts[:SQN_LEN], m.f5star(rand))
    expected = m.f1star(rand, sqn_ms, RESYNC_AMF)
    if not hmac.compare_digest(expected, auts[SQN_LEN:]):
        return None
    return sqn_ms

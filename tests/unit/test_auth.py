"""AUTHENTICATE command building and response parsing (host side, sans-IO)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mn_secd.aka import AkaMacFailure, AkaSuccess, AkaSyncFailure, AuthContext
from mn_secd.errors import ApduParseError, AuthenticateRefused, CardStatusError
from mn_secd.uicc.auth import (
    build_authenticate,
    build_gba_naf_derivation,
    parse_authenticate_response,
    parse_naf_derivation_response,
)

RAND = bytes(range(16))
AUTN = bytes(range(16, 32))


def test_build_3g_and_gba_commands() -> None:
    umts = build_authenticate(RAND, AUTN, AuthContext.UMTS)
    assert umts[:5] == bytes.fromhex("0088008122") and umts[5] == 0x10 and umts[-1] == 0
    gba = build_authenticate(RAND, AUTN, AuthContext.GBA)
    assert gba[:6] == bytes.fromhex("0088008423dd")
    naf = build_gba_naf_derivation(b"naf.example.org\x01\x00\x01\xc0\xa8", "impi@x")
    assert naf[:4] == bytes.fromhex("00880084") and naf[5] == 0xDE and naf[4] == len(naf) - 6


def test_parse_success_with_and_without_kc() -> None:
    res, ck, ik, kc = b"\x11" * 8, b"\x22" * 16, b"\x33" * 16, b"\x44" * 8
    body = b"\xdb\x08" + res + b"\x10" + ck + b"\x10" + ik
    out = parse_authenticate_response(body, 0x9000, AuthContext.UMTS)
    assert out == AkaSuccess(res, ck, ik, None)
    with_kc = parse_authenticate_response(body + b"\x08" + kc, 0x9000, AuthContext.UMTS)
    assert isinstance(with_kc, AkaSuccess) and with_kc.kc == kc
    assert "22" not in repr(with_kc)


def test_parse_gba_bootstrap_has_res_only() -> None:
    out = parse_authenticate_response(b"\xdb\x08" + b"\x01" * 8, 0x9000, AuthContext.GBA)
    assert out == AkaSuccess(b"\x01" * 8)


def test_parse_sync_and_mac_failure() -> None:
    assert parse_authenticate_response(b"\xdc\x0e" + b"\x05" * 14, 0x9000, AuthContext.UMTS) == AkaSyncFailure(
        b"\x05" * 14
    )
    assert parse_authenticate_response(b"", 0x9862, AuthContext.UMTS) == AkaMacFailure()


def test_parse_refusals_and_bad_status() -> None:
    with pytest.raises(AuthenticateRefused):
        parse_authenticate_response(b"", 0x6985, AuthContext.GBA)
    with pytest.raises(CardStatusError):
        parse_authenticate_response(b"", 0x6F00, AuthContext.UMTS)


def test_naf_derivation_response() -> None:
    key = bytes(range(32))
    assert parse_naf_derivation_response(b"\xdb\x20" + key, 0x9000) == key
    with pytest.raises(ApduParseError):
        parse_naf_derivation_response(b"\xdb\x10" + key[:16], 0x9000)
    with pytest.raises(AuthenticateRefused):
        parse_naf_derivation_response(b"", 0x6985)


@given(st.binary(max_size=80), st.sampled_from([0x9000, 0x9862, 0x6985, 0x6F00]), st.sampled_from(list(AuthContext)))
def test_arbitrary_answers_raise_only_typed_errors(data: bytes, sw: int, ctx: AuthContext) -> None:
    with contextlib.suppress(ApduParseError, AuthenticateRefused, CardStatusError):
        parse_authenticate_response(data, sw, ctx)

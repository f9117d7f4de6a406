"""Ua security protocol identifiers and NAF_Id normalisation."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mn_secd.errors import InvalidNafId, UnsupportedUaProtocol
from mn_secd.ua import UaId, naf_id, normalise_fqdn


@pytest.mark.parametrize(
    ("text", "hexval"),
    [
        ("010001c0a8", "010001c0a8"),
        ("010001C0A8", "010001c0a8"),
        ("dtls-psk", "010001c0a8"),
        ("tls-psk", "01000100ae"),
        ("http-digest", "0100000002"),
        ("tls:C0A4", "010001c0a4"),
        ("tls:0x00a8", "01000100a8"),
        ("tls:TLS_PSK_WITH_AES_128_CCM_8", "010001c0a8"),
        ("ff12345678", "ff12345678"),
    ],
)
def test_parse_forms(text: str, hexval: str) -> None:
    ua = UaId.parse(text)
    assert ua.hex == hexval
    assert UaId.from_bytes(ua.to_bytes()) == ua


@pytest.mark.parametrize("text", ["", "0100", "05000000 02", "050000000a", "tls:", "tls:ZZZZ", "dtls"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(UnsupportedUaProtocol):
        UaId.parse(text)


def test_naf_id_layout() -> None:
    assert naf_id("IN-CSE.Example.org.", UaId.dtls_psk()) == b"in-cse.example.org" + bytes.fromhex("010001c0a8")


@pytest.mark.parametrize("bad", ["", ".", "a..b", "-a.example", "a_b.example", "host:5684", "x" * 64 + ".org"])
def test_fqdn_rejects(bad: str) -> None:
    with pytest.raises(InvalidNafId):
        normalise_fqdn(bad)


@given(st.text(max_size=80))
def test_fqdn_only_raises_typed_error(text: str) -> None:
    try:
        name = normalise_fqdn(text)
    except InvalidNafId:
        return
    assert name == name.lower() and not name.endswith(".")


@given(st.text(max_size=40))
def test_ua_parse_only_raises_typed_error(text: str) -> None:
    with contextlib.suppress(UnsupportedUaProtocol):
        UaId.parse(text)

"""GBA KDF (TS 33.220 Annex B) against the published framing vector and the derived NAF-key vectors."""

from __future__ import annotations

from typing import Any

import pytest

from mn_secd.gba import kdf
from mn_secd.ua import UaId, naf_id

NAF_VECTORS = [
    "ks_naf-gba_me-http-digest",
    "ks_ext_naf-tls-psk-00AE",
    "ks_ext_naf-dtls-psk-C0A8",
    "ks_int_naf-gba_u-tls-psk-00AE",
    "ks_naf-gba_me-ua-33221",
]


def test_generic_kdf_matches_published_3gpp_vector(gba_vectors: dict[str, dict[str, Any]]) -> None:
    v = gba_vectors["generic-3gpp-kdf-kenb"]
    params = [bytes.fromhex(p["P"]) for p in v["params"]]
    out = kdf.kdf(bytes.fromhex(v["key"]), int(v["FC"], 16), *params)
    assert out.hex() == v["expected"]


@pytest.mark.parametrize("name", NAF_VECTORS)
def test_naf_keys(name: str, gba_vectors: dict[str, dict[str, Any]]) -> None:
    v = gba_vectors[name]
    nid = naf_id(v["NAF_FQDN"], UaId.parse(v["Ua_security_protocol_id"]))
    assert nid.hex() == v["NAF_Id_hex"]
    derive = kdf.ks_int_naf if v["P0"] == "gba-u" else kdf.ks_naf
    ks = bytes.fromhex(v["CK"]) + bytes.fromhex(v["IK"])
    assert derive(ks, bytes.fromhex(v["RAND"]), v["IMPI"], nid).hex() == v["expected"]


def test_tmpi(gba_vectors: dict[str, dict[str, Any]]) -> None:
    v = gba_vectors["tmpi"]
    got = kdf.tmpi(bytes.fromhex(v["Ks"]), bytes.fromhex(v["RAND"]), v["IMPI"], v["BSF_FQDN"])
    assert got == v["expected_TMPI"]


def test_me_and_int_keys_differ_and_bind_every_input() -> None:
    ks, rand, impi = bytes(range(32)), bytes(16), "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
    nid = naf_id("in-cse.example.org", UaId.dtls_psk())
    base = kdf.ks_naf(ks, rand, impi, nid)
    assert base != kdf.ks_int_naf(ks, rand, impi, nid)
    assert base != kdf.ks_naf(ks, b"\x01" + bytes(15), impi, nid)
    assert base != kdf.ks_naf(ks, rand, "x" + impi, nid)
    assert base != kdf.ks_naf(ks, rand, impi, naf_id("in-cse.example.org", UaId.http_digest()))


@pytest.mark.parametrize(("ks", "rand"), [(bytes(31), bytes(16)), (bytes(32), bytes(15))])
def test_rejects_wrong_lengths(ks: bytes, rand: bytes) -> None:
    with pytest.raises(ValueError):
        kdf.ks_naf(ks, rand, "impi", b"naf")

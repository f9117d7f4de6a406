"""IMPI, BSF address and B-TID derivation (TS 23.003, TS 33.220)."""

from __future__ import annotations

from typing import Any

import pytest

from mn_secd import nai


def test_two_digit_mnc_is_padded() -> None:
    assert nai.impi_from_imsi("001010000000001", 2) == "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
    assert nai.bsf_fqdn("001010000000001", 2) == "bsf.mnc001.mcc001.pub.3gppnetwork.org"
    assert nai.bsf_url("001010000000001", 2) == "http://bsf.mnc001.mcc001.pub.3gppnetwork.org"


def test_three_digit_mnc_is_taken_as_is() -> None:
    # the same IMSI digits read with a 3-digit MNC give a different network
    assert nai.impi_from_imsi("310150123456789", 3) == "310150123456789@ims.mnc150.mcc310.3gppnetwork.org"
    assert nai.bsf_fqdn("310150123456789", 2) == "bsf.mnc015.mcc310.pub.3gppnetwork.org"
    assert nai.bsf_fqdn("310150123456789", 3) == "bsf.mnc150.mcc310.pub.3gppnetwork.org"


def test_example_from_pysim() -> None:
    assert nai.impi_from_imsi("738006000000101", 2) == "738006000000101@ims.mnc000.mcc738.3gppnetwork.org"


@pytest.mark.parametrize(
    ("imsi", "mnc_length"),
    [
        ("00101", 2),
        ("0010100000000012", 2),
        ("00101a000000001", 2),
        ("001010000000001", 1),
        ("001010000000001", 4),
        ("٠٠١٠١٠٠٠٠", 2),
    ],
)
def test_invalid_inputs(imsi: str, mnc_length: int) -> None:
    with pytest.raises(ValueError):
        nai.impi_from_imsi(imsi, mnc_length)


def test_btid_matches_vector(gba_vectors: dict[str, dict[str, Any]]) -> None:
    v = gba_vectors["ks_naf-gba_me-http-digest"]
    assert nai.btid(bytes.fromhex(v["RAND"]), "bsf.mnc001.mcc001.pub.3gppnetwork.org") == v["B_TID"]


def test_btid_from_live_trace() -> None:
    rand = bytes.fromhex("7ef7b889359bd6b4dbdbdec2cd54aba7")
    name = "bsf.ims.mnc045.mcc123.pub.3gppnetwork.org"
    assert nai.btid(rand, name) == "fve4iTWb1rTb297CzVSrpw==@" + name


def test_btid_uses_standard_alphabet() -> None:
    assert nai.btid(b"\xfb\xff\xbf" * 5 + b"\xfb", "b") == "+/+/+/+/+/+/+/+/+/+/+w==@b"


def test_btid_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        nai.btid(bytes(15), "bsf")
    with pytest.raises(ValueError):
        nai.btid(bytes(16), "")

"""UICC file decoders: FCP, EF_DIR, EF_IMSI, EF_AD, service tables, EF_IMPI, EF_ICCID, EF_GBABP."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mn_secd.card_identity import Application, GbaBootstrapParams
from mn_secd.errors import ApduParseError, ApplicationNotFound
from mn_secd.uicc import files
from mn_secd.uicc.files import DirEntry, Structure

USIM_AID = bytes.fromhex("A0000000871002FFFFFFFF8907090000")
ISIM_AID = bytes.fromhex("A0000000871004FFFFFFFF8907090000")


def dir_record(aid: bytes, label: str, size: int = 38) -> bytes:
    inner = b"\x4f" + bytes([len(aid)]) + aid + b"\x50" + bytes([len(label)]) + label.encode()
    rec = b"\x61" + bytes([len(inner)]) + inner
    return rec + b"\xff" * (size - len(rec))


def test_fcp_of_a_linear_fixed_ef() -> None:
    fcp = files.parse_fcp(bytes.fromhex("6212" + "8205422100260283022F00" + "8A0105" + "8002004C"))
    assert fcp.structure is Structure.LINEAR_FIXED
    assert (fcp.record_length, fcp.record_count, fcp.fid, fcp.file_size) == (0x26, 2, 0x2F00, 0x4C)


def test_fcp_of_a_transparent_ef_and_an_adf() -> None:
    ef = files.parse_fcp(bytes.fromhex("620C" + "82024121" + "83026F07" + "80020009"))
    assert ef.structure is Structure.TRANSPARENT and ef.file_size == 9 and ef.record_length is None
    adf = files.parse_fcp(bytes.fromhex("6207" + "82027821" + "8401A0"))
    assert adf.structure is Structure.DF


@pytest.mark.parametrize("wire", ["6F00", "6203830101", "62038201420000", "6204820342210"])
def test_bad_fcp(wire: str) -> None:
    with pytest.raises(ApduParseError):
        files.parse_fcp(bytes.fromhex(wire.ljust(len(wire) + len(wire) % 2, "0")))


def test_ef_dir_records_and_application_choice() -> None:
    records = [dir_record(USIM_AID, "USIM"), dir_record(ISIM_AID, "ISIM"), b"\xff" * 38]
    entries = [e for e in (files.parse_dir_record(r) for r in records) if e is not None]
    assert entries == [DirEntry(USIM_AID, "USIM"), DirEntry(ISIM_AID, "ISIM")]
    apps = files.applications([*entries, DirEntry(bytes.fromhex("A000000063504B43532D3135"))])
    assert apps == ((Application.USIM, USIM_AID), (Application.ISIM, ISIM_AID))
    assert files.choose_application(apps, "auto") == (Application.ISIM, ISIM_AID)
    assert files.choose_application(apps, "usim") == (Application.USIM, USIM_AID)
    usim_only = apps[:1]
    assert files.choose_application(usim_only, "auto") == (Application.USIM, USIM_AID)
    with pytest.raises(ApplicationNotFound):
        files.choose_application(usim_only, "isim")
    with pytest.raises(ApplicationNotFound):
        files.choose_application((), "auto")


def test_bad_ef_dir_record() -> None:
    with pytest.raises(ApduParseError):
        files.parse_dir_record(bytes.fromhex("4F02A000FFFF"))
    with pytest.raises(ApduParseError):
        files.parse_dir_record(bytes.fromhex("61045002414200"))


def test_imsi_odd_and_even() -> None:
    assert files.decode_imsi(bytes.fromhex("082982608200002080")) == "228062800000208"
    assert files.decode_imsi(bytes.fromhex("080910100000000010")) == "001010000000001"
    assert files.decode_imsi(bytes.fromhex("0801214365F7FFFFFF")) == "01234567"  # even digit count, F filler
    for wire in ["00", "0929826082000020800000", "082A82608200002080", "08298260820000208A", "0829"]:
        with pytest.raises(ApduParseError):
            files.decode_imsi(bytes.fromhex(wire))


def test_iccid_swapped_nibbles() -> None:
    assert files.decode_iccid(bytes.fromhex("98881201000000000081")) == "89882110000000000018"
    assert files.decode_iccid(bytes.fromhex("988812010000000000F1")) == "8988211000000000001"
    with pytest.raises(ApduParseError):
        files.decode_iccid(bytes.fromhex("9A881201000000000081"))


def test_mnc_length_from_ef_ad_and_fallbacks() -> None:
    assert files.mnc_length(bytes.fromhex("00000002"), "001010000000001") == 2
    assert files.mnc_length(bytes.fromhex("80000003"), "001010000000001") == 3
    assert files.mnc_length(bytes.fromhex("00000013"), "001010000000001") == 3  # high nibble is RFU
    assert files.mnc_length(bytes.fromhex("000000"), "310150123456789") == 3  # too short -> MCC table
    assert files.mnc_length(bytes.fromhex("0000000F"), "262011234567890") == 2
    assert files.mnc_length(None, "262011234567890", default=3) == 3


def test_service_tables() -> None:
    ust = bytes(8) + b"\x08" + bytes(2)
    assert files.has_service(ust, files.UST_SERVICE_GBA)
    assert not files.has_service(ust, 67) and not files.has_service(ust, 200)
    assert files.has_service(b"\x02", files.IST_SERVICE_GBA) and not files.has_service(b"\x01", 2)
    with pytest.raises(ValueError):
        files.has_service(ust, 0)


def test_impi_and_domain() -> None:
    impi = "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
    raw = b"\x80" + bytes([len(impi)]) + impi.encode() + b"\xff" * 10
    assert files.decode_nai(raw) == impi
    for wire in ["FFFF", "8100", "8002C328"]:
        with pytest.raises(ApduParseError):
            files.decode_nai(bytes.fromhex(wire))


def test_gbabp_layout() -> None:
    params = GbaBootstrapParams(bytes(range(16)), "AAECAwQFBgcICQoLDA0ODw==@bsf.example", "2030-01-01T00:00:00Z")
    wire = files.encode_gbabp(params)
    assert wire[0] == 16 and wire[1:17] == bytes(range(16)) and wire[17] == len(params.btid)
    assert files.decode_gbabp(wire + b"\xff" * 20) == params
    assert files.decode_gbabp(b"\x10" + bytes(16) + b"\xff" * 40) == GbaBootstrapParams(bytes(16), "", "")
    assert files.decode_gbabp(b"\xff" * 8) == GbaBootstrapParams(b"", "", "")
    with pytest.raises(ApduParseError):
        files.decode_gbabp(b"\x10\x00")


@given(st.binary(max_size=16), st.text(max_size=80), st.text(max_size=40))
def test_gbabp_round_trip(rand: bytes, btid: str, lifetime: str) -> None:
    params = GbaBootstrapParams(rand, btid, lifetime)
    assert files.decode_gbabp(files.encode_gbabp(params)) == params


@given(st.binary(max_size=120))
def test_decoders_only_raise_apdu_parse_error(data: bytes) -> None:
    for decoder in (
        files.parse_fcp,
        files.parse_dir_record,
        files.decode_imsi,
        files.decode_iccid,
        files.decode_nai,
        files.decode_gbabp,
    ):
        with contextlib.suppress(ApduParseError):
            decoder(data)
    files.mnc_length(data, "001010000000001")

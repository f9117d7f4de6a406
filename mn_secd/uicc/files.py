"""Decoders and encoders for the UICC files mn_secd reads or writes, sans-IO.

TS 102 221 (FCP, EF_DIR, EF_ICCID), TS 31.102 (USIM: EF_IMSI, EF_AD, EF_UST, EF_GBABP) and
TS 31.103 (ISIM: EF_IMPI, EF_DOMAIN, EF_IST). Every decoder raises only ApduParseError on bad bytes:
a card answer is outside input like any other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mn_secd.card_identity import Application, GbaBootstrapParams
from mn_secd.errors import ApduParseError, ApplicationNotFound
from mn_secd.uicc.apdu import find_tlv, parse_tlvs
from mn_secd.uicc.options import ApplicationChoice

# File identifiers: TS 102 221 clause 13, TS 31.102 and TS 31.103 clause 4 (``docs/UICC.md``).
FID_MF = 0x3F00
FID_EF_DIR = 0x2F00
FID_EF_ICCID = 0x2FE2
FID_EF_IMSI = 0x6F07  # USIM
FID_EF_AD = 0x6FAD  # USIM and ISIM
FID_EF_UST = 0x6F38  # USIM
FID_EF_GBABP_USIM = 0x6FD6
FID_EF_GBABP_ISIM = 0x6FD5
FID_EF_IMPI = 0x6F02  # ISIM
FID_EF_DOMAIN = 0x6F03  # ISIM
FID_EF_IST = 0x6F07  # ISIM (same FID as EF_IMSI, different ADF)

USIM_AID_PREFIX = bytes.fromhex("A0000000871002")
ISIM_AID_PREFIX = bytes.fromhex("A0000000871004")
#: 3GPP RID ``A000000087`` and the application code: what identifies a USIM or ISIM in EF_DIR.

UST_SERVICE_GBA = 68
IST_SERVICE_GBA = 2

# --- FCP ---------------------------------------------------------------------------------------------------


class Structure(enum.StrEnum):
    TRANSPARENT = "transparent"
    LINEAR_FIXED = "linear-fixed"
    CYCLIC = "cyclic"
    DF = "df"  # MF, DF or ADF
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Fcp:
    """The parts of a File Control Parameters template (tag ``62``) that the host needs."""

    structure: Structure
    fid: int | None = None
    file_size: int | None = None  # tag 80: transparent EF size / records x record length
    record_length: int | None = None
    record_count: int | None = None


def parse_fcp(data: bytes) -> Fcp:
    """Decode the FCP a SELECT with P2 ``04`` returns."""
    outer = parse_tlvs(data)
    template = find_tlv(outer, 0x62)
    if template is None:
        raise ApduParseError("SELECT answer is not an FCP template (tag 62)")
    inner = parse_tlvs(template)
    descriptor = find_tlv(inner, 0x82)
    if not descriptor or len(descriptor) < 2:
        raise ApduParseError("FCP without a file descriptor (tag 82)")
    kind = descriptor[0]
    if kind & 0x38 == 0x38:
        structure = Structure.DF
    else:
        structure = {1: Structure.TRANSPARENT, 2: Structure.LINEAR_FIXED, 6: Structure.CYCLIC}.get(
            kind & 0x07, Structure.OTHER
        )
    record_length = record_count = None
    if structure in (Structure.LINEAR_FIXED, Structure.CYCLIC):
        if len(descriptor) < 5:
            raise ApduParseError("record file descriptor without record length and count")
        record_length = int.from_bytes(descriptor[2:4], "big")
        record_count = descriptor[4]
    fid_bytes = find_tlv(inner, 0x83)
    size_bytes = find_tlv(inner, 0x80)
    return Fcp(
        structure=structure,
        fid=int.from_bytes(fid_bytes, "big") if fid_bytes else None,
        file_size=int.from_bytes(size_bytes, "big") if size_bytes else None,
        record_length=record_length,
        record_count=record_count,
    )


# --- EF_DIR -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One application template from EF_DIR."""

    aid: bytes
    label: str | None = None


def parse_dir_record(record: bytes) -> DirEntry | None:
    """An EF_DIR record (``61 L {4F L AID} [50 L label] ...``), or None for an unused (``FF``) record."""
    objects = parse_tlvs(record)
    if not objects:
        return None
    template = find_tlv(objects, 0x61)
    if template is None:
        raise ApduParseError("EF_DIR record is not an application template (tag 61)")
    inner = parse_tlvs(template)
    aid = find_tlv(inner, 0x4F)
    if aid is None or not 5 <= len(aid) <= 16:
        raise ApduParseError("EF_DIR application template without a valid AID (tag 4F)")
    label = find_tlv(inner, 0x50)
    return DirEntry(aid, label.decode("utf-8", "replace") if label is not None else None)


def classify_aid(aid: bytes) -> Application | None:
    """USIM or ISIM by the 7-octet prefix (RID ``A000000087`` + application code), else None."""
    if aid.startswith(USIM_AID_PREFIX):
        return Application.USIM
    if aid.startswith(ISIM_AID_PREFIX):
        return Application.ISIM
    return None


def applications(entries: list[DirEntry]) -> tuple[tuple[Application, bytes], ...]:
    """The 3GPP applications among EF_DIR entries, in card order."""
    found: list[tuple[Application, bytes]] = []
    for entry in entries:
        app = classify_aid(entry.aid)
        if app is not None:
            found.append((app, entry.aid))
    return tuple(found)


def choose_application(
    apps: tuple[tuple[Application, bytes], ...], preference: ApplicationChoice
) -> tuple[Application, bytes]:
    """``auto``: the ISIM when there is one, else the USIM; ``isim`` / ``usim``: that one or an error."""
    choice = ApplicationChoice(preference)  # ValueError for anything else
    order = [Application.ISIM, Application.USIM] if choice is ApplicationChoice.AUTO else [Application(choice.value)]
    for wanted in order:
        for app, aid in apps:
            if app is wanted:
                return app, aid
    names = ", ".join(a.value for a, _ in apps) or "none"
    raise ApplicationNotFound(f"no {' or '.join(a.value.upper() for a in order)} in EF_DIR (found: {names})")


# --- identity files ---------------------------------------------------------------------------------------


def _nibbles(data: bytes) -> list[int]:
    return [n for b in data for n in (b & 0x0F, b >> 4)]


def _digits(nibbles: list[int], what: str) -> str:
    while nibbles and nibbles[-1] == 0xF:
        nibbles.pop()
    if any(n > 9 for n in nibbles):
        raise ApduParseError(f"{what} contains a non-decimal digit")
    return "".join(str(n) for n in nibbles)


def decode_imsi(data: bytes) -> str:
    """EF_IMSI: length octet, then digit 1 in the high nibble after the parity nibble, low nibble first."""
    if len(data) < 2 or not 1 <= data[0] <= 8 or len(data) < 1 + data[0]:
        raise ApduParseError("EF_IMSI length octet is inconsistent")
    body = data[1 : 1 + data[0]]
    if body[0] & 0x07 != 0x01:
        raise ApduParseError("EF_IMSI identity type is not IMSI")
    imsi = _digits(_nibbles(body)[1:], "EF_IMSI")
    if not 6 <= len(imsi) <= 15:
        raise ApduParseError(f"IMSI of {len(imsi)} digits")
    return imsi


def decode_iccid(data: bytes) -> str:
    """EF_ICCID: BCD with swapped nibbles, ``F`` filler."""
    iccid = _digits(_nibbles(data), "EF_ICCID")
    if not 10 <= len(iccid) <= 20:
        raise ApduParseError(f"ICCID of {len(iccid)} digits")
    return iccid


#: MCCs whose operators use 3-digit MNCs, for cards whose EF_AD does not say: North America and a few
#: Caribbean and Latin American countries. A best effort: no specification lists them (docs/UICC.md).
THREE_DIGIT_MNC_MCCS = frozenset(
    {"302", "310", "311", "312", "313", "314", "315", "316", "334", "338", "342", "344", "346", "348",
     "354", "356", "358", "360", "365", "376", "708", "722", "732"}
)  # fmt: skip


def mnc_length(ad: bytes | None, imsi: str, default: int | None = None) -> int:
    """MNC digits from EF_AD byte 4 (low nibble); if absent or invalid: ``default``, else the MCC table."""
    if ad is not None and len(ad) >= 4 and ad[3] & 0x0F in (2, 3):
        return ad[3] & 0x0F
    if default is not None:
        return default
    return 3 if imsi[:3] in THREE_DIGIT_MNC_MCCS else 2


def has_service(table: bytes, service: int) -> bool:
    """Service n is byte (n-1)//8, bit (n-1)%8 (b1 = LSB) of a UST / IST."""
    if service < 1:
        raise ValueError("services are numbered from 1")
    index, bit = divmod(service - 1, 8)
    return index < len(table) and bool(table[index] >> bit & 1)


def decode_nai(data: bytes, what: str = "EF_IMPI") -> str:
    """EF_IMPI / EF_DOMAIN: TLV ``80 L <UTF-8>``, ``FF`` padding after it."""
    value = find_tlv(parse_tlvs(data), 0x80)
    if not value:
        raise ApduParseError(f"{what} has no NAI (tag 80)")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApduParseError(f"{what} is not UTF-8") from exc


# --- EF_GBABP ------------------------------------------------------------------------------------------------


def _lv(value: bytes, what: str) -> bytes:
    if len(value) > 0xFF:
        raise ValueError(f"{what} longer than 255 octets")
    return bytes([len(value)]) + value


def encode_gbabp(params: GbaBootstrapParams) -> bytes:
    """``LV(RAND) | LV(B-TID) | LV(lifetime)`` (TS 31.102 4.2.79)."""
    return (
        _lv(params.rand, "RAND") + _lv(params.btid.encode("utf-8"), "B-TID") + _lv(params.lifetime.encode(), "lifetime")
    )


def decode_gbabp(data: bytes) -> GbaBootstrapParams:
    """The inverse of :func:`encode_gbabp`; missing trailing parts (fresh card, ``FF`` fill) decode empty."""
    parts: list[bytes] = []
    offset = 0
    for _ in range(3):
        if offset >= len(data) or data[offset] == 0xFF:
            parts.append(b"")
            offset = len(data)
            continue
        end = offset + 1 + data[offset]
        if end > len(data):
            raise ApduParseError("EF_GBABP value truncated")
        parts.append(data[offset + 1 : end])
        offset = end
    try:
        return GbaBootstrapParams(parts[0], parts[1].decode("utf-8"), parts[2].decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApduParseError("EF_GBABP B-TID or lifetime is not UTF-8") from exc

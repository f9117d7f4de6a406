"""Names GBA derives from the card: IMPI, BSF address (TS 23.003) and B-TID (TS 33.220 4.5.2).

The MNC is always written with three digits in these names (``mnc001`` for MNC ``01``): a two-digit
MNC that stayed two digits would send the daemon to a BSF host that does not exist and put a wrong
IMPI into every key derivation, so the padding lives here and nowhere else.
"""

from __future__ import annotations

import base64

from mn_secd.aka import RAND_LEN


def _split_imsi(imsi: str, mnc_length: int) -> tuple[str, str]:
    """(MCC, MNC padded to 3 digits); ValueError for anything that is not an IMSI."""
    if mnc_length not in (2, 3):
        raise ValueError(f"the MNC has 2 or 3 digits, not {mnc_length}")
    if not (imsi.isascii() and imsi.isdigit() and 6 <= len(imsi) <= 15):
        raise ValueError("an IMSI is 6 to 15 decimal digits")
    mcc = imsi[:3]
    mnc = imsi[3 : 3 + mnc_length].rjust(3, "0")
    return mcc, mnc


def impi_from_imsi(imsi: str, mnc_length: int) -> str:
    """``<IMSI>@ims.mnc<MNC>.mcc<MCC>.3gppnetwork.org`` (TS 23.003 13.3), the IMPI of a card without ISIM."""
    mcc, mnc = _split_imsi(imsi, mnc_length)
    return f"{imsi}@ims.mnc{mnc}.mcc{mcc}.3gppnetwork.org"


def bsf_fqdn(imsi: str, mnc_length: int) -> str:
    """``bsf.mnc<MNC>.mcc<MCC>.pub.3gppnetwork.org`` (TS 23.003 16.2)."""
    mcc, mnc = _split_imsi(imsi, mnc_length)
    return f"bsf.mnc{mnc}.mcc{mcc}.pub.3gppnetwork.org"


def bsf_url(imsi: str, mnc_length: int) -> str:
    """The Ub base URL when the configuration names none: plain HTTP on port 80 (TS 24.109 4.4.1)."""
    return f"http://{bsf_fqdn(imsi, mnc_length)}"


def btid(rand: bytes, bsf_name: str) -> str:
    """B-TID = base64(RAND) ``@`` BSF server name: standard alphabet, with padding (TS 33.220 4.5.2)."""
    if len(rand) != RAND_LEN:
        raise ValueError("RAND is 16 octets")
    if not bsf_name or "@" in bsf_name:
        raise ValueError("the BSF name must be a non-empty host name")
    return base64.b64encode(rand).decode("ascii") + "@" + bsf_name

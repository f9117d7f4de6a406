"""How a B-TID and a NAF key become a DTLS ``psk_identity`` and PSK, the same way on both ends of Ua.

The standards give three spellings of the identity, all carrying the full B-TID, and use the
32-octet Ks_(ext)_NAF itself as the PSK:

* ``btid``: the bare B-TID, as oneM2M TS-0003 uses it (KpsaID = B-TID, 8.2.2.1 with 8.3.2.3);
* ``prefixed``: ``3GPP-bootstrapping`` followed directly by the B-TID (TS 24.109 Annex F read
  without a separator);
* ``prefixed-dot``: ``3GPP-bootstrapping.`` and the B-TID (the TS 36.508 rendering; which of the
  two 3GPP means was not confirmed, so a NAF accepts both).

None of them fits the DTLS stack both our ends use. tinydtls, as built by DTLSSocket 0.2.3 under
aiocoap, takes at most 32 octets of psk_identity (a B-TID of the form ``base64(RAND)@BSF-name`` is
about 60) and 16 octets of PSK (and DTLSSocket overruns tinydtls's stack buffer with anything
longer; :mod:`mn_secd.control.dtls_fix` refuses such keys). Hence a fourth form, chosen by whoever
is constrained and recognisable by the NAF without any negotiation:

* ``compact``: only the part of the B-TID before ``@`` (base64 of RAND, 24 characters, which is
  how TS 33.220 makes B-TIDs and how the form is recognised), and as PSK
  the leftmost 16 octets of the NAF key. The NAF puts the B-TID back together with the name of the
  BSF it asks over Zn (a NAF talks to one BSF; the name is configuration). Sixteen octets are the
  strength of the AES-128 suite the key protects (TLS_PSK_WITH_AES_128_CCM_8), and Ks_NAF, a PRF
  output, is uniform in every octet, so truncating it costs nothing the suite had.

The identity spells the PSK: full-B-TID forms always mean the 32-octet key, ``compact`` always the
16-octet one, so a NAF never has to guess which key a client holds.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

#: The psk_identity_hint of ME-based GBA keys (TS 24.109 F.3); also the identity prefix.
BOOTSTRAPPING_PREFIX = "3GPP-bootstrapping"
#: Octets of the NAF key (Ks_NAF / Ks_ext_NAF) used as PSK by the full-B-TID forms.
FULL_PSK_LENGTH = 32
#: Octets of the NAF key used as PSK by the compact form.
COMPACT_PSK_LENGTH = 16

_BTID_LOCAL = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_RAND_B64 = re.compile(r"^[A-Za-z0-9+/]{22}==$")  # base64 of the 16 octets of RAND
_DOMAIN = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_MAX_BTID = 255


class IdentityForm(enum.StrEnum):
    BTID = "btid"
    PREFIXED = "prefixed"
    PREFIXED_DOT = "prefixed-dot"
    COMPACT = "compact"

    @property
    def psk_length(self) -> int:
        """Octets of the NAF key that make the PSK for this form."""
        return COMPACT_PSK_LENGTH if self is IdentityForm.COMPACT else FULL_PSK_LENGTH


@dataclass(frozen=True, slots=True)
class PskIdentity:
    """A decoded psk_identity: the full B-TID and the form it came in."""

    btid: str
    form: IdentityForm


def split_btid(btid: str) -> tuple[str, str]:
    """(base64 RAND part, BSF name) of a B-TID; ValueError unless it looks like ``local@domain``."""
    if len(btid) > _MAX_BTID or not btid.isascii():
        raise ValueError("a B-TID is at most 255 ASCII characters")
    local, sep, domain = btid.partition("@")
    if not sep or not _BTID_LOCAL.fullmatch(local) or not _DOMAIN.fullmatch(domain):
        raise ValueError("not a B-TID (base64 part '@' BSF name)")
    return local, domain


def encode_psk_identity(btid: str, form: IdentityForm) -> bytes:
    """The psk_identity an MN presents for ``btid`` in ``form``."""
    local, _ = split_btid(btid)
    if form is IdentityForm.BTID:
        text = btid
    elif form is IdentityForm.PREFIXED:
        text = BOOTSTRAPPING_PREFIX + btid
    elif form is IdentityForm.PREFIXED_DOT:
        text = BOOTSTRAPPING_PREFIX + "." + btid
    else:
        if not _RAND_B64.fullmatch(local):
            raise ValueError("the compact form needs a B-TID made of base64(RAND)")
        text = local
    return text.encode("ascii")


def decode_psk_identity(identity: bytes, *, bsf_name: str | None) -> PskIdentity:
    """The B-TID a psk_identity names, in any of the four forms; ValueError if it names none.

    ``bsf_name`` completes a compact identity; without it compact identities are refused. The
    ``3GPP-bootstrapping-uicc`` and ``-digest`` variants (UICC-based TLS, GBA_Digest) name keys this
    NAF does not use and are refused too.
    """
    try:
        text = identity.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("a psk_identity here is ASCII") from None
    form = IdentityForm.BTID
    if text.startswith(BOOTSTRAPPING_PREFIX):
        text = text[len(BOOTSTRAPPING_PREFIX) :]
        form = IdentityForm.PREFIXED
        if text.startswith("."):
            text = text[1:]
            form = IdentityForm.PREFIXED_DOT
    if "@" in text:
        split_btid(text)
        return PskIdentity(text, form)
    if form is not IdentityForm.BTID:
        raise ValueError("a prefixed psk_identity must carry a full B-TID")
    if not _RAND_B64.fullmatch(text):
        raise ValueError("a compact psk_identity is base64(RAND): 22 characters and '=='")
    if bsf_name is None:
        raise ValueError("a compact psk_identity needs the BSF name, and none is configured")
    btid = f"{text}@{bsf_name}"
    split_btid(btid)
    return PskIdentity(btid, IdentityForm.COMPACT)


def dtls_psk(naf_key: bytes, form: IdentityForm) -> bytes:
    """The PSK for ``form``: the whole NAF key, or its leftmost 16 octets for the compact form."""
    if len(naf_key) != FULL_PSK_LENGTH:
        raise ValueError(f"a NAF key is {FULL_PSK_LENGTH} octets, got {len(naf_key)}")
    return naf_key[: form.psk_length]

"""How a B-TID and a NAF key become a DTLS ``psk_identity`` and PSK, the same way on both ends of Ua.

The standards give three spellings of the identity, all carrying the full B-TID, and use the
32-octet Ks_(ext)_NAF itself as the PSK:

* ``btid``: the bare B-TID, as oneM2M TS-0003 uses it (KpsaID = B-TID, 8.2.2.1 with 8.3.2.3);
* ``prefixed``: ``3GPP-bootstrapping`` followed directly by the B-TID (TS 24.109 Annex F read
  without a separator);
* ``prefixed-dot``: ``3GPP-bootstrapping.`` and the B-TID (the TS 36.508 rendering; which of the
  two 3GPP means was not confirmed, so a NAF accepts both).

Our DTLS stack carries all three: tinydtls as built by DTLSSocket 0.2.3 took at most 32 octets of
psk_identity (a B-TID of the form ``base64(RAND)@BSF-name`` is about 62) and 16 of PSK, so ``./dev``
builds it with ``patches/dtlssocket-0.2.3-gba-psk.patch`` (128 and 64 octets,
:data:`mn_secd.dtls.MAX_IDENTITY_LENGTH` and ``MAX_PSK_LENGTH``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

#: The psk_identity_hint of ME-based GBA keys (TS 24.109 F.3); also the identity prefix.
BOOTSTRAPPING_PREFIX = "3GPP-bootstrapping"
#: Octets of the NAF key (Ks_NAF / Ks_ext_NAF), which is the PSK in every form.
FULL_PSK_LENGTH = 32

_BTID_LOCAL = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_MAX_BTID = 255


class IdentityForm(enum.StrEnum):
    BTID = "btid"
    PREFIXED = "prefixed"
    PREFIXED_DOT = "prefixed-dot"


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
    split_btid(btid)
    if form is IdentityForm.PREFIXED:
        btid = BOOTSTRAPPING_PREFIX + btid
    elif form is IdentityForm.PREFIXED_DOT:
        btid = BOOTSTRAPPING_PREFIX + "." + btid
    return btid.encode("ascii")


def decode_psk_identity(identity: bytes) -> PskIdentity:
    """The B-TID a psk_identity names, in any of the three forms; ValueError if it names none.

    The ``3GPP-bootstrapping-uicc`` and ``-digest`` variants (UICC-based TLS, GBA_Digest) name keys
    this NAF does not use and are refused.
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
    split_btid(text)
    return PskIdentity(text, form)


def dtls_psk(naf_key: bytes) -> bytes:
    """The PSK: the whole NAF key, checked to be one (TS-0003 uses Ks_(ext)_NAF as it is)."""
    if len(naf_key) != FULL_PSK_LENGTH:
        raise ValueError(f"a NAF key is {FULL_PSK_LENGTH} octets, got {len(naf_key)}")
    return naf_key

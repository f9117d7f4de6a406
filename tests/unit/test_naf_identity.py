"""psk_identity forms and the PSK each one means (mn_secd.naf.identity)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mn_secd.naf.identity import (
    COMPACT_PSK_LENGTH,
    FULL_PSK_LENGTH,
    IdentityForm,
    decode_psk_identity,
    dtls_psk,
    encode_psk_identity,
    split_btid,
)

BSF = "bsf.mnc001.mcc001.pub.3gppnetwork.org"
BTID = f"I1U8vpY3qJ0hiuZNrke/NQ==@{BSF}"


@pytest.mark.parametrize(
    ("wire", "form"),
    [
        (BTID, IdentityForm.BTID),
        ("3GPP-bootstrapping" + BTID, IdentityForm.PREFIXED),
        ("3GPP-bootstrapping." + BTID, IdentityForm.PREFIXED_DOT),
        ("I1U8vpY3qJ0hiuZNrke/NQ==", IdentityForm.COMPACT),
    ],
)
def test_every_form_decodes_to_the_full_btid(wire: str, form: IdentityForm) -> None:
    decoded = decode_psk_identity(wire.encode(), bsf_name=BSF)
    assert decoded.btid == BTID
    assert decoded.form is form
    assert encode_psk_identity(BTID, form) == wire.encode()


def test_compact_form_fits_tinydtls() -> None:
    assert len(encode_psk_identity(BTID, IdentityForm.COMPACT)) == 24 <= 32
    assert len(encode_psk_identity(BTID, IdentityForm.BTID)) > 32


def test_compact_identity_needs_a_bsf_name() -> None:
    with pytest.raises(ValueError, match="BSF name"):
        decode_psk_identity(b"I1U8vpY3qJ0hiuZNrke/NQ==", bsf_name=None)
    # The full forms carry the BSF name themselves.
    assert decode_psk_identity(BTID.encode(), bsf_name=None).btid == BTID


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"3GPP-bootstrapping",
        b"3GPP-bootstrapping.",
        b"3GPP-bootstrapping-uicc" + BTID.encode(),  # UICC-based key: not what this NAF uses
        b"3GPP-bootstrapping-digest" + BTID.encode(),
        b"3GPP-bootstrappingI1U8vpY3qJ0hiuZNrke/NQ==",  # prefixed forms carry a full B-TID
        b"not base64!",
        b"ae1",  # a compact identity is base64 of 16 octets
        b"I1U8vpY3qJ0hiuZNrke/NQ",
        b"ae1@",
        b"@" + BSF.encode(),
        b"I1U8vpY3qJ0hiuZNrke/NQ==@bad domain",
        "I1U8vpY3qJ0hiuZNrke/NQ==@bsf.é.org".encode(),
        b"\xff\xfe",
        b"A" * 300 + b"@" + BSF.encode(),
    ],
)
def test_malformed_identities_are_refused(wire: bytes) -> None:
    with pytest.raises(ValueError):
        decode_psk_identity(wire, bsf_name=BSF)


def test_compact_form_only_for_rand_based_btids() -> None:
    with pytest.raises(ValueError):
        encode_psk_identity(f"opaque-id@{BSF}", IdentityForm.COMPACT)
    assert encode_psk_identity(f"opaque@{BSF}", IdentityForm.BTID) == f"opaque@{BSF}".encode()


def test_split_btid() -> None:
    assert split_btid(BTID) == ("I1U8vpY3qJ0hiuZNrke/NQ==", BSF)
    with pytest.raises(ValueError):
        split_btid("no-at-sign")


def test_psk_per_form() -> None:
    key = bytes(range(32))
    assert dtls_psk(key, IdentityForm.BTID) == key
    assert dtls_psk(key, IdentityForm.PREFIXED) == key
    assert dtls_psk(key, IdentityForm.COMPACT) == key[:16]
    assert IdentityForm.COMPACT.psk_length == COMPACT_PSK_LENGTH == 16
    assert IdentityForm.PREFIXED_DOT.psk_length == FULL_PSK_LENGTH == 32
    with pytest.raises(ValueError):
        dtls_psk(key[:16], IdentityForm.COMPACT)


@given(rand=st.binary(min_size=16, max_size=16), form=st.sampled_from(list(IdentityForm)))
def test_round_trip_any_rand(rand: bytes, form: IdentityForm) -> None:
    import base64

    btid = base64.b64encode(rand).decode() + "@" + BSF
    decoded = decode_psk_identity(encode_psk_identity(btid, form), bsf_name=BSF)
    assert (decoded.btid, decoded.form) == (btid, form)

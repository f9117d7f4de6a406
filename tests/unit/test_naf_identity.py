"""psk_identity forms and the PSK (mn_secd.psk_identity)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mn_secd.dtls import MAX_IDENTITY_LENGTH, MAX_PSK_LENGTH
from mn_secd.psk_identity import (
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
    ],
)
def test_every_form_decodes_to_the_full_btid(wire: str, form: IdentityForm) -> None:
    decoded = decode_psk_identity(wire.encode())
    assert decoded.btid == BTID
    assert decoded.form is form
    assert encode_psk_identity(BTID, form) == wire.encode()


def test_every_form_fits_our_tinydtls_and_not_upstreams() -> None:
    lengths = [len(encode_psk_identity(BTID, form)) for form in IdentityForm]
    assert lengths == [62, 80, 81]
    assert all(32 < n <= MAX_IDENTITY_LENGTH for n in lengths)


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
        b"ae1",
        b"I1U8vpY3qJ0hiuZNrke/NQ==",  # the retired "compact" form: the B-TID without its BSF name
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
        decode_psk_identity(wire)


def test_any_btid_local_part_is_carried_verbatim() -> None:
    assert encode_psk_identity(f"opaque@{BSF}", IdentityForm.BTID) == f"opaque@{BSF}".encode()
    with pytest.raises(ValueError):
        encode_psk_identity("no-at-sign", IdentityForm.BTID)


def test_split_btid() -> None:
    assert split_btid(BTID) == ("I1U8vpY3qJ0hiuZNrke/NQ==", BSF)
    with pytest.raises(ValueError):
        split_btid("no-at-sign")


def test_the_psk_is_the_whole_naf_key() -> None:
    key = bytes(range(32))
    assert dtls_psk(key) == key
    assert FULL_PSK_LENGTH == 32 <= MAX_PSK_LENGTH
    for wrong in (key[:16], key + b"\0"):
        with pytest.raises(ValueError):
            dtls_psk(wrong)


@given(rand=st.binary(min_size=16, max_size=16), form=st.sampled_from(list(IdentityForm)))
def test_round_trip_any_rand(rand: bytes, form: IdentityForm) -> None:
    import base64

    btid = base64.b64encode(rand).decode() + "@" + BSF
    decoded = decode_psk_identity(encode_psk_identity(btid, form))
    assert (decoded.btid, decoded.form) == (btid, form)

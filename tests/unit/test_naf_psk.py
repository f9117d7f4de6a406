"""The NAF's PSK lookup: cache-only inside the handshake, filled over Zn before it (mn_secd.naf.psk)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from zn_stub import BTID, IMPI, KEY, StubBsf, stub_bsf

from mn_secd.naf.psk import GbaPskCredentials, NafClaim
from mn_secd.naf.zn import ZnClient
from mn_secd.psk_identity import IdentityForm, encode_psk_identity
from mn_secd.ua import UaId

BSF_NAME = BTID.partition("@")[2]
FQDN = "in-cse.example.org"
IDENTITY = BTID.encode()  # the bare B-TID, as TS-0003 has it


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2029, 12, 31, 23, 30, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def bsf() -> AsyncIterator[StubBsf]:
    async with stub_bsf() as stub:
        yield stub


@pytest.fixture
async def zn(bsf: StubBsf) -> AsyncIterator[ZnClient]:
    async with ZnClient(bsf.url, timeout=1.0) as client:
        yield client


def creds(zn: ZnClient, clock: Clock, *, max_psk_length: int = 64, max_fetches: int = 64) -> GbaPskCredentials:
    return GbaPskCredentials(zn, FQDN, clock=clock, max_psk_length=max_psk_length, max_fetches=max_fetches)


async def test_lookup_answers_from_the_cache_only(zn: ZnClient, bsf: StubBsf) -> None:
    c = creds(zn, Clock())
    assert c.needs_fetch(IDENTITY)
    with pytest.raises(KeyError):
        c.find_dtls_psk(IDENTITY)
    assert bsf.seen == []  # the synchronous lookup never goes to the network
    await c.fetch(IDENTITY)
    psk, claim = c.find_dtls_psk(IDENTITY)
    assert psk == bytes.fromhex(KEY) and len(psk) == 32
    assert claim == NafClaim(BTID, IMPI, c.naf_id, datetime(2030, 1, 1, tzinfo=UTC), IdentityForm.BTID)
    assert not c.needs_fetch(IDENTITY)
    assert bsf.seen[0]["nafId"] == {"nafFqdn": FQDN, "uaSecProtId": "010001c0a8"}


async def test_all_forms_share_one_zn_answer(zn: ZnClient, bsf: StubBsf) -> None:
    c = creds(zn, Clock())
    await c.fetch(encode_psk_identity(BTID, IdentityForm.PREFIXED_DOT))
    for form in IdentityForm:
        psk, claim = c.find_dtls_psk(encode_psk_identity(BTID, form))
        assert psk == bytes.fromhex(KEY)
        assert (claim.btid, claim.form) == (BTID, form)
    assert len(bsf.seen) == 1


async def test_a_key_the_dtls_stack_cannot_hold_is_refused(zn: ZnClient) -> None:
    c = creds(zn, Clock(), max_psk_length=16)  # upstream tinydtls: 16 octets at most
    await c.fetch(IDENTITY)
    with pytest.raises(KeyError):
        c.find_dtls_psk(IDENTITY)  # the PSK is the 32-octet key, never a truncation of it


async def test_key_expiry_is_honoured(zn: ZnClient, bsf: StubBsf) -> None:
    clock = Clock()
    c = creds(zn, clock)
    await c.fetch(IDENTITY)
    c.find_dtls_psk(IDENTITY)
    clock.now = datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(KeyError):
        c.find_dtls_psk(IDENTITY)
    assert c.needs_fetch(IDENTITY)


async def test_an_answer_that_has_already_expired_is_not_used(zn: ZnClient, bsf: StubBsf) -> None:
    clock = Clock()
    clock.now = datetime(2030, 1, 1, 0, 0, 1, tzinfo=UTC)
    c = creds(zn, clock)
    await c.fetch(IDENTITY)
    with pytest.raises(KeyError):
        c.find_dtls_psk(IDENTITY)


@pytest.mark.parametrize(("status", "body"), [(404, b"{}"), (403, b"{}"), (500, b""), (200, b"garbage")])
async def test_failed_fetches_leave_the_lookup_failing(zn: ZnClient, bsf: StubBsf, status: int, body: bytes) -> None:
    bsf.status, bsf.body = status, body
    c = creds(zn, Clock())
    await c.fetch(IDENTITY)  # never raises
    with pytest.raises(KeyError):
        c.find_dtls_psk(IDENTITY)


async def test_concurrent_fetches_of_one_btid_make_one_zn_request(zn: ZnClient, bsf: StubBsf) -> None:
    bsf.delay = 0.2
    c = creds(zn, Clock())
    forms = [encode_psk_identity(BTID, f) for f in IdentityForm] * 3
    await asyncio.gather(*(c.fetch(identity) for identity in forms))
    assert len(bsf.seen) == 1
    assert c.zn_requests == 1


async def test_zn_requests_in_flight_are_bounded(zn: ZnClient, bsf: StubBsf) -> None:
    bsf.delay = 0.3
    c = creds(zn, Clock(), max_fetches=2)
    rands = ["AAAAAAAAAAAAAAAAAAAAAA==", "AQAAAAAAAAAAAAAAAAAAAA==", "AgAAAAAAAAAAAAAAAAAAAA=="]
    await asyncio.gather(*(c.fetch(f"{r}@{BSF_NAME}".encode()) for r in rands))
    assert len(bsf.seen) == 2


@pytest.mark.parametrize(
    "identity",
    [
        b"",
        b"ae1",
        b"\xff" * 8,
        b"3GPP-bootstrapping-uicc" + BTID.encode(),
        BTID.partition("@")[0].encode(),  # the retired "compact" form: base64(RAND) without the BSF name
    ],
)
async def test_identities_that_name_no_btid_never_reach_zn(zn: ZnClient, bsf: StubBsf, identity: bytes) -> None:
    c = creds(zn, Clock())
    assert not c.needs_fetch(identity)
    await c.fetch(identity)
    with pytest.raises(KeyError):
        c.find_dtls_psk(identity)
    assert bsf.seen == []


async def test_configurable_ua_id_changes_the_naf_id(zn: ZnClient, bsf: StubBsf) -> None:
    c = GbaPskCredentials(zn, FQDN, ua=UaId.parse("tls-psk"), clock=Clock())
    assert c.naf_id == FQDN.encode() + bytes.fromhex("01000100ae")
    await c.fetch(IDENTITY)
    assert bsf.seen[0]["nafId"]["uaSecProtId"] == "01000100ae"

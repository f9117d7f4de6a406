"""The reference BSF over real loopback HTTP, driven by our sans-IO Digest AKA and a Milenage UE.

The UE here is deliberately small and independent of the daemon's Ub client: Milenage plus the
TS 33.102 Annex C card check, so a mistake in the BSF cannot be hidden by the same mistake on the
client side. Keys are compared against :func:`kdf.ks_naf` computed from the UE's own CK and IK.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import pytest

from mn_secd.aka import AkaSuccess, AuthContext
from mn_secd.errors import BsfAnswerInvalid, DigestParseError
from mn_secd.gba import bsfxml, digest, kdf
from mn_secd.sim.bsf import GARBAGE_CHALLENGE, ZN_PATH, ReferenceBsf
from mn_secd.sim.milenage import Milenage, build_auts
from mn_secd.sim.profile import CardProfile, render_profile
from mn_secd.sim.sqn import SqnAccepted, SqnState, check_sqn, split_sqn
from mn_secd.sim.usim import USIM_AID, SoftUicc
from mn_secd.ua import UaId, naf_id
from mn_secd.uicc.auth import (
    build_authenticate,
    build_gba_naf_derivation,
    parse_authenticate_response,
    parse_naf_derivation_response,
)

NAME = "bsf.mnc001.mcc001.pub.3gppnetwork.org"
K = bytes.fromhex("465b5ce8b199b49faa5f0a2ee238a6bc")
OPC = bytes.fromhex("cd63cb71954a9f4e48a5994e37a02baf")
ME = CardProfile(iccid="8988211000000000018", imsi="001010000000001", mnc_length=2, k=K, opc=OPC, amf=b"\x00\x01")
GBA_U = CardProfile(
    iccid="8988211000000000026",
    imsi="001010000000002",
    mnc_length=2,
    k=bytes.fromhex("0396eb317b6d1c36f19c1c84cd6ffd16"),
    opc=bytes.fromhex("53c15671c60a4b731c55b4a441c0bde2"),
    gba_u=True,
    isim=True,
)
NAFS = [
    ("naf.example.org", UaId.http_digest()),
    ("in-cse.example.org", UaId.dtls_psk()),
    ("IN-CSE.Example.org.", UaId.parse("tls-psk")),
    ("mef.operator.example", UaId.parse("tls:C0A4")),
]


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@dataclass
class Ue:
    """A card-side AKA: MAC check, SQN freshness with the SEQ_MS array, RES/CK/IK or AUTS."""

    profile: CardProfile
    state: SqnState | None = None
    authenticates: int = 0

    def __post_init__(self) -> None:
        self.milenage = Milenage(self.profile.k, self.profile.opc)
        self.state = self.profile.card_state

    @property
    def impi(self) -> str:
        return self.profile.effective_impi

    def authenticate(self, rand: bytes, autn: bytes) -> tuple[bytes, bytes, bytes] | bytes:
        """(RES, CK, IK) or AUTS; a wrong MAC fails the test (the BSF must never send one)."""
        assert self.state is not None
        self.authenticates += 1
        res, ck, ik, ak = self.milenage.f2345(rand, self.profile.res_length)
        sqn = bytes(a ^ b for a, b in zip(autn[:6], ak, strict=True))
        assert self.milenage.f1(rand, sqn, autn[6:8]) == autn[8:], "AUTN MAC wrong"
        outcome = check_sqn(self.state, sqn, self.profile.sqn_policy)
        if not isinstance(outcome, SqnAccepted):
            return build_auts(self.milenage, rand, outcome.sqn_ms)
        self.state = outcome.state
        return res, ck, ik


@dataclass
class Result:
    btid: str
    lifetime: datetime
    rand: bytes
    ks: bytes
    response: httpx.Response
    state: digest.DigestState


async def _bootstrap(client: httpx.AsyncClient, ue: Ue, algorithm: str = digest.AKAV1_MD5) -> Result:
    """The TS 24.109 flow: initial request, 401, (resync ->) 401, answer, 200; checks rspauth."""
    r = await client.get("/", headers={"Authorization": digest.initial_authorization(ue.impi, NAME)})
    for _ in range(2):
        assert r.status_code == 401, r.text
        (challenge,) = digest.parse_challenges(r.headers.get_list("www-authenticate"))
        assert challenge.algorithm == algorithm and challenge.qop == ("auth-int",) and challenge.realm == NAME
        rand, autn, _ = digest.split_nonce(challenge.nonce)
        outcome = ue.authenticate(rand, autn)
        if isinstance(outcome, bytes):
            header = digest.build_resync_authorization(challenge, ue.impi, outcome)
            r = await client.get("/", headers={"Authorization": header})
            continue
        res, ck, ik = outcome
        password = digest.aka_password(algorithm, res, ck, ik)
        header, state = digest.build_authorization(challenge, ue.impi, password)
        r = await client.get("/", headers={"Authorization": header})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == bsfxml.CONTENT_TYPE
        if "authentication-info" in r.headers:  # the BSF's switch may leave it out
            assert digest.verify_rspauth(state, r.headers["authentication-info"], r.content)
        info = bsfxml.parse_bootstrapping_info(r.content, now=datetime.now(UTC))
        return Result(info.btid, info.lifetime, rand, ck + ik, r, state)
    raise AssertionError("no success after a resync")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def bsf(clock: Clock) -> AsyncIterator[ReferenceBsf]:
    server = ReferenceBsf([ME, GBA_U], name=NAME, lifetime=timedelta(minutes=30), nonce_ttl=5.0, clock=clock)
    yield server
    await server.stop()


@pytest.fixture
async def client(bsf: ReferenceBsf) -> AsyncIterator[httpx.AsyncClient]:
    url = await bsf.start("127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as c:
        yield c


async def _challenge(client: httpx.AsyncClient, impi: str) -> digest.Challenge:
    r = await client.get("/", headers={"Authorization": digest.initial_authorization(impi, NAME)})
    assert r.status_code == 401
    return digest.parse_challenges(r.headers["www-authenticate"])[0]


async def _zn(client: httpx.AsyncClient, btid: str, fqdn: str, ua: UaId, aware: bool = False) -> httpx.Response:
    body = {"btId": btid, "nafId": {"nafFqdn": fqdn, "uaSecProtId": ua.hex}, "gbaUAware": aware}
    return await client.post(ZN_PATH, json=body)


# --- the successful flows -----------------------------------------------------------------------------------


async def test_full_bootstrap(bsf: ReferenceBsf, client: httpx.AsyncClient, clock: Clock) -> None:
    ue = Ue(ME)
    result = await _bootstrap(client, ue)
    assert result.btid == base64.b64encode(result.rand).decode() + "@" + NAME
    expected_expiry = datetime.fromtimestamp(clock.now, UTC) + timedelta(minutes=30)
    assert abs(result.lifetime - expected_expiry) < timedelta(seconds=1)
    assert abs(parsedate_to_datetime(result.response.headers["expires"]) - expected_expiry) < timedelta(seconds=1)
    assert (bsf.requests, bsf.challenges, bsf.successes, bsf.resyncs) == (2, 1, 1, 0)
    assert ue.authenticates == 1
    assert bsf.last_btid == result.btid
    assert result.ks.hex() not in repr(bsf.bootstraps[result.btid])


async def test_zn_key_equals_ue_key_for_several_nafs(client: httpx.AsyncClient) -> None:
    ue = Ue(ME)
    result = await _bootstrap(client, ue)
    for fqdn, ua in NAFS:
        r = await _zn(client, result.btid, fqdn, ua, aware=True)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["meKeyMaterial"] == kdf.ks_naf(result.ks, result.rand, ue.impi, naf_id(fqdn, ua)).hex()
        assert "uiccKeyMaterial" not in answer  # a GBA_ME subscriber
        assert bsfxml.parse_lifetime(answer["keyExpiryTime"]) == result.lifetime
        assert bsfxml.parse_lifetime(answer["bootstrappingInfoCreationTime"]) < result.lifetime
        assert (answer["impi"], answer["gbaType"]) == (ue.impi, "3G_GBA")
    keys = {(await _zn(client, result.btid, f, u)).json()["meKeyMaterial"] for f, u in NAFS}
    assert len(keys) == len(NAFS)  # each NAF_Id its own key
    # the NAF FQDN is normalised the same way on both sides
    upper = (await _zn(client, result.btid, "IN-CSE.Example.org.", UaId.dtls_psk())).json()["meKeyMaterial"]
    assert upper == (await _zn(client, result.btid, "in-cse.example.org", UaId.dtls_psk())).json()["meKeyMaterial"]


async def test_gba_u_subscriber_gets_uicc_key_only_when_aware(client: httpx.AsyncClient) -> None:
    ue = Ue(GBA_U)
    result = await _bootstrap(client, ue)
    fqdn, ua = "in-cse.example.org", UaId.dtls_psk()
    nid = naf_id(fqdn, ua)
    aware = (await _zn(client, result.btid, fqdn, ua, aware=True)).json()
    assert aware["meKeyMaterial"] == kdf.ks_naf(result.ks, result.rand, ue.impi, nid).hex()
    assert aware["uiccKeyMaterial"] == kdf.ks_int_naf(result.ks, result.rand, ue.impi, nid).hex()
    unaware = (await _zn(client, result.btid, fqdn, ua, aware=False)).json()
    assert unaware["meKeyMaterial"] == aware["meKeyMaterial"]
    assert "uiccKeyMaterial" not in unaware


def _transmit(card: SoftUicc, apdu: bytes) -> tuple[bytes, int]:
    """One command through the software UICC, fetching a T=0 ``61xx`` answer with GET RESPONSE."""
    answer = card.process_apdu(apdu)
    if answer[-2] == 0x61:
        answer = card.process_apdu(bytes([0x00, 0xC0, 0x00, 0x00, answer[-1]]))
    return answer[:-2], int.from_bytes(answer[-2:], "big")


async def test_gba_u_with_the_software_uicc(client: httpx.AsyncClient) -> None:
    """GBA_U end to end: the card keeps Ks; its Ks_ext_NAF / Ks_int_NAF equal what Zn hands out."""
    card = SoftUicc(GBA_U)
    _, sw = _transmit(card, bytes([0x00, 0xA4, 0x04, 0x04, len(USIM_AID)]) + USIM_AID)
    assert sw == 0x9000
    impi = GBA_U.effective_impi
    r = await client.get("/", headers={"Authorization": digest.initial_authorization(impi, NAME)})
    (challenge,) = digest.parse_challenges(r.headers["www-authenticate"])
    rand, autn, _ = digest.split_nonce(challenge.nonce)
    data, sw = _transmit(card, build_authenticate(rand, autn, AuthContext.GBA))
    outcome = parse_authenticate_response(data, sw, AuthContext.GBA)
    assert isinstance(outcome, AkaSuccess) and outcome.ck is None  # only RES leaves the card
    header, state = digest.build_authorization(challenge, impi, outcome.res)
    r = await client.get("/", headers={"Authorization": header})
    assert r.status_code == 200 and digest.verify_rspauth(state, r.headers["authentication-info"], r.content)
    btid = bsfxml.parse_bootstrapping_info(r.content).btid
    for fqdn, ua in NAFS:
        nid = naf_id(fqdn, ua)
        data, sw = _transmit(card, build_gba_naf_derivation(nid, impi))
        ks_ext_naf = parse_naf_derivation_response(data, sw)
        answer = (await _zn(client, btid, fqdn, ua, aware=True)).json()
        assert answer["meKeyMaterial"] == ks_ext_naf.hex()
        assert answer["uiccKeyMaterial"] == (card.ks_int_naf(nid) or b"").hex()


async def test_resync_when_card_is_ahead(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    # the card has used every slot, up to SEQ 1000 in slot 3: the BSF (starting at SEQ 1) is far behind
    ahead = replace(ME, card_state=SqnState(5, (900, 900, 900, 1000, *(900,) * 28)))
    ue = Ue(ahead)
    await _bootstrap(client, ue)
    assert (bsf.requests, bsf.challenges, bsf.successes, bsf.resyncs) == (3, 2, 1, 1)
    assert ue.authenticates == 2
    assert split_sqn(bsf.sqn_he(ue.impi), 5)[0] == 1001
    # and the next bootstrap needs no resync
    bsf.reset_counters()
    await _bootstrap(client, ue)
    assert (bsf.requests, bsf.resyncs) == (2, 0)


async def test_sqn_he_moves_forward_and_cycles_ind(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    ue = Ue(ME)
    for _ in range(3):
        await _bootstrap(client, ue)
    assert ue.state is not None and ue.state.seq_ms[:3] == (1, 2, 3)
    assert bsf.resyncs == 0


async def test_set_sqn_he_behind_forces_resync(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    ue = Ue(ME)
    await _bootstrap(client, ue)
    await _bootstrap(client, ue)
    bsf.set_sqn_he(ue.impi, bytes(6))  # the BSF "lost" its SQN: replays SEQ 1
    bsf.reset_counters()
    await _bootstrap(client, ue)
    assert (bsf.requests, bsf.resyncs, bsf.successes) == (3, 1, 1)


async def test_akav2_bootstrap(clock: Clock) -> None:
    bsf = ReferenceBsf([ME], name=NAME, algorithm="akav2-md5", clock=clock)
    try:
        async with httpx.AsyncClient(base_url=await bsf.start(), timeout=5.0) as client:
            result = await _bootstrap(client, Ue(ME), digest.AKAV2_MD5)
            r = await _zn(client, result.btid, "naf.example.org", UaId.http_digest())
            assert (
                r.json()["meKeyMaterial"]
                == kdf.ks_naf(
                    result.ks, result.rand, ME.effective_impi, naf_id("naf.example.org", UaId.http_digest())
                ).hex()
            )
    finally:
        await bsf.stop()


# --- Ub failure answers ----------------------------------------------------------------------------------------


async def test_missing_or_garbled_authorization_is_400(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    assert (await client.get("/")).status_code == 400
    for header in ["Digest", 'Digest realm="x"', "Basic dXNlcjpwdw==", 'Digest username="unterminated', "garbage"]:
        assert (await client.get("/", headers={"Authorization": header})).status_code == 400, header
    assert bsf.bad_requests == 6 and bsf.challenges == 0


async def test_unknown_impi_is_403(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    header = digest.initial_authorization("999990000000001@ims.mnc099.mcc999.3gppnetwork.org", NAME)
    r = await client.get("/", headers={"Authorization": header})
    assert r.status_code == 403
    assert "www-authenticate" not in r.headers
    assert (bsf.rejections, bsf.challenges) == (1, 0)


async def test_wrong_res_is_403_and_burns_the_nonce(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    challenge = await _challenge(client, ME.effective_impi)
    header, _ = digest.build_authorization(challenge, ME.effective_impi, bytes(8))
    r = await client.get("/", headers={"Authorization": header})
    assert r.status_code == 403
    # replaying the same nonce (even with the right RES) gets a fresh challenge, never a 200
    rand, _, _ = digest.split_nonce(challenge.nonce)
    res = Milenage(K, OPC).f2345(rand)[0]
    header, _ = digest.build_authorization(challenge, ME.effective_impi, res)
    r = await client.get("/", headers={"Authorization": header})
    assert r.status_code == 401
    assert digest.parse_challenges(r.headers["www-authenticate"])[0].nonce != challenge.nonce
    assert (bsf.rejections, bsf.successes) == (1, 0)


async def test_nonce_is_single_use_after_success(client: httpx.AsyncClient) -> None:
    ue = Ue(ME)
    result = await _bootstrap(client, ue)
    replay = result.response.request.headers["authorization"]
    r = await client.get("/", headers={"Authorization": replay})
    assert r.status_code == 401
    assert not digest.parse_challenges(r.headers["www-authenticate"])[0].stale


async def test_unknown_nonce_gets_fresh_challenge(client: httpx.AsyncClient) -> None:
    challenge = await _challenge(client, ME.effective_impi)
    forged = replace(challenge, nonce=digest.make_nonce(bytes(16), bytes(16)))
    header, _ = digest.build_authorization(forged, ME.effective_impi, bytes(8))
    r = await client.get("/", headers={"Authorization": header})
    assert r.status_code == 401
    fresh = digest.parse_challenges(r.headers["www-authenticate"])[0]
    assert not fresh.stale and fresh.nonce not in (challenge.nonce, forged.nonce)


async def test_stale_nonce(bsf: ReferenceBsf, client: httpx.AsyncClient, clock: Clock) -> None:
    ue = Ue(ME)
    challenge = await _challenge(client, ue.impi)
    rand, autn, _ = digest.split_nonce(challenge.nonce)
    outcome = ue.authenticate(rand, autn)
    assert isinstance(outcome, tuple)
    header, _ = digest.build_authorization(challenge, ue.impi, outcome[0])
    clock.now += 6.0  # nonce_ttl is 5 s
    r = await client.get("/", headers={"Authorization": header})
    assert r.status_code == 401
    fresh = digest.parse_challenges(r.headers["www-authenticate"])[0]
    assert fresh.stale and fresh.nonce != challenge.nonce
    # a stale nonce with a wrong response is a plain rejection
    rand, autn, _ = digest.split_nonce(fresh.nonce)
    header, _ = digest.build_authorization(fresh, ue.impi, bytes(8))
    clock.now += 6.0
    assert (await client.get("/", headers={"Authorization": header})).status_code == 403
    # long after, the BSF has forgotten the nonce altogether: a fresh challenge, not stale
    challenge = await _challenge(client, ue.impi)
    header, _ = digest.build_authorization(challenge, ue.impi, bytes(8))
    clock.now += 60.0
    r = await client.get("/", headers={"Authorization": header})
    assert r.status_code == 401 and not digest.parse_challenges(r.headers["www-authenticate"])[0].stale
    assert bsf.successes == 0


@pytest.mark.parametrize(
    "change",
    [
        {"realm": "bsf.other.example"},
        {"opaque": "0" * 32},
        {"algorithm": "AKAv2-MD5"},
        {"qop": "auth"},
        {"uri": "/other"},
    ],
)
async def test_answer_not_matching_the_challenge_is_400(
    bsf: ReferenceBsf, client: httpx.AsyncClient, change: dict[str, str]
) -> None:
    challenge = await _challenge(client, ME.effective_impi)
    rand, _, _ = digest.split_nonce(challenge.nonce)
    res = Milenage(K, OPC).f2345(rand)[0]
    params = dict(challenge.params)
    kwargs: dict[str, str] = {}
    if "qop" in change:
        params["qop"] = "auth,auth-int"
        kwargs["qop"] = change["qop"]
    elif "uri" in change:
        kwargs["uri"] = change["uri"]
    else:
        params.update(change)
    altered = replace(
        challenge,
        realm=params["realm"],
        opaque=params["opaque"],
        algorithm=digest.canonical_algorithm(params["algorithm"]),
        qop=tuple(params["qop"].split(",")),
        params=params,
    )
    header, _ = digest.build_authorization(altered, ME.effective_impi, res, **kwargs)  # type: ignore[arg-type]
    r = await client.get("/", headers={"Authorization": header})
    assert r.status_code == 400, r.text
    assert bsf.successes == 0


async def test_nonce_of_another_user_is_403(client: httpx.AsyncClient) -> None:
    challenge = await _challenge(client, ME.effective_impi)
    header, _ = digest.build_authorization(challenge, GBA_U.effective_impi, bytes(8))
    assert (await client.get("/", headers={"Authorization": header})).status_code == 403


async def test_bad_auts(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    ue = Ue(ME)
    challenge = await _challenge(client, ue.impi)
    rand, _, _ = digest.split_nonce(challenge.nonce)
    forged = build_auts(Milenage(bytes(16), OPC), rand, bytes.fromhex("000000100000"))  # wrong K: MAC-S fails
    r = await client.get("/", headers={"Authorization": digest.build_resync_authorization(challenge, ue.impi, forged)})
    assert r.status_code == 403
    challenge = await _challenge(client, ue.impi)
    r = await client.get(
        "/", headers={"Authorization": digest.build_resync_authorization(challenge, ue.impi, b"x" * 5)}
    )
    assert r.status_code == 400
    assert bsf.resyncs == 0


async def test_resync_answer_with_a_password_is_403(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    ue = Ue(ME)
    challenge = await _challenge(client, ue.impi)
    rand, _, _ = digest.split_nonce(challenge.nonce)
    auts = build_auts(ue.milenage, rand, bytes.fromhex("000000100000"))
    header, _ = digest.build_authorization(challenge, ue.impi, b"", cnonce="c")
    header += f', auts="{base64.b64encode(auts).decode()}"'
    ok = await client.get("/", headers={"Authorization": header})
    assert ok.status_code == 401 and bsf.resyncs == 1  # the well-formed resync works
    challenge = digest.parse_challenges(ok.headers["www-authenticate"])[0]
    header, _ = digest.build_authorization(challenge, ue.impi, b"not-empty", cnonce="c")
    header += f', auts="{base64.b64encode(auts).decode()}"'
    assert (await client.get("/", headers={"Authorization": header})).status_code == 403


async def test_other_methods_are_refused(client: httpx.AsyncClient) -> None:
    assert (await client.post("/", content=b"")).status_code == 405
    assert (await client.get(ZN_PATH)).status_code == 405


# --- Zn failure answers --------------------------------------------------------------------------------


async def test_zn_404_after_expire_and_forget(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    ue = Ue(ME)
    first = await _bootstrap(client, ue)
    second = await _bootstrap(client, ue)
    fqdn, ua = NAFS[1]
    assert (await _zn(client, first.btid, fqdn, ua)).status_code == 200
    bsf.expire(first.btid)
    r = await _zn(client, first.btid, fqdn, ua)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["status"] == 404 and r.json()["cause"] == "BTID_EXPIRED"
    assert (await _zn(client, second.btid, fqdn, ua)).status_code == 200  # others are untouched
    bsf.forget(second.btid)
    r = await _zn(client, second.btid, fqdn, ua)
    assert r.status_code == 404 and r.json()["cause"] == "BTID_NOT_FOUND"
    with pytest.raises(KeyError):
        bsf.forget(second.btid)


async def test_zn_expiry_follows_the_clock(bsf: ReferenceBsf, client: httpx.AsyncClient, clock: Clock) -> None:
    result = await _bootstrap(client, Ue(ME))
    clock.now += 30 * 60 - 1
    assert (await _zn(client, result.btid, *NAFS[0])).status_code == 200
    clock.now += 1
    assert (await _zn(client, result.btid, *NAFS[0])).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"nafId": {"nafFqdn": "naf.example.org", "uaSecProtId": "0100000002"}}',
        b'{"btId": "a@b"}',
        b'{"btId": "a@b", "nafId": {"nafFqdn": "naf.example.org"}}',
        b'{"btId": "a@b", "nafId": {"nafFqdn": "naf.example.org", "uaSecProtId": "01000000"}}',
        b'{"btId": "a@b", "nafId": {"nafFqdn": "naf.example.org", "uaSecProtId": "zz00000002"}}',
        b'{"btId": "a@b", "nafId": {"nafFqdn": "naf.example.org", "uaSecProtId": "0500000002"}}',
        b'{"btId": "a@b", "nafId": {"nafFqdn": "bad host!", "uaSecProtId": "0100000002"}}',
        b'{"btId": "a@b", "nafId": {"nafFqdn": "naf.example.org", "uaSecProtId": "0100000002"}, "gbaUAware": 1}',
        b'{"btId": 5, "nafId": {"nafFqdn": "naf.example.org", "uaSecProtId": "0100000002"}}',
        b"\xff\xfe",
    ],
)
async def test_zn_malformed_requests_are_400(client: httpx.AsyncClient, body: bytes) -> None:
    r = await client.post(ZN_PATH, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["status"] == 400


async def test_zn_unknown_btid_is_404(client: httpx.AsyncClient) -> None:
    r = await _zn(client, "AAAAAAAAAAAAAAAAAAAAAA==@" + NAME, *NAFS[0])
    assert r.status_code == 404


# --- the test switches for client tests --------------------------------------------------------------------


async def test_switch_tamper_rspauth(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    bsf.tamper_rspauth = True
    with pytest.raises(AssertionError):
        await _bootstrap(client, Ue(ME))
    assert bsf.successes == 1  # the BSF thinks it succeeded; only rspauth is wrong


async def test_switch_malformed_xml(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    bsf.malformed_xml = True
    ue = Ue(ME)
    challenge = await _challenge(client, ue.impi)
    rand, autn, _ = digest.split_nonce(challenge.nonce)
    outcome = ue.authenticate(rand, autn)
    assert isinstance(outcome, tuple)
    header, state = digest.build_authorization(challenge, ue.impi, outcome[0])
    r = await client.get("/", headers={"Authorization": header})
    assert r.status_code == 200
    assert digest.verify_rspauth(state, r.headers["authentication-info"], r.content)  # rspauth is fine
    with pytest.raises(BsfAnswerInvalid):
        bsfxml.parse_bootstrapping_info(r.content)


async def test_switch_lifetime_in_past(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    bsf.lifetime_in_past = True
    with pytest.raises(BsfAnswerInvalid):
        await _bootstrap(client, Ue(ME))
    btid = bsf.last_btid
    assert btid is not None
    assert (await _zn(client, btid, *NAFS[0])).status_code == 404


async def test_switch_garbage_challenge(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    bsf.garbage_challenge = GARBAGE_CHALLENGE
    r = await client.get("/", headers={"Authorization": digest.initial_authorization(ME.effective_impi, NAME)})
    assert r.status_code == 401 and r.headers["www-authenticate"] == GARBAGE_CHALLENGE
    with pytest.raises(DigestParseError):
        digest.parse_challenges(r.headers["www-authenticate"])
    bsf.garbage_challenge = 'Digest realm="r", nonce="c2hvcnQ=", algorithm=AKAv1-MD5'  # parses; nonce too short
    r = await client.get("/", headers={"Authorization": digest.initial_authorization(ME.effective_impi, NAME)})
    with pytest.raises(DigestParseError):
        digest.split_nonce(digest.parse_challenges(r.headers["www-authenticate"])[0].nonce)


async def test_switch_busy_then_recovers(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    bsf.busy_responses = 2
    header = digest.initial_authorization(ME.effective_impi, NAME)
    assert [(await client.get("/", headers={"Authorization": header})).status_code for _ in range(3)] == [503, 503, 401]
    assert (bsf.busy, bsf.busy_responses, bsf.requests) == (2, 0, 3)
    bsf.busy_responses, bsf.busy_status = 1, 500
    assert [(await client.get("/", headers={"Authorization": header})).status_code for _ in range(2)] == [500, 401]


async def test_switch_omit_authentication_info(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    bsf.omit_authentication_info = True
    result = await _bootstrap(client, Ue(ME))
    assert result.response.status_code == 200 and "authentication-info" not in result.response.headers
    assert bsf.last_btid == result.btid  # a bootstrap like any other, for Zn too
    assert (await _zn(client, result.btid, *NAFS[0])).status_code == 200


@pytest.mark.parametrize("length", [4, 5, 12, 16])
async def test_res_of_4_to_16_octets(length: int, clock: Clock) -> None:
    """TS 33.102 allows RES of 32 to 128 bits: XRES has as many octets as the subscriber's card gives."""
    profile = replace(ME, res_length=length)
    bsf = ReferenceBsf([profile], name=NAME, clock=clock)
    url = await bsf.start()
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
            result = await _bootstrap(client, Ue(profile))
            assert (await _zn(client, result.btid, *NAFS[0])).status_code == 200
            # a card answering with another length does not authenticate
            challenge = await _challenge(client, profile.effective_impi)
            rand, _, _ = digest.split_nonce(challenge.nonce)
            res = Milenage(K, OPC).f2345(rand, 8 if length != 8 else 16)[0]
            header, _ = digest.build_authorization(challenge, profile.effective_impi, res)
            assert (await client.get("/", headers={"Authorization": header})).status_code == 403
    finally:
        await bsf.stop()


async def test_switch_delay_makes_client_time_out(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    bsf.delay = 1.0
    header = digest.initial_authorization(ME.effective_impi, NAME)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(httpx.ReadTimeout):
        await client.get("/", headers={"Authorization": header}, timeout=0.2)
    assert loop.time() - started < 0.9
    bsf.delay = 0.0
    assert (await client.get("/", headers={"Authorization": header})).status_code == 401


async def test_stop_does_not_wait_for_a_slow_answer(bsf: ReferenceBsf, client: httpx.AsyncClient) -> None:
    bsf.delay = 60.0
    header = digest.initial_authorization(ME.effective_impi, NAME)
    pending = asyncio.create_task(client.get("/", headers={"Authorization": header}))
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await bsf.stop()
    assert loop.time() - started < 5.0
    with contextlib.suppress(httpx.HTTPError):
        await pending


# --- construction and the command line --------------------------------------------------------------------


def test_duplicate_impi_refused() -> None:
    with pytest.raises(ValueError):
        ReferenceBsf([ME, replace(ME, iccid="8988211000000000034")])


async def test_start_twice_refused(bsf: ReferenceBsf) -> None:
    await bsf.start()
    with pytest.raises(RuntimeError):
        await bsf.start()


async def test_command_line_serves_ub(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "me.toml").write_text(render_profile(ME))
    (cards / "u.toml").write_text(render_profile(GBA_U))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mn_secd", "sim", "bsf", "--subscribers", str(cards), "--listen", "127.0.0.1:0",
        "--name", NAME, "--lifetime", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
        url = line.decode().strip()
        assert url.startswith("http://127.0.0.1:"), line
        async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
            for profile in (ME, GBA_U):
                result = await _bootstrap(client, Ue(profile))
                assert (await _zn(client, result.btid, *NAFS[0])).status_code == 200
            counters = (await client.get("/lab/counters")).json()  # for a lab that runs it as a process
            assert (counters["successes"], counters["zn_requests"], counters["challenges"]) == (2, 2, 2)
            assert counters["requests"] == 4 and (await client.get("/lab/counters")).json() == counters
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, stderr.decode()

"""Zn client: request shape and one typed error per failure (mn_secd.naf.zn), over loopback HTTP."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from zn_stub import BTID, GOOD, KEY, StubBsf, stub_bsf

from mn_secd.errors import BsfUnreachable, BtidUnknown, NafError, ZnAnswerInvalid, ZnRejected
from mn_secd.naf.zn import ZnClient
from mn_secd.ua import UaId


@pytest.fixture
async def bsf() -> AsyncIterator[StubBsf]:
    async with stub_bsf() as stub:
        yield stub


async def test_key_retrieval_sends_the_29309_request_and_parses_the_answer(bsf: StubBsf) -> None:
    async with ZnClient(bsf.url + "/") as zn:
        answer = await zn.retrieve(BTID, "IN-CSE.Example.org.", UaId.dtls_psk())
    assert bsf.seen == [
        {
            "btId": BTID,
            "nafId": {"nafFqdn": "in-cse.example.org", "uaSecProtId": "010001c0a8"},
            "gbaUAware": False,
        }
    ]
    assert answer.key == bytes.fromhex(KEY)
    assert answer.naf_id == b"in-cse.example.org\x01\x00\x01\xc0\xa8"
    assert answer.expires == datetime(2030, 1, 1, tzinfo=UTC)
    assert answer.impi == GOOD["impi"]
    assert answer.gba_type == "3G_GBA"
    assert KEY[:16] not in repr(answer)


async def test_404_is_btid_unknown_with_the_problem_detail(bsf: StubBsf) -> None:
    bsf.status, bsf.content_type = 404, "application/problem+json"
    bsf.body = json.dumps({"status": 404, "detail": "the B-TID has expired", "cause": "BTID_EXPIRED"}).encode()
    async with ZnClient(bsf.url) as zn:
        with pytest.raises(BtidUnknown, match="expired") as info:
            await zn.retrieve(BTID, "in-cse.example.org", UaId.dtls_psk())
    assert isinstance(info.value, NafError)


@pytest.mark.parametrize("status", [400, 403, 500, 503])
async def test_other_statuses_are_zn_rejected(bsf: StubBsf, status: int) -> None:
    bsf.status, bsf.body, bsf.content_type = status, b"nope", "text/plain"
    async with ZnClient(bsf.url) as zn:
        with pytest.raises(ZnRejected) as info:
            await zn.retrieve(BTID, "in-cse.example.org", UaId.dtls_psk())
    assert info.value.status == status


@pytest.mark.parametrize(
    "body",
    [
        b"<html>",
        b"[]",
        json.dumps({**GOOD, "meKeyMaterial": KEY[:-2]}).encode(),
        json.dumps({**GOOD, "meKeyMaterial": "zz" * 32}).encode(),
        json.dumps({k: v for k, v in GOOD.items() if k != "keyExpiryTime"}).encode(),
        json.dumps({**GOOD, "keyExpiryTime": "2030-01-01T00:00:00"}).encode(),  # no time zone
        json.dumps({**GOOD, "keyExpiryTime": "tomorrow"}).encode(),
        json.dumps({**GOOD, "impi": 42}).encode(),
    ],
)
async def test_malformed_answers_are_zn_answer_invalid(bsf: StubBsf, body: bytes) -> None:
    bsf.body = body
    async with ZnClient(bsf.url) as zn:
        with pytest.raises(ZnAnswerInvalid):
            await zn.retrieve(BTID, "in-cse.example.org", UaId.dtls_psk())


async def test_slow_bsf_fails_within_the_timeout(bsf: StubBsf) -> None:
    bsf.delay = 5.0
    async with ZnClient(bsf.url, timeout=0.3) as zn:
        start = time.monotonic()
        with pytest.raises(BsfUnreachable, match=r"no answer within 0\.3 s"):
            await zn.retrieve(BTID, "in-cse.example.org", UaId.dtls_psk())
    assert time.monotonic() - start < 2.0


async def test_nobody_listening_is_bsf_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the request is made
    async with ZnClient(f"http://127.0.0.1:{port}") as zn:
        with pytest.raises(BsfUnreachable):
            await zn.retrieve(BTID, "in-cse.example.org", UaId.dtls_psk())

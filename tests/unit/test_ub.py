"""The Ub client: the sans-IO TS 24.109 exchange fed crafted BSF answers, and the retry policy.

The BSF side of each answer is built with the same digest/XML helpers the reference BSF uses, so
every accepted answer is one a correct BSF would send and every rejected one differs in one thing.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from mn_secd.aka import AkaMacFailure, AkaSuccess, AkaSyncFailure
from mn_secd.card_identity import Application, CardIdentity
from mn_secd.errors import (
    BsfAnswerInvalid,
    BsfRejected,
    BsfServerError,
    BsfUnreachable,
    Culprit,
    DigestParseError,
    NetworkAuthenticationFailure,
)
from mn_secd.gba import digest
from mn_secd.gba.bsfxml import build_bootstrapping_info
from mn_secd.gba.ub import (
    AkaChallenge,
    UbClient,
    UbExchange,
    UbRequest,
    UbResult,
    backoff_delay,
    tls_verification,
    user_agent,
)
from mn_secd.naf_keys import GbaMode

IMPI = "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
REALM = "bsf.mnc001.mcc001.pub.3gppnetwork.org"
RAND = bytes(range(16))
AUTN = bytes(range(16, 32))
RES = bytes.fromhex("a54211d5e3ba50bf")
CK = bytes(16 * [0xC1])
IK = bytes(16 * [0x1C])
AUTS = bytes(range(100, 114))
NOW = datetime(2030, 1, 1, tzinfo=UTC)
BTID = "AAECAwQFBgcICQoLDA0ODw==@" + REALM


def challenge_header(rand: bytes = RAND, autn: bytes = AUTN, **kw: object) -> str:
    return digest.build_challenge(realm=REALM, nonce=digest.make_nonce(rand, autn), opaque="op4que", **kw)  # type: ignore[arg-type]


def answer_200(
    request: UbRequest, password: bytes, *, lifetime: datetime | None = None, body: bytes | None = None
) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """What a correct BSF answers to ``request`` when the subscriber's RES is ``password``."""
    creds = digest.parse_authorization(request.authorization)
    assert digest.verify_response(creds, password, method="GET")
    payload = build_bootstrapping_info(BTID, lifetime or NOW + timedelta(hours=1)) if body is None else body
    info = digest.build_authentication_info(creds, password, payload)
    headers = [("Authentication-Info", info), ("Content-Type", "application/vnd.3gpp.bsf+xml")]
    return 200, "OK", headers, payload


def challenge_401(header: str | None = None) -> tuple[int, str, list[tuple[str, str]], bytes]:
    return 401, "Unauthorized", [("WWW-Authenticate", header or challenge_header())], b""


def new_exchange(mode: GbaMode = GbaMode.GBA_ME, *, require_rspauth: bool = False) -> UbExchange:
    return UbExchange(impi=IMPI, realm=REALM, uri="/", mode=mode, require_rspauth=require_rspauth)


def run_to_challenge(ex: UbExchange, header: str | None = None) -> AkaChallenge:
    ex.start()
    step = ex.receive(*challenge_401(header), now=NOW)
    assert isinstance(step, AkaChallenge)
    return step


# --- the happy paths ---------------------------------------------------------------------------------


def test_first_request_names_the_impi_with_empty_response() -> None:
    request = new_exchange().start()
    creds = digest.parse_authorization(request.authorization)
    assert (creds.username, creds.realm, creds.nonce, creds.uri, creds.response) == (IMPI, REALM, "", "/", "")
    assert request.headers()["User-Agent"] == "Bootstrapping Client Agent; Release-6; 3gpp-gba"
    assert request.headers()["Accept-Encoding"] == "identity"


def test_gba_u_announces_the_uicc_token() -> None:
    assert user_agent(GbaMode.GBA_U).endswith("; 3gpp-gba-uicc")
    assert new_exchange(GbaMode.GBA_U).start().user_agent == user_agent(GbaMode.GBA_U)


def test_full_exchange_akav1() -> None:
    ex = new_exchange()
    challenge = run_to_challenge(ex)
    assert (challenge.rand, challenge.autn) == (RAND, AUTN)
    request = ex.aka_outcome(AkaSuccess(RES, CK, IK))
    creds = digest.parse_authorization(request.authorization)
    assert creds.qop == "auth-int" and creds.opaque == "op4que" and creds.auts is None
    result = ex.receive(*answer_200(request, RES), now=NOW)
    assert isinstance(result, UbResult)
    assert (result.btid, result.lifetime, result.rand) == (BTID, NOW + timedelta(hours=1), RAND)
    assert (result.aka_runs, result.http_requests) == (1, 2)
    assert result.aka.ck == CK and result.rspauth_verified
    assert "c1c1" not in repr(result).lower()  # no key material in reprs
    assert ex.state == "done"


@pytest.mark.parametrize("length", [4, 5, 8, 12, 16])
@pytest.mark.parametrize("mode", [GbaMode.GBA_ME, GbaMode.GBA_U])
def test_res_of_4_to_16_octets_is_the_akav1_password(length: int, mode: GbaMode) -> None:
    """TS 33.102 allows RES of 32 to 128 bits; AKAv1 takes its octets as the password, whatever their number."""
    res = bytes(range(0xA0, 0xA0 + length))
    ex = new_exchange(mode)
    run_to_challenge(ex)
    request = ex.aka_outcome(AkaSuccess(res, CK, IK) if mode is GbaMode.GBA_ME else AkaSuccess(res))
    assert digest.verify_response(digest.parse_authorization(request.authorization), res, method="GET")
    result = ex.receive(*answer_200(request, res), now=NOW)
    assert isinstance(result, UbResult) and result.aka.res == res


def test_full_exchange_akav2_uses_rfc4169_password() -> None:
    ex = new_exchange()
    run_to_challenge(ex, challenge_header(algorithm=digest.AKAV2_MD5))
    request = ex.aka_outcome(AkaSuccess(RES, CK, IK))
    password = digest.aka_password(digest.AKAV2_MD5, RES, CK, IK)
    assert isinstance(ex.receive(*answer_200(request, password), now=NOW), UbResult)


def test_gba_u_prefers_akav1_and_refuses_akav2_only() -> None:
    both = challenge_header(algorithm=digest.AKAV2_MD5) + ", " + challenge_header()
    ex = new_exchange(GbaMode.GBA_U)
    run_to_challenge(ex, both)
    request = ex.aka_outcome(AkaSuccess(RES))
    assert isinstance(ex.receive(*answer_200(request, RES), now=NOW), UbResult)

    ex = new_exchange(GbaMode.GBA_U)
    ex.start()
    with pytest.raises(BsfAnswerInvalid, match="AKAv2-MD5"):
        ex.receive(*challenge_401(challenge_header(algorithm=digest.AKAV2_MD5)), now=NOW)
    assert ex.aka_runs == 0


def test_resync_sends_auts_and_runs_the_new_challenge_once() -> None:
    ex = new_exchange()
    run_to_challenge(ex)
    resync = ex.aka_outcome(AkaSyncFailure(AUTS))
    creds = digest.parse_authorization(resync.authorization)
    assert creds.auts == AUTS
    assert digest.verify_response(creds, b"", method="GET")  # empty password (TS 24.109 4.4.4)
    rand2, autn2 = bytes(16 * [7]), bytes(16 * [8])
    step = ex.receive(*challenge_401(challenge_header(rand2, autn2)), now=NOW)
    assert step == AkaChallenge(rand2, autn2)
    request = ex.aka_outcome(AkaSuccess(RES, CK, IK))
    result = ex.receive(*answer_200(request, RES), now=NOW)
    assert isinstance(result, UbResult)
    assert (result.aka_runs, result.http_requests, result.rand) == (2, 3, rand2)


# --- failures ------------------------------------------------------------------------------------------


def test_mac_failure_is_never_answered() -> None:
    ex = new_exchange()
    run_to_challenge(ex)
    with pytest.raises(NetworkAuthenticationFailure):
        ex.aka_outcome(AkaMacFailure())
    assert ex.state == "failed"
    with pytest.raises(RuntimeError):  # no request can be produced any more
        ex.aka_outcome(AkaSuccess(RES, CK, IK))


def test_second_sync_failure_aborts() -> None:
    ex = new_exchange()
    run_to_challenge(ex)
    ex.aka_outcome(AkaSyncFailure(AUTS))
    ex.receive(*challenge_401(), now=NOW)
    with pytest.raises(BsfAnswerInvalid, match="still not fresh"):
        ex.aka_outcome(AkaSyncFailure(AUTS))
    assert ex.aka_runs == 2


def test_200_without_authentication_is_refused() -> None:
    ex = new_exchange()
    ex.start()
    with pytest.raises(BsfAnswerInvalid, match="without authenticating"):
        ex.receive(200, "OK", [], build_bootstrapping_info(BTID, NOW + timedelta(hours=1)), now=NOW)


@pytest.mark.parametrize("status", [400, 403, 404, 500, 503])
def test_error_status_is_bsf_rejected(status: int) -> None:
    ex = new_exchange()
    ex.start()
    with pytest.raises(BsfRejected) as info:
        ex.receive(status, "Nope", [], b"", now=NOW)
    assert info.value.status == status
    # a 5xx is the BSF failing for now (worth a retry later), a 4xx a refusal no retry changes
    assert isinstance(info.value, BsfServerError) == (status >= 500)


def test_a_refusal_says_what_the_bsf_said_about_it() -> None:
    """RFC 9457 problem details and a redirect's target reach the operator; HTML does not."""
    ex = new_exchange()
    ex.start()
    problem = rb'{"type":"about:blank","title":"Bad Request","status":400,"detail":"unknown IMPI\u0007 realm"}'
    with pytest.raises(BsfRejected) as info:
        ex.receive(400, "Bad Request", [("Content-Type", "application/problem+json; charset=utf-8")], problem, now=NOW)
    assert str(info.value) == "BSF answered 400: Bad Request: Bad Request: unknown IMPI realm"

    ex = new_exchange()
    ex.start()
    with pytest.raises(BsfRejected) as info:
        ex.receive(307, "Temporary Redirect", [("location", "http://bsf2.example/ub\r\nX: y")], b"", now=NOW)
    assert info.value.status == 307
    assert "to http://bsf2.example/ub X: y, not followed: set [gba] bsf_url" in str(info.value)

    ex, _ = _answered()
    with pytest.raises(BsfRejected) as info:
        ex.receive(403, "Forbidden", [("Content-Type", "text/html")], b"<h1>" + b"x" * 5000 + b"</h1>", now=NOW)
    assert str(info.value) == "BSF answered 403: Forbidden"


@pytest.mark.parametrize("body", [b"{", b"[1]", b'{"title": {"a": 1}}', b"[" * 100_000, b"\xff"])
def test_a_problem_body_that_is_not_one_adds_nothing(body: bytes) -> None:
    ex = new_exchange()
    ex.start()
    with pytest.raises(BsfRejected) as info:
        ex.receive(404, "Not Found", [("Content-Type", "application/problem+json")], body, now=NOW)
    assert str(info.value) == "BSF answered 404: Not Found"


def test_a_long_refusal_detail_is_cut() -> None:
    ex = new_exchange()
    ex.start()
    body = ('{"detail": "' + "d" * 1000 + '"}').encode()
    with pytest.raises(BsfRejected) as info:
        ex.receive(400, "Bad Request", [("Content-Type", "application/problem+json")], body, now=NOW)
    assert str(info.value).endswith("d" * 160 + "...")


def test_a_5xx_to_the_response_is_a_server_error() -> None:
    ex, _ = _answered()
    with pytest.raises(BsfServerError) as info:
        ex.receive(500, "Internal Server Error", [], b"", now=NOW)
    assert info.value.status == 500 and ex.aka_runs == 1


def test_401_after_the_response_is_a_rejection_naming_stale() -> None:
    ex = new_exchange()
    run_to_challenge(ex)
    ex.aka_outcome(AkaSuccess(RES, CK, IK))
    with pytest.raises(BsfRejected, match="stale") as info:
        ex.receive(*challenge_401(challenge_header(stale=True)), now=NOW)
    assert info.value.status == 401
    assert ex.aka_runs == 1


@pytest.mark.parametrize(
    "header",
    [
        'Digest realm="x", nonce="unterminated',
        "Digest realm=, nonce=abc",
        'Digest realm="x", nonce="!!notbase64!!", algorithm=AKAv1-MD5',
        'Digest realm="x", nonce="AAEC", algorithm=AKAv1-MD5',  # too short for RAND and AUTN
        "\x00\x01garbage",
    ],
)
def test_garbage_challenges_are_digest_parse_errors(header: str) -> None:
    ex = new_exchange()
    ex.start()
    with pytest.raises(DigestParseError):
        ex.receive(*challenge_401(header), now=NOW)
    assert ex.aka_runs == 0


@pytest.mark.parametrize(
    "headers",
    [[], [("WWW-Authenticate", 'Basic realm="bsf"')], [("WWW-Authenticate", 'Digest realm="r", nonce="n"')]],
)
def test_401_without_an_aka_challenge_is_invalid(headers: list[tuple[str, str]]) -> None:
    ex = new_exchange()
    ex.start()
    with pytest.raises(BsfAnswerInvalid):
        ex.receive(401, "Unauthorized", headers, b"", now=NOW)


def _answered() -> tuple[UbExchange, UbRequest]:
    ex = new_exchange()
    run_to_challenge(ex)
    return ex, ex.aka_outcome(AkaSuccess(RES, CK, IK))


def test_tampered_rspauth_is_refused() -> None:
    ex, request = _answered()
    status, reason, headers, body = answer_200(request, RES)
    info = headers[0][1]
    start = info.index('rspauth="') + len('rspauth="')
    flipped = "0" if info[start] != "0" else "1"
    headers[0] = ("Authentication-Info", info[:start] + flipped + info[start + 1 :])
    with pytest.raises(BsfAnswerInvalid, match="rspauth"):
        ex.receive(status, reason, headers, body, now=NOW)


def test_rspauth_over_another_body_is_refused() -> None:
    ex, request = _answered()
    status, reason, headers, body = answer_200(request, RES)
    forged = body.replace(b"AAEC", b"ZZEC")
    with pytest.raises(BsfAnswerInvalid, match="rspauth"):
        ex.receive(status, reason, headers, forged, now=NOW)


def test_a_bsf_header_that_cannot_be_read_is_the_bsfs_fault() -> None:
    """The Digest parser blames no one; the exchange knows the BSF wrote the header."""
    ex = new_exchange()
    ex.start()
    with pytest.raises(DigestParseError) as info:
        ex.receive(*challenge_401('Digest realm="x", nonce="unterminated'), now=NOW)
    assert info.value.culprit is Culprit.BSF and isinstance(info.value, BsfAnswerInvalid)
    ex, request = _answered()
    status, reason, headers, body = answer_200(request, RES)
    headers[0] = ("Authentication-Info", 'rspauth="unterminated')
    with pytest.raises(DigestParseError) as info:
        ex.receive(status, reason, headers, body, now=NOW)
    assert info.value.culprit is Culprit.BSF and ex.state == "failed"


def test_missing_authentication_info_is_accepted_unless_required() -> None:
    """RFC 2617 makes Authentication-Info optional and TS 33.220 does not ask for it in the 200 OK."""
    ex, request = _answered()
    status, reason, headers, body = answer_200(request, RES)
    result = ex.receive(status, reason, headers[1:], body, now=NOW)
    assert isinstance(result, UbResult) and result.btid == BTID and not result.rspauth_verified

    ex = new_exchange(require_rspauth=True)
    run_to_challenge(ex)
    request = ex.aka_outcome(AkaSuccess(RES, CK, IK))
    status, reason, headers, body = answer_200(request, RES)
    with pytest.raises(BsfAnswerInvalid, match="without rspauth"):
        ex.receive(status, reason, headers[1:], body, now=NOW)
    assert ex.state == "failed"


@pytest.mark.parametrize("require", [False, True])
def test_authentication_info_without_rspauth_counts_as_missing(require: bool) -> None:
    ex = new_exchange(require_rspauth=require)
    run_to_challenge(ex)
    request = ex.aka_outcome(AkaSuccess(RES, CK, IK))
    status, reason, headers, body = answer_200(request, RES)
    headers[0] = ("Authentication-Info", 'nextnonce="abc", qop=auth-int')
    if require:
        with pytest.raises(BsfAnswerInvalid, match="without rspauth"):
            ex.receive(status, reason, headers, body, now=NOW)
    else:
        result = ex.receive(status, reason, headers, body, now=NOW)
        assert isinstance(result, UbResult) and not result.rspauth_verified


@pytest.mark.parametrize("require", [False, True])
def test_a_wrong_rspauth_fails_whatever_the_policy(require: bool) -> None:
    ex = new_exchange(require_rspauth=require)
    run_to_challenge(ex)
    request = ex.aka_outcome(AkaSuccess(RES, CK, IK))
    status, reason, headers, body = answer_200(request, RES)
    creds = digest.parse_authorization(request.authorization)
    forged = digest.build_authentication_info(creds, b"\x00" * 8, body)  # rspauth from one who lacks RES
    headers[0] = ("Authentication-Info", forged)
    with pytest.raises(BsfAnswerInvalid, match="rspauth is wrong"):
        ex.receive(status, reason, headers, body, now=NOW)


def test_two_authentication_info_headers_are_refused() -> None:
    ex, request = _answered()
    status, reason, headers, body = answer_200(request, RES)
    with pytest.raises(BsfAnswerInvalid, match="2 Authentication-Info"):
        ex.receive(status, reason, [headers[0], *headers], body, now=NOW)


def test_malformed_xml_is_refused_even_with_a_valid_rspauth() -> None:
    ex, request = _answered()
    with pytest.raises(BsfAnswerInvalid, match="XML"):
        ex.receive(*answer_200(request, RES, body=b"<BootstrappingInfo><btid>"), now=NOW)


def test_lifetime_in_the_past_is_refused() -> None:
    ex, request = _answered()
    with pytest.raises(BsfAnswerInvalid, match="past"):
        ex.receive(*answer_200(request, RES, lifetime=NOW - timedelta(seconds=1)), now=NOW)


# --- backoff -------------------------------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(7)
    for attempt, step in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 4  # really jittered


# --- the asyncio driver over an in-process HTTP transport ----------------------------------------------

IDENTITY = CardIdentity(
    iccid="89882110000000000018",
    imsi="001010000000001",
    mnc_length=2,
    impi=IMPI,
    application=Application.USIM,
    aid=bytes.fromhex("a0000000871002"),
    gba_u=False,
    transport="csim",
)


class ScriptedBsf:
    """Answers GET / from a script of callables; counts requests."""

    def __init__(self, *steps: object) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        assert callable(step)
        result = step(request)
        if asyncio.iscoroutine(result):
            result = await result
        assert isinstance(result, httpx.Response)
        return result


def http_challenge(_: httpx.Request) -> httpx.Response:
    return httpx.Response(401, headers={"WWW-Authenticate": challenge_header()})


def http_success(request: httpx.Request) -> httpx.Response:
    status, _, headers, body = answer_200(UbRequest(request.headers["Authorization"], ""), RES)
    return httpx.Response(status, headers=headers, content=body)


class CountingAka:
    def __init__(self) -> None:
        self.runs: list[tuple[bytes, bytes]] = []

    async def __call__(self, rand: bytes, autn: bytes) -> AkaSuccess:
        self.runs.append((rand, autn))
        return AkaSuccess(RES, CK, IK)


def client(bsf: ScriptedBsf, **kw: object) -> UbClient:
    options: dict[str, object] = {"timeout": 1.0, "retries": 2, "backoff": 0.001, "max_backoff": 0.002}
    options.update(kw)
    return UbClient(
        "http://bsf.test:8080",
        transport=httpx.MockTransport(bsf),
        clock=lambda: NOW.timestamp(),
        **options,  # type: ignore[arg-type]
    )


async def test_client_runs_the_exchange() -> None:
    bsf = ScriptedBsf(http_challenge, http_success)
    aka = CountingAka()
    async with client(bsf) as ub:
        result = await ub.run(IDENTITY, aka, mode=GbaMode.GBA_ME)
    assert result.btid == BTID and aka.runs == [(RAND, AUTN)]
    assert [str(r.url) for r in bsf.requests] == ["http://bsf.test:8080/"] * 2
    assert bsf.requests[0].headers["User-Agent"].startswith("Bootstrapping Client Agent; Release-6")


async def test_transport_failures_before_aka_are_retried() -> None:
    bsf = ScriptedBsf(
        httpx.ConnectError("refused"),
        lambda _: httpx.Response(503),
        http_challenge,
        http_success,
    )
    aka = CountingAka()
    async with client(bsf) as ub:
        await ub.run(IDENTITY, aka, mode=GbaMode.GBA_ME)
    assert len(bsf.requests) == 4 and len(aka.runs) == 1


async def test_a_500_to_the_first_request_is_retried_and_after_aka_is_not() -> None:
    bsf = ScriptedBsf(lambda _: httpx.Response(500), http_challenge, http_success)
    aka = CountingAka()
    async with client(bsf) as ub:
        await ub.run(IDENTITY, aka, mode=GbaMode.GBA_ME)
    assert len(bsf.requests) == 3 and len(aka.runs) == 1

    bsf = ScriptedBsf(http_challenge, lambda _: httpx.Response(500), http_success)
    aka = CountingAka()
    async with client(bsf) as ub:
        with pytest.raises(BsfServerError) as info:
            await ub.run(IDENTITY, aka, mode=GbaMode.GBA_ME)
    assert info.value.status == 500 and len(bsf.requests) == 2 and len(aka.runs) == 1


async def test_a_bsf_still_failing_after_the_retries_is_a_server_error() -> None:
    bsf = ScriptedBsf(*[lambda _: httpx.Response(503)] * 3)
    async with client(bsf) as ub:
        with pytest.raises(BsfServerError) as info:
            await ub.run(IDENTITY, CountingAka(), mode=GbaMode.GBA_ME)
    assert info.value.status == 503 and len(bsf.requests) == 3


async def test_retries_are_bounded() -> None:
    bsf = ScriptedBsf(*[httpx.ConnectError("refused")] * 3)
    aka = CountingAka()
    async with client(bsf) as ub:
        with pytest.raises(BsfUnreachable):
            await ub.run(IDENTITY, aka, mode=GbaMode.GBA_ME)
    assert len(bsf.requests) == 3 and aka.runs == []


async def test_no_retry_once_the_card_has_run_aka() -> None:
    """After the AKA run a lost answer is resent once, the same request: never a new exchange."""
    bsf = ScriptedBsf(http_challenge, httpx.ReadError("reset"), httpx.ReadError("reset"), http_success)
    aka = CountingAka()
    async with client(bsf) as ub:
        with pytest.raises(BsfUnreachable):
            await ub.run(IDENTITY, aka, mode=GbaMode.GBA_ME)
    assert len(bsf.requests) == 3 and len(aka.runs) == 1
    assert bsf.requests[1].headers["Authorization"] == bsf.requests[2].headers["Authorization"]
    assert 'response=""' not in bsf.requests[2].headers["Authorization"]  # not a new first request


@pytest.mark.parametrize(
    "lost",
    [
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("connection reset"),
        httpx.WriteError("broken pipe"),
    ],
)
async def test_an_answer_lost_with_its_connection_is_resent_once_without_a_second_aka(lost: Exception) -> None:
    bsf = ScriptedBsf(http_challenge, lost, http_success)
    aka = CountingAka()
    async with client(bsf) as ub:
        result = await ub.run(IDENTITY, aka, mode=GbaMode.GBA_ME)
    assert result.btid == BTID and len(aka.runs) == 1 and result.aka_runs == 1
    assert len(bsf.requests) == 3
    assert bsf.requests[1].headers["Authorization"] == bsf.requests[2].headers["Authorization"]


async def test_a_bsf_gone_after_aka_is_not_asked_again() -> None:
    bsf = ScriptedBsf(http_challenge, httpx.ConnectError("refused"), http_success)
    aka = CountingAka()
    async with client(bsf) as ub:
        with pytest.raises(BsfUnreachable, match="refused"):
            await ub.run(IDENTITY, aka, mode=GbaMode.GBA_ME)
    assert len(bsf.requests) == 2 and len(aka.runs) == 1


async def test_slow_bsf_times_out() -> None:
    async def slow(_: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(500)

    bsf = ScriptedBsf(slow)
    async with client(bsf, timeout=0.05, retries=0) as ub:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BsfUnreachable, match="did not answer"):
            await ub.run(IDENTITY, CountingAka(), mode=GbaMode.GBA_ME)
        assert loop.time() - started < 1.0


async def test_the_timeout_is_one_budget_for_the_whole_attempt() -> None:
    """A BSF that never answers costs ``timeout`` seconds, not ``timeout`` per try plus the pauses."""

    async def hang(_: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    bsf = ScriptedBsf(*[hang] * 4)
    async with client(bsf, timeout=0.4, retries=3, backoff=0.05, max_backoff=0.1) as ub:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BsfUnreachable, match=r"within the 0\.4 s budget"):
            await ub.run(IDENTITY, CountingAka(), mode=GbaMode.GBA_ME)
        elapsed = loop.time() - started
    assert 0.35 <= elapsed < 0.6, elapsed
    assert len(bsf.requests) == 1  # the first try took the whole budget: no retry could fit


async def test_retries_stop_when_the_budget_is_spent() -> None:
    async def refuse_slowly(_: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.15)
        raise httpx.ConnectError("refused")

    bsf = ScriptedBsf(*[refuse_slowly] * 10)
    async with client(bsf, timeout=0.5, retries=9, backoff=0.05, max_backoff=0.05) as ub:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BsfUnreachable):
            await ub.run(IDENTITY, CountingAka(), mode=GbaMode.GBA_ME)
        elapsed = loop.time() - started
    assert elapsed < 0.7, elapsed
    assert 2 <= len(bsf.requests) <= 4  # as many tries as fit in half a second, not ten


async def test_the_cards_time_is_not_charged_to_the_bsf_budget() -> None:
    class SlowCard(CountingAka):
        async def __call__(self, rand: bytes, autn: bytes) -> AkaSuccess:
            await asyncio.sleep(0.4)  # longer than the whole HTTP budget
            return await super().__call__(rand, autn)

    bsf = ScriptedBsf(http_challenge, http_success)
    async with client(bsf, timeout=0.3) as ub:
        result = await ub.run(IDENTITY, SlowCard(), mode=GbaMode.GBA_ME)
    assert result.btid == BTID


async def test_oversized_answer_is_refused() -> None:
    bsf = ScriptedBsf(http_challenge, lambda _: httpx.Response(200, content=b"x" * 100_000))
    async with client(bsf) as ub:
        with pytest.raises(BsfAnswerInvalid, match="longer"):
            await ub.run(IDENTITY, CountingAka(), mode=GbaMode.GBA_ME)


def test_bsf_url_is_derived_from_the_imsi_unless_configured() -> None:
    assert UbClient().url_for(IDENTITY) == "http://bsf.mnc001.mcc001.pub.3gppnetwork.org"
    assert UbClient("https://bsf.example:8443/ub").url_for(IDENTITY) == "https://bsf.example:8443/ub"
    with pytest.raises(ValueError):
        UbClient("ftp://bsf.example")


@pytest.mark.parametrize("bsf_url", [None, "http://bsf.example.net:8080"])
def test_a_plain_http_bsf_loads_no_ca_and_would_refuse_any_tls_server(bsf_url: str | None) -> None:
    context = tls_verification(bsf_url)
    assert isinstance(context, ssl.SSLContext)
    assert context.cert_store_stats()["x509_ca"] == 0  # the CA bundle is not loaded for nothing
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname  # fails closed


def test_an_https_bsf_is_verified_against_the_system_store_and_the_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator CA the gateway trusts (OpenSSL's default paths; SSL_CERT_FILE stands in for
    /etc/ssl/certs here) is trusted, and so is httpx's bundle of public CAs."""
    operator_ca = tmp_path / "operator-ca.pem"
    operator_ca.write_bytes(lab_ca_pem("Operator BSF Root CA"))
    monkeypatch.setenv("SSL_CERT_FILE", str(operator_ca))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))  # nothing else from this machine's store
    context = tls_verification("https://bsf.example.net")
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    subjects = {dict(pair[0] for pair in ca["subject"]).get("commonName") for ca in context.get_ca_certs()}
    assert "Operator BSF Root CA" in subjects
    assert len(subjects) > 100  # certifi's public roots too


def lab_ca_pem(name: str) -> bytes:
    """A self-signed CA certificate (P-256), as an operator's own PKI root."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)

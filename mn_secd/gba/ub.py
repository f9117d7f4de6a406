"""The Ub client: GBA bootstrapping with the operator's BSF over HTTP Digest AKA (TS 24.109 4).

Two layers, aioquic style:

* :class:`UbExchange` is the TS 24.109 flow as a small sans-IO state machine. It is fed HTTP
  responses and AKA outcomes and answers with the next request, an AKA challenge for the card, or
  the final :class:`UbResult`. It decides everything that matters for security: a MAC failure
  (the challenge did not come from our home network) aborts with
  :class:`~mn_secd.errors.NetworkAuthenticationFailure` and is never answered with a RES; a
  synchronisation failure is answered once with AUTS and the BSF's fresh challenge is run once; a
  200 with a wrong ``rspauth``, with malformed XML or with a lifetime in the past is refused.
* :class:`UbClient` drives it over httpx (light to import; the daemon does not load aiohttp). It
  adds the URL (configured, or derived from the IMSI), one time budget for the whole attempt, and
  bounded retries with exponential backoff and jitter, but only for the first request: once the
  card has run an AUTHENTICATE, a transport failure ends the bootstrap, because repeating it could
  only mean a new challenge and a new AKA run, which is the caller's decision (the keystore
  throttles those). A refusal for now (5xx, 429) with ``Retry-After`` (RFC 9110 10.2.3) is retried
  no sooner than it asks, or not at all in this attempt when that does not fit in the budget; the
  error then carries the ask (:attr:`~mn_secd.errors.BsfServerError.retry_after`) to the planner.
  :func:`parse_retry_after` reads the header, purely, with the clock passed in.

``rspauth`` (RFC 2617 3.2.3, RFC 3310 3.4) is the BSF's proof that it knew RES, i.e. that the 200 OK
and the B-TID and lifetime in it come from the network the card authenticated. RFC 2617 makes the
``Authentication-Info`` header optional and TS 33.220 does not require it in the 200 OK, and BSFs in
the field omit it, so a missing one is a policy (``require_rspauth``): accepted by default, with a
warning, and reported in :attr:`UbResult.rspauth_verified`. A present but wrong ``rspauth`` always
fails: that answer is forged or damaged.

RES is 4 to 16 octets (TS 33.102 6.3.2 allows 32 to 128 bits); AKAv1 uses it as the Digest password
octets as they are, whatever their number (RFC 3310 3.4).

User-Agent carries ``Bootstrapping Client Agent; Release-6`` (the TS 24.109 example) and a product
token: ``3gpp-gba`` for GBA_ME and ``3gpp-gba-uicc`` for GBA_U. The GBA_U token is NOT confirmed
by a specification text we could read (the README's "Decisions" says so too); a BSF decides GBA_U
from the subscription (its GBA User Security Settings, TS 33.220), not from this header, so the
token is informative.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

import httpx

from mn_secd.aka import AkaMacFailure, AkaResult, AkaSuccess, AkaSyncFailure
from mn_secd.card_identity import CardIdentity
from mn_secd.errors import (
    BsfAnswerInvalid,
    BsfDigestInvalid,
    BsfRejected,
    BsfServerError,
    BsfUnreachable,
    DigestParseError,
    NetworkAuthenticationFailure,
    RetryAfterInvalid,
)
from mn_secd.gba import digest
from mn_secd.gba.bsfxml import MAX_BODY, parse_bootstrapping_info
from mn_secd.logs import btid_hash
from mn_secd.naf_keys import GbaMode
from mn_secd.nai import bsf_url

log = logging.getLogger(__name__)
_T = TypeVar("_T")

USER_AGENT_BASE = "Bootstrapping Client Agent; Release-6"
TOKEN_GBA = "3gpp-gba"
#: Unconfirmed (see the module docstring): informative only.
TOKEN_GBA_UICC = "3gpp-gba-uicc"
#: Statuses of the first request that mean "the BSF is there but failing or overloaded for now",
#: retried like a lost connection (a 500 too: before any AKA run a retry costs the card nothing), no
#: sooner than the answer's ``Retry-After`` asks.
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
#: A ``Retry-After`` value longer than this that is not all digits cannot be a date: refused unread.
MAX_RETRY_AFTER_TEXT = 64

#: What the card is asked to do with one challenge: AUTHENTICATE(RAND, AUTN) in the mode's context.
AkaCallback = Callable[[bytes, bytes], Awaitable[AkaResult]]


def user_agent(mode: GbaMode) -> str:
    return f"{USER_AGENT_BASE}; {TOKEN_GBA_UICC if mode is GbaMode.GBA_U else TOKEN_GBA}"


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay before retry number ``attempt`` (0-based): exponential, capped, "equal jitter".

    Half of the exponential step is fixed, half random, so a fleet of gateways whose BSF came back
    at the same moment spreads out instead of retrying in step, and no retry comes immediately.
    """
    step = min(cap, math.ldexp(base, attempt))  # base * 2**attempt
    return step / 2 + rng.uniform(0.0, step / 2)


# --- Retry-After (RFC 9110 10.2.3) -------------------------------------------------------------------

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "|".join(_MONTHS)
_TIME = r"(\d{2}):(\d{2}):(\d{2})"
#: IMF-fixdate, "Sun, 06 Nov 1994 08:49:37 GMT" (the form senders must use).
_IMF_FIXDATE = re.compile(rf"(?:{'|'.join(_DAYS)}), (\d{{2}}) ({_MONTH}) (\d{{4}}) {_TIME} GMT")
#: The obsolete forms recipients must still read (RFC 9110 5.6.7): rfc850-date and asctime-date.
_RFC850_DATE = re.compile(rf"(?:{'|'.join(_WEEKDAYS)}), (\d{{2}})-({_MONTH})-(\d{{2}}) {_TIME} GMT")
_ASCTIME_DATE = re.compile(rf"(?:{'|'.join(_DAYS)}) ({_MONTH}) ([ \d]\d) {_TIME} (\d{{4}})")


def _two_digit_year(yy: int, now: datetime) -> int:
    """RFC 9110 5.6.7: a year more than 50 years ahead is the most recent past year with those digits."""
    year = now.year - now.year % 100 + yy
    return year - 100 if year > now.year + 50 else year


def parse_http_date(text: str, now: datetime) -> datetime:
    """An HTTP-date (RFC 9110 5.6.7) in any of its three forms, as an aware UTC datetime.

    ``now`` (aware) only places a two-digit rfc850 year. Raises ValueError if it is none of them.
    """
    if m := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hh, mm, ss = m.groups()
    elif m := _RFC850_DATE.fullmatch(text):
        day, month, yy, hh, mm, ss = m.groups()
        year = str(_two_digit_year(int(yy), now))
    elif m := _ASCTIME_DATE.fullmatch(text):
        month, day, hh, mm, ss, year = m.groups()
    else:
        raise ValueError("not an HTTP-date")
    # datetime refuses what no calendar has (31 Feb, 25:00); a leap second (:60) is read as :59.
    return datetime(int(year), _MONTHS.index(month) + 1, int(day), int(hh), int(mm), min(int(ss), 59), tzinfo=UTC)


def parse_retry_after(value: str, now: datetime) -> float:
    """Seconds a ``Retry-After`` value asks to wait from ``now``: delay-seconds or an HTTP-date.

    Pure, with the clock passed in. A date in the past asks for no wait (0.0); an absurdly large
    delay is ``math.inf`` (the caller caps it). Anything else (negative, fractional, garbage, an
    impossible date) raises :class:`~mn_secd.errors.RetryAfterInvalid`.
    """
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text) if len(text) <= 15 else math.inf  # 10**15 s: longer than any cap
    if len(text) > MAX_RETRY_AFTER_TEXT:
        raise RetryAfterInvalid(f"Retry-After of {len(text)} characters is neither a delay nor a date")
    try:
        when = parse_http_date(text, now)
    except ValueError:
        raise RetryAfterInvalid(f"Retry-After {text[:40]!r} is neither delay-seconds nor an HTTP-date") from None
    return max(0.0, (when - now).total_seconds())


def retry_after(headers: Sequence[tuple[str, str]], now: datetime) -> float | None:
    """The ``Retry-After`` of an answer (:func:`parse_retry_after`); None without one.

    The header is a single value; several that differ say nothing usable (RetryAfterInvalid).
    """
    values = {v.strip() for k, v in headers if k.lower() == "retry-after"}
    if not values:
        return None
    if len(values) > 1:
        raise RetryAfterInvalid(f"{len(values)} different Retry-After values in one answer")
    return parse_retry_after(values.pop(), now)


# --- sans-IO ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UbRequest:
    """One Ub request: always ``GET`` on the BSF URI; only the headers change."""

    authorization: str
    user_agent: str

    def headers(self) -> dict[str, str]:
        # identity encoding: rspauth covers the body bytes as sent, so nothing may transform them
        return {
            "Authorization": self.authorization,
            "User-Agent": self.user_agent,
            "Accept": "*/*",
            "Accept-Encoding": "identity",
        }


@dataclass(frozen=True, slots=True)
class AkaChallenge:
    """The card must run AUTHENTICATE on this challenge (exactly once)."""

    rand: bytes
    autn: bytes


@dataclass(frozen=True, slots=True)
class UbResult:
    """A bootstrap the BSF confirmed (``rspauth`` checked): what the session is made of."""

    btid: str
    lifetime: datetime  # timezone-aware UTC, in the future when received
    rand: bytes
    aka: AkaSuccess  # RES (and CK, IK for GBA_ME); its repr shows no key material
    aka_runs: int  # AUTHENTICATEs this bootstrap cost: 1, or 2 after a resync
    http_requests: int  # 2, or 3 after a resync (retries of the first request not counted)
    #: False when the BSF's 200 carried no ``rspauth`` and the policy accepted that.
    rspauth_verified: bool = True


class _State(enum.Enum):
    START = "start"
    WAIT_CHALLENGE = "wait-challenge"  # sent the request with the empty response
    AKA = "aka"  # challenge handed to the card
    WAIT_RESYNC = "wait-resync"  # sent AUTS; a fresh challenge is due
    WAIT_ANSWER = "wait-answer"  # sent RES; a 200 with the bootstrapping info is due
    DONE = "done"
    FAILED = "failed"


class UbExchange:
    """The TS 24.109 4.4 flow for one bootstrap, with no sockets and no clock of its own.

    Driving loop: :meth:`start` gives the first request; each HTTP response goes to
    :meth:`receive`, which returns either an :class:`AkaChallenge` (run it on the card and give the
    outcome to :meth:`aka_outcome`, which returns the next request) or the :class:`UbResult`.
    Every failure raises a typed :class:`~mn_secd.errors.GbaError` and leaves the exchange FAILED.
    """

    def __init__(
        self,
        *,
        impi: str,
        realm: str,
        uri: str,
        mode: GbaMode,
        method: str = "GET",
        require_rspauth: bool = False,
    ) -> None:
        self.impi = impi
        self.realm = realm
        self.uri = uri
        self.mode = mode
        self.method = method
        self.require_rspauth = require_rspauth
        self._user_agent = user_agent(mode)
        #: GBA_U cards keep CK and IK, which an AKAv2 password needs: only AKAv1 can be answered.
        self._algorithms = (digest.AKAV1_MD5,) if mode is GbaMode.GBA_U else (digest.AKAV1_MD5, digest.AKAV2_MD5)
        self._state = _State.START
        self._challenge: digest.Challenge | None = None
        self._rand = b""
        self._digest: digest.DigestState | None = None
        self._success: AkaSuccess | None = None
        self._resynced = False
        self._retry_after: float | None = None
        self.aka_runs = 0
        self.http_requests = 0

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def may_retry_transport(self) -> bool:
        """True while no AKA has run: resending the first request cannot cost an AUTHENTICATE."""
        return self._state is _State.WAIT_CHALLENGE and self.aka_runs == 0

    def start(self) -> UbRequest:
        self._expect(_State.START)
        self._state = _State.WAIT_CHALLENGE
        self.http_requests = 1
        return UbRequest(digest.initial_authorization(self.impi, self.realm, self.uri), self._user_agent)

    def receive(
        self,
        status: int,
        reason: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        now: datetime,
        *,
        retry_after: float | None = None,
    ) -> AkaChallenge | UbResult:
        """The BSF's answer to the last request. ``headers`` as (name, value) pairs, repeats kept.

        ``retry_after``: the seconds its ``Retry-After`` asks for (:func:`retry_after`, read by the
        caller, who logs a value it cannot use); a refusal for now (5xx, 429) carries it.
        """
        self._retry_after = retry_after
        if self._state in (_State.WAIT_CHALLENGE, _State.WAIT_RESYNC):
            return self._guard(lambda: self._on_challenge(status, reason, headers, body))
        self._expect(_State.WAIT_ANSWER)
        return self._guard(lambda: self._on_answer(status, reason, headers, body, now))

    def aka_outcome(self, outcome: AkaResult) -> UbRequest:
        """What the card said about the challenge; returns the next request to send."""
        self._expect(_State.AKA)
        self.aka_runs += 1
        return self._guard(lambda: self._on_aka(outcome))

    # -- transitions --

    def _on_challenge(self, status: int, reason: str, headers: Sequence[tuple[str, str]], body: bytes) -> AkaChallenge:
        after_resync = self._state is _State.WAIT_RESYNC
        if status == 200:
            raise BsfAnswerInvalid("the BSF answered 200 without authenticating the client")
        if status != 401:
            raise _rejected(status, refusal_reason(reason or "no challenge", headers, body), self._retry_after)
        values = [v for k, v in headers if k.lower() == "www-authenticate"]
        if not values:
            raise BsfAnswerInvalid("401 without a WWW-Authenticate header")
        offered = digest.parse_challenges(values)
        challenge = digest.select_challenge(offered, self._algorithms)
        if challenge is None:
            names = ", ".join(sorted({c.algorithm for c in offered})) or "none"
            raise BsfAnswerInvalid(f"no AKA challenge this {self.mode.value} client can answer (offered: {names})")
        nonce = digest.split_nonce(challenge.nonce)
        self._challenge = challenge
        self._rand = nonce.rand
        self._state = _State.AKA
        log.debug(
            "Ub challenge",
            extra={"event": "ub.challenge", "algorithm": challenge.algorithm, "after_resync": after_resync},
        )
        return AkaChallenge(nonce.rand, nonce.autn)

    def _on_aka(self, outcome: AkaResult) -> UbRequest:
        challenge = self._challenge
        assert challenge is not None  # set with the AKA state
        if isinstance(outcome, AkaMacFailure):
            # RFC 3310 allows an answer with an empty password; we do not answer a network that
            # failed to authenticate itself at all: nothing it could do with the answer helps us.
            raise NetworkAuthenticationFailure(
                "the card rejected the BSF's AUTN (MAC failure): the challenge did not come from the home network"
            )
        if isinstance(outcome, AkaSyncFailure):
            if self._resynced:
                raise BsfAnswerInvalid("the BSF's challenge after a resynchronisation was still not fresh")
            self._resynced = True
            header, _ = digest.build_authorization(
                challenge, self.impi, b"", method=self.method, uri=self.uri, auts=outcome.auts
            )
            self._state = _State.WAIT_RESYNC
            self.http_requests += 1
            log.info("Ub resynchronisation", extra={"event": "ub.resync"})
            return UbRequest(header, self._user_agent)
        try:
            password = digest.aka_password(challenge.algorithm, outcome.res, outcome.ck, outcome.ik)
        except ValueError as exc:  # AKAv2 without CK/IK: excluded by _algorithms, kept as a typed guard
            raise BsfAnswerInvalid(str(exc)) from exc
        header, state = digest.build_authorization(challenge, self.impi, password, method=self.method, uri=self.uri)
        self._digest = state
        self._success = outcome
        self._state = _State.WAIT_ANSWER
        self.http_requests += 1
        return UbRequest(header, self._user_agent)

    def _on_answer(
        self, status: int, reason: str, headers: Sequence[tuple[str, str]], body: bytes, now: datetime
    ) -> UbResult:
        if status == 401:
            stale = _is_stale(headers)
            raise BsfRejected(401, "the BSF rejected the response" + (" (stale nonce)" if stale else ""))
        if status != 200:
            raise _rejected(status, refusal_reason(reason or "bootstrap refused", headers, body), self._retry_after)
        state, success = self._digest, self._success
        assert state is not None and success is not None  # set with the WAIT_ANSWER state
        info = [v for k, v in headers if k.lower() == "authentication-info"]
        if len(info) > 1:
            raise BsfAnswerInvalid(f"200 with {len(info)} Authentication-Info headers (at most 1)")
        verified = bool(info) and "rspauth" in digest.parse_auth_params(info[0])
        if verified and not digest.verify_rspauth(state, info[0], body):
            raise BsfAnswerInvalid("the BSF's rspauth is wrong: the answer is not authentic")
        if not verified and self.require_rspauth:
            raise BsfAnswerInvalid("200 without rspauth (no Authentication-Info), and require_rspauth is set")
        parsed = parse_bootstrapping_info(body, now=now)
        self._state = _State.DONE
        return UbResult(
            btid=parsed.btid,
            lifetime=parsed.lifetime,
            rand=self._rand,
            aka=success,
            aka_runs=self.aka_runs,
            http_requests=self.http_requests,
            rspauth_verified=verified,
        )

    # -- helpers --

    def _expect(self, state: _State) -> None:
        if self._state is not state:
            raise RuntimeError(f"Ub exchange is {self._state.value}, not {state.value}")

    def _guard(self, step: Callable[[], _T]) -> _T:
        """Run one transition; any failure leaves the exchange FAILED.

        Every header this exchange parses came from the BSF, so the Digest parser's neutral
        :class:`~mn_secd.errors.DigestParseError` becomes the BSF's fault here.
        """
        try:
            return step()
        except DigestParseError as exc:
            self._state = _State.FAILED
            raise BsfDigestInvalid(f"the BSF's Digest header cannot be read: {exc}") from exc
        except BaseException:
            self._state = _State.FAILED
            raise


def _rejected(status: int, reason: str, retry_after: float | None) -> BsfRejected:
    """A refusal, typed by whether waiting can help: 5xx or 429 is the BSF failing or overloaded for
    now (retryable, after ``retry_after`` if it said), another 4xx a refusal of this subscriber or
    request that no retry changes."""
    if 500 <= status <= 599 or status == 429:
        return BsfServerError(status, reason, retry_after=retry_after)
    return BsfRejected(status, reason)


#: At most this many characters of what a BSF says about a refusal go into an error (and the log).
MAX_REFUSAL_DETAIL = 160


def _printable(text: str) -> str:
    """A BSF's words made safe for one log line: printable ASCII, whitespace collapsed, bounded."""
    cleaned = " ".join("".join(c if 0x20 <= ord(c) < 0x7F else " " for c in text).split())
    return cleaned[:MAX_REFUSAL_DETAIL] + ("..." if len(cleaned) > MAX_REFUSAL_DETAIL else "")


def refusal_reason(reason: str, headers: Sequence[tuple[str, str]], body: bytes) -> str:
    """The reason phrase of a refusal, with what the BSF said about it that helps an operator.

    A redirect (3xx) names where it points, since it is not followed: a ``Location`` the
    configuration should name instead (following it would send the IMPI to wherever a BSF says).
    A problem body (RFC 9457, ``application/problem+json``) adds its ``title`` and ``detail``.
    Anything else in the body is ignored: it is HTML for a person, or nothing.
    """
    fields = {k.lower(): v for k, v in headers}
    parts = [reason]
    if "location" in fields:
        parts.append(f"to {_printable(fields['location'])}, not followed: set [gba] bsf_url to the BSF's address")
    media_type = fields.get("content-type", "").partition(";")[0].strip().lower()
    if media_type == "application/problem+json" and body:
        try:
            problem = json.loads(body)
        except (ValueError, RecursionError):
            problem = None
        if isinstance(problem, dict):
            said = [str(problem[k]) for k in ("title", "detail") if isinstance(problem.get(k), str | int)]
            if said:
                parts.append(_printable(": ".join(said)))
    return ": ".join(parts)


def _is_stale(headers: Sequence[tuple[str, str]]) -> bool:
    values = [v for k, v in headers if k.lower() == "www-authenticate"]
    try:
        return any(c.stale for c in digest.parse_challenges(values))
    except DigestParseError:
        return False


class UbRunner(Protocol):
    """What a bootstrap needs of Ub: one complete exchange with the BSF (:class:`UbClient` runs it)."""

    async def run(self, identity: CardIdentity, aka: AkaCallback, *, mode: GbaMode) -> UbResult:
        """One Ub exchange; ``aka`` runs AUTHENTICATE on the card (once per challenge)."""


# --- asyncio adapter ----------------------------------------------------------------------------------


class UbClient:
    """Runs :class:`UbExchange` against a BSF over HTTP(S) with httpx.

    ``bsf_url`` overrides the address derived from the IMSI (TS 23.003 16.2). ``timeout`` is the
    budget of one bootstrap attempt at the BSF: every HTTP request of it (connect, send, headers and
    body, so a BSF that trickles bytes is cut off too), the retries of the first request and the
    pauses between them all fit in it, so a hanging BSF costs at most ``timeout`` seconds however
    many retries are allowed. The card's AUTHENTICATE is not counted: it has its own timeout in the
    card layer, and cutting it short would leave its outcome unknown. ``retries`` extra attempts are
    made for the first request only, while the budget lasts. ``require_rspauth`` refuses a 200 OK
    without ``rspauth``. ``transport`` is for instrumentation (the benchmark times HTTP through it).
    """

    def __init__(
        self,
        bsf_url: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        require_rspauth: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if bsf_url is not None:
            _check_url(bsf_url)
        if timeout <= 0 or retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("timeout must be positive; retries and backoff not negative")
        self.bsf_url = bsf_url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.require_rspauth = require_rspauth
        self._clock = clock
        self._rng = rng or random.Random()
        self._ignored_retry_after: str | None = None  # the last Retry-After logged as unusable
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,
            verify=tls_verification(bsf_url),
        )

    def url_for(self, identity: CardIdentity) -> str:
        """The configured BSF URL, else ``http://bsf.mncXXX.mccYYY.pub.3gppnetwork.org``."""
        return self.bsf_url or bsf_url(identity.imsi, identity.mnc_length)

    async def run(self, identity: CardIdentity, aka: AkaCallback, *, mode: GbaMode) -> UbResult:
        """One complete Ub exchange; ``aka`` runs AUTHENTICATE on the card (once per challenge)."""
        url = self.url_for(identity)
        parts = urlsplit(url)
        uri = parts.path or "/"
        target = parts._replace(path=uri, fragment="").geturl()
        exchange = UbExchange(
            impi=identity.impi,
            realm=parts.hostname or "",
            uri=uri,
            mode=mode,
            require_rspauth=self.require_rspauth,
        )
        loop = asyncio.get_running_loop()
        budget = _Budget(loop.time() + self.timeout, self.timeout)
        request = exchange.start()
        response = await self._first_request(target, request, exchange, budget)
        while True:
            now = datetime.fromtimestamp(self._clock(), UTC)
            step = exchange.receive(*response, now=now, retry_after=self._retry_after(response, now))
            if isinstance(step, UbResult):
                self._log_result(step)
                return step
            card_started = loop.time()
            outcome = await aka(step.rand, step.autn)
            budget.deadline += loop.time() - card_started  # the card's time is not the BSF's
            request = exchange.aka_outcome(outcome)
            response = await self._send_answer(target, request, budget)

    @staticmethod
    def _log_result(result: UbResult) -> None:
        extra = {
            "event": "ub.done",
            "btid_hash": btid_hash(result.btid),
            "aka_runs": result.aka_runs,
            "http_requests": result.http_requests,
        }
        log.info("Ub bootstrap accepted", extra=extra)
        if not result.rspauth_verified:
            log.warning(
                "the BSF's 200 OK carried no rspauth: bootstrap accepted without authenticating the BSF's"
                " answer (set [gba] require_rspauth = true to refuse such answers)",
                extra={**extra, "event": "ub.no_rspauth"},
            )

    async def _first_request(
        self, target: str, request: UbRequest, exchange: UbExchange, budget: _Budget
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                response = await self._send(target, request, budget)
            except BsfUnreachable:
                if attempt >= self.retries or not exchange.may_retry_transport:
                    raise
                failure = None
            else:
                if response[0] not in RETRYABLE_STATUS or attempt >= self.retries:
                    return response
                failure = response
            delay = backoff_delay(attempt, self.backoff, self.max_backoff, self._rng)
            if failure is not None:  # never sooner than the BSF asked
                asked = self._retry_after(failure, datetime.fromtimestamp(self._clock(), UTC))
                delay = max(delay, asked or 0.0)
            if loop.time() + delay >= budget.deadline:  # no time left for another try: the last outcome stands
                if failure is not None:
                    return failure
                raise budget.exhausted()
            log.info("BSF not reachable; retrying", extra={"event": "ub.retry", "attempt": attempt + 1, "delay": delay})
            attempt += 1
            await asyncio.sleep(delay)

    async def _send_answer(
        self, target: str, request: UbRequest, budget: _Budget
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """The request that answers a challenge (RES, or AUTS), resent once if the connection was lost.

        A BSF (or a proxy in front of it) may close a kept-alive connection while the card runs
        its AUTHENTICATE, and the close can cross our request: it is then lost with no answer at all.
        The request is a GET, idempotent (RFC 9110 9.2.2), so it is sent once more on a new
        connection (RFC 9112 9.3.1) rather than throwing away the card's AKA run; the card is not
        asked again, and a BSF that did see the first copy refuses the second (its nonce is used).
        """
        try:
            return await self._send(target, request, budget)
        except BsfUnreachable as exc:
            if not isinstance(exc.__cause__, _CONNECTION_LOST):  # refused, timed out: not worth a resend
                raise
            log.info(
                "the BSF's connection was lost before it answered; sending the answer to its challenge again",
                extra={"event": "ub.resend", "error": str(exc)},
            )
            return await self._send(target, request, budget)

    def _retry_after(self, response: tuple[int, str, list[tuple[str, str]], bytes], now: datetime) -> float | None:
        """The seconds a refusal for now (5xx, 429) asks to wait; None without a usable Retry-After.

        A value that cannot be read is ignored (our own back-off applies) and logged once: the same
        broken value on every answer of an overloaded BSF is one line, not one per attempt.
        """
        status, _, headers, _ = response
        if status not in RETRYABLE_STATUS and not 500 <= status <= 599:
            return None
        try:
            return retry_after(headers, now)
        except RetryAfterInvalid as exc:
            if str(exc) != self._ignored_retry_after:
                self._ignored_retry_after = str(exc)
                log.warning(
                    "ignoring the BSF's Retry-After: %s",
                    exc,
                    extra={"event": "ub.retry_after_invalid", "kind": exc.kind, "status": status},
                )
            return None

    async def _send(
        self, target: str, request: UbRequest, budget: _Budget
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """One GET within the budget; (status, reason, headers, body). Transport failures -> BsfUnreachable."""
        if asyncio.get_running_loop().time() >= budget.deadline:
            raise budget.exhausted()
        try:
            async with asyncio.timeout_at(budget.deadline):
                async with self._client.stream("GET", target, headers=request.headers()) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_BODY:
                            raise BsfAnswerInvalid(f"the BSF's answer is longer than {MAX_BODY} octets")
                    return response.status_code, response.reason_phrase, response.headers.multi_items(), bytes(body)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise budget.exhausted() from exc
        except httpx.RemoteProtocolError as exc:  # a close with no answer, or HTTP/1.1 broken
            raise BsfUnreachable(f"the BSF at {target} broke off or broke HTTP/1.1: {_printable(str(exc))}") from exc
        except (httpx.ReadError, httpx.WriteError) as exc:
            raise BsfUnreachable(f"the connection to the BSF at {target} was lost: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            detail = _printable(str(exc)) or type(exc).__name__  # e.g. the certificate check that failed
            raise BsfUnreachable(f"cannot reach the BSF at {target}: {detail}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> UbClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


#: The BSF was reached but the exchange broke off before a usable answer (see ``_send_answer``).
_CONNECTION_LOST = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


@dataclass(slots=True)
class _Budget:
    """The time one bootstrap attempt may spend at the BSF: a deadline on the event loop's clock."""

    deadline: float
    seconds: float

    def exhausted(self) -> BsfUnreachable:
        return BsfUnreachable(f"the BSF did not answer within the {self.seconds:g} s budget of this bootstrap")


def tls_verification(bsf_url: str | None) -> ssl.SSLContext:
    """What the Ub client checks a BSF's certificate against.

    An ``https`` BSF: the system's CA store (OpenSSL's default paths: on Debian
    ``/etc/ssl/certs``, where ``update-ca-certificates`` puts an operator's own CA) and, as before,
    the CA bundle httpx ships (certifi), so a BSF with a certificate from a public CA is verified
    even on a gateway without ``ca-certificates``. Operators often run the BSF under their own
    PKI: with certifi alone such a BSF could never be reached, whatever the gateway trusted.
    A plain-HTTP one (the address derived from the IMSI is ``http``, TS 23.003 16.2): no TLS
    connection is ever made to it, and loading the ~150 CA certificates of the bundle would cost
    the daemon about 1 MB for good, so the context knows no CA at all; should TLS ever be attempted
    with it, verification fails and nothing is sent.
    """
    if bsf_url is not None and urlsplit(bsf_url).scheme == "https":
        import certifi  # only for an https BSF (see above); httpx depends on it

        context = ssl.create_default_context()  # the system store; CERT_REQUIRED and hostname checks
        context.load_verify_locations(cafile=certifi.where())
        return context
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checks, no CA: fails closed


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")

"""The reference BSF: Ub (TS 24.109, Digest AKA) and Zn (TS 29.309 style JSON) over real HTTP.

It plays the operator's side of GBA for tests, the demo and lab use: subscribers come from the same
card profiles the software UICC runs on, authentication vectors are made locally with Milenage (no
HSS), and SQN_HE is kept in memory per subscriber following TS 33.102 Annex C, including the
resynchronisation from AUTS. The daemon never imports this module (aiohttp is a sim-only
dependency).

Ub answers, in the order they are checked:

* no ``Authorization`` header, or one that is not well-formed ``Digest`` credentials -> 400. Without
  a user name the BSF cannot know whose K to challenge with, so even a first contact must carry the
  RFC 3310 initial header (``username`` with empty ``nonce``/``response``);
* unknown user name (IMPI) -> 403;
* empty ``nonce`` (first contact) -> 401 with a fresh challenge;
* a nonce the BSF never issued, or already used (every nonce is single-use) -> 401, fresh challenge;
* a nonce issued to another user name -> 403 (the nonce stays valid for its owner);
* from here on the nonce is used up, whatever the answer;
* ``realm``, ``uri``, ``opaque``, ``algorithm`` or ``qop`` differing from the challenge -> 400;
* ``auts`` present: wrong length -> 400; MAC-S or empty-password response wrong -> 403; else SQN_HE is
  set from SQN_MS and a new 401 challenge follows;
* wrong response (RES) -> 403;
* a nonce older than ``nonce_ttl`` with a correct response -> 401 ``stale=true`` with a fresh challenge
  (the client did nothing wrong); with a wrong response -> 403;
* else 200 with the bootstrapping-info XML, ``Authentication-Info`` (rspauth over the exact body
  bytes sent) and ``Expires``.

XRES has as many octets as the subscriber's card gives RES (``res_length`` of its profile, 4 to 16).

Test switches (plain attributes, changeable while serving) let client tests drive each failure over
real HTTP: :attr:`ReferenceBsf.delay`, :attr:`~ReferenceBsf.success_delay`,
:attr:`~ReferenceBsf.busy_responses` (with :attr:`~ReferenceBsf.busy_status` and
:attr:`~ReferenceBsf.retry_after`), :attr:`~ReferenceBsf.tamper_rspauth`,
:attr:`~ReferenceBsf.omit_authentication_info`, :attr:`~ReferenceBsf.opaque_btids`,
:attr:`~ReferenceBsf.malformed_xml`,
:attr:`~ReferenceBsf.lifetime_in_past`, :attr:`~ReferenceBsf.garbage_challenge`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import secrets
import signal
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from mn_secd import nai
from mn_secd.errors import ConfigError, DigestParseError, InvalidNafId, UnsupportedUaProtocol
from mn_secd.gba import bsfxml, digest, kdf
from mn_secd.logs import btid_hash
from mn_secd.sim.argtypes import listen_address
from mn_secd.sim.milenage import Milenage, generate_autn, verify_auts
from mn_secd.sim.profile import CardProfile, load_profile
from mn_secd.sim.sqn import HeSequence
from mn_secd.ua import UaId, naf_id, normalise_fqdn

log = logging.getLogger(__name__)

DEFAULT_NAME = "bsf.mnc001.mcc001.pub.3gppnetwork.org"
ZN_PATH = "/nbsp-gba/v1/bootstrapping-info-retrieval"
#: The lab's view of :meth:`ReferenceBsf.reset_counters`'s counters, for a BSF run as a process of its own.
COUNTERS_PATH = "/lab/counters"
SERVER = "Bootstrapping Server; Release-6"
#: A ``WWW-Authenticate`` value no client can use (unterminated quoted string), for ``garbage_challenge``.
GARBAGE_CHALLENGE = 'Digest realm="bsf", nonce="@@not-base64@@, qop="auth-int'
AUTS_LEN = 14
#: How many unanswered challenges are kept at most (the oldest go first).
MAX_PENDING = 10_000
_HEX10 = re.compile(r"[0-9A-Fa-f]{10}")


@dataclass(slots=True)
class _Subscriber:
    impi: str
    milenage: Milenage
    amf: bytes
    gba_u: bool
    sequence: HeSequence
    res_length: int  # octets of XRES, as the subscriber's card answers


@dataclass(slots=True)
class _Challenge:
    """One issued authentication vector, waiting for its answer."""

    impi: str
    nonce: str
    opaque: str
    issued: float
    rand: bytes
    xres: bytes = field(repr=False)
    ck: bytes = field(repr=False)
    ik: bytes = field(repr=False)


@dataclass(slots=True)
class Bootstrap:
    """A successful bootstrap as the BSF remembers it for Zn (Ks never leaves this object)."""

    btid: str
    impi: str
    rand: bytes
    ks: bytes = field(repr=False)
    created: datetime
    expires: datetime
    gba_u: bool


class ReferenceBsf:
    """A BSF serving Ub at ``GET /`` and Zn at ``POST /nbsp-gba/v1/bootstrapping-info-retrieval``.

    ``algorithm`` is the Digest algorithm of every challenge (AKAv1-MD5 as in TS 24.109, or
    AKAv2-MD5). ``clock`` gives Unix seconds; tests may pass a fake one.
    """

    def __init__(
        self,
        profiles: Iterable[CardProfile],
        *,
        name: str = DEFAULT_NAME,
        lifetime: timedelta = timedelta(hours=1),
        nonce_ttl: float = 30.0,
        algorithm: str = digest.AKAV1_MD5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if digest.canonical_algorithm(algorithm) not in (digest.AKAV1_MD5, digest.AKAV2_MD5):
            raise ValueError("the BSF challenges with AKAv1-MD5 or AKAv2-MD5")
        self.name = name
        self.lifetime = lifetime
        self.nonce_ttl = nonce_ttl
        self.algorithm = digest.canonical_algorithm(algorithm)
        self._clock = clock
        self._subscribers: dict[str, _Subscriber] = {}
        for profile in profiles:
            impi = profile.effective_impi
            if impi in self._subscribers:
                raise ValueError(f"two card profiles with the IMPI {impi}")
            self._subscribers[impi] = _Subscriber(
                impi=impi,
                milenage=Milenage(profile.k, profile.opc),
                amf=profile.amf,
                gba_u=profile.gba_u,
                sequence=HeSequence.starting_at(profile.sqn, profile.card_state.ind_len),
                res_length=profile.res_length,
            )
        self._pending: dict[str, _Challenge] = {}
        self._bootstraps: dict[str, Bootstrap] = {}
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

        # --- test switches -------------------------------------------------------------------------
        #: Seconds to wait before answering each Ub request (a slow BSF).
        self.delay = 0.0
        #: Seconds to hold back each 200 OK, i.e. after the card has run its AUTHENTICATE (a BSF that
        #: hangs at the worst moment for a GBA_U card, whose Ks the AUTHENTICATE has replaced).
        self.success_delay = 0.0
        #: Answer this many of the next Ub requests with ``busy_status``, then recover.
        self.busy_responses = 0
        #: The status of those answers: 503 (an overloaded BSF / HSS), 429, 500 (a failing one), ...
        self.busy_status = 503
        #: The ``Retry-After`` sent, verbatim, with a busy 503 or 429 (delay-seconds, an HTTP-date,
        #: or garbage for a broken BSF); None sends none.
        self.retry_after: str | None = "1"
        #: Send a wrong ``rspauth`` in the 200 OK.
        self.tamper_rspauth = False
        #: Send the 200 OK without ``Authentication-Info`` (as some BSFs in the field do; RFC 2617
        #: makes the header optional).
        self.omit_authentication_info = False
        #: Make B-TIDs that are not base64(RAND)@name (TS 33.220 asks for that form; a client must
        #: not rely on it, only on the B-TID being the BSF's name for the bootstrap).
        self.opaque_btids = False
        #: Send a truncated XML body in the 200 OK (with an rspauth that is right for those bytes).
        self.malformed_xml = False
        #: Put a lifetime one hour in the past into the 200 OK (the stored bootstrap is expired too).
        self.lifetime_in_past = False
        #: Send this ``WWW-Authenticate`` value verbatim instead of each real challenge
        #: (e.g. :data:`GARBAGE_CHALLENGE`); None sends real challenges.
        self.garbage_challenge: str | None = None

        self.reset_counters()

    # --- counters and test hooks ---------------------------------------------------------------------

    def reset_counters(self) -> None:
        """Zero every counter: Ub requests, 401 challenges issued, 200 successes, resyncs, 403s, 400s,
        answers from ``busy_responses``, and Zn requests."""
        self.requests = 0
        self.challenges = 0
        self.successes = 0
        self.resyncs = 0
        self.rejections = 0
        self.bad_requests = 0
        self.busy = 0
        self.zn_requests = 0

    @property
    def bootstraps(self) -> dict[str, Bootstrap]:
        """The bootstraps known for Zn, by B-TID (a copy; use :meth:`expire` / :meth:`forget` to change)."""
        return dict(self._bootstraps)

    @property
    def last_btid(self) -> str | None:
        """The B-TID of the most recent successful bootstrap still known."""
        return next(reversed(self._bootstraps), None)

    def expire(self, btid: str) -> None:
        """Make a B-TID expire now: Zn then answers 404 for it. KeyError if unknown."""
        self._bootstraps[btid].expires = self._now()

    def forget(self, btid: str) -> None:
        """Drop a B-TID as if the BSF had restarted. KeyError if unknown."""
        del self._bootstraps[btid]

    def sqn_he(self, impi: str) -> bytes:
        """The SQN of the last challenge issued to ``impi`` (SEQ_HE with IND 0)."""
        seq = self._subscribers[impi].sequence
        return (seq.seq_he << seq.ind_len).to_bytes(6, "big")

    def set_sqn_he(self, impi: str, sqn: bytes) -> None:
        """Move SQN_HE (e.g. behind the card to force a resync); the next challenge is above ``sqn``."""
        sub = self._subscribers[impi]
        sub.sequence = HeSequence.starting_at(sqn, sub.sequence.ind_len)

    # --- server lifecycle ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._handle_ub)
        app.router.add_post(ZN_PATH, self._handle_zn)
        app.router.add_get(COUNTERS_PATH, self._handle_counters)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None) -> str:
        """Serve on ``host:port`` (0 = any free port); returns the base URL, e.g. ``http://127.0.0.1:4711``.

        With ``ssl_context`` (a server context holding the BSF's certificate) it serves HTTPS, as an
        operator's BSF under its own PKI does, and the URL says ``https``.
        """
        if self._runner is not None:
            raise RuntimeError("the BSF is already running")
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        log.info("reference BSF listening", extra={"event": "bsf.start", "port": bound_port})
        return f"{'https' if ssl_context is not None else 'http'}://{shown}:{bound_port}"

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            self._closing.set()
            await runner.cleanup()
            self._closing = asyncio.Event()

    # --- Ub ----------------------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def _handle_ub(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.delay > 0:
            # cut short by stop(), so a test with a very slow BSF does not wait for its sleepers
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.delay)
        if self.busy_responses > 0:
            self.busy_responses -= 1
            self.busy += 1
            headers = {"Server": SERVER}
            if self.retry_after is not None and self.busy_status in (429, 503):
                headers["Retry-After"] = self.retry_after
            return web.Response(status=self.busy_status, text="busy\n", headers=headers)
        header = request.headers.get("Authorization")
        if header is None:
            return self._bad("an Authorization header with the user name is required")
        try:
            creds = digest.parse_authorization(header)
        except DigestParseError as exc:  # neutral in the parser; here the client wrote the header
            return self._bad(f"malformed Authorization: {exc}")
        subscriber = self._subscribers.get(creds.username)
        if subscriber is None:
            return self._reject("unknown user")
        if not creds.nonce:
            return self._challenge(subscriber)
        self._purge_pending()
        pending = self._pending.get(creds.nonce)
        if pending is None:
            return self._challenge(subscriber)
        if pending.impi != subscriber.impi:
            return self._reject("nonce issued to another user")
        del self._pending[creds.nonce]  # single use, whatever the outcome
        problem = self._mismatch(creds, pending, request.path)
        if problem is not None:
            return self._bad(problem)
        body = await request.read()
        if creds.auts is not None:
            return self._resync(subscriber, pending, creds, body, request.method)
        password = self._password(pending)
        if not digest.verify_response(creds, password, method=request.method, body=body):
            return self._reject("wrong response")
        if self._clock() - pending.issued > self.nonce_ttl:
            return self._challenge(subscriber, stale=True)
        if self.success_delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.success_delay)
        return self._success(subscriber, pending, creds, password)

    def _mismatch(self, creds: digest.Credentials, pending: _Challenge, path: str) -> str | None:
        if creds.realm != self.name:
            return "realm does not match the challenge"
        if creds.uri != path:
            return "uri does not match the request"
        if creds.opaque != pending.opaque:
            return "opaque does not match the challenge"
        if creds.algorithm != self.algorithm:
            return "algorithm does not match the challenge"
        if creds.qop != digest.QOP_AUTH_INT:
            return "qop must be auth-int"
        return None

    def _password(self, pending: _Challenge) -> bytes:
        return digest.aka_password(self.algorithm, pending.xres, pending.ck, pending.ik)

    def _challenge(self, subscriber: _Subscriber, *, stale: bool = False) -> web.Response:
        m = subscriber.milenage
        rand = secrets.token_bytes(16)
        sqn, subscriber.sequence = subscriber.sequence.issue()
        autn = generate_autn(m, rand, sqn, subscriber.amf)
        xres, ck, ik, _ak = m.f2345(rand, subscriber.res_length)
        nonce = digest.make_nonce(rand, autn)
        opaque = secrets.token_hex(16)
        self._pending[nonce] = _Challenge(subscriber.impi, nonce, opaque, self._clock(), rand, xres, ck, ik)
        while len(self._pending) > MAX_PENDING:
            del self._pending[next(iter(self._pending))]
        self.challenges += 1
        value = self.garbage_challenge
        if value is None:
            value = digest.build_challenge(
                realm=self.name, nonce=nonce, algorithm=self.algorithm, opaque=opaque, stale=stale
            )
        log.debug("challenge", extra={"event": "bsf.challenge", "nonce": btid_hash(nonce), "stale": stale})
        return web.Response(
            status=401, text="authentication required\n", headers={"WWW-Authenticate": value, "Server": SERVER}
        )

    def _resync(
        self, subscriber: _Subscriber, pending: _Challenge, creds: digest.Credentials, body: bytes, method: str
    ) -> web.Response:
        assert creds.auts is not None
        if len(creds.auts) != AUTS_LEN:
            return self._bad(f"auts must be {AUTS_LEN} octets")
        if not digest.verify_response(creds, b"", method=method, body=body):
            return self._reject("wrong response in the resynchronisation request")
        sqn_ms = verify_auts(subscriber.milenage, pending.rand, creds.auts)
        if sqn_ms is None:
            return self._reject("AUTS does not verify")
        subscriber.sequence = subscriber.sequence.resynchronised(sqn_ms)
        self.resyncs += 1
        log.info("resynchronised SQN_HE from AUTS", extra={"event": "bsf.resync"})
        return self._challenge(subscriber)

    def _success(
        self, subscriber: _Subscriber, pending: _Challenge, creds: digest.Credentials, password: bytes
    ) -> web.Response:
        now = self._now()
        expires = now - timedelta(hours=1) if self.lifetime_in_past else now + self.lifetime
        btid = f"{secrets.token_hex(12)}@{self.name}" if self.opaque_btids else nai.btid(pending.rand, self.name)
        self._purge_bootstraps(now)
        self._bootstraps[btid] = Bootstrap(
            btid=btid,
            impi=subscriber.impi,
            rand=pending.rand,
            ks=pending.ck + pending.ik,
            created=now,
            expires=expires,
            gba_u=subscriber.gba_u,
        )
        body = bsfxml.build_bootstrapping_info(btid, expires)
        if self.malformed_xml:
            body = body[: len(body) // 2]
        info = digest.build_authentication_info(creds, password, body)
        if self.tamper_rspauth:
            rspauth = digest.compute_rspauth(creds, password, body)
            info = info.replace(rspauth, format(int(rspauth, 16) ^ 1, "032x"))
        self.successes += 1
        log.info("bootstrap", extra={"event": "bsf.bootstrap", "btid": btid_hash(btid), "gba_u": subscriber.gba_u})
        headers = {"Expires": format_datetime(expires, usegmt=True), "Server": SERVER}
        if not self.omit_authentication_info:
            headers["Authentication-Info"] = info
        return web.Response(status=200, body=body, content_type=bsfxml.CONTENT_TYPE, headers=headers)

    def _bad(self, reason: str) -> web.Response:
        self.bad_requests += 1
        return web.Response(status=400, text=reason + "\n", headers={"Server": SERVER})

    def _reject(self, reason: str) -> web.Response:
        self.rejections += 1
        return web.Response(status=403, text=reason + "\n", headers={"Server": SERVER})

    def _purge_pending(self) -> None:
        """Forget challenges long past their time (kept for a second TTL to answer ``stale=true``)."""
        horizon = self._clock() - 2 * self.nonce_ttl
        for nonce in [n for n, c in self._pending.items() if c.issued < horizon]:
            del self._pending[nonce]

    def _purge_bootstraps(self, now: datetime) -> None:
        horizon = now - timedelta(days=1)
        for btid in [b for b, boot in self._bootstraps.items() if boot.expires < horizon]:
            del self._bootstraps[btid]

    # --- Zn ----------------------------------------------------------------------------------------------

    async def _handle_counters(self, request: web.Request) -> web.Response:
        """The counters as JSON (Ub requests, challenges, successes, ..., Zn requests); counts nothing."""
        names = ("requests", "challenges", "successes", "resyncs", "rejections", "bad_requests", "busy", "zn_requests")
        return web.json_response({name: getattr(self, name) for name in names})

    async def _handle_zn(self, request: web.Request) -> web.Response:
        self.zn_requests += 1
        try:
            doc = json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _problem(400, "Bad Request", "the body is not JSON", "INVALID_MSG_FORMAT")
        try:
            btid, naf_fqdn, ua, gba_u_aware = _parse_zn_request(doc)
        except ValueError as exc:
            return _problem(400, "Bad Request", str(exc), "INVALID_MSG_FORMAT")
        boot = self._bootstraps.get(btid)
        if boot is None:
            return _problem(404, "Not Found", "unknown B-TID", "BTID_NOT_FOUND")
        if boot.expires <= self._now():
            return _problem(404, "Not Found", "the B-TID has expired", "BTID_EXPIRED")
        nid = naf_id(naf_fqdn, ua)
        answer: dict[str, Any] = {
            "meKeyMaterial": kdf.ks_naf(boot.ks, boot.rand, boot.impi, nid).hex(),
            "keyExpiryTime": bsfxml.format_lifetime(boot.expires),
            "bootstrappingInfoCreationTime": bsfxml.format_lifetime(boot.created),
            "gbaType": "3G_GBA",
            "impi": boot.impi,
        }
        if boot.gba_u and gba_u_aware:
            answer["uiccKeyMaterial"] = kdf.ks_int_naf(boot.ks, boot.rand, boot.impi, nid).hex()
        log.info(
            "Zn key retrieval",
            extra={"event": "bsf.zn", "btid": btid_hash(btid), "naf": naf_fqdn, "ua": ua.hex, "gba_u": boot.gba_u},
        )
        return web.json_response(answer)


def _parse_zn_request(doc: object) -> tuple[str, str, UaId, bool]:
    """(B-TID, normalised NAF FQDN, Ua id, GBA_U awareness) of a BootstrappingInfoRequest; ValueError if bad."""
    if not isinstance(doc, dict):
        raise ValueError("the request must be a JSON object")
    btid = doc.get("btId")
    if not isinstance(btid, str) or not btid:
        raise ValueError("btId must be a non-empty string")
    nid = doc.get("nafId")
    if not isinstance(nid, dict):
        raise ValueError("nafId must be an object")
    fqdn, ua_text = nid.get("nafFqdn"), nid.get("uaSecProtId")
    if not isinstance(fqdn, str) or not isinstance(ua_text, str):
        raise ValueError("nafId needs nafFqdn and uaSecProtId strings")
    if not _HEX10.fullmatch(ua_text):
        raise ValueError("uaSecProtId must be 10 hex digits")
    aware = doc.get("gbaUAware", False)
    if not isinstance(aware, bool):
        raise ValueError("gbaUAware must be a boolean")
    try:
        ua = UaId.from_bytes(bytes.fromhex(ua_text))
        return btid, normalise_fqdn(fqdn), ua, aware
    except (InvalidNafId, UnsupportedUaProtocol) as exc:
        raise ValueError(str(exc)) from None


def _problem(status: int, title: str, detail: str, cause: str) -> web.Response:
    """A TS 29.571 ProblemDetails answer."""
    body = {"title": title, "status": status, "detail": detail, "cause": cause}
    return web.Response(status=status, text=json.dumps(body), content_type="application/problem+json")


# --- loading subscribers and the command line ----------------------------------------------------------


def load_subscribers(paths: Iterable[str | Path]) -> list[CardProfile]:
    """Card profiles from files and directories (every ``*.toml`` in a directory, sorted)."""
    profiles: list[CardProfile] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            files = sorted(path.glob("*.toml"))
            if not files:
                raise ConfigError(str(path), "(directory)", "holds no *.toml card profiles")
            profiles.extend(load_profile(f) for f in files)
        else:
            profiles.append(load_profile(path))
    return profiles


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    """``mn-secd sim bsf``: arguments and handler."""
    parser.epilog = (
        f"Prints the base URL on stdout, then serves Ub (GET /) and Zn until SIGINT/SIGTERM; GET {COUNTERS_PATH} "
        "answers its counters (Ub requests, challenges, bootstraps, Zn requests) as JSON."
    )
    parser.add_argument(
        "--subscribers",
        nargs="+",
        required=True,
        metavar="PATH",
        help="card profile files, or directories of *.toml card profiles",
    )
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="default 127.0.0.1:8080",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"BSF name in realm and B-TIDs (default {DEFAULT_NAME})")
    parser.add_argument(
        "--lifetime", type=_seconds, default=3600.0, metavar="SECONDS", help="key lifetime (default 3600)"
    )
    parser.add_argument(
        "--nonce-ttl",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long a challenge stays fresh (default 30)",
    )
    parser.add_argument(
        "--omit-authentication-info",
        action="store_true",
        help="answer the final 200 OK without Authentication-Info (no rspauth), as some BSFs in the field do",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    profiles = load_subscribers(args.subscribers)
    bsf = ReferenceBsf(profiles, name=args.name, lifetime=timedelta(seconds=args.lifetime), nonce_ttl=args.nonce_ttl)
    bsf.omit_authentication_info = args.omit_authentication_info
    host, port = args.listen
    asyncio.run(_serve(bsf, host, port))
    return 0


async def _serve(bsf: ReferenceBsf, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    watched: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
    for sig in watched:
        loop.add_signal_handler(sig, stop.set)
    try:
        print(await bsf.start(host, port), flush=True)
        await stop.wait()
    finally:
        for sig in watched:
            loop.remove_signal_handler(sig)
        await bsf.stop()

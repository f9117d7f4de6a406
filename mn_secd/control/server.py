"""The key service: CoAP over DTLS-PSK for local AEs (plain CoAP is never served).

Resources (all behind DTLS; an AE is whoever completed the handshake with its PSK identity):

``key``        GET ``?naf=FQDN&ua=ID&force=1``, or FETCH/POST with a key request payload
               (:mod:`mn_secd.control.payloads`): the NAF key, B-TID, expiry and GBA mode, for a NAF
               and Ua id the AE's ACL allows. GET and FETCH can be observed: a notification follows
               every refresh (the new key) and every wipe (the key after re-bootstrapping, or the
               error that ends the observation, e.g. 5.03 when the card is gone).
``status``     GET: card present, masked IMPI, bootstrap state, B-TID, expiry, GBA mode, last error.
``bootstrap``  POST: force a re-bootstrap now (AEs with ``may_force_bootstrap`` only; rate-limited
               by the keystore, 4.29 with Max-Age when too soon); answers with the new status.
``/.well-known/core`` lists them.

An answer carrying a NAF key keeps its encoded payload in a
:class:`~mn_secd.secret.SecretBytes` that the CoAP message holds in place of ``bytes``: when
keys are wiped, every such payload still held anywhere (aiocoap keeps an observation's first answer
for as long as the observation lives, and an unacknowledged notification until its ACK) is zeroed in
place, and the DTLS layer's stored answers for deduplication are dropped; an answer whose message
is freed is zeroed then. The last answer encoded for each NAF key, copied into the next answer for
the same key, is such a buffer too, zeroed at every refresh and wipe. So no live object keeps a key
the service handed out once keys are wiped.

Failures are answered as CoAP errors with a diagnostic payload (:func:`payloads.error_answer`),
logged at most once a minute per AE and kind of error (a misbehaving AE must not flood the journal).
Each AE may hold ``max_observations`` observations at once (RFC 7641 4.1: beyond that, a request
with Observe is answered once, without the option); they end with its DTLS session, and a session
that holds one does not end for idleness.
"""

from __future__ import annotations

import asyncio
import logging
import math
import types
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import aiocoap
import aiocoap.resource as resource
from aiocoap import error as coap_error
from aiocoap import interfaces
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.pipe import Pipe

from mn_secd import dtls
from mn_secd.control.payloads import (
    CBOR,
    JSON,
    KeyRequest,
    answer_format,
    check_critical_options,
    decode_key_request,
    encode_key_answer,
    encode_status,
    error_answer,
    key_request_from_query,
)
from mn_secd.control.registry import AeRegistry, RegistryCredentials
from mn_secd.errors import GbaError, MnSecdError, NotAuthorised, OperationTimeout, RequestError
from mn_secd.interfaces import KeyProvider
from mn_secd.logs import LogLimiter
from mn_secd.naf_keys import GbaMode, KeyEvent, KeyEventKind, NafKey
from mn_secd.secret import SecretBytes

log = logging.getLogger(__name__)

DEFAULT_ADDRESSES = ("127.0.0.1", "::1")
DEFAULT_PORT = 5684
#: Upper bound on one key request (the keystore has its own, shorter, timeouts per step).
REQUEST_TIMEOUT = 60.0
#: Observations one AE may hold at once (``[control] max_observations``).
MAX_OBSERVATIONS = 8
#: At most one log line per AE and kind of refusal in this many seconds.
LOG_INTERVAL = 60.0
#: Encoded key answers kept for reuse: one per NAF_Id and format asked for lately (a gateway serves
#: a handful of NAFs; each kept answer is one more wipeable copy of its key).
MAX_ENCODED_ANSWERS = 16

_limiter = LogLimiter(LOG_INTERVAL)

_CT = f"{CBOR} {JSON}"

_T = TypeVar("_T")

#: The Content-Format option of each answer format, made once: aiocoap never changes an option it
#: holds (it makes a new one), so every answer can carry the same.
_CONTENT_FORMAT_OPTIONS = {fmt: OptionNumber.CONTENT_FORMAT.create_option(value=fmt) for fmt in (CBOR, JSON)}

#: The handler of each request method, as aiocoap's Resource.render names them.
_HANDLERS = {
    Code.GET: "render_get",
    Code.POST: "render_post",
    Code.PUT: "render_put",
    Code.DELETE: "render_delete",
    Code.FETCH: "render_fetch",
    Code.PATCH: "render_patch",
    Code.iPATCH: "render_ipatch",
}


class _KeyService:
    """The key service's request logic, shared by its resources: authenticate the AE, authorise the
    request against the live registry, ask the key provider, bound the wait."""

    def __init__(self, keys: KeyProvider, registry: AeRegistry, request_timeout: float) -> None:
        self.keys = keys
        self.registry = registry
        self.request_timeout = request_timeout
        #: Payloads of key answers whose message is still alive somewhere, zeroed on a wipe.
        self._key_payloads: dict[weakref.ref[aiocoap.Message], SecretBytes] = {}
        #: The last answer encoded for each NAF_Id and format, with the session it came from.
        self._encoded: dict[tuple[bytes, int], tuple[tuple[str, datetime, GbaMode], SecretBytes]] = {}
        self.wipes = 0

    def identity(self, request: aiocoap.Message) -> str:
        """The AE behind a request: only the DTLS-authenticated claim counts, never the request."""
        return self.registry.authenticate(dtls.authenticated_claim(request.remote)).identity

    async def answer(
        self, request: aiocoap.Message, key_request: KeyRequest, seen: Callable[[NafKey], None] | None = None
    ) -> aiocoap.Message:
        """Authorise, fetch and encode one key; ``seen`` is told which key went out."""
        claim = dtls.authenticated_claim(request.remote)  # the AE is whoever completed the handshake
        entry = self.registry.authorise_key(claim, key_request.naf_fqdn, key_request.ua)
        identity = entry.identity
        if key_request.force and not entry.may_force_bootstrap:
            raise NotAuthorised(f"AE {identity!r} may not force a re-bootstrap")
        fmt = answer_format(request.opt.accept)
        wipes = self.wipes
        key = await self.guarded(self.keys.get_key(key_request.naf_fqdn, key_request.ua, key_request.force))
        if self.wipes != wipes:  # wiped while on its way here: that key must not go out; ask again
            wipes = self.wipes
            key = await self.guarded(self.keys.get_key(key_request.naf_fqdn, key_request.ua))
            if self.wipes != wipes:
                raise GbaError("keys were wiped twice during this request; ask again")
        if seen is not None:
            seen(key)
        if log.isEnabledFor(logging.DEBUG):  # one line per key handed out would flood a busy gateway's journal
            log.debug(
                "key for %s handed to AE %s",
                key.naf_fqdn,
                identity,
                extra={"event": "control.key", "ae": identity, "naf_fqdn": key.naf_fqdn, "force": key_request.force},
            )
        seconds_left = (key.expires - datetime.now(UTC)).total_seconds()
        # Options set one by one: the keyword form of Message() costs twice as much per answer.
        message = aiocoap.Message(code=Code.CHANGED if request.code == Code.POST else Code.CONTENT)
        message.opt.add_option(_CONTENT_FORMAT_OPTIONS[fmt])
        message.opt.max_age = max(0, math.floor(seconds_left))
        self._hold_key_payload(message, SecretBytes(self._encoded_answer(key, fmt).lend()))
        return message

    def _encoded_answer(self, key: NafKey, fmt: int) -> SecretBytes:
        """``key``'s answer in ``fmt``: the one encoded for the same key before, or encoded now.

        An AE asks for the same key over and over, and encoding it was a tenth of a request's time.
        A NAF key is fixed by its session (B-TID) and NAF_Id (TS 33.220 Annex B), so the answer is
        reused while both are. The kept answers are wipeable buffers, at most
        :data:`MAX_ENCODED_ANSWERS`, and all are zeroed at every refresh and wipe of keys.
        """
        slot = (key.naf_id, fmt)
        session = (key.btid, key.expires, key.gba_mode)
        kept = self._encoded.get(slot)
        if kept is not None and kept[0] == session and not kept[1].wiped:
            return kept[1]
        if kept is not None:
            kept[1].wipe()
        elif len(self._encoded) >= MAX_ENCODED_ANSWERS:
            self._encoded.pop(next(iter(self._encoded)))[1].wipe()  # the oldest goes
        encoded = SecretBytes(encode_key_answer(key, fmt))
        self._encoded[slot] = (session, encoded)
        return encoded

    def forget_encoded_answers(self) -> None:
        """Keys were refreshed or wiped: no answer encoded before is handed out again."""
        encoded, self._encoded = self._encoded, {}
        for _, answer in encoded.values():
            answer.wipe()

    def _hold_key_payload(self, message: aiocoap.Message, payload: SecretBytes) -> None:
        """Give ``message`` its key-bearing payload in a buffer a wipe can reach wherever it is held.

        The buffer is zeroed when the message is freed (a weak reference's callback: cheaper per
        answer than ``weakref.finalize``) or at the next wipe, whichever comes first.
        """
        message.payload = payload.lend()  # aiocoap keeps and encodes the object it is given
        self._key_payloads[weakref.ref(message, self._release_key_payload)] = payload

    def _release_key_payload(self, message: weakref.ref[aiocoap.Message]) -> None:
        payload = self._key_payloads.pop(message, None)
        if payload is not None:
            payload.wipe()

    def wipe_key_payloads(self) -> int:
        """Zero every key answer still held by a live message; later answers carry the new keys only."""
        self.wipes += 1
        self.forget_encoded_answers()
        payloads, self._key_payloads = self._key_payloads, {}
        for payload in payloads.values():
            payload.wipe()
        return len(payloads)

    async def guarded(self, work: Coroutine[Any, Any, _T]) -> _T:
        """``work``'s result, or :class:`OperationTimeout` once it has waited ``request_timeout``.

        ``work`` runs its first step before the timer is set: a key in the cache is answered in
        that step without ever waiting, and a request that needs the card or the BSF is timed from
        its first wait on (a step runs no longer than its code takes, it cannot block).
        """
        try:
            try:
                pending = work.send(None)
            except StopIteration as done:
                return cast(_T, done.value)
            async with asyncio.timeout(self.request_timeout):  # unlike wait_for, no task per request
                return await _resumed(work, pending)
        except TimeoutError:
            raise OperationTimeout(f"no key within {self.request_timeout:g} s") from None


@types.coroutine
def _resumed(work: Coroutine[Any, Any, _T], pending: Any) -> Generator[Any, Any, _T]:
    """Go on with a coroutine whose first step ran: the task waits on what that step yielded, and
    every later result or exception (a cancellation, say) is passed on into ``work``."""
    while True:
        try:
            sent = yield pending
        except BaseException as exc:
            try:
                pending = work.throw(exc)
            except StopIteration as done:
                return cast(_T, done.value)
        else:
            try:
                pending = work.send(sent)
            except StopIteration as done:
                return cast(_T, done.value)


def _error_message(exc: BaseException, request: aiocoap.Message, *, quiet: bool = False) -> aiocoap.Message:
    """The CoAP answer for a failure, logged (rate-limited per AE); ``quiet`` logs only unexpected ones."""
    if not isinstance(exc, MnSecdError):
        _log_refusal(request, "internal", "unexpected failure in the key service", exc)
        return aiocoap.Message(code=Code.INTERNAL_SERVER_ERROR, payload=b"internal: unexpected failure")
    answer = error_answer(exc)
    if not quiet:
        _log_refusal(request, exc.kind, f"request refused: {answer.diagnostic.decode()}")
    message = aiocoap.Message(code=answer.code, payload=answer.diagnostic)
    if answer.max_age is not None:
        message.opt.max_age = answer.max_age
    return message


def _log_refusal(request: aiocoap.Message, kind: str, text: str, exc: BaseException | None = None) -> None:
    claim = dtls.authenticated_claim(request.remote)
    ae = claim if isinstance(claim, str) else "?"
    held_back = _limiter.allow((ae, kind))
    if held_back is None:
        return
    if held_back:
        text += f" ({held_back} more from this AE since the last report)"
    extra = {"event": "control.internal" if exc is not None else "control.error", "kind": kind, "ae": ae}
    if exc is not None:
        log.error("%s", text, exc_info=exc, extra=extra)
    else:
        log.info("%s", text, extra=extra)


def _check_request(request: aiocoap.Message) -> None:
    """Refuse critical options the service does not understand, and block-wise requests."""
    numbers = [int(option.number) for option in request.opt.option_list()]
    check_critical_options(numbers)
    if OptionNumber.BLOCK1 in numbers:
        raise RequestError("block-wise requests are not supported: every request here fits one datagram")


async def _answering(request: aiocoap.Message, work: Callable[[], Any], *, quiet: bool = False) -> aiocoap.Message:
    try:
        _check_request(request)
        result: aiocoap.Message = await work()
    except Exception as exc:  # every failure becomes a CoAP answer; unexpected ones are logged
        return _error_message(exc, request, quiet=quiet)
    return result


@dataclass
class _Observation:
    request: aiocoap.Message
    ae: str
    release: Callable[[], None]  # lets the DTLS session end for idleness again
    btid: str | None = None  # of the key the observer holds
    #: Set once the first answer went out: notifications are computed after it, so they compare
    #: against the key the observer really holds.
    answered: asyncio.Event = field(default_factory=asyncio.Event)


def _decline(serverobservation: Any) -> None:
    """Answer an observation request once, without Observe.

    aiocoap calls the cancellation callback whether or not the observation was accepted (and
    fails if there is none), so it is accepted and withdrawn before the answer goes out.
    """
    serverobservation.accept(lambda: None)
    serverobservation.deregister()


class _Leaf:
    """Requests and answers here fit one datagram: no block-wise assembly (aiocoap's costs a lot)."""

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render_to_pipe(self, pipe: Pipe) -> None:
        """What aiocoap's Resource does for a resource without block-wise assembly, directly:
        render, answer. Upstream gets there through three more coroutines."""
        pipe.add_response(await self.render(pipe.request), is_last=True)

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        """aiocoap's Resource.render, finding the method's handler without formatting its name."""
        if not request.code.is_request():
            raise coap_error.UnsupportedMethod()
        handler = getattr(self, _HANDLERS.get(request.code, ""), None)
        if handler is None:
            raise coap_error.UnallowedMethod()
        response: aiocoap.Message = await handler(request)
        if response.code is None:
            response.code = Code.CONTENT if request.code in (Code.GET, Code.FETCH) else Code.CHANGED
        if request.opt.get_option(OptionNumber.NO_RESPONSE) and response.opt.no_response is None:
            response.opt.no_response = request.opt.no_response  # RFC 7967: the client's wish goes down
        return response


class KeyResource(_Leaf, resource.ObservableResource):  # type: ignore[misc]
    """``key``: NAF keys, with Observe notifications on refresh and wipe."""

    ct = _CT
    rt = "mn-secd.key"

    def __init__(self, service: _KeyService, max_observations: int = MAX_OBSERVATIONS) -> None:
        super().__init__()
        self._service = service
        self.max_observations = max_observations
        self._observers: dict[Any, _Observation] = {}
        self._per_ae: Counter[str] = Counter()
        self._notifications: set[asyncio.Task[None]] = set()

    @property
    def observation_count(self) -> int:
        return len(self._observers)

    async def render_to_pipe(self, pipe: Pipe) -> None:
        """A request with Observe goes aiocoap's way: the observation is set up, then answered."""
        if pipe.request.opt.observe == 0:
            await interfaces.ObservableResource._render_to_pipe(self, pipe)
        else:
            await super().render_to_pipe(pipe)

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._first_answer(request)

    async def render_fetch(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._first_answer(request)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._first_answer(request)

    async def _first_answer(self, request: aiocoap.Message) -> aiocoap.Message:
        """The answer to a request (GET: the query; FETCH, POST: the payload), or its error.

        An observation of this request, if any, was set up before it is rendered (aiocoap calls
        add_observation first); it is told which key went out, and that the first answer did.
        """
        seen = self._seen(request) if self._observers else None
        try:
            _check_request(request)
            return await self._service.answer(request, self._parse(request), seen)
        except Exception as exc:  # every failure becomes a CoAP answer; unexpected ones are logged
            return _error_message(exc, request)
        finally:
            for observation in self._observations_of(request):
                observation.answered.set()

    def _observations_of(self, request: aiocoap.Message) -> list[_Observation]:
        if not self._observers:
            return []
        return [o for o in self._observers.values() if o.request is request]

    def _seen(self, request: aiocoap.Message) -> Callable[[NafKey], None]:
        def record(key: NafKey) -> None:
            for observation in self._observations_of(request):
                observation.btid = key.btid

        return record

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        claim = dtls.authenticated_claim(request.remote)
        if request.code not in (Code.GET, Code.FETCH) or not isinstance(claim, str):
            # Answered once: a POST, or a request that is refused anyway (not an AE).
            _decline(serverobservation)
            return
        if self._per_ae[claim] >= self.max_observations:
            # RFC 7641 4.1: not added to the observers, the request is answered like a plain GET.
            _decline(serverobservation)
            held_back = _limiter.allow((claim, "observations"))
            if held_back is not None:
                more = f" ({held_back} more since the last report)" if held_back else ""
                log.warning(
                    "AE %s already holds %d observations (max_observations); answering without Observe%s",
                    claim,
                    self.max_observations,
                    more,
                    extra={"event": "control.observe-limit", "ae": claim},
                )
            return
        self._per_ae[claim] += 1
        self._observers[serverobservation] = _Observation(request, claim, dtls.hold_session(request.remote))
        serverobservation.accept(lambda: self._ended(serverobservation))

    def _ended(self, serverobservation: Any) -> None:
        observation = self._observers.pop(serverobservation, None)
        if observation is None:
            return
        observation.release()
        self._per_ae[observation.ae] -= 1
        if self._per_ae[observation.ae] <= 0:
            del self._per_ae[observation.ae]

    def key_event(self, event: KeyEvent) -> None:
        """A refresh or wipe: re-answer every observer (never forcing a bootstrap again).

        A refresh an observer already holds the key of (the bootstrap its own request caused) is
        not news, and is skipped. One log line sums up the event, whatever the number of observers.
        """
        targets = [
            (servobs, observation)
            for servobs, observation in self._observers.items()
            if not (event.kind is KeyEventKind.REFRESHED and event.btid is not None and event.btid == observation.btid)
        ]
        if not targets:
            return
        task = asyncio.get_running_loop().create_task(self._notify_all(event, targets))
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _notify_all(self, event: KeyEvent, targets: list[tuple[Any, _Observation]]) -> None:
        outcomes = await asyncio.gather(*(self._notify(servobs, obs, event) for servobs, obs in targets))
        ended = Counter(outcome for outcome in outcomes if outcome is not None)
        log.info(
            "key event %s: %d observers notified%s",
            event.kind,
            len(targets),
            "".join(f", {count} ended with {code}" for code, count in ended.items()),
            extra={"event": "control.notify", "observers": len(targets)},
        )

    def revalidate(self) -> None:
        """After a registry reload: end observations whose AE may no longer see that key."""
        for servobs, observation in list(self._observers.items()):
            try:
                key_request = self._parse(observation.request)
                self._service.registry.authorise_key(
                    self._service.identity(observation.request), key_request.naf_fqdn, key_request.ua
                )
            except MnSecdError as exc:
                servobs.trigger(_error_message(exc, observation.request))

    async def _notify(self, servobs: Any, observation: _Observation, event: KeyEvent) -> str | None:
        """Send one notification; returns the error code if it ended the observation."""
        await observation.answered.wait()
        held = observation.btid
        delivered: list[NafKey] = []

        async def work() -> aiocoap.Message:
            key_request = self._parse(observation.request)
            unforced = KeyRequest(key_request.naf_fqdn, key_request.ua, force=False)
            return await self._service.answer(observation.request, unforced, delivered.append)

        response = await _answering(observation.request, work, quiet=True)
        if servobs not in self._observers:
            return None
        if event.kind is KeyEventKind.REFRESHED and delivered and delivered[0].btid == held:
            return None  # the observer already holds this key
        if delivered:
            observation.btid = delivered[0].btid
        servobs.trigger(response)
        return None if response.code.is_successful() else str(response.code)

    @staticmethod
    def _parse(request: aiocoap.Message) -> KeyRequest:
        if request.code == Code.GET:
            return key_request_from_query(request.opt.uri_query)
        return decode_key_request(request.payload, request.opt.content_format)

    async def close(self) -> None:
        for task in list(self._notifications):
            task.cancel()
        await asyncio.gather(*self._notifications, return_exceptions=True)


class StatusResource(_Leaf, resource.Resource):  # type: ignore[misc]
    """``status``: what the daemon knows, without secrets (the IMPI masked)."""

    ct = _CT
    rt = "mn-secd.status"

    def __init__(self, service: _KeyService) -> None:
        super().__init__()
        self._service = service

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        async def work() -> aiocoap.Message:
            self._service.identity(request)
            fmt = answer_format(request.opt.accept)
            return aiocoap.Message(payload=encode_status(self._service.keys.status(), fmt), content_format=fmt)

        return await _answering(request, work)


class BootstrapResource(_Leaf, resource.Resource):  # type: ignore[misc]
    """``bootstrap``: POST forces a re-bootstrap, for AEs allowed to; answers with the new status."""

    ct = _CT
    rt = "mn-secd.bootstrap"

    def __init__(self, service: _KeyService) -> None:
        super().__init__()
        self._service = service

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        async def work() -> aiocoap.Message:
            entry = self._service.registry.authorise_bootstrap(self._service.identity(request))
            fmt = answer_format(request.opt.accept)
            await self._service.guarded(self._service.keys.force_bootstrap())
            log.info(
                "re-bootstrap forced by AE %s",
                entry.identity,
                extra={"event": "control.bootstrap", "ae": entry.identity},
            )
            status = encode_status(self._service.keys.status(), fmt)
            return aiocoap.Message(code=Code.CHANGED, payload=status, content_format=fmt)

        return await _answering(request, work)


class ControlServer:
    """The running key service: one DTLS server context per address, one site, one registry."""

    def __init__(
        self,
        service: _KeyService,
        credentials: RegistryCredentials,
        key_resource: KeyResource,
        contexts: list[aiocoap.Context],
    ) -> None:
        self._service = service
        self._credentials = credentials
        self._key_resource = key_resource
        self._contexts = contexts
        self._unsubscribe = service.keys.subscribe(self._key_event)
        self._closed = False

    @property
    def registry(self) -> AeRegistry:
        return self._service.registry

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the server really listens, as (address, port) pairs."""
        return [dtls.bound_address(ctx) for ctx in self._contexts]

    @property
    def peer_count(self) -> int:
        """DTLS peers currently held: sessions (at most ``max_peers``) and handshakes, all addresses."""
        return sum(len(dtls.peer_table(ctx)) for ctx in self._contexts)

    @property
    def observation_count(self) -> int:
        """Observations of ``/key`` currently held (at most ``max_observations`` per AE)."""
        return self._key_resource.observation_count

    def _key_event(self, event: KeyEvent) -> None:
        if event.kind is KeyEventKind.WIPED:
            self.wipe_answers()
        else:
            self._service.forget_encoded_answers()  # a refreshed key's old answer is not reused
        self._key_resource.key_event(event)

    def wipe_answers(self) -> None:
        """Keys were wiped: zero every answer that carried one, and drop those kept for deduplication."""
        held = self._service.wipe_key_payloads()
        stored = dtls.forget_answers(self._contexts)
        log.debug(
            "key answers wiped: %d held by messages, %d stored for duplicates",
            held,
            stored,
            extra={"event": "control.answers_wiped"},
        )

    def reload_registry(self, registry: AeRegistry) -> None:
        """Swap the AE registry (SIGHUP): new handshakes and requests see it at once.

        Sessions of AEs that were removed or whose entry changed (PSK or ACL) end now, so a revoked
        or re-keyed AE cannot keep using a session it set up before; observations that lost their
        authorisation end with 4.03.
        """
        stale = self._service.registry.stale_identities(registry)
        self._service.registry = registry
        self._credentials.registry = registry
        ended = dtls.evict_sessions(self._contexts, lambda claim: claim in stale)
        self._key_resource.revalidate()
        log.info(
            "AE registry reloaded: %d AEs, %d sessions ended",
            len(registry),
            ended,
            extra={"event": "control.reload", "aes": len(registry), "sessions_ended": ended},
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        await self._key_resource.close()
        for ctx in self._contexts:
            await ctx.shutdown()


class _Site(resource.Site):  # type: ignore[misc]
    """aiocoap's Site without its per-request deep copy of the message.

    ``Site`` hands each resource a copy of the request with the path stripped, made with
    ``copy.deepcopy``: the single most expensive step of a key request. The resources here are leaves
    that never look at the path, so they get the request itself. Each answers a request without
    Observe once, so the DTLS server may render such requests the short way
    (:mod:`mn_secd.dtls.rendering`).
    """

    def _find_child_and_pathstripped_message(self, request: aiocoap.Message) -> tuple[Any, aiocoap.Message]:
        return self._resources[request.opt.uri_path], request

    def plain_resource(self, request: aiocoap.Message) -> _Leaf | None:
        if request.opt.get_option(OptionNumber.URI_PATH_ABBREV):
            return None  # aiocoap's way resolves it (or refuses it)
        found = self._resources.get(request.opt.uri_path)
        return found if isinstance(found, _Leaf) else None


class _WellKnownCore(_Leaf, resource.WKCResource):  # type: ignore[misc]
    """aiocoap's ``/.well-known/core``, refusing critical options it would otherwise ignore."""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        parent = super().render_get
        return await _answering(request, lambda: parent(request))


def _build_site(service: _KeyService, max_observations: int) -> tuple[resource.Site, KeyResource]:
    site = _Site()
    key_resource = KeyResource(service, max_observations)
    site.add_resource(["key"], key_resource)
    site.add_resource(["status"], StatusResource(service))
    site.add_resource(["bootstrap"], BootstrapResource(service))
    site.add_resource([".well-known", "core"], _WellKnownCore(site.get_resources_as_linkheader, impl_info=None))
    return site, key_resource


async def start_control_server(
    keys: KeyProvider,
    registry: AeRegistry,
    addresses: Sequence[str] = DEFAULT_ADDRESSES,
    port: int = DEFAULT_PORT,
    *,
    max_peers: int = 256,
    max_handshakes: int | None = None,
    idle_timeout: float = 300.0,
    request_timeout: float = REQUEST_TIMEOUT,
    max_observations: int = MAX_OBSERVATIONS,
) -> ControlServer:
    """Serve the key service over DTLS-PSK on each address (port 0: ephemeral, see ``addresses``).

    ``max_peers`` bounds the established DTLS sessions per address and ``max_handshakes`` (default:
    the same) the handshakes in progress; ``max_observations`` the observations per AE. Raises
    :class:`mn_secd.errors.BindError` (also an ``OSError``) if an address cannot be bound; nothing
    is left listening then.
    """
    if max_observations < 0:
        raise ValueError("max_observations must not be negative")
    service = _KeyService(keys, registry, request_timeout)
    credentials = RegistryCredentials(registry)
    site, key_resource = _build_site(service, max_observations)
    contexts = await dtls.create_dtls_server_contexts(
        site,
        credentials,
        addresses,
        port,
        max_peers=max_peers,
        max_handshakes=max_handshakes,
        idle_timeout=idle_timeout,
    )
    server = ControlServer(service, credentials, key_resource, contexts)
    log.debug("key service listening on %s", server.addresses, extra={"event": "control.listening"})
    return server

"""The keystore: one bootstrap session, the NAF keys derived from it, and when to renew them.

It answers :meth:`KeyStore.get_key` from a cache keyed by NAF_Id, or after one bootstrap shared by
every concurrent caller (single-flight), and keeps the session fresh by itself: a refresh is due a
margin plus a random jitter before Ks expires, so a fleet of gateways that booted together does not
hit the BSF in step. Subscribers are told when keys were refreshed or wiped.

Every bootstrap costs an AKA run on the card and a sequence number, so no caller can cause them at
will: a forced re-bootstrap (a NAF rejected the B-TID) has a minimum interval
(:class:`~mn_secd.errors.BootstrapRateLimited`), and after a failure further bootstraps wait for the
planner's retry time, during which callers get the last failure again (or, while a wait the
BSF asked for with ``Retry-After`` runs, :class:`~mn_secd.errors.BsfAskedToWait`, forced or not:
nobody's request reaches an overloaded BSF before it said). When that time comes the
keystore retries by itself (unless the card is gone or cannot do the GBA mode asked for), so a
gateway gets its key back after a BSF outage without waiting for an AE to ask.

Keys are bound to the card that made them: on card removal or change, and on :meth:`KeyStore.close`,
Ks is overwritten and every NAF key dropped. Each cached NAF key sits in a
:class:`~mn_secd.secret.SecretBytes` that is zeroed when it leaves the cache (wipe, expiry, a
new session, eviction); callers get short-lived copies.

At start-up (:meth:`KeyStore.start`) a session kept from the last run is resumed when the planner's
rule and the card allow (:mod:`mn_secd.gba.continuity`): no AUTHENTICATE, no BSF request. Otherwise
the first bootstrap waits for the planner's start jitter, unless an AE is waiting for a key. With a
:class:`~mn_secd.gba.session_store.SessionKeeper`, each new session is kept for the next start and
forgotten when it ends for good (card removed or changed, Ks expired), not when the daemon stops.

As in aioquic, the decisions live in a clock-free core (:class:`~mn_secd.gba.planner.BootstrapPlanner`,
time passed in) that tests drive with a fake clock; :class:`KeyStore` is the asyncio adapter that
sleeps until the planner's next deadline, on the same injected :class:`~mn_secd.clock.Clock` it
decides with, and runs bootstraps through any :class:`~mn_secd.gba.ub.UbRunner`.

GBA_U needs one more rule: the card holds a single Ks, which a new bootstrap replaces at its
AUTHENTICATE, before the BSF has confirmed anything. So while a GBA_U bootstrap runs, the old session
serves only keys already cached, and new derivations wait for it (card operations are serialised by
one lock). If it fails, what it did to the card decides (:class:`~mn_secd.gba.session.BootstrapAttempt`):
before any AUTHENTICATE (the BSF down, busy or refusing the first request) the card's Ks is still the
session's, which goes on serving new keys; after one, only another bootstrap can give new keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

from mn_secd.card_identity import CardEvent, CardEventKind
from mn_secd.clock import SYSTEM_CLOCK, Clock
from mn_secd.errors import (
    BootstrapRateLimited,
    BsfAskedToWait,
    BsfServerError,
    GbaError,
    GbaModeUnavailable,
    MnSecdError,
    UiccAbsent,
)
from mn_secd.gba.planner import BootstrapPlanner, BootstrapTiming, Due, StartAction, StartDecision
from mn_secd.gba.session import BootstrapAttempt, BootstrapSession, bootstrap, choose_mode, derive_naf_key
from mn_secd.gba.session_store import SessionKeeper
from mn_secd.gba.ub import UbRunner
from mn_secd.interfaces import CardAccess
from mn_secd.naf_keys import GbaMode, GbaPolicy, KeyEvent, KeyEventKind, KeyServiceStatus, NafKey
from mn_secd.observers import Subscribers
from mn_secd.secret import SecretBytes
from mn_secd.ua import UaId, naf_id, normalise_fqdn

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The adapter re-reads the clock at least this often, so a wall-clock step (NTP after boot) is noticed.
MAX_SLEEP = 60.0
#: NAF keys cached per session; AEs allowed a wildcard NAF pattern cannot grow the cache without bound.
MAX_CACHED_KEYS = 1024
#: How often one request re-reads the session when it keeps being replaced under it.
MAX_SESSION_SWITCHES = 3
#: What ``status`` says while the session rests on a 200 OK the BSF did not authenticate.
NO_RSPAUTH_WARNING = (
    "the BSF's answer to this bootstrap carried no rspauth and was accepted unauthenticated"
    " ([gba] require_rspauth = false)"
)


@dataclasses.dataclass(frozen=True, slots=True)
class _CachedKey:
    """A NAF key as the cache holds it: the answer without its key, and the key in a wipeable buffer."""

    answer: NafKey  # with an empty key
    key: SecretBytes

    def handout(self) -> NafKey:
        """The answer with a short-lived copy of the key, for one caller."""
        return dataclasses.replace(self.answer, key=self.key.get())


_DUE_MESSAGES = {
    Due.REFRESH: "refreshing Ks before it expires",
    Due.RETRY: "retrying the bootstrap after a failure",
    Due.START: "bootstrapping at start-up",
}


class KeyStore:
    """:class:`~mn_secd.interfaces.KeyProvider` over a card and a Ub client.

    The keystore does not own ``card`` or ``ub``: :meth:`close` wipes its keys and stops its timer,
    the caller closes the card and the Ub client. ``timing`` is the planner's (its defaults are what
    the fleet simulation recommends); ``clock`` is what the keystore both decides and sleeps on (a
    test passes its own); ``rng`` draws the refresh and retry jitter; ``keeper`` keeps sessions
    across restarts.
    """

    def __init__(
        self,
        card: CardAccess,
        ub: UbRunner,
        policy: GbaPolicy = GbaPolicy.AUTO,
        *,
        timing: BootstrapTiming | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        keeper: SessionKeeper | None = None,
    ) -> None:
        self._card = card
        self._keeper = keeper
        self._starting: asyncio.Event | None = None  # set once start() has decided
        self._ub = ub
        self._policy = policy
        self._clock = clock
        self.planner = BootstrapPlanner(timing or BootstrapTiming(), rng or random.Random())
        self._session: BootstrapSession | None = None
        self._cache: dict[bytes, _CachedKey] = {}
        self._inflight: asyncio.Task[BootstrapSession] | None = None
        self._derivations: dict[bytes, asyncio.Task[_CachedKey | None]] = {}
        self._card_lock = asyncio.Lock()
        self._card_ks_current = False  # GBA_U: the card's Ks is the current session's
        self._generation = 0  # bumped on every wipe: work started before it must not store results
        self._last_failure: MnSecdError | None = None
        self._card_present = True
        self._impi: str | None = None
        self._subscribers = Subscribers[KeyEvent](log, "gba.subscriber_error")
        self._refresh_task: asyncio.Task[None] | None = None
        #: Every task this keystore started (also those a wipe detached), for close() to stop.
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wakeup = asyncio.Event()
        self._closed = False
        self.bootstraps = 0  # completed bootstraps, for status and tests
        self._unsubscribe_card = card.subscribe(self._on_card_event)

    # --- KeyProvider ---------------------------------------------------------------------------------

    async def get_key(self, naf_fqdn: str, ua_id: UaId, force: bool = False) -> NafKey:
        self._check_open()
        fqdn = normalise_fqdn(naf_fqdn)
        nid = naf_id(fqdn, ua_id)
        if force:
            await self.force_bootstrap()
        for _ in range(MAX_SESSION_SWITCHES):
            session = await self._usable_session()
            cached = self._cache.get(nid)
            if cached is not None and cached.answer.btid == session.btid:
                return cached.handout()
            if session is not self._session:
                continue  # wiped or replaced while this caller was waking up
            if session.mode is GbaMode.GBA_ME:
                key = await derive_naf_key(self._card, session, nid)
                return self._store(session, fqdn, ua_id, nid, key).handout()
            if not self._card_ks_current and self._running() is None:
                # A GBA_U bootstrap failed after the card replaced Ks: new keys need a new session.
                await self._join_bootstrap()
                continue
            entry = await self._derive_on_card(session, fqdn, ua_id, nid)
            if entry is not None and not entry.key.wiped:
                return entry.handout()
        raise GbaError("the bootstrap session kept changing during the request; try again")

    async def force_bootstrap(self) -> None:
        """Bootstrap again now (a NAF rejected the B-TID); joins one already running."""
        self._check_open()
        task = self._running()
        if task is None:
            now = self._clock.time()
            self._check_bsf_wait(now)
            retry_after = self.planner.forced_retry_after(now)
            if retry_after is not None:
                raise BootstrapRateLimited(retry_after)
            task = self._start_bootstrap()
        await self._await_shared(task)

    def status(self) -> KeyServiceStatus:
        session = self._session
        live = session is not None and self._clock.time() < session.expires.timestamp()
        last = self._last_failure
        return KeyServiceStatus(
            card_present=self._card_present,
            impi=session.impi if session is not None else self._impi,
            bootstrapped=live,
            btid=session.btid if session is not None and live else None,
            expires=session.expires if session is not None and live else None,
            gba_mode=session.mode if session is not None and live else None,
            last_error=f"{last.kind}: {last}" if last is not None else None,
            warning=NO_RSPAUTH_WARNING if session is not None and live and not session.rspauth_verified else None,
        )

    def subscribe(self, callback: Callable[[KeyEvent], None]) -> Callable[[], None]:
        return self._subscribers.subscribe(callback)

    # --- life cycle ----------------------------------------------------------------------------------

    async def start(self, *, ae_waiting: bool = False) -> StartDecision:
        """At start-up: resume the kept session, or plan the first bootstrap (the refresh timer runs it).

        Resuming costs one read of the card's EF_GBABP (GBA_U) or one unsealing (GBA_ME). What is
        not resumed is forgotten; the first bootstrap then comes after the start jitter, or at once
        when ``ae_waiting`` (an AE asked for a key before there was a card to answer it). Key
        requests that arrive meanwhile wait for the decision.
        """
        self._check_open()
        self._starting = asyncio.Event()
        try:
            return await self._start(ae_waiting)
        finally:
            self._starting.set()

    async def _start(self, ae_waiting: bool) -> StartDecision:
        identity = await self._card.identity()
        generation = self._generation
        recalled = None
        if self._keeper is not None:
            try:
                mode: GbaMode | None = choose_mode(identity, self._policy)
            except GbaModeUnavailable:
                mode = None
            async with self._card_lock:
                recalled = await self._keeper.recall(self._card, identity, mode)
        if recalled is not None and generation != self._generation:  # the card went meanwhile
            recalled.session.wipe()
            recalled = None
        stored = recalled.record.stored if recalled is not None else None
        decision = self.planner.start(self._clock.time(), iccid=identity.iccid, stored=stored, ae_waiting=ae_waiting)
        log.info(
            "start-up: %s (%s)",
            "session resumed" if decision.action is StartAction.RESUME else "bootstrap planned",
            decision.reason,
            extra={"event": f"gba.start_{decision.action.value}", "due_in": round(decision.at - self._clock.time(), 1)},
        )
        if recalled is not None and decision.action is StartAction.RESUME:
            self._install(recalled.session, resumed=True)
        else:
            if recalled is not None:
                recalled.session.wipe()
                if self._keeper is not None:
                    self._keeper.forget(decision.reason)
            self._ensure_timer()
            self._wake()
        return decision

    async def ensure_bootstrapped(self) -> BootstrapSession:
        """The current session, bootstrapping first if there is none (daemon start-up warms up with it)."""
        self._check_open()
        return await self._usable_session()

    async def close(self) -> None:
        """Stop the refresh timer and in-flight work, overwrite Ks, drop every NAF key (KeyEvent WIPED)."""
        if self._closed:
            return
        self._closed = True
        self._unsubscribe_card()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        # Their outcomes are of no interest any more; the caller's own cancellation still propagates.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._wipe("shutdown")
        self._subscribers.clear()

    async def __aenter__(self) -> KeyStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- sessions and bootstraps ---------------------------------------------------------------------

    async def _usable_session(self) -> BootstrapSession:
        starting = self._starting
        if starting is not None and not starting.is_set():
            await starting.wait()  # the session of the last run may be about to be resumed
        session = self._session
        if session is not None:
            if self._clock.time() < session.expires.timestamp():
                return session
            self._expire(session)
        return await self._join_bootstrap()

    async def _join_bootstrap(self) -> BootstrapSession:
        """The running bootstrap, or a new one unless the back-off after a failure is still running.

        A new one replacing a session whose lifetime ran out waits for the planner's
        ``min_bootstrap_interval`` since the last (a BSF's very short key lifetime must not turn key
        requests, or observers told of the expiry, into a bootstrap loop); a session that appears
        meanwhile is returned instead.
        """
        while (task := self._running()) is None:
            now = self._clock.time()
            if self.planner.backoff_remaining(now) is not None and self._last_failure is not None:
                self._check_bsf_wait(now)
                raise self._last_failure.with_traceback(None)
            wait = self.planner.unforced_wait(now)
            if wait is None:
                task = self._start_bootstrap()
                break
            await self._clock.sleep(wait)
            self._check_open()
            session = self._session
            if session is not None and self._clock.time() < session.expires.timestamp():
                return session
        return await self._await_shared(task)

    async def _await_shared(self, task: asyncio.Task[_T]) -> _T:
        """Wait for work shared by several callers.

        Shielded: a caller giving up must not cancel an AUTHENTICATE the others are waiting for. If
        the work itself was cancelled (the keystore is closing), the caller gets a typed error rather
        than a CancelledError it would mistake for its own.
        """
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                raise GbaError("the keystore was closed during the request") from None
            raise

    def _check_bsf_wait(self, now: float) -> None:
        """While the wait the BSF asked for runs, nobody's request reaches it: the fleet's BSF is
        overloaded, and an AE forcing or waiting for a bootstrap would only add to its load."""
        until = self.planner.bsf_asked_until(now)
        last = self._last_failure
        if until is not None and isinstance(last, BsfServerError):
            raise BsfAskedToWait(last.status, datetime.fromtimestamp(until, UTC), until - now)

    def _running(self) -> asyncio.Task[BootstrapSession] | None:
        """The bootstrap in flight. A finished task whose done-callback has not run yet is not in
        flight: awaiting it would not yield, and a loop waiting for it would spin."""
        task = self._inflight
        return task if task is not None and not task.done() else None

    def _start_bootstrap(self) -> asyncio.Task[BootstrapSession]:
        self._check_open()
        self.planner.bootstrap_started(self._clock.time())
        task = self._spawn(self._run_bootstrap(self._generation), "mn-secd-bootstrap")
        task.add_done_callback(self._bootstrap_done)
        self._inflight = task
        return task

    async def _run_bootstrap(self, generation: int) -> BootstrapSession:
        attempt = BootstrapAttempt()
        try:
            async with self._card_lock:
                try:
                    session = await bootstrap(self._card, self._ub, self._policy, attempt)
                finally:
                    # Only an AUTHENTICATE that replaced the card's Ks ends what the card can derive
                    # for the session in use; decided before any derivation waiting for the lock runs.
                    if attempt.card_ks_replaced:
                        self._card_ks_current = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc if isinstance(exc, MnSecdError) else GbaError(f"bootstrap failed: {type(exc).__name__}")
            if generation == self._generation and not self._closed:
                # The card gone or a policy the card cannot meet will not mend with time: the card's
                # next event, or a caller, asks again. Anything else is retried on the planner's time.
                transient = not isinstance(error, (UiccAbsent, GbaModeUnavailable))
                asked = error.retry_after if isinstance(error, BsfServerError) else None
                retry_at = self.planner.bootstrap_failed(self._clock.time(), retry=transient, retry_after=asked)
                self._last_failure = error
                log.warning(
                    "bootstrap failed",
                    extra={
                        "event": "gba.bootstrap_failed",
                        "kind": error.kind,
                        "retry_in": retry_at - self._clock.time(),
                        "retry_after": asked,
                    },
                    exc_info=error is not exc,
                )
                self._ensure_timer()
                self._wake()
            if error is exc:
                raise
            raise error from exc
        if generation != self._generation or self._closed:
            session.wipe()
            raise UiccAbsent("the card was removed or changed during the bootstrap")
        self._install(session)
        return session

    def _bootstrap_done(self, task: asyncio.Task[BootstrapSession]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here so that a failure nobody awaited is not reported as lost

    def _install(self, session: BootstrapSession, *, resumed: bool = False) -> None:
        """A new session (or, ``resumed``, the one the planner's :meth:`start` accepted) is current."""
        old = self._session
        self._session = session
        self._clear_cache()
        if old is not None:
            old.wipe()
        self._card_ks_current = True
        self._impi = session.impi
        self._card_present = True
        self._last_failure = None
        if resumed:
            refresh_at = self.planner.refresh_at or self._clock.time()
        else:
            self.bootstraps += 1
            refresh_at = self.planner.bootstrap_succeeded(self._clock.time(), session.expires.timestamp())
            if self._keeper is not None and self.planner.lifetime is not None:
                self._keeper.remember(session, self.planner.lifetime)
        log.info(
            "resumed bootstrap session" if resumed else "new bootstrap session",
            extra={
                "event": "gba.session",
                "btid_hash": session.btid_hash,
                "mode": session.mode.value,
                "refresh_in": round(refresh_at - self._clock.time(), 1),
            },
        )
        self._ensure_timer()
        self._wake()
        self._subscribers.emit(KeyEvent(KeyEventKind.REFRESHED, session.btid))

    def _expire(self, session: BootstrapSession) -> None:
        if self._session is not session:
            return
        log.info("Ks expired", extra={"event": "gba.expired", "btid_hash": session.btid_hash})
        self._drop_session(expired=True)
        if self._keeper is not None:
            self._keeper.forget("Ks expired")
        self._subscribers.emit(KeyEvent(KeyEventKind.WIPED, session.btid))

    def _drop_session(self, *, expired: bool = False) -> BootstrapSession | None:
        old = self._session
        self._session = None
        if old is not None:
            old.wipe()
        self._clear_cache()
        self._card_ks_current = False
        self.planner.session_dropped(expired=expired)
        self._wake()
        return old

    def _wipe(self, reason: str) -> None:
        """Forget everything the card produced; work already running may finish but cannot store."""
        self._generation += 1
        self._inflight = None
        self._derivations.clear()
        old = self._drop_session()
        if self._keeper is not None and not self._closed:  # a stop keeps the session for the next start
            self._keeper.forget(reason)
        log.info(
            "keys wiped",
            extra={"event": "gba.wiped", "reason": reason, "btid_hash": old.btid_hash if old else None},
        )
        self._subscribers.emit(KeyEvent(KeyEventKind.WIPED, old.btid if old is not None else None))

    # --- NAF keys ------------------------------------------------------------------------------------

    def _store(self, session: BootstrapSession, fqdn: str, ua: UaId, nid: bytes, key: bytes) -> _CachedKey:
        answer = NafKey(
            naf_fqdn=fqdn,
            ua_id=ua,
            naf_id=nid,
            btid=session.btid,
            key=b"",
            expires=session.expires,
            gba_mode=session.mode,
        )
        entry = _CachedKey(answer, SecretBytes(key))
        if session is self._session:
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.pop(next(iter(self._cache))).key.wipe()
            old = self._cache.pop(nid, None)
            if old is not None:
                old.key.wipe()
            self._cache[nid] = entry
        return entry

    def _clear_cache(self) -> None:
        for entry in self._cache.values():
            entry.key.wipe()
        self._cache.clear()

    async def _derive_on_card(self, session: BootstrapSession, fqdn: str, ua: UaId, nid: bytes) -> _CachedKey | None:
        """GBA_U: one ``DE`` per NAF_Id however many callers ask at once; None if the session moved on."""
        task = self._derivations.get(nid)
        if task is None:
            task = self._spawn(self._card_derivation(session, fqdn, ua, nid), "mn-secd-naf-derivation")
            self._derivations[nid] = task

            def done(t: asyncio.Task[_CachedKey | None]) -> None:
                if self._derivations.get(nid) is t:
                    del self._derivations[nid]
                if not t.cancelled():
                    t.exception()

            task.add_done_callback(done)
        return await self._await_shared(task)

    async def _card_derivation(self, session: BootstrapSession, fqdn: str, ua: UaId, nid: bytes) -> _CachedKey | None:
        generation = self._generation
        async with self._card_lock:
            if session is not self._session or not self._card_ks_current:
                return None
            key = await derive_naf_key(self._card, session, nid)
        if generation != self._generation or session is not self._session:
            return None
        return self._store(session, fqdn, ua, nid, key)

    # --- the timer -----------------------------------------------------------------------------------

    def _ensure_timer(self) -> None:
        if self._refresh_task is None:
            self._refresh_task = self._spawn(self._refresh_loop(), "mn-secd-key-refresh")

    async def _refresh_loop(self) -> None:
        """Sleep until the planner's next deadline, then bootstrap or expire; woken early on any change."""
        while not self._closed:
            self._wakeup.clear()
            now = self._clock.time()
            due = self.planner.due(now)
            if due is Due.EXPIRE and self._session is not None:
                self._expire(self._session)
                continue
            if due is Due.EXPIRE:
                self.planner.session_dropped()
                continue
            task = self._running()
            if task is None and due is not None:
                log.info(_DUE_MESSAGES[due], extra={"event": f"gba.{due.value}"})
                task = self._start_bootstrap()
            if task is not None:
                with contextlib.suppress(MnSecdError):
                    await asyncio.shield(task)
                continue
            deadline = self.planner.next_deadline()
            await self._sleep(None if deadline is None else min(max(0.0, deadline - now), MAX_SLEEP))

    async def _sleep(self, seconds: float | None) -> None:
        """Until :meth:`_wake` is called or ``seconds`` have passed on the keystore's clock."""
        if seconds is None:
            await self._wakeup.wait()
            return
        woken = asyncio.ensure_future(self._wakeup.wait())
        slept = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait((woken, slept), return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            slept.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, _T], name: str) -> asyncio.Task[_T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _wake(self) -> None:
        self._wakeup.set()

    # --- card events and subscribers -----------------------------------------------------------------

    def _on_card_event(self, event: CardEvent) -> None:
        identity = event.identity
        if event.kind is CardEventKind.REMOVED:
            self._card_present = False
            self._wipe("card removed")
            return
        self._card_present = True
        session = self._session
        changed = event.kind is CardEventKind.CHANGED or (
            session is not None
            and identity is not None
            and (identity.iccid, identity.impi) != (session.iccid, session.impi)
        )
        if identity is not None:
            self._impi = identity.impi
        if changed:
            self._wipe("card changed")
        if changed or session is None:
            # A different card, or one back after a removal: it deserves a bootstrap now, whatever
            # failed (or was forced) with the card that was there before.
            self.planner.card_changed()
            self._last_failure = None
        self._wake()

    def _check_open(self) -> None:
        if self._closed:
            raise GbaError("the keystore is closed")

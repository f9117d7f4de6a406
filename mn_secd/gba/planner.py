"""When to bootstrap: the keystore's clock-free decisions (start, resume, refresh, expiry, retries).

As in aioquic, the decisions live in a core with no I/O and no clock of its own (time is passed in),
which tests drive with a fake clock; :class:`~mn_secd.gba.keystore.KeyStore` is the asyncio adapter
that sleeps until the planner's next deadline, and the fleet simulation (``mn-secd sim fleet``)
drives one planner per simulated gateway on a virtual clock. Every bootstrap costs an AKA run on the
card and two or three HTTP exchanges with the BSF, so the planner also decides what a fleet of
gateways does to the BSF together; the defaults of :class:`BootstrapTiming` come from that
simulation and the README says why:

* **refresh** at a random point between ``margin`` and ``margin + jitter`` before Ks expires, both
  shares of the key lifetime (refresh between 50 % and 67 % of it by default): a gateway rides out
  a BSF outage as long as the margin with the key it has, and refresh times drift apart instead of
  staying in step after the whole fleet was re-keyed at once;
* **retry** a failed bootstrap on its own, after a random 50-100 % of ``retry_interval`` (40 % of
  the lifetime, at most two hours) once the gateway has seen a lifetime: a failing gateway then
  sends at most about twice its steady rate of requests, so the BSF coming back after an outage
  sees about twice its steady load however long the outage was. Before any lifetime is known the
  back-off is exponential from ``failure_backoff`` to ``max_failure_backoff``;
* **start**: resume a stored session of the same card that is still valid (refreshed at once, within
  the start jitter, if it is inside its margin); with nothing to resume, bootstrap after a random
  0..``start_jitter`` seconds (10 min), unless an AE is already waiting for a key, so that a region
  whose power comes back does not bootstrap in the same minute;
* **Retry-After**: a BSF that answered 5xx or 429 with ``Retry-After`` gets no bootstrap before it
  asked (nor before the back-off above), capped at the back-off's own longest wait
  (:meth:`BootstrapPlanner.retry_after_cap`), so a broken BSF cannot park a gateway for longer.

A forced re-bootstrap (a NAF refused the B-TID) has a minimum interval, and waits for the retry
time after a failure like any other bootstrap. Whatever the shares say, a timed refresh or retry,
and a bootstrap replacing a session whose lifetime ran out, come no sooner than
``min_bootstrap_interval`` (10 s) after the previous bootstrap: a BSF that hands out very short
lifetimes gets a refresh at a fraction of the lifetime, never a bootstrap loop.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass

from mn_secd.gba.ub import backoff_delay

#: A clock before this (2024-01-01T00:00:00Z) has not been set: nothing stored is trusted against it.
CLOCK_FLOOR = 1_704_067_200.0


class Due(enum.Enum):
    REFRESH = "refresh"  # time to bootstrap again while the current Ks is still valid
    EXPIRE = "expire"  # Ks has expired: drop it
    RETRY = "retry"  # no valid Ks, the last bootstrap failed and its back-off is over: try again
    START = "start"  # the start-up bootstrap, once the start jitter has passed


@dataclass(frozen=True, slots=True)
class Span:
    """A duration: ``seconds``, plus ``share`` of the key lifetime (``"33%"`` in the configuration)."""

    seconds: float = 0.0
    share: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds >= 0 and math.isfinite(self.share) and self.share >= 0):
            raise ValueError(f"a span must be finite and not negative, got {self!r}")

    def of(self, lifetime: float) -> float:
        return self.seconds + self.share * lifetime

    def __str__(self) -> str:
        parts = [f"{self.share * 100:g}%"] if self.share else []
        if self.seconds or not parts:
            parts.append(f"{self.seconds:g} s")
        return " + ".join(parts)


@dataclass(frozen=True)
class BootstrapTiming:
    """The planner's parameters (seconds, or :class:`Span` of the key lifetime)."""

    #: Refresh at the latest this long before Ks expires ...
    refresh_margin: Span = Span(share=0.33)
    #: ... and earlier by a random 0..jitter (never before half of the lifetime has passed).
    refresh_jitter: Span = Span(share=0.17)
    #: After a failure, once a lifetime is known: retry after a random 50-100 % of this ...
    retry_interval: Span = Span(share=0.5)
    #: ... but never more than this many seconds.
    max_retry_interval: float = 7200.0
    #: Before any lifetime is known: exponential back-off from this to the maximum (seconds).
    failure_backoff: float = 5.0
    max_failure_backoff: float = 600.0
    #: Minimum seconds between two forced re-bootstraps.
    min_forced_interval: float = 30.0
    #: With nothing to resume at start and no AE waiting: bootstrap after a random 0..start_jitter s.
    start_jitter: float = 600.0
    #: A timed refresh or retry, or a bootstrap replacing an expired session, comes no sooner than
    #: this many seconds after the previous bootstrap began (short key lifetimes).
    min_bootstrap_interval: float = 10.0

    def __post_init__(self) -> None:
        names = (
            "max_retry_interval",
            "failure_backoff",
            "max_failure_backoff",
            "min_forced_interval",
            "start_jitter",
            "min_bootstrap_interval",
        )
        for name in names:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"planner policy: {name} must be finite and not negative, got {value!r}")


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A bootstrap session found at start-up: EF_GBABP on a GBA_U card, or the daemon's sealed file."""

    btid: str
    expires_at: float  # end of the key lifetime, in seconds on the planner's clock
    iccid: str  # the card the session was made with
    #: The lifetime the BSF gave, if it was recorded; EF_GBABP keeps only the expiry, and then the
    #: time still left stands in for it.
    lifetime: float | None = None


class StartAction(enum.Enum):
    RESUME = "resume"  # use the stored session; it is refreshed like one just bootstrapped
    BOOTSTRAP = "bootstrap"  # bootstrap at ``StartDecision.at``


@dataclass(frozen=True, slots=True)
class StartDecision:
    action: StartAction
    at: float  # RESUME: when the resumed session is refreshed; BOOTSTRAP: when to bootstrap
    reason: str  # why, in words for the log


class BootstrapPlanner:
    """When to refresh, when Ks expires, and whether a bootstrap may start now. No I/O, no clock.

    Times are seconds on the caller's clock (the keystore uses POSIX time, because the BSF states
    the key lifetime as an absolute UTC time). ``rng`` draws every jitter; a simulation may share
    one generator between many planners.
    """

    __slots__ = (
        "_retry",
        "_rng",
        "asked_until",
        "blocked_until",
        "ended_by_expiry",
        "expires_at",
        "failures",
        "last_start",
        "lifetime",
        "policy",
        "refresh_at",
        "start_at",
    )

    def __init__(self, policy: BootstrapTiming, rng: random.Random) -> None:
        self.policy = policy
        self._rng = rng
        self.expires_at: float | None = None
        self.refresh_at: float | None = None
        #: The last key lifetime the BSF gave (None until one is known): the scale for retries.
        self.lifetime: float | None = None
        self.blocked_until: float | None = None
        #: The last failure's wait was the BSF's ``Retry-After`` (capped): no bootstrap, whoever
        #: asks, before this time.
        self.asked_until: float | None = None
        self.failures = 0
        self._retry = False
        #: The last session's lifetime ran out (rather than being wiped with its card).
        self.ended_by_expiry = False
        self.last_start: float | None = None
        self.start_at: float | None = None

    # -- inputs --

    def start(self, now: float, *, iccid: str, stored: StoredSession | None, ae_waiting: bool) -> StartDecision:
        """The daemon starts with card ``iccid``: resume ``stored``, or bootstrap now or after the jitter.

        A stored session is resumed if it was made with this card, the clock has been set and it has
        not expired. With more than the refresh margin of its lifetime ahead it is refreshed as if
        just bootstrapped; inside the margin it serves only until a start-up refresh within the
        start jitter (sooner if half its remaining time is shorter), so that a gateway restarting
        near its refresh time is not left without a key while it waits. Otherwise the caller
        discards it and bootstraps at :attr:`StartDecision.at` (:meth:`due` answers ``START``
        then), or at once if an AE is already waiting for a key.
        """
        refused = self._resume_refused(now, iccid, stored)
        if refused is None and stored is not None:
            remaining = stored.expires_at - now
            lifetime = stored.lifetime if stored.lifetime is not None else remaining
            margin = self.policy.refresh_margin.of(lifetime)
            self.expires_at = stored.expires_at
            self.lifetime = lifetime
            if remaining > margin:
                refresh_at = self._refresh_time(stored.expires_at, lifetime)
                if refresh_at < now:  # its refresh window has begun: some time before the margin
                    refresh_at = self._rng.uniform(now, stored.expires_at - margin)
                reason = "the stored session is still valid"
            else:
                refresh_at = now + self._rng.uniform(0.0, min(self.policy.start_jitter, remaining / 2))
                reason = "the stored session is valid but inside its refresh margin: refreshed at start-up"
            self.refresh_at = refresh_at
            return StartDecision(StartAction.RESUME, refresh_at, reason)
        if ae_waiting:
            self.start_at = now
            return StartDecision(StartAction.BOOTSTRAP, now, f"{refused}; an AE is waiting")
        self.start_at = now + self._rng.uniform(0.0, self.policy.start_jitter)
        return StartDecision(StartAction.BOOTSTRAP, self.start_at, f"{refused}; start jitter")

    def bootstrap_started(self, now: float) -> None:
        self.last_start = now
        self.start_at = None

    def bootstrap_succeeded(self, now: float, expires_at: float) -> float:
        """Record a new session; returns when it should be refreshed.

        Never sooner than ``min_bootstrap_interval`` after this bootstrap began: a lifetime shorter
        than that ends before its refresh, and the next bootstrap is a caller's (:meth:`unforced_wait`).
        """
        self.failures = 0
        self._retry = False
        self.ended_by_expiry = False
        self.blocked_until = None
        self.asked_until = None
        self.expires_at = expires_at
        self.lifetime = max(0.0, expires_at - now)
        started = now if self.last_start is None else self.last_start
        self.refresh_at = max(
            self._refresh_time(expires_at, self.lifetime), started + self.policy.min_bootstrap_interval
        )
        return self.refresh_at

    def bootstrap_failed(self, now: float, *, retry: bool = True, retry_after: float | None = None) -> float:
        """Record a failure; returns when the next bootstrap may start.

        With ``retry`` (a failure that may go away by itself: the BSF, the network) the planner
        asks for that bootstrap on its own (:meth:`due` answers ``RETRY``, or ``REFRESH`` while Ks
        is still valid); without it (the card is gone, the policy cannot be met) it waits for a
        caller, who is still held back until the same time.

        ``retry_after``: the seconds the BSF's answer asked us to wait (its ``Retry-After``). The next
        bootstrap comes no sooner than that, capped at :meth:`retry_after_cap`, and no sooner than
        the planner's own back-off either; while that wait lasts, :meth:`bsf_asked_until` says so.
        """
        self.failures += 1
        self._retry = retry
        p = self.policy
        lifetime = self.lifetime
        if lifetime is not None:
            interval = p.retry_interval.of(lifetime)
            keyless_interval = min(interval, p.max_retry_interval)
            expires_at = self.expires_at
            if expires_at is not None and now < expires_at:
                # Ks is still valid: no hurry, so spread the retries over the whole interval.
                delay = self._rng.uniform(0.5, 1.0) * interval
                if now + delay > expires_at:
                    if self.failures == 1:  # one more try while the key is valid
                        delay = self._rng.uniform(0.5, 1.0) * (expires_at - now)
                    else:  # then the first retry of a gateway without a key
                        delay = expires_at - now + self._rng.uniform(0.5, 1.0) * keyless_interval
            else:
                delay = self._rng.uniform(0.5, 1.0) * keyless_interval
            delay = max(delay, p.min_bootstrap_interval)  # a very short lifetime makes no retry loop
        else:
            delay = backoff_delay(self.failures - 1, p.failure_backoff, p.max_failure_backoff, self._rng)
        self.asked_until = None
        if retry_after is not None and retry_after >= 0:
            asked = min(retry_after, self.retry_after_cap())
            if asked >= delay:
                delay = asked
                self.asked_until = now + delay
        self.blocked_until = now + delay
        return self.blocked_until

    def session_dropped(self, *, expired: bool = False) -> None:
        """Ks is gone (``expired``, or wiped): no refresh is pending any more."""
        self.expires_at = None
        self.refresh_at = None
        self.ended_by_expiry = expired

    def card_changed(self) -> None:
        """A new or re-inserted card deserves a bootstrap now: forget failures and the forced interval."""
        self.session_dropped()
        self.lifetime = None
        self.failures = 0
        self._retry = False
        self.blocked_until = None
        self.asked_until = None
        self.last_start = None
        self.start_at = None

    # -- queries --

    def due(self, now: float) -> Due | None:
        """What is due at ``now``: the keystore acts on it, then asks again."""
        expires_at = self.expires_at
        if expires_at is not None and now >= expires_at:
            return Due.EXPIRE
        blocked = self.blocked_until
        if blocked is not None and now < blocked:
            return None
        refresh_at = self.refresh_at
        if refresh_at is not None:
            return Due.REFRESH if now >= refresh_at else None
        if self._retry and self.failures:
            return Due.RETRY
        start_at = self.start_at
        if start_at is not None and now >= start_at:
            return Due.START
        return None

    def next_deadline(self) -> float | None:
        """The next time :meth:`due` can change its answer (None: nothing scheduled)."""
        blocked = self.blocked_until
        if self.refresh_at is not None:
            wake: float | None = self.refresh_at
        elif self._retry and self.failures:
            wake = blocked
        else:
            wake = self.start_at
        if wake is not None and blocked is not None and blocked > wake:
            wake = blocked
        expires_at = self.expires_at
        if expires_at is not None and (wake is None or expires_at < wake):
            return expires_at
        return wake

    def unforced_wait(self, now: float) -> float | None:
        """Seconds until a bootstrap replacing a session whose lifetime ran out may start; None: now.

        That is the case a short key lifetime makes common (``min_bootstrap_interval``); after a
        wipe (the card gone or changed) a bootstrap answers at once, if only to say why it cannot.
        """
        if self.last_start is None or not self.ended_by_expiry:
            return None
        wait = self.last_start + self.policy.min_bootstrap_interval - now
        return wait if wait > 0 else None

    def retry_after_cap(self) -> float:
        """The longest a BSF's ``Retry-After`` can hold the next bootstrap back: the longest wait of
        the planner's own back-off (``max_failure_backoff`` before any key lifetime is known,
        ``max_retry_interval`` after), so a broken or hostile BSF cannot park a gateway for longer
        than a failing one would wait anyway."""
        p = self.policy
        return p.max_failure_backoff if self.lifetime is None else p.max_retry_interval

    def bsf_asked_until(self, now: float) -> float | None:
        """When the wait the BSF asked for (:meth:`bootstrap_failed`) ends; None when none is running."""
        until = self.asked_until
        return until if until is not None and now < until else None

    def backoff_remaining(self, now: float) -> float | None:
        """Seconds until a bootstrap may follow the last failure; None when it may start now."""
        blocked = self.blocked_until
        return blocked - now if blocked is not None and now < blocked else None

    def forced_retry_after(self, now: float) -> float | None:
        """Seconds until a forced re-bootstrap is allowed; None when it is allowed now."""
        waits = [w for w in (self.backoff_remaining(now), self._forced_wait(now)) if w is not None]
        return max(waits) if waits else None

    # -- internals --

    def _refresh_time(self, expires_at: float, lifetime: float) -> float:
        p = self.policy
        lead = p.refresh_margin.of(lifetime) + self._rng.uniform(0.0, p.refresh_jitter.of(lifetime))
        return expires_at - min(lead, lifetime / 2)

    def _resume_refused(self, now: float, iccid: str, stored: StoredSession | None) -> str | None:
        if stored is None:
            return "nothing stored"
        if stored.iccid != iccid:
            return "the stored session belongs to another card"
        if now < CLOCK_FLOOR:
            return "the clock is not set"
        remaining = stored.expires_at - now
        if remaining <= 0:
            return "the stored session has expired"
        if stored.lifetime is not None and remaining > stored.lifetime:
            return "the stored session ends later than its lifetime allows (the clock went back?)"
        return None

    def _forced_wait(self, now: float) -> float | None:
        if self.last_start is None:
            return None
        wait = self.last_start + self.policy.min_forced_interval - now
        return wait if wait > 0 else None

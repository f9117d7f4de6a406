"""When to bootstrap: the keystore's clock-free decisions (refresh, expiry, back-off, forced interval).

As in aioquic, the decisions live in a core with no I/O and no clock of its own (time is passed in),
which tests drive with a fake clock; :class:`~mn_secd.gba.keystore.KeyStore` is the asyncio adapter
that sleeps until the planner's next deadline.
"""

from __future__ import annotations

import enum
import math
import random

from mn_secd.gba.ub import backoff_delay


class Due(enum.Enum):
    REFRESH = "refresh"  # time to bootstrap again while the current Ks is still valid
    EXPIRE = "expire"  # Ks has expired: drop it


class BootstrapPlanner:
    """When to refresh, when Ks expires, and whether a bootstrap may start now. No I/O, no clock.

    Times are seconds on the caller's clock (the keystore uses POSIX time, because the BSF states
    the key lifetime as an absolute UTC time).
    """

    def __init__(
        self,
        *,
        refresh_margin: float,
        refresh_jitter: float,
        min_forced_interval: float,
        failure_backoff: float,
        max_failure_backoff: float,
        rng: random.Random,
    ) -> None:
        values = (refresh_margin, refresh_jitter, min_forced_interval, failure_backoff, max_failure_backoff)
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError("keystore timing parameters must be finite and not negative")
        self.refresh_margin = refresh_margin
        self.refresh_jitter = refresh_jitter
        self.min_forced_interval = min_forced_interval
        self.failure_backoff = failure_backoff
        self.max_failure_backoff = max_failure_backoff
        self._rng = rng
        self.expires_at: float | None = None
        self.refresh_at: float | None = None
        self.blocked_until: float | None = None
        self.failures = 0
        self.last_start: float | None = None

    # -- inputs --

    def bootstrap_started(self, now: float) -> None:
        self.last_start = now

    def bootstrap_succeeded(self, now: float, expires_at: float) -> float:
        """Record a new session; returns when it should be refreshed.

        The refresh comes ``margin + U(0, jitter)`` before expiry, but never earlier than half-way
        through the lifetime, so a BSF that hands out short lifetimes does not cause a bootstrap loop.
        """
        self.failures = 0
        self.blocked_until = None
        self.expires_at = expires_at
        lead = self.refresh_margin + self._rng.uniform(0.0, self.refresh_jitter)
        lead = min(lead, max(0.0, expires_at - now) / 2)
        self.refresh_at = expires_at - lead
        return self.refresh_at

    def bootstrap_failed(self, now: float) -> float:
        """Record a failure; returns when the next bootstrap may start (exponential back-off, jittered)."""
        self.failures += 1
        delay = backoff_delay(self.failures - 1, self.failure_backoff, self.max_failure_backoff, self._rng)
        self.blocked_until = now + delay
        return self.blocked_until

    def session_dropped(self) -> None:
        """Ks is gone (expired or wiped): no refresh is pending any more."""
        self.expires_at = None
        self.refresh_at = None

    def card_changed(self) -> None:
        """A new or re-inserted card deserves a bootstrap now: forget failures and the forced interval."""
        self.session_dropped()
        self.failures = 0
        self.blocked_until = None
        self.last_start = None

    # -- queries --

    def due(self, now: float) -> Due | None:
        if self.expires_at is not None and now >= self.expires_at:
            return Due.EXPIRE
        if self.refresh_at is not None and now >= self.refresh_at and not self._blocked(now):
            return Due.REFRESH
        return None

    def next_deadline(self) -> float | None:
        """The next time :meth:`due` can change its answer (None: nothing scheduled)."""
        deadlines: list[float] = []
        if self.expires_at is not None:
            deadlines.append(self.expires_at)
        if self.refresh_at is not None:
            deadlines.append(max(self.refresh_at, self.blocked_until or self.refresh_at))
        return min(deadlines) if deadlines else None

    def backoff_remaining(self, now: float) -> float | None:
        """Seconds until a bootstrap may follow the last failure; None when it may start now."""
        return self.blocked_until - now if self._blocked(now) and self.blocked_until is not None else None

    def forced_retry_after(self, now: float) -> float | None:
        """Seconds until a forced re-bootstrap is allowed; None when it is allowed now."""
        waits = [w for w in (self.backoff_remaining(now), self._forced_wait(now)) if w is not None]
        return max(waits) if waits else None

    def _forced_wait(self, now: float) -> float | None:
        if self.last_start is None:
            return None
        wait = self.last_start + self.min_forced_interval - now
        return wait if wait > 0 else None

    def _blocked(self, now: float) -> bool:
        return self.blocked_until is not None and now < self.blocked_until

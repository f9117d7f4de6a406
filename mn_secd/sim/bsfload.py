"""A BSF under load, for the fleet simulation: capacity, a bounded queue, latency and refusals.

The reference BSF (:mod:`mn_secd.sim.bsf`) answers one gateway over real HTTP; this model answers
"what happens to request number 40,000 this minute" for a fleet on a virtual clock, without I/O.
It is a single FIFO server draining ``capacity`` requests per second:

* a request that arrives finds ``backlog`` requests before it and is answered after
  ``latency + backlog / capacity`` seconds (``latency``: the answer time of an idle BSF, network
  included), so latency grows with the queue;
* the first request of a bootstrap (no nonce yet) is refused with 503 when the backlog has reached
  ``queue_limit``: that is where a BSF sheds load cheaply, before it has fetched an authentication
  vector. Follow-up requests (the answer to a challenge) are always queued, because refusing them
  would waste the AKA run the gateway's card has already made;
* while the BSF is down every request fails after ``latency`` (connection refused).

Times are seconds on the caller's virtual clock; requests should arrive in time order (a request
that arrives slightly out of order is served as if it came at the newest time seen).
"""

from __future__ import annotations

import enum
import math


class Answer(enum.IntEnum):
    OK = 0  # the BSF answered (401 challenge, or 200 with the bootstrapping info)
    BUSY = 1  # 503: the queue is full (counted as refused)
    DOWN = 2  # no answer: the BSF is unreachable


_OK, _BUSY, _DOWN = Answer.OK, Answer.BUSY, Answer.DOWN


class BsfLoad:
    """One BSF: ``capacity`` requests/s, at most ``queue_limit`` new bootstraps waiting."""

    __slots__ = ("_backlog", "_last", "capacity", "latency", "queue_limit", "up")

    def __init__(self, *, capacity: float, queue_limit: float, latency: float) -> None:
        if not (math.isfinite(capacity) and capacity > 0):
            raise ValueError("BSF capacity must be a positive number of requests per second")
        if not (math.isfinite(queue_limit) and queue_limit >= 1):
            raise ValueError("the BSF queue must hold at least one request")
        if not (math.isfinite(latency) and latency >= 0):
            raise ValueError("BSF latency must be finite and not negative")
        self.capacity = capacity
        self.queue_limit = queue_limit
        self.latency = latency
        self.up = True
        self._backlog = 0.0
        self._last = -math.inf

    def backlog(self, now: float) -> float:
        """Requests waiting at ``now``."""
        self._drain(now)
        return self._backlog

    def arrive(self, now: float, *, first: bool) -> tuple[Answer, float]:
        """A request arrives at ``now``: the answer and how long after ``now`` the gateway gets it."""
        if not self.up:
            return _DOWN, self.latency
        backlog = self._backlog
        if now > self._last:
            if backlog > 0.0:
                backlog -= (now - self._last) * self.capacity
                if backlog < 0.0:
                    backlog = 0.0
            self._last = now
        if first and backlog >= self.queue_limit:
            self._backlog = backlog
            return _BUSY, self.latency
        self._backlog = backlog + 1.0
        return _OK, self.latency + backlog / self.capacity

    def set_capacity(self, now: float, capacity: float) -> None:
        """Change the capacity from ``now`` on (the queue drained so far at the old rate)."""
        if not (math.isfinite(capacity) and capacity > 0):
            raise ValueError("BSF capacity must be a positive number of requests per second")
        self._drain(now)
        self.capacity = capacity

    def _drain(self, now: float) -> None:
        if now > self._last:
            if self._backlog > 0.0:
                self._backlog = max(0.0, self._backlog - (now - self._last) * self.capacity)
            self._last = now

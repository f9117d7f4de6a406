"""Which DTLS peers a server keeps: separate budgets for handshakes and for established sessions.

A sans-IO core with the clock passed in; :class:`mn_secd.dtls.server.PeerTable` applies its
decisions to tinydtls and aiocoap.

A peer costs the server state only once it returned a valid cookie (tinydtls answers a ClientHello
without one statelessly, RFC 6347 4.2.1), so everything here is at least address-verified. Still, a
local attacker owns real sockets and can answer cookies by the thousand; what protects the AEs is
that the two kinds of peer never compete:

* **handshakes** (cookie verified, not yet authenticated) have their own budget and only ever
  displace each other, the oldest first: a legitimate handshake completes in one round trip, so the
  oldest ones are the stalled ones (a wrong PSK, a vanished client). A handshake older than
  ``handshake_timeout`` is dropped in any case;
* **sessions** (a completed handshake: the peer proved its PSK) are ended only when idle for
  ``idle_timeout`` (not while a resource holds state for them, such as an observation), or when
  another *authenticated* session needs room: then the least recently active one goes, preferring
  one that holds nothing. An unauthenticated peer never costs a session its place.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class _SessionState:
    last_seen: float
    holds: int = 0


@dataclass(frozen=True)
class HandshakeAdmission(Generic[K]):
    """What starting a handshake at a key costs: the handshakes displaced, and whether a session ended."""

    displaced: list[K]
    replaced_session: bool


class PeerBudget(Generic[K]):
    def __init__(
        self, *, max_sessions: int, max_handshakes: int, idle_timeout: float, handshake_timeout: float
    ) -> None:
        if max_sessions < 1 or max_handshakes < 1:
            raise ValueError("each budget must hold at least one peer")
        if idle_timeout <= 0 or handshake_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.max_sessions = max_sessions
        self.max_handshakes = max_handshakes
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self._handshakes: OrderedDict[K, float] = OrderedDict()  # key -> started, oldest first
        self._sessions: OrderedDict[K, _SessionState] = OrderedDict()  # least recently active first

    @property
    def handshakes(self) -> int:
        return len(self._handshakes)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def __len__(self) -> int:
        return len(self._handshakes) + len(self._sessions)

    def __contains__(self, key: object) -> bool:
        return key in self._handshakes or key in self._sessions

    def is_session(self, key: K) -> bool:
        return key in self._sessions

    def is_handshake(self, key: K) -> bool:
        return key in self._handshakes

    def start_handshake(self, key: K, now: float) -> HandshakeAdmission[K]:
        """A cookie-verified ClientHello at ``key``: admit it, displacing the oldest handshakes if full.

        A session at the same key has already been replaced by tinydtls (only whoever holds that
        address and port can do so, as the cookie proves); it is reported, not counted as displaced.
        """
        replaced = self._sessions.pop(key, None) is not None
        self._handshakes.pop(key, None)
        displaced: list[K] = []
        while len(self._handshakes) >= self.max_handshakes:
            oldest, _ = self._handshakes.popitem(last=False)
            displaced.append(oldest)
        self._handshakes[key] = now
        return HandshakeAdmission(displaced, replaced)

    def complete_handshake(self, key: K, now: float) -> list[K]:
        """The handshake at ``key`` authenticated its peer: make it a session; returns sessions evicted for room."""
        self._handshakes.pop(key, None)
        self._sessions.pop(key, None)
        evicted: list[K] = []
        while len(self._sessions) >= self.max_sessions:
            victim = next((k for k, s in self._sessions.items() if s.holds == 0), None)
            if victim is None:
                victim = next(iter(self._sessions))
            del self._sessions[victim]
            evicted.append(victim)
        self._sessions[key] = _SessionState(now)
        return evicted

    def activity(self, key: K, now: float) -> None:
        """A datagram from ``key``: a session counts as recently active."""
        state = self._sessions.get(key)
        if state is not None:
            state.last_seen = now
            self._sessions.move_to_end(key)

    def hold(self, key: K) -> None:
        """Something (an observation) keeps state for this session: idleness does not end it."""
        state = self._sessions.get(key)
        if state is not None:
            state.holds += 1

    def release(self, key: K) -> None:
        state = self._sessions.get(key)
        if state is not None and state.holds > 0:
            state.holds -= 1

    def remove(self, key: K) -> None:
        self._handshakes.pop(key, None)
        self._sessions.pop(key, None)

    def expired(self, now: float) -> list[K]:
        """Remove and return the handshakes past ``handshake_timeout`` and the sessions idle past ``idle_timeout``."""
        stale = [k for k, started in self._handshakes.items() if now - started >= self.handshake_timeout]
        stale += [k for k, s in self._sessions.items() if s.holds == 0 and now - s.last_seen >= self.idle_timeout]
        for key in stale:
            self.remove(key)
        return stale

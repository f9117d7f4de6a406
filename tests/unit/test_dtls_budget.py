"""mn_secd.dtls.budget: handshakes and sessions have separate budgets, and only sessions displace sessions."""

from __future__ import annotations

import pytest

from mn_secd.dtls.budget import PeerBudget


def budget(sessions: int = 2, handshakes: int = 2, idle: float = 100.0, handshake: float = 10.0) -> PeerBudget[str]:
    return PeerBudget(max_sessions=sessions, max_handshakes=handshakes, idle_timeout=idle, handshake_timeout=handshake)


def test_handshakes_displace_the_oldest_handshake_and_never_a_session() -> None:
    b = budget()
    for key in ("s1", "s2"):
        b.start_handshake(key, 0.0)
        assert b.complete_handshake(key, 0.0) == []
    assert b.start_handshake("h1", 1.0).displaced == []
    assert b.start_handshake("h2", 2.0).displaced == []
    for n in range(3, 100):  # a flood of cookie-answering handshakes
        assert b.start_handshake(f"h{n}", float(n)).displaced == [f"h{n - 2}"]
    assert (b.sessions, b.handshakes) == (2, 2)
    assert b.is_session("s1") and b.is_session("s2")


def test_a_completed_handshake_displaces_the_least_recently_active_session() -> None:
    b = budget()
    for n, key in enumerate(("s1", "s2")):
        b.start_handshake(key, float(n))
        b.complete_handshake(key, float(n))
    b.activity("s1", 5.0)  # s1 is now the more recent
    b.start_handshake("s3", 6.0)
    assert b.complete_handshake("s3", 6.0) == ["s2"]
    assert b.is_session("s1") and b.is_session("s3") and "s2" not in b


def test_sessions_holding_state_are_displaced_last_and_never_idle() -> None:
    b = budget(idle=10.0)
    for key in ("s1", "s2"):
        b.start_handshake(key, 0.0)
        b.complete_handshake(key, 0.0)
    b.hold("s1")
    b.start_handshake("s3", 1.0)
    assert b.complete_handshake("s3", 1.0) == ["s2"]  # s1 was older but holds an observation
    b.hold("s3")
    b.start_handshake("s4", 2.0)
    assert b.complete_handshake("s4", 2.0) == ["s1"]  # everyone holds something: plain LRU
    assert b.expired(50.0) == ["s4"]  # s3 holds: not idle
    b.release("s3")
    b.release("s3")  # more releases than holds do not go negative
    assert b.expired(50.0) == ["s3"]


def test_stale_handshakes_and_idle_sessions_expire() -> None:
    b = budget(idle=100.0, handshake=10.0)
    b.start_handshake("h", 0.0)
    b.start_handshake("s", 0.0)
    b.complete_handshake("s", 0.0)
    assert b.expired(9.9) == []
    assert b.expired(10.0) == ["h"]
    b.activity("s", 50.0)
    assert b.expired(149.0) == []
    assert b.expired(150.0) == ["s"]
    assert len(b) == 0


def test_a_new_handshake_at_a_session_replaces_it() -> None:
    b = budget()
    b.start_handshake("k", 0.0)
    b.complete_handshake("k", 0.0)
    admission = b.start_handshake("k", 1.0)
    assert admission.replaced_session and admission.displaced == []
    assert b.is_handshake("k") and not b.is_session("k")


def test_budgets_must_hold_something() -> None:
    with pytest.raises(ValueError):
        budget(sessions=0)
    with pytest.raises(ValueError):
        budget(idle=0.0)

"""The bootstrap planner, driven by a fake clock: no event loop, no I/O, every decision checked."""

from __future__ import annotations

import random

import pytest

from mn_secd.gba.planner import (
    CLOCK_FLOOR,
    BootstrapPlanner,
    BootstrapTiming,
    Due,
    Span,
    StartAction,
    StoredSession,
)

T0 = 1_900_000_000.0  # a plausible POSIX time (2030)
HOUR = 3600.0


def planner(seed: int = 3, **timing: object) -> BootstrapPlanner:
    return BootstrapPlanner(BootstrapTiming(**timing), random.Random(seed))  # type: ignore[arg-type]


# --- refresh ------------------------------------------------------------------------------------------


def test_refresh_comes_between_half_and_two_thirds_of_the_lifetime_and_spreads() -> None:
    p = planner()
    times = [p.bootstrap_succeeded(T0, T0 + HOUR) - T0 for _ in range(2000)]
    assert all(0.5 * HOUR <= t <= 0.67 * HOUR for t in times)
    assert min(times) < 0.52 * HOUR and max(times) > 0.65 * HOUR  # the whole window is used
    day = [p.bootstrap_succeeded(T0, T0 + 24 * HOUR) - T0 for _ in range(200)]
    assert all(12 * HOUR <= t <= 16.08 * HOUR for t in day)  # shares scale with the lifetime


def test_absolute_margins_still_work_and_never_refresh_before_half_way() -> None:
    p = planner(refresh_margin=Span(seconds=300.0), refresh_jitter=Span(seconds=60.0))
    times = [p.bootstrap_succeeded(1000.0, 1000.0 + 3600.0) for _ in range(500)]
    assert all(4600.0 - 360.0 <= t <= 4600.0 - 300.0 for t in times)
    assert p.bootstrap_succeeded(1000.0, 1100.0) == 1050.0  # a 100 s lifetime: half-way, not before


def test_a_lifetime_shorter_than_the_minimum_interval_is_not_refreshed_in_a_loop() -> None:
    """Half-way through a 4 s lifetime would be every 2 s: never sooner than min_bootstrap_interval."""
    p = planner(min_bootstrap_interval=10.0)
    p.bootstrap_started(1000.0)
    assert p.bootstrap_succeeded(1000.5, 1004.5) == 1010.0  # after the expiry: the session just ends
    assert p.due(1004.5) is Due.EXPIRE
    p.session_dropped(expired=True)
    assert p.unforced_wait(1004.5) == 5.5 and p.unforced_wait(1010.0) is None
    assert p.due(1020.0) is None  # no failure, no session: the next bootstrap is a caller's
    p.session_dropped()  # wiped (the card went): whatever comes next answers at once
    assert p.unforced_wait(1004.5) is None
    p.bootstrap_failed(1005.0)  # nor do retries come sooner, whatever share of 4 s they are
    assert p.blocked_until is not None and p.blocked_until >= 1015.0


def test_due_and_deadlines_follow_the_clock() -> None:
    p = planner(refresh_jitter=Span())
    refresh = p.bootstrap_succeeded(T0, T0 + HOUR)
    assert refresh == pytest.approx(T0 + 0.67 * HOUR)
    assert p.next_deadline() == refresh
    assert p.due(refresh - 0.1) is None
    assert p.due(refresh) is Due.REFRESH
    assert p.due(T0 + HOUR) is Due.EXPIRE
    p.session_dropped()
    assert p.next_deadline() is None and p.due(T0 + 2 * HOUR) is None


# --- failures and retries ------------------------------------------------------------------------


def test_before_any_lifetime_the_back_off_is_exponential_to_a_cap() -> None:
    p = planner(failure_backoff=5.0, max_failure_backoff=40.0)
    delays = [p.bootstrap_failed(0.0) for _ in range(6)]
    for n, delay in enumerate(delays):
        step = min(40.0, 5.0 * 2**n)
        assert step / 2 <= delay <= step
    assert p.backoff_remaining(0.0) == delays[-1]
    assert p.backoff_remaining(delays[-1]) is None
    p.bootstrap_succeeded(100.0, 4000.0)
    assert p.failures == 0 and p.backoff_remaining(100.0) is None


def test_a_failure_without_a_key_is_retried_by_the_planner_itself() -> None:
    p = planner()
    retry_at = p.bootstrap_failed(T0)  # e.g. the first bootstrap after start, BSF down
    assert T0 + 2.5 <= retry_at <= T0 + 5.0
    assert p.next_deadline() == retry_at
    assert p.due(retry_at - 0.01) is None
    assert p.due(retry_at) is Due.RETRY
    p.bootstrap_started(retry_at)
    p.bootstrap_succeeded(retry_at + 1, retry_at + 1 + HOUR)
    assert p.due(retry_at + 2) is None  # a success ends the retries


def test_a_failure_that_time_does_not_mend_waits_for_a_caller() -> None:
    p = planner()
    retry_at = p.bootstrap_failed(T0, retry=False)  # the card is gone
    assert p.due(retry_at + 1000) is None and p.next_deadline() is None
    assert p.backoff_remaining(T0) is not None  # but callers are still held back until then


def test_a_failed_refresh_is_retried_widely_while_the_key_is_valid() -> None:
    """24 h lifetime, refresh failing 8 h before expiry: the retry comes hours later, before expiry."""
    retries = []
    for seed in range(300):
        p = planner(seed, refresh_margin=Span(share=1 / 3), refresh_jitter=Span())
        refresh = p.bootstrap_succeeded(T0, T0 + 24 * HOUR)
        retry_at = p.bootstrap_failed(refresh)
        assert p.due(retry_at) is Due.REFRESH
        retries.append(retry_at - refresh)
    assert all(4 * HOUR <= r <= 8 * HOUR for r in retries)  # half to all of what is left, never after expiry
    assert max(retries) - min(retries) > 3 * HOUR  # spread: a fleet does not come back in step


def test_one_more_try_before_expiry_then_the_keyless_interval() -> None:
    p = planner(refresh_jitter=Span())  # 1 h lifetime, refresh 20 min before expiry
    expires = T0 + HOUR
    first = p.bootstrap_failed(p.bootstrap_succeeded(T0, expires))
    assert first < expires  # the first retry always lands while the key is still valid
    second = p.bootstrap_failed(first)
    if second > expires:  # the flat interval would pass the expiry: it counts from there
        assert expires + 0.25 * HOUR <= second <= expires + 0.5 * HOUR
    assert p.due(expires) is Due.EXPIRE
    p.session_dropped()
    assert p.due(second) is Due.RETRY
    third = p.bootstrap_failed(second)
    assert 0.25 * HOUR <= third - second <= 0.5 * HOUR  # keyless: 50-100 % of retry_interval


def test_the_keyless_retry_interval_has_a_ceiling() -> None:
    p = planner(max_retry_interval=1800.0)
    p.bootstrap_succeeded(T0, T0 + 24 * HOUR)
    p.session_dropped()  # the key expired (or was wiped) and the BSF keeps failing
    delays = [p.bootstrap_failed(T0 + 30 * HOUR) - (T0 + 30 * HOUR) for _ in range(200)]
    assert all(900.0 <= d <= 1800.0 for d in delays)


def test_retry_rate_of_a_failing_gateway_stays_near_twice_its_refresh_rate() -> None:
    """The property the fleet simulation relies on: whatever the outage, a gateway that keeps
    failing sends about as many bootstraps per hour as 1.5 refresh periods allow, not more."""
    p = planner(seed=11)
    refresh_times = []
    for _ in range(2000):
        p.bootstrap_succeeded(T0, T0 + HOUR)
        refresh_times.append(p.refresh_at - T0)  # type: ignore[operator]
    mean_refresh_period = sum(refresh_times) / len(refresh_times)
    p.session_dropped()
    now, attempts = T0, 0
    while now < T0 + 100 * HOUR:
        now = p.bootstrap_failed(now)
        attempts += 1
    assert attempts / 100 <= 2.0 * HOUR / mean_refresh_period


# --- forced bootstraps and card changes -----------------------------------------------------------


def test_forced_interval() -> None:
    p = planner(min_forced_interval=30.0)
    assert p.forced_retry_after(0.0) is None
    p.bootstrap_started(100.0)
    assert p.forced_retry_after(110.0) == pytest.approx(20.0)
    assert p.forced_retry_after(130.0) is None
    p.bootstrap_failed(130.0)  # a failure's back-off applies to forced bootstraps too
    remaining = p.forced_retry_after(130.0)
    assert remaining is not None and remaining >= 2.5
    p.card_changed()
    assert p.forced_retry_after(130.0) is None


def test_a_new_card_forgets_the_old_cards_lifetime_and_failures() -> None:
    p = planner()
    p.bootstrap_succeeded(T0, T0 + HOUR)
    p.bootstrap_failed(T0 + 10)
    p.card_changed()
    assert p.lifetime is None and p.failures == 0 and p.due(T0 + 11) is None
    assert p.bootstrap_failed(T0 + 20) <= T0 + 25.0  # back to the short exponential start


# --- start-up: resume or bootstrap ---------------------------------------------------------------


def stored(expires_in: float, *, iccid: str = "8988211000000000001", lifetime: float | None = HOUR) -> StoredSession:
    return StoredSession("btid@bsf", T0 + expires_in, iccid, lifetime)


def test_a_stored_session_with_more_than_the_margin_left_is_resumed() -> None:
    p = planner()
    decision = p.start(T0, iccid="8988211000000000001", stored=stored(0.8 * HOUR), ae_waiting=False)
    assert decision.action is StartAction.RESUME
    assert p.expires_at == T0 + 0.8 * HOUR and p.lifetime == HOUR
    assert T0 <= decision.at <= T0 + 0.8 * HOUR - 0.33 * HOUR  # refreshed before its margin
    assert p.due(T0) is None and p.next_deadline() == decision.at
    assert p.due(decision.at) is Due.REFRESH


def test_a_resumed_session_past_its_refresh_time_is_refreshed_soon_and_spread() -> None:
    ats = []
    for seed in range(200):
        p = planner(seed)
        decision = p.start(T0, iccid="8988211000000000001", stored=stored(0.4 * HOUR), ae_waiting=False)
        assert decision.action is StartAction.RESUME
        ats.append(decision.at - T0)
    assert all(0 <= at <= 0.07 * HOUR for at in ats) and max(ats) - min(ats) > 0.05 * HOUR


@pytest.mark.parametrize(
    ("session", "now", "why"),
    [
        (None, T0, "nothing stored"),
        (stored(0.8 * HOUR, iccid="8988211000000000002"), T0, "another card"),
        (stored(0.8 * HOUR), CLOCK_FLOOR - 1.0, "clock is not set"),
        (stored(-10.0), T0, "expired"),
        (stored(2 * HOUR), T0, "clock went back"),
    ],
)
def test_what_is_not_resumed_is_bootstrapped_after_the_start_jitter(
    session: StoredSession | None, now: float, why: str
) -> None:
    p = planner(start_jitter=600.0)
    decision = p.start(now, iccid="8988211000000000001", stored=session, ae_waiting=False)
    assert decision.action is StartAction.BOOTSTRAP and why in decision.reason
    assert now <= decision.at <= now + 600.0
    assert p.expires_at is None
    assert p.next_deadline() == decision.at
    assert p.due(decision.at) is Due.START
    p.bootstrap_started(decision.at)  # an AE's request may start it earlier: the jitter is then void
    assert p.start_at is None and p.due(decision.at + 1) is None


def test_start_jitter_spreads_a_region_and_an_ae_waiting_skips_it() -> None:
    ats = [
        planner(seed, start_jitter=600.0).start(T0, iccid="x", stored=None, ae_waiting=False).at for seed in range(200)
    ]
    assert min(ats) - T0 < 60.0 and max(ats) - T0 > 540.0
    p = planner(start_jitter=600.0)
    decision = p.start(T0, iccid="x", stored=None, ae_waiting=True)
    assert decision.action is StartAction.BOOTSTRAP and decision.at == T0 and "AE" in decision.reason
    assert p.due(T0) is Due.START


def test_a_session_inside_its_margin_serves_until_a_start_up_refresh() -> None:
    """Restarting near its refresh time, a gateway keeps its key and refreshes within the start
    jitter (or half the time left, if sooner): no time without a key, the same cost to the BSF."""
    ats = []
    for seed in range(200):
        p = planner(seed, start_jitter=600.0)
        decision = p.start(T0, iccid="8988211000000000001", stored=stored(0.3 * HOUR), ae_waiting=False)
        assert decision.action is StartAction.RESUME and "inside its refresh margin" in decision.reason
        assert p.expires_at == T0 + 0.3 * HOUR and p.due(decision.at) is Due.REFRESH
        ats.append(decision.at - T0)
    assert all(0 <= at <= 600.0 for at in ats) and max(ats) > 500.0
    p = planner(start_jitter=600.0)
    assert p.start(T0, iccid="8988211000000000001", stored=stored(100.0), ae_waiting=False).at <= T0 + 50.0


def test_without_a_recorded_lifetime_the_time_left_stands_in() -> None:
    p = planner()
    decision = p.start(T0, iccid="8988211000000000001", stored=stored(0.9 * HOUR, lifetime=None), ae_waiting=False)
    assert decision.action is StartAction.RESUME and p.lifetime == pytest.approx(0.9 * HOUR)
    assert T0 + 0.45 * HOUR <= decision.at <= T0 + 0.9 * HOUR * 0.67


def test_timing_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BootstrapTiming(start_jitter=-1.0)
    with pytest.raises(ValueError):
        BootstrapTiming(max_retry_interval=float("nan"))
    with pytest.raises(ValueError):
        Span(share=-0.1)
    assert str(Span(share=0.33)) == "33%" and str(Span(seconds=90)) == "90 s" and str(Span()) == "0 s"

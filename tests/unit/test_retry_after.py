"""The BSF's Retry-After: read in the Ub layer (pure, clock passed in), decided by the planner (fake
clock), answered to AEs by the key service's error mapping."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from mn_secd.control.payloads import error_answer
from mn_secd.errors import BsfAskedToWait, BsfServerError, RetryAfterInvalid
from mn_secd.gba.planner import BootstrapPlanner, BootstrapTiming, Due
from mn_secd.gba.ub import RETRYABLE_STATUS, UbExchange, parse_http_date, parse_retry_after, retry_after
from mn_secd.naf_keys import GbaMode

NOW = datetime(2030, 3, 14, 12, 0, 0, tzinfo=UTC)
T0 = NOW.timestamp()
HOUR = 3600.0


# --- the header ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("1", 1.0), ("120", 120.0), (" 30 ", 30.0)])
def test_delay_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "Thu, 14 Mar 2030 12:02:00 GMT",  # IMF-fixdate
        "Thursday, 14-Mar-30 12:02:00 GMT",  # rfc850-date (obsolete, still to be read)
        "Thu Mar 14 12:02:00 2030",  # asctime-date
    ],
)
def test_an_http_date_in_each_form_counts_from_the_injected_clock(value: str) -> None:
    assert parse_retry_after(value, NOW) == 120.0
    assert parse_retry_after(value, NOW + timedelta(seconds=100)) == 20.0
    assert parse_retry_after(value, NOW + timedelta(hours=1)) == 0.0  # in the past: no wait asked


def test_asctime_pads_a_one_digit_day_with_a_space() -> None:
    assert parse_http_date("Sat Mar  2 08:49:37 2030", NOW) == datetime(2030, 3, 2, 8, 49, 37, tzinfo=UTC)


def test_a_two_digit_year_more_than_50_years_ahead_is_in_the_past() -> None:
    """RFC 9110 5.6.7, for rfc850-date."""
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", NOW).year == 1994
    assert parse_http_date("Monday, 06-Nov-79 08:49:37 GMT", NOW).year == 2079
    assert parse_http_date("Monday, 06-Nov-81 08:49:37 GMT", NOW).year == 1981


def test_a_huge_delay_is_infinite_for_the_caller_to_cap() -> None:
    assert parse_retry_after("9" * 400, NOW) == math.inf
    assert parse_retry_after("31536000", NOW) == 31536000.0  # a year: read as it is, capped later


@pytest.mark.parametrize(
    "value",
    [
        "",
        "-5",  # negative
        "1.5",  # delay-seconds is 1*DIGIT
        "soon",
        "120 s",
        "Thu, 14 Mar 2030 12:02:00 CET",  # HTTP-date is GMT only
        "Thu, 31 Feb 2030 12:02:00 GMT",  # no such day
        "Thu, 14 Mar 2030 25:02:00 GMT",
        "thu, 14 mar 2030 12:02:00 gmt",  # HTTP-date is case-sensitive
        "٣٠",  # Arabic-Indic digits: str.isdigit() would say yes
        "1" * 40 + " " + "2" * 40,  # too long to be either
    ],
)
def test_garbage_is_refused_typed(value: str) -> None:
    with pytest.raises(RetryAfterInvalid) as info:
        parse_retry_after(value, NOW)
    assert info.value.kind == "bsf-retry-after-invalid" and info.value.culprit == "bsf"


def test_the_header_among_the_answers_headers() -> None:
    assert retry_after([("Server", "x")], NOW) is None
    assert retry_after([("retry-after", "7")], NOW) == 7.0
    assert retry_after([("Retry-After", "7"), ("Retry-After", "7")], NOW) == 7.0  # repeated, same value
    with pytest.raises(RetryAfterInvalid):
        retry_after([("Retry-After", "7"), ("Retry-After", "700")], NOW)


def test_429_and_5xx_are_refusals_for_now_carrying_the_ask() -> None:
    assert 429 in RETRYABLE_STATUS and 503 in RETRYABLE_STATUS
    for status in (429, 503, 500):
        exchange = UbExchange(impi="i@r", realm="r", uri="/", mode=GbaMode.GBA_ME)
        exchange.start()
        with pytest.raises(BsfServerError) as info:
            exchange.receive(status, "busy", [("Retry-After", "9")], b"", NOW, retry_after=9.0)
        assert (info.value.status, info.value.retry_after) == (status, 9.0)


# --- the planner -----------------------------------------------------------------------------------


def planner(**timing: float) -> BootstrapPlanner:
    return BootstrapPlanner(BootstrapTiming(**timing), random.Random(5))  # type: ignore[arg-type]


def test_the_next_bootstrap_waits_at_least_what_the_bsf_asked() -> None:
    p = planner(failure_backoff=5.0)
    assert p.bootstrap_failed(T0, retry_after=120.0) == T0 + 120.0
    assert p.due(T0 + 119.0) is None and p.due(T0 + 120.0) is Due.RETRY
    assert p.bsf_asked_until(T0 + 60.0) == T0 + 120.0 and p.bsf_asked_until(T0 + 120.0) is None
    assert p.forced_retry_after(T0 + 60.0) == 60.0


def test_never_less_than_our_own_back_off() -> None:
    p = planner(failure_backoff=5.0)
    for _ in range(4):
        p.bootstrap_failed(T0)  # our back-off has grown to 20-40 s
    until = p.bootstrap_failed(T0, retry_after=1.0)
    assert until >= T0 + 40.0
    assert p.bsf_asked_until(T0) is None  # our own wait, not the BSF's: AEs hear the failure as before


def test_the_ask_is_capped_at_our_own_longest_wait() -> None:
    p = planner(max_failure_backoff=600.0, max_retry_interval=7200.0)
    assert p.retry_after_cap() == 600.0  # no key lifetime known yet
    assert p.bootstrap_failed(T0, retry_after=math.inf) == T0 + 600.0
    assert p.bootstrap_failed(T0, retry_after=86400.0 * 365) == T0 + 600.0
    p.bootstrap_succeeded(T0, T0 + 24 * HOUR)
    p.session_dropped()
    assert p.retry_after_cap() == 7200.0  # once one is: the keyless retry cap
    assert p.bootstrap_failed(T0, retry_after=1e9) == T0 + 7200.0


def test_no_ask_and_a_negative_one_change_nothing() -> None:
    plain, negative = planner(), planner()
    assert plain.bootstrap_failed(T0) == negative.bootstrap_failed(T0, retry_after=-5.0)
    assert negative.bsf_asked_until(T0) is None


def test_a_success_or_another_card_ends_the_wait() -> None:
    p = planner()
    p.bootstrap_failed(T0, retry_after=300.0)
    p.bootstrap_succeeded(T0 + 1, T0 + HOUR)
    assert p.bsf_asked_until(T0 + 2) is None
    p.bootstrap_failed(T0 + 3, retry_after=300.0)
    p.card_changed()
    assert p.bsf_asked_until(T0 + 4) is None and p.backoff_remaining(T0 + 4) is None


def test_with_ks_still_valid_the_ask_holds_the_refresh_retry_too() -> None:
    p = planner(min_bootstrap_interval=0.0)
    p.bootstrap_succeeded(T0, T0 + 10 * HOUR)
    until = p.bootstrap_failed(T0 + 6 * HOUR, retry_after=1800.0)
    assert until >= T0 + 6 * HOUR + 1800.0


# --- what an AE is answered ------------------------------------------------------------------------


def test_an_ae_asking_during_the_wait_gets_503_with_the_time_left() -> None:
    error = BsfAskedToWait(503, NOW + timedelta(seconds=90), 89.2)
    answer = error_answer(error)
    assert str(answer.code) == "5.03 Service Unavailable" and answer.max_age == 90
    assert answer.diagnostic.startswith(b"bsf-asked-to-wait: BSF answered 503: asked us to wait")
    assert b"2030-03-14 12:01:30Z" in answer.diagnostic
    assert error.culprit == "bsf" and isinstance(error, BsfServerError)

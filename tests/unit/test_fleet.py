"""The fleet simulation: reproducible, internally consistent, and deciding as the daemon's keystore does.

Small fleets (hundreds of gateways, hours of virtual time) run in well under a second each; the
figures for 100,000 gateways come from ``mn-secd sim fleet`` and tests/bench/bench_fleet.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from keystore_fakes import FakeCard, FlakyUb, identity
from virtual_time import VirtualTimeLoop

from mn_secd.config import GbaConfig
from mn_secd.errors import BsfUnreachable
from mn_secd.gba.keystore import KeyStore
from mn_secd.gba.planner import BootstrapTiming
from mn_secd.gba.ub import UbClient
from mn_secd.sim import fleet
from mn_secd.sim.bsfload import Answer, BsfLoad
from mn_secd.sim.fleet import EPOCH, SCENARIOS, FleetParams, FleetResult, simulate

ROOT = Path(__file__).resolve().parents[2]
SMALL = FleetParams(gateways=300, hours=14.0, disturbance_at=3 * 3600.0, trace=True)
ISSUE_KEYS = {
    "bsf_rate_mean",
    "bsf_rate_peak",
    "bsf_peak_over_mean",
    "aka_per_gateway_day",
    "keyless_seconds_p50",
    "keyless_seconds_p99",
    "keyless_seconds_max",
    "bsf_refused",
    "wall_seconds",
}


def without_wall_time(result: FleetResult) -> dict[str, object]:
    figures = dict(result.figures)
    del figures["wall_seconds"]
    return figures


# --- reproducible ----------------------------------------------------------------------------------


def test_a_fixed_seed_gives_the_same_run() -> None:
    params = replace(SMALL, scenario="outage")
    first, second = simulate(params), simulate(params)
    assert without_wall_time(first) == without_wall_time(second)
    assert (first.requests, first.keyless, first.traces) == (second.requests, second.keyless, second.traces)
    other = simulate(replace(params, seed=2))
    assert other.requests != first.requests


# --- invariants, every scenario ------------------------------------------------------------------


@pytest.fixture(scope="module", params=[*SCENARIOS, "power-cut-no-resume", "outage-with-extras"])
def run(request: pytest.FixtureRequest) -> FleetResult:
    name: str = request.param
    if name == "power-cut-no-resume":
        return simulate(replace(SMALL, scenario="power-cut", resume=False))
    if name == "outage-with-extras":  # resyncs, forced re-bootstraps, AEs waiting, a tight BSF
        return simulate(
            replace(
                SMALL,
                scenario="outage",
                resync_share=0.05,
                forced_per_day=2.0,
                ae_waiting_share=0.5,
                capacity_factor=1.5,
                queue_seconds=0.5,
            )
        )
    return simulate(replace(SMALL, scenario=name))


def test_every_gateway_ends_with_a_key(run: FleetResult) -> None:
    assert run.figures["gateways_with_key_at_end"] == run.params.gateways
    assert run.keyless[-1] == 0


def test_no_gateway_bootstraps_sooner_than_its_planner_allows(run: FleetResult) -> None:
    """After a failure, the next bootstrap waits for the planner's retry time (never sooner than
    the shortest back-off); after a success, the refresh comes no earlier than half the lifetime,
    unless a NAF forced it (then at least min_forced_interval after the previous start)."""
    timing = run.params.policy
    shortest = timing.failure_backoff / 2
    forced_allowed = run.params.forced_per_day > 0
    checked = 0
    for trace in run.traces:
        last_start: float | None = None
        after: tuple[str, float, float] | None = None  # the last outcome: (kind, at, value)
        for at, kind, value in trace:
            if kind in ("boot", "off"):
                last_start, after = None, None  # a new daemon: a new planner
            elif kind in ("ok", "fail"):
                after = (kind, at, value)
            elif kind == "start":
                if after is not None and after[0] == "fail":
                    assert at >= after[2] - 1e-6 and at - after[1] >= shortest
                    checked += 1
                elif after is not None and after[0] == "ok":
                    lifetime = after[2] - after[1]
                    if at < after[1] + lifetime / 2 - 1e-6:
                        assert forced_allowed and last_start is not None
                        assert at - last_start >= timing.min_forced_interval - 1e-6
                    checked += 1
                last_start = at
    assert checked > run.params.gateways  # the check looked at real decisions


def test_the_totals_add_up(run: FleetResult) -> None:
    kinds = [kind for trace in run.traces for _, kind, _ in trace]
    assert run.bootstraps == kinds.count("start")
    assert run.bootstraps == run.successes + run.failures + run.abandoned + run.in_flight
    assert run.successes == kinds.count("ok") and run.failures == kinds.count("fail")
    assert run.aka_runs == kinds.count("aka")
    assert run.first_requests + run.second_requests == sum(run.requests) + sum(run.unanswered)
    # every AKA run is followed by one more request, unless its daemon stopped in between
    assert 0 <= run.aka_runs - run.second_requests <= run.abandoned + run.in_flight
    assert run.resumed + run.startup_bootstraps == kinds.count("boot")
    assert run.figures["resumed_sessions"] == kinds.count("resume")
    served = sum(run.requests) - sum(run.refused)
    assert served <= run.capacity * run.params.horizon + run.capacity * run.params.queue_seconds + 1
    days = run.params.hours / 24
    assert run.figures["aka_per_gateway_day"] == pytest.approx(run.aka_runs / run.params.gateways / days, abs=1e-4)


# --- the scenarios do what they say --------------------------------------------------------------


def test_resume_saves_the_power_cut_and_no_resume_costs_it() -> None:
    params = replace(SMALL, scenario="power-cut", lifetime=24 * 3600.0, hours=30.0, trace=False)
    resumed, cold = simulate(params), simulate(replace(params, resume=False))
    assert cold.startup_bootstraps == params.gateways and cold.resumed == 0
    assert resumed.resumed >= 0.95 * params.gateways
    assert resumed.startup_requests <= 0.05 * cold.startup_requests
    assert float(resumed.figures["keyless_seconds_max"]) == 0.0
    assert float(cold.figures["keyless_seconds_p50"]) > 0.0


def test_an_outage_leaves_gateways_keyless_and_they_recover() -> None:
    result = simulate(replace(SMALL, scenario="outage", trace=False))
    assert sum(result.unanswered) > 0 and result.failures > 0
    assert max(result.keyless) > 0.5 * result.params.gateways  # 1 h outage, 1 h lifetime
    step = min(SMALL.policy.retry_interval.of(SMALL.lifetime), SMALL.policy.max_retry_interval)
    assert float(result.figures["keyless_seconds_max"]) <= SMALL.outage + step


def test_a_bsf_too_small_refuses_and_the_fleet_backs_off() -> None:
    result = simulate(replace(SMALL, scenario="power-cut", resume=False, capacity=1.0, trace=False))
    assert result.figures["bsf_refused"] > 0
    assert result.figures["gateways_with_key_at_end"] == SMALL.gateways


def test_the_ub_client_model_matches_the_daemons_defaults() -> None:
    signature = inspect.signature(UbClient.__init__).parameters
    assert fleet.UB_RETRIES == signature["retries"].default == GbaConfig.retries
    assert signature["backoff"].default == fleet.UB_BACKOFF
    assert signature["max_backoff"].default == fleet.UB_MAX_BACKOFF
    assert fleet.HTTP_TIMEOUT == signature["timeout"].default == GbaConfig.http_timeout
    assert FleetParams().policy == BootstrapTiming() == GbaConfig().timing()  # what the daemon runs with


def test_nonsense_parameters_are_refused() -> None:
    for bad in ({"scenario": "flood"}, {"gateways": 0}, {"lifetime": -1.0}, {"resync_share": 2.0}):
        with pytest.raises(ValueError):
            FleetParams(**bad)  # type: ignore[arg-type]


# --- the BSF model -------------------------------------------------------------------------------


def test_bsf_latency_grows_with_its_queue_and_new_bootstraps_are_refused_when_full() -> None:
    bsf = BsfLoad(capacity=10.0, queue_limit=5.0, latency=0.05)
    delays = [bsf.arrive(100.0, first=True) for _ in range(5)]
    assert [a for a, _ in delays] == [Answer.OK] * 5
    assert [round(d, 3) for _, d in delays] == [0.05, 0.15, 0.25, 0.35, 0.45]
    assert bsf.arrive(100.0, first=True) == (Answer.BUSY, 0.05)
    assert bsf.arrive(100.0, first=False)[0] is Answer.OK  # the answer to a challenge is queued
    assert bsf.backlog(100.3) == pytest.approx(3.0)  # drained at 10/s
    assert bsf.arrive(101.0, first=True) == (Answer.OK, pytest.approx(0.05))
    bsf.up = False
    assert bsf.arrive(101.0, first=False) == (Answer.DOWN, 0.05)
    bsf.set_capacity(102.0, 5.0)
    with pytest.raises(ValueError):
        BsfLoad(capacity=0.0, queue_limit=1.0, latency=0.0)


# --- the simulation decides as the keystore does -------------------------------------------------


def test_the_simulated_gateway_bootstraps_when_the_real_keystore_does() -> None:
    """One gateway, an outage of 3 h: the simulation's bootstrap times and outcomes equal those of
    the daemon's KeyStore on a virtual-time event loop, with the same planner random stream."""
    params = FleetParams(
        gateways=1,
        hours=10.0,
        scenario="outage",
        disturbance_at=2 * 3600.0,
        outage=3 * 3600.0,
        cold_start=True,
        ae_waiting_share=1.0,  # an AE asks at once, as the test below does
        capacity=1e9,  # an idle BSF: every answer comes at once
        latency=0.0,
        aka_seconds=0.0,
        ub_retries=0,  # the fake Ub client below does not retry by itself
        seed=9,
        trace=True,
    )
    simulated = [(at, kind) for at, kind, _ in simulate(params).traces[0] if kind in ("start", "ok", "fail")]

    loop = VirtualTimeLoop(EPOCH)
    outcomes: list[tuple[float, str]] = []

    async def keystore() -> None:
        clock = loop.clock()
        t0 = clock.time()
        ub = FlakyUb(clock, down_until=t0 + params.disturbance_at + params.outage)
        ub.down_from = t0 + params.disturbance_at
        planner_rng = random.Random(f"{params.seed}:planner")
        store = KeyStore(FakeCard(identity()), ub, clock=clock, rng=planner_rng)
        with contextlib.suppress(BsfUnreachable):
            await store.ensure_bootstrapped()
        await asyncio.sleep(params.horizon - 1.0)
        await store.close()
        for at in ub.starts:  # every run failed or succeeded at once (no latency)
            outcomes.append((at, "start"))
            outcomes.append((at, "fail" if ub.down_from <= at < ub.down_until else "ok"))

    try:
        loop.run_until_complete(keystore())
    finally:
        loop.close()
    real = [(at, kind) for at, kind in outcomes if at < EPOCH + params.horizon]
    assert [k for _, k in simulated] == [k for _, k in real]
    for (a, _), (b, _) in zip(simulated, real, strict=True):
        assert a == pytest.approx(b, abs=1e-3)  # the model BSF takes a nanosecond per request
    assert "fail" in [k for _, k in real] and len(real) > 20


# --- the command ---------------------------------------------------------------------------------


def test_the_command_prints_writes_json_and_draws(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mn_secd", "sim", "fleet", "--gateways", "200", "--hours", "10",
         "--scenario", "slow-bsf", "--at", "2h", "--seed", "4",
         "--json", str(tmp_path / "f.json"), "--plot", str(tmp_path / "f.png")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "slow-bsf, 200 gateways" in out.stdout and "bsf_peak_over_mean" in out.stdout
    data = json.loads((tmp_path / "f.json").read_text())
    assert data.keys() >= ISSUE_KEYS
    assert data["params"]["policy"]["retry_interval"] == "50%"
    assert len(data["per_minute"]["requests"]) == 600
    assert data["bsf_rate_mean"] == pytest.approx(sum(data["per_minute"]["requests"][:120]) / 120 / 60, abs=1e-3)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_refuses_bad_arguments_in_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mn_secd", "sim", "fleet", "--lifetime", "soon"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "expected a duration" in out.stderr

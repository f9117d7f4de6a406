"""``mn-secd sim fleet``: run the fleet simulation from a shell, print its figures, write JSON and a plot."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from mn_secd.gba.planner import BootstrapTiming, Span
from mn_secd.sim.fleet import SCENARIOS, FleetParams, FleetResult, simulate

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?")
_UNIT = {None: 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h``, ``1.5d`` -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90, 10m, 1h or 1d, got {text!r}")
    return float(match[1]) * _UNIT[match[2]]


def span(text: str) -> Span:
    """A share of the key lifetime (``33%``) or a duration (``300``, ``5m``)."""
    match = _PERCENT.fullmatch(text.strip())
    if match is not None:
        return Span(share=float(match[1]) / 100.0)
    return Span(seconds=duration(text))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    """``mn-secd sim fleet``: arguments and handler."""
    parser.epilog = (
        "Durations: seconds, or with a unit (30s, 10m, 1h, 1d). Timing spans: a duration or a share "
        "of the key lifetime (33%). Figures are per minute of simulated time."
    )
    defaults = FleetParams()
    timing = BootstrapTiming()
    run = parser.add_argument_group("the run")
    run.add_argument("--gateways", type=_positive_int, default=defaults.gateways, metavar="N")
    run.add_argument("--hours", type=float, default=defaults.hours, metavar="H", help="simulated hours")
    run.add_argument("--scenario", choices=SCENARIOS, default=defaults.scenario)
    run.add_argument("--seed", type=int, default=defaults.seed, metavar="S")
    run.add_argument("--json", type=Path, metavar="FILE", help="write the figures and per-minute series as JSON")
    run.add_argument("--plot", type=Path, metavar="FILE.png", help="draw BSF load and gateways without a key")
    fleet = parser.add_argument_group("the fleet")
    fleet.add_argument("--lifetime", type=duration, default=defaults.lifetime, help="key lifetime the BSF gives")
    fleet.add_argument("--no-resume", dest="resume", action="store_false", help="restarts never resume a session")
    fleet.add_argument("--cold-start", action="store_true", help="every gateway starts at 0 with nothing stored")
    fleet.add_argument("--aka", type=duration, default=defaults.aka_seconds, help="the card's AUTHENTICATE time")
    fleet.add_argument("--resync-share", type=float, default=defaults.resync_share, metavar="P")
    fleet.add_argument(
        "--forced-per-day",
        type=float,
        default=defaults.forced_per_day,
        metavar="R",
        help="NAF refusals per gateway-day",
    )
    fleet.add_argument(
        "--ae-waiting-share", type=float, default=defaults.ae_waiting_share, metavar="P",
        help="share of (re)starts with an AE already waiting for a key",
    )  # fmt: skip
    fleet.add_argument("--ub-retries", type=int, default=defaults.ub_retries, metavar="N")
    scenario = parser.add_argument_group("the scenario")
    scenario.add_argument("--at", type=duration, default=defaults.disturbance_at, help="when the disturbance begins")
    scenario.add_argument("--outage", type=duration, default=defaults.outage)
    scenario.add_argument("--power-off", type=duration, default=defaults.power_off)
    scenario.add_argument("--restart-spread", type=duration, default=defaults.restart_spread)
    scenario.add_argument("--slow-duration", type=duration, default=defaults.slow_duration)
    scenario.add_argument("--slow-factor", type=float, default=defaults.slow_factor)
    scenario.add_argument("--upgrade-window", type=duration, default=defaults.upgrade_window)
    scenario.add_argument("--restart-downtime", type=duration, default=defaults.restart_downtime)
    bsf = parser.add_argument_group("the BSF")
    bsf.add_argument("--capacity", type=float, metavar="REQ/S", help="default: capacity-factor x steady mean")
    bsf.add_argument("--capacity-factor", type=float, default=defaults.capacity_factor, metavar="X")
    bsf.add_argument("--queue", type=duration, default=defaults.queue_seconds, help="seconds of work it queues")
    bsf.add_argument("--latency", type=duration, default=defaults.latency, help="its answer time when idle")
    planner = parser.add_argument_group("the daemon's timing (default: the daemon's own defaults)")
    planner.add_argument("--refresh-margin", type=span, default=timing.refresh_margin, metavar="SPAN")
    planner.add_argument("--refresh-jitter", type=span, default=timing.refresh_jitter, metavar="SPAN")
    planner.add_argument("--retry-interval", type=span, default=timing.retry_interval, metavar="SPAN")
    planner.add_argument("--max-retry-interval", type=duration, default=timing.max_retry_interval)
    planner.add_argument("--start-jitter", type=duration, default=timing.start_jitter)
    parser.set_defaults(handler=main)


def params_from_args(args: argparse.Namespace) -> FleetParams:
    timing = BootstrapTiming(
        refresh_margin=args.refresh_margin,
        refresh_jitter=args.refresh_jitter,
        retry_interval=args.retry_interval,
        max_retry_interval=args.max_retry_interval,
        start_jitter=args.start_jitter,
    )
    return FleetParams(
        gateways=args.gateways,
        hours=args.hours,
        scenario=args.scenario,
        seed=args.seed,
        lifetime=args.lifetime,
        resume=args.resume,
        policy=timing,
        cold_start=args.cold_start,
        disturbance_at=args.at,
        power_off=args.power_off,
        restart_spread=args.restart_spread,
        outage=args.outage,
        slow_duration=args.slow_duration,
        slow_factor=args.slow_factor,
        upgrade_window=args.upgrade_window,
        restart_downtime=args.restart_downtime,
        capacity=args.capacity,
        capacity_factor=args.capacity_factor,
        queue_seconds=args.queue,
        latency=args.latency,
        aka_seconds=args.aka,
        resync_share=args.resync_share,
        forced_per_day=args.forced_per_day,
        ae_waiting_share=args.ae_waiting_share,
        ub_retries=args.ub_retries,
    )


def main(args: argparse.Namespace) -> int:
    try:
        params = params_from_args(args)
    except ValueError as exc:
        print(f"mn-secd sim fleet: {exc}", file=sys.stderr)
        return 2
    if args.plot is not None:
        importlib.import_module("matplotlib")  # a missing [sim] extra is said now, not after the run
    result = simulate(params)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(result), indent=1) + "\n")
    if args.plot is not None:
        from mn_secd.sim.fleetplot import plot

        plot(result, args.plot)
    return 0


def _human(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def targets(result: FleetResult) -> list[tuple[str, bool]]:
    """The issue's targets that this run can judge, each with whether it was met."""
    p, f = result.params, result.figures
    checks: list[tuple[str, bool]] = []
    if p.scenario == "outage":
        checks.append(
            (f"after the outage the BSF's peak stays <= 2 x its steady mean ({f['bsf_peak_over_mean']:g} x)",
             float(f["bsf_peak_over_mean"]) <= 2.0)
        )  # fmt: skip
        step = min(p.policy.retry_interval.of(p.lifetime), p.policy.max_retry_interval)
        checks.append(
            (f"no gateway keyless longer than the outage + one retry step ({_human(p.outage)} + {_human(step)})",
             float(f["keyless_seconds_max"]) <= p.outage + step)
        )  # fmt: skip
    checks.append((f"every gateway has a key at the end ({f['gateways_with_key_at_end']:,})",
                   f["gateways_with_key_at_end"] == p.gateways))  # fmt: skip
    return checks


def report(result: FleetResult) -> str:
    p, f = result.params, result.figures
    lines = [
        f"mn-secd sim fleet: {p.scenario}{'' if p.resume else ' (no resume)'}, {p.gateways:,} gateways, "
        f"{p.hours:g} h simulated, key lifetime {_human(p.lifetime)}, seed {p.seed}",
        f"  BSF: capacity {result.capacity:.1f} req/s ({result.capacity / result.steady_rate_expected:.3g} x the "
        f"expected steady {result.steady_rate_expected:.2f} req/s), queue {p.queue_seconds:g} s, "
        f"latency {p.latency * 1000:g} ms",
        f"  timing: refresh margin {p.policy.refresh_margin} + jitter {p.policy.refresh_jitter}, retry "
        f"{p.policy.retry_interval} (at most {_human(p.policy.max_retry_interval)} without a key), "
        f"start jitter {_human(p.policy.start_jitter)}",
    ]
    units = {"bsf_rate_mean": "req/s", "bsf_rate_peak": "req/s", "wall_seconds": "s"}
    for key, value in f.items():
        unit = units.get(key, "s" if key.startswith("keyless_seconds") else "")
        shown = f"{value:,}" if isinstance(value, int) else f"{value:,.6g}"
        lines.append(f"  {key:<28}{shown:>14} {unit}".rstrip())
    lines.append(
        f"  bootstraps {result.bootstraps:,}: {result.successes:,} ok, {result.failures:,} failed, "
        f"{result.abandoned:,} cut short, {result.in_flight:,} running at the end; "
        f"{result.startup_requests:,} requests by start-up bootstraps"
    )
    for text, met in targets(result):
        lines.append(f"  target: {text}: {'met' if met else 'NOT MET'}")
    return "\n".join(lines)


def to_json(result: FleetResult) -> dict[str, Any]:
    params = dataclasses.asdict(result.params)
    params["policy"] = {k: (str(v) if isinstance(v, Span) else v) for k, v in vars(result.params.policy).items()}
    figures = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in result.figures.items()}
    return {
        **figures,
        "scenario": result.params.scenario,
        "params": params,
        "bsf_capacity": result.capacity,
        "steady_rate_expected": result.steady_rate_expected,
        "counts": {
            "bootstraps": result.bootstraps,
            "successes": result.successes,
            "failures": result.failures,
            "abandoned": result.abandoned,
            "in_flight": result.in_flight,
            "aka_runs": result.aka_runs,
            "first_requests": result.first_requests,
            "second_requests": result.second_requests,
            "startup_requests": result.startup_requests,
        },
        "targets": [{"target": text, "met": met} for text, met in targets(result)],
        "per_minute": {
            "requests": result.requests,
            "refused": result.refused,
            "unanswered": result.unanswered,
            "keyless": result.keyless,
        },
    }

"""Benchmark the fleet simulation: 100,000 gateways x 48 simulated hours, target under 2 minutes.

Runs ``mn-secd sim fleet``'s engine in this process (one real BootstrapPlanner per gateway) and
prints, per run, the wall time and this process's CPU time next to the 120 s target, the number of
bootstraps simulated and the cost per bootstrap, with the machine's load average before and after
(the figures are noisy while other work shares the two cores). The default run is the heaviest
of the issue's cases, the steady state with a 1 h key lifetime (about 40 bootstraps per gateway
and day); ``--lifetime 24h`` and ``--scenario`` try the others.

    .venv/bin/python tests/bench/bench_fleet.py [--gateways 100000] [--hours 48] [--scenario steady]
                                               [--lifetime 1h] [--runs 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from targets import Targets

from mn_secd.sim.fleet import SCENARIOS, FleetParams, FleetSimulation
from mn_secd.sim.fleetcli import duration

TARGET_SECONDS = 120.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateways", type=int, default=100_000)
    parser.add_argument("--hours", type=float, default=48.0)
    parser.add_argument("--scenario", choices=SCENARIOS, default="steady")
    parser.add_argument("--lifetime", type=duration, default=3600.0)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()

    print(
        f"fleet simulation: {args.gateways:,} gateways x {args.hours:g} h, scenario {args.scenario}, "
        f"key lifetime {args.lifetime:g} s; {os.cpu_count()} CPUs, load average before "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    targets = Targets()
    for run in range(args.runs):
        params = FleetParams(
            gateways=args.gateways, hours=args.hours, scenario=args.scenario, lifetime=args.lifetime, seed=run + 1
        )
        cpu, wall = cpu_seconds(), time.perf_counter()
        result = FleetSimulation(params).run()
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        per = wall / max(1, result.bootstraps) * 1e6
        verdict = targets.check(f"run {run + 1} wall time", round(wall, 1), TARGET_SECONDS, "s")
        print(
            f"  run {run + 1}: {wall:6.1f} s wall {verdict}, {cpu:.1f} s CPU; "
            f"{result.bootstraps:,} bootstraps, {sum(result.requests):,} BSF requests, "
            f"{per:.1f} us per bootstrap"
        )
    print(f"  load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"  {targets.summary()}")


if __name__ == "__main__":
    main()

"""The fleet simulation's picture: BSF load and gateways without a key over time, as a PNG.

matplotlib is a ``[sim]`` extra and is imported only here, only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mn_secd.sim.fleet import MINUTE, FleetResult


def _hours(n: int) -> list[float]:
    return [(i + 0.5) * MINUTE / 3600.0 for i in range(n)]


def plot(result: FleetResult, path: Path, *, title: str | None = None) -> None:
    """Two panels sharing the time axis: requests/s at the BSF (per minute), gateways without a key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = result.params
    hours = _hours(len(result.requests))
    rate = [c / MINUTE for c in result.requests]
    refused = [c / MINUTE for c in result.refused]
    unanswered = [c / MINUTE for c in result.unanswered]
    f = result.figures

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(10, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 2]}, constrained_layout=True
    )
    lifetime = f"{p.lifetime / 3600:g} h" if p.lifetime >= 3600 else f"{p.lifetime:g} s"
    fig.suptitle(
        title or f"{p.scenario}{'' if p.resume else ' (no resume)'}: {p.gateways:,} gateways, key lifetime {lifetime}",
        fontsize=12,
    )
    window = p.disturbance()
    for ax in (top, bottom):
        if window is not None:
            ax.axvspan(window[0] / 3600.0, window[1] / 3600.0, color="0.9", zorder=0, label="_")
        ax.grid(True, color="0.85", linewidth=0.6)

    top.plot(hours, rate, color="tab:blue", linewidth=0.9, label="requests reaching the BSF")
    if any(refused):
        top.plot(hours, refused, color="tab:red", linewidth=0.9, label="of which refused (503)")
    if any(unanswered):
        top.plot(hours, unanswered, color="tab:orange", linewidth=0.9, label="unanswered (BSF down)")
    top.axhline(result.capacity, color="0.3", linestyle="--", linewidth=0.9, label=f"capacity {result.capacity:.0f}/s")
    mean = float(f["bsf_rate_mean"])
    top.axhline(2 * mean, color="tab:green", linestyle=":", linewidth=1.1, label=f"2 × steady mean ({2 * mean:.1f}/s)")
    top.set_ylabel("requests/s (1-minute mean)")
    peak_seen = max([*rate, *unanswered, result.capacity, 2 * mean])
    if peak_seen > 10 * max(result.capacity, 2 * mean):
        # A storm far above what the BSF can serve: a log scale keeps the steady load visible too.
        top.set_yscale("log")
        top.set_ylim(max(0.1, mean / 10), peak_seen * 1.5)
        top.set_ylabel("requests/s (1-minute mean, log scale)")
    else:
        top.set_ylim(0, peak_seen * 1.08)
    top.legend(loc="upper right", fontsize=8, framealpha=0.9)
    _annotate(top, f)

    keyless = result.keyless
    bottom.fill_between(hours, keyless, step="mid", color="tab:purple", alpha=0.35, linewidth=0)
    bottom.plot(hours, keyless, color="tab:purple", linewidth=0.9, drawstyle="steps-mid")
    bottom.set_ylabel("gateways without a key")
    bottom.set_xlabel("hours of simulated time (grey: the disturbance)")
    bottom.set_ylim(0, max(1, max(keyless, default=0)) * 1.1)
    bottom.set_xlim(0, p.hours)
    bottom.text(
        0.01,
        0.93,
        f"longest time without a key: p50 {f['keyless_seconds_p50']:g} s, p99 {f['keyless_seconds_p99']:g} s, "
        f"max {f['keyless_seconds_max']:g} s",
        transform=bottom.transAxes,
        fontsize=8,
        va="top",
    )
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _annotate(ax: Any, f: dict[str, float | int]) -> None:
    ax.text(
        0.01,
        0.97,
        f"steady mean {f['bsf_rate_mean']:g}/s, peak {f['bsf_rate_peak']:g}/s "
        f"({f['bsf_peak_over_mean']:g} × mean); refused {f['bsf_refused']:,}; "
        f"AKA runs per gateway-day {f['aka_per_gateway_day']:g}",
        transform=ax.transAxes,
        fontsize=8,
        va="top",
    )

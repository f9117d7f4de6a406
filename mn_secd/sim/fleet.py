"""The fleet simulation: N gateways against one BSF on a virtual clock, deciding with the daemon's planner.

Each gateway owns a real :class:`~mn_secd.gba.planner.BootstrapPlanner` and calls it exactly where
the daemon's :class:`~mn_secd.gba.keystore.KeyStore` does: ``bootstrap_started`` when a bootstrap
begins, ``bootstrap_succeeded``/``bootstrap_failed`` with its outcome, ``due``/``next_deadline``
whenever it would wake up, ``forced_retry_after`` for a NAF that refused the B-TID, and ``start``
or ``resume`` when the daemon (re)starts. What the keystore adds around the planner is mirrored
here: one bootstrap at a time per gateway, and the Ub client's own retries of the first request
(:func:`~mn_secd.gba.ub.backoff_delay`, on 503 and on a BSF that does not answer). A test runs the
real KeyStore on a virtual-time event loop beside this model and checks that both bootstrap at the
same instants.

A bootstrap is the first request (answered 401 with a challenge), the card's AKA run, and the
second request (answered 200); a resynchronisation adds an AKA run and a request. The BSF is
:class:`~mn_secd.sim.bsfload.BsfLoad`: a capacity, a bounded queue, latency growing with the queue.

Events are kept in buckets of :data:`TICK` seconds (a calendar queue: cheaper than a heap for
millions of events); each event keeps its exact time, which is what the planner sees, and only the
order of events within one tick is approximate.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mn_secd.gba.planner import BootstrapPlanner, BootstrapTiming, Due, StartAction, StoredSession
from mn_secd.gba.ub import backoff_delay
from mn_secd.sim.bsfload import Answer, BsfLoad

#: Calendar-queue bucket width, seconds of virtual time.
TICK = 0.1
#: Where the virtual clock starts (2030-03-17T17:46:40Z): POSIX seconds, as the daemon's clock, so
#: the planner's check that the clock has been set holds.
EPOCH = 1_900_000_000.0
#: Figures are per minute of virtual time.
MINUTE = 60.0
#: The least capacity the BSF is given when it is scaled from the fleet's steady mean (requests/s).
MIN_CAPACITY = 1.0
#: What the daemon's Ub client does by default (checked against UbClient and GbaConfig by a test).
UB_RETRIES = 3
UB_BACKOFF = 0.5
UB_MAX_BACKOFF = 8.0
HTTP_TIMEOUT = 10.0

SCENARIOS = ("steady", "power-cut", "outage", "slow-bsf", "rolling-upgrade")

_INF = math.inf

# What a gateway's one pending event means.
_IDLE = 0  # asleep until the planner's next deadline (or nothing to do)
_SEND1 = 1  # send (or resend) the first Ub request
_SEND2 = 2  # the card has answered the challenge: send the response
_SUCCESS = 3  # the BSF's 200 arrives
_FAILURE = 4  # the bootstrap has failed (the error reaches the keystore)
_BOOT = 5  # the daemon starts (after a power cut, restart or upgrade)
_OFF = 6  # switched off, nothing pending

# Counters, and names bound once for the hot loop.
(
    _BOOTSTRAPS,
    _SUCCESSES,
    _FAILURES,
    _ABANDONED,
    _AKA,
    _FIRST_SENDS,
    _SECOND_SENDS,
    _STARTUP_BOOTSTRAPS,
    _STARTUP_REQUESTS,
    _RESUMED,
) = range(10)
_OK, _DOWN = Answer.OK, Answer.DOWN
_EXPIRE = Due.EXPIRE


@dataclass(frozen=True)
class FleetParams:
    """One run: the fleet, the scenario and the BSF (times in seconds of virtual time)."""

    gateways: int = 100_000
    hours: float = 48.0
    scenario: str = "steady"
    seed: int = 1
    lifetime: float = 3600.0
    resume: bool = True
    policy: BootstrapTiming = field(default_factory=BootstrapTiming)
    #: Every gateway starts at t=0 with nothing stored (a first roll-out) instead of mid-lifetime.
    cold_start: bool = False
    #: When the scenario's disturbance begins.
    disturbance_at: float = 6 * 3600.0
    #: power-cut: how long the power is off, and the window in which the gateways come back.
    power_off: float = 600.0
    restart_spread: float = 60.0
    #: outage: how long the BSF does not answer.
    outage: float = 3600.0
    #: slow-bsf: the capacity is multiplied by ``slow_factor`` for ``slow_duration``.
    slow_duration: float = 1800.0
    slow_factor: float = 0.5
    #: rolling-upgrade: every gateway restarts once within this window, down for ``restart_downtime``.
    upgrade_window: float = 7200.0
    restart_downtime: float = 30.0
    #: BSF: capacity in requests/s (None: ``capacity_factor`` times the fleet's steady mean rate, at
    #: least :data:`MIN_CAPACITY`),
    #: how many seconds of work it queues before refusing new bootstraps, and its base latency.
    capacity: float | None = None
    capacity_factor: float = 4.0
    queue_seconds: float = 2.0
    latency: float = 0.05
    #: The card's AUTHENTICATE, seconds.
    aka_seconds: float = 0.5
    #: Share of bootstraps that need a resynchronisation (one more AKA run and request).
    resync_share: float = 0.0
    #: NAF refusals of the B-TID per gateway and day (each one asks for a forced re-bootstrap).
    forced_per_day: float = 0.0
    #: Share of (re)starting gateways whose AE is already waiting for a key.
    ae_waiting_share: float = 0.0
    ub_retries: int = UB_RETRIES
    http_timeout: float = HTTP_TIMEOUT
    #: Keep every gateway's bootstrap and AKA times (tests; costs memory on a big fleet).
    trace: bool = False

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; one of {', '.join(SCENARIOS)}")
        if self.gateways < 1:
            raise ValueError("a fleet has at least one gateway")
        positive = ("hours", "lifetime", "queue_seconds", "capacity_factor", "http_timeout")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        not_negative = (
            "disturbance_at",
            "power_off",
            "restart_spread",
            "outage",
            "slow_duration",
            "upgrade_window",
            "restart_downtime",
            "latency",
            "aka_seconds",
            "forced_per_day",
        )
        for name in not_negative:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number not below zero, got {value!r}")
        for name in ("resync_share", "ae_waiting_share"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie between 0 and 1, got {value!r}")
        if not 0 < self.slow_factor <= 1:
            raise ValueError(f"slow_factor must lie in (0, 1], got {self.slow_factor!r}")
        if self.capacity is not None and not (math.isfinite(self.capacity) and self.capacity > 0):
            raise ValueError(f"capacity must be a positive number, got {self.capacity!r}")
        if self.ub_retries < 0:
            raise ValueError("ub_retries must not be negative")

    @property
    def horizon(self) -> float:
        return self.hours * 3600.0

    def disturbance(self) -> tuple[float, float] | None:
        """When the scenario's disturbance starts and ends (None for steady)."""
        start = self.disturbance_at
        if self.scenario == "power-cut":
            return start, start + self.power_off + self.restart_spread
        if self.scenario == "outage":
            return start, start + self.outage
        if self.scenario == "slow-bsf":
            return start, start + self.slow_duration
        if self.scenario == "rolling-upgrade":
            return start, start + self.upgrade_window + self.restart_downtime
        return None


@dataclass
class FleetResult:
    """What a run produced: the figures the issue asks for, per-minute series and (optionally) traces."""

    params: FleetParams
    capacity: float
    steady_rate_expected: float
    figures: dict[str, float | int]
    #: Per minute: requests that reached the BSF (answered or refused), refused ones, and requests
    #: that found the BSF down; gateways running without a valid key at the start of each minute.
    requests: list[int]
    refused: list[int]
    unanswered: list[int]
    keyless: list[int]
    #: trace=True only: per gateway, (time, event, value) with event "start", "aka", "ok" (value: the
    #: expiry), "fail" (value: when the planner allows the next bootstrap), "boot", "resume" (value:
    #: the refresh time), "off". Times are POSIX seconds on the virtual clock, from :data:`EPOCH`.
    traces: list[list[tuple[float, str, float]]] = field(default_factory=list)
    #: Bootstraps started; of them succeeded, failed, abandoned by a switch-off, still running at the end.
    bootstraps: int = 0
    successes: int = 0
    failures: int = 0
    abandoned: int = 0
    in_flight: int = 0
    aka_runs: int = 0
    #: Ub requests sent: first requests (with the Ub client's own retries), answers to a challenge.
    first_requests: int = 0
    second_requests: int = 0
    #: (Re)starts that had to bootstrap, their requests until they had a key, and those that resumed.
    startup_bootstraps: int = 0
    startup_requests: int = 0
    resumed: int = 0
    keyed_at_end: int = 0


def expected_refresh_period(policy: BootstrapTiming, lifetime: float, samples: int = 4000) -> float:
    """The mean time between two refreshes of one gateway, measured on the planner itself."""
    rng = random.Random(0)
    planner = BootstrapPlanner(policy, rng)
    total = 0.0
    for _ in range(samples):
        total += planner.bootstrap_succeeded(0.0, lifetime)
    return total / samples


def steady_request_rate(params: FleetParams) -> float:
    """Requests/s the fleet sends in steady state (what the BSF's capacity is scaled from)."""
    per_bootstrap = 2.0 + params.resync_share
    return params.gateways * per_bootstrap / expected_refresh_period(params.policy, params.lifetime)


class FleetSimulation:
    """One run of :class:`FleetParams`; :meth:`run` returns a :class:`FleetResult`."""

    def __init__(self, params: FleetParams, clock: Callable[[], float] = time.perf_counter) -> None:
        self.params = params
        self._clock = clock
        steady = steady_request_rate(params)
        self.steady_rate_expected = steady
        if params.capacity is not None:
            self.capacity = params.capacity
        else:  # even a lab BSF answers a request a second: a tiny fleet's steady mean is no measure
            self.capacity = max(MIN_CAPACITY, params.capacity_factor * steady)
        self.bsf = BsfLoad(
            capacity=self.capacity, queue_limit=max(1.0, self.capacity * params.queue_seconds), latency=params.latency
        )

    def run(self) -> FleetResult:
        p = self.params
        wall_start = self._clock()
        n = p.gateways
        origin = EPOCH
        end = origin + p.horizon
        minutes = math.ceil(p.horizon / MINUTE) + 1
        inv_tick = 1.0 / TICK
        inv_minute = 1.0 / MINUTE
        policy = p.policy
        lifetime = p.lifetime
        aka_seconds = p.aka_seconds
        http_timeout = p.http_timeout
        ub_retries = p.ub_retries
        resync_share = p.resync_share
        resume = p.resume
        trace = p.trace
        bsf = self.bsf
        arrive = bsf.arrive

        # Separate random streams, so that e.g. the scenario's restart times do not shift the
        # planners' draws: planner jitter and back-off / Ub client retries / the world.
        planner_rng = random.Random(f"{p.seed}:planner")
        ub_rng = random.Random(f"{p.seed}:ub")
        world_rng = random.Random(f"{p.seed}:world")

        planners = [BootstrapPlanner(policy, planner_rng) for _ in range(n)]
        due = [_INF] * n  # exact time of the gateway's one pending event
        phase = [_IDLE] * n
        attempt = [0] * n  # Ub client: retries of the first request so far
        resyncing = [False] * n
        aka_done = [False] * n  # this bootstrap has run an AKA (GBA_U: the card's Ks is replaced)
        startup = [False] * n  # the bootstrap in flight is the first after a (re)start
        key_until = [-_INF] * n  # expiry of the gateway's valid Ks
        up_since = [origin] * n
        longest_keyless = [0.0] * n
        stored_expiry = [-_INF] * n  # the session a restart could resume (EF_GBABP / sealed file)
        traces: list[list[tuple[float, str, float]]] = [[] for _ in range(n)] if trace else []

        requests = [0] * minutes
        refused = [0] * minutes
        unanswered = [0] * minutes
        keyless_delta = [0] * (minutes + 1)
        counters = [0] * 10

        buckets: dict[int, list[int]] = {}
        current: list[int] = []
        current_tick = -1

        def schedule(g: int, at: float) -> None:
            due[g] = at
            if at >= end:
                return
            k = int((at - origin) * inv_tick)
            if k <= current_tick:
                current.append(g)
            else:
                bucket = buckets.get(k)
                if bucket is None:
                    buckets[k] = [g]
                else:
                    bucket.append(g)

        def keyless_episode(g: int, start: float, stop: float) -> None:
            if stop <= start:
                return
            if stop - start > longest_keyless[g]:
                longest_keyless[g] = stop - start
            keyless_delta[int((start - origin) / MINUTE) + 1] += 1
            keyless_delta[min(minutes, int((stop - origin) / MINUTE) + 1)] -= 1

        def count_request(now: float, answer: Answer, g: int) -> None:
            m = int((now - origin) * inv_minute)
            if answer is _OK:
                requests[m] += 1
            elif answer is _DOWN:
                unanswered[m] += 1
                return
            else:
                requests[m] += 1
                refused[m] += 1
            if startup[g]:
                counters[_STARTUP_REQUESTS] += 1

        def start_bootstrap(g: int, now: float) -> None:
            planners[g].bootstrap_started(now)
            counters[_BOOTSTRAPS] += 1
            attempt[g] = 0
            resyncing[g] = resync_share > 0 and world_rng.random() < resync_share
            aka_done[g] = False
            if trace:
                traces[g].append((now, "start", 0.0))
            send_first(g, now)

        def send_first(g: int, now: float) -> None:
            counters[_FIRST_SENDS] += 1
            answer, delay = arrive(now, first=True)
            count_request(now, answer, g)
            if answer is _OK and delay <= http_timeout:
                phase[g] = _SEND2
                run_aka(g, now + delay)
                schedule(g, now + delay + aka_seconds)
                return
            wait = min(delay, http_timeout)
            if attempt[g] < ub_retries:
                phase[g] = _SEND1
                schedule(g, now + wait + backoff_delay(attempt[g], UB_BACKOFF, UB_MAX_BACKOFF, ub_rng))
                attempt[g] += 1
            else:
                phase[g] = _FAILURE
                schedule(g, now + wait)

        def send_second(g: int, now: float) -> None:
            counters[_SECOND_SENDS] += 1
            answer, delay = arrive(now, first=False)
            count_request(now, answer, g)
            if answer is not _OK or delay > http_timeout:
                phase[g] = _FAILURE  # after the AKA run the Ub client never resends
                schedule(g, now + min(delay, http_timeout))
            elif resyncing[g]:
                resyncing[g] = False  # the BSF answers AUTS with a fresh challenge: one more AKA run
                run_aka(g, now + delay)
                schedule(g, now + delay + aka_seconds)
            else:
                phase[g] = _SUCCESS
                schedule(g, now + delay)

        def run_aka(g: int, at: float) -> None:
            counters[_AKA] += 1
            aka_done[g] = True
            if trace:
                traces[g].append((at, "aka", 0.0))

        def settle(g: int, now: float) -> None:
            """What the keystore's refresh loop does when it wakes up (see KeyStore._refresh_loop)."""
            planner = planners[g]
            while True:
                reason = planner.due(now)
                if reason is _EXPIRE:
                    planner.session_dropped()
                    continue
                if reason is not None:
                    start_bootstrap(g, now)
                    return
                break
            phase[g] = _IDLE
            deadline = planner.next_deadline()
            if deadline is None:
                due[g] = _INF
            else:
                schedule(g, deadline)

        def succeeded(g: int, now: float) -> None:
            expires = now + lifetime
            planners[g].bootstrap_succeeded(now, expires)
            counters[_SUCCESSES] += 1
            gap_start = max(key_until[g], up_since[g])
            keyless_episode(g, gap_start, now)
            key_until[g] = expires
            stored_expiry[g] = expires
            startup[g] = False
            if trace:
                traces[g].append((now, "ok", expires))
            settle(g, now)

        def failed(g: int, now: float) -> None:
            retry_at = planners[g].bootstrap_failed(now)
            counters[_FAILURES] += 1
            if trace:
                traces[g].append((now, "fail", retry_at))
            settle(g, now)

        def switch_off(g: int, now: float) -> None:
            """The daemon stops (power cut, restart): its in-flight bootstrap is lost."""
            if phase[g] == _OFF or phase[g] == _BOOT:
                return
            if key_until[g] < now:
                keyless_episode(g, max(key_until[g], up_since[g]), now)
            if aka_done[g] and phase[g] in (_SEND2, _SUCCESS, _FAILURE):
                # Interrupted after AUTHENTICATE: on a GBA_U card Ks is no longer the stored B-TID's.
                stored_expiry[g] = -_INF
            key_until[g] = -_INF  # a restarted daemon holds no key until it resumes or bootstraps
            if phase[g] != _IDLE:
                counters[_ABANDONED] += 1
            phase[g] = _OFF
            due[g] = _INF
            if trace:
                traces[g].append((now, "off", 0.0))

        def boot(g: int, now: float) -> None:
            """The daemon starts: a fresh planner; resume the stored session or bootstrap (jittered)."""
            planner = BootstrapPlanner(policy, planner_rng)
            planners[g] = planner
            up_since[g] = now
            startup[g] = True
            if trace:
                traces[g].append((now, "boot", 0.0))
            stored = None
            if resume and stored_expiry[g] > now:
                stored = StoredSession(f"gw{g}", stored_expiry[g], "same", lifetime)
            ae_waiting = p.ae_waiting_share > 0 and world_rng.random() < p.ae_waiting_share
            decision = planner.start(now, iccid="same", stored=stored, ae_waiting=ae_waiting)
            if decision.action is StartAction.RESUME:
                key_until[g] = stored_expiry[g]
                startup[g] = False
                counters[_RESUMED] += 1
                if trace:
                    traces[g].append((now, "resume", decision.at))
            else:
                counters[_STARTUP_BOOTSTRAPS] += 1
            settle(g, now)

        # --- initial state ---
        if p.cold_start:
            for g in range(n):
                phase[g] = _BOOT
                schedule(g, origin)
        else:
            # Mid-lifetime, as after a long steady run: the age of each gateway's session drawn
            # from the stationary distribution (rejection sampling on the planner's own refresh times).
            for g in range(n):
                planner = planners[g]
                while True:
                    issued = origin - world_rng.uniform(0.0, lifetime)
                    refresh_at = planner.bootstrap_succeeded(issued, issued + lifetime)
                    if refresh_at > origin:
                        break
                key_until[g] = stored_expiry[g] = issued + lifetime
                settle(g, origin)

        # --- the scenario's global events: (time, order, action) ---
        events: list[tuple[float, int, Callable[[float], None]]] = []
        t0 = origin + p.disturbance_at
        if p.scenario == "power-cut":

            def power_cut(now: float) -> None:
                for g in range(n):
                    switch_off(g, now)
                    phase[g] = _BOOT
                    schedule(g, now + p.power_off + world_rng.uniform(0.0, p.restart_spread))

            events.append((t0, 0, power_cut))
        elif p.scenario == "outage":

            def bsf_down(now: float) -> None:
                bsf.up = False

            def bsf_back(now: float) -> None:
                bsf.up = True

            events += [(t0, 0, bsf_down), (t0 + p.outage, 1, bsf_back)]
        elif p.scenario == "slow-bsf":
            events += [
                (t0, 0, lambda now: bsf.set_capacity(now, self.capacity * p.slow_factor)),
                (t0 + p.slow_duration, 1, lambda now: bsf.set_capacity(now, self.capacity)),
            ]
        elif p.scenario == "rolling-upgrade":
            restarts = sorted((t0 + world_rng.uniform(0.0, p.upgrade_window), g) for g in range(n))
            for order, (at, g) in enumerate(restarts):

                def restart(now: float, g: int = g) -> None:
                    switch_off(g, now)
                    phase[g] = _BOOT
                    schedule(g, now + p.restart_downtime)

                events.append((at, order, restart))
        events.sort(key=lambda e: (e[0], e[1]))
        forced_rate = p.forced_per_day * n / 86400.0
        next_forced = origin + world_rng.expovariate(forced_rate) if forced_rate > 0 else _INF

        # --- the loop ---
        ticks = math.ceil(p.horizon * inv_tick)
        ev = 0
        n_events = len(events)
        next_global = min(events[0][0] if events else _INF, next_forced)
        for tick in range(ticks):
            popped = buckets.pop(tick, None)
            tick_end = origin + (tick + 1) * TICK
            global_due = next_global < tick_end
            if popped is None:
                if not global_due:
                    continue
                popped = []
            current = popped
            current_tick = tick
            if global_due:
                while ev < n_events and events[ev][0] < tick_end:
                    at, _, action = events[ev]
                    ev += 1
                    action(at)
                while next_forced < tick_end:
                    g = world_rng.randrange(n)
                    if phase[g] == _IDLE and planners[g].forced_retry_after(next_forced) is None:
                        due[g] = _INF
                        start_bootstrap(g, next_forced)
                    next_forced += world_rng.expovariate(forced_rate)
                next_global = min(events[ev][0] if ev < n_events else _INF, next_forced)
            i = 0
            while i < len(current):
                g = current[i]
                i += 1
                now = due[g]
                if now == _INF or int((now - origin) * inv_tick) > tick:
                    continue  # stale: the gateway was rescheduled since
                due[g] = _INF
                ph = phase[g]
                if ph == _IDLE:
                    settle(g, now)
                elif ph == _SEND2:
                    send_second(g, now)
                elif ph == _SUCCESS:
                    succeeded(g, now)
                elif ph == _FAILURE:
                    failed(g, now)
                elif ph == _SEND1:
                    send_first(g, now)
                elif ph == _BOOT:
                    boot(g, now)

        # --- figures ---
        in_flight = 0
        keyed = 0
        for g in range(n):
            if phase[g] in (_OFF, _BOOT):
                continue
            if phase[g] != _IDLE:
                in_flight += 1
            if key_until[g] >= end:
                keyed += 1
            else:
                keyless_episode(g, max(key_until[g], up_since[g]), end)
        keyless: list[int] = []
        level = 0
        for m in range(minutes - 1):
            level += keyless_delta[m]
            keyless.append(level)
        last = minutes - 1
        result = FleetResult(
            params=p,
            capacity=self.capacity,
            steady_rate_expected=self.steady_rate_expected,
            figures={},
            requests=requests[:last],
            refused=refused[:last],
            unanswered=unanswered[:last],
            keyless=keyless,
            traces=traces,
            bootstraps=counters[_BOOTSTRAPS],
            successes=counters[_SUCCESSES],
            failures=counters[_FAILURES],
            abandoned=counters[_ABANDONED],
            in_flight=in_flight,
            aka_runs=counters[_AKA],
            first_requests=counters[_FIRST_SENDS],
            second_requests=counters[_SECOND_SENDS],
            startup_bootstraps=counters[_STARTUP_BOOTSTRAPS],
            startup_requests=counters[_STARTUP_REQUESTS],
            resumed=counters[_RESUMED],
            keyed_at_end=keyed,
        )
        result.figures = _figures(result, longest_keyless)
        result.figures["wall_seconds"] = round(self._clock() - wall_start, 2)
        return result


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _figures(r: FleetResult, longest_keyless: list[float]) -> dict[str, float | int]:
    """The issue's figures, plus what it costs the BSF and how many gateways had to bootstrap at start."""
    p = r.params
    requests = r.requests
    window = p.disturbance()
    if window is None:
        steady, after, first = requests, requests, 0
    else:
        first = int(window[0] / MINUTE)
        steady, after = requests[:first] or requests, requests[first:] or requests
    mean = sum(steady) / len(steady) / MINUTE
    peak = max(after) / MINUTE if after else 0.0
    keyless = sorted(longest_keyless)
    figures: dict[str, float | int] = {
        "bsf_rate_mean": round(mean, 3),
        "bsf_rate_peak": round(peak, 3),
        "bsf_peak_over_mean": round(peak / mean, 3) if mean > 0 else math.inf,
        "aka_per_gateway_day": round(r.aka_runs / p.gateways / (p.hours / 24.0), 4),
        "keyless_seconds_p50": round(_percentile(keyless, 0.50), 1),
        "keyless_seconds_p99": round(_percentile(keyless, 0.99), 1),
        "keyless_seconds_max": round(keyless[-1] if keyless else 0.0, 1),
        "bsf_refused": sum(r.refused),
    }
    if window is not None:
        # What the disturbance cost the BSF: requests from its start until two lifetimes after its
        # end, above what the steady fleet sends in as long (negative: fewer than usual).
        stop = min(len(requests), math.ceil((window[1] + 2 * p.lifetime) / MINUTE))
        excess = sum(requests[first:stop]) - mean * MINUTE * (stop - first)
        figures["requests_over_steady"] = round(excess)
    figures["startup_bootstraps"] = r.startup_bootstraps
    figures["resumed_sessions"] = r.resumed
    figures["gateways_with_key_at_end"] = r.keyed_at_end
    return figures


def simulate(params: FleetParams) -> FleetResult:
    return FleetSimulation(params).run()


__all__ = [
    "SCENARIOS",
    "FleetParams",
    "FleetResult",
    "FleetSimulation",
    "simulate",
    "steady_request_rate",
]

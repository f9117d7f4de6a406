"""GBA bootstrap benchmark over the pty modem, software UICC and reference BSF on loopback HTTP.

Run: ``.venv/bin/python tests/bench/bench_bootstrap.py [--runs N]``. For GBA_ME, GBA_U and a
resynchronisation it prints what one bootstrap costs, broken down into:

* UICC: time inside the card's AUTHENTICATE (and, for GBA_U, the EF_GBABP write) over the pty;
* HTTP: time from sending each Ub request to the last byte of its answer (the BSF included);
* own CPU: CPU time of the daemon's thread (the BSF runs in another thread, the emulator too). It
  is not a share of the wall time next to the other columns: most of it is spent inside them
  (httpx and the AT codec run while HTTP and UICC are timed);
* other: wall time outside UICC and HTTP (digest, XML, KDF, event-loop scheduling);

and the counts per bootstrap against the physical minimum: 1 AUTHENTICATE and 2 HTTP exchanges
(2 and 3 after a resync). The first bootstrap of each series also opens the TCP connection.

Targets, printed with the figures: the counts at the minimum; a warm bootstrap's wall time at most
100 ms and the daemon's own CPU per bootstrap at most 20 ms on loopback with the emulated card,
which answers at once -- the daemon's share must stay small next to a real card's 0.3-2 s per
AUTHENTICATE and a real BSF's round trips.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from targets import EXACTLY, Targets

from mn_secd.aka import AkaResult, AuthContext
from mn_secd.card_identity import CardEvent, CardIdentity, GbaBootstrapParams
from mn_secd.gba.session import bootstrap
from mn_secd.gba.ub import UbClient
from mn_secd.interfaces import CardAccess
from mn_secd.naf_keys import GbaPolicy
from mn_secd.sim.bsf import ReferenceBsf
from mn_secd.sim.modem import ModemEmulator
from mn_secd.sim.profile import CardProfile, load_profile, save_profile
from mn_secd.sim.sqn import SqnState
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.world import lab_cards
from mn_secd.uicc.card import open_card
from mn_secd.uicc.options import ModemConfig

_AKA_APDU = re.compile(r'"[0-9A-F]{2}8800(?:81[0-9A-F]{2}|84[0-9A-F]{2}DD)')


@dataclass
class Timer:
    """Accumulates the duration of the calls it wraps."""

    total: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.total, self.calls = 0.0, 0


@dataclass
class TimedCard:
    """The daemon's Card, with the time spent inside the card's operations measured."""

    inner: CardAccess
    timer: Timer = field(default_factory=Timer)

    async def identity(self) -> CardIdentity:
        return await self.inner.identity()

    async def authenticate(self, rand: bytes, autn: bytes, context: AuthContext) -> AkaResult:
        return await self._timed(self.inner.authenticate(rand, autn, context))

    async def gba_naf_derivation(self, naf_id: bytes, impi: str) -> bytes:
        return await self._timed(self.inner.gba_naf_derivation(naf_id, impi))

    async def write_gba_bootstrap_params(self, btid: str, lifetime: str) -> None:
        await self._timed(self.inner.write_gba_bootstrap_params(btid, lifetime))

    async def read_gba_bootstrap_params(self) -> GbaBootstrapParams:
        return await self.inner.read_gba_bootstrap_params()

    def subscribe(self, callback: Callable[[CardEvent], None]) -> Callable[[], None]:
        return self.inner.subscribe(callback)

    async def _timed(self, operation: Any) -> Any:
        started = time.perf_counter()
        try:
            return await operation
        finally:
            self.timer.total += time.perf_counter() - started
            self.timer.calls += 1


class TimedTransport(httpx.AsyncBaseTransport):
    """httpx's own transport; each request timed until its body has been read."""

    def __init__(self, timer: Timer) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.timer = timer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        response = await self.inner.handle_async_request(request)
        body = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
        await response.aclose()
        self.timer.total += time.perf_counter() - started
        self.timer.calls += 1
        return httpx.Response(
            response.status_code, headers=response.headers, content=body, extensions=response.extensions
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class BsfThread:
    """The reference BSF on its own event loop and thread, so its CPU is not counted as ours."""

    def __init__(self, profiles: Sequence[CardProfile]) -> None:
        self.bsf = ReferenceBsf(profiles)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""

    def start(self) -> str:
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.bsf.start("127.0.0.1", 0), self.loop).result(10)
        return self.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.bsf.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Sample:
    wall: float
    uicc: float
    http: float
    cpu: float
    aka_runs: int
    requests: int


def ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1000:7.2f}"


async def series(name: str, profile: CardProfile, policy: GbaPolicy, runs: int, workdir: Path) -> list[Sample]:
    path = workdir / f"{name}.toml"
    save_profile(path, profile)
    modem = ModemEmulator(SoftUicc.from_file(path))
    port = modem.start()
    bsf = BsfThread([load_profile(path)])
    url = bsf.start()
    card = await open_card(ModemConfig(port))
    http_timer = Timer()
    timed = TimedCard(card)
    samples: list[Sample] = []
    try:
        async with UbClient(url, transport=TimedTransport(http_timer)) as ub:
            for _ in range(runs):
                modem.clear_log()
                bsf.bsf.reset_counters()
                timed.timer.reset()
                http_timer.reset()
                cpu0, wall0 = time.thread_time(), time.perf_counter()
                session = await bootstrap(timed, ub, policy)
                wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
                session.wipe()
                aka = sum(1 for line in modem.log if _AKA_APDU.search(line.upper()))
                samples.append(Sample(wall, timed.timer.total, http_timer.total, cpu, aka, bsf.bsf.requests))
                if name == "resync":  # put the card ahead of the BSF again for the next run
                    bsf.bsf.set_sqn_he(profile.effective_impi, bytes(6))
    finally:
        await card.close()
        bsf.stop()
        modem.stop()
    return samples


WALL_MS, CPU_MS = 100.0, 20.0


def report(name: str, samples: list[Sample], minimum: tuple[int, int], targets: Targets) -> None:
    warm = samples[1:] or samples
    wall = [s.wall for s in warm]
    other = [s.wall - s.uicc - s.http for s in warm]
    akas = {s.aka_runs for s in samples}
    requests = {s.requests for s in samples}
    print(
        f"{name:8} {len(warm):4}  {ms(wall)}  {ms([s.uicc for s in warm])}  {ms([s.http for s in warm])}"
        f"  {ms([s.cpu for s in warm])}  {ms(other)}   {samples[0].wall * 1000:7.2f}"
        f"   {'/'.join(map(str, sorted(akas)))} AUTHENTICATE, {'/'.join(map(str, sorted(requests)))} HTTP"
    )
    wall_ms = round(statistics.median(wall) * 1000, 2)
    cpu_ms = round(statistics.median([s.cpu for s in warm]) * 1000, 2)
    print(
        f"{'':14}wall {targets.check(f'{name} wall', wall_ms, WALL_MS, 'ms')}"
        f"  own CPU {targets.check(f'{name} own CPU', cpu_ms, CPU_MS, 'ms')}"
    )
    print(
        f"{'':14}AUTHENTICATEs {targets.check(f'{name} AUTHENTICATEs', max(akas), minimum[0], compare=EXACTLY)}"
        f"  HTTP exchanges {targets.check(f'{name} HTTP exchanges', max(requests), minimum[1], compare=EXACTLY)}"
    )


async def main(runs: int) -> None:
    first, _ = lab_cards()
    ahead = replace(first, card_state=SqnState(5, (1 << 20,) * 32))
    cases = [
        ("gba-me", first, GbaPolicy.GBA_ME_ONLY, (1, 2)),
        ("gba-u", first, GbaPolicy.GBA_U_ONLY, (1, 2)),
        ("resync", ahead, GbaPolicy.GBA_ME_ONLY, (2, 3)),
    ]
    targets = Targets()
    print(f"one bootstrap, medians over {runs - 1} warm runs, milliseconds")
    print("mode     runs     wall     UICC     HTTP  own CPU    other     cold   counts per bootstrap")
    with tempfile.TemporaryDirectory() as tmp:
        for name, profile, policy, minimum in cases:
            report(name, await series(name, profile, policy, runs, Path(tmp)), minimum, targets)
    print(targets.summary())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="bootstraps per mode (default 20)")
    asyncio.run(main(max(2, parser.parse_args().runs)))

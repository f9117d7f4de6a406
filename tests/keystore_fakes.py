"""In-memory stand-ins for the keystore's card and Ub client, and a clock the test moves by hand.

The keystore tests (tests/unit/test_keystore*.py) and the fleet simulation's tests run the real
:class:`~mn_secd.gba.keystore.KeyStore` over these; the integration tests run the real pty modem,
software UICC and BSF instead. The fakes count AUTHENTICATEs and Ub runs so that single-flight, the
rate limit and the back-off can be checked exactly.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from datetime import UTC, datetime

from mn_secd.aka import AkaResult, AkaSuccess, AuthContext
from mn_secd.card_identity import Application, CardEvent, CardIdentity
from mn_secd.clock import Clock
from mn_secd.errors import BsfUnreachable
from mn_secd.gba.kdf import ks_naf
from mn_secd.gba.ub import AkaCallback, UbResult
from mn_secd.naf_keys import GbaMode


def identity(n: int = 1, *, gba_u: bool = False) -> CardIdentity:
    imsi = f"00101000000000{n}"
    return CardIdentity(
        iccid=f"8988211000000000001{n}",
        imsi=imsi,
        mnc_length=2,
        impi=f"{imsi}@ims.mnc001.mcc001.3gppnetwork.org",
        application=Application.USIM,
        aid=bytes.fromhex("a0000000871002ffffffff8907090000"),
        gba_u=gba_u,
        transport="csim",
    )


class FakeClock:
    """A clock that moves only when a test moves it; sleepers wake when :meth:`advance` passes their time."""

    def __init__(self, start: float = 1_900_000_000.0) -> None:
        self.now = start
        self._advanced = asyncio.Event()

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        while self.now < until:
            self._advanced.clear()
            await self._advanced.wait()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._advanced.set()


class FakeCard:
    """A card whose AKA always succeeds; CK/IK depend on RAND. GBA_U derivation uses the last DD."""

    def __init__(self, ident: CardIdentity) -> None:
        self.ident = ident
        self.authenticates: list[AuthContext] = []
        self.derivations: list[bytes] = []
        self.gbabp: list[tuple[str, str]] = []
        self.subscribers: list[Callable[[CardEvent], None]] = []
        self._ks: bytes | None = None
        self._rand: bytes | None = None
        self.delay = 0.0

    @staticmethod
    def keys(rand: bytes) -> tuple[bytes, bytes]:
        return bytes(b ^ 0x11 for b in rand), bytes(b ^ 0x22 for b in rand)

    async def identity(self) -> CardIdentity:
        return self.ident

    async def authenticate(self, rand: bytes, autn: bytes, context: AuthContext) -> AkaResult:
        self.authenticates.append(context)
        await asyncio.sleep(self.delay)
        ck, ik = self.keys(rand)
        if context is AuthContext.GBA:
            self._ks, self._rand = ck + ik, rand
            return AkaSuccess(b"\x01" * 8)
        return AkaSuccess(b"\x01" * 8, ck, ik)

    async def gba_naf_derivation(self, naf: bytes, impi: str) -> bytes:
        self.derivations.append(naf)
        await asyncio.sleep(0)
        assert self._ks is not None and self._rand is not None
        return ks_naf(self._ks, self._rand, impi, naf)

    async def write_gba_bootstrap_params(self, btid: str, lifetime: str) -> None:
        self.gbabp.append((btid, lifetime))

    def subscribe(self, callback: Callable[[CardEvent], None]) -> Callable[[], None]:
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)

    def emit(self, event: CardEvent) -> None:
        for cb in list(self.subscribers):
            cb(event)


class FakeUb:
    """Stands in for UbClient.run: one AKA run per bootstrap, a fresh RAND each time."""

    def __init__(self, clock: Clock, lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.runs: list[str] = []
        self.fail_with: Exception | None = None  # before the card runs AUTHENTICATE
        self.fail_after_aka: Exception | None = None  # once it has
        self.delay = 0.0

    async def run(self, ident: CardIdentity, aka: AkaCallback, *, mode: GbaMode) -> UbResult:
        self.runs.append(ident.impi)
        await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        rand = len(self.runs).to_bytes(16, "big")
        outcome = await aka(rand, bytes(16))
        assert isinstance(outcome, AkaSuccess)
        if self.fail_after_aka is not None:
            raise self.fail_after_aka
        expires = datetime.fromtimestamp(self.clock.time() + self.lifetime, UTC)
        btid = base64.b64encode(rand).decode() + "@bsf.test"
        return UbResult(btid, expires, rand, outcome, aka_runs=1, http_requests=2)


class FlakyUb(FakeUb):
    """The BSF does not answer from ``down_from`` until ``down_until`` (clock seconds); records when
    each run started."""

    def __init__(self, clock: Clock, down_until: float, lifetime: float = 3600.0) -> None:
        super().__init__(clock, lifetime)
        self.down_until = down_until
        self.down_from = -1.0
        self.starts: list[float] = []

    async def run(self, ident: CardIdentity, aka: AkaCallback, *, mode: GbaMode) -> UbResult:
        now = self.clock.time()
        self.starts.append(now)
        self.fail_with = BsfUnreachable("down") if self.down_from <= now < self.down_until else None
        return await super().run(ident, aka, mode=mode)

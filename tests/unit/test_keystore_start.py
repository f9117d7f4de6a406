"""The keystore at start-up: resuming the last run's session, or the first bootstrap after the start jitter.

The card and the Ub client are in-memory stand-ins that count AUTHENTICATEs and Ub runs (the daemon
tests in tests/integration/test_session_continuity.py do the same over the pty, the reference BSF
and systemd-creds); the session is kept by a real :class:`SessionKeeper` in a temporary directory.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from keystore_fakes import FakeClock, identity
from virtual_time import VirtualTimeLoop, on_virtual_time

from mn_secd.aka import AkaResult, AkaSuccess, AuthContext
from mn_secd.card_identity import CardEvent, CardEventKind, CardIdentity, GbaBootstrapParams
from mn_secd.clock import Clock
from mn_secd.gba.kdf import ks_naf
from mn_secd.gba.keystore import KeyStore
from mn_secd.gba.planner import BootstrapTiming, StartAction
from mn_secd.gba.session_store import RECORD_FILE, SessionKeeper, StateDirectory
from mn_secd.gba.ub import AkaCallback, UbResult
from mn_secd.naf_keys import GbaMode, GbaPolicy
from mn_secd.ua import UaId

DTLS = UaId.dtls_psk()
NAF = "in-cse.example.net"


class GbaCard:
    """A GBA_U card: AUTHENTICATE in the GBA context replaces Ks and writes RAND into EF_GBABP; the
    card keeps both across daemon runs, like a real one."""

    def __init__(self, ident: CardIdentity) -> None:
        self.ident = ident
        self.authenticates = 0
        self.derivations = 0
        self.ks: bytes | None = None
        self.gbabp = GbaBootstrapParams(b"", "", "")
        self.subscribers: list[Callable[[CardEvent], None]] = []
        self.slow_read = asyncio.Event()  # EF_GBABP answers once this is set
        self.slow_read.set()

    async def identity(self) -> CardIdentity:
        return self.ident

    async def authenticate(self, rand: bytes, autn: bytes, context: AuthContext) -> AkaResult:
        assert context is AuthContext.GBA
        self.authenticates += 1
        self.ks = bytes(b ^ 0x5A for b in rand * 2)
        self.gbabp = GbaBootstrapParams(rand, self.gbabp.btid, self.gbabp.lifetime)
        return AkaSuccess(b"\x01" * 8)

    async def gba_naf_derivation(self, naf: bytes, impi: str) -> bytes:
        self.derivations += 1
        assert self.ks is not None
        return ks_naf(self.ks, self.gbabp.rand, impi, naf)

    async def write_gba_bootstrap_params(self, btid: str, lifetime: str) -> None:
        self.gbabp = GbaBootstrapParams(self.gbabp.rand, btid, lifetime)

    async def read_gba_bootstrap_params(self) -> GbaBootstrapParams:
        await self.slow_read.wait()
        return self.gbabp

    def subscribe(self, callback: Callable[[CardEvent], None]) -> Callable[[], None]:
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)


class Ub:
    """One AKA run per bootstrap, a fresh RAND each time, and a B-TID that is not base64(RAND)."""

    def __init__(self, clock: Clock, lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.runs: list[float] = []

    async def run(self, ident: CardIdentity, aka: AkaCallback, *, mode: GbaMode) -> UbResult:
        self.runs.append(self.clock.time())
        rand = os.urandom(16)
        outcome = await aka(rand, bytes(16))
        assert isinstance(outcome, AkaSuccess)
        expires = datetime.fromtimestamp(self.clock.time() + self.lifetime, UTC)
        btid = base64.b32encode(os.urandom(10)).decode() + "@bsf.test"
        return UbResult(btid, expires, rand, outcome, aka_runs=1, http_requests=2)


def keeper(tmp_path: Path) -> SessionKeeper:
    return SessionKeeper(StateDirectory.open(tmp_path / "state"))


async def settled(store: KeyStore) -> None:
    """Until what the store asked its keeper to do has reached the disk."""
    assert store._keeper is not None
    await asyncio.wait_for(store._keeper.aclose(), 10)


# --- resuming ------------------------------------------------------------------------------------------


async def test_a_restart_resumes_the_gba_u_session_without_authenticate_or_bsf(tmp_path: Path) -> None:
    clock, card = FakeClock(), GbaCard(identity(gba_u=True))
    ub = Ub(clock)
    first = KeyStore(card, ub, timing=BootstrapTiming(start_jitter=0.0), clock=clock, keeper=keeper(tmp_path))
    assert (await first.start()).action is StartAction.BOOTSTRAP
    before = await first.get_key(NAF, DTLS)
    await settled(first)
    await first.close()  # a stop, not the end of the session: it stays on disk
    assert os.listdir(tmp_path / "state") == [RECORD_FILE]

    clock.advance(600.0)
    second = KeyStore(card, ub, clock=clock, keeper=keeper(tmp_path), rng=random.Random(3))
    decision = await second.start()
    assert decision.action is StartAction.RESUME
    after = await second.get_key(NAF, DTLS)
    assert (after.btid, after.key, after.expires, after.gba_mode) == (
        before.btid,
        before.key,
        before.expires,
        GbaMode.GBA_U,
    )
    assert (card.authenticates, len(ub.runs), second.bootstraps) == (1, 1, 0)
    assert second.status().bootstrapped and second.status().btid == before.btid
    # Refreshed as a session just bootstrapped would be: between half and two thirds of its lifetime.
    assert clock.now - 600 + 0.5 * 3600 <= decision.at <= clock.now - 600 + 0.67 * 3600 + 1
    await second.close()


async def test_a_bootstrap_cut_off_after_the_cards_authenticate_is_not_resumed(tmp_path: Path) -> None:
    clock, card = FakeClock(), GbaCard(identity(gba_u=True))
    ub = Ub(clock)
    first = KeyStore(card, ub, timing=BootstrapTiming(start_jitter=0.0), clock=clock, keeper=keeper(tmp_path))
    await first.start()
    await first.ensure_bootstrapped()
    await settled(first)
    await first.close()
    # The next run got as far as the card's AUTHENTICATE: new Ks and RAND on the card, old B-TID.
    await card.authenticate(os.urandom(16), bytes(16), AuthContext.GBA)

    second = KeyStore(card, ub, timing=BootstrapTiming(start_jitter=0.0), clock=clock, keeper=keeper(tmp_path))
    decision = await second.start()
    assert decision.action is StartAction.BOOTSTRAP and decision.at == clock.now
    assert os.listdir(tmp_path / "state") == []  # forgotten at once
    key = await second.get_key(NAF, DTLS)
    assert len(ub.runs) == 2 and key.btid == card.gbabp.btid
    await settled(second)
    assert os.listdir(tmp_path / "state") == [RECORD_FILE]  # the new session is kept instead
    await second.close()


async def test_an_expired_session_or_another_card_is_forgotten_and_bootstrapped(tmp_path: Path) -> None:
    clock, card = FakeClock(), GbaCard(identity(gba_u=True))
    ub = Ub(clock, lifetime=600.0)
    first = KeyStore(card, ub, clock=clock, keeper=keeper(tmp_path))
    await first.ensure_bootstrapped()
    await settled(first)
    await first.close()
    clock.advance(601.0)  # the daemon was down for longer than the key lived
    second = KeyStore(card, ub, clock=clock, keeper=keeper(tmp_path))  # its bootstrap waits for the jitter
    decision = await second.start()
    assert decision.action is StartAction.BOOTSTRAP and "expired" in decision.reason
    await settled(second)
    assert os.listdir(tmp_path / "state") == []
    await second.close()

    first = KeyStore(card, ub, clock=clock, keeper=keeper(tmp_path))
    await first.ensure_bootstrapped()
    await settled(first)
    await first.close()
    other_card = GbaCard(identity(2, gba_u=True))
    other_card.gbabp, other_card.ks = card.gbabp, card.ks  # even one whose EF_GBABP looks the same
    swapped = KeyStore(other_card, ub, clock=clock, keeper=keeper(tmp_path))
    decision = await swapped.start()
    assert decision.action is StartAction.BOOTSTRAP
    await settled(swapped)
    assert os.listdir(tmp_path / "state") == []
    await swapped.close()


async def test_the_kept_session_ends_with_the_card_in_the_running_daemon(tmp_path: Path) -> None:
    clock, card = FakeClock(), GbaCard(identity(gba_u=True))
    store = KeyStore(card, Ub(clock), clock=clock, keeper=keeper(tmp_path))
    await store.ensure_bootstrapped()
    await settled(store)
    assert os.listdir(tmp_path / "state") == [RECORD_FILE]
    for callback in list(card.subscribers):
        callback(CardEvent(CardEventKind.REMOVED))
    await settled(store)
    assert os.listdir(tmp_path / "state") == []
    await store.close()


async def test_a_key_asked_for_while_the_start_decides_waits_for_the_resumed_session(tmp_path: Path) -> None:
    clock, card = FakeClock(), GbaCard(identity(gba_u=True))
    ub = Ub(clock)
    first = KeyStore(card, ub, clock=clock, keeper=keeper(tmp_path))
    before = await first.get_key(NAF, DTLS)
    await settled(first)
    await first.close()

    card.slow_read.clear()
    second = KeyStore(card, ub, clock=clock, keeper=keeper(tmp_path))
    starting = asyncio.create_task(second.start())
    asking = asyncio.create_task(second.get_key(NAF, DTLS))
    await asyncio.sleep(0.05)
    assert not asking.done() and ub.runs == [ub.runs[0]]  # neither answered nor bootstrapping
    card.slow_read.set()
    assert (await starting).action is StartAction.RESUME
    assert (await asking).key == before.key and len(ub.runs) == 1
    await second.close()


async def test_a_card_removed_while_the_start_decides_resumes_nothing(tmp_path: Path) -> None:
    clock, card = FakeClock(), GbaCard(identity(gba_u=True))
    first = KeyStore(card, Ub(clock), clock=clock, keeper=keeper(tmp_path))
    await first.ensure_bootstrapped()
    await settled(first)
    await first.close()

    card.slow_read.clear()
    second = KeyStore(card, Ub(clock), clock=clock, keeper=keeper(tmp_path))
    starting = asyncio.create_task(second.start())
    await asyncio.sleep(0.05)
    for callback in list(card.subscribers):
        callback(CardEvent(CardEventKind.REMOVED))
    card.slow_read.set()
    assert (await starting).action is StartAction.BOOTSTRAP
    assert not second.status().bootstrapped
    await settled(second)
    assert os.listdir(tmp_path / "state") == []
    await second.close()


async def test_a_session_of_a_mode_the_policy_no_longer_gives_is_forgotten(tmp_path: Path) -> None:
    clock, card = FakeClock(), GbaCard(identity(gba_u=True))
    first = KeyStore(card, Ub(clock), clock=clock, keeper=keeper(tmp_path))
    await first.ensure_bootstrapped()
    await settled(first)
    await first.close()
    now_me_only = KeyStore(card, Ub(clock), GbaPolicy.GBA_ME_ONLY, clock=clock, keeper=keeper(tmp_path))
    assert (await now_me_only.start()).action is StartAction.BOOTSTRAP
    await settled(now_me_only)
    assert os.listdir(tmp_path / "state") == []
    await now_me_only.close()


# --- the start jitter ----------------------------------------------------------------------------------


def test_with_nothing_to_resume_the_first_bootstrap_waits_for_the_start_jitter() -> None:
    async def scenario(loop: VirtualTimeLoop) -> None:
        clock = loop.clock()
        t0 = clock.time()
        ub = Ub(clock)
        store = KeyStore(GbaCard(identity(gba_u=True)), ub, clock=clock, rng=random.Random(11))  # start_jitter 600 s
        decision = await store.start()
        assert decision.action is StartAction.BOOTSTRAP and t0 < decision.at <= t0 + 600.0
        await asyncio.sleep(decision.at - t0 - 1.0)
        assert ub.runs == []
        await asyncio.sleep(2.0)
        assert ub.runs == [pytest.approx(decision.at)] and store.status().bootstrapped
        await store.close()

    on_virtual_time(scenario)


def test_an_ae_asking_meanwhile_or_already_waiting_bootstraps_at_once() -> None:
    async def scenario(loop: VirtualTimeLoop) -> None:
        clock = loop.clock()
        t0 = clock.time()
        ub = Ub(clock)
        store = KeyStore(GbaCard(identity(gba_u=True)), ub, clock=clock, rng=random.Random(11))
        decision = await store.start()
        await asyncio.sleep(5.0)
        await store.get_key(NAF, DTLS)  # an AE does not wait for the jitter
        assert ub.runs == [t0 + 5.0]
        await asyncio.sleep(decision.at - t0 + 60.0)
        assert ub.runs == [t0 + 5.0]  # and the jitter's bootstrap does not come on top
        await store.close()

        waiting = KeyStore(GbaCard(identity(gba_u=True)), Ub(clock), clock=clock)
        decision = await waiting.start(ae_waiting=True)
        assert decision.at == clock.time()
        await asyncio.sleep(0.1)
        assert waiting.status().bootstrapped
        await waiting.close()

    on_virtual_time(scenario)

"""The BSF's Retry-After, over the real boundaries: pty modem + software UICC, the reference BSF on
loopback HTTP answering 503 with Retry-After, and the production Ub client and keystore.

Requests are counted by the BSF itself, so "no extra request" means what the BSF saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from mn_secd.errors import BsfAskedToWait, BsfServerError
from mn_secd.gba.keystore import KeyStore
from mn_secd.gba.planner import BootstrapTiming
from mn_secd.gba.ub import UbClient
from mn_secd.naf_keys import GbaPolicy, KeyEvent, KeyEventKind
from mn_secd.sim.bsf import ReferenceBsf
from mn_secd.sim.world import SimulatedWorld
from mn_secd.ua import UaId
from mn_secd.uicc.card import open_card
from mn_secd.uicc.options import ModemConfig

NAF = "in-cse.mn-secd.example"
DTLS = UaId.dtls_psk()
MakeStore = Callable[..., Any]


def bsf_of(world: SimulatedWorld) -> ReferenceBsf:
    assert world.bsf is not None
    return world.bsf


@pytest.fixture
async def make_store(world: SimulatedWorld) -> AsyncIterator[MakeStore]:
    """``await make_store(ub_options, timing)``: the daemon's stack on the world; closed after the test."""
    stack = contextlib.AsyncExitStack()

    async def make(ub: dict[str, Any], **timing: float) -> tuple[KeyStore, list[KeyEvent]]:
        card = await asyncio.wait_for(open_card(ModemConfig(str(world.modem_link), command_timeout=5.0)), 30)
        stack.push_async_callback(card.close)
        client = UbClient(world.bsf_url, **{"backoff": 0.01, "max_backoff": 0.02, **ub})
        stack.push_async_callback(client.aclose)
        store = KeyStore(card, client, GbaPolicy.GBA_ME_ONLY, timing=BootstrapTiming(**timing))
        stack.push_async_callback(store.close)
        events: list[KeyEvent] = []
        store.subscribe(events.append)
        bsf_of(world).reset_counters()
        return store, events

    async with stack:
        yield make


async def refreshed(events: list[KeyEvent], timeout: float) -> float:
    """Wait for the keystore's next new session; the wall-clock time it came."""
    async with asyncio.timeout(timeout):
        while not any(e.kind is KeyEventKind.REFRESHED for e in events):
            await asyncio.sleep(0.02)
    return time.time()


async def test_the_ub_client_retries_no_sooner_than_the_bsf_asked(world: SimulatedWorld, make_store: MakeStore) -> None:
    """Retry-After fits in the attempt's budget: the client's own quick retry waits for it."""
    store, _ = await make_store({"timeout": 5.0, "retries": 3})
    bsf = bsf_of(world)
    bsf.busy_responses, bsf.retry_after = 1, "1"
    started = time.monotonic()
    assert (await store.get_key(NAF, DTLS)).btid == bsf.last_btid
    assert time.monotonic() - started >= 1.0  # the client's own back-off would have been 10-20 ms
    assert (bsf.busy, bsf.requests) == (1, 3)  # the 503, then challenge and answer: nothing in between


@pytest.mark.parametrize("form", ["delay-seconds", "http-date"])
async def test_the_keystore_waits_what_the_bsf_asked_and_aes_do_not_reach_the_bsf(
    world: SimulatedWorld, make_store: MakeStore, form: str
) -> None:
    """Retry-After longer than the attempt's budget: the bootstrap fails with it, and until then
    neither a key request nor a forced bootstrap sends anything to the BSF; the keystore's own retry
    comes after it (its own back-off would have been 50-100 ms)."""
    store, events = await make_store({"timeout": 1.0, "retries": 3}, failure_backoff=0.1, max_failure_backoff=30.0)
    bsf = bsf_of(world)
    started = time.time()
    asked = 2.0
    if form == "http-date":  # whole seconds: at least 2 s from now
        bsf.retry_after = format_datetime(datetime.fromtimestamp(int(started) + 3, UTC), usegmt=True)
        asked = int(started) + 3 - started
    else:
        bsf.retry_after = "2"
    bsf.busy_responses = 1
    with pytest.raises(BsfServerError) as first:
        await store.get_key(NAF, DTLS)
    assert first.value.status == 503 and first.value.retry_after is not None
    assert asked - 1.0 < first.value.retry_after <= asked + 0.1
    assert bsf.requests == 1  # 2 s do not fit in the 1 s budget: no quick retry either
    with pytest.raises(BsfAskedToWait) as waiting:
        await store.get_key(NAF, DTLS)
    assert 0 < waiting.value.remaining <= asked and waiting.value.until.timestamp() >= started + asked - 1.0
    with pytest.raises(BsfAskedToWait):
        await store.force_bootstrap()
    assert bsf.requests == 1
    came = await refreshed(events, timeout=10.0)
    assert came - started >= asked - 0.05, came - started
    assert (bsf.busy, bsf.requests, bsf.successes) == (1, 3, 1)


async def test_a_huge_retry_after_is_capped(world: SimulatedWorld, make_store: MakeStore) -> None:
    """A broken or hostile BSF asking for years: the wait is our own longest back-off, 1.5 s here."""
    store, events = await make_store({"timeout": 1.0, "retries": 0}, failure_backoff=0.1, max_failure_backoff=1.5)
    bsf = bsf_of(world)
    bsf.busy_responses, bsf.retry_after = 1, "999999999999"
    started = time.time()
    with pytest.raises(BsfServerError):
        await store.get_key(NAF, DTLS)
    assert store.planner.blocked_until is not None and store.planner.blocked_until - started <= 1.6
    came = await refreshed(events, timeout=6.0)
    assert 1.4 <= came - started < 4.0, came - started
    assert bsf.requests == 3


async def test_an_unusable_retry_after_is_ignored_and_logged_once(
    world: SimulatedWorld, make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage, twice: our own back-off applies (the retry comes within a second), one log line."""
    store, events = await make_store({"timeout": 1.0, "retries": 0}, failure_backoff=0.2, max_failure_backoff=0.4)
    bsf = bsf_of(world)
    bsf.busy_responses, bsf.retry_after = 2, "soon"
    caplog.set_level(logging.WARNING, logger="mn_secd.gba.ub")
    started = time.time()
    with pytest.raises(BsfServerError) as first:
        await store.get_key(NAF, DTLS)
    assert first.value.retry_after is None
    came = await refreshed(events, timeout=6.0)
    assert came - started < 3.0 and (bsf.busy, bsf.requests) == (2, 4)
    ignored = [r for r in caplog.records if "ignoring the BSF's Retry-After" in r.getMessage()]
    assert len(ignored) == 1, [r.getMessage() for r in ignored]
    assert getattr(ignored[0], "event", None) == "ub.retry_after_invalid"

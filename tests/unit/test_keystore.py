"""The keystore: the asyncio adapter around the planner (tests/unit/test_planner.py), over a fake card.

The card and the Ub client are in-memory stand-ins here (the integration tests run the real pty
modem, software UICC and BSF); they count AUTHENTICATEs and Ub runs so single-flight, the rate limit
and the back-off can be checked exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from keystore_fakes import FakeCard, FakeClock, FakeUb, FlakyUb, identity
from virtual_time import VirtualTimeLoop, on_virtual_time

from mn_secd.aka import AuthContext
from mn_secd.card_identity import CardEvent, CardEventKind
from mn_secd.clock import SYSTEM_CLOCK
from mn_secd.errors import BootstrapRateLimited, BsfUnreachable, GbaError, GbaModeUnavailable, UiccAbsent
from mn_secd.gba.kdf import ks_naf
from mn_secd.gba.keystore import MAX_CACHED_KEYS, KeyStore
from mn_secd.gba.planner import BootstrapTiming, Span
from mn_secd.gba.session import BootstrapSession, choose_mode
from mn_secd.naf_keys import GbaMode, GbaPolicy, KeyEvent, KeyEventKind
from mn_secd.secret import SecretBytes
from mn_secd.ua import UaId, naf_id

DTLS = UaId.dtls_psk()


def make_store(
    *, gba_u: bool = False, policy: GbaPolicy = GbaPolicy.AUTO, **timing: Any
) -> tuple[KeyStore, FakeCard, FakeUb, FakeClock, list[KeyEvent]]:
    clock = FakeClock()
    card = FakeCard(identity(gba_u=gba_u))
    ub = FakeUb(clock)
    store = KeyStore(card, ub, policy, timing=BootstrapTiming(**timing), clock=clock, rng=random.Random(1))
    events: list[KeyEvent] = []
    store.subscribe(events.append)
    return store, card, ub, clock, events


# --- the keystore ------------------------------------------------------------------------------------------


async def test_first_key_bootstraps_then_comes_from_cache() -> None:
    store, card, ub, _, events = make_store()
    key = await store.get_key("In-CSE.Example.org.", DTLS)
    nid = naf_id("in-cse.example.org", DTLS)
    ck, ik = FakeCard.keys((1).to_bytes(16, "big"))
    assert key.key == ks_naf(ck + ik, (1).to_bytes(16, "big"), card.ident.impi, nid)
    assert (key.naf_fqdn, key.naf_id, key.gba_mode) == ("in-cse.example.org", nid, GbaMode.GBA_ME)
    again = await store.get_key("in-cse.example.org", DTLS)
    assert again == key and again.key is not key.key  # each caller gets its own copy of the cached key
    other = await store.get_key("in-cse.example.org", UaId.http_digest())
    assert other.key != key.key and other.btid == key.btid
    assert len(ub.runs) == 1 and card.authenticates == [AuthContext.UMTS]
    assert events == [KeyEvent(KeyEventKind.REFRESHED, key.btid)]
    status = store.status()
    assert status.bootstrapped and status.btid == key.btid and status.gba_mode is GbaMode.GBA_ME
    await store.close()


async def test_single_flight_at_cold_start() -> None:
    store, card, ub, _, _ = make_store()
    card.delay = 0.02
    keys = await asyncio.gather(*(store.get_key(f"naf{i % 7}.example.org", DTLS) for i in range(100)))
    assert len(ub.runs) == 1 and len(card.authenticates) == 1
    assert len({k.btid for k in keys}) == 1
    await store.close()


async def test_a_cancelled_caller_does_not_cancel_the_shared_bootstrap() -> None:
    store, card, ub, _, _ = make_store()
    card.delay = 0.05
    first = asyncio.create_task(store.get_key("a.example.org", DTLS))
    second = asyncio.create_task(store.get_key("a.example.org", DTLS))
    await asyncio.sleep(0.01)
    first.cancel()
    key = await second
    assert key.btid and len(ub.runs) == 1
    await store.close()


async def test_forced_bootstrap_is_rate_limited() -> None:
    store, _, ub, clock, events = make_store(min_forced_interval=30.0)
    key1 = await store.get_key("a.example.org", DTLS)
    clock.now += 10
    with pytest.raises(BootstrapRateLimited) as info:
        await store.get_key("a.example.org", DTLS, force=True)
    assert info.value.retry_after == pytest.approx(20.0)
    assert len(ub.runs) == 1
    clock.now += 20
    key2 = await store.get_key("a.example.org", DTLS, force=True)
    assert key2.btid != key1.btid and key2.key != key1.key and len(ub.runs) == 2
    assert [e.kind for e in events] == [KeyEventKind.REFRESHED, KeyEventKind.REFRESHED]
    await store.close()


async def test_concurrent_forced_bootstraps_share_one_run() -> None:
    store, card, ub, _, _ = make_store()
    card.delay = 0.02
    await asyncio.gather(*(store.force_bootstrap() for _ in range(10)))
    assert len(ub.runs) == 1
    await store.close()


async def test_failure_stores_nothing_and_backs_off() -> None:
    store, _card, ub, clock, events = make_store(failure_backoff=10.0)
    ub.fail_with = BsfUnreachable("down")
    with pytest.raises(BsfUnreachable):
        await store.get_key("a.example.org", DTLS)
    with pytest.raises(BsfUnreachable):  # inside the back-off: no new AKA run, same error
        await store.get_key("a.example.org", DTLS)
    assert len(ub.runs) == 1
    status = store.status()
    assert not status.bootstrapped and status.btid is None and status.last_error == "bsf-unreachable: down"
    assert events == []
    with pytest.raises(BootstrapRateLimited):
        await store.force_bootstrap()
    clock.now += 10.0
    ub.fail_with = None
    await store.get_key("a.example.org", DTLS)
    assert len(ub.runs) == 2 and store.status().last_error is None
    await store.close()


async def test_unexpected_exceptions_become_typed() -> None:
    store, _, ub, _, _ = make_store()
    ub.fail_with = KeyError("bug")
    with pytest.raises(GbaError, match="KeyError"):
        await store.get_key("a.example.org", DTLS)
    await store.close()


async def test_card_removal_wipes_everything() -> None:
    store, card, ub, _clock, events = make_store()
    await store.get_key("a.example.org", DTLS)
    session = await store.ensure_bootstrapped()
    assert session.ks is not None and not session.ks.wiped
    card.emit(CardEvent(CardEventKind.REMOVED))
    assert session.ks.wiped
    assert events[-1] == KeyEvent(KeyEventKind.WIPED, session.btid)
    status = store.status()
    assert not status.card_present and not status.bootstrapped
    card.emit(CardEvent(CardEventKind.INSERTED, card.ident))
    await store.get_key("a.example.org", DTLS)
    assert len(ub.runs) == 2
    await store.close()


async def test_card_change_wipes_and_bootstraps_with_the_new_impi() -> None:
    store, card, ub, _, events = make_store()
    old = await store.get_key("a.example.org", DTLS)
    card.ident = identity(2)
    card.emit(CardEvent(CardEventKind.CHANGED, card.ident))
    assert events[-1].kind is KeyEventKind.WIPED
    new = await store.get_key("a.example.org", DTLS)
    assert ub.runs == [identity(1).impi, identity(2).impi]
    assert new.btid != old.btid
    assert store.status().impi == identity(2).impi
    await store.close()


async def test_inserted_with_another_identity_counts_as_a_change() -> None:
    store, card, _ub, _, events = make_store()
    await store.get_key("a.example.org", DTLS)
    card.emit(CardEvent(CardEventKind.INSERTED, identity(1)))  # same card: keys stay
    assert events[-1].kind is KeyEventKind.REFRESHED
    card.ident = identity(3)
    card.emit(CardEvent(CardEventKind.INSERTED, card.ident))
    assert events[-1].kind is KeyEventKind.WIPED
    await store.close()


async def test_change_during_a_bootstrap_discards_its_result() -> None:
    store, card, ub, _, _ = make_store()
    ub.delay = 0.05
    task = asyncio.create_task(store.get_key("a.example.org", DTLS))
    await asyncio.sleep(0.01)
    card.ident = identity(2)
    card.emit(CardEvent(CardEventKind.CHANGED, card.ident))
    with pytest.raises(UiccAbsent):
        await task
    assert not store.status().bootstrapped
    ub.delay = 0.0
    key = await store.get_key("a.example.org", DTLS)
    assert ub.runs[-1] == identity(2).impi and key.btid
    await store.close()


async def test_expired_session_bootstraps_again() -> None:
    store, _, ub, clock, events = make_store()
    first = await store.get_key("a.example.org", DTLS)
    clock.now += 3600.0
    second = await store.get_key("a.example.org", DTLS)
    assert second.btid != first.btid and len(ub.runs) == 2
    assert [e.kind for e in events] == [KeyEventKind.REFRESHED, KeyEventKind.WIPED, KeyEventKind.REFRESHED]
    await store.close()


async def test_close_wipes_and_refuses_further_requests() -> None:
    store, _, _, _, events = make_store()
    await store.get_key("a.example.org", DTLS)
    session = await store.ensure_bootstrapped()
    await store.close()
    assert session.ks is not None and session.ks.wiped
    assert events[-1].kind is KeyEventKind.WIPED
    with pytest.raises(GbaError, match="closed"):
        await store.get_key("a.example.org", DTLS)
    await store.close()  # idempotent


async def test_a_failing_subscriber_does_not_break_the_others() -> None:
    store, _, _, _, events = make_store()

    def bad(_: KeyEvent) -> None:
        raise RuntimeError("subscriber bug")

    store.subscribe(bad)
    seen: list[KeyEvent] = []
    unsubscribe = store.subscribe(seen.append)
    await store.get_key("a.example.org", DTLS)
    unsubscribe()
    await store.close()
    assert len(seen) == 1 and len(events) == 2


async def test_gba_u_derives_on_the_card_once_per_naf_id() -> None:
    store, card, _ub, _, _ = make_store(gba_u=True)
    keys = await asyncio.gather(*(store.get_key(f"naf{i % 3}.example.org", DTLS) for i in range(30)))
    assert card.authenticates == [AuthContext.GBA]
    assert len(card.derivations) == 3
    assert card.gbabp and card.gbabp[0][0] == keys[0].btid and card.gbabp[0][1].endswith("Z")
    session = await store.ensure_bootstrapped()
    assert session.mode is GbaMode.GBA_U and session.ks is None
    ck, ik = FakeCard.keys(session.rand)
    nid = naf_id("naf0.example.org", DTLS)
    assert next(k for k in keys if k.naf_fqdn == "naf0.example.org").key == ks_naf(
        ck + ik, session.rand, card.ident.impi, nid
    )
    await store.close()


async def test_gba_u_refresh_never_labels_a_new_card_key_with_the_old_btid() -> None:
    store, card, ub, _clock, _ = make_store(gba_u=True, min_forced_interval=0.0)
    old = await store.get_key("a.example.org", DTLS)
    ub.delay = 0.05  # the refresh holds the card while it waits for the BSF
    refresh = asyncio.create_task(store.force_bootstrap())
    await asyncio.sleep(0.01)
    during = await store.get_key("b.example.org", DTLS)  # needs a DE: must wait for the new session
    await refresh
    assert during.btid != old.btid
    session = await store.ensure_bootstrapped()
    assert during.btid == session.btid
    ck, ik = FakeCard.keys(session.rand)
    assert during.key == ks_naf(ck + ik, session.rand, card.ident.impi, naf_id("b.example.org", DTLS))
    await store.close()


async def test_gba_policy() -> None:
    assert choose_mode(identity(gba_u=True), GbaPolicy.AUTO) is GbaMode.GBA_U
    assert choose_mode(identity(gba_u=True), GbaPolicy.GBA_ME_ONLY) is GbaMode.GBA_ME
    assert choose_mode(identity(gba_u=False), GbaPolicy.AUTO) is GbaMode.GBA_ME
    store, card, ub, _, _ = make_store(gba_u=False, policy=GbaPolicy.GBA_U_ONLY)
    with pytest.raises(GbaModeUnavailable, match="UST service 68"):
        await store.get_key("a.example.org", DTLS)
    assert card.authenticates == [] and ub.runs == [] and not store.status().bootstrapped
    await store.close()


async def test_proactive_refresh_runs_on_the_real_timer() -> None:
    """The asyncio adapter sleeps until the planner's deadline: a 0.6 s lifetime refreshes by itself."""
    card = FakeCard(identity())
    ub = FakeUb(SYSTEM_CLOCK, lifetime=0.6)
    timing = BootstrapTiming(
        refresh_margin=Span(seconds=0.2), refresh_jitter=Span(seconds=0.05), min_bootstrap_interval=0.1
    )
    store = KeyStore(card, ub, timing=timing)  # the system clock by default
    refreshed = asyncio.Event()
    events: list[KeyEvent] = []

    def on_event(event: KeyEvent) -> None:
        events.append(event)
        if len(events) == 2:
            refreshed.set()

    store.subscribe(on_event)
    first = await store.get_key("a.example.org", DTLS)
    await asyncio.wait_for(refreshed.wait(), timeout=3.0)
    assert events[1].kind is KeyEventKind.REFRESHED and events[1].btid != first.btid
    assert len(ub.runs) == 2
    second = await store.get_key("a.example.org", DTLS)
    assert second.btid == events[1].btid
    await store.close()


async def test_the_key_cache_holds_max_cached_keys_and_drops_the_oldest() -> None:
    """An AE allowed ``*.example.org`` cannot grow the cache without bound; evicted keys are derived again."""
    store, card, ub, _, _ = make_store(gba_u=True)
    names = [f"naf{i}.example.org" for i in range(MAX_CACHED_KEYS + 1)]
    keys = [await store.get_key(name, DTLS) for name in names]
    assert len(card.derivations) == MAX_CACHED_KEYS + 1
    # newest first, so that no lookup puts a key back: the newest MAX_CACHED_KEYS are all cached...
    for name, key in reversed(list(zip(names, keys, strict=True))[1:]):
        assert await store.get_key(name, DTLS) == key
    assert len(card.derivations) == MAX_CACHED_KEYS + 1
    # ...and the oldest was dropped: asking again derives it again, with the same value
    again = await store.get_key(names[0], DTLS)
    assert again.key == keys[0].key and again.btid == keys[0].btid
    assert len(card.derivations) == MAX_CACHED_KEYS + 2 and len(ub.runs) == 1
    await store.close()


async def test_the_timer_sleeps_on_the_injected_clock() -> None:
    """Refresh and expiry follow the clock the keystore decides on, not the event loop's: with a
    clock that stands still nothing happens, and moving it past the deadline refreshes at once."""
    store, _, ub, clock, events = make_store(refresh_margin=Span(seconds=300.0), refresh_jitter=Span())
    first = await store.get_key("a.example.org", DTLS)
    await asyncio.sleep(0.05)
    clock.advance(3600.0 - 300.0 - 1.0)  # a second before the refresh is due
    await asyncio.sleep(0.05)
    assert len(ub.runs) == 1 and [e.kind for e in events] == [KeyEventKind.REFRESHED]
    clock.advance(1.0)
    async with asyncio.timeout(2.0):
        while len(events) < 2:
            await asyncio.sleep(0.001)
    assert events[1].kind is KeyEventKind.REFRESHED and events[1].btid != first.btid and len(ub.runs) == 2
    await store.close()


def test_secrets_stay_out_of_reprs() -> None:
    secret = SecretBytes(b"\xaa" * 32)
    session = BootstrapSession(
        iccid="1",
        impi="i",
        btid="b@x",
        rand=bytes(16),
        expires=datetime.now(UTC) + timedelta(hours=1),
        mode=GbaMode.GBA_ME,
        application_aid=b"",
        ks=secret,
    )
    assert "aa" not in repr(session).lower() and "aa" not in repr(secret).lower()
    lent = secret.lend()  # as a CoAP message holds an answer's payload
    assert lent == b"\xaa" * 32 and secret.get() == lent and secret.get() is not lent
    session.wipe()
    assert secret.wiped and repr(secret) == "SecretBytes(<wiped>)"
    assert lent == bytearray()  # the holder's view is emptied too
    with pytest.raises(ValueError):
        secret.get()
    with pytest.raises(TypeError):
        __import__("pickle").dumps(SecretBytes(b"k"))


async def test_gba_u_refresh_failing_after_authenticate_keeps_cached_keys_but_derives_nothing_new() -> None:
    """Once the card has run AUTHENTICATE its Ks may belong to no B-TID the BSF knows."""
    store, card, ub, clock, _ = make_store(gba_u=True, min_forced_interval=0.0, retry_interval=Span(seconds=10.0))
    cached = await store.get_key("a.example.org", DTLS)
    ub.fail_after_aka = BsfUnreachable("gone after the challenge")
    with pytest.raises(BsfUnreachable):
        await store.force_bootstrap()
    assert card.authenticates == [AuthContext.GBA] * 2
    assert await store.get_key("a.example.org", DTLS) == cached
    with pytest.raises(BsfUnreachable):  # a new NAF key needs a new bootstrap, which is backing off
        await store.get_key("b.example.org", DTLS)
    assert len(card.derivations) == 1 and len(ub.runs) == 2
    clock.now += 10.0
    ub.fail_after_aka = None
    fresh = await store.get_key("b.example.org", DTLS)
    assert fresh.btid != cached.btid and len(ub.runs) == 3
    await store.close()


@pytest.mark.parametrize("forced", [True, False])
async def test_gba_u_bootstrap_failing_before_authenticate_keeps_serving_new_keys(forced: bool) -> None:
    """The BSF down: the card's Ks and B-TID are still valid, so keys for new NAFs keep coming (issue 14, 5)."""
    store, card, ub, clock, _ = make_store(
        gba_u=True,
        min_forced_interval=0.0,
        retry_interval=Span(seconds=10.0),
        refresh_margin=Span(seconds=300.0),
        refresh_jitter=Span(),
    )
    cached = await store.get_key("a.example.org", DTLS)
    ub.fail_with = BsfUnreachable("down")
    if forced:
        with pytest.raises(BsfUnreachable):
            await store.force_bootstrap()
    else:  # the timer's refresh fails the same way
        clock.advance(3600.0 - 300.0)
        async with asyncio.timeout(2.0):
            while len(ub.runs) < 2:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
    assert card.authenticates == [AuthContext.GBA]  # the failed bootstrap never reached the card
    fresh = await store.get_key("b.example.org", DTLS)
    assert fresh.btid == cached.btid and len(card.derivations) == 2
    ck, ik = FakeCard.keys(card._rand or b"")
    assert fresh.key == ks_naf(ck + ik, card._rand or b"", card.ident.impi, naf_id("b.example.org", DTLS))
    status = store.status()
    assert status.bootstrapped and status.btid == cached.btid and status.last_error is not None
    await store.close()


async def test_close_during_a_bootstrap_fails_the_waiters_with_a_typed_error() -> None:
    store, card, ub, _, events = make_store()
    ub.delay = 10.0
    waiters = [asyncio.create_task(store.get_key("a.example.org", DTLS)) for _ in range(3)]
    await asyncio.sleep(0.01)
    await asyncio.wait_for(store.close(), 1.0)
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, GbaError) and "closed" in str(r) for r in results), results
    assert card.authenticates == [] and events[-1].kind is KeyEventKind.WIPED


# --- retrying by itself (on virtual time: hours of timers pass at once) -----------------------------------


def test_a_failed_first_bootstrap_is_retried_without_any_request() -> None:
    async def scenario(loop: VirtualTimeLoop) -> None:
        clock = loop.clock()
        t0 = clock.time()
        card = FakeCard(identity())
        ub = FlakyUb(clock, down_until=t0 + 1000.0)
        store = KeyStore(card, ub, clock=clock, rng=random.Random(5))
        with pytest.raises(BsfUnreachable):
            await store.ensure_bootstrapped()
        await asyncio.sleep(2000.0)  # nobody asks for a key meanwhile
        assert store.status().bootstrapped and store.status().last_error is None
        assert ub.starts[-1] >= t0 + 1000.0 and len(ub.starts) >= 5
        for n, (a, b) in enumerate(itertools.pairwise(ub.starts)):  # exponential back-off, jittered
            step = min(600.0, 5.0 * 2**n)
            assert step / 2 <= b - a <= step
        assert len(card.authenticates) == 1  # only the run the BSF answered reached the card
        await store.close()

    on_virtual_time(scenario)


def test_a_failed_refresh_is_retried_widely_then_the_key_comes_back_by_itself() -> None:
    async def scenario(loop: VirtualTimeLoop) -> None:
        clock = loop.clock()
        t0 = clock.time()
        card = FakeCard(identity())
        ub = FlakyUb(clock, down_until=t0 + 2 * 3600.0)
        ub.down_from = t0 + 60.0  # the BSF goes away after the first bootstrap, for just under 2 h
        store = KeyStore(card, ub, clock=clock, rng=random.Random(7))
        events: list[KeyEvent] = []
        store.subscribe(events.append)
        await store.ensure_bootstrapped()
        await asyncio.sleep(4 * 3600.0)
        kinds = [e.kind for e in events]
        assert kinds[:3] == [KeyEventKind.REFRESHED, KeyEventKind.WIPED, KeyEventKind.REFRESHED]
        refresh, first_retry = ub.starts[1], ub.starts[2]
        assert t0 + 0.5 * 3600 <= refresh <= t0 + 0.67 * 3600  # the planned refresh, then ...
        assert first_retry < t0 + 3600.0  # ... one more try while the key was valid
        back = next(s for s in ub.starts if s >= t0 + 2 * 3600.0)  # the run that got the key back
        assert back <= t0 + 2 * 3600.0 + 0.5 * 3600  # within one retry interval of the BSF's return
        keyless_retries = [s for s in ub.starts if t0 + 3600.0 < s <= back]
        assert len(keyless_retries) >= 2
        for a, b in itertools.pairwise(keyless_retries):
            assert 0.25 * 3600 <= b - a <= 0.5 * 3600  # keyless: 50-100 % of half the lifetime
        await store.close()

    on_virtual_time(scenario)


def test_a_failure_time_will_not_mend_is_not_retried_by_itself() -> None:
    async def scenario(loop: VirtualTimeLoop) -> None:
        clock = loop.clock()
        card = FakeCard(identity(gba_u=False))
        ub = FlakyUb(clock, down_until=0.0)
        store = KeyStore(card, ub, GbaPolicy.GBA_U_ONLY, clock=clock)
        with pytest.raises(GbaModeUnavailable):
            await store.ensure_bootstrapped()
        await asyncio.sleep(24 * 3600.0)
        assert ub.starts == [] and card.authenticates == []
        await store.close()

    on_virtual_time(scenario)


# --- short key lifetimes ----------------------------------------------------------------------------------------


async def test_a_lifetime_shorter_than_the_interval_never_bootstraps_in_a_loop() -> None:
    """A 4 s key lifetime: no timed refresh at 2 s, and a key asked for after the expiry waits for the
    minimum interval since the last bootstrap rather than bootstrapping at once."""
    store, _, ub, clock, events = make_store(min_bootstrap_interval=10.0)
    ub.lifetime = 4.0
    first = await store.get_key("a.example.org", DTLS)
    clock.advance(5.0)  # expired
    async with asyncio.timeout(2.0):
        while not any(e.kind is KeyEventKind.WIPED for e in events):
            await asyncio.sleep(0.001)
    later = asyncio.create_task(store.get_key("a.example.org", DTLS))
    await asyncio.sleep(0.05)
    assert not later.done() and len(ub.runs) == 1
    clock.advance(5.0)  # 10 s since the first bootstrap began
    second = await asyncio.wait_for(later, 2.0)
    assert second.btid != first.btid and len(ub.runs) == 2
    await store.close()


async def test_after_a_wipe_a_key_request_is_answered_at_once_however_recent_the_last_bootstrap() -> None:
    store, card, ub, _, _ = make_store(min_bootstrap_interval=10.0)
    await store.get_key("a.example.org", DTLS)
    card.emit(CardEvent(CardEventKind.REMOVED))
    ub.fail_with = UiccAbsent("no SIM")
    with pytest.raises(UiccAbsent):
        await asyncio.wait_for(store.get_key("a.example.org", DTLS), 0.5)  # no wait for the interval
    await store.close()

"""Whole bootstraps over real boundaries: pty modem emulator + software UICC + reference BSF on loopback.

The daemon side is the production stack (``open_card`` over the pty, ``UbClient`` over httpx,
``KeyStore``); the network side is the reference BSF, whose Zn endpoint is asked over HTTP for the
keys the NAF would get. AUTHENTICATEs are counted from the emulator's command log and HTTP requests
from the BSF's counters, so "one bootstrap" means exactly what the card and the BSF saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import zn

from mn_secd.card_identity import Application, CardEvent, CardEventKind
from mn_secd.errors import (
    BsfAnswerInvalid,
    BsfRejected,
    BsfServerError,
    BsfUnreachable,
    DigestParseError,
    MnSecdError,
    NetworkAuthenticationFailure,
)
from mn_secd.gba.bsfxml import format_lifetime
from mn_secd.gba.keystore import KeyStore
from mn_secd.gba.planner import BootstrapTiming
from mn_secd.gba.ub import UbClient
from mn_secd.naf_keys import GbaMode, GbaPolicy, KeyEvent, KeyEventKind
from mn_secd.sim.bsf import GARBAGE_CHALLENGE, ReferenceBsf
from mn_secd.sim.modem import Quirks
from mn_secd.sim.profile import CardProfile
from mn_secd.sim.sqn import SqnState
from mn_secd.sim.usim import FID_ISIM_GBABP, FID_USIM_GBABP, AppKind, SoftUicc
from mn_secd.sim.world import SimulatedWorld, free_udp_port, lab_cards
from mn_secd.ua import UaId, naf_id
from mn_secd.uicc.card import Card, open_card
from mn_secd.uicc.options import ModemConfig

FAST_CARD = {"command_timeout": 5.0, "presence_poll": 0.2, "reopen_max": 0.4}
NAFS = ("in-cse.mn-secd.example", "IoT.Operator.Example.", "naf.example.org")
UAS = ("dtls-psk", "tls-psk", "http-digest", "010001c0a4")
#: AUTHENTICATE in the 3G context, or in the GBA context in bootstrapping mode (DD): one AKA run each.
#: (GBA NAF derivation, DE, is also INS 88 but runs no AKA.)
_AKA_APDU = re.compile(r'"[0-9A-F]{2}8800(?:81[0-9A-F]{2}|84[0-9A-F]{2}DD)')
_DE_APDU = re.compile(r'"[0-9A-F]{2}880084[0-9A-F]{2}DE')


@dataclass
class Rig:
    world: SimulatedWorld
    card: Card
    ub: UbClient
    store: KeyStore
    events: list[KeyEvent]

    @property
    def bsf(self) -> ReferenceBsf:
        assert self.world.bsf is not None
        return self.world.bsf

    def aka_runs(self) -> int:
        assert self.world.modem is not None
        return sum(1 for line in self.world.modem.log if _AKA_APDU.search(line.upper()))

    def naf_derivations(self) -> int:
        assert self.world.modem is not None
        return sum(1 for line in self.world.modem.log if _DE_APDU.search(line.upper()))

    def reset_counts(self) -> None:
        assert self.world.modem is not None
        self.world.modem.clear_log()
        self.bsf.reset_counters()


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Builds a world and the daemon's stack on it; everything is closed after the test."""
    stack = contextlib.AsyncExitStack()
    worlds = 0

    async def make(
        *,
        policy: GbaPolicy = GbaPolicy.AUTO,
        cards: tuple[CardProfile, ...] | None = None,
        quirks: Quirks | None = None,
        bsf_url: str | None = None,
        ub_options: dict[str, Any] | None = None,
        store_options: dict[str, Any] | None = None,
        bsf_lifetime: timedelta = timedelta(hours=1),
    ) -> Rig:
        nonlocal worlds
        worlds += 1
        world = SimulatedWorld(tmp_path / f"world{worlds}", quirks=quirks, cards=cards, bsf_lifetime=bsf_lifetime)
        await world.start()
        stack.push_async_callback(world.stop)
        card = await asyncio.wait_for(open_card(ModemConfig(str(world.modem_link), **FAST_CARD)), 30)
        stack.push_async_callback(card.close)
        options = {"timeout": 3.0, "retries": 1, "backoff": 0.01, "max_backoff": 0.02}
        options.update(ub_options or {})
        ub = UbClient(bsf_url or world.bsf_url, **options)
        stack.push_async_callback(ub.aclose)
        timing = BootstrapTiming(**{"min_forced_interval": 0.0, **(store_options or {})})
        store = KeyStore(card, ub, policy, timing=timing)
        stack.push_async_callback(store.close)
        events: list[KeyEvent] = []
        store.subscribe(events.append)
        rig = Rig(world, card, ub, store, events)
        rig.reset_counts()  # start-up traffic (identity reads) is not the bootstrap's
        return rig

    async with stack:
        yield make


def read_gbabp(card: SoftUicc, aid: bytes, application: Application) -> tuple[bytes, str, str]:
    """EF_GBABP = LV(RAND) ‖ LV(B-TID) ‖ LV(lifetime), read with plain APDUs on the basic channel."""
    fid = FID_ISIM_GBABP if application is Application.ISIM else FID_USIM_GBABP
    assert card.process_apdu(bytes([0x00, 0xA4, 0x04, 0x0C, len(aid)]) + aid)[-2:] == b"\x90\x00"
    assert card.process_apdu(bytes([0x00, 0xA4, 0x00, 0x0C, 0x02]) + fid.to_bytes(2, "big"))[-2:] == b"\x90\x00"
    answer = card.process_apdu(bytes([0x00, 0xB0, 0x00, 0x00, 200]))
    assert answer[-2:] == b"\x90\x00"
    data, fields, pos = answer[:-2], [], 0
    for _ in range(3):
        length = data[pos]
        fields.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length
    return fields[0], fields[1].decode(), fields[2].decode()


# --- full bootstraps ------------------------------------------------------------------------------------


async def test_gba_me_bootstrap_keys_match_the_zn_side(make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(policy=GbaPolicy.GBA_ME_ONLY)
    identity = await rig.card.identity()
    keys = []
    for fqdn in NAFS:
        for ua_text in UAS:
            ua = UaId.parse(ua_text)
            key = await rig.store.get_key(fqdn, ua)
            answer = await zn(rig.world.bsf_url, key.btid, fqdn, ua)
            assert answer["meKeyMaterial"] == key.key.hex(), (fqdn, ua_text)
            assert answer["impi"] == identity.impi
            assert answer["keyExpiryTime"] == format_lifetime(key.expires)
            assert key.gba_mode is GbaMode.GBA_ME and key.naf_id == naf_id(fqdn, ua)
            keys.append(key)
    assert len({k.key for k in keys}) == len(NAFS) * len(UAS)  # every NAF_Id its own key
    assert len({k.btid for k in keys}) == 1
    assert (rig.aka_runs(), rig.bsf.requests, rig.bsf.successes) == (1, 2, 1)
    assert rig.naf_derivations() == 0
    assert rig.events == [KeyEvent(KeyEventKind.REFRESHED, keys[0].btid)]


async def test_gba_u_bootstrap_keys_come_from_the_card_and_match_zn(make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(policy=GbaPolicy.AUTO)
    identity = await rig.card.identity()
    assert identity.gba_u
    keys = []
    for fqdn in NAFS:
        for ua_text in UAS[:2]:
            ua = UaId.parse(ua_text)
            key = await rig.store.get_key(fqdn, ua)
            assert key.gba_mode is GbaMode.GBA_U
            answer = await zn(rig.world.bsf_url, key.btid, fqdn, ua, gba_u_aware=True)
            assert answer["meKeyMaterial"] == key.key.hex()  # Ks_ext_NAF, computed by the card
            assert rig.world.modem is not None and isinstance(rig.world.modem.card, SoftUicc)
            kind = AppKind.ISIM if identity.application is Application.ISIM else AppKind.USIM
            assert answer["uiccKeyMaterial"] == rig.world.modem.card.ks_int_naf(key.naf_id, kind).hex()  # type: ignore[union-attr]
            keys.append(key)
    session = await rig.store.ensure_bootstrapped()
    assert session.ks is None  # the daemon never held Ks
    assert (rig.aka_runs(), rig.bsf.requests) == (1, 2)
    assert rig.naf_derivations() == len(keys)  # one DE per NAF_Id, cached afterwards
    await rig.store.get_key(NAFS[0], UaId.parse(UAS[0]))
    assert rig.naf_derivations() == len(keys)
    # EF_GBABP: RAND written by the card, B-TID and lifetime by us after the 200
    await rig.card.close()
    assert rig.world.modem is not None and isinstance(rig.world.modem.card, SoftUicc)
    rand, btid, lifetime = read_gbabp(rig.world.modem.card, identity.aid, identity.application)
    assert (rand, btid, lifetime) == (session.rand, session.btid, format_lifetime(session.expires))


async def test_resync_costs_two_authenticates_and_three_requests(make_rig: Callable[..., Any]) -> None:
    first, second = lab_cards()
    ahead = replace(first, card_state=SqnState(5, (1000,) * 32))  # the card has seen SQNs the BSF never issued
    rig: Rig = await make_rig(policy=GbaPolicy.GBA_ME_ONLY, cards=(ahead, second))
    key = await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    assert (rig.aka_runs(), rig.bsf.requests, rig.bsf.resyncs, rig.bsf.successes) == (2, 3, 1, 1)
    answer = await zn(rig.world.bsf_url, key.btid, NAFS[0], UaId.dtls_psk())
    assert answer["meKeyMaterial"] == key.key.hex()


# --- the BSF failure matrix ---------------------------------------------------------------------------------


class WrongXresBsf(ReferenceBsf):
    """A BSF whose HSS hands it a wrong XRES: our correct RES is refused (403)."""

    def _password(self, pending: Any) -> bytes:
        return b"\x00" * 8


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nobody listens here any more


@dataclass(frozen=True)
class Case:
    error: type[MnSecdError]
    aka_runs: int
    match: str | None = None
    quirks: Quirks | None = None
    ub_options: dict[str, Any] | None = None


MATRIX: dict[str, Case] = {
    "unknown-impi": Case(BsfRejected, 0, "403"),
    "wrong-res": Case(BsfRejected, 1, "403"),
    # the card answers after 1.3 s, the nonce is stale after 1.0 s and forgotten after 2.0 s
    "stale-nonce": Case(BsfRejected, 1, "stale", quirks=Quirks(auth_latency=1.3)),
    "tampered-rspauth": Case(BsfAnswerInvalid, 1, "rspauth"),
    "malformed-xml": Case(BsfAnswerInvalid, 1, "XML"),
    "lifetime-in-past": Case(BsfAnswerInvalid, 1, "past"),
    "garbage-challenge": Case(DigestParseError, 0),
    "bsf-down": Case(BsfUnreachable, 0, "cannot reach"),
    "bsf-slow": Case(BsfUnreachable, 0, "did not answer", ub_options={"timeout": 0.3, "retries": 1}),
    "wrong-network-key": Case(NetworkAuthenticationFailure, 1, "MAC"),
}


def network_side(name: str) -> ReferenceBsf | None:
    """The BSF a case needs instead of the world's own (same lab subscribers unless said otherwise)."""
    first, second = lab_cards()
    if name == "unknown-impi":
        return ReferenceBsf([second])
    if name == "wrong-res":
        return WrongXresBsf([first, second])
    if name == "stale-nonce":  # the card takes longer than the nonce may live
        return ReferenceBsf([first, second], nonce_ttl=1.0)
    if name == "wrong-network-key":  # an impostor BSF: the card refuses its AUTN
        return ReferenceBsf([replace(first, k=bytes(16)), second])
    return None


@pytest.mark.parametrize("name", list(MATRIX))
async def test_bsf_failure_matrix(name: str, make_rig: Callable[..., Any]) -> None:
    case = MATRIX[name]
    other = network_side(name)
    url = closed_port_url() if name == "bsf-down" else None
    if other is not None:
        url = await other.start("127.0.0.1", 0)
    try:
        rig: Rig = await make_rig(quirks=case.quirks, ub_options=case.ub_options, bsf_url=url)
        rig.bsf.tamper_rspauth = name == "tampered-rspauth"
        rig.bsf.malformed_xml = name == "malformed-xml"
        rig.bsf.lifetime_in_past = name == "lifetime-in-past"
        rig.bsf.garbage_challenge = GARBAGE_CHALLENGE if name == "garbage-challenge" else None
        rig.bsf.delay = 5.0 if name == "bsf-slow" else 0.0
        started = time.monotonic()
        with pytest.raises(case.error, match=case.match) as info:
            await rig.store.get_key(NAFS[0], UaId.dtls_psk())
        assert time.monotonic() - started < 5.0
        assert rig.aka_runs() == case.aka_runs  # an AUTHENTICATE is never repeated for a challenge
        status = rig.store.status()
        assert not status.bootstrapped and status.btid is None and status.expires is None
        assert status.last_error is not None and status.last_error.startswith(info.value.kind)
        assert rig.events == []  # nothing stored, nothing announced
        # Within the back-off the same failure comes back without another AKA run.
        with pytest.raises(case.error):
            await rig.store.get_key(NAFS[1], UaId.dtls_psk())
        assert rig.aka_runs() == case.aka_runs
    finally:
        if other is not None:
            await other.stop()


# --- BSFs in the field ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("require", [False, True])
async def test_a_200_without_authentication_info_follows_require_rspauth(
    require: bool, make_rig: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 2617 makes Authentication-Info optional; by default a missing one is accepted with a warning."""
    rig: Rig = await make_rig(policy=GbaPolicy.GBA_ME_ONLY, ub_options={"require_rspauth": require})
    rig.bsf.omit_authentication_info = True
    if require:
        with pytest.raises(BsfAnswerInvalid, match="without rspauth"):
            await rig.store.get_key(NAFS[0], UaId.dtls_psk())
        assert rig.aka_runs() == 1 and not rig.store.status().bootstrapped
        return
    key = await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    assert (await zn(rig.world.bsf_url, key.btid, NAFS[0], UaId.dtls_psk()))["meKeyMaterial"] == key.key.hex()
    status = rig.store.status()
    assert status.bootstrapped and status.warning is not None and "rspauth" in status.warning
    assert any(r.levelname == "WARNING" and "no rspauth" in r.getMessage() for r in caplog.records)
    # a BSF that authenticates its next answer clears the warning
    rig.bsf.omit_authentication_info = False
    await rig.store.force_bootstrap()
    assert rig.store.status().warning is None


@pytest.mark.parametrize("require", [False, True])
async def test_a_wrong_rspauth_always_fails(require: bool, make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(policy=GbaPolicy.GBA_ME_ONLY, ub_options={"require_rspauth": require})
    rig.bsf.tamper_rspauth = True
    with pytest.raises(BsfAnswerInvalid, match="rspauth is wrong"):
        await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    assert not rig.store.status().bootstrapped and rig.events == []


@pytest.mark.parametrize("length", [4, 6, 12, 16])
@pytest.mark.parametrize("policy", [GbaPolicy.GBA_ME_ONLY, GbaPolicy.GBA_U_ONLY])
async def test_res_of_4_to_16_octets_end_to_end(length: int, policy: GbaPolicy, make_rig: Callable[..., Any]) -> None:
    """TS 33.102 allows RES of 32 to 128 bits: card, daemon and BSF carry any of them (AKAv1: RES is the password)."""
    first, second = lab_cards()
    rig: Rig = await make_rig(policy=policy, cards=(replace(first, res_length=length), second))
    key = await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    answer = await zn(rig.world.bsf_url, key.btid, NAFS[0], UaId.dtls_psk(), gba_u_aware=True)
    assert answer["meKeyMaterial"] == key.key.hex()
    assert (rig.aka_runs(), rig.bsf.successes, rig.bsf.rejections) == (1, 1, 0)


@pytest.mark.parametrize("policy", [GbaPolicy.GBA_ME_ONLY, GbaPolicy.GBA_U_ONLY])
async def test_a_btid_that_is_not_base64_rand_is_taken_as_it_is(
    policy: GbaPolicy, make_rig: Callable[..., Any]
) -> None:
    """The B-TID names the bootstrap for the NAF; the daemon takes RAND from the challenge, not from it."""
    rig: Rig = await make_rig(policy=policy)
    rig.bsf.opaque_btids = True
    key = await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    assert key.btid == rig.bsf.last_btid and "==" not in key.btid
    answer = await zn(rig.world.bsf_url, key.btid, NAFS[0], UaId.dtls_psk(), gba_u_aware=True)
    assert answer["meKeyMaterial"] == key.key.hex()


async def test_a_hanging_bsf_costs_one_http_timeout_whatever_the_retries(make_rig: Callable[..., Any]) -> None:
    """http_timeout is the budget of a whole bootstrap attempt: retries of the first request included."""
    rig: Rig = await make_rig(
        policy=GbaPolicy.GBA_ME_ONLY, ub_options={"timeout": 1.0, "retries": 3, "backoff": 0.1, "max_backoff": 0.2}
    )
    rig.bsf.delay = 30.0  # accepts the connection, never answers (in time)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BsfUnreachable, match="budget"):
        await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    elapsed = loop.time() - started
    assert 0.9 <= elapsed < 1.6, elapsed  # one budget, not 4 x 1 s plus the pauses
    assert rig.aka_runs() == 0


async def test_a_bsf_answering_500_is_a_retryable_server_error(make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(policy=GbaPolicy.GBA_ME_ONLY, ub_options={"retries": 1})
    rig.bsf.busy_status, rig.bsf.busy_responses = 500, 2
    with pytest.raises(BsfServerError) as info:
        await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    assert info.value.status == 500 and rig.bsf.requests == 2 and rig.aka_runs() == 0


async def test_gba_u_forced_bootstrap_failing_before_authenticate_keeps_serving_new_keys(
    make_rig: Callable[..., Any],
) -> None:
    """The BSF busy when an AE forces a re-bootstrap: the card's Ks and B-TID are still valid (issue 14, 5)."""
    rig: Rig = await make_rig(policy=GbaPolicy.GBA_U_ONLY, ub_options={"retries": 1})
    old = await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    rig.bsf.busy_responses = 10
    with pytest.raises(BsfServerError):
        await rig.store.force_bootstrap()
    assert rig.aka_runs() == 1  # the failed bootstrap never reached the card
    new = await rig.store.get_key(NAFS[1], UaId.dtls_psk())  # a NAF not cached yet: a DE on the same Ks
    assert new.btid == old.btid and rig.naf_derivations() == 2
    answer = await zn(rig.world.bsf_url, new.btid, NAFS[1], UaId.dtls_psk(), gba_u_aware=True)
    assert answer["meKeyMaterial"] == new.key.hex()
    assert rig.store.status().bootstrapped


async def test_a_lifetime_shorter_than_refresh_margin_is_not_refreshed_in_a_loop(make_rig: Callable[..., Any]) -> None:
    """A BSF handing out 3 s keys: the refresh at half to two thirds of the lifetime would mean a
    bootstrap every 1.5 to 2 s; never sooner than min_bootstrap_interval (10 s by default) after the last."""
    rig: Rig = await make_rig(policy=GbaPolicy.GBA_ME_ONLY, bsf_lifetime=timedelta(seconds=3))
    await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    await asyncio.sleep(5.0)  # the key has expired meanwhile
    assert (rig.bsf.successes, rig.aka_runs()) == (1, 1)
    assert [e.kind for e in rig.events] == [KeyEventKind.REFRESHED, KeyEventKind.WIPED]  # it just expired


# --- concurrency and card changes ---------------------------------------------------------------------------


async def test_single_flight_at_cold_start(make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(policy=GbaPolicy.GBA_ME_ONLY)
    fqdns = [f"naf{i % 10}.example.org" for i in range(100)]
    keys = await asyncio.wait_for(asyncio.gather(*(rig.store.get_key(f, UaId.dtls_psk()) for f in fqdns)), 30)
    assert (rig.aka_runs(), rig.bsf.requests) == (1, 2)
    assert len({k.btid for k in keys}) == 1 and len({k.key for k in keys}) == 10
    assert rig.store.bootstraps == 1


async def test_uicc_swap_wipes_keys_and_bootstraps_with_the_new_impi(make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(policy=GbaPolicy.AUTO)
    first_identity = await rig.card.identity()
    old = await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    old_session = await rig.store.ensure_bootstrapped()
    card_events: asyncio.Queue[CardEvent] = asyncio.Queue()
    rig.card.subscribe(card_events.put_nowait)

    new_profile = rig.world.swap_card()
    kinds = []
    while CardEventKind.CHANGED not in kinds:
        kinds.append((await asyncio.wait_for(card_events.get(), 10)).kind)
    assert KeyEvent(KeyEventKind.WIPED, old.btid) in rig.events
    assert old_session.ks is None or old_session.ks.wiped
    assert not rig.store.status().bootstrapped

    new = await rig.store.get_key(NAFS[0], UaId.dtls_psk())
    assert new.btid != old.btid and new.key != old.key
    assert new.gba_mode is GbaMode.GBA_ME  # the second lab card has no GBA_U
    answer = await zn(rig.world.bsf_url, new.btid, NAFS[0], UaId.dtls_psk())
    assert answer["impi"] == new_profile.effective_impi != first_identity.impi
    assert answer["meKeyMaterial"] == new.key.hex()
    assert rig.store.status().impi == new_profile.effective_impi


# --- the command ---------------------------------------------------------------------------------------------


async def run_cli(*args: str) -> tuple[int, str, str]:
    """``mn-secd bootstrap`` in its own process (the world keeps serving in this one)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mn_secd",
        "bootstrap",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_bootstrap_command(tmp_path: Path) -> None:
    async with SimulatedWorld(tmp_path) as world:
        assert world.bsf is not None
        config = world.write_daemon_config([], control_port=free_udp_port())
        code, out, err = await run_cli("--config", str(config))
        assert code == 0, err
        btid = world.bsf.last_btid
        assert btid is not None
        record = world.bsf.bootstraps[btid]
        lines = out.splitlines()
        assert lines[0] == f"B-TID:   {btid}"
        assert lines[1].startswith(f"expires: {format_lifetime(record.expires)} (in ")
        assert lines[2] == "mode:    gba-u"
        assert record.ks.hex() not in out.lower() and record.ks[:16].hex() not in out.lower()

        code, out, err = await run_cli("--port", str(world.modem_link), "--bsf", world.bsf_url, "--mode", "gba-me")
        assert code == 0, err
        assert out.splitlines()[2] == "mode:    gba-me" and world.bsf.last_btid != btid

        code, out, err = await run_cli("--port", str(world.modem_link), "--bsf", closed_port_url())
        assert code == 1 and out == ""
        assert err.startswith("mn-secd bootstrap: bsf-unreachable: ") and len(err.splitlines()) == 1

        code, _, err = await run_cli("--bsf", world.bsf_url)
        assert code == 1 and "--port" in err

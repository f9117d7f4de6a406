"""The daemon's card layer, keystore, CLI and daemon with the card in a PC/SC reader: a real pcscd.

The software UICC sits in the private pcscd's vpcd reader (``conftest.pcscd``, one per test
process); the daemon side is the production stack, ``open_card`` with ``transport = "pcsc"``, the
Ub client over HTTP, the keystore, and ``mn-secd`` as a subprocess. AUTHENTICATEs are counted from
the virtual card's log (the wire between pcscd and the card), bootstraps from the reference BSF.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import LocalAes, reader_holds_card, zn

from mn_secd.aka import AkaSuccess, AuthContext
from mn_secd.card_identity import Application, CardEvent, CardEventKind
from mn_secd.errors import (
    ApplicationNotFound,
    AuthenticateOutcomeUnknown,
    Culprit,
    KeyServiceRejected,
    ReaderGone,
    UiccAbsent,
)
from mn_secd.gba.keystore import KeyStore
from mn_secd.gba.planner import BootstrapTiming
from mn_secd.gba.ub import UbClient
from mn_secd.naf_keys import GbaMode, GbaPolicy, KeyEvent, KeyEventKind
from mn_secd.sim.bsf import ReferenceBsf
from mn_secd.sim.launcher import DaemonProcess, mn_secd_command
from mn_secd.sim.milenage import Milenage, generate_autn
from mn_secd.sim.pcscd import PrivatePcscd, missing_tools
from mn_secd.sim.profile import CardProfile
from mn_secd.sim.usim import USIM_AID, AppKind, SoftUicc
from mn_secd.sim.vicc import UICC_ATR, SimCard, ViccClient, VirtualCard
from mn_secd.sim.world import DEFAULT_NAF_FQDN, SimulatedWorld, lab_cards
from mn_secd.ua import UaId
from mn_secd.uicc.card import Card, open_card
from mn_secd.uicc.options import ModemConfig
from mn_secd.uicc.pcsc import PcscTransport

_MISSING = missing_tools()
pytestmark = pytest.mark.skipif(bool(_MISSING), reason="PC/SC tools not installed: " + ", ".join(_MISSING))

READER = "mn-secd vicc 00 00"
INS_AUTHENTICATE, INS_UPDATE_BINARY, INS_READ_RECORD = 0x88, 0xD6, 0xB2
#: A card in a reader, looked for quickly after it went (the daemon's defaults are slower).
FAST = {"command_timeout": 5.0, "presence_poll": 0.2, "reopen_max": 0.5}
NAFS = ("in-cse.mn-secd.example", "naf.example.org")
UAS = ("dtls-psk", "tls-psk")
ISIM_CARD, USIM_CARD = lab_cards()


def reader_config(**options: Any) -> ModemConfig:
    return ModemConfig(transport="pcsc", reader="MN-SECD VICC 00 00", **{**FAST, **options})


@dataclass
class Rig:
    """The BSF, a virtual card in the reader, and once :meth:`open` ran, the daemon's stack on it."""

    pcscd: PrivatePcscd
    bsf: ReferenceBsf
    bsf_url: str
    vicc: ViccClient
    soft: SoftUicc  # the card first put in the reader
    stack: contextlib.AsyncExitStack
    card: Card | None = None
    store: KeyStore | None = None
    key_events: list[KeyEvent] = field(default_factory=list)
    card_events: list[CardEvent] = field(default_factory=list)

    @property
    def virtual(self) -> VirtualCard:
        return self.vicc.card

    def authenticates(self) -> int:
        return self.virtual.count(INS_AUTHENTICATE)

    async def open(self, policy: GbaPolicy = GbaPolicy.AUTO) -> KeyStore:
        await reader_holds_card(READER, True)
        card = await asyncio.wait_for(open_card(reader_config()), 30)
        self.stack.push_async_callback(card.close)
        ub = UbClient(self.bsf_url, timeout=3.0, retries=1, backoff=0.01, max_backoff=0.02)
        self.stack.push_async_callback(ub.aclose)
        store = KeyStore(card, ub, policy, timing=BootstrapTiming(min_forced_interval=0.0))
        self.stack.push_async_callback(store.close)
        store.subscribe(self.key_events.append)
        card.subscribe(self.card_events.append)
        self.card, self.store = card, store
        self.virtual.clear_log()  # start-up traffic (identity reads) is not the bootstrap's
        return store

    async def pull(self) -> None:
        self.vicc.remove()
        await reader_holds_card(READER, False)

    async def insert(self, card: VirtualCard | None = None) -> None:
        self.vicc.insert(card)
        await self.vicc.wait_connected()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.fixture
async def make_rig(pcscd: PrivatePcscd) -> AsyncIterator[Callable[..., Any]]:
    """``await make_rig(profile)``: the reference BSF knows both lab cards; ``profile`` is in the reader."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(profile: CardProfile = ISIM_CARD, wrap: Callable[[SoftUicc], SimCard] | None = None) -> Rig:
            if not pcscd.running:  # a test that stopped it failed before restarting it
                pcscd.start()
            await reader_holds_card(READER, False)  # the previous test's card has left
            bsf = ReferenceBsf([ISIM_CARD, USIM_CARD])
            bsf_url = await bsf.start("127.0.0.1", 0)
            stack.push_async_callback(bsf.stop)
            soft = SoftUicc(profile)
            card = VirtualCard(wrap(soft) if wrap is not None else soft)
            vicc = ViccClient(card, "127.0.0.1", pcscd.port, reconnect_max=0.2)
            await vicc.start()
            stack.push_async_callback(vicc.stop)
            return Rig(pcscd, bsf, bsf_url, vicc, soft, stack)

        yield make


# --- whole bootstraps over PC/SC, keys equal to Zn's -----------------------------------------------------


async def test_gba_me_bootstrap_over_pcsc_gives_the_keys_zn_gives(make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(USIM_CARD)
    store = await rig.open(GbaPolicy.GBA_ME_ONLY)
    assert rig.card is not None
    identity = await rig.card.identity()
    assert (identity.transport, identity.application, identity.gba_u) == ("pcsc", Application.USIM, False)
    assert identity.impi == USIM_CARD.effective_impi
    btids = set()
    for fqdn in NAFS:
        for ua_text in UAS:
            ua = UaId.parse(ua_text)
            key = await store.get_key(fqdn, ua)
            answer = await zn(rig.bsf_url, key.btid, fqdn, ua)
            assert answer["meKeyMaterial"] == key.key.hex(), (fqdn, ua_text)
            assert answer["impi"] == identity.impi and key.gba_mode is GbaMode.GBA_ME
            btids.add(key.btid)
    assert len(btids) == 1
    assert (rig.authenticates(), rig.bsf.successes) == (1, 1)  # one AKA run on the wire, one bootstrap


async def test_gba_u_bootstrap_over_pcsc_takes_the_naf_keys_from_the_card(make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(ISIM_CARD)
    store = await rig.open(GbaPolicy.AUTO)
    assert rig.card is not None
    identity = await rig.card.identity()
    assert (identity.application, identity.gba_u) == (Application.ISIM, True)
    for fqdn in NAFS:
        ua = UaId.parse(UAS[0])
        key = await store.get_key(fqdn, ua)
        assert key.gba_mode is GbaMode.GBA_U
        answer = await zn(rig.bsf_url, key.btid, fqdn, ua, gba_u_aware=True)
        assert answer["meKeyMaterial"] == key.key.hex()  # Ks_ext_NAF, computed by the card
        ks_int_naf = rig.soft.ks_int_naf(key.naf_id, AppKind.ISIM)
        assert ks_int_naf is not None and answer["uiccKeyMaterial"] == ks_int_naf.hex()
    session = await store.ensure_bootstrapped()
    assert session.ks is None  # Ks never left the card
    # one bootstrap (DD) and one NAF derivation (DE) per NAF_Id, all INS 88; B-TID and lifetime into EF_GBABP
    assert rig.authenticates() == 1 + len(NAFS)
    assert rig.virtual.count(INS_UPDATE_BINARY) == 1
    assert rig.bsf.successes == 1


# --- the card and the reader come and go ---------------------------------------------------------------


async def test_card_removal_wipes_keys_and_the_card_put_back_bootstraps(make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(USIM_CARD)
    store = await rig.open(GbaPolicy.GBA_ME_ONLY)
    first = await store.get_key(NAFS[0], UaId.dtls_psk())
    await rig.pull()
    await until(lambda: KeyEvent(KeyEventKind.WIPED, first.btid) in rig.key_events)
    assert [e.kind for e in rig.card_events] == [CardEventKind.REMOVED]
    assert not store.status().card_present and store.status().btid is None
    with pytest.raises(UiccAbsent):
        await store.get_key(NAFS[0], UaId.dtls_psk())

    await rig.insert()
    await until(lambda: len(rig.card_events) == 2)
    assert rig.card_events[1].kind is CardEventKind.INSERTED
    second = await store.get_key(NAFS[0], UaId.dtls_psk())
    assert second.btid != first.btid and second.btid == rig.bsf.last_btid
    assert (await zn(rig.bsf_url, second.btid, NAFS[0], UaId.dtls_psk()))["meKeyMaterial"] == second.key.hex()
    assert rig.authenticates() == 2 and rig.bsf.successes == 2


async def test_another_card_put_in_is_a_change_and_bootstraps_for_its_own_subscriber(
    make_rig: Callable[..., Any],
) -> None:
    rig: Rig = await make_rig(USIM_CARD)
    store = await rig.open(GbaPolicy.GBA_ME_ONLY)
    first = await store.get_key(NAFS[0], UaId.dtls_psk())
    await rig.pull()
    await rig.insert(VirtualCard(SoftUicc(ISIM_CARD)))
    await until(lambda: [e.kind for e in rig.card_events] == [CardEventKind.REMOVED, CardEventKind.CHANGED])
    second = await store.get_key(NAFS[0], UaId.dtls_psk())
    assert second.btid != first.btid
    assert rig.bsf.bootstraps[second.btid].impi == ISIM_CARD.effective_impi


async def test_card_pulled_during_authenticate_one_authenticate_per_challenge_then_a_fresh_one(
    make_rig: Callable[..., Any],
) -> None:
    rig: Rig = await make_rig(USIM_CARD)
    store = await rig.open(GbaPolicy.GBA_ME_ONLY)
    pulled = rig.virtual
    pulled.pull_on_ins = INS_AUTHENTICATE
    with pytest.raises(AuthenticateOutcomeUnknown) as info:
        await store.get_key(NAFS[0], UaId.dtls_psk())
    assert info.value.culprit is Culprit.READER and READER in str(info.value)
    assert pulled.count(INS_AUTHENTICATE) == 1  # sent once, never again
    assert pulled.log[-1].ins == INS_AUTHENTICATE and pulled.log[-1].sw is None  # the card took it, no answer
    await until(lambda: CardEventKind.REMOVED in [e.kind for e in rig.card_events])
    assert rig.bsf.successes == 0

    await reader_holds_card(READER, False)
    await rig.insert()  # the same card back: the next bootstrap is a fresh challenge
    await until(lambda: CardEventKind.INSERTED in [e.kind for e in rig.card_events])
    key = await store.get_key(NAFS[0], UaId.dtls_psk())
    assert (await zn(rig.bsf_url, key.btid, NAFS[0], UaId.dtls_psk()))["meKeyMaterial"] == key.key.hex()
    assert pulled.count(INS_AUTHENTICATE) == 2  # two challenges from the BSF, each once on the wire
    assert rig.bsf.challenges == 2 and rig.bsf.successes == 1


async def test_a_mute_card_is_an_unknown_outcome_and_says_so_until_it_is_pulled(
    make_rig: Callable[..., Any],
) -> None:
    rig: Rig = await make_rig(USIM_CARD)
    await reader_holds_card(READER, True)
    card = await asyncio.wait_for(open_card(reader_config(command_timeout=1.0)), 30)
    rig.stack.push_async_callback(card.close)
    events: list[CardEvent] = []
    card.subscribe(events.append)
    mute = rig.virtual
    mute.mute_on_ins = INS_AUTHENTICATE
    milenage = Milenage(USIM_CARD.k, USIM_CARD.opc)
    rand = os.urandom(16)
    autn = generate_autn(milenage, rand, (1 << 5).to_bytes(6, "big"), USIM_CARD.amf)
    with pytest.raises(AuthenticateOutcomeUnknown):
        await card.authenticate(rand, autn, AuthContext.UMTS)
    assert [e.kind for e in events] == [CardEventKind.REMOVED]  # its connection is gone: keys go too
    sent = len(mute.log)
    await asyncio.sleep(1.0)  # five looks for the card (presence_poll 0.2 s), none reaches the card
    assert len(mute.log) == sent and mute.count(INS_AUTHENTICATE) == 1
    with pytest.raises(UiccAbsent):
        await card.authenticate(rand, autn, AuthContext.UMTS)
    # Our own unanswered command still holds the card: said as such, not as "another program".
    with pytest.raises(ReaderGone, match="still waiting for the card to answer"):
        await card.identity()

    await rig.pull()  # the user pulls the mute card and puts in a fresh one
    await rig.insert(VirtualCard(SoftUicc(USIM_CARD)))
    await until(lambda: [e.kind for e in events] == [CardEventKind.REMOVED, CardEventKind.INSERTED])
    assert isinstance(await card.authenticate(rand, autn, AuthContext.UMTS), AkaSuccess)


async def test_reader_disappearance_is_typed_logged_and_recovered(
    make_rig: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """pcscd stops (the reader's service dies with it); keys are wiped, and it all comes back."""
    caplog.set_level(logging.INFO, logger="mn_secd.uicc")
    rig: Rig = await make_rig(USIM_CARD)
    store = await rig.open(GbaPolicy.GBA_ME_ONLY)
    assert rig.card is not None
    first = await store.get_key(NAFS[0], UaId.dtls_psk())
    try:
        rig.pcscd.stop()
        await until(lambda: KeyEvent(KeyEventKind.WIPED, first.btid) in rig.key_events)
        with pytest.raises(ReaderGone, match="MN-SECD VICC 00 00") as info:
            await rig.card.identity()
        assert info.value.culprit is Culprit.READER
        assert any(
            r.levelno == logging.WARNING and r.__dict__.get("event") == "uicc.pcsc_reader-gone" for r in caplog.records
        )
        await asyncio.sleep(1.0)  # the watcher keeps looking, backing off
    finally:
        rig.pcscd.start()
    await until(lambda: [e.kind for e in rig.card_events] == [CardEventKind.REMOVED, CardEventKind.INSERTED], 20)
    second = await store.get_key(NAFS[0], UaId.dtls_psk())
    assert second.btid != first.btid and rig.authenticates() == 2


async def test_an_isim_only_card_in_a_reader_is_refused_with_the_reason(make_rig: Callable[..., Any]) -> None:
    """No modem to ask AT+CIMI: without a USIM the IMSI is unknown, and the error says so."""
    rig: Rig = await make_rig(ISIM_CARD, wrap=IsimOnly)
    await reader_holds_card(READER, True)
    with pytest.raises(ApplicationNotFound, match="ISIM-only"):
        await open_card(reader_config())
    assert rig.virtual.count(INS_AUTHENTICATE) == 0
    transport = await PcscTransport.open(READER)  # the failed start-up left nothing holding the card
    await transport.close()


class IsimOnly:
    """A card whose EF_DIR lists only its ISIM (the USIM's record reads as unused, ``FF``)."""

    def __init__(self, card: SoftUicc) -> None:
        self._card = card

    def process_apdu(self, apdu: bytes) -> bytes:
        answer = self._card.process_apdu(apdu)
        if apdu[1] == INS_READ_RECORD and USIM_AID[:7] in answer:
            return b"\xff" * (len(answer) - 2) + answer[-2:]
        return answer

    def reset(self) -> None:
        self._card.reset()


# --- mn-secd uicc with --reader, from a shell -----------------------------------------------------------


async def run_cli(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """``mn-secd ARGS`` as a subprocess, while this process's loop keeps serving the virtual card."""
    process = await asyncio.create_subprocess_exec(
        *mn_secd_command(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_uicc_info_auth_and_readers_with_a_reader(make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(ISIM_CARD)
    await reader_holds_card(READER, True)

    code, out, err = await run_cli("uicc", "readers")
    assert code == 0, err
    assert out.splitlines() == [f"{READER}  card, ATR {UICC_ATR.hex().upper()}", "mn-secd vicc 00 01  empty"]
    code, out, err = await run_cli("uicc", "readers", "--reader", "vicc 00")
    assert code == 0, err
    assert f"{READER}  card, ATR {UICC_ATR.hex().upper()}" in out
    assert "mn-secd vicc 00 01" in out and out.rstrip().endswith(f"picks '{READER}'")

    code, out, err = await run_cli("uicc", "info", "--reader", "vicc 00 00")
    assert code == 0, err
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["reader"].strip() == READER and lines["ATR"].strip() == UICC_ATR.hex().upper()
    assert lines["transport"].strip() == "pcsc" and lines["IMSI"].strip() == ISIM_CARD.imsi
    assert lines["IMPI"].strip() == ISIM_CARD.effective_impi and lines["GBA_U"].strip() == "yes"
    assert rig.virtual.count(INS_AUTHENTICATE) == 0

    milenage = Milenage(ISIM_CARD.k, ISIM_CARD.opc)
    rand = bytes(range(16))
    autn = generate_autn(milenage, rand, (7 << 5).to_bytes(6, "big"), ISIM_CARD.amf)
    code, out, err = await run_cli("uicc", "auth", "--reader", "vicc 00 00", "--rand", rand.hex(), "--autn", autn.hex())
    assert code == 0, err
    res, ck, ik, _ = milenage.f2345(rand)
    assert (
        f"RES: {res.hex().upper()}" in out and f"CK:  {ck.hex().upper()}" in out and f"IK:  {ik.hex().upper()}" in out
    )
    assert rig.virtual.count(INS_AUTHENTICATE) == 1

    code, out, err = await run_cli("uicc", "info", "--reader", "vicc 00 01")  # the empty slot
    assert (code, out) == (1, "") and err.startswith("mn-secd uicc: uicc-absent: ")
    code, out, err = await run_cli("uicc", "readers", "--reader", "gemalto")
    assert code == 1 and "reader-not-found" in out and READER in out
    code, _, err = await run_cli("uicc", "info", "--reader", "vicc", "--transport", "csim")
    assert code == 2 and "a reader is always reached over pcsc" in err


async def test_bootstrap_command_with_a_reader(make_rig: Callable[..., Any]) -> None:
    rig: Rig = await make_rig(USIM_CARD)
    await reader_holds_card(READER, True)
    code, out, err = await run_cli("bootstrap", "--reader", "vicc 00 00", "--bsf", rig.bsf_url, "--mode", "gba-me")
    assert code == 0, err
    assert f"B-TID:   {rig.bsf.last_btid}" in out and "mode:    gba-me" in out
    assert rig.virtual.count(INS_AUTHENTICATE) == 1


# --- the daemon from a configuration with transport = "pcsc" ------------------------------------------


@pytest.fixture
async def vicc_process(pcscd: PrivatePcscd, world: SimulatedWorld, tmp_path: Path) -> AsyncIterator[ViccProcess]:
    """``mn-secd sim vicc`` serving the world's first lab card in the private pcscd's reader."""
    if not pcscd.running:
        pcscd.start()
    await reader_holds_card(READER, False)
    process = await ViccProcess.start(world.card_paths[0], pcscd.port, tmp_path / "apdus.log")
    try:
        yield process
    finally:
        await process.stop()


@dataclass
class ViccProcess:
    process: asyncio.subprocess.Process
    apdu_log: Path

    @classmethod
    async def start(cls, profile: Path, port: int, apdu_log: Path) -> ViccProcess:
        process = await asyncio.create_subprocess_exec(
            *mn_secd_command(),
            *("sim", "vicc", "--card", str(profile), "--vpcd", f"127.0.0.1:{port}", "--apdu-log", str(apdu_log)),
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line.startswith(b"vicc connected to vpcd"), line
        return cls(process, apdu_log)

    async def toggle(self, expect: str) -> None:
        """SIGUSR1: the card comes out, or goes back in; waits for the vicc to say so."""
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGUSR1)
        line = await asyncio.wait_for(self.process.stdout.readline(), 10)
        assert line.decode().strip() == expect

    def authenticates(self) -> int:
        lines = self.apdu_log.read_text().splitlines() if self.apdu_log.exists() else []
        return sum(1 for line in lines if line.split()[2:3] == ["88"])

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def test_the_daemon_with_a_reader_hands_an_ae_its_key_and_follows_the_card(
    world: SimulatedWorld,
    local_aes: LocalAes,
    vicc_process: ViccProcess,
    start_daemon: Callable[..., Any],
) -> None:
    local_aes.add("ae-one")
    config = local_aes.write_config(reader="vicc 00 00", gba_mode="gba-me")
    daemon: DaemonProcess = await start_daemon(config)
    assert world.bsf is not None
    bsf = world.bsf
    try:
        ready = await daemon.notify.wait_for(lambda m: m.startswith("READY=1"), timeout=30)
        statuses = daemon.notify.statuses()
        assert "waiting for the PC/SC reader 'vicc 00 00'" in statuses
        assert any(s.startswith("card found: 001010") for s in statuses), statuses

        async with local_aes.client("ae-one") as client:
            with pytest.raises(KeyServiceRejected) as wiped:
                async with asyncio.timeout(20):
                    async for answer in client.observe_key(DEFAULT_NAF_FQDN):
                        first = answer
                        assert answer.btid == bsf.last_btid
                        zn_answer = await zn(world.bsf_url, answer.btid, DEFAULT_NAF_FQDN, UaId.dtls_psk())
                        assert zn_answer["meKeyMaterial"] == answer.key.hex()
                        await vicc_process.toggle("card removed")  # the card is pulled: the key is wiped
        assert (wiped.value.code, wiped.value.kind) == ("5.03 Service Unavailable", "uicc-absent")
        removed = await daemon.notify.wait_for(lambda m: m.startswith("STATUS=degraded: card removed"), after=ready)
        assert "reader gone" in daemon.notify.messages[removed]
        status = await local_aes.client("ae-one").status()
        assert not status.card_present and status.btid is None

        await vicc_process.toggle("card inserted")
        await daemon.notify.wait_for(lambda m: m.startswith("STATUS=bootstrapped until "), after=removed, timeout=30)
        second = await local_aes.get_key("ae-one")
        assert second.btid != first.btid and second.btid == bsf.last_btid
        zn_answer = await zn(world.bsf_url, second.btid, DEFAULT_NAF_FQDN, UaId.dtls_psk())
        assert zn_answer["meKeyMaterial"] == second.key.hex()
        assert vicc_process.authenticates() == 2 and bsf.successes == 2  # one AUTHENTICATE per bootstrap
        code = await daemon.stop()
    finally:
        await daemon.kill()
    assert code == 0, daemon.stderr
    log = "\n".join(daemon.stderr)
    assert "card gone" in log and first.key.hex() not in log and second.key.hex() not in log


async def test_the_daemon_waits_for_a_reader_that_is_not_there_yet(
    world: SimulatedWorld, local_aes: LocalAes, pcscd: PrivatePcscd, start_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    """A reader that is not plugged in is not a configuration error: 5.03 until it comes, then keys."""
    if not pcscd.running:
        pcscd.start()
    await reader_holds_card(READER, False)
    local_aes.add("ae-one")
    config = local_aes.write_config(reader="vicc 00 00", gba_mode="gba-me")
    daemon: DaemonProcess = await start_daemon(config, "--modem-wait", "0.5")
    vicc: ViccProcess | None = None
    try:
        ready = await daemon.notify.wait_for(lambda m: m.startswith("READY=1"), timeout=30)
        assert "STATUS=degraded: no card yet (uicc-absent: no card in the reader" in daemon.notify.messages[ready]
        with pytest.raises(KeyServiceRejected) as info:
            await local_aes.get_key("ae-one")
        assert (info.value.code, info.value.kind) == ("5.03 Service Unavailable", "uicc-absent")
        vicc = await ViccProcess.start(world.card_paths[0], pcscd.port, tmp_path / "apdus.log")
        await daemon.notify.wait_for(lambda m: "STATUS=card found" in m, after=ready, timeout=30)
        answer = await local_aes.get_key("ae-one")
        assert world.bsf is not None and answer.btid == world.bsf.last_btid
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
        if vicc is not None:
            await vicc.stop()


def test_check_config_with_a_reader_and_without_pyscard(tmp_path: Path) -> None:
    """pyscard is optional: asking for a reader without it is one line naming the install command."""
    config = tmp_path / "mn-secd.toml"
    config.write_text('[modem]\ntransport = "pcsc"\nreader = "uTrust"\n')
    result = subprocess.run(
        [*mn_secd_command(), "check-config", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: OK: reader 'uTrust' (pcsc/auto), ")
    wrapper = "import sys; sys.modules['smartcard'] = None; from mn_secd.cli import main; sys.exit(main(sys.argv[1:]))"
    for command in ("check-config", "run"):
        result = subprocess.run(
            [sys.executable, "-c", wrapper, command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            f"mn-secd {command}: config: {config}: modem.transport: PC/SC needs pyscard: "
            "pip install 'mn-secd[pcsc]' (or apt install python3-pyscard)"
        ]

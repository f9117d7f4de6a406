"""The PC/SC transport through a real pcscd, whose vpcd reader holds the software UICC (mn_secd.sim.vicc).

The private pcscd is the test process's one (``conftest.pcscd``: libpcsclite reads
PCSCLITE_CSOCK_NAME once per process); tests that make the reader vanish stop and restart it.
Skipped only when pcscd or the vpcd driver is not installed (./dev installs both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from harness import reader_holds_card

from mn_secd.aka import AkaSuccess, AkaSyncFailure, AuthContext
from mn_secd.errors import ApduOutcomeUnknown, PcscUnavailable, ReaderGone, ReaderNotFound, UiccAbsent
from mn_secd.gba.kdf import ks_naf
from mn_secd.sim.milenage import Milenage, build_auts, generate_autn, verify_auts
from mn_secd.sim.pcscd import PrivatePcscd, missing_tools
from mn_secd.sim.profile import CardProfile, load_profile, save_profile
from mn_secd.sim.sqn import SqnState, split_sqn
from mn_secd.sim.usim import USIM_AID, SoftUicc
from mn_secd.sim.vicc import UICC_ATR, ViccClient, VirtualCard
from mn_secd.uicc.apdu import Apdu, parse_apdu
from mn_secd.uicc.auth import (
    build_authenticate,
    build_gba_naf_derivation,
    parse_authenticate_response,
    parse_naf_derivation_response,
)
from mn_secd.uicc.pcsc import PcscTransport, ReaderEvent, ReaderEventKind, ReaderWatcher, list_readers
from mn_secd.uicc.transport import exchange

_MISSING = missing_tools()
pytestmark = pytest.mark.skipif(bool(_MISSING), reason="PC/SC tools not installed: " + ", ".join(_MISSING))

INS_AUTHENTICATE, INS_GET_RESPONSE, INS_SELECT, INS_MANAGE_CHANNEL = 0x88, 0xC0, 0xA4, 0x70
READER = "mn-secd vicc 00 00"
K = bytes.fromhex("465b5ce8b199b49faa5f0a2ee238a6bc")  # TS 35.208 test set 1
OPC = bytes.fromhex("cd63cb71954a9f4e48a5994e37a02baf")
LAB_CARD = CardProfile(iccid="89882110000000000018", imsi="001010000000001", mnc_length=2, k=K, opc=OPC)
RAND = bytes.fromhex("23553cbe9637a89d218ae64dae47bf35")
ROOT = Path(__file__).resolve().parents[2]


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def authenticate_apdu(rand: bytes, autn: bytes) -> Apdu:
    return parse_apdu(build_authenticate(rand, autn, AuthContext.UMTS))


def challenge(profile: CardProfile, seq: int, rand: bytes = RAND) -> bytes:
    return generate_autn(Milenage(profile.k, profile.opc), rand, (seq << 5).to_bytes(6, "big"), profile.amf)


@dataclass
class Lab:
    pcscd: PrivatePcscd
    vicc: ViccClient
    transports: list[PcscTransport]
    watchers: list[ReaderWatcher]

    @property
    def card(self) -> VirtualCard:
        return self.vicc.card

    async def open(self, name: str = READER, timeout: float = 10.0, **kwargs: Any) -> PcscTransport:
        """The transport, once pcscd has seen the card (it polls the slot about every 400 ms)."""
        await card_in_reader(True, timeout)
        async with asyncio.timeout(timeout):
            while True:
                try:
                    transport = await PcscTransport.open(name, **kwargs)
                    break
                except (UiccAbsent, PcscUnavailable, ReaderGone):
                    await asyncio.sleep(0.05)
        self.transports.append(transport)
        return transport

    async def watch(self, name: str = READER) -> asyncio.Queue[ReaderEvent]:
        events: asyncio.Queue[ReaderEvent] = asyncio.Queue()
        watcher = ReaderWatcher(name, events.put_nowait, poll=0.2, reconnect_max=0.5)
        await watcher.start()
        self.watchers.append(watcher)
        return events

    async def swap(self, profile: CardProfile) -> VirtualCard:
        """Pull the card and put another one in; wait until vpcd has taken it."""
        card = VirtualCard(SoftUicc(profile))
        self.vicc.remove()
        await card_in_reader(False)  # a person takes longer than pcscd's poll to swap cards
        self.vicc.insert(card)
        await self.vicc.wait_connected()
        return card


async def card_in_reader(present: bool, timeout: float = 10.0) -> None:
    await reader_holds_card(READER, present, timeout)


@pytest.fixture
async def lab(pcscd: PrivatePcscd) -> AsyncIterator[Lab]:
    if not pcscd.running:  # a test that stopped it failed before restarting it
        pcscd.start()
    await card_in_reader(False)  # the previous test's card has left (pcscd polls the slot)
    vicc = ViccClient(VirtualCard(SoftUicc(LAB_CARD)), "127.0.0.1", pcscd.port, reconnect_max=0.2)
    await vicc.start()
    lab = Lab(pcscd, vicc, [], [])
    try:
        yield lab
    finally:
        for transport in lab.transports:
            await transport.close()
        for watcher in lab.watchers:
            await watcher.close()
        await vicc.stop()


async def next_event(events: asyncio.Queue[ReaderEvent], kind: ReaderEventKind, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while (await events.get()).kind is not kind:
            pass


async def select_usim(transport: PcscTransport) -> None:
    response = await exchange(transport, Apdu(0x00, 0xA4, 0x04, 0x04, USIM_AID, le=256))
    assert response.sw == 0x9000


# --- TS 35.208 through AUTHENTICATE over PC/SC ------------------------------------------------------------


async def test_every_35208_set_through_authenticate_over_pcsc(lab: Lab, milenage_vectors: list[dict[str, Any]]) -> None:
    """RES, CK, IK (and Kc) byte for byte; then the same challenge again: AUTS that gives SQN_MS back."""
    assert len(milenage_vectors) == 20
    for v in milenage_vectors:
        sqn, rand, autn = h(v["SQN"]), h(v["RAND"]), h(v["derived_AUTN"])
        seq, _ = split_sqn(sqn, 5)
        profile = replace(
            LAB_CARD, k=h(v["K"]), opc=h(v["OPc"]), amf=h(v["AMF"]), card_state=SqnState(5, (seq - 1,) * 32)
        )
        card = await lab.swap(profile)
        transport = await lab.open()
        await select_usim(transport)

        response = await exchange(transport, authenticate_apdu(rand, autn), may_resend=False)
        ck, ik = h(v["f3_CK"]), h(v["f4_IK"])
        kc = bytes(a ^ b ^ c ^ d for a, b, c, d in zip(ck[:8], ck[8:], ik[:8], ik[8:], strict=True))
        assert response.sw == 0x9000, f"set {v['set']}"
        assert response.data == b"\xdb\x08" + h(v["f2_RES"]) + b"\x10" + ck + b"\x10" + ik + b"\x08" + kc, v["set"]
        result = parse_authenticate_response(response.data, response.sw, AuthContext.UMTS)
        assert isinstance(result, AkaSuccess) and (result.res, result.ck, result.ik) == (h(v["f2_RES"]), ck, ik)

        again = await exchange(transport, authenticate_apdu(rand, autn), may_resend=False)
        resync = parse_authenticate_response(again.data, again.sw, AuthContext.UMTS)
        assert isinstance(resync, AkaSyncFailure), f"set {v['set']}"
        milenage = Milenage(h(v["K"]), h(v["OPc"]))
        sqn_ms = verify_auts(milenage, rand, resync.auts)
        assert sqn_ms is not None and split_sqn(sqn_ms, 5)[0] == seq
        assert resync.auts == build_auts(milenage, rand, sqn_ms)
        assert card.count(INS_AUTHENTICATE) == 2, f"set {v['set']}: each challenge exactly once on the wire"
        assert card.count(INS_GET_RESPONSE) >= 2
        await transport.close()
        lab.transports.remove(transport)


async def test_gba_u_bootstrap_and_naf_derivation_over_pcsc(lab: Lab) -> None:
    """GBA context AUTHENTICATE (Ks stays in the card), then Ks_ext_NAF from the card equals the KDF's."""
    profile = replace(LAB_CARD, isim=True, gba_u=True)
    card = await lab.swap(profile)
    transport = await lab.open()
    await select_usim(transport)
    bootstrap = parse_apdu(build_authenticate(RAND, challenge(profile, 1), AuthContext.GBA))
    response = await exchange(transport, bootstrap, may_resend=False)
    result = parse_authenticate_response(response.data, response.sw, AuthContext.GBA)
    res, ck, ik, _ = Milenage(K, OPC).f2345(RAND)
    assert isinstance(result, AkaSuccess) and result.res == res and result.ck is None  # CK, IK stay inside
    naf_id = b"in-cse.example.org" + h("010001c0a8")
    impi = profile.effective_impi
    derivation = parse_apdu(build_gba_naf_derivation(naf_id, impi))
    answer = await exchange(transport, derivation, may_resend=False)
    assert parse_naf_derivation_response(answer.data, answer.sw) == ks_naf(ck + ik, RAND, impi, naf_id)
    assert card.count(INS_AUTHENTICATE) == 2  # one bootstrap, one derivation


# --- the transport's contract -------------------------------------------------------------------------------


async def test_t0_logical_channel_get_response_and_the_atr(lab: Lab) -> None:
    await card_in_reader(True)
    assert [(r.name, r.card_present, r.atr) for r in await list_readers() if r.name == READER] == [
        (READER, True, UICC_ATR)
    ]
    transport = await lab.open()
    assert transport.t0 and transport.atr == UICC_ATR
    assert transport.channel == 1 and not transport.basic_channel
    lab.card.clear_log()
    await select_usim(transport)
    select, get_response = lab.card.log
    # Over T=0 the case-4 SELECT goes without Le (Lc + AID only); the answer comes with GET RESPONSE
    # on our channel (CLA 01), both issued by our own T=0 procedure.
    assert select.header == bytes([0x01, INS_SELECT, 0x04, 0x04]) and select.length == 1 + len(USIM_AID)
    assert select.sw is not None and select.sw >> 8 == 0x61
    assert get_response.header == bytes([0x01, INS_GET_RESPONSE, 0, 0]) and get_response.sw == 0x9000


async def test_a_name_matching_both_slots_picks_the_one_holding_a_card(lab: Lab) -> None:
    transport = await lab.open("MN-SECD VICC")  # both of vpcd's slots match; only 00 00 has a card
    assert transport.reader == READER
    with pytest.raises(ReaderNotFound, match="no-such-reader"):
        await PcscTransport.open("no-such-reader")


class NoChannels:
    """A card that refuses MANAGE CHANNEL, as many older SIMs do."""

    def __init__(self, card: SoftUicc) -> None:
        self._card = card

    def process_apdu(self, apdu: bytes) -> bytes:
        return h("6881") if apdu[1] == INS_MANAGE_CHANNEL else self._card.process_apdu(apdu)

    def reset(self) -> None:
        self._card.reset()


async def test_card_refusing_logical_channels_gets_the_basic_channel_exclusively(lab: Lab) -> None:
    lab.vicc.remove()
    await card_in_reader(False)
    lab.vicc.insert(VirtualCard(NoChannels(SoftUicc(LAB_CARD))))
    await lab.vicc.wait_connected()
    transport = await lab.open()
    assert transport.channel == 0 and not transport.basic_channel  # exclusive: selection sticks
    await select_usim(transport)
    response = await exchange(transport, authenticate_apdu(RAND, challenge(LAB_CARD, 1)), may_resend=False)
    assert response.sw == 0x9000 and response.data[0] == 0xDB
    assert lab.card.log[-2].header[:2] == bytes([0x00, INS_AUTHENTICATE])
    assert lab.card.count(INS_AUTHENTICATE) == 1


# --- removal, the card pulled during AUTHENTICATE, the reader gone -----------------------------------------


async def test_card_pulled_during_authenticate_is_an_unknown_outcome_never_resent(lab: Lab) -> None:
    events = await lab.watch()
    await next_event(events, ReaderEventKind.CARD_INSERTED)
    transport = await lab.open()
    await select_usim(transport)
    card = lab.card
    card.pull_on_ins = INS_AUTHENTICATE
    with pytest.raises(ApduOutcomeUnknown):
        await exchange(transport, authenticate_apdu(RAND, challenge(LAB_CARD, 1)), may_resend=False)
    assert card.count(INS_AUTHENTICATE) == 1
    assert card.log[-1].sw is None  # the card worked on it; no answer left
    await next_event(events, ReaderEventKind.CARD_REMOVED)
    sent = len(card.log)
    with pytest.raises(UiccAbsent):  # the transport is dead: nothing more goes on the wire
        await transport.transmit(Apdu(0x00, 0xF2, 0x00, 0x0C))
    assert len(card.log) == sent and card.count(INS_AUTHENTICATE) == 1

    lab.vicc.insert()  # the same card back: the spent SQN is refused, a fresh one works
    await next_event(events, ReaderEventKind.CARD_INSERTED)
    transport = await lab.open()
    await select_usim(transport)
    replay = await exchange(transport, authenticate_apdu(RAND, challenge(LAB_CARD, 1)), may_resend=False)
    assert isinstance(parse_authenticate_response(replay.data, replay.sw, AuthContext.UMTS), AkaSyncFailure)
    fresh = await exchange(transport, authenticate_apdu(RAND, challenge(LAB_CARD, 2)), may_resend=False)
    assert isinstance(parse_authenticate_response(fresh.data, fresh.sw, AuthContext.UMTS), AkaSuccess)
    assert card.count(INS_AUTHENTICATE) == 3


async def test_a_mute_card_times_out_as_an_unknown_outcome_and_gives_the_reader_back(lab: Lab) -> None:
    transport = await lab.open()
    await select_usim(transport)
    card = lab.card
    card.mute_on_ins = INS_AUTHENTICATE
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ApduOutcomeUnknown, match="no answer in time"):
        await transport.transmit(authenticate_apdu(RAND, challenge(LAB_CARD, 1)), timeout=1.0)
    assert loop.time() - started < 5.0  # the command's timeout plus a bounded release, not a hang
    assert card.count(INS_AUTHENTICATE) == 1
    with pytest.raises(ReaderGone):  # nothing more goes to a card that stopped answering
        await transport.transmit(Apdu(0x00, 0xF2, 0x00, 0x0C))
    assert card.count(INS_AUTHENTICATE) == 1
    lab.vicc.remove()  # the user pulls the mute card; a fresh one works
    await card_in_reader(False)
    lab.vicc.insert(VirtualCard(SoftUicc(LAB_CARD)))
    fresh = await lab.open()
    await select_usim(fresh)
    response = await exchange(fresh, authenticate_apdu(RAND, challenge(LAB_CARD, 1)), may_resend=False)
    assert response.sw == 0x9000


async def test_card_removal_and_insertion_are_events_and_a_removed_card_is_a_typed_error(lab: Lab) -> None:
    events = await lab.watch()
    await next_event(events, ReaderEventKind.READER_FOUND)
    await next_event(events, ReaderEventKind.CARD_INSERTED)
    transport = await lab.open()
    sent = len(lab.card.log)
    lab.vicc.remove()
    await next_event(events, ReaderEventKind.CARD_REMOVED)
    with pytest.raises(UiccAbsent):
        await transport.transmit(Apdu(0x00, 0xF2, 0x00, 0x0C))
    assert len(lab.card.log) == sent  # refused by pcscd before anything reached a card
    with pytest.raises(UiccAbsent):
        await PcscTransport.open(READER)
    lab.vicc.insert()
    await next_event(events, ReaderEventKind.CARD_INSERTED)
    await lab.open()


async def test_reader_disappearance_is_typed_logged_and_recovered(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    """pcscd stops (as when the reader's service dies); the watcher says so, backs off and finds it again."""
    caplog.set_level(logging.INFO, logger="mn_secd.uicc.pcsc")
    events = await lab.watch()
    await next_event(events, ReaderEventKind.CARD_INSERTED)
    transport = await lab.open()
    sent = len(lab.card.log)
    try:
        lab.pcscd.stop()
        await next_event(events, ReaderEventKind.CARD_REMOVED)
        await next_event(events, ReaderEventKind.READER_GONE)
        with pytest.raises((ApduOutcomeUnknown, ReaderGone)) as caught:
            await transport.transmit(Apdu(0x00, 0xF2, 0x00, 0x0C))
        cause = caught.value if isinstance(caught.value, ReaderGone) else caught.value.__cause__
        assert isinstance(cause, ReaderGone)
        with pytest.raises(ReaderGone):  # dead from then on, whatever pcscd does next
            await transport.transmit(Apdu(0x00, 0xF2, 0x00, 0x0C))
        with pytest.raises(PcscUnavailable):
            await PcscTransport.open(READER)
        assert len(lab.card.log) == sent
        assert any(
            r.levelno == logging.WARNING and r.__dict__.get("event") == "uicc.pcsc_reader-gone" for r in caplog.records
        )
        await asyncio.sleep(1.0)  # the watcher keeps looking, with its back-off
    finally:
        lab.pcscd.start()
    await next_event(events, ReaderEventKind.READER_FOUND)
    await next_event(events, ReaderEventKind.CARD_INSERTED)  # the card came back on its own (vicc reconnects)
    transport = await lab.open()
    await select_usim(transport)
    response = await exchange(transport, authenticate_apdu(RAND, challenge(LAB_CARD, 1)), may_resend=False)
    assert response.sw == 0x9000 and lab.card.count(INS_AUTHENTICATE) == 1


# --- mn-secd sim vicc from a shell ----------------------------------------------------------------------------


async def test_sim_vicc_command_serves_a_profile_logs_apdus_and_pulls_the_card_on_sigusr1(
    pcscd: PrivatePcscd, tmp_path: Path
) -> None:
    if not pcscd.running:
        pcscd.start()
    profile_path = tmp_path / "card.toml"
    save_profile(profile_path, LAB_CARD)
    apdu_log = tmp_path / "apdus.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mn_secd",
            "sim",
            "vicc",
            "--card",
            str(profile_path),
            "--vpcd",
            f"127.0.0.1:{pcscd.port}",
            "--apdu-log",
            str(apdu_log),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    await card_in_reader(False)
    transports: list[PcscTransport] = []
    lab = Lab(pcscd, ViccClient(VirtualCard(SoftUicc(LAB_CARD))), transports, [])
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
        assert line.startswith("vicc connected to vpcd")
        events = await lab.watch()
        await next_event(events, ReaderEventKind.CARD_INSERTED)
        transport = await lab.open()
        await select_usim(transport)
        response = await exchange(transport, authenticate_apdu(RAND, challenge(LAB_CARD, 5)), may_resend=False)
        assert response.sw == 0x9000
        lines = apdu_log.read_text().splitlines()
        authenticates = [line for line in lines if line.split()[2:3] == ["88"]]
        assert len(authenticates) == 1 and authenticates[0].endswith("SW 6135")
        assert RAND.hex().upper() not in apdu_log.read_text().replace(" ", "")  # headers only, no data
        assert split_sqn(load_profile(profile_path).card_state.sqn_ms, 5)[0] == 5  # SQN state written back

        process.send_signal(signal.SIGUSR1)
        await next_event(events, ReaderEventKind.CARD_REMOVED)
        process.send_signal(signal.SIGUSR1)
        await next_event(events, ReaderEventKind.CARD_INSERTED)
    finally:
        for transport in transports:
            await transport.close()
        for watcher in lab.watchers:
            await watcher.close()
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""


def test_sim_vicc_command_without_vpcd_is_one_typed_line(tmp_path: Path) -> None:
    profile_path = tmp_path / "card.toml"
    save_profile(profile_path, LAB_CARD)
    with socket_port() as port:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mn_secd",
                "sim",
                "vicc",
                "--card",
                str(profile_path),
                "--vpcd",
                f"127.0.0.1:{port}",
                "--wait",
                "0.3",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert result.returncode == 2
    assert result.stderr.startswith(f"mn-secd sim vicc: no vpcd at 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    """A loopback port with nothing listening on it (bound, not listening, for the test's duration)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# --- the private pcscd itself ----------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="pcscd is isolated in a mount namespace only as root")
def test_private_pcscd_leaves_the_system_pcscd_files_alone(pcscd: PrivatePcscd) -> None:
    if not pcscd.running:
        pcscd.start()
    assert pcscd.running and pcscd.pid is not None
    pid_file = Path("/run/pcscd/pcscd.pid")  # pcscd writes it whatever its socket: ours, in its own tmpfs
    assert not pid_file.exists() or pid_file.read_text().strip("\0\n ") != str(pcscd.pid)


def test_private_pcscd_on_a_taken_port_is_a_typed_error(tmp_path: Path) -> None:
    import socket

    from mn_secd.sim.pcscd import PcscdError

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = int(taken.getsockname()[1])
        daemon = PrivatePcscd(tmp_path / "taken", port=port)
        with pytest.raises(PcscdError, match=f"vpcd could not listen on port {port}"):
            daemon.start()
        assert not daemon.running and not daemon.socket_path.exists()
        daemon.close()

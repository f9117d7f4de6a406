"""The daemon's control socket against a hostile local user: floods, malformed DTLS and CoAP, Observe abuse.

``mn-secd run`` is a real subprocess in front of the simulated world (software UICC behind the
modem emulator on a pty, reference BSF over HTTP), configured with small budgets so that a table
filled by an attacker would show: 8 sessions, 8 handshakes, 4 observations per AE. The attacker and
the AEs are this test process: raw UDP sockets, bare tinydtls peers (tests/dtls_peer.py), the AE
client library and libcoap's clients. What the daemon logs is its real stderr.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from dtls_peer import DtlsPeer, client_hello, coap_request

from mn_secd.client import KeyServiceClient
from mn_secd.errors import KeyServiceRejected
from mn_secd.sim.launcher import DaemonProcess
from mn_secd.sim.world import DEFAULT_NAF_FQDN, AeCredential, SimulatedWorld, free_udp_port

NAF = DEFAULT_NAF_FQDN
PSK_A = b"psk-of-ae-a-hostile-tests-00001!"
PSK_B = b"psk-of-ae-b-hostile-tests-00002!"
LIMITS = "max_peers = 8\nmax_handshakes = 8\nmax_observations = 4\n"


@dataclass
class Rig:
    world: SimulatedWorld
    daemon: DaemonProcess
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def client(self, identity: str = "ae-a", psk: bytes = PSK_A) -> KeyServiceClient:
        return KeyServiceClient(identity, psk, *self.address)

    async def peer(self, identity: bytes = b"ae-a", psk: bytes = PSK_A) -> DtlsPeer:
        peer = await DtlsPeer.create(identity, psk, self.address)
        assert await peer.handshake(), peer.events
        return peer

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.daemon.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def log_lines(self, pattern: str) -> list[str]:
        return [line for line in self.daemon.stderr if re.search(pattern, line)]


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Finalise DTLS client objects now (see tests/unit/test_dtls_fix.py: CPython 3.11.7 and the GC)."""
    yield
    gc.collect()


@pytest.fixture
async def rig(
    world: SimulatedWorld, start_daemon: Callable[..., Awaitable[DaemonProcess]], tmp_path: Path
) -> AsyncIterator[Rig]:
    port = free_udp_port()
    aes = [AeCredential("ae-a", PSK_A), AeCredential("ae-b", PSK_B)]
    config = world.write_daemon_config(aes, control_port=port, log_level="info")
    config.write_text(config.read_text().replace("[control]\n", "[control]\n" + LIMITS))
    daemon = await start_daemon(config, "--modem-wait", "15", log_file=tmp_path / "daemon.log")
    await daemon.wait_ready()
    yield Rig(world, daemon, port)
    await daemon.stop()
    assert not [line for line in daemon.stderr if "Traceback" in line or "SystemError" in line], daemon.stderr


async def send_flood(server: tuple[str, int], rate: int, seconds: float, sockets: int = 16) -> int:
    """ClientHellos from ``sockets`` source ports at about ``rate`` per second; returns the answers seen."""
    loop = asyncio.get_running_loop()
    answers = [0]

    class Counter(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            answers[0] += 1

    transports = [
        (await loop.create_datagram_endpoint(Counter, local_addr=("127.0.0.1", 0)))[0] for _ in range(sockets)
    ]
    hello = client_hello()
    started = loop.time()
    sent = 0
    try:
        while (elapsed := loop.time() - started) < seconds:
            due = int(elapsed * rate) - sent
            for i in range(due):
                transports[(sent + i) % sockets].sendto(hello, server)
            sent += max(due, 0)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
    finally:
        for transport in transports:
            transport.close()
    return answers[0]


# --- item 1: floods -------------------------------------------------------------------------------------


async def test_a_client_hello_flood_costs_an_established_ae_nothing(rig: Rig) -> None:
    async with rig.client() as ae_a, rig.client("ae-b", PSK_B) as ae_b:
        first = await ae_a.get_key(NAF)
        observation = ae_a.observe_key(NAF)
        assert (await anext(observation)).btid == first.btid
        flood = asyncio.create_task(send_flood(rig.address, rate=4000, seconds=2.0))
        served = 0
        while not flood.done():
            assert (await ae_a.get_key(NAF)).btid == first.btid
            served += 1
            await asyncio.sleep(0.02)
        assert await flood > 4000  # the daemon answered the flood (HelloVerifyRequests) ...
        assert served > 20  # ... and served the AE throughout
        await ae_b.force_bootstrap()
        fresh = await asyncio.wait_for(anext(observation), 10)  # the observation outlived the flood
        assert fresh.btid != first.btid
        await observation.aclose()
    assert not rig.log_lines("WARNING|ERROR")


async def test_2000_wrong_psk_handshakes_never_cost_the_legitimate_ae_its_session(rig: Rig) -> None:
    async with rig.client() as ae_a:
        first = await ae_a.get_key(NAF)
        observation = ae_a.observe_key(NAF)
        await anext(observation)
        attempts = 0

        async def wrong_psk() -> None:
            nonlocal attempts
            peer = await DtlsPeer.create(b"ae-b", b"not-the-psk-of-ae-b", rig.address)
            try:
                assert not await peer.handshake(timeout=0.05)  # dropped silently, as tinydtls does
                attempts += 1
            finally:
                peer.close(notify=False)

        for _ in range(2000 // 40):
            await asyncio.gather(*(wrong_psk() for _ in range(40)))
            assert (await ae_a.get_key(NAF)).btid == first.btid
        assert attempts == 2000
        await ae_a.force_bootstrap()
        assert (await asyncio.wait_for(anext(observation), 10)).btid != first.btid
        await observation.aclose()


# --- item 3 and 6: malformed CoAP from a registered AE ------------------------------------------------


async def test_a_path_that_is_not_utf8_gets_4_02_and_no_traceback(rig: Rig) -> None:
    peer = await rig.peer()
    try:
        raw = bytes([0x42, 0x01, 0x00, 0x11]) + b"t1" + bytes([0xB2, 0xFF, 0xFE])  # CON GET /<ff fe>
        answer = aiocoap.Message.decode(await peer.exchange(raw) or b"")
        assert (answer.mtype, answer.mid, answer.token, answer.code) == (Type.ACK, 0x11, b"t1", Code.BAD_OPTION)
        assert answer.payload.startswith(b"bad-option: Uri-Path (11) is not UTF-8")
        status = await peer.request(coap_request(Code.GET, ["status"], mid=0x12))
        assert status is not None and status.code == Code.CONTENT  # the session goes on
    finally:
        peer.close()
    await rig.daemon.wait_log("dropped malformed CoAP from AE 'ae-a'")
    assert len(rig.log_lines("malformed CoAP")) == 1


@pytest.mark.parametrize("token_length", [9, 12, 15])
async def test_a_reserved_token_length_is_a_message_format_error(rig: Rig, token_length: int) -> None:
    peer = await rig.peer()
    try:
        token = bytes(range(token_length))
        path = bytes([0xB3]) + b"key"
        con = bytes([0x40 | token_length, 0x01, 0x00, 0x21]) + token + path
        reset = aiocoap.Message.decode(await peer.exchange(con) or b"")
        assert (reset.mtype, reset.mid, reset.code) == (Type.RST, 0x21, Code.EMPTY)  # not 4.04
        non = bytes([0x50 | token_length, 0x01, 0x00, 0x22]) + token + path
        assert await peer.exchange(non, timeout=0.3) is None  # ignored
        status = await peer.request(coap_request(Code.GET, ["status"], mid=0x23))
        assert status is not None and status.code == Code.CONTENT
    finally:
        peer.close()


async def test_garbage_from_a_registered_ae_is_logged_once_a_minute(rig: Rig) -> None:
    peer = await rig.peer()
    try:
        for i in range(300):
            assert peer.dtls is not None
            peer.dtls.write(peer.session, os.urandom(3 + i % 40))  # encrypted, authenticated, garbage
        await asyncio.sleep(0.5)
        while not peer.plaintext.empty():  # Resets and errors for the garbage that looked like CON messages
            peer.plaintext.get_nowait()
        status = await peer.request(coap_request(Code.GET, ["status"], mid=0x31))
        assert status is not None and status.code == Code.CONTENT
    finally:
        peer.close()
    assert len(rig.log_lines("malformed CoAP from AE 'ae-a'")) <= 1


# --- item 4: observations --------------------------------------------------------------------------------


async def observe_many(peer: DtlsPeer, count: int, first_mid: int) -> int:
    """Register ``count`` observations of /key (distinct tokens); returns how many were accepted."""
    accepted = 0
    for i in range(count):
        request = coap_request(
            Code.GET, ["key"], mid=(first_mid + i) & 0xFFFF, token=(first_mid + i).to_bytes(4, "big"), observe=0
        )
        request.opt.uri_query = (f"naf={NAF}",)
        answer = await peer.request(request)
        assert answer is not None and answer.code == Code.CONTENT, answer
        accepted += answer.opt.observe is not None
    return accepted


async def test_observations_are_bounded_per_ae_freed_with_the_session_and_a_wipe_stays_cheap(rig: Rig) -> None:
    async with rig.client("ae-b", PSK_B) as ae_b:
        await ae_b.get_key(NAF)  # bootstrapped
        peer = await rig.peer()
        rss_before = rig.rss_mib()
        assert await observe_many(peer, 2000, 1) == 4  # RFC 7641: the rest answered as plain GETs
        rss_grown = rig.rss_mib() - rss_before
        print(f"daemon RSS grew {rss_grown:.1f} MiB for 2000 observation requests (4 accepted)")
        assert rss_grown < 12
        assert len(rig.log_lines("already holds 4 observations")) == 1
        peer.close(notify=True)  # the session ends, and its observations with it
        await asyncio.sleep(0.2)
        again = await rig.peer()
        assert await observe_many(again, 6, 5000) == 4
        assert rig.world.modem is not None
        rig.world.modem.remove_sim()
        started = time.monotonic()
        with pytest.raises(KeyServiceRejected):  # another AE is answered at once, card gone or not
            for _ in range(50):
                await ae_b.get_key(NAF, force=True)
                await asyncio.sleep(0.05)
        status = await ae_b.status()
        assert time.monotonic() - started < 5.0
        assert not status.card_present
        again.close()
    await rig.daemon.wait_log("key event")
    assert len(rig.log_lines("key event")) <= 2  # one line per event, not one per observer


# --- what passed before and must keep passing ---------------------------------------------------------------


async def test_random_datagrams_and_malformed_records_leave_nothing_behind(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    hello = client_hello()
    try:
        for i in range(500):
            transport.sendto(os.urandom(1 + i % 200), rig.address)
            transport.sendto(hello[: 13 + i % (len(hello) - 13)], rig.address)  # truncated ClientHellos
            transport.sendto(hello[:13] + os.urandom(i % 100), rig.address)  # a record header, then noise
    finally:
        transport.close()
    async with rig.client() as ae_a:
        assert (await ae_a.get_key(NAF)).naf_fqdn == NAF
    assert not rig.log_lines("WARNING|ERROR")


@pytest.mark.parametrize("tool", ["coap-client-gnutls", "coap-client-openssl"])
async def test_an_oversize_identity_is_refused_without_log_noise(rig: Rig, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian package libcoap3-bin)")
    identity = "x" * 200  # beyond the 128 octets our tinydtls takes
    proc = await asyncio.create_subprocess_exec(
        tool, "-B", "2", "-u", identity, "-k", "whatever-psk-0001", f"coaps://127.0.0.1:{rig.port}/status",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert b"card_present" not in out and b"lert" in out  # refused with a fatal alert (internal_error)
    async with rig.client() as ae_a:
        assert (await ae_a.status()).card_present
    assert not rig.log_lines("WARNING|ERROR")


async def test_no_secret_reaches_the_log(rig: Rig) -> None:
    async with rig.client() as ae_a:
        key = await ae_a.get_key(NAF)
        await asyncio.sleep(1.1)  # min_forced_interval
        await ae_a.force_bootstrap()
        fresh = await ae_a.get_key(NAF)
    peer = await rig.peer()
    await peer.exchange(bytes([0x42, 0x01, 0x00, 0x41]) + b"t1" + bytes([0xB2, 0xFF, 0xFE]))
    peer.close()
    log = "\n".join(rig.daemon.stderr)
    for secret in (PSK_A, PSK_B, key.key, fresh.key):
        assert secret.hex() not in log and secret.decode("latin-1") not in log

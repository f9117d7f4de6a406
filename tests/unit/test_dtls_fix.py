"""mn_secd.control.dtls_fix: each fix works, and upstream still needs it.

The ``test_upstream_*`` tests exercise aiocoap's unpatched code and assert the defect is still
there. When one fails after an upgrade, the matching fix in dtls_fix.py can probably go.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from resource import RUSAGE_SELF, getrusage
from typing import Any

import aiocoap
import aiocoap.resource as resource
import pytest
from aiocoap.credentials import CredentialsMap
from aiocoap.numbers.codes import Code
from aiocoap.transports import tinydtls, tinydtls_server
from dtls_peer import DtlsPeer, coap_request
from DTLSSocket import dtls

from mn_secd.dtls import fixes as dtls_fix
from mn_secd.errors import BindError, DtlsFixMismatch

PSKS = {b"ae1": b"secret-psk-ae1", b"ae2": b"secret-psk-ae2", b"long": b"x" * 65}


class Credentials(CredentialsMap):  # type: ignore[misc]
    """Claims are the identity as text, like the registry's."""

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, str]:
        return PSKS[identity], identity.decode()


class Whoami(resource.Resource):  # type: ignore[misc]
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        claim = dtls_fix.authenticated_claim(request.remote)
        return aiocoap.Message(payload=repr(claim).encode())


def upstream_credentials() -> CredentialsMap:
    """Upstream needs a non-empty map (see test_upstream_replaces_an_empty_credentials_map)."""
    creds = CredentialsMap()
    creds.load_from_dict({f":{i.decode()}": {"dtls": {"psk": p, "client-identity": i}} for i, p in PSKS.items()})
    return creds


def site() -> resource.Site:
    s = resource.Site()
    s.add_resource(["whoami"], Whoami())
    return s


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Server = tuple[aiocoap.Context, tuple[str, int], dtls_fix.PeerTable]
ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    contexts: list[aiocoap.Context] = []

    async def make(max_peers: int = 64, idle_timeout: float = 60.0, port: int = 0) -> Server:
        [ctx] = await dtls_fix.create_dtls_server_contexts(
            site(), Credentials(), ["127.0.0.1"], port, max_peers=max_peers, idle_timeout=idle_timeout
        )
        contexts.append(ctx)
        return ctx, dtls_fix.bound_address(ctx), dtls_fix.peer_table(ctx)

    yield make
    for ctx in contexts:
        await ctx.shutdown()


@pytest.fixture
async def upstream_server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Server]:
    """aiocoap's DTLS server exactly as released (the fixes swapped out for this test)."""
    dtls_fix.apply()
    monkeypatch.setattr(
        tinydtls_server.MessageInterfaceTinyDTLSServer, "_serversocket", tinydtls_server._DatagramServerSocketSimpleDTLS
    )
    port = free_udp_port()
    ctx = await aiocoap.Context.create_server_context(
        site(), bind=("127.0.0.1", port - 1), server_credentials=upstream_credentials(), transports=["tinydtls_server"]
    )
    pool = ctx.request_interfaces[0].token_interface.message_interface._pool
    assert type(pool) is tinydtls_server._DatagramServerSocketSimpleDTLS
    yield ctx, ("127.0.0.1", port), pool
    for address in list(pool._connections.values()):  # upstream leaves tinydtls peers behind at shutdown
        address._dtls_socket.resetPeer(address._dtls_session)
    await ctx.shutdown()


async def connect(server: tuple[str, int], identity: bytes = b"ae1", port: int = 0) -> DtlsPeer:
    peer = await DtlsPeer.create(identity, PSKS[identity], server, port)
    assert await peer.handshake(), peer.events
    return peer


async def whoami(peer: DtlsPeer, mid: int) -> str | None:
    answer = await peer.request(coap_request(Code.GET, ["whoami"], mid=mid))
    return None if answer is None else answer.payload.decode()


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- the upstream version check ---------------------------------------------------------------------


def test_upstream_is_what_the_fixes_were_written_for() -> None:
    dtls_fix.check_upstream()


def test_a_changed_upstream_source_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    module = "aiocoap.transports.tinydtls_server"
    monkeypatch.setitem(dtls_fix.UPSTREAM_SOURCES, module, "0" * 64)
    with pytest.raises(DtlsFixMismatch, match=module):
        dtls_fix.check_upstream()


def test_another_aiocoap_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiocoap.meta, "version", "0.4.18")
    with pytest.raises(DtlsFixMismatch, match=r"aiocoap 0\.4\.17, found 0\.4\.18"):
        dtls_fix.check_upstream()


def test_the_unpatched_dtlssocket_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.2.3" if name == "DTLSSocket" else real_version(name)
    )
    with pytest.raises(DtlsFixMismatch, match=r"unpatched DTLSSocket 0\.2\.3"):
        dtls_fix.check_upstream()


def test_apply_is_idempotent() -> None:
    dtls_fix.apply()
    patched = tinydtls.DTLSClientConnection._event
    dtls_fix.apply()
    assert tinydtls.DTLSClientConnection._event is patched
    assert patched is not dtls_fix.UPSTREAM_CLIENT_EVENT
    assert tinydtls_server.MessageInterfaceTinyDTLSServer._serversocket is dtls_fix.PeerTable
    assert dtls.DTLS is dtls_fix.ClockTrackingDTLS


# --- upstream still has the defects (these fail when upstream fixes them) -----------------------------


class _Recorder:
    def __init__(self) -> None:
        self.injected: list[BaseException] = []
        self.log = logging.getLogger("test.upstream")

    def _inject_error(self, exc: BaseException) -> None:
        self.injected.append(exc)


def test_upstream_server_ignores_warning_close_notify(caplog: pytest.LogCaptureFixture) -> None:
    peer = _Recorder()
    with caplog.at_level(logging.WARNING, "test.upstream"):
        tinydtls_server._AddressDTLS._event(peer, 1, tinydtls.CODE_CLOSE_NOTIFY)
    assert peer.injected == []
    assert "Unhandled alert level 1 code 0" in caplog.text
    tinydtls_server._AddressDTLS._event(peer, tinydtls.LEVEL_FATAL, tinydtls.CODE_CLOSE_NOTIFY)
    assert len(peer.injected) == 1


def test_upstream_client_ignores_warning_close_notify(caplog: pytest.LogCaptureFixture) -> None:
    conn = _Recorder()
    with caplog.at_level(logging.WARNING, "test.upstream"):
        dtls_fix.UPSTREAM_CLIENT_EVENT(conn, 1, tinydtls.CODE_CLOSE_NOTIFY)
    assert conn.injected == []
    assert "Unhandled alert level 1 code 0" in caplog.text


def test_upstream_replaces_an_empty_credentials_map() -> None:
    lookup_elsewhere = Credentials()
    ctx = aiocoap.Context(loop=asyncio.new_event_loop(), server_credentials=lookup_elsewhere)
    ctx.loop.close()
    assert ctx.server_credentials is not lookup_elsewhere


async def test_upstream_server_keeps_closed_peers_without_bound(upstream_server: Server) -> None:
    _, address, pool = upstream_server
    peers = [await connect(address) for _ in range(tinydtls_server._DatagramServerSocketSimpleDTLS.max_sockets + 6)]
    for peer in peers:
        peer.close(notify=True)
    await asyncio.sleep(0.1)
    assert len(pool._connections) == len(peers) > pool.max_sockets


async def test_upstream_server_locks_out_a_new_identity_on_a_reused_port(upstream_server: Server) -> None:
    _, address, _ = upstream_server
    first = await connect(address, b"ae1")
    assert await whoami(first, 1) is not None
    port = first.port
    first.close(notify=False)
    await asyncio.sleep(0.05)  # the socket closes on the next loop iteration
    second = await DtlsPeer.create(b"ae2", PSKS[b"ae2"], address, port)
    assert not await second.handshake(timeout=1.0)
    second.close(notify=False)


def test_upstream_dtlssocket_resets_the_tinydtls_clock_with_every_context() -> None:
    """Fix 13: a context's retransmission deadline moves back when another context is created."""

    def pending_deadline() -> int:
        context = dtls.DTLS(read=lambda *_: 0, write=lambda _, data: len(data), event=lambda *_: None,
                            pskId=b"id", pskStore={b"id": b"psk"})  # fmt: skip
        session = context.connect("::1", 1234)  # a ClientHello "sent": a retransmission is now pending
        deadline: int = context.checkRetransmit()
        context.resetPeer(session)  # never free a context holding a peer (see dtls_peer.DtlsPeer.close)
        return deadline

    first = pending_deadline()
    time.sleep(1.2)
    second = pending_deadline()
    # Without the reset the second deadline would be 1200 ticks later; the origin moved by 1-2 s.
    assert second - first < 700


# --- the fixes --------------------------------------------------------------------------------------


async def test_claim_comes_from_the_handshake(make_server: ServerFactory) -> None:
    _, address, _ = await make_server()
    peer = await connect(address, b"ae2")
    assert await whoami(peer, 1) == "'ae2'"
    peer.close()


async def test_close_notify_frees_the_peer(make_server: ServerFactory) -> None:
    _, address, table = await make_server()
    peer = await connect(address)
    assert len(table) == 1
    peer.close(notify=True)
    await eventually(lambda: len(table) == 0)


async def test_idle_peers_are_purged(make_server: ServerFactory) -> None:
    _, address, table = await make_server(idle_timeout=0.5)
    vanished = await connect(address)
    assert await whoami(vanished, 1) is not None
    wrong_psk = await DtlsPeer.create(b"ae1", b"not-the-psk", address)
    assert not await wrong_psk.handshake(timeout=0.1)
    assert len(table) == 2
    await eventually(lambda: len(table) == 0, timeout=2.0)
    await eventually(lambda: vanished.got_close_notify)  # evicted sessions are told
    vanished.close(notify=False)
    wrong_psk.close(notify=False)


async def test_table_is_bounded_stalled_handshakes_go_first_then_the_least_recent(
    make_server: ServerFactory,
) -> None:
    _, address, table = await make_server(max_peers=4)
    now = [1000.0]
    table.clock = lambda: now[0]
    keeper = await connect(address)
    half_open = []
    for _ in range(3):  # each sends its whole flight; the server drops the Finished it cannot verify
        peer = await DtlsPeer.create(b"ae1", b"wrong-psk", address)
        assert not await peer.handshake(timeout=0.05)
        half_open.append(peer)
    assert len(table) == 4
    now[0] += dtls_fix.HANDSHAKE_STALL  # the half-open ones have stalled; the keeper merely went quiet
    full = [await connect(address) for _ in range(3)]
    assert len(table) == 4
    assert not keeper.got_close_notify  # the stalled handshakes made room, not the idle session
    assert await whoami(keeper, 1) == "'ae1'"
    now[0] += 1
    assert await whoami(full[0], 2) == "'ae1'"
    newest = await connect(address)  # full: the least recently active peer goes (full[1], not the keeper)
    assert len(table) == 4
    await eventually(lambda: full[1].got_close_notify)
    assert await whoami(keeper, 3) == "'ae1'" and await whoami(newest, 4) == "'ae1'"
    for p in [keeper, *half_open, *full, newest]:
        p.close(notify=False)


async def test_a_burst_of_new_clients_displaces_quiet_peers_not_each_other(make_server: ServerFactory) -> None:
    _, address, table = await make_server(max_peers=8)
    quiet = [await connect(address) for _ in range(8)]
    burst = await asyncio.gather(*(DtlsPeer.create(b"ae1", PSKS[b"ae1"], address) for _ in range(8)))
    assert all(await asyncio.gather(*(p.handshake() for p in burst)))
    assert len(table) == 8
    await eventually(lambda: all(p.got_close_notify for p in quiet))
    for p in [*quiet, *burst]:
        p.close(notify=False)


async def test_new_identity_on_a_reused_port_gets_its_own_session(make_server: ServerFactory) -> None:
    _, address, _ = await make_server()
    for notify in (True, False):
        first = await connect(address, b"ae1")
        assert await whoami(first, 7) == "'ae1'"
        port = first.port
        first.close(notify=notify)
        await asyncio.sleep(0.05)
        second = await connect(address, b"ae2", port)
        # Same message id as the first client: a per-address dedup cache would replay "'ae1'".
        assert await whoami(second, 7) == "'ae2'"
        second.close()
        await asyncio.sleep(0.05)


async def test_a_psk_tinydtls_cannot_hold_is_refused(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    _, address, _ = await make_server()
    peer = await DtlsPeer.create(b"long", b"x" * 32, address)  # the client side must not overflow either
    with caplog.at_level(logging.ERROR, "mn_secd.control.dtls_fix"):
        assert not await peer.handshake(timeout=1.0)
    assert "PSKs of 1 to 64 octets" in caplog.text
    peer.close(notify=False)
    with pytest.raises(ValueError, match="1 to 64 octets"):
        dtls_fix.check_psk(b"x" * 65)
    assert dtls_fix.check_psk(b"x" * 64) == b"x" * 64


async def test_sessions_can_be_evicted_by_claim(make_server: ServerFactory) -> None:
    ctx, address, table = await make_server()
    a, b = await connect(address, b"ae1"), await connect(address, b"ae2")
    assert dtls_fix.evict_sessions([ctx], lambda claim: claim == "ae1") == 1
    await eventually(lambda: a.got_close_notify)
    await asyncio.sleep(0.05)
    assert len(table) == 1  # a's close_notify in reply does not create a new entry
    assert await whoami(b, 1) == "'ae2'"
    a.close(notify=False)
    b.close()


async def test_the_port_is_the_real_coaps_port_and_bound_exclusively(make_server: ServerFactory) -> None:
    port = free_udp_port()
    _, address, _ = await make_server(port=port)
    assert address == ("127.0.0.1", port)
    with pytest.raises(BindError, match=f"coaps://127.0.0.1:{port}"):
        await make_server(port=port)


async def test_aiocoap_client_recovers_from_an_evicted_session(make_server: ServerFactory) -> None:
    ctx, (host, port), table = await make_server()
    client = await aiocoap.Context.create_client_context(transports=["tinydtls"])
    try:
        client.client_credentials.load_from_dict(
            {f"coaps://{host}:{port}/*": {"dtls": {"psk": PSKS[b"ae1"], "client-identity": b"ae1"}}}
        )
        uri = f"coaps://{host}:{port}/whoami"
        first = await asyncio.wait_for(client.request(aiocoap.Message(code=Code.GET, uri=uri)).response, 5)
        assert first.payload == b"'ae1'"
        assert dtls_fix.evict_sessions([ctx], lambda claim: True) == 1
        await asyncio.sleep(0.1)
        # Upstream's client ignores the warning-level close_notify and would wait ~90 s here.
        second = await asyncio.wait_for(client.request(aiocoap.Message(code=Code.GET, uri=uri)).response, 3)
        assert second.payload == b"'ae1'"
        assert len(table) == 1
    finally:
        await client.shutdown()


class _Mute(DtlsPeer):
    """A client that vanishes mid-handshake: it hears the HelloVerifyRequest, then nothing more."""

    heard = 0

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.heard += 1
        if self.heard == 1:
            super().datagram_received(data, addr)


async def test_a_stalled_handshake_does_not_make_the_server_spin(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fix 13: with aiocoap's clock origin where a long-running daemon has it, no busy loop."""
    for module in (tinydtls, tinydtls_server):
        monkeypatch.setattr(module, "DTLS_CLOCK_OFFSET", time.time() - 3600)  # imported an hour ago
    _, address, _ = await make_server()
    mute = await _Mute.create(b"ae1", PSKS[b"ae1"], address)
    assert not await mute.handshake(timeout=0.2)
    before = resource_usage()
    await asyncio.sleep(1.5)  # the server retransmits its flight to the silent client meanwhile
    assert resource_usage() - before < 0.3
    assert mute.heard >= 2
    mute.close(notify=False)


def resource_usage() -> float:
    usage = getrusage(RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


def test_authenticated_claim_is_none_for_anything_but_a_dtls_session() -> None:
    assert dtls_fix.authenticated_claim(object()) is None
    fake: Any = type("Remote", (), {"claim": "ae1", "authenticated_claims": ["ae1"]})()
    assert dtls_fix.authenticated_claim(fake) is None

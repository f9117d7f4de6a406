"""mn_secd.dtls: its transports fix what upstream gets wrong, and upstream still gets it wrong.

The ``test_upstream_*`` tests exercise aiocoap's and DTLSSocket's own code and assert the defect
is still there. When one fails after an upgrade, the matching part of mn_secd/dtls can probably go.
The others run mn_secd's server and client transports over loopback DTLS.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from resource import RUSAGE_SELF, getrusage
from typing import Any

import aiocoap
import aiocoap.resource as resource
import pytest
from aiocoap.credentials import CredentialsMap
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe
from aiocoap.transports import tinydtls, tinydtls_server
from dtls_peer import DtlsPeer, client_hello, coap_request
from DTLSSocket import dtls

from mn_secd.dtls import rendering, upstream
from mn_secd.dtls import server as dtls_server
from mn_secd.dtls import session as dtls_session
from mn_secd.dtls import table as dtls_table
from mn_secd.dtls.client import HandshakeProgress, client_handshake_progress, create_dtls_client_context
from mn_secd.errors import BindError, DtlsFixMismatch

PSKS = {b"ae1": b"secret-psk-ae1", b"ae2": b"secret-psk-ae2", b"long": b"x" * 65}


class Credentials(CredentialsMap):  # type: ignore[misc]
    """Claims are the identity as text, like the registry's."""

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, str]:
        return PSKS[identity], identity.decode()


class Whoami(resource.Resource):  # type: ignore[misc]
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        claim = dtls_session.authenticated_claim(request.remote)
        return aiocoap.Message(payload=repr(claim).encode())


class Counted(resource.Resource):  # type: ignore[misc]
    """Answers how many requests it has rendered so far."""

    def __init__(self) -> None:
        super().__init__()
        self.renders = 0

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.renders += 1
        return aiocoap.Message(payload=str(self.renders).encode())


class ReprCounted(aiocoap.Message):  # type: ignore[misc]
    """A request that counts how often it is formatted."""

    reprs = 0

    def __repr__(self) -> str:
        ReprCounted.reprs += 1
        return "<a request>"


def upstream_credentials() -> CredentialsMap:
    """Upstream needs a non-empty map (see test_upstream_replaces_an_empty_credentials_map)."""
    creds = CredentialsMap()
    creds.load_from_dict({f":{i.decode()}": {"dtls": {"psk": p, "client-identity": i}} for i, p in PSKS.items()})
    return creds


def site() -> resource.Site:
    s = resource.Site()
    s.add_resource(["whoami"], Whoami())
    s.add_resource(["count"], Counted())
    return s


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Finalise this test's DTLS objects now, not while a later test module is being compiled.

    An aiocoap client context shut down mid-handshake leaves a suspended request in a reference
    cycle; CPython 3.11 before 3.11.8 raises "AST constructor recursion depth mismatch" if the
    collector finalises it during a compile (python/cpython#106905).
    """
    yield
    gc.collect()


Server = tuple[aiocoap.Context, tuple[str, int], dtls_table.PeerTable]
ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    contexts: list[aiocoap.Context] = []

    async def make(max_peers: int = 64, idle_timeout: float = 60.0, port: int = 0, **kw: int) -> Server:
        [ctx] = await dtls_server.create_dtls_server_contexts(
            site(), Credentials(), ["127.0.0.1"], port, max_peers=max_peers, idle_timeout=idle_timeout, **kw
        )
        contexts.append(ctx)
        return ctx, dtls_server.bound_address(ctx), dtls_server.peer_table(ctx)

    yield make
    for ctx in contexts:
        await ctx.shutdown()


@pytest.fixture
async def upstream_server() -> AsyncIterator[Server]:
    """aiocoap's DTLS server exactly as released: a plain context, nothing of mn_secd involved."""
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


class Flood(asyncio.DatagramProtocol):
    """Sends ClientHellos from one socket and counts what comes back."""

    def __init__(self) -> None:
        self.answers: list[bytes] = []

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.answers.append(data)


async def flood(server: tuple[str, int], sockets: int, per_socket: int) -> list[Flood]:
    loop = asyncio.get_running_loop()
    floods = []
    for _ in range(sockets):
        transport, protocol = await loop.create_datagram_endpoint(Flood, local_addr=("127.0.0.1", 0))
        for _ in range(per_socket):
            transport.sendto(client_hello(), server)
        floods.append((transport, protocol))
    await asyncio.sleep(0.3)
    for transport, _ in floods:
        transport.close()
    return [protocol for _, protocol in floods]


# --- the upstream version check ---------------------------------------------------------------------


def test_upstream_is_what_the_transports_were_written_for() -> None:
    upstream.check_upstream()


def test_a_changed_upstream_source_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    module = "aiocoap.transports.tinydtls"
    monkeypatch.setitem(upstream.UPSTREAM_SOURCES, module, "0" * 64)
    with pytest.raises(DtlsFixMismatch, match=module):
        upstream.check_upstream()


@pytest.mark.parametrize(
    ("distribution", "package"), [("DTLSSocket", "DTLSSocket"), ("aiocoap", "aiocoap"), ("cbor2", "cbor2")]
)
def test_installed_versions_are_those_importlib_metadata_reads(distribution: str, package: str) -> None:
    assert upstream.installed_version(distribution, package) == importlib.metadata.version(distribution)


def test_a_package_without_a_distribution_has_no_version() -> None:
    assert upstream.installed_version("mn-secd-no-such-thing", "json") is None
    assert upstream.installed_version("anything", "mn_secd_no_such_package") is None


def test_another_aiocoap_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiocoap.meta, "version", "0.4.18")
    with pytest.raises(DtlsFixMismatch, match=r"aiocoap 0\.4\.17, found 0\.4\.18"):
        upstream.check_upstream()


def test_the_unpatched_dtlssocket_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "installed_version", lambda distribution, package: "0.2.3")
    with pytest.raises(DtlsFixMismatch, match=r"unpatched DTLSSocket 0\.2\.3"):
        upstream.check_upstream()


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
        tinydtls.DTLSClientConnection._event(conn, 1, tinydtls.CODE_CLOSE_NOTIFY)
    assert conn.injected == []
    assert "Unhandled alert level 1 code 0" in caplog.text


def test_upstream_replaces_an_empty_credentials_map() -> None:
    lookup_elsewhere = Credentials()
    ctx = aiocoap.Context(loop=asyncio.new_event_loop(), server_credentials=lookup_elsewhere)
    ctx.loop.close()
    assert ctx.server_credentials is not lookup_elsewhere


def test_upstream_decoding_raises_on_a_path_that_is_not_utf8_and_takes_a_reserved_token_length() -> None:
    with pytest.raises(UnicodeDecodeError):
        aiocoap.Message.decode(bytes([0x40, 0x01, 0, 1, 0xB2, 0xFF, 0xFE]))  # CON GET, Uri-Path ff fe
    long_token = aiocoap.Message.decode(bytes([0x49, 0x01, 0, 1]) + b"123456789")  # token length 9
    assert long_token.token == b"123456789"  # RFC 7252 3: a message format error, not a token


def test_upstream_dtlssocket_leaves_an_exception_of_a_callback_set() -> None:
    """What aiocoap's callbacks cause when they raise inside tinydtls: handleMessage's SystemError."""

    def failing_write(_: object, data: bytes) -> int:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a callback failed")

    context = dtls.DTLS(read=lambda *_: 0, write=failing_write, event=lambda *_: None, pskId=b"x", pskStore={})
    with pytest.raises(SystemError, match="returned a result with an exception set"):
        context.handleMessage(dtls.Session("::1", 5555), client_hello())


async def test_upstream_server_spends_a_context_on_every_client_hello(upstream_server: Server) -> None:
    _, address, pool = upstream_server
    await flood(address, sockets=20, per_socket=1)
    assert len(pool._connections) == 20  # before any cookie was checked


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


class _NoCarrier:
    hostinfo_local = "[::1]:5684"


async def render_in(context_class: type[aiocoap.Context]) -> list[bytes]:
    """Render one GET whoami through ``context_class.render_to_pipe``; the answers' payloads."""
    ctx = context_class(loop=asyncio.get_running_loop(), serversite=site())
    request = ReprCounted(code=Code.GET, uri_path=["whoami"])
    request.remote = dtls_session.Session(_NoCarrier(), ("::1", 1), "[::1]:1", "ae1")
    request.direction = Direction.INCOMING  # as a decoded datagram is
    pipe = Pipe(request, logging.getLogger("test.render"))
    answers: list[bytes] = []

    def on_event(event: Any) -> bool:
        answers.append(event.message.payload)
        return not event.is_last

    pipe.on_event(on_event)
    ctx.render_to_pipe(pipe)
    await eventually(lambda: bool(answers))
    return answers


async def test_upstream_formats_every_request_it_renders() -> None:
    ReprCounted.reprs = 0
    assert await render_in(aiocoap.Context) == [b"'ae1'"]
    assert ReprCounted.reprs == 1  # the rendering task's name


async def test_our_server_context_renders_without_formatting_the_request() -> None:
    ReprCounted.reprs = 0
    assert await render_in(rendering.ServerContext) == [b"'ae1'"]
    assert ReprCounted.reprs == 0


def test_upstream_asyncio_receives_each_datagram_into_a_quarter_megabyte() -> None:
    """Above glibc's mmap threshold (128 KiB): an mmap, mremap and munmap per datagram received."""
    from asyncio import selector_events

    assert selector_events._SelectorDatagramTransport.max_size == 256 * 1024


async def test_our_server_receives_into_64_kib(make_server: ServerFactory) -> None:
    _, address, table = await make_server()
    assert table._transport is not None and table._transport.max_size == 64 * 1024  # any UDP datagram fits
    peer = await connect(address)
    assert await whoami(peer, 1) == "'ae1'"
    peer.close()


def test_upstream_dtlssocket_resets_the_tinydtls_clock_with_every_context() -> None:
    """A context's retransmission deadline moves back when another context is created."""

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


# --- mn_secd's server -----------------------------------------------------------------------------------


async def test_claim_comes_from_the_handshake(make_server: ServerFactory) -> None:
    _, address, table = await make_server()
    peer = await connect(address, b"ae2")
    assert await whoami(peer, 1) == "'ae2'"
    assert (table.sessions, table.handshakes) == (1, 0)
    peer.close()


async def test_a_retransmitted_request_gets_the_same_datagram_without_being_rendered_again(
    make_server: ServerFactory,
) -> None:
    ctx, address, _ = await make_server()
    peer = await connect(address)
    request = coap_request(Code.GET, ["count"], mid=7).encode()
    first = await peer.exchange(request)
    again = await peer.exchange(request)  # the same message ID: a retransmission (RFC 7252 4.5)
    other = await peer.exchange(coap_request(Code.GET, ["count"], mid=8).encode())
    peer.close()
    assert first is not None and again == first
    assert aiocoap.Message.decode(first).payload == b"1"
    assert other is not None and aiocoap.Message.decode(other).payload == b"2"
    assert ctx.serversite._resources[("count",)].renders == 2


async def test_a_client_hello_without_a_cookie_costs_no_state(make_server: ServerFactory) -> None:
    _, address, table = await make_server(max_peers=4)
    keeper = await connect(address)
    floods = await flood(address, sockets=50, per_socket=20)
    assert all(len(f.answers) == 20 for f in floods)  # each got its HelloVerifyRequest ...
    assert all(a[0] == 22 and a[13] == 3 for f in floods for a in f.answers)
    assert len(table) == 1 and table.evictions == 0  # ... and the server kept nothing
    assert await whoami(keeper, 1) == "'ae1'"
    keeper.close()


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
    assert (table.sessions, table.handshakes) == (1, 1)
    await eventually(lambda: len(table) == 0, timeout=2.0)
    await eventually(lambda: vanished.got_close_notify)  # evicted sessions are told
    vanished.close(notify=False)
    wrong_psk.close(notify=False)


async def test_a_session_held_by_a_resource_is_not_idle(make_server: ServerFactory) -> None:
    _, address, table = await make_server(idle_timeout=0.3)
    observer = await connect(address)
    assert await whoami(observer, 1) is not None
    [peer] = table._peers.values()
    assert peer.session is not None
    release = dtls_session.hold_session(peer.session)
    await asyncio.sleep(0.8)
    assert table.sessions == 1 and not observer.got_close_notify
    release()
    release()  # idempotent
    await eventually(lambda: observer.got_close_notify, timeout=2.0)
    observer.close(notify=False)


async def test_handshakes_displace_only_handshakes_oldest_first(make_server: ServerFactory) -> None:
    _, address, table = await make_server(max_peers=2, max_handshakes=3)
    sessions = [await connect(address), await connect(address)]
    stalled = []
    for _ in range(5):  # each sends its whole flight; the server drops the Finished it cannot verify
        peer = await DtlsPeer.create(b"ae1", b"wrong-psk", address)
        assert not await peer.handshake(timeout=0.05)
        stalled.append(peer)
    assert (table.sessions, table.handshakes) == (2, 3)
    await eventually(lambda: stalled[0].got_close_notify and stalled[1].got_close_notify)  # the oldest went
    assert not any(p.got_close_notify for p in stalled[2:])
    assert not any(p.got_close_notify for p in sessions)  # never a session for a handshake
    assert [await whoami(p, 1) for p in sessions] == ["'ae1'", "'ae1'"]
    for p in [*sessions, *stalled]:
        p.close(notify=False)


async def test_a_new_session_displaces_the_least_recently_active_one(make_server: ServerFactory) -> None:
    _, address, table = await make_server(max_peers=3)
    now = [1000.0]
    table.clock = lambda: now[0]
    first, second, third = [await connect(address) for _ in range(3)]
    now[0] += 1
    assert await whoami(first, 1) == "'ae1'"  # first is now the most recently active
    fourth = await connect(address)
    await eventually(lambda: second.got_close_notify)
    assert table.sessions == 3
    assert not first.got_close_notify and not third.got_close_notify
    assert await whoami(first, 2) == "'ae1'" and await whoami(fourth, 1) == "'ae1'"
    for p in (first, second, third, fourth):
        p.close(notify=False)


async def test_a_burst_of_new_clients_displaces_quiet_sessions_not_each_other(make_server: ServerFactory) -> None:
    _, address, table = await make_server(max_peers=8)
    quiet = [await connect(address) for _ in range(8)]
    burst = await asyncio.gather(*(DtlsPeer.create(b"ae1", PSKS[b"ae1"], address) for _ in range(8)))
    assert all(await asyncio.gather(*(p.handshake() for p in burst)))
    assert table.sessions == 8
    await eventually(lambda: all(p.got_close_notify for p in quiet))
    for p in [*quiet, *burst]:
        p.close(notify=False)


async def test_new_identity_on_a_reused_port_gets_its_own_session(make_server: ServerFactory) -> None:
    _, address, table = await make_server()
    for notify in (True, False):
        first = await connect(address, b"ae1")
        assert await whoami(first, 7) == "'ae1'"
        port = first.port
        first.close(notify=notify)
        await asyncio.sleep(0.05)
        second = await connect(address, b"ae2", port)
        # Same message id as the first client: a per-address dedup cache would replay "'ae1'".
        assert await whoami(second, 7) == "'ae2'"
        assert table.sessions == 1
        second.close()
        await asyncio.sleep(0.05)


async def test_a_psk_tinydtls_cannot_hold_is_refused(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    _, address, table = await make_server()
    peer = await DtlsPeer.create(b"long", b"x" * 32, address)  # the client side must not overflow either
    with caplog.at_level(logging.ERROR, "mn_secd.dtls.table"):
        assert not await peer.handshake(timeout=1.0)
    assert "PSKs of 1 to 64 octets" in caplog.text
    await eventually(lambda: len(table) == 0)  # the refused handshake left nothing behind
    peer.close(notify=False)
    with pytest.raises(ValueError, match="1 to 64 octets"):
        upstream.check_psk(b"x" * 65)
    assert upstream.check_psk(b"x" * 64) == b"x" * 64


async def test_sessions_can_be_evicted_by_claim(make_server: ServerFactory) -> None:
    ctx, address, table = await make_server()
    a, b = await connect(address, b"ae1"), await connect(address, b"ae2")
    assert dtls_server.evict_sessions([ctx], lambda claim: claim == "ae1") == 1
    await eventually(lambda: a.got_close_notify)
    await asyncio.sleep(0.05)
    assert len(table) == 1  # a's close_notify in reply does not create a new entry
    assert await whoami(b, 1) == "'ae2'"
    a.close(notify=False)
    b.close()


async def test_a_session_tinydtls_lost_is_ended_not_reconnected_as_a_client(make_server: ServerFactory) -> None:
    """Writing to a peer tinydtls no longer has makes it start a client handshake: never sent."""
    _, address, table = await make_server()
    peer = await connect(address)
    [entry] = table._peers.values()
    session = entry.session
    assert session is not None
    table._dtls.resetPeer(entry.dtls_session)  # behind the table's back
    await eventually(lambda: peer.got_close_notify)  # tinydtls's close_notify for the reset
    received = len(peer.events)
    session.send(b"\x50\x45\x00\x01")  # a NON 2.05 the server would send
    assert not session.active and len(table) == 0
    await asyncio.sleep(0.1)
    assert len(peer.events) == received  # no ClientHello went to the AE
    peer.close(notify=False)


async def test_the_port_is_the_real_coaps_port_and_bound_exclusively(make_server: ServerFactory) -> None:
    port = free_udp_port()
    _, address, _ = await make_server(port=port)
    assert address == ("127.0.0.1", port)
    with pytest.raises(BindError, match=f"coaps://127.0.0.1:{port}"):
        await make_server(port=port)


class _Mute(DtlsPeer):
    """A client that vanishes mid-handshake: it hears the HelloVerifyRequest, then nothing more."""

    heard = 0

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.heard += 1
        if self.heard == 1:
            super().datagram_received(data, addr)


async def test_a_stalled_handshake_does_not_make_the_server_spin(make_server: ServerFactory) -> None:
    _, address, table = await make_server()
    mute = await _Mute.create(b"ae1", PSKS[b"ae1"], address)
    assert not await mute.handshake(timeout=0.2)
    assert table.handshakes == 1
    before = resource_usage()
    await asyncio.sleep(1.5)  # the server retransmits its flight to the silent client meanwhile
    assert resource_usage() - before < 0.3
    assert mute.heard >= 2
    mute.close(notify=False)


def resource_usage() -> float:
    usage = getrusage(RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


def test_authenticated_claim_is_none_for_anything_but_a_dtls_session() -> None:
    assert dtls_session.authenticated_claim(object()) is None
    fake: Any = type("Remote", (), {"claim": "ae1", "authenticated_claims": ["ae1"]})()
    assert dtls_session.authenticated_claim(fake) is None
    assert dtls_session.hold_session(fake)() is None  # a no-op release


def test_peer_keys_are_what_tinydtls_reports() -> None:
    assert dtls_table.peer_key(("127.0.0.1", 5684)) == ("::ffff:127.0.0.1", 5684)
    assert dtls_table.peer_key(("::1", 5684, 0, 0)) == ("::1", 5684)
    assert dtls_table.peer_key(("fe80:0::1%lo", 9, 0, 1)) == ("fe80::1", 9)


# --- mn_secd's client -----------------------------------------------------------------------------------


async def test_our_client_recovers_from_an_evicted_session(make_server: ServerFactory) -> None:
    ctx, (host, port), table = await make_server()
    client = await create_dtls_client_context()
    try:
        client.client_credentials.load_from_dict(
            {f"coaps://{host}:{port}/*": {"dtls": {"psk": PSKS[b"ae1"], "client-identity": b"ae1"}}}
        )
        uri = f"coaps://{host}:{port}/whoami"
        first = await asyncio.wait_for(client.request(aiocoap.Message(code=Code.GET, uri=uri)).response, 5)
        assert first.payload == b"'ae1'"
        assert client_handshake_progress(client, host, port, b"ae1") is HandshakeProgress.CONNECTED
        assert dtls_server.evict_sessions([ctx], lambda claim: True) == 1
        await asyncio.sleep(0.1)
        # Upstream's client ignores the warning-level close_notify and would wait ~90 s here.
        assert client_handshake_progress(client, host, port, b"ae1") is None
        second = await asyncio.wait_for(client.request(aiocoap.Message(code=Code.GET, uri=uri)).response, 3)
        assert second.payload == b"'ae1'"
        assert len(table) == 1
    finally:
        await client.shutdown()


@pytest.mark.parametrize(
    ("identity", "psk", "expected"),
    [(b"ae1", b"wrong", HandshakeProgress.SERVER_HELLO), (b"mallory", b"any", HandshakeProgress.ALERT)],
    ids=["wrong-psk", "unknown-identity"],
)
async def test_our_client_knows_how_far_a_handshake_got(
    make_server: ServerFactory, identity: bytes, psk: bytes, expected: HandshakeProgress
) -> None:
    _, (host, port), _ = await make_server()
    client = await create_dtls_client_context()
    seen: list[HandshakeProgress] = []
    try:
        client.client_credentials.load_from_dict(
            {f"coaps://{host}:{port}/*": {"dtls": {"psk": psk, "client-identity": identity}}}
        )
        request = client.request(aiocoap.Message(code=Code.GET, uri=f"coaps://{host}:{port}/whoami"))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            progress = client_handshake_progress(client, host, port, identity)
            if progress is not None and (not seen or seen[-1] is not progress):
                seen.append(progress)
            if request.response.done():
                break
            await asyncio.sleep(0.005)
        assert seen[-1] is expected, seen
        assert HandshakeProgress.CONNECTED not in seen
    finally:
        await client.shutdown()


async def test_our_client_hears_silence_as_silence() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:  # bound, never answers
        mute.bind(("127.0.0.1", 0))
        port = mute.getsockname()[1]
        client = await create_dtls_client_context()
        try:
            client.client_credentials.load_from_dict(
                {f"coaps://127.0.0.1:{port}/*": {"dtls": {"psk": b"k", "client-identity": b"ae1"}}}
            )
            client.request(aiocoap.Message(code=Code.GET, uri=f"coaps://127.0.0.1:{port}/whoami"))
            await asyncio.sleep(0.3)
            assert client_handshake_progress(client, "127.0.0.1", port, b"ae1") is HandshakeProgress.SILENT
        finally:
            await client.shutdown()

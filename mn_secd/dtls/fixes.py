"""Local fixes to aiocoap 0.4.17's DTLS server, kept in this one module.

aiocoap's ``tinydtls_server`` transport is marked "highly experimental" upstream, and measured on
loopback it has defects that matter for a long-running daemon (see ``prior-art.md`` §5c). Each fix
below names the upstream behaviour it corrects, so it can be dropped when upstream changes; the
unit tests in ``tests/unit/test_dtls_fix.py`` assert that the *unpatched* code still behaves that
way and fail the day it no longer does.

Fixes to the server (``aiocoap/transports/tinydtls_server.py``):

1. **close_notify at warning level.** ``_AddressDTLS._event`` only reacts to close_notify at level
   *fatal*; tinydtls (and OpenSSL/GnuTLS) send it at level *warning*, which upstream only logs
   ("Unhandled alert level 1 code 0"). The closed peer's entry then stays in the table forever.
   Here a close_notify at any level ends the peer like a fatal alert does.
2. **Idle purge.** Upstream never removes a peer that vanished without a close_notify or that
   failed its handshake (a wrong PSK is dropped silently by tinydtls). Here peers idle for
   ``idle_timeout`` (peers that never completed a handshake: after at most ``HANDSHAKE_TIMEOUT``)
   are evicted by a periodic purge.
3. **Bounded peer table.** Upstream's ``_maybe_purge_sockets`` (64 entries) is never called, so any
   datagram from a new source port adds an entry without bound. Here only a ClientHello can create
   an entry, and a new peer first makes room: a handshake stalled for ``HANDSHAKE_STALL`` goes
   first, then the least recently active peer (a handshake in progress is recent, so a burst of
   new clients displaces peers that went quiet, not each other).
4. **A new identity on a reused source port.** Upstream keeps one ``SecurityStore`` per source
   address that raises "DTLS stack tried accessing different keys" when a second handshake from the
   same address and port presents another identity, so that client is locked out. Worse for an
   authorising server, the remote object aiocoap sees is per *address*: its message-ID
   deduplication cache would replay a response made for the previous identity to the new one. Here
   the claim is taken per handshake and committed when the handshake completes, and aiocoap sees a
   fresh remote (:class:`Session`) per completed handshake; a late response for an ended session is
   dropped instead of being sent to whoever now holds that address.
5. **PSK length.** Upstream DTLSSocket 0.2.3 copies the PSK into tinydtls's 16-byte stack buffer
   (``DTLS_PSK_MAX_KEY_LEN``) without a length check. We run a patched build
   (``patches/dtlssocket-0.2.3-gba-psk.patch``, built by ``./dev``) whose limits are
   :data:`MAX_PSK_LENGTH` and :data:`MAX_IDENTITY_LENGTH` and which checks the length itself;
   here, in addition, a credential with a longer PSK is refused with a log line before it reaches
   C, and :func:`check_upstream` refuses the unpatched build.
6. **SO_REUSEPORT.** Upstream binds with ``SO_REUSEPORT``, so a second daemon (or any process of
   the same user) can bind the same port and silently receive a share of the handshakes. Here the
   bind is exclusive: a port in use is an error at start-up.
7. **An empty credentials map.** ``Context.__init__`` replaces a *falsy* ``server_credentials``
   with a new map, and a ``CredentialsMap`` subclass that looks identities up elsewhere (the AE
   registry, the NAF's Zn lookup) is an empty dict: it would be silently dropped and every handshake
   would fail with internal_error. :func:`create_dtls_server_contexts` installs the map it is given.
8. **Port semantics.** Upstream's server adds 1 to the port it is given (a CoAP port becomes the
   CoAPS one) and cannot be given an ephemeral port; :func:`create_dtls_server_contexts` takes the
   real CoAPS port (0 for an ephemeral one).
9. **Receive buffer.** Upstream keeps the default socket receive buffer (about 200 KiB): a burst of
   handshakes (200 AEs at a cold start) overflows it, and every dropped flight then waits for a
   retransmission. Here a server socket asks for :data:`RECEIVE_BUFFER` (capped by the kernel).
10. **A retransmission task per datagram.** Upstream cancels and re-creates an asyncio task for
    every datagram of every peer; only handshake flights are ever retransmitted, so application
    data on an established session goes straight to tinydtls here.
11. **Freeing a context that still holds a peer.** DTLSSocket's destructor then sends that peer a
    close_notify through a callback that resurrects the dying context: a double free, seen as a
    segfault in the garbage collector. Every way out of the peer table frees tinydtls's peer first
    (``resetPeer``), and :meth:`Peer.__del__` makes sure.

Fixes to the client (``aiocoap/transports/tinydtls.py``), applied with the others because a server
that evicts peers relies on the first, and both sides on the second:

12. **close_notify at warning level, client side.** ``DTLSClientConnection._event`` ignores it too,
    so a client whose session the server ended keeps sending into the void until its request times
    out. Here it ends the connection, and the next request handshakes afresh.
13. **tinydtls's clock.** DTLSSocket calls ``dtls_init()`` for every new context, which resets
    tinydtls's (process-wide) clock origin to the current whole second, while aiocoap converts the
    retransmission deadlines that ``checkRetransmit()`` returns with an origin fixed at import time.
    Once the two disagree, every handshake waiting for a retransmission makes aiocoap's timer loop
    spin (measured: about 60 % of a core for a single client that vanished mid-handshake). Here
    every context is created through a subclass that records the origin tinydtls just set, and
    aiocoap's origin follows it. (Pending tinydtls timers in *other* contexts still shift when the
    origin moves; that is in C, and only delays a retransmission.)

:func:`apply` refuses to patch anything but the exact upstream sources these fixes were written
against (aiocoap 0.4.17, DTLSSocket 0.2.3 with our patch, :data:`PATCHED_DTLSSOCKET`): a different
version, or the unpatched DTLSSocket whose buffers our PSKs would overrun, fails loudly at start-up
instead of half-working.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import aiocoap
import aiocoap.meta
from aiocoap import error as coap_error
from aiocoap import interfaces
from aiocoap.numbers import COAPS_PORT, constants
from aiocoap.transports import tinydtls, tinydtls_server
from aiocoap.util import hostportjoin
from DTLSSocket import dtls

from mn_secd.errors import BindError, DtlsFixMismatch

log = logging.getLogger(__name__)

UPSTREAM_AIOCOAP = "0.4.17"
UPSTREAM_DTLSSOCKET = "0.2.3"
#: The version our patched build of DTLSSocket 0.2.3 carries (a local version: it satisfies ==0.2.3).
PATCHED_DTLSSOCKET = UPSTREAM_DTLSSOCKET + "+mnsecd.gbapsk"
#: sha256 of the upstream modules whose internals are patched or relied upon here.
UPSTREAM_SOURCES: dict[str, str] = {
    "aiocoap.transports.tinydtls_server": "f630801dc8987f5f9e38d451c0d29cd74dc20ac1615c6be26ad6696d5cc9da49",
    "aiocoap.transports.simplesocketserver": "06bea196c482c143adaae095288d1f732e34a6cdd1a9d16f8180a054915aa872",
    "aiocoap.transports.tinydtls": "b4398936cb3322c41e0462be903c196e358cd0ca36d44566d5c405c3ffff2b40",
    "aiocoap.transports.generic_udp": "122174962990f2cc9a0800f68c7a11ab1660780bea7d5a15ea7a83c98bbd9670",
}

#: tinydtls's DTLS_PSK_MAX_KEY_LEN in our patched build (upstream: 16): room for the 32-octet Ks_NAF.
MAX_PSK_LENGTH = 64
#: tinydtls's DTLS_PSK_MAX_CLIENT_IDENTITY_LEN in our patched build (upstream: 32): room for a B-TID.
MAX_IDENTITY_LENGTH = 128
#: A peer that has not completed its handshake after this long is purged (if idle_timeout is shorter,
#: that applies instead).
HANDSHAKE_TIMEOUT = 30.0
#: When the table is full, a handshake silent for this long is the first to go (a wrong PSK, say).
HANDSHAKE_STALL = 2.0
#: Receive buffer of a server socket (the kernel caps it at net.core.rmem_max).
RECEIVE_BUFFER = 1 << 20

_LEVEL_WARNING = 1
_CONNECTED = (tinydtls.LEVEL_NOALERT, tinydtls.DTLS_EVENT_CONNECTED)

_applied = False
#: The upstream client event handler, kept for the tests that check upstream still needs fix 12.
UPSTREAM_CLIENT_EVENT: Callable[..., None] = tinydtls.DTLSClientConnection._event


class SessionEnded(coap_error.LibraryShutdown):  # type: ignore[misc]
    """Raised into pending exchanges of a DTLS session that ended (peer closed, evicted, replaced)."""


def check_psk(psk: bytes) -> bytes:
    """Return ``psk`` if tinydtls can use it; raise ValueError otherwise (see fix 5)."""
    if not isinstance(psk, bytes) or not 1 <= len(psk) <= MAX_PSK_LENGTH:
        length = len(psk) if isinstance(psk, bytes) else "?"
        raise ValueError(f"a DTLS PSK must be 1 to {MAX_PSK_LENGTH} octets with our tinydtls, got {length}")
    return psk


def check_upstream() -> None:
    """Raise :class:`DtlsFixMismatch` unless the upstream code is exactly what the fixes expect."""
    versions = {
        "aiocoap": (aiocoap.meta.version, UPSTREAM_AIOCOAP),
        "DTLSSocket": (importlib.metadata.version("DTLSSocket"), PATCHED_DTLSSOCKET),
    }
    for name, (found, expected) in versions.items():
        if found == UPSTREAM_DTLSSOCKET and name == "DTLSSocket":
            raise DtlsFixMismatch(
                f"the unpatched DTLSSocket {found} is installed: its buffers are too small for GBA keys;"
                " install the patched build (./dev setup builds it with patches/dtlssocket-0.2.3-gba-psk.patch)"
            )
        if found != expected:
            raise DtlsFixMismatch(
                f"mn_secd.dtls was written for {name} {expected}, found {found}: "
                "re-check every fix against the new upstream code before changing the pin"
            )
    for module, expected_hash in UPSTREAM_SOURCES.items():
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise DtlsFixMismatch(f"cannot find the source of {module}")
        with open(spec.origin, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != expected_hash:
            raise DtlsFixMismatch(f"{module} ({spec.origin}) differs from aiocoap {UPSTREAM_AIOCOAP}'s")


def apply() -> None:
    """Install the fixes (idempotent). Called by :func:`create_dtls_server_contexts` and the client."""
    global _applied
    if _applied:
        return
    check_upstream()
    tinydtls_server.MessageInterfaceTinyDTLSServer._serversocket = PeerTable

    def _client_event(self: Any, level: int, code: int) -> None:
        # Fix 12: a close_notify at warning level ends the connection like a fatal one.
        if (level, code) == (_LEVEL_WARNING, tinydtls.CODE_CLOSE_NOTIFY):
            self._inject_error(tinydtls.CloseNotifyReceived())
            return
        UPSTREAM_CLIENT_EVENT(self, level, code)

    tinydtls.DTLSClientConnection._event = _client_event
    dtls.DTLS = ClockTrackingDTLS
    _applied = True


class ClockTrackingDTLS(dtls.DTLS):  # type: ignore[misc]
    """DTLSSocket's context, telling aiocoap where tinydtls's clock now starts (fix 13)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> ClockTrackingDTLS:
        context: ClockTrackingDTLS = super().__new__(cls, *args, **kwargs)  # dtls_init(): origin = time(NULL)
        # time(NULL) ran microseconds ago: off by one second only if a second began in between.
        origin = float(math.floor(time.time()))
        tinydtls.DTLS_CLOCK_OFFSET = origin
        tinydtls_server.DTLS_CLOCK_OFFSET = origin
        return context


class _HandshakeStore(tinydtls_server.SecurityStore):  # type: ignore[misc]
    """The PSK lookup tinydtls calls, recording the claim of the handshake in progress (fixes 4, 5).

    Upstream records the claim once per source address and raises when another identity shows up;
    here each lookup records a *pending* claim that :meth:`take_claim` commits when the handshake
    completes, and PSKs tinydtls cannot hold are refused (and logged) before they reach C.
    """

    def __init__(self, server_credentials: Any) -> None:
        super().__init__(server_credentials)
        self._pending: object = None

    def _lookup(self, identity: bytes) -> tuple[bytes, object] | None:
        try:
            psk, claim = self._server_credentials.find_dtls_psk(identity)
        except KeyError:
            return None
        if not isinstance(psk, bytes) or not 1 <= len(psk) <= MAX_PSK_LENGTH:
            log.error(
                "refusing a DTLS credential: tinydtls holds PSKs of 1 to %d octets",
                MAX_PSK_LENGTH,
                extra={"event": "dtls-psk-too-long", "psk_length": len(psk) if isinstance(psk, bytes) else None},
            )
            return None
        return psk, claim

    def __contains__(self, identity: object) -> bool:
        return isinstance(identity, bytes) and self._lookup(identity) is not None

    def __getitem__(self, identity: bytes) -> bytes:
        found = self._lookup(identity)
        if found is None:
            raise KeyError(identity)
        psk, self._pending = found
        return psk

    def take_claim(self) -> object:
        claim, self._pending = self._pending, None
        return claim


class Session(interfaces.EndpointAddress):  # type: ignore[misc]
    """The remote aiocoap sees: one completed DTLS handshake of one peer (fix 4).

    Equality is identity, so aiocoap's deduplication, blockwise and observation state never spans
    two handshakes, even from the same address and port.
    """

    is_multicast = False
    is_multicast_locally = False
    scheme = "coaps"
    maximum_block_size_exp = constants.MAX_REGULAR_BLOCK_SIZE_EXP

    def __init__(self, peer: Peer, claim: object) -> None:
        self._peer: Peer | None = peer
        self._address = peer._underlying_address
        self._repr = f"<dtls_fix.Session {self._address.hostinfo}>"  # aiocoap names a task after it per request
        #: What the credentials map returned for the identity that completed the handshake.
        self.claim = claim

    @property
    def active(self) -> bool:
        return self._peer is not None

    @property
    def hostinfo(self) -> str:
        return str(self._address.hostinfo)

    @property
    def hostinfo_local(self) -> str:
        return str(self._address.hostinfo_local)

    @property
    def uri_base(self) -> str:
        return "coaps://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coaps://" + self.hostinfo_local

    @property
    def authenticated_claims(self) -> list[object]:
        return [self.claim]

    @property
    def blockwise_key(self) -> Session:
        return self

    def send(self, message: bytes) -> None:
        peer = self._peer
        if peer is None:
            log.debug("dropping a message for an ended DTLS session", extra={"event": "dtls-late-send"})
            return
        peer._dtls_socket.write(peer._dtls_session, message)

    def __repr__(self) -> str:
        return self._repr


class Peer(tinydtls_server._AddressDTLS):  # type: ignore[misc]
    """One source address and port: a tinydtls context and, once a handshake completed, a Session."""

    def __init__(self, table: PeerTable, sockaddr: tuple[Any, ...]) -> None:
        super().__init__(table, sockaddr)
        self._psk_store = _HandshakeStore(table._server_credentials)
        self._dtls_socket.pskStore = self._psk_store
        self.sockaddr = sockaddr
        self.last_seen = table.clock()
        self.session: Session | None = None

    def __del__(self) -> None:
        # Safety net: if a context is freed while tinydtls still holds a peer in it, DTLSSocket's
        # destructor sends that peer a close_notify through a callback that resurrects the dying
        # context (a double free, seen as a segfault in the garbage collector). Every way out of the
        # table frees tinydtls's peer already; this runs before the collector breaks the cycle.
        context, session = getattr(self, "_dtls_socket", None), getattr(self, "_dtls_session", None)
        if context is not None and session is not None:
            context.resetPeer(session)

    # --- tinydtls callbacks ------------------------------------------------------------------------

    def _read(self, sender: object, data: bytes) -> int:
        if self.session is not None:
            self._protocol._message_interface._received_plaintext(self.session, data)
        return len(data)

    def _event(self, level: int, code: int) -> None:
        if (level, code) == _CONNECTED:
            old, self.session = self.session, Session(self, self._psk_store.take_claim())
            if old is not None:
                self._end_session(old, SessionEnded("a new DTLS handshake replaced this session"))
            return
        if code == tinydtls.CODE_CLOSE_NOTIFY and level in (_LEVEL_WARNING, tinydtls.LEVEL_FATAL):
            # Fix 1: tinydtls has already dropped the peer; only our state is left to clear.
            self._detach(tinydtls.CloseNotifyReceived(), dispatch=True)
        elif level == tinydtls.LEVEL_FATAL:
            self._detach(tinydtls.FatalDTLSError(code), dispatch=True)
        elif level == _LEVEL_WARNING:
            log.debug("DTLS warning alert %d", code, extra={"event": "dtls-alert", "alert": code})

    # --- ending ------------------------------------------------------------------------------------

    def _inject_error(self, exc: BaseException) -> None:
        """Upstream calls this for every peer at transport shutdown only."""
        self.evict(exc, dispatch=False)

    def evict(self, exc: BaseException, *, dispatch: bool = True) -> None:
        """End this peer from outside tinydtls: tell the client (close_notify), then forget it.

        Never called from a tinydtls callback: resetting a peer there would free it under tinydtls.
        """
        self._dtls_socket.resetPeer(self._dtls_session)
        self._detach(exc, dispatch=dispatch)

    def _detach(self, exc: BaseException, *, dispatch: bool) -> None:
        self._retransmission_task.cancel()
        table = self._protocol
        if table._connections.get(self.sockaddr) is self:
            del table._connections[self.sockaddr]
        session, self.session = self.session, None
        if session is not None:
            self._end_session(session, exc if dispatch else None)

    def _end_session(self, session: Session, exc: BaseException | None) -> None:
        session._peer = None
        if exc is not None:
            self._protocol._message_interface._received_exception(session, exc)


class PeerTable(tinydtls_server._DatagramServerSocketSimpleDTLS):  # type: ignore[misc]
    """The server socket and its table of peers, bounded and purged (fixes 2, 3, 6, 8, 9, 10)."""

    _Address = Peer
    max_peers = 256
    idle_timeout = 300.0
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._purger: asyncio.Task[None] | None = None
        self.evictions = 0

    @classmethod
    async def create(cls, bind: tuple[str, int], log: logging.Logger, loop: Any, message_interface: Any) -> PeerTable:
        """Like upstream's, but without SO_REUSEPORT and with the real bound port in ``hostinfo_local``."""
        if bind is None or bind[0] in ("::", "0.0.0.0", "", None):
            raise ValueError("the DTLS server needs an explicit address, not the any-address")
        wrapped = tinydtls_server.GoingThroughMessageDecryption(message_interface)
        ready: asyncio.Future[PeerTable] = loop.create_future()
        await loop.create_datagram_endpoint(lambda: cls(ready.set_result, wrapped, log), local_addr=bind)
        self = await ready
        self._loop = loop
        sock = self._transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)  # fix 9
        host, port = self._transport.get_extra_info("sockname")[:2]
        self.hostinfo_local = hostportjoin(host, port if port != COAPS_PORT else None)
        return self

    @property
    def sockname(self) -> tuple[str, int]:
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def __len__(self) -> int:
        return len(self._connections)

    def datagram_received(self, data: bytes, sockaddr: tuple[Any, ...]) -> None:
        now = self.clock()
        peer = self._connections.get(sockaddr)
        if peer is None:
            if not _is_client_hello(data):
                return  # no session can start with it (e.g. a reply to our close_notify): no entry
            self._make_room(now)
            peer = Peer(self, sockaddr)
            self._connections[sockaddr] = peer
            if self._purger is None:
                self._purger = asyncio.create_task(self._purge_forever(), name="DTLS peer purge")
        else:
            self._connections.move_to_end(sockaddr)
        peer.last_seen = now
        if peer.session is not None and not _is_client_hello(data):
            # Fix 10: application data on an established session goes straight to tinydtls.
            peer._dtls_socket.handleMessage(peer._dtls_session, data)
            return
        self._message_interface._received_datagram(peer, data)

    def _make_room(self, now: float) -> None:
        self.purge_idle(now)
        while len(self._connections) >= self.max_peers:
            # The table is kept in order of last activity (datagram_received moves a peer to the end).
            victim = next(
                (p for p in self._connections.values() if p.session is None and now - p.last_seen >= HANDSHAKE_STALL),
                None,
            )
            if victim is None:
                victim = next(iter(self._connections.values()))
            self._evict(victim, "peer table full")

    def purge_idle(self, now: float) -> int:
        """Evict every peer idle past its timeout; returns how many went."""
        handshake_timeout = min(self.idle_timeout, HANDSHAKE_TIMEOUT)
        stale = [
            p
            for p in self._connections.values()
            if now - p.last_seen >= (self.idle_timeout if p.session is not None else handshake_timeout)
        ]
        for peer in stale:
            self._evict(peer, "idle")
        return len(stale)

    def evict_where(self, predicate: Callable[[object], bool]) -> int:
        """Evict every peer whose session claim satisfies ``predicate`` (e.g. a revoked identity)."""
        doomed = [p for p in self._connections.values() if p.session is not None and predicate(p.session.claim)]
        for peer in doomed:
            self._evict(peer, "credentials revoked")
        return len(doomed)

    def _evict(self, peer: Peer, reason: str) -> None:
        self.evictions += 1
        log.debug("evicting DTLS peer (%s)", reason, extra={"event": "dtls-evict", "reason": reason})
        peer.evict(SessionEnded(f"DTLS session ended by the server: {reason}"))

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, min(self.idle_timeout, HANDSHAKE_TIMEOUT) / 4))
            self.purge_idle(self.clock())

    async def shutdown(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
        await super().shutdown()


def _is_client_hello(record: bytes) -> bool:
    """A DTLS handshake record of epoch 0 carrying a ClientHello (RFC 6347 4.1, 4.2.2)."""
    return len(record) > 13 and record[0] == 22 and record[3:5] == b"\0\0" and record[13] == 1


def _table_of(ctx: aiocoap.Context) -> PeerTable:
    for tman in ctx.request_interfaces:
        transport = getattr(getattr(tman.token_interface, "message_interface", None), "_pool", None)
        if isinstance(transport, PeerTable):
            return transport
    raise ValueError("not a context made by create_dtls_server_contexts")


def peer_table(ctx: aiocoap.Context) -> PeerTable:
    """The peer table behind a context from :func:`create_dtls_server_contexts` (for stats and tests)."""
    return _table_of(ctx)


def bound_address(ctx: aiocoap.Context) -> tuple[str, int]:
    """The (address, port) a context from :func:`create_dtls_server_contexts` really listens on."""
    return _table_of(ctx).sockname


def authenticated_claim(remote: object) -> object | None:
    """The claim a request's remote was authenticated with, or None if it did not come over DTLS.

    Only our :class:`Session` objects carry one, and only for a completed handshake: this is the
    single source of an AE's (or, on the NAF, a UE's) identity.
    """
    return remote.claim if isinstance(remote, Session) else None


def evict_sessions(contexts: Iterable[aiocoap.Context], predicate: Callable[[object], bool]) -> int:
    """End every DTLS session whose claim satisfies ``predicate``; returns how many ended."""
    return sum(_table_of(ctx).evict_where(predicate) for ctx in contexts)


def client_session_state(ctx: aiocoap.Context, host: str, port: int, identity: bytes) -> bool | None:
    """For an aiocoap client context: is its DTLS session to (host, port, identity) established?

    True once the handshake completed, False while it is in progress, None when there is no such
    connection (not started yet, or ended). Upstream exposes no handshake state; a client needs it
    to tell a silently dropped handshake (a wrong PSK) from a slow answer.
    """
    for tman in ctx.request_interfaces:
        transport = getattr(tman.token_interface, "message_interface", None)
        if isinstance(transport, tinydtls.MessageInterfaceTinyDTLS):
            connection = transport._pool.get((host, port, identity))
            if connection is not None:
                return connection._queue is None  # upstream drops the send queue once connected
    return None


async def create_dtls_server_contexts(
    site: Any,
    credentials: Any,
    addresses: Sequence[str],
    port: int,
    *,
    max_peers: int,
    idle_timeout: float,
) -> list[aiocoap.Context]:
    """One DTLS-only server context per address (tinydtls binds one explicit address each).

    ``port`` is the real CoAPS port (0: an ephemeral one, see :func:`bound_address`). Plain CoAP is
    never served: only the ``tinydtls_server`` transport is started. ``credentials`` is an aiocoap
    ``CredentialsMap`` whose ``find_dtls_psk(identity)`` returns ``(psk, claim)``; it is consulted at
    every handshake, so a map backed by live data takes effect without restarting.
    """
    apply()
    if not 0 <= port <= 65535:
        raise ValueError(f"not a UDP port: {port}")
    if max_peers < 1 or idle_timeout <= 0:
        raise ValueError("max_peers must be at least 1 and idle_timeout positive")
    contexts: list[aiocoap.Context] = []
    try:
        for address in addresses:
            try:
                # Upstream adds 1 to the port (fix 8); -1 + 1 = 0 keeps "ephemeral" expressible.
                ctx = await aiocoap.Context.create_server_context(
                    site,
                    bind=(address, port - 1),
                    server_credentials=credentials,
                    transports=["tinydtls_server"],
                    loggername="coap-server",
                )
            except OSError as exc:
                raise BindError(address, port, exc.errno, exc.strerror or str(exc)) from exc
            except ValueError as exc:
                raise BindError(address, port, None, str(exc)) from exc
            contexts.append(ctx)
            table = _table_of(ctx)
            ctx.server_credentials = table._server_credentials = credentials  # fix 7
            table.max_peers = max_peers
            table.idle_timeout = idle_timeout
    except BaseException:
        for ctx in contexts:
            await ctx.shutdown()
        raise
    return contexts

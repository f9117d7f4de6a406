"""The DTLS server's socket: one tinydtls context for every peer, and a bounded table of them.

Upstream's server makes a tinydtls context (and an asyncio task) for every source address that
sends a datagram, so a burst of ClientHellos from fresh ports cost state before any cookie could be
checked, and filling its table evicted established sessions. tinydtls itself answers a ClientHello
without a valid cookie statelessly (RFC 6347 4.2.1): with a single context per socket that is all
such a datagram costs here, no Python object and no C peer, and no second cookie round trip. State
begins when tinydtls accepts a cookie, which shows as the ServerHello it writes; from then on the
budgets of :mod:`.budget` decide who stays.

tinydtls reports events without saying which peer they concern, and an exception raised in one of
its callbacks leaves the interpreter mid-call ("SystemError: ... returned a result with an
exception set"). So every call into tinydtls records the peer it is made for, the callbacks only
record what they are told (they cannot raise), and the table applies it after tinydtls returns.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Protocol, cast

from aiocoap.numbers import COAPS_PORT
from aiocoap.transports.tinydtls import CloseNotifyReceived, FatalDTLSError
from aiocoap.util import hostportjoin
from DTLSSocket import dtls

from mn_secd.dtls.budget import PeerBudget
from mn_secd.dtls.records import (
    ALERT_FATAL,
    ContentType,
    HandshakeType,
    handshake_type,
    is_client_hello,
    plaintext_alert,
)
from mn_secd.dtls.session import Session, SessionEnded, claim_label
from mn_secd.dtls.upstream import MAX_PSK_LENGTH
from mn_secd.logs import LogLimiter

log = logging.getLogger(__name__)

#: A handshake not completed after this long is dropped (if idle_timeout is shorter, that applies).
HANDSHAKE_TIMEOUT = 30.0
#: How often tinydtls's retransmission queue is looked at while handshakes are pending.
RETRANSMIT_POLL = 0.25
#: Receive buffer of a server socket (the kernel caps it at net.core.rmem_max).
RECEIVE_BUFFER = 1 << 20
#: The largest UDP payload (65,507 octets over IPv4, 65,527 over IPv6) fits in this.
MAX_DATAGRAM = 1 << 16
#: At most one log line per peer and kind of trouble in this many seconds.
LOG_INTERVAL = 60.0

_EVENT_CONNECTED = 0x01DE
_CLOSE_NOTIFY = 0
_LEVEL_NOALERT = 0
_APPLICATION_DATA = int(ContentType.APPLICATION_DATA)

#: A peer as tinydtls names it: (IPv6 text, port), IPv4 as ::ffff:a.b.c.d.
PeerKey = tuple[str, int]


class Delivery(Protocol):
    """Where decrypted datagrams and ended sessions go (:class:`mn_secd.dtls.server.ServerInterface`)."""

    def deliver(self, session: Session, datagram: bytes) -> None: ...

    def session_ended(self, session: Session, exc: BaseException | None) -> None: ...


class _Peer:
    """A cookie-verified peer: its address, tinydtls's session handle, and once authenticated, a Session."""

    __slots__ = ("claim", "dtls_session", "key", "session", "sockaddr")

    def __init__(self, key: PeerKey, sockaddr: tuple[Any, ...]) -> None:
        self.key = key
        self.sockaddr = sockaddr
        self.dtls_session = dtls_session(key, sockaddr)
        self.session: Session | None = None
        #: What the PSK lookup of the handshake in progress returned; committed when it completes.
        self.claim: object = None


class _Call:
    """The peer a call into tinydtls is about (its event and PSK callbacks do not say), before it
    has a :class:`_Peer`; a call for a known peer is recorded as the peer itself."""

    __slots__ = ("key", "sockaddr")

    def __init__(self, key: PeerKey, sockaddr: tuple[Any, ...]) -> None:
        self.key = key
        self.sockaddr = sockaddr


class _PskStore:
    """The dict-like object DTLSSocket's PSK callback consults, answered from a credentials map.

    DTLSSocket calls ``identity in store.keys()`` and then ``store[identity]`` twice, synchronously,
    for the handshake in progress. Nothing here raises into C: a failed lookup is "not found".
    """

    def __init__(self, table: PeerTable) -> None:
        self._table = table
        self._identity: bytes | None = None
        self._psk = b""

    def keys(self) -> _PskStore:
        return self

    def __contains__(self, identity: object) -> bool:
        self._identity, self._psk = None, b""
        try:
            found = self._table._lookup_psk(identity)
        except Exception:
            self._table._log_once(("psk-lookup", None), "the PSK lookup failed", exc_info=True)
            return False
        if found is None or not isinstance(identity, bytes):
            return False
        self._identity, self._psk = identity, found
        return True

    def __getitem__(self, identity: bytes) -> bytes:
        # Only ever called right after __contains__ said yes to this identity; anything else gets a
        # key no peer has, so the handshake fails instead of an exception entering C.
        return self._psk if identity == self._identity else b"\0"


class PeerTable(asyncio.DatagramProtocol):
    """The server socket, its tinydtls context and its bounded table of peers."""

    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(
        self, delivery: Delivery, credentials: Any, *, max_sessions: int, max_handshakes: int, idle_timeout: float
    ) -> None:
        self._delivery = delivery
        self._credentials = credentials
        self._budget: PeerBudget[PeerKey] = PeerBudget(
            max_sessions=max_sessions,
            max_handshakes=max_handshakes,
            idle_timeout=idle_timeout,
            handshake_timeout=min(idle_timeout, HANDSHAKE_TIMEOUT),
        )
        self._peers: dict[PeerKey, _Peer] = {}
        self._call: _Call | _Peer | None = None
        self._reports: deque[tuple[Any, ...]] = deque()
        self._settling = False
        self._closed = False
        self._transport: asyncio.DatagramTransport | None = None
        self._retransmitter: asyncio.Task[None] | None = None
        self._purger: asyncio.Task[None] | None = None
        self._limiter = LogLimiter(LOG_INTERVAL)
        self.hostinfo_local = ""
        #: Peers ended by the server (idle, displaced, revoked), for statistics and tests.
        self.evictions = 0
        self._dtls: Any = dtls.DTLS(
            read=self._on_read, write=self._on_write, event=self._on_event, pskId=b"-", pskStore=_PskStore(self)
        )

    @classmethod
    async def create(cls, bind: tuple[str, int], delivery: Delivery, credentials: Any, **limits: Any) -> PeerTable:
        """Bind ``bind`` with its real port (0: an ephemeral one; upstream adds 1 to the port it is
        given) and exclusively: upstream binds with SO_REUSEPORT, so a second daemon would silently
        receive a share of the handshakes. The receive buffer is raised so that a cold start of a
        few hundred AEs does not overflow it (each dropped flight waits for a retransmission)."""
        if bind[0] in ("::", "0.0.0.0", ""):
            raise ValueError("the DTLS server needs an explicit address, not the any-address")
        loop = asyncio.get_running_loop()
        _, table = await loop.create_datagram_endpoint(lambda: cls(delivery, credentials, **limits), local_addr=bind)
        assert table._transport is not None
        table._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        if hasattr(table._transport, "max_size"):
            # asyncio's selector transport receives each datagram into a fresh buffer of max_size
            # (256 KiB): above glibc's mmap threshold, so every datagram cost an mmap, an mremap and
            # a munmap. Any UDP datagram fits in 64 KiB, which malloc serves from the heap.
            table._transport.max_size = MAX_DATAGRAM
        bound_host, bound_port = table.sockname
        table.hostinfo_local = hostportjoin(bound_host, bound_port if bound_port != COAPS_PORT else None)
        return table

    # --- what the server holds -----------------------------------------------------------------------

    @property
    def sockname(self) -> tuple[str, int]:
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    @property
    def sessions(self) -> int:
        """Established (authenticated) sessions."""
        return self._budget.sessions

    @property
    def handshakes(self) -> int:
        """Cookie-verified handshakes in progress."""
        return self._budget.handshakes

    def __len__(self) -> int:
        return len(self._peers)

    # --- datagrams in --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        log.debug("DTLS server socket error: %s", exc, extra={"event": "dtls.socket-error"})

    def datagram_received(self, data: bytes, sockaddr: tuple[Any, ...]) -> None:
        if self._closed:
            return
        try:
            key = peer_key(sockaddr)
            peer = self._peers.get(key)
            if peer is not None:
                self._budget.activity(key, self.clock())
                self._into_tinydtls(peer, self._dtls.handleMessage, peer.dtls_session, data)
            elif is_client_hello(data):
                self._into_tinydtls(_Call(key, sockaddr), self._dtls.handleMessage, dtls_session(key, sockaddr), data)
            # else no session can start with it (e.g. a reply to our close_notify): no state
        except Exception:
            self._log_once(("internal", None), "the DTLS server failed on a datagram", exc_info=True)

    def _into_tinydtls(self, call: _Call | _Peer | None, work: Callable[..., Any], *args: Any) -> None:
        """Call ``work(*args)`` in tinydtls for one peer (or none), then apply what its callbacks reported."""
        self._call = call
        try:
            work(*args)
        finally:
            self._call = None
        if self._reports:
            self._settle()

    # --- callbacks from C: record only, never raise ----------------------------------------------------

    def _on_write(self, recipient: tuple[str, int], data: bytes) -> int:
        try:
            key = (recipient[0], recipient[1])
            call = self._call
            if call is not None and call.key == key:
                sockaddr = call.sockaddr
            elif (peer := self._peers.get(key)) is not None:
                sockaddr = peer.sockaddr
            else:
                return len(data)  # nobody to send it to any more
            assert self._transport is not None
            if data[0] == _APPLICATION_DATA:  # an encrypted record: nothing to learn from it
                self._transport.sendto(data, sockaddr)
                return len(data)
            kind = handshake_type(data)
            if kind == HandshakeType.SERVER_HELLO:
                self._reports.append(("handshake", key, sockaddr))  # tinydtls accepted a cookie
            elif kind == HandshakeType.CLIENT_HELLO:
                # Writing to a peer tinydtls no longer has makes it connect to that peer as a client.
                # A server never sends a ClientHello: the session is gone on tinydtls's side.
                self._reports.append(("vanished", key))
                return len(data)
            elif (alert := plaintext_alert(data)) is not None and alert[0] == ALERT_FATAL:
                self._reports.append(("refused", key))  # the handshake failed; tinydtls dropped its peer
            self._transport.sendto(data, sockaddr)
        except Exception:
            self._log_once(("internal", None), "the DTLS write callback failed", exc_info=True)
        return len(data)

    def _on_read(self, sender: tuple[str, int], data: bytes) -> int:
        try:
            self._reports.append(("data", (sender[0], sender[1]), data))
        except Exception:
            self._log_once(("internal", None), "the DTLS read callback failed", exc_info=True)
        return len(data)

    def _on_event(self, level: int, code: int) -> None:
        try:
            call = self._call
            if call is None:
                log.debug("DTLS event %d/%d outside a datagram", level, code, extra={"event": "dtls.event"})
            elif (level, code) == (_LEVEL_NOALERT, _EVENT_CONNECTED):
                self._reports.append(("connected", call.key))
            elif code == _CLOSE_NOTIFY and level != _LEVEL_NOALERT:
                # At any level: tinydtls, OpenSSL and GnuTLS send it as a warning, and upstream reacted
                # only to a fatal one, keeping every closed peer forever.
                self._reports.append(("closed", call.key, CloseNotifyReceived()))
            elif level == ALERT_FATAL:
                self._reports.append(("closed", call.key, FatalDTLSError(code)))
            elif level != _LEVEL_NOALERT:
                log.debug("DTLS warning alert %d", code, extra={"event": "dtls.alert", "alert": code})
        except Exception:
            self._log_once(("internal", None), "the DTLS event callback failed", exc_info=True)

    def _lookup_psk(self, identity: object) -> bytes | None:
        """The PSK for ``identity``, recording the claim on the peer being handshaken, or None.

        A PSK our tinydtls cannot hold (longer than :data:`MAX_PSK_LENGTH`; upstream DTLSSocket
        copied it into a 16-octet buffer unchecked) is refused with a log line before it reaches C.
        """
        call = self._call
        peer = self._peers.get(call.key) if call is not None else None
        if peer is None or not isinstance(identity, bytes):
            return None
        try:
            psk, claim = self._credentials.find_dtls_psk(identity)
        except KeyError:
            return None
        if not isinstance(psk, bytes) or not 1 <= len(psk) <= MAX_PSK_LENGTH:
            log.error(
                "refusing a DTLS credential: tinydtls holds PSKs of 1 to %d octets",
                MAX_PSK_LENGTH,
                extra={"event": "dtls.psk-too-long", "psk_length": len(psk) if isinstance(psk, bytes) else None},
            )
            return None
        peer.claim = claim
        return psk

    # --- applying what tinydtls reported -----------------------------------------------------------------

    def _settle(self) -> None:
        if self._settling:
            return  # the loop below picks up what an eviction reported
        self._settling = True
        try:
            while self._reports:
                report = self._reports.popleft()
                try:
                    self._apply(report)
                except Exception:
                    self._log_once(("internal", None), "the DTLS server failed to apply an event", exc_info=True)
        finally:
            self._settling = False

    def _apply(self, report: tuple[Any, ...]) -> None:
        kind, key = report[0], report[1]
        if kind == "data":  # the common case first
            peer = self._peers.get(key)
            if peer is not None and peer.session is not None:
                self._delivery.deliver(peer.session, report[2])
        elif kind == "handshake":
            self._admit(key, report[2])
        elif kind == "connected":
            self._authenticated(key)
        elif kind == "closed":
            self._forget(key, report[2])  # tinydtls has already dropped the peer
        elif kind == "refused":
            self._forget(key, None)
        elif kind == "vanished":
            self._evict(key, "tinydtls lost the session")

    def _admit(self, key: PeerKey, sockaddr: tuple[Any, ...]) -> None:
        """tinydtls accepted a cookie and began a handshake: give it a place among the handshakes."""
        if self._closed:
            self._into_tinydtls(None, self._dtls.resetPeer, dtls_session(key, sockaddr))
            return
        if self._budget.is_handshake(key):
            return  # a retransmitted ServerHello
        admission = self._budget.start_handshake(key, self.clock())
        old = self._peers.pop(key, None)
        if old is not None and old.session is not None:
            # tinydtls replaced the old peer itself: only whoever holds this address and port could.
            self._end_session(old, SessionEnded("a new DTLS handshake replaced this session"))
        for displaced in admission.displaced:
            self._evict(displaced, "too many handshakes at once")
        self._peers[key] = _Peer(key, sockaddr)
        self._start_timers()

    def _authenticated(self, key: PeerKey) -> None:
        """The handshake completed: the peer proved its PSK, and the claim of that lookup is its identity."""
        peer = self._peers.get(key)
        if peer is None:
            return
        for evicted in self._budget.complete_handshake(key, self.clock()):
            self._evict(evicted, "session table full")
        hostinfo = str(hostportjoin(peer.sockaddr[0], peer.sockaddr[1]))
        old, peer.session = peer.session, Session(self, key, hostinfo, peer.claim)
        peer.claim = None
        if old is not None:
            self._end_session_object(old, SessionEnded("a new DTLS handshake replaced this session"))

    # --- ending peers ------------------------------------------------------------------------------------

    def _evict(self, key: PeerKey, reason: str, *, tell_aiocoap: bool = True) -> None:
        """End a peer from our side: tell it (close_notify), then forget it. Never from a C callback.

        tinydtls's peer is reset first, always: DTLSSocket frees a context holding a peer by sending
        it a close_notify through a callback into the dying object (a double free).
        """
        peer = self._peers.get(key)
        self._budget.remove(key)
        if peer is None:
            return
        self.evictions += 1
        log.debug("ending DTLS peer (%s)", reason, extra={"event": "dtls.evict", "reason": reason})
        self._into_tinydtls(None, self._dtls.resetPeer, peer.dtls_session)
        self._forget(key, SessionEnded(f"DTLS session ended by the server: {reason}") if tell_aiocoap else None)

    def _forget(self, key: PeerKey, exc: BaseException | None) -> None:
        self._budget.remove(key)
        peer = self._peers.pop(key, None)
        if peer is not None:
            self._end_session(peer, exc)

    def _end_session(self, peer: _Peer, exc: BaseException | None) -> None:
        session, peer.session = peer.session, None
        if session is not None:
            self._end_session_object(session, exc)

    def _end_session_object(self, session: Session, exc: BaseException | None) -> None:
        session.end()
        self._delivery.session_ended(session, exc)

    def purge(self) -> int:
        """End every handshake past its timeout and every idle session; returns how many ended.

        Upstream never removed a peer that vanished without a close_notify or failed its handshake
        (tinydtls drops a wrong PSK silently).
        """
        stale = self._budget.expired(self.clock())
        for key in stale:
            self._evict(key, "idle")
        return len(stale)

    def evict_where(self, predicate: Callable[[object], bool]) -> int:
        """End every session whose claim satisfies ``predicate`` (e.g. a revoked identity)."""
        doomed = [k for k, p in self._peers.items() if p.session is not None and predicate(p.session.claim)]
        for key in doomed:
            self._evict(key, "credentials revoked")
        return len(doomed)

    # --- what sessions ask of the table (session.Carrier) ------------------------------------------------

    def send_to(self, key: Hashable, message: bytes) -> None:
        peer = self._peers.get(cast(PeerKey, key))
        if peer is not None:
            self._into_tinydtls(peer, self._dtls.write, peer.dtls_session, message)

    def hold(self, key: Hashable) -> None:
        self._budget.hold(cast(PeerKey, key))

    def release(self, key: Hashable) -> None:
        self._budget.release(cast(PeerKey, key))

    # --- timers --------------------------------------------------------------------------------------------

    def _start_timers(self) -> None:
        loop = asyncio.get_running_loop()
        if self._retransmitter is None or self._retransmitter.done():
            self._retransmitter = loop.create_task(self._retransmit_while_handshaking(), name="DTLS retransmissions")
        if self._purger is None or self._purger.done():
            self._purger = loop.create_task(self._purge_while_peers(), name="DTLS peer purge")

    async def _retransmit_while_handshaking(self) -> None:
        """Let tinydtls retransmit handshake flights, polled only while handshakes are pending.

        tinydtls counts its deadlines from a process-wide origin that every new tinydtls context
        (anyone's) resets to the current second, so converting them to wall-clock time cannot be
        done right; upstream's conversion made its timer loop spin once the two disagreed.
        """
        while self._budget.handshakes:
            await asyncio.sleep(RETRANSMIT_POLL)
            self._into_tinydtls(None, self._dtls.checkRetransmit)

    async def _purge_while_peers(self) -> None:
        interval = max(0.05, self._budget.handshake_timeout / 4)
        while self._peers:
            await asyncio.sleep(interval)
            self.purge()

    # --- logging ---------------------------------------------------------------------------------------------

    def _log_once(self, key: object, message: str, *args: Any, exc_info: bool = False) -> None:
        held_back = self._limiter.allow(key)
        if held_back is None:
            return
        suffix = f" ({held_back} more like it since the last report)" if held_back else ""
        log.warning(message + suffix, *args, exc_info=exc_info, extra={"event": "dtls.trouble"})

    def peer_trouble(self, session: Session, problem: str) -> None:
        """One rate-limited warning about a peer's bad datagrams (per peer and minute)."""
        label = claim_label(session.claim)
        self._log_once(("peer", label), "dropped malformed CoAP from %s: %s", label, problem)

    # --- shutting down ---------------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Tell every peer (close_notify), forget them all and close the socket."""
        self._closed = True
        for task in (self._retransmitter, self._purger):
            if task is not None:
                task.cancel()
        for key in list(self._peers):
            self._evict(key, "shutting down", tell_aiocoap=False)
        if self._transport is not None:
            self._transport.abort()

    def __del__(self) -> None:
        # Safety net for a table dropped without shutdown(): tinydtls must hold no peer when
        # DTLSSocket frees the context (see _evict).
        context, peers = getattr(self, "_dtls", None), getattr(self, "_peers", None)
        if context is not None and peers:
            for peer in list(peers.values()):
                context.resetPeer(peer.dtls_session)
            peers.clear()


def peer_key(sockaddr: tuple[Any, ...]) -> PeerKey:
    """The (IPv6 text, port) tinydtls reports for a socket address (IPv4 as ::ffff:a.b.c.d)."""
    host, port = sockaddr[0], sockaddr[1]
    if len(sockaddr) == 2:  # AF_INET
        return "::ffff:" + host, port
    packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    return socket.inet_ntop(socket.AF_INET6, packed), port


def dtls_session(key: PeerKey, sockaddr: tuple[Any, ...]) -> Any:
    """tinydtls's handle for a peer; always the same fields for one address, as its cookie covers them all."""
    scope = sockaddr[3] if len(sockaddr) == 4 else 0
    return dtls.Session(key[0], key[1], 0, scope)

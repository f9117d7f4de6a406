"""mn_secd's DTLS-PSK server transport for aiocoap, on the server contexts mn_secd makes.

:func:`create_dtls_server_contexts` builds each context with this transport only, appended the
way aiocoap's private ``Context._append_tokenmanaged_messagemanaged_transport`` hook appends one
(the upstream sources are pinned by hash, see :mod:`.upstream`); aiocoap's own ``tinydtls_server``
transport and every other context in the process stay exactly as upstream ships them. Below the
transport: the socket and its peers (:mod:`.table`), the remote aiocoap sees (:mod:`.session`),
and bounded deduplication (:mod:`.messages`); above it, how a request is rendered
(:mod:`.rendering`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import aiocoap
from aiocoap.transports.generic_udp import GenericMessageInterface

from mn_secd.dtls import coap_screen
from mn_secd.dtls.messages import SessionMessageManager
from mn_secd.dtls.rendering import ServerContext, ServerTokenManager
from mn_secd.dtls.session import Session
from mn_secd.dtls.table import PeerTable
from mn_secd.dtls.upstream import ensure_upstream
from mn_secd.errors import BindError

log = logging.getLogger(__name__)


class ServerInterface(GenericMessageInterface):  # type: ignore[misc]
    """aiocoap's message interface over a :class:`PeerTable`.

    Every decrypted datagram is screened (:mod:`.coap_screen`) before aiocoap decodes it: aiocoap
    reads a reserved token length as a token and raises on an option that is not UTF-8, and it did
    so inside tinydtls's callback. Malformed CoAP gets a Reset, a 4.02 or nothing, and one log line
    per peer and minute (upstream logged a warning per datagram).
    """

    _pool: PeerTable
    _mman: SessionMessageManager | None

    @classmethod
    async def create(
        cls, mman: SessionMessageManager, log: logging.Logger, bind: tuple[str, int], credentials: Any, **limits: Any
    ) -> ServerInterface:
        self = cls(mman, log, asyncio.get_running_loop())
        self._pool = await PeerTable.create(bind, self, credentials, **limits)
        return self

    async def recognize_remote(self, remote: object) -> bool:
        return isinstance(remote, Session) and remote.belongs_to(self._pool)

    async def determine_remote(self, request: Any) -> None:
        return None  # a DTLS server answers; it never starts a session

    def deliver(self, session: Session, datagram: bytes) -> None:
        verdict = coap_screen.screen(datagram)
        if isinstance(verdict, coap_screen.Reject):
            if verdict.reply is not None:
                session.send(verdict.reply)
            self._pool.peer_trouble(session, verdict.reason)
            return
        if verdict.dropped:
            log.debug("ignoring malformed elective options: %s", "; ".join(verdict.dropped))
        if self._mman is None:
            return  # shutting down
        try:
            message = aiocoap.Message.decode(verdict.datagram, remote=session)
            self._mman.dispatch_message(message)
        except Exception as exc:
            self._pool.peer_trouble(session, f"{type(exc).__name__} while processing it")
            log.debug("processing a CoAP message failed", exc_info=True, extra={"event": "dtls.coap-failed"})

    def send(self, message: Any) -> None:
        """As upstream's, but a response stored for duplicates is not encoded a second time."""
        mman = self._mman
        if mman is None:
            log.debug("not sending a message: the transport is shutting down", extra={"event": "dtls.late-send"})
        else:
            mman.transmit(message, message.remote.send)

    def session_ended(self, session: Session, exc: BaseException | None) -> None:
        """Fail what is pending on the session (its observations end with it) and forget its messages."""
        if exc is not None and self._mman is not None:
            self._received_exception(session, exc)
        if self._mman is not None:
            self._mman.forget(session)


async def _append_transport(
    ctx: aiocoap.Context, bind: tuple[str, int], credentials: Any, limits: dict[str, Any]
) -> None:
    """What aiocoap's ``Context._append_tokenmanaged_messagemanaged_transport`` does, with our
    message manager (bounded deduplication, see :mod:`.messages`) in place of the stock one."""
    tman = ServerTokenManager(ctx)
    mman = SessionMessageManager(tman)
    interface = await ServerInterface.create(mman, ctx.log, bind, credentials, **limits)
    mman.message_interface = interface
    tman.token_interface = mman
    ctx.request_interfaces.append(tman)


def _table_of(ctx: aiocoap.Context) -> PeerTable:
    for tman in ctx.request_interfaces:
        interface = getattr(getattr(tman, "token_interface", None), "message_interface", None)
        if isinstance(interface, ServerInterface):
            return interface._pool
    raise ValueError("not a context made by create_dtls_server_contexts")


def peer_table(ctx: aiocoap.Context) -> PeerTable:
    """The peer table behind a context from :func:`create_dtls_server_contexts` (for stats and tests)."""
    return _table_of(ctx)


def bound_address(ctx: aiocoap.Context) -> tuple[str, int]:
    """The (address, port) a context from :func:`create_dtls_server_contexts` really listens on."""
    return _table_of(ctx).sockname


def evict_sessions(contexts: Iterable[aiocoap.Context], predicate: Callable[[object], bool]) -> int:
    """End every DTLS session whose claim satisfies ``predicate``; returns how many ended."""
    return sum(_table_of(ctx).evict_where(predicate) for ctx in contexts)


def forget_answers(contexts: Iterable[aiocoap.Context]) -> int:
    """Drop every response kept for deduplication on these contexts (zeroed first); returns how many.

    For an owner whose answers carry secrets that just became void (the key service after a wipe).
    """
    dropped = 0
    for ctx in contexts:
        _table_of(ctx)  # only contexts made here
        for tman in ctx.request_interfaces:
            mman = getattr(tman, "token_interface", None)
            if isinstance(mman, SessionMessageManager):
                dropped += mman.forget_answers()
    return dropped


async def create_dtls_server_contexts(
    site: Any,
    credentials: Any,
    addresses: Sequence[str],
    port: int,
    *,
    max_peers: int,
    idle_timeout: float,
    max_handshakes: int | None = None,
) -> list[aiocoap.Context]:
    """One DTLS-only server context per address, each with mn_secd's server transport.

    ``port`` is the real CoAPS port (0: an ephemeral one, see :func:`bound_address`). Plain CoAP is
    never served. ``credentials`` is an aiocoap ``CredentialsMap`` whose ``find_dtls_psk(identity)``
    returns ``(psk, claim)``; it is consulted at every handshake, so a map backed by live data
    takes effect without a restart. ``max_peers`` bounds established sessions, ``max_handshakes``
    (default: the same) cookie-verified handshakes in progress, each per address.
    """
    ensure_upstream()
    if not 0 <= port <= 65535:
        raise ValueError(f"not a UDP port: {port}")
    handshakes = max_peers if max_handshakes is None else max_handshakes
    if max_peers < 1 or handshakes < 1 or idle_timeout <= 0:
        raise ValueError("max_peers and max_handshakes must be at least 1 and idle_timeout positive")
    limits = {"max_sessions": max_peers, "max_handshakes": handshakes, "idle_timeout": idle_timeout}
    loop = asyncio.get_running_loop()
    contexts: list[aiocoap.Context] = []
    try:
        for address in addresses:
            ctx = ServerContext(loop=loop, serversite=site, loggername="coap-server", server_credentials=credentials)
            # Context() replaces a *falsy* credentials map (a CredentialsMap that looks identities up
            # elsewhere is an empty dict); the table is given the map itself.
            ctx.server_credentials = credentials
            try:
                await _append_transport(ctx, (address, port), credentials, limits)
            except OSError as exc:
                raise BindError(address, port, exc.errno, exc.strerror or str(exc)) from exc
            except ValueError as exc:
                raise BindError(address, port, None, str(exc)) from exc
            contexts.append(ctx)
    except BaseException:
        for ctx in contexts:
            await ctx.shutdown()
        raise
    return contexts

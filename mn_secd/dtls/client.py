"""mn_secd's DTLS-PSK client transport for aiocoap, on the client contexts mn_secd makes.

:func:`create_dtls_client_context` builds an aiocoap client context whose only transport is a
subclass of aiocoap's ``tinydtls`` client, appended through aiocoap's hook; contexts made with
``aiocoap.Context.create_client_context`` anywhere else in the process are untouched. What differs
from upstream's client, connection by connection:

* **close_notify at warning level ends the connection.** Upstream ignores it (only a fatal one
  counts), so a client whose session the server ended kept sending into the void until its request
  timed out (about 90 s). Here the connection ends and the next request handshakes afresh.
* **Where the handshake stands** (:class:`HandshakeProgress`): upstream says nothing until the
  handshake completes. A server that never answered (busy, or not there), one that answered the
  cookie exchange and then went quiet (overloaded), one that sent its ServerHello and then nothing
  (tinydtls drops a wrong PSK silently) and one that sent an alert call for different messages.
* **Callbacks from C never raise**: a response tinydtls decrypts but aiocoap cannot decode (an
  option that is not UTF-8, say) is dropped with a log line instead of raising through C.
* **Retransmissions are polled** while the handshake runs (every :data:`RETRANSMIT_POLL`), not
  converted from tinydtls's clock: its origin is process-wide and moves whenever any tinydtls
  context is created, and upstream's conversion from an origin fixed at import made its timer
  loop spin once the two disagreed. (What stays process-wide, in C: a deadline already queued moves
  by as much as the origin does; that only delays one retransmission.)
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from enum import IntEnum
from typing import Any

import aiocoap
from aiocoap.transports import tinydtls

from mn_secd.dtls.records import ALERT_WARNING, HandshakeType, handshake_type, is_alert, plaintext_alert
from mn_secd.dtls.upstream import ensure_upstream
from mn_secd.logs import LogLimiter

log = logging.getLogger(__name__)

#: How often tinydtls's retransmission queue is looked at while a handshake runs.
RETRANSMIT_POLL = 0.25
_EVENT_CONNECTED = 0x01DE
_CLOSE_NOTIFY = 0
_limiter = LogLimiter(60.0)


class HandshakeProgress(IntEnum):
    """How far a client's handshake got, from what the server sent (ordered: later is further)."""

    SILENT = 0  #: nothing at all from the server yet
    COOKIE = 1  #: the server's HelloVerifyRequest (it saw our ClientHello)
    SERVER_HELLO = 2  #: the server's ServerHello flight (it accepted our cookie)
    ALERT = 3  #: the server sent an alert during the handshake
    CONNECTED = 4  #: the handshake completed


class _Connection(tinydtls.DTLSClientConnection):  # type: ignore[misc]
    """One DTLS session to one server, for one PSK identity."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.progress = HandshakeProgress.SILENT
        #: The (level, description) of an alert the server sent before the handshake completed.
        self.handshake_alert: tuple[int, int] | None = None
        super().__init__(*args, **kwargs)

    class SingleConnection(tinydtls.DTLSClientConnection.SingleConnection):  # type: ignore[misc]
        def datagram_received(self, data: bytes, addr: Any) -> None:
            parent = self.parent()
            if parent is not None:
                parent._heard(data)
            try:
                super().datagram_received(data, addr)
            except Exception:
                _log_once("the DTLS client failed on a datagram", exc_info=True)

    def _heard(self, data: bytes) -> None:
        if self.progress >= HandshakeProgress.ALERT:
            return
        kind = handshake_type(data)
        if kind == HandshakeType.HELLO_VERIFY_REQUEST:
            self.progress = max(self.progress, HandshakeProgress.COOKIE)
        elif kind == HandshakeType.SERVER_HELLO:
            self.progress = HandshakeProgress.SERVER_HELLO
        elif is_alert(data):
            self.progress = HandshakeProgress.ALERT
            self.handshake_alert = plaintext_alert(data)

    # --- callbacks from C --------------------------------------------------------------------------

    def _read(self, sender: Any, data: bytes) -> int:
        try:
            return int(super()._read(sender, data))
        except Exception as exc:
            _log_once("dropped an answer the client could not process: %s", type(exc).__name__)
            return len(data)

    def _write(self, recipient: Any, data: bytes) -> int:
        try:
            return int(super()._write(recipient, data))
        except Exception:
            _log_once("the DTLS client could not send", exc_info=True)
            return len(data)

    def _event(self, level: int, code: int) -> None:
        try:
            if (level, code) == (tinydtls.LEVEL_NOALERT, _EVENT_CONNECTED):
                self.progress = HandshakeProgress.CONNECTED
                super()._event(level, code)
            elif code == _CLOSE_NOTIFY and level in (ALERT_WARNING, tinydtls.LEVEL_FATAL):
                # A close_notify at any level ends the connection. The error is raised after tinydtls
                # returns: shutting the connection down frees its peer, never from inside tinydtls.
                asyncio.get_running_loop().call_soon(self._inject_error, tinydtls.CloseNotifyReceived())
            elif level == tinydtls.LEVEL_FATAL:
                asyncio.get_running_loop().call_soon(self._inject_error, tinydtls.FatalDTLSError(code))
            elif level != tinydtls.LEVEL_NOALERT:
                log.debug("DTLS warning alert %d from the server", code, extra={"event": "dtls.alert", "alert": code})
        except Exception:
            _log_once("the DTLS client's event callback failed", exc_info=True)

    def _inject_error(self, e: BaseException) -> None:
        # Reported once per connection, whichever of tinydtls and the socket saw the end first.
        if not getattr(self, "_ended", False):
            self._ended = True
            super()._inject_error(e)

    async def _run_retransmissions(self) -> None:
        while self._dtls_socket.checkRetransmit():
            await asyncio.sleep(RETRANSMIT_POLL)

    def shutdown(self) -> None:
        if self.progress is not HandshakeProgress.CONNECTED:
            self.coaptransport.remember_failed(self._host, self._port, self._pskId, self.progress)
        super().shutdown()


class ClientInterface(tinydtls.MessageInterfaceTinyDTLS):  # type: ignore[misc]
    """aiocoap's tinydtls client transport, making :class:`_Connection` objects."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: How far the last handshake to each (host, port, identity) got, if it failed (a few kept).
        self.failed: OrderedDict[tuple[str, int, bytes], HandshakeProgress] = OrderedDict()

    def _connection_for_address(self, host: str, port: int, pskId: bytes, psk: bytes) -> _Connection:
        try:
            found: _Connection = self._pool[(host, port, pskId)]
            return found
        except KeyError:
            self.failed.pop((host, port, pskId), None)
            connection = _Connection(host, port, pskId, psk, self)
            self._pool[(host, port, pskId)] = connection
            return connection

    def remember_failed(self, host: str, port: int, identity: bytes, progress: HandshakeProgress) -> None:
        self.failed[(host, port, identity)] = progress
        while len(self.failed) > 16:
            self.failed.popitem(last=False)


async def create_dtls_client_context(loggername: str = "coap") -> aiocoap.Context:
    """An aiocoap client context that speaks coaps:// through mn_secd's client transport only."""
    ensure_upstream()
    loop = asyncio.get_running_loop()
    ctx = aiocoap.Context(loop=loop, loggername=loggername)
    await ctx._append_tokenmanaged_messagemanaged_transport(
        lambda mman: ClientInterface.create_client_transport_endpoint(mman, log=ctx.log, loop=loop)
    )
    return ctx


def client_handshake_progress(ctx: aiocoap.Context, host: str, port: int, identity: bytes) -> HandshakeProgress | None:
    """How far the handshake of ``ctx``'s connection to (host, port, identity) got.

    A failed handshake's connection is gone at once; its last progress is kept until the next
    attempt. None: no connection (never tried, or a completed session that has since ended).
    """
    for tman in ctx.request_interfaces:
        interface = getattr(tman.token_interface, "message_interface", None)
        if isinstance(interface, ClientInterface):
            connection = interface._pool.get((host, port, identity))
            if isinstance(connection, _Connection):
                return connection.progress
            return interface.failed.get((host, port, identity))
    return None


def _log_once(message: str, *args: Any, exc_info: bool = False) -> None:
    held_back = _limiter.allow(message)
    if held_back is not None:
        suffix = f" ({held_back} more since the last report)" if held_back else ""
        log.warning(message + suffix, *args, exc_info=exc_info, extra={"event": "dtls.client-trouble"})

"""A bare DTLS-PSK client for tests: one tinydtls context on one UDP socket, source port chosen.

aiocoap's own client cannot pick its source port or skip the close_notify, which the DTLS server
tests need (reused ports, peers that vanish). It runs on the test's event loop: tinydtls is not
thread-safe, so it must never run in another thread of the process that hosts the server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from DTLSSocket import dtls

CONNECTED = 0x1DE
LEVEL_WARNING = 1
LEVEL_FATAL = 2
CLOSE_NOTIFY = 0


class DtlsPeer(asyncio.DatagramProtocol):
    def __init__(self, identity: bytes, psk: bytes) -> None:
        self.identity = identity
        self.psk = psk
        self.events: list[tuple[int, int]] = []
        self.plaintext: asyncio.Queue[bytes] = asyncio.Queue()
        self._handshake: asyncio.Future[bool] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.session: Any = None
        self.dtls: Any = None

    @classmethod
    async def create(cls, identity: bytes, psk: bytes, server: tuple[str, int], port: int = 0) -> DtlsPeer:
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_datagram_endpoint(
            lambda: cls(identity, psk), local_addr=(server[0], port), remote_addr=server
        )
        return peer

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.dtls = dtls.DTLS(
            read=self._read,
            write=self._write,
            event=self._event,
            pskId=self.identity,
            pskStore={self.identity: self.psk},
        )

    def _read(self, sender: object, data: bytes) -> int:
        self.plaintext.put_nowait(data)
        return len(data)

    def _write(self, recipient: object, data: bytes) -> int:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data)
        return len(data)

    def _event(self, level: int, code: int) -> None:
        self.events.append((level, code))
        if self._handshake is not None and not self._handshake.done():
            if (level, code) == (0, CONNECTED):
                self._handshake.set_result(True)
            elif level == LEVEL_FATAL:
                self._handshake.set_result(False)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if self.dtls is not None:
            self.dtls.handleMessage(self.session, data)

    def error_received(self, exc: Exception) -> None:
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_result(False)

    @property
    def got_close_notify(self) -> bool:
        return any(code == CLOSE_NOTIFY and level in (LEVEL_WARNING, LEVEL_FATAL) for level, code in self.events)

    async def handshake(self, timeout: float = 2.0) -> bool:
        """True once connected; False on a fatal alert or silence (a wrong PSK gets no answer)."""
        self._handshake = asyncio.get_running_loop().create_future()
        self.session = self.dtls.connect("::1", 1234)  # tinydtls only routes by it; the socket is connected
        try:
            return await asyncio.wait_for(self._handshake, timeout)
        except TimeoutError:
            return False

    async def exchange(self, message: bytes, timeout: float = 2.0) -> bytes | None:
        self.dtls.write(self.session, message)
        try:
            return await asyncio.wait_for(self.plaintext.get(), timeout)
        except TimeoutError:
            return None

    async def request(self, request: Message, timeout: float = 2.0) -> Message | None:
        raw = await self.exchange(request.encode(), timeout)
        return None if raw is None else Message.decode(raw)

    def close(self, notify: bool = True) -> None:
        """Close the socket, with a close_notify first unless the test wants a peer that just vanishes.

        Then tinydtls's peer is freed and every DTLSSocket object released here, in this order:
        left to the garbage collector, a ``Connection`` can be freed after its context and then
        resets a peer in freed memory (a segfault), and a context freed while it holds a peer calls
        back into itself while dying.
        """
        assert self.transport is not None
        if not notify:
            self.transport.close()  # whatever resetPeer sends now is dropped by _write
        self._release()
        self.transport.close()

    def _release(self) -> None:
        if self.session is not None and self.dtls is not None:
            self.dtls.resetPeer(self.session)
        self.session = None
        self.dtls = None

    def __del__(self) -> None:
        self._release()  # a peer never closed: finalizers run before the collector breaks cycles


def coap_request(code: Code, path: list[str], *, mid: int, token: bytes = b"t1", **options: Any) -> Message:
    """A confirmable request with the message id and token chosen by the test."""
    msg = Message(code=code, uri_path=path, **options)
    msg.mtype = Type.CON
    msg.mid = mid
    msg.token = token
    return msg


_client_hellos: list[bytes] = []


def client_hello() -> bytes:
    """A ClientHello without a cookie, as tinydtls's client sends first (made once, then reused).

    A server answers it with a HelloVerifyRequest and, done right, keeps nothing: what a flood of
    ClientHellos from a local user costs.
    """
    if not _client_hellos:
        sent: list[bytes] = []
        context = dtls.DTLS(
            read=lambda *_: 0,
            write=lambda _, data: sent.append(data) or len(data),
            event=lambda *_: None,
            pskId=b"flood",
            pskStore={b"flood": b"flood-psk"},
        )
        session = context.connect("::1", 1234)
        context.resetPeer(session)  # never free a context holding a peer (see DtlsPeer.close)
        _client_hellos.append(sent[0])
    return _client_hellos[0]

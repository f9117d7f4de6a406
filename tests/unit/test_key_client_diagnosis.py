"""KeyServiceClient tells a silent server, a busy one and a wrong PSK apart, from how far the handshake got.

The servers here are stand-ins that stop at a given point of a real DTLS handshake: a socket that
never answers, and a tinydtls server that answers the cookie exchange and then nothing. A wrong PSK
against the real key service is in test_control_server.py (test_wrong_psk_gives_up_naming_the_cause).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from DTLSSocket import dtls

from mn_secd.client import KeyServiceClient, KeyServiceTimeout


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Finalise DTLS client objects now (see tests/unit/test_dtls_fix.py: CPython 3.11.7 and the GC)."""
    yield
    gc.collect()


class CookieOnly(asyncio.DatagramProtocol):
    """Answers each peer's first ClientHello with a HelloVerifyRequest, then goes quiet (overloaded)."""

    def __init__(self) -> None:
        self.heard: set[object] = set()
        self.transport: asyncio.DatagramTransport | None = None
        self.context = dtls.DTLS(read=lambda *_: 0, write=self._write, event=lambda *_: None, pskId=b"-", pskStore={})
        self._to: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _write(self, _: object, data: bytes) -> int:
        assert self.transport is not None
        self.transport.sendto(data, self._to)
        return len(data)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr in self.heard:
            return
        self.heard.add(addr)
        self._to = addr
        self.context.handleMessage(dtls.Session("::ffff:" + addr[0], addr[1]), data)


@pytest.fixture
async def cookie_only() -> AsyncIterator[int]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(CookieOnly, local_addr=("127.0.0.1", 0))
    yield transport.get_extra_info("sockname")[1]
    transport.close()


async def test_a_server_that_never_answers_is_called_silent() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
        mute.bind(("127.0.0.1", 0))
        started = time.monotonic()
        async with KeyServiceClient("ae-a", b"psk", "127.0.0.1", mute.getsockname()[1], handshake_timeout=1.0) as c:
            with pytest.raises(KeyServiceTimeout, match=r"no answer at all .* not running there, or too busy"):
                await c.status()
        assert time.monotonic() - started < 2.0


async def test_a_server_that_stops_after_the_cookie_exchange_is_called_busy(cookie_only: int) -> None:
    async with KeyServiceClient("ae-a", b"psk", "127.0.0.1", cookie_only, handshake_timeout=1.0) as client:
        with pytest.raises(KeyServiceTimeout, match=r"answered the DTLS cookie exchange, then nothing .* busy") as info:
            await client.status()
    assert "wrong PSK" not in str(info.value)

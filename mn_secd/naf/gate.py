"""Hold a DTLS peer's ClientKeyExchange until the NAF has fetched the key it names.

tinydtls looks the PSK up synchronously while it processes the ClientKeyExchange, so the key must
already be in the NAF's cache by then (see :mod:`mn_secd.naf.psk` for why it cannot be fetched from
inside the lookup). The gate sits in front of the DTLS server's datagram handler: when a datagram
carries a ClientKeyExchange whose identity is not cached, it keeps that datagram (and any that the
same peer sends meanwhile, in order), asks the prefetcher to fetch the key, and then hands them all
to tinydtls as if they had just arrived. The client only sees a handshake that took one Zn round
trip longer; nothing is retransmitted and no handshake fails for a key the BSF does vouch for.

Everything else (ClientHello, application data, peers whose key is cached) passes straight through.
The number of datagrams held per peer is bounded (DTLS retransmits what is dropped), and so is the
wait, whatever the prefetcher does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import aiocoap

from mn_secd.dtls import MAX_IDENTITY_LENGTH, peer_table
from mn_secd.naf.records import client_key_exchange_identity

log = logging.getLogger(__name__)

_Deliver = Callable[[bytes, Any], None]


class PskPrefetcher(Protocol):
    def needs_fetch(self, identity: bytes) -> bool:
        """True if the key for ``identity`` is not at hand yet."""

    async def fetch(self, identity: bytes) -> None:
        """Make the key for ``identity`` available to the synchronous PSK lookup; must not raise."""


class PrefetchGate:
    def __init__(self, prefetcher: PskPrefetcher, *, max_held: int = 16, max_wait: float = 5.0) -> None:
        self.prefetcher = prefetcher
        self.max_held = max_held
        self.max_wait = max_wait
        self._held: dict[tuple[int, Any], list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: How many ClientKeyExchanges were held for a fetch (for tests and statistics).
        self.holds = 0

    def install(self, ctx: aiocoap.Context) -> None:
        """Put the gate in front of a context made by ``mn_secd.dtls.create_dtls_server_contexts``."""
        table = peer_table(ctx)
        deliver: _Deliver = table.datagram_received

        def receive(data: bytes, sockaddr: Any) -> None:
            self._receive(deliver, data, sockaddr)

        # The event loop's transport calls the protocol's datagram_received by attribute lookup.
        table.datagram_received = receive  # type: ignore[method-assign]

    def _receive(self, deliver: _Deliver, data: bytes, sockaddr: Any) -> None:
        key = (id(deliver), sockaddr)
        held = self._held.get(key)
        if held is not None:
            if len(held) < self.max_held:
                held.append(data)
            return
        identity = client_key_exchange_identity(data)
        if identity is None or len(identity) > MAX_IDENTITY_LENGTH or not self.prefetcher.needs_fetch(identity):
            # No fetch for an identity tinydtls will refuse whatever the key (it checks the length first).
            deliver(data, sockaddr)
            return
        self.holds += 1
        self._held[key] = [data]
        task = asyncio.get_running_loop().create_task(self._release(key, deliver, sockaddr, identity))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, key: tuple[int, Any], deliver: _Deliver, sockaddr: Any, identity: bytes) -> None:
        try:
            async with asyncio.timeout(self.max_wait):
                await self.prefetcher.fetch(identity)
        except TimeoutError:
            log.warning(
                "key fetch for a DTLS peer took too long; letting its handshake fail",
                extra={"event": "naf.fetch-timeout"},
            )
        except asyncio.CancelledError:
            self._held.pop(key, None)  # shutting down: nobody to deliver to
            raise
        for data in self._held.pop(key, []):
            try:
                deliver(data, sockaddr)
            except Exception:
                log.exception("the DTLS server failed on a held datagram", extra={"event": "naf.gate-deliver-failed"})

    async def close(self) -> None:
        """Stop every pending fetch and drop what is held (before the server contexts shut down)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._held.clear()

"""A GBA-keyed CoAP/DTLS-PSK server for an IN-CSE: one call puts any aiocoap site behind it.

The server is DTLS only (plain CoAP is never bound), uses mn_secd's own DTLS server transport
(:mod:`mn_secd.dtls`), and answers each psk_identity with the key the BSF vouches for
over Zn. Resources find who they talk to with :func:`peer_claim`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiocoap

from mn_secd.dtls import authenticated_claim, bound_address, create_dtls_server_contexts
from mn_secd.naf.gate import PrefetchGate
from mn_secd.naf.psk import GbaPskCredentials, NafClaim


def peer_claim(request: aiocoap.Message) -> NafClaim | None:
    """The claim of the GBA-authenticated peer that sent ``request``, or None (never trust the request otherwise)."""
    claim = authenticated_claim(request.remote)
    return claim if isinstance(claim, NafClaim) else None


class NafServer:
    """The running server: its contexts (one per address), credentials and prefetch gate."""

    def __init__(self, contexts: list[aiocoap.Context], credentials: GbaPskCredentials, gate: PrefetchGate) -> None:
        self.contexts = contexts
        self.credentials = credentials
        self.gate = gate

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (address, port) pairs really bound (useful after asking for port 0)."""
        return [bound_address(ctx) for ctx in self.contexts]

    async def close(self) -> None:
        await self.gate.close()
        for ctx in self.contexts:
            await ctx.shutdown()


async def start_naf_server(
    site: Any,
    credentials: GbaPskCredentials,
    addresses: Sequence[str],
    port: int,
    *,
    max_peers: int = 256,
    idle_timeout: float = 300.0,
) -> NafServer:
    """Serve ``site`` over DTLS-PSK on each address (port 0: an ephemeral port per address, see ``addresses``)."""
    contexts = await create_dtls_server_contexts(
        site, credentials, addresses, port, max_peers=max_peers, idle_timeout=idle_timeout
    )
    gate = PrefetchGate(credentials)
    for ctx in contexts:
        gate.install(ctx)
    return NafServer(contexts, credentials, gate)

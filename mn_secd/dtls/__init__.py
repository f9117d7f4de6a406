"""DTLS plumbing shared by the key service, the NAF library and the AE client.

mn_secd speaks CoAP over DTLS-PSK through aiocoap with its own server and client transports
(:mod:`.server` over :mod:`.table` and :mod:`.session`; :mod:`.client`), installed only on the
contexts made here; aiocoap contexts made anywhere else in the process keep upstream's transports,
untouched. :mod:`.upstream` pins the upstream code those transports are written against. The
sans-IO parts: :mod:`.budget` (which peers stay), :mod:`.records` (DTLS record headers),
:mod:`.coap_screen` (RFC 7252 message checks), :mod:`.messages` (bounded deduplication). The rest
of mn_secd uses only the names exported here. ``docs/DTLS.md`` gathers what tinydtls and aiocoap
do that these modules rely on.
"""

from mn_secd.dtls.client import HandshakeProgress, client_handshake_progress, create_dtls_client_context
from mn_secd.dtls.server import (
    bound_address,
    create_dtls_server_contexts,
    evict_sessions,
    forget_answers,
    peer_table,
)
from mn_secd.dtls.session import Session, SessionEnded, authenticated_claim, hold_session
from mn_secd.dtls.upstream import MAX_IDENTITY_LENGTH, MAX_PSK_LENGTH, check_psk, check_upstream

__all__ = [
    "MAX_IDENTITY_LENGTH",
    "MAX_PSK_LENGTH",
    "HandshakeProgress",
    "Session",
    "SessionEnded",
    "authenticated_claim",
    "bound_address",
    "check_psk",
    "check_upstream",
    "client_handshake_progress",
    "create_dtls_client_context",
    "create_dtls_server_contexts",
    "evict_sessions",
    "forget_answers",
    "hold_session",
    "peer_table",
]

"""DTLS plumbing shared by the key service, the NAF library and the AE client.

aiocoap's DTLS transports (tinydtls through DTLSSocket) need local fixes to serve a long-running
daemon; they live in this package, and the rest of mn_secd uses only the names exported here.
"""

from mn_secd.dtls.fixes import (
    MAX_IDENTITY_LENGTH,
    MAX_PSK_LENGTH,
    Session,
    SessionEnded,
    apply,
    authenticated_claim,
    bound_address,
    check_psk,
    check_upstream,
    client_session_state,
    create_dtls_server_contexts,
    evict_sessions,
    peer_table,
)

__all__ = [
    "MAX_IDENTITY_LENGTH",
    "MAX_PSK_LENGTH",
    "Session",
    "SessionEnded",
    "apply",
    "authenticated_claim",
    "bound_address",
    "check_psk",
    "check_upstream",
    "client_session_state",
    "create_dtls_server_contexts",
    "evict_sessions",
    "peer_table",
]

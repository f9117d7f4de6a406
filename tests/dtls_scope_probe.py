"""mn_secd's DTLS transports next to plain aiocoap contexts in one fresh process.

Run as a script by tests/integration/test_dtls_scope.py, in its own process so that "before"
really is before anything of mn_secd was imported. It records every attribute of the upstream
modules and classes mn_secd builds on, runs the key service (server) and its client over DTLS,
records them again, then serves and requests over a plain aiocoap DTLS server and client context.
Prints one JSON object with what it found.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import socket
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap.credentials import CredentialsMap

UPSTREAM_MODULES = [
    "aiocoap.protocol",
    "aiocoap.messagemanager",
    "aiocoap.tokenmanager",
    "aiocoap.transports.generic_udp",
    "aiocoap.transports.simplesocketserver",
    "aiocoap.transports.tinydtls",
    "aiocoap.transports.tinydtls_server",
    "DTLSSocket.dtls",
]
PSK = b"scope-probe-psk-0001"


def snapshot() -> dict[str, int]:
    """id() of every attribute of the upstream modules and of the classes they define."""
    seen: dict[str, int] = {}
    for name in UPSTREAM_MODULES:
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            seen[f"{name}.{attribute}"] = id(value)
            if isinstance(value, type) and value.__module__ == name:
                for member, inner in vars(value).items():
                    seen[f"{name}.{attribute}.{member}"] = id(inner)
    return seen


class Hello(resource.Resource):  # type: ignore[misc]
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=b"hello from plain aiocoap")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_mn_secd() -> str:
    from mn_secd.client import KeyServiceClient
    from mn_secd.control.registry import AeEntry, AeRegistry
    from mn_secd.control.server import start_control_server
    from mn_secd.naf_keys import GbaMode, KeyServiceStatus, NafKey
    from mn_secd.ua import UaId, naf_id

    class Keys:
        async def get_key(self, naf_fqdn: str, ua_id: UaId, force: bool = False) -> NafKey:
            expires = datetime.now(UTC) + timedelta(hours=1)
            nid = naf_id(naf_fqdn, ua_id)
            return NafKey(naf_fqdn, ua_id, nid, "btid@bsf.example", bytes(32), expires, GbaMode.GBA_ME)

        async def force_bootstrap(self) -> None:
            return None

        def status(self) -> KeyServiceStatus:
            return KeyServiceStatus(True, None, True, "btid@bsf.example", None, GbaMode.GBA_ME, None)

        def subscribe(self, callback: Any) -> Any:
            return lambda: None

    registry = AeRegistry([AeEntry("ae-probe", PSK, ("naf.example.net",), (UaId.dtls_psk(),))])
    server = await start_control_server(Keys(), registry, ["127.0.0.1"], 0)
    try:
        host, port = server.addresses[0]
        async with KeyServiceClient("ae-probe", PSK, host, port) as client:
            key = await client.get_key("naf.example.net")
        return key.btid
    finally:
        await server.close()


async def run_plain() -> dict[str, Any]:
    from aiocoap.transports import tinydtls, tinydtls_server
    from DTLSSocket import dtls

    credentials = CredentialsMap()
    credentials.load_from_dict({":probe": {"dtls": {"psk": PSK, "client-identity": b"probe"}}})
    site = resource.Site()
    site.add_resource(["hello"], Hello())
    port = free_port()
    server = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port - 1), server_credentials=credentials, transports=["tinydtls_server"]
    )
    client = await aiocoap.Context.create_client_context(transports=["tinydtls"])
    try:
        uri = f"coaps://127.0.0.1:{port}/hello"
        client.client_credentials.load_from_dict({uri: {"dtls": {"psk": PSK, "client-identity": b"probe"}}})
        request = client.request(aiocoap.Message(code=aiocoap.GET, uri=uri))
        response = await asyncio.wait_for(request.response, 10)
        server_interface = server.request_interfaces[0].token_interface.message_interface
        client_interface = client.request_interfaces[0].token_interface.message_interface
        [connection] = list(client_interface._pool.values())
        [peer] = list(server_interface._pool._connections.values())
        return {
            "payload": response.payload.decode(),
            "server_interface": type(server_interface) is tinydtls_server.MessageInterfaceTinyDTLSServer,
            "server_socket": type(server_interface._pool) is tinydtls_server._DatagramServerSocketSimpleDTLS,
            "server_peer": type(peer) is tinydtls_server._AddressDTLS,
            "server_peer_context": type(peer._dtls_socket) is dtls.DTLS and dtls.DTLS.__module__ == "DTLSSocket.dtls",
            "client_interface": type(client_interface) is tinydtls.MessageInterfaceTinyDTLS,
            "client_connection": type(connection) is tinydtls.DTLSClientConnection,
            "client_event": tinydtls.DTLSClientConnection._event.__module__ == "aiocoap.transports.tinydtls",
            "serversocket": tinydtls_server.MessageInterfaceTinyDTLSServer._serversocket
            is tinydtls_server._DatagramServerSocketSimpleDTLS,
        }
    finally:
        for address in list(server.request_interfaces[0].token_interface.message_interface._pool._connections.values()):
            address._dtls_socket.resetPeer(address._dtls_session)  # upstream leaves them at shutdown
        await client.shutdown()
        await server.shutdown()


async def main() -> None:
    before = snapshot()
    loaded_before = sorted(name for name in sys.modules if name.startswith("mn_secd"))
    btid = await run_mn_secd()
    after = snapshot()
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    plain = await run_plain()
    print(json.dumps({"loaded_before": loaded_before, "btid": btid, "changed": changed, "plain": plain}))


if __name__ == "__main__":
    asyncio.run(main())

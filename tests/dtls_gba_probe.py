"""Loopback DTLS handshakes with GBA-sized credentials, through plain aiocoap (none of our fixes).

Run as a script by tests/integration/test_dtls_gba_psk.py, in its own process: with the upstream
DTLSSocket build these credentials overrun tinydtls's buffers, which may kill the process rather
than fail a handshake, and a test must be able to see that without taking pytest down with it.
Prints one JSON object per line: ``{"case": ..., "outcome": "ok" | "refused" | "timeout"}``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import aiocoap
import aiocoap.resource as resource
from aiocoap.credentials import CredentialsMap

BTID = b"I1U8vpY3qJ0hiuZNrke/NQ==@bsf.mnc001.mcc001.pub.3gppnetwork.org"  # 62 octets
KEY = bytes(range(0x40, 0x60))  # a 32-octet Ks_NAF
OTHER_BTID = b"AQIDBAUGBwgJCgsMDQ4PEA==@bsf.mnc001.mcc001.pub.3gppnetwork.org"
OVERLONG = bytes(range(65))  # one octet more than the patched tinydtls holds
HOST = "127.0.0.1"


class Hello(resource.Resource):  # type: ignore[misc]
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=b"hello")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def attempt(port: int, identity: bytes, psk: bytes, timeout: float) -> str:
    """One request on a fresh client context: "ok", "refused" (a DTLS/network error) or "timeout"."""
    client = await aiocoap.Context.create_client_context(transports=["tinydtls"])
    uri = f"coaps://{HOST}:{port}/hello"
    client.client_credentials.load_from_dict({uri: {"dtls": {"psk": psk, "client-identity": identity}}})
    try:
        async with asyncio.timeout(timeout):
            response = await client.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response
        return "ok" if response.payload == b"hello" else f"answer {response.code}"
    except TimeoutError:
        return "timeout"
    except aiocoap.error.NetworkError:
        return "refused"
    finally:
        await client.shutdown()


async def main(cases: list[str]) -> None:
    site = resource.Site()
    site.add_resource(["hello"], Hello())
    credentials = CredentialsMap()
    credentials.load_from_dict(
        {
            ":btid": {"dtls": {"psk": KEY, "client-identity": BTID}},
            ":overlong": {"dtls": {"psk": OVERLONG, "client-identity": OTHER_BTID}},
        }
    )
    port = free_port()
    # Upstream's DTLS server listens on the port it is given plus one.
    server = await aiocoap.Context.create_server_context(
        site, bind=(HOST, port - 1), transports=["tinydtls_server"], server_credentials=credentials
    )
    runs = {
        # The standard form: psk_identity = the B-TID, psk = the whole Ks_NAF.
        "standard": (BTID, KEY, 5.0),
        # The server's PSK for this identity is longer than tinydtls holds: refused, not copied.
        "server-overlong": (OTHER_BTID, KEY, 3.0),
        # The client's own PSK is too long: it must give up without writing past the buffer.
        "client-overlong": (BTID, OVERLONG, 3.0),
    }
    try:
        for case in cases:
            identity, psk, timeout = runs[case]
            outcome = await attempt(port, identity, psk, timeout)
            print(json.dumps({"case": case, "outcome": outcome}), flush=True)
    finally:
        await server.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))

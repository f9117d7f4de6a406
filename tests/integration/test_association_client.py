"""The MN-side association's failure handling, against a DTLS server whose behaviour the test sets.

The server is our DTLS server stack (dtls_fix) with a static PSK table and a site that can answer,
stay silent or answer 4.01; the key source stands in for the daemon and records what it was asked,
so each test can count re-keys and forced bootstraps exactly. The whole chain with the real daemon
is in test_association.py.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiocoap
import aiocoap.resource
import pytest
from aiocoap.credentials import CredentialsMap

from mn_secd.client.association import NafAssociation
from mn_secd.dtls import bound_address, create_dtls_server_contexts
from mn_secd.errors import NafError, NafHandshakeFailed, NafTimeout
from mn_secd.sim.world import free_udp_port

FQDN = "in-cse.example.org"


@dataclass(frozen=True)
class Key:
    btid: str
    key: bytes = field(repr=False)


def make_key(n: int) -> Key:
    return Key(base64.b64encode(bytes([n]) * 16).decode() + "@bsf.example.org", bytes([n]) * 32)


class Keys:
    """The daemon as the association sees it: a current key, a new one on a forced bootstrap."""

    def __init__(self) -> None:
        self.generation = 1
        self.calls: list[bool] = []  # the ``force`` of each get_key

    async def get_key(self, naf_fqdn: str, ua: str = "dtls-psk", force: bool = False) -> Key:
        assert naf_fqdn == FQDN
        self.calls.append(force)
        if force:
            self.generation += 1
        return make_key(self.generation)


class Accepted(CredentialsMap):  # type: ignore[misc]
    """Server credentials: the bare B-TIDs of the keys the test lets in, with the whole key as PSK."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[bytes, bytes] = {}

    def allow(self, key: Key) -> None:
        self.keys[key.btid.encode()] = key.key

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, str]:
        return self.keys[identity], identity.decode()


class Site(aiocoap.resource.Resource):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.unauthorised: set[str] = set()  # claims answered 4.01
        self.release = asyncio.Event()

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.uri_path == ("silent",):
            await self.release.wait()
        claims = request.remote.authenticated_claims
        if set(claims) & self.unauthorised:
            return aiocoap.Message(code=aiocoap.UNAUTHORIZED)
        return aiocoap.Message(code=aiocoap.CONTENT, payload=claims[0].encode())


@dataclass
class Server:
    credentials: Accepted
    site: Site
    host: str
    port: int


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    credentials, site = Accepted(), Site()
    contexts = await create_dtls_server_contexts(site, credentials, ["127.0.0.1"], 0, max_peers=16, idle_timeout=30)
    host, port = bound_address(contexts[0])
    yield Server(credentials, site, host, port)
    site.release.set()
    for ctx in contexts:
        await ctx.shutdown()


@pytest.fixture
async def keys() -> Keys:
    return Keys()


@pytest.fixture
async def association(server: Server, keys: Keys) -> AsyncIterator[NafAssociation]:
    async with NafAssociation(keys, FQDN, host=server.host, port=server.port, timeout=1.0) as assoc:
        yield assoc


async def test_accepted_key_needs_no_rekey(server: Server, keys: Keys, association: NafAssociation) -> None:
    server.credentials.allow(make_key(1))
    response = await association.request(aiocoap.GET, ("x",))
    assert response.payload == make_key(1).btid.encode()  # psk_identity = the bare B-TID (TS-0003)
    await association.request(aiocoap.GET, ("x",))  # same session, no new key request
    assert keys.calls == [False]
    assert association.refusals == 0


async def test_refused_identity_gets_one_forced_bootstrap(
    server: Server, keys: Keys, association: NafAssociation
) -> None:
    server.credentials.allow(make_key(2))  # only the key after one re-bootstrap
    start = time.monotonic()
    response = await association.request(aiocoap.GET, ("x",))
    assert response.code == aiocoap.CONTENT
    assert time.monotonic() - start < 1.0  # the refusal is an alert, not a timeout
    assert keys.calls == [False, False, True]  # ask, re-ask (same B-TID), then force
    assert (association.refusals, association.forced_bootstraps) == (1, 1)
    assert association.btid == make_key(2).btid


async def test_no_forced_bootstrap_when_the_daemon_already_has_a_new_key(
    server: Server, keys: Keys, association: NafAssociation
) -> None:
    server.credentials.allow(make_key(1))
    server.credentials.allow(make_key(2))
    assert (await association.request(aiocoap.GET, ("x",))).code == aiocoap.CONTENT
    keys.generation = 2  # the daemon re-bootstrapped on its own ...
    server.site.unauthorised.add(make_key(1).btid)
    assert (await association.request(aiocoap.GET, ("x",))).code == aiocoap.CONTENT  # ... 4.01, re-key
    assert keys.calls == [False, False]
    assert (association.refusals, association.forced_bootstraps) == (1, 0)
    assert association.btid == make_key(2).btid


async def test_refused_twice_is_a_typed_error_after_one_bootstrap(keys: Keys, association: NafAssociation) -> None:
    with pytest.raises(NafHandshakeFailed, match="refused the DTLS handshake"):
        await association.request(aiocoap.GET, ("x",))
    assert keys.calls == [False, False, True]
    assert association.btid is None  # no session left holding a refused key


async def test_wrong_key_is_a_bounded_handshake_failure(
    server: Server, keys: Keys, association: NafAssociation
) -> None:
    for n in (1, 2):  # the server knows the identities, with other PSKs: tinydtls drops silently
        server.credentials.keys[make_key(n).btid.encode()] = bytes(32)
    start = time.monotonic()
    with pytest.raises(NafHandshakeFailed, match="no DTLS handshake"):
        await association.request(aiocoap.GET, ("x",))
    assert 2.0 <= time.monotonic() - start < 3.5  # two attempts of 1 s, not aiocoap's ~90 s
    assert keys.calls == [False, False, True]


async def test_silence_on_an_established_session_is_a_timeout_without_rekey(
    server: Server, keys: Keys, association: NafAssociation
) -> None:
    server.credentials.allow(make_key(1))
    await association.request(aiocoap.GET, ("x",))
    with pytest.raises(NafTimeout):
        await association.request(aiocoap.GET, ("silent",))
    assert keys.calls == [False]
    assert association.refusals == 0
    # The next request starts a fresh session with the same key.
    assert (await association.request(aiocoap.GET, ("x",))).code == aiocoap.CONTENT
    assert keys.calls == [False, False]


async def test_4_01_means_rekey_once(server: Server, keys: Keys, association: NafAssociation) -> None:
    server.credentials.allow(make_key(1))
    server.credentials.allow(make_key(2))
    server.site.unauthorised.add(make_key(1).btid)
    response = await association.request(aiocoap.GET, ("x",))
    assert response.code == aiocoap.CONTENT
    assert keys.calls == [False, False, True]


async def test_nobody_listening_is_not_a_reason_to_bootstrap(keys: Keys) -> None:
    async with NafAssociation(keys, FQDN, host="127.0.0.1", port=free_udp_port(), timeout=1.0) as assoc:
        with pytest.raises(NafError) as info:
            await assoc.request(aiocoap.GET, ("x",))
    assert not isinstance(info.value, NafHandshakeFailed)
    assert keys.calls == [False]


async def test_a_silent_naf_is_not_a_reason_to_bootstrap(keys: Keys) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:  # bound, never answers
        mute.bind(("127.0.0.1", 0))
        async with NafAssociation(keys, FQDN, host="127.0.0.1", port=mute.getsockname()[1], timeout=1.0) as assoc:
            with pytest.raises(NafError, match="nothing came back") as info:
                await assoc.request(aiocoap.GET, ("x",))
    assert not isinstance(info.value, NafHandshakeFailed)
    assert keys.calls == [False]  # no re-key, no forced bootstrap: a new key would not make it answer

"""The key service over real DTLS on loopback, in front of the real chain.

Software UICC behind the AT modem emulator on a pty, the daemon's card layer over that pty, the Ub
client against the reference BSF over loopback HTTP, the real KeyStore, and the control server with
the patched aiocoap DTLS server. AEs are the client library, raw tinydtls peers, a plain UDP socket,
and libcoap's own clients.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import resource
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import aiocoap
import cbor2
import httpx
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import OpaqueOption
from dtls_peer import DtlsPeer, coap_request
from harness import open_test_card
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mn_secd.client import KeyServiceClient
from mn_secd.control.registry import AeEntry, AeRegistry
from mn_secd.control.server import ControlServer, start_control_server
from mn_secd.dtls import table as dtls_table
from mn_secd.errors import Culprit, KeyServiceRefused, KeyServiceRejected, KeyServiceTimeout
from mn_secd.gba.keystore import KeyStore
from mn_secd.gba.planner import BootstrapTiming, Span
from mn_secd.gba.ub import UbClient
from mn_secd.naf_keys import GbaMode, GbaPolicy
from mn_secd.sim.bsf import ZN_PATH
from mn_secd.sim.world import SimulatedWorld
from mn_secd.ua import UaId
from mn_secd.uicc.card import Card

NAF = "in-cse.example.net"
OTHER_NAF = "other-cse.example.net"
# ASCII, so libcoap's -k can carry it; 32 octets, more than upstream tinydtls holds (16).
PSK_A = b"psk-of-ae-a-0001-a-32-octet-key!"


def ae(identity: str, psk: bytes, naf: tuple[str, ...] = (NAF,), force: bool = True) -> AeEntry:
    return AeEntry(identity, psk, naf, (UaId.dtls_psk(),), force)


@dataclass
class Chain:
    world: SimulatedWorld
    card: Card
    ub: UbClient
    keys: KeyStore
    server: ControlServer

    @property
    def address(self) -> tuple[str, int]:
        return self.server.addresses[0]

    @property
    def bootstraps(self) -> int:
        assert self.world.bsf is not None
        return self.world.bsf.successes

    def client(self, identity: str = "ae-a", psk: bytes = PSK_A, **kw: float) -> KeyServiceClient:
        return KeyServiceClient(identity, psk, *self.address, **kw)


ChainFactory = Callable[..., Awaitable[Chain]]


@pytest.fixture
async def make_chain(
    make_world: Callable[..., Awaitable[SimulatedWorld]], cards: list[Card]
) -> AsyncIterator[ChainFactory]:
    """The daemon's stack in this process over a world of its own; the shared fixtures stop the
    world and the card, this one the key service in front of them."""
    built: list[Chain] = []

    async def make(
        aes: list[AeEntry] | None = None,
        *,
        bsf_lifetime: timedelta = timedelta(hours=1),
        refresh_margin: float = 300.0,
        max_peers: int = 256,
    ) -> Chain:
        world = await make_world(bsf_lifetime=bsf_lifetime)
        card = await open_test_card(cards, str(world.modem_link))
        ub = UbClient(world.bsf_url, timeout=5.0)
        # a refresh may follow a bootstrap after 1 s here (10 s in the daemon): lifetimes of seconds
        timing = BootstrapTiming(
            refresh_margin=Span(seconds=refresh_margin), refresh_jitter=Span(), min_bootstrap_interval=1.0
        )
        keys = KeyStore(card, ub, GbaPolicy.AUTO, timing=timing)
        registry = AeRegistry(aes if aes is not None else [ae("ae-a", PSK_A), ae("ae-b", b"psk-of-ae-b", (OTHER_NAF,))])
        server = await start_control_server(keys, registry, ["127.0.0.1"], 0, max_peers=max_peers, idle_timeout=60)
        chain = Chain(world, card, ub, keys, server)
        built.append(chain)
        return chain

    yield make
    for chain in built:
        await chain.server.close()
        await chain.keys.close()
        await chain.ub.aclose()


@pytest.fixture
async def chain(make_chain: ChainFactory) -> Chain:
    return await make_chain()


async def zn_key(chain: Chain, btid: str, naf_fqdn: str) -> bytes:
    """What the BSF tells a NAF over Zn for this B-TID: the AE's key must be the same."""
    body = {"btId": btid, "nafId": {"nafFqdn": naf_fqdn, "uaSecProtId": UaId.dtls_psk().hex}}
    async with httpx.AsyncClient() as http:
        answer = await http.post(chain.world.bsf_url + ZN_PATH, json=body)
    assert answer.status_code == 200, answer.text
    return bytes.fromhex(answer.json()["meKeyMaterial"])


# --- keys and refusals -----------------------------------------------------------------------------


async def test_an_ae_gets_keys_for_its_naf_and_4_03_for_another(chain: Chain) -> None:
    async with chain.client() as ae_a:
        key = await ae_a.get_key(NAF)
        assert key.gba_mode is GbaMode.GBA_U  # the first lab card has an ISIM with GBA_U
        assert key.key == await zn_key(chain, key.btid, NAF)
        with pytest.raises(KeyServiceRejected) as info:
            await ae_a.get_key(OTHER_NAF)
        status = await ae_a.status()
    refused = info.value
    assert (refused.code, refused.kind, refused.culprit) == ("4.03 Forbidden", "not-authorised", Culprit.AE)
    assert status.btid == key.btid and status.card_present and "*" in (status.impi or "")
    assert chain.bootstraps == 1


async def test_wrong_psk_or_unknown_identity_gets_no_key(chain: Chain) -> None:
    started = time.monotonic()
    async with chain.client(psk=b"psk-of-ae-a-9999") as wrong:
        with pytest.raises(KeyServiceTimeout, match="most likely a wrong PSK for identity 'ae-a'"):
            await wrong.get_key(NAF)
    assert time.monotonic() - started < 5.5  # gave up within the 5 s handshake budget
    started = time.monotonic()
    async with chain.client("mallory", PSK_A) as unknown:
        with pytest.raises(KeyServiceRefused, match="does not know the PSK identity 'mallory'"):
            await unknown.get_key(NAF)
    assert time.monotonic() - started < 1.0
    assert chain.bootstraps == 0


@pytest.mark.parametrize("port_offset", [0, -1], ids=["coaps-port", "coap-port"])
async def test_plain_coap_gets_no_answer(chain: Chain, port_offset: int) -> None:
    """Neither the DTLS port nor the port below it (where upstream would serve coap://) answers CoAP."""
    host, port = chain.address
    request = coap_request(Code.GET, ["status"], mid=1).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        plain.settimeout(1.0)
        plain.connect((host, port + port_offset))
        plain.send(request)
        with pytest.raises((TimeoutError, ConnectionRefusedError)):
            plain.recv(2048)
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        uri = f"coap://{host}:{port + port_offset}/key?naf={NAF}"
        with pytest.raises((TimeoutError, aiocoap.error.NetworkError)):
            await asyncio.wait_for(client.request(aiocoap.Message(code=Code.GET, uri=uri)).response, 1.0)
    finally:
        await client.shutdown()
    assert chain.server.peer_count == 0  # plain datagrams never even make a DTLS peer


# --- observation --------------------------------------------------------------------------------------


async def test_observer_is_notified_after_a_proactive_refresh_and_after_a_wipe(make_chain: ChainFactory) -> None:
    chain = await make_chain(bsf_lifetime=timedelta(seconds=4), refresh_margin=2.0)
    btids: list[str] = []
    async with chain.client() as observer:
        with pytest.raises(KeyServiceRejected) as info:
            async with asyncio.timeout(20):
                async for answer in observer.observe_key(NAF):
                    btids.append(answer.btid)
                    assert answer.key == await zn_key(chain, answer.btid, NAF)
                    if len(btids) == 2:  # the proactive refresh came: now take the card out
                        assert chain.world.modem is not None
                        chain.world.modem.remove_sim()
    assert len(btids) == 2 and btids[0] != btids[1]
    assert chain.bootstraps == 2  # one on demand, one proactive; the notifications forced none
    assert (info.value.code, info.value.kind) == ("5.03 Service Unavailable", "uicc-absent")
    assert info.value.retry_after == 30.0


# --- load -----------------------------------------------------------------------------------------------


async def test_200_aes_at_a_cold_start_are_served_with_one_bootstrap(make_chain: ChainFactory) -> None:
    aes = [ae(f"ae-{i:03d}", f"psk-{i:03d}".encode()) for i in range(200)]
    chain = await make_chain(aes)
    clients = [chain.client(e.identity, e.psk, handshake_timeout=15.0) for e in aes]
    try:
        answers = await asyncio.wait_for(asyncio.gather(*(c.get_key(NAF) for c in clients)), 60)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert len({a.btid for a in answers}) == 1 and len({a.key for a in answers}) == 1
    assert chain.bootstraps == 1
    assert chain.keys.bootstraps == 1


async def test_peer_table_stays_bounded_through_10000_handshakes(make_chain: ChainFactory) -> None:
    """10,000 full handshakes from distinct source ports, 8 at a time, against a 64-peer table."""
    chain = await make_chain(max_peers=64)
    server = chain.address
    used: set[int] = set()
    candidates = iter(range(20000, 61000))
    high_water = 0

    async def one() -> None:
        nonlocal high_water
        while True:
            port = next(candidates)
            try:
                peer = await DtlsPeer.create(b"ae-a", PSK_A, server, port)
            except OSError:
                continue  # in use by someone else on this machine
            break
        try:
            assert await peer.handshake(timeout=5.0), peer.events
            used.add(peer.port)
        finally:
            peer.close(notify=False)  # vanish without a close_notify: the worst case for the table
        high_water = max(high_water, chain.server.peer_count)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    for _ in range(10000 // 8):
        await asyncio.gather(*(one() for _ in range(8)))
    elapsed = time.monotonic() - started
    assert len(used) == 10000
    assert high_water <= 64 + 8  # at most 64 sessions, and the 8 handshakes under way
    gc.collect()
    assert sum(isinstance(o, dtls_table._Peer) for o in gc.get_objects()) <= 64 + 8
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"10000 handshakes in {elapsed:.1f} s; peer table high water {high_water}; max RSS grew {grown_mib:.1f} MiB")
    assert grown_mib < 64
    async with chain.client() as ae_a:  # and the server still serves
        assert (await ae_a.get_key(NAF)).naf_fqdn == NAF


# --- fuzzing ---------------------------------------------------------------------------------------------

_methods = st.sampled_from([Code.GET, Code.POST, Code.PUT, Code.DELETE, Code.FETCH, Code.PATCH, Code.iPATCH])
_paths = st.sampled_from([["key"], ["status"], ["bootstrap"], [".well-known", "core"], ["key", "x"], ["nope"]])
_formats = st.one_of(st.none(), st.sampled_from([0, 40, 50, 60, 11542]), st.integers(0, 65535))
_fields = st.none() | st.booleans() | st.integers() | st.text(max_size=30) | st.binary(max_size=8)
_cbor_maps = st.dictionaries(st.sampled_from(["naf", "ua", "force", "x"]), _fields, max_size=4)
_json_maps = st.dictionaries(
    st.sampled_from(["naf", "ua", "force"]), _fields.filter(lambda v: not isinstance(v, bytes))
)
_payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(cbor2.dumps, _cbor_maps),
    st.builds(lambda d: json.dumps(d).encode(), _json_maps),
)
#: Options aiocoap does not know: odd numbers are critical (answered 4.02), even ones are ignored.
_unknown_options = st.lists(
    st.tuples(st.sampled_from([9, 25, 2049, 65001, 2048, 65000]), st.binary(max_size=12)), max_size=2
)
_queries = st.lists(
    st.one_of(st.text(max_size=20), st.sampled_from([f"naf={OTHER_NAF}", "ua=xyz", "force=2"])), max_size=3
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=_methods,
    path=_paths,
    content_format=_formats,
    accept=_formats,
    payload=_payloads,
    query=_queries,
    observe=st.sampled_from([None, 0, 1]),
    unknown=_unknown_options,
)
async def test_fuzzed_requests_get_4xx_and_the_server_keeps_serving(
    fuzz_session: tuple[Chain, aiocoap.Context, str],
    method: Code,
    path: list[str],
    content_format: int | None,
    accept: int | None,
    payload: bytes,
    query: list[str],
    observe: int | None,
    unknown: list[tuple[int, bytes]],
) -> None:
    _, client, base = fuzz_session
    message = aiocoap.Message(code=method, uri=base + "/".join(path), payload=payload)
    message.opt.uri_query = query
    if content_format is not None:
        message.opt.content_format = content_format
    if accept is not None:
        message.opt.accept = accept
    if observe is not None:
        message.opt.observe = observe
    for number, value in unknown:
        message.opt.add_option(OpaqueOption(number, value))
    request = client.request(message)
    answer = await asyncio.wait_for(request.response, 10)
    if request.observation is not None and not request.observation.cancelled:
        request.observation.cancel()
    assert answer.code.class_ in (2, 4), (answer.code, answer.payload)
    if answer.code.class_ == 2:  # only what the ACL allows can succeed: AE A's key, status, bootstrap
        assert path in (["key"], ["status"], ["bootstrap"], [".well-known", "core"])
    if any(number % 2 for number, _ in unknown):  # never acted upon: 4.02, or refused before that
        assert answer.code in (Code.BAD_OPTION, Code.METHOD_NOT_ALLOWED, Code.NOT_FOUND), answer.code


@pytest.fixture
async def fuzz_session(
    chain: Chain, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[Chain, aiocoap.Context, str]]:
    host, port = chain.address
    client = await aiocoap.Context.create_client_context(transports=["tinydtls"])
    client.client_credentials.load_from_dict(
        {f"coaps://{host}:{port}/*": {"dtls": {"psk": PSK_A, "client-identity": b"ae-a"}}}
    )
    yield chain, client, f"coaps://{host}:{port}/"
    await client.shutdown()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # Raw garbage inside an authenticated session, then: still serving.
    peer = await DtlsPeer.create(b"ae-a", PSK_A, chain.address)
    assert await peer.handshake()
    assert await peer.exchange(b"\x00\x01garbage", timeout=0.3) is None
    answer = await peer.request(coap_request(Code.GET, ["status"], mid=7))
    assert answer is not None and answer.code == Code.CONTENT
    peer.close()


# --- libcoap --------------------------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("tool", ["coap-client-openssl", "coap-client-gnutls"])
async def test_libcoap_clients(chain: Chain, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian package libcoap3-bin)")
    host, port = chain.address
    base = f"coaps://{host}:{port}"

    async def run(*args: str, wait: int = 5) -> str:
        proc = await asyncio.create_subprocess_exec(
            tool, "-B", str(wait), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0  # libcoap 4.3.1 exits 0 even when the request failed: read the output
        return out.decode(errors="replace")

    got = await run("-u", "ae-a", "-k", PSK_A.decode(), "-A", "50", f"{base}/key?naf={NAF}&ua=dtls-psk")
    answer = json.loads(got)
    assert answer["naf_fqdn"] == NAF and answer["ua_id"] == "010001c0a8" and answer["gba_mode"] == "gba-u"
    assert bytes.fromhex(answer["key"]) == await zn_key(chain, answer["btid"], NAF)

    fetched = await run(
        "-u", "ae-a", "-k", PSK_A.decode(), "-m", "fetch", "-t", "50", "-A", "50", "-e", json.dumps({"naf": NAF}),
        f"{base}/key",
    )  # fmt: skip
    assert json.loads(fetched)["btid"] == answer["btid"]

    forbidden = await run("-u", "ae-a", "-k", PSK_A.decode(), f"{base}/key?naf={OTHER_NAF}")
    assert "4.03" in forbidden and "not-authorised" in forbidden

    wrong = await run("-u", "ae-a", "-k", "not-the-psk-0001", "-A", "50", f"{base}/key?naf={NAF}", wait=2)
    assert '"key"' not in wrong
    unknown = await run("-u", "mallory", "-k", PSK_A.decode(), "-A", "50", f"{base}/key?naf={NAF}", wait=2)
    assert '"key"' not in unknown and "alert" in unknown.lower()  # refused at once (internal_error, as upstream does)
    print(f"{tool}: wrong PSK -> {wrong.strip()!r}; unknown identity -> {unknown.strip()!r}")
    assert chain.bootstraps == 1

"""mn_secd.dtls.rendering: plain requests take the short way, the others aiocoap's, with the same answers.

Each test runs a server context from create_dtls_server_contexts over loopback DTLS and talks to it
with the tests' bare DTLS peer; aiocoap's pipes are counted where the token manager makes them.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator

import aiocoap
import aiocoap.resource as resource
import aiocoap.tokenmanager
import pytest
from aiocoap import error as coap_error
from aiocoap.credentials import CredentialsMap
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from dtls_peer import DtlsPeer, coap_request

from mn_secd.dtls import create_dtls_server_contexts

PSK = b"secret-psk-ae1"


class Credentials(CredentialsMap):  # type: ignore[misc]
    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, str]:
        if identity != b"ae1":
            raise KeyError(identity)
        return PSK, "ae1"


class Echo(resource.Resource):  # type: ignore[misc]
    """Answers with the query; waits for ``gate`` first when one is set, counting cancellations."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.cancelled = 0

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return aiocoap.Message(payload="&".join(request.opt.uri_query).encode())


class Failing(resource.Resource):  # type: ignore[misc]
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        raise RuntimeError("a bug in a resource")


class Gone(resource.Resource):  # type: ignore[misc]
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        raise coap_error.NotFound()


class Counter(resource.ObservableResource):  # type: ignore[misc]
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=b"0")


class PlainSite(resource.Site):  # type: ignore[misc]
    """A site that lets the short way render every resource it has."""

    def plain_resource(self, request: aiocoap.Message) -> resource.Resource | None:
        found: resource.Resource | None = self._resources.get(request.opt.uri_path)
        return found


def site(plain: bool) -> resource.Site:
    s = PlainSite() if plain else resource.Site()
    s.add_resource(["echo"], Echo())
    s.add_resource(["failing"], Failing())
    s.add_resource(["gone"], Gone())
    s.add_resource(["counter"], Counter())
    return s


class Server:
    def __init__(self, ctx: aiocoap.Context) -> None:
        self.ctx = ctx
        self.tman = ctx.request_interfaces[0]
        self.address = self.tman.token_interface.message_interface._pool.sockname

    def resource(self, name: str) -> resource.Resource:
        return self.ctx.serversite._resources[(name,)]


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    yield
    gc.collect()  # DTLS objects freed now, not during a later test's compile (see test_dtls_fix)


@pytest.fixture
def pipes(monkeypatch: pytest.MonkeyPatch) -> list[aiocoap.Message]:
    """The requests aiocoap's token manager made a pipe for."""
    made: list[aiocoap.Message] = []

    class CountedPipe(aiocoap.tokenmanager.Pipe):  # type: ignore[misc,name-defined]
        def __init__(self, request: aiocoap.Message, log: object) -> None:
            made.append(request)
            super().__init__(request, log)

    monkeypatch.setattr(aiocoap.tokenmanager, "Pipe", CountedPipe)
    return made


@pytest.fixture(params=[True, False], ids=["plain-site", "aiocoap-site"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    [ctx] = await create_dtls_server_contexts(
        site(request.param), Credentials(), ["127.0.0.1"], 0, max_peers=8, idle_timeout=60
    )
    yield Server(ctx)
    await ctx.shutdown()


@pytest.fixture
async def peer(server: Server) -> AsyncIterator[DtlsPeer]:
    p = await DtlsPeer.create(b"ae1", PSK, server.address)
    assert await p.handshake(), p.events
    yield p
    p.close()


async def ask(peer: DtlsPeer, message: aiocoap.Message) -> aiocoap.Message:
    answer = await peer.request(message)
    assert answer is not None, "no answer"
    return answer


@pytest.mark.parametrize(
    ("method", "path", "code", "payload"),
    [
        (Code.GET, "echo", Code.CONTENT, b"a=1&b"),
        (Code.GET, "failing", Code.INTERNAL_SERVER_ERROR, b""),
        (Code.GET, "gone", Code.NOT_FOUND, b""),
        (Code.DELETE, "echo", Code.METHOD_NOT_ALLOWED, b"Error: Method not allowed!"),
        (Code.GET, "nowhere", Code.NOT_FOUND, b""),
    ],
)
async def test_both_ways_give_the_same_answers(
    server: Server, peer: DtlsPeer, method: Code, path: str, code: Code, payload: bytes
) -> None:
    answer = await ask(peer, coap_request(method, [path], mid=1, token=b"tk", uri_query=["a=1", "b"]))
    assert (answer.code, answer.payload, answer.token, answer.mid, answer.mtype) == (code, payload, b"tk", 1, Type.ACK)
    assert server.tman.incoming_requests == {}  # nothing left behind


async def test_a_plain_request_is_rendered_without_a_pipe(
    server: Server, peer: DtlsPeer, pipes: list[aiocoap.Message]
) -> None:
    plain = isinstance(server.ctx.serversite, PlainSite)
    await ask(peer, coap_request(Code.GET, ["echo"], mid=1))
    await ask(peer, coap_request(Code.GET, ["nowhere"], mid=2))  # no resource to name: aiocoap's way
    assert [m.opt.uri_path for m in pipes] == ([("nowhere",)] if plain else [("echo",), ("nowhere",)])


async def test_an_observation_goes_aiocoaps_way(server: Server, peer: DtlsPeer, pipes: list[aiocoap.Message]) -> None:
    answer = await ask(peer, coap_request(Code.GET, ["counter"], mid=1, observe=0))
    assert answer.code == Code.CONTENT and answer.opt.observe is not None
    assert [m.opt.uri_path for m in pipes] == [("counter",)]


async def test_a_request_on_the_token_of_one_in_flight_replaces_it(server: Server, peer: DtlsPeer) -> None:
    echo = server.resource("echo")
    echo.gate = asyncio.Event()
    for mid, query in ((1, "first"), (2, "second")):
        message = coap_request(Code.GET, ["echo"], mid=mid, token=b"same", uri_query=[query])
        message.mtype = Type.NON  # no empty ACKs to tell apart from answers
        peer.dtls.write(peer.session, message.encode())
    await asyncio.sleep(0.2)
    echo.gate.set()
    answer = aiocoap.Message.decode(await asyncio.wait_for(peer.plaintext.get(), 2))
    assert answer.payload == b"second"
    await asyncio.sleep(0.2)
    assert peer.plaintext.empty() and echo.cancelled == 1  # the first was stopped, as aiocoap does
    assert server.tman.incoming_requests == {}


async def test_a_slow_answer_is_preceded_by_an_empty_ack_and_a_quick_one_rides_on_the_ack(
    server: Server, peer: DtlsPeer
) -> None:
    loop = asyncio.get_running_loop()
    echo = server.resource("echo")
    echo.gate = asyncio.Event()
    started = loop.time()
    for mid in (11, 12):  # two pending at once: each gets its own empty ACK (RFC 7252 5.2.2)
        peer.dtls.write(peer.session, coap_request(Code.GET, ["echo"], mid=mid, token=bytes([mid])).encode())
    acks = [aiocoap.Message.decode(await asyncio.wait_for(peer.plaintext.get(), 2)) for _ in range(2)]
    took = loop.time() - started
    assert sorted((a.mtype, a.code, a.mid) for a in acks) == [(Type.ACK, Code.EMPTY, 11), (Type.ACK, Code.EMPTY, 12)]
    assert 0.09 <= took < 1.0  # EMPTY_ACK_DELAY is 0.1 s
    echo.gate.set()
    answers = []
    for _ in range(2):  # Confirmable, one at a time (NSTART 1): each is acknowledged before the next
        answer = aiocoap.Message.decode(await asyncio.wait_for(peer.plaintext.get(), 2))
        answers.append(answer)
        ack = aiocoap.Message(code=Code.EMPTY)
        ack.mtype, ack.mid = Type.ACK, answer.mid
        peer.dtls.write(peer.session, ack.encode())
    assert sorted((a.mtype, a.code, a.token) for a in answers) == [
        (Type.CON, Code.CONTENT, b"\x0b"),
        (Type.CON, Code.CONTENT, b"\x0c"),
    ]
    echo.gate = None
    quick = await ask(peer, coap_request(Code.GET, ["echo"], mid=13))
    assert (quick.mtype, quick.code, quick.mid) == (Type.ACK, Code.CONTENT, 13)
    await asyncio.sleep(0.2)
    assert peer.plaintext.empty()  # no empty ACK after the piggybacked answer

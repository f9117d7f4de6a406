"""The key service over real DTLS on loopback, against a small in-test KeyProvider.

The provider here is the seam between the control layer and the keystore, not the layer under test:
every exchange goes through aiocoap, tinydtls, the registry and the client library for real. The
whole chain with the real keystore, card and BSF is in tests/integration/test_control.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from dtls_peer import DtlsPeer, coap_request
from key_copies import find_copies

from mn_secd.client import KeyServiceClient
from mn_secd.control import server as control_server
from mn_secd.control.registry import AeEntry, AeRegistry
from mn_secd.control.server import ControlServer, start_control_server
from mn_secd.errors import (
    BootstrapRateLimited,
    Culprit,
    KeyServiceError,
    KeyServiceRefused,
    KeyServiceRejected,
    KeyServiceTimeout,
    KeyServiceUnreachable,
    MnSecdError,
    UiccAbsent,
)
from mn_secd.naf_keys import GbaMode, KeyEvent, KeyEventKind, KeyServiceStatus, NafKey
from mn_secd.ua import UaId, naf_id

NAF = "in-cse.example.net"
PSK_A = b"psk-of-ae-a-1234"
PSK_B = b"psk-of-ae-b"


class FakeKeys:
    """A KeyProvider with a single-flight 'bootstrap' that makes a new B-TID."""

    def __init__(self) -> None:
        self.bootstraps = 0
        self.requests = 0
        self.btid: str | None = None
        self.expires = datetime.now(UTC) + timedelta(hours=1)
        self.fail: MnSecdError | None = None
        self.rate_limited = False
        self.delay = 0.0
        self._lock = asyncio.Lock()
        self._subscribers: list[Callable[[KeyEvent], None]] = []

    async def _bootstrap(self) -> None:
        await asyncio.sleep(self.delay)
        self.bootstraps += 1
        self.btid = f"btid-{self.bootstraps}@bsf.example"
        self.expires = datetime.now(UTC) + timedelta(hours=1)  # a session's, as the keystore's

    async def get_key(self, naf_fqdn: str, ua_id: UaId, force: bool = False) -> NafKey:
        self.requests += 1
        if self.fail is not None:
            raise self.fail
        async with self._lock:
            if force or self.btid is None:
                await self._bootstrap()
        assert self.btid is not None
        nid = naf_id(naf_fqdn, ua_id)
        return NafKey(
            naf_fqdn=naf_fqdn,
            ua_id=ua_id,
            naf_id=nid,
            btid=self.btid,
            key=hashlib.sha256(self.btid.encode() + nid).digest(),
            expires=self.expires,
            gba_mode=GbaMode.GBA_ME,
        )

    async def force_bootstrap(self) -> None:
        if self.rate_limited:
            raise BootstrapRateLimited(12.5)
        async with self._lock:
            await self._bootstrap()

    def status(self) -> KeyServiceStatus:
        return KeyServiceStatus(
            card_present=self.fail is None,
            impi="001010000000001@ims.mnc001.mcc001.3gppnetwork.org",
            bootstrapped=self.btid is not None,
            btid=self.btid,
            expires=None,
            gba_mode=GbaMode.GBA_ME if self.btid else None,
            last_error=None if self.fail is None else f"{self.fail.kind}: {self.fail}",
        )

    def subscribe(self, callback: Callable[[KeyEvent], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def emit(self, event: KeyEvent) -> None:
        for callback in list(self._subscribers):
            callback(event)


def registry(psk_a: bytes = PSK_A, **a: object) -> AeRegistry:
    fields: dict[str, object] = {
        "identity": "ae-a",
        "psk": psk_a,
        "naf_patterns": (NAF, "*.iot.example.org"),
        "ua_ids": (UaId.dtls_psk(),),
        "may_force_bootstrap": True,
    }
    fields.update(a)
    return AeRegistry(
        [
            AeEntry(**fields),  # type: ignore[arg-type]
            AeEntry("ae-b", PSK_B, ("other-naf.example.net",), (UaId.dtls_psk(),), False),
        ]
    )


@pytest.fixture
def keys() -> FakeKeys:
    return FakeKeys()


@pytest.fixture
async def server(keys: FakeKeys) -> AsyncIterator[ControlServer]:
    srv = await start_control_server(keys, registry(), ["127.0.0.1"], 0, max_peers=32, idle_timeout=30)
    yield srv
    await srv.close()


def client(server: ControlServer, identity: str = "ae-a", psk: bytes = PSK_A, **kw: float) -> KeyServiceClient:
    host, port = server.addresses[0]
    return KeyServiceClient(identity, psk, host, port, **kw)


async def raw(server: ControlServer, message: aiocoap.Message, path: str = "key") -> aiocoap.Message:
    """One request with full control over the message (as AE A)."""
    host, port = server.addresses[0]
    ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
    try:
        ctx.client_credentials.load_from_dict(
            {f"coaps://{host}:{port}/*": {"dtls": {"psk": PSK_A, "client-identity": b"ae-a"}}}
        )
        query = message.opt.uri_query
        message.set_request_uri(f"coaps://{host}:{port}/{path}")
        message.opt.uri_query = message.opt.uri_query or query
        response: aiocoap.Message = await asyncio.wait_for(ctx.request(message).response, 5)
        return response
    finally:
        await ctx.shutdown()


async def test_an_ae_gets_keys_for_its_naf(server: ControlServer, keys: FakeKeys) -> None:
    async with client(server) as ae:
        first = await ae.get_key("IN-CSE.example.net")
        again = await ae.get_key(NAF, "010001c0a8")
        wildcard = await ae.get_key("meter.iot.example.org")
    assert first.naf_fqdn == NAF and first.ua_id == UaId.dtls_psk()
    assert first.naf_id == naf_id(NAF, UaId.dtls_psk())
    assert first.btid == again.btid == wildcard.btid == "btid-1@bsf.example"
    assert first.key == again.key != wildcard.key and len(first.key) == 32
    assert first.expires > datetime.now(UTC) and first.gba_mode is GbaMode.GBA_ME
    assert keys.bootstraps == 1


async def test_another_naf_is_forbidden(server: ControlServer) -> None:
    async with client(server) as ae:
        with pytest.raises(KeyServiceRejected) as info:
            await ae.get_key("other-naf.example.net")
        refused = info.value
        assert (refused.code, refused.kind, refused.culprit) == ("4.03 Forbidden", "not-authorised", Culprit.AE)
        with pytest.raises(KeyServiceRejected, match="Ua protocol 0100000002"):
            await ae.get_key(NAF, "http-digest")
    async with client(server, "ae-b", PSK_B) as ae_b:
        assert (await ae_b.get_key("other-naf.example.net")).naf_fqdn == "other-naf.example.net"
        with pytest.raises(KeyServiceRejected, match="not authorised for NAF in-cse"):
            await ae_b.get_key(NAF)


async def test_force_needs_the_right(server: ControlServer, keys: FakeKeys) -> None:
    async with client(server) as ae:
        await ae.get_key(NAF)
        assert (await ae.get_key(NAF, force=True)).btid == "btid-2@bsf.example"
    async with client(server, "ae-b", PSK_B) as ae_b:
        with pytest.raises(KeyServiceRejected, match="may not force"):
            await ae_b.get_key("other-naf.example.net", force=True)
        with pytest.raises(KeyServiceRejected, match="may not force"):
            await ae_b.force_bootstrap()
    assert keys.bootstraps == 2


async def test_bootstrap_resource(server: ControlServer, keys: FakeKeys) -> None:
    async with client(server) as ae:
        status = await ae.force_bootstrap()
        assert status.btid == "btid-1@bsf.example" and status.bootstrapped
        keys.rate_limited = True
        with pytest.raises(KeyServiceRejected) as info:
            await ae.force_bootstrap()
    assert info.value.code == "4.29 Too Many Requests"
    assert info.value.retry_after == 13.0 and info.value.kind == "bootstrap-rate-limited"


async def test_status_masks_the_impi(server: ControlServer, keys: FakeKeys) -> None:
    async with client(server, "ae-b", PSK_B) as ae:
        status = await ae.status()
    assert status.card_present and not status.bootstrapped
    assert status.impi == "001010*********@ims.mnc001.mcc001.3gppnetwork.org"


async def test_unavailable_card_is_503_with_a_retry_hint(server: ControlServer, keys: FakeKeys) -> None:
    keys.fail = UiccAbsent("no SIM in the modem")
    async with client(server) as ae:
        with pytest.raises(KeyServiceRejected) as info:
            await ae.get_key(NAF)
        assert (info.value.code, info.value.kind, info.value.culprit) == (
            "5.03 Service Unavailable",
            "uicc-absent",
            Culprit.CARD,
        )
        assert info.value.retry_after == 30.0
        assert (await ae.status()).last_error == "uicc-absent: no SIM in the modem"


class StalledKeys(FakeKeys):
    """A provider whose key never comes (a card or a BSF that hangs); records how each wait ended."""

    def __init__(self) -> None:
        super().__init__()
        self.waits_ended: list[str] = []

    async def get_key(self, naf_fqdn: str, ua_id: UaId, force: bool = False) -> NafKey:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.waits_ended.append("cancelled")
            raise
        raise AssertionError("the event is never set")


async def test_a_key_that_never_comes_is_a_504_after_the_request_timeout_and_its_wait_ends() -> None:
    keys = StalledKeys()
    srv = await start_control_server(keys, registry(), ["127.0.0.1"], 0, max_peers=32, request_timeout=0.5)
    try:
        started = time.monotonic()
        answer = await raw(srv, aiocoap.Message(code=Code.GET, uri_query=[f"naf={NAF}"]))
        took = time.monotonic() - started
    finally:
        await srv.close()
    assert answer.code == Code.GATEWAY_TIMEOUT, (answer.code, answer.payload)
    assert answer.payload == b"timeout: no key within 0.5 s"
    assert 0.5 <= took < 4.0
    assert keys.waits_ended == ["cancelled"]  # the provider's wait did not outlive the request


async def test_a_key_that_takes_a_while_within_the_request_timeout_arrives(keys: FakeKeys) -> None:
    keys.delay = 0.3  # the first request waits for a "bootstrap"; the second is answered at once
    srv = await start_control_server(keys, registry(), ["127.0.0.1"], 0, max_peers=32, request_timeout=5.0)
    try:
        async with client(srv) as ae:
            first = await ae.get_key(NAF)
            second = await ae.get_key(NAF)
    finally:
        await srv.close()
    assert first.btid == second.btid == "btid-1@bsf.example" and keys.bootstraps == 1
    assert first.key == second.key and len(first.key) == 32


async def test_wrong_psk_gives_up_naming_the_cause(server: ControlServer) -> None:
    started = time.monotonic()
    async with client(server, psk=b"not-the-right-psk"[:16], handshake_timeout=1.0) as ae:
        with pytest.raises(KeyServiceTimeout, match="most likely a wrong PSK for identity 'ae-a'"):
            await ae.get_key(NAF)
    assert time.monotonic() - started < 2.0


async def test_unknown_identity_is_refused_at_once(server: ControlServer) -> None:
    started = time.monotonic()
    async with client(server, "mallory", PSK_A) as ae:
        with pytest.raises(KeyServiceRefused, match="does not know the PSK identity 'mallory'"):
            await ae.get_key(NAF)
    assert time.monotonic() - started < 1.0


async def test_nothing_listening_is_unreachable(server: ControlServer) -> None:
    host, port = server.addresses[0]
    await server.close()
    async with KeyServiceClient("ae-a", PSK_A, host, port) as ae:
        with pytest.raises(KeyServiceUnreachable, match="is the mn-secd daemon running"):
            await ae.get_key(NAF)


async def test_json_on_accept_and_get_with_query(server: ControlServer) -> None:
    answer = await raw(server, aiocoap.Message(code=Code.GET, accept=50), f"key?naf={NAF}&ua=dtls-psk")
    assert answer.code == Code.CONTENT and answer.opt.content_format == 50
    body = json.loads(answer.payload)
    assert body["naf_fqdn"] == NAF and len(bytes.fromhex(body["key"])) == 32 and body["expires"].endswith("Z")
    assert 3500 < answer.opt.max_age <= 3600
    posted = await raw(server, aiocoap.Message(code=Code.POST, payload=cbor2.dumps({"naf": NAF}), content_format=60))
    assert posted.code == Code.CHANGED and cbor2.loads(posted.payload)["btid"] == body["btid"]
    assert posted.opt.content_format == 60 and 3500 < posted.opt.max_age <= 3600


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (aiocoap.Message(code=Code.FETCH, payload=b'{"naf": "x"}', content_format=0), Code.UNSUPPORTED_CONTENT_FORMAT),
        (aiocoap.Message(code=Code.FETCH, payload=b"\xff\xff"), Code.BAD_REQUEST),
        (aiocoap.Message(code=Code.FETCH, payload=cbor2.dumps({"naf": NAF}), accept=0), Code.NOT_ACCEPTABLE),
        (aiocoap.Message(code=Code.GET, uri_query=["naf=not a host"]), Code.BAD_REQUEST),  # query kept: see raw()
        (aiocoap.Message(code=Code.GET), Code.BAD_REQUEST),
        (aiocoap.Message(code=Code.DELETE), Code.METHOD_NOT_ALLOWED),
    ],
    ids=["content-format", "cbor", "accept", "naf", "no-naf", "method"],
)
async def test_bad_requests_get_4xx(server: ControlServer, message: aiocoap.Message, code: Code) -> None:
    answer = await raw(server, message)
    assert answer.code == code


async def test_no_response_is_honoured_and_a_block_wise_request_refused(server: ControlServer) -> None:
    peer = await DtlsPeer.create(b"ae-a", PSK_A, server.addresses[0])
    assert await peer.handshake(), peer.events
    query = [f"naf={NAF}"]
    try:
        # RFC 7967: No-Response 2 suppresses a 2.xx answer; a Confirmable request still gets its ACK.
        silent = await peer.request(coap_request(Code.GET, ["key"], mid=1, uri_query=query, no_response=2))
        assert silent is not None and (silent.mtype, silent.code, silent.mid) == (Type.ACK, Code.EMPTY, 1)
        answered = await peer.request(coap_request(Code.GET, ["key"], mid=2, uri_query=query, no_response=16))
        assert answered is not None and (answered.code, answered.mid) == (Code.CONTENT, 2)
        blocks = coap_request(Code.FETCH, ["key"], mid=3, payload=cbor2.dumps({"naf": NAF}), content_format=60)
        blocks.opt.block1 = (0, True, 4)
        refused = await peer.request(blocks)
        assert refused is not None and refused.code == Code.BAD_REQUEST and b"block-wise" in refused.payload
    finally:
        peer.close()


async def test_an_answer_is_encoded_once_per_key_and_format_and_anew_after_a_key_event(
    server: ControlServer, keys: FakeKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[tuple[str, int]] = []
    real = control_server.encode_key_answer

    def counted(key: NafKey, fmt: int) -> bytes:
        encoded.append((key.btid, fmt))
        return real(key, fmt)

    monkeypatch.setattr(control_server, "encode_key_answer", counted)
    async with client(server) as ae:
        first = await ae.get_key(NAF)
        again = await ae.get_key(NAF)
        assert (again.btid, again.key) == (first.btid, first.key) and encoded == [(first.btid, 60)]
        as_json = await raw(server, aiocoap.Message(code=Code.GET, accept=50), f"key?naf={NAF}")
        assert json.loads(as_json.payload)["key"] == first.key.hex() and encoded[-1] == (first.btid, 50)
        await ae.force_bootstrap()
        renewed = await ae.get_key(NAF)  # a new session: its own answer, not the one kept
        assert renewed.btid != first.btid and renewed.key != first.key and encoded[-1] == (renewed.btid, 60)
        keys.emit(KeyEvent(KeyEventKind.REFRESHED, renewed.btid))  # kept answers go at every key event
        assert (await ae.get_key(NAF)).key == renewed.key and encoded[-1] == (renewed.btid, 60)
        assert len(encoded) == 4
        for i in range(control_server.MAX_ENCODED_ANSWERS + 8):  # kept answers are bounded
            await ae.get_key(f"n{i}.iot.example.org")
    assert len(server._service._encoded) == control_server.MAX_ENCODED_ANSWERS


async def test_a_post_with_observe_is_answered_once(server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    message = aiocoap.Message(code=Code.POST, payload=cbor2.dumps({"naf": NAF}), content_format=60, observe=0)
    answer = await raw(server, message)
    assert answer.code == Code.CHANGED and answer.opt.observe is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_well_known_core_lists_the_resources(server: ControlServer) -> None:
    answer = await raw(server, aiocoap.Message(code=Code.GET), ".well-known/core")
    links = answer.payload.decode()
    for path in ("</key>", "</status>", "</bootstrap>"):
        assert path in links
    key_link = next(link for link in links.split(",") if link.startswith("</key>"))
    assert "obs" in key_link and 'rt="mn-secd.key"' in key_link
    assert "aiocoap" not in links  # no implementation/version link


async def test_observers_hear_of_refresh_and_wipe(server: ControlServer, keys: FakeKeys) -> None:
    async with client(server) as ae:
        seen: list[str] = []
        observation = ae.observe_key(NAF)
        with pytest.raises(KeyServiceRejected, match="card removed") as info:
            async for answer in observation:
                seen.append(answer.btid)
                if len(seen) == 1:
                    await keys.force_bootstrap()
                    keys.emit(KeyEvent(KeyEventKind.REFRESHED, keys.btid))
                elif len(seen) == 2:
                    keys.fail = UiccAbsent("card removed")
                    keys.emit(KeyEvent(KeyEventKind.WIPED))
        assert info.value.code.startswith("5.03") and info.value.kind == "uicc-absent"
    assert seen == ["btid-1@bsf.example", "btid-2@bsf.example"]
    assert keys.bootstraps == 2  # notifications never force


async def test_a_wipe_zeroes_every_answer_still_held_while_the_observation_goes_on(
    server: ControlServer, keys: FakeKeys, tmp_path: Path
) -> None:
    """aiocoap holds an observation's first answer for as long as the observation lives, and the DTLS
    layer keeps recent answers for duplicates: after a wipe, neither may still carry a key it held.

    The AE is its own process (tests/ae_key_holder.py), so the keys found here can only be the
    server's; the provider computes keys when asked and keeps none.
    """
    psk_file = tmp_path / "ae-a.psk"
    psk_file.write_bytes(PSK_A)
    script = Path(__file__).resolve().parents[1] / "ae_key_holder.py"
    nafs = (NAF, "a.iot.example.org")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(server.addresses[0][1]), "ae-a", str(psk_file), NAF, *nafs,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    lines: list[dict[str, str]] = []

    async def read_until(event: str) -> None:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while not lines or lines[-1]["event"] != event:
                raw_line = await proc.stdout.readline()
                assert raw_line, "the AE ended"
                lines.append(json.loads(raw_line))

    try:
        await read_until("observing")
        old = sorted({bytes.fromhex(line["key"]) for line in lines if line["event"] == "key"})
        assert len(old) == len(nafs)
        assert find_copies(old).count > 0  # held while valid (first answer of the observation, duplicates)
        keys.btid = "btid-after-the-wipe@bsf.example"  # wiped, and bootstrapped again at once
        keys.emit(KeyEvent(KeyEventKind.WIPED))
        await read_until("key")  # the observation goes on, with the new key
        assert lines[-1]["how"] == "notification" and bytes.fromhex(lines[-1]["key"]) not in old
        await asyncio.sleep(0.5)
        after = find_copies(old, explain=True)
        assert after.count == 0, str(after)
    finally:
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 10)


async def test_a_key_fetched_before_a_wipe_is_not_handed_out_after_it(server: ControlServer, keys: FakeKeys) -> None:
    keys.delay = 0.3  # the first bootstrap takes a while; the keys are wiped meanwhile
    async with client(server) as ae:
        request = asyncio.create_task(ae.get_key(NAF))
        await asyncio.sleep(0.1)
        keys.emit(KeyEvent(KeyEventKind.WIPED))
        answer = await request
    assert keys.requests == 2  # the key that was on its way during the wipe was dropped and asked for again
    assert answer.btid == keys.btid


def test_upstream_messages_keep_the_payload_object_they_are_given() -> None:
    """The key service lends each key answer's buffer to its aiocoap Message and zeroes it on a wipe.
    That reaches every holder of the message only while aiocoap keeps that very object (copies
    included) and encodes what it holds at the time; this fails the day upstream copies payloads."""

    def message(payload: bytes | bytearray) -> aiocoap.Message:
        m = aiocoap.Message(code=Code.CONTENT, content_format=60, payload=payload)
        m.mtype, m.mid, m.token = aiocoap.ACK, 7, b"tk"  # as the message manager sets them
        return m

    buffer = bytearray(b"a key-bearing answer")
    answer = message(buffer)
    assert answer.payload is buffer and answer.copy().payload is buffer
    assert answer.encode().endswith(b"\xffa key-bearing answer")
    buffer[:] = bytes(len(buffer))
    buffer.clear()
    assert answer.encode() == message(b"").encode()  # nothing of the key left in what it would send


async def test_reload_ends_revoked_and_rekeyed_sessions(server: ControlServer) -> None:
    async with client(server) as ae, client(server, "ae-b", PSK_B) as ae_b:
        await ae.get_key(NAF)
        await ae_b.status()
        assert server.peer_count == 2
        server.reload_registry(registry(psk_a=b"new-psk-of-ae-a"))
        await asyncio.sleep(0.1)
        assert server.peer_count == 1  # A's session ended (re-keyed), B's entry did not change
        await ae_b.status()
        with pytest.raises((KeyServiceTimeout, KeyServiceUnreachable)):
            await KeyServiceClient("ae-a", PSK_A, *server.addresses[0], handshake_timeout=0.5).get_key(NAF)
    async with client(server, psk=b"new-psk-of-ae-a") as rekeyed:
        assert (await rekeyed.get_key(NAF)).naf_fqdn == NAF
    server.reload_registry(AeRegistry([]))
    async with client(server, psk=b"new-psk-of-ae-a") as gone:
        with pytest.raises(KeyServiceRefused):
            await gone.get_key(NAF)


async def test_credentials_file(tmp_path: Path, server: ControlServer) -> None:
    from mn_secd.client import load_credentials

    (tmp_path / "a.psk").write_bytes(PSK_A)
    (tmp_path / "a.psk").chmod(0o600)
    host, port = server.addresses[0]
    (tmp_path / "client.toml").write_text(f'identity = "ae-a"\npsk_file = "a.psk"\nserver = "{host}:{port}"\n')
    creds = load_credentials(tmp_path / "client.toml")
    assert creds.server == (host, port) and PSK_A.decode() not in repr(creds)
    async with KeyServiceClient(creds.identity, creds.psk, *creds.server) as ae:
        assert (await ae.get_key(NAF)).naf_fqdn == NAF


async def test_default_addresses_serve_ipv4_and_ipv6(keys: FakeKeys) -> None:
    srv = await start_control_server(keys, registry(), port=0)
    try:
        assert [host for host, _ in srv.addresses] == ["127.0.0.1", "::1"]
        for host, port in srv.addresses:
            async with KeyServiceClient("ae-a", PSK_A, host, port) as ae:
                assert (await ae.get_key(NAF)).naf_fqdn == NAF
    finally:
        await srv.close()


async def test_observations_are_bounded_per_ae_and_end_with_the_session(keys: FakeKeys) -> None:
    srv = await start_control_server(keys, registry(), ["127.0.0.1"], 0, max_observations=2)
    try:
        async with client(srv) as ae:
            held = [ae.observe_key(NAF) for _ in range(2)]
            for observation in held:
                await anext(observation)
            assert srv.observation_count == 2
            refused = ae.observe_key(NAF)
            assert (await anext(refused)).naf_fqdn == NAF  # answered once (RFC 7641) ...
            with pytest.raises(KeyServiceError, match="max_observations"):  # ... and the AE is told
                await anext(refused)
            assert srv.observation_count == 2
            keys.emit(KeyEvent(KeyEventKind.WIPED))
            assert [(await anext(o)).btid for o in held] == ["btid-1@bsf.example"] * 2  # still notified
        await asyncio.sleep(0.2)  # the client's close_notify ends its session ...
        assert srv.observation_count == 0  # ... and the observations with it
    finally:
        await srv.close()


async def test_observations_end_when_the_server_ends_the_session(server: ControlServer) -> None:
    async with client(server) as ae:
        observation = ae.observe_key(NAF)
        await anext(observation)
        assert server.observation_count == 1
        server.reload_registry(registry(psk_a=b"a-new-psk-for-ae-a"))  # re-keyed: its session is evicted
        with pytest.raises(KeyServiceError):
            await asyncio.wait_for(anext(observation), 5)
        assert server.observation_count == 0 and server.peer_count == 0

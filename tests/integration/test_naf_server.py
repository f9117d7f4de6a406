"""The IN side over real loopback DTLS: the Zn prefetch gate, PSK lookup and the reference IN-CSE.

The BSF here is a Zn stub whose answers the test chooses (the full chain with the real BSF, card
and daemon is in test_association.py); the DTLS client is plain aiocoap, so nothing of our MN side
is involved.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiocoap
import aiocoap.error
import pytest
from aiocoap.numbers.contentformat import ContentFormat
from zn_stub import IMPI, KEY, StubBsf, stub_bsf

from mn_secd.psk_identity import IdentityForm, encode_psk_identity
from mn_secd.sim.in_cse import ReferenceInCse

BSF_NAME = "bsf.mnc001.mcc001.pub.3gppnetwork.org"
FQDN = "in-cse.example.org"
PSK = bytes.fromhex(KEY)  # the whole 32-octet Ks_NAF (TS-0003)


def new_btid() -> str:
    return base64.b64encode(os.urandom(16)).decode() + "@" + BSF_NAME


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class Peer:
    """A plain aiocoap DTLS client with one identity and PSK."""

    def __init__(self, uri: str, identity: bytes, psk: bytes = PSK) -> None:
        self.uri, self.identity, self.psk = uri, identity, psk
        self.ctx: aiocoap.Context | None = None

    async def request(
        self, code: aiocoap.Code, path: str, body: object = None, timeout: float = 3.0
    ) -> aiocoap.Message:
        if self.ctx is None:
            self.ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
            self.ctx.client_credentials.load_from_dict(
                {self.uri + "/*": {"dtls": {"psk": self.psk, "client-identity": self.identity}}}
            )
        msg = aiocoap.Message(code=code, uri=self.uri + path)
        if body is not None:
            msg.payload = json.dumps(body).encode()
            msg.opt.content_format = ContentFormat.JSON
        async with asyncio.timeout(timeout):
            response: aiocoap.Message = await self.ctx.request(msg).response
            return response

    async def close(self) -> None:
        if self.ctx is not None:
            await self.ctx.shutdown()


@pytest.fixture
async def bsf() -> AsyncIterator[StubBsf]:
    async with stub_bsf() as stub:
        yield stub


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def cse(bsf: StubBsf, clock: Clock) -> AsyncIterator[ReferenceInCse]:
    server = ReferenceInCse(FQDN, bsf.url, zn_timeout=0.5, clock=clock)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


@pytest.fixture
async def peers(cse: ReferenceInCse) -> AsyncIterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for peer in made:
        await peer.close()


def peer(
    cse: ReferenceInCse, made: list[Peer], btid: str, psk: bytes = PSK, form: IdentityForm = IdentityForm.BTID
) -> Peer:
    host, port = cse.address
    p = Peer(f"coaps://{host}:{port}", encode_psk_identity(btid, form), psk)
    made.append(p)
    return p


async def test_first_handshake_waits_for_zn_then_the_cache_serves(
    cse: ReferenceInCse, bsf: StubBsf, peers: list[Peer]
) -> None:
    btid = new_btid()
    first = await peer(cse, peers, btid).request(aiocoap.GET, "/cse")
    assert first.code == aiocoap.CONTENT
    assert json.loads(first.payload) == {"m2m:cb": {"csi": "/in-cse", "rn": "cse"}}
    second = await peer(cse, peers, btid).request(aiocoap.GET, "/cse")  # a new DTLS session, same B-TID
    assert second.code == aiocoap.CONTENT
    assert len(bsf.seen) == 1
    assert bsf.seen[0] == {
        "btId": btid,
        "nafId": {"nafFqdn": FQDN, "uaSecProtId": "010001c0a8"},
        "gbaUAware": False,
    }
    server = cse._server
    assert server is not None and server.gate.holds == 1


async def test_unknown_btid_fails_the_handshake_at_once(cse: ReferenceInCse, bsf: StubBsf, peers: list[Peer]) -> None:
    bsf.status, bsf.body = 404, b'{"status": 404, "cause": "BTID_NOT_FOUND"}'
    start = time.monotonic()
    with pytest.raises(aiocoap.error.NetworkError):
        await peer(cse, peers, new_btid()).request(aiocoap.GET, "/cse")
    assert time.monotonic() - start < 1.0  # a fatal alert, not a retransmission timeout
    assert not cse.aes


async def test_slow_bsf_fails_the_handshake_within_the_zn_timeout(
    cse: ReferenceInCse, bsf: StubBsf, peers: list[Peer]
) -> None:
    bsf.delay = 10.0
    start = time.monotonic()
    with pytest.raises(aiocoap.error.NetworkError):
        await peer(cse, peers, new_btid()).request(aiocoap.GET, "/cse", timeout=5.0)
    assert time.monotonic() - start < 2.0


async def test_wrong_key_never_authenticates(cse: ReferenceInCse, peers: list[Peer]) -> None:
    with pytest.raises(TimeoutError):  # tinydtls drops a bad Finished silently
        await peer(cse, peers, new_btid(), psk=bytes(32)).request(aiocoap.GET, "/cse", timeout=1.5)


@pytest.mark.parametrize("form", list(IdentityForm))
async def test_every_standard_identity_form_with_the_whole_key(
    cse: ReferenceInCse, peers: list[Peer], form: IdentityForm
) -> None:
    """Bare and prefixed B-TIDs (62 to 81 octets) with the 32-octet key: beyond upstream tinydtls."""
    btid = new_btid()
    assert len(encode_psk_identity(btid, form)) > 32 and len(PSK) == 32
    response = await peer(cse, peers, btid, form=form).request(aiocoap.GET, "/cse")
    assert response.code == aiocoap.CONTENT


async def test_a_truncated_key_never_authenticates(cse: ReferenceInCse, peers: list[Peer]) -> None:
    """The retired "compact" PSK (the key's leftmost 16 octets) is not the key."""
    with pytest.raises(TimeoutError):
        await peer(cse, peers, new_btid(), psk=PSK[:16]).request(aiocoap.GET, "/cse", timeout=1.5)


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("coap-client-openssl") is None, reason="libcoap3-bin is not installed")
async def test_libcoap_with_a_prefixed_btid_and_the_whole_key(cse: ReferenceInCse, bsf: StubBsf) -> None:
    """libcoap/OpenSSL, another DTLS stack, with ``3GPP-bootstrapping`` + B-TID (81 octets) and a
    32-octet key. libcoap 4.3.1 takes the key as text only, so the stub BSF hands out a printable one."""
    btid, key = new_btid(), b"thirty-two-octets-of-a-GBA-key!!"
    assert len(key) == 32
    bsf.by_btid[btid] = {"meKeyMaterial": key.hex()}
    host, port = cse.address
    client = await asyncio.create_subprocess_exec(
        "coap-client-openssl", "-B", "5", "-u", "3GPP-bootstrapping" + btid, "-k", key.decode(),
        f"coaps://{host}:{port}/cse",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(client.communicate(), 20)
    assert b"m2m:cb" in out, out  # libcoap 4.3.1 exits 0 either way: judge by the output
    assert [doc["btId"] for doc in bsf.seen] == [btid]


async def test_concurrent_handshakes_with_one_btid_make_one_zn_request(
    cse: ReferenceInCse, bsf: StubBsf, peers: list[Peer]
) -> None:
    bsf.delay = 0.2
    btid = new_btid()
    answers = await asyncio.gather(*(peer(cse, peers, btid).request(aiocoap.GET, "/cse") for _ in range(5)))
    assert {a.code for a in answers} == {aiocoap.CONTENT}
    assert len(bsf.seen) == 1


async def test_ae_lifecycle_and_ownership_by_impi(
    cse: ReferenceInCse, bsf: StubBsf, peers: list[Peer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mn_secd.sim.in_cse")
    mine, theirs = new_btid(), new_btid()
    other_impi = "310150123456789@ims.mnc150.mcc310.3gppnetwork.org"
    bsf.by_btid[theirs] = {"impi": other_impi}
    me, them = peer(cse, peers, mine), peer(cse, peers, theirs)

    created = await me.request(aiocoap.POST, "/cse", {"m2m:ae": {"rn": "meter", "api": "Nmeter"}})
    assert created.code == aiocoap.CREATED
    ae_id = json.loads(created.payload)["m2m:ae"]["aei"]
    assert tuple(created.opt.location_path) == ("cse", ae_id)
    assert cse.aes[ae_id].owner == IMPI

    stored = await me.request(aiocoap.POST, f"/cse/{ae_id}/data", {"m2m:cin": {"con": "21.5"}})
    assert stored.code == aiocoap.CREATED
    latest = await me.request(aiocoap.GET, f"/cse/{ae_id}/data")
    assert json.loads(latest.payload)["m2m:cin"]["con"] == "21.5"

    # Another subscriber (another IMPI vouched for by the BSF) can neither read nor take the name.
    assert (await them.request(aiocoap.GET, f"/cse/{ae_id}/data")).code == aiocoap.FORBIDDEN
    assert (await them.request(aiocoap.POST, "/cse", {"m2m:ae": {"rn": "meter"}})).code == aiocoap.CONFLICT
    # The same subscriber after a re-bootstrap (new B-TID, same IMPI) gets its AE back.
    again = await peer(cse, peers, new_btid()).request(aiocoap.POST, "/cse", {"m2m:ae": {"rn": "meter"}})
    assert again.code == aiocoap.CHANGED
    assert json.loads(again.payload)["m2m:ae"]["aei"] == ae_id

    assert (await me.request(aiocoap.POST, "/cse", {"m2m:x": {}})).code == aiocoap.BAD_REQUEST
    assert (await me.request(aiocoap.DELETE, "/cse")).code == aiocoap.METHOD_NOT_ALLOWED
    assert (await me.request(aiocoap.GET, "/cse/C999999")).code == aiocoap.NOT_FOUND
    assert (await me.request(aiocoap.GET, "/elsewhere")).code == aiocoap.NOT_FOUND

    events = [r for r in caplog.records if getattr(r, "event", None) == "naf-authenticated"]
    assert sorted(r.impi for r in events) == sorted([IMPI, other_impi, IMPI])  # once per session
    assert all(mine not in r.getMessage() and r.btid_hash for r in events)  # B-TIDs only hashed


async def test_a_session_ends_with_its_key(cse: ReferenceInCse, clock: Clock, peers: list[Peer]) -> None:
    me = peer(cse, peers, new_btid())
    assert (await me.request(aiocoap.GET, "/cse")).code == aiocoap.CONTENT
    clock.now = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=1)  # past the key's expiry
    assert (await me.request(aiocoap.GET, "/cse")).code == aiocoap.UNAUTHORIZED


async def test_cli_serves_a_client_we_did_not_write(bsf: StubBsf, tmp_path: Path) -> None:
    """``mn-secd sim naf`` in its own process, reached by ``aiocoap-client`` with the bare B-TID as
    identity and the 32-octet key as hex in its credentials file."""
    bin_dir = Path(sys.executable).parent
    naf = await asyncio.create_subprocess_exec(
        bin_dir / "mn-secd", "sim", "naf", "--fqdn", FQDN, "--bsf", bsf.url, "--listen", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert naf.stdout is not None
        uri = (await asyncio.wait_for(naf.stdout.readline(), 20)).decode().strip()
        assert uri.startswith("coaps://127.0.0.1:")
        credentials = tmp_path / "credentials.json"
        identity = new_btid()
        credentials.write_text(
            json.dumps({uri + "/*": {"dtls": {"psk": {"hex": PSK.hex()}, "client-identity": {"ascii": identity}}}})
        )
        client = await asyncio.create_subprocess_exec(
            bin_dir / "aiocoap-client", "-m", "GET", uri + "/cse", "--credentials", str(credentials),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(client.communicate(), 30)
        assert client.returncode == 0, err
        assert json.loads(out) == {"m2m:cb": {"csi": "/in-cse", "rn": "cse"}}
    finally:
        naf.terminate()
        _, err = await asyncio.wait_for(naf.communicate(), 20)
    assert naf.returncode == 0, err
    assert b"naf-authenticated" in err and IMPI.encode() in err

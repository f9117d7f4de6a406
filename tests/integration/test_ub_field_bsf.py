"""The Ub client against BSFs as they are in the field, over real loopback HTTP(S).

Each case is a behaviour an independent BSF (or what stands in front of it) was seen to have in an
audit against a BSF written apart from the reference one (docs/BSF.md, "Seen in the field"): the
production ``UbClient`` runs a whole exchange against the reference BSF, reached through TLS under
an operator's own CA, or through a relay that loses a connection at the worst moment. AKA runs
are counted, so "one AUTHENTICATE per challenge" is checked where the card would see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mn_secd.aka import AkaResult, AkaSuccess
from mn_secd.card_identity import Application, CardIdentity
from mn_secd.errors import BsfUnreachable
from mn_secd.gba.ub import UbClient
from mn_secd.naf_keys import GbaMode
from mn_secd.sim.bsf import ReferenceBsf
from mn_secd.sim.milenage import Milenage
from mn_secd.sim.profile import CardProfile

PROFILE = CardProfile(
    iccid="8988211000000000018",
    imsi="001010000000001",
    mnc_length=2,
    k=bytes.fromhex("465b5ce8b199b49faa5f0a2ee238a6bc"),
    opc=bytes.fromhex("cd63cb71954a9f4e48a5994e37a02baf"),
)
IDENTITY = CardIdentity(
    iccid=PROFILE.iccid,
    imsi=PROFILE.imsi,
    impi=PROFILE.effective_impi,
    application=Application.USIM,
    aid=b"\xa0\x00\x00\x00\x87\x10\x02",
    gba_u=False,
    mnc_length=2,
    transport="csim",
)


class Card:
    """RES, CK and IK of the lab card for any challenge (the BSF's SQN is not what is tested here)."""

    def __init__(self) -> None:
        self.milenage = Milenage(PROFILE.k, PROFILE.opc)
        self.challenges: list[bytes] = []

    async def __call__(self, rand: bytes, autn: bytes) -> AkaResult:
        self.challenges.append(rand)
        res, ck, ik, _ = self.milenage.f2345(rand)
        return AkaSuccess(res, ck, ik)


@pytest.fixture
async def bsf() -> AsyncIterator[ReferenceBsf]:
    server = ReferenceBsf([PROFILE], lifetime=timedelta(hours=1))
    yield server
    await server.stop()


# --- HTTPS under the operator's own CA ------------------------------------------------------------------


def _certificates(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An operator root CA and a BSF certificate for 127.0.0.1 it signed: (ca.pem, bsf.pem, bsf.key)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Operator BSF Root CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bsf.operator.example")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (tmp_path / "ca.pem", tmp_path / "bsf.pem", tmp_path / "bsf.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


async def test_an_https_bsf_under_an_operator_ca_in_the_system_store(
    bsf: ReferenceBsf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway trusts the operator's CA through the system store (``update-ca-certificates``;
    SSL_CERT_FILE stands in for /etc/ssl/certs here): the bootstrap runs over TLS."""
    ca, cert, key = _certificates(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    url = await bsf.start(ssl_context=server_context)
    assert url.startswith("https://127.0.0.1:")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    card = Card()
    async with UbClient(url, timeout=5.0) as ub:
        result = await ub.run(IDENTITY, card, mode=GbaMode.GBA_ME)
    assert result.rspauth_verified and len(card.challenges) == 1 and bsf.successes == 1


async def test_an_https_bsf_whose_ca_the_gateway_does_not_trust_is_refused_before_any_aka(
    bsf: ReferenceBsf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cert, key = _certificates(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    url = await bsf.start(ssl_context=server_context)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(_certificates(other)[0]))  # another operator's CA
    card = Card()
    async with UbClient(url, timeout=2.0, retries=0) as ub:
        with pytest.raises(BsfUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await ub.run(IDENTITY, card, mode=GbaMode.GBA_ME)
    assert card.challenges == [] and bsf.requests == 0


# --- a connection lost while the card works -------------------------------------------------------------


class DroppingRelay:
    """A TCP relay in front of the BSF (a load balancer) that, once, reads the request after the
    first one on a connection and closes without an answer: the close of an idle kept-alive
    connection crossing the client's next request."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            requests = 0
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                requests += 1
                if requests == 2 and self.dropped == 0:
                    self.dropped += 1
                    return  # closes the client's connection with no answer
                up_writer.write(head)
                await up_writer.drain()
                answer = await up_reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in answer.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                writer.write(answer + await up_reader.readexactly(length))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_writer.close()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_the_answer_to_a_challenge_lost_with_its_connection_is_resent_without_a_second_aka(
    bsf: ReferenceBsf,
) -> None:
    url = await bsf.start()
    relay = DroppingRelay(int(url.rsplit(":", 1)[1]))
    card = Card()
    try:
        async with UbClient(await relay.start(), timeout=5.0, retries=0) as ub:
            result = await ub.run(IDENTITY, card, mode=GbaMode.GBA_ME)
    finally:
        await relay.stop()
    assert relay.dropped == 1
    assert len(card.challenges) == 1 and result.aka_runs == 1  # one AUTHENTICATE for one challenge
    assert bsf.challenges == 1 and bsf.successes == 1  # the BSF saw the answer once, on a new connection

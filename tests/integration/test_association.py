"""The MN-IN security association end to end, real everywhere over loopback.

The software UICC sits behind the AT modem emulator on a pty; the daemon runs as its own process
from a generated configuration, exactly as systemd starts it, and bootstraps with the reference
BSF over HTTP; the AE asks the daemon for the IN-CSE's key over the DTLS control socket and then
reaches the reference IN-CSE over DTLS-PSK, and the IN-CSE gets the same key from the BSF over Zn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import LocalAes

from mn_secd.client.association import NafAssociation, latest_data, post_data, register_ae
from mn_secd.client.keys import KeyServiceClient
from mn_secd.errors import NafHandshakeFailed
from mn_secd.logs import btid_hash
from mn_secd.sim.in_cse import ReferenceInCse
from mn_secd.sim.launcher import DaemonProcess
from mn_secd.sim.world import DEFAULT_NAF_FQDN, SimulatedWorld

BIN = Path(sys.executable).parent
OTHER_NAF_FQDN = "other-cse.mn-secd.example"


@dataclass
class Chain:
    world: SimulatedWorld
    keys: KeyServiceClient
    cse: ReferenceInCse  # the NAF the AE's keys are for
    impi: str

    @property
    def bootstraps(self) -> int:
        assert self.world.bsf is not None
        return self.world.bsf.successes

    def association(self, cse: ReferenceInCse | None = None, timeout: float = 2.0) -> NafAssociation:
        """An association for this chain's NAF (keys for its FQDN), at ``cse``'s address."""
        host, port = (cse or self.cse).address
        return NafAssociation(self.keys, self.cse.fqdn, host=host, port=port, timeout=timeout)


async def _wait_for_daemon(keys: KeyServiceClient, daemon: DaemonProcess) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            status = await keys.status()
        except Exception:
            if daemon.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError("the daemon did not come up:\n" + "\n".join(daemon.stderr)) from None
            await asyncio.sleep(0.1)
            continue
        if status.card_present:
            return
        await asyncio.sleep(0.1)


@pytest.fixture
async def chain(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> AsyncIterator[Chain]:
    local_aes.add("ae-meter")
    daemon = await start_daemon(local_aes.write_config(min_forced_interval=0.0), "--modem-wait", "15")
    keys = local_aes.client("ae-meter")
    cse = ReferenceInCse(DEFAULT_NAF_FQDN, world.bsf_url)
    try:
        await cse.start("127.0.0.1", 0)
        await _wait_for_daemon(keys, daemon)
        yield Chain(world, keys, cse, world.profile().effective_impi)
    finally:
        await keys.close()
        await cse.stop()
        assert await daemon.stop(20) == 0, "\n".join(daemon.stderr)


def authenticated(caplog: pytest.LogCaptureFixture, naf_fqdn: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if getattr(r, "event", None) == "naf-authenticated" and getattr(r, "naf_fqdn", None) == naf_fqdn
    ]


async def test_ae_registers_at_the_in_cse_over_gba_keyed_dtls(chain: Chain, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with chain.association() as association:
        registration = await register_ae(association, "meter-1")
        await post_data(association, registration.ae_id, "21.5 C")
        assert await latest_data(association, registration.ae_id) == "21.5 C"
        btid = association.btid
    assert registration.created
    assert chain.bootstraps == 1
    assert association.refusals == 0
    # The IN-CSE knows the AE by the IMPI the BSF vouched for, and says so in its log.
    assert chain.cse.aes[registration.ae_id].owner == chain.impi
    [record] = authenticated(caplog, chain.cse.fqdn)
    assert record.impi == chain.impi
    assert record.btid_hash == btid_hash(btid or "")
    assert chain.impi in record.getMessage()


@pytest.mark.parametrize("bsf_loses_it", ["forget", "expire"])
async def test_a_btid_the_bsf_lost_costs_one_failed_attempt_and_one_bootstrap(
    chain: Chain, caplog: pytest.LogCaptureFixture, bsf_loses_it: str
) -> None:
    caplog.set_level(logging.INFO)
    stale = await chain.keys.get_key(chain.cse.fqdn)
    assert chain.bootstraps == 1
    bsf = chain.world.bsf
    assert bsf is not None
    getattr(bsf, bsf_loses_it)(stale.btid)

    async with chain.association() as association:
        registration = await register_ae(association, "meter-2")
        assert association.btid is not None and association.btid != stale.btid
    assert registration.created
    assert association.refusals == 1  # the first attempt failed ...
    assert association.forced_bootstraps == 1  # ... the client asked for a re-bootstrap by itself ...
    assert chain.bootstraps == 2  # ... and exactly one extra bootstrap happened
    refused = [r for r in caplog.records if getattr(r, "event", None) == "naf.btid-refused"]
    assert [r.btid_hash for r in refused] == [btid_hash(stale.btid)]


async def test_a_key_for_one_naf_does_not_open_another(chain: Chain, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert chain.world.bsf is not None
    other = ReferenceInCse(OTHER_NAF_FQDN, chain.world.bsf_url)
    await other.start("127.0.0.1", 0)
    try:
        start = time.monotonic()
        async with chain.association(other, timeout=1.0) as association:
            with pytest.raises(NafHandshakeFailed):
                await register_ae(association, "meter-3")
        elapsed = time.monotonic() - start
        # The BSF vouched for the B-TID, but gave the other NAF its own key: the keys differ.
        assert other.credentials.zn_requests >= 1
        assert not other.aes
        assert authenticated(caplog, OTHER_NAF_FQDN) == []
        # Bounded: two handshakes that time out, one re-bootstrap in between, then a typed error.
        assert association.refusals == 1
        assert chain.bootstraps <= 2
        assert elapsed < 5.0
    finally:
        await other.stop()


async def test_aiocoap_client_reaches_the_in_cse_with_the_btid_and_key(chain: Chain, tmp_path: Path) -> None:
    """A client we did not write: aiocoap-client, with psk_identity = the bare B-TID and the whole
    32-octet key as hex in a credentials file (TS-0003's form, carried by our patched tinydtls)."""
    answer = await chain.keys.get_key(chain.cse.fqdn)
    host, port = chain.cse.address
    uri = f"coaps://{host}:{port}"
    credentials = tmp_path / "in-cse.json"
    identity, psk = answer.btid, answer.key
    assert len(identity) > 32 and len(psk) == 32  # beyond upstream tinydtls's limits
    credentials.write_text(
        json.dumps({uri + "/*": {"dtls": {"psk": {"hex": psk.hex()}, "client-identity": {"ascii": identity}}}})
    )
    credentials.chmod(0o600)
    client = await asyncio.create_subprocess_exec(
        BIN / "aiocoap-client", "-m", "POST", uri + "/cse", "--credentials", str(credentials),
        "--content-format", "application/json", "--payload", json.dumps({"m2m:ae": {"rn": "cli", "api": "Ncli"}}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(client.communicate(), 30)
    assert client.returncode == 0, err
    ae_id = json.loads(out)["m2m:ae"]["aei"]
    assert chain.cse.aes[ae_id].owner == chain.impi
    assert chain.bootstraps == 1

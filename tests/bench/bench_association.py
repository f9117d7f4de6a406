"""Time from an AE's start to its first authenticated request at the IN-CSE, warm and cold.

Run: ``.venv/bin/python tests/bench/bench_association.py [--runs N] [--cold-runs N]``. The chain is
the real one over loopback: software UICC behind the modem emulator on a pty, the daemon as its own
process, the reference BSF over HTTP and the reference IN-CSE over DTLS. Each run is a fresh AE: a
new DTLS session to the daemon's control socket, ``get_key``, then a new DTLS-PSK session to the
IN-CSE and ``GET /cse``. Printed per scenario: the whole time, and the part of it spent getting
the key from the daemon (DTLS handshake to the control socket included).

* cold keystore: the key request finds no usable key, so a whole GBA bootstrap is in the path (one
  AUTHENTICATE over the pty, two Ub exchanges, the derivation), and the IN-CSE has not seen the new
  B-TID (one Zn). The daemon bootstraps by itself right after start-up, so an AE rarely meets a cold
  keystore; the bench makes one by asking for a forced re-bootstrap, which does exactly that work;
* warm keystore, IN-CSE seen the B-TID: the steady state of an AE that restarts;
* warm keystore, new IN-CSE: the IN-CSE fetches the key over Zn during the handshake.

Targets (medians, loopback, the emulated card answering at once): warm with a known B-TID at most
50 ms, warm with a new IN-CSE at most 100 ms, cold at most 500 ms; and exactly one bootstrap per
cold run plus the daemon's first. An AE that restarts should be talking to its IN-CSE before a
person could notice, and a bootstrap's cost belongs to the card and the network, not to us.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import aiocoap
from targets import EXACTLY, Targets

from mn_secd.client.association import NafAssociation
from mn_secd.client.keys import KeyServiceClient
from mn_secd.naf_keys import NafKey
from mn_secd.sim.in_cse import ReferenceInCse
from mn_secd.sim.world import DEFAULT_NAF_FQDN, AeCredential, SimulatedWorld, free_udp_port

BIN = Path(sys.executable).parent


def ms(values: Sequence[float]) -> str:
    ordered = sorted(values)
    worst = ordered[-1]
    return f"median {statistics.median(ordered) * 1000:7.1f} ms   max {worst * 1000:7.1f} ms   (n={len(ordered)})"


class Daemon:
    def __init__(self, world: SimulatedWorld, ae: AeCredential, workdir: Path) -> None:
        self.port = free_udp_port()
        self.config = world.write_daemon_config([ae], control_port=self.port, min_forced_interval=0.0)
        self.log = workdir / "daemon.log"
        self.process: asyncio.subprocess.Process | None = None
        self.ae = ae

    async def start(self) -> None:
        """Start the daemon and wait until it has done its own first bootstrap."""
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                BIN / "mn-secd", "run", "--config", str(self.config), stderr=out
            )
        async with KeyServiceClient(self.ae.identity, self.ae.psk, port=self.port) as keys:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if (await keys.status()).bootstrapped:
                        return
                except Exception:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the daemon did not come up: " + self.log.read_text()) from None
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await self.process.wait()
            self.process = None


class TimedKeys:
    """The daemon's key service, timing what the association spends asking it.

    With ``force_first`` the first request is a forced re-bootstrap: the keystore answers only after
    a whole bootstrap, as it does when it holds no key.
    """

    def __init__(self, keys: KeyServiceClient, *, force_first: bool) -> None:
        self.keys = keys
        self.force_next = force_first
        self.spent = 0.0

    async def get_key(self, naf_fqdn: str, ua: str = "dtls-psk", force: bool = False) -> NafKey:
        start = time.perf_counter()
        try:
            return await self.keys.get_key(naf_fqdn, ua, force or self.force_next)
        finally:
            self.force_next = False
            self.spent += time.perf_counter() - start


async def first_request(
    ae: AeCredential, control_port: int, cse: ReferenceInCse, *, cold: bool = False
) -> tuple[float, float]:
    """(seconds to the first answer from the IN-CSE, of which getting the key) for a fresh AE."""
    host, port = cse.address
    start = time.perf_counter()
    async with KeyServiceClient(ae.identity, ae.psk, port=control_port) as client:
        keys = TimedKeys(client, force_first=cold)
        async with NafAssociation(keys, cse.fqdn, host=host, port=port) as association:
            response = await association.request(aiocoap.GET, ("cse",))
            done = time.perf_counter()
    if response.code != aiocoap.CONTENT:
        raise RuntimeError(f"the IN-CSE answered {response.code}")
    return done - start, keys.spent


async def main(runs: int, cold_runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        async with SimulatedWorld(workdir) as world:
            ae = AeCredential("ae-bench", os.urandom(16))
            daemon = Daemon(world, ae, workdir)
            await daemon.start()
            try:
                cse = ReferenceInCse(DEFAULT_NAF_FQDN, world.bsf_url)
                await cse.start()
                try:
                    cold = [await first_request(ae, daemon.port, cse, cold=True) for _ in range(cold_runs)]
                    await first_request(ae, daemon.port, cse)  # the IN-CSE has now seen the current B-TID
                    warm = [await first_request(ae, daemon.port, cse) for _ in range(runs)]
                finally:
                    await cse.stop()
                new_naf: list[tuple[float, float]] = []
                for _ in range(max(1, runs // 3)):
                    cse = ReferenceInCse(DEFAULT_NAF_FQDN, world.bsf_url)
                    await cse.start()
                    try:
                        new_naf.append(await first_request(ae, daemon.port, cse))
                    finally:
                        await cse.stop()
            finally:
                await daemon.stop()
            assert world.bsf is not None
            bootstraps = world.bsf.successes

    targets = Targets()
    print("AE start -> first authenticated request at the IN-CSE (loopback, real DTLS both ways)")
    for label, samples, target_ms in (
        ("cold keystore (bootstrap + Zn)", cold, 500.0),
        ("warm keystore, IN-CSE knows B-TID", warm, 50.0),
        ("warm keystore, new IN-CSE (Zn)", new_naf, 100.0),
    ):
        total = [t for t, _ in samples]
        median = round(statistics.median(total) * 1000, 1)
        print(f"  {label:35s} total {ms(total)} {targets.check(label, median, target_ms, 'ms')}")
        print(f"  {'':35s}   key {ms([k for _, k in samples])}")
    expected = cold_runs + 1
    verdict = targets.check("bootstraps at the BSF", bootstraps, expected, compare=EXACTLY)
    print(f"  bootstraps at the BSF: {bootstraps}, the daemon's first one and one per cold run {verdict}")
    print(targets.summary())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="warm runs (default 30)")
    parser.add_argument("--cold-runs", type=int, default=10, help="cold runs (default 10)")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # aiocoap's DTLS client warns about its own shutdown order on every closed session: noise here.
    warnings.filterwarnings("ignore", message="DTLS module did not shut down")
    asyncio.run(main(options.runs, options.cold_runs))

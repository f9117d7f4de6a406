"""Benchmark a restart of the daemon: what it costs the card and the BSF, and how soon an AE has a key.

Runs the simulated world (software UICC behind the pty modem, reference BSF) in this process and
``mn-secd run`` as a real subprocess, as systemd starts it. For each way a restart can go it bootstraps
once, then restarts the daemon several times (modem and card power-cycled too, as after a power
cut) and prints, per restart:

* AKA runs on the card (AUTHENTICATE in the 3G context or GBA bootstrapping, from the emulator's
  command log) and requests to the BSF: 0 and 0 when the session is resumed (the target), 1 and 2
  when it is not;
* the time from ``exec`` to the first key an AE gets, asked for right after READY=1 (median).

The ways: a GBA_U card whose session is resumed from EF_GBABP; a GBA_ME session sealed under the
session-sealing key (``persist_session``, the key handed over as systemd's credential would be);
and nothing kept, the cost every restart had before.

    .venv/bin/python tests/bench/bench_restart.py [--restarts 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from targets import EXACTLY, Targets

from mn_secd.client.keys import KeyServiceClient
from mn_secd.sim.launcher import DaemonProcess
from mn_secd.sim.modem import ModemEmulator
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.world import DEFAULT_NAF_FQDN, AeCredential, SimulatedWorld, free_udp_port

_APDU = re.compile(r'"([0-9A-Fa-f]+)"')


def aka_runs(modem: ModemEmulator) -> int:
    """AUTHENTICATEs in the 3G context or in GBA bootstrapping (``DD``), not NAF derivations."""
    count = 0
    for line in modem.log:
        found = _APDU.search(line) if line.upper().startswith(("AT+CSIM", "AT+CGLA")) else None
        apdu = bytes.fromhex(found.group(1)) if found else b""
        if len(apdu) > 5 and apdu[1] == 0x88 and (apdu[3] == 0x81 or (apdu[3] == 0x84 and apdu[5] == 0xDD)):
            count += 1
    return count


async def restarts(workdir: Path, how: str, n: int) -> tuple[list[int], list[int], list[float]]:
    """(AKA runs, BSF requests, seconds from exec to the first key) for each of ``n`` restarts."""
    world = SimulatedWorld(workdir)
    await world.start()
    ae = AeCredential("ae-bench", os.urandom(16))
    port = free_udp_port()
    options: dict[str, object] = {"gba_mode": "gba-me" if how == "gba-me-sealed" else "auto"}
    if how != "nothing-kept":
        options["state_directory"] = workdir / "state"
    credentials = None
    if how == "gba-me-sealed":
        options["persist_session"] = True
        credentials = world.write_session_key()
    config = world.write_daemon_config([ae], control_port=port, log_level="warning", **options)  # type: ignore[arg-type]
    akas, requests, seconds = [], [], []
    try:
        for run in range(n + 1):
            assert world.modem is not None and world.bsf is not None
            if run:  # a power cut: modem and card come back from the card's profile, then the daemon
                world.modem.stop()
                world.modem = ModemEmulator(SoftUicc.from_file(world.card_paths[0]), link=str(world.modem_link))
                world.modem.start()
                world.bsf.reset_counters()
            started = time.perf_counter()
            daemon = await DaemonProcess.start(config, credentials=credentials)
            try:
                await daemon.wait_ready()
                async with KeyServiceClient(ae.identity, ae.psk, "127.0.0.1", port) as client:
                    await client.get_key(DEFAULT_NAF_FQDN)
                elapsed = time.perf_counter() - started
                if how != "nothing-kept":
                    await asyncio.sleep(0.3)  # the session reaches the state directory in the background
            finally:
                await daemon.stop()
            if run:
                akas.append(aka_runs(world.modem))
                requests.append(world.bsf.requests)
                seconds.append(elapsed)
    finally:
        await world.stop()
    return akas, requests, seconds


async def main(args: argparse.Namespace) -> None:
    targets = Targets()
    ways = ["gba-u-resumed", "gba-me-sealed", "nothing-kept"]
    with tempfile.TemporaryDirectory(prefix="mn-secd-bench-restart-") as tmp:
        print(f"{args.restarts} restarts each, modem and card power-cycled before every start:")
        for how in ways:
            akas, requests, seconds = await restarts(Path(tmp) / how, how, args.restarts)
            median = statistics.median(seconds)
            line = (
                f"  {how:14} AKA runs per restart {max(akas)}, BSF requests {max(requests)}, "
                f"exec to first key: median {median * 1000:.0f} ms (min {min(seconds) * 1000:.0f}, "
                f"max {max(seconds) * 1000:.0f})"
            )
            if how == "nothing-kept":
                print(line + " (the cost of a restart without continuity)")
                continue
            print(line)
            print(f"    AKA runs {targets.check(f'{how}: AKA runs per restart', max(akas), 0, compare=EXACTLY)}")
            print(f"    BSF requests {targets.check(f'{how}: BSF requests', max(requests), 0, compare=EXACTLY)}")
    print(targets.summary())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=5, help="restarts per way (default 5)")
    asyncio.run(main(parser.parse_args()))

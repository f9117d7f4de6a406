"""Copies of served keys in the daemon before and after "keys wiped", next to the target of none.

Run: ``.venv/bin/python tests/bench/bench_wipe.py [--nafs N] [--grace SECONDS]``.

The daemon (:class:`mn_secd.daemon.Daemon`, as ``mn-secd run`` runs it) lives in this process, in
front of the simulated world, so that its memory can be scanned from inside: every object the
garbage collector tracks and what it refers to (tests/key_copies.py), for each served key in raw,
hex and base64 form. An AE in another process (tests/ae_key_holder.py) asks for keys for ``--nafs``
NAFs, each as CBOR by GET and by FETCH and as JSON, and keeps an Observe on one of them. Printed, for
GBA_U (keys from the card) and GBA_ME (keys derived here): the live objects holding a served key
while the keys are valid, and ``--grace`` seconds after the SIM is pulled. Before the wipe every
copy should sit in a wipeable buffer (``bytearray``); after it, none may be left (target: 0).
Freed memory is not an object and is out of reach of this scan (README, "Keys in memory").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from key_copies import find_copies
from targets import EXACTLY, Targets

from mn_secd.config import load_config
from mn_secd.daemon import Daemon
from mn_secd.naf_keys import KeyEvent, KeyEventKind
from mn_secd.notify import Notifier
from mn_secd.sim.world import DEFAULT_NAF_FQDN, AeCredential, SimulatedWorld, free_udp_port

TARGETS = Targets()
AE_SCRIPT = Path(__file__).resolve().parents[1] / "ae_key_holder.py"
PSK = b"bench-wipe-psk-0001"


async def one_mode(mode: str, nafs: int, grace: float) -> None:
    names = [DEFAULT_NAF_FQDN, *(f"naf{i}.iot.example" for i in range(nafs - 1))]
    with tempfile.TemporaryDirectory(prefix="bench-wipe-") as tmp:
        async with SimulatedWorld(Path(tmp)) as world:
            port = free_udp_port()
            ae = AeCredential("bench-wipe", PSK, naf=(DEFAULT_NAF_FQDN, "*.iot.example"))
            config = load_config(world.write_daemon_config([ae], control_port=port, gba_mode=mode))
            daemon = Daemon(config, Notifier(environ={}), modem_wait=30.0)
            events: list[KeyEvent] = []
            daemon.keys.subscribe(events.append)
            running = asyncio.create_task(daemon.run())
            proc = None
            try:
                async with asyncio.timeout(60):
                    while not (daemon.ready and daemon.keys.status().bootstrapped):
                        await asyncio.sleep(0.05)
                psk_file = world.workdir / "etc" / "bench-wipe.psk"
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, str(AE_SCRIPT), str(port), ae.identity, str(psk_file), names[0], *names,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                assert proc.stdout is not None
                served: set[bytes] = set()
                async with asyncio.timeout(120):
                    while True:
                        line = json.loads(await proc.stdout.readline())
                        if line["event"] == "key":
                            served.add(bytes.fromhex(line["key"]))
                        if line["event"] == "observing":
                            break
                keys = sorted(served)
                started = time.perf_counter()
                before = find_copies(keys)
                scan_ms = (time.perf_counter() - started) * 1000
                in_buffers = before.by_type.get("bytearray", 0)
                print(f"{mode}: {len(keys)} keys served ({4 * len(names)} answers), scan {scan_ms:.0f} ms")
                outside = before.count - in_buffers
                verdict = TARGETS.check(f"{mode}: copies outside wipeable buffers while valid", outside, 0)
                print(
                    f"  while valid: {before.count} live objects hold one, {outside} outside wipeable buffers {verdict}"
                )
                seen = len(events)
                assert world.modem is not None
                world.modem.remove_sim()
                async with asyncio.timeout(30):
                    while not any(e.kind is KeyEventKind.WIPED for e in events[seen:]):
                        await asyncio.sleep(0.01)
                await asyncio.sleep(grace)
                after = find_copies(keys)
                verdict = TARGETS.check(f"{mode}: copies {grace:g} s after the wipe", after.count, 0, compare=EXACTLY)
                print(f"  {grace:g} s after the SIM was pulled: {after.count} {verdict}")
            finally:
                if proc is not None:
                    assert proc.stdin is not None
                    proc.stdin.close()
                    await proc.wait()
                daemon.stop()
                await running


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    for mode in ("gba-u", "gba-me"):
        await one_mode(mode, args.nafs, args.grace)
    print(TARGETS.summary())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nafs", type=int, default=50, help="NAFs the AE asks keys for (default 50)")
    parser.add_argument("--grace", type=float, default=2.0, help="seconds after the wipe (default 2)")
    asyncio.run(main(parser.parse_args()))

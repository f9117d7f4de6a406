"""Benchmark the daemon process: start-up to READY=1, steady RSS with many AEs, idle CPU.

Runs the simulated world (software UICC behind the pty modem, reference BSF) in this process and
``mn-secd run`` as a real subprocess with a NOTIFY_SOCKET this script listens on, then prints:

* the time from ``exec`` to READY=1 (the first bootstrap runs after READY, in the background, so it
  is excluded by design), over several starts; target 0.5 s;
* the daemon's RSS at rest, then with N AEs (default 200) each holding a DTLS session and a key;
  target 40 MB;
* the daemon's CPU time and context switches (a proxy for wakeups) over an idle period with the
  sessions still held (default 60 s), with the watchdog at the unit's WatchdogSec=30; target at
  most 0.5 % CPU and 1 wakeup/s: an idle daemon on a gateway should cost nothing measurable.

    .venv/bin/python tests/bench/bench_daemon.py [--aes 200] [--idle 60] [--starts 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from targets import EXACTLY, Targets

from mn_secd.client.keys import KeyServiceClient
from mn_secd.sim.bsf import ReferenceBsf
from mn_secd.sim.modem import ModemEmulator
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.world import free_udp_port, lab_cards

MN_SECD = str(Path(sys.executable).parent / "mn-secd")
NAF = "in-cse.example.net"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def context_switches(pid: int) -> tuple[int, int, int]:
    """(voluntary, involuntary, threads) summed over every thread of ``pid``."""
    voluntary = involuntary = threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except FileNotFoundError:
            continue
        threads += 1
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary, threads


class Bench:
    def __init__(self, workdir: Path, n_aes: int) -> None:
        self.dir = workdir
        self.profile = lab_cards()[0]
        self.modem = ModemEmulator(SoftUicc(self.profile))
        self.bsf = ReferenceBsf([self.profile])
        self.n_aes = n_aes
        self.psks: dict[str, bytes] = {}

    async def __aenter__(self) -> Bench:
        self.port = self.modem.start()
        self.bsf_url = await self.bsf.start("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.bsf.stop()
        self.modem.stop()

    def write_config(self) -> Path:
        aes = []
        for i in range(self.n_aes):
            identity = f"ae-{i:04d}"
            psk = os.urandom(16)
            (self.dir / f"{identity}.psk").write_bytes(psk)
            (self.dir / f"{identity}.psk").chmod(0o600)
            self.psks[identity] = psk
            aes.append(f'[[ae]]\nidentity = "{identity}"\npsk_file = "{identity}.psk"\nnaf = ["{NAF}"]\n')
        self.control_port = free_udp_port()
        path = self.dir / "mn-secd.toml"
        path.write_text(
            f'[modem]\nport = "{self.port}"\n\n[gba]\nbsf_url = "{self.bsf_url}"\nstart_jitter = 0.0\n\n'
            f'[control]\naddresses = ["127.0.0.1"]\nport = {self.control_port}\nmax_peers = {max(256, self.n_aes)}\n\n'
            f'[log]\nlevel = "warning"\n\n' + "\n".join(aes)
        )
        return path

    async def start_daemon(self, config: Path) -> tuple[Daemon, float]:
        """Start ``mn-secd run``; returns it and the seconds from exec to READY=1."""
        address = f"mn-secd-bench-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + address)
        sock.setblocking(False)
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "CREDENTIALS_DIRECTORY")}
        env.update(NOTIFY_SOCKET="@" + address, WATCHDOG_USEC="30000000")  # the unit's WatchdogSec=30
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(MN_SECD, "run", "--config", str(config), env=env)
        async with asyncio.timeout(30):
            while not (await loop.sock_recv(sock, 4096)).startswith(b"READY=1"):
                pass
        return Daemon(proc, sock), time.perf_counter() - started


class Daemon:
    """A running daemon and the NOTIFY_SOCKET it keeps talking to (drained until it stops)."""

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.sock = sock
        self._drain = asyncio.create_task(self._drain_notifications())

    async def _drain_notifications(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await loop.sock_recv(self.sock, 4096)

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                return await self.proc.wait()
        finally:
            self._drain.cancel()
            self.sock.close()


async def main(args: argparse.Namespace) -> None:
    targets = Targets()
    with tempfile.TemporaryDirectory(prefix="mn-secd-bench-") as tmp:
        async with Bench(Path(tmp), args.aes) as bench:
            config = bench.write_config()

            times = []
            for _ in range(args.starts):
                daemon, seconds = await bench.start_daemon(config)
                times.append(seconds)
                await asyncio.sleep(0.3)  # let the background bootstrap finish before stopping
                await daemon.stop()
            print(f"start to READY=1 ({args.aes} AEs configured, {args.starts} starts, first bootstrap excluded):")
            median, low, high = statistics.median(times), min(times), max(times)
            verdict = targets.check("start to READY=1, median", round(median, 3), 0.5, "s")
            print(f"  median {median:.3f} s, min {low:.3f} s, max {high:.3f} s {verdict}")

            daemon, _ = await bench.start_daemon(config)
            clients: list[KeyServiceClient] = []
            try:
                await asyncio.sleep(1.0)
                rest = round(rss_mb(daemon.pid), 1)
                verdict = targets.check("RSS at rest", rest, 40.0, "MB")
                print(f"RSS at rest (card up, bootstrapped, no AE connected): {rest:.1f} MB {verdict}")
                clients = [
                    KeyServiceClient(identity, psk, "127.0.0.1", bench.control_port)
                    for identity, psk in bench.psks.items()
                ]
                started = time.perf_counter()
                for batch in range(0, len(clients), 20):  # a cold start's burst, 20 handshakes at a time
                    await asyncio.gather(*(c.get_key(NAF) for c in clients[batch : batch + 20]))
                connect = time.perf_counter() - started
                await asyncio.sleep(2.0)
                loaded = round(rss_mb(daemon.pid), 1)
                verdict = targets.check(f"RSS with {len(clients)} AEs", loaded, 40.0, "MB")
                print(
                    f"RSS with {len(clients)} AEs holding DTLS sessions and keys: {loaded:.1f} MB {verdict}; "
                    f"sessions set up in {connect:.2f} s; BSF bootstraps: {bench.bsf.successes}"
                )

                cpu0, (vol0, invol0, threads), t0 = (
                    cpu_seconds(daemon.pid),
                    context_switches(daemon.pid),
                    time.perf_counter(),
                )
                await asyncio.sleep(args.idle)
                cpu1, (vol1, invol1, _), t1 = cpu_seconds(daemon.pid), context_switches(daemon.pid), time.perf_counter()
                period = t1 - t0
                print(f"idle for {period:.0f} s with the sessions held (watchdog every 15 s, card presence poll):")
                cpu_share = round(100 * (cpu1 - cpu0) / period, 2)
                wakeups = round((vol1 - vol0) / period, 1)
                print(f"  CPU {cpu1 - cpu0:.2f} s ({cpu_share:.2f} %) {targets.check('idle CPU', cpu_share, 0.5, '%')}")
                print(
                    f"  {vol1 - vol0} voluntary + {invol1 - invol0} involuntary context switches over {threads} "
                    f"threads ({wakeups:.1f} wakeups/s) {targets.check('idle wakeups', wakeups, 1.0, 'wakeups/s')}"
                )
            finally:
                for client in clients:
                    await client.close()
                code = await daemon.stop()
            print(f"daemon exit status after SIGTERM: {code} {targets.check('exit status', code, 0, compare=EXACTLY)}")
            print(targets.summary())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aes", type=int, default=200, help="AEs holding DTLS sessions (default 200)")
    parser.add_argument("--idle", type=float, default=60.0, help="idle period in seconds (default 60)")
    parser.add_argument("--starts", type=int, default=5, help="starts timed to READY=1 (default 5)")
    asyncio.run(main(parser.parse_args()))

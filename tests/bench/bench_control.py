"""The key service's throughput, latency, handshake time and memory, next to libcoap's server.

Run: ``.venv/bin/python tests/bench/bench_control.py [--requests N] [--handshakes N] [--aes N]``.

The daemon runs as its own process (as under systemd) from a generated configuration, in front of
the simulated world (software UICC behind the modem emulator on a pty, reference BSF over HTTP);
its keystore is warmed by one bootstrap first, so what is measured is the control socket. The
client is aiocoap's DTLS client in this process. Printed:

* key requests per second over one DTLS session (sequential, and 8 outstanding), p50/p99 latency;
* the DTLS handshake plus first answer of a fresh session;
* the same client, same GET loop, against libcoap's ``coap-server-openssl`` serving its static
  resource over DTLS-PSK, and the ratio of the two (target: at least 0.5 each);
* the daemon's RSS idle and with ``--aes`` AEs connected, each holding a session and a key;
* a flood of ClientHellos from another process (``--flood-rate`` per second for ``--flood-seconds``,
  from 16 source ports; the rate reached is printed): the key latency of an AE with an established
  session meanwhile, and whether its Observe on ``key`` is still alive afterwards (a forced
  bootstrap must reach it);
* ``--observations`` Observe requests from one AE on one session: how many the daemon accepted, its
  RSS before and after, and, once the SIM is pulled with those observers registered, how fast
  another AE gets ``status`` and how many lines the daemon logged (this ends the run: no card).

The daemon logs at "warning" here: at "info" every key handed out is one log line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiocoap
from aiocoap.numbers.codes import Code

from mn_secd.client.keys import KeyServiceClient
from mn_secd.dtls import create_dtls_client_context
from mn_secd.sim.world import DEFAULT_NAF_FQDN, AeCredential, SimulatedWorld, free_udp_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dtls_peer import client_hello  # the tests' ClientHello, without a cookie
from targets import AT_LEAST, EXACTLY, Targets

#: The verdicts of this run (tests/bench/targets.py), summed up on the last line.
TARGETS = Targets()

BIN = Path(sys.executable).parent
PSK = b"bench-psk-000001"  # ASCII: libcoap's -k takes text
OTHER_PSK = b"bench-psk-000002"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc: load on the machine barely moves it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def get_loop(context: aiocoap.Context, uri: str, count: int, outstanding: int) -> tuple[float, list[float]]:
    """``count`` GETs of ``uri`` with ``outstanding`` in flight; (requests/s, latencies)."""
    latencies: list[float] = []
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            response = await context.request(aiocoap.Message(code=Code.GET, uri=uri)).response
            latencies.append(time.perf_counter() - started)
            assert response.code.is_successful(), (response.code, response.payload)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(outstanding)))
    return count / (time.perf_counter() - started), latencies


async def client_context(host: str, port: int, identity: bytes) -> aiocoap.Context:
    context = await aiocoap.Context.create_client_context(transports=["tinydtls"])
    context.client_credentials.load_from_dict(
        {f"coaps://{host}:{port}/*": {"dtls": {"psk": PSK, "client-identity": identity}}}
    )
    return context


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def timed(
    label: str, work: Callable[[], Awaitable[tuple[float, list[float]]]], server_pid: int | None = None
) -> float:
    """Run one measurement; prints rate, p50/p99 and the server's CPU time per request."""
    cpu_before = cpu_seconds(server_pid) if server_pid is not None else 0.0
    rate, latencies = await work()
    cpu = ""
    if server_pid is not None:
        cpu = f"   server CPU {(cpu_seconds(server_pid) - cpu_before) / len(latencies) * 1e6:5.0f} us/req"
    print(
        f"  {label:<44} {rate:8.0f} req/s   p50 {pct(latencies, 0.5):6.2f} ms   p99 {pct(latencies, 0.99):6.2f} ms"
        + cpu
    )
    return rate


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        workdir = Path(tmp)
        async with SimulatedWorld(workdir) as world:
            bench_ae = AeCredential("bench", PSK)
            other_ae = AeCredential("bench-other", OTHER_PSK)
            crowd = [AeCredential(f"ae-{i:03d}", os.urandom(16)) for i in range(args.aes)]
            port = free_udp_port()
            config = world.write_daemon_config([bench_ae, other_ae, *crowd], control_port=port, log_level="warning")
            log = workdir / "daemon.log"
            with log.open("wb") as out:
                daemon = await asyncio.create_subprocess_exec(
                    BIN / "mn-secd", "run", "--config", str(config), "--modem-wait", "15", stderr=out
                )
            try:
                await run(world, port, daemon.pid, bench_ae, crowd, args.requests, args.handshakes)
                await flood_section(port, daemon.pid, bench_ae, other_ae, args.flood_rate, args.flood_seconds)
                await observation_section(world, port, daemon.pid, bench_ae, other_ae, args.observations, log)
                print(TARGETS.summary())
            finally:
                with contextlib.suppress(ProcessLookupError):
                    daemon.terminate()
                await daemon.wait()


async def run(
    world: SimulatedWorld,
    port: int,
    pid: int,
    bench_ae: AeCredential,
    crowd: list[AeCredential],
    requests: int,
    handshakes: int,
) -> None:
    keys = KeyServiceClient(bench_ae.identity, bench_ae.psk, port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            if (await keys.status()).card_present:
                break
        except Exception:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)
    rss_idle = rss_mib(pid)
    await keys.get_key(DEFAULT_NAF_FQDN)  # the one bootstrap: everything after is served from the cache
    print(f"key service (daemon pid {pid}, warm keystore), {requests} requests per line:")

    async def fetch_keys(outstanding: int) -> tuple[float, list[float]]:
        latencies: list[float] = []
        remaining = requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                await keys.get_key(DEFAULT_NAF_FQDN)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(outstanding)))
        return requests / (time.perf_counter() - started), latencies

    await timed("KeyServiceClient.get_key (FETCH, CBOR)", lambda: fetch_keys(1), pid)
    await timed("KeyServiceClient.get_key, 8 outstanding", lambda: fetch_keys(8), pid)
    await keys.close()

    context = await client_context("127.0.0.1", port, b"bench")
    key_uri = f"coaps://127.0.0.1:{port}/key?naf={DEFAULT_NAF_FQDN}"
    ours = await timed("aiocoap GET key?naf=...", lambda: get_loop(context, key_uri, requests, 1), pid)
    ours8 = await timed("aiocoap GET key?naf=..., 8 outstanding", lambda: get_loop(context, key_uri, requests, 8), pid)
    await context.shutdown()

    setup: list[float] = []
    for _ in range(handshakes):
        started = time.perf_counter()
        async with KeyServiceClient(bench_ae.identity, bench_ae.psk, port=port) as fresh:
            await fresh.status()
        setup.append(time.perf_counter() - started)
    print(
        f"  {'fresh session: DTLS handshake + first answer':<44} p50 {pct(setup, 0.5):6.2f} ms   "
        f"p99 {pct(setup, 0.99):6.2f} ms   (n={handshakes})"
    )

    await libcoap_side_by_side(requests, ours, ours8)

    clients = [KeyServiceClient(ae.identity, ae.psk, port=port, handshake_timeout=30.0) for ae in crowd]
    started = time.perf_counter()
    await asyncio.gather(*(c.get_key(DEFAULT_NAF_FQDN) for c in clients))
    elapsed = time.perf_counter() - started
    rss_crowd = rss_mib(pid)
    print(f"memory: daemon RSS idle {rss_idle:.1f} MiB; with {len(crowd)} AEs connected {rss_crowd:.1f} MiB")
    print(f"  ({len(crowd)} AEs: handshake + key each, all at once, in {elapsed * 1000:.0f} ms)")
    await asyncio.gather(*(c.close() for c in clients))
    assert world.bsf is not None
    print(f"bootstraps at the BSF during the whole run: {world.bsf.successes}")


async def libcoap_side_by_side(requests: int, ours: float, ours8: float) -> None:
    tool = shutil.which("coap-server-openssl")
    if tool is None:
        print("libcoap: coap-server-openssl not installed (Debian package libcoap3-bin): no comparison")
        return
    udp_port = free_udp_port()
    server = await asyncio.create_subprocess_exec(
        tool, "-A", "127.0.0.1", "-p", str(udp_port), "-k", PSK.decode(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.sleep(0.5)
        context = await client_context("127.0.0.1", udp_port + 1, b"bench")  # libcoap: DTLS on port + 1
        uri = f"coaps://127.0.0.1:{udp_port + 1}/"
        label = "same client, libcoap coap-server-openssl GET /"
        theirs = await timed(label, lambda: get_loop(context, uri, requests, 1), server.pid)
        theirs8 = await timed("  ... 8 outstanding", lambda: get_loop(context, uri, requests, 8), server.pid)
        await context.shutdown()
    finally:
        server.terminate()
        await server.wait()
    sequential, outstanding = ours / theirs, ours8 / theirs8
    print(
        f"  ratio ours/libcoap, sequential {sequential:.2f} {TARGETS.check('ratio', sequential, 0.5, compare=AT_LEAST)}"
    )
    verdict = TARGETS.check("ratio, 8 outstanding", outstanding, 0.5, compare=AT_LEAST)
    print(f"  ratio ours/libcoap, 8 outstanding {outstanding:.2f} {verdict}")


# --- hostile load -----------------------------------------------------------------------------------------


def flood(port: int, rate: int, seconds: float, sockets: int = 16) -> None:
    """ClientHellos from ``sockets`` source ports, paced in batches; prints "sent answered seconds"."""
    hello = client_hello()
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sockets)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
    sent = answered = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(int(elapsed * rate) - sent):
            with contextlib.suppress(BlockingIOError):
                socks[sent % sockets].sendto(hello, ("127.0.0.1", port))
            sent += 1
        for sock in socks:
            with contextlib.suppress(BlockingIOError):
                while sock.recv(2048):
                    answered += 1
        time.sleep(0.002)
    print(sent, answered, time.perf_counter() - started)


async def flood_section(
    port: int, pid: int, bench_ae: AeCredential, other_ae: AeCredential, rate: int, seconds: float
) -> None:
    print(f"ClientHello flood, {rate}/s for {seconds:g} s from another process:")
    async with (
        KeyServiceClient(bench_ae.identity, bench_ae.psk, port=port) as keys,
        KeyServiceClient(other_ae.identity, other_ae.psk, port=port) as other,
    ):
        first = await keys.get_key(DEFAULT_NAF_FQDN)
        observation = keys.observe_key(DEFAULT_NAF_FQDN)
        await anext(observation)
        cpu_before = cpu_seconds(pid)
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--flood", str(port), str(rate), str(seconds), stdout=asyncio.subprocess.PIPE
        )
        latencies: list[float] = []
        failures = 0
        reading = asyncio.ensure_future(flooder.communicate())
        while not reading.done():
            started = time.perf_counter()
            try:
                await keys.get_key(DEFAULT_NAF_FQDN)
                latencies.append(time.perf_counter() - started)
            except Exception:
                failures += 1
            await asyncio.sleep(0.01)
        out, _ = await reading
        sent, answered, elapsed = out.decode().split()
        cpu = (cpu_seconds(pid) - cpu_before) / float(elapsed)
        reached = int(sent) / float(elapsed)
        verdict = TARGETS.check("flood rate reached", round(reached), round(0.9 * rate), "/s", compare=AT_LEAST)
        print(f"  flood: {reached:.0f} ClientHellos/s reached {verdict}")
        print(f"    ({sent} sent, {answered} answered with a HelloVerifyRequest; daemon CPU {cpu * 100:.0f} %)")
        failed = TARGETS.check("keys failed during the flood", failures, 0, compare=EXACTLY)
        print(f"  legitimate AE meanwhile: {len(latencies)} keys, {failures} failed {failed}")
        p99 = round(pct(latencies, 0.99), 2)
        print(
            f"    key latency p50 {pct(latencies, 0.5):.2f} ms, p99 {p99:.2f} ms"
            f" {TARGETS.check('key latency p99 during the flood', p99, 100, 'ms')}"
        )
        await asyncio.sleep(1.0)  # min_forced_interval of the generated configuration
        await other.force_bootstrap()
        try:
            fresh = await asyncio.wait_for(anext(observation), 10)
            alive = "yes" if fresh.btid != first.btid else "no (no new key)"
        except Exception as exc:
            alive = f"no ({type(exc).__name__})"
        verdict = TARGETS.check("Observe alive after the flood", int(alive == "yes"), 1, compare=EXACTLY)
        print(f"  its Observe on key alive after the flood (notified of a forced bootstrap): {alive} {verdict}")
        await observation.aclose()


async def observation_section(
    world: SimulatedWorld,
    port: int,
    pid: int,
    bench_ae: AeCredential,
    other_ae: AeCredential,
    count: int,
    log: Path,
) -> None:
    print(f"{count} Observe requests for key from one AE on one session:")
    context = await create_dtls_client_context()
    uri = f"coaps://127.0.0.1:{port}/key?naf={DEFAULT_NAF_FQDN}"
    context.client_credentials.load_from_dict(
        {f"coaps://127.0.0.1:{port}/*": {"dtls": {"psk": bench_ae.psk, "client-identity": bench_ae.identity.encode()}}}
    )
    rss_before = rss_mib(pid)
    accepted = 0
    requests = []
    for start in range(0, count, 100):
        batch = [
            context.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
            for _ in range(start, min(count, start + 100))
        ]
        for request in batch:
            response = await asyncio.wait_for(request.response, 30)
            accepted += response.opt.observe is not None
        requests += batch
    rss_after = rss_mib(pid)
    print(f"  accepted {accepted} {TARGETS.check('observations accepted', accepted, 8, compare=EXACTLY)}")
    grown = round(rss_after - rss_before, 1)
    print(
        f"  daemon RSS {rss_before:.1f} -> {rss_after:.1f} MiB, +{grown:.1f}"
        f" {TARGETS.check('RSS growth', grown, 10, 'MiB')} (unbounded: about 54 MiB for 5000)"
    )
    async with KeyServiceClient(other_ae.identity, other_ae.psk, port=port) as other:
        await other.status()
        lines_before = len(log.read_bytes().splitlines())
        assert world.modem is not None
        world.modem.remove_sim()
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        status = await other.status()
        took = (time.perf_counter() - started) * 1000
        await asyncio.sleep(0.5)
        lines = len(log.read_bytes().splitlines()) - lines_before
    print(
        f"  SIM pulled with them registered (card present: {status.card_present}): another AE's status in"
        f" {took:.1f} ms {TARGETS.check('status after the wipe', round(took, 1), 100, 'ms')}"
    )
    print(f"    daemon log lines at warning level meanwhile: {lines} {TARGETS.check('log lines', lines, 5)}")
    await context.shutdown()
    print(f"  daemon RSS after the observing session ended: {rss_mib(pid):.1f} MiB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--flood"]:
        flood(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--handshakes", type=int, default=50)
    parser.add_argument("--aes", type=int, default=200)
    parser.add_argument("--flood-rate", type=int, default=5000)
    parser.add_argument("--flood-seconds", type=float, default=5.0)
    parser.add_argument("--observations", type=int, default=5000)
    asyncio.run(main(parser.parse_args()))

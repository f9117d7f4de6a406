"""UICC layer benchmark over a real pty: AT commands and APDUs per AUTHENTICATE, and AT round-trip times.

Run: ``.venv/bin/python tests/bench/bench_uicc.py [--runs N]``. Prints, for each transport and modem
behaviour, what one AUTHENTICATE costs on the wire once the card is up (target: 1 AT command when the
modem hands back the answer directly, 2 with the host's GET RESPONSE, and no re-SELECT on a logical
channel), then the round-trip time of a bare ``AT`` and of a whole AUTHENTICATE (median, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence

from mn_secd.aka import AkaSuccess, AuthContext
from mn_secd.sim.milenage import Milenage, generate_autn
from mn_secd.sim.modem import ModemEmulator, Quirks
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.world import lab_cards
from mn_secd.uicc import at
from mn_secd.uicc.card import open_card
from mn_secd.uicc.options import ModemConfig

PROFILE = lab_cards()[0]
CASES: list[tuple[str, str, Quirks]] = [
    ("cgla", "modem returns the answer", Quirks(internal_get_response=True)),
    ("cgla", "host GET RESPONSE (61xx)", Quirks()),
    ("csim", "modem returns the answer", Quirks(internal_get_response=True)),
    ("csim", "host GET RESPONSE (61xx)", Quirks()),
    ("csim", "basic channel (no logical channels)", Quirks(no_logical_channels=True)),
]
INS_NAMES = {0x88: "AUTHENTICATE", 0xC0: "GET RESPONSE", 0xA4: "SELECT"}


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def ms(values: Sequence[float]) -> str:
    return f"median {statistics.median(values) * 1000:6.2f} ms   p99 {percentile(values, 0.99) * 1000:6.2f} ms"


async def run_case(
    transport: str, quirks: Quirks, runs: int
) -> tuple[float, dict[str, float], list[float], list[float]]:
    modem = ModemEmulator(SoftUicc(PROFILE), quirks)
    path = modem.start()
    try:
        card = await open_card(ModemConfig(path, transport=transport))
        try:
            milenage = Milenage(PROFILE.k, PROFILE.opc)
            modem.clear_log()
            auth_times: list[float] = []
            for seq in range(1, runs + 1):
                rand = seq.to_bytes(16, "big")
                autn = generate_autn(milenage, rand, (seq << 5).to_bytes(6, "big"), PROFILE.amf)
                start = time.perf_counter()
                result = await card.authenticate(rand, autn, AuthContext.UMTS)
                auth_times.append(time.perf_counter() - start)
                assert isinstance(result, AkaSuccess)
            at_per_auth = len(modem.log) / runs
            apdus = {name: modem.apdu_count(ins) / runs for ins, name in INS_NAMES.items()}
            rtts: list[float] = []
            for _ in range(runs * 5):
                start = time.perf_counter()
                await card.port.command(at.plain("AT"))
                rtts.append(time.perf_counter() - start)
        finally:
            await card.close()
    finally:
        modem.stop()
    return at_per_auth, apdus, auth_times, rtts


async def main(runs: int) -> None:
    print(f"UICC over a pty: {runs} AUTHENTICATEs (3G context) after start-up, per case\n")
    all_rtts: list[float] = []
    for transport, behaviour, quirks in CASES:
        at_per_auth, apdus, auth_times, rtts = await run_case(transport, quirks, runs)
        all_rtts += rtts
        apdu_text = ", ".join(f"{name} {count:g}" for name, count in apdus.items())
        print(f"{transport:4}  {behaviour:38}  AT commands/AUTHENTICATE {at_per_auth:g}   APDUs: {apdu_text}")
        print(f"{'':4}  {'AUTHENTICATE round trip':38}  {ms(auth_times)}")
    print(f"\nAT round trip (bare 'AT', {len(all_rtts)} commands): {ms(all_rtts)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="AUTHENTICATEs per case (default 50)")
    asyncio.run(main(parser.parse_args().runs))

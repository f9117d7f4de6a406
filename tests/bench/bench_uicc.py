"""UICC layer benchmark over a real pty: AT commands and APDUs per AUTHENTICATE, and AT round-trip times.

Run: ``.venv/bin/python tests/bench/bench_uicc.py [--runs N]``. Prints, for each transport and modem
behaviour, what one AUTHENTICATE costs on the wire once the card is up, then the round-trip time of
a bare ``AT`` and of a whole AUTHENTICATE (median, p99), each next to its target:

* AT commands per AUTHENTICATE: 1 when the modem hands back the answer, 2 with the host's GET
  RESPONSE, 3 on the basic channel (the application selected again first); no SELECT on a logical
  channel -- the physical minimum of each case;
* AUTHENTICATE round trip, median, at most 5 ms, and a bare ``AT``, median, at most 1 ms: the
  emulated card and modem answer at once, so this is the daemon's own cost, which must stay small
  next to a real card's 0.3-2 s per AUTHENTICATE.

Then the same AUTHENTICATEs with the card in a PC/SC reader, through a private pcscd whose vpcd
reader holds the software UICC (skipped, and said so, when pcscd or vsmartcard-vpcd is missing):
APDUs per AUTHENTICATE on the wire between pcscd and the card, exactly 2 over T=0 (AUTHENTICATE
and GET RESPONSE, no SELECT on our logical channel), and the round trip, median at most
``PCSC_AUTHENTICATE_MEDIAN_MS``: pcscd, its vpcd driver and a loopback TCP hop to the card, still
small next to a real card.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Sequence

from targets import EXACTLY, Targets

from mn_secd.aka import AkaSuccess, AuthContext
from mn_secd.errors import UiccAbsent
from mn_secd.sim.milenage import Milenage, generate_autn
from mn_secd.sim.modem import ModemEmulator, Quirks
from mn_secd.sim.pcscd import PrivatePcscd, missing_tools
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.vicc import ViccClient, VirtualCard
from mn_secd.sim.world import lab_cards
from mn_secd.uicc import at
from mn_secd.uicc.card import Card, ModemSource, open_card
from mn_secd.uicc.options import ModemConfig

PROFILE = lab_cards()[0]
#: (transport, behaviour, quirks, AT commands per AUTHENTICATE, SELECTs per AUTHENTICATE): the minimum
CASES: list[tuple[str, str, Quirks, int, int]] = [
    ("cgla", "modem returns the answer", Quirks(internal_get_response=True), 1, 0),
    ("cgla", "host GET RESPONSE (61xx)", Quirks(), 2, 0),
    ("csim", "modem returns the answer", Quirks(internal_get_response=True), 1, 0),
    ("csim", "host GET RESPONSE (61xx)", Quirks(), 2, 0),
    ("csim", "basic channel (no logical channels)", Quirks(no_logical_channels=True), 3, 1),
]
AUTHENTICATE_MEDIAN_MS = 5.0
AT_MEDIAN_MS = 1.0
PCSC_AUTHENTICATE_MEDIAN_MS = 5.0
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
            source = card.source
            assert isinstance(source, ModemSource)
            for _ in range(runs * 5):
                start = time.perf_counter()
                await source.port.command(at.plain("AT"))
                rtts.append(time.perf_counter() - start)
        finally:
            await card.close()
    finally:
        modem.stop()
    return at_per_auth, apdus, auth_times, rtts


async def run_pcsc_case(runs: int) -> tuple[dict[str, float], list[float]]:
    """AUTHENTICATEs with the card in a private pcscd's vpcd reader: APDUs each on the wire, and times."""
    with PrivatePcscd() as pcscd:
        os.environ.update(pcscd.env)  # read once by libpcsclite, at this process's first PC/SC call
        card = VirtualCard(SoftUicc(PROFILE))
        vicc = ViccClient(card, "127.0.0.1", pcscd.port)
        await vicc.start()
        try:
            config = ModemConfig(transport="pcsc", reader=pcscd.readers[0])
            opened = await asyncio.wait_for(_open_when_present(config), 30)
            try:
                milenage = Milenage(PROFILE.k, PROFILE.opc)
                card.clear_log()
                auth_times: list[float] = []
                for seq in range(1, runs + 1):
                    rand = seq.to_bytes(16, "big")
                    autn = generate_autn(milenage, rand, (seq << 5).to_bytes(6, "big"), PROFILE.amf)
                    start = time.perf_counter()
                    result = await opened.authenticate(rand, autn, AuthContext.UMTS)
                    auth_times.append(time.perf_counter() - start)
                    assert isinstance(result, AkaSuccess)
                apdus = {name: card.count(ins) / runs for ins, name in INS_NAMES.items()}
            finally:
                await opened.close()
        finally:
            await vicc.stop()
    return apdus, auth_times


async def _open_when_present(config: ModemConfig) -> Card:
    """pcscd polls its slots about every 400 ms: the card is there once it has seen it."""
    while True:
        try:
            return await open_card(config)
        except UiccAbsent:
            await asyncio.sleep(0.1)


async def main(runs: int) -> None:
    targets = Targets()
    print(f"UICC over a pty: {runs} AUTHENTICATEs (3G context) after start-up, per case\n")
    all_rtts: list[float] = []
    for transport, behaviour, quirks, at_minimum, select_minimum in CASES:
        at_per_auth, apdus, auth_times, rtts = await run_case(transport, quirks, runs)
        all_rtts += rtts
        apdu_text = ", ".join(f"{name} {count:g}" for name, count in apdus.items())
        case = f"{transport} {behaviour}"
        print(f"{transport:4}  {behaviour:38}  AT commands/AUTHENTICATE {at_per_auth:g} ", end="")
        print(targets.check(f"{case}: AT commands per AUTHENTICATE", at_per_auth, at_minimum, compare=EXACTLY))
        print(f"{'':4}  {'':38}  APDUs: {apdu_text} ", end="")
        print(targets.check(f"{case}: SELECTs per AUTHENTICATE", apdus["SELECT"], select_minimum, compare=EXACTLY))
        median = statistics.median(auth_times) * 1000
        print(f"{'':4}  {'AUTHENTICATE round trip':38}  {ms(auth_times)} ", end="")
        print(targets.check(f"{case}: AUTHENTICATE median", round(median, 2), AUTHENTICATE_MEDIAN_MS, "ms"))
    median = statistics.median(all_rtts) * 1000
    print(f"\nAT round trip (bare 'AT', {len(all_rtts)} commands): {ms(all_rtts)} ", end="")
    print(targets.check("bare AT median", round(median, 2), AT_MEDIAN_MS, "ms"))
    missing = missing_tools()
    if missing:
        print(f"\nPC/SC reader: skipped, missing {', '.join(missing)}")
    else:
        apdus, auth_times = await run_pcsc_case(runs)
        apdu_text = ", ".join(f"{name} {count:g}" for name, count in apdus.items())
        print(f"\npcsc  {'card in a reader, through pcscd':38}  APDUs: {apdu_text} ", end="")
        print(targets.check("pcsc: APDUs per AUTHENTICATE", sum(apdus.values()), 2, compare=EXACTLY))
        median = statistics.median(auth_times) * 1000
        print(f"{'':4}  {'AUTHENTICATE round trip':38}  {ms(auth_times)} ", end="")
        print(targets.check("pcsc: AUTHENTICATE median", round(median, 2), PCSC_AUTHENTICATE_MEDIAN_MS, "ms"))
    print(targets.summary())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="AUTHENTICATEs per case (default 50)")
    asyncio.run(main(parser.parse_args().runs))

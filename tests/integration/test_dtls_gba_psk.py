"""The patched DTLSSocket (patches/dtlssocket-0.2.3-gba-psk.patch) is what is installed, and works.

TS-0003's credentials — psk_identity = a B-TID (62 octets here) and psk = Ks_NAF (32 octets) — go
beyond upstream tinydtls (32 and 16). These handshakes run through plain aiocoap, without any of
our fixes, in a separate process (tests/dtls_gba_probe.py) so that a build whose buffers they overrun
fails the test instead of killing pytest. Against the upstream build the first handshake fails
(measured: "refused"), so this test fails until the patched build is installed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import sys
from pathlib import Path

from mn_secd.dtls import upstream

PROBE = Path(__file__).resolve().parent.parent / "dtls_gba_probe.py"


async def probe(*cases: str) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PROBE), *cases, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [line["case"] for line in lines] == list(cases)
    return [line["outcome"] for line in lines]


def test_the_patched_build_is_installed() -> None:
    assert importlib.metadata.version("DTLSSocket") == upstream.PATCHED_DTLSSOCKET == "0.2.3+mnsecd.gbapsk"
    assert (upstream.MAX_IDENTITY_LENGTH, upstream.MAX_PSK_LENGTH) == (128, 64)


async def test_a_btid_and_a_32_octet_key_complete_a_handshake() -> None:
    assert await probe("standard") == ["ok"]


async def test_an_overlong_psk_is_refused_cleanly_on_either_side() -> None:
    """65 octets, one more than the patched limit: the handshake fails with an alert (not a
    timeout, not a crash), and the same server and process go on serving good credentials."""
    outcomes = await probe("server-overlong", "standard", "client-overlong", "standard")
    assert outcomes == ["refused", "ok", "refused", "ok"]

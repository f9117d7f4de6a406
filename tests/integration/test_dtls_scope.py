"""mn_secd's DTLS transports change nothing outside the aiocoap contexts mn_secd makes.

An IN-CSE that embeds mn_secd.naf or mn_secd.client may run its own aiocoap contexts in the same
process. The probe (tests/dtls_scope_probe.py) runs in a fresh process: it records the upstream
modules and classes, runs mn_secd's key service and client over DTLS, records them again, and then
serves and requests over plain aiocoap DTLS contexts.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parent.parent / "dtls_scope_probe.py"


async def test_plain_aiocoap_contexts_after_ours_are_upstream() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PROBE), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode(errors="replace")[-3000:]
    found = json.loads(out)
    assert found["loaded_before"] == []  # the "before" snapshot really is before mn_secd
    assert found["btid"] == "btid@bsf.example"  # our server and client did their work ...
    assert found["changed"] == []  # ... and not one attribute of aiocoap or DTLSSocket changed
    plain = found["plain"]
    assert plain.pop("payload") == "hello from plain aiocoap"
    assert plain == dict.fromkeys(plain, True), plain  # upstream's transports, classes and handlers

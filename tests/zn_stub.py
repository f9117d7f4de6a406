"""A Zn endpoint on loopback whose next answer a test chooses (for the NAF library's tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mn_secd.naf.zn import ZN_PATH

BTID = "I1U8vpY3qJ0hiuZNrke/NQ==@bsf.mnc001.mcc001.pub.3gppnetwork.org"
KEY = "7562826ab5d9455821e06920580d112bf7d705acb1af2c2144b60ff59a61ce50"
IMPI = "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
GOOD = {
    "meKeyMaterial": KEY,
    "keyExpiryTime": "2030-01-01T00:00:00Z",
    "bootstrappingInfoCreationTime": "2029-12-31T23:00:00Z",
    "gbaType": "3G_GBA",
    "impi": IMPI,
}


@dataclass
class StubBsf:
    status: int = 200
    body: bytes = json.dumps(GOOD).encode()
    content_type: str = "application/json"
    delay: float = 0.0
    seen: list[Any] = field(default_factory=list)
    url: str = ""
    released: asyncio.Event = field(default_factory=asyncio.Event)  # ends a delay early (teardown)
    #: B-TID -> answer fields to use instead of GOOD's (e.g. another IMPI); B-TIDs not listed get ``body``.
    by_btid: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.seen.append(doc)
        if self.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.delay)
        if doc.get("btId") in self.by_btid:
            return web.json_response({**GOOD, **self.by_btid[doc["btId"]]})
        return web.Response(status=self.status, body=self.body, content_type=self.content_type)


@contextlib.asynccontextmanager
async def stub_bsf() -> AsyncIterator[StubBsf]:
    stub = StubBsf()
    app = web.Application()
    app.router.add_post(ZN_PATH, stub.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    stub.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield stub
    finally:
        stub.released.set()
        await runner.cleanup()

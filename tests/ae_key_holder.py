"""An AE in its own process: asks the daemon for keys in every form the key service answers, then
holds an Observe on ``key`` until its stdin closes.

Run by tests/integration/test_key_wipe.py and tests/bench/bench_wipe.py, so that the process whose
memory is scanned (the daemon's) holds no copy made by the AE. Each key it receives is printed as a
JSON line masked with tests/key_copies.py's MASK, so the scanning process never holds one either:
``{"event": "key", "how": ..., "naf": ..., "btid": ..., "key": <masked hex>}``, then
``{"event": "observing"}``, then one line per notification (a key, or ``{"event": "ended", ...}``).

    ae_key_holder.py PORT IDENTITY PSK_FILE OBSERVED_NAF [NAF ...]
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code

sys.path.insert(0, str(Path(__file__).resolve().parent))
from key_copies import mask

from mn_secd.control.payloads import CBOR, JSON, KeyRequest, decode_key_answer, encode_key_request
from mn_secd.dtls import create_dtls_client_context
from mn_secd.ua import UaId


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def report(how: str, response: aiocoap.Message) -> None:
    if not response.code.is_successful():
        say(event="ended", how=how, code=str(response.code), payload=response.payload.decode(errors="replace"))
        return
    key = decode_key_answer(response.payload, response.opt.content_format)
    say(event="key", how=how, naf=key.naf_fqdn, btid=key.btid, key=mask(key.key).hex())


async def main(port: int, identity: str, psk: bytes, observed: str, nafs: list[str]) -> None:
    base = f"coaps://127.0.0.1:{port}"
    context = await create_dtls_client_context()
    context.client_credentials.load_from_dict(
        {f"{base}/*": {"dtls": {"psk": psk, "client-identity": identity.encode()}}}
    )
    try:
        for naf in nafs:  # GET with a query, CBOR; FETCH with a CBOR body; GET asking for JSON (hex keys)
            get = aiocoap.Message(code=Code.GET, uri=f"{base}/key?naf={naf}")
            report("get-cbor", await context.request(get).response)
            body = encode_key_request(KeyRequest(naf, UaId.dtls_psk()), CBOR)
            fetch = aiocoap.Message(code=aiocoap.FETCH, uri=f"{base}/key", payload=body, content_format=CBOR)
            report("fetch-cbor", await context.request(fetch).response)
            json_get = aiocoap.Message(code=Code.GET, uri=f"{base}/key?naf={naf}", accept=JSON)
            report("get-json", await context.request(json_get).response)
        observe = aiocoap.Message(code=Code.GET, uri=f"{base}/key?naf={observed}", observe=0)
        request = context.request(observe)
        report("observe", await request.response)
        say(event="observing")

        async def notifications() -> None:
            assert request.observation is not None
            try:
                async for notification in request.observation:
                    report("notification", notification)
            except aiocoap.error.Error as exc:
                say(event="ended", how="notification", code=type(exc).__name__, payload="")

        watcher = asyncio.create_task(notifications())
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes it
        watcher.cancel()
    finally:
        await context.shutdown()


if __name__ == "__main__":
    port_text, identity_text, psk_file, observed_naf, *other = sys.argv[1:]
    asyncio.run(main(int(port_text), identity_text, Path(psk_file).read_bytes(), observed_naf, other))

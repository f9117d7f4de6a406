"""``mn-secd key`` and ``mn-secd status``: the key service as a local AE sees it.

Both talk to the daemon's control socket over DTLS-PSK with the AE's own identity and PSK, given
either as ``--identity ID --psk-file FILE`` or as ``--credentials FILE`` (see
:func:`mn_secd.client.load_credentials`). The key itself is printed only with ``--reveal-key``:
everything else about it (B-TID, expiry, GBA mode, NAF_Id) is shown by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mn_secd.client.keys import DEFAULT_SERVER, KeyServiceClient, load_credentials, parse_server
from mn_secd.control.registry import read_psk_file
from mn_secd.naf_keys import KeyServiceStatus, NafKey


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    if name == "key":
        parser.add_argument("--naf", required=True, metavar="FQDN", help="the NAF to get a key for")
        parser.add_argument("--ua", default="dtls-psk", metavar="ID", help="Ua security protocol id (default dtls-psk)")
        parser.add_argument("--force", action="store_true", help="re-bootstrap first (if this AE may)")
        parser.add_argument("--reveal-key", action="store_true", help="print the key itself (hex)")
    who = parser.add_argument_group("AE credentials (--identity with --psk-file, or --credentials)")
    who.add_argument("--identity", metavar="ID", help="the AE's PSK identity")
    who.add_argument("--psk-file", type=Path, metavar="FILE", help="file holding the AE's PSK (verbatim, mode 0600)")
    who.add_argument("--credentials", type=Path, metavar="FILE", help="TOML with identity, psk_file and server")
    parser.add_argument(
        "--server", metavar="HOST:PORT", help=f"the key service (default {DEFAULT_SERVER[0]}:{DEFAULT_SERVER[1]})"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=_run_key if name == "key" else _run_status)


def _client(args: argparse.Namespace) -> KeyServiceClient | None:
    server = parse_server(args.server) if args.server else None
    if args.credentials is not None:
        if args.identity or args.psk_file:
            print("mn-secd: give either --credentials or --identity with --psk-file", file=sys.stderr)
            return None
        creds = load_credentials(args.credentials)
        host, port = server or creds.server or DEFAULT_SERVER
        return KeyServiceClient(creds.identity, creds.psk, host, port)
    if not args.identity or args.psk_file is None:
        needed = "--identity ID --psk-file FILE, or --credentials FILE"
        print(f"mn-secd: the AE's credentials are needed: {needed}", file=sys.stderr)
        return None
    host, port = server or DEFAULT_SERVER
    return KeyServiceClient(args.identity, read_psk_file(args.psk_file, "--psk-file"), host, port)


def _run_key(args: argparse.Namespace) -> int:
    client = _client(args)
    if client is None:
        return 2

    async def fetch() -> NafKey:
        async with client:
            return await client.get_key(args.naf, args.ua, args.force)

    _print(_key_fields(asyncio.run(fetch()), args.reveal_key), args.json)
    return 0


def _run_status(args: argparse.Namespace) -> int:
    client = _client(args)
    if client is None:
        return 2

    async def fetch() -> KeyServiceStatus:
        async with client:
            return await client.status()

    _print(_status_fields(asyncio.run(fetch())), args.json)
    return 0


def _key_fields(key: NafKey, reveal: bool) -> dict[str, Any]:
    return {
        "naf_fqdn": key.naf_fqdn,
        "ua_id": key.ua_id.hex,
        "naf_id": key.naf_id.hex(),
        "btid": key.btid,
        "expires": _when(key.expires),
        "gba_mode": key.gba_mode.value,
        "key": key.key.hex() if reveal else None,
    }


def _status_fields(status: KeyServiceStatus) -> dict[str, Any]:
    return {
        "card_present": status.card_present,
        "impi": status.impi,
        "bootstrapped": status.bootstrapped,
        "btid": status.btid,
        "expires": None if status.expires is None else _when(status.expires),
        "gba_mode": None if status.gba_mode is None else status.gba_mode.value,
        "last_error": status.last_error,
        "warning": status.warning,
    }


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _print(fields: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: v for k, v in fields.items() if not (k == "key" and v is None)}, indent=2))
        return
    width = max(len(k) for k in fields)
    for name, value in fields.items():
        if name == "key" and value is None:
            value = "(not shown; --reveal-key prints it)"
        elif value is None:
            value = "-"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        print(f"{name:<{width}}  {value}")

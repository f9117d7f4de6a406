"""``mn-secd bootstrap``: run one GBA bootstrap and print B-TID, expiry and mode (never key material).

For commissioning and field diagnosis: it exercises the whole chain the daemon depends on (AT port,
card, BSF) once and says which part failed, in one line. Either from the daemon's configuration
(``--config``) or, on a gateway without one yet, straight from ``--port`` (or ``--reader`` for a
card in a PC/SC reader) and ``--bsf``; a flag given together with ``--config`` overrides the
file's value.

The daemon must not be running on the same AT port: two processes talking AT on one port corrupt
each other's answers. (A reader is opened exclusively: while the daemon holds it, this command is
refused with ``reader-gone``.) Each run costs one AKA run on the card (two after a resynchronisation).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from typing import Any

from mn_secd.config import GbaConfig, load_config
from mn_secd.errors import ConfigError
from mn_secd.gba.bsfxml import format_lifetime
from mn_secd.gba.session import BootstrapSession, bootstrap
from mn_secd.gba.ub import UbClient
from mn_secd.naf_keys import GbaPolicy
from mn_secd.uicc.options import ApplicationChoice, ModemConfig, TransportChoice

MODES = {p.value: p for p in GbaPolicy}


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--config", help="the daemon's configuration file ([modem] and [gba] are used)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", help="the modem's AT port (overrides the config)")
    where.add_argument("--reader", metavar="NAME", help="a part of a PC/SC reader's name (overrides the config)")
    parser.add_argument("--bsf", metavar="URL", help="BSF base URL (default: derived from the IMSI)")
    parser.add_argument("--mode", choices=sorted(MODES), help="GBA mode policy (default: auto)")
    parser.add_argument(
        "--transport", type=TransportChoice, choices=list(TransportChoice), help="APDU transport (default: auto)"
    )
    parser.add_argument(
        "--application",
        type=ApplicationChoice,
        choices=list(ApplicationChoice),
        help="UICC application (default: auto)",
    )
    parser.set_defaults(handler=run)


def settings(args: argparse.Namespace) -> tuple[ModemConfig, GbaConfig]:
    """The config file's [modem] and [gba] sections, overridden by whatever flag was given."""
    if args.config is not None:
        config = load_config(args.config)
        modem, gba = config.modem, config.gba
    elif args.port is not None:
        modem, gba = ModemConfig(args.port), GbaConfig()
    elif args.reader is not None:
        modem, gba = ModemConfig(reader=args.reader, transport=TransportChoice.PCSC), GbaConfig()
    else:
        raise ConfigError(
            "(command line)", "--port", "give --config FILE, or --port PATH or --reader NAME (and usually --bsf URL)"
        )
    if args.reader is not None and args.transport not in (None, TransportChoice.PCSC):
        raise ConfigError("(command line)", "--transport", "a reader is always reached over pcsc")
    if args.port is not None and args.transport is TransportChoice.PCSC:
        raise ConfigError("(command line)", "--transport", '"pcsc" goes with --reader NAME, not --port')
    changes: dict[str, Any] = {}
    if args.reader is not None:  # a reader instead of the file's modem (or another reader)
        changes.update(port=None, reader=args.reader, transport=TransportChoice.PCSC)
    elif args.port is not None:  # a modem instead of the file's reader (or another port)
        transport = TransportChoice.AUTO if modem.uses_reader else modem.transport
        changes.update(port=args.port, reader=None, transport=transport)
    if args.transport is not None:
        changes["transport"] = args.transport
    if args.application is not None:
        changes["application"] = args.application
    try:
        modem = replace(modem, **changes)
    except ValueError as exc:  # e.g. --transport csim on a file that names a reader
        raise ConfigError("(command line)", "--transport", str(exc)) from None
    gba = replace(gba, mode=MODES[args.mode] if args.mode else gba.mode, bsf_url=args.bsf or gba.bsf_url)
    return modem, gba


def describe(session: BootstrapSession, now: float) -> str:
    left = session.expires.timestamp() - now
    return (
        f"B-TID:   {session.btid}\n"
        f"expires: {format_lifetime(session.expires)} (in {left:.0f} s)\n"
        f"mode:    {session.mode.value}"
    )


async def _bootstrap_once(modem: ModemConfig, gba: GbaConfig) -> BootstrapSession:
    from mn_secd.uicc.card import open_card
    from mn_secd.uicc.serial import CLI_SYNC_SECONDS

    try:
        ub = UbClient(gba.bsf_url, timeout=gba.http_timeout, retries=gba.retries, require_rspauth=gba.require_rspauth)
    except ValueError as exc:
        raise ConfigError("(command line)" if gba.bsf_url else "(config)", "bsf_url", str(exc)) from None
    async with ub:
        card = await open_card(modem, sync_for=CLI_SYNC_SECONDS)
        try:
            return await bootstrap(card, ub, gba.mode)
        finally:
            await card.close()


def run(args: argparse.Namespace) -> int:
    """Typed failures propagate: the CLI prints ``kind: message`` in one line and exits 1."""
    session = asyncio.run(_bootstrap_once(*settings(args)))
    try:
        print(describe(session, time.time()))
    finally:
        session.wipe()
    return 0

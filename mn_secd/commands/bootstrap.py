"""``mn-secd bootstrap``: run one GBA bootstrap and print B-TID, expiry and mode (never key material).

For commissioning and field diagnosis: it exercises the whole chain the daemon depends on (AT port,
card, BSF) once and says which part failed, in one line. Either from the daemon's configuration
(``--config``) or, on a gateway without one yet, straight from ``--port`` and ``--bsf``; a flag
given together with ``--config`` overrides the file's value.

The daemon must not be running on the same AT port: two processes talking AT on one port corrupt
each other's answers. Each run costs one AKA run on the card (two after a resynchronisation).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

from mn_secd.config import load_config
from mn_secd.errors import ConfigError
from mn_secd.gba.bootstrap import BootstrapSession, bootstrap
from mn_secd.gba.bsfxml import format_lifetime
from mn_secd.gba.ub import UbClient
from mn_secd.naf_keys import GbaPolicy

MODES = {p.value: p for p in GbaPolicy}


@dataclass(frozen=True)
class _Settings:
    port: str
    baud: int
    transport: str
    application: str
    command_timeout: float
    policy: GbaPolicy
    bsf_url: str | None
    http_timeout: float
    retries: int


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--config", help="the daemon's configuration file ([modem] and [gba] are used)")
    parser.add_argument("--port", help="the modem's AT port (overrides the config)")
    parser.add_argument("--bsf", metavar="URL", help="BSF base URL (default: derived from the IMSI)")
    parser.add_argument("--mode", choices=sorted(MODES), help="GBA mode policy (default: auto)")
    parser.add_argument("--transport", choices=("auto", "csim", "cgla"), help="APDU transport (default: auto)")
    parser.add_argument("--application", choices=("auto", "isim", "usim"), help="UICC application (default: auto)")
    parser.set_defaults(handler=run)


def settings(args: argparse.Namespace) -> _Settings:
    """The config file's [modem] and [gba] values, overridden by whatever flag was given."""
    if args.config is not None:
        config = load_config(args.config)
        modem, gba = config.modem, config.gba
        base = _Settings(
            port=modem.port,
            baud=modem.baud,
            transport=modem.transport,
            application=modem.application,
            command_timeout=modem.command_timeout,
            policy=gba.mode,
            bsf_url=gba.bsf_url,
            http_timeout=gba.http_timeout,
            retries=gba.retries,
        )
    elif args.port is None:
        raise ConfigError("(command line)", "--port", "give --config FILE, or --port PATH (and usually --bsf URL)")
    else:
        base = _Settings(args.port, 115200, "auto", "auto", 5.0, GbaPolicy.AUTO, None, 10.0, 3)
    return _Settings(
        port=args.port or base.port,
        baud=base.baud,
        transport=args.transport or base.transport,
        application=args.application or base.application,
        command_timeout=base.command_timeout,
        policy=MODES[args.mode] if args.mode else base.policy,
        bsf_url=args.bsf or base.bsf_url,
        http_timeout=base.http_timeout,
        retries=base.retries,
    )


def describe(session: BootstrapSession, now: float) -> str:
    left = session.expires.timestamp() - now
    return (
        f"B-TID:   {session.btid}\n"
        f"expires: {format_lifetime(session.expires)} (in {left:.0f} s)\n"
        f"mode:    {session.mode.value}"
    )


async def _bootstrap_once(s: _Settings) -> BootstrapSession:
    from mn_secd.uicc.card import open_card

    try:
        ub = UbClient(s.bsf_url, timeout=s.http_timeout, retries=s.retries)
    except ValueError as exc:
        raise ConfigError("(command line)" if s.bsf_url else "(config)", "bsf_url", str(exc)) from None
    async with ub:
        card = await open_card(
            s.port,
            baud=s.baud,
            transport=s.transport,
            application=s.application,
            command_timeout=s.command_timeout,
        )
        try:
            return await bootstrap(card, ub, s.policy)
        finally:
            await card.close()


def run(args: argparse.Namespace) -> int:
    """Typed failures propagate: the CLI prints ``kind: message`` in one line and exits 1."""
    session = asyncio.run(_bootstrap_once(settings(args)))
    try:
        print(describe(session, time.time()))
    finally:
        session.wipe()
    return 0

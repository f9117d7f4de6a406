"""``mn-secd uicc info|auth|readers``: look at the UICC through a modem's AT port or a reader, as the daemon would.

``info`` is the first thing to run on a new gateway: it proves the AT port (``--port``) or the
reader (``--reader``), the transport, the application discovery and the identity in one go, with
nothing secret in its output. ``readers`` lists what pcscd sees, to find the text for ``--reader``
and ``[modem] reader``.

``auth`` is a lab tool: it runs exactly one AUTHENTICATE (3G context) with a RAND and AUTN given on
the command line and prints RES, CK and IK -- key material, printed only because the operator asked
for it by name. Each run consumes a sequence number on the card; it is never retried.

Exit codes: 0 done (``auth``: success, or sync failure with AUTS printed), 1 error (typed, one line;
``readers --reader NAME``: NAME picks no reader holding a card), 2 usage, 3 ``auth`` MAC failure
(the AUTN did not come from the card's home network).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

from mn_secd.aka import AkaMacFailure, AkaSuccess, AuthContext
from mn_secd.card_identity import CardIdentity
from mn_secd.uicc.card import Card, ModemSource, open_card
from mn_secd.uicc.options import ApplicationChoice, ModemConfig, TransportChoice
from mn_secd.uicc.reader import ReaderSource, survey_readers
from mn_secd.uicc.serial import CLI_SYNC_SECONDS

EXIT_MAC_FAILURE = 3


def _hex16(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not hexadecimal") from None
    if len(value) != 16:
        raise argparse.ArgumentTypeError(f"must be 16 octets (32 hex digits), got {len(value)}")
    return value


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = sub.add_parser("info", help="print ICCID, IMSI, IMPI, applications, GBA_U support, transport")
    auth = sub.add_parser(
        "auth",
        help="run ONE AUTHENTICATE (3G context) and print RES/CK/IK or AUTS (lab)",
        description="Run exactly one AUTHENTICATE (3G context; never retried: each run consumes an SQN) and "
        "print RES, CK and IK -- key material -- or the AUTS of a sync failure. "
        f"Exit status: 0 success or sync failure, 1 error, 2 usage, {EXIT_MAC_FAILURE} MAC failure.",
    )
    for p in (info, auth):
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--port", help="the modem's AT port, e.g. /dev/ttyUSB2")
        where.add_argument(
            "--reader", metavar="NAME", help="a part of a PC/SC reader's name (`mn-secd uicc readers` lists them)"
        )
        p.add_argument("--baud", type=_positive(int), help="speed of the AT port (default 115200)")
        p.add_argument(
            "--transport",
            type=TransportChoice,
            choices=list(TransportChoice),
            help="APDU transport (default: auto with --port, pcsc with --reader)",
        )
        p.add_argument(
            "--application", type=ApplicationChoice, choices=list(ApplicationChoice), default="auto", help="application"
        )
        p.add_argument(
            "--timeout", type=_positive(float), default=5.0, help="seconds per AT command or APDU (default 5)"
        )
        p.set_defaults(parser=p)
    auth.add_argument("--rand", type=_hex16, required=True, help="RAND, 32 hex digits")
    auth.add_argument("--autn", type=_hex16, required=True, help="AUTN, 32 hex digits")
    readers = sub.add_parser("readers", help="list the PC/SC readers pcscd sees, whether each holds a card, its ATR")
    readers.add_argument("--reader", metavar="NAME", help="also say which reader NAME picks, as the daemon would")
    info.set_defaults(handler=lambda args: asyncio.run(_info(args)))
    auth.set_defaults(handler=lambda args: asyncio.run(_auth(args)))
    readers.set_defaults(handler=lambda args: asyncio.run(_readers(args)))


def modem_config(args: argparse.Namespace) -> ModemConfig:
    """``--port`` or ``--reader`` and the options that go with it; a mismatch is a usage error (exit 2)."""
    parser: argparse.ArgumentParser = args.parser
    if args.reader is not None:
        if args.transport not in (None, TransportChoice.PCSC) or args.baud is not None:
            parser.error("--transport and --baud are for --port; a reader is always reached over pcsc")
        return ModemConfig(
            reader=args.reader,
            transport=TransportChoice.PCSC,
            application=args.application,
            command_timeout=args.timeout,
        )
    if args.transport is TransportChoice.PCSC:
        parser.error("--transport pcsc goes with --reader NAME, not --port")
    return ModemConfig(
        args.port,
        baud=args.baud or ModemConfig.baud,
        transport=args.transport or TransportChoice.AUTO,
        application=args.application,
        command_timeout=args.timeout,
    )


async def _open(args: argparse.Namespace) -> Card:
    # A modem switched on a moment ago may not answer AT yet: wait for it, a bounded while.
    return await open_card(modem_config(args), sync_for=CLI_SYNC_SECONDS)


def _describe(card: Card, identity: CardIdentity) -> list[str]:
    apps = ", ".join(f"{app.value} {aid.hex().upper()}" for app, aid in identity.applications)
    source = card.source
    where: list[str] = []
    if isinstance(source, ReaderSource) and source.transport is not None:
        where = [f"reader:       {source.transport.reader}", f"ATR:          {source.transport.atr.hex().upper()}"]
    elif isinstance(source, ModemSource):
        where = [f"port:         {source.port.path}"]
    return [
        *where,
        f"transport:    {identity.transport}",
        f"ICCID:        {identity.iccid}",
        f"IMSI:         {identity.imsi}",
        f"MNC length:   {identity.mnc_length}",
        f"IMPI:         {identity.impi}",
        f"application:  {identity.application.value} {identity.aid.hex().upper()}",
        f"applications: {apps}",
        f"GBA_U:        {'yes' if identity.gba_u else 'no'}",
    ]


async def _info(args: argparse.Namespace) -> int:
    card = await _open(args)
    try:
        identity = await card.identity()
        lines = _describe(card, identity)
    finally:
        await card.close()
    print("\n".join(lines))
    return 0


async def _readers(args: argparse.Namespace) -> int:
    survey = await survey_readers(args.reader)
    if not survey.readers:
        print("no PC/SC readers (pcscd runs, but sees none)")
    width = max((len(r.name) for r in survey.readers), default=0)
    for reader in survey.readers:
        card = f"card, ATR {reader.atr.hex().upper()}" if reader.card_present else "empty"
        print(f"{reader.name:{width}}  {card}")
    if args.reader is None:
        return 0
    if survey.problem is not None:
        print(f"--reader {args.reader!r}: {survey.problem.kind}: {survey.problem}")
        return 1
    assert survey.chosen is not None
    print(f"--reader {args.reader!r} picks {survey.chosen.name!r}")
    return 0


async def _auth(args: argparse.Namespace) -> int:
    card = await _open(args)
    try:
        identity = await card.identity()
        result = await card.authenticate(args.rand, args.autn, AuthContext.UMTS)
    finally:
        await card.close()
    print(f"application: {identity.application.value} over {identity.transport}")
    if isinstance(result, AkaMacFailure):
        print("MAC failure: the card rejected the AUTN (SW 9862); it was not made with this card's K")
        return EXIT_MAC_FAILURE
    if isinstance(result, AkaSuccess):
        assert result.ck is not None and result.ik is not None  # the 3G context always returns them
        print(f"RES: {result.res.hex().upper()}")
        print(f"CK:  {result.ck.hex().upper()}")
        print(f"IK:  {result.ik.hex().upper()}")
        if result.kc is not None:
            print(f"Kc:  {result.kc.hex().upper()}")
        return 0
    print("sync failure: the card found the SQN stale")
    print(f"AUTS: {result.auts.hex().upper()}")
    return 0

"""``mn-secd run``: the daemon, under systemd (``Type=notify``) or in the foreground.

The configuration is validated (including that the modem's port exists) before anything else is
set up or logged, so a mistake is exactly one line on stderr (the journal, under systemd) naming
the file and the key, and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio

from mn_secd.commands.check_config import DEFAULT_CONFIG
from mn_secd.config import check_modem_port, load_config, load_pin
from mn_secd.logs import setup_logging


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument(
        "--modem-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long start-up waits for the card before reporting ready in degraded mode (default 120)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    check_modem_port(config)
    pin = load_pin(config)  # read before anything is logged; the daemon wipes it when it stops
    setup_logging(config.log.level)
    # Imported here so that `mn-secd check-config` and a config error stay fast and light.
    from mn_secd.daemon import MODEM_WAIT, run_daemon

    modem_wait = MODEM_WAIT if args.modem_wait is None else args.modem_wait
    return asyncio.run(run_daemon(config, modem_wait=modem_wait, pin=pin))

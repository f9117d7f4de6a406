"""The ``mn-secd`` command line.

Only the module of the chosen command is imported, so ``mn-secd run`` loads the daemon and nothing
of the simulated world or the lab tools, and every command starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mn_secd.errors import MnSecdError

#: command -> (module in mn_secd.commands providing ``configure(parser)``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("mn_secd.commands.run", "run the daemon (under systemd or in the foreground)"),
    "check-config": ("mn_secd.commands.check_config", "validate a configuration file and exit"),
    "bootstrap": ("mn_secd.commands.bootstrap", "run one GBA bootstrap and print B-TID, expiry, mode"),
    "key": ("mn_secd.commands.client", "ask the daemon for a NAF key (as a local AE)"),
    "status": ("mn_secd.commands.client", "show the daemon's status (as a local AE)"),
    "forget": ("mn_secd.commands.forget", "remove the session the daemon keeps for its next start"),
    "setup-sealing": ("mn_secd.commands.setup_sealing", "make the session-sealing key persist_session needs (as root)"),
    "uicc": ("mn_secd.commands.uicc", "diagnose the UICC through the modem's AT port or a PC/SC reader"),
    "doctor": ("mn_secd.commands.doctor", "check a gateway: port, modem, SIM, transport, card, BSF, clock, control"),
    "sim": ("mn_secd.commands.sim", "run a part of the simulated world, or the fleet simulation"),
    "demo": ("mn_secd.commands.demo", "run the whole chain on the embedded simulated world"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mn-secd", description="Security daemon for oneM2M Middle Nodes")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).configure(p, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Each ``configure(parser, name)`` sets ``handler``: a function of the parsed args returning the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = args_list[0] if args_list and args_list[0] in COMMANDS else None
    try:
        args = build_parser(command).parse_args(args_list)
        code: int = args.handler(args)
    except MnSecdError as exc:
        print(f"mn-secd {command}: {exc.kind}: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == "mn_secd":
            raise
        # An optional extra that is not installed, e.g. aiohttp for the simulated BSF and the demo
        # in the Debian package, which ships the daemon without [sim].
        print(f"mn-secd {command}: needs the Python package {exc.name!r}, which is not installed here", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code

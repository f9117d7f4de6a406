"""``mn-secd sim PART``: run one part of the simulated world (modem, BSF, NAF) from a shell.

Each part's command line lives with the part in :mod:`mn_secd.sim` and is listed in
:data:`SUBCOMMANDS` by name; this group imports only the module of the part being run, so
``mn-secd sim modem`` starts without the HTTP or DTLS stacks, ``mn-secd sim bsf`` without the modem
emulator, and a part that is broken cannot take the others down.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from typing import Any

#: part -> ("module:function", one-line help). The function is ``configure(parser, name)``, as for
#: the top-level commands in :mod:`mn_secd.cli`: it adds the part's arguments and sets ``handler``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "modem": ("mn_secd.sim.modem_cli:configure", "AT modem emulator on a pseudo-terminal, with a software UICC"),
    "bsf": ("mn_secd.sim.bsf:configure", "reference BSF: Ub (Digest AKA) and Zn (JSON) over HTTP, for card profiles"),
    "naf": ("mn_secd.sim.in_cse:configure", "reference IN-CSE (NAF): CoAP over DTLS-PSK keyed by GBA, keys over Zn"),
    "vicc": ("mn_secd.sim.vicc:configure", "the software UICC as a card in pcscd's vpcd reader (PC/SC)"),
    "pcscd": ("mn_secd.sim.pcscd:configure", "a private pcscd with one vpcd reader, beside the system's"),
    "fleet": ("mn_secd.sim.fleetcli:configure", "fleet simulation: N gateways against a BSF model on a virtual clock"),
}


class _LazySubParsers(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Configure a part's parser only when that part is chosen (so only its module is imported)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if isinstance(values, Sequence) and values and values[0] in SUBCOMMANDS:
            name = values[0]
            _configure_part(self._name_parser_map[name], name)
        super().__call__(parser, namespace, values, option_string)


def _configure_part(parser: argparse.ArgumentParser, name: str) -> None:
    if parser.get_default("handler") is not None:
        return  # already configured (a parser object may be parsed more than once)
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    configure: Callable[[argparse.ArgumentParser, str], None] = getattr(importlib.import_module(module_name), function)
    configure(parser, name)


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="part", required=True, metavar="PART", action=_LazySubParsers)
    for part, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(part, help=help_text, description=help_text)

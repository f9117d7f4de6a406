"""What the command lines of the simulated world's parts share (``mn-secd sim PART``).

Each part's ``configure(parser, name)`` lives with the part (:mod:`mn_secd.sim.bsf`,
:mod:`mn_secd.sim.in_cse`, :mod:`mn_secd.sim.modem_cli`), and ``mn-secd sim`` imports only the part
being run, so what they share sits here, in a module that imports no part.
"""

from __future__ import annotations

import argparse


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` for a part's ``--listen`` option (port 0 = any free port)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)

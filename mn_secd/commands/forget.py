"""``mn-secd forget``: remove the bootstrap session the daemon keeps for its next start.

The next start then bootstraps afresh (after the start jitter, or at once when an AE asks). It works
whether or not the daemon is running: the daemon writes its state directory only after a new
bootstrap, and under the same lock this command takes, so a forgotten session is never written
back. A running daemon goes on with the session it holds in memory until that ends (a refresh, the
card removed); ``systemctl restart mn-secd`` after ``forget`` drops it at once.

Run it as root, or as the daemon's user: under systemd the directory belongs to the unit's
dynamic user (``/var/lib/private/mn-secd``, reached through ``/var/lib/mn-secd``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mn_secd.commands.check_config import DEFAULT_CONFIG
from mn_secd.config import load_gba_config
from mn_secd.gba.session_store import RECORD_FILE, StateDirectory

#: The unit's ``StateDirectory=mn-secd``, for an operator's shell that has no ``$STATE_DIRECTORY``.
UNIT_STATE_DIRECTORY = Path("/var/lib/mn-secd")


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument(
        "--state-directory",
        type=Path,
        metavar="DIR",
        help=f"where the session is kept (default: [gba] state_directory, $STATE_DIRECTORY, {UNIT_STATE_DIRECTORY})",
    )
    parser.set_defaults(handler=forget)


def forget(args: argparse.Namespace) -> int:
    path: Path | None = args.state_directory
    if path is None:
        path = load_gba_config(args.config).state_path(os.environ) or UNIT_STATE_DIRECTORY
    if not path.is_dir():
        print(f"{path}: no such directory: no session is kept")
        return 0
    removed = StateDirectory(path).remove()
    if not removed:
        print(f"{path}: no session is kept")
        return 0
    kinds = ["a GBA_U session record" if name == RECORD_FILE else "a sealed GBA_ME session" for name in removed]
    print(f"{path}: removed {' and '.join(kinds)}; the next start bootstraps afresh")
    return 0

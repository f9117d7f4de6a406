"""``mn-secd sim modem``: the AT modem emulator on a pseudo-terminal, from a shell.

Every :class:`~mn_secd.sim.modem.Quirks` field gets a flag, so any real modem's behaviour the
emulator knows can be switched on by hand; signals remove and re-insert the SIM and make the port
vanish and return, as the tests do through the emulator's methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import queue
import signal
import sys
import types
from pathlib import Path
from typing import Any

from mn_secd.sim.modem import CCHO_STYLES, PIN_COUNTER_STYLES, ModemEmulator, Quirks

#: Command-line help for each :class:`Quirks` field (every field gets a flag; see test_modem.py).
QUIRK_HELP: dict[str, str] = {
    "echo": "echo on at power-on (ATE0 still turns it off)",
    "urcs_between": "inject a URC before every answer",
    "urcs_inside": "inject a URC between the info lines and the final result code",
    "urc_lines": "a URC line to inject (repeatable; default: +CREG: 1,1 / RING / +CEREG: 1)",
    "split_writes": "send every answer in small pieces with delays",
    "split_size": "bytes per piece with --split-writes",
    "split_delay": "seconds between pieces with --split-writes",
    "reject_lowercase_hex": "answer a bare ERROR to lower-case hex (Sierra EM7565)",
    "no_space_after_colon": 'info lines like +CSIM:4,"9000" (SIMCom)',
    "ccho_style": "how AT+CCHO names the channel: +CCHO: 1, a Sierra session handle, or a bare number (Fibocom)",
    "no_logical_channels": "no logical channels: +CME ERROR: 4 on CCHO/CGLA/CCHC and MANAGE CHANNEL",
    "no_test_commands": "answer ERROR to every =? test command",
    "get_response_loop": "GET RESPONSE answers 6100 forever",
    "refuse_authenticate": "refuse AUTHENTICATE with +CME ERROR: 3",
    "internal_get_response": "fetch 61xx inside the modem and return data + 9000",
    "latency": "seconds before every answer",
    "auth_latency": "extra seconds before the answer to an AUTHENTICATE",
    "pin_counter": "how the modem tells the PIN attempts left: AT+CPINR (TS 27.007), AT+QPINC (Quectel), "
    "AT+CPINC (Wavecom, Sierra) or none (the card's VERIFY status is then the only source)",
    "boot_no_sim": "+CME ERROR: 10 (SIM not inserted) for SECONDS after power-up or insertion, "
    "while the modem looks for the card (most modems at boot)",
    "boot_sim_busy": "+CME ERROR: 14 (SIM busy) for SECONDS after that, and after a PIN is accepted "
    "(u-blox SARA-R4 at power-up, SIMCom SIM800 after AT+CPIN)",
    "csim_restricted": "AT+CSIM refuses AUTHENTICATE, GET RESPONSE, VERIFY and updates with +CME ERROR: 3 "
    "(Wavecom-based modems, e.g. Moxa OnCell G2150I)",
    "reselect_mf": "select the MF after every AT+CSIM on the basic channel and replay the buffered SELECTs "
    "before the next one (Siemens AC75/MC55, Multi-Tech)",
    "cme0_every": "every Nth AT+CSIM/AT+CGLA runs on the card but answers +CME ERROR: 0 (Quectel EG95)",
    "drop_answer_every": "every Nth AT+CSIM/AT+CGLA runs on the card but its answer line is lost: "
    "a bare OK (Quectel EG95)",
    "wrong_le": "the card answers READ BINARY/RECORD N times in a row with 6Cxx (exact length) and the "
    "modem passes it on instead of re-issuing the command (Nordic nRF91)",
    "numeric_results": "a modem whose profile stores ATV0: numeric result codes (0, 4) until ATV1 "
    "(an ATV0 saved with AT&W)",
    "boot_silent": "ignore the port for SECONDS after power-up and after the port returns: no echo, no answer "
    "(a modem still booting)",
    "foreign_answers": "another program shares the port: every SECONDS, while idle, an answer to an AT+CSQ "
    "the host never sent (ModemManager probing the port)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_quirk_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`Quirks` field, defaults from the dataclass."""
    group = parser.add_argument_group("modem quirks (all off by default)")
    defaults = Quirks()
    for f in dataclasses.fields(Quirks):
        default = getattr(defaults, f.name)
        help_text = QUIRK_HELP[f.name]
        if f.name == "urc_lines":
            group.add_argument("--urc-line", dest=f.name, action="append", metavar="LINE", help=help_text)
        elif f.name == "ccho_style":
            choices = [style.replace("_", "-") for style in CCHO_STYLES]
            group.add_argument(_flag(f.name), dest=f.name, choices=choices, default="prefixed", help=help_text)
        elif f.name == "pin_counter":
            group.add_argument(_flag(f.name), dest=f.name, choices=PIN_COUNTER_STYLES, default=default, help=help_text)
        elif isinstance(default, bool):
            group.add_argument(_flag(f.name), dest=f.name, action="store_true", help=help_text)
        elif isinstance(default, int):
            group.add_argument(_flag(f.name), dest=f.name, type=int, default=default, metavar="N", help=help_text)
        elif isinstance(default, float):
            group.add_argument(
                _flag(f.name), dest=f.name, type=float, default=default, metavar="SECONDS", help=help_text
            )
        else:  # a new kind of quirk needs a deliberate flag
            raise TypeError(f"no command-line flag for quirk {f.name!r}")


def quirks_from_args(args: argparse.Namespace) -> Quirks:
    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(Quirks)}
    values["ccho_style"] = values["ccho_style"].replace("-", "_")
    if values["urc_lines"] is None:
        del values["urc_lines"]
    else:
        values["urc_lines"] = tuple(values["urc_lines"])
    return Quirks(**values)


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.epilog = (
        "Prints the port's path on stdout, then serves until SIGINT/SIGTERM; logs each AUTHENTICATE "
        "and each PIN entry on stderr (never the PIN). "
        "SIGUSR1 removes / re-inserts the SIM; SIGUSR2 makes the port vanish / come back "
        "(the new path is printed when it returns)."
    )
    parser.add_argument("--card", required=True, type=Path, metavar="PROFILE", help="card profile (TOML)")
    parser.add_argument(
        "--sim-pin",
        metavar="PIN",
        help="turn the card's PIN lock on with this PIN (4-8 digits; kept in the profile with its attempt "
        "counters): a SIM as operators ship many of them, answering +CPIN: SIM PIN and 6982 until verified",
    )
    parser.add_argument(
        "--link", metavar="PATH", help="keep a symlink at PATH pointing at the pty (stable across vanish/return)"
    )
    add_quirk_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mn_secd.logs import setup_logging
    from mn_secd.sim.usim import SoftUicc

    setup_logging("info")  # each AUTHENTICATE and PIN entry, on stderr (the journal under systemd-run)
    quirks = quirks_from_args(args)
    if args.sim_pin is not None:
        try:
            _lock_with_pin(args.card, args.sim_pin)
        except ValueError as exc:  # ProfileValueError: names the key, never echoes the PIN
            print(f"mn-secd sim modem: --sim-pin: {getattr(exc, 'problem', exc)}", file=sys.stderr)
            return 2
    card = SoftUicc.from_file(args.card)  # SQN state and PIN counters are written back to the profile file
    emulator = ModemEmulator(card, quirks, link=args.link)

    # Signal handlers only queue what to do (SimpleQueue.put is safe in a handler); the main
    # thread does it, so no handler ever runs inside the emulator's locks.
    actions: queue.SimpleQueue[str] = queue.SimpleQueue()

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        actions.put({signal.SIGUSR1: "sim", signal.SIGUSR2: "port"}.get(signal.Signals(signum), "stop"))

    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    previous = {sig: signal.signal(sig, on_signal) for sig in watched}
    try:
        try:
            print(emulator.start(), flush=True)
        except FileExistsError as exc:
            print(f"mn-secd sim modem: {exc}", file=sys.stderr)
            return 2
        while (action := _next_action(actions)) != "stop":
            if action == "sim":
                if emulator.card is None:
                    card.reset()  # a card put back in powers up afresh
                    emulator.insert_sim(card)
                else:
                    emulator.remove_sim()
            elif emulator.path is None:
                print(emulator.restore(), flush=True)
            else:
                emulator.vanish()
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _lock_with_pin(path: Path, pin: str) -> None:
    from dataclasses import replace

    from mn_secd.sim.profile import load_profile, save_profile

    profile = load_profile(path)
    if profile.pin != pin:
        save_profile(path, replace(profile, pin=pin))


def _next_action(actions: queue.SimpleQueue[str]) -> str:
    # A timeout keeps the main thread waking up, so signal handlers run promptly on every platform.
    while True:
        try:
            return actions.get(timeout=0.5)
        except queue.Empty:
            continue

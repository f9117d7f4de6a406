"""``mn-secd check-config``: validate a configuration file without starting anything.

Meant for package post-install scripts and operators before a reload: it runs exactly the checks
``mn-secd run`` runs at start (the file, the modem's port exists -- or pyscard is installed for a
PC/SC reader --, every AE's PSK file loads into the registry, the SIM PIN file holds a PIN) and
answers in one line either way.
"""

from __future__ import annotations

import argparse

from mn_secd.config import Config, check_modem_port, load_config, load_pin

DEFAULT_CONFIG = "/etc/mn-secd/mn-secd.toml"


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.set_defaults(handler=check_config)


def summary(config: Config) -> str:
    """One line an operator can eyeball: what the daemon would talk to, and how many AEs."""
    bsf = config.gba.bsf_url or "derived from the IMSI"
    addresses = ", ".join(config.control.addresses)
    n = len(config.aes)
    modem = config.modem
    card = f"reader {modem.reader!r}" if modem.uses_reader else f"modem {modem.port}"
    return (
        f"{config.path}: OK: {card} ({modem.transport}/{modem.application}), "
        f"GBA {config.gba.mode.value}, BSF {bsf}, control on {addresses} port {config.control.port}, "
        f"{n} AE{'' if n == 1 else 's'}"
    )


def check_config(args: argparse.Namespace) -> int:
    """ConfigError propagates: the CLI prints it as the one line naming the file and key."""
    config = load_config(args.config)
    check_modem_port(config)
    # What the key service itself refuses (identity and PSK sizes tinydtls can hold, PSK contents).
    from mn_secd.control.registry import load_registry

    load_registry(config.aes, source=str(config.path))
    pin = load_pin(config)  # a PIN file that holds no PIN is found now, not at the daemon's start
    if pin is not None:
        pin.wipe()
    print(summary(config))
    return 0

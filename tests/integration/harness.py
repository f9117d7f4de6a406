"""What the integration tests' fixtures (``conftest.py``) hand out, importable for type hints and helpers."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mn_secd.client.keys import KeyServiceClient
from mn_secd.naf_keys import NafKey
from mn_secd.sim.modem import ModemEmulator
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.world import DEFAULT_NAF_FQDN, AeCredential, SimulatedWorld, free_udp_port
from mn_secd.uicc.card import Card, open_card
from mn_secd.uicc.options import ModemConfig


@dataclass
class PtyModem:
    """The AT modem emulator serving ``path``, with ``card`` in it (until a test takes it out)."""

    modem: ModemEmulator
    card: SoftUicc
    path: str


async def open_test_card(cards: list[Card], path: str, **options: Any) -> Card:
    """The daemon's card layer on ``path`` (ModemConfig ``options``), closed with the ``cards`` fixture."""
    card = await asyncio.wait_for(open_card(ModemConfig(path, **options)), 30)
    cards.append(card)
    return card


@dataclass
class LocalAes:
    """The AEs a daemon configuration names, and each one's way to the daemon's control socket."""

    world: SimulatedWorld
    control_port: int = field(default_factory=free_udp_port)
    known: dict[str, AeCredential] = field(default_factory=dict)

    def add(self, identity: str, **options: Any) -> AeCredential:
        """A new AE -- or an AE's new PSK: each call draws a fresh one."""
        ae = AeCredential(identity, os.urandom(16), **options)
        self.known[identity] = ae
        return ae

    def write_config(self, **options: Any) -> Path:
        """The daemon's configuration for this world and these AEs (PSK files 0600 beside it)."""
        options.setdefault("log_level", "debug")
        return self.world.write_daemon_config(list(self.known.values()), control_port=self.control_port, **options)

    def client(self, identity: str, **options: Any) -> KeyServiceClient:
        ae = self.known[identity]
        return KeyServiceClient(ae.identity, ae.psk, "127.0.0.1", self.control_port, **options)

    async def get_key(self, identity: str, naf: str = DEFAULT_NAF_FQDN) -> NafKey:
        async with self.client(identity) as client:
            return await client.get_key(naf)

"""What the integration tests' fixtures (``conftest.py``) hand out, importable for type hints and helpers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mn_secd.client.keys import KeyServiceClient
from mn_secd.errors import MnSecdError
from mn_secd.naf_keys import NafKey
from mn_secd.sim.bsf import ZN_PATH
from mn_secd.sim.modem import ModemEmulator
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.world import DEFAULT_NAF_FQDN, AeCredential, SimulatedWorld, free_udp_port
from mn_secd.ua import UaId
from mn_secd.uicc.card import Card, PortSharing, open_card
from mn_secd.uicc.options import ModemConfig
from mn_secd.uicc.pcsc import list_readers
from mn_secd.uicc.pin import PinKeeper


@dataclass
class PtyModem:
    """The AT modem emulator serving ``path``, with ``card`` in it (until a test takes it out)."""

    modem: ModemEmulator
    card: SoftUicc
    path: str


async def open_test_card(
    cards: list[Card],
    path: str,
    *,
    pin: PinKeeper | None = None,
    notices: Callable[[PortSharing | MnSecdError], None] | None = None,
    **options: Any,
) -> Card:
    """The daemon's card layer on ``path`` (ModemConfig ``options``), closed with the ``cards`` fixture."""
    card = await asyncio.wait_for(open_card(ModemConfig(path, **options), pin=pin, notices=notices), 30)
    cards.append(card)
    return card


async def zn(bsf_url: str, btid: str, fqdn: str, ua: UaId, *, gba_u_aware: bool = False) -> dict[str, Any]:
    """The NAF's side: ask the BSF's Zn endpoint over HTTP for the key of (B-TID, NAF_Id)."""
    body = {"btId": btid, "nafId": {"nafFqdn": fqdn, "uaSecProtId": ua.hex}, "gbaUAware": gba_u_aware}
    async with httpx.AsyncClient(timeout=5.0) as client:
        response = await client.post(bsf_url + ZN_PATH, json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def reader_holds_card(reader: str, present: bool, timeout: float = 10.0) -> None:
    """Until pcscd shows ``reader`` with (or without) a card: it polls its slots about every 400 ms."""
    async with asyncio.timeout(timeout):
        while not any(r.name == reader and r.card_present == present for r in await list_readers()):
            await asyncio.sleep(0.05)


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

"""The simulated world in one object: lab cards, the modem on a pty, the reference BSF and IN-CSE.

The demo and the end-to-end tests start the same world, so what the demo shows is what the tests
prove. Every part is real where it can be: the daemon reaches the card through a pseudo-terminal,
the BSF over loopback HTTP and the IN-CSE over loopback DTLS, and it is started from a generated
configuration file exactly as systemd would start it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from mn_secd.gba.sealing import KEY_LENGTH, SESSION_KEY_CREDENTIAL
from mn_secd.sim.bsf import ReferenceBsf
from mn_secd.sim.modem import ModemEmulator, Quirks
from mn_secd.sim.profile import CardProfile, load_profile, save_profile
from mn_secd.sim.usim import SoftUicc

#: The IN-CSE's host name: it only has to agree between the AE, the daemon and the NAF (NAF_Id).
DEFAULT_NAF_FQDN = "in-cse.mn-secd.example"


def lab_cards() -> tuple[CardProfile, CardProfile]:
    """Two LAB cards with public TS 35.208 test keys (never real subscribers).

    The first has an ISIM and GBA_U (2-digit MNC); the second is a USIM-only card without GBA_U
    and with a 3-digit MNC, so a SIM swap also changes the GBA mode and the IMPI's form.
    """
    first = CardProfile(
        iccid="89882110000000000018",
        imsi="001010000000001",
        mnc_length=2,
        k=bytes.fromhex("465b5ce8b199b49faa5f0a2ee238a6bc"),
        opc=bytes.fromhex("cd63cb71954a9f4e48a5994e37a02baf"),
        amf=bytes.fromhex("8000"),
        isim=True,
        gba_u=True,
    )
    second = CardProfile(
        iccid="89310150000000000026",
        imsi="310150123456789",
        mnc_length=3,
        k=bytes.fromhex("fec86ba6eb707ed08905757b1bb44b8f"),
        opc=bytes.fromhex("1006020f0a478bf6b699f15c062e42b3"),
        amf=bytes.fromhex("8000"),
        isim=False,
        gba_u=False,
    )
    return first, second


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free a moment ago (for the control socket of a daemon under test)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class AeCredential:
    """A local AE as the daemon's configuration names it (the PSK is written to a 0600 file)."""

    identity: str
    psk: bytes = field(repr=False)
    naf: tuple[str, ...] = (DEFAULT_NAF_FQDN,)
    ua: tuple[str, ...] = ("dtls-psk",)
    may_force_bootstrap: bool = True


class SimulatedWorld:
    """Lab cards, the AT modem emulator and the reference BSF, rooted in one working directory."""

    def __init__(
        self,
        workdir: Path,
        *,
        quirks: Quirks | None = None,
        bsf_lifetime: timedelta = timedelta(hours=1),
        cards: Sequence[CardProfile] | None = None,
    ) -> None:
        self.workdir = workdir
        self.quirks = quirks
        self.bsf_lifetime = bsf_lifetime
        self._cards = tuple(cards) if cards is not None else lab_cards()
        self.card_paths: list[Path] = []
        self.modem: ModemEmulator | None = None
        self.bsf: ReferenceBsf | None = None
        self.bsf_url = ""
        self.modem_link = workdir / "modem-at"
        self.current_card = 0

    async def start(self) -> None:
        cards_dir = self.workdir / "cards"
        cards_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.card_paths = []
        for index, profile in enumerate(self._cards):
            path = cards_dir / f"card{index}.toml"
            save_profile(path, profile)
            self.card_paths.append(path)
        self.modem = ModemEmulator(SoftUicc.from_file(self.card_paths[0]), self.quirks, link=str(self.modem_link))
        self.modem.start()
        self.bsf = ReferenceBsf([load_profile(p) for p in self.card_paths], lifetime=self.bsf_lifetime)
        self.bsf_url = await self.bsf.start("127.0.0.1", 0)

    async def stop(self) -> None:
        if self.bsf is not None:
            await self.bsf.stop()
            self.bsf = None
        if self.modem is not None:
            self.modem.stop()
            self.modem = None

    async def __aenter__(self) -> SimulatedWorld:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def profile(self, index: int | None = None) -> CardProfile:
        """The current state of a lab card (default: the one in the modem)."""
        return load_profile(self.card_paths[self.current_card if index is None else index])

    def swap_card(self) -> CardProfile:
        """Take the card out of the modem and put the next lab card in; returns the new card's profile."""
        assert self.modem is not None, "start() the world first"
        self.modem.remove_sim()
        self.current_card = (self.current_card + 1) % len(self.card_paths)
        self.modem.insert_sim(SoftUicc.from_file(self.card_paths[self.current_card]))
        return self.profile()

    def write_session_key(self) -> Path:
        """A new session-sealing key as systemd hands it to the unit (``LoadCredentialEncrypted=``):
        a 0400 file in a directory of its own; returns the directory, for ``$CREDENTIALS_DIRECTORY``."""
        directory = self.workdir / "credentials"
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / SESSION_KEY_CREDENTIAL
        path.unlink(missing_ok=True)
        _write_secret(path, os.urandom(KEY_LENGTH))
        path.chmod(0o400)
        return directory

    def write_daemon_config(
        self,
        aes: Sequence[AeCredential],
        *,
        control_port: int,
        gba_mode: str = "auto",
        refresh_margin: float = 300.0,
        min_forced_interval: float = 1.0,
        log_level: str = "info",
        reader: str | None = None,
        sim_pin: str | None = None,
        start_jitter: float = 0.0,
        state_directory: Path | None = None,
        persist_session: bool = False,
    ) -> Path:
        """A daemon configuration for this world (PSK files 0600 beside it); returns its path.

        The card is the modem's, or with ``reader`` the one in the PC/SC reader of that name (a
        virtual card in pcscd's vpcd reader: :mod:`mn_secd.sim.vicc`, :mod:`mn_secd.sim.pcscd`).
        ``sim_pin``: a ``[modem] pin_file`` holding it (0600 beside the configuration).
        The lab bootstraps at once (``start_jitter``) and keeps no session across restarts unless
        given a ``state_directory``.
        """
        conf_dir = self.workdir / "etc"
        conf_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        card = (
            ['transport = "pcsc"', f'reader = "{reader}"']
            if reader
            else [f'port = "{self.modem_link}"', 'transport = "auto"']
        )
        lines = [
            "# Generated by the simulated world for one run of the daemon.",
            "[modem]",
            *card,
            "command_timeout = 5.0",
        ]
        if sim_pin is not None:
            _write_secret(conf_dir / "sim.pin", sim_pin.encode() + b"\n")
            lines.append('pin_file = "sim.pin"')
        lines += [
            "",
            "[gba]",
            f'mode = "{gba_mode}"',
            f'bsf_url = "{self.bsf_url}"',
            f"refresh_margin = {float(refresh_margin)}",
            "refresh_jitter = 0.0",
            f"min_forced_interval = {float(min_forced_interval)}",
            "http_timeout = 5.0",
            f"start_jitter = {float(start_jitter)}",
            f"persist_session = {'true' if persist_session else 'false'}",
            *([f'state_directory = "{state_directory}"'] if state_directory is not None else []),
            "",
            "[control]",
            'addresses = ["127.0.0.1"]',
            f"port = {control_port}",
            "",
            "[log]",
            f'level = "{log_level}"',
        ]
        for ae in aes:
            psk_path = conf_dir / f"{ae.identity}.psk"
            _write_secret(psk_path, ae.psk)
            lines += [
                "",
                "[[ae]]",
                f'identity = "{ae.identity}"',
                f'psk_file = "{psk_path.name}"',
                "naf = [" + ", ".join(f'"{n}"' for n in ae.naf) + "]",
                "ua = [" + ", ".join(f'"{u}"' for u in ae.ua) + "]",
                f"may_force_bootstrap = {'true' if ae.may_force_bootstrap else 'false'}",
            ]
        path = conf_dir / "mn-secd.toml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return path


def _write_secret(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)

"""The software UICC as a card in a real PC/SC stack: a virtual ICC for vsmartcard's vpcd driver.

pcscd loads the ``vpcd`` reader driver (Debian ``vsmartcard-vpcd``); its reader's card is a program
on a TCP socket, and that program is this module. The wire protocol (vsmartcard's ``vpcd.c``) is
one frame per message, a two-octet big-endian length and that many octets:

* one octet from vpcd is a control message: ``00`` power off, ``01`` power on, ``02`` reset,
  ``04`` "send your ATR" (answered with a frame holding the ATR);
* anything longer from vpcd is a command APDU, answered with a frame holding data + SW1 SW2.

vpcd asks for the ATR every time pcscd polls the slot (about every 400 ms): an answer means "card
present". A card is pulled by closing the connection, and put back by connecting again. In
vpcd's usual configuration (``DEVICENAME /dev/null:PORT``) vpcd listens and the card connects, so
this module is the client; vpcd 0.8 (Debian 12) crashes pcscd in its "reversed" mode, where the
card would listen, so that mode is not offered.

:class:`VpcdFraming` and :class:`VirtualCard` are sans-IO (bytes in, bytes out, the clock passed
in); :class:`ViccClient` is the asyncio adapter. ``mn-secd sim vicc --card PROFILE`` runs it from a
shell: SIGUSR1 pulls the card and puts it back, as it does for the modem emulator's SIM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import IO, Protocol

logger = logging.getLogger(__name__)

#: vpcd's default port (``0x8C7B``, vsmartcard's ``VPCDPORT``); the second slot is the next port.
VPCD_DEFAULT_PORT = 35963
MAX_FRAME = 0xFFFF
INS_AUTHENTICATE = 0x88


def _uicc_atr() -> bytes:
    """An ATR as a commercial T=0 UICC sends it, built per ETSI TS 102 221 §6.3 and ISO/IEC 7816-3/-4.

    ``3B`` direct convention; ``T0 = 97``: TA1 and TD1 follow, 7 historical bytes; ``TA1 = 96``:
    F = 512, D = 32 (the speed-enhanced rates TS 102 221 asks UICCs to offer); ``TD1 = 80``: T=0,
    TD2 follows; ``TD2 = 1F``: T=15 global bytes, TA3 follows; ``TA3 = C7``: clock stop no
    preference, voltage classes A, B and C (TS 102 221 §6.3.3). Historical bytes (ISO/IEC 7816-4
    §8.1.1): ``80`` compact-TLV; ``31 A0`` card service data: selection by full DF name, EF_DIR
    present; ``73 BE 21 13`` card capabilities: DF selection by full and partial name, path and
    FID, one-octet data units, the card assigns logical channels, four channels (0..3, as the
    software UICC has). Then TCK, required because T=15 is indicated: the XOR of T0..last = 0.
    """
    body = bytes.fromhex("97 96 80 1F C7 80 31 A0 73 BE 21 13")
    tck = 0
    for octet in body:
        tck ^= octet
    return b"\x3b" + body + bytes([tck])


UICC_ATR = _uicc_atr()


class VpcdProtocolError(ValueError):
    """vpcd sent something that is not a frame of its protocol (the connection is dropped)."""


class Control(IntEnum):
    """vpcd's one-octet control messages."""

    POWER_OFF = 0
    POWER_ON = 1
    RESET = 2
    GET_ATR = 4


@dataclass(frozen=True, slots=True)
class CommandApdu:
    """A command APDU from vpcd (the raw bytes, as pcscd passed them)."""

    apdu: bytes


Message = Control | CommandApdu


def frame(payload: bytes) -> bytes:
    """One frame: the two-octet big-endian length, then ``payload``."""
    if len(payload) > MAX_FRAME:
        raise ValueError(f"a vpcd frame holds at most {MAX_FRAME} octets, not {len(payload)}")
    return len(payload).to_bytes(2, "big") + payload


class VpcdFraming:
    """Turns the byte stream from vpcd into messages. Bounded: a frame is at most 65535 octets."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """Bytes as they arrive in, whole messages out (a partial frame waits for the rest)."""
        self._buffer += data
        messages: list[Message] = []
        while len(self._buffer) >= 2:
            length = int.from_bytes(self._buffer[:2], "big")
            if len(self._buffer) < 2 + length:
                break
            payload = bytes(self._buffer[2 : 2 + length])
            del self._buffer[: 2 + length]
            messages.append(_message(payload))
        return messages


def _message(payload: bytes) -> Message:
    if not payload:
        raise VpcdProtocolError("empty frame")
    if len(payload) == 1:
        try:
            return Control(payload[0])
        except ValueError:
            raise VpcdProtocolError(f"unknown control message {payload[0]:02X}") from None
    return CommandApdu(payload)


class SimCard(Protocol):
    """What the virtual card needs from a card (:class:`mn_secd.sim.usim.SoftUicc` is one)."""

    def process_apdu(self, apdu: bytes) -> bytes: ...

    def reset(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ApduRecord:
    """One command on the wire: its header, data length and the status word of the answer.

    Data is never kept: commands carry RAND/AUTN and answers RES, CK, IK or Ks_ext_NAF. ``sw`` is
    None when no answer left the card (it was pulled while working on the command).
    """

    at: float
    header: bytes  # CLA INS P1 P2
    length: int  # octets after the header
    sw: int | None

    @property
    def ins(self) -> int:
        return self.header[1]

    def line(self) -> str:
        sw = f"{self.sw:04X}" if self.sw is not None else "----"
        return f"{self.at:.6f} {self.header.hex(' ').upper()} +{self.length} SW {sw}"


class VirtualCard:
    """The card's side of the protocol: power, ATR, and APDUs handed to the card. Sans-IO.

    ``pull_on_ins`` arms a fault: the next command with that INS is processed by the card (it may
    spend a sequence number) and then the card is pulled before the answer leaves, as a user
    yanking a card mid-AUTHENTICATE would do. :meth:`handle` then returns :data:`PULLED`.
    ``mute_on_ins`` is the same with the card left in: it never answers (a card gone mute).
    """

    def __init__(self, card: SimCard, *, atr: bytes = UICC_ATR, clock: Callable[[], float] = time.monotonic) -> None:
        self._card = card
        self.atr = atr
        self._clock = clock
        self._powered = False
        self._lock = threading.Lock()  # the log is read from other threads (tests, the CLI's writer)
        self._log: list[ApduRecord] = []
        self.pull_on_ins: int | None = None
        self.mute_on_ins: int | None = None
        self.on_record: Callable[[ApduRecord], None] | None = None

    @property
    def powered(self) -> bool:
        return self._powered

    def handle(self, message: Message) -> bytes | _Pulled | None:
        """The answer payload for ``message``, None when it needs none, or :data:`PULLED` / :data:`MUTE`."""
        if isinstance(message, Control):
            if message is Control.GET_ATR:
                return self.atr
            if message is Control.POWER_OFF:
                self._powered = False
            else:  # power on, or a warm reset: the card starts afresh (closes its logical channels)
                self._powered = True
            self._card.reset()
            return None
        return self._command(message.apdu)

    def _command(self, apdu: bytes) -> bytes | _Pulled:
        header = apdu[:4]
        ins = apdu[1] if len(apdu) >= 2 else None
        pull, mute = ins is not None and ins == self.pull_on_ins, ins is not None and ins == self.mute_on_ins
        answer = self._card.process_apdu(apdu)  # vpcd only sends APDUs to a powered card
        if pull or mute:
            self.pull_on_ins = None if pull else self.pull_on_ins
            self.mute_on_ins = None if mute else self.mute_on_ins
            self._record(ApduRecord(self._clock(), header, len(apdu) - len(header), None))
            return PULLED if pull else MUTE
        self._record(ApduRecord(self._clock(), header, len(apdu) - len(header), int.from_bytes(answer[-2:], "big")))
        return answer

    def _record(self, record: ApduRecord) -> None:
        with self._lock:
            self._log.append(record)
        if self.on_record is not None:
            self.on_record(record)

    @property
    def log(self) -> list[ApduRecord]:
        with self._lock:
            return list(self._log)

    def count(self, ins: int) -> int:
        """Commands with this INS seen on the wire (answered or not)."""
        with self._lock:
            return sum(1 for record in self._log if record.ins == ins)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()


class _Pulled:
    """No answer to a command: the card was pulled (the connection closes) or went mute."""


PULLED = _Pulled()
#: The card worked on a command and never answers it (it stays in the reader).
MUTE = _Pulled()


class VpcdUnreachable(ConnectionError):
    """Nothing accepts the virtual card: no pcscd with the vpcd driver listens on that address."""

    def __init__(self, host: str, port: int, waited: float, cause: str) -> None:
        self.host = host
        self.port = port
        super().__init__(
            f"no vpcd at {host}:{port} after {waited:.1f} s ({cause}); is pcscd running with the vpcd "
            "reader driver (Debian package vsmartcard-vpcd) on that port?"
        )


class ViccClient:
    """The virtual card connected to vpcd, kept connected while the card is "inserted".

    The connection drops when vpcd or pcscd goes away; the card then connects again with a
    back-off (at most ``reconnect_max`` seconds between tries), as a card left in a reader whose
    service restarts would be seen again.
    """

    def __init__(
        self,
        card: VirtualCard,
        host: str = "127.0.0.1",
        port: int = VPCD_DEFAULT_PORT,
        *,
        reconnect_max: float = 1.0,
    ) -> None:
        self.card = card
        self.host = host
        self.port = port
        self._reconnect_max = reconnect_max
        self._inserted = True
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self.connections = 0  # how many times vpcd took the card (tests wait on it)

    @property
    def inserted(self) -> bool:
        return self._inserted

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self, *, wait: float = 5.0) -> None:
        """Connect to vpcd, trying for up to ``wait`` seconds; :class:`VpcdUnreachable` if it never answers."""
        deadline = asyncio.get_running_loop().time() + wait
        delay = 0.05
        while True:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout=2.0)
                break
            except (OSError, TimeoutError) as exc:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    raise VpcdUnreachable(self.host, self.port, wait, str(exc) or type(exc).__name__) from exc
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.5)
        self._task = asyncio.get_running_loop().create_task(self._run(reader, writer))

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._drop()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def remove(self) -> None:
        """Pull the card: the connection closes and stays closed until :meth:`insert`."""
        self._inserted = False
        self._drop()
        logger.info("card pulled from the virtual reader", extra={"event": "sim.vicc.removed"})

    def insert(self, card: VirtualCard | None = None) -> None:
        """Put the card back, or ``card`` in its place: it powers up afresh when vpcd takes it."""
        if card is not None:
            self.card = card
        self._inserted = True
        self._wake.set()
        logger.info("card put back into the virtual reader", extra={"event": "sim.vicc.inserted"})

    async def wait_connected(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    def _drop(self) -> None:
        writer, self._writer = self._writer, None
        self._connected.clear()
        if writer is not None:
            writer.close()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        delay = 0.05
        while True:
            if self._inserted:
                await self._serve(reader, writer)
                delay = 0.05
            while True:  # wait for the card to be put back, then for vpcd to take it
                if not self._inserted:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout=2.0)
                    break
                except (OSError, TimeoutError):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._reconnect_max)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._connected.set()
        self.connections += 1
        framing = VpcdFraming()
        try:
            while self._writer is writer:
                data = await reader.read(4096)
                _quick_ack(writer)
                if not data:
                    logger.info("vpcd closed the connection", extra={"event": "sim.vicc.vpcd_closed"})
                    return
                for message in framing.feed(data):
                    answer = self.card.handle(message)
                    if answer is PULLED:
                        logger.info("card pulled during a command", extra={"event": "sim.vicc.pulled"})
                        self._inserted = False
                        return
                    if isinstance(answer, bytes):
                        writer.write(frame(answer))
                await writer.drain()
        except VpcdProtocolError as exc:
            logger.warning("dropping vpcd: %s", exc, extra={"event": "sim.vicc.protocol_error"})
        except (ConnectionError, OSError) as exc:
            logger.info("connection to vpcd lost: %s", exc, extra={"event": "sim.vicc.vpcd_lost"})
        finally:
            if self._writer is writer:
                self._writer = None
                self._connected.clear()
            writer.close()


def _quick_ack(writer: asyncio.StreamWriter) -> None:
    """Acknowledge what vpcd sent at once, not after Linux's delayed-ACK timer.

    vpcd 0.8 (Debian 12) writes a frame's length and its APDU in two sends on a socket with
    Nagle's algorithm on (later vsmartcard releases send them as one buffer), so the APDU waits
    for the length's ACK, which a receiver in delayed-ACK mode holds back up to 40 ms: every APDU
    then cost ~40 ms (``tests/bench/bench_uicc.py`` measured 88 ms per AUTHENTICATE, 1 ms with
    this). TCP_QUICKACK is not sticky, so it is set after every read.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


# --- mn-secd sim vicc --------------------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.epilog = (
        "Connects to vpcd and serves until SIGINT/SIGTERM. SIGUSR1 pulls the card and puts it back. "
        "The card's SQN state is written back to PROFILE: copy lab profiles first."
    )
    parser.add_argument("--card", required=True, type=Path, metavar="PROFILE", help="card profile (TOML)")
    parser.add_argument(
        "--vpcd",
        type=_address,
        default=("127.0.0.1", VPCD_DEFAULT_PORT),
        metavar="HOST:PORT",
        help=f"where vpcd listens (default 127.0.0.1:{VPCD_DEFAULT_PORT}, the vsmartcard-vpcd default)",
    )
    parser.add_argument("--wait", type=float, default=5.0, metavar="SECONDS", help="how long to look for vpcd")
    parser.add_argument(
        "--apdu-log", type=Path, metavar="FILE", help="append one line per command APDU (header, length, SW; no data)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mn_secd.sim.usim import SoftUicc

    card = VirtualCard(SoftUicc.from_file(args.card))
    log_file = args.apdu_log.open("a", encoding="ascii") if args.apdu_log else None
    try:
        if log_file is not None:
            card.on_record = lambda record: _write_line(log_file, record.line())
        return asyncio.run(_serve_until_signalled(card, *args.vpcd, wait=args.wait))
    except VpcdUnreachable as exc:
        print(f"mn-secd sim vicc: {exc}", file=sys.stderr)
        return 2
    finally:
        if log_file is not None:
            log_file.close()


def _write_line(file: IO[str], line: str) -> None:
    file.write(line + "\n")
    file.flush()


async def _serve_until_signalled(card: VirtualCard, host: str, port: int, *, wait: float) -> int:
    client = ViccClient(card, host, port)
    await client.start(wait=wait)
    print(f"vicc connected to vpcd at {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def toggle() -> None:
        if client.inserted:
            client.remove()
        else:
            client.insert()
        print("card inserted" if client.inserted else "card removed", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, toggle)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await client.stop()
    return 0

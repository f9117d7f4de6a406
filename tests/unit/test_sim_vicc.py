"""The virtual ICC for vpcd: framing, the ATR, the card's side, and the client against a loopback vpcd."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from functools import reduce

import pytest

from mn_secd.sim.milenage import Milenage, generate_autn
from mn_secd.sim.profile import CardProfile
from mn_secd.sim.usim import MAX_CHANNEL, USIM_AID, SoftUicc
from mn_secd.sim.vicc import (
    PULLED,
    UICC_ATR,
    CommandApdu,
    Control,
    ViccClient,
    VirtualCard,
    VpcdFraming,
    VpcdProtocolError,
    VpcdUnreachable,
    frame,
)

K = bytes.fromhex("465b5ce8b199b49faa5f0a2ee238a6bc")
OPC = bytes.fromhex("cd63cb71954a9f4e48a5994e37a02baf")
CARD = CardProfile(iccid="89882110000000000018", imsi="001010000000001", mnc_length=2, k=K, opc=OPC)
RAND = bytes(range(16))


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- framing ---------------------------------------------------------------------------------------------


def test_frames_split_anywhere_and_joined_decode_the_same() -> None:
    stream = frame(b"\x01") + frame(h("00A40004023F00")) + frame(b"\x04") + frame(b"\x00") + frame(b"\x02")
    expected = [Control.POWER_ON, CommandApdu(h("00A40004023F00")), Control.GET_ATR, Control.POWER_OFF, Control.RESET]
    whole = VpcdFraming()
    assert whole.feed(stream) == expected
    bytewise = VpcdFraming()
    got = [m for i in range(len(stream)) for m in bytewise.feed(stream[i : i + 1])]
    assert got == expected
    assert VpcdFraming().feed(stream[:-1]) == expected[:-1]  # a partial frame waits


@pytest.mark.parametrize(("payload", "match"), [(b"", "empty"), (b"\x03", "unknown control"), (b"\x7f", "7F")])
def test_malformed_frames_are_protocol_errors(payload: bytes, match: str) -> None:
    with pytest.raises(VpcdProtocolError, match=match):
        VpcdFraming().feed(frame(payload))


def test_a_frame_holds_at_most_65535_octets() -> None:
    assert frame(bytes(0xFFFF))[:2] == b"\xff\xff"
    with pytest.raises(ValueError, match="65535"):
        frame(bytes(0x10000))


# --- the ATR -------------------------------------------------------------------------------------------------


def test_atr_is_a_t0_uicc_atr_with_a_valid_check_byte() -> None:
    ts, t0, ta1, td1, td2, ta3 = UICC_ATR[:6]
    historical = UICC_ATR[6:-1]
    assert ts == 0x3B  # direct convention
    assert t0 >> 4 == 0x9 and len(historical) == t0 & 0x0F  # TA1 and TD1 follow; K historical bytes
    assert (ta1 >> 4, ta1 & 0x0F) == (9, 6)  # Fi = 512, Di = 32
    assert td1 == 0x80 and td2 == 0x1F  # T=0, then T=15 with TA3
    assert ta3 & 0x3F == 0b000111  # voltage classes A, B, C
    assert reduce(lambda a, b: a ^ b, UICC_ATR[1:]) == 0  # TCK: T0..TCK XOR to zero
    assert historical[0] == 0x80 and historical[1:3] == h("31A0")
    assert historical[3] == 0x73 and (historical[6] & 0x07) + 1 == MAX_CHANNEL + 1  # four logical channels


# --- the card's side -----------------------------------------------------------------------------------------


def select_usim(card: VirtualCard) -> None:
    assert card.handle(CommandApdu(h("00A40404") + bytes([len(USIM_AID)]) + USIM_AID))[-2:-1] == b"\x61"  # type: ignore[index]


def authenticate(seq: int) -> bytes:
    autn = generate_autn(Milenage(K, OPC), RAND, (seq << 5).to_bytes(6, "big"), CARD.amf)
    return h("008800812210") + RAND + b"\x10" + autn


def test_power_and_reset_start_the_card_afresh_and_the_atr_is_asked_for() -> None:
    card = VirtualCard(SoftUicc(CARD))
    assert card.handle(Control.GET_ATR) == UICC_ATR
    assert card.handle(Control.POWER_ON) is None and card.powered
    assert card.handle(CommandApdu(h("0070000001"))) == h("019000")  # channel 1 opened
    assert card.handle(CommandApdu(h("81F2000C"))) == h("9000")
    assert card.handle(Control.RESET) is None
    assert card.handle(CommandApdu(h("81F2000C"))) == h("6881")  # a reset closed it
    assert card.handle(Control.POWER_OFF) is None and not card.powered


def test_the_log_keeps_headers_lengths_and_status_words_never_data() -> None:
    card = VirtualCard(SoftUicc(CARD), clock=lambda: 12.5)
    select_usim(card)
    answer = card.handle(CommandApdu(authenticate(1)))
    assert answer == h("6135")
    assert card.count(0x88) == 1 and card.count(0xA4) == 1
    record = card.log[-1]
    assert (record.at, record.header, record.length, record.sw) == (12.5, h("00880081"), 0x23, 0x6135)
    assert record.line() == "12.500000 00 88 00 81 +35 SW 6135"
    assert RAND.hex() not in repr(card.log)
    card.clear_log()
    assert card.log == []


def test_pull_on_ins_lets_the_card_work_then_sends_nothing() -> None:
    saved: list[CardProfile] = []
    card = VirtualCard(SoftUicc(CARD, on_state_change=saved.append))
    select_usim(card)
    card.pull_on_ins = 0x88
    assert card.handle(CommandApdu(authenticate(1))) is PULLED
    assert len(saved) == 1  # the SQN was spent before the card was pulled
    assert card.log[-1].sw is None and card.count(0x88) == 1
    assert card.pull_on_ins is None  # one shot


# --- the client against a loopback vpcd ---------------------------------------------------------------------


class FakeVpcd:
    """vpcd's side on loopback: asks for the ATR, powers the card, sends APDUs, can drop the card."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(lambda r, w: self.connections.put_nowait((r, w)), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.connections.get(), 5)

    @staticmethod
    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bytes:
        writer.write(frame(payload))
        await writer.drain()
        length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5), "big")
        return await reader.readexactly(length)


@pytest.fixture
async def vpcd() -> AsyncIterator[FakeVpcd]:
    fake = FakeVpcd()
    await fake.start()
    yield fake
    assert fake.server is not None
    fake.server.close()


async def test_client_answers_vpcd_and_is_pulled_and_put_back(vpcd: FakeVpcd) -> None:
    client = ViccClient(VirtualCard(SoftUicc(CARD)), "127.0.0.1", vpcd.port, reconnect_max=0.1)
    await client.start(wait=2)
    try:
        reader, writer = await vpcd.accept()
        assert await vpcd.ask(reader, writer, b"\x04") == UICC_ATR
        writer.write(frame(b"\x01"))  # power on: no answer expected
        assert await vpcd.ask(reader, writer, h("80F2000C")) == h("9000")
        client.remove()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # pulled: the connection closes
        assert not client.connected
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(vpcd.connections.get(), 0.3)  # and stays closed
        client.insert()
        reader, writer = await vpcd.accept()
        assert await vpcd.ask(reader, writer, b"\x04") == UICC_ATR
        assert client.connections == 2
    finally:
        await client.stop()


async def test_client_reconnects_when_vpcd_drops_it_and_drops_a_garbled_vpcd(vpcd: FakeVpcd) -> None:
    client = ViccClient(VirtualCard(SoftUicc(CARD)), "127.0.0.1", vpcd.port, reconnect_max=0.1)
    await client.start(wait=2)
    try:
        _, writer = await vpcd.accept()
        writer.close()  # pcscd restarted, say
        reader, writer = await vpcd.accept()
        writer.write(frame(b"\x03"))  # no such control message
        assert await asyncio.wait_for(reader.read(), 5) == b""
        reader, writer = await vpcd.accept()  # a card left in the reader is seen again
        assert await vpcd.ask(reader, writer, b"\x04") == UICC_ATR
    finally:
        await client.stop()


async def test_no_vpcd_is_a_typed_error_after_the_wait() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        client = ViccClient(VirtualCard(SoftUicc(CARD)), "127.0.0.1", port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(VpcdUnreachable, match=f"no vpcd at 127.0.0.1:{port}.*vsmartcard-vpcd"):
            await client.start(wait=0.3)
        assert 0.25 <= loop.time() - started < 3
    with contextlib.suppress(Exception):
        await client.stop()

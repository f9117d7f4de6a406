"""One bootstrap (gba.session) with what a BSF may hand back that the card cannot hold."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from keystore_fakes import FakeCard, FakeClock, FakeUb, identity

from mn_secd.aka import AuthContext
from mn_secd.card_identity import CardIdentity
from mn_secd.errors import BsfAnswerInvalid
from mn_secd.gba.session import MAX_GBA_U_BTID, BootstrapAttempt, bootstrap
from mn_secd.gba.ub import AkaCallback, UbResult
from mn_secd.naf_keys import GbaMode, GbaPolicy


class BtidUb(FakeUb):
    """A BSF whose B-TID has a given length (TS 33.220 sets no bound; EF_GBABP does)."""

    def __init__(self, length: int) -> None:
        super().__init__(FakeClock())
        self.length = length

    async def run(self, ident: CardIdentity, aka: AkaCallback, *, mode: GbaMode) -> UbResult:
        result = await super().run(ident, aka, mode=mode)
        realm = "@bsf.test"
        local = base64.b64encode(result.rand).decode().ljust(self.length - len(realm), "A")
        return replace(result, btid=local + realm)


@pytest.mark.parametrize("length", [MAX_GBA_U_BTID + 1, 1000])
async def test_a_gba_u_btid_longer_than_ef_gbabp_holds_is_the_bsfs_fault(length: int) -> None:
    card = FakeCard(identity(gba_u=True))
    attempt = BootstrapAttempt()
    with pytest.raises(BsfAnswerInvalid, match=f"B-TID of {length} octets does not fit the card's EF_GBABP"):
        await bootstrap(card, BtidUb(length), GbaPolicy.AUTO, attempt=attempt)
    assert card.gbabp == [] and card.authenticates == [AuthContext.GBA]
    assert attempt.card_ks_replaced  # the AUTHENTICATE did replace the card's Ks


async def test_a_gba_u_btid_of_255_octets_is_written_and_gba_me_takes_longer_ones() -> None:
    card = FakeCard(identity(gba_u=True))
    session = await bootstrap(card, BtidUb(MAX_GBA_U_BTID), GbaPolicy.AUTO)
    assert session.mode is GbaMode.GBA_U and [len(b) for b, _ in card.gbabp] == [MAX_GBA_U_BTID]
    session = await bootstrap(FakeCard(identity()), BtidUb(400), GbaPolicy.AUTO)
    assert session.mode is GbaMode.GBA_ME and len(session.btid) == 400  # nothing on the card to fit
    session.wipe()

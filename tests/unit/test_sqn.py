"""SQN freshness (TS 33.102 Annex C) on the card side and SQN generation on the home-network side."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mn_secd.sim.sqn import (
    HeSequence,
    RejectReason,
    SqnAccepted,
    SqnPolicy,
    SqnRejected,
    SqnState,
    check_sqn,
    join_sqn,
    split_sqn,
)

DEFAULT = SqnPolicy()


def sqn(seq: int, ind: int, ind_len: int = 5) -> bytes:
    return join_sqn(seq, ind, ind_len)


def accept(state: SqnState, value: bytes, policy: SqnPolicy = DEFAULT) -> SqnState:
    verdict = check_sqn(state, value, policy)
    assert isinstance(verdict, SqnAccepted), verdict
    return verdict.state


def reject(state: SqnState, value: bytes, policy: SqnPolicy = DEFAULT) -> SqnRejected:
    verdict = check_sqn(state, value, policy)
    assert isinstance(verdict, SqnRejected), verdict
    return verdict


def test_split_and_join() -> None:
    assert split_sqn(bytes.fromhex("000000000021"), 5) == (1, 1)
    assert join_sqn(1, 1, 5) == bytes.fromhex("000000000021")
    assert split_sqn(bytes.fromhex("ff9bb4d0b607"), 0) == (0xFF9BB4D0B607, 0)
    with pytest.raises(ValueError):
        join_sqn(1 << 43, 0, 5)
    with pytest.raises(ValueError):
        join_sqn(1, 32, 5)
    with pytest.raises(ValueError):
        split_sqn(b"\x00" * 5, 5)
    with pytest.raises(ValueError):
        split_sqn(b"\x00" * 6, 11)


def test_new_card_accepts_any_slot_and_records_it() -> None:
    state = SqnState.new()
    assert state.seq_ms == (0,) * 32 and state.sqn_ms == bytes(6)
    state = accept(state, sqn(1, 7))
    assert state.seq_ms[7] == 1 and sum(state.seq_ms) == 1
    assert state.sqn_ms == sqn(1, 7)


def test_replay_in_a_slot_is_rejected_with_sqn_ms() -> None:
    state = accept(accept(SqnState.new(), sqn(5, 3)), sqn(9, 4))
    verdict = reject(state, sqn(5, 3))
    assert verdict.reason is RejectReason.REPLAY
    assert verdict.sqn_ms == sqn(9, 4)  # the highest accepted anywhere, with its IND
    assert reject(state, sqn(4, 3)).reason is RejectReason.REPLAY


def test_out_of_order_across_slots_is_accepted() -> None:
    state = accept(SqnState.new(), sqn(10, 1))
    state = accept(state, sqn(8, 2))  # older SEQ, but fresh in its own slot
    assert state.seq_ms[1:3] == (10, 8)
    assert state.seq_max == 10


def test_delta_limits_jumps_ahead() -> None:
    policy = SqnPolicy(delta=100)
    state = accept(SqnState.new(), sqn(50, 0), policy)
    accept(state, sqn(150, 1), policy)  # exactly Δ ahead of SEQ_max
    verdict = reject(state, sqn(151, 1), policy)
    assert verdict.reason is RejectReason.TOO_FAR_AHEAD and verdict.sqn_ms == sqn(50, 0)


def test_age_limit_rejects_old_sequence_numbers() -> None:
    policy = SqnPolicy(age_limit=10)
    state = accept(SqnState.new(), sqn(100, 0), policy)
    accept(state, sqn(91, 1), policy)  # SEQ_max - SEQ = 9 < L
    assert reject(state, sqn(90, 1), policy).reason is RejectReason.TOO_OLD
    accept(state, sqn(90, 1))  # without an age limit the slot check alone decides


def test_state_validation() -> None:
    with pytest.raises(ValueError):
        SqnState(5, (0,) * 31)
    with pytest.raises(ValueError):
        SqnState(5, (0,) * 31 + (1 << 43,))
    with pytest.raises(ValueError):
        SqnPolicy(delta=0)
    with pytest.raises(ValueError):
        SqnPolicy(age_limit=0)
    assert SqnState.new(0).seq_ms == (0,)


def test_he_cycles_ind_and_increments_seq() -> None:
    he = HeSequence.starting_at(bytes(6))
    issued = []
    for _ in range(34):
        value, he = he.issue()
        issued.append(split_sqn(value, 5))
    assert issued[0] == (1, 0) and issued[31] == (32, 31) and issued[32] == (33, 0)
    fixed, he2 = he.issue(ind=0)
    assert split_sqn(fixed, 5) == (35, 0) and he2.next_ind == he.next_ind


def test_he_starts_after_the_profile_sqn() -> None:
    he = HeSequence.starting_at(sqn(41, 6))
    value, _ = he.issue()
    assert split_sqn(value, 5)[0] == 42


def test_he_and_card_agree_and_resync_recovers() -> None:
    card = SqnState.new()
    he = HeSequence.starting_at(bytes(6))
    for _ in range(40):
        value, he = he.issue()
        card = accept(card, value)
    # A restarted HE (back at the start) is refused; the AUTS's SQN_MS puts it back in step.
    stale = HeSequence.starting_at(bytes(6))
    value, _ = stale.issue()
    verdict = reject(card, value)
    resynced = stale.resynchronised(verdict.sqn_ms)
    value, _ = resynced.issue()
    accept(card, value)


def test_resync_moves_an_he_that_ran_too_far_ahead_back() -> None:
    policy = SqnPolicy(delta=1000)
    card = accept(SqnState.new(), sqn(1, 0), policy)
    he = HeSequence(5000)
    value, _ = he.issue()
    verdict = reject(card, value, policy)
    assert verdict.reason is RejectReason.TOO_FAR_AHEAD
    value, _ = he.resynchronised(verdict.sqn_ms).issue()
    accept(card, value, policy)


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 7)), max_size=60))
def test_an_accepted_sqn_is_never_accepted_again(attempts: list[tuple[int, int]]) -> None:
    state = SqnState.new(3)
    accepted: set[bytes] = set()
    for seq, ind in attempts:
        value = sqn(seq, ind, 3)
        verdict = check_sqn(state, value)
        if isinstance(verdict, SqnAccepted):
            assert value not in accepted
            accepted.add(value)
            state = verdict.state
        else:
            assert verdict.sqn_ms == state.sqn_ms
        assert split_sqn(state.sqn_ms, 3)[0] == max(state.seq_ms)

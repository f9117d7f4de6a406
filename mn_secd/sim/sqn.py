"""AKA sequence numbers (TS 33.102 Annex C): the USIM's freshness check and the home network's generator.

SQN (48 bits) = SEQ ‖ IND, IND being the low ``ind_len`` bits. The card keeps one SEQ per IND slot
(the SEQ_MS array), so challenges issued for different slots may arrive out of order, while a replay
within a slot, a jump too far ahead (Δ) or, optionally, a challenge too old (L) is refused with a
resynchronisation that reports SQN_MS, the highest SQN accepted anywhere in the array.

Both sides are pure: values in, new values out. The software UICC persists :class:`SqnState`; the
reference BSF keeps a :class:`HeSequence` per subscriber.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

SQN_BITS = 48
SQN_LEN = 6
MAX_IND_LEN = 10
#: Default Δ, in SEQ units: 2**28 SEQ steps = 2**33 SQN steps with IND of 5 bits (the sysmocom default).
DEFAULT_DELTA = 1 << 28


def _check_ind_len(ind_len: int) -> None:
    if not 0 <= ind_len <= MAX_IND_LEN:
        raise ValueError(f"ind_len must be between 0 and {MAX_IND_LEN}")


def seq_limit(ind_len: int) -> int:
    """One more than the largest SEQ that fits beside an IND of ``ind_len`` bits."""
    _check_ind_len(ind_len)
    return 1 << (SQN_BITS - ind_len)


def split_sqn(sqn: bytes, ind_len: int) -> tuple[int, int]:
    """(SEQ, IND) of a 6-octet SQN."""
    _check_ind_len(ind_len)
    if len(sqn) != SQN_LEN:
        raise ValueError("SQN is 6 octets")
    value = int.from_bytes(sqn, "big")
    return value >> ind_len, value & ((1 << ind_len) - 1)


def join_sqn(seq: int, ind: int, ind_len: int) -> bytes:
    """The 6-octet SQN for (SEQ, IND)."""
    if not 0 <= seq < seq_limit(ind_len):
        raise ValueError("SEQ out of range for this IND length")
    if not 0 <= ind < (1 << ind_len):
        raise ValueError("IND out of range for this IND length")
    return ((seq << ind_len) | ind).to_bytes(SQN_LEN, "big")


# --- USIM side --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SqnPolicy:
    """The card's limits: Δ (how far ahead of SEQ_max a SEQ may jump) and the optional age limit L."""

    delta: int = DEFAULT_DELTA
    age_limit: int | None = None

    def __post_init__(self) -> None:
        if self.delta < 1:
            raise ValueError("delta must be at least 1")
        if self.age_limit is not None and self.age_limit < 1:
            raise ValueError("age_limit must be at least 1")


@dataclass(frozen=True, slots=True)
class SqnState:
    """The card's SEQ_MS array: one highest accepted SEQ per IND slot (all zero on a new card)."""

    ind_len: int
    seq_ms: tuple[int, ...]

    def __post_init__(self) -> None:
        limit = seq_limit(self.ind_len)
        if len(self.seq_ms) != 1 << self.ind_len:
            raise ValueError(f"seq_ms must have 2**ind_len = {1 << self.ind_len} entries")
        if any(not 0 <= s < limit for s in self.seq_ms):
            raise ValueError("a seq_ms entry is out of range for this IND length")

    @classmethod
    def new(cls, ind_len: int = 5) -> SqnState:
        """A fresh card: every slot at zero, so any SEQ >= 1 within Δ is accepted."""
        _check_ind_len(ind_len)
        return cls(ind_len, (0,) * (1 << ind_len))

    @property
    def seq_max(self) -> int:
        """SEQ_MS: the highest SEQ accepted in any slot."""
        return max(self.seq_ms)

    @property
    def sqn_ms(self) -> bytes:
        """The highest previously accepted SQN (SEQ_max with the IND of its slot), as sent in AUTS."""
        top = self.seq_max
        return join_sqn(top, self.seq_ms.index(top), self.ind_len)


class RejectReason(StrEnum):
    """Why an SQN was not fresh; every reason leads to the same resynchronisation answer."""

    REPLAY = "replay"  # SEQ <= SEQ_MS(IND)
    TOO_FAR_AHEAD = "too-far-ahead"  # SEQ - SEQ_max > Δ
    TOO_OLD = "too-old"  # SEQ_max - SEQ >= L


@dataclass(frozen=True, slots=True)
class SqnAccepted:
    """The SQN was fresh; ``state`` has SEQ_MS(IND) raised to its SEQ and must be persisted."""

    state: SqnState


@dataclass(frozen=True, slots=True)
class SqnRejected:
    """The SQN was not fresh; the card answers with AUTS built from ``sqn_ms``."""

    reason: RejectReason
    sqn_ms: bytes


def check_sqn(state: SqnState, sqn: bytes, policy: SqnPolicy = SqnPolicy()) -> SqnAccepted | SqnRejected:
    """The USIM freshness check of TS 33.102 C.2: Δ and L first, then the slot's replay check."""
    seq, ind = split_sqn(sqn, state.ind_len)
    seq_max = state.seq_max
    if seq - seq_max > policy.delta:
        return SqnRejected(RejectReason.TOO_FAR_AHEAD, state.sqn_ms)
    if policy.age_limit is not None and seq_max - seq >= policy.age_limit:
        return SqnRejected(RejectReason.TOO_OLD, state.sqn_ms)
    if seq <= state.seq_ms[ind]:
        return SqnRejected(RejectReason.REPLAY, state.sqn_ms)
    updated = (*state.seq_ms[:ind], seq, *state.seq_ms[ind + 1 :])
    return SqnAccepted(SqnState(state.ind_len, updated))


# --- home network side ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeSequence:
    """SQN_HE of one subscriber: the last SEQ issued and the IND slot to use next.

    Each challenge takes a new SEQ (the last plus one), so every slot only ever sees growing SEQs.
    IND cycles through the slots by default, which exercises the card's array; a fixed IND may be
    asked for per call.
    """

    seq_he: int
    ind_len: int = 5
    next_ind: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.seq_he < seq_limit(self.ind_len):
            raise ValueError("SEQ_HE out of range for this IND length")
        if not 0 <= self.next_ind < (1 << self.ind_len):
            raise ValueError("next_ind out of range for this IND length")

    @classmethod
    def starting_at(cls, sqn: bytes, ind_len: int = 5) -> HeSequence:
        """Continue after a configured start SQN (a card profile's ``sqn``): the next SEQ is above it."""
        seq, _ = split_sqn(sqn, ind_len)
        return cls(seq, ind_len)

    def issue(self, ind: int | None = None) -> tuple[bytes, HeSequence]:
        """The SQN for the next challenge and the state after it.

        Raises ValueError when SEQ is exhausted (a card lifetime's worth of challenges).
        """
        slot = self.next_ind if ind is None else ind
        seq = self.seq_he + 1
        sqn = join_sqn(seq, slot, self.ind_len)
        following = (slot + 1) % (1 << self.ind_len) if ind is None else self.next_ind
        return sqn, HeSequence(seq, self.ind_len, following)

    def resynchronised(self, sqn_ms: bytes) -> HeSequence:
        """After a verified AUTS: continue from the card's SQN_MS (TS 33.102 6.3.5).

        This may move SQN_HE backwards, which is exactly what is needed when the HE had run more
        than Δ ahead of the card. Only call it with an AUTS whose MAC-S verified for a RAND this HE
        issued.
        """
        seq_ms, _ = split_sqn(sqn_ms, self.ind_len)
        return HeSequence(seq_ms, self.ind_len, self.next_ind)

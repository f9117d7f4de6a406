"""One GBA bootstrap: the card's identity, the mode the policy allows, one Ub run, a session.

This is the only place that decides between GBA_ME and GBA_U and that knows what each means for
key custody:

* GBA_ME runs AUTHENTICATE in the 3G context; Ks = CK ‖ IK lives in this process, in a
  :class:`SecretBytes` that is overwritten when the session is dropped.
* GBA_U runs AUTHENTICATE in the GBA context (``DD``); the card keeps Ks and the daemon never sees
  it. After the BSF's 200 the B-TID and lifetime are written to EF_GBABP, and every NAF key is asked
  of the card (``DE``), which returns Ks_ext_NAF.

A synchronisation failure is handled inside the Ub exchange (AUTS, a second challenge), so a
resync costs exactly two AUTHENTICATEs and three HTTP requests, and a bootstrap never sends the same
challenge to the card twice.

The card holds a single GBA Ks, and an AUTHENTICATE in the GBA context that the card accepts
replaces it at once, before the BSF has confirmed anything (TS 31.102 7.1.2.1, GBA security context
in bootstrapping mode). So whether a GBA_U card can still derive keys for the session in use after a
failed bootstrap is a fact about that bootstrap, which :class:`BootstrapAttempt` records for the
caller: a failure before any AUTHENTICATE (the BSF down, busy or refusing the first request) leaves
the card's Ks as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from mn_secd.aka import AkaResult, AkaSuccess, AuthContext
from mn_secd.card_identity import Application, CardIdentity
from mn_secd.errors import ApduParseError, AuthenticateRefused, BsfAnswerInvalid, GbaModeUnavailable
from mn_secd.gba.bsfxml import format_lifetime
from mn_secd.gba.kdf import ks_naf
from mn_secd.gba.ub import UbRunner
from mn_secd.interfaces import CardAccess
from mn_secd.logs import btid_hash
from mn_secd.naf_keys import GbaMode, GbaPolicy
from mn_secd.secret import SecretBytes

#: EF_GBABP holds the B-TID behind a one-octet length (TS 31.102 and TS 31.103, EF_GBABP): a GBA_U
#: B-TID longer than this cannot be written where the card's NAF derivation looks for it.
MAX_GBA_U_BTID = 255

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class BootstrapSession:
    """What one successful bootstrap leaves behind. Ks only for GBA_ME, never in a repr."""

    iccid: str
    impi: str
    btid: str
    rand: bytes
    expires: datetime  # timezone-aware UTC, as the BSF set it
    mode: GbaMode
    application_aid: bytes
    ks: SecretBytes | None = field(default=None, repr=False)
    #: False when the BSF's 200 OK carried no rspauth and the policy accepted that (require_rspauth off).
    rspauth_verified: bool = True

    def wipe(self) -> None:
        if self.ks is not None:
            self.ks.wipe()

    @property
    def btid_hash(self) -> str:
        """The B-TID as a short hash, for log lines that need to correlate sessions."""
        return btid_hash(self.btid)


@dataclass(slots=True)
class BootstrapAttempt:
    """What one bootstrap did to the card, known whether it succeeded or failed (see the module docstring)."""

    #: AUTHENTICATE commands in the bootstrap's context handed to the card (answered or not).
    authenticates: int = 0
    #: The card's GBA Ks is no longer the one it had before this bootstrap: an AUTHENTICATE in the
    #: GBA context succeeded, or was sent and its outcome is unknown. A synchronisation or MAC
    #: failure leaves Ks as it was, and so does the 3G context (GBA_ME).
    card_ks_replaced: bool = False


def choose_mode(identity: CardIdentity, policy: GbaPolicy) -> GbaMode:
    """GBA_U when the card offers the GBA context and the policy allows it (TS 33.220 5.2.1)."""
    if policy is GbaPolicy.GBA_ME_ONLY:
        return GbaMode.GBA_ME
    if identity.gba_u:
        return GbaMode.GBA_U
    if policy is GbaPolicy.GBA_U_ONLY:
        service = "IST service 2" if identity.application is Application.ISIM else "UST service 68"
        raise GbaModeUnavailable(f"policy is GBA_U only, but the card's {identity.application} lacks {service}")
    return GbaMode.GBA_ME


async def bootstrap(
    card: CardAccess, ub: UbRunner, policy: GbaPolicy, attempt: BootstrapAttempt | None = None
) -> BootstrapSession:
    """Run one complete bootstrap; raises a typed :class:`~mn_secd.errors.MnSecdError` on failure.

    Nothing is left behind on failure: CK and IK of a successful AKA run are only turned into a
    session once the BSF's answer has been checked and parsed. ``attempt``, if given, records what
    the bootstrap did to the card, for a caller that needs to know it after a failure too.
    """
    record = attempt if attempt is not None else BootstrapAttempt()
    identity = await card.identity()
    mode = choose_mode(identity, policy)
    context = AuthContext.GBA if mode is GbaMode.GBA_U else AuthContext.UMTS

    async def aka(rand: bytes, autn: bytes) -> AkaResult:
        record.authenticates += 1
        gba_context = context is AuthContext.GBA
        try:
            outcome = await card.authenticate(rand, autn, context)
        except AuthenticateRefused:
            raise  # the card said it would not run it: Ks untouched
        except BaseException:
            record.card_ks_replaced |= gba_context  # it may have run: assume it did
            raise
        record.card_ks_replaced |= gba_context and isinstance(outcome, AkaSuccess)
        return outcome

    result = await ub.run(identity, aka, mode=mode)
    ks: SecretBytes | None = None
    if mode is GbaMode.GBA_ME:
        if result.aka.ck is None or result.aka.ik is None:
            raise ApduParseError("3G-context AUTHENTICATE returned no CK/IK")
        ks = SecretBytes(result.aka.ck + result.aka.ik)
    else:
        if len(result.btid.encode()) > MAX_GBA_U_BTID:
            raise BsfAnswerInvalid(
                f"the BSF's B-TID of {len(result.btid.encode())} octets does not fit the card's EF_GBABP"
                f" (at most {MAX_GBA_U_BTID})"
            )
        await card.write_gba_bootstrap_params(result.btid, format_lifetime(result.lifetime))
    session = BootstrapSession(
        iccid=identity.iccid,
        impi=identity.impi,
        btid=result.btid,
        rand=result.rand,
        expires=result.lifetime,
        mode=mode,
        application_aid=identity.aid,
        ks=ks,
        rspauth_verified=result.rspauth_verified,
    )
    log.info(
        "bootstrapped",
        extra={
            "event": "gba.bootstrapped",
            "btid_hash": session.btid_hash,
            "mode": mode.value,
            "expires": session.expires.isoformat(),
            "aka_runs": result.aka_runs,
            "http_requests": result.http_requests,
        },
    )
    return session


async def derive_naf_key(card: CardAccess, session: BootstrapSession, naf_id: bytes) -> bytes:
    """Ks_NAF (GBA_ME, computed here) or Ks_ext_NAF (GBA_U, computed by the card with ``DE``)."""
    if session.mode is GbaMode.GBA_ME:
        if session.ks is None:
            raise ValueError("GBA_ME session without Ks")
        return ks_naf(session.ks.get(), session.rand, session.impi, naf_id)
    return await card.gba_naf_derivation(naf_id, session.impi)

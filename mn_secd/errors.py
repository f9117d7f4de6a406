"""The typed failure taxonomy shared by every layer of mn_secd.

Every error says *who was wrong* (``culprit``): a gateway operator reading a log line needs to know
whether to look at the modem, the card, the operator's BSF, a local AE, or our own configuration.
The key service maps these classes to CoAP codes in exactly one place
(:mod:`mn_secd.control.payloads`), so a new error class is a deliberate change there too.

Messages never carry key material: callers pass identifiers, status words and lengths, never keys.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum


class Culprit(StrEnum):
    """Who a failure points at."""

    LOCAL = "local"  # our own code or configuration
    MODEM = "modem"  # the AT port or the modem firmware
    READER = "reader"  # a PC/SC card reader, or the pcscd service in front of it
    CARD = "card"  # the UICC
    BSF = "bsf"  # the operator's bootstrapping server
    NAF = "naf"  # the network application function (IN-CSE)
    AE = "ae"  # a local application entity talking to the control socket


class MnSecdError(Exception):
    """Base of every error mn_secd raises on purpose."""

    culprit: Culprit = Culprit.LOCAL
    #: A stable machine-readable name, used in logs, status payloads and diagnostics.
    kind: str = "internal"


# --- configuration -------------------------------------------------------------------------------


class ConfigError(MnSecdError):
    """A configuration file is wrong; the message names the file and the key at fault."""

    kind = "config"

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        super().__init__(f"{file}: {key}: {problem}")


# --- timeouts --------------------------------------------------------------------------------------


class OperationTimeout(MnSecdError):
    """A peer (modem, card, BSF, NAF) did not answer in time."""

    kind = "timeout"


# --- modem and AT port -------------------------------------------------------------------------------


class ModemError(MnSecdError):
    """The modem or its AT port misbehaved."""

    culprit = Culprit.MODEM
    kind = "modem"


class AtParseError(ModemError):
    """Bytes from the AT port that are not a well-formed AT answer (the only error the codec raises)."""

    kind = "at-parse"


class AtCommandError(ModemError):
    """The modem answered a command with ``ERROR`` or ``+CME ERROR: <code>``."""

    kind = "at-error"

    def __init__(self, command: str, cme: int | None = None, text: str | None = None) -> None:
        self.command = command
        self.cme = cme
        self.text = text
        detail = "ERROR" if cme is None and text is None else f"+CME ERROR: {cme if cme is not None else text}"
        super().__init__(f"{command} -> {detail}")


class ModemTimeout(OperationTimeout, ModemError):
    """The modem gave no final result code within the command's timeout."""

    culprit = Culprit.MODEM
    kind = "modem-timeout"


class PortGoneError(ModemError):
    """The serial port vanished (unplugged modem, USB reset) or cannot be opened."""

    kind = "port-gone"


class AnswerLost(ModemError):
    """The modem lost a command's answer: ``+CME ERROR: 0`` or a final OK without the ``+CSIM:`` line.

    Reported on Quectel EG95 firmware; the card may well have run the command, so only a command
    that does the same when run twice is sent again (:func:`mn_secd.uicc.apdu.idempotent`).
    """

    kind = "answer-lost"


# --- UICC ---------------------------------------------------------------------------------------------


class UiccError(MnSecdError):
    """The card, or the path to it, failed an operation."""

    culprit = Culprit.CARD
    kind = "uicc"


class ApduParseError(UiccError):
    """A malformed APDU, status word or BER-TLV structure (the only error the TLV/APDU parsers raise)."""

    kind = "apdu-parse"


class UiccAbsent(UiccError):
    """No card in the modem, or it was removed."""

    kind = "uicc-absent"


class UiccBusy(UiccError):
    """The modem is still reading the SIM (``+CME ERROR: 14``, SIM busy), e.g. just after power-up."""

    culprit = Culprit.MODEM
    kind = "uicc-busy"


class UiccLocked(UiccError):
    """The SIM waits for a PIN (or a PUK) that the daemon will not (or may not) enter.

    ``state`` is the modem's ``+CPIN:`` answer (``SIM PIN``, ``SIM PUK``...), ``retries`` the
    attempts left where the modem or the card can say, ``remedy`` what the operator should do.
    Never holds the PIN itself.
    """

    kind = "uicc-locked"

    def __init__(self, state: str, detail: str = "", *, retries: int | None = None, remedy: str = "") -> None:
        self.state = state
        self.retries = retries
        self.remedy = remedy
        text = f"SIM locked ({state})"
        if detail:
            text += f": {detail}"
        if remedy:
            text += f"; {remedy}"
        super().__init__(text)


class PinRejected(UiccLocked):
    """The SIM refused the PIN from ``pin_file``; it is not entered again for this insertion."""

    kind = "uicc-pin-rejected"


class ApplicationNotFound(UiccError):
    """Neither an ISIM nor a USIM was found in EF_DIR (or the AID could not be selected)."""

    kind = "application-not-found"


class CardStatusError(UiccError):
    """The card answered with an unexpected status word."""

    kind = "card-status"

    def __init__(self, operation: str, sw: int) -> None:
        self.operation = operation
        self.sw = sw
        super().__init__(f"{operation}: status word {sw:04X}")


class GetResponseLoop(CardStatusError):
    """GET RESPONSE kept answering ``61xx`` past the cap (seen on modems answering ``6100`` forever)."""

    culprit = Culprit.MODEM
    kind = "get-response-loop"


def needs_person(exc: BaseException) -> bool:
    """Whether the card's answer stays what it is until someone acts on the gateway.

    A SIM locked by a PIN mn-secd has not got or the card refused (it is never entered twice), by
    its PUK (never entered at all) or by a modem or network lock, and a card with neither a USIM nor
    an ISIM: no retry, however long, changes these; a person must set ``pin_file``, unblock or
    swap the SIM. Start-up does not wait for them (READY=1 at once, degraded). Everything else on
    the way to the card (no modem yet, SIM busy, another program on the port, a modem that cannot
    pass APDUs yet) may mend by itself and is waited for.
    """
    return isinstance(exc, (UiccLocked, ApplicationNotFound))


class AuthenticateRefused(UiccError):
    """The modem or the card refused to run AUTHENTICATE at all (e.g. +CME ERROR: 3, SW 6985/9864)."""

    kind = "authenticate-refused"


class PathRefusedAuthenticate(AuthenticateRefused):
    """The modem would not pass AUTHENTICATE on this path (``ERROR``, ``+CME ERROR: 3/4``): the
    command never reached the card, and another way to the card (AT+CSIM instead of AT+CGLA) may
    carry the next one."""

    culprit = Culprit.MODEM


class AuthenticateOutcomeUnknown(OperationTimeout, UiccError):
    """AUTHENTICATE was sent but no answer came in time.

    The card may or may not have consumed the sequence number, so the command is never resent;
    the caller decides whether to start a fresh bootstrap with a fresh challenge.
    """

    culprit = Culprit.MODEM
    kind = "authenticate-timeout"


class TransportUnavailable(UiccError):
    """No APDU transport (AT+CSIM, AT+CGLA) works on this modem."""

    culprit = Culprit.MODEM
    kind = "transport-unavailable"


# --- PC/SC readers -----------------------------------------------------------------------------------


class ReaderError(UiccError):
    """A PC/SC reader, or the pcscd service in front of it, failed: it stands where the modem stands."""

    culprit = Culprit.READER
    kind = "reader"


class PcscUnavailable(ReaderError):
    """PC/SC cannot be used here: pyscard is not installed, or no pcscd answers on its socket."""

    culprit = Culprit.LOCAL
    kind = "pcsc-unavailable"


class ReaderNotFound(ReaderError):
    """No reader's name contains the configured text, or several do and none stands out."""

    kind = "reader-not-found"


class ReaderGone(ReaderError):
    """The reader vanished (unplugged, pcscd stopped) or cannot be used (held by another program)."""

    kind = "reader-gone"


class ApduOutcomeUnknown(UiccError):
    """A command reached the reader but no answer came back (card pulled, reader gone, timeout).

    The card may have acted on it, so the transport never sends it again. An AUTHENTICATE that ends
    this way is reported as :class:`AuthenticateOutcomeUnknown` (its sequence number may be spent,
    and the caller starts over with a fresh challenge).
    """

    kind = "apdu-outcome-unknown"


# --- GBA / Ub -----------------------------------------------------------------------------------------


class GbaError(MnSecdError):
    """Bootstrapping or key derivation failed."""

    kind = "gba"


class DigestParseError(GbaError):
    """A Digest header that cannot be read or used: the only error :mod:`mn_secd.gba.digest`'s parsers raise.

    Neutral on purpose: the parser serves both ends of Ub and cannot know who wrote the header, so
    it blames no one (``culprit`` is LOCAL, as for anything that escapes unconverted, which would be
    our bug). Each end turns it into the error of the side at fault where it reads a header: the Ub
    client into :class:`BsfDigestInvalid` (the BSF's header), the reference BSF into a 400 answer
    (the client's header).
    """

    kind = "digest-parse"


class NetworkAuthenticationFailure(GbaError):
    """The card found the AUTN's MAC wrong: the BSF is not who it claims (never answered with a RES)."""

    culprit = Culprit.BSF
    kind = "network-auth-failure"


class BsfUnreachable(GbaError):
    """The BSF could not be reached (connection refused, DNS, TLS, timeout)."""

    culprit = Culprit.BSF
    kind = "bsf-unreachable"


class BsfRejected(GbaError):
    """The BSF refused the bootstrap (unknown IMPI, wrong response, ...)."""

    culprit = Culprit.BSF
    kind = "bsf-rejected"

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"BSF answered {status}: {reason}")


class BsfServerError(BsfRejected):
    """The BSF answered with a 5xx status, or 429 Too Many Requests: it is failing or overloaded for
    now (its HSS away, a fleet bootstrapping at once), and a later bootstrap may well succeed, unlike
    after a 4xx refusal of this subscriber or request.

    ``retry_after``: the seconds its ``Retry-After`` header asked for (RFC 9110 10.2.3), counted from
    the answer's arrival; None without a usable one.
    """

    kind = "bsf-server-error"

    def __init__(self, status: int, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(status, reason)
        self.retry_after = retry_after


class BsfAskedToWait(BsfServerError):
    """The BSF's last answer asked us to wait (``Retry-After``), and that time has not come: no
    request goes to the BSF before ``until`` (UTC), whoever asks; ``remaining`` seconds are left."""

    kind = "bsf-asked-to-wait"

    def __init__(self, status: int, until: datetime, remaining: float) -> None:
        self.until = until
        self.remaining = remaining
        when = until.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        super().__init__(
            status,
            f"asked us to wait (Retry-After): no bootstrap before {when}, in {remaining:.0f} s",
            retry_after=remaining,
        )


class RetryAfterInvalid(GbaError):
    """A ``Retry-After`` header from the BSF that is neither delay-seconds nor an HTTP-date (RFC 9110
    10.2.3): it is ignored, the daemon's own back-off applies, and the log says so once."""

    culprit = Culprit.BSF
    kind = "bsf-retry-after-invalid"


class BsfAnswerInvalid(GbaError):
    """The BSF answered something we must not accept (bad rspauth, malformed XML, expired lifetime)."""

    culprit = Culprit.BSF
    kind = "bsf-answer-invalid"


class BsfDigestInvalid(DigestParseError, BsfAnswerInvalid):
    """The BSF sent a ``WWW-Authenticate`` or ``Authentication-Info`` header that cannot be read."""

    culprit = Culprit.BSF
    kind = "bsf-digest-invalid"


class InvalidNafId(GbaError):
    """A NAF FQDN that cannot be part of a NAF_Id."""

    culprit = Culprit.AE
    kind = "invalid-naf-id"


class UnsupportedUaProtocol(GbaError):
    """A Ua security protocol identifier that is malformed or not supported."""

    culprit = Culprit.AE
    kind = "unsupported-ua-protocol"


class GbaModeUnavailable(GbaError):
    """The configured GBA mode policy cannot be met by this card (e.g. GBA_U only, card without GBA)."""

    culprit = Culprit.LOCAL
    kind = "gba-mode-unavailable"


class BootstrapRateLimited(GbaError):
    """A forced re-bootstrap was asked for too soon after the previous one."""

    culprit = Culprit.AE
    kind = "bootstrap-rate-limited"

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"re-bootstrap refused: try again in {retry_after:.1f} s")


class StoredSessionInvalid(GbaError):
    """A session kept across restarts cannot be used: unreadable, malformed, or not what the card holds."""

    culprit = Culprit.LOCAL
    kind = "stored-session-invalid"


class SealingUnavailable(GbaError):
    """No session-sealing key to seal GBA_ME sessions with (no credential, or one that is not a key),
    or ``mn-secd setup-sealing`` could not make one (not root, systemd-creds missing or failing)."""

    culprit = Culprit.LOCAL
    kind = "sealing-unavailable"


# --- DTLS (the local aiocoap/tinydtls stack) ----------------------------------------------------------


class DtlsFixMismatch(MnSecdError):
    """The installed aiocoap/DTLSSocket is not the version :mod:`mn_secd.dtls` was written for."""

    kind = "dtls-fix-mismatch"


class BindError(MnSecdError, OSError):
    """A DTLS server address could not be bound (in use, not local, ...).

    Also an OSError (``errno``, ``strerror`` from the system), for callers that treat it as one.
    """

    kind = "bind"

    def __init__(self, address: str, port: int, errno: int | None, strerror: str) -> None:
        super().__init__(errno, strerror)
        self.address = address
        self.port = port

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"cannot listen on coaps://{host}:{self.port}: {self.strerror}"


# --- key service and NAF ------------------------------------------------------------------------------


class RequestError(MnSecdError):
    """A local AE sent a request the key service cannot parse (4.00)."""

    culprit = Culprit.AE
    kind = "bad-request"


class UnsupportedContentFormat(RequestError):
    """The request payload's Content-Format is neither CBOR nor JSON (4.15)."""

    kind = "unsupported-content-format"


class NotAcceptable(RequestError):
    """The request's Accept option asks for a format other than CBOR or JSON (4.06)."""

    kind = "not-acceptable"


class UnsupportedOption(RequestError):
    """A critical option this server does not process (RFC 7252 5.4.1: 4.02)."""

    kind = "bad-option"


class NotAuthorised(MnSecdError):
    """A local AE asked for something its ACL does not allow."""

    culprit = Culprit.AE
    kind = "not-authorised"


class KeyServiceError(MnSecdError):
    """A local AE (through :mod:`mn_secd.client`) did not get what it asked the key service for."""

    kind = "key-service"


class KeyServiceUnreachable(KeyServiceError):
    """Nothing answers on the key service's address (the daemon is not running, or another port)."""

    kind = "key-service-unreachable"


class KeyServiceRefused(KeyServiceError):
    """The key service refused the DTLS handshake: it does not know the AE's PSK identity."""

    culprit = Culprit.AE
    kind = "dtls-refused"


class KeyServiceTimeout(OperationTimeout, KeyServiceError):
    """No answer in time; with DTLS-PSK this most often means a wrong PSK (tinydtls drops it silently)."""

    culprit = Culprit.AE
    kind = "key-service-timeout"


class KeyServiceRejected(KeyServiceError):
    """The key service answered with an error code; ``kind`` and ``culprit`` are the server's."""

    def __init__(
        self, code: str, kind: str, message: str, *, culprit: Culprit, retry_after: float | None = None
    ) -> None:
        self.code = code
        self.kind = kind
        self.culprit = culprit
        self.retry_after = retry_after
        super().__init__(f"{code}: {message}" if message else code)


class NafError(MnSecdError):
    """The NAF side (Zn lookup, Ua handshake) failed."""

    culprit = Culprit.NAF
    kind = "naf"


class BtidUnknown(NafError):
    """The BSF does not know (or no longer knows) the B-TID: the UE must bootstrap again."""

    culprit = Culprit.BSF
    kind = "btid-unknown"


class ZnRejected(NafError):
    """The BSF refused a Zn key retrieval for another reason than an unknown B-TID (403, 5xx, ...)."""

    culprit = Culprit.BSF
    kind = "zn-rejected"

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"BSF answered Zn with {status}: {reason}")


class ZnAnswerInvalid(NafError):
    """The BSF's Zn answer is malformed (not JSON, key material of the wrong length, no expiry)."""

    culprit = Culprit.BSF
    kind = "zn-answer-invalid"


class NafHandshakeFailed(NafError):
    """The DTLS handshake with the NAF failed: it refused our B-TID or holds another key for it.

    Seen from the MN, this is the NAF's way of saying "bootstrap again" (TS 33.222): the B-TID is
    unknown or expired at the BSF, or the key was derived for another NAF_Id.
    """

    kind = "naf-handshake-failed"


class NafRejected(NafError):
    """The NAF (IN-CSE) answered a request with an error response code."""

    kind = "naf-rejected"

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"the NAF answered {code}" + (f": {detail}" if detail else ""))


class NafTimeout(OperationTimeout, NafError):
    """The NAF completed the DTLS handshake but did not answer a request in time."""

    culprit = Culprit.NAF
    kind = "naf-timeout"

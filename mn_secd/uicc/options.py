"""How the operator wants the card reached: which modem port or card reader, which APDU transport, which application.

One :class:`ModemConfig` travels from the configuration file (or a command line) to
:func:`mn_secd.uicc.card.open_card`, so the settings are named, checked and defaulted once.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class TransportChoice(enum.StrEnum):
    """How APDUs reach the card: through the modem's AT port, or through a PC/SC card reader."""

    AUTO = "auto"  # AT+CGLA on a channel of the modem's, else AT+CSIM (logical channel, then basic)
    CSIM = "csim"  # AT+CSIM only
    CGLA = "cgla"  # AT+CCHO/AT+CGLA only
    PCSC = "pcsc"  # a PC/SC reader (pcscd, through pyscard): no modem, no AT port


class ApplicationChoice(enum.StrEnum):
    """Which UICC application to use when the card has several."""

    AUTO = "auto"  # the ISIM when there is one, else the USIM
    ISIM = "isim"
    USIM = "usim"


@dataclass(frozen=True)
class ModemConfig:
    """The card behind a modem's AT port or in a PC/SC reader, and how patiently to talk to it.

    An AT transport needs ``port``; ``transport = "pcsc"`` needs ``reader`` (a part of the reader's
    name, matched ignoring case) and no port. ``transport`` and ``application`` may be given as
    their names (from a file or a command line); anything that is not a valid choice or a sensible
    number, or a port and a reader that do not fit the transport, raises ValueError before any I/O.
    """

    port: str | None = None
    baud: int = 115200
    transport: TransportChoice = TransportChoice.AUTO
    application: ApplicationChoice = ApplicationChoice.AUTO
    command_timeout: float = 5.0  # seconds per AT command
    presence_poll: float = 2.0  # seconds between looks for a card while there is none
    reopen_max: float = 5.0  # the longest back-off between looks for a vanished port, reader or pcscd
    reader: str | None = None  # PC/SC: a part of the reader's name (transport "pcsc" only)

    def __post_init__(self) -> None:
        # A StrEnum member is also its name: a name from a file or a command line becomes the member.
        try:
            object.__setattr__(self, "transport", TransportChoice(self.transport))
        except ValueError:
            raise ValueError(f"transport must be one of {', '.join(TransportChoice)}, not {self.transport!r}") from None
        try:
            object.__setattr__(self, "application", ApplicationChoice(self.application))
        except ValueError:
            choices = ", ".join(ApplicationChoice)
            raise ValueError(f"application must be one of {choices}, not {self.application!r}") from None
        if self.transport is TransportChoice.PCSC:
            if not self.reader or not self.reader.strip():
                raise ValueError('transport "pcsc" needs a reader (a part of the PC/SC reader\'s name)')
            if self.port is not None:
                raise ValueError('transport "pcsc" reaches the card through a reader, not a serial port')
        else:
            if not self.port:
                raise ValueError(f'transport "{self.transport}" needs the modem\'s AT port')
            if self.reader is not None:
                raise ValueError('a reader is only used with transport "pcsc"')
        if self.baud < 1:
            raise ValueError(f"baud must be positive, not {self.baud}")
        for name in ("command_timeout", "presence_poll", "reopen_max"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")

    @property
    def uses_reader(self) -> bool:
        """True when the card is in a PC/SC reader rather than behind a modem's AT port."""
        return self.transport is TransportChoice.PCSC

    @property
    def where(self) -> str:
        """Where the card is looked for, for status lines and messages."""
        if self.uses_reader:
            return f"the PC/SC reader {self.reader!r}"
        return f"the modem on {self.port}"

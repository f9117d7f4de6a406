"""How the operator wants the card reached: which modem port, which APDU transport, which application.

One :class:`ModemConfig` travels from the configuration file (or a command line) to
:func:`mn_secd.uicc.card.open_card`, so the settings are named, checked and defaulted once.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class TransportChoice(enum.StrEnum):
    """How APDUs reach the card through the modem's AT port."""

    AUTO = "auto"  # AT+CGLA on a channel of the modem's, else AT+CSIM (logical channel, then basic)
    CSIM = "csim"  # AT+CSIM only
    CGLA = "cgla"  # AT+CCHO/AT+CGLA only


class ApplicationChoice(enum.StrEnum):
    """Which UICC application to use when the card has several."""

    AUTO = "auto"  # the ISIM when there is one, else the USIM
    ISIM = "isim"
    USIM = "usim"


@dataclass(frozen=True)
class ModemConfig:
    """The card behind a modem's AT port, and how patiently to talk to it.

    ``transport`` and ``application`` may be given as their names (from a file or a command line);
    anything that is not a valid choice or a sensible number raises ValueError before any I/O.
    """

    port: str
    baud: int = 115200
    transport: TransportChoice = TransportChoice.AUTO
    application: ApplicationChoice = ApplicationChoice.AUTO
    command_timeout: float = 5.0  # seconds per AT command
    presence_poll: float = 2.0  # seconds between looks for a card while there is none
    reopen_max: float = 5.0  # the longest back-off between attempts to reopen a vanished port

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
        if self.baud < 1:
            raise ValueError(f"baud must be positive, not {self.baud}")
        for name in ("command_timeout", "presence_poll", "reopen_max"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")

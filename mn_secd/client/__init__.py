"""The AE side of mn_secd: ask the daemon's key service for GBA NAF keys over CoAP/DTLS-PSK.

>>> async with KeyServiceClient("ae-metering", psk) as keys:        # doctest: +SKIP
...     answer = await keys.get_key("in-cse.example.net")
...     answer.btid, answer.key, answer.expires, answer.gba_mode

Every failure is a typed :class:`~mn_secd.errors.MnSecdError`: ``KeyServiceTimeout`` (no DTLS
session in time: most likely a wrong PSK), ``KeyServiceRefused`` (unknown identity),
``KeyServiceUnreachable`` (no daemon), ``KeyServiceRejected`` (an error answer, with the server's
``kind``, ``culprit`` and ``retry_after``).
"""

from mn_secd.client.keys import (
    AeCredentials,
    KeyAnswer,
    KeyServiceClient,
    load_credentials,
    parse_server,
)
from mn_secd.errors import (
    KeyServiceError,
    KeyServiceRefused,
    KeyServiceRejected,
    KeyServiceTimeout,
    KeyServiceUnreachable,
)
from mn_secd.naf_keys import KeyServiceStatus

__all__ = [
    "AeCredentials",
    "KeyAnswer",
    "KeyServiceClient",
    "KeyServiceError",
    "KeyServiceRefused",
    "KeyServiceRejected",
    "KeyServiceStatus",
    "KeyServiceTimeout",
    "KeyServiceUnreachable",
    "load_credentials",
    "parse_server",
]

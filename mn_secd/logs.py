"""Logging: the journal with structured fields under systemd, a concise stderr format otherwise.

Modules log with ``logging.getLogger(__name__)`` and pass what an operator would want to filter on
as ``extra``: ``event`` (a stable dotted name such as ``bootstrap.done``), ``naf_fqdn``,
``btid_hash`` (see :func:`btid_hash`), ``uicc_sw``, ``culprit``, ``kind``... Under systemd each
becomes an upper-case journal field (``journalctl -u mn-secd EVENT=bootstrap.done``); on a terminal
they are appended to the line as ``[event=... naf_fqdn=...]``.

The journal is used only when ``$JOURNAL_STREAM`` names the very file stderr is (systemd sets it
for services whose output goes to the journal): the native journal protocol silently drops
messages when no journald listens, so anywhere else stderr is the safe choice.

**The redaction guard.** No code path logs keys on purpose: keys are ``repr=False`` and messages
carry identifiers only. As a safety net against a future mistake, every handler installed here
carries :class:`RedactionFilter`, which refuses any record whose arguments or extra fields contain
raw bytes of a key's length (16 octets or more: K, OPc, CK, IK, RES, Ks, Ks_NAF, PSKs). Such a
record is replaced by a warning naming where it came from, so the bug is visible without the secret.
It cannot recognise a key that was already turned into hex or base64 text; the rule that messages
carry identifiers only stays the real protection.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

#: The shortest raw byte string the redaction guard treats as possible key material.
MIN_KEY_OCTETS = 16

#: Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_FIELD_NAME = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")

#: Libraries that log every HTTP request at INFO (and every socket operation at DEBUG): only their
#: warnings are worth a gateway's journal; our own Ub client logs each exchange that matters.
QUIET_LOGGERS = ("httpx", "httpcore")

#: ``systemd.journal.send``'s shape: the message, then journal fields as keyword arguments.
JournalSender = Callable[..., None]


def btid_hash(btid: str) -> str:
    """A short, stable stand-in for a B-TID in logs: enough to correlate lines, not to replay it."""
    return hashlib.sha256(btid.encode("utf-8")).hexdigest()[:12]


def journal_is_stderr(environ: Mapping[str, str], stream: TextIO) -> bool:
    """True when ``$JOURNAL_STREAM`` ("<device>:<inode>") is the file behind ``stream``."""
    value = environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` a record was logged with (in the order given), private names excluded."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


def _is_raw_key_candidate(value: object) -> bool:
    return isinstance(value, bytes | bytearray | memoryview) and len(value) >= MIN_KEY_OCTETS


def _contains_raw_bytes(value: object, depth: int = 0) -> bool:
    if _is_raw_key_candidate(value):
        return True
    if depth >= 3:
        return False
    if isinstance(value, Mapping):
        return any(_contains_raw_bytes(v, depth + 1) for v in value.values())
    if isinstance(value, tuple | list | set | frozenset):
        return any(_contains_raw_bytes(v, depth + 1) for v in value)
    return False


class RedactionFilter(logging.Filter):
    """Refuses records that carry raw bytes of key length in their message, args or extra fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        extras = extra_fields(record)
        suspects = [name for name, value in extras.items() if _contains_raw_bytes(value)]
        if _contains_raw_bytes(record.msg) or _contains_raw_bytes(record.args):
            suspects.insert(0, "message")
        if not suspects:
            return True
        where = f"{record.name} ({record.pathname.rsplit('/', 1)[-1]}:{record.lineno})"
        record.msg = "log record withheld by the redaction guard: raw bytes in %s from %s"
        record.args = (", ".join(suspects), where)
        record.levelno = max(record.levelno, logging.WARNING)
        record.levelname = logging.getLevelName(record.levelno)
        for name in extras:
            delattr(record, name)
        record.event = "log.redacted"
        return True


class StderrFormatter(logging.Formatter):
    """``HH:MM:SS.mmm L logger: message [event=... key=value]`` - short enough for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname).1s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = extra_fields(record)
        if not extras:
            return text
        first, nl, rest = text.partition("\n")  # keep a traceback below the line it belongs to
        fields = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{first} [{fields}]{nl}{rest}"


class StructuredJournalHandler(logging.Handler):
    """Sends each record to the journal with our ``extra`` fields as upper-case journal fields.

    systemd-python's ``JournalHandler`` would also send every LogRecord attribute (and ``str(args)``
    as CODE_ARGS); here only the message, the standard location fields and our fields go out.
    """

    def __init__(self, sender: JournalSender | None = None, identifier: str = "mn-secd") -> None:
        super().__init__()
        if sender is None:
            import systemd.journal as journal

            sender = journal.send
        self._send = sender
        self._identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {
                "PRIORITY": str(_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self._identifier,
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,
                "CODE_FUNC": record.funcName,
            }
            for name, value in extra_fields(record).items():
                field = name.upper()
                if _FIELD_NAME.match(field) and field not in fields and field != "MESSAGE":
                    fields[field] = str(value)
            self._send(self.format(record), **fields)
        except Exception:
            self.handleError(record)


def _priority(levelno: int) -> int:
    """syslog priorities: 7 debug, 6 info, 4 warning, 3 error, 2 critical."""
    if levelno <= logging.DEBUG:
        return 7
    if levelno <= logging.INFO:
        return 6
    if levelno <= logging.WARNING:
        return 4
    if levelno <= logging.ERROR:
        return 3
    return 2


def setup_logging(
    level: str = "info",
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    journal_sender: JournalSender | None = None,
) -> logging.Handler:
    """Install one handler on the root logger (replacing earlier ones) and return it."""
    out = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    handler: logging.Handler
    if journal_is_stderr(env, out):
        handler = StructuredJournalHandler(journal_sender)
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(StderrFormatter())
    handler.addFilter(RedactionFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler


class LogLimiter:
    """At most one log line per key (an AE, a peer) per ``interval`` seconds, counting what it held back.

    A misbehaving peer can send thousands of bad datagrams or requests a second; one warning each
    would flood the journal and cost every other peer CPU. Callers ask :meth:`allow` before logging
    and mention the count it returns ("and 312 more since"). The number of keys remembered is
    bounded; the clock is passed in.
    """

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 1024) -> None:
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict[object, tuple[float, int]] = {}  # key -> (time of the last line, held back since)

    def allow(self, key: object) -> int | None:
        """The number of lines held back since the last one if a line may be written now, else None."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._last) >= self._max_keys:
            del self._last[next(iter(self._last))]
        self._last.pop(key, None)
        self._last[key] = (now, 0)
        return 0 if last is None else last[1]

"""Logging: journald detection, structured journal fields, the stderr format, the redaction guard."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from mn_secd.logs import (
    LogLimiter,
    RedactionFilter,
    StderrFormatter,
    StructuredJournalHandler,
    btid_hash,
    journal_is_stderr,
    setup_logging,
)


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(msg: str, *args: object, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("mn_secd.test", logging.INFO, "/x/mod.py", 7, msg, args or None, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_btid_hash_is_short_stable_and_not_the_btid() -> None:
    btid = "3AO0Zy5fW8j1Qk8sVvY7Tg==@bsf.mnc001.mcc001.pub.3gppnetwork.org"
    assert btid_hash(btid) == btid_hash(btid)
    assert len(btid_hash(btid)) == 12
    assert btid_hash(btid) != btid_hash(btid + "x")
    assert "3AO0" not in btid_hash(btid)


def test_journal_stream_must_match_the_stream_itself() -> None:
    with tempfile.TemporaryFile("w+") as f, tempfile.TemporaryFile("w+") as other:
        st = os.fstat(f.fileno())
        assert journal_is_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f)
        assert not journal_is_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, other)
        assert not journal_is_stderr({}, f)
        assert not journal_is_stderr({"JOURNAL_STREAM": "garbage"}, f)
        assert not journal_is_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, io.StringIO())


def test_setup_logging_picks_the_journal_only_when_stderr_is_the_journal() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    def sender(message: str, **fields: Any) -> None:
        sent.append((message, fields))

    with tempfile.TemporaryFile("w+") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        handler = setup_logging("debug", stream=f, environ=env, journal_sender=sender)
        assert isinstance(handler, StructuredJournalHandler)
        logging.getLogger("mn_secd.x").info(
            "bootstrapped until %s", "12:00", extra={"event": "bootstrap.done", "btid_hash": "abc", "uicc_sw": "9000"}
        )
        f.seek(0)
        assert f.read() == ""  # nothing on the stream itself
    message, fields = sent[-1]
    assert message == "bootstrapped until 12:00"
    assert fields["EVENT"] == "bootstrap.done"
    assert fields["BTID_HASH"] == "abc"
    assert fields["UICC_SW"] == "9000"
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "mn-secd"
    assert fields["LOGGER"] == "mn_secd.x"
    assert all(name == name.upper() for name in fields)  # journald drops lower-case field names
    assert "ARGS" not in fields and "CODE_ARGS" not in fields


def test_stderr_format_is_concise_and_shows_extras() -> None:
    out = io.StringIO()
    handler = setup_logging("info", stream=out, environ={})
    assert not isinstance(handler, StructuredJournalHandler)
    log = logging.getLogger("mn_secd.daemon")
    log.debug("not shown")
    log.warning("degraded: %s", "no card", extra={"event": "card.absent", "culprit": "card"})
    line = out.getvalue().strip()
    assert "\n" not in line
    assert line.endswith("W mn_secd.daemon: degraded: no card [event=card.absent culprit=card]")
    assert StderrFormatter().format(record("plain")).endswith("I mn_secd.test: plain")


@pytest.mark.parametrize(
    ("msg", "args", "extra"),
    [
        ("key %s", (b"\x01" * 32,), {}),
        ("psk %r", (bytearray(16),), {}),
        ("nested %s", ({"k": [b"\x02" * 16]},), {}),
        ("extra field", (), {"key": b"\x03" * 32}),
        (b"\x04" * 32, (), {}),
    ],
)
def test_redaction_guard_withholds_raw_key_bytes(msg: Any, args: tuple[object, ...], extra: dict[str, Any]) -> None:
    out = io.StringIO()
    setup_logging("info", stream=out, environ={})
    logging.getLogger("mn_secd.leaky").info(msg, *args, extra=extra)
    text = out.getvalue()
    assert "withheld by the redaction guard" in text
    assert "event=log.redacted" in text
    assert "mn_secd.leaky" in text
    for secret in (b"\x01" * 32, b"\x03" * 32, b"\x04" * 32):
        assert repr(secret)[2:20] not in text
        assert secret.hex() not in text
    assert " W " in text  # raised to a warning so it gets noticed


def test_redaction_guard_lets_ordinary_records_through() -> None:
    f = RedactionFilter()
    rec = record("sw %s len %d short %r", "9000", 32, b"\x90\x00", uicc_sw="6982")
    assert f.filter(rec)
    assert rec.getMessage() == "sw 9000 len 32 short b'\\x90\\x00'"
    assert rec.uicc_sw == "6982"


def test_redaction_guard_also_protects_the_journal() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    handler = StructuredJournalHandler(lambda m, **f: sent.append((m, f)))
    handler.addFilter(RedactionFilter())
    handler.handle(record("Ks=%s", b"\x05" * 32, event="bootstrap.done"))
    message, fields = sent[0]
    assert "withheld" in message
    assert fields["EVENT"] == "log.redacted"
    assert "\x05" not in message + "".join(map(str, fields.values()))


def test_http_library_chatter_is_kept_out() -> None:
    out = io.StringIO()
    setup_logging("debug", stream=out, environ={})
    logging.getLogger("httpx").info("HTTP Request: GET http://bsf/ 401")
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")
    logging.getLogger("httpx").warning("something odd")
    logging.getLogger("mn_secd.gba.ub").debug("Ub challenge")
    assert out.getvalue().count("\n") == 2
    assert "something odd" in out.getvalue() and "Ub challenge" in out.getvalue()


def test_log_limiter_lets_one_line_a_minute_through_per_key_and_counts_the_rest() -> None:
    now = [0.0]
    limiter = LogLimiter(60.0, clock=lambda: now[0], max_keys=2)
    assert limiter.allow("ae-a") == 0
    assert [limiter.allow("ae-a") for _ in range(5)] == [None] * 5
    assert limiter.allow("ae-b") == 0  # another key has its own allowance
    now[0] = 60.0
    assert limiter.allow("ae-a") == 5  # and the next line says how many were held back
    assert limiter.allow("ae-c") == 0  # a third key: the oldest is forgotten, the memory stays bounded
    assert limiter.allow("ae-b") == 0

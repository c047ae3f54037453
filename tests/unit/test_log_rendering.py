"""What a rendered log line may carry: an exception's type, message and frames, never
a frame's locals; and never a configured secret, in any form, in either format, for
our own events and for standard-library records (Granian, Litestar, httpx)."""

from __future__ import annotations

import base64
import logging
import sys
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import structlog

from service.config import LogFormat, Settings
from service.logging import (
    REDACTED,
    Redactor,
    configure_logging,
    granian_formatter,
    stdlib_formatter,
)

TOKEN = "tok-Abc123-never-in-a-log"
KEY = b"k" * 8 + b"\xfa\xfb\xfc" + b"q" * 21
KEY_TEXT = base64.b64encode(KEY).decode()
WEBHOOK_SECRET = "whsec_" + KEY_TEXT
CALLBACK_KEY_TEXT = base64.b64encode(b"callback-key-0123456789").decode()
CALLBACK_SECRET = "whsec_" + CALLBACK_KEY_TEXT
REDIS_PASSWORD = "redis-pass-4d9a"
SETTINGS = Settings(
    api_token=TOKEN,
    webhook_secret=WEBHOOK_SECRET,
    callback_secret=CALLBACK_SECRET,
    redis_url=f"redis://default:{REDIS_PASSWORD}@cache:6379/0",
)
#: Held only in a local variable of the failing frame.
LOCAL_HEADER = "Bearer local-header-value-7f3e"
LOCAL_BODY = "local-body-text-91c2"
FORMATS: list[LogFormat] = ["json", "console"]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers, root.level = handlers, level


def fail_with_locals() -> None:
    headers = {"Authorization": LOCAL_HEADER}
    body = LOCAL_BODY
    raise ConnectionError(f"request failed after sending {len(body)} bytes to {len(headers)}")


def exc_info() -> Any:
    try:
        fail_with_locals()
    except ConnectionError:
        return sys.exc_info()
    raise AssertionError("unreachable")


def structlog_line(capsys: pytest.CaptureFixture[str], **event: Any) -> str:
    capsys.readouterr()
    structlog.get_logger("service.test").warning("something_failed", **event)
    return capsys.readouterr().err


def stdlib_line(capsys: pytest.CaptureFixture[str], message: str, *args: Any, **kwargs: Any) -> str:
    capsys.readouterr()
    logging.getLogger("_granian").error(message, *args, **kwargs)
    return capsys.readouterr().err


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_exception_is_logged_without_locals(
    fmt: LogFormat, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(fmt)
    for line in (
        structlog_line(capsys, exc_info=exc_info()),
        stdlib_line(capsys, "worker error", exc_info=exc_info()),
    ):
        assert "ConnectionError" in line
        assert "request failed after sending 20 bytes to 1" in line
        assert "fail_with_locals" in line
        assert "test_log_rendering.py" in line
        assert "local-header-value" not in line
        assert LOCAL_BODY not in line


def test_a_json_exception_has_type_message_and_frames_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json")
    event = msgspec.json.decode(structlog_line(capsys, exc_info=exc_info()))
    (stack,) = event["exception"]
    assert stack["exc_type"] == "ConnectionError"
    assert stack["exc_value"] == "request failed after sending 20 bytes to 1"
    frame = stack["frames"][-1]
    assert set(frame) == {"filename", "lineno", "name"}
    assert frame["name"] == "fail_with_locals"
    assert frame["filename"].endswith("test_log_rendering.py")


@pytest.mark.parametrize("fmt", FORMATS)
def test_configured_secrets_are_redacted_in_every_form(
    fmt: LogFormat, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(fmt, redactor=Redactor.for_settings(SETTINGS))
    assert base64.urlsafe_b64encode(KEY) != KEY_TEXT.encode()  # a distinct spelling
    forms = [
        TOKEN,
        f"Bearer {TOKEN}",
        WEBHOOK_SECRET,
        KEY_TEXT,  # the base64 text after whsec_
        KEY_TEXT.rstrip("="),
        base64.urlsafe_b64encode(KEY).decode(),
        KEY.hex(),
        CALLBACK_SECRET,
        f"redis://default:{REDIS_PASSWORD}@cache:6379/0",
    ]
    for form in forms:
        for line in (
            structlog_line(capsys, detail=f"seen {form} here"),
            structlog_line(capsys, error=ValueError(f"bad value {form!r}")),
            stdlib_line(capsys, "connect to %s failed", form),
        ):
            assert REDACTED in line, line
            assert TOKEN not in line
            assert KEY_TEXT.rstrip("=") not in line
            assert KEY.hex() not in line
            assert REDIS_PASSWORD not in line
            assert CALLBACK_KEY_TEXT.rstrip("=") not in line
    # Unrelated text is left alone.
    assert REDACTED not in structlog_line(capsys, detail="tok%2FAbc and whsec_")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_secret_in_an_exception_message_is_redacted(
    fmt: LogFormat, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(fmt, redactor=Redactor.for_settings(SETTINGS))
    try:
        raise PermissionError(f"refused Authorization: Bearer {TOKEN}")
    except PermissionError:
        info = sys.exc_info()
    for line in (structlog_line(capsys, exc_info=info), stdlib_line(capsys, "x", exc_info=info)):
        assert "PermissionError" in line
        assert "refused Authorization: Bearer " + REDACTED in line
        assert TOKEN not in line


def test_secrets_with_characters_that_renderers_escape_are_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = 'tok"with\\quote-and-\u00e9-1234'
    redactor = Redactor.of(tokens=[token])
    for fmt in FORMATS:
        configure_logging(fmt, redactor=redactor)
        for value in (token, [token], {"k": token}):
            line = structlog_line(capsys, value=value)
            assert "with" not in line, line
            assert REDACTED in line


def test_granian_formatter_reads_the_secrets_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QUIESCE_LOG_FORMAT", "json")
    monkeypatch.setenv("QUIESCE_API_TOKEN", f"  {TOKEN}  ")
    monkeypatch.setenv("QUIESCE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    record = logging.LogRecord(
        "_granian", logging.INFO, __file__, 1, "header %s key %s", (TOKEN, KEY_TEXT), None
    )
    line = granian_formatter().format(record)
    event = msgspec.json.decode(line)
    assert event["event"] == f"header {REDACTED} key {REDACTED}"


def test_no_redactor_when_no_secret_is_configured() -> None:
    assert Redactor.for_settings(Settings()) is None
    assert Redactor.from_env({"QUIESCE_API_TOKEN": "  "}) is None
    assert Redactor.of(tokens=[None, ""]) is None


def test_the_stdlib_formatter_without_secrets_still_drops_locals() -> None:
    record = logging.LogRecord("litestar", logging.ERROR, __file__, 1, "boom", None, exc_info())
    for fmt in FORMATS:
        line = stdlib_formatter(fmt).format(record)
        assert "fail_with_locals" in line
        assert "local-header-value" not in line
        assert LOCAL_BODY not in line

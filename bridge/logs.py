"""Logging on stderr for people and machines: one readable line per record on a terminal, JSON otherwise.

Both formats carry the same fields: the time, the level, the message and the ``extra`` fields of each call.
A line logged while working for one account (in its tasks: :func:`for_account`) carries ``account`` too.

- JSON (``BRIDGE_LOG_FORMAT=json``): one object per line, ``time``, ``level``, ``logger``, ``message``, extras.
- text (``BRIDGE_LOG_FORMAT=text``): ``2026-11-30T06:16:56.123Z INFO  message  key=value ...``; a value with
  spaces or quotes is written as a JSON string, a mapping as ``key.sub=value`` pairs.

Without a setting, the format is text when stderr is a terminal and JSON when it is not (a file, a pipe, a
container log).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "for_account", "resolve_format"]

# The account the current task works for; tasks started from it inherit it (asyncio copies the context).
_account: ContextVar[str | None] = ContextVar("bridge_account", default=None)


def for_account(name: str) -> None:
    """Tag every line the current task (and the tasks it starts) logs from now on with ``account=name``."""
    _account.set(name)


# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is emitted as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
# A text value shown bare: no space, quote, '=' or control character, and not empty.
_BARE = re.compile(r"^[^\s\"'=\\]+$")


def _extras(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    account = _account.get()
    if account is not None and "account" not in record.__dict__:
        yield "account", account
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            yield key, value


def _time(record: logging.LogRecord) -> datetime:
    return datetime.fromtimestamp(record.created, UTC)


class JsonFormatter(logging.Formatter):
    """Formats a record as a single-line JSON object: ``time``, ``level``, ``logger``, ``message``, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _time(record).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Formats a record as one readable line: time (UTC), level, message, then ``key=value`` extras.

    A traceback, when the record carries one, follows on the next lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = _time(record).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [stamp, f"{record.levelname:<5}", " ".join(record.getMessage().split())]
        pairs = [f"{key}={_text_value(value)}" for name, extra in _extras(record) for key, value in _flat(name, extra)]
        line = " ".join(parts)
        if pairs:
            line += "  " + " ".join(pairs)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _flat(name: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _flat(f"{name}.{key}", inner)
    else:
        yield name, value


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        return value if _BARE.match(value) else json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, bool | int | float | list | dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return _text_value(str(value))


def resolve_format(log_format: str | None, stream: TextIO) -> str:
    """``log_format`` when set; otherwise ``text`` when ``stream`` is a terminal and ``json`` when it is not."""
    if log_format is not None:
        return log_format
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure_logging(level: str, log_format: str | None = None, stream: TextIO | None = None) -> str:
    """Send every log line of the process to ``stream`` (stderr) at ``level``; returns the format in use.

    ``log_format`` is ``json``, ``text``, or ``None`` to choose by whether ``stream`` is a terminal.
    """
    stream = sys.stderr if stream is None else stream
    chosen = resolve_format(log_format, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if chosen == "text" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter at INFO (connection details, per-request lines) is noise for operators.
    for name in ("aio_pika", "aiormq", "httpx", "httpcore", "uvicorn", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # aiormq logs every refused connect and broker-closed connection with a traceback; the publisher reports
    # the same events as one line each ("broker connection lost", "broker unavailable; retrying").
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
    return chosen

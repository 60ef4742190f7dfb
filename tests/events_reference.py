"""The event converter as it was before its split into small functions, kept verbatim as the oracle.

tests/test_events.py checks that :func:`bridge.events.convert` gives what this gave (type, message id, routing
key, body, properties, error text) for every record that this handled, so the refactoring changed nothing a
consumer can see. Records this did not handle (it raised, or wrote NaN into a body) are tested on their own.
Do not edit: fix bridge/events.py instead. One deliberate change of the contract since, made here too: the
account (issue 12), as the ``account`` extension attribute after ``datacontenttype`` and an ``account`` header
on events and invalid records.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aio_pika
from pamqp.commands import Basic

from bridge.events import (
    ACCOUNT_HEADER,
    APP_ID,
    DATA_CONTENT_TYPE,
    EVENT_CONTENT_TYPE,
    EVENT_TYPE,
    INVALID_CONTENT_TYPE,
    MAX_HEADER_CHARS,
    SPECVERSION,
    TASK_STATUS_CODES,
    UPSTREAM_TIME_PATTERN,
    VALIDATION_ERROR_HEADER,
    Event,
    InvalidRecord,
)
from bridge.records import RawRecord

__all__ = ["convert", "properties"]

_INVALID_ROUTING_PART: Final = "unknown"
_MAX_ROUTING_PART: Final = 127  # two parts and the dot fit AMQP's 255-byte short string
_MAX_SHOWN_CHARS: Final = 80  # a value quoted in an error message is cut here, so errors stay short
_UNSAFE_ROUTING = re.compile(r"[^a-z0-9_-]")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_UPSTREAM_TIME = re.compile(UPSTREAM_TIME_PATTERN)
_UPSTREAM_OFFSET: Final = timedelta(hours=8)
_EPOCH: Final = datetime(1970, 1, 1)
_STATUS_LIST: Final = ", ".join(TASK_STATUS_CODES)
_MISSING: Final[Any] = object()
# Fields the validator reads, and their lower-case spelling for the case-tolerant lookup.
_FIELDS: Final = (
    "TaskDetailNo",
    "TaskType",
    "TaskStatus",
    "TaskStatusCode",
    "TryCount",
    "CreateTime",
    "UpdateTime",
    "DomainName",
)
_LOWER_FIELDS: Final = {name.lower(): name for name in _FIELDS}
# Encoders built once: json.dumps with keyword arguments would build a new encoder per call.
_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_JSON_ASCII: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)
_JSON_LENIENT: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=True)


def routing_key(task_type: object, task_status: object) -> str:
    """The routing key ``{task_type}.{task_status}`` (e.g. ``chg_dns.execute_success``).

    ASCII letters are lower-cased; every other character outside ``[a-z0-9_-]`` (per code point, so ``é`` and
    ``.`` too) becomes ``_``; an empty or ``None`` part becomes ``unknown``; a non-string part is first turned
    into its ``str``; each part is cut to 127 characters so the key fits AMQP's 255-byte limit.
    """
    return f"{_routing_part(task_type)}.{_routing_part(task_status)}"


def _routing_part(value: object) -> str:
    text = value if isinstance(value, str) else "" if value is None else str(value)
    if not text:
        return _INVALID_ROUTING_PART
    # ASCII-only lower-casing: str.lower() would turn e.g. the Kelvin sign into "k", which no other
    # language's routing code would reproduce.
    text = text.lower() if text.isascii() else text.translate(_ASCII_LOWER)
    return _UNSAFE_ROUTING.sub("_", text[:_MAX_ROUTING_PART])


def _amqp_properties(fields: dict[str, Any]) -> Basic.Properties:
    # aio-pika's Message costs ~7 µs more per event than these properties, which are what it would send.
    values = dict(fields)
    values["message_type"] = values.pop("type", None)
    values["delivery_mode"] = int(values["delivery_mode"])
    values["priority"] = 0  # aio-pika's Message sends priority 0: keep the two paths byte-identical
    return Basic.Properties(**values)


def convert(record: RawRecord, *, source: str, account: str) -> Event | InvalidRecord:
    """Validate ``record`` and build its :class:`Event`, or an :class:`InvalidRecord` naming every problem.

    ``source`` is the CloudEvents ``source`` (``BRIDGE_EVENT_SOURCE``). Never raises for any JSON value.
    """
    raw = record.raw
    if not isinstance(raw, dict):
        return _invalid(record, [f"TaskDetail: {_show(raw)} is not a JSON object"], None, None, account)
    found = _lookup(raw)
    problems: list[str] = []
    detail_no = record.detail_no
    key, value = found["TaskDetailNo"]
    if type(value) is not str or not value:
        problems.append(_required_string(key, value))
    elif detail_no is None:
        problems.append(f"{key}: {_show(value)} is not usable as an id")
    elif not _fits_short_string(detail_no):
        problems.append(f"{key}: {_show(value)} is longer than 255 bytes (AMQP message_id)")
    key, task_type = found["TaskType"]
    if type(task_type) is not str or not task_type:
        problems.append(_required_string(key, task_type))
    status_key, task_status = found["TaskStatus"]
    expected_code = TASK_STATUS_CODES.get(task_status) if type(task_status) is str else None
    if expected_code is None:
        if type(task_status) is str and task_status:
            problems.append(f"{status_key}: {_show(task_status)} is not one of {_STATUS_LIST}")
        else:
            problems.append(_required_string(status_key, task_status))

    key, value = found["TaskStatusCode"]
    if value is not None and value is not _MISSING:
        if type(value) is not int or not 0 <= value <= 3:
            problems.append(f"{key}: {_show(value)} is not an integer 0-3")
        elif expected_code is not None and value != expected_code:
            problems.append(
                f"{key}: {value} does not agree with {status_key} {task_status!r} (expects {expected_code})"
            )
    key, value = found["TryCount"]
    if value is not None and value is not _MISSING and (type(value) is not int or value < 0):
        problems.append(f"{key}: {_show(value)} is not a non-negative integer")
    key, value = found["CreateTime"]
    if value is not None and value is not _MISSING:
        _parse_time(key, value, problems)
    key, value = found["UpdateTime"]
    updated = None if value is None or value is _MISSING else _parse_time(key, value, problems)
    key, domain_name = found["DomainName"]
    if domain_name is _MISSING or domain_name == "":
        domain_name = None
    elif domain_name is not None and type(domain_name) is not str:
        problems.append(f"{key}: {_show(domain_name)} is not a string")

    time_text: str | None = None
    utc: datetime | None = None
    if updated is not None:
        try:
            utc = updated - _UPSTREAM_OFFSET
        except OverflowError:
            problems.append(f"{found['UpdateTime'][0]}: {_show(found['UpdateTime'][1])} is before year 1 in UTC")
        else:
            time_text = utc.isoformat() + "Z"
    if problems:
        return _invalid(record, problems, task_type, task_status, account)
    assert detail_no is not None  # checked above; narrows the type for mypy

    envelope: dict[str, Any] = {"specversion": SPECVERSION, "id": detail_no, "source": source, "type": EVENT_TYPE}
    if domain_name is not None:
        envelope["subject"] = domain_name
    if time_text is not None:
        envelope["time"] = time_text
    envelope["datacontenttype"] = DATA_CONTENT_TYPE
    envelope["account"] = account
    envelope["data"] = raw
    try:
        body = _encode(envelope)
    except ValueError:
        problems.append("TaskDetail: contains NaN or Infinity, which JSON does not allow")
        return _invalid(record, problems, task_type, task_status, account)
    if utc is not None and utc >= _EPOCH:
        timestamp = utc.replace(tzinfo=UTC)
    else:
        timestamp = datetime.now(UTC).replace(microsecond=0)
    return Event(
        message_id=detail_no,
        routing_key=routing_key(task_type, task_status),
        body=body,
        task_type=task_type,
        task_status=task_status,
        domain_name=domain_name,
        account=account,
        timestamp=timestamp,
    )


def _lookup(raw: dict[Any, Any]) -> dict[str, tuple[str, Any]]:
    """Each validated field as (key as spelled in the record, value or ``_MISSING``)."""
    found: dict[str, tuple[str, Any]] = {}
    missing = False
    for name in _FIELDS:
        value = raw.get(name, _MISSING)
        found[name] = (name, value)
        missing = missing or value is _MISSING
    if missing:  # only then pay for a scan of every key
        for key, value in raw.items():
            if isinstance(key, str) and key.isascii():
                field = _LOWER_FIELDS.get(key.lower())
                if field is not None and found[field][1] is _MISSING:
                    found[field] = (key, value)
    return found


def _parse_time(key: str, value: Any, problems: list[str]) -> datetime | None:
    if type(value) is not str or _UPSTREAM_TIME.fullmatch(value) is None:
        problems.append(f"{key}: {_show(value)} does not match yyyy-MM-dd HH:mm:ss")
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        problems.append(f"{key}: {_show(value)} is not a real date-time")
        return None


def _required_string(key: str, value: Any) -> str:
    if value is _MISSING:
        return f"{key}: required, missing"
    return f"{key}: {_show(value)} is not a non-empty string"


def _invalid(record: RawRecord, problems: list[str], task_type: Any, task_status: Any, account: str) -> InvalidRecord:
    try:
        body = _encode(record.raw)
    except ValueError:  # NaN or Infinity: keep the record as the upstream's JSON dialect wrote it
        body = _JSON_LENIENT.encode(record.raw).encode("utf-8")
    detail_no = record.detail_no
    if detail_no is not None and _fits_short_string(detail_no):
        message_id = detail_no
    else:
        # Stable across re-polls, so the side queue sees one id per record.
        seed = body if detail_no is None else detail_no.encode("utf-8", "surrogatepass")
        message_id = "sha256:" + hashlib.sha256(seed).hexdigest()
    if task_type is _MISSING:
        task_type = None
    if task_status is _MISSING:
        task_status = None
    return InvalidRecord(
        message_id=message_id,
        error="; ".join(problems),
        body=body,
        routing_key=routing_key(task_type, task_status),
        account=account,
        timestamp=datetime.now(UTC).replace(microsecond=0),
    )


def _encode(value: Any) -> bytes:
    """Compact UTF-8 JSON; raises ValueError for NaN/Infinity."""
    text = _JSON.encode(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (legal in a JSON \\u escape, not in UTF-8): escape it again, the value is unchanged.
        return _JSON_ASCII.encode(value).encode("ascii")


def _fits_short_string(text: str) -> bool:
    if text.isascii():
        return len(text) <= 255
    try:
        return len(text.encode("utf-8")) <= 255
    except UnicodeEncodeError:
        return False


def _header_text(text: str) -> str:
    """``text`` as a safe AMQP header value: at most MAX_HEADER_CHARS, encodable as UTF-8."""
    if len(text) > MAX_HEADER_CHARS:
        text = text[: MAX_HEADER_CHARS - 1] + "…"
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _show(value: Any) -> str:
    """A JSON value for an error message: one line, short; strings quoted as Python does (``'x'``)."""
    if value is None:
        text = "null"
    elif value is True or value is False:
        text = "true" if value else "false"
    elif isinstance(value, str | int | float):
        text = repr(value)
    else:
        text = _JSON_LENIENT.encode(value)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 1] + "…"
    return text


def properties(item: Event | InvalidRecord) -> Basic.Properties:
    """The AMQP properties the old ``Event.properties()`` / ``InvalidRecord.properties()`` built."""
    if isinstance(item, Event):
        headers: dict[str, Any] = {"task_type": _header_text(item.task_type), "task_status": item.task_status}
        if item.domain_name is not None:
            headers["domain_name"] = _header_text(item.domain_name)
        headers[ACCOUNT_HEADER] = item.account
        fields: dict[str, Any] = {
            "headers": headers,
            "content_type": EVENT_CONTENT_TYPE,
            "delivery_mode": aio_pika.DeliveryMode.PERSISTENT,
            "message_id": item.message_id,
            "timestamp": item.timestamp,
            "type": EVENT_TYPE,
            "app_id": APP_ID,
        }
    else:
        fields = {
            "headers": {VALIDATION_ERROR_HEADER: _header_text(item.error), ACCOUNT_HEADER: item.account},
            "content_type": INVALID_CONTENT_TYPE,
            "delivery_mode": aio_pika.DeliveryMode.PERSISTENT,
            "message_id": item.message_id,
            "timestamp": item.timestamp,
            "app_id": APP_ID,
        }
    return _amqp_properties(fields)

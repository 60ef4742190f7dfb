"""The event contract: each TaskDetail becomes a CloudEvents event, or an invalid record for the side route.

An :class:`Event` goes to the topic exchange with the routing key ``{task_type}.{task_status}``; an
:class:`InvalidRecord` goes to ``<exchange>.invalid`` with the validation error in a header. Both carry the
TaskDetailNo as ``message_id``, the idempotency key: re-publishing a record gives the same id, body and properties.

Event body: CloudEvents 1.0, structured mode, JSON::

    {"specversion": "1.0", "id": <TaskDetailNo>, "source": <configured>, "type": EVENT_TYPE,
     "subject": <DomainName>, "time": <UpdateTime in UTC, RFC 3339>, "datacontenttype": "application/json",
     "data": <the TaskDetail exactly as received>}

``subject`` is left out when DomainName is missing, null or empty; ``time`` when UpdateTime is missing or null.
Upstream times carry no zone and are Beijing time (UTC+8, no daylight saving): ``"2018-03-26 15:22:18"`` becomes
``"2018-03-26T07:22:18Z"``. The AMQP ``timestamp`` property carries the same instant (UpdateTime in UTC, whole
seconds), so a re-published message is identical; when UpdateTime is missing or null, or before 1970 (AMQP
timestamps are unsigned), it carries the time of the conversion instead.

Validation rules (each problem is one line ``<field>: <value> <why>``, several are joined by ``"; "``):

* the record is a JSON object;
* ``TaskDetailNo``, ``TaskType``, ``TaskStatus`` are required non-empty strings;
* ``TaskStatus`` is one of WAITING_EXECUTE, EXECUTING, EXECUTE_SUCCESS, EXECUTE_FAILURE;
* ``TaskStatusCode``, when present, is an integer 0-3 that agrees with TaskStatus (0, 1, 2, 3 in that order);
* ``TryCount``, when present, is a non-negative integer;
* ``CreateTime``, ``UpdateTime``, when present, match ``yyyy-MM-dd HH:mm:ss`` and are real date-times;
* ``DomainName``, when present, is a string (it becomes the CloudEvents ``subject`` and a header);
* the TaskDetailNo fits an AMQP ``message_id`` (at most 255 bytes of UTF-8).

JSON ``null`` counts as "not present" for the optional fields; for a required field it is an error. Integers are
JSON integers: ``true``/``false``, ``2.0`` and ``"2"`` are not. Field names are looked up case-tolerantly (the
upstream doc spells ``Taskstatuscode`` once): the exact upstream spelling wins, otherwise the first key equal to
it ignoring ASCII case. Unknown task types and unknown extra fields are valid; ``data`` keeps every field.

Run ``python -m bridge.events --write-contract [DIR]`` to regenerate ``DIR/event.schema.json`` (default
``contract``) from :func:`event_json_schema`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aio_pika
from pamqp.commands import Basic

from bridge.upstream import RawRecord

__all__ = [
    "APP_ID",
    "DATA_CONTENT_TYPE",
    "EVENT_CONTENT_TYPE",
    "EVENT_HEADERS",
    "EVENT_TYPE",
    "INVALID_CONTENT_TYPE",
    "MAX_HEADER_CHARS",
    "RFC3339_UTC_PATTERN",
    "ROUTING_KEY_PATTERN",
    "SPECVERSION",
    "TASK_STATUS_CODES",
    "UPSTREAM_TIME_PATTERN",
    "VALIDATION_ERROR_HEADER",
    "Event",
    "InvalidRecord",
    "convert",
    "event_json_schema",
    "main",
    "routing_key",
    "schema_text",
]

EVENT_TYPE: Final = "com.alibabacloud.domain.task.finished.v1"
"""CloudEvents ``type`` and AMQP ``type`` of every event; the ``v1`` suffix changes only on a breaking change."""
APP_ID: Final = "task-bridge"
SPECVERSION: Final = "1.0"
EVENT_CONTENT_TYPE: Final = "application/cloudevents+json"
INVALID_CONTENT_TYPE: Final = "application/json"
DATA_CONTENT_TYPE: Final = "application/json"
EVENT_HEADERS: Final = ("task_type", "task_status", "domain_name")
"""Headers of every event (``domain_name`` only when DomainName is a non-empty string), for header exchanges."""
VALIDATION_ERROR_HEADER: Final = "x-validation-error"
MAX_HEADER_CHARS: Final = 1000
"""Header values longer than this are cut (ending in ``…``) so one odd record cannot bloat every message."""
TASK_STATUS_CODES: Final = {"WAITING_EXECUTE": 0, "EXECUTING": 1, "EXECUTE_SUCCESS": 2, "EXECUTE_FAILURE": 3}
ROUTING_KEY_PATTERN: Final = r"^[a-z0-9_-]{1,127}\.[a-z0-9_-]{1,127}$"
"""Every routing key :func:`routing_key` returns matches this."""
UPSTREAM_TIME_PATTERN: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$"
"""``yyyy-MM-dd HH:mm:ss``, as the upstream writes CreateTime and UpdateTime."""
RFC3339_UTC_PATTERN: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"

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


@dataclass(frozen=True, slots=True)
class Event:
    """A valid TaskDetail as a CloudEvents message for the topic exchange.

    ``message_id`` is the TaskDetailNo; ``body`` the CloudEvents JSON (UTF-8); ``task_type``, ``task_status``,
    ``domain_name`` the original values, repeated in headers; ``timestamp`` the AMQP timestamp (aware, UTC).
    """

    message_id: str
    routing_key: str
    body: bytes
    task_type: str
    task_status: str
    domain_name: str | None
    timestamp: datetime

    def _fields(self) -> dict[str, Any]:
        headers: dict[str, Any] = {
            "task_type": _header_text(self.task_type),
            "task_status": self.task_status,
        }
        if self.domain_name is not None:
            headers["domain_name"] = _header_text(self.domain_name)
        return {
            "headers": headers,
            "content_type": EVENT_CONTENT_TYPE,
            "delivery_mode": aio_pika.DeliveryMode.PERSISTENT,
            "message_id": self.message_id,
            "timestamp": self.timestamp,
            "type": EVENT_TYPE,
            "app_id": APP_ID,
        }

    def message(self) -> aio_pika.Message:
        """A new persistent AMQP message (aio-pika locks a message once published, so build one per publish)."""
        return aio_pika.Message(self.body, **self._fields())

    def properties(self) -> Basic.Properties:
        """The properties of :meth:`message`, built directly for the publisher's hot path."""
        return _amqp_properties(self._fields())


@dataclass(frozen=True, slots=True)
class InvalidRecord:
    """A TaskDetail that failed validation, for the ``<exchange>.invalid`` route.

    ``message_id`` is the TaskDetailNo, or ``sha256:<hex>`` of it (or of the body when there is none) when it
    cannot be an AMQP ``message_id``; ``error`` the problems, one line; ``body`` the raw record as JSON;
    ``routing_key`` the best-effort :func:`routing_key` of its TaskType and TaskStatus (the invalid exchange is
    fanout, so it only informs); ``timestamp`` the time of the conversion.
    """

    message_id: str
    error: str
    body: bytes
    routing_key: str
    timestamp: datetime

    def _fields(self) -> dict[str, Any]:
        return {
            "headers": {VALIDATION_ERROR_HEADER: _header_text(self.error)},
            "content_type": INVALID_CONTENT_TYPE,
            "delivery_mode": aio_pika.DeliveryMode.PERSISTENT,
            "message_id": self.message_id,
            "timestamp": self.timestamp,
            "app_id": APP_ID,
        }

    def message(self) -> aio_pika.Message:
        """A new persistent AMQP message carrying the raw record and the error in ``x-validation-error``."""
        return aio_pika.Message(self.body, **self._fields())

    def properties(self) -> Basic.Properties:
        """The properties of :meth:`message`, built directly for the publisher's hot path."""
        return _amqp_properties(self._fields())


def _amqp_properties(fields: dict[str, Any]) -> Basic.Properties:
    # aio-pika's Message costs ~7 µs more per event than these properties, which are what it would send.
    values = dict(fields)
    values["message_type"] = values.pop("type", None)
    values["delivery_mode"] = int(values["delivery_mode"])
    values["priority"] = 0  # aio-pika's Message sends priority 0: keep the two paths byte-identical
    return Basic.Properties(**values)


def convert(record: RawRecord, *, source: str) -> Event | InvalidRecord:
    """Validate ``record`` and build its :class:`Event`, or an :class:`InvalidRecord` naming every problem.

    ``source`` is the CloudEvents ``source`` (``BRIDGE_EVENT_SOURCE``). Never raises for any JSON value.
    """
    raw = record.raw
    if not isinstance(raw, dict):
        return _invalid(record, [f"TaskDetail: {_show(raw)} is not a JSON object"], None, None)
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
        return _invalid(record, problems, task_type, task_status)
    assert detail_no is not None  # checked above; narrows the type for mypy

    envelope: dict[str, Any] = {"specversion": SPECVERSION, "id": detail_no, "source": source, "type": EVENT_TYPE}
    if domain_name is not None:
        envelope["subject"] = domain_name
    if time_text is not None:
        envelope["time"] = time_text
    envelope["datacontenttype"] = DATA_CONTENT_TYPE
    envelope["data"] = raw
    try:
        body = _encode(envelope)
    except ValueError:
        problems.append("TaskDetail: contains NaN or Infinity, which JSON does not allow")
        return _invalid(record, problems, task_type, task_status)
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


def _invalid(record: RawRecord, problems: list[str], task_type: Any, task_status: Any) -> InvalidRecord:
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


def _any_case(name: str) -> str:
    """An ECMA-262 pattern matching ``name`` ignoring ASCII case (JSON Schema has no case-insensitive flag)."""
    return "^" + "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in name) + "$"


def event_json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of an event body, built from this module's constants.

    Every event :func:`convert` builds validates against it. Fields of ``data`` are described under their
    upstream spelling; as the validator looks them up ignoring case, a record that spells one differently is
    still valid (the required ones are checked by a pattern that ignores case).
    """
    nullable_int = ["integer", "null"]
    data_properties: dict[str, Any] = {
        "TaskDetailNo": {"type": "string", "minLength": 1, "description": "Task detail number; the event id."},
        "TaskNo": {"description": "Task number."},
        "TaskType": {
            "type": "string",
            "minLength": 1,
            "description": "Task type, e.g. CHG_DNS; the list is open, unknown types are valid.",
        },
        "TaskTypeDescription": {"description": "Task type in the language of the poll's Lang."},
        "InstanceId": {"description": "Domain instance id."},
        "DomainName": {"type": ["string", "null"], "description": "Domain name; the event subject."},
        "TaskStatus": {"enum": list(TASK_STATUS_CODES)},
        "TaskStatusCode": {
            "type": nullable_int,
            "minimum": 0,
            "maximum": 3,
            "description": "Agrees with TaskStatus: " + ", ".join(f"{c} {s}" for s, c in TASK_STATUS_CODES.items()),
        },
        "TaskResult": {"description": "Task result (a string, sometimes a number)."},
        "ErrorMsg": {"description": "Execution message."},
        "TryCount": {"type": nullable_int, "minimum": 0, "description": "Number of retries."},
        "CreateTime": {
            "type": ["string", "null"],
            "pattern": UPSTREAM_TIME_PATTERN,
            "description": "Creation time, yyyy-MM-dd HH:mm:ss, Beijing time (UTC+8).",
        },
        "UpdateTime": {
            "type": ["string", "null"],
            "pattern": UPSTREAM_TIME_PATTERN,
            "description": "Last update time, yyyy-MM-dd HH:mm:ss, Beijing time (UTC+8).",
        },
    }
    required_any_case = [
        {
            "$comment": f"requires a key equal to {name!r} ignoring ASCII case",
            "not": {"propertyNames": {"not": {"pattern": _any_case(name)}}},
        }
        for name in ("TaskDetailNo", "TaskType", "TaskStatus")
    ]
    agreement = [
        {
            "if": {"properties": {"TaskStatus": {"const": status}}, "required": ["TaskStatus"]},
            "then": {"properties": {"TaskStatusCode": {"enum": [code, None]}}},
        }
        for status, code in TASK_STATUS_CODES.items()
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:task-bridge:schema:{EVENT_TYPE}",
        "title": "Alibaba Cloud Domain task detail finished",
        "description": (
            "CloudEvents 1.0 structured-mode body of one TaskDetail from PollTaskResult, published by "
            f"{APP_ID} with content type {EVENT_CONTENT_TYPE}."
        ),
        "type": "object",
        "required": ["specversion", "id", "source", "type", "datacontenttype", "data"],
        "properties": {
            "specversion": {"const": SPECVERSION},
            "id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "description": "TaskDetailNo; also the AMQP message_id. Equal ids are the same event.",
            },
            "source": {"type": "string", "minLength": 1, "description": "Configured (BRIDGE_EVENT_SOURCE)."},
            "type": {"const": EVENT_TYPE},
            "subject": {
                "type": "string",
                "minLength": 1,
                "description": "DomainName; absent when the record has none.",
            },
            "time": {
                "type": "string",
                "format": "date-time",
                "pattern": RFC3339_UTC_PATTERN,
                "description": "UpdateTime (Beijing time) converted to UTC; absent when the record has none.",
            },
            "datacontenttype": {"const": DATA_CONTENT_TYPE},
            "data": {
                "type": "object",
                "description": (
                    "The TaskDetail exactly as received: upstream field names and values, unknown fields kept. "
                    "null counts as absent for optional fields. Field names may differ in case from the "
                    "upstream spelling (the upstream doc spells TaskStatusCode as Taskstatuscode once)."
                ),
                "properties": data_properties,
                "additionalProperties": True,
                "allOf": required_any_case + agreement,
            },
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bridge.events``: print the event schema, or write it with ``--write-contract [DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m bridge.events", description="Event contract tools.")
    parser.add_argument(
        "--write-contract",
        metavar="DIR",
        nargs="?",
        const="contract",
        help="write DIR/event.schema.json from the code (default DIR: contract)",
    )
    args = parser.parse_args(argv)
    if args.write_contract is None:
        sys.stdout.write(schema_text())
        return 0
    path = Path(args.write_contract) / "event.schema.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema_text(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


def schema_text() -> str:
    """:func:`event_json_schema` as the text of ``contract/event.schema.json``."""
    return json.dumps(event_json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

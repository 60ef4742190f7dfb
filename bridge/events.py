"""The event contract: each TaskDetail becomes a CloudEvents event, or an invalid record for the side route.

An :class:`Event` goes to the topic exchange with the routing key ``{task_type}.{task_status}``; an
:class:`InvalidRecord` goes to ``<exchange>.invalid`` with the validation error in a header. Both carry the
TaskDetailNo as ``message_id``, the idempotency key: re-publishing a record gives the same id, body and properties.

Event body: CloudEvents 1.0, structured mode, JSON::

    {"specversion": "1.0", "id": <TaskDetailNo>, "source": <configured>, "type": EVENT_TYPE,
     "subject": <DomainName>, "time": <UpdateTime in UTC, RFC 3339>, "datacontenttype": "application/json",
     "account": <the Alibaba account's name>, "data": <the TaskDetail exactly as received>}

``subject`` is left out when DomainName is missing, null or empty; ``time`` when UpdateTime is missing or null.
``account`` is a CloudEvents extension attribute (after the core attributes, before ``data``): the name of the
Alibaba account the record was polled for (``default`` with a single account), also in the ``account`` header of
the event and of an invalid record; it matches :data:`ACCOUNT_PATTERN`. The routing key does not carry it.
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
* the TaskDetailNo fits an AMQP ``message_id`` (at most 255 bytes of UTF-8);
* every value is one JSON can carry: NaN, Infinity, an integer too long to represent, an object that is not a
  JSON value or nesting too deep for the encoder make the record invalid, the error naming the field and value;
* the upstream parser found nothing it could not represent: its ``RawRecord.problem`` comes first in the error.

JSON ``null`` counts as "not present" for the optional fields; for a required field it is an error. Integers are
JSON integers: ``true``/``false``, ``2.0`` and ``"2"`` are not. Field names are looked up case-tolerantly (the
upstream doc spells ``Taskstatuscode`` once): the exact upstream spelling wins, otherwise the first key equal to
it ignoring ASCII case. Unknown task types and unknown extra fields are valid; ``data`` keeps every field.

An invalid record's body is the record as JSON; what JSON cannot carry is rendered as a string there (``"NaN"``,
the digits of a long integer), so no record is lost. :func:`convert` never raises for a record (only for an account
name outside :data:`ACCOUNT_PATTERN`). The JSON Schema of the event body is built by :mod:`bridge.schema`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aio_pika
from pamqp.commands import Basic

from bridge.amqp_properties import Properties
from bridge.encoding import ENCODE_ERRORS, cut, encode, encode_as_text, find_unencodable, int_text, short_json
from bridge.records import RawRecord

__all__ = [
    "ACCOUNT_HEADER",
    "ACCOUNT_PATTERN",
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
    "routing_key",
]

EVENT_TYPE: Final = "com.alibabacloud.domain.task.finished.v1"
"""CloudEvents ``type`` and AMQP ``type`` of every event; the ``v1`` suffix changes only on a breaking change."""
APP_ID: Final = "task-bridge"
SPECVERSION: Final = "1.0"
EVENT_CONTENT_TYPE: Final = "application/cloudevents+json"
INVALID_CONTENT_TYPE: Final = "application/json"
DATA_CONTENT_TYPE: Final = "application/json"
EVENT_HEADERS: Final = ("task_type", "task_status", "domain_name", "account")
"""Headers of every event (``domain_name`` only when DomainName is a non-empty string), for header exchanges."""
ACCOUNT_HEADER: Final = "account"
"""The header (and CloudEvents extension attribute) naming the account, on events and invalid records alike."""
ACCOUNT_PATTERN: Final = r"^[a-z0-9-]{1,40}$"
"""Every account name: a CloudEvents extension value and a header value that needs no escaping or cutting."""
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
_UNSAFE_ROUTING = re.compile(r"[^a-z0-9_-]")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_UPSTREAM_TIME = re.compile(UPSTREAM_TIME_PATTERN)
_ACCOUNT = re.compile(ACCOUNT_PATTERN)
_UPSTREAM_OFFSET: Final = timedelta(hours=8)
_EPOCH: Final = datetime(1970, 1, 1)
_STATUS_LIST: Final = ", ".join(TASK_STATUS_CODES)
_PERSISTENT: Final = int(aio_pika.DeliveryMode.PERSISTENT)
_MISSING: Final[Any] = object()
_UNNAMED_PROBLEM: Final = "TaskDetail: holds a value the upstream parser could not represent"
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


def routing_key(task_type: object, task_status: object) -> str:
    """The routing key ``{task_type}.{task_status}`` (e.g. ``chg_dns.execute_success``).

    ASCII letters are lower-cased; every other character outside ``[a-z0-9_-]`` (per code point, so ``é`` and
    ``.`` too) becomes ``_``; an empty or ``None`` part becomes ``unknown``; a non-string part is first turned
    into its ``str``; each part is cut to 127 characters so the key fits AMQP's 255-byte limit.
    """
    if type(task_type) is str and type(task_status) is str:
        return _routing_key_of_strings(task_type, task_status)
    return f"{_routing_part(task_type)}.{_routing_part(task_status)}"


@functools.lru_cache(maxsize=1024)  # the upstream has a few dozen (type, status) pairs; odd ones cannot grow it
def _routing_key_of_strings(task_type: str, task_status: str) -> str:
    return f"{_routing_part(task_type)}.{_routing_part(task_status)}"


def _routing_part(value: object) -> str:
    if isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    else:
        try:  # int_text: str() refuses integers of more than 4,300 digits
            text = int_text(value) if type(value) is int else str(value)
        except Exception:  # nested too deep for str(): the part is unknown, the error says why
            text = ""
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
    ``domain_name`` the original values and ``account`` the account's name, repeated in headers; ``timestamp``
    the AMQP timestamp (aware, UTC).
    """

    message_id: str
    routing_key: str
    body: bytes
    task_type: str
    task_status: str
    domain_name: str | None
    account: str
    timestamp: datetime

    def _headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {"task_type": _header_text(self.task_type), "task_status": self.task_status}
        if self.domain_name is not None:
            headers["domain_name"] = _header_text(self.domain_name)
        headers[ACCOUNT_HEADER] = self.account  # matches ACCOUNT_PATTERN: nothing to cut or escape
        return headers

    def message(self) -> aio_pika.Message:
        """A new persistent AMQP message (aio-pika locks a message once published, so build one per publish)."""
        return aio_pika.Message(
            self.body,
            headers=self._headers(),
            content_type=EVENT_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=self.message_id,
            timestamp=self.timestamp,
            type=EVENT_TYPE,
            app_id=APP_ID,
        )

    def properties(self) -> Basic.Properties:
        """The properties of :meth:`message`, built directly for the publisher's hot path."""
        # aio-pika's Message costs ~7 µs more per event than these properties, which are what it would send
        # (priority 0 included, so both paths put the same bytes on the wire).
        return Properties(
            content_type=EVENT_CONTENT_TYPE,
            headers=self._headers(),
            delivery_mode=_PERSISTENT,
            priority=0,
            message_id=self.message_id,
            timestamp=self.timestamp,
            message_type=EVENT_TYPE,
            app_id=APP_ID,
        )


@dataclass(frozen=True, slots=True)
class InvalidRecord:
    """A TaskDetail that failed validation, for the ``<exchange>.invalid`` route.

    ``message_id`` is the TaskDetailNo, or ``sha256:<hex>`` of it (or of the body when there is none) when it
    cannot be an AMQP ``message_id``; ``error`` the problems, one line; ``body`` the raw record as JSON (what
    JSON cannot carry rendered as a string); ``routing_key`` the best-effort :func:`routing_key` of its TaskType
    and TaskStatus (the invalid exchange is fanout, so it only informs); ``account`` the account's name, in the
    ``account`` header (the body stays the record as received); ``timestamp`` the time of the conversion.
    """

    message_id: str
    error: str
    body: bytes
    routing_key: str
    account: str
    timestamp: datetime

    def _headers(self) -> dict[str, Any]:
        return {VALIDATION_ERROR_HEADER: _header_text(self.error), ACCOUNT_HEADER: self.account}

    def message(self) -> aio_pika.Message:
        """A new persistent AMQP message: the raw record, the error in ``x-validation-error``, the account."""
        return aio_pika.Message(
            self.body,
            headers=self._headers(),
            content_type=INVALID_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=self.message_id,
            timestamp=self.timestamp,
            app_id=APP_ID,
        )

    def properties(self) -> Basic.Properties:
        """The properties of :meth:`message`, built directly for the publisher's hot path."""
        return Properties(
            content_type=INVALID_CONTENT_TYPE,
            headers=self._headers(),
            delivery_mode=_PERSISTENT,
            priority=0,
            message_id=self.message_id,
            timestamp=self.timestamp,
            app_id=APP_ID,
        )


def convert(record: RawRecord, *, source: str, account: str) -> Event | InvalidRecord:
    """Validate ``record`` and build its :class:`Event`, or an :class:`InvalidRecord` naming every problem.

    ``source`` is the CloudEvents ``source`` (``BRIDGE_EVENT_SOURCE``); ``account`` the name of the account the
    record was polled for (``default`` with a single account). Whatever the record holds, it comes back as an
    event or an invalid record; only an ``account`` outside :data:`ACCOUNT_PATTERN` raises ValueError (the
    settings validate the name with the same rule, so that is a bug in the caller).
    """
    _check_account(account)
    try:
        return _convert(record, source, account)
    except Exception as exc:  # a bug here must not stop the flow or lose the record: keep it on the invalid route
        why = " ".join(f"{type(exc).__name__}: {exc}".splitlines())
        return _invalid(record, account, [cut(f"TaskDetail: could not be converted ({why})")], None, None)


@functools.lru_cache(maxsize=64)  # a process has a handful of accounts: checked once each, not per event
def _check_account(account: str) -> None:
    if type(account) is not str or _ACCOUNT.fullmatch(account) is None:
        raise ValueError(f"account: {_show(account)} does not match {ACCOUNT_PATTERN}")


def _convert(record: RawRecord, source: str, account: str) -> Event | InvalidRecord:
    raw = record.raw
    if not isinstance(raw, dict):
        return _invalid(record, account, [f"TaskDetail: {_show(raw)} is not a JSON object"], None, None)
    found = _lookup(raw)
    problems: list[str] = []
    _check_detail_no(found["TaskDetailNo"], record.detail_no, problems)
    task_type = _check_required(found["TaskType"], problems)
    task_status = _check_status(found["TaskStatus"], found["TaskStatusCode"], problems)
    _check_try_count(found["TryCount"], problems)
    _check_time(found["CreateTime"], problems)
    updated = _check_time(found["UpdateTime"], problems)
    domain_name = _check_domain_name(found["DomainName"], problems)
    utc = _in_utc(found["UpdateTime"], updated, problems)  # after DomainName: the order of the error's parts
    if problems or record.problem is not None:
        return _invalid(record, account, problems, task_type, task_status)
    return _event(record, source, account, task_type, task_status, domain_name, utc)


def _event(
    record: RawRecord,
    source: str,
    account: str,
    task_type: str,
    task_status: str,
    domain_name: str | None,
    utc: datetime | None,
) -> Event | InvalidRecord:
    detail_no = record.detail_no
    assert detail_no is not None  # validated; narrows the type for mypy
    envelope: dict[str, Any] = {"specversion": SPECVERSION, "id": detail_no, "source": source, "type": EVENT_TYPE}
    if domain_name is not None:
        envelope["subject"] = domain_name
    if utc is not None:
        envelope["time"] = utc.isoformat() + "Z"
    envelope["datacontenttype"] = DATA_CONTENT_TYPE
    envelope["account"] = account  # an extension attribute: after the core ones, before data
    envelope["data"] = record.raw
    try:
        body = encode(envelope, record.raw)
    except ENCODE_ERRORS:  # _invalid names the value
        return _invalid(record, account, [], task_type, task_status)
    if utc is not None and utc >= _EPOCH:
        timestamp = utc.replace(tzinfo=UTC)
    else:  # AMQP timestamps are unsigned seconds since 1970
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


def _check_detail_no(entry: tuple[str, Any], detail_no: str | None, problems: list[str]) -> None:
    key, value = entry
    if type(value) is not str or not value:
        problems.append(_required_string(key, value))
    elif detail_no is None:
        problems.append(f"{key}: {_show(value)} is not usable as an id")
    elif not _fits_short_string(detail_no):
        problems.append(f"{key}: {_show(value)} is longer than 255 bytes (AMQP message_id)")


def _check_required(entry: tuple[str, Any], problems: list[str]) -> Any:
    """The value of a required string field (``_MISSING`` when absent)."""
    key, value = entry
    if type(value) is not str or not value:
        problems.append(_required_string(key, value))
    return value


def _check_status(status: tuple[str, Any], code: tuple[str, Any], problems: list[str]) -> Any:
    """TaskStatus, checked, then TaskStatusCode checked against it; returns the TaskStatus value."""
    key, task_status = status
    expected_code = TASK_STATUS_CODES.get(task_status) if type(task_status) is str else None
    if expected_code is None:
        if type(task_status) is str and task_status:
            problems.append(f"{key}: {_show(task_status)} is not one of {_STATUS_LIST}")
        else:
            problems.append(_required_string(key, task_status))
    if code[1] is not None and code[1] is not _MISSING:
        _check_status_code(code, status, expected_code, problems)
    return task_status


def _check_status_code(
    code: tuple[str, Any], status: tuple[str, Any], expected_code: int | None, problems: list[str]
) -> None:
    key, value = code
    if type(value) is not int or not 0 <= value <= 3:
        problems.append(f"{key}: {_show(value)} is not an integer 0-3")
    elif expected_code is not None and value != expected_code:
        status_key, task_status = status
        problems.append(f"{key}: {value} does not agree with {status_key} {task_status!r} (expects {expected_code})")


def _check_try_count(entry: tuple[str, Any], problems: list[str]) -> None:
    key, value = entry
    if value is not None and value is not _MISSING and (type(value) is not int or value < 0):
        problems.append(f"{key}: {_show(value)} is not a non-negative integer")


def _check_time(entry: tuple[str, Any], problems: list[str]) -> datetime | None:
    """The upstream time (naive, Beijing time), or None when absent or invalid (then a problem is added)."""
    key, value = entry
    if value is None or value is _MISSING:
        return None
    if type(value) is not str or _UPSTREAM_TIME.fullmatch(value) is None:
        problems.append(f"{key}: {_show(value)} does not match yyyy-MM-dd HH:mm:ss")
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        problems.append(f"{key}: {_show(value)} is not a real date-time")
        return None


def _check_domain_name(entry: tuple[str, Any], problems: list[str]) -> Any:
    """DomainName, ``None`` when missing or empty (it is then left out of the event)."""
    key, domain_name = entry
    if domain_name is _MISSING or domain_name is None or domain_name == "":
        return None
    if type(domain_name) is not str:
        problems.append(f"{key}: {_show(domain_name)} is not a string")
    return domain_name


def _in_utc(entry: tuple[str, Any], updated: datetime | None, problems: list[str]) -> datetime | None:
    """UpdateTime in UTC (naive), or None when absent, invalid or before year 1 in UTC."""
    if updated is None:
        return None
    try:
        return updated - _UPSTREAM_OFFSET
    except OverflowError:
        key, value = entry
        problems.append(f"{key}: {_show(value)} is before year 1 in UTC")
        return None


def _required_string(key: str, value: Any) -> str:
    if value is _MISSING:
        return f"{key}: required, missing"
    return f"{key}: {_show(value)} is not a non-empty string"


def _invalid(record: RawRecord, account: str, problems: list[str], task_type: Any, task_status: Any) -> InvalidRecord:
    raw = record.raw
    if record.problem is not None:  # the parser's problem first: it is why the record looks as it does
        problems = [" ".join(record.problem.splitlines()) or _UNNAMED_PROBLEM, *problems]
    try:
        body = encode(raw)
    except ENCODE_ERRORS as exc:
        body = encode_as_text(raw)
        if record.problem is None:  # else the parser's problem already names the value
            problems.append(find_unencodable(raw, exc))
    if not problems:  # cannot happen; an invalid record always says why
        problems.append("TaskDetail: cannot be encoded as JSON")
    return InvalidRecord(
        message_id=_invalid_message_id(record.detail_no, body),
        error="; ".join(problems),
        body=body,
        routing_key=routing_key(
            None if task_type is _MISSING else task_type, None if task_status is _MISSING else task_status
        ),
        account=account,
        timestamp=datetime.now(UTC).replace(microsecond=0),
    )


def _invalid_message_id(detail_no: str | None, body: bytes) -> str:
    """The TaskDetailNo, or ``sha256:<hex>`` of it (of the body without one) when it cannot be a message_id."""
    if detail_no is not None and _fits_short_string(detail_no):
        return detail_no
    # Stable across re-polls, so the side queue sees one id per record.
    seed = body if detail_no is None else detail_no.encode("utf-8", "surrogatepass")
    return "sha256:" + hashlib.sha256(seed).hexdigest()


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
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return cut(int_text(value))
    if isinstance(value, str | float):
        return cut(repr(value))
    return short_json(value)

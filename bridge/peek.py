"""``task-bridge peek [--count N]``: a dry run. What the bridge would publish for the first details pending now.

One PollTaskResult call (page 1, PageSize ``min(N, BRIDGE_PAGE_SIZE)``), and each detail converted exactly as the
run loop converts it (:func:`bridge.events.convert` with ``BRIDGE_EVENT_SOURCE``): an event shows the exchange,
the routing key, the AMQP properties the publisher sends and the body; an invalid record the same for the invalid
route, its error in the ``x-validation-error`` header; a record without a usable TaskDetailNo is shown as the run
loop treats it, left upstream. Nothing is published and nothing is acknowledged: no broker is needed and the
upstream's backlog is unchanged (a detail stays pending until AcknowledgeTaskResult names it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from pamqp.commands import Basic

from bridge.events import InvalidRecord, convert
from bridge.settings import AccountSettings, BrokerSettings, Settings
from bridge.upstream import RawRecord, UpstreamClient

__all__ = ["DEFAULT_COUNT", "PeekResult", "Preview", "peek", "render_json", "render_text", "summary"]

DEFAULT_COUNT = 10
# Basic.Properties in the order AMQP defines them, headers last (they read best after the scalar ones).
_PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
    "cluster_id",
    "headers",
)
_LEFT_UPSTREAM = "no usable TaskDetailNo: it cannot be acknowledged, so the bridge logs it once and leaves it upstream"


@dataclass(frozen=True, slots=True)
class Preview:
    """One polled record as the bridge would handle it.

    ``kind`` is ``event``, ``invalid`` or ``left_upstream``; for the last, ``exchange``, ``routing_key`` and
    ``properties`` are ``None`` and ``body`` is the record's JSON.
    """

    kind: str
    exchange: str | None
    routing_key: str | None
    properties: dict[str, Any] | None
    body: bytes
    note: str | None = None


@dataclass(frozen=True, slots=True)
class PeekResult:
    """The previews of one poll, with the upstream's count of pending details (``None`` when it gave none)."""

    previews: list[Preview] = field(default_factory=list)
    pending: int | None = None
    request_id: str | None = None


async def peek(
    settings: Settings, http: httpx.AsyncClient, count: int = DEFAULT_COUNT, account: AccountSettings | None = None
) -> PeekResult:
    """Poll page 1 of ``account`` (the first) once for ``count`` details (at most ``page_size``) and preview each.

    Raises :class:`UpstreamError`.
    """
    account = account or settings.account
    client = UpstreamClient(http, settings.upstream, account)
    page = await client.poll(page_num=1, page_size=min(count, settings.upstream.page_size))
    previews = [_preview(record, settings.broker, account.name) for record in page.records]
    return PeekResult(previews, page.total_items, page.request_id)


def _preview(record: RawRecord, settings: BrokerSettings, account: str) -> Preview:
    if record.detail_no is None:  # as the run loop decides, before any conversion
        body = json.dumps(record.raw, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")
        return Preview("left_upstream", None, None, None, body, _LEFT_UPSTREAM)
    item = convert(record, source=settings.event_source, account=account)
    invalid = isinstance(item, InvalidRecord)
    return Preview(
        "invalid" if invalid else "event",
        settings.invalid_exchange if invalid else settings.exchange,
        item.routing_key,
        _properties(item.properties()),
        item.body,
    )


def _properties(properties: Basic.Properties) -> dict[str, Any]:
    """The AMQP properties that go on the wire (pamqp's ``message_type`` is AMQP's ``type``).

    pamqp leaves out a property that is ``None`` or the empty string, and so does this view.
    """
    shown: dict[str, Any] = {}
    for name in _PROPERTY_NAMES:
        value = getattr(properties, name)
        if value is not None and value != "":
            shown["type" if name == "message_type" else name] = value
    return shown


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {key: _plain(inner) for key, inner in value.items()}
    return value


def _body_value(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def render_json(preview: Preview) -> str:
    """One JSON line: ``kind``, ``exchange``, ``routing_key``, ``properties``, ``body`` (parsed), ``note``."""
    entry: dict[str, Any] = {
        "kind": preview.kind,
        "exchange": preview.exchange,
        "routing_key": preview.routing_key,
        "properties": None if preview.properties is None else _plain(preview.properties),
        "body": _body_value(preview.body),
    }
    if preview.note is not None:
        entry["note"] = preview.note
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def render_text(preview: Preview, number: int) -> str:
    """A block for a person: a heading line, the properties, the headers, the body as published."""
    body = preview.body.decode("utf-8", "replace")
    if preview.kind == "left_upstream":
        return f"#{number} left upstream: {preview.note}\n  record: {body}\n"
    properties = dict(_plain(preview.properties or {}))
    headers = properties.pop("headers", {}) or {}
    lines = [
        f"#{number} {preview.kind}  exchange {preview.exchange!r}  routing key {preview.routing_key!r}",
        "  properties: " + " ".join(f"{key}={value}" for key, value in properties.items()),
        "  headers: " + " ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in headers.items()),
        f"  body: {body}",
    ]
    return "\n".join(lines) + "\n"


def summary(result: PeekResult) -> str:
    """The closing line: what was shown out of how many pending, and that nothing changed."""
    kinds = [preview.kind for preview in result.previews]
    pending = "an unknown number of" if result.pending is None else f"{result.pending:,}"
    request = f" (RequestId {result.request_id})" if result.request_id else ""
    return (
        f"peek: {len(kinds)} of {pending} pending task details{request}: {kinds.count('event')} "
        f"event{'' if kinds.count('event') == 1 else 's'}, {kinds.count('invalid')} invalid, "
        f"{kinds.count('left_upstream')} left upstream; "
        "nothing was published or acknowledged"
    )

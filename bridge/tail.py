"""``task-bridge tail [PATTERN]``: watch the events (or the invalid records) as they reach the broker.

A temporary queue (exclusive, auto-delete: it vanishes with the connection) is bound to the events exchange with
a routing pattern, ``#`` by default, or to ``<exchange>.invalid`` with ``invalid=True``. Only the broker settings
are needed. It never takes anything from the bridge's own queues: a tail sees copies.

The queue is named ``<exchange>.tail.<random>`` rather than left to the server (``amq.gen-…``): declaring a queue
needs the *configure* permission on its name, and a prefix lets a broker grant exactly that to the users who tail
(``deploy/rabbitmq/definitions.json`` does), where a server-generated name would need configure on ``amq.gen-.*``.

One line per message: ``time  routing-key  domain  status  id`` (an invalid record adds its validation
error), or with ``as_json`` the body as one JSON line (an invalid record as ``{"message_id", "routing_key",
"error", "record"}``, since its body alone would not say what is wrong with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable
from datetime import UTC
from typing import Any, TextIO

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from bridge import refusals
from bridge.errors import BrokerError, BrokerUnavailableError
from bridge.events import ACCOUNT_HEADER, VALIDATION_ERROR_HEADER
from bridge.settings import BrokerSettings

__all__ = ["bind_temporary_queue", "format_json", "format_line", "tail", "temporary_queue_name"]


def temporary_queue_name(exchange: str) -> str:
    """A fresh ``<exchange>.tail.<random>`` name: the prefix a broker's permissions can grant to tailing users."""
    return f"{exchange}.tail.{secrets.token_hex(6)}"


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _timestamp(message: AbstractIncomingMessage) -> str:
    stamp = message.timestamp
    if stamp is None:
        return "-"
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: Any) -> str:
    """A field for a column: ``-`` when absent, one line otherwise."""
    if value is None or value == "":
        return "-"
    return " ".join(str(value).split())


def format_line(message: AbstractIncomingMessage) -> str:
    """One readable line: time, routing key, domain, status, id (then the account when it is not ``default``, and
    the error of an invalid record)."""
    error = (message.headers or {}).get(VALIDATION_ERROR_HEADER)
    body = _json_or_none(message.body)
    event = body if isinstance(body, dict) else {}
    # An event carries the TaskDetail in "data"; an invalid record is the raw TaskDetail itself.
    data = event.get("data") if error is None else event
    detail = data if isinstance(data, dict) else {}
    when = event.get("time") if error is None and isinstance(event.get("time"), str) else _timestamp(message)
    domain = event.get("subject") or detail.get("DomainName")
    columns = [
        f"{_text(when):<20}",
        f"{_text(message.routing_key):<40}",
        f"{_text(domain):<28}",
        f"{_text(detail.get('TaskStatus')):<15}",
        _text(message.message_id or event.get("id")),
    ]
    account = (message.headers or {}).get(ACCOUNT_HEADER)
    if account not in (None, "default"):  # a bridge of several accounts: say whose
        columns.append(f"account={_text(account)}")
    if error is not None:
        columns.append(f"  INVALID: {_text(error)}")
    elif body is None:
        columns.append(f"  (body is not JSON: {len(message.body)} bytes)")
    return "  ".join(columns).rstrip()


def format_json(message: AbstractIncomingMessage) -> str:
    """One JSON line: the CloudEvent body as published, or an invalid record with its error and id."""
    error = (message.headers or {}).get(VALIDATION_ERROR_HEADER)
    body = _json_or_none(message.body)
    if error is None and body is not None:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(
        {
            "message_id": message.message_id,
            "routing_key": message.routing_key,
            "error": None if error is None else str(error),
            "record": body if body is not None else message.body.decode("utf-8", "replace"),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


async def bind_temporary_queue(
    channel: aio_pika.abc.AbstractChannel, exchange: str, pattern: str = "#", *, prefix_of: str | None = None
) -> AbstractQueue:
    """An exclusive, auto-delete queue bound to ``exchange``; :class:`BrokerError` if the exchange is absent.

    The queue is named by :func:`temporary_queue_name` after ``prefix_of`` (default ``exchange``): the events
    exchange's name for a tail of ``<exchange>.invalid`` too, so one permission prefix covers both.
    """
    name = temporary_queue_name(prefix_of or exchange)
    queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
    try:
        await queue.bind(exchange, routing_key=pattern)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise BrokerError(
            f"exchange {exchange!r} does not exist: start the bridge once (it declares its topology) "
            "or check BRIDGE_EXCHANGE"
        ) from None
    return queue


async def tail(
    settings: BrokerSettings,
    stop: asyncio.Event,
    out: TextIO,
    *,
    pattern: str = "#",
    as_json: bool = False,
    invalid: bool = False,
    count: int | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Print messages until ``stop`` is set (or ``count`` were printed); returns how many were printed.

    ``on_ready(text)`` is called once the queue is bound (the CLI prints it to stderr). Raises
    :class:`BrokerError` when the broker cannot be reached, the exchange is absent or the connection is lost.
    """
    exchange = settings.invalid_exchange if invalid else settings.exchange
    connection = await refusals.connect(settings)
    lost = asyncio.Event()
    printed = 0
    render = format_json if as_json else format_line

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal printed
        if stop.is_set():
            return
        try:
            out.write(render(message) + "\n")
            out.flush()
        except BrokenPipeError:  # `task-bridge tail | head`: the reader is gone, so are we
            stop.set()
            return
        printed += 1
        if count is not None and printed >= count:
            stop.set()

    try:
        connection.close_callbacks.add(lambda *_: lost.set())
        channel = await connection.channel(publisher_confirms=False)
        queue = await bind_temporary_queue(channel, exchange, pattern, prefix_of=settings.exchange)
        await queue.consume(on_message, no_ack=True)
        if on_ready is not None:
            shown = "every invalid record" if invalid else f"pattern {pattern!r}"
            on_ready(f"tailing {exchange!r} ({shown}) on {connection.broker}; Ctrl-C to stop")
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        if lost.is_set() and not stop.is_set():
            raise BrokerUnavailableError("broker connection lost")
    except aiormq.exceptions.AMQPError as exc:
        raise refusals.explain(exc, settings, f"tail of {exchange!r}") from None
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
    return printed

"""The broker topology the bridge publishes into, declared idempotently at start.

``<exchange>``            topic, durable, ``alternate-exchange = <exchange>.unrouted``: the events
``<exchange>.unrouted``   fanout, durable, bound to the quorum queue of the same name: events no queue was bound for
``<exchange>.invalid``    fanout, durable, bound to the quorum queue of the same name: records that failed validation

:func:`describe` returns the same declarations as RabbitMQ definitions, which ``deploy/rabbitmq/definitions.json``
must contain verbatim (a test compares them), so the broker an operator sets up and the one the bridge declares
never disagree (a mismatch would be a ``PRECONDITION_FAILED`` at start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

__all__ = ["QUEUE_ARGUMENTS", "Exchanges", "declare", "describe"]

# Quorum queues: replicated and durable; the side queues must survive a broker node loss.
QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


@dataclass(frozen=True, slots=True)
class Exchanges:
    """The declared exchanges the publisher writes to."""

    events: AbstractExchange
    invalid: AbstractExchange


def describe(exchange: str, vhost: str = "/") -> dict[str, list[dict[str, Any]]]:
    """The topology for ``exchange`` in the format of RabbitMQ's definitions export."""
    unrouted, invalid = f"{exchange}.unrouted", f"{exchange}.invalid"

    def _exchange(name: str, kind: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "vhost": vhost,
            "type": kind,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": arguments,
        }

    def _queue(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": QUEUE_ARGUMENTS,
        }

    def _binding(name: str) -> dict[str, Any]:
        return {
            "source": name,
            "vhost": vhost,
            "destination": name,
            "destination_type": "queue",
            "routing_key": "",
            "arguments": {},
        }

    return {
        "exchanges": [
            _exchange(exchange, "topic", {"alternate-exchange": unrouted}),
            _exchange(unrouted, "fanout", {}),
            _exchange(invalid, "fanout", {}),
        ],
        "queues": [_queue(unrouted), _queue(invalid)],
        "bindings": [_binding(unrouted), _binding(invalid)],
    }


async def declare(channel: AbstractChannel, exchange: str) -> Exchanges:
    """Declare every exchange, queue and binding of :func:`describe` on ``channel`` (idempotent)."""
    definitions = describe(exchange)
    declared: dict[str, AbstractExchange] = {}
    for spec in definitions["exchanges"]:
        declared[spec["name"]] = await channel.declare_exchange(
            spec["name"],
            type=aio_pika.ExchangeType(spec["type"]),
            durable=True,
            arguments=spec["arguments"] or None,
        )
    for spec in definitions["queues"]:
        queue = await channel.declare_queue(spec["name"], durable=True, arguments=spec["arguments"])
        await queue.bind(declared[spec["name"]], routing_key="")
    return Exchanges(events=declared[exchange], invalid=declared[f"{exchange}.invalid"])

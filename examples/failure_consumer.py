"""Example downstream consumer: prints every Alibaba Cloud Domain task that failed, as task-bridge publishes it.

    .venv/bin/python examples/failure_consumer.py --amqp-url amqp://bridge:bridge@127.0.0.1:5672/

(the Python of the project's virtual environment, or any Python with ``aio-pika`` installed).

task-bridge publishes one CloudEvents event per task detail to the topic exchange ``domain.tasks`` with the
routing key ``<task type>.<task status>`` in lower case, e.g. ``chg_dns.execute_failure``. This consumer:

* declares its own durable quorum queue, bound with ``*.execute_failure`` (the bridge owns the exchange and its
  arguments, so the consumer only binds to it by name and never re-declares it);
* takes at most ``--prefetch`` unacknowledged messages at a time and acknowledges each by hand, after handling it;
* drops messages whose id it has already handled. The bridge publishes at least once: when the upstream
  acknowledgement fails after the broker confirmed an event, the detail is polled and published again with the
  same message id, and a consumer crash between handling and ack makes the broker redeliver.

The core (:class:`SeenIds`, :func:`parse_failure`, :class:`FailureConsumer`) is importable and tested by
``tests/test_example_consumer.py`` against a real broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

try:
    import aio_pika
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
    from aio_pika.exceptions import AMQPError, ChannelNotFoundEntity
except ModuleNotFoundError as missing:  # a Python without the project's dependencies, e.g. the system's
    sys.exit(
        f"failure_consumer.py needs {missing.name}: run it with the virtual environment's Python "
        "(.venv/bin/python examples/failure_consumer.py) or `pip install aio-pika`"
    )

__all__ = [
    "EXCHANGE",
    "QUEUE",
    "QUEUE_ARGUMENTS",
    "ROUTING_KEY",
    "ConsumerStats",
    "FailureConsumer",
    "SeenIds",
    "TaskFailure",
    "consume",
    "declare_queue",
    "main",
    "parse_failure",
    "print_failure",
]

EXCHANGE = "domain.tasks"
QUEUE = "domain.tasks.failures"
ROUTING_KEY = "*.execute_failure"
# Exactly the arguments of this queue in deploy/rabbitmq/definitions.json: declaring an existing queue with
# different arguments fails with PRECONDITION_FAILED. Quorum: replicated, and it survives a broker restart.
QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


class SeenIds:
    """The most recently handled message ids, at most ``capacity`` of them (least recently used go first).

    In memory, so it forgets everything on restart and is per process: a production consumer keeps the ids in
    a store shared by its replicas (a database table with a unique key, Redis ``SET NX`` with a TTL) or makes
    the side effect itself idempotent.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> bool:
        """Remember ``key``; ``True`` when it is new, ``False`` when it was already there (it becomes recent)."""
        if key in self._ids:
            self._ids.move_to_end(key)
            return False
        self._ids[key] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def discard(self, key: str) -> None:
        """Forget ``key``, so a redelivery of it is handled again."""
        self._ids.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """The parts of a failed task's event this example cares about."""

    event_id: str
    domain: str | None
    task_type: str | None
    error_message: str | None
    task_no: str | None
    task_detail_no: str | None

    def describe(self) -> str:
        """One line for a human."""
        return (
            f"task failed: domain={self.domain or '?'} type={self.task_type or '?'} "
            f"error={self.error_message or '(no message)'} task={self.task_no or '?'} "
            f"detail={self.task_detail_no or '?'}"
        )


def _field(data: dict[str, Any], name: str) -> str | None:
    """``data[name]`` as text; the bridge keeps the upstream's spelling, so fall back to any letter case."""
    value = data.get(name)
    if value is None:
        value = next((v for k, v in data.items() if k.lower() == name.lower()), None)
    return None if value is None or value == "" else str(value)


def parse_failure(body: bytes) -> TaskFailure:
    """Read a CloudEvents (structured JSON) body; :class:`ValueError` when it is not one."""
    try:
        event = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise ValueError("not a JSON object")
    if not isinstance(event.get("id"), str) or not event["id"]:
        raise ValueError("no CloudEvents id")
    data = event.get("data")
    if not isinstance(data, dict):
        raise ValueError("no data object")
    return TaskFailure(
        event_id=event["id"],
        domain=_field(data, "DomainName") or _field(event, "subject"),
        task_type=_field(data, "TaskType"),
        error_message=_field(data, "ErrorMsg"),
        task_no=_field(data, "TaskNo"),
        task_detail_no=_field(data, "TaskDetailNo"),
    )


@dataclass(slots=True)
class ConsumerStats:
    """What happened to the messages delivered so far."""

    handled: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: int = 0

    @property
    def settled(self) -> int:
        """Messages acknowledged or rejected for good (a failed one comes back and is counted again)."""
        return self.handled + self.duplicates + self.rejected


Handler = Callable[[TaskFailure], Awaitable[None]]


async def print_failure(failure: TaskFailure) -> None:
    """The default handler: one line on stdout per failed task."""
    print(failure.describe(), flush=True)


class FailureConsumer:
    """Handles each delivery once per message id, then acknowledges it by hand.

    * a body that is not a CloudEvent is rejected without requeue (it would fail again; give the queue a
      dead-letter exchange to keep such messages);
    * an id already handled is acknowledged without calling the handler;
    * a handler that raises gets the message requeued, and its id is forgotten so the redelivery is handled.
    """

    def __init__(self, handle: Handler = print_failure, seen: SeenIds | None = None) -> None:
        self._handle = handle
        self._seen = seen if seen is not None else SeenIds()
        self.stats = ConsumerStats()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """The ``queue.consume`` callback."""
        try:
            failure = parse_failure(message.body)
        except ValueError as exc:
            print(f"rejecting message {message.message_id!r}: {exc}", file=sys.stderr, flush=True)
            await message.reject(requeue=False)
            self.stats.rejected += 1
            return
        # The message id is the bridge's dedupe key (stable across re-publishes); the event id is the fallback.
        key = message.message_id or failure.event_id
        # Claimed before handling, not after: with prefetch > 1, deliveries are handled concurrently and two
        # copies of one id must not both get through.
        if not self._seen.add(key):
            await message.ack()
            self.stats.duplicates += 1
            return
        try:
            await self._handle(failure)
        except Exception as exc:
            self._seen.discard(key)
            print(f"handler failed for {key!r}, requeueing: {exc!r}", file=sys.stderr, flush=True)
            await message.nack(requeue=True)
            self.stats.failed += 1
            return
        await message.ack()
        self.stats.handled += 1


async def declare_queue(
    channel: AbstractChannel,
    exchange: str = EXCHANGE,
    queue: str = QUEUE,
    routing_key: str = ROUTING_KEY,
) -> AbstractQueue:
    """Declare the consumer's queue and bind it to ``exchange`` (which must exist: the bridge declares it)."""
    # Only checks that the exchange exists (the bridge owns its arguments), before a queue is left behind.
    await channel.declare_exchange(exchange, passive=True)
    declared = await channel.declare_queue(queue, durable=True, arguments=QUEUE_ARGUMENTS)
    await declared.bind(exchange, routing_key=routing_key)
    return declared


async def consume(
    url: str,
    consumer: FailureConsumer,
    stop: asyncio.Event,
    *,
    exchange: str = EXCHANGE,
    queue: str = QUEUE,
    routing_key: str = ROUTING_KEY,
    prefetch: int = 32,
) -> ConsumerStats:
    """Consume until ``stop`` is set, then cancel the consumer and close the connection."""
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        # Bounds the unacknowledged messages (and so the concurrent handler calls) this consumer holds.
        await channel.set_qos(prefetch_count=prefetch)
        declared = await declare_queue(channel, exchange, queue, routing_key)
        tag = await declared.consume(consumer.on_message)
        try:
            await stop.wait()
        finally:
            with contextlib.suppress(AMQPError, ConnectionError):
                await declared.cancel(tag)
    return consumer.stats


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; stops on SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        help="broker URL (default: $AMQP_URL or the local guest broker)",
    )
    parser.add_argument("--exchange", default=EXCHANGE)
    parser.add_argument("--queue", default=QUEUE)
    parser.add_argument("--routing-key", default=ROUTING_KEY)
    parser.add_argument("--prefetch", type=int, default=32)
    args = parser.parse_args(argv)

    async def run() -> ConsumerStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await consume(
            args.amqp_url,
            FailureConsumer(),
            stop,
            exchange=args.exchange,
            queue=args.queue,
            routing_key=args.routing_key,
            prefetch=args.prefetch,
        )

    try:
        stats = asyncio.run(run())
    except ChannelNotFoundEntity:
        print(
            f"failure_consumer.py: exchange {args.exchange!r} does not exist: start task-bridge (run or demo) "
            "once, it declares it, or pass --exchange",
            file=sys.stderr,
        )
        return 1
    except (AMQPError, OSError) as exc:
        reason = " ".join(str(exc).split())
        print(f"failure_consumer.py: cannot consume: {type(exc).__name__}: {reason}", file=sys.stderr)
        return 1
    print(
        f"stopped: {stats.handled} handled, {stats.duplicates} duplicates, {stats.rejected} rejected",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

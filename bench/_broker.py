"""The bench's broker objects: unique exchanges with one durable queue bound ``#``, counted and deleted after.

Every exchange and queue the bench declares is recorded before it is declared, so :meth:`BenchBroker.cleanup`
deletes it even when the run fails or is interrupted half way through a phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from bridge.topology import declare

__all__ = ["BenchBroker", "bench_broker"]

_CONNECT_TIMEOUT_S = 15.0
_CLEANUP_PATIENCE_S = 90.0  # a broker restarted by someone else's test is back within that


class BenchBroker:
    """Declares the bench's exchanges and queues on one connection, and deletes all of them at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self.run_id = uuid.uuid4().hex[:12]
        self._exchanges: list[str] = []
        self._queues: list[str] = []

    async def _open(self) -> AbstractChannel:
        # Reopened when closed: other work on the same broker may restart it between two phases.
        if self._connection is None or self._connection.is_closed:
            self._connection = await aio_pika.connect(self.url, timeout=_CONNECT_TIMEOUT_S)
            self._channel = None
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def _open_patiently(self) -> None:
        deadline = time.monotonic() + _CLEANUP_PATIENCE_S
        while True:
            try:
                await self._open()
                return
            except (OSError, aiormq.exceptions.AMQPError, RuntimeError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    names = ", ".join(self._queues + self._exchanges)
                    raise RuntimeError(
                        f"cannot reach the broker to delete the bench's objects ({names}): {exc}"
                    ) from None
                await asyncio.sleep(2)

    async def close(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = self._channel = None

    def name(self, phase: str) -> str:
        """A unique exchange name for ``phase`` (``bench.<run id>.<phase>``)."""
        return f"bench.{self.run_id}.{phase}"

    async def plain_topic(self, exchange: str) -> str:
        """A durable topic exchange with one durable queue bound ``#`` (the raw ceiling's); returns the queue."""
        queue = f"{exchange}.all"
        self._exchanges.append(exchange)
        self._queues.append(queue)
        channel = await self._open()
        declared = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await (await channel.declare_queue(queue, durable=True)).bind(declared, routing_key="#")
        return queue

    async def bridge_topology(self, exchange: str) -> str:
        """The bridge's own topology for ``exchange`` plus one durable queue bound ``#``; returns the queue."""
        queue = f"{exchange}.all"
        self._exchanges += [exchange, f"{exchange}.unrouted", f"{exchange}.invalid"]
        self._queues += [queue, f"{exchange}.unrouted", f"{exchange}.invalid"]
        channel = await self._open()
        exchanges = await declare(channel, exchange)
        await (await channel.declare_queue(queue, durable=True)).bind(exchanges.events, routing_key="#")
        return queue

    async def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` now."""
        declared = await (await self._open()).declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)

    async def connect(self) -> AbstractConnection:
        """A further connection to the same broker (the latency phase's consumer)."""
        return await aio_pika.connect(self.url, timeout=_CONNECT_TIMEOUT_S)

    async def cleanup(self) -> None:
        """Delete every queue and exchange this bench declared (best effort: one channel per deletion)."""
        if not self._queues and not self._exchanges:
            return
        await self._open_patiently()
        assert self._connection is not None
        for kind, names in (("queue", self._queues), ("exchange", self._exchanges)):
            for name in names:
                with contextlib.suppress(Exception):
                    channel = await self._connection.channel()
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                    await channel.close()
        self._queues.clear()
        self._exchanges.clear()


@contextlib.asynccontextmanager
async def bench_broker(url: str) -> AsyncIterator[BenchBroker]:
    """A :class:`BenchBroker` whose objects are deleted on the way out, however the body ends."""
    broker = BenchBroker(url)
    try:
        yield broker
    finally:
        try:
            await broker.cleanup()
        finally:
            await broker.close()

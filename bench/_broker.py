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
from _procs import PhaseError
from aio_pika.abc import AbstractChannel, AbstractConnection

from bridge.topology import declare

__all__ = ["BenchBroker", "bench_broker"]

_CONNECT_TIMEOUT_S = 15.0
_CLEANUP_PATIENCE_S = 90.0  # a broker restarted by someone else's test is back within that
# A RuntimeError too: aiormq raises ChannelInvalidStateError (a RuntimeError) on a channel the broker closed.
_BROKER_ERRORS = (OSError, aiormq.exceptions.AMQPError, RuntimeError, TimeoutError)


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
        try:
            if self._connection is None or self._connection.is_closed:
                self._connection = await aio_pika.connect(self.url, timeout=_CONNECT_TIMEOUT_S)
                self._channel = None
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel()
        except Exception:
            # A connection can look open after the broker dropped it: start afresh next time.
            await self.close()
            raise
        return self._channel

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()

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
        """Delete every queue and exchange this bench declared; raise ``PhaseError`` naming what is left.

        Patient: a broker restarted by someone else's test is waited for (durable objects survive it).
        """
        deadline = time.monotonic() + _CLEANUP_PATIENCE_S
        for kind, names in (("queue", self._queues), ("exchange", self._exchanges)):
            while names:
                try:
                    await self._open()
                    assert self._connection is not None
                    channel = await self._connection.channel()  # its own channel: a failure closes it
                    if kind == "queue":
                        await channel.queue_delete(names[0])
                    else:
                        await channel.exchange_delete(names[0])
                    await channel.close()
                    names.pop(0)
                except _BROKER_ERRORS as exc:
                    await self.close()
                    if time.monotonic() > deadline:
                        left = ", ".join(self._queues + self._exchanges)
                        raise PhaseError(f"cannot delete the bench's broker objects ({left}): {exc}") from None
                    await asyncio.sleep(2)


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

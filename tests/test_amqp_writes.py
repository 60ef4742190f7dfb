"""The broker connection's writing path: the frames queued together leave in one socket write, in order.

The first part drives the write queue alone (no broker); the second publishes on the real broker through
:func:`bridge.amqp.connect` and counts the writes that reach the socket.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import aio_pika
import aiormq
import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec

from bridge import amqp
from bridge.settings import load_settings


def frame(payload: bytes, *, close: bool = False, drain: asyncio.Future[None] | None = None) -> ChannelFrame:
    return ChannelFrame(payload=payload, should_close=close, drain_future=drain)


async def test_the_frames_queued_together_come_out_as_one_in_order() -> None:
    queue = amqp._CoalescingQueue(maxsize=100)
    for n in range(5):
        queue.put_nowait(frame(b"%d;" % n))
    batch = await queue.get()
    queue.task_done()  # as aiormq's writer does, once per frame it gets
    assert batch.payload == b"0;1;2;3;4;"
    assert not batch.should_close and not batch.should_drain
    assert queue.empty()
    await asyncio.wait_for(queue.join(), 1)  # every frame put is done: nothing counted twice or left over


async def test_a_lone_frame_is_handed_over_as_it_is() -> None:
    queue = amqp._CoalescingQueue(maxsize=10)
    alone = frame(b"x")
    queue.put_nowait(alone)
    assert await queue.get() is alone


async def test_a_closing_frame_ends_its_batch() -> None:
    queue = amqp._CoalescingQueue(maxsize=10)
    for item in (frame(b"a"), frame(b"close", close=True), frame(b"after")):
        queue.put_nowait(item)
    first = await queue.get()
    assert (first.payload, first.should_close) == (b"aclose", True)
    assert (await queue.get()).payload == b"after"


async def test_each_sender_waiting_for_its_write_is_released_by_the_batch() -> None:
    loop = asyncio.get_running_loop()
    waiting = [loop.create_future() for _ in range(2)]
    queue = amqp._CoalescingQueue(maxsize=10)
    for item in (frame(b"a", drain=waiting[0]), frame(b"b"), frame(b"c", drain=waiting[1])):
        queue.put_nowait(item)
    batch = await queue.get()
    assert batch.should_drain
    batch.drain()  # what aiormq's writer calls once the batch's write has drained
    assert all(future.done() for future in waiting)
    assert not batch.should_drain


async def test_a_batch_stops_at_the_byte_limit() -> None:
    queue = amqp._CoalescingQueue(maxsize=1000)
    chunk = b"x" * (64 * 1024)
    for _ in range(10):
        queue.put_nowait(frame(chunk))
    sizes = []
    while not queue.empty():
        sizes.append(len((await queue.get()).payload))
    assert sum(sizes) == 10 * len(chunk)
    assert len(sizes) > 1 and max(sizes) <= amqp._WRITE_MAX_BYTES + len(chunk)


# --- on the real broker ---
@pytest.fixture
def writes() -> Iterator[list[int]]:
    """The size of every write the next connection's socket gets."""
    sizes: list[int] = []
    original = amqp._Transports.create

    async def counting(self: amqp._Transports, *args: Any, **kwargs: Any) -> Any:
        reader, writer = await original(self, *args, **kwargs)
        transport = writer.transport
        write = transport.write

        def counted(data: Any) -> None:
            sizes.append(len(data))
            write(data)

        transport.write = counted  # type: ignore[method-assign]
        return reader, writer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(amqp._Transports, "create", counting)
        yield sizes


async def test_a_window_of_publishes_leaves_in_a_few_writes_and_arrives_in_order(
    broker_url: str, writes: list[int]
) -> None:
    name = f"test.writes.{uuid.uuid4().hex[:12]}"
    settings = load_settings(amqp_url=broker_url)
    connection = await amqp.connect(settings.broker)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, auto_delete=True)
        queue = await channel.declare_queue(name, exclusive=True)
        await queue.bind(exchange)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        before = len(writes)

        async def publish(n: int) -> Any:
            body = b"%04d" % n
            return await underlay.basic_publish(body, exchange=name, routing_key="", wait=False)

        count = 500
        confirms = await asyncio.gather(*(publish(n) for n in range(count)))
        assert all(isinstance(confirm, spec.Basic.Ack) for confirm in confirms)
        # One send per message without coalescing; the publishes of one loop iteration share a write.
        assert len(writes) - before < count / 10, writes[before:]
        received = []
        async with queue.iterator() as messages:
            async for message in messages:
                received.append(message.body)
                await message.ack()
                if len(received) == count:
                    break
        assert received == [b"%04d" % n for n in range(count)]
    finally:
        await connection.close()

"""examples/failure_consumer.py: its dedupe and parsing, and a run against the real broker."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aio_pika
import pytest

from bridge.events import Event, convert
from bridge.records import RawRecord

ROOT = Path(__file__).resolve().parents[1]


def _load_example() -> ModuleType:
    path = ROOT / "examples" / "failure_consumer.py"
    spec = importlib.util.spec_from_file_location("failure_consumer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before executing: dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fc = _load_example()


def _detail(detail_no: str, **data: Any) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "TaskDetailNo": detail_no,
        "TaskNo": "task-1",
        "TaskType": "CHG_DNS",
        "TaskTypeDescription": "DNS Modification",
        "InstanceId": "S201817141000000",
        "DomainName": "example.com",
        "TaskStatus": "EXECUTE_FAILURE",
        "TaskStatusCode": 3,
        "TaskResult": "",
        "ErrorMsg": "DNS server unreachable",
        "TryCount": 3,
        "CreateTime": "2018-03-26 15:08:20",
        "UpdateTime": "2018-03-26 15:22:18",
    }
    detail.update(data)
    return detail


def _bridge_event(detail: dict[str, Any]) -> Event:
    """The event the bridge itself builds for ``detail`` (the real contract, not a hand-made copy)."""
    event = convert(RawRecord(raw=detail, detail_no=detail["TaskDetailNo"]), source="urn:test", account="default")
    assert isinstance(event, Event), event
    return event


def _event(detail_no: str, **data: Any) -> bytes:
    return _bridge_event(_detail(detail_no, **data)).body


# --- no broker ---


def test_seen_ids_drops_the_least_recently_used() -> None:
    seen = fc.SeenIds(capacity=2)
    assert seen.add("a") and seen.add("b")
    assert not seen.add("a")  # a duplicate, and now the most recent
    assert seen.add("c")  # evicts b, not a
    assert "a" in seen and "c" in seen and "b" not in seen
    assert len(seen) == 2
    seen.discard("a")
    assert seen.add("a")
    with pytest.raises(ValueError):
        fc.SeenIds(capacity=0)


def test_parse_failure_reads_the_cloudevent() -> None:
    failure = fc.parse_failure(_event("d-1"))
    assert (failure.event_id, failure.domain, failure.task_type) == ("d-1", "example.com", "CHG_DNS")
    assert failure.error_message == "DNS server unreachable"
    assert failure.task_detail_no == "d-1" and failure.task_no == "task-1"
    assert "example.com" in failure.describe() and "DNS server unreachable" in failure.describe()
    # Field names in another letter case (the bridge keeps the upstream's spelling).
    event = json.loads(_event("d-3"))
    event["data"] = {k.lower(): v for k, v in event["data"].items()}
    assert fc.parse_failure(json.dumps(event).encode()).task_type == "CHG_DNS"
    # No DomainName in the data: the event's subject names the domain.
    event = json.loads(_event("d-2"))
    del event["data"]["DomainName"]
    event["subject"] = "other.example"
    assert fc.parse_failure(json.dumps(event).encode()).domain == "other.example"


@pytest.mark.parametrize(
    "body",
    [b"not json", b"\xff\xfe", b"[1, 2]", b'{"data": {}}', b'{"id": "x", "data": "text"}', b'{"id": ""}'],
)
def test_parse_failure_rejects_what_is_no_cloudevent(body: bytes) -> None:
    with pytest.raises(ValueError):
        fc.parse_failure(body)


def test_defaults_match_the_demo_definitions() -> None:
    definitions = json.loads((ROOT / "deploy" / "rabbitmq" / "definitions.json").read_text())
    queue = next(q for q in definitions["queues"] if q["name"] == fc.QUEUE)
    assert queue["arguments"] == fc.QUEUE_ARGUMENTS and queue["durable"] is True
    binding = next(b for b in definitions["bindings"] if b["destination"] == fc.QUEUE)
    assert (binding["source"], binding["routing_key"]) == (fc.EXCHANGE, fc.ROUTING_KEY)


# --- against the broker ---


@pytest.fixture
async def failures_topology(
    amqp: aio_pika.abc.AbstractRobustConnection, exchange_name: str
) -> AsyncIterator[tuple[str, str, aio_pika.abc.AbstractExchange]]:
    """A temporary topic exchange (as the bridge would declare it) and the name the consumer's queue gets."""
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, auto_delete=True)
    queue_name = f"{exchange_name}.failures"
    try:
        yield exchange_name, queue_name, exchange
    finally:
        await channel.queue_delete(queue_name)
        await channel.exchange_delete(exchange_name)
        await channel.close()


async def _publish(exchange: aio_pika.abc.AbstractExchange, body: bytes, message_id: str, key: str) -> None:
    message = aio_pika.Message(
        body,
        message_id=message_id,
        content_type="application/cloudevents+json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await exchange.publish(message, routing_key=key)


async def _remaining(amqp: aio_pika.abc.AbstractRobustConnection, queue_name: str) -> int:
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count
    finally:
        await channel.close()


class _Watched(fc.FailureConsumer):  # type: ignore[misc, name-defined]
    """The example's consumer, plus an event set once ``target`` deliveries are settled."""

    def __init__(self, handle: Any, target: int) -> None:
        super().__init__(handle)
        self.target = target
        self.done = asyncio.Event()

    async def on_message(self, message: Any) -> None:
        await super().on_message(message)
        if self.stats.settled >= self.target:
            self.done.set()


async def _run_until_settled(broker_url: str, consumer: _Watched, exchange_name: str, queue_name: str) -> Any:
    """Run the example's consume loop until the consumer has settled its target, then stop it."""
    stop = asyncio.Event()
    run = asyncio.create_task(
        fc.consume(broker_url, consumer, stop, exchange=exchange_name, queue=queue_name, prefetch=8)
    )
    waiter = asyncio.create_task(consumer.done.wait())
    try:
        async with asyncio.timeout(10):
            await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        waiter.cancel()
    return await run


async def _declared(
    amqp: aio_pika.abc.AbstractRobustConnection, exchange_name: str, queue_name: str
) -> aio_pika.abc.AbstractChannel:
    channel = await amqp.channel()
    await fc.declare_queue(channel, exchange_name, queue_name)
    return channel


@pytest.mark.broker
async def test_consumer_handles_each_message_id_once_and_acks_everything(
    broker_url: str,
    amqp: aio_pika.abc.AbstractRobustConnection,
    failures_topology: tuple[str, str, aio_pika.abc.AbstractExchange],
) -> None:
    exchange_name, queue_name, exchange = failures_topology
    channel = await _declared(amqp, exchange_name, queue_name)
    await channel.close()
    first, second = f"d-{uuid.uuid4().hex}", f"d-{uuid.uuid4().hex}"
    events = [
        _bridge_event(_detail(first)),
        _bridge_event(_detail(first)),  # a re-publish: same message id
        _bridge_event(_detail(second, TaskType="ORDER_RENEW")),
        # A success is not bound to the failures queue.
        _bridge_event(_detail(f"d-{uuid.uuid4().hex}", TaskStatus="EXECUTE_SUCCESS", TaskStatusCode=2)),
    ]
    for event in events:
        await exchange.publish(event.message(), routing_key=event.routing_key)
    assert await _remaining(amqp, queue_name) == 3

    handled: list[Any] = []

    async def handle(failure: Any) -> None:
        handled.append(failure)

    consumer = _Watched(handle, target=3)
    stats = await _run_until_settled(broker_url, consumer, exchange_name, queue_name)

    assert sorted(f.event_id for f in handled) == sorted([first, second])
    assert {f.task_type for f in handled} == {"CHG_DNS", "ORDER_RENEW"}
    assert {(f.domain, f.error_message) for f in handled} == {("example.com", "DNS server unreachable")}
    assert (stats.handled, stats.duplicates, stats.rejected, stats.failed) == (2, 1, 0, 0)
    # Unacknowledged messages go back to the queue when the consumer's connection closes: none did.
    assert await _remaining(amqp, queue_name) == 0


@pytest.mark.broker
async def test_consumer_requeues_on_handler_error_and_rejects_garbage(
    broker_url: str,
    amqp: aio_pika.abc.AbstractRobustConnection,
    failures_topology: tuple[str, str, aio_pika.abc.AbstractExchange],
    capsys: pytest.CaptureFixture[str],
) -> None:
    exchange_name, queue_name, exchange = failures_topology
    channel = await _declared(amqp, exchange_name, queue_name)
    await channel.close()
    detail = f"d-{uuid.uuid4().hex}"
    await _publish(exchange, b"not a cloudevent", "garbage", "chg_dns.execute_failure")
    await _publish(exchange, _event(detail), detail, "chg_dns.execute_failure")

    calls: list[str] = []

    async def flaky(failure: Any) -> None:
        calls.append(failure.event_id)
        if len(calls) == 1:
            raise RuntimeError("downstream store unavailable")

    consumer = _Watched(flaky, target=2)
    stats = await _run_until_settled(broker_url, consumer, exchange_name, queue_name)

    # The failed attempt forgot the id, so the redelivery was handled rather than dropped as a duplicate.
    assert calls == [detail, detail]
    assert (stats.handled, stats.duplicates, stats.rejected, stats.failed) == (1, 0, 1, 1)
    assert await _remaining(amqp, queue_name) == 0
    err = capsys.readouterr().err
    assert "rejecting message 'garbage'" in err and "requeueing" in err


async def test_print_handler_writes_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    await fc.print_failure(fc.parse_failure(_event("d-9")))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "domain=example.com" in out and "type=CHG_DNS" in out

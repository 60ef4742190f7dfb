"""Helpers for the integration tests: settings for a bridge under test, its queues, and what reached them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from bridge.app import App
from bridge.metrics import Metrics
from bridge.settings import Settings, load_settings
from bridge.simulator import Simulator
from bridge.topology import declare
from bridge.upstream import UpstreamClient

SIM_KEY_ID = "sim-access-key-id"
SIM_KEY_SECRET = "sim-access-key-secret"


def bridge_settings(exchange: str, amqp_url: str, **overrides: Any) -> Settings:
    """Settings for a bridge under test: fast polls and backoff, an ephemeral operator port."""
    values: dict[str, Any] = {
        "access_key_id": SIM_KEY_ID,
        "access_key_secret": SIM_KEY_SECRET,
        "upstream_endpoint": "http://simulator.test",
        "amqp_url": amqp_url,
        "exchange": exchange,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "poll_interval_s": 0.2,
        "backoff_initial_s": 0.02,
        "backoff_max_s": 0.3,
        "request_timeout_s": 2.0,
        "publish_timeout_s": 5.0,
        "shutdown_timeout_s": 10.0,
        "once_deadline_s": 30.0,
    }
    values.update(overrides)
    if "accounts" in values:  # several accounts: each brings its credentials and endpoint
        for key in ("access_key_id", "access_key_secret"):
            values.pop(key)
    return load_settings(**values)


def bridge_env(settings: Settings) -> dict[str, str]:
    """The environment that configures a ``task-bridge`` subprocess like ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "ALIBABA_CLOUD_"))}
    env.update(
        {
            "ALIBABA_CLOUD_ACCESS_KEY_ID": SIM_KEY_ID,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SIM_KEY_SECRET,
            "BRIDGE_UPSTREAM_ENDPOINT": settings.account.base_url,
            "BRIDGE_AMQP_URL": settings.broker.amqp_url.get_secret_value(),
            "BRIDGE_EXCHANGE": settings.broker.exchange,
            "BRIDGE_METRICS_HOST": "127.0.0.1",
            "BRIDGE_METRICS_PORT": "0",
            "BRIDGE_PAGE_SIZE": str(settings.upstream.page_size),
            "BRIDGE_POLL_INTERVAL_SECONDS": str(settings.delivery.poll_interval_s),
            "BRIDGE_BACKOFF_INITIAL_SECONDS": str(settings.delivery.backoff_initial_s),
            "BRIDGE_BACKOFF_MAX_SECONDS": str(settings.delivery.backoff_max_s),
            "BRIDGE_REQUEST_TIMEOUT_SECONDS": str(settings.upstream.request_timeout_s),
            "BRIDGE_SHUTDOWN_TIMEOUT_SECONDS": str(settings.delivery.shutdown_timeout_s),
            "BRIDGE_PUBLISH_TIMEOUT_SECONDS": str(settings.broker.publish_timeout_s),
            "BRIDGE_ONCE_DEADLINE_SECONDS": str(settings.delivery.once_deadline_s),
            "BRIDGE_MAX_IN_FLIGHT": str(settings.broker.max_in_flight),
            "BRIDGE_ACK_BATCH_SIZE": str(settings.upstream.ack_batch_size),
        }
    )
    return env


BRIDGE_COMMAND = [sys.executable, "-m", "bridge"]


@dataclass
class Received:
    """Messages taken from the test's queues, by queue name."""

    messages: dict[str, list[AbstractIncomingMessage]] = field(default_factory=dict)

    def ids(self, queue: str) -> list[str]:
        return [str(m.message_id) for m in self.messages.get(queue, [])]


class Broker:
    """The test's view of the broker: the bridge's topology for one exchange, plus queues bound to it."""

    def __init__(self, channel: AbstractChannel, exchange: str) -> None:
        self.channel = channel
        self.exchange = exchange
        self.queues: dict[str, AbstractQueue] = {}

    @property
    def unrouted(self) -> str:
        return f"{self.exchange}.unrouted"

    @property
    def invalid(self) -> str:
        return f"{self.exchange}.invalid"

    async def declare(self) -> None:
        await declare(self.channel, self.exchange)
        for name in (self.unrouted, self.invalid):
            self.queues[name] = await self.channel.get_queue(name)

    async def bind(self, name: str, pattern: str = "#", arguments: dict[str, Any] | None = None) -> AbstractQueue:
        """A queue of the test, bound to the events exchange with ``pattern``."""
        queue = await self.channel.declare_queue(f"{self.exchange}.{name}", durable=True, arguments=arguments)
        await queue.bind(self.exchange, routing_key=pattern)
        self.queues[queue.name] = queue
        return queue

    async def take(self, queue: str) -> list[AbstractIncomingMessage]:
        """Every message now in ``queue``, removed from it."""
        found: list[AbstractIncomingMessage] = []
        q = self.queues[queue]
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            found.append(message)
        return found

    async def wait_for(self, queue: str, count: int, timeout_s: float = 20.0) -> list[AbstractIncomingMessage]:
        """Take messages from ``queue`` until ``count`` arrived (or the timeout passed)."""
        found: list[AbstractIncomingMessage] = []
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            batch = await self.take(queue)
            found.extend(batch)
            if not batch:
                await asyncio.sleep(0.05)
        return found

    async def cleanup(self) -> None:
        for name in list(self.queues):
            with contextlib.suppress(Exception):
                await self.channel.queue_delete(name)
        for name in (self.exchange, self.unrouted, self.invalid):
            with contextlib.suppress(Exception):
                await self.channel.exchange_delete(name)


@contextlib.asynccontextmanager
async def broker_view(amqp_url: str, exchange: str) -> AsyncIterator[Broker]:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        view = Broker(channel, exchange)
        await view.declare()
        try:
            yield view
        finally:
            await view.cleanup()
    finally:
        await connection.close()


def asgi_client(sim: Simulator) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=sim))


async def run_once(settings: Settings, sim: Simulator, metrics: Metrics | None = None) -> bool:
    """Run ``task-bridge run --once`` in-process against ``sim`` over ASGI."""
    async with asgi_client(sim) as http:
        return await App(settings, metrics=metrics, http=http).run(asyncio.Event(), once=True)


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings, sim: Simulator) -> AsyncIterator[tuple[App, asyncio.Event]]:
    """Run the bridge in-process (not --once) for the body of the ``async with``; stop it afterwards."""
    stop = asyncio.Event()
    async with asgi_client(sim) as http:
        app = App(settings, http=http)
        task = asyncio.create_task(app.run(stop))
        try:
            await asyncio.wait_for(app.started.wait(), 10)
            yield app, stop
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 20.0, what: str = "") -> None:
    """Wait until ``check()`` is true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or check}")


def body(message: AbstractIncomingMessage) -> Any:
    return json.loads(message.body)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of the exported samples ``name`` whose labels include ``labels`` (over every account, unless
    ``account=`` is given); 0 when none has been exported yet."""
    return sum(
        s.value
        for metric in metrics.registry.collect()
        for s in metric.samples
        if s.name == name and all(s.labels.get(key) == value for key, value in labels.items())
    )


def upstream_client(
    http: httpx.AsyncClient, settings: Settings, *, metrics: Metrics | None = None, **options: Any
) -> UpstreamClient:
    """The upstream client of the first account of ``settings``, counting into ``metrics`` when given."""
    account = settings.account
    account_metrics = metrics.account(account.name) if metrics is not None else None
    return UpstreamClient(http, settings.upstream, account, metrics=account_metrics, **options)

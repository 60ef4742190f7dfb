"""Tools of the fault-injection suite: a TCP proxy that cuts and stalls, a restart of a private broker node, the
test's queues, a tally of what each side saw, and the table of results printed at the end of the pytest run.

The table lives in ``config.stash`` (no module state): the ``fault_table`` fixture adds rows, and
``pytest_terminal_summary`` in conftest.py calls :func:`report_fault_table`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from bridge.app import App
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.simulator import Simulator
from bridge.topology import declare
from tests.harness import BRIDGE_COMMAND
from tests.private_broker import PrivateNode

__all__ = [
    "FAULT_TABLE",
    "TABLE_PATH",
    "BackgroundDrain",
    "FaultTable",
    "Row",
    "ScenarioQueues",
    "Tally",
    "TcpProxy",
    "TooManyDuplicates",
    "amqp_port",
    "draining",
    "node_app_stopped",
    "report_fault_table",
    "scenario_queues",
    "start_bridge",
    "tally",
]

TABLE_PATH = Path(__file__).parent / ".fault-table.md"

# --- the table -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One scenario's result: how many details, how many lost and duplicated (and the bound), how long."""

    scenario: str
    details: int
    lost: int
    duplicates: int
    allowed_duplicates: int
    seconds: float


@dataclass
class FaultTable:
    """The rows of this pytest run, in the order the scenarios ran."""

    rows: list[Row] = field(default_factory=list)

    def add(self, scenario: str, result: Tally, seconds: float, allowed_duplicates: int = 0) -> None:
        self.rows.append(
            Row(scenario, result.details, result.lost, result.duplicates, allowed_duplicates, round(seconds, 1))
        )

    def markdown(self) -> str:
        """The rows as a markdown table, ready to paste into the README."""
        lines = [
            "| scenario | details | lost | duplicates (allowed) | seconds |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in self.rows:
            dupes = f"{row.duplicates} (≤ {row.allowed_duplicates})" if row.allowed_duplicates else str(row.duplicates)
            lines.append(f"| {row.scenario} | {row.details} | {row.lost} | {dupes} | {row.seconds:.1f} |")
        return "\n".join(lines) + "\n"


FAULT_TABLE = pytest.StashKey[FaultTable]()


def report_fault_table(terminalreporter: Any, config: pytest.Config) -> None:
    """Print the table and write it to ``tests/.fault-table.md``, when any fault scenario recorded a row."""
    table = config.stash.get(FAULT_TABLE, None)
    if table is None or not table.rows:
        return
    text = table.markdown()
    TABLE_PATH.write_text(text, encoding="utf-8")
    terminalreporter.write_sep("=", "fault-injection scenarios")
    terminalreporter.write(text)
    terminalreporter.write_line(f"(also written to {TABLE_PATH})")


# --- what each side saw --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """The simulator's acknowledgements against the messages found in the test's queues."""

    details: int
    lost: int
    """Acknowledged upstream, but neither an event nor an invalid record reached a queue."""
    duplicates: int
    """Copies beyond the first of one message id, over the events and the invalid queue."""
    unacknowledged: int
    """Message ids in the queues whose detail the upstream never saw acknowledged."""
    misrouted: int
    """Malformed records not in the invalid queue, other records in it, and ids found in both queues."""


class TooManyDuplicates(AssertionError):
    """More copies of one detail than the scenario's bound allows (its own type, so an xfail can name it)."""


def tally(sim: Simulator, details: int, events: Sequence[str], invalid: Sequence[str]) -> Tally:
    """Compare ``sim``'s record of acknowledgements with the ids of ``events`` and ``invalid`` records."""
    acknowledged = set(sim.ack_counts)
    event_ids, invalid_ids = set(events), set(invalid)
    found = event_ids | invalid_ids
    copies = Counter(events) + Counter(invalid)
    return Tally(
        details=details,
        lost=len(acknowledged - found),
        duplicates=sum(n - 1 for n in copies.values()),
        unacknowledged=len(found - acknowledged),
        misrouted=len(sim.malformed_ids ^ invalid_ids) + len(event_ids & invalid_ids),
    )


# --- the test's queues ---------------------------------------------------------------------------------------


class ScenarioQueues:
    """The bridge's topology for one exchange, a queue of the test bound ``#``, and what reached them.

    Each operation opens its own connection, so the view survives a broker restart in the middle of a test.
    """

    def __init__(self, amqp_url: str, exchange: str) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.events = f"{exchange}.all"
        self.invalid = f"{exchange}.invalid"
        self.unrouted = f"{exchange}.unrouted"

    async def declare(self, arguments: dict[str, Any] | None = None) -> None:
        """Declare the bridge's topology and the events queue (with ``arguments``), before the bridge starts."""
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            await declare(channel, self.exchange)
            queue = await channel.declare_queue(self.events, durable=True, arguments=arguments)
            await queue.bind(self.exchange, routing_key="#")

    async def take(self, queue: str, timeout_s: float = 30.0) -> list[str]:
        """The message ids of every message now in ``queue``, removed from it."""
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            declared = await channel.declare_queue(queue, passive=True)
            expected = declared.declaration_result.message_count or 0
            ids: list[str] = []
            if expected:
                enough = asyncio.Event()

                async def on_message(message: AbstractIncomingMessage) -> None:
                    ids.append(str(message.message_id))
                    await message.ack()
                    if len(ids) >= expected:
                        enough.set()

                tag = await declared.consume(on_message)
                await asyncio.wait_for(enough.wait(), timeout_s)
                await declared.cancel(tag)
            # Anything the consumer did not get (it stopped at the count it saw at the start).
            while (message := await declared.get(no_ack=True, fail=False)) is not None:
                ids.append(str(message.message_id))
            return ids

    @contextlib.asynccontextmanager
    async def consuming(self, queue: str) -> AsyncIterator[list[str]]:
        """Consume ``queue`` while the body runs; yields the list of message ids received so far."""
        ids: list[str] = []
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=500)
            declared = await channel.declare_queue(queue, passive=True)

            async def on_message(message: AbstractIncomingMessage) -> None:
                ids.append(str(message.message_id))
                await message.ack()

            tag = await declared.consume(on_message)
            try:
                yield ids
            finally:
                await declared.cancel(tag)

    async def tally(self, sim: Simulator, details: int, taken: Sequence[str] = ()) -> Tally:
        """Take both queues and compare them, with the events ``taken`` earlier, to what ``sim`` acknowledged."""
        events = [*taken, *await self.take(self.events)]
        return tally(sim, details, events, await self.take(self.invalid))

    async def cleanup(self) -> None:
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            for name in (self.events, self.invalid, self.unrouted):
                await channel.queue_delete(name)
            for name in (self.exchange, self.unrouted, self.invalid):
                await channel.exchange_delete(name)


@contextlib.asynccontextmanager
async def scenario_queues(
    amqp_url: str, exchange: str, arguments: dict[str, Any] | None = None
) -> AsyncIterator[ScenarioQueues]:
    """A declared :class:`ScenarioQueues`, deleted afterwards."""
    queues = ScenarioQueues(amqp_url, exchange)
    await queues.declare(arguments)
    try:
        yield queues
    finally:
        await queues.cleanup()


# --- the bridge, in-process or as a process ------------------------------------------------------------------


@dataclass
class BackgroundDrain:
    """``run --once`` of an in-process bridge, running as a task while the test injects faults."""

    app: App
    task: asyncio.Task[bool]

    async def finished(self, timeout_s: float = 60.0) -> bool:
        """Wait for the drain; True when nothing confirmed was left unacknowledged."""
        return await asyncio.wait_for(asyncio.shield(self.task), timeout_s)


@contextlib.asynccontextmanager
async def draining(
    settings: Settings, sim: Simulator, metrics: Metrics, *, asgi: bool = True
) -> AsyncIterator[BackgroundDrain]:
    """Start ``run --once`` in-process (over ASGI, or over real HTTP to the account's endpoint); stop it after."""
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        http = None
        if asgi:
            http = await stack.enter_async_context(httpx.AsyncClient(transport=httpx.ASGITransport(app=sim)))
        app = App(settings, metrics=metrics, http=http)
        task = asyncio.create_task(app.run(stop, once=True))
        try:
            yield BackgroundDrain(app, task)
        finally:
            if not task.done():
                stop.set()
                await asyncio.wait([task], timeout=settings.delivery.shutdown_timeout_s + 5)
                task.cancel()
            with contextlib.suppress(BaseException):
                await task  # retrieve its outcome; a failure was already reported by finished()


async def start_bridge(env: dict[str, str], log_path: Path, *args: str) -> asyncio.subprocess.Process:
    """``task-bridge ARGS`` as a process, its output appended to ``log_path`` (a full pipe would block it)."""
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(*BRIDGE_COMMAND, *args, env=env, stdout=log, stderr=log)


# --- the broker ----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def node_app_stopped(node: PrivateNode) -> AsyncIterator[None]:
    """Stop the RabbitMQ application of a private node for the body (the node stays up); start it again after.

    Only ever a private node: the machine's broker is shared and is never stopped.
    """
    await asyncio.to_thread(node.stop_app)
    try:
        yield
    finally:
        await asyncio.to_thread(node.start_app)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the broker; :meth:`cut` closes every connection, :meth:`stall` holds bytes.

    A stall keeps the connections open and stops reading from both sides: bytes wait in the socket buffers
    and are forwarded, in order, after :meth:`resume`, as on a congested or partitioned network.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0
        """Connections accepted so far (a reconnecting client makes it grow)."""
        self.cuts = 0

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.resume()
        self._abort_all()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        await self._server.wait_closed()

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` with its host and port replaced by the proxy's."""
        scheme, _, rest = amqp_url.partition("://")
        credentials, _, location = rest.rpartition("@")
        vhost = location.partition("/")[2]
        return f"{scheme}://{credentials}@127.0.0.1:{self.port}/{vhost}"

    def cut(self) -> int:
        """Reset every open connection (both sides); returns how many were cut."""
        self.cuts += 1
        count = len(self._links)
        self._abort_all()
        return count

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def _abort_all(self) -> None:
        for pair in list(self._links):
            for writer in pair:
                writer.transport.abort()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(*self._target)
            except OSError:
                client_writer.transport.abort()
                return
            pair = (client_writer, server_writer)
            self._links.add(pair)
            pumps = [
                asyncio.create_task(self._pump(client_reader, server_writer)),
                asyncio.create_task(self._pump(server_reader, client_writer)),
            ]
            try:
                # When one side ends, end the other: the proxy never half-closes.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._links.discard(pair)
                for writer in pair:
                    writer.transport.abort()
                await asyncio.wait(pumps)
        finally:
            self._handlers.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                if writer.transport.is_closing():
                    return
                writer.write(data)
                await writer.drain()


def amqp_port(amqp_url: str) -> int:
    """The port of ``amqp_url`` (5672 when it names none)."""
    location = amqp_url.partition("://")[2].rpartition("@")[2].partition("/")[0]
    host_port = location.rpartition(":")
    return int(host_port[2]) if host_port[1] else 5672

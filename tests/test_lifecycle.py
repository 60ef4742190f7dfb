"""One task group per run, one error type out of it: what is left after a fatal error and after a stop."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

import bridge
from bridge import errors
from bridge.app import App
from bridge.errors import BridgeError, BrokerRefusedError, FatalUpstreamError
from bridge.loop import BridgeLoop
from bridge.metrics import Metrics
from bridge.settings import BrokerSettings, Settings, load_settings
from bridge.simulator import Faults, Simulator
from bridge.upstream import ACKNOWLEDGE_ACTION, Page
from tests.harness import Broker, bridge_settings, broker_view, eventually, sample

BRIDGE_DIR = str(Path(bridge.__file__).parent)


def test_error_tree_docstring_and_all_agree() -> None:
    doc = errors.__doc__ or ""
    tree = doc.split("::", 1)[1].split("\n\n")[1]  # the indented block after the "::"
    in_tree = set(re.findall(r"^ +[│├└─ ]*([A-Z][A-Za-z]+)\s", tree, flags=re.MULTILINE))
    assert in_tree == set(errors.__all__)
    for name in errors.__all__:
        kind = getattr(errors, name)
        assert isinstance(kind, type) and issubclass(kind, BridgeError), name
    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, BaseException)}
    assert defined == set(errors.__all__)


def bridge_tasks() -> list[asyncio.Task[object]]:
    """Tasks still running code of the bridge (the caller's own task aside)."""
    found = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task() or task.done():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and code.co_filename.startswith(BRIDGE_DIR) and "simulator" not in code.co_filename:
            found.append(task)
    return found


class FatalAcknowledgements(httpx.AsyncBaseTransport):
    """The simulator, except that every AcknowledgeTaskResult is refused with a fatal error."""

    def __init__(self, sim: Simulator) -> None:
        self._inner = httpx.ASGITransport(app=sim)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if ACKNOWLEDGE_ACTION.encode() in request.url.query or ACKNOWLEDGE_ACTION in request.headers.get(
            "x-acs-action", ""
        ):
            return httpx.Response(403, json={"Code": "Forbidden.RAM", "Message": "no", "RequestId": "r-1"})
        return await self._inner.handle_async_request(request)


@pytest.fixture
async def broker(broker_url: str, exchange_name: str) -> AsyncIterator[Broker]:
    async with broker_view(broker_url, exchange_name) as view:
        yield view


@pytest.mark.broker
async def test_a_fatal_acknowledgement_error_ends_every_task_and_raises_one_error(
    broker: Broker, broker_url: str
) -> None:
    sim = Simulator(tasks=300, seed=31, faults=Faults(latency_s=0.005))
    settings = bridge_settings(broker.exchange, broker_url, page_size=50)
    async with httpx.AsyncClient(transport=FatalAcknowledgements(sim)) as http:
        with pytest.raises(FatalUpstreamError) as caught:  # the error itself, not an exception group
            await App(settings, http=http).run(asyncio.Event())
    assert "Forbidden.RAM" in str(caught.value)
    assert bridge_tasks() == []
    assert sim.acknowledged_count == 0


@pytest.mark.broker
async def test_a_stop_publishes_only_what_is_on_the_wire_and_leaves_no_task(broker: Broker, broker_url: str) -> None:
    window = 4
    sim = Simulator(tasks=2000, seed=32)
    queue = await broker.bind("all")
    metrics = Metrics()
    settings = bridge_settings(broker.exchange, broker_url, page_size=500, max_in_flight=window)
    stop = asyncio.Event()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim)) as http:
        app = App(settings, metrics=metrics, http=http)
        run = asyncio.create_task(app.run(stop))
        await eventually(
            lambda: sample(metrics, "bridge_events_published_total", outcome="ack") >= 50, what="publishing"
        )
        assert app.loop is not None and app.loop.ledger.in_flight > window, "publishes should be queued"
        stop.set()
        at_stop = sum(sample(metrics, "bridge_events_published_total", outcome=o) for o in ("ack", "nack"))
        complete = await asyncio.wait_for(run, settings.delivery.shutdown_timeout_s + 5)
    after = sum(sample(metrics, "bridge_events_published_total", outcome=o) for o in ("ack", "nack"))
    assert complete
    assert after - at_stop <= 2 * window, "queued publishes went on after the stop"
    assert bridge_tasks() == []
    ids = [str(m.message_id) for m in await broker.take(queue.name)]
    assert len(ids) == len(set(ids))
    assert set(sim.ack_counts) == set(ids), "every published detail acknowledged, nothing else"
    assert sim.pending_count == 2000 - len(ids)


class FakeUpstream:
    """An upstream with nothing pending."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.upstream
        self.account = settings.account

    async def poll(self, page_num: int = 1, page_size: int | None = None) -> Page:
        return Page(request_id="r", page_num=page_num, page_size=page_size or 1, total_items=0, total_pages=0)


class RefusingPublisher:
    """A broker that refuses the login on the connections listed in ``refused`` (0 = the first)."""

    def __init__(self, refused: set[int]) -> None:
        self.refused = refused
        self.attempts = 0
        self.connected = False
        self.ever_connected = False
        self.last_refusal: str | None = None
        self.settings = BrokerSettings(max_in_flight=2)

    async def ensure_connected(self) -> None:
        attempt, self.attempts = self.attempts, self.attempts + 1
        if attempt in self.refused:
            raise BrokerRefusedError("ACCESS_REFUSED - Login was refused")
        self.connected = self.ever_connected = True


def fake_loop(publisher: RefusingPublisher) -> BridgeLoop:
    settings = load_settings(
        access_key_id="id",
        access_key_secret="secret",
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
        max_in_flight=2,
        poll_interval_s=0.1,
    )
    upstream = FakeUpstream(settings)
    return BridgeLoop(settings.delivery, upstream, publisher, Metrics().account("default"))  # type: ignore[arg-type]


async def test_a_broker_refusal_at_start_is_fatal() -> None:
    publisher = RefusingPublisher(refused={0})
    with pytest.raises(BrokerRefusedError, match="ACCESS_REFUSED"):
        await fake_loop(publisher).run(asyncio.Event(), once=True)
    assert publisher.attempts == 1
    assert bridge_tasks() == []


async def test_a_broker_refusal_after_the_first_connection_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    publisher = RefusingPublisher(refused={1, 2})
    loop = fake_loop(publisher)
    stop = asyncio.Event()
    run = asyncio.create_task(loop.run(stop))
    await eventually(lambda: publisher.attempts == 1, what="first connection")
    publisher.connected = False  # the connection is lost; the next two attempts are refused
    await eventually(lambda: publisher.attempts == 4 and publisher.connected, what="reconnected")
    stop.set()
    assert await run
    # The reason is in the message itself (what an operator reads) and in the ``error`` field.
    retried = [r for r in caplog.records if r.getMessage().startswith("broker refused the connection; retrying: ")]
    assert len(retried) == 2 and all("ACCESS_REFUSED" in r.__dict__["error"] for r in retried)


async def test_the_first_fully_confirmed_poll_after_nacks_resets_the_broker_backoff() -> None:
    loop = fake_loop(RefusingPublisher(refused=set()))
    stop = asyncio.Event()
    stop.set()  # a pause returns at once, but still counts as one
    async with asyncio.TaskGroup() as group:
        loop._group = group
        # Poll 1: both publishes nacked, the broker backoff grows.
        loop._rounds[1] = [2, 0]
        for _ in range(2):
            loop._publish_failures += 1
            loop._round_answered(1, ok=False)
        await loop._pause_after_publish_failures(stop, once=False)
        assert loop._broker_backoff.failures == 1
        # Poll 2: one more nack of an older publish lands late, then poll 3 is confirmed in full.
        loop._publish_failures += 1
        loop._rounds[3] = [2, 0]
        for _ in range(2):
            loop._publish_acks += 1
            loop._round_answered(3, ok=True)
        await loop._pause_after_publish_failures(stop, once=False)
        assert loop._broker_backoff.failures == 0, "a fully confirmed poll after nacks still backed off"
        # And nacks of a newer poll than the last clean one pause again.
        loop._rounds[4] = [1, 0]
        loop._publish_failures += 1
        loop._round_answered(4, ok=False)
        await loop._pause_after_publish_failures(stop, once=False)
        assert loop._broker_backoff.failures == 1

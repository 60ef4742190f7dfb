"""The bridge end to end: the real RabbitMQ, the project's simulator, and what each side saw.

Every test asserts on what the simulator recorded as acknowledged and on what reached the queues: an
acknowledged detail without an event would be a lost task result.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator

import aio_pika
import httpx
import pytest

from bridge.app import App
from bridge.errors import DeadlineExceeded, FatalUpstreamError
from bridge.events import EVENT_TYPE, routing_key
from bridge.metrics import Metrics
from bridge.simulator import Faults, Simulator, running
from bridge.upstream import ACKNOWLEDGE_ACTION, POLL_ACTION
from tests.harness import Broker, body, bridge_settings, broker_view, eventually, run_once, running_bridge, sample

pytestmark = pytest.mark.broker

ACTIONS = (POLL_ACTION, ACKNOWLEDGE_ACTION)


@pytest.fixture
async def broker(broker_url: str, exchange_name: str) -> AsyncIterator[Broker]:
    async with broker_view(broker_url, exchange_name) as view:
        yield view


def assert_one_event_per_acknowledged(sim: Simulator, ids: list[str]) -> None:
    """Nothing lost (every acknowledged detail has an event), nothing unacknowledged, no duplicates."""
    counts = Counter(ids)
    acknowledged = set(sim.ack_counts)
    assert acknowledged - set(counts) == set(), "acknowledged upstream without an event"
    assert set(counts) - acknowledged == set(), "event published but detail never acknowledged"
    assert [i for i, n in counts.items() if n > 1] == []


async def assert_delivered_once(broker: Broker, queue: str, sim: Simulator, count: int) -> None:
    """Take ``queue``'s events: exactly ``count`` of them, one per acknowledged detail (see above)."""
    ids = [str(m.message_id) for m in await broker.take(queue)]
    assert len(ids) == count
    assert_one_event_per_acknowledged(sim, ids)


async def test_drains_thousands_with_exactly_one_correct_event_each(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=3000, seed=11)
    queue = await broker.bind("all")
    metrics = Metrics()
    settings = bridge_settings(broker.exchange, broker_url, page_size=500, max_in_flight=128)

    assert await run_once(settings, sim, metrics)

    assert sim.pending_count == 0
    assert sim.acknowledged_count == 3000
    messages = await broker.take(queue.name)
    assert_one_event_per_acknowledged(sim, [str(m.message_id) for m in messages])
    assert set(sim.ack_counts.values()) == {1}
    for message in messages:
        detail = sim.detail(str(message.message_id))
        assert detail is not None
        assert message.routing_key == routing_key(detail["TaskType"], detail["TaskStatus"])
        assert message.delivery_mode == 2  # persistent
        assert message.content_type == "application/cloudevents+json"
        assert message.type == EVENT_TYPE
        event = body(message)
        assert event["id"] == message.message_id == detail["TaskDetailNo"]
        assert event["subject"] == detail["DomainName"]
        assert event["data"] == detail
        assert event["account"] == message.headers["account"] == "default"  # the single account's name
    assert await broker.take(broker.unrouted) == []
    assert sample(metrics, "bridge_events_published_total", outcome="ack") == 3000
    assert sample(metrics, "bridge_confirmed_unacknowledged") == 0


async def test_unroutable_events_are_kept_in_the_unrouted_queue(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=200, seed=2)
    assert await run_once(bridge_settings(broker.exchange, broker_url), sim)

    kept = await broker.take(broker.unrouted)
    assert sim.pending_count == 0
    assert_one_event_per_acknowledged(sim, [str(m.message_id) for m in kept])


async def test_invalid_records_go_to_the_invalid_queue_and_are_acknowledged(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=400, seed=3, faults=Faults(malformed_ratio=0.1))
    sim.add_raw({"TaskType": "CHG_DNS", "TaskStatus": "EXECUTE_SUCCESS"})  # no TaskDetailNo: cannot be acknowledged
    queue = await broker.bind("all")
    metrics = Metrics()

    assert await run_once(bridge_settings(broker.exchange, broker_url, page_size=100), sim, metrics)

    assert len(sim.malformed_ids) > 10
    invalid = await broker.take(broker.invalid)
    assert {str(m.message_id) for m in invalid} == sim.malformed_ids
    for message in invalid:
        assert message.content_type == "application/json"
        assert message.delivery_mode == 2
        assert isinstance(message.headers.get("x-validation-error"), str)
        assert message.headers["account"] == "default"
        assert json.loads(message.body) == sim.detail(str(message.message_id))
    valid = await broker.take(queue.name)
    assert_one_event_per_acknowledged(sim, [str(m.message_id) for m in valid + invalid])
    assert sim.pending_count == 1  # only the record without an id stays upstream
    # Counted once, although every poll brought it back.
    assert sample(metrics, "bridge_invalid_records_total", reason="no_detail_no") == 1
    assert sample(metrics, "bridge_invalid_records_total", reason="validation") == len(sim.malformed_ids)


async def test_broker_nack_acknowledges_nothing_and_the_detail_is_delivered_later(
    broker: Broker, broker_url: str
) -> None:
    sim = Simulator(tasks=20, seed=4)
    full = await broker.bind("full", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    await broker.channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key=full.name)
    metrics_nacks = 0
    settings = bridge_settings(broker.exchange, broker_url)
    async with running_bridge(settings, sim) as (app, _stop):
        await eventually(
            lambda: sample(app.metrics, "bridge_events_published_total", outcome="nack") >= 20, what="nacks"
        )
        await asyncio.sleep(0.3)
        assert sim.acknowledged_count == 0
        metrics_nacks = int(sample(app.metrics, "bridge_events_published_total", outcome="nack"))
        queue = await broker.bind("all")
        await full.delete(if_unused=False, if_empty=False)
        broker.queues.pop(full.name)
        await eventually(lambda: sim.pending_count == 0, what="all acknowledged after the queue was removed")
    assert metrics_nacks >= 20
    messages = await broker.take(queue.name)
    ids = {str(m.message_id) for m in messages}
    assert set(sim.ack_counts) == ids  # every acknowledged detail has its event


async def test_upstream_errors_are_retried_with_nothing_lost(broker: Broker, broker_url: str) -> None:
    faults = Faults(unavailable_ratio=0.1, throttling_ratio=0.1, internal_error_ratio=0.1, latency_s=0.005)
    sim = Simulator(tasks=1500, seed=5, faults=faults)
    queue = await broker.bind("all")
    metrics = Metrics()

    # Small acknowledgement calls: enough requests that every kind of fault strikes.
    settings = bridge_settings(broker.exchange, broker_url, page_size=250, ack_batch_size=50)
    assert await run_once(settings, sim, metrics)

    assert sim.pending_count == 0
    assert_one_event_per_acknowledged(sim, [str(m.message_id) for m in await broker.take(queue.name)])
    errors = {
        outcome: sum(
            sample(metrics, "bridge_upstream_requests_total", action=action, outcome=outcome) for action in ACTIONS
        )
        for outcome in ("throttled", "retryable_error")
    }
    assert errors["throttled"] > 0
    assert errors["retryable_error"] > 0


async def test_hanging_upstream_requests_time_out_and_are_retried(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=600, seed=6, faults=Faults(hang_ratio=0.15, hang_s=3.0))
    queue = await broker.bind("all")
    async with running(sim) as url:
        settings = bridge_settings(
            broker.exchange, broker_url, upstream_endpoint=url, request_timeout_s=0.3, page_size=100
        )
        async with httpx.AsyncClient(timeout=0.3) as http:
            assert await App(settings, http=http).run(asyncio.Event(), once=True)
    assert sim.pending_count == 0
    ids = [str(m.message_id) for m in await broker.take(queue.name)]
    assert_one_event_per_acknowledged(sim, ids)


async def test_failing_acknowledgements_cause_no_second_event(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=1000, seed=7, faults=Faults(ack_failure_ratio=1.0))
    queue = await broker.bind("all")
    settings = bridge_settings(broker.exchange, broker_url, page_size=100)
    async with running_bridge(settings, sim) as (app, _stop):
        await eventually(
            lambda: sample(app.metrics, "bridge_acknowledgements_total", outcome="failed") >= 300, what="ack failures"
        )
        await asyncio.sleep(0.5)  # more polls bring the same details back
        assert sim.acknowledged_count == 0
        # Confirmed and held; with them unacknowledged the bridge takes in nothing more (bounded memory): at most
        # the four pages that read-ahead can put on their way before the first failed call shows.
        published = sample(app.metrics, "bridge_events_published_total", outcome="ack")
        assert 100 <= published <= 400
        assert sample(app.metrics, "bridge_confirmed_unacknowledged") == published
        await asyncio.sleep(0.5)
        assert sample(app.metrics, "bridge_events_published_total", outcome="ack") == published
        sim.faults.ack_failure_ratio = 0.0
        await eventually(lambda: sim.pending_count == 0, what="acknowledged once the upstream recovered")
    await assert_delivered_once(broker, queue.name, sim, 1000)


async def test_acknowledgements_refused_as_too_large_go_out_in_smaller_calls(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=2000, seed=12, faults=Faults(ack_max_ids=120))
    queue = await broker.bind("all")
    metrics = Metrics()
    settings = bridge_settings(broker.exchange, broker_url, page_size=1000, ack_batch_size=500)

    assert await run_once(settings, sim, metrics)

    assert sim.pending_count == 0
    await assert_delivered_once(broker, queue.name, sim, 2000)
    # Halved from 500 until a call fits: at most the limit, and at least half of a refused call (> 120 ids).
    assert 60 <= sample(metrics, "bridge_ack_batch_size") <= 120
    assert sample(metrics, "bridge_acknowledgements_total", outcome="failed") > 0
    assert sample(metrics, "bridge_acknowledgements_total", outcome="confirmed") == 2000


async def test_read_ahead_polls_past_the_held_details_with_nothing_lost(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=3000, seed=13, faults=Faults(latency_s=0.02))
    queue = await broker.bind("all")
    metrics = Metrics()
    settings = bridge_settings(broker.exchange, broker_url, page_size=250, poll_interval_s=2.0)

    assert await run_once(settings, sim, metrics)

    assert sim.pending_count == 0
    await assert_delivered_once(broker, queue.name, sim, 3000)
    assert sum(count for page, count in sim.polls_by_page.items() if page > 1) >= 3
    # Read-ahead pages start past what the bridge holds: few details come a second time.
    assert sample(metrics, "bridge_details_received_total") < 3000 * 1.1


async def test_without_read_ahead_only_page_one_is_polled(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=1000, seed=14, faults=Faults(latency_s=0.01))
    queue = await broker.bind("all")
    settings = bridge_settings(broker.exchange, broker_url, page_size=100, read_ahead=False)

    assert await run_once(settings, sim)

    assert set(sim.polls_by_page) == {1}
    assert_one_event_per_acknowledged(sim, [str(m.message_id) for m in await broker.take(queue.name)])


async def test_read_ahead_loses_nothing_when_the_upstream_orders_details_otherwise(
    broker: Broker, broker_url: str
) -> None:
    # Every poll answered in a random order: read-ahead pages overlap held details and skip new ones.
    sim = Simulator(tasks=2000, seed=15, faults=Faults(unordered_ratio=1.0, latency_s=0.01))
    queue = await broker.bind("all")
    settings = bridge_settings(broker.exchange, broker_url, page_size=200)

    assert await run_once(settings, sim)

    assert sim.pending_count == 0
    assert sum(count for page, count in sim.polls_by_page.items() if page > 1) >= 1
    await assert_delivered_once(broker, queue.name, sim, 2000)
    assert set(sim.ack_counts.values()) == {1}


class AnswersOvertaken(httpx.AsyncBaseTransport):
    """The simulator over ASGI; each acknowledgement reaches it 0.1 s late, each poll's answer the bridge 0.3 s late.

    So a poll sent right after an acknowledgement is served before the acknowledgement takes effect, and answers
    after the acknowledgement's own answer.
    """

    def __init__(self, sim: Simulator) -> None:
        self._inner = httpx.ASGITransport(app=sim)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        polling = POLL_ACTION in (request.headers.get("x-acs-action"), request.url.params.get("Action"))
        if not polling:
            await asyncio.sleep(0.1)
        response = await self._inner.handle_async_request(request)
        if polling:
            await asyncio.sleep(0.3)
        return response


async def test_a_page_whose_details_were_acknowledged_meanwhile_is_followed_by_another_poll(
    broker: Broker, broker_url: str
) -> None:
    # The second poll is served while the first page's acknowledgement is under way and answers after it: every
    # detail on it is known, and nothing is left to settle. The loop must poll again, not wait for a settle.
    sim = Simulator(tasks=100, seed=16)
    queue = await broker.bind("all")
    metrics = Metrics()
    settings = bridge_settings(broker.exchange, broker_url, page_size=100, read_ahead=False)

    async with httpx.AsyncClient(transport=AnswersOvertaken(sim)) as http:
        app = App(settings, metrics=metrics, http=http)
        assert await asyncio.wait_for(app.run(asyncio.Event(), once=True), 10)

    assert sample(metrics, "bridge_details_received_total") == 200, "the second poll should bring the page again"
    assert_one_event_per_acknowledged(sim, [str(m.message_id) for m in await broker.take(queue.name)])


async def test_records_without_a_detail_no_do_not_hide_the_details_behind_them(broker: Broker, broker_url: str) -> None:
    # 120 records that can never be acknowledged fill page 1 and most of page 2 (page size 50) for good.
    sim = Simulator(seed=17)
    for n in range(120):
        sim.add_raw({"TaskType": "CHG_DNS", "Note": f"no id {n}"})
    sim.add_details(300)
    queue = await broker.bind("all")
    metrics = Metrics()
    settings = bridge_settings(broker.exchange, broker_url, page_size=50, poll_interval_s=60.0)

    assert await asyncio.wait_for(run_once(settings, sim, metrics), 30)

    assert sim.pending_count == 120, "every detail behind them published and acknowledged"
    await assert_delivered_once(broker, queue.name, sim, 300)
    assert sample(metrics, "bridge_invalid_records_total", reason="no_detail_no") == 120
    assert sum(sim.polls_by_page.values()) < 40, "read ahead past them, no loop of polls"


async def test_failing_acknowledgements_do_not_end_a_drain_behind_unusable_records(
    broker: Broker, broker_url: str
) -> None:
    # Failed acknowledgements pause read-ahead; a page 1 full of unusable records polled meanwhile once made
    # run --once call the backlog drained with details still behind them (seed 3 polls at just that moment).
    sim = Simulator(seed=3, faults=Faults(latency_s=0.005, ack_failure_ratio=0.2))
    for n in range(70):
        sim.add_raw({"Note": f"no id {n}"})
    sim.add_details(300)
    queue = await broker.bind("all")
    settings = bridge_settings(broker.exchange, broker_url, page_size=50, ack_batch_size=100, poll_interval_s=60.0)

    assert await asyncio.wait_for(run_once(settings, sim), 30)

    assert sim.pending_count == 70
    assert_one_event_per_acknowledged(sim, [str(m.message_id) for m in await broker.take(queue.name)])


async def test_details_arriving_behind_unusable_records_are_delivered_by_a_running_bridge(
    broker: Broker, broker_url: str
) -> None:
    sim = Simulator(seed=19)
    for n in range(60):
        sim.add_raw({"Note": f"no id {n}"})
    queue = await broker.bind("all")
    settings = bridge_settings(broker.exchange, broker_url, page_size=50, poll_interval_s=0.2)
    async with running_bridge(settings, sim):
        await asyncio.sleep(0.5)  # a few rounds of polls that find nothing but them
        sim.add_details(100)
        messages = await broker.wait_for(queue.name, 100)
        await eventually(lambda: sim.pending_count == 60, what="the details acknowledged")
    messages += await broker.take(queue.name)
    assert len(messages) == 100
    assert_one_event_per_acknowledged(sim, [str(m.message_id) for m in messages])


@pytest.mark.parametrize("identical", [False, True])
async def test_a_backlog_of_only_unusable_records_is_drained_without_a_loop_of_polls(
    broker: Broker, broker_url: str, identical: bool
) -> None:
    # Identical records count once (by content), so reading ahead cannot get past them: it must stop, not spin.
    sim = Simulator(seed=18)
    for n in range(130):
        sim.add_raw({"Note": "no id" if identical else f"no id {n}"})
    settings = bridge_settings(broker.exchange, broker_url, page_size=50, poll_interval_s=60.0)

    assert await asyncio.wait_for(run_once(settings, sim), 30)

    assert sim.pending_count == 130
    assert sum(sim.polls_by_page.values()) <= 6, sim.polls_by_page


async def test_new_detail_is_published_within_the_poll_interval(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=5, seed=8)
    queue = await broker.bind("all")
    settings = bridge_settings(broker.exchange, broker_url, poll_interval_s=1.0)
    async with running_bridge(settings, sim):
        await broker.wait_for(queue.name, 5)
        await eventually(lambda: sim.pending_count == 0, what="initial drain")
        await asyncio.sleep(0.3)
        (new_id,) = sim.add_details(1)
        appeared = time.monotonic()
        (message,) = await broker.wait_for(queue.name, 1, timeout_s=5)
        latency = time.monotonic() - appeared
    assert message.message_id == new_id
    assert latency <= settings.delivery.poll_interval_s * 1.1 + 1.0


async def test_wrong_secret_stops_with_a_fatal_error(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=3, seed=9)
    settings = bridge_settings(broker.exchange, broker_url, access_key_secret="not-the-secret")
    with pytest.raises(FatalUpstreamError) as caught:
        await run_once(settings, sim)
    assert caught.value.code == "SignatureDoesNotMatch"
    assert "not-the-secret" not in str(caught.value)
    assert "\n" not in str(caught.value)
    assert sim.acknowledged_count == 0


async def test_once_gives_up_when_the_broker_stays_unavailable(exchange_name: str) -> None:
    sim = Simulator(tasks=3, seed=10)
    settings = bridge_settings(exchange_name, "amqp://guest:guest@127.0.0.1:1/", once_deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await run_once(settings, sim)
    assert time.monotonic() - started < 10
    assert sim.acknowledged_count == 0


async def test_once_gives_up_when_the_upstream_stays_unavailable(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=3, seed=13, faults=Faults(unavailable_ratio=1.0))
    settings = bridge_settings(broker.exchange, broker_url, once_deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="upstream unavailable"):
        await run_once(settings, sim)
    assert time.monotonic() - started < 10
    assert sim.acknowledged_count == 0


async def test_operator_port_reports_health_readiness_and_metrics(broker: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=50, seed=12)
    settings = bridge_settings(broker.exchange, broker_url)
    async with running_bridge(settings, sim) as (app, _stop), httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{app.metrics_port}"
        assert (await http.get(f"{base}/healthz")).status_code == 200
        await eventually(lambda: sim.pending_count == 0, what="drain")
        assert (await http.get(f"{base}/readyz")).status_code == 200
        text = (await http.get(f"{base}/metrics")).text
        assert 'bridge_events_published_total{account="default",outcome="ack"} 50.0' in text
        assert "bridge_broker_connected 1.0" in text
        assert settings.broker.amqp_url.get_secret_value() not in text


async def test_not_ready_while_the_broker_is_unreachable(exchange_name: str) -> None:
    sim = Simulator(tasks=3, seed=14)
    settings = bridge_settings(exchange_name, "amqp://guest:guest@127.0.0.1:1/")
    async with running_bridge(settings, sim) as (app, _stop), httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{app.metrics_port}"
        await asyncio.sleep(0.3)  # a few connection attempts with backoff
        assert (await http.get(f"{base}/healthz")).status_code == 200
        ready = await http.get(f"{base}/readyz")
        assert ready.status_code == 503
        assert "bridge_broker_connected 0.0" in (await http.get(f"{base}/metrics")).text
    assert sim.acknowledged_count == 0

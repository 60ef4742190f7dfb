"""Acknowledgement results believed only as far as they go, and conflicting copies on one page, end to end.

A small transport in front of the simulator plays an upstream that answers an acknowledgement with success but
does not apply it (or answers with an unusable ``Result``), or lists one TaskDetailNo twice with different content.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from bridge.app import App
from bridge.metrics import Metrics
from bridge.simulator import Simulator
from bridge.upstream import ACKNOWLEDGE_ACTION, POLL_ACTION
from tests.harness import Broker, body, bridge_settings, broker_view, sample

pytestmark = pytest.mark.broker

_MISSING = object()


def _action(request: httpx.Request) -> str:
    header = request.headers.get("x-acs-action")
    if header:
        return header
    return dict(httpx.QueryParams(request.url.query)).get("Action", "")


class Meddling(httpx.AsyncBaseTransport):
    """The simulator behind a meddler: ``drop_acks`` acknowledgement calls answered ``Result`` without applying
    them; with ``conflict``, each page lists its first record twice, the second copy with other content."""

    def __init__(self, sim: Simulator, *, drop_acks: int = 0, result: Any = 0, conflict: bool = False) -> None:
        self._inner = httpx.ASGITransport(app=sim)
        self.drop_acks = drop_acks
        self.result = result
        self.conflict = conflict
        self.dropped_ids = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        action = _action(request)
        if action == ACKNOWLEDGE_ACTION and self.drop_acks > 0:
            self.drop_acks -= 1
            await request.aread()
            self.dropped_ids += request.content.count(b"TaskDetailNo.") + request.url.query.count(b"TaskDetailNo.")
            answer: dict[str, Any] = {"RequestId": "dropped"}
            if self.result is not _MISSING:
                answer["Result"] = self.result
            return httpx.Response(200, json=answer)
        response = await self._inner.handle_async_request(request)
        if action == POLL_ACTION and self.conflict:
            page = json.loads(await response.aread())
            details = page["Data"]["TaskDetail"]
            if details:
                details.insert(1, {**details[0], "TaskStatus": "conflicting copy"})
            return httpx.Response(200, json=page)
        return response


@pytest.fixture
async def broker(broker_url: str, exchange_name: str) -> AsyncIterator[Broker]:
    async with broker_view(broker_url, exchange_name) as view:
        yield view


async def _run_once(settings: Any, transport: Meddling, metrics: Metrics) -> bool:
    async with httpx.AsyncClient(transport=transport) as http:
        return await App(settings, metrics=metrics, http=http).run(asyncio.Event(), once=True)


@pytest.mark.parametrize("result", [0, -1, "many", None, _MISSING], ids=["zero", "negative", "text", "null", "missing"])
async def test_details_back_after_their_acknowledgement_are_acknowledged_again_without_a_second_event(
    broker: Broker, broker_url: str, result: Any
) -> None:
    sim = Simulator(tasks=300, seed=41)
    queue = await broker.bind("all")
    metrics = Metrics()
    settings = bridge_settings(broker.exchange, broker_url, page_size=100, ack_batch_size=50)
    transport = Meddling(sim, drop_acks=3, result=result)

    assert await _run_once(settings, transport, metrics)

    assert sim.pending_count == 0
    ids = [str(m.message_id) for m in await broker.take(queue.name)]
    assert len(ids) == 300 and len(set(ids)) == 300, "one event per detail, none for a detail that came back"
    assert transport.dropped_ids > 0
    assert sample(metrics, "bridge_details_returned_after_ack_total") == transport.dropped_ids
    # How a Result that is not a number reaches the acknowledger is the upstream client's business (0 or None);
    # a negative one arrives as it is and is counted (tests/test_acknowledger.py covers None).
    unusable = sample(metrics, "bridge_ack_results_unusable_total")
    assert unusable == (3 if result == -1 else unusable)
    assert unusable == 0 or result != 0


async def test_same_id_twice_on_a_page_with_other_content_publishes_the_first_and_warns(
    broker: Broker, broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sim = Simulator(tasks=120, seed=42)
    queue = await broker.bind("all")
    metrics = Metrics()
    settings = bridge_settings(broker.exchange, broker_url, page_size=50)
    caplog.set_level(logging.WARNING, logger="bridge")

    assert await _run_once(settings, Meddling(sim, conflict=True), metrics)

    assert sim.pending_count == 0
    messages = await broker.take(queue.name)
    ids = [str(m.message_id) for m in messages]
    assert len(ids) == 120 and len(set(ids)) == 120
    assert all("conflicting copy" not in json.dumps(body(m)) for m in messages), "the first copy is published"
    warned = [r for r in caplog.records if "twice on one page" in r.getMessage()]
    assert warned and all(r.__dict__["detail_no"] in ids for r in warned)
    assert sample(metrics, "bridge_conflicting_details_total") == len(warned)

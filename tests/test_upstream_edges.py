"""The bridge end to end against a misbehaving upstream: the real RabbitMQ, the project's simulator behind a
response-rewriting ASGI wrapper, and what each side saw.

- a PollTaskResult page the bridge cannot read (an error object in a 200, a page without its records, a body
  nested too deeply) is retried, never taken for an empty backlog: ``run --once`` does not report drained
  while details are pending, and drains everything once the fault clears;
- an AcknowledgeTaskResult answered 200-with-error is retried without publishing again;
- ids odd in every way (trailing newline, spaces, mixed case) go out byte for byte as message ids and in the
  acknowledgement, and are published once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.loop import DeadlineExceeded
from bridge.metrics import Metrics
from bridge.simulator import Simulator
from bridge.upstream import ACKNOWLEDGE_ACTION, POLL_ACTION
from tests.harness import Broker, bridge_settings, broker_view, run_once, sample

pytestmark = pytest.mark.broker


@pytest.fixture
async def broker(broker_url: str, exchange_name: str) -> AsyncIterator[Broker]:
    async with broker_view(broker_url, exchange_name) as view:
        yield view


class Rewriting:
    """An ASGI wrapper around a simulator: the next ``bad[action]`` calls of an action get ``body`` (HTTP 200)."""

    def __init__(self, sim: Simulator, action: str, body: bytes, times: int) -> None:
        self.sim = sim
        self.action = action
        self.body = body
        self.remaining = times
        self.rewritten = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.remaining != 0 and self._action(scope) == self.action:
            self.remaining -= 1
            self.rewritten += 1
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": self.body})
            return
        await self.sim(scope, receive, send)

    @staticmethod
    def _action(scope: Any) -> str | None:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if "x-acs-action" in headers:
            return headers["x-acs-action"]
        query = dict(kv.split("=", 1) for kv in scope["query_string"].decode().split("&") if "=" in kv)
        return query.get("Action")


BAD_PAGES = {
    "error-object": json.dumps({"RequestId": "E1", "Code": "ServiceUnavailable", "Message": "busy"}).encode(),
    "unknown-error-code": json.dumps({"RequestId": "E2", "Code": "Backend.Hiccup", "Message": "odd"}).encode(),
    "no-records": json.dumps({"RequestId": "E3", "TotalItemNum": 40, "PageSize": 1000}).encode(),
    "no-totals-no-records": json.dumps({"RequestId": "E4"}).encode(),
    "too-deep": b"[" * 50_000 + b"]" * 50_000,
}


async def take_ids(broker: Broker, queue: str) -> list[str]:
    return [str(m.message_id) for m in await broker.take(queue)]


@pytest.mark.parametrize("kind", list(BAD_PAGES))
async def test_run_once_is_never_drained_by_a_page_it_cannot_read(broker: Broker, broker_url: str, kind: str) -> None:
    sim = Simulator(tasks=40, seed=61)
    queue = await broker.bind("all")

    # The fault never clears: --once gives up at its deadline instead of calling the backlog drained.
    stuck = Rewriting(sim, POLL_ACTION, BAD_PAGES[kind], times=-1)
    settings = bridge_settings(broker.exchange, broker_url, once_deadline_s=1.5)
    with pytest.raises(DeadlineExceeded):
        await run_once(settings, stuck)  # type: ignore[arg-type]
    assert stuck.rewritten >= 3
    assert sim.pending_count == 40 and sim.ack_counts == {}
    assert await take_ids(broker, queue.name) == []

    # The fault clears after a few polls: everything drains, once.
    metrics = Metrics()
    passing = Rewriting(sim, POLL_ACTION, BAD_PAGES[kind], times=5)
    assert await run_once(bridge_settings(broker.exchange, broker_url), passing, metrics)  # type: ignore[arg-type]
    assert passing.rewritten == 5
    assert sim.pending_count == 0
    ids = await take_ids(broker, queue.name)
    assert sorted(ids) == sorted(sim.ack_counts) and len(ids) == 40
    assert set(sim.ack_counts.values()) == {1}
    assert sample(metrics, "bridge_polls_total", outcome="error") == 5
    outcome = "retryable_error" if kind.endswith("error-code") or kind == "error-object" else "malformed"
    assert sample(metrics, "bridge_upstream_requests_total", action=POLL_ACTION, outcome=outcome) == 5


async def test_an_acknowledgement_answered_200_with_error_is_retried_without_publishing_again(
    broker: Broker, broker_url: str
) -> None:
    sim = Simulator(tasks=30, seed=62)
    queue = await broker.bind("all")
    error = json.dumps({"RequestId": "A1", "Code": "InternalError", "Message": "try later"}).encode()
    upstream = Rewriting(sim, ACKNOWLEDGE_ACTION, error, times=4)
    metrics = Metrics()
    assert await run_once(bridge_settings(broker.exchange, broker_url), upstream, metrics)  # type: ignore[arg-type]
    assert upstream.rewritten == 4
    assert sim.pending_count == 0
    ids = await take_ids(broker, queue.name)
    assert len(ids) == 30 and len(set(ids)) == 30  # nothing published twice
    assert set(sim.ack_counts.values()) == {1}
    assert sample(metrics, "bridge_acknowledgements_total", outcome="failed") >= 4


async def test_an_acknowledgement_without_a_usable_result_is_counted_not_raised(
    broker: Broker, broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sim = Simulator(tasks=5, seed=63)
    queue = await broker.bind("all")

    class NegativeResult(Rewriting):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and self._action(scope) == ACKNOWLEDGE_ACTION and self.remaining:
                self.remaining -= 1

                async def rewrite(message: dict[str, Any]) -> None:
                    if message["type"] == "http.response.body":
                        message = {**message, "body": json.dumps({"RequestId": "N", "Result": -3}).encode()}
                    elif message["type"] == "http.response.start":
                        headers = [(k, v) for k, v in message["headers"] if k.lower() != b"content-length"]
                        message = {**message, "headers": headers}
                    await send(message)

                await self.sim(scope, receive, rewrite)  # the simulator applies it, the answer lies
                return
            await self.sim(scope, receive, send)

    metrics = Metrics()
    upstream = NegativeResult(sim, ACKNOWLEDGE_ACTION, b"", times=1)
    assert await run_once(bridge_settings(broker.exchange, broker_url), upstream, metrics)  # type: ignore[arg-type]
    assert sim.pending_count == 0
    assert len(await take_ids(broker, queue.name)) == 5
    assert sample(metrics, "bridge_acknowledgements_total", outcome="unknown") == 5
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "without a usable Result" in r.message]
    assert len(warnings) == 1


ODD_IDS = ["trailing-newline\n", "  spaced both sides  ", "MiXeD-CaSe-Id", "tab\tinside", "ünïcödé/+&=?#%"]


async def test_ids_travel_byte_for_byte(broker: Broker, broker_url: str) -> None:
    sim = Simulator(seed=64)
    template = Simulator(seed=65)
    model_ids = template.add_details(len(ODD_IDS))
    normal = sim.add_details(3)
    for odd, model_id in zip(ODD_IDS, model_ids, strict=True):
        record = template.detail(model_id)
        assert record is not None
        sim.add_raw({**record, "TaskDetailNo": odd})
    # A case-folded or stripped twin must stay a different detail.
    twin = template.detail(model_ids[2])
    assert twin is not None
    sim.add_raw({**twin, "TaskDetailNo": "mixed-case-id"})
    queue = await broker.bind("all")

    for signature in ("v3", "v1"):
        settings = bridge_settings(broker.exchange, broker_url, signature_version=signature)
        assert await run_once(settings, sim)

    ids = await take_ids(broker, queue.name)
    expected = [*normal, *ODD_IDS, "mixed-case-id"]
    assert Counter(ids) == Counter(expected)  # each exactly once, exactly as sent
    assert sim.pending_count == 0
    assert sim.ack_counts == dict.fromkeys(expected, 1)  # acknowledged with exactly that id, once

"""AcknowledgeTaskResult calls as the acknowledger makes them with the real upstream client and the simulator.

Batching lives in the acknowledger only (the client sends exactly one call per ``acknowledge``): the batch size
adapts to refusals (halved on ``InvalidParameter`` / 413 / 414), long ids are split by bytes so a request line
stays within 8 KiB, and a failed call is retried whole, without publishing anything again.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from typing import Any

import httpx
import pytest

from bridge.acknowledger import Acknowledger
from bridge.ledger import Ledger
from bridge.metrics import Metrics
from bridge.records import RawRecord
from bridge.settings import Settings, load_settings
from bridge.simulator import Simulator
from bridge.upstream import ACK_IDS_MAX_BYTES, UpstreamClient
from tests.harness import SIM_KEY_ID, SIM_KEY_SECRET, sample

REQUEST_LINE_LIMIT = 8 * 1024


class Recording:
    """ASGI wrapper: records the request line of every AcknowledgeTaskResult call before the simulator answers."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.lines: list[str] = []
        self.id_counts: list[int] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            query = scope["query_string"].decode()
            headers = dict(scope["headers"])
            if b"TaskDetailNo.1=" in scope["query_string"] or headers.get(b"x-acs-action") == b"AcknowledgeTaskResult":
                self.lines.append(f"{scope['method']} {scope['raw_path'].decode()}?{query} HTTP/1.1")
                self.id_counts.append(query.count("TaskDetailNo."))
        await self.sim(scope, receive, send)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "access_key_id": SIM_KEY_ID,
        "access_key_secret": SIM_KEY_SECRET,
        "upstream_endpoint": "http://simulator.test",
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
    }
    values.update(overrides)
    return load_settings(**values)


async def acknowledge_all(app: Any, config: Settings, ids: list[str], metrics: Metrics) -> Acknowledger:
    """Feed ``ids`` to an acknowledger over ``app`` and wait until none is outstanding."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
        ledger = Ledger(
            metrics.account("default"), ack_memory=config.delivery.ack_memory, batch_size=config.upstream.ack_batch_size
        )
        acks = Acknowledger(
            UpstreamClient(http, config.upstream, config.account), config.delivery, metrics.account("default"), ledger
        )
        task = asyncio.create_task(acks.run())
        try:
            # Each id as a detail polled, published and confirmed: nothing else is in flight.
            new, _known = ledger.polled([RawRecord({}, detail_no) for detail_no in ids], ledger.poll_sent())
            for record in new:
                assert record.detail_no is not None
                ledger.confirmed(record.detail_no)
            async with asyncio.timeout(20):
                await ledger.wait_idle()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    return acks


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


async def test_the_default_batch_of_32_character_ids_stays_within_8_kib() -> None:
    # V1 puts every common parameter and the STS token in the query too: the longest request line there is.
    token = base64.b64encode(secrets.token_bytes(975)).decode()  # 1300 characters, a long STS token
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"RequestId": "R", "Result": 100})

    config = load_settings(
        access_key_id="LTAI5t" + "x" * 18,
        access_key_secret="secret",
        security_token=token,
        signature_version="v1",
        user_client_ip="255.255.255.255",
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await UpstreamClient(http, config.upstream, config.account).acknowledge(
            [secrets.token_hex(16) for _ in range(config.upstream.ack_batch_size)]
        )
    line = f"POST {seen[0].url.raw_path.decode()} HTTP/1.1"
    assert config.upstream.ack_batch_size == 100
    assert len(line) <= REQUEST_LINE_LIMIT, len(line)  # measured 6613


@pytest.mark.parametrize("signature", ["v3", "v1"])
async def test_long_ids_are_split_by_bytes(metrics: Metrics, signature: str) -> None:
    sim = Simulator(seed=81)
    template = Simulator(seed=82)
    ids = []
    for index, model in enumerate(template.add_details(120)):
        record = template.detail(model)
        assert record is not None
        detail_no = f"{index:04d}-" + "long-id-" * 30  # 245 characters, 20 ids fill the byte budget
        sim.add_raw({**record, "TaskDetailNo": detail_no})
        ids.append(detail_no)
    app = Recording(sim)
    await acknowledge_all(app, settings(signature_version=signature), ids, metrics)
    assert sim.pending_count == 0
    assert sim.ack_counts == dict.fromkeys(ids, 1)
    assert max(app.id_counts) < 100  # the byte budget, not the batch size, cut the calls
    assert all(len(line) <= REQUEST_LINE_LIMIT for line in app.lines), max(len(line) for line in app.lines)
    assert sum(app.id_counts) == 120
    assert ACK_IDS_MAX_BYTES < REQUEST_LINE_LIMIT


async def test_an_id_longer_than_the_budget_still_leaves_alone(metrics: Metrics) -> None:
    sim = Simulator(seed=83)
    template = Simulator(seed=84)
    (model,) = template.add_details(1)
    record = template.detail(model)
    assert record is not None
    huge_id = "x" * (ACK_IDS_MAX_BYTES + 100)
    sim.add_raw({**record, "TaskDetailNo": huge_id})
    normal = sim.add_details(3)
    app = Recording(sim)
    await acknowledge_all(app, settings(), [huge_id, *normal], metrics)
    assert app.id_counts == [1, 3]
    assert sim.pending_count == 0


async def test_a_refused_batch_is_halved_until_the_upstream_takes_it(metrics: Metrics) -> None:
    sim = Simulator(seed=85)
    ids = sim.add_details(250)
    sim.faults.ack_max_ids = 30  # the simulator answers 400 InvalidParameter above 30 ids
    app = Recording(sim)
    acks = await acknowledge_all(app, settings(ack_concurrency=1), ids, metrics)
    assert sim.pending_count == 0
    assert sim.ack_counts == dict.fromkeys(ids, 1)
    assert sample(metrics, "bridge_ack_batch_size") == 25
    assert app.id_counts[:3] == [100, 50, 25]
    assert acks._ledger.outstanding == 0


async def test_a_failed_call_is_retried_whole(metrics: Metrics) -> None:
    sim = Simulator(seed=86)
    ids = sim.add_details(40)
    failures = {"left": 2}

    async def flaky(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and b"TaskDetailNo.1=" in scope["query_string"] and failures["left"]:
            failures["left"] -= 1
            body = b'{"RequestId": "F", "Code": "ServiceUnavailable", "Message": "busy"}'
            await send({"type": "http.response.start", "status": 200, "headers": []})  # an error object in a 200
            await send({"type": "http.response.body", "body": body})
            return
        await sim(scope, receive, send)

    await acknowledge_all(flaky, settings(ack_batch_size=40), ids, metrics)
    assert sim.ack_counts == dict.fromkeys(ids, 1)
    assert sample(metrics, "bridge_acknowledgements_total", outcome="failed") == 80  # the whole batch, twice
    assert sample(metrics, "bridge_acknowledgements_total", outcome="confirmed") == 40

"""The real run loop (ledger, policy, acknowledger, publisher tasks) against drawn upstream and broker behaviour.

Fakes stand in for the upstream and the broker (tests/test_bridge.py and tests/test_faults.py use the real ones);
hypothesis draws the page size, the window, the broker's answers (ack, nack, return, timeout, closed), the
acknowledgements' outcomes (applied, in part, dropped, unusable Result, failed) and whether the upstream lists
in another order or repeats a record. Every run must drain (``--once``) with: no id acknowledged without a
confirmed event, no id published again once confirmed, no id published twice at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import acknowledger
from bridge.errors import RetryableUpstreamError
from bridge.loop import BridgeLoop
from bridge.metrics import Metrics
from bridge.publisher import PublishOutcome
from bridge.records import RawRecord
from bridge.settings import BrokerSettings, Settings, load_settings
from bridge.upstream import ACKNOWLEDGE_ACTION, AckResult, Page
from tests.samples import task_detail

PUBLISH_OUTCOMES = [PublishOutcome.ACK] * 4 + [o for o in PublishOutcome if o is not PublishOutcome.ACK]
ACK_OUTCOMES = ["applied", "applied", "in_part", "dropped", "unusable", "failed"]


class Broker:
    def __init__(self, outcomes: Iterator[PublishOutcome], settings: BrokerSettings) -> None:
        self.settings = settings
        self.ever_connected = True
        self.connected = True
        self.last_refusal: str | None = None
        self.blocked_reason: str | None = None
        self.refused_reason: str | None = None
        self.outcomes = outcomes
        self.on_wire: set[str] = set()
        self.confirmed: set[str] = set()
        self.publishes = 0

    async def ensure_connected(self) -> None:
        self.connected = True

    async def publish(self, item: Any, *, invalid: bool = False) -> PublishOutcome:
        detail_no = item.message_id
        assert detail_no not in self.on_wire, f"{detail_no} published twice at once"
        assert detail_no not in self.confirmed, f"{detail_no} published again after its event was confirmed"
        self.on_wire.add(detail_no)
        self.publishes += 1
        await asyncio.sleep(0)
        self.on_wire.discard(detail_no)
        outcome = next(self.outcomes, PublishOutcome.ACK)
        if outcome is PublishOutcome.ACK:
            self.confirmed.add(detail_no)
        return outcome


class Upstream:
    def __init__(
        self, count: int, broker: Broker, outcomes: Iterator[str], rng: random.Random | None, settings: Settings
    ) -> None:
        self.settings = settings.upstream
        self.account = settings.account
        self.pending = [f"T{n:04d}" for n in range(count)]
        self.broker = broker
        self.outcomes = outcomes
        self.rng = rng  # lists in another order, and repeats a record, when set

    async def poll(self, page_num: int = 1, page_size: int | None = None) -> Page:
        size = page_size or 1
        await asyncio.sleep(0)
        listing = list(self.pending)
        if self.rng is not None:
            self.rng.shuffle(listing)
        ids = listing[(page_num - 1) * size : page_num * size]
        if self.rng is not None and ids and self.rng.random() < 0.3:
            ids.append(ids[0])
        records = [RawRecord(task_detail(TaskDetailNo=d), d) for d in ids]
        return Page("r", page_num, size, len(self.pending), -(-len(self.pending) // size), records)

    async def acknowledge(self, detail_nos: list[str]) -> AckResult:
        for detail_no in detail_nos:
            assert detail_no in self.broker.confirmed, f"{detail_no} acknowledged without a confirmed event"
        await asyncio.sleep(0)
        outcome = next(self.outcomes, "applied")
        if outcome == "failed":
            raise RetryableUpstreamError("unavailable", action=ACKNOWLEDGE_ACTION, status_code=503)
        applied = {"applied": detail_nos, "in_part": detail_nos[::2], "unusable": detail_nos}.get(outcome, [])
        self.pending = [d for d in self.pending if d not in set(applied)]
        confirmed: Any = -1 if outcome == "unusable" else len(applied)
        return AckResult(sent=len(detail_nos), confirmed=confirmed)


@pytest.fixture(autouse=True)
def short_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acknowledger, "ACK_LINGER_S", 0.001)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    count=st.integers(0, 25),
    page_size=st.integers(1, 6),
    window=st.integers(1, 4),
    batch=st.integers(1, 4),
    read_ahead=st.booleans(),
    publishes=st.lists(st.sampled_from(PUBLISH_OUTCOMES), max_size=30),
    acks=st.lists(st.sampled_from(ACK_OUTCOMES), max_size=10),
    unordered=st.one_of(st.none(), st.integers(0, 1000)),
)
def test_the_loop_drains_without_acknowledging_unconfirmed_or_publishing_held_ids(
    count: int,
    page_size: int,
    window: int,
    batch: int,
    read_ahead: bool,
    publishes: list[PublishOutcome],
    acks: list[str],
    unordered: int | None,
) -> None:
    config = load_settings(
        access_key_id="id",
        access_key_secret="secret",
        page_size=page_size,
        max_in_flight=window,
        ack_batch_size=batch,
        read_ahead=read_ahead,
        poll_interval_s=0.01,
        backoff_initial_s=0.001,
        backoff_max_s=0.002,
    )
    broker = Broker(iter(publishes), config.broker)
    rng = random.Random(unordered) if unordered is not None else None
    upstream = Upstream(count, broker, iter(acks), rng, config)
    loop = BridgeLoop(config.delivery, upstream, broker, Metrics().account("default"))  # type: ignore[arg-type]

    async def drain() -> bool:
        async with asyncio.timeout(30):
            return await loop.run(asyncio.Event(), once=True)

    assert asyncio.run(drain())
    assert upstream.pending == []
    assert loop.ledger.on_their_way == 0
    assert loop.progress.published == count

"""The election of one active poller per account, against a real broker: exclusivity, takeover bounds, metrics.

Each contender has a connection of its own, as separate processes would. The takeover times measured here are
printed (``-s``) and quoted in docs/leadership.md. The module runs on a private RabbitMQ node (the session's
``shared_node``): the takeover bounds are timings, and one test restarts the broker, which the machine's shared
broker never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from prometheus_client import CollectorRegistry

from bridge.errors import BrokerUnavailableError
from bridge.leadership import Leadership, LeadershipMetrics, Lease, Role, lock_name
from tests.faults_support import TcpProxy, amqp_port
from tests.private_broker import PrivateNode

pytestmark = pytest.mark.broker

ACCOUNT = "reseller-eu"
FAST = {"retry_interval_s": (0.2, 0.4)}


@dataclass
class Contender:
    """One process's part in the election: its connection, its Leadership, and the loop that keeps contending."""

    leadership: Leadership
    connection: AbstractConnection
    registry: CollectorRegistry
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    lease: Lease | None = None
    terms: int = 0
    hold_s: Callable[[], float] | None = None
    task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self.leadership.role is Role.LEADER

    async def run(self) -> None:
        """Contend until stopped; hold each term until the lock is lost, stop is set or ``hold_s`` runs out."""
        with contextlib.suppress(BrokerUnavailableError):
            while not self.stop.is_set():
                lease = await self.leadership.acquire(self.connection, self.stop)
                if lease is None:
                    return
                self.lease, self.terms = lease, self.terms + 1
                async with lease:
                    waits = [asyncio.ensure_future(lease.lost.wait()), asyncio.ensure_future(self.stop.wait())]
                    timeout = self.hold_s() if self.hold_s else None
                    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    for waiter in waits:
                        waiter.cancel()
                if timeout is not None:
                    # A process that gave the lock up voluntarily lets the others have a turn.
                    await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def contenders(
    urls: list[str],
    exchanges: list[str],
    account: str = ACCOUNT,
    hold_s: Callable[[], float] | None = None,
    **options: object,
) -> AsyncIterator[list[Contender]]:
    """One started contender per URL (and exchange); stopped cleanly and their connections closed afterwards."""
    started: list[Contender] = []
    try:
        for url, exchange in zip(urls, exchanges, strict=True):
            registry = CollectorRegistry()
            connection = await aio_pika.connect(url)
            leadership = Leadership(account, exchange, LeadershipMetrics(registry), **options)  # type: ignore[arg-type]
            contender = Contender(leadership, connection, registry, hold_s=hold_s)
            contender.task = asyncio.create_task(contender.run())
            started.append(contender)
        yield started
    finally:
        for contender in started:
            contender.stop.set()
        await asyncio.wait([c.task for c in started if c.task], timeout=10)
        for contender in started:
            with contextlib.suppress(Exception):
                await contender.connection.close()


@pytest.fixture(scope="module")
def node(shared_node: PrivateNode) -> PrivateNode:
    """The session's private node: a test here restarts it, which the machine's broker never is."""
    return shared_node


@pytest.fixture
def broker_url(node: PrivateNode) -> str:
    """The module's private node (overrides conftest's machine broker)."""
    return node.url


@pytest.fixture
async def exchange(broker_url: str) -> AsyncIterator[str]:
    """A unique deployment name; its lock queues are deleted afterwards (a standby's declare can leave one)."""
    name = f"test.{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(Exception):
        async with await aio_pika.connect(broker_url) as connection:
            channel = await connection.channel()
            for account in (ACCOUNT, "other"):
                await channel.queue_delete(lock_name(name, account))


async def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``check()`` held, polled every 10 ms; fails after ``timeout_s``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def leaders(group: list[Contender]) -> list[Contender]:
    return [c for c in group if c.leading]


def sample_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- exclusivity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
async def test_exactly_one_leader_at_any_time(broker_url: str, exchange: str, count: int) -> None:
    """Leaders hand over every 0.2-0.5 s; sampled every 5 ms for 6 s, never two leaders, rarely none."""
    rng = random.Random(count)
    hold_s = lambda: rng.uniform(0.2, 0.5)  # noqa: E731
    async with contenders([broker_url] * count, [exchange] * count, hold_s=hold_s, **FAST) as group:
        await wait_until(lambda: len(leaders(group)) == 1, 5, "a first leader")
        samples, without = 0, 0
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            held = leaders(group)
            assert len(held) <= 1, [c.leadership.role for c in group]
            samples, without = samples + 1, without + (not held)
            await asyncio.sleep(0.005)
        terms = sum(c.terms for c in group)
    assert terms >= 8, f"only {terms} terms: the hand-over was not exercised"
    assert sum(1 for c in group if c.terms) >= 2
    # Between a release and the next standby's retry (0.2-0.4 s here) nobody leads; most of the time someone does.
    assert without < samples / 2


async def test_two_deployments_with_the_same_account_do_not_contend(broker_url: str, exchange: str) -> None:
    other = f"{exchange}-b"
    async with contenders([broker_url] * 4, [exchange, exchange, other, other], **FAST) as group:
        await wait_until(lambda: len(leaders(group)) == 2, 5, "one leader per deployment")
        await asyncio.sleep(1)
        assert {c.leadership.lock_name for c in leaders(group)} == {
            lock_name(exchange, ACCOUNT),
            lock_name(other, ACCOUNT),
        }
    async with await aio_pika.connect(broker_url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(lock_name(other, ACCOUNT))


async def test_accounts_on_one_exchange_have_separate_locks(broker_url: str, exchange: str) -> None:
    async with contenders([broker_url], [exchange]) as first, contenders([broker_url], [exchange], "other") as second:
        await wait_until(lambda: first[0].leading and second[0].leading, 5, "both accounts led")


# --- takeover -----------------------------------------------------------------------------------------------


async def test_clean_release_hands_over_within_3_s(broker_url: str, exchange: str) -> None:
    """Default retry interval (1-2 s): the standby takes over at its next attempt after the release."""
    async with contenders([broker_url] * 2, [exchange] * 2) as group:
        await wait_until(lambda: len(leaders(group)) == 1, 5, "a first leader")
        old = leaders(group)[0]
        standby = next(c for c in group if c is not old)
        await wait_until(lambda: standby.leadership.role is Role.STANDBY, 5, "the other standing by")
        old.stop.set()
        seconds = await wait_until(lambda: standby.leading, 3, "the standby took over")
    print(f"\ntakeover after a clean release: {seconds:.2f} s")


async def test_leader_connection_closed_hands_over_within_3_s(broker_url: str, exchange: str) -> None:
    async with contenders([broker_url] * 3, [exchange] * 3) as group:
        await wait_until(lambda: len(leaders(group)) == 1, 5, "a first leader")
        await asyncio.sleep(0.5)
        old = leaders(group)[0]
        await old.connection.close()
        assert old.lease is not None and old.lease.lost.is_set()
        assert old.lease.reason is not None and "connection closed" in old.lease.reason
        seconds = await wait_until(lambda: len(leaders(group)) == 1 and not old.leading, 3, "a new leader")
    print(f"\ntakeover after the leader's connection closed: {seconds:.2f} s")


async def test_sigkilled_leader_process_is_replaced_well_within_15_s(broker_url: str, exchange: str) -> None:
    """The broker sees the killed process's socket close at once; the standby's next retry takes the lock."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.leadership_holder", broker_url, exchange, ACCOUNT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 15) == b"leader\n"
        async with contenders([broker_url], [exchange]) as group:
            await wait_until(lambda: group[0].leadership.role is Role.STANDBY, 5, "the standby standing by")
            await asyncio.sleep(1)
            assert not group[0].leading
            holder.send_signal(signal.SIGKILL)
            seconds = await wait_until(lambda: group[0].leading, 5, "the standby took over")
        assert await holder.wait() == -signal.SIGKILL
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    print(f"\ntakeover after SIGKILL of the leader's process: {seconds:.2f} s")


@pytest.mark.parametrize("heartbeat_s", [2, 4])
async def test_leader_cut_off_silently_stops_before_the_standby_takes_over(
    broker_url: str, exchange: str, heartbeat_s: int
) -> None:
    """A stalled link (a partition): nothing closes the socket, so only heartbeats end the leader's connection.

    The broker drops the connection 2-3 heartbeats after the last byte it read, and the standby takes the lock at
    its next retry (1-2 s); the leader gives the lock up after 1.5 heartbeats of silence on its own, so the two
    never lead at once. With the 4 s heartbeat the takeover stays within 15 s.
    """
    async with TcpProxy(amqp_port(broker_url)) as proxy:
        via_proxy = f"{proxy.url(broker_url)}?heartbeat={heartbeat_s}"
        async with contenders([via_proxy], [exchange]) as old_group:
            old = old_group[0]
            await wait_until(lambda: old.leading, 5, "the proxied contender leading")
            async with contenders([broker_url], [exchange]) as new_group:
                new = new_group[0]
                await wait_until(lambda: new.leadership.role is Role.STANDBY, 5, "the direct contender standing by")
                await asyncio.sleep(1)
                stalled_at = time.monotonic()
                proxy.stall()
                fenced_s = await wait_until(lambda: not old.leading, 3 * heartbeat_s, "the cut-off leader stopped")
                await wait_until(lambda: new.leading, 3 * heartbeat_s + 3, "the standby took over")
                took_over_s = time.monotonic() - stalled_at
                assert not old.leading
                proxy.resume()
    assert old.lease is not None and old.lease.reason is not None
    assert "no answer from the broker" in old.lease.reason or "closed" in old.lease.reason
    assert fenced_s < took_over_s
    print(
        f"\nstalled link, heartbeat {heartbeat_s} s: old leader stopped after {fenced_s:.2f} s, "
        f"standby took over after {took_over_s:.2f} s"
    )


async def test_a_stall_shorter_than_the_heartbeat_ends_the_lease_without_wedging_the_lock(
    broker_url: str, exchange: str
) -> None:
    """The lease check gives up after 6 s of silence, but the broker keeps the connection (4 s heartbeat: 8-12 s).

    The leader closes its lock channel when it gives up; once the link flows again that close frees the lock, so
    the election goes on instead of waiting behind a consumer nobody uses. Never two leaders meanwhile.
    """
    async with TcpProxy(amqp_port(broker_url)) as proxy:
        via_proxy = f"{proxy.url(broker_url)}?heartbeat=4"
        async with contenders([via_proxy], [exchange]) as old_group:
            await wait_until(lambda: old_group[0].leading, 5, "the proxied contender leading")
            async with contenders([broker_url], [exchange]) as new_group:
                group = old_group + new_group
                await wait_until(lambda: new_group[0].leadership.role is Role.STANDBY, 5, "a standby")
                proxy.stall()
                deadline = time.monotonic() + 7
                while time.monotonic() < deadline:
                    assert len(leaders(group)) <= 1
                    await asyncio.sleep(0.01)
                assert not leaders(group), "the cut-off leader still leads after 7 s of silence"
                lease = old_group[0].lease
                assert lease is not None and lease.reason is not None and "no answer" in lease.reason
                proxy.resume()
                seconds = await wait_until(lambda: len(leaders(group)) == 1, 4, "a leader after the link recovered")
                assert proxy.cuts == 0 and not old_group[0].connection.is_closed
    print(f"\nleader again {seconds:.2f} s after a 7 s stall ended")


# --- other ways the lock goes -------------------------------------------------------------------------------


async def test_deleted_lock_queue_ends_the_lease_and_someone_leads_again(broker_url: str, exchange: str) -> None:
    """An operator deleting the lock queue: the broker cancels the consumer, the leader stops, the election reruns."""
    async with contenders([broker_url] * 2, [exchange] * 2, **FAST) as group:
        await wait_until(lambda: len(leaders(group)) == 1, 5, "a first leader")
        old = leaders(group)[0]
        first_lease = old.lease
        async with await aio_pika.connect(broker_url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(lock_name(exchange, ACCOUNT))
        assert first_lease is not None
        await wait_until(first_lease.lost.is_set, 2, "the lease lost")
        assert first_lease.reason is not None and "cancelled" in first_lease.reason
        await wait_until(lambda: len(leaders(group)) == 1 and sum(c.terms for c in group) == 2, 3, "a new term")


async def test_closed_lock_channel_ends_the_lease(broker_url: str, exchange: str) -> None:
    async with contenders([broker_url], [exchange], **FAST) as group:
        await wait_until(lambda: group[0].leading, 5, "leading")
        lease = group[0].lease
        assert lease is not None
        await lease._channel.close()
        await wait_until(lease.lost.is_set, 2, "the lease lost")
        assert lease.reason is not None and "lock channel closed" in lease.reason
        # The connection is healthy: the same process takes the lock again on a fresh channel.
        await wait_until(lambda: group[0].terms == 2 and group[0].leading, 3, "leading again")


async def test_acquire_returns_none_on_stop_and_raises_when_the_connection_goes(broker_url: str, exchange: str) -> None:
    async with contenders([broker_url], [exchange]) as group:
        await wait_until(lambda: group[0].leading, 5, "a leader")
        registry = CollectorRegistry()
        leadership = Leadership(ACCOUNT, exchange, LeadershipMetrics(registry), retry_interval_s=(0.1, 0.2))
        async with await aio_pika.connect(broker_url) as connection:
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.5, stop.set)
            assert await leadership.acquire(connection, stop) is None
            assert leadership.role is Role.IDLE
            closing = asyncio.get_running_loop().call_later(0.5, lambda: asyncio.ensure_future(connection.close()))
            with pytest.raises(BrokerUnavailableError):
                await asyncio.wait_for(leadership.acquire(connection, asyncio.Event()), 5)
            closing.cancel()
        assert leadership.role is Role.IDLE


# --- what an operator sees ----------------------------------------------------------------------------------


async def test_gauge_counter_and_one_log_line_per_transition(
    broker_url: str, exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.leadership")
    async with contenders([broker_url] * 2, [exchange] * 2, **FAST) as group:
        await wait_until(lambda: len(leaders(group)) == 1, 5, "a first leader")
        first = leaders(group)[0]
        second = next(c for c in group if c is not first)
        await wait_until(lambda: second.leadership.role is Role.STANDBY, 5, "standing by")
        assert sample_value(first.registry, "bridge_leader", account=ACCOUNT) == 1
        assert sample_value(second.registry, "bridge_leader", account=ACCOUNT) == 0
        first.stop.set()
        await wait_until(lambda: second.leading, 3, "the standby took over")
        assert sample_value(first.registry, "bridge_leader", account=ACCOUNT) == 0
        assert sample_value(second.registry, "bridge_leader", account=ACCOUNT) == 1
    records = [r for r in caplog.records if r.name == "bridge.leadership"]
    for record in records:
        assert record.account == ACCOUNT  # type: ignore[attr-defined]
        assert record.reason  # type: ignore[attr-defined]
    messages = [r.getMessage() for r in records]
    # first: became leader, released leadership. second: standing by, became leader, released leadership.
    assert messages.count("became leader") == 2
    assert messages.count("standing by") == 1
    assert messages.count("released leadership") == 2
    for contender in group:
        counted = sum(
            sample_value(contender.registry, "bridge_leader_transitions_total", account=ACCOUNT, role=role.value)
            for role in Role
        )
        assert counted == (2 if contender is first else 3)
    assert len(records) == 5


def test_lock_name_and_account_validation() -> None:
    assert lock_name("domain.tasks", "reseller-eu") == "domain.tasks.leader.reseller-eu"
    with pytest.raises(ValueError, match="Bad_Name"):
        Leadership("Bad_Name", "domain.tasks", LeadershipMetrics(CollectorRegistry()))


async def test_broker_restart_ends_every_role_and_the_reconnected_elect_one(node: PrivateNode, exchange: str) -> None:
    """A broker restart closes every connection: no one leads until they reconnect, then one does."""
    async with contenders([node.url] * 2, [exchange] * 2, **FAST) as group:
        await wait_until(lambda: len(leaders(group)) == 1, 5, "a first leader")
        await wait_until(lambda: all(c.leadership.role is not Role.IDLE for c in group), 5, "a standby")
        old = leaders(group)[0]
        await asyncio.to_thread(node.stop_app)
        try:
            await wait_until(lambda: all(c.leadership.role is Role.IDLE for c in group), 5, "every role ended")
            assert old.lease is not None and old.lease.lost.is_set()
            assert all(c.task is not None and c.task.done() for c in group)
        finally:
            await asyncio.to_thread(node.start_app)
    async with contenders([node.url] * 2, [exchange] * 2, **FAST) as group:
        await wait_until(lambda: len(leaders(group)) == 1, 5, "a leader after the restart")

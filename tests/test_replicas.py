"""Several ``task-bridge run`` processes with the same settings: one polls, the others stand by and take over.

Real processes, the simulator over HTTP, the machine's RabbitMQ and a unique exchange per test. A sampler reads
every process's ``/metrics`` about every 100 ms: ``bridge_leader`` says who leads, ``bridge_polls_total`` who
polls. The takeover times measured here are the ones ``docs/leadership.md`` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aio_pika
import httpx
import pytest

from bridge.cli import EXIT_OK
from bridge.errors import DeadlineExceeded
from bridge.leadership import Leadership, lock_name
from bridge.metrics import Metrics
from bridge.simulator import Faults, Simulator, running
from tests.faults_support import ScenarioQueues, draining, scenario_queues, start_bridge
from tests.harness import bridge_env, bridge_settings, eventually, run_once, running_bridge, sample

pytestmark = pytest.mark.broker

PAGE = 250
WINDOW = 128
# What one leader holds at most (in flight, or confirmed and not yet acknowledged): what a SIGKILL can leave for
# the next leader to publish again (tests/test_faults.py argues the bound).
OUTSTANDING_MAX = 4 * PAGE
SAMPLE_S = 0.1
KILLED_TAKEOVER_MAX_S = 15.0
STOPPED_TAKEOVER_MAX_S = 3.0

_SAMPLE = re.compile(
    r'^(bridge_polls_total\{account="default",outcome="ok"\}|bridge_leader\{account="default"\}) (\S+)$', re.MULTILINE
)


@dataclass
class Replica:
    """One bridge process, its log and operator port, and what the sampler saw of it."""

    process: asyncio.subprocess.Process
    log: Path
    port: int = 0
    leader: bool = False
    polls: float = 0.0

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@dataclass
class Sampler:
    """Reads each replica's metrics every :data:`SAMPLE_S` and keeps what the assertions need."""

    replicas: list[Replica]
    two_leaders: list[float] = field(default_factory=list)
    """Times at which two replicas said they lead."""
    polled_while_standby: list[int] = field(default_factory=list)
    """Replicas whose poll count grew between two samples that both said standby."""
    leader_since: dict[int, float] = field(default_factory=dict)
    """Replica index -> when the sampler first saw it lead (``time.monotonic()``)."""
    leader_since_wall: dict[int, float] = field(default_factory=dict)
    """The same, as ``time.time()``, to compare with the processes' log lines."""

    async def sample_once(self, http: httpx.AsyncClient) -> None:
        leaders = 0
        for index, replica in enumerate(self.replicas):
            if replica.process.returncode is not None:
                replica.leader = False
                continue
            try:
                text = (await http.get(f"http://127.0.0.1:{replica.port}/metrics")).text
            except httpx.HTTPError:
                continue  # the process is stopping
            values = {name: float(value) for name, value in _SAMPLE.findall(text)}
            leader = values.get('bridge_leader{account="default"}', 0.0) == 1.0
            polls = values.get('bridge_polls_total{account="default",outcome="ok"}', 0.0)
            if polls > replica.polls and not leader and not replica.leader:
                self.polled_while_standby.append(index)
            replica.polls, replica.leader = polls, leader
            if leader:
                leaders += 1
                if index not in self.leader_since:
                    self.leader_since[index], self.leader_since_wall[index] = time.monotonic(), time.time()
        if leaders > 1:
            self.two_leaders.append(time.monotonic())

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=1.0) as http:
            while True:
                await self.sample_once(http)
                await asyncio.sleep(SAMPLE_S)

    def leader(self) -> int | None:
        found = [i for i, r in enumerate(self.replicas) if r.leader and r.process.returncode is None]
        return found[0] if len(found) == 1 else None


def _logged_at(log: Path, message: str) -> float | None:
    """``time.time()`` of the first JSON log line of ``log`` with ``message``."""
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message") == message:
                return datetime.fromisoformat(entry["time"]).timestamp()
    return None


def _metrics_port(log: Path) -> int | None:
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message") == "task-bridge started":
                return int(entry["metrics_port"])
    return None


@contextlib.asynccontextmanager
async def replicas(
    count: int, sim: Simulator, queues: ScenarioQueues, tmp_path: Path
) -> AsyncIterator[tuple[list[Replica], Sampler]]:
    """``count`` bridges with the same settings against ``sim``, and the sampler running over them."""
    async with running(sim) as url:
        settings = bridge_settings(
            queues.exchange, queues.amqp_url, upstream_endpoint=url, page_size=PAGE, max_in_flight=WINDOW
        )
        env = bridge_env(settings)
        started: list[Replica] = []
        sampling: asyncio.Task[None] | None = None
        try:
            for index in range(count):
                log = tmp_path / f"bridge-{index}.log"
                started.append(Replica(await start_bridge(env, log, "run"), log))
            for replica in started:
                await eventually(lambda r=replica: _metrics_port(r.log) is not None, timeout_s=20, what="start")
                replica.port = _metrics_port(replica.log) or 0
            sampler = Sampler(started)
            sampling = asyncio.create_task(sampler.run())
            yield started, sampler
        finally:
            if sampling is not None:
                sampling.cancel()
                await asyncio.gather(sampling, return_exceptions=True)
            for replica in started:
                if replica.process.returncode is None:
                    replica.process.terminate()
            for replica in started:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(replica.process.wait(), 20)
                if replica.process.returncode is None:
                    replica.process.kill()
                    await replica.process.wait()


@pytest.fixture
async def queues(broker_url: str, exchange_name: str) -> AsyncIterator[ScenarioQueues]:
    async with scenario_queues(broker_url, exchange_name) as declared:
        yield declared


async def _stop_all(group: list[Replica]) -> list[int | None]:
    for replica in group:
        if replica.process.returncode is None:
            replica.process.send_signal(signal.SIGTERM)
    return [await asyncio.wait_for(r.process.wait(), 25) for r in group]


def _tails(group: list[Replica]) -> str:
    return "\n".join(f"--- {r.log.name}\n{r.text()[-1500:]}" for r in group)


@pytest.mark.parametrize("count", [2, 3])
async def test_replicas_exactly_one_polls(count: int, queues: ScenarioQueues, tmp_path: Path) -> None:
    details = 3000
    sim = Simulator(tasks=details, seed=120 + count, faults=Faults(latency_s=0.005))
    async with replicas(count, sim, queues, tmp_path) as (group, sampler):
        await eventually(lambda: sampler.leader() is not None, timeout_s=20, what="a leader")
        await eventually(lambda: sim.pending_count == 0, timeout_s=60, what="drained")
        await asyncio.sleep(1.5)  # the leader keeps polling page 1 every poll interval; the standbys never poll
        leader = sampler.leader()
        assert leader is not None
        async with httpx.AsyncClient(timeout=2.0) as http:
            bodies = [(await http.get(f"http://127.0.0.1:{r.port}/readyz")) for r in group]
        codes = await _stop_all(group)
    assert [b.status_code for b in bodies] == [200] * count
    assert [b.text for b in bodies] == [
        f"ready: {'leader' if i == leader else 'standby'} for account default\n" for i in range(count)
    ]
    assert not sampler.two_leaders, "two processes led at once"
    assert not sampler.polled_while_standby, "a standby polled"
    assert [r.polls > 0 for r in group] == [i == leader for i in range(count)], "only the leader polls"
    assert codes == [EXIT_OK] * count, _tails(group)
    result = await queues.tally(sim, details)
    assert (result.lost, result.duplicates, result.unacknowledged) == (0, 0, 0)


async def _takeover(sampler: Sampler, old: int, timeout_s: float) -> tuple[int, float]:
    """The new leader's index and when the sampler first saw it lead."""
    await eventually(
        lambda: (index := sampler.leader()) is not None and index != old, timeout_s=timeout_s, what="a new leader"
    )
    new = sampler.leader()
    assert new is not None
    return new, sampler.leader_since[new]


async def _leader_mid_drain(sampler: Sampler, sim: Simulator, details: int) -> int:
    """The index of the process that leads, once a fifth of the ``details`` are acknowledged."""
    await eventually(lambda: sampler.leader() is not None, timeout_s=20, what="a leader")
    leader = sampler.leader()
    assert leader is not None
    await eventually(lambda: sim.acknowledged_count >= details // 5, timeout_s=30, what="drain under way")
    return leader


async def test_sigkill_of_the_leader_mid_drain(queues: ScenarioQueues, tmp_path: Path) -> None:
    details = 6000
    sim = Simulator(tasks=details, seed=131, faults=Faults(latency_s=0.01))
    async with replicas(3, sim, queues, tmp_path) as (group, sampler):
        old = await _leader_mid_drain(sampler, sim, details)
        group[old].process.kill()
        killed_at = time.monotonic()
        await group[old].process.wait()
        pending_at_kill = sim.pending_count
        _new, since = await _takeover(sampler, old, KILLED_TAKEOVER_MAX_S + 5)
        await eventually(lambda: sim.pending_count == 0, timeout_s=60, what="drained by the new leader")
        codes = await _stop_all([r for i, r in enumerate(group) if i != old])
    takeover_s = since - killed_at
    print(f"takeover after SIGKILL: {takeover_s:.2f} s")
    assert pending_at_kill > 0, "the kill should land mid-drain"
    assert takeover_s <= KILLED_TAKEOVER_MAX_S
    assert not sampler.two_leaders
    assert not sampler.polled_while_standby
    assert codes == [EXIT_OK, EXIT_OK], _tails(group)
    result = await queues.tally(sim, details)
    print(f"duplicates after SIGKILL: {result.duplicates} (at most {OUTSTANDING_MAX})")
    assert (result.lost, result.unacknowledged, result.misrouted) == (0, 0, 0), result
    assert result.duplicates <= OUTSTANDING_MAX, result


async def test_sigterm_of_the_leader_mid_drain(queues: ScenarioQueues, tmp_path: Path) -> None:
    details = 6000
    sim = Simulator(tasks=details, seed=132, faults=Faults(latency_s=0.01))
    async with replicas(2, sim, queues, tmp_path) as (group, sampler):
        old = await _leader_mid_drain(sampler, sim, details)
        group[old].process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        pending_at_signal = sim.pending_count
        new, since = await _takeover(sampler, old, STOPPED_TAKEOVER_MAX_S + 10)
        old_code = await asyncio.wait_for(group[old].process.wait(), 25)
        released_at = _logged_at(group[old].log, "released leadership")
        await eventually(lambda: sim.pending_count == 0, timeout_s=60, what="drained by the new leader")
        codes = await _stop_all(group)
    takeover_s = since - signalled
    assert released_at is not None, _tails(group)
    # The bound runs from the release: the old leader first drains what it has on the wire (its shutdown budget).
    after_release_s = sampler.leader_since_wall[new] - released_at
    print(f"takeover after SIGTERM: {takeover_s:.2f} s from the signal, {after_release_s:.2f} s from the release")
    assert pending_at_signal > 0, "the signal should land mid-drain"
    assert old_code == EXIT_OK, _tails(group)
    assert codes[1 - old] == EXIT_OK, _tails(group)
    assert 0 <= after_release_s <= STOPPED_TAKEOVER_MAX_S
    assert not sampler.two_leaders
    result = await queues.tally(sim, details)
    assert (result.lost, result.unacknowledged, result.misrouted, result.duplicates) == (0, 0, 0, 0), result


# --- one process: the election's effect on the loop --------------------------------------------------------


async def test_deposed_leader_publishes_nothing_new_stands_by_and_takes_over_again(queues: ScenarioQueues) -> None:
    # Deleting the lock queue makes the broker cancel the leader's consumer: the lease is lost while the
    # connection stays up. The loop ends its term (queued details withdrawn, confirmed ones acknowledged), drops
    # its state, stands by, and, being alone, takes the lock again and finishes the drain.
    details = 5000
    sim = Simulator(tasks=details, seed=133, faults=Faults(latency_s=0.01))
    metrics = Metrics()
    settings = bridge_settings(queues.exchange, queues.amqp_url, page_size=PAGE, max_in_flight=WINDOW)
    leader = metrics.leadership.leader.labels("default")
    async with draining(settings, sim, metrics) as drain:
        await eventually(lambda: sim.acknowledged_count >= details // 5, timeout_s=30, what="drain under way")
        assert drain.app.loop is not None and drain.app.loop.leading
        async with await aio_pika.connect(queues.amqp_url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(lock_name(queues.exchange, "default"))
        await eventually(lambda: leader._value.get() == 0, timeout_s=5, what="lost leadership")
        pending_when_deposed = sim.pending_count
        complete = await drain.finished()
    result = await queues.tally(sim, details)
    transitions = {
        role: sample(metrics, "bridge_leader_transitions_total", account="default", role=role)
        for role in ("leader", "idle")
    }
    assert pending_when_deposed > 0, "the lock should go mid-drain"
    assert complete
    assert sim.pending_count == 0
    assert transitions["leader"] >= 2 and transitions["idle"] >= 1, transitions
    assert (result.lost, result.unacknowledged, result.misrouted) == (0, 0, 0), result
    assert result.duplicates <= OUTSTANDING_MAX, result


async def test_once_stands_by_while_another_process_leads_then_gives_up(queues: ScenarioQueues) -> None:
    sim = Simulator(tasks=50, seed=134)
    settings = bridge_settings(queues.exchange, queues.amqp_url, once_deadline_s=1.5)
    async with await aio_pika.connect(queues.amqp_url) as connection:
        holder = Leadership("default", queues.exchange, Metrics().leadership)
        lease = await holder.acquire(connection, asyncio.Event())
        assert lease is not None
        async with lease:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="another process leads account default"):
                await run_once(settings, sim)
            waited_s = time.monotonic() - started
        assert sum(sim.polls_by_page.values()) == 0, "a standby never polls"
        # Once the holder released the lock, the next --once run takes it and drains.
        assert await run_once(settings, sim)
    assert 1.5 <= waited_s < 10
    assert sim.pending_count == 0


async def test_without_election_the_process_polls_alone_and_says_it_leads(queues: ScenarioQueues) -> None:
    sim = Simulator(tasks=300, seed=135)
    settings = bridge_settings(queues.exchange, queues.amqp_url, leader_election=False)
    async with running_bridge(settings, sim) as (app, _stop):
        await eventually(lambda: sim.pending_count == 0, timeout_s=20, what="drained")
        metrics = app.metrics
        during = sample(metrics, "bridge_leader", account="default")
        assert app.loop is not None and app.loop.role() is None
        async with await aio_pika.connect(queues.amqp_url) as connection:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):  # no lock was taken
                await channel.declare_queue(lock_name(queues.exchange, "default"), passive=True)
    assert during == 1
    assert sample(metrics, "bridge_leader", account="default") == 0
    assert sample(metrics, "bridge_leader_transitions_total", account="default", role="leader") == 0

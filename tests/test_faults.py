"""Fault injection: the bridge drains thousands of details while the broker, the network, the process or the
upstream misbehaves, against the real RabbitMQ and the project's simulator.

Every scenario ends with the same checks, from the simulator's record of acknowledgements and what reached
the test's queues (one bound ``#``, declared before the bridge starts, and ``<exchange>.invalid``):

- lost = 0: every acknowledged detail has its event (an invalid one its record in the invalid queue);
- pending = 0: the drain finished; every message in a queue belongs to an acknowledged detail;
- every malformed record is in the invalid queue, and only there;
- duplicates = 0 where nothing crashed, and within a stated bound where something did.

Why duplicates are bounded: the bridge acknowledges a detail only after the broker's ``Basic.Ack`` and never
publishes a detail again while it is in flight or confirmed-and-held, so a second copy can only come from a
publish whose outcome the bridge did not learn (the connection dropped, the confirm timed out) or from a
process that died holding confirmed details it had not acknowledged yet.

Each scenario adds a row to the table printed at the end of the run (and written to ``tests/.fault-table.md``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.cli import EXIT_OK
from bridge.metrics import PUBLISH_OUTCOMES, Metrics
from bridge.settings import Settings
from bridge.simulator import Faults, Simulator, running
from tests.faults_support import (
    FAULT_TABLE,
    FaultTable,
    ScenarioQueues,
    Tally,
    TcpProxy,
    TooManyDuplicates,
    amqp_port,
    draining,
    node_app_stopped,
    scenario_queues,
    start_bridge,
)
from tests.harness import bridge_env, bridge_settings, eventually, sample
from tests.private_broker import PrivateNode, private_cluster

pytestmark = [pytest.mark.faults, pytest.mark.broker]

PAGE = 250
WINDOW = 128  # max_in_flight: publishes on the wire, awaiting the broker's answer
# What one bridge holds at most (in flight, or confirmed and not yet acknowledged): it reads ahead only while a
# page more keeps at most four pages on their way, and otherwise polls page 1 once at most half a page is held.
OUTSTANDING_MAX = 4 * PAGE


@pytest.fixture(scope="session")
def fault_table(pytestconfig: pytest.Config) -> FaultTable:
    """The session's table of results; conftest.py prints it in the terminal summary."""
    return pytestconfig.stash.setdefault(FAULT_TABLE, FaultTable())


@pytest.fixture
async def queues(broker_url: str, exchange_name: str) -> AsyncIterator[ScenarioQueues]:
    async with scenario_queues(broker_url, exchange_name) as declared:
        yield declared


def settings_for(queues: ScenarioQueues, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"page_size": PAGE, "max_in_flight": WINDOW, "once_deadline_s": 60.0}
    values.update(overrides)
    amqp_url = values.pop("amqp_url", queues.amqp_url)
    return bridge_settings(queues.exchange, amqp_url, **values)


def publishes(metrics: Metrics, *outcomes: str) -> int:
    return int(sum(sample(metrics, "bridge_events_published_total", outcome=o) for o in outcomes))


def unanswered(metrics: Metrics) -> int:
    """Publishes whose outcome was not a ``Basic.Ack``: only these can leave a copy the bridge republishes."""
    return publishes(metrics, *(o for o in PUBLISH_OUTCOMES if o != "ack"))


def check(result: Tally, sim: Simulator, allowed_duplicates: int = 0) -> None:
    assert sim.pending_count == 0, "the drain did not finish"
    assert result.lost == 0, "details acknowledged upstream without an event"
    assert result.unacknowledged == 0, "events whose detail was never acknowledged"
    assert result.misrouted == 0, "the invalid queue should hold exactly the malformed records"
    if result.duplicates > allowed_duplicates:
        raise TooManyDuplicates(f"{result.duplicates} duplicates, at most {allowed_duplicates} allowed")


async def drain_and_record(
    queues: ScenarioQueues, fault_table: FaultTable, sim: Simulator, details: int, scenario: str
) -> tuple[bool, Tally, Metrics]:
    """Drain ``sim`` in-process with the suite's settings; add the scenario's row to the table."""
    metrics = Metrics()
    started = time.monotonic()
    async with draining(settings_for(queues), sim, metrics) as drain:
        complete = await drain.finished()
    seconds = time.monotonic() - started
    result = await queues.tally(sim, details)
    fault_table.add(scenario, result, seconds)
    return complete, result, metrics


def trail(metrics: Metrics, caplog: pytest.LogCaptureFixture) -> str:
    """The publish outcomes and the bridge's INFO and WARNING lines so far, for a scenario that did not finish."""
    outcomes = {outcome: publishes(metrics, outcome) for outcome in PUBLISH_OUTCOMES}
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    lines = [f"{r.relativeCreated / 1000:.2f}s {r.name} {r.getMessage()}" for r in records]
    return f"publishes {outcomes}; log: " + " | ".join(lines[-40:])


def log_tail(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-3000:]


# --- the broker and the network ------------------------------------------------------------------------------


async def test_broker_restarted_mid_drain(
    shared_node: PrivateNode, exchange_name: str, fault_table: FaultTable
) -> None:
    # On the session's private node: the machine's broker is shared and never stopped.
    details = 5000
    sim = Simulator(tasks=details, seed=101)
    metrics = Metrics()
    async with scenario_queues(shared_node.url, exchange_name) as queues:
        started = time.monotonic()
        async with draining(settings_for(queues), sim, metrics) as drain:
            await eventually(lambda: sim.acknowledged_count >= details // 5, what="drain under way")
            async with node_app_stopped(shared_node):
                pending_when_down = sim.pending_count
                await eventually(lambda: sample(metrics, "bridge_broker_connected") == 0, what="connection lost")
                await asyncio.sleep(1.0)  # the bridge retries with backoff against a closed port meanwhile
            complete = await drain.finished()
        seconds = time.monotonic() - started
        result = await queues.tally(sim, details)
    # Publishes on the wire when the connection dropped may be stored without a confirm, and are published
    # again after the reconnect: at most the in-flight window.
    fault_table.add("broker restarted mid-drain (stop_app, start_app)", result, seconds, WINDOW)
    assert pending_when_down > 0, "the broker should go down mid-drain"
    assert complete
    check(result, sim, allowed_duplicates=min(WINDOW, unanswered(metrics)))


async def test_cluster_node_stopped_mid_drain(
    exchange_name: str, fault_table: FaultTable, caplog: pytest.LogCaptureFixture
) -> None:
    # A three-node cluster of private nodes, quorum queues, and BRIDGE_AMQP_URL listing the three nodes. Leader
    # election is on: the lock lives on the stopped node's connection, so the leader loses it and takes it again
    # on another node.
    for logger in ("bridge.publisher", "bridge.leadership", "bridge.loop"):
        caplog.set_level(logging.INFO, logger=logger)
    details = 5000
    sim = Simulator(tasks=details, seed=111)
    metrics = Metrics()

    def connected_to() -> list[str]:
        return [str(getattr(r, "broker", "")) for r in caplog.records if r.getMessage() == "broker connected"]

    with private_cluster(3) as nodes:
        urls = " , ".join(node.url for node in nodes)
        async with scenario_queues(nodes[0].url, exchange_name, arguments={"x-queue-type": "quorum"}) as queues:
            started = time.monotonic()
            settings = settings_for(queues, amqp_url=urls)
            async with draining(settings, sim, metrics) as drain:
                await eventually(lambda: sim.acknowledged_count >= details // 5, what="drain under way")
                (first,) = connected_to()
                stopped = next(node for node in nodes if f":{node.port}/" in first)
                pending_when_stopped = sim.pending_count
                await asyncio.to_thread(stopped.ctl, "stop")  # the whole node, not only its AMQP listener
                queues.amqp_url = next(node.url for node in nodes if node is not stopped)
                try:
                    complete = await drain.finished()
                except Exception as exc:
                    raise AssertionError(f"the drain did not finish: {exc!r}; {trail(metrics, caplog)}") from exc
            seconds = time.monotonic() - started
            result = await queues.tally(sim, details)
    # As for a restart: publishes on the wire when the node went may be stored without a confirm. The bound
    # assumes one lost connection. The stopped node led the quorum queue (declared through it), so the publishes
    # on the next node wait for the queue's new leader; should that take longer than the publish timeout, the
    # bridge gives that connection up too, and a second window may be stored without its confirm (up to 2 *
    # WINDOW duplicates, legitimately). So may what the deposed leader confirmed and did not acknowledge within
    # DEPOSED_ACK_S: its term's state is dropped and the next term publishes it again. Neither seen so far (116 at
    # most, docs/faults.md): should this bound fail, look for confirm timeouts after the reconnect
    # (bridge_events_published_total{outcome="timeout"}) and the deposed leader's log line first.
    fault_table.add("cluster node the bridge uses stopped mid-drain (3 nodes, quorum queues)", result, seconds, WINDOW)
    assert pending_when_stopped > 0, "the node should stop mid-drain"
    assert first == nodes[0].url.replace(":guest@", ":***@"), "the first URL of the list is tried first"
    later = connected_to()[1:]
    assert later, "the bridge should reconnect"
    assert all(f":{stopped.port}/" not in broker for broker in later), "it reconnects to another node"
    terms = sample(metrics, "bridge_leader_transitions_total", account="default", role="leader")
    assert terms >= 2, "the leader loses its lock with the node and takes it again on another"
    assert complete
    check(result, sim, allowed_duplicates=min(WINDOW, unanswered(metrics)))


async def test_connection_cut_twice_mid_drain(queues: ScenarioQueues, broker_url: str, fault_table: FaultTable) -> None:
    details = 4000
    sim = Simulator(tasks=details, seed=102)
    metrics = Metrics()
    pending_at_cut: list[int] = []
    async with TcpProxy(amqp_port(broker_url)) as proxy:

        async def cut_at(acknowledged: int) -> None:
            await eventually(lambda: sim.acknowledged_count >= acknowledged, what="drain under way")
            connections = proxy.accepted
            assert proxy.cut() == 1, "the bridge uses one connection"
            pending_at_cut.append(sim.pending_count)
            await eventually(lambda: proxy.accepted > connections, what="the bridge reconnected")

        settings = settings_for(queues, amqp_url=proxy.url(broker_url))
        started = time.monotonic()
        async with draining(settings, sim, metrics) as drain:
            await cut_at(details // 5)
            await cut_at(details // 2)
            complete = await drain.finished()
        seconds = time.monotonic() - started
    result = await queues.tally(sim, details)
    # Each cut can leave the window of publishes on the wire stored but unconfirmed.
    fault_table.add("connection cut twice mid-drain (TCP proxy)", result, seconds, 2 * WINDOW)
    assert all(pending > 0 for pending in pending_at_cut), "each cut should land mid-drain"
    assert complete
    assert publishes(metrics, "closed") > 0, "the cuts should catch publishes in flight"
    check(result, sim, allowed_duplicates=min(2 * WINDOW, unanswered(metrics)))


async def test_connection_stalled_mid_drain(queues: ScenarioQueues, broker_url: str, fault_table: FaultTable) -> None:
    details = 4000
    sim = Simulator(tasks=details, seed=103)
    metrics = Metrics()
    async with TcpProxy(amqp_port(broker_url)) as proxy:
        settings = settings_for(queues, amqp_url=proxy.url(broker_url), publish_timeout_s=1.0)
        started = time.monotonic()
        async with draining(settings, sim, metrics) as drain:
            await eventually(lambda: sim.acknowledged_count >= details // 5, what="drain under way")
            proxy.stall()
            pending_at_stall = sim.pending_count
            try:
                await eventually(lambda: publishes(metrics, "timeout") > 0, timeout_s=10, what="confirm timeouts")
                await asyncio.sleep(2.0)  # several rounds of timeouts and republishes into the stalled connection
            finally:
                proxy.resume()
            complete = await drain.finished()
        seconds = time.monotonic() - started
    result = await queues.tally(sim, details)
    # Publishes that timed out reach the queue once the held bytes flow again, and their details are published
    # again. A bridge that stops publishing into a connection once a confirm timed out (and reconnects) leaves
    # at most the window on the wire at that moment; one that goes on adds up to a window per timeout round.
    # The window is full when the link stalls and the proxy forwards every held byte on resume, so this bound
    # is often reached exactly (128 of 128 in docs/faults.md): the expected worst case, not a second window.
    fault_table.add("connection stalled 3 s mid-drain (publish timeout 1 s)", result, seconds, WINDOW)
    assert pending_at_stall > 0, "the stall should land mid-drain"
    assert complete
    assert publishes(metrics, "timeout") > 0
    check(result, sim, allowed_duplicates=min(WINDOW, unanswered(metrics)))


async def test_broker_refusing_publishes_until_the_queue_is_drained(
    broker_url: str, exchange_name: str, fault_table: FaultTable
) -> None:
    details, room = 3000, 300
    sim = Simulator(tasks=details, seed=110)
    metrics = Metrics()
    refusing = {"x-max-length": room, "x-overflow": "reject-publish"}
    async with scenario_queues(broker_url, exchange_name, arguments=refusing) as queues:
        started = time.monotonic()
        async with draining(settings_for(queues), sim, metrics) as drain:
            await eventually(lambda: publishes(metrics, "nack") >= 100, what="the full queue refuses publishes")
            await asyncio.sleep(0.5)
            acknowledged_while_full = sim.acknowledged_count
            # A consumer drains the queue; the broker takes publishes again and the drain can finish.
            async with queues.consuming(queues.events) as consumed:
                complete = await drain.finished()
                await eventually(lambda: len(consumed) >= details, what="the consumer got every event")
        seconds = time.monotonic() - started
        # A nacked message is stored nowhere (the full queue is its only route): no copy is left behind.
        result = await queues.tally(sim, details, taken=consumed)
    fault_table.add(f"broker refuses publishes (x-max-length {room}, reject-publish)", result, seconds)
    assert acknowledged_while_full <= room, "a refused publish must not be acknowledged"
    assert complete
    check(result, sim)


# --- the process ---------------------------------------------------------------------------------------------


async def test_sigkill_mid_drain_then_started_again(
    queues: ScenarioQueues, fault_table: FaultTable, tmp_path: Path
) -> None:
    details = 4000
    sim = Simulator(tasks=details, seed=104)
    log = tmp_path / "bridge.log"
    async with running(sim) as url:
        env = bridge_env(settings_for(queues, upstream_endpoint=url))
        started = time.monotonic()
        killed = await start_bridge(env, log, "run")
        try:
            await eventually(lambda: sim.acknowledged_count >= details // 5, timeout_s=30, what="drain under way")
        finally:
            killed.kill()
            await killed.wait()
        pending_at_kill = sim.pending_count
        again = await start_bridge(env, log, "run", "--once")
        code = await asyncio.wait_for(again.wait(), 60)
        seconds = time.monotonic() - started
    result = await queues.tally(sim, details)
    # The killed bridge held at most OUTSTANDING_MAX details it had published and not yet acknowledged (in
    # flight, at most WINDOW of them on the wire, or confirmed and waiting for their acknowledgement); the
    # upstream hands those out again, and the new bridge publishes each a second time.
    fault_table.add("SIGKILL mid-drain, then started again", result, seconds, OUTSTANDING_MAX)
    assert killed.returncode == -signal.SIGKILL
    assert pending_at_kill > 0, "the kill should land mid-drain"
    assert code == EXIT_OK, log_tail(log)
    check(result, sim, allowed_duplicates=OUTSTANDING_MAX)


async def test_sigterm_mid_drain_then_started_again(
    queues: ScenarioQueues, fault_table: FaultTable, tmp_path: Path
) -> None:
    details = 4000
    sim = Simulator(tasks=details, seed=105)
    log = tmp_path / "bridge.log"
    async with running(sim) as url:
        settings = settings_for(queues, upstream_endpoint=url)
        env = bridge_env(settings)
        started = time.monotonic()
        stopped = await start_bridge(env, log, "run")
        try:
            await eventually(lambda: sim.acknowledged_count >= details // 5, timeout_s=30, what="drain under way")
            stopped.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = await asyncio.wait_for(stopped.wait(), settings.delivery.shutdown_timeout_s + 5)
            stop_s = time.monotonic() - signalled
        finally:
            if stopped.returncode is None:
                stopped.kill()
                await stopped.wait()
        pending_at_exit = sim.pending_count
        acknowledged_at_exit = set(sim.ack_counts)
        events_at_exit = await queues.take(queues.events)
        again = await start_bridge(env, log, "run", "--once")
        code_again = await asyncio.wait_for(again.wait(), 60)
        seconds = time.monotonic() - started
    result = await queues.tally(sim, details, taken=events_at_exit)
    fault_table.add("SIGTERM mid-drain, then started again", result, seconds)
    assert code == EXIT_OK, log_tail(log)
    assert stop_s < settings.delivery.shutdown_timeout_s
    assert pending_at_exit > 0, "the signal should land mid-drain"
    # A graceful stop finishes its publishes and acknowledges everything confirmed: nothing is left for the
    # next run to publish again, and nothing was acknowledged without its event.
    assert set(events_at_exit) == acknowledged_at_exit
    assert code_again == EXIT_OK, log_tail(log)
    check(result, sim)


# --- the upstream --------------------------------------------------------------------------------------------


async def test_upstream_errors_and_latency(queues: ScenarioQueues, fault_table: FaultTable) -> None:
    details = 3000
    # 20% of requests fail: 503 ServiceUnavailable, 400 Throttling and 500 InternalError, after 30 ms.
    faults = Faults(latency_s=0.03, unavailable_ratio=0.07, throttling_ratio=0.07, internal_error_ratio=0.06)
    sim = Simulator(tasks=details, seed=106, faults=faults)
    complete, result, metrics = await drain_and_record(
        queues, fault_table, sim, details, "upstream: 20% 503 / Throttling / 500, 30 ms latency"
    )
    assert complete
    for outcome in ("throttled", "retryable_error"):
        failed = sum(
            sample(metrics, "bridge_upstream_requests_total", action=action, outcome=outcome)
            for action in ("PollTaskResult", "AcknowledgeTaskResult")
        )
        assert failed > 0, outcome
    check(result, sim)


async def test_upstream_requests_hanging_past_the_client_timeout(
    queues: ScenarioQueues, fault_table: FaultTable
) -> None:
    details = 3000
    # A hung request outlives the client's timeout; the simulator still carries it out afterwards.
    sim = Simulator(tasks=details, seed=107, faults=Faults(hang_ratio=0.1, hang_s=2.0))
    metrics = Metrics()
    async with running(sim) as url:
        settings = settings_for(queues, upstream_endpoint=url, request_timeout_s=0.3)
        started = time.monotonic()
        async with draining(settings, sim, metrics, asgi=False) as drain:
            complete = await drain.finished()
        seconds = time.monotonic() - started
    result = await queues.tally(sim, details)
    fault_table.add("upstream: 10% of requests hang past the 0.3 s client timeout", result, seconds)
    assert complete
    timeouts = sum(
        sample(metrics, "bridge_upstream_requests_total", action=action, outcome="retryable_error")
        for action in ("PollTaskResult", "AcknowledgeTaskResult")
    )
    assert timeouts > 0
    check(result, sim)


async def test_acknowledgements_failing_for_a_while(queues: ScenarioQueues, fault_table: FaultTable) -> None:
    details = 3000
    sim = Simulator(tasks=details, seed=108)
    metrics = Metrics()
    started = time.monotonic()
    async with draining(settings_for(queues), sim, metrics) as drain:
        await eventually(lambda: sim.acknowledged_count >= details // 5, what="drain under way")
        sim.faults.ack_failure_ratio = 1.0
        await eventually(
            lambda: sample(metrics, "bridge_acknowledgements_total", outcome="failed") > 0, what="acks failing"
        )
        acknowledged_while_failing = sim.acknowledged_count
        await asyncio.sleep(1.5)  # polls keep bringing back the held details
        held = sample(metrics, "bridge_confirmed_unacknowledged")
        acknowledged_after = sim.acknowledged_count
        sim.faults.ack_failure_ratio = 0.0
        complete = await drain.finished()
    seconds = time.monotonic() - started
    result = await queues.tally(sim, details)
    fault_table.add("acknowledgements failing for 1.5 s after successful publishes", result, seconds)
    assert acknowledged_after == acknowledged_while_failing
    assert 0 < held <= OUTSTANDING_MAX, "held details are bounded: the bridge stops taking in new ones"
    assert complete
    check(result, sim)


async def test_malformed_records(queues: ScenarioQueues, fault_table: FaultTable) -> None:
    details = 3000
    sim = Simulator(tasks=details, seed=109, faults=Faults(malformed_ratio=0.05))
    complete, result, metrics = await drain_and_record(queues, fault_table, sim, details, "5% malformed records")
    assert complete
    assert len(sim.malformed_ids) > details * 0.03
    assert sample(metrics, "bridge_invalid_records_total", reason="validation") == len(sim.malformed_ids)
    check(result, sim)


async def test_upstream_listing_details_in_another_order(queues: ScenarioQueues, fault_table: FaultTable) -> None:
    # Read-ahead assumes the upstream lists pending details oldest first; here every poll answers in a random
    # order, so read-ahead pages overlap held details and skip new ones. Page 1 must still find every one.
    details = 3000
    sim = Simulator(tasks=details, seed=110, faults=Faults(unordered_ratio=1.0, latency_s=0.01))
    complete, result, _ = await drain_and_record(
        queues, fault_table, sim, details, "upstream lists pending details in random order (read-ahead)"
    )
    assert complete
    assert sum(count for page, count in sim.polls_by_page.items() if page > 1) > 0
    check(result, sim)

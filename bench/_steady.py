"""Steady state: how long a detail takes from appearing upstream to its event being delivered from a queue.

The simulator starts empty; this process adds one detail at a time through ``POST /_control
{"add_details": 1}`` at a steady rate, noting when it sent each request and the id the answer names, while a
consumer on the queue bound ``#`` notes when each event arrives. The latency of a detail is the arrival time
minus the time its POST was sent: an upper bound, too high by at most the POST's own round trip, whose median
is reported with it. ``task-bridge run`` (not ``--once``) runs as a child with the given poll interval; the
first ``warmup_s`` seconds (process start, first connection) are left out of the figures.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _broker import BenchBroker
from _drain import log_tail
from _procs import BRIDGE_COMMAND, Child, Exit, PhaseError, bridge_env, start_simulator
from aio_pika.abc import AbstractIncomingMessage

__all__ = ["Steady", "percentile", "steady"]

_SETTLE_EXTRA_S = 15.0
_STOP_TIMEOUT_S = 40.0


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``samples`` by nearest rank."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Steady:
    """Latencies (seconds) of the details added after the warm-up, and the bridge child's :class:`Exit`."""

    rate_per_s: float
    poll_interval_s: float
    duration_s: float
    latencies_s: list[float]
    post_rtt_s: list[float]
    exit: Exit
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_s
        return {
            "samples": len(lat),
            "p50_s": percentile(lat, 0.50) if lat else None,
            "p90_s": percentile(lat, 0.90) if lat else None,
            "p99_s": percentile(lat, 0.99) if lat else None,
            "max_s": max(lat) if lat else None,
            "mean_s": statistics.fmean(lat) if lat else None,
            "post_rtt_median_s": statistics.median(self.post_rtt_s) if self.post_rtt_s else None,
        }


async def steady(
    broker: BenchBroker,
    workdir: Path,
    *,
    rate_per_s: float,
    duration_s: float,
    warmup_s: float,
    poll_interval_s: float,
    seed: int,
    bridge: Sequence[str] = BRIDGE_COMMAND,
) -> Steady:
    """Run the bridge for ``warmup_s + duration_s`` against a trickle of ``rate_per_s`` details."""
    exchange = broker.name("steady")
    received: dict[str, list[float]] = {}

    async def consume(message: AbstractIncomingMessage) -> None:
        received.setdefault(str(message.message_id), []).append(time.monotonic())

    try:
        queue_name = await broker.bridge_topology(exchange)
        consumer = await broker.connect()
        try:
            channel = await consumer.channel()
            await channel.set_qos(prefetch_count=1000)
            await (await channel.get_queue(queue_name)).consume(consume, no_ack=True)
            sim = await start_simulator(workdir, tasks=0, seed=seed, log_name="steady.sim")
            try:
                result = await _trickle(
                    [*bridge, "run"],
                    sim.url,
                    workdir,
                    env=bridge_env(
                        endpoint=sim.url,
                        amqp_url=broker.url,
                        exchange=exchange,
                        poll_interval_seconds=f"{poll_interval_s:g}",
                    ),
                    received=received,
                    rate_per_s=rate_per_s,
                    duration_s=duration_s,
                    warmup_s=warmup_s,
                    poll_interval_s=poll_interval_s,
                )
            finally:
                sim.child.stop()
        finally:
            await consumer.close()
    finally:
        await broker.cleanup()
    return result


async def _trickle(
    argv: list[str],
    url: str,
    workdir: Path,
    *,
    env: dict[str, str],
    received: dict[str, list[float]],
    rate_per_s: float,
    duration_s: float,
    warmup_s: float,
    poll_interval_s: float,
) -> Steady:
    log_path = workdir / "steady.bridge.log"
    with log_path.open("wb") as log:
        child = Child(argv, env=env, cwd=workdir, stdout=log, stderr=log)
    exited = asyncio.create_task(child.wait(timeout_s=warmup_s + duration_s + 600))
    sent: dict[str, float] = {}
    rtts: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            started = time.monotonic()
            measured_from = started + warmup_s
            end = measured_from + duration_s
            i = 0
            while (now := time.monotonic()) < end:
                if exited.done():
                    raise PhaseError(f"the bridge stopped during the run: {log_tail(log_path, 2)}")
                target = started + i / rate_per_s  # an absolute schedule: a slow POST does not shift the rest
                if target > now:
                    await asyncio.sleep(target - now)
                posted = time.monotonic()
                response = await http.post("/_control", json={"add_details": 1})
                response.raise_for_status()
                rtts.append(time.monotonic() - posted)
                for detail_no in response.json()["added"]:
                    sent[detail_no] = posted
                i += 1
            # Wait for the last details: one poll interval (plus jitter) and the publish, with a margin.
            deadline = time.monotonic() + 2 * poll_interval_s + _SETTLE_EXTRA_S
            # A 0.1 s check is plenty here: this wait is not part of any figure.
            while any(d not in received for d in sent) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            child.signal(signal.SIGTERM)  # a graceful stop, as an orchestrator would ask
            try:
                exit = await asyncio.wait_for(exited, _STOP_TIMEOUT_S)
            except TimeoutError:
                raise PhaseError(f"the bridge did not stop within {_STOP_TIMEOUT_S:g} s of SIGTERM") from None
            # Only now: acknowledgements trail the events (they linger to fill a batch); a stop finishes them.
            state = (await http.get("/_state")).json()
    finally:
        child.stop()
        if not exited.done():
            exited.cancel()
    latencies = [received[d][0] - t for d, t in sent.items() if t >= measured_from and d in received]
    result = Steady(
        rate_per_s=rate_per_s,
        poll_interval_s=poll_interval_s,
        duration_s=duration_s,
        latencies_s=latencies,
        post_rtt_s=rtts,
        exit=exit,
    )
    missing = [d for d in sent if d not in received]
    duplicated = [d for d, times in received.items() if len(times) > 1]
    unknown = [d for d in received if d not in sent]
    if missing:
        result.problems.append(f"{len(missing)} of {len(sent)} details never reached the queue")
    if duplicated:
        result.problems.append(f"{len(duplicated)} events arrived more than once")
    if unknown:
        result.problems.append(f"{len(unknown)} events arrived for details the bench did not add")
    if state["pending"] != 0:
        result.problems.append(f"the simulator still holds {state['pending']} pending details")
    if exit.returncode != 0:
        result.problems.append(f"the bridge exited {exit.returncode}: {log_tail(log_path, 2)}")
    return result

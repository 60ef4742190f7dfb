"""The raw ceiling: plain aio-pika confirmed publishing of the bridge's own events, run as a child process.

    BRIDGE_AMQP_URL=amqp://... python bench/_raw.py --exchange NAME --count N --seed S

Builds ``N`` events with :func:`bridge.events.convert` from the simulator's generator (the same seed gives the
same details the simulator serves, so the same bodies, headers and routing keys), then publishes them to
``NAME`` (which must exist) with publisher confirms, persistent, ``mandatory``, at most ``--window`` in flight.
Only the publishing is timed: wall seconds and this process's CPU seconds (``time.process_time``) go to
stdout as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import aio_pika
from pamqp.commands import Basic

from bridge.events import Event, InvalidRecord, convert
from bridge.records import RawRecord
from bridge.runtime import tune_for_service
from bridge.settings import AccountSettings, BrokerSettings
from bridge.simulator.generator import DetailGenerator

__all__ = ["build_events", "main"]


def build_events(count: int, seed: int) -> list[Event]:
    """``count`` events converted from the simulator's seeded details (the simulator's first ``count``)."""
    generator = DetailGenerator(seed)
    source = BrokerSettings.model_fields["event_source"].default
    account = AccountSettings.model_fields["name"].default
    now_s = time.time()
    events: list[Event] = []
    for _ in range(count):
        detail = json.loads(json.dumps(generator.next(now_s)))  # as the bridge receives it: parsed JSON
        item = convert(RawRecord(raw=detail, detail_no=detail["TaskDetailNo"]), source=source, account=account)
        if isinstance(item, InvalidRecord):
            raise SystemExit(f"the generator made an invalid detail: {item.error}")
        events.append(item)
    return events


async def _publish_all(url: str, exchange_name: str, events: list[Event], window: int) -> dict[str, Any]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
        exchange = await channel.get_exchange(exchange_name, ensure=True)
        slots = asyncio.Semaphore(window)
        tasks: set[asyncio.Task[None]] = set()
        failed = 0

        async def one(event: Event) -> None:
            nonlocal failed
            try:
                confirmation = await exchange.publish(event.message(), routing_key=event.routing_key, mandatory=True)
            finally:
                slots.release()
            if not isinstance(confirmation, Basic.Ack):
                failed += 1

        cpu_started = time.process_time()
        started = time.perf_counter()
        for event in events:
            await slots.acquire()
            task = asyncio.create_task(one(event))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        wall_s = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
    finally:
        await connection.close()
    return {"published": len(events) - failed, "failed": failed, "wall_s": wall_s, "cpu_s": cpu_s}


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    events = build_events(args.count, args.seed)
    result = await _publish_all(args.url, args.exchange, events, args.window)
    sizes = [len(event.body) for event in events]
    result.update(body_bytes_mean=statistics.fmean(sizes), body_bytes_min=min(sizes), body_bytes_max=max(sizes))
    return result


def main(argv: list[str] | None = None) -> int:
    """Publish and print the JSON result; exit 1 when a publish was not confirmed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument(
        "--tuned", action="store_true", help="apply the bridge's process tuning (bridge.runtime) before publishing"
    )
    args = parser.parse_args(argv)
    if args.tuned:
        tune_for_service()
    # The URL comes from the environment, as for the bridge: a password on a command line is visible to ps.
    args.url = os.environ.get("BRIDGE_AMQP_URL") or BrokerSettings.model_fields["amqp_url"].default.get_secret_value()
    result = asyncio.run(_main(args))
    print(json.dumps(result), flush=True)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

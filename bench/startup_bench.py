"""How long ``task-bridge run --once`` takes from its start to its first publish, and where that time goes.

    python bench/startup_bench.py [--runs 5] [--amqp-url URL]

Starts ``task-bridge simulate``, then, after adding one detail to its backlog each time, ``--runs`` times a
bridge process (``python -m bridge run --once``, its own exchange each time) with a probe that notes, in wall
seconds from the moment the process was started: the imports done (``main`` called), the broker connected, and the first
``Publisher.publish``. It prints each run and the median of each figure. Every exchange and queue a run
declared is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import httpx
from _procs import SIM_KEY_ID, SIM_KEY_SECRET, start_simulator

__all__ = ["main"]

# The child: notes the time of each step on stderr as one JSON line at exit; then runs the bridge as the CLI does.
_PROBE = """
import json, sys, time
marks = {}
from bridge import publisher
publish, connect = publisher.Publisher.publish, publisher.Publisher.connect
async def first_publish(self, item, *, invalid=False):
    marks.setdefault("first_publish", time.time())
    return await publish(self, item, invalid=invalid)
async def connected(self):
    await connect(self)
    marks.setdefault("connected", time.time())
publisher.Publisher.publish, publisher.Publisher.connect = first_publish, connected
from bridge.cli import main
marks["imported"] = time.time()
sys.argv = ["task-bridge", "run", "--once"]
try:
    code = main()
finally:
    print("PROBE " + json.dumps(marks), file=sys.stderr, flush=True)
raise SystemExit(code)
"""
_STEPS = ("imported", "connected", "first_publish")


async def _delete(url: str, exchange: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        for queue in (f"{exchange}.unrouted", f"{exchange}.invalid"):
            with contextlib.suppress(aio_pika.exceptions.AMQPError):  # a failed delete closes its channel
                await (await connection.channel()).queue_delete(queue)
        for name in (exchange, f"{exchange}.unrouted", f"{exchange}.invalid"):
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await (await connection.channel()).exchange_delete(name)


def _one_run(endpoint: str, amqp_url: str, exchange: str, workdir: Path) -> dict[str, float]:
    env = {
        **os.environ,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": SIM_KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SIM_KEY_SECRET,
        "BRIDGE_UPSTREAM_ENDPOINT": endpoint,
        "BRIDGE_AMQP_URL": amqp_url,
        "BRIDGE_EXCHANGE": exchange,
        "BRIDGE_METRICS_PORT": "0",
    }
    started = time.time()
    # Run from the work directory: from here, ``-c`` would put this checkout ahead of a PYTHONPATH being compared.
    argv = [sys.executable, "-c", _PROBE]
    done = subprocess.run(argv, env=env, cwd=workdir, capture_output=True, text=True, timeout=60)
    ended = time.time()
    probe = [line for line in done.stderr.splitlines() if line.startswith("PROBE ")]
    if done.returncode != 0 or not probe:
        raise SystemExit(f"startup_bench: the bridge exited {done.returncode}: {done.stderr[-500:]}")
    marks = json.loads(probe[-1].removeprefix("PROBE "))
    figures = {step: marks[step] - started for step in _STEPS if step in marks}
    figures["exit"] = ended - started
    return figures


async def _run(args: argparse.Namespace, workdir: Path) -> list[dict[str, float]]:
    simulator = await start_simulator(workdir, tasks=0, seed=1)
    runs = []
    try:
        for _ in range(args.runs):
            exchange = f"bench.startup.{uuid.uuid4().hex[:12]}"
            async with httpx.AsyncClient(base_url=simulator.url) as http:
                (await http.post("/_control", json={"add_details": 1})).raise_for_status()
            try:
                runs.append(await asyncio.to_thread(_one_run, simulator.url, args.amqp_url, exchange, workdir))
            finally:
                await _delete(args.amqp_url, exchange)
            print("  ".join(f"{k} {v:.3f} s" for k, v in runs[-1].items()), flush=True)
    finally:
        simulator.child.stop()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="startup_bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--amqp-url", default=os.environ.get("BRIDGE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as workdir:
        runs = asyncio.run(_run(args, Path(workdir)))
    print("median: " + "  ".join(f"{k} {statistics.median(r[k] for r in runs):.3f} s" for k in runs[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

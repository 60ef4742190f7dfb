"""The leader lock's cost: ``task-bridge run --once`` drain rate with the election on and off, interleaved.

    python bench/lock_cost.py [--details 20000] [--runs 3]

One replica, the same machine and broker, the same backlog; the runs alternate in ABBA order (on, off, off,
on, ...) so a machine that gets busier or quieter, and whatever the first run of a pair pays, affects both alike.
Each drain counts only when every detail arrived exactly once (``_drain.drain``'s checks). Prints each run and
the ratio of the medians, with the spread of each side.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from _broker import bench_broker
from _drain import drain
from _procs import BRIDGE_COMMAND

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# The bench's bridge_env drops every BRIDGE_ variable of this process: the switch goes on the command line.
WITHOUT_ELECTION = ["env", "BRIDGE_LEADER_ELECTION=false", *BRIDGE_COMMAND]


async def _main(args: argparse.Namespace) -> int:
    rates: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="lock-cost-") as tmp:
        async with bench_broker(args.amqp_url) as broker:
            for run in range(args.runs):
                sides = [("on", BRIDGE_COMMAND), ("off", WITHOUT_ELECTION)]
                for election, command in sides if run % 2 == 0 else sides[::-1]:
                    phase = f"lock-{election}-{run}"
                    result = await drain(
                        broker, Path(tmp), phase=phase, details=args.details, seed=args.seed + run, bridge=command
                    )
                    if result.problems:
                        print(f"{phase}: {'; '.join(result.problems)}", file=sys.stderr)
                        return 1
                    rates[election].append(result.rate_per_s)
                    cpu[election].append(result.exit.cpu_s)
                    print(
                        f"run {run + 1} election {election:3}: {result.rate_per_s:8.0f} details/s, "
                        f"{result.exit.wall_s:5.2f} s wall, {result.exit.cpu_s:5.2f} s CPU",
                        flush=True,
                    )
    for election in ("on", "off"):
        values = rates[election]
        print(
            f"election {election:3}: median {statistics.median(values):8.0f} details/s "
            f"(min {min(values):.0f}, max {max(values):.0f}), median CPU {statistics.median(cpu[election]):.2f} s"
        )
    ratio = statistics.median(rates["on"]) / statistics.median(rates["off"])
    cpu_ratio = statistics.median(cpu["on"]) / statistics.median(cpu["off"])
    print(f"drain rate on / off: {ratio:.3f}; CPU on / off: {cpu_ratio:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="lock_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--details", type=int, default=20_000, help="backlog per drain (20,000)")
    parser.add_argument("--runs", type=int, default=4, help="drains per side (4)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    return asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

"""How many details per second the simulator serves: poll 1000, acknowledge them, repeat, over real HTTP.

    python bench/simulator_bench.py --details 50000

The simulator runs in a subprocess (its own core, as in the demo); this process is the client, signing every
request (V3 by default) like the bridge does. The figure counts each detail once, when it was polled and then
acknowledged; poll and acknowledge latencies are reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from pathlib import Path

import httpx
from pydantic import SecretStr

from bridge.signing import Credentials, SignatureV1Auth, SignatureV3Auth

_SERVER = """
import asyncio, sys
from bridge.simulator import Simulator
from bridge.simulator.server import serve
asyncio.run(serve(Simulator(tasks=int(sys.argv[1]), seed=int(sys.argv[2])), "127.0.0.1", 0))
"""
VERSION = "2017-12-18"
ROOT = Path(__file__).resolve().parent.parent


async def _start_server(details: int, seed: int) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SERVER, str(details), str(seed), stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
    match = re.fullmatch(r"simulator listening on (http://\S+)\n", line)
    if match is None:
        process.kill()
        raise SystemExit(f"the simulator did not start: {line!r}")
    return process, match[1]


async def _drain(url: str, auth: httpx.Auth, page_size: int, ack_batch: int) -> tuple[int, list[float], list[float]]:
    polls: list[float] = []
    acks: list[float] = []
    served = 0
    async with httpx.AsyncClient(base_url=url, auth=auth, timeout=60) as client:
        while True:
            started = time.perf_counter()
            response = await client.post(
                "/", params={"Action": "PollTaskResult", "Version": VERSION, "PageNum": 1, "PageSize": page_size}
            )
            polls.append(time.perf_counter() - started)
            response.raise_for_status()
            ids = [d["TaskDetailNo"] for d in response.json()["Data"]["TaskDetail"]]
            if not ids:
                return served, polls, acks
            for start in range(0, len(ids), ack_batch):
                batch = ids[start : start + ack_batch]
                numbered = {f"TaskDetailNo.{i}": detail_no for i, detail_no in enumerate(batch, start=1)}
                started = time.perf_counter()
                answer = await client.post(
                    "/", params={"Action": "AcknowledgeTaskResult", "Version": VERSION, **numbered}
                )
                acks.append(time.perf_counter() - started)
                answer.raise_for_status()
                if answer.json()["Result"] != len(batch):
                    raise SystemExit(f"acknowledged {answer.json()['Result']} of {len(batch)}")
            served += len(ids)


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"median {statistics.median(ordered) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms ({len(ordered)} calls)"


async def main(args: argparse.Namespace) -> int:
    process, url = await _start_server(args.details, args.seed)
    try:
        auth_class = SignatureV3Auth if args.signature == "v3" else SignatureV1Auth
        auth = auth_class(Credentials("sim-access-key-id", SecretStr("sim-access-key-secret")))
        started = time.perf_counter()
        served, polls, acks = await _drain(url, auth, args.page_size, args.ack_batch)
        elapsed = time.perf_counter() - started
    finally:
        process.terminate()
        await process.wait()
    if served != args.details:
        print(f"served {served} of {args.details} details", file=sys.stderr)
        return 1
    print(f"{served} details polled and acknowledged in {elapsed:.2f} s: {served / elapsed:,.0f} details/s")
    print(f"  poll (PageSize {args.page_size}): {_ms(polls)}")
    print(f"  acknowledge ({args.ack_batch} ids): {_ms(acks)}")
    print(f"  signing {args.signature}, simulator exit code {process.returncode}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--details", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--ack-batch", type=int, default=1000)
    parser.add_argument("--signature", choices=("v3", "v1"), default="v3")
    return parser


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(_parser().parse_args())))

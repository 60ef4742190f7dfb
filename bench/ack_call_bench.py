"""CPU per AcknowledgeTaskResult call on the client side: building, signing and sending one request of N ids.

    python bench/ack_call_bench.py [--ids 100] [--calls 300] [--repeat 5] [--signature v3,v1] [--sts]

Calls ``UpstreamClient.acknowledge`` with ``--ids`` ids of the simulator's 32-character shape, over an
``httpx.MockTransport`` that answers every call at once with a fixed JSON body: what is timed is the bridge's
own work per call (the request, its signature, httpx's client machinery, reading the answer), none of the
network. It prints the best of ``--repeat`` runs of ``--calls`` calls, in microseconds of process CPU per call
and per id (the best run is the one least disturbed by other processes on the machine). ``--profile`` runs one
round under cProfile and prints the top functions by own time.

Run it against another checkout with ``PYTHONPATH=/that/checkout python bench/ack_call_bench.py`` to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import time

import httpx
from pydantic import SecretStr

from bridge.settings import Settings, load_settings
from bridge.upstream import UpstreamClient

__all__ = ["main"]

_ANSWER = b'{"RequestId":"bench-request","Result":100}'


def _answer(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=_ANSWER, headers={"content-type": "application/json"})


async def _best_us_per_call(client: UpstreamClient, ids: list[list[str]], repeat: int) -> float:
    best_s = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for batch in ids:
            await client.acknowledge(batch)
        best_s = min(best_s, time.process_time() - started)
    return best_s / len(ids) * 1e6


def _settings(signature: str, sts: bool) -> Settings:
    return load_settings(
        access_key_id=SecretStr("bench-access-key-id"),
        access_key_secret=SecretStr("bench-access-key-secret"),
        security_token=SecretStr("STS." + "t" * 1296) if sts else None,
        upstream_endpoint="http://upstream.invalid",
        signature_version=signature,
    )


async def _run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    batches = [[f"{rng.getrandbits(128):032x}" for _ in range(args.ids)] for _ in range(args.calls)]
    async with httpx.AsyncClient(transport=httpx.MockTransport(_answer)) as http:
        for signature in args.signature.split(","):
            settings = _settings(signature, args.sts)
            client = UpstreamClient(http, settings.upstream, settings.account)
            await client.acknowledge(batches[0])  # warm up: imports, caches
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                for batch in batches:
                    await client.acknowledge(batch)
                profiler.disable()
                print(f"--- {signature} ---")
                pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
                continue
            us = await _best_us_per_call(client, batches, args.repeat)
            token = " with an STS token" if args.sts else ""
            print(f"{signature}{token}: {us:,.0f} µs per call of {args.ids} ids = {us / args.ids:.1f} µs per id")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ack_call_bench", description=__doc__)
    parser.add_argument("--ids", type=int, default=100)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signature", default="v3,v1", help="comma-separated: v3, v1")
    parser.add_argument("--sts", action="store_true", help="sign with an STS token of 1,300 characters")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``task-bridge simulate`` subcommand: serve a simulator from the command line."""

from __future__ import annotations

import argparse
import asyncio

from bridge import argtypes

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``simulate`` on the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "simulate",
        help="serve a simulated Domain API (PollTaskResult/AcknowledgeTaskResult) for tests and demos",
        description="Serve a simulated Alibaba Cloud Domain API gateway with a seeded backlog of task details. "
        "GET /_state shows the backlog; POST /_control changes faults or adds details.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tasks", type=int, default=1000, help="details pending at start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=argtypes.non_negative, default=0.0, help="new details per second")
    parser.add_argument("--access-key-id", default="sim-access-key-id")
    parser.add_argument("--access-key-secret", default="sim-access-key-secret")
    parser.add_argument("--security-token", default=None, help="when set, requests must carry this STS token")
    parser.add_argument("--latency-ms", type=argtypes.non_negative, default=0.0, help="added to every API request")
    parser.add_argument("--unavailable-ratio", type=argtypes.ratio, default=0.0, help="share answered 503")
    parser.add_argument("--throttling-ratio", type=argtypes.ratio, default=0.0, help="share answered 400 Throttling")
    parser.add_argument("--internal-error-ratio", type=argtypes.ratio, default=0.0, help="share answered 500")
    parser.add_argument("--hang-ratio", type=argtypes.ratio, default=0.0, help="share that hangs --hang-seconds")
    parser.add_argument("--hang-seconds", type=argtypes.non_negative, default=30.0)
    parser.add_argument("--malformed-ratio", type=argtypes.ratio, default=0.0, help="share of details malformed")
    parser.add_argument(
        "--unordered-ratio", type=argtypes.ratio, default=0.0, help="share of polls answered in a random order"
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit code (0)."""
    # Imported here: every command builds the parser (add_parser), only this one needs the simulator itself.
    from bridge.simulator.app import Simulator
    from bridge.simulator.faults import Faults
    from bridge.simulator.server import serve

    faults = Faults(
        latency_s=args.latency_ms / 1000,
        unavailable_ratio=args.unavailable_ratio,
        throttling_ratio=args.throttling_ratio,
        internal_error_ratio=args.internal_error_ratio,
        hang_ratio=args.hang_ratio,
        hang_s=args.hang_seconds,
        malformed_ratio=args.malformed_ratio,
        unordered_ratio=args.unordered_ratio,
    )
    sim = Simulator(
        access_key_id=args.access_key_id,
        access_key_secret=args.access_key_secret,
        security_token=args.security_token,
        tasks=args.tasks,
        seed=args.seed,
        rate=args.rate,
        faults=faults,
    )
    asyncio.run(serve(sim, args.host, args.port))
    return 0

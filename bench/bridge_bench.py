"""How fast task-bridge moves details, against plain aio-pika publishing to the same broker.

    python bench/bridge_bench.py [--details 50000] [--quick] [--phases raw,drain,latency,rss,steady]

Each phase runs in child processes, so its CPU seconds and peak RSS are the kernel's figures for exactly
that process (``os.wait4``):

1. raw: aio-pika confirmed publishing of the bridge's own events (built with ``bridge.events.convert`` from
   the simulator's details), persistent, ``--window`` in flight, to a topic exchange with one durable queue
   bound ``#``. Only the publishing is timed. It runs again after the drains (the ceiling is the mean of both),
   and once more with ``--tuned``: the bridge's process tuning (``bridge.runtime``), for information.
2. drain: ``task-bridge run --once`` drains a backlog of ``--details`` from ``task-bridge simulate``
   (``BRIDGE_PAGE_SIZE=1000``, other settings default), timed from the process's start to its exit, so its
   startup counts; an empty-backlog run measures that startup alone.
3. latency: the same drain with ``--latency-ms`` added to every upstream request, against the round-trip
   bound P / L (one poll of at most P new details per round trip), or the raw ceiling where that is lower.
4. rss: peak RSS of two drains, ``--rss-small`` and ``--rss-large`` details.
5. steady: ``task-bridge run`` with a 1 s poll interval while this process adds details at a steady rate and
   consumes the queue: the time from a detail appearing upstream to its event arriving.

A drain only counts when the simulator ends with nothing pending and the queue holds exactly one message per
detail. The markdown table goes to stdout, the full results to ``bench/results/bridge-<time>.json``. Every
exchange, queue and process the bench creates is removed at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiormq
import httpx
from _broker import BenchBroker, bench_broker
from _drain import Drain, drain, log_tail
from _procs import BRIDGE_COMMAND, Child, PhaseError
from _report import render
from _steady import steady

from bridge.settings import default_of

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PHASES = ("raw", "drain", "latency", "rss", "steady")
# What a phase may fail with and still let the others run; anything else (a bug, Ctrl-C) stops the bench.
_PHASE_ERRORS = (
    PhaseError,
    httpx.HTTPError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,  # a RuntimeError: the broker closed the channel (a restart)
    OSError,
    TimeoutError,
)


def _masked(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}" if at else url


def _drain_figures(result: Drain) -> dict[str, Any]:
    exit = result.exit
    return {
        "details": result.details,
        "latency_ms": result.latency_ms,
        "page_size": result.page_size,
        "wall_s": exit.wall_s,
        "cpu_s": exit.cpu_s,
        "user_s": exit.user_s,
        "system_s": exit.system_s,
        "max_rss_mib": exit.max_rss_mib,
        "returncode": exit.returncode,
        "rate_per_s": result.rate_per_s if result.details else None,
        "cpu_per_10k_s": result.cpu_per_10k_s() if result.details else None,
        "problems": result.problems,
    }


async def _raw(broker: BenchBroker, workdir: Path, args: argparse.Namespace, *, tuned: bool = False) -> dict[str, Any]:
    exchange = broker.name("raw")
    out_path, log_path = workdir / "raw.json", workdir / "raw.log"
    try:
        queue = await broker.plain_topic(exchange)
        argv = [sys.executable, str(HERE / "_raw.py"), "--exchange", exchange]
        argv += ["--count", str(args.details), "--seed", str(args.seed), "--window", str(args.window)]
        argv += ["--tuned"] if tuned else []
        with out_path.open("wb") as out, log_path.open("wb") as log:
            child = Child(argv, env={**os.environ, "BRIDGE_AMQP_URL": broker.url}, cwd=workdir, stdout=out, stderr=log)
        try:
            exit = await child.wait(timeout_s=120 + args.details / 200)
        finally:
            child.stop()
        depth = await broker.depth(queue)
    finally:
        await broker.cleanup()
    if exit.returncode != 0:
        raise PhaseError(f"the raw publisher exited {exit.returncode}: {log_tail(log_path, 2)}")
    figures: dict[str, Any] = json.loads(out_path.read_text())
    figures.update(
        details=args.details,
        window=args.window,
        rate_per_s=args.details / figures["wall_s"],
        cpu_per_10k_s=figures["cpu_s"] / args.details * 10_000,
        process_cpu_s=exit.cpu_s,
        process_max_rss_mib=exit.max_rss_mib,
        problems=[] if depth == args.details else [f"the queue holds {depth} messages, expected {args.details}"],
    )
    return figures


def _mean_raw(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One raw ceiling from the runs before and after the drains (their mean), keeping both; a failed run
    leaves the other one alone."""
    runs = [run for run in (before, after) if "error" not in run and not run.get("problems")]
    if len(runs) < 2:
        return runs[0] if runs else before
    mean = dict(before)
    for key in ("wall_s", "cpu_s", "rate_per_s", "cpu_per_10k_s"):
        mean[key] = (before[key] + after[key]) / 2
    mean["runs"] = [before, after]
    return mean


async def _steady(broker: BenchBroker, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    result = await steady(
        broker,
        workdir,
        rate_per_s=args.steady_rate,
        duration_s=args.steady_seconds,
        warmup_s=args.steady_warmup,
        poll_interval_s=1.0,
        seed=args.seed,
        bridge=args.bridge,
    )
    return {
        "rate_per_s": result.rate_per_s,
        "poll_interval_s": result.poll_interval_s,
        "duration_s": result.duration_s,
        "warmup_s": args.steady_warmup,
        **result.summary(),
        "wall_s": result.exit.wall_s,
        "cpu_s": result.exit.cpu_s,
        "max_rss_mib": result.exit.max_rss_mib,
        "returncode": result.exit.returncode,
        "problems": result.problems,
    }


async def _phase(name: str, results: dict[str, Any], run: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    print(f"[bench] {name} …", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        results[name] = await run()
    except _PHASE_ERRORS as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    took = time.perf_counter() - started
    state = results[name].get("error") or "; ".join(results[name].get("problems", [])) or "ok"
    print(f"[bench] {name}: {state} ({took:.1f} s)", file=sys.stderr, flush=True)


async def _phases(broker: BenchBroker, workdir: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Run the chosen phases in order, each into ``results[phase]`` (an ``error`` entry when it failed)."""

    async def drained(phase: str, details: int, latency_ms: float = 0.0, page_size: int = 1000) -> dict[str, Any]:
        result = await drain(
            broker,
            workdir,
            phase=phase,
            details=details,
            seed=args.seed,
            latency_ms=latency_ms,
            page_size=page_size,
            bridge=args.bridge,
        )
        return _drain_figures(result)

    async def latency() -> dict[str, Any]:
        figures = await drained("latency", args.latency_details, args.latency_ms, args.latency_page_size)
        latency_s = args.latency_ms / 1000
        # The bridge reads ahead (its default): one poll at a time, each bringing at most a page of new details,
        # so at most one page per round trip. (Page 1 alone would need an acknowledgement round trip as well
        # before newer details show: P / 2L.)
        figures["bound_per_s"] = figures["page_size"] / latency_s
        # The bridge's defaults (the latency run sets neither): each acknowledgement call also waits L.
        concurrency, batch = (default_of(f) for f in ("ack_concurrency", "ack_batch_size"))
        figures.update(
            ack_concurrency=concurrency, ack_batch_size=batch, ack_bound_per_s=concurrency * batch / latency_s
        )
        return figures

    async def rss() -> dict[str, Any]:
        small = await drained("rss-small", args.rss_small)
        large = await drained("rss-large", args.rss_large)
        return {"small": small, "large": large, "reduced": args.rss_large < 100_000}

    phases = args.phases
    if "raw" in phases:
        await _phase("raw", results, lambda: _raw(broker, workdir, args))
    if "drain" in phases:
        await _phase("startup", results, lambda: drained("startup", 0))
        await _phase("drain", results, lambda: drained("drain", args.details))
    if "latency" in phases:
        await _phase("latency", results, latency)
    if "raw" in phases and {"drain", "latency"} & set(phases):
        # The machine's speed drifts between phases: the ceiling is the mean of a run before the drains and one
        # after them, so a slow or fast spell during one raw run does not skew every ratio.
        await _phase("raw-after", results, lambda: _raw(broker, workdir, args))
        results["raw"] = _mean_raw(results["raw"], results.pop("raw-after"))
        # For information: the same publisher given the bridge's process tuning (GC thresholds, malloc), which
        # would speed it up as well. The targets stay against plain aio-pika, as the issue defines the ceiling.
        await _phase("raw-tuned", results, lambda: _raw(broker, workdir, args, tuned=True))
    if "rss" in phases:
        await _phase("rss", results, rss)
    if "steady" in phases:
        await _phase("steady", results, lambda: _steady(broker, workdir, args))


async def _run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    # SIGTERM stops the bench like Ctrl-C does: the finally blocks stop the children and delete the objects.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    url = os.environ.get("BRIDGE_AMQP_URL") or DEFAULT_AMQP_URL
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "broker": _masked(url),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cores": os.cpu_count(),
            "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(),
            "platform": platform.platform(),
            # Variables that change how the children run (allocator, interpreter): a result names them.
            "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "PYTHONMALLOC"},
        },
    }
    try:
        async with bench_broker(url) as broker:
            await _phases(broker, workdir, args, results)
    except PhaseError as exc:  # the final cleanup failed: the figures are still worth printing
        results["cleanup"] = {"error": str(exc)}
    results["machine"]["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridge_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--details", type=int, default=None, help="backlog of the raw and drain phases (50,000)")
    parser.add_argument("--quick", action="store_true", help="smaller runs: 10,000 details, 30,000 large RSS, 15 s")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--window", type=int, default=512, help="raw publishes in flight (the bridge's default)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--latency-page-size", type=int, default=1000, help="BRIDGE_PAGE_SIZE of the latency run")
    parser.add_argument("--latency-details", type=int, default=None, help="backlog of the latency run (--details)")
    parser.add_argument("--rss-small", type=int, default=10_000)
    parser.add_argument("--rss-large", type=int, default=None, help="100,000 (30,000 with --quick)")
    parser.add_argument("--steady-rate", type=float, default=20.0, help="details added per second")
    parser.add_argument("--steady-seconds", type=float, default=None, help="measured time (45 s; 15 with --quick)")
    parser.add_argument("--steady-warmup", type=float, default=None, help="left out at the start (5 s; 3 s quick)")
    parser.add_argument(
        "--bridge-command",
        default=None,
        help="command that starts task-bridge, to compare another build (default: this Python -m bridge)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    return parser


def _complete(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    args.details = args.details or (10_000 if quick else 50_000)
    args.latency_details = args.latency_details or args.details
    args.rss_large = args.rss_large or (30_000 if quick else 100_000)
    args.steady_seconds = args.steady_seconds or (15.0 if quick else 45.0)
    args.steady_warmup = args.steady_warmup if args.steady_warmup is not None else (3.0 if quick else 5.0)
    args.bridge = shlex.split(args.bridge_command) if args.bridge_command else BRIDGE_COMMAND
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"bridge_bench: unknown phases: {', '.join(unknown)} (known: {', '.join(PHASES)})")
    args.phases = phases
    for name in ("details", "latency_details", "latency_page_size", "rss_small", "rss_large", "window"):
        if getattr(args, name) < 1:
            raise SystemExit(f"bridge_bench: --{name.replace('_', '-')} must be at least 1")
    if args.latency_ms <= 0 or args.steady_rate <= 0 or args.steady_seconds <= 0:
        raise SystemExit("bridge_bench: --latency-ms, --steady-rate and --steady-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the bench; exit 0 when every phase produced a valid figure (targets missed do not fail it)."""
    args = _complete(_parser().parse_args(argv))
    workdir = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
    ok = False
    try:
        results = asyncio.run(_run(args, workdir))
        table = render(results)
        print(table)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = args.results_dir / f"bridge-{stamp}.json"
        path.write_text(json.dumps({**results, "table": table}, indent=2, default=str) + "\n")
        print(f"\nresults: {path}", file=sys.stderr)
        failed = [name for name, value in results.items() if isinstance(value, dict) and _failed(value)]
        ok = not failed
        if failed:
            print(f"phases without a valid figure: {', '.join(failed)}; logs in {workdir}", file=sys.stderr)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"interrupted; logs in {workdir}", file=sys.stderr)
        return 130
    finally:
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def _failed(phase: dict[str, Any]) -> bool:
    if "error" in phase or phase.get("problems"):
        return True
    return any(isinstance(v, dict) and _failed(v) for v in phase.values())


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

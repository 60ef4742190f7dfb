"""The command line: ``task-bridge run [--once]``, ``check``, ``tail``, ``demo`` and ``simulate``.

Exit codes: 0 done, 1 failed at run time (the last line says why), 2 invalid settings or usage,
130 stopped at once by a second signal.

The subcommands' work lives in modules of their own (:mod:`bridge.check`, :mod:`bridge.tail`,
:mod:`bridge.demo`, :mod:`bridge.progress`, :mod:`bridge.simulator.cli`); this module parses arguments, loads
settings, installs the signal handlers and turns outcomes into exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bridge import __version__, argtypes
from bridge.app import App
from bridge.errors import BridgeError, SettingsError
from bridge.logs import configure_logging
from bridge.runtime import tune_for_service
from bridge.settings import Settings, load_settings
from bridge.simulator.cli import add_parser as add_simulate
from bridge.simulator.cli import run as run_simulate

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("bridge")


def _settings_or_exit(*, credentials: bool = True, overrides: dict[str, Any] | None = None) -> Settings | int:
    """The settings, or EXIT_USAGE after one line per problem on stderr."""
    try:
        settings = load_settings(**(overrides or {}))
        if credentials:
            settings.require_credentials()
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"task-bridge: invalid setting: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return settings


def install_stop_handlers(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: graceful stop. A second one: exit at once."""
    loop = asyncio.get_running_loop()

    def _on_signal(signum: int) -> None:
        if stop.is_set():
            log.error("second signal: exiting at once", extra={"signal": signal.Signals(signum).name})
            logging.shutdown()
            os._exit(EXIT_INTERRUPTED)
        log.info(
            "stopping: finishing publishes and acknowledgements in flight",
            extra={"signal": signal.Signals(signum).name},
        )
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum)


# --- run ---
async def _run(settings: Settings, once: bool, progress_interval_s: float | None) -> int:
    from bridge.progress import ProgressReporter

    stop = asyncio.Event()
    install_stop_handlers(stop)
    app = App(settings)
    complete = False
    failure: BridgeError | None = None
    reporter = ProgressReporter(
        lambda: app.loop.progress if app.loop is not None else None, sys.stderr, interval_s=progress_interval_s
    )
    try:
        if once:
            async with reporter:
                complete = await app.run(stop, once=True)
        else:
            complete = await app.run(stop)
    except BridgeError as exc:
        failure = exc
    if once:
        reporter.finish(complete)
    if failure is not None:
        # The last line of the log says why the process stopped.
        log.error(f"task-bridge stopped: {failure}", extra={"error_type": type(failure).__name__})
        return EXIT_FAILURE
    return EXIT_OK if complete else EXIT_FAILURE


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    if isinstance(settings, int):
        return settings
    configure_logging(settings.log_level)
    tune_for_service()
    return asyncio.run(_run(settings, args.once, args.progress_interval))


# --- check ---
async def _check(settings: Settings) -> int:
    from bridge.app import upstream_http_client
    from bridge.check import format_report, run_checks

    async with upstream_http_client(settings) as http:
        results = await run_checks(settings, http)
    sys.stdout.write(format_report(results))
    return EXIT_FAILURE if any(r.failed for r in results) else EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
        settings.require_credentials()
    except SettingsError as exc:
        # The report's format, on stdout like a full report; nothing else is checked without valid settings.
        sys.stdout.writelines(f"FAIL  settings  {problem}\n" for problem in exc.problems)
        sys.stdout.write("check failed: settings\n")
        return EXIT_USAGE
    # The report says what failed; library log lines (aio-pika's connection errors) would only repeat it.
    configure_logging("ERROR")
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return asyncio.run(_check(settings))


# --- tail ---
async def _tail(settings: Settings, args: argparse.Namespace) -> int:
    from bridge.tail import tail

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # One Ctrl-C ends a tail: there is nothing in flight to finish.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await tail(
            settings,
            stop,
            sys.stdout,
            pattern=args.pattern,
            as_json=args.json,
            invalid=args.invalid,
            count=args.count,
            on_ready=lambda text: print(text, file=sys.stderr, flush=True),
        )
    except BridgeError as exc:
        print(f"task-bridge tail: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_tail(args: argparse.Namespace) -> int:
    settings = _settings_or_exit(credentials=False)  # only the broker settings matter
    if isinstance(settings, int):
        return settings
    configure_logging("ERROR")
    try:
        return asyncio.run(_tail(settings, args))
    finally:
        # `tail | head`: stdout may be a closed pipe; do not let the interpreter's final flush complain.
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# --- demo ---
async def _demo(settings: Settings, options: Any) -> int:
    from bridge.demo import run_demo

    stop = asyncio.Event()
    install_stop_handlers(stop)
    try:
        complete = await run_demo(settings, options, stop, sys.stdout)
    except BridgeError as exc:
        print(f"task-bridge demo: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if complete else EXIT_FAILURE


def _cmd_demo(args: argparse.Namespace) -> int:
    from bridge.demo import DemoOptions, demo_overrides

    settings = _settings_or_exit(overrides=demo_overrides(args.poll_interval))
    if isinstance(settings, int):
        return settings
    # Warnings and errors of the bridge on stderr; the event lines on stdout stay readable.
    configure_logging("WARNING")
    options = DemoOptions(
        tasks=args.tasks,
        rate=args.rate,
        seed=args.seed,
        seconds=args.seconds,
        malformed_ratio=args.malformed_ratio,
        summary_interval_s=args.summary_interval,
    )
    return asyncio.run(_demo(settings, options))


# --- parser ---
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``task-bridge`` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="task-bridge",
        description="Alibaba Cloud Domain task results as RabbitMQ events (settings: environment).",
    )
    parser.add_argument("--version", action="version", version=f"task-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="poll, publish and acknowledge until SIGTERM/SIGINT")
    run.add_argument("--once", action="store_true", help="drain the backlog, then exit (non-zero when it cannot)")
    # How often --once reports progress without a terminal (default 5 s); hidden, tests shorten it.
    run.add_argument("--progress-interval", type=argtypes.positive, default=None, help=argparse.SUPPRESS)
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser(
        "check",
        help="check the settings, the upstream (one signed poll), the broker and the topology",
        description="One line per check (OK/FAIL/SKIP and why); exit 0 when all pass, 1 when one fails, "
        "2 when the settings are invalid. Changes nothing: no acknowledgement, no declaration.",
    )
    check.set_defaults(handler=_cmd_check)

    tail = commands.add_parser(
        "tail",
        help="print events as they reach the exchange (needs only the broker settings)",
        description="Bind a temporary queue (exclusive, auto-delete) to the events exchange and print each "
        "event: time, routing key, domain, status, id. Ctrl-C stops it.",
    )
    tail.add_argument("pattern", nargs="?", default="#", help="routing pattern, e.g. 'chg_dns.*' (default '#')")
    tail.add_argument("--json", action="store_true", help="one JSON line per event (the CloudEvent body)")
    tail.add_argument("--invalid", action="store_true", help="tail the invalid route instead (ignores PATTERN)")
    tail.add_argument("--count", type=argtypes.positive_int, default=None, metavar="N", help="exit after N messages")
    tail.set_defaults(handler=_cmd_tail)

    demo = commands.add_parser(
        "demo",
        help="simulator + bridge + a live view of the events, against the local broker; no setup needed",
        description="Run the simulator in-process with a seeded backlog, the bridge against it and the broker "
        "of BRIDGE_AMQP_URL (default: local guest), and print every event and a summary every few seconds.",
    )
    demo.add_argument("--tasks", type=argtypes.count, default=200, help="details pending at start (default 200)")
    demo.add_argument("--rate", type=argtypes.non_negative, default=5.0, help="new details per second (default 5)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the simulated details")
    demo.add_argument("--seconds", type=argtypes.positive, default=None, help="stop by itself after this many seconds")
    demo.add_argument("--malformed-ratio", type=argtypes.ratio, default=0.0, help="share of details that are malformed")
    demo.add_argument("--poll-interval", type=argtypes.positive, default=1.0, help="seconds between idle polls (1)")
    demo.add_argument("--summary-interval", type=argtypes.positive, default=3.0, help="seconds between summaries (3)")
    demo.set_defaults(handler=_cmd_demo)

    add_simulate(commands)
    commands.choices["simulate"].set_defaults(handler=run_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the subcommand, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return handler(args)

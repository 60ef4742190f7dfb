"""The command line: ``task-bridge run [--once]``, ``check``, ``peek``, ``config``, ``tail``, ``demo``, ``simulate``.

Exit codes: 0 done, 1 failed at run time (the last line says why), 2 invalid settings or usage,
130 stopped at once by a second signal. Every refusal a person can meet (invalid settings, a busy port, a broker
that refuses the login, the virtual host, a permission, a missing exchange, an upstream that refuses the
credentials) is one line on stderr, never a traceback.

``run`` logs a start line (version, host, pid, every setting with secrets masked) and a last line saying why the
process exits (``drained``, ``stopped by SIGTERM``, ``failed: <reason>``) with its exit code.

The subcommands' work lives in modules of their own (:mod:`bridge.check`, :mod:`bridge.peek`,
:mod:`bridge.configview`, :mod:`bridge.tail`, :mod:`bridge.demo`, :mod:`bridge.progress`,
:mod:`bridge.simulator.cli`); this module parses arguments, loads settings, installs the signal handlers and
turns outcomes into exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from bridge import __version__, argtypes
from bridge.app import App
from bridge.errors import BridgeError, SettingsError
from bridge.logs import configure_logging
from bridge.peek import DEFAULT_COUNT
from bridge.refusals import CONNECT_ERRORS
from bridge.runtime import tune_for_service
from bridge.settings import CONFIG_FILE_VARIABLE, Settings, load_settings, origins
from bridge.simulator.cli import add_parser as add_simulate
from bridge.simulator.cli import run as run_simulate

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("bridge")


def _settings_or_exit(
    args: argparse.Namespace, *, credentials: bool = True, overrides: dict[str, Any] | None = None
) -> Settings | int:
    """The settings (``--config`` names the TOML file), or EXIT_USAGE after one line per problem on stderr."""
    try:
        settings = load_settings(getattr(args, "config", None), credentials=credentials, **(overrides or {}))
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"task-bridge: invalid setting: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return settings


class StopSignal:
    """Which signal asked the process to stop (``name``, e.g. ``SIGTERM``), once one did."""

    def __init__(self) -> None:
        self.name: str | None = None


def install_stop_handlers(stop: asyncio.Event) -> StopSignal:
    """First SIGTERM/SIGINT: graceful stop. A second one: exit at once. Returns what records the signal."""
    loop = asyncio.get_running_loop()
    received = StopSignal()

    def _on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.error(
                f"task-bridge exiting: second signal ({name}), at once",
                extra={"signal": name, "reason": "second signal", "exit_code": EXIT_INTERRUPTED},
            )
            logging.shutdown()
            os._exit(EXIT_INTERRUPTED)
        log.info("stopping: finishing publishes and acknowledgements in flight", extra={"signal": name})
        received.name = name
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum)
    return received


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _configure_logging(settings: Settings, level: str | None = None) -> None:
    configure_logging(level or settings.operator.log_level, settings.operator.log_format)


def _refused(command: str, settings: Settings, exc: BaseException) -> int:
    """One line on stderr for a failure of an operator command; EXIT_FAILURE."""
    print(f"task-bridge {command}: {_one_line(settings.scrub(str(exc)))}", file=sys.stderr)
    return EXIT_FAILURE


def _run_tool(command: str, settings: Settings, main: Coroutine[Any, Any, int]) -> int:
    """Run an operator command; a broker error it did not translate itself is still one line, not a traceback."""
    from bridge.refusals import explain

    try:
        return asyncio.run(main)
    except CONNECT_ERRORS as exc:
        return _refused(command, settings, explain(exc, settings.broker))


# --- run ---
def log_start(settings: Settings, command: str) -> None:
    """The first line of a run: version, host, pid and every setting (secrets masked)."""
    log.info(
        f"task-bridge {__version__} starting: {command}",
        extra={
            "version": __version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": command,
            "settings": settings.masked(),
        },
    )


def log_exit(code: int, reason: str) -> int:
    """The last line of a run: why the process exits and with which code; returns ``code``."""
    level = logging.INFO if code == EXIT_OK else logging.ERROR
    log.log(level, f"task-bridge exiting: {reason}", extra={"reason": reason, "exit_code": code})
    return code


async def _run(settings: Settings, once: bool, progress_interval_s: float | None) -> int:
    from bridge.progress import ProgressReporter

    stop = asyncio.Event()
    received = install_stop_handlers(stop)
    app = App(settings)
    complete = False
    reporter = ProgressReporter(app.progress, sys.stderr, interval_s=progress_interval_s)
    try:
        if once:
            async with reporter:
                complete = await app.run(stop, once=True)
        else:
            complete = await app.run(stop)
    except (BridgeError, OSError) as exc:
        # An OSError here is the operating system refusing something at start (the operator port in use, say):
        # as much a refusal as a BridgeError, and as much worth one line instead of a traceback.
        if once:
            reporter.finish(False)
        text = str(exc) if isinstance(exc, BridgeError) else f"{type(exc).__name__}: {exc}"
        return log_exit(EXIT_FAILURE, f"failed: {_one_line(settings.scrub(text))}")
    if once:
        reporter.finish(complete)
    reason = f"stopped by {received.name}" if received.name else "drained" if once else "stopped"
    if not complete:
        return log_exit(EXIT_FAILURE, f"{reason}, with confirmed details not acknowledged upstream")
    return log_exit(EXIT_OK, reason)


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings_or_exit(args)
    if isinstance(settings, int):
        return settings
    _configure_logging(settings)
    log_start(settings, "run --once" if args.once else "run")
    tune_for_service()
    return asyncio.run(_run(settings, args.once, args.progress_interval))


# --- check ---
async def _check(settings: Settings) -> int:
    from bridge.app import upstream_http_client
    from bridge.check import format_report, run_checks

    async with upstream_http_client(settings.upstream, len(settings.accounts)) as http:
        results = await run_checks(settings, http)
    sys.stdout.write(format_report(results))
    return EXIT_FAILURE if any(r.failed for r in results) else EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, credentials=True)
    except SettingsError as exc:
        # The report's format, on stdout like a full report; nothing else is checked without valid settings.
        sys.stdout.writelines(f"FAIL  settings  {problem}\n" for problem in exc.problems)
        sys.stdout.write("check failed: settings\n")
        return EXIT_USAGE
    # The report says what failed; library log lines (aio-pika's connection errors) would only repeat it.
    _configure_logging(settings, "ERROR")
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return _run_tool("check", settings, _check(settings))


# --- peek ---
async def _peek(settings: Settings, args: argparse.Namespace) -> int:
    from bridge.app import upstream_http_client
    from bridge.peek import peek, render_json, render_text, summary

    accounts = {account.name: account for account in settings.accounts}
    if args.account is not None and args.account not in accounts:
        return _refused("peek", settings, SettingsError([f"--account: no account {args.account!r} in the settings"]))
    try:
        async with upstream_http_client(settings.upstream) as http:
            result = await peek(settings, http, args.count, accounts.get(args.account or settings.account.name))
    except BridgeError as exc:
        return _refused("peek", settings, exc)
    for number, preview in enumerate(result.previews, 1):
        sys.stdout.write(render_json(preview) + "\n" if args.json else render_text(preview, number))
    sys.stdout.flush()
    print(summary(result), file=sys.stderr)
    return EXIT_OK


def _cmd_peek(args: argparse.Namespace) -> int:
    settings = _settings_or_exit(args)
    if isinstance(settings, int):
        return settings
    _configure_logging(settings, "WARNING")
    return _run_tool("peek", settings, _peek(settings, args))


# --- config ---
def _cmd_config(args: argparse.Namespace) -> int:
    from bridge.configview import config_rows, format_json, format_table

    settings = _settings_or_exit(args, credentials=False)  # a missing key pair is shown as unset, not refused
    if isinstance(settings, int):
        return settings
    rows = config_rows(settings, origins(args.config))
    sys.stdout.write(format_json(rows) if args.json else format_table(rows))
    return EXIT_OK


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
            settings.broker,
            stop,
            sys.stdout,
            pattern=args.pattern,
            as_json=args.json,
            invalid=args.invalid,
            count=args.count,
            on_ready=lambda text: print(text, file=sys.stderr, flush=True),
        )
    except BridgeError as exc:
        return _refused("tail", settings, exc)
    return EXIT_OK


def _cmd_tail(args: argparse.Namespace) -> int:
    settings = _settings_or_exit(args, credentials=False)  # only the broker settings matter
    if isinstance(settings, int):
        return settings
    _configure_logging(settings, "ERROR")
    try:
        return _run_tool("tail", settings, _tail(settings, args))
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
        return _refused("demo", settings, exc)
    return EXIT_OK if complete else EXIT_FAILURE


def _cmd_demo(args: argparse.Namespace) -> int:
    from bridge.demo import DemoOptions, demo_overrides

    settings = _settings_or_exit(args, overrides=demo_overrides(args.poll_interval))
    if isinstance(settings, int):
        return settings
    # Warnings and errors of the bridge on stderr; the event lines on stdout stay readable.
    _configure_logging(settings, "WARNING")
    options = DemoOptions(
        tasks=args.tasks,
        rate=args.rate,
        seed=args.seed,
        seconds=args.seconds,
        malformed_ratio=args.malformed_ratio,
        summary_interval_s=args.summary_interval,
    )
    return _run_tool("demo", settings, _demo(settings, options))


# --- parser ---
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``task-bridge`` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="task-bridge",
        description="Alibaba Cloud Domain task results as RabbitMQ events (settings: environment).",
    )
    parser.add_argument("--version", action="version", version=f"task-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # --config FILE: the TOML file of settings and accounts (docs/operating.md, "Several accounts").
    configured = argparse.ArgumentParser(add_help=False)
    configured.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"TOML file of settings and [[accounts]] (default: ${CONFIG_FILE_VARIABLE}); the environment overrides it",
    )

    run = commands.add_parser("run", parents=[configured], help="poll, publish and acknowledge until SIGTERM/SIGINT")
    run.add_argument("--once", action="store_true", help="drain the backlog, then exit (non-zero when it cannot)")
    # How often --once reports progress without a terminal (default 5 s); hidden, tests shorten it.
    run.add_argument("--progress-interval", type=argtypes.positive, default=None, help=argparse.SUPPRESS)
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser(
        "check",
        parents=[configured],
        help="check the settings, the upstream (one signed poll), the broker and the topology",
        description="One line per check (OK/FAIL/SKIP and why); exit 0 when all pass, 1 when one fails, "
        "2 when the settings are invalid. Changes nothing: no acknowledgement, no declaration.",
    )
    check.set_defaults(handler=_cmd_check)

    peek = commands.add_parser(
        "peek",
        parents=[configured],
        help="dry run: poll once and print what would be published; publishes and acknowledges nothing",
        description="One PollTaskResult call (page 1, PageSize min(N, BRIDGE_PAGE_SIZE)); each detail converted "
        "as the bridge converts it: exchange, routing key, AMQP properties and body of each event and invalid "
        "record, and the records the bridge would leave upstream. Needs no broker; changes nothing upstream.",
    )
    peek.add_argument(
        "--count", type=argtypes.positive_int, default=DEFAULT_COUNT, metavar="N", help="details to show (default 10)"
    )
    peek.add_argument("--json", action="store_true", help="one JSON object per record")
    peek.add_argument("--account", default=None, metavar="NAME", help="the account to poll (default: the first)")
    peek.set_defaults(handler=_cmd_peek)

    config = commands.add_parser(
        "config",
        parents=[configured],
        help="print the effective settings and where each came from, secrets masked",
        description="One row per setting: variable, value, origin (environment, a *_FILE secret file, .env "
        "file, config file, default); with several accounts, one row per account key too. Exit 2 with one line "
        "per problem when the settings are invalid.",
    )
    config.add_argument("--json", action="store_true", help="one JSON object per setting")
    config.set_defaults(handler=_cmd_config)

    tail = commands.add_parser(
        "tail",
        parents=[configured],
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

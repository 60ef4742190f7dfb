"""The command line: ``task-bridge run [--once]``, ``simulate``, and the operator's tools.

Exit codes: 0 done, 1 failed at run time (the last log line says why), 2 invalid settings or usage,
130 stopped at once by a second signal.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from bridge import __version__
from bridge.app import App
from bridge.errors import BridgeError, SettingsError
from bridge.logs import configure_logging
from bridge.settings import Settings, load_settings

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("bridge")


def _settings_or_exit() -> Settings | int:
    try:
        settings = load_settings()
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


async def _run(settings: Settings, once: bool) -> int:
    stop = asyncio.Event()
    install_stop_handlers(stop)
    try:
        complete = await App(settings).run(stop, once=once)
    except BridgeError as exc:
        log.error(f"task-bridge stopped: {exc}", extra={"error_type": type(exc).__name__})
        return EXIT_FAILURE
    return EXIT_OK if complete else EXIT_FAILURE


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    if isinstance(settings, int):
        return settings
    configure_logging(settings.log_level)
    return asyncio.run(_run(settings, args.once))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="task-bridge",
        description="Alibaba Cloud Domain task results as RabbitMQ events (settings: environment).",
    )
    parser.add_argument("--version", action="version", version=f"task-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="poll, publish and acknowledge until SIGTERM/SIGINT")
    run.add_argument(
        "--once", action="store_true", help="drain the backlog, then exit (non-zero when it cannot)"
    )
    run.set_defaults(handler=_cmd_run)
    _add_optional_commands(commands)
    return parser


def _add_optional_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from bridge.simulator.cli import add_parser as add_simulate

    add_simulate(commands)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return handler(args)

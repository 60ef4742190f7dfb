"""Serving the simulator over real HTTP with uvicorn, inside the caller's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator

from bridge.serving import serve_in_background
from bridge.simulator.app import Simulator

__all__ = ["running", "serve"]

# An acknowledgement of 1000 ids is a ~50 kB query string; h11's default limit is 16 kB.
_MAX_REQUEST_HEAD_BYTES = 1024 * 1024
_GRACEFUL_STOP_S = 1  # uvicorn takes whole seconds


@contextlib.asynccontextmanager
async def running(sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve sim with uvicorn as a task in the current event loop; yields the base URL (real port when 0)."""
    options = {
        "h11_max_incomplete_event_size": _MAX_REQUEST_HEAD_BYTES,
        # A hung request (the hang fault) must not hold the shutdown for its full hang time.
        "timeout_graceful_shutdown": _GRACEFUL_STOP_S,
    }
    async with serve_in_background(sim, host, port, **options) as (bound_host, bound_port):
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{url_host}:{bound_port}"


async def serve(sim: Simulator, host: str, port: int) -> None:
    """Run until cancelled, SIGINT or SIGTERM; prints ``simulator listening on URL`` once ready."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        async with running(sim, host, port) as url:
            print(f"simulator listening on {url}", flush=True)
            await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)

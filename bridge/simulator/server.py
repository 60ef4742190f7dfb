"""Serving the simulator over real HTTP with uvicorn, inside the caller's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import AsyncIterator, Generator

import uvicorn

from bridge.simulator.app import Simulator

__all__ = ["running", "serve"]

# An acknowledgement of 1000 ids is a ~50 kB query string; h11's default limit is 16 kB.
_MAX_REQUEST_HEAD_BYTES = 1024 * 1024
_STOP_POLL_S = 0.01
_GRACEFUL_STOP_S = 1  # uvicorn takes whole seconds


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its caller (uvicorn's re-raises the signal on exit)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    # Binding here makes "address in use" an OSError for the caller (uvicorn would call sys.exit in the loop).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then, and without it a small
    # answer written in two pieces waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def running(sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve sim with uvicorn as a task in the current event loop; yields the base URL (real port when 0)."""
    sock = _bind(host, port)
    config = uvicorn.Config(
        sim,
        lifespan="off",
        log_config=None,
        log_level=None,
        access_log=False,
        h11_max_incomplete_event_size=_MAX_REQUEST_HEAD_BYTES,
        # A hung request (the hang fault) must not hold the shutdown for its full hang time.
        timeout_graceful_shutdown=_GRACEFUL_STOP_S,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="simulator-server")
    try:
        while not server.started:
            if task.done():
                task.result()  # re-raises why it stopped
                raise RuntimeError("the simulator server stopped before it started")
            await asyncio.sleep(_STOP_POLL_S)
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{url_host}:{bound_port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


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

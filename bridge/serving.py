"""Serving an ASGI app with uvicorn inside the current event loop (operator port, simulator)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Generator
from typing import Any

import uvicorn

__all__ = ["serve_in_background"]


class _Server(uvicorn.Server):
    # The CLI owns signal handling; uvicorn must not replace our SIGTERM/SIGINT handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def serve_in_background(app: Any, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``app`` on ``host:port`` as a task of the current loop; yield the bound port (real when 0)."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises the startup error (e.g. port in use)
            raise OSError(f"could not serve on {host}:{port}")
        await asyncio.sleep(0.01)
    bound = port
    for listener in server.servers:
        for sock in listener.sockets:
            bound = sock.getsockname()[1]
            break
    try:
        yield bound
    finally:
        server.should_exit = True
        await task

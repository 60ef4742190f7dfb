"""Serving an ASGI app with uvicorn inside the current event loop (the operator port, the simulator)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

__all__ = ["bind", "serve_in_background"]

_START_POLL_S = 0.01


def _server(config: uvicorn.Config) -> uvicorn.Server:
    """A uvicorn server that leaves signal handling to its caller (uvicorn's would re-raise the signal on exit)."""
    import uvicorn  # here, not at the top: the bridge's own run needs only bind(), and uvicorn costs its start

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield

    return _Server(config)


def bind(host: str, port: int, *, backlog: int = 2048) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port``; raises ``OSError`` (address in use, ...).

    Binding before the server starts makes "address in use" an OSError for the caller (uvicorn would call
    ``sys.exit`` in the loop).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then, and without it a small
    # answer written in two pieces waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def serve_in_background(app: Any, host: str, port: int, **options: Any) -> AsyncIterator[tuple[str, int]]:
    """Serve ``app`` on ``host:port`` as a task of the current loop; yield the bound (host, port).

    ``options`` go to :class:`uvicorn.Config`. Port 0 picks a free port. uvicorn's logging configuration is
    left alone (``log_config=None``) so it does not replace the process's JSON logging.
    """
    import uvicorn

    sock = bind(host, port)
    config = uvicorn.Config(app, lifespan="off", log_config=None, log_level=None, access_log=False, **options)
    server = _server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http-{host}:{port}")
    try:
        while not server.started:
            if task.done():
                task.result()  # re-raises why it stopped
                raise RuntimeError(f"the HTTP server on {host}:{port} stopped before it started")
            await asyncio.sleep(_START_POLL_S)
        bound_host, bound_port = sock.getsockname()[:2]
        yield bound_host, bound_port
    finally:
        server.should_exit = True
        await task
        sock.close()

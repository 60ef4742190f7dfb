"""Child processes of the bench: the exact exit time and the kernel's resource usage of each one.

The bench reaps its children itself with ``os.wait4`` (woken by a pidfd, so no polling interval blurs the
wall time), which gives the CPU seconds and the peak RSS of exactly that process. asyncio's own subprocess
support is not used on purpose: its child watcher would reap the process first and the rusage would be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["BRIDGE_COMMAND", "Child", "Exit", "PhaseError", "Simulator", "bridge_env", "start_simulator"]

BRIDGE_COMMAND = [sys.executable, "-m", "bridge"]
SIM_KEY_ID = "sim-access-key-id"
SIM_KEY_SECRET = "sim-access-key-secret"  # the simulator's built-in demo pair, not a secret
_LISTENING = re.compile(r"simulator listening on (http://\S+)")
_STOP_GRACE_S = 10.0


class PhaseError(RuntimeError):
    """A phase could not produce a valid figure; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class Exit:
    """How a child ended: its exit code, the wall time from start to exit, CPU seconds and peak RSS."""

    returncode: int
    wall_s: float
    cpu_s: float
    user_s: float
    system_s: float
    max_rss_mib: float


class Child:
    """One child process, started now; :meth:`wait` reaps it and returns its :class:`Exit`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        name: str = "child",
    ) -> None:
        self.name = name
        self.started = time.perf_counter()
        self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr)
        self.exit: Exit | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self, timeout_s: float) -> Exit:
        """Wait for the exit (at most ``timeout_s``; then raise :class:`PhaseError`) and reap the child."""
        if self.exit is not None:
            return self.exit
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        fd = os.pidfd_open(self.pid)
        try:
            loop.add_reader(fd, exited.set)
            try:
                async with asyncio.timeout(timeout_s):
                    await exited.wait()
            except TimeoutError:
                raise PhaseError(f"{self.name} did not exit within {timeout_s:g} s") from None
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        ended = time.perf_counter()
        # The pidfd said it exited: WNOHANG finds the zombie at once, nothing blocks here.
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)  # noqa: ASYNC222
        if pid == 0:  # not expected after the pidfd fired; never lose the rusage over it
            pid, status, usage = os.wait4(self.pid, 0)  # noqa: ASYNC222
        code = os.waitstatus_to_exitcode(status)
        self.process.returncode = code  # reaped here: Popen must not wait for it again
        self.exit = Exit(
            returncode=code,
            wall_s=ended - self.started,
            cpu_s=usage.ru_utime + usage.ru_stime,
            user_s=usage.ru_utime,
            system_s=usage.ru_stime,
            max_rss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        )
        return self.exit

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; for cleanup (the rusage is not kept)."""
        if self.process.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Closed only once the child is gone: a reader thread may still hold the pipe until it sees EOF.
        if self.process.stdout is not None:
            self.process.stdout.close()


@dataclass
class Simulator:
    """A ``task-bridge simulate`` child and the base URL it listens on."""

    child: Child
    url: str


async def start_simulator(
    workdir: Path,
    *,
    tasks: int,
    seed: int,
    latency_ms: float = 0.0,
    log_name: str = "simulator",
    timeout_s: float = 180.0,
) -> Simulator:
    """Start the simulator on a free port with ``tasks`` pending details; return once it listens."""
    argv = [*BRIDGE_COMMAND, "simulate", "--port", "0", "--tasks", str(tasks), "--seed", str(seed)]
    if latency_ms:
        argv += ["--latency-ms", f"{latency_ms:g}"]
    log = (workdir / f"{log_name}.log").open("wb")
    try:
        child = Child(argv, cwd=workdir, stdout=subprocess.PIPE, stderr=log, name="the simulator")
    finally:
        log.close()  # the child holds its own descriptor
    assert child.process.stdout is not None
    try:
        async with asyncio.timeout(timeout_s):
            line = (await asyncio.to_thread(child.process.stdout.readline)).decode(errors="replace")
    except TimeoutError:
        child.stop()
        raise PhaseError(f"the simulator did not start within {timeout_s:g} s") from None
    match = _LISTENING.search(line)
    if match is None:
        child.stop()
        raise PhaseError(f"the simulator did not start: {line.strip()!r}; see {workdir / log_name}.log")
    return Simulator(child, match[1])


def bridge_env(*, endpoint: str, amqp_url: str, exchange: str, **settings: str) -> dict[str, str]:
    """The environment of a bridge child: this process's, minus any bridge settings, plus ``settings``.

    ``settings`` are ``BRIDGE_<NAME>`` values by lower-case name (``page_size="1000"``). The operator port is
    an ephemeral one on loopback, so bench runs never collide with each other or with a bridge on 9108.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "ALIBABA_CLOUD_"))}
    env.update(
        {
            "ALIBABA_CLOUD_ACCESS_KEY_ID": SIM_KEY_ID,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SIM_KEY_SECRET,
            "BRIDGE_UPSTREAM_ENDPOINT": endpoint,
            "BRIDGE_AMQP_URL": amqp_url,
            "BRIDGE_EXCHANGE": exchange,
            "BRIDGE_METRICS_HOST": "127.0.0.1",
            "BRIDGE_METRICS_PORT": "0",
        }
    )
    env.update({f"BRIDGE_{name.upper()}": value for name, value in settings.items()})
    return env

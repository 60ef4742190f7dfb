"""One ``task-bridge run --once`` drain: simulator child, bridge child, then the checks that make it valid.

A drain is valid when the bridge exited 0, the simulator's ``GET /_state`` shows nothing pending and exactly
the backlog acknowledged, and the queue bound ``#`` holds exactly one message per detail (nothing went to the
invalid or unrouted side queues). An invalid drain keeps its numbers but carries the reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _broker import BenchBroker
from _procs import BRIDGE_COMMAND, Child, Exit, bridge_env, start_simulator

__all__ = ["Drain", "drain", "log_tail"]

_STATE_TIMEOUT_S = 60.0


@dataclass
class Drain:
    """The outcome of one drain: the bridge child's :class:`Exit` and what the checks found wrong."""

    details: int
    latency_ms: float
    page_size: int
    exit: Exit
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def rate_per_s(self) -> float:
        """Details per second, from the start of the process to its exit."""
        return self.details / self.exit.wall_s

    def cpu_per_10k_s(self) -> float:
        return self.exit.cpu_s / self.details * 10_000 if self.details else float("nan")


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of a child's log, for error messages."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


async def drain(
    broker: BenchBroker,
    workdir: Path,
    *,
    phase: str,
    details: int,
    seed: int,
    latency_ms: float = 0.0,
    page_size: int = 1000,
    bridge: Sequence[str] = BRIDGE_COMMAND,
) -> Drain:
    """Drain a backlog of ``details`` with ``task-bridge run --once``; raise ``PhaseError`` if it cannot run.

    ``bridge`` is the command that starts task-bridge (another build can be compared with the same bench).
    """
    exchange = broker.name(phase)
    try:
        queue = await broker.bridge_topology(exchange)
        sim = await start_simulator(workdir, tasks=details, seed=seed, latency_ms=latency_ms, log_name=f"{phase}.sim")
        try:
            env = bridge_env(endpoint=sim.url, amqp_url=broker.url, exchange=exchange, page_size=str(page_size))
            log_path = workdir / f"{phase}.bridge.log"
            with log_path.open("wb") as log:
                child = Child([*bridge, "run", "--once"], env=env, cwd=workdir, stdout=log, stderr=log)
            try:
                # Generous: a healthy drain runs at thousands per second; a stuck one must not hang the bench.
                exit = await child.wait(timeout_s=120 + details / 200)
            finally:
                child.stop()
            async with httpx.AsyncClient(base_url=sim.url, timeout=_STATE_TIMEOUT_S) as http:
                response = await http.get("/_state")
                response.raise_for_status()
                state = response.json()
        finally:
            sim.child.stop()
        depths = {name: await broker.depth(name) for name in (queue, f"{exchange}.invalid", f"{exchange}.unrouted")}
    finally:
        await broker.cleanup()
    result = Drain(details=details, latency_ms=latency_ms, page_size=page_size, exit=exit)
    if exit.returncode != 0:
        result.problems.append(f"the bridge exited {exit.returncode}: {log_tail(log_path, 2)}")
    if state["pending"] != 0:
        result.problems.append(f"the simulator still holds {state['pending']} pending details")
    if state["acknowledged"] != details:
        result.problems.append(f"the simulator saw {state['acknowledged']} of {details} details acknowledged")
    if depths[queue] != details:
        result.problems.append(f"the queue holds {depths[queue]} messages, expected {details}")
    for side in (f"{exchange}.invalid", f"{exchange}.unrouted"):
        if depths[side]:
            result.problems.append(f"{depths[side]} messages went to {side}")
    return result

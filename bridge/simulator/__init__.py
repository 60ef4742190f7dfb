"""A simulated Alibaba Cloud Domain API gateway (PollTaskResult, AcknowledgeTaskResult) for tests and demos."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.simulator.app import Simulator
    from bridge.simulator.faults import Faults
    from bridge.simulator.server import running

__all__ = ["Faults", "Simulator", "running"]

# Loaded on first use: ``task-bridge`` builds its ``simulate`` parser from bridge.simulator.cli on every command,
# and the bridge's own run should not pay for importing the simulator.
_WHERE = {
    "Simulator": "bridge.simulator.app",
    "Faults": "bridge.simulator.faults",
    "running": "bridge.simulator.server",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)

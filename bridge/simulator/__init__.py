"""A simulated Alibaba Cloud Domain API gateway (PollTaskResult, AcknowledgeTaskResult) for tests and demos."""

from bridge.simulator.app import Simulator
from bridge.simulator.faults import Faults
from bridge.simulator.server import running

__all__ = ["Faults", "Simulator", "running"]

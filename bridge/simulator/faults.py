"""Fault injection: what can go wrong on a request, how often, and the seeded draw that decides it.

:class:`Faults` is plain mutable data (tests flip fields mid-run); :class:`FaultInjector` applies it to one
request: latency, then a possible hang, then a possible error answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.simulator.gateway_errors import internal_error, service_unavailable, throttling

__all__ = ["ACTIONS", "FaultInjector", "Faults"]

ACTIONS = frozenset({"PollTaskResult", "AcknowledgeTaskResult"})
_RATIOS = (
    "unavailable_ratio",
    "throttling_ratio",
    "internal_error_ratio",
    "hang_ratio",
    "malformed_ratio",
    "ack_failure_ratio",
    "unordered_ratio",
)


@dataclass
class Faults:
    """The faults to inject. Mutable at runtime: a change applies to the next request.

    The error ratios (``unavailable_ratio``, ``throttling_ratio``, ``internal_error_ratio``) are drawn together
    (their sum should stay <= 1); latency, hang and the error ratios only apply to ``actions``.
    ``malformed_ratio`` applies to details generated from now on; ``ack_failure_ratio`` answers that share of
    AcknowledgeTaskResult calls with 503 (nothing removed), whatever ``actions`` says. ``ack_max_ids`` (0: no
    limit) answers an AcknowledgeTaskResult call carrying more ids with 400 ``InvalidParameter``, as a gateway
    with a per-call limit would (the real limit is undocumented). ``unordered_ratio`` answers that share of
    PollTaskResult calls from the pending details in a random order instead of oldest first (the real order is
    undocumented; the bridge's read-ahead assumes oldest first, and must lose nothing when it is not).
    """

    latency_s: float = 0.0
    unavailable_ratio: float = 0.0
    throttling_ratio: float = 0.0
    internal_error_ratio: float = 0.0
    hang_ratio: float = 0.0
    hang_s: float = 30.0
    malformed_ratio: float = 0.0
    ack_failure_ratio: float = 0.0
    ack_max_ids: float = 0.0
    unordered_ratio: float = 0.0
    actions: frozenset[str] = ACTIONS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``actions`` as a sorted list)."""
        data = dataclasses.asdict(self)
        data["actions"] = sorted(self.actions)
        return data

    def update(self, changes: Mapping[str, Any]) -> None:
        """Set fields from JSON-like values; raises ``ValueError`` naming the first bad one (nothing changes)."""
        staged: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "actions":
                staged[name] = _actions(value)
            elif name in _FLOAT_FIELDS:
                staged[name] = _number(name, value)
            else:
                raise ValueError(f"{str(name)[:64]}: not a fault setting")
        for name, value in staged.items():
            setattr(self, name, value)


_FLOAT_FIELDS = frozenset(f.name for f in dataclasses.fields(Faults)) - {"actions"}
# Upper bounds of the fields that are not ratios: an hour of latency or hang, a million ids per call.
_MAXIMA = {"latency_s": 3600.0, "hang_s": 3600.0, "ack_max_ids": 1_000_000.0}


def _actions(value: Any) -> frozenset[str]:
    if not isinstance(value, list | tuple | set | frozenset) or not all(isinstance(a, str) for a in value):
        raise ValueError("actions: expected a list of action names")
    unknown = set(value) - ACTIONS
    if unknown:
        raise ValueError(
            f"actions: unknown {', '.join(sorted(a[:64] for a in unknown))}; known: {', '.join(sorted(ACTIONS))}"
        )
    return frozenset(value)


def _number(name: str, value: Any) -> float:
    # Compared, never converted: a JSON integer can be too large for a float, and NaN fails every comparison.
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        raise ValueError(f"{name}: expected a number >= 0")
    most = 1.0 if name in _RATIOS else _MAXIMA[name]
    if value > most:
        raise ValueError(f"{name}: at most {most:g}" + (" (a ratio)" if name in _RATIOS else ""))
    if name == "ack_max_ids" and value != int(value):
        raise ValueError(f"{name}: expected a whole number")
    return float(value)


class FaultInjector:
    """Draws, per request, which of ``faults`` strikes; seeded so a run can be replayed."""

    def __init__(self, faults: Faults, seed: int) -> None:
        self.faults = faults
        self._rng = random.Random(f"faults-{seed}")

    def _hit(self, ratio: float) -> bool:
        # Draw only when the fault is on, so a fault-free run consumes no randomness.
        return ratio > 0 and self._rng.random() < ratio

    def unordered(self) -> random.Random | None:
        """The generator to shuffle this poll's answer with, or ``None`` to answer oldest first."""
        return self._rng if self._hit(self.faults.unordered_ratio) else None

    async def apply(self, action: str) -> None:
        """Sleep for latency or a hang, or raise the ``ApiError`` of an injected failure."""
        faults = self.faults
        if action in faults.actions:
            if faults.latency_s > 0:
                await asyncio.sleep(faults.latency_s)
            if self._hit(faults.hang_ratio):
                # The client is expected to time out first; if it is still there, the request goes on.
                await asyncio.sleep(faults.hang_s)
            total = faults.unavailable_ratio + faults.throttling_ratio + faults.internal_error_ratio
            if total > 0:
                draw = self._rng.random()
                if draw < faults.unavailable_ratio:
                    raise service_unavailable()
                if draw < faults.unavailable_ratio + faults.throttling_ratio:
                    raise throttling()
                if draw < total:
                    raise internal_error()
        if action == "AcknowledgeTaskResult" and self._hit(faults.ack_failure_ratio):
            raise service_unavailable()

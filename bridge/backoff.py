"""Exponential backoff with full jitter, the one retry policy of the run loop and the acknowledger."""

from __future__ import annotations

import random

__all__ = ["Backoff", "jittered"]


def jittered(seconds: float, ratio: float = 0.1, rng: random.Random | None = None) -> float:
    """``seconds`` spread by ±``ratio`` so many bridges started together do not poll in lockstep."""
    r = rng or random
    return max(0.0, seconds * (1 + r.uniform(-ratio, ratio)))


class Backoff:
    """Delays of ``initial_s * 2**n`` capped at ``max_s``, each drawn uniformly from its upper half.

    A server's hint (``Retry-After`` on throttling) raises the delay to at least the hint.
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._rng = rng or random.Random()
        self.failures = 0

    def next_delay(self, hint_s: float | None = None) -> float:
        ceiling = min(self._max_s, self._initial_s * 2 ** min(self.failures, 32))
        self.failures += 1
        delay = self._rng.uniform(ceiling / 2, ceiling)
        if hint_s is not None:
            delay = max(delay, min(hint_s, self._max_s))
        return delay

    def reset(self) -> None:
        self.failures = 0

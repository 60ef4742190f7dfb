"""Argument types for the command line: numbers with a range, rejected by argparse with a clear message."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["count", "non_negative", "positive", "positive_int", "ratio"]


def _checked(convert: Callable[[str], float], ok: Callable[[float], bool], why: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} {why}")
        return value

    return parse


positive = _checked(float, lambda v: v > 0, "is not a positive number")
non_negative = _checked(float, lambda v: v >= 0, "is negative")
ratio = _checked(float, lambda v: 0.0 <= v <= 1.0, "is not a ratio between 0 and 1")


def count(text: str) -> int:
    """A whole number >= 0."""
    return int(_checked(int, lambda v: v >= 0, "is negative")(text))


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return int(_checked(int, lambda v: v >= 1, "is not a positive integer")(text))

"""CPU per detail of the event contract's hot path: ``convert`` and ``properties()`` on a page of details.

    python bench/convert_bench.py [--details 1000] [--repeat 20] [--seed 0] [--profile]

Builds one page of ``--details`` realistic details from the simulator's seeded generator, parsed from JSON as the
bridge receives them, then times, over the whole page, ``convert`` alone, ``properties()`` alone (on the
converted events) and both together, ``--repeat`` times. It prints the best run of each in microseconds per
detail (the best run is the one least disturbed by other processes on the machine). The process runs with the
bridge's own tuning (``bridge.runtime.tune_for_service``: the garbage collector's thresholds), as ``task-bridge run``
does. ``--profile`` runs the combined path under cProfile instead and prints the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from collections.abc import Callable

from bridge.events import Event, InvalidRecord, convert
from bridge.records import RawRecord
from bridge.runtime import tune_for_service
from bridge.settings import AccountSettings, BrokerSettings
from bridge.simulator.generator import DetailGenerator

__all__ = ["main"]

_SOURCE: str = BrokerSettings.model_fields["event_source"].default
_ACCOUNT: str = AccountSettings.model_fields["name"].default


def page_of(details: int, seed: int) -> list[RawRecord]:
    """``details`` records as the upstream client hands them over: parsed from one JSON page."""
    generator = DetailGenerator(seed)
    now_s = time.time()
    page = json.loads(json.dumps([generator.next(now_s) for _ in range(details)]))
    return [RawRecord(raw=detail, detail_no=detail["TaskDetailNo"]) for detail in page]


def _convert_all(records: list[RawRecord]) -> list[Event | InvalidRecord]:
    return [convert(record, source=_SOURCE, account=_ACCOUNT) for record in records]


def _best_us_per_detail(run: Callable[[], object], details: int, repeat: int) -> float:
    best_s = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        run()
        best_s = min(best_s, time.process_time() - started)
    return best_s / details * 1e6


def main(argv: list[str] | None = None) -> int:
    """Print the timings (or the profile) and return 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--details", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    records = page_of(args.details, args.seed)
    tune_for_service()
    items = _convert_all(records)
    invalid = sum(isinstance(item, InvalidRecord) for item in items)

    def properties() -> None:
        for item in items:
            item.properties()

    def both() -> None:
        for record in records:
            convert(record, source=_SOURCE, account=_ACCOUNT).properties()

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [both() for _ in range(args.repeat)])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return 0
    convert_us = _best_us_per_detail(lambda: _convert_all(records), args.details, args.repeat)
    properties_us = _best_us_per_detail(properties, args.details, args.repeat)
    both_us = _best_us_per_detail(both, args.details, args.repeat)
    print(
        json.dumps(
            {
                "details": args.details,
                "invalid": invalid,
                "convert_us": round(convert_us, 2),
                "properties_us": round(properties_us, 2),
                "convert_and_properties_us": round(both_us, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

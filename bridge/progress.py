"""Progress of ``task-bridge run --once``: done / total, rate and time left while a backlog drains.

On a terminal one status line is redrawn in place; without one (a pipe, a file, a container log) the same
numbers go out as a JSON log line every ``interval_s`` (default 5 s). Either way a summary closes the run.

*Done* is what was acknowledged upstream (the event is stored and the detail will not come back). *Total* is
done plus what the upstream still holds: ``TotalItemNum`` of the last poll counts every pending detail,
including the ones on their way, so it is added to what was acknowledged when that poll was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Protocol, TextIO

__all__ = ["ProgressCounters", "ProgressReporter", "ProgressTracker", "Snapshot", "format_duration"]

log = logging.getLogger(__name__)

_SAMPLE_S = 0.2  # how often the counters are read, whatever the display interval
_RATE_WINDOW_S = 10.0  # the rate is measured over this recent window, so it follows changes in pace
_MIN_RATE_SPAN_S = 0.5  # below this span a rate is noise
_CLEAR_LINE = "\r\x1b[K"


class ProgressCounters(Protocol):
    """What the reporter reads: :class:`bridge.loop.Progress` has these attributes."""

    polled: int
    published: int
    invalid: int
    unusable: int
    acknowledged: int
    backlog: int | None
    acknowledged_at_poll: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The numbers shown at one moment. ``total``, ``rate_per_s`` and ``eta_s`` are ``None`` while unknown."""

    elapsed_s: float
    done: int
    total: int | None
    rate_per_s: float | None
    eta_s: float | None
    polled: int
    published: int
    invalid: int
    unusable: int

    @property
    def percent(self) -> float | None:
        if self.total is None:
            return None
        return 100.0 if self.total == 0 else 100.0 * self.done / self.total

    def fields(self) -> dict[str, object]:
        """The snapshot as log fields, rounded for reading."""
        values = asdict(self)
        values["elapsed_s"] = round(self.elapsed_s, 1)
        values["rate_per_s"] = None if self.rate_per_s is None else round(self.rate_per_s, 1)
        values["eta_s"] = None if self.eta_s is None else round(self.eta_s)
        values["percent"] = None if self.percent is None else round(self.percent, 1)
        return values


class ProgressTracker:
    """Turns successive samples of the loop's counters into :class:`Snapshot` values."""

    def __init__(self, started: float) -> None:
        self._started = started
        self._rates: deque[tuple[float, int]] = deque([(started, 0)])

    def observe(self, counters: ProgressCounters, now: float) -> Snapshot:
        done = counters.acknowledged
        backlog = counters.backlog
        total = None if backlog is None else max(done, counters.acknowledged_at_poll + backlog)

        self._rates.append((now, done))
        while len(self._rates) > 2 and now - self._rates[1][0] >= _RATE_WINDOW_S:
            self._rates.popleft()
        first_t, first_done = self._rates[0]
        span = now - first_t
        rate = (done - first_done) / span if span >= _MIN_RATE_SPAN_S else None
        eta = None
        if total is not None and rate:
            eta = (total - done) / rate
        elif total is not None and total == done:
            eta = 0.0
        return Snapshot(
            elapsed_s=now - self._started,
            done=done,
            total=total,
            rate_per_s=rate,
            eta_s=eta,
            polled=counters.polled,
            published=counters.published,
            invalid=counters.invalid,
            unusable=counters.unusable,
        )


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a status line."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _status_line(snap: Snapshot) -> str:
    if snap.total is None and snap.polled == 0:
        return f"draining: waiting for the first poll ({format_duration(snap.elapsed_s)})"
    done = f"draining: {snap.done:,}"
    if snap.total is not None and snap.percent is not None:
        done += f" of {snap.total:,} done ({snap.percent:.1f}%)"
    else:
        done += " done"
    parts = [done, "-/s" if snap.rate_per_s is None else f"{snap.rate_per_s:,.0f}/s"]
    if snap.eta_s is not None:
        parts.append(f"{format_duration(snap.eta_s)} left")
    if snap.invalid:
        parts.append(f"{snap.invalid:,} invalid")
    if snap.unusable:
        parts.append(f"{snap.unusable:,} unusable")
    return " · ".join(parts)


def _summary_line(snap: Snapshot, complete: bool) -> str:
    rate = snap.done / snap.elapsed_s if snap.elapsed_s > 0 else 0.0
    head = "drained" if complete else "stopped before the backlog was drained:"
    text = (
        f"{head} {snap.done:,} task details acknowledged in {format_duration(snap.elapsed_s)} ({rate:,.0f}/s); "
        f"{snap.published:,} published, {snap.invalid:,} invalid, {snap.unusable:,} unusable"
    )
    if snap.total is not None and snap.total > snap.done:
        text += f"; {snap.total - snap.done:,} still pending upstream"
    return text


class _ClearLineFilter(logging.Filter):
    """Clears the status line before a log record is written to the same terminal; the next tick redraws it."""

    def __init__(self, reporter: ProgressReporter) -> None:
        super().__init__()
        self._reporter = reporter

    def filter(self, record: logging.LogRecord) -> bool:
        self._reporter.clear_line()
        return True


class ProgressReporter:
    """Shows the progress of a drain on ``stream`` while used as ``async with``; :meth:`finish` summarises.

    ``source`` returns the loop's counters, or ``None`` before the loop exists. When ``stream.isatty()`` the
    status line is redrawn every ``interval_s`` (default 0.2 s); otherwise a ``progress`` log line is written
    every ``interval_s`` (default 5 s).
    """

    def __init__(
        self,
        source: Callable[[], ProgressCounters | None],
        stream: TextIO,
        *,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._stream = stream
        self.interactive = stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (_SAMPLE_S if self.interactive else 5.0)
        self._clock = clock
        self._tracker = ProgressTracker(clock())
        self._last: Snapshot | None = None
        self._last_emit = clock()
        self._line_shown = False
        self._task: asyncio.Task[None] | None = None
        self._filter = _ClearLineFilter(self)
        self._filtered: list[logging.Handler] = []

    # --- sampling ---
    def sample(self) -> Snapshot | None:
        """Read the counters once; returns the new snapshot (``None`` before the loop exists)."""
        counters = self._source()
        if counters is not None:
            self._last = self._tracker.observe(counters, self._clock())
        return self._last

    def tick(self) -> None:
        """Sample, and show the numbers when the display interval has passed."""
        snap = self.sample()
        now = self._clock()
        if self.interactive:
            self._draw(snap)
        elif snap is not None and now - self._last_emit >= self.interval_s:
            self._last_emit = now
            log.info("progress", extra=snap.fields())

    def _draw(self, snap: Snapshot | None) -> None:
        line = "draining: starting" if snap is None else _status_line(snap)
        width = shutil.get_terminal_size().columns - 1
        if len(line) > width > 10:
            line = line[: width - 1] + "…"
        self._write(_CLEAR_LINE + line)
        self._line_shown = True

    def clear_line(self) -> None:
        """Remove the status line (before other output goes to the same terminal)."""
        if self._line_shown:
            self._line_shown = False
            self._write(_CLEAR_LINE)

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed terminal must not stop the bridge
            self._stream.write(text)
            self._stream.flush()

    # --- lifecycle ---
    async def _run(self) -> None:
        step = min(_SAMPLE_S, self.interval_s)
        while True:
            await asyncio.sleep(step)
            self.tick()

    async def __aenter__(self) -> ProgressReporter:
        if self.interactive:
            for handler in logging.getLogger().handlers:
                if getattr(handler, "stream", None) is self._stream:
                    handler.addFilter(self._filter)
                    self._filtered.append(handler)
        self._task = asyncio.create_task(self._run(), name="progress")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for handler in self._filtered:
            handler.removeFilter(self._filter)
        self._filtered.clear()
        self.clear_line()

    def finish(self, complete: bool) -> Snapshot | None:
        """Write the summary (a line on a terminal, a ``summary`` log line otherwise); returns its numbers.

        ``complete`` is what the run returned: True when nothing confirmed was left unacknowledged.
        """
        snap = self.sample()
        self.clear_line()
        if snap is None:
            return None
        if self.interactive:
            self._write(_summary_line(snap, complete) + "\n")
        else:
            average = round(snap.done / snap.elapsed_s, 1) if snap.elapsed_s > 0 else None
            log.info("summary", extra={"complete": complete, **snap.fields(), "average_rate_per_s": average})
        return snap

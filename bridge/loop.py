"""The run loop: poll → convert → publish → acknowledge what the broker confirmed → poll again.

Which page: acknowledged details vanish upstream, so page 1 always starts with the oldest details still pending,
and the details this bridge holds (publishing, or confirmed and not yet in an acknowledgement call) are the
first ones on it. Page 1 alone brings new details only past those, so a page-1 poller polls when at most half a
page is held and then waits a poll and an acknowledgement round trip per page. With read-ahead (the default,
:mod:`bridge.paging`) the next poll asks for a page that starts past what is held, and goes out as soon as at
most a whole page is held: the broker's confirms, not the round trips, set the pace. Read-ahead pauses while
acknowledgements fail or when it would put more than four pages on their way, and page 1 is polled at least once
per poll interval and before ``--once`` calls the backlog drained, so a detail a read-ahead page skipped (the
upstream ordered differently) is delayed, never left behind.

Every detail on a page is in one of four states, decided here in one place:

- *unknown*: convert it and publish it (an event, or an invalid record to the invalid route);
- *in flight*: its publish awaits the broker; skip it;
- *held by the acknowledger*: confirmed, not yet acknowledged (or acknowledged after this poll began);
  skip it, so a slow or failing acknowledgement never causes a second event;
- *no usable TaskDetailNo*: it can never be acknowledged; log and count it once, never republish it. It stays
  at the head of the upstream's list for good, so read-ahead pages start past those seen too, and a page 1 full
  of them does not hide the details behind it.

Retries live here: upstream errors back off exponentially with jitter (honouring throttling hints),
publish failures back off before the next poll, a lost broker connection is re-opened with backoff while
nothing new is published. Fatal upstream errors propagate and stop the process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from bridge import paging
from bridge.acknowledger import Acknowledger
from bridge.backoff import Backoff, jittered
from bridge.errors import (
    BridgeError,
    BrokerRefusedError,
    BrokerUnavailableError,
    RetryableUpstreamError,
    ThrottledError,
)
from bridge.events import Event, InvalidRecord, convert
from bridge.metrics import Metrics
from bridge.publisher import Publisher, PublishOutcome
from bridge.settings import Settings
from bridge.upstream import Page, RawRecord, UpstreamClient

__all__ = ["BridgeLoop", "DeadlineExceeded", "Progress"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Read ahead only while the new page keeps at most this many pages on their way (publishing, confirmed, or in an
# acknowledgement call): what a crash can cause to be published twice. With 50 ms round trips the pipeline
# needs about four pages to keep the broker busy (the benchmark's latency phase: 2 pages, 0.85 of the rate
# without latency; 3 pages, 0.92; 4 pages, 1.0).
_READ_AHEAD_PAGES = 4
_UNUSABLE_MEMORY = 10_000  # fingerprints of records without a usable TaskDetailNo, to count each only once


class DeadlineExceeded(BridgeError):
    """``run --once`` could not finish: the upstream or the broker stayed unavailable past the deadline."""


class Progress:
    """Counters of one run, for the progress display and the final summary."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.polled = 0
        self.published = 0
        self.invalid = 0
        self.unusable = 0
        self.acknowledged = 0
        self.backlog: int | None = None  # TotalItemNum of the last poll: every detail still upstream
        self.acknowledged_at_poll = 0  # acknowledged when that poll was answered


class BridgeLoop:
    """Moves task details from the upstream to the broker; see the module docstring for the rules."""

    def __init__(
        self,
        settings: Settings,
        upstream: UpstreamClient,
        publisher: Publisher,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._upstream = upstream
        self._publisher = publisher
        self._metrics = metrics
        self._progress_event = asyncio.Event()
        self._wake_when: Callable[[], bool] | None = None  # what the waiting poll loop waits for
        self.acknowledger = Acknowledger(
            upstream,
            settings,
            metrics,
            on_progress=self._settled,
            on_acknowledged=self._count_acknowledged,
            more_coming=lambda: bool(self._in_flight),
        )
        self.progress = Progress()
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unusable: OrderedDict[str, None] = OrderedDict()
        self._publish_failures = 0
        self._publish_acks = 0
        self._upstream_backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._broker_backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._upstream_down_since: float | None = None
        self._broker_down_since: float | None = None
        self._broker_ever_connected = False  # a refusal before the first connection is a configuration error
        self.last_poll_ok: float | None = None  # monotonic time of the last successful poll
        self._page_one_at = float("-inf")  # monotonic time of the last poll of page 1
        self._page_one_blocked = False  # the last page 1 was full of records without a usable TaskDetailNo

    # --- readiness ---
    def ready(self) -> bool:
        """Whether the bridge can deliver now (see :meth:`not_ready_reason`)."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """None while the bridge can deliver; otherwise the failing check, one line for ``/readyz``'s body."""
        publisher = self._publisher
        if not publisher.connected:
            return "broker: not connected"
        if publisher.blocked_reason is not None:
            return f"broker: blocked publishing ({publisher.blocked_reason})"
        if (refused := publisher.refused_reason) is not None:
            return f"broker: publishes {refused}"
        last = self.last_poll_ok
        if last is None:
            return "upstream: no successful poll yet"
        age = time.monotonic() - last
        if age > self._settings.ready_max_poll_age_s:
            return f"upstream: last successful poll {age:.0f}s ago (limit {self._settings.ready_max_poll_age_s:g}s)"
        return None

    def _count_acknowledged(self, count: int) -> None:
        self.progress.acknowledged += count

    @property
    def outstanding(self) -> int:
        """Details on their way: publishes in flight plus confirmed ones not yet acknowledged."""
        return len(self._in_flight) + self.acknowledger.outstanding

    # --- the loop ---
    async def run(self, stop: asyncio.Event, *, once: bool = False) -> bool:
        """Run until ``stop`` is set (or, with ``once``, until the backlog is drained).

        Returns True when everything confirmed was acknowledged before returning; raises
        :class:`FatalUpstreamError`, :class:`BrokerError` or :class:`DeadlineExceeded` when it cannot go on.
        """
        async with asyncio.TaskGroup() as group:
            ack_task = group.create_task(self.acknowledger.run())
            # A drained --once run may keep retrying acknowledgements until its deadline; a stop request or
            # an error gets the shutdown budget.
            budget = self._settings.shutdown_timeout_s
            try:
                await self._poll_loop(stop, once)
                if once and not stop.is_set():
                    budget = self._settings.once_deadline_s
            finally:
                complete = await self._finish(budget, ack_task)
                ack_task.cancel()
        return complete

    async def _poll_loop(self, stop: asyncio.Event, once: bool) -> None:
        page_size = self._settings.page_size
        while not stop.is_set():
            if not self._publisher.connected:
                await self._reconnect(stop, once)
                continue
            await self._pause_after_publish_failures(stop, once)
            if stop.is_set():
                break
            # Ids already sent in an acknowledgement do not count as held: the call reaches the upstream before
            # this poll (and should it not, the page brings them back as known ones, which are skipped).
            await self._wait_until(stop, self._ready_to_poll)
            page_num, size = self._next_page(page_size)
            self.acknowledger.poll_started()
            page = await self._until_stopped(stop, self._poll(once, page_num, size))
            if page is None:
                continue
            new, known = self._dispatch(page)
            log.debug("page dispatched", extra={"page": page_num, "new": new, "known": known, "held": self._held()})
            full = len(page.records) >= size
            if full and new:
                continue  # more backlog behind this page
            nothing = new == 0 and known == 0
            if page_num == 1:
                self._page_one_blocked = False
            if nothing and full and self._settings.read_ahead and self._plan_offset() > (page_num - 1) * size:
                # A full page of records without a usable TaskDetailNo: they never leave the upstream, so a bridge
                # polling page 1 only would never see the details behind them. Read ahead past them, once
                # read-ahead may go on (acknowledgements succeed again, fewer pages on their way).
                self._page_one_blocked = self._page_one_blocked or page_num == 1
                await self._wait_until(stop, self._reading_ahead)
                continue
            if nothing and (page_num == 1 or full or (self._page_one_blocked and not self.outstanding)):
                # Nothing on the page that this bridge can still process, and nothing it can reach behind it:
                # page 1 was not full, or was full of unusable records and the pages past them end here.
                if once:
                    log.info("backlog drained")
                    return
                await self._sleep(stop, jittered(self._settings.poll_interval_s))
            elif nothing and not self.outstanding:
                # Past what was held, nothing, and everything settled: page 1 next, to see whether that is all.
                self._page_one_at = float("-inf")
            elif not self.outstanding:
                # What the page brought was all acknowledged while it was on its way: the next poll shows what
                # comes after it. There is nothing left to settle.
                continue
            elif full:
                # Everything on the page is on its way: poll again once some of it has settled.
                await self._wait_until(stop, self._some_settled())
            elif once:
                # The backlog ends on this page: poll again (to confirm it is drained) once all of it settled.
                await self._wait_until(stop, lambda: self.outstanding == 0)
            else:
                await self._sleep(stop, jittered(self._settings.poll_interval_s))

    def _held(self) -> int:
        """Details seen and not yet in an acknowledgement call: the head of the upstream's list."""
        return len(self._in_flight) + self.acknowledger.unsent

    def _seen_at_head(self) -> int:
        """Held details plus the records without a usable TaskDetailNo, which stay upstream for good.

        Each unusable record counts once, by its content, as far as memory allows: identical ones count as one,
        which only means some of them are read again.
        """
        return self._held() + len(self._unusable)

    def _read_ahead_page(self) -> tuple[int, int]:
        """``(PageNum, PageSize)`` of the page that starts past what is seen at the head (:mod:`bridge.paging`)."""
        return paging.plan(self._seen_at_head(), self._settings.page_size)

    def _plan_offset(self) -> int:
        """Where the next read-ahead page would start."""
        page_num, size = self._read_ahead_page()
        return (page_num - 1) * size

    def _reading_ahead(self) -> bool:
        """Whether the next poll may skip past what is held (see :mod:`bridge.paging`).

        Only while acknowledgements succeed (while the upstream refuses them, taking in more details would only
        grow what is held) and while a whole page more keeps at most ``_READ_AHEAD_PAGES`` pages on their way.
        """
        return (
            self._settings.read_ahead
            and not self.acknowledger.failing
            and self.outstanding + self._settings.page_size <= _READ_AHEAD_PAGES * self._settings.page_size
        )

    def _ready_to_poll(self) -> bool:
        """Poll when the next page would be mostly new details.

        Page 1 brings new ones only past what is held, so without read-ahead the loop waits until at most half a
        page is held; a read-ahead page starts past it, so the next poll can go out while a whole page is held.
        """
        page_size = self._settings.page_size
        return self._held() <= (page_size if self._reading_ahead() else page_size // 2)

    def _next_page(self, page_size: int) -> tuple[int, int]:
        """``(PageNum, PageSize)``: a read-ahead page, or page 1 when it is due (once per poll interval)."""
        now = time.monotonic()
        if not self._reading_ahead() or now - self._page_one_at >= self._settings.poll_interval_s:
            page_num, size = 1, page_size
        else:
            page_num, size = self._read_ahead_page()
        if page_num == 1:
            self._page_one_at = now
        return page_num, size

    async def _poll(self, once: bool, page_num: int, page_size: int) -> Page | None:
        try:
            page = await self._upstream.poll(page_num, page_size)
        except RetryableUpstreamError as exc:
            self._metrics.polls.labels("error").inc()
            now = time.monotonic()
            self._upstream_down_since = self._upstream_down_since or now
            self._check_deadline(once, self._upstream_down_since, f"upstream unavailable: {exc}")
            hint = exc.retry_after_s if isinstance(exc, ThrottledError) else None
            delay = self._upstream_backoff.next_delay(hint)
            log.warning(
                "poll failed; retrying",
                extra={"error": str(exc), "retry_in_s": round(delay, 3), "request_id": exc.request_id},
            )
            await asyncio.sleep(delay)
            return None
        except BaseException:
            self._metrics.polls.labels("error").inc()
            raise
        self._metrics.polls.labels("ok").inc()
        self._metrics.details_received.inc(len(page.records))
        self._metrics.last_successful_poll.set(time.time())
        self.last_poll_ok = time.monotonic()
        self._upstream_down_since = None
        self._upstream_backoff.reset()
        self.progress.polled += len(page.records)
        log.debug(
            "polled",
            extra={
                "request_id": page.request_id,
                "page": page_num,
                "records": len(page.records),
                "backlog": page.total_items,
            },
        )
        if page.total_items is not None:
            self.progress.backlog = page.total_items
            self.progress.acknowledged_at_poll = self.progress.acknowledged
        return page

    def _dispatch(self, page: Page) -> tuple[int, int]:
        """Start a publish for every unknown detail of ``page``; return (started, skipped as known)."""
        started = known = 0
        source = self._settings.event_source
        for record in page.records:
            detail_no = record.detail_no
            if detail_no is None:
                self._unusable_record(record)
                continue
            if detail_no in self._in_flight or self.acknowledger.holds(detail_no):
                known += 1
                continue
            item = convert(record, source=source)
            self._in_flight.add(detail_no)
            task = asyncio.create_task(self._publish(detail_no, item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        return started, known

    async def _publish(self, detail_no: str, item: Event | InvalidRecord) -> None:
        invalid = isinstance(item, InvalidRecord)
        try:
            outcome = await self._publisher.publish(item, invalid=invalid)
        except Exception:
            log.exception("unexpected error while publishing", extra={"detail_no": detail_no})
            outcome = PublishOutcome.CLOSED
        if outcome is PublishOutcome.ACK:
            self.acknowledger.add(detail_no)
            self._publish_acks += 1
            if invalid:
                self.progress.invalid += 1
                self._metrics.invalid_records.labels("validation").inc()
                log.warning(
                    "invalid record published to the invalid route",
                    extra={"detail_no": detail_no, "error": item.error if invalid else ""},  # type: ignore[union-attr]
                )
            else:
                self.progress.published += 1
        else:
            self._publish_failures += 1
            # One summary line per pause (see _pause_after_publish_failures); per detail only when debugging.
            log.debug("publish not confirmed", extra={"detail_no": detail_no, "outcome": outcome.value})
        self._in_flight.discard(detail_no)
        if not self._in_flight:
            self.acknowledger.flush()  # the last confirm of a page: its ids need not wait for more
        self._settled()

    def _unusable_record(self, record: RawRecord) -> None:
        text = json.dumps(record.raw, sort_keys=True, ensure_ascii=False, default=str)
        fingerprint = hashlib.sha256(text.encode()).hexdigest()
        if fingerprint in self._unusable:
            self._unusable.move_to_end(fingerprint)
            return
        self._unusable[fingerprint] = None
        if len(self._unusable) > _UNUSABLE_MEMORY:
            self._unusable.popitem(last=False)
        self.progress.unusable += 1
        self._metrics.invalid_records.labels("no_detail_no").inc()
        log.error(
            "record without a usable TaskDetailNo cannot be acknowledged; left upstream",
            extra={"record": text[:1000]},
        )

    async def _pause_after_publish_failures(self, stop: asyncio.Event, once: bool) -> None:
        """Back off after publishes the broker did not confirm, until the broker confirms a whole round again.

        The loop polls again while a round is in flight, so the failures counted here are often those of the
        round before: the pause ends early, and the backoff is reset, as soon as every publish that was in
        flight when it began is confirmed (the first fully confirmed round), not one full backoff later.
        """
        failures, self._publish_failures = self._publish_failures, 0
        acks, self._publish_acks = self._publish_acks, 0
        if not failures:
            if acks:
                self._broker_backoff.reset()
                self._broker_down_since = None
            return
        self._broker_down_since = self._broker_down_since or time.monotonic()
        self._check_deadline(once, self._broker_down_since, "broker refuses publishes")
        delay = self._broker_backoff.next_delay()
        log.warning(
            "publishes were not confirmed; they will be published again",
            extra={"failed": failures, "retry_in_s": round(delay, 3), "reason": self._publisher.last_refusal},
        )
        round_confirmed = self._round_confirmed
        self._wake_when = round_confirmed
        self._progress_event.clear()
        try:
            if self._in_flight:
                await self._until_stopped(stop, self._progress_event.wait(), delay)
            else:
                await self._sleep(stop, delay)
        finally:
            self._wake_when = None
        if round_confirmed():
            self._broker_backoff.reset()
            self._broker_down_since = None

    def _round_confirmed(self) -> bool:
        """Every publish since the pause began was confirmed, and none is in flight."""
        return self._publish_acks > 0 and not self._publish_failures and not self._in_flight

    async def _reconnect(self, stop: asyncio.Event, once: bool) -> None:
        """Open the broker connection, with backoff.

        A refusal (login, vhost, permission) before the first connection is a configuration error and stops
        the process; after it, refusals are retried like an outage, since permissions can come back.
        """
        self._broker_down_since = self._broker_down_since or time.monotonic()
        try:
            await self._publisher.connect()
        except BrokerRefusedError as exc:
            if not self._broker_ever_connected:
                raise
            await self._broker_retry(stop, once, exc, "broker refused the bridge; retrying")
            return
        except BrokerUnavailableError as exc:
            await self._broker_retry(stop, once, exc, "broker unavailable; retrying")
            return
        self._broker_ever_connected = True
        if self._publisher.last_refusal is None:
            # Not after a refusal: connecting is no proof the broker takes publishes again.
            self._broker_backoff.reset()

    async def _broker_retry(self, stop: asyncio.Event, once: bool, exc: BridgeError, message: str) -> None:
        self._check_deadline(once, self._broker_down_since or time.monotonic(), str(exc))
        delay = self._broker_backoff.next_delay()
        # The reason in the message itself: it is what an operator reads, on every retry.
        log.warning(f"{message}: {exc}", extra={"error": str(exc), "retry_in_s": round(delay, 3)})
        await self._sleep(stop, delay)

    def _check_deadline(self, once: bool, since: float, reason: str) -> None:
        if once and time.monotonic() - since > self._settings.once_deadline_s:
            raise DeadlineExceeded(f"gave up after {self._settings.once_deadline_s:g}s: {reason}")

    async def _finish(self, budget_s: float, ack_task: asyncio.Task[None]) -> bool:
        """Wait for publishes in flight, then for their acknowledgements, within ``budget_s``."""
        deadline = time.monotonic() + budget_s
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=budget_s)
        remaining = max(0.0, deadline - time.monotonic())
        if ack_task.done():
            complete = self.acknowledger.outstanding == 0
        else:
            complete = await self._until_done(ack_task, self.acknowledger.drain(remaining))
        if not complete:
            log.error(
                "stopping with confirmed details not acknowledged upstream; they will be delivered again",
                extra={"unacknowledged": self.acknowledger.outstanding, "in_flight": len(self._in_flight)},
            )
        return complete

    async def _until_done(self, ack_task: asyncio.Task[None], drain: Awaitable[bool]) -> bool:
        # Stop waiting for the drain when the acknowledger itself died (a fatal error).
        drain_task = asyncio.ensure_future(drain)
        await asyncio.wait([drain_task, ack_task], return_when=asyncio.FIRST_COMPLETED)
        if drain_task.done():
            return drain_task.result()
        drain_task.cancel()
        return False

    # --- waiting helpers ---
    def _settled(self) -> None:
        """A detail moved on (publish answered, acknowledgement changed): wake the poll loop if it waits for that."""
        if self._wake_when is not None and self._wake_when():
            self._progress_event.set()

    def _some_settled(self) -> Callable[[], bool]:
        """A condition that holds once fewer details are on their way than now."""
        before = self.outstanding
        return lambda: self.outstanding < before

    async def _wait_until(self, stop: asyncio.Event, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds (or stop); the loop is woken only when it does, not on every confirm."""
        while not condition() and not stop.is_set():
            self._wake_when = condition
            self._progress_event.clear()
            # The timeout is a safety net; the wake-up comes from _settled.
            await self._until_stopped(stop, self._progress_event.wait(), self._settings.poll_interval_s)
        self._wake_when = None

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        await self._until_stopped(stop, asyncio.sleep(seconds))

    @staticmethod
    async def _until_stopped(stop: asyncio.Event, work: Awaitable[T], timeout_s: float | None = None) -> T | None:
        """``await work``, abandoning it (None) when ``stop`` is set or ``timeout_s`` passes first."""
        work_task: asyncio.Future[T] = asyncio.ensure_future(work)
        stop_task: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
        waiting: list[asyncio.Future[Any]] = [work_task, stop_task]
        try:
            await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
        if work_task.done():
            return work_task.result()
        work_task.cancel()
        return None

"""The run loop: poll → convert → publish → acknowledge what the broker confirmed → poll again.

Where each detail stands is the :class:`~bridge.ledger.Ledger`'s business; which page to poll and what to wait
for is :mod:`bridge.policy`'s; this module carries it out (``docs/design.md`` explains read-ahead, the poll
decision and the shutdown model). Every task of a run (the poll driver, the publishers, the acknowledger and its
calls) belongs to one task group, and :meth:`BridgeLoop.run` raises one :class:`~bridge.errors.BridgeError`.

Retries live here: upstream errors back off exponentially with jitter (honouring throttling hints),
publish failures back off before the next poll, a lost broker connection is re-opened with backoff while
nothing new is published. Fatal upstream errors propagate and stop the process.

With a :class:`~bridge.leadership.Leadership`, the loop polls only while it holds the account's lock (a *term*):
it stands by until it gets the lock, and a term ends on a stop (drain, then release the lock), on the end of the
``--once`` drain, or when the lock or the broker connection is lost (nothing new is published, what was
confirmed is acknowledged within :data:`DEPOSED_ACK_S`, the rest of the term's state is dropped, and the loop
stands by again). ``docs/leadership.md`` describes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bridge import policy
from bridge.acknowledger import Acknowledger
from bridge.backoff import Backoff, jittered
from bridge.errors import (
    BridgeError,
    BrokerRefusedError,
    BrokerUnavailableError,
    DeadlineExceeded,
    InternalError,
    RetryableUpstreamError,
    ThrottledError,
)
from bridge.events import InvalidRecord, convert
from bridge.leadership import Leadership, Lease
from bridge.ledger import Ledger, Progress
from bridge.metrics import AccountMetrics
from bridge.policy import After
from bridge.publisher import Publisher, PublishOutcome
from bridge.records import RawRecord
from bridge.settings import DeliverySettings
from bridge.upstream import Page, UpstreamClient

__all__ = ["DEPOSED_ACK_S", "BridgeLoop", "DeadlineExceeded", "Progress", "one_error"]

log = logging.getLogger(__name__)

# How long a leader that lost its lock (or its connection) goes on acknowledging what the broker already
# confirmed: safe (the events are stored), and each one is a duplicate fewer for the next leader; short, since
# the next leader is polling meanwhile.
DEPOSED_ACK_S = 5.0

T = TypeVar("T")


class BridgeLoop:
    """Moves task details from the upstream to the broker; see the module docstring for the rules."""

    def __init__(
        self,
        settings: DeliverySettings,
        upstream: UpstreamClient,
        publisher: Publisher,
        metrics: AccountMetrics,
        *,
        leadership: Leadership | None = None,
    ) -> None:
        """One account's loop: ``upstream`` is that account's client, ``publisher`` may serve other accounts too.

        With ``leadership``, the loop polls only while it holds that account's lock (see the module docstring).
        """
        self._settings = settings
        self._upstream = upstream
        self._publisher = publisher
        self._metrics = metrics
        self.account = upstream.account.name
        self.fatal: str | None = None
        """Why the account is parked after a fatal upstream error (:meth:`parked`); a successful poll clears it."""
        # Resolved once: a labels() lookup per publish is measurable at thousands of events per second.
        self._published = {outcome: metrics.events_published.labels(outcome.value) for outcome in PublishOutcome}
        self._event_source = publisher.settings.event_source
        self._leadership = leadership
        self._lease: Lease | None = None  # the lock while this loop leads
        self._stop: asyncio.Event | None = None  # the run's stop request
        self.progress = Progress()
        self._pacing = policy.Pacing(page_size=upstream.settings.page_size, read_ahead=settings.read_ahead)
        self._group: asyncio.TaskGroup | None = None
        self._new_term()
        self._upstream_backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._broker_backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._upstream_down_since: float | None = None
        self._broker_down_since: float | None = None

    def _new_term(self) -> None:
        """Fresh state for a term: what a deposed leader held is the next leader's to poll again."""
        settings = self._settings
        self.ledger = Ledger(
            self._metrics,
            ack_memory=settings.ack_memory,
            batch_size=self._upstream.settings.ack_batch_size,
            progress=self.progress,
        )
        self.acknowledger = Acknowledger(self._upstream, settings, self._metrics, self.ledger)
        # (record, poll token): details to publish, taken by the publisher tasks in order
        self._queue: asyncio.Queue[tuple[RawRecord, int]] = asyncio.Queue()
        self._rounds: dict[int, list[int]] = {}  # poll token -> [publishes not yet answered, failures]
        self._clean_round = 0  # the latest poll whose publishes were all confirmed
        self._failed_round = 0  # the latest poll of which a publish was not confirmed
        self._publish_failures = 0
        self._publish_acks = 0
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
        if self.fatal is not None:
            return f"upstream: {self.fatal}"
        if self._leadership is not None and not self.leading:
            return None  # a standby polls nothing: connected, it is ready to take over
        last = self.last_poll_ok
        if last is None:
            return "upstream: no successful poll yet"
        age = time.monotonic() - last
        if age > self._settings.ready_max_poll_age_s:
            return f"upstream: last successful poll {age:.0f}s ago (limit {self._settings.ready_max_poll_age_s:g}s)"
        return None

    def parked(self, reason: str) -> None:
        """The account's run stopped on an error of its own (:class:`~bridge.app.App` retries it later)."""
        self.fatal = reason
        self._metrics.failing.set(1)

    @property
    def leading(self) -> bool:
        """Whether this loop holds its account's lock now (always False without an election)."""
        lease = self._lease
        return lease is not None and not lease.lost.is_set()

    def role(self) -> str | None:
        """``leader for account A`` or ``standby for account A`` (for ``/readyz``'s body); None without an election."""
        if self._leadership is None:
            return None
        return f"{'leader' if self.leading else 'standby'} for account {self._leadership.account}"

    @property
    def outstanding(self) -> int:
        """Details on their way: publishes in flight plus confirmed ones not yet acknowledged."""
        return self.ledger.on_their_way

    def _counts(self) -> policy.Counts:
        ledger = self.ledger
        return policy.Counts(
            held=ledger.held, on_their_way=ledger.on_their_way, unusable=ledger.unusable, ack_failing=ledger.failing
        )

    # --- the run ---
    async def run(self, stop: asyncio.Event, *, once: bool = False) -> bool:
        """Run until ``stop`` is set (or, with ``once``, until the backlog is drained).

        Returns True when everything confirmed was acknowledged before returning; raises one
        :class:`BridgeError` (:class:`FatalUpstreamError`, :class:`BrokerError`, :class:`DeadlineExceeded`, ...)
        when it cannot go on, after every task of the run has ended.
        """
        self._stop = stop
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                if self._leadership is None:
                    return await self._term(stop, once)
                return await self._elected(self._leadership, stop, once)
        except BaseExceptionGroup as failure:
            raise one_error(failure) from None
        finally:
            self._group = None

    async def _term(self, stop: asyncio.Event, once: bool) -> bool:
        """Poll, publish and acknowledge with this term's workers until ``stop`` (or drained, or deposed)."""
        group = self._group
        assert group is not None
        workers = [group.create_task(self.acknowledger.run(), name="bridge-acknowledger")]
        workers += [
            group.create_task(self._publishing(), name="bridge-publisher")
            for _ in range(self._publisher.settings.max_in_flight)
        ]
        try:
            return await self._drive(stop, once)
        finally:
            for task in workers:
                task.cancel()
            if self._leadership is not None:
                # The next term's ledger must see nothing of this term's workers.
                await asyncio.wait(workers)

    async def _drive(self, stop: asyncio.Event, once: bool) -> bool:
        # A drained --once run may keep retrying acknowledgements until its deadline; a stop request or an error
        # gets the shutdown budget; a deposed leader acknowledges what is confirmed for a short while.
        budget = self._settings.shutdown_timeout_s
        try:
            drained = await self._poll_loop(stop, once)
        except asyncio.CancelledError:
            raise  # the task group is failing (the acknowledger stopped): nothing more to wait for
        except BaseException:
            await self._finish(budget, withdraw=True)
            raise
        if drained:
            return await self._finish(self._settings.once_deadline_s, withdraw=False)
        if self._lease is not None and self._deposed(self._lease):
            return await self._finish(min(DEPOSED_ACK_S, budget), withdraw=True)
        return await self._finish(budget, withdraw=True)

    # --- the election ---
    def _deposed(self, lease: Lease) -> bool:
        """The lock of ``lease``, or the connection it lives on, is gone (or being replaced)."""
        return lease.lost.is_set() or not self._publisher.connected

    async def _elected(self, leadership: Leadership, stop: asyncio.Event, once: bool) -> bool:
        """Stand by, lead while the lock holds, stand by again when it is lost; until stopped (or drained)."""
        complete = True
        standing_by_since = time.monotonic()
        while not stop.is_set():
            lease = await self._stand_by(leadership, stop, once, standing_by_since)
            if lease is None:
                continue
            async with lease:  # leaving it releases the lock: after the drain, on a clean stop
                complete = await self._lead(lease, stop, once)
                deposed = self._deposed(lease)
            if stop.is_set() or not deposed:
                return complete  # stopped (drained and acknowledged), or the --once drain is done
            self._new_term()
            standing_by_since = time.monotonic()
        return complete

    async def _stand_by(self, leadership: Leadership, stop: asyncio.Event, once: bool, since: float) -> Lease | None:
        """The lock, once this process gets it; None when stopped or when the connection must be reopened first.

        A ``--once`` run stands by until its deadline, then fails naming the lock: a run started while another
        process leads (the previous run finishing, a running deployment) goes next instead of failing at once.
        """
        connection = self._publisher.connection
        if connection is None:
            await self._reconnect(stop, once)
            return None
        deadline = since + self._settings.once_deadline_s if once else None
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                return await leadership.acquire(connection, stop)
        except TimeoutError:
            raise DeadlineExceeded(
                f"gave up after {self._settings.once_deadline_s:g}s: another process leads account "
                f"{leadership.account} (lock {leadership.lock_name})"
            ) from None
        except BrokerUnavailableError:
            await self._publisher.close()  # reopened, with backoff, on the next round
            return None

    async def _lead(self, lease: Lease, stop: asyncio.Event, once: bool) -> bool:
        """One term: poll, publish and acknowledge until stopped, drained, or the lock or its connection is lost."""
        group = self._group
        assert group is not None
        ended = asyncio.Event()
        watcher = group.create_task(_set_on_either(stop, lease.lost, ended), name="bridge-lease-watch")
        self._lease = lease
        try:
            return await self._term(ended, once)
        finally:
            watcher.cancel()
            self._lease = None

    async def _poll_loop(self, stop: asyncio.Event, once: bool) -> bool:
        """Poll, take the page in, do what the policy says; until stopped (or deposed). True once drained (``once``)."""
        while not stop.is_set():
            if not self._publisher.connected:
                if self._lease is not None:
                    return False  # the lock lives on that connection: this term ends with it
                await self._reconnect(stop, once)
                continue
            await self._pause_after_publish_failures(stop, once)
            if stop.is_set():
                break
            await self._wait_until(stop, lambda: policy.ready_to_poll(self._counts(), self._pacing))
            page_num, size = self._next_page()
            token = self.ledger.poll_sent()
            page = await self._until_stopped(stop, self._poll(once, page_num, size))
            if page is None:
                continue
            new, known = self.ledger.polled(page.records, token)
            self._dispatch(new, token)
            log.debug("page taken in", extra={"page": page_num, "new": len(new), "known": known})
            blocked = self._page_one_blocked and page_num != 1
            shape = policy.PageShape(page_num, size, len(page.records), len(new), known, blocked)
            step = policy.after_page(self._counts(), self._pacing, shape, once)
            self._page_one_blocked = blocked or (step is After.READ_AHEAD and page_num == 1)
            if step is After.DRAINED:
                log.info("backlog drained")
                return True
            await self._carry_out(step, stop)
        return False

    async def _carry_out(self, step: After, stop: asyncio.Event) -> None:
        ledger, counts, pacing = self.ledger, self._counts, self._pacing
        if step is After.SLEEP:
            await self._sleep(stop, jittered(self._settings.poll_interval_s))
        elif step is After.PAGE_ONE:
            self._page_one_at = float("-inf")
        elif step is After.READ_AHEAD:
            await self._wait_until(stop, lambda: policy.reading_ahead(counts(), pacing))
        elif step is After.SOME_SETTLED:
            before = ledger.on_their_way
            await self._wait_until(stop, lambda: ledger.on_their_way < before)
        elif step is After.ALL_SETTLED:
            await self._wait_until(stop, lambda: ledger.on_their_way == 0)

    def _next_page(self) -> tuple[int, int]:
        """``(PageNum, PageSize)`` from the policy, page 1 being due once per poll interval."""
        now = time.monotonic()
        page_num, size = policy.next_page(
            self._counts(), self._pacing, now - self._page_one_at >= self._settings.poll_interval_s
        )
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
        if self.fatal is not None:
            log.info("account recovered: polls succeed again", extra={"account": self.account})
            self.fatal = None
            self._metrics.failing.set(0)
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

    # --- publishing ---
    def _dispatch(self, new: list[RawRecord], token: int) -> None:
        """Queue the new details of poll ``token`` for the publisher tasks."""
        if not new:
            return
        self._rounds[token] = [len(new), 0]
        put = self._queue.put_nowait
        for record in new:
            put((record, token))

    async def _publishing(self) -> None:
        """One publisher task: publish queued details one at a time (there are ``max_in_flight`` of them)."""
        queue, ledger = self._queue, self.ledger
        while True:
            record, token = await queue.get()
            if self._publishing_ended():
                # Stopping, or no longer the leader: nothing new goes out; it stays upstream for the next poller.
                assert record.detail_no is not None
                ledger.withdrawn(record.detail_no)
                continue
            await self._publish(record, token)

    def _publishing_ended(self) -> bool:
        """A stop was asked for, or the lock was lost: queued details are withdrawn, not published."""
        lease, stop = self._lease, self._stop
        return (stop is not None and stop.is_set()) or (lease is not None and lease.lost.is_set())

    async def _publish(self, record: RawRecord, token: int) -> None:
        detail_no = record.detail_no
        assert detail_no is not None  # the ledger queues only usable ids
        item = convert(record, source=self._event_source, account=self.account)
        invalid = isinstance(item, InvalidRecord)
        try:
            outcome = await self._publisher.publish(item, invalid=invalid)
        except Exception:
            log.exception("unexpected error while publishing", extra={"detail_no": detail_no})
            outcome = PublishOutcome.CLOSED
        self._published[outcome].inc()
        ok = outcome is PublishOutcome.ACK
        if ok:
            self._publish_acks += 1
            if isinstance(item, InvalidRecord):
                self.progress.invalid += 1
                self._metrics.invalid_records.labels("validation").inc()
                log.warning(
                    "invalid record published to the invalid route",
                    extra={"detail_no": detail_no, "error": item.error},
                )
            else:
                self.progress.published += 1
            self.ledger.confirmed(detail_no)
        else:
            self._publish_failures += 1
            # One summary line per pause (see _pause_after_publish_failures); per detail only when debugging.
            log.debug("publish not confirmed", extra={"detail_no": detail_no, "outcome": outcome.value})
            self.ledger.refused(detail_no)
        self._round_answered(token, ok)

    def _round_answered(self, token: int, ok: bool) -> None:
        """Count one answer of poll ``token``'s publishes; note the poll once all of them are answered."""
        answers = self._rounds.get(token)
        if answers is None:
            return
        answers[0] -= 1
        if not ok:
            answers[1] += 1
        if answers[0] <= 0:
            del self._rounds[token]
            if answers[1]:
                self._failed_round = max(self._failed_round, token)
            else:
                self._clean_round = max(self._clean_round, token)

    def _withdraw_queued(self) -> int:
        """Take back every detail not yet handed to the broker (a stop): they stay upstream for the next run."""
        withdrawn = 0
        while not self._queue.empty():
            record, _token = self._queue.get_nowait()
            assert record.detail_no is not None
            self.ledger.withdrawn(record.detail_no)
            withdrawn += 1
        return withdrawn

    async def _pause_after_publish_failures(self, stop: asyncio.Event, once: bool) -> None:
        """Back off after publishes the broker did not confirm; the first fully confirmed round ends it.

        The loop polls again while a round is in flight, so the failures counted here are often those of the
        round before: when a later poll's publishes were all confirmed (already, or during the pause), the
        backoff is reset and the pause ends.
        """
        failures, self._publish_failures = self._publish_failures, 0
        acks, self._publish_acks = self._publish_acks, 0
        if failures and self._clean_round > self._failed_round:
            # The latest poll's publishes were all confirmed: the broker accepts again. The failures counted
            # here are older ones; what they left comes back on the next polls.
            failures = 0
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
        failed, ledger = self._failed_round, self.ledger
        if ledger.in_flight:
            # A later round is on its way: its answer, not the clock, says whether the broker takes publishes.
            started = time.monotonic()
            await self._until_stopped(stop, ledger.wait_until(lambda: ledger.in_flight == 0, delay))
            if self._clean_round > failed and not self._publish_failures:
                self._broker_backoff.reset()
                self._broker_down_since = None
                return
            delay -= time.monotonic() - started
        await self._sleep(stop, max(0.0, delay))

    async def _reconnect(self, stop: asyncio.Event, once: bool) -> None:
        """Open the broker connection, with backoff.

        A refusal (login, vhost, permission) before the first connection is a configuration error and stops
        the process; after it, refusals are retried like an outage, since permissions can come back.
        """
        self._broker_down_since = self._broker_down_since or time.monotonic()
        try:
            await self._publisher.ensure_connected()
        except BrokerRefusedError as exc:
            if not self._publisher.ever_connected:
                raise  # wrong credentials, vhost or permissions at start: the configuration is wrong
            await self._broker_retry(stop, once, exc, "broker refused the connection; retrying")
            return
        except BrokerUnavailableError as exc:
            await self._broker_retry(stop, once, exc, "broker unavailable; retrying")
            return
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

    async def _finish(self, budget_s: float, *, withdraw: bool) -> bool:
        """Wait for the publishes (with ``withdraw``, only those on the wire), then their acknowledgements.

        Within ``budget_s``; True when nothing confirmed is left unacknowledged.
        """
        deadline = time.monotonic() + budget_s
        withdrawn = self._withdraw_queued() if withdraw else 0
        ledger = self.ledger
        while ledger.in_flight and time.monotonic() < deadline:
            await ledger.wait_until(lambda: ledger.in_flight == 0, max(0.0, deadline - time.monotonic()))
        complete = await self.acknowledger.drain(max(0.0, deadline - time.monotonic()))
        if not complete or ledger.in_flight:
            log.error(
                "stopping with confirmed details not acknowledged upstream; they will be delivered again",
                extra={"unacknowledged": ledger.outstanding, "in_flight": ledger.in_flight},
            )
        elif withdrawn:
            log.info("stopping: queued details left upstream for the next run", extra={"withdrawn": withdrawn})
        return complete

    # --- waiting helpers ---
    async def _wait_until(self, stop: asyncio.Event, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds (or stop); the ledger wakes the loop only when it does."""
        while not condition() and not stop.is_set():
            # The ledger's timeout is a safety net; the wake-up comes from the ledger.
            await self._until_stopped(stop, self.ledger.wait_until(condition, self._settings.poll_interval_s))

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        await self._until_stopped(stop, asyncio.sleep(seconds))

    async def _until_stopped(self, stop: asyncio.Event, work: Awaitable[T], timeout_s: float | None = None) -> T | None:
        """``await work`` in the run's task group, abandoning it (None) when ``stop`` is set or ``timeout_s`` passes."""
        group = self._group
        assert group is not None
        # A failure of the work comes back to this caller, not to the group (which would cancel everything).
        work_task = group.create_task(_captured(work))
        stop_task = group.create_task(stop.wait())
        try:
            await asyncio.wait([work_task, stop_task], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
            if not work_task.done():
                work_task.cancel()
        if not work_task.done() or work_task.cancelled():
            return None
        result, error = work_task.result()
        if error is not None:
            raise error
        return result


async def _set_on_either(first: asyncio.Event, second: asyncio.Event, target: asyncio.Event) -> None:
    """Set ``target`` once ``first`` or ``second`` is set."""
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    target.set()


def _loop_time(deadline: float | None) -> float | None:
    """A ``time.monotonic()`` deadline on the event loop's clock (for ``asyncio.timeout_at``)."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + deadline - time.monotonic()


async def _captured(work: Awaitable[T]) -> tuple[T | None, Exception | None]:
    try:
        return await work, None
    except Exception as exc:
        return None, exc


def one_error(failure: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a failed run raises: its first :class:`BridgeError`, else the cause wrapped in one."""
    leaves = _leaves(failure)
    for exc in leaves:
        if isinstance(exc, BridgeError):
            return exc
    for exc in leaves:
        if not isinstance(exc, Exception):
            return exc  # KeyboardInterrupt, SystemExit: not the bridge's to translate
    first = leaves[0]
    error = InternalError(f"unexpected {type(first).__name__}: {first}")
    error.__cause__ = first
    return error


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found

"""The acknowledger: tells the upstream, in batches, which details the broker has confirmed.

It holds every confirmed-but-unacknowledged ``TaskDetailNo`` until an AcknowledgeTaskResult call succeeds,
and retries failed calls with backoff *without publishing again*. While an id is held here (or was
acknowledged after the current poll started, see :meth:`poll_started`), the run loop skips it when a poll
brings it back, so a failing acknowledgement never causes a second event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from bridge.backoff import Backoff
from bridge.errors import (
    FatalUpstreamError,
    RefusedParametersError,
    RetryableUpstreamError,
    ThrottledError,
    UpstreamError,
)
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.upstream import ACK_IDS_MAX_BYTES, UpstreamClient, ack_id_query_bytes

__all__ = ["ACK_LINGER_S", "Acknowledger"]

# How long a partial batch waits for more confirms before it is sent anyway.
ACK_LINGER_S = 0.05

log = logging.getLogger(__name__)


class Acknowledger:
    """Batches confirmed ids into AcknowledgeTaskResult calls, at most ``ack_concurrency`` at a time."""

    def __init__(
        self,
        upstream: UpstreamClient,
        settings: Settings,
        metrics: Metrics,
        *,
        on_progress: Callable[[], None] = lambda: None,
        on_acknowledged: Callable[[int], None] = lambda n: None,
        more_coming: Callable[[], bool] = lambda: True,
    ) -> None:
        self._upstream = upstream
        self._batch_size = settings.ack_batch_size  # halved when the upstream refuses a call as too large
        metrics.ack_batch_size.set(self._batch_size)
        self._slots = asyncio.Semaphore(settings.ack_concurrency)
        self._metrics = metrics
        self._on_progress = on_progress
        self._on_acknowledged = on_acknowledged
        self._more_coming = more_coming  # False when no publish is in flight: no confirm can join a batch
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._pending: dict[str, None] = {}  # confirmed, waiting for a request (insertion-ordered)
        self._sending: set[str] = set()  # in a request under way
        self._recent: set[str] = set()  # acknowledged since the current poll started
        self._retry_at = 0.0
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: FatalUpstreamError | None = None
        self.failing = False
        """True from a failed call until a call succeeds: the run loop reads ahead only while this is False."""
        self._tasks: set[asyncio.Task[None]] = set()
        metrics.confirmed_unacknowledged.set_function(lambda: self.outstanding)

    # --- bookkeeping used by the run loop ---
    def add(self, detail_no: str) -> None:
        """Hold ``detail_no`` (its event is confirmed) until the upstream has acknowledged it."""
        self._pending[detail_no] = None
        self._changed()
        self._wakeup.set()
        if len(self._pending) >= self._batch_size:
            self._full.set()

    def flush(self) -> None:
        """No more confirms are coming for now: send a partial batch without waiting for it to fill."""
        if self._pending:
            self._full.set()

    def holds(self, detail_no: str) -> bool:
        """True while ``detail_no`` is confirmed and not yet known to be acknowledged upstream."""
        return detail_no in self._pending or detail_no in self._sending or detail_no in self._recent

    def poll_started(self) -> None:
        """Forget ids acknowledged before this poll: the upstream can no longer return them."""
        self._recent.clear()

    @property
    def outstanding(self) -> int:
        """Confirmed ids not yet known to be acknowledged: waiting for a call, or in one."""
        return len(self._pending) + len(self._sending)

    @property
    def unsent(self) -> int:
        """Confirmed ids waiting for an acknowledgement call to start."""
        return len(self._pending)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is outstanding; False when ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    # --- the task ---
    async def run(self) -> None:
        """Send batches until cancelled; raise :class:`FatalUpstreamError` when acknowledging cannot work."""
        try:
            while True:
                if self._failure is not None:
                    raise self._failure
                if not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                delay = self._retry_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                await self._slots.acquire()
                if len(self._pending) < self._batch_size and self._more_coming():
                    # A call costs far more than an id in it: let confirms arriving right behind this one fill
                    # the batch (each confirm would otherwise leave in a call of its own). With nothing in flight
                    # no confirm can come, and waiting would only delay the next page (see flush).
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(ACK_LINGER_S):
                            await self._full.wait()
                if not self._pending:
                    self._slots.release()
                    continue
                batch = self._take()
                task = asyncio.create_task(self._send(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in self._tasks:
                task.cancel()

    def _take(self) -> list[str]:
        batch: list[str] = []
        query_bytes = 0
        for detail_no in self._pending:
            # Long ids fill the request line before the batch size does: stop at the byte budget too.
            query_bytes += ack_id_query_bytes(detail_no, len(batch) + 1)
            if batch and query_bytes > ACK_IDS_MAX_BYTES:
                break
            batch.append(detail_no)
            if len(batch) >= self._batch_size:
                break
        for detail_no in batch:
            del self._pending[detail_no]
            self._sending.add(detail_no)
        self._on_progress()  # sent ids no longer hold back the next poll (see BridgeLoop._held)
        return batch

    async def _send(self, batch: list[str]) -> None:
        try:
            result = await self._upstream.acknowledge(batch)
        except UpstreamError as exc:
            # One call per batch: a failed call failed for the whole batch (an id it did apply comes back
            # as unknown to the next call, which is harmless).
            self._settle([], failed=batch)
            self._metrics.acknowledgements.labels("failed").inc(len(batch))
            self.failing = True
            if isinstance(exc, RetryableUpstreamError):
                self._schedule_retry(exc)
            elif not self._shrink_after_refusal(exc, len(batch)):  # else the ids leave at once in smaller calls
                assert isinstance(exc, FatalUpstreamError)
                self._failure = exc
                self._wakeup.set()
        except BaseException:
            self._settle([], failed=batch)
            raise
        else:
            self.failing = False
            self._settle(batch, failed=[])
            self._on_acknowledged(len(batch))
            if result.confirmed is None:
                # The call succeeded, but its Result is missing, negative or not a number: count, do not guess.
                self._metrics.acknowledgements.labels("unknown").inc(result.sent)
                log.warning(
                    "upstream answered an acknowledgement without a usable Result",
                    extra={"sent": result.sent, "request_id": result.request_id},
                )
            else:
                self._metrics.acknowledgements.labels("confirmed").inc(result.confirmed)
            if result.confirmed is not None and result.confirmed < result.sent:
                # Undocumented upstream behaviour (unknown or already acknowledged ids): information only.
                self._metrics.acknowledgements.labels("not_confirmed").inc(result.sent - result.confirmed)
                log.info(
                    "upstream confirmed fewer acknowledgements than sent",
                    extra={
                        "sent": result.sent,
                        "confirmed": result.confirmed,
                        "request_id": result.request_id,
                    },
                )
            self._backoff.reset()
        finally:
            self._slots.release()

    def _settle(self, done: Iterable[str], failed: list[str]) -> None:
        for detail_no in done:
            self._sending.discard(detail_no)
            self._recent.add(detail_no)
        if failed:
            # Back to the front of the queue, so the oldest confirmations are retried first.
            retry = dict.fromkeys(failed)
            for detail_no in failed:
                self._sending.discard(detail_no)
            retry.update(self._pending)
            self._pending = retry
            self._wakeup.set()
        self._changed()

    def _shrink_after_refusal(self, exc: UpstreamError, size: int) -> bool:
        """Halve the batch size when the upstream refused a call of ``size`` ids as too large; True if it did.

        The upstream's limit of ids per call is undocumented: a :class:`RefusedParametersError` of a call of many
        ids is read as that limit. Any other error, or a refused call of a single id, is not about the size.
        """
        if not isinstance(exc, RefusedParametersError) or size <= 1:
            return False
        smaller = max(1, size // 2)
        if smaller < self._batch_size:
            self._batch_size = smaller
            self._metrics.ack_batch_size.set(smaller)
            log.warning(
                "upstream refused an acknowledgement of many ids; sending fewer per call",
                extra={"error": str(exc), "refused_ids": size, "ack_batch_size": smaller},
            )
        return True

    def _schedule_retry(self, exc: RetryableUpstreamError) -> None:
        hint = exc.retry_after_s if isinstance(exc, ThrottledError) else None
        delay = self._backoff.next_delay(hint)
        self._retry_at = max(self._retry_at, time.monotonic() + delay)
        log.warning(
            "acknowledgement failed; retrying without publishing again",
            extra={"error": str(exc), "retry_in_s": round(delay, 3), "held": self.outstanding},
        )

    def _changed(self) -> None:
        if self.outstanding:
            self._idle.clear()
        else:
            self._idle.set()
        self._on_progress()

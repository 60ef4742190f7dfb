"""The acknowledger: tells the upstream, in batches, which details the broker has confirmed.

It takes confirmed ids from the :class:`~bridge.ledger.Ledger` in calls of at most the batch size, and
retries failed calls with backoff *without publishing again* (the ids stay held in the ledger). A call's
``Result`` is believed only as far as it goes: what the upstream did not apply comes back on a later poll, and
the ledger has it acknowledged again.
"""

from __future__ import annotations

import asyncio
import logging
import time

from bridge.backoff import Backoff
from bridge.errors import (
    FatalUpstreamError,
    RefusedParametersError,
    RetryableUpstreamError,
    ThrottledError,
    UpstreamError,
)
from bridge.ledger import Ledger
from bridge.metrics import ACK_OUTCOMES, AccountMetrics
from bridge.settings import DeliverySettings
from bridge.upstream import ACK_IDS_MAX_BYTES, UpstreamClient, ack_id_query_bytes

__all__ = ["ACK_LINGER_S", "Acknowledger"]

# How long a partial batch waits for more confirms before it is sent anyway.
ACK_LINGER_S = 0.05

log = logging.getLogger(__name__)


class Acknowledger:
    """Sends the ledger's confirmed ids in AcknowledgeTaskResult calls, at most ``ack_concurrency`` at a time."""

    def __init__(
        self, upstream: UpstreamClient, delivery: DeliverySettings, metrics: AccountMetrics, ledger: Ledger
    ) -> None:
        """Batch size and concurrency are the upstream client's settings; the backoff is ``delivery``'s."""
        settings = upstream.settings
        self._upstream = upstream
        self._ledger = ledger
        self._batch_size = settings.ack_batch_size  # halved when the upstream refuses a call as too large
        ledger.batch_size = self._batch_size
        metrics.ack_batch_size.set(self._batch_size)
        self._slots = asyncio.Semaphore(settings.ack_concurrency)
        self._metrics = metrics
        self._acks = {outcome: metrics.acknowledgements.labels(outcome) for outcome in ACK_OUTCOMES}
        self._backoff = Backoff(delivery.backoff_initial_s, delivery.backoff_max_s)
        self._retry_at = 0.0

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing confirmed is unacknowledged; False when ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._ledger.wait_idle()
        except TimeoutError:
            return False
        return True

    # --- the task ---
    async def run(self) -> None:
        """Send batches until cancelled; raise :class:`FatalUpstreamError` when acknowledging cannot work.

        Each call is a task of the same task group as this one.
        """
        async with asyncio.TaskGroup() as calls:
            while True:
                await self._ledger.wait_for_confirmed()
                delay = self._retry_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                await self._slots.acquire()
                # A call costs far more than an id in it: let confirms arriving right behind this one fill the
                # batch. With nothing in flight no confirm can come, and the ledger does not wait.
                await self._ledger.wait_for_batch(ACK_LINGER_S)
                batch = self._ledger.sent(self._batch_size, budget=ACK_IDS_MAX_BYTES, cost=ack_id_query_bytes)
                if not batch:
                    self._slots.release()
                    continue
                calls.create_task(self._send(batch))

    async def _send(self, batch: list[str]) -> None:
        try:
            result = await self._upstream.acknowledge(batch)
        except UpstreamError as exc:
            self._ledger.failed(batch)
            self._acks["failed"].inc(len(batch))
            if isinstance(exc, RetryableUpstreamError):
                self._schedule_retry(exc)
            elif not self._shrink_after_refusal(exc, len(batch)):  # else the ids leave at once in smaller calls
                assert isinstance(exc, FatalUpstreamError)
                raise exc from None
            return
        except BaseException:
            self._ledger.failed(batch)
            raise
        finally:
            self._slots.release()
        self._ledger.acknowledged(batch)
        self._backoff.reset()
        self._count(len(batch), result)

    def _count(self, sent: int, result: object) -> None:
        """Count what the upstream says it applied; a ``Result`` that says nothing usable is logged and counted."""
        confirmed = getattr(result, "confirmed", None)
        request_id = getattr(result, "request_id", None) or getattr(result, "request_ids", None)
        if not isinstance(confirmed, int) or isinstance(confirmed, bool) or confirmed < 0:
            self._metrics.ack_results_unusable.inc()
            self._acks["unknown"].inc(sent)
            log.warning(
                "acknowledgement answered without a usable Result; what it did not apply will come back",
                extra={"sent": sent, "result": repr(confirmed)[:50], "request_id": request_id},
            )
            return
        self._acks["confirmed"].inc(min(confirmed, sent))
        if confirmed < sent:
            # Unknown or already acknowledged ids, or applied in part: what did not apply comes back on a poll.
            self._acks["not_confirmed"].inc(sent - confirmed)
            log.info(
                "upstream confirmed fewer acknowledgements than sent",
                extra={"sent": sent, "confirmed": confirmed, "request_id": request_id},
            )

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
            self._ledger.batch_size = smaller
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
            extra={"error": str(exc), "retry_in_s": round(delay, 3), "held": self._ledger.outstanding},
        )

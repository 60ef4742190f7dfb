"""The ledger: the one place that knows where every task detail of this run stands.

States and transitions are drawn in ``docs/design.md`` (*The ledger*). In short, a usable ``TaskDetailNo`` is
in at most one of these states, and each method is named for what happened to it::

    polled ─► in flight ─confirmed─► confirmed ─sent─► in a call ─acknowledged─► recently acknowledged
                 │ refused / withdrawn     ▲                │ failed                     │ came back
                 ▼                         └────────────────┘                            ▼
              (forgotten: published again when a poll brings it)                  confirmed (again)

A record without a usable ``TaskDetailNo`` is *unusable*: it can never be acknowledged, so it is remembered by
its content (bounded) and counted once. The run loop moves details in and out of *in flight*; the acknowledger
moves them from *confirmed* on. Neither calls the other: both wait on the ledger's conditions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

from bridge.metrics import AccountMetrics
from bridge.records import RawRecord

__all__ = ["RETURNS_WARNING", "UNUSABLE_MEMORY", "Ledger", "Progress"]

log = logging.getLogger(__name__)

UNUSABLE_MEMORY = 10_000  # fingerprints of records without a usable TaskDetailNo, to count each only once
RETURNS_WARNING = 3  # the time a detail comes back after its acknowledgement at which one WARNING names it


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

    @classmethod
    def total(cls, parts: list[Progress]) -> Progress:
        """The progress of several accounts' runs as one: counts added, the backlog of those that know theirs."""
        total = cls()
        total.started = min((part.started for part in parts), default=total.started)
        for name in ("polled", "published", "invalid", "unusable", "acknowledged", "acknowledged_at_poll"):
            setattr(total, name, sum(getattr(part, name) for part in parts))
        backlogs = [part.backlog for part in parts if part.backlog is not None]
        total.backlog = sum(backlogs) if backlogs else None
        return total


class Ledger:
    """Every detail's state, the counts the poll policy reads, and the conditions both tasks wait on.

    ``ack_memory`` bounds the recently acknowledged ids (oldest forgotten first, but never one acknowledged after
    the latest poll was sent, which that poll may still list); ``batch_size`` is the number
    of confirmed ids at which the acknowledger need not wait for more (see :meth:`wait_for_batch`).
    """

    def __init__(
        self, metrics: AccountMetrics, *, ack_memory: int, batch_size: int, progress: Progress | None = None
    ) -> None:
        self._metrics = metrics
        self.progress = progress or Progress()
        self._ack_memory = ack_memory
        self.batch_size = batch_size
        self._in_flight: set[str] = set()
        self._confirmed: dict[str, None] = {}  # insertion-ordered: the oldest confirmation is sent first
        self._sending: set[str] = set()
        # id -> number of polls sent when its acknowledgement succeeded (see polled); oldest first in _order, where
        # an id that came back since has a stale entry (counted in _stale) to skip. A plain dict and a deque take
        # about half the memory of an OrderedDict.
        self._acknowledged: dict[str, int] = {}
        self._order: deque[str] = deque()
        self._stale: dict[str, int] = {}
        self._returns: OrderedDict[str, int] = OrderedDict()  # id -> times it came back after acknowledgement
        self._unusable: OrderedDict[str, None] = OrderedDict()
        self._polls = 0
        self.failing = False
        """True from a failed acknowledgement call until one succeeds: the policy reads ahead only while False."""
        self._has_confirmed = asyncio.Event()
        self._batch_ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._changed = asyncio.Event()
        self._wake_when: Callable[[], bool] | None = None
        self._returned = metrics.details_returned_after_ack
        self._conflicts = metrics.conflicting_details
        metrics.confirmed_unacknowledged.set_function(lambda: self.outstanding)

    # --- counts ---
    @property
    def in_flight(self) -> int:
        """Details whose publish is queued or awaits the broker."""
        return len(self._in_flight)

    @property
    def unsent(self) -> int:
        """Confirmed details waiting for an acknowledgement call."""
        return len(self._confirmed)

    @property
    def sending(self) -> int:
        """Details in an acknowledgement call under way."""
        return len(self._sending)

    @property
    def outstanding(self) -> int:
        """Confirmed details not yet known to be acknowledged: waiting for a call, or in one."""
        return len(self._confirmed) + len(self._sending)

    @property
    def on_their_way(self) -> int:
        """Everything seen and not yet acknowledged: in flight, confirmed, in a call."""
        return len(self._in_flight) + len(self._confirmed) + len(self._sending)

    @property
    def held(self) -> int:
        """Details seen and not yet in an acknowledgement call: the head of the upstream's list."""
        return len(self._in_flight) + len(self._confirmed)

    @property
    def unusable(self) -> int:
        """Distinct records without a usable TaskDetailNo remembered (they stay upstream for good)."""
        return len(self._unusable)

    @property
    def remembered(self) -> int:
        """Recently acknowledged ids remembered (at most ``ack_memory``)."""
        return len(self._acknowledged)

    def state(self, detail_no: str) -> str:
        """The state of ``detail_no`` by name (for tests and debugging)."""
        if detail_no in self._in_flight:
            return "in_flight"
        if detail_no in self._confirmed:
            return "confirmed"
        if detail_no in self._sending:
            return "sending"
        if detail_no in self._acknowledged:
            return "acknowledged"
        return "unknown"

    # --- the poll side ---
    def poll_sent(self) -> int:
        """A poll is about to go out; the token it returns goes to :meth:`polled` with the poll's records."""
        self._polls += 1
        self._trim()
        return self._polls

    def polled(self, records: Sequence[RawRecord], token: int) -> tuple[list[RawRecord], int]:
        """Take a page in: return the records to publish (now *in flight*) and how many were known.

        A held detail is skipped. One acknowledged after this poll was sent may still be listed and is skipped
        too; one acknowledged before it *came back* (the upstream did not apply the acknowledgement): it is
        confirmed again, to be acknowledged again, with no second event. A second copy on the same page is
        skipped, with a WARNING when its content differs (the first copy is the one published).
        """
        new: list[RawRecord] = []
        known = 0
        on_page: dict[str, RawRecord] = {}
        in_flight, confirmed, sending = self._in_flight, self._confirmed, self._sending
        acknowledged = self._acknowledged
        for record in records:
            detail_no = record.detail_no
            if detail_no is None:
                self._unusable_seen(record)
                continue
            first = on_page.setdefault(detail_no, record)
            if first is not record:
                self._duplicate(first, record)
            elif detail_no in in_flight or detail_no in confirmed or detail_no in sending:
                known += 1
            elif detail_no in acknowledged:
                known += 1
                if acknowledged[detail_no] < token:
                    self._came_back(detail_no)
            else:
                in_flight.add(detail_no)
                new.append(record)
        if len(self._confirmed) >= self.batch_size or not self._in_flight:
            self._batch_ready.set()
        return new, known

    def confirmed(self, detail_no: str) -> None:
        """The broker confirmed the detail's event: it waits for an acknowledgement call."""
        self._in_flight.discard(detail_no)
        self._confirm(detail_no)
        self._settled()

    def refused(self, detail_no: str) -> None:
        """The publish was not confirmed (nack, return, timeout, closed): forget it, a later poll brings it back."""
        self._in_flight.discard(detail_no)
        if not self._in_flight and self._confirmed:
            self._batch_ready.set()
        self._settled()

    withdrawn = refused
    """A queued publish was never put on the wire (the run stops): forget it, as for a refusal."""

    # --- the acknowledgement side ---
    async def wait_for_confirmed(self) -> None:
        """Wait until some detail is confirmed."""
        while not self._confirmed:
            self._has_confirmed.clear()
            await self._has_confirmed.wait()

    async def wait_for_batch(self, linger_s: float) -> None:
        """Wait up to ``linger_s`` for a full batch; at once when no publish is in flight (no confirm can come)."""
        if len(self._confirmed) >= self.batch_size or not self._in_flight:
            return
        self._batch_ready.clear()
        try:
            async with asyncio.timeout(linger_s):
                await self._batch_ready.wait()
        except TimeoutError:
            pass

    def sent(
        self, limit: int, *, budget: int | None = None, cost: Callable[[str, int], int] | None = None
    ) -> list[str]:
        """Up to ``limit`` confirmed ids, oldest first, now *in an acknowledgement call*.

        With ``budget`` and ``cost`` (the cost of an id as the call's n-th, from 1), the batch also stops before
        the ids' summed cost passes ``budget``; it always takes at least one id.
        """
        batch: list[str] = []
        spent = 0
        for detail_no in self._confirmed:
            if budget is not None and cost is not None:
                spent += cost(detail_no, len(batch) + 1)
                if batch and spent > budget:
                    break
            batch.append(detail_no)
            if len(batch) >= limit:
                break
        for detail_no in batch:
            del self._confirmed[detail_no]
            self._sending.add(detail_no)
        self._settled()  # sent ids no longer hold back the next poll (see held)
        return batch

    def acknowledged(self, batch: Iterable[str]) -> None:
        """The call acknowledging ``batch`` succeeded: remember its ids (bounded) to tell when one comes back."""
        memory, order, polls, count = self._acknowledged, self._order, self._polls, 0
        for detail_no in batch:
            self._sending.discard(detail_no)
            if detail_no in memory:
                self._stale[detail_no] = self._stale.get(detail_no, 0) + 1  # acknowledged twice, remembered once
            memory[detail_no] = polls
            order.append(detail_no)
            count += 1
        self._trim()
        self.progress.acknowledged += count
        self.failing = False
        self._settled()

    def failed(self, batch: Sequence[str]) -> None:
        """The call acknowledging ``batch`` failed: its ids go back to the front of the confirmed ones."""
        retry = dict.fromkeys(batch)
        for detail_no in batch:
            self._sending.discard(detail_no)
        retry.update(self._confirmed)
        self._confirmed = retry
        self.failing = True
        if retry:
            self._has_confirmed.set()
        self._settled()

    async def wait_idle(self) -> None:
        """Wait until nothing confirmed is unacknowledged."""
        await self._idle.wait()

    # --- what the poll loop waits for ---
    async def wait_until(self, condition: Callable[[], bool], timeout_s: float) -> None:
        """Wait until ``condition()`` holds, woken only when it does (not on every confirm), or ``timeout_s``."""
        if condition():
            return
        self._wake_when = condition
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        except TimeoutError:
            pass
        finally:
            if self._wake_when is condition:  # a waiter cancelled late must not clear its successor's condition
                self._wake_when = None

    # --- internals ---
    def _confirm(self, detail_no: str) -> None:
        self._confirmed[detail_no] = None
        self._has_confirmed.set()
        if len(self._confirmed) >= self.batch_size or not self._in_flight:
            self._batch_ready.set()

    def _settled(self) -> None:
        if self._confirmed or self._sending:
            self._idle.clear()
        else:
            self._idle.set()
        if self._wake_when is not None and self._wake_when():
            self._changed.set()

    def _trim(self) -> None:
        """Past ``ack_memory``, forget the oldest acknowledged ids, except those the poll under way may list."""
        # Bounded by the entries in _order, stale ones included, so ids that keep coming back cannot grow it.
        while len(self._order) > self._ack_memory and self._forget_oldest():
            pass

    def _forget_oldest(self) -> bool:
        """Forget the oldest acknowledged id; False when it must stay: the latest poll may still list it."""
        oldest = self._order[0]
        stale = self._stale.get(oldest)
        if stale:
            # An earlier entry of an id acknowledged again (or back) since: the id is remembered further on.
            self._order.popleft()
            if stale == 1:
                del self._stale[oldest]
            else:
                self._stale[oldest] = stale - 1
            return True
        if self._acknowledged[oldest] >= self._polls:
            return False
        self._order.popleft()
        del self._acknowledged[oldest]
        self._returns.pop(oldest, None)
        return True

    def _came_back(self, detail_no: str) -> None:
        del self._acknowledged[detail_no]
        self._stale[detail_no] = self._stale.get(detail_no, 0) + 1  # its entry in _order no longer counts
        times = self._returns.pop(detail_no, 0) + 1
        self._returns[detail_no] = times
        if len(self._returns) > self._ack_memory:
            self._returns.popitem(last=False)
        self._returned.inc()
        if times == RETURNS_WARNING:
            log.warning(
                "detail keeps coming back after its acknowledgement succeeded; acknowledging it again",
                extra={"detail_no": detail_no, "times": times},
            )
        self._confirm(detail_no)
        self._settled()

    def _duplicate(self, first: RawRecord, again: RawRecord) -> None:
        if first.raw == again.raw:
            return
        self._conflicts.inc()
        log.warning(
            "the same TaskDetailNo twice on one page with different content; the first copy is published",
            extra={"detail_no": first.detail_no},
        )

    def _unusable_seen(self, record: RawRecord) -> None:
        text = json.dumps(record.raw, sort_keys=True, ensure_ascii=False, default=str)
        fingerprint = hashlib.sha256(text.encode()).hexdigest()
        if fingerprint in self._unusable:
            self._unusable.move_to_end(fingerprint)
            return
        self._unusable[fingerprint] = None
        if len(self._unusable) > UNUSABLE_MEMORY:
            self._unusable.popitem(last=False)
        self.progress.unusable += 1
        self._metrics.invalid_records.labels("no_detail_no").inc()
        log.error(
            "record without a usable TaskDetailNo cannot be acknowledged; left upstream",
            extra={"record": text[:1000]},
        )

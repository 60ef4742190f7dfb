"""The ledger: examples of each transition, and a hypothesis state machine over random interleavings.

The machine plays the upstream (pending details, listed in any order, with repeats and gaps, acknowledgements
applied in full, in part or not at all), the broker (confirms, nacks, timeouts) and restarts against one ledger,
and checks the two halves of the promise after every step: no id is acknowledged unless its event was
confirmed, and no id is published again while it is held.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bridge.ledger import RETURNS_WARNING, Ledger
from bridge.metrics import Metrics
from bridge.records import RawRecord
from tests.harness import sample

IDS = [f"T{n:03d}" for n in range(12)]


def record(detail_no: str | None, content: int = 0) -> RawRecord:
    return RawRecord({"TaskDetailNo": detail_no, "content": content}, detail_no)


def ledger(ack_memory: int = 1000, batch_size: int = 3) -> tuple[Ledger, Metrics]:
    metrics = Metrics()
    return Ledger(metrics.account("default"), ack_memory=ack_memory, batch_size=batch_size), metrics


def test_a_detail_goes_from_polled_to_acknowledged() -> None:
    led, _ = ledger()
    new, known = led.polled([record("A")], led.poll_sent())
    assert [r.detail_no for r in new] == ["A"] and known == 0
    assert led.state("A") == "in_flight" and led.held == 1
    led.confirmed("A")
    assert led.state("A") == "confirmed" and led.outstanding == 1
    assert led.sent(10) == ["A"]
    assert led.state("A") == "sending" and led.held == 0 and led.on_their_way == 1
    led.acknowledged(["A"])
    assert led.state("A") == "acknowledged" and led.on_their_way == 0 and led.progress.acknowledged == 1


def test_a_refused_publish_is_forgotten_and_published_again_by_a_later_poll() -> None:
    led, _ = ledger()
    led.polled([record("A")], led.poll_sent())
    led.refused("A")
    assert led.state("A") == "unknown"
    new, _ = led.polled([record("A")], led.poll_sent())
    assert [r.detail_no for r in new] == ["A"]


def test_a_failed_call_puts_its_ids_back_first_and_nothing_is_published_again() -> None:
    led, _ = ledger()
    led.polled([record("A"), record("B"), record("C")], led.poll_sent())
    for detail_no in "ABC":
        led.confirmed(detail_no)
    assert led.sent(2) == ["A", "B"]
    led.failed(["A", "B"])
    assert led.failing
    assert led.sent(10) == ["A", "B", "C"]
    new, known = led.polled([record("A"), record("B")], led.poll_sent())
    assert new == [] and known == 2


def test_a_poll_sent_before_the_acknowledgement_may_still_list_the_detail(caplog: pytest.LogCaptureFixture) -> None:
    led, metrics = ledger()
    led.polled([record("A")], led.poll_sent())
    led.confirmed("A")
    led.sent(10)
    token = led.poll_sent()  # this poll goes out while the call is under way
    led.acknowledged(["A"])
    new, known = led.polled([record("A")], token)
    assert new == [] and known == 1
    assert led.state("A") == "acknowledged"
    assert sample(metrics, "bridge_details_returned_after_ack_total") == 0


def test_a_detail_back_after_its_acknowledgement_is_acknowledged_again_without_an_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    led, metrics = ledger()
    led.polled([record("A")], led.poll_sent())
    led.confirmed("A")
    caplog.set_level(logging.WARNING)
    for times in range(1, RETURNS_WARNING + 1):
        led.sent(10)
        led.acknowledged(["A"])
        new, known = led.polled([record("A")], led.poll_sent())  # the upstream did not apply it
        assert new == [] and known == 1
        assert led.state("A") == "confirmed"
        assert sample(metrics, "bridge_details_returned_after_ack_total") == times
        warned = [r for r in caplog.records if "keeps coming back" in r.getMessage()]
        assert len(warned) == (1 if times >= RETURNS_WARNING else 0)
    assert warned[0].__dict__["detail_no"] == "A"


def test_the_memory_of_acknowledged_ids_is_bounded() -> None:
    led, _ = ledger(ack_memory=2)
    led.polled([record(d) for d in "ABC"], led.poll_sent())
    for detail_no in "ABC":
        led.confirmed(detail_no)
    led.acknowledged(led.sent(10))
    assert led.remembered == 3, "the poll under way may list all three"
    led.poll_sent()
    assert led.remembered == 2
    new, _ = led.polled([record("A"), record("C")], led.poll_sent())
    assert [r.detail_no for r in new] == ["A"], "A was forgotten: published again (a duplicate with its message id)"


def test_ids_are_opaque_used_byte_for_byte() -> None:
    led, _ = ledger()
    variants = ["A", "A ", " A", "a", "A\n", "\uff21"]  # the last: FULLWIDTH A
    new, _ = led.polled([record(d) for d in variants], led.poll_sent())
    assert [r.detail_no for r in new] == variants
    for detail_no in variants:
        led.confirmed(detail_no)
    assert led.sent(10) == variants


def test_a_small_memory_still_keeps_what_a_poll_under_way_may_list() -> None:
    led, _ = ledger(ack_memory=0)
    led.polled([record(d) for d in "AB"], led.poll_sent())
    for detail_no in "AB":
        led.confirmed(detail_no)
    led.sent(10)
    token = led.poll_sent()
    led.acknowledged(["A", "B"])
    assert led.remembered == 2
    new, known = led.polled([record("A"), record("B")], token)
    assert new == [] and known == 2
    led.poll_sent()  # the next poll forgets them: no poll under way can list them any more
    assert led.remembered == 0


def test_same_id_twice_on_a_page_publishes_the_first_copy_and_warns_when_they_differ(
    caplog: pytest.LogCaptureFixture,
) -> None:
    led, metrics = ledger()
    caplog.set_level(logging.WARNING)
    first, same, other = record("A", 1), record("A", 1), record("A", 2)
    new, _ = led.polled([first, same], led.poll_sent())
    assert new == [first]
    assert sample(metrics, "bridge_conflicting_details_total") == 0
    assert not caplog.records
    led.refused("A")
    new, _ = led.polled([first, other], led.poll_sent())
    assert new == [first]
    assert sample(metrics, "bridge_conflicting_details_total") == 1
    (line,) = caplog.records
    assert line.levelno == logging.WARNING and line.__dict__["detail_no"] == "A"


def test_records_without_a_usable_id_are_counted_once_by_content() -> None:
    led, metrics = ledger()
    new, known = led.polled([record(None, 1), record(None, 1), record(None, 2)], led.poll_sent())
    assert new == [] and known == 0
    assert led.unusable == 2 and led.progress.unusable == 2
    assert sample(metrics, "bridge_invalid_records_total", reason="no_detail_no") == 2


class LedgerMachine(RuleBasedStateMachine):
    """Random interleavings against one ledger (restarted now and then), checked after every step."""

    @initialize(ack_memory=st.sampled_from([0, 1, 3, 1000]), batch_size=st.integers(1, 4))
    def start(self, ack_memory: int, batch_size: int) -> None:
        self.ack_memory = ack_memory
        self.batch_size = batch_size
        self.upstream: set[str] = set(IDS)  # pending upstream
        self.counts = {"polls": 0, "publishes": 0, "calls": 0, "came_back": 0, "restarts": 0}
        self._restart()

    def _restart(self) -> None:
        self.ledger, self.metrics = ledger(self.ack_memory, self.batch_size)
        self.in_flight: set[str] = set()
        self.confirmed: set[str] = set()  # its event confirmed by the broker in this ledger's lifetime
        self.calls: list[list[str]] = []
        self.acknowledged: set[str] = set()  # acknowledged by a call that succeeded, in this lifetime
        self.acknowledged_at: dict[str, int] = {}  # id -> the latest poll sent when its call succeeded
        self.last_poll = 0
        self.poll: tuple[int, list[str]] | None = None

    # --- the upstream ---
    @precondition(lambda self: self.poll is None)
    @rule()
    def send_poll(self) -> None:
        self.last_poll = self.ledger.poll_sent()
        self.poll = (self.last_poll, sorted(self.upstream))

    @precondition(lambda self: self.poll is not None)
    @rule(data=st.data())
    def answer_poll(self, data: st.DataObject) -> None:
        assert self.poll is not None
        token, listed = self.poll
        self.poll = None
        ids = data.draw(st.lists(st.sampled_from(listed), max_size=8)) if listed else []
        records = [record(d) for d in ids] + data.draw(st.lists(st.builds(record, st.none(), st.integers(0, 3))))
        records = data.draw(st.permutations(records))
        held = self.in_flight | {d for call in self.calls for d in call} | set(self._ledger_confirmed())
        new, _known = self.ledger.polled(records, token)
        self.counts["polls"] += 1
        for item in new:
            detail_no = item.detail_no
            assert detail_no is not None
            assert detail_no not in held, f"{detail_no} published again while held"
            # Acknowledged after this poll was sent: the poll may list it, and no memory size forgets that.
            assert self.acknowledged_at.get(detail_no, -1) < token, f"{detail_no} published again while listed late"
            if self.ack_memory >= len(IDS):
                assert detail_no not in self.acknowledged, f"{detail_no} published again after its acknowledgement"
            held.add(detail_no)
            self.in_flight.add(detail_no)
            self.counts["publishes"] += 1

    def _ledger_confirmed(self) -> list[str]:
        return [d for d in IDS if self.ledger.state(d) == "confirmed"]

    # --- the broker ---
    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data(), outcome=st.sampled_from(["ack", "nack", "timeout", "closed"]))
    def broker_answers(self, data: st.DataObject, outcome: str) -> None:
        detail_no = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.in_flight.discard(detail_no)
        if outcome == "ack":
            self.confirmed.add(detail_no)
            self.ledger.confirmed(detail_no)
        else:
            self.ledger.refused(detail_no)

    # --- the acknowledger ---
    @rule(limit=st.integers(1, 5))
    def send_call(self, limit: int) -> None:
        batch = self.ledger.sent(limit)
        for detail_no in batch:
            assert detail_no in self.confirmed, f"{detail_no} sent for acknowledgement without a confirmed event"
        if batch:
            self.calls.append(batch)
            self.counts["calls"] += 1

    @precondition(lambda self: bool(self.calls))
    @rule(data=st.data(), outcome=st.sampled_from(["applied", "in_part", "dropped", "unusable", "failed"]))
    def call_answers(self, data: st.DataObject, outcome: str) -> None:
        batch = self.calls.pop(data.draw(st.integers(0, len(self.calls) - 1)))
        if outcome == "failed":
            self.ledger.failed(batch)
            return
        if outcome == "applied":
            applied = set(batch)
        elif outcome == "in_part":
            applied = set(data.draw(st.lists(st.sampled_from(batch), unique=True)))
        else:
            applied = set()
        self.upstream -= applied
        self.acknowledged |= set(batch)
        self.acknowledged_at.update(dict.fromkeys(batch, self.last_poll))
        self.ledger.acknowledged(batch)

    @rule()
    def restart(self) -> None:
        self.counts["restarts"] += 1
        self._restart()

    @rule(detail_no=st.sampled_from(IDS))
    def a_new_detail_upstream(self, detail_no: str) -> None:
        if detail_no not in self.upstream and detail_no not in self.acknowledged:
            self.upstream.add(detail_no)

    # --- invariants ---
    @invariant()
    def counts_agree(self) -> None:
        led = self.ledger
        assert led.in_flight == len(self.in_flight)
        assert led.sending == sum(len(call) for call in self.calls)
        assert led.on_their_way == led.in_flight + led.outstanding
        in_calls_since = sum(1 for d, at in self.acknowledged_at.items() if at >= self.last_poll)
        assert led.remembered <= max(self.ack_memory, self.ack_memory + in_calls_since)
        for detail_no in self._ledger_confirmed():
            assert detail_no in self.confirmed


LedgerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_ledger_interleavings = LedgerMachine.TestCase


def test_details_that_keep_coming_back_do_not_grow_the_memory() -> None:
    led, _ = ledger(ack_memory=5)
    led.polled([record("A")], led.poll_sent())
    led.confirmed("A")
    for _ in range(100):
        led.acknowledged(led.sent(10))
        led.polled([record("A")], led.poll_sent())  # back every time
    assert len(led._order) <= 5 and len(led._stale) <= 5

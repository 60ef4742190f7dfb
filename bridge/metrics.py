"""Prometheus metrics of the bridge, on a registry of their own so each test and each app gets a fresh set.

The metrics table in docs/operating.md, the alert rules and the Grafana dashboard in ``deploy/`` use exactly
these names; a test checks they agree. Label values are small fixed sets (never ids, domains or secrets).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector

from bridge import __version__
from bridge.leadership import LeadershipMetrics

__all__ = [
    "ACK_OUTCOMES",
    "INVALID_REASONS",
    "OPERATOR_DROP_REASONS",
    "PUBLISH_OUTCOMES",
    "UPSTREAM_OUTCOMES",
    "AccountMetrics",
    "Metrics",
]

PUBLISH_OUTCOMES = ("ack", "nack", "returned", "timeout", "closed")
UPSTREAM_OUTCOMES = ("ok", "throttled", "retryable_error", "malformed", "fatal_error")
ACK_OUTCOMES = ("confirmed", "not_confirmed", "unknown", "failed")
INVALID_REASONS = ("validation", "no_detail_no")
OPERATOR_DROP_REASONS = ("limit", "timeout", "malformed", "accept_error")
_ACTIONS = ("PollTaskResult", "AcknowledgeTaskResult")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the bridge exports. Build one per process (or per test) with its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_* (CPU, memory, open fds, start time: the alerts age a bridge that never polled from it) and
        # python_info, as every Prometheus client exports them; on this registry, since it is not the default one.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.info = Info("bridge", "task-bridge build information.", registry=r)
        self.info.info({"version": __version__})
        # bridge_leader{account} and bridge_leader_transitions_total{account, role}: one set, shared by the accounts.
        self.leadership = LeadershipMetrics(r)
        self.polls = Counter(
            "bridge_polls", "PollTaskResult pages requested, by outcome.", ["account", "outcome"], registry=r
        )
        self.upstream_requests = Counter(
            "bridge_upstream_requests",
            "Upstream API requests, by action and outcome.",
            ["account", "action", "outcome"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "bridge_upstream_request_duration_seconds",
            "Upstream API request latency, by action.",
            ["account", "action"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.details_received = Counter(
            "bridge_details_received", "Task details received from PollTaskResult.", ["account"], registry=r
        )
        self.events_published = Counter(
            "bridge_events_published",
            "Publishes to the broker, by outcome (ack, nack, returned, timeout, closed).",
            ["account", "outcome"],
            registry=r,
        )
        self.confirm_latency = Histogram(
            "bridge_publish_confirm_duration_seconds",
            "Time from publish to the broker's confirm.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.acknowledgements = Counter(
            "bridge_acknowledgements",
            "Task details sent to AcknowledgeTaskResult, by outcome.",
            ["account", "outcome"],
            registry=r,
        )
        self.invalid_records = Counter(
            "bridge_invalid_records",
            "Records that failed validation (published to the invalid route) or had no usable TaskDetailNo.",
            ["account", "reason"],
            registry=r,
        )
        self.details_returned_after_ack = Counter(
            "bridge_details_returned_after_ack",
            "Details a poll listed again after their acknowledgement had succeeded; acknowledged again, not "
            "published again.",
            ["account"],
            registry=r,
        )
        self.conflicting_details = Counter(
            "bridge_conflicting_details",
            "Second copies of a TaskDetailNo on one page with different content (the first copy is published).",
            ["account"],
            registry=r,
        )
        self.ack_results_unusable = Counter(
            "bridge_ack_results_unusable",
            "Successful AcknowledgeTaskResult calls whose Result was missing, negative or not a number.",
            ["account"],
            registry=r,
        )
        self.in_flight = Gauge("bridge_publishes_in_flight", "Publishes waiting for the broker's confirm.", registry=r)
        self.confirmed_unacknowledged = Gauge(
            "bridge_confirmed_unacknowledged",
            "Details whose event the broker confirmed and that are not yet acknowledged upstream.",
            ["account"],
            registry=r,
        )
        self.ack_batch_size = Gauge(
            "bridge_ack_batch_size",
            "Most ids sent in one AcknowledgeTaskResult call: BRIDGE_ACK_BATCH_SIZE, halved while the upstream "
            "refuses calls as too large.",
            ["account"],
            registry=r,
        )
        self.upstream_backlog = Gauge(
            "bridge_upstream_backlog",
            "Pending details reported by the upstream (TotalItemNum).",
            ["account"],
            registry=r,
        )
        self.last_successful_poll = Gauge(
            "bridge_last_successful_poll_timestamp_seconds",
            "Unix time of the last successful PollTaskResult.",
            ["account"],
            registry=r,
        )
        self.broker_connected = Gauge(
            "bridge_broker_connected", "1 while the broker connection is open, else 0.", registry=r
        )
        self.operator_connections_dropped = Counter(
            "bridge_operator_connections_dropped",
            "Connections the operator port closed early, by reason (limit, timeout, malformed, accept_error).",
            ["reason"],
            registry=r,
        )
        for reason in OPERATOR_DROP_REASONS:
            self.operator_connections_dropped.labels(reason)
        self.broker_blocked = Gauge(
            "bridge_broker_blocked",
            "1 while the broker blocks publishing on the connection (a memory or disk alarm), else 0.",
            registry=r,
        )
        self.account_failing = Gauge(
            "bridge_account_failing",
            "1 while the account's poller is parked after a fatal upstream error (a wrong secret, a missing "
            "permission; retried every BRIDGE_BACKOFF_MAX_SECONDS), else 0.",
            ["account"],
            registry=r,
        )

    def account(self, name: str) -> AccountMetrics:
        """The metrics of account ``name``, every series of it exported (at 0) from now on."""
        return AccountMetrics(self, name)

    def names(self) -> set[str]:
        """Every sample name this registry exports (``_total``, ``_bucket`` … included)."""
        return {s.name for metric in self.registry.collect() for s in metric.samples}


class _Labelled:
    """A labelled family with the account's label filled in: ``labels("ok")`` is ``family.labels(account, "ok")``."""

    __slots__ = ("_account", "_family")

    def __init__(self, family: Any, account: str) -> None:
        self._family = family
        self._account = account

    def labels(self, *values: str) -> Any:
        return self._family.labels(self._account, *values)


class AccountMetrics:
    """The metrics of one account: the process's families, labelled with the account's name.

    The attributes mirror :class:`Metrics`: a family with more labels than the account's is a :class:`_Labelled`
    (``polls.labels("ok")``), one with the account's label only is its child (``details_received.inc()``).
    """

    def __init__(self, metrics: Metrics, account: str) -> None:
        self.account = account
        self.polls = _Labelled(metrics.polls, account)
        self.upstream_requests = _Labelled(metrics.upstream_requests, account)
        self.upstream_latency = _Labelled(metrics.upstream_latency, account)
        self.events_published = _Labelled(metrics.events_published, account)
        self.acknowledgements = _Labelled(metrics.acknowledgements, account)
        self.invalid_records = _Labelled(metrics.invalid_records, account)
        self.details_received = metrics.details_received.labels(account)
        self.details_returned_after_ack = metrics.details_returned_after_ack.labels(account)
        self.conflicting_details = metrics.conflicting_details.labels(account)
        self.ack_results_unusable = metrics.ack_results_unusable.labels(account)
        self.confirmed_unacknowledged = metrics.confirmed_unacknowledged.labels(account)
        self.ack_batch_size = metrics.ack_batch_size.labels(account)
        self.upstream_backlog = metrics.upstream_backlog.labels(account)
        self.last_successful_poll = metrics.last_successful_poll.labels(account)
        self.failing = metrics.account_failing.labels(account)
        for outcome in PUBLISH_OUTCOMES:
            self.events_published.labels(outcome)
        for outcome in ACK_OUTCOMES:
            self.acknowledgements.labels(outcome)
        for reason in INVALID_REASONS:
            self.invalid_records.labels(reason)
        for action in _ACTIONS:
            self.upstream_latency.labels(action)
            for outcome in UPSTREAM_OUTCOMES:
                self.upstream_requests.labels(action, outcome)
        for outcome in ("ok", "error"):
            self.polls.labels(outcome)

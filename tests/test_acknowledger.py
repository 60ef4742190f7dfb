"""The acknowledger's reading of an upstream refusal: which failures mean "too many ids in one call"."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bridge.acknowledger import Acknowledger
from bridge.errors import FatalUpstreamError, RefusedParametersError, UpstreamError
from bridge.ledger import Ledger
from bridge.metrics import Metrics
from bridge.settings import load_settings
from bridge.upstream import ACKNOWLEDGE_ACTION
from tests.harness import sample


def refusal(kind: type[UpstreamError], status: int, code: str | None) -> UpstreamError:
    return kind("refused", action=ACKNOWLEDGE_ACTION, code=code, status_code=status)


def acknowledger(metrics: Metrics, batch_size: int = 500) -> Acknowledger:
    settings = load_settings(access_key_id="id", access_key_secret="secret", ack_batch_size=batch_size)
    ledger = Ledger(metrics.account("default"), ack_memory=settings.delivery.ack_memory, batch_size=batch_size)
    upstream = SimpleNamespace(settings=settings.upstream)  # its settings only: no call is made here
    return Acknowledger(upstream, settings.delivery, metrics.account("default"), ledger)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "InvalidParameter"), (400, "InvalidParameter.TaskDetailNo"), (413, None), (414, None)],
)
def test_a_call_refused_as_too_large_halves_the_batch(status: int, code: str | None) -> None:
    metrics = Metrics()
    acks = acknowledger(metrics)
    assert sample(metrics, "bridge_ack_batch_size") == 500
    refused = refusal(RefusedParametersError, status, code)

    assert acks._shrink_after_refusal(refused, 500)
    assert sample(metrics, "bridge_ack_batch_size") == 250
    # Calls of the old size that were already under way and fail as well do not halve it again.
    assert acks._shrink_after_refusal(refused, 500)
    assert sample(metrics, "bridge_ack_batch_size") == 250
    assert acks._shrink_after_refusal(refused, 250)
    assert sample(metrics, "bridge_ack_batch_size") == 125


@pytest.mark.parametrize(
    ("kind", "status", "code", "size"),
    [
        (FatalUpstreamError, 400, "SignatureDoesNotMatch", 500),
        (FatalUpstreamError, 400, "MissingParameter", 500),
        (FatalUpstreamError, 404, "InvalidAccessKeyId.NotFound", 500),
        (FatalUpstreamError, 403, "Forbidden.RAM", 500),
        (RefusedParametersError, 400, "InvalidParameter", 1),  # a single id refused: not a matter of size
    ],
)
def test_other_refusals_are_not_read_as_size(kind: type[UpstreamError], status: int, code: str, size: int) -> None:
    metrics = Metrics()
    acks = acknowledger(metrics)
    assert not acks._shrink_after_refusal(refusal(kind, status, code), size)
    assert sample(metrics, "bridge_ack_batch_size") == 500


@pytest.mark.parametrize("confirmed", [None, -1, "3", 2.5, True])
def test_an_unusable_result_is_logged_and_counted_never_raised(
    confirmed: object, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    acks = acknowledger(metrics)
    acks._count(3, SimpleNamespace(sent=3, confirmed=confirmed, request_id="req-1"))
    assert sample(metrics, "bridge_ack_results_unusable_total") == 1
    assert sample(metrics, "bridge_acknowledgements_total", outcome="confirmed") == 0
    (line,) = caplog.records
    assert line.levelname == "WARNING" and line.__dict__["request_id"] == "req-1"


def test_a_partial_result_is_counted_as_not_confirmed() -> None:
    metrics = Metrics()
    acknowledger(metrics)._count(5, SimpleNamespace(sent=5, confirmed=2, request_id=None))
    assert sample(metrics, "bridge_acknowledgements_total", outcome="confirmed") == 2
    assert sample(metrics, "bridge_acknowledgements_total", outcome="not_confirmed") == 3
    assert sample(metrics, "bridge_ack_results_unusable_total") == 0

"""The exception tree of task-bridge.

Every error the package raises derives from :class:`BridgeError`; errors of httpx and aio-pika are translated
at the boundary (``raise ... from exc``) so the run loop only ever sees this tree::

    BridgeError
    ├── SettingsError                 bad configuration, found at start; one line per problem
    ├── OperatorPortError             the operator port cannot be opened (address in use, not available)
    ├── UpstreamError                 a PollTaskResult / AcknowledgeTaskResult call failed
    │   ├── RetryableUpstreamError    throttling, 5xx, connection errors, timeouts: back off and retry
    │   │   ├── ThrottledError        Throttling*: carries the server's retry-after when it sent one
    │   │   └── MalformedResponseError  a 2xx answer that cannot be read (too large, not JSON, not the shape)
    │   └── FatalUpstreamError        signature, unknown access key, missing parameter, clock skew, TLS: stop
    │       └── RefusedParametersError  InvalidParameter*, HTTP 413/414: the request's parameters or size
    ├── BrokerError                   the RabbitMQ connection or topology failed
    │   ├── BrokerUnavailableError    cannot connect / connection lost: reconnect with backoff
    │   └── BrokerRefusedError        login, vhost or permission refused (ACCESS_REFUSED, NOT_ALLOWED, ...),
    │                                 or the broker's TLS certificate not trusted
    ├── DeadlineExceeded              run --once: the upstream or the broker stayed unavailable past the deadline
    ├── AccountFailedError            run --once with several accounts: one failed (its error is the cause)
    └── InternalError                 a bug: an unexpected exception inside a run, wrapped (its cause attached)

The run loop (the one place retry policy lives) retries :class:`RetryableUpstreamError` and
:class:`BrokerUnavailableError` with backoff, and :class:`BrokerRefusedError` too once a first connection
succeeded; anything else stops the process with one clear line. A run raises exactly one error of this tree,
never an exception group.
"""

from __future__ import annotations

__all__ = [
    "AccountFailedError",
    "BridgeError",
    "BrokerError",
    "BrokerRefusedError",
    "BrokerUnavailableError",
    "DeadlineExceeded",
    "FatalUpstreamError",
    "InternalError",
    "MalformedResponseError",
    "OperatorPortError",
    "RefusedParametersError",
    "RetryableUpstreamError",
    "SettingsError",
    "ThrottledError",
    "UpstreamError",
]


class BridgeError(Exception):
    """Root of every error task-bridge raises."""


class SettingsError(BridgeError):
    """The configuration is invalid. ``problems`` holds one line per setting, never a secret's value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class OperatorPortError(BridgeError):
    """The operator port (``BRIDGE_METRICS_HOST``:``BRIDGE_METRICS_PORT``) cannot be opened; fatal at start."""


class UpstreamError(BridgeError):
    """An upstream call failed. Carries the gateway's ``Code``, ``Message`` and ``RequestId`` when it sent them."""

    def __init__(
        self,
        message: str,
        *,
        action: str,
        code: str | None = None,
        request_id: str | None = None,
        status_code: int | None = None,
    ) -> None:
        self.action = action
        self.code = code
        self.request_id = request_id
        self.status_code = status_code
        self.upstream_message = message
        super().__init__(message)

    def __str__(self) -> str:
        parts = [f"{self.action} failed"]
        if self.status_code is not None:
            parts.append(f"HTTP {self.status_code}")
        if self.code:
            parts.append(f"Code={self.code}")
        if self.request_id:
            parts.append(f"RequestId={self.request_id}")
        # The gateway's message can span lines (SignatureDoesNotMatch appends the string to sign): keep one line.
        return f"{', '.join(parts)}: {' '.join(self.upstream_message.split())}"


class RetryableUpstreamError(UpstreamError):
    """A transient upstream failure; the same call may succeed later."""


class ThrottledError(RetryableUpstreamError):
    """The gateway throttled the call. ``retry_after_s`` is the server's hint, when it gave one."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kwargs: object) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class MalformedResponseError(RetryableUpstreamError):
    """A 2xx answer that cannot be read: over the size cap, not JSON, nested too deep, or not the documented shape.

    Retryable: the next answer may be whole. Never counts as an empty backlog.
    """


class FatalUpstreamError(UpstreamError):
    """A failure that retrying cannot fix.

    Wrong credentials, wrong signature, wrong clock, bad parameters, a TLS certificate the configured CAs reject.
    """


class RefusedParametersError(FatalUpstreamError):
    """The gateway refused the request's parameters or its size (``InvalidParameter*``, HTTP 413 or 414).

    Fatal for a request that cannot be made smaller; the acknowledger reads it, for a call of many ids, as the
    upstream's undocumented limit of ids per call and splits the call.
    """


class BrokerError(BridgeError):
    """A RabbitMQ failure other than a per-message publish outcome."""


class BrokerUnavailableError(BrokerError):
    """The broker cannot be reached or the connection was lost."""


class BrokerRefusedError(BrokerError):
    """The broker refused the login, the virtual host or a permission; the message carries the broker's reason.

    Also raised when the broker's TLS certificate cannot be verified: a configuration problem just the same.

    Fatal at start (the configuration is wrong); retried during a run, since permissions can come back.
    """


class DeadlineExceeded(BridgeError):
    """``run --once`` could not finish: the upstream or the broker stayed unavailable past the deadline."""


class AccountFailedError(BridgeError):
    """``run --once`` with several accounts: an account's drain failed while the others finished.

    The message names the account and its error, which is the ``__cause__``.
    """


class InternalError(BridgeError):
    """An unexpected exception inside a run (a bug); the original is its ``__cause__``."""

"""The gateway's error answers: :class:`ApiError` and the codes, HTTP statuses and messages the simulator sends.

Codes and messages follow what Alibaba Cloud's API gateway answers (see the reference notes); the body is
``{"RequestId", "HostId", "Code", "Message", "Recommend"}``.
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "incomplete_signature",
    "internal_error",
    "invalid_parameter",
    "missing_parameter",
    "service_unavailable",
    "throttling",
]


class ApiError(Exception):
    """An error answer: HTTP ``status``, gateway ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{status} {code}: {message}")


def missing_parameter(name: str) -> ApiError:
    return ApiError(400, "MissingParameter", f"{name} is mandatory for this action.")


def invalid_parameter(name: str, why: str) -> ApiError:
    return ApiError(400, "InvalidParameter", f"The specified parameter {name} is invalid: {why}.")


def incomplete_signature(why: str) -> ApiError:
    return ApiError(400, "IncompleteSignature", f"The request signature does not conform to Aliyun standards. {why}")


def throttling() -> ApiError:
    return ApiError(400, "Throttling", "Request was denied due to request throttling.")


def service_unavailable() -> ApiError:
    return ApiError(503, "ServiceUnavailable", "The request has failed due to a temporary failure of the server.")


def internal_error() -> ApiError:
    return ApiError(
        500, "InternalError", "The request processing has failed due to some unknown error, exception or failure."
    )

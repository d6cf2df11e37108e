"""The exception hierarchy of floydd and its HTTP mapping.

Every error a client can cause or observe is a `FloyddError` subclass with an
HTTP status and a stable machine-readable `code`; `api.error_middleware` turns
it into `{"error": code, "detail": message}`. Anything else is a bug and
becomes a 500 whose body carries no traceback.
"""

from __future__ import annotations

from typing import Any


class FloyddError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        # Extra JSON fields for the client, such as a job's state.
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


class InvalidRequest(FloyddError):
    status = 400
    code = "invalid_request"


class Unauthorized(FloyddError):
    """A request without a valid bearer token; sent with `WWW-Authenticate: Bearer`."""

    status = 401
    code = "unauthorized"


class Forbidden(FloyddError):
    status = 403
    code = "forbidden"


class RequestTimeout(FloyddError):
    status = 408
    code = "request_timeout"


class TooManyRequests(FloyddError):
    status = 429
    code = "too_many_requests"


class JobNotFound(FloyddError):
    status = 404
    code = "job_not_found"


class NotFound(FloyddError):
    status = 404
    code = "not_found"


class Conflict(FloyddError):
    status = 409
    code = "conflict"


class PayloadTooLarge(FloyddError):
    status = 413
    code = "payload_too_large"


class BadGateway(FloyddError):
    """The app could not be reached or broke off its response."""

    status = 502
    code = "bad_gateway"


class ServiceUnavailable(FloyddError):
    status = 503
    code = "service_unavailable"


class JobNotServing(ServiceUnavailable):
    code = "job_not_serving"


class QueueFull(ServiceUnavailable):
    code = "queue_full"


class QueueTimeout(ServiceUnavailable):
    code = "queue_timeout"


class GatewayTimeout(FloyddError):
    status = 504
    code = "gateway_timeout"


class HttpVersionNotSupported(FloyddError):
    status = 505
    code = "http_version_not_supported"


class RuntimeFailure(FloyddError):
    """The Docker engine failed or did not respond in time."""

    status = 503
    code = "docker_unavailable"

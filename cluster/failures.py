"""What a failed request tells its client, decided once for both doors (gRPC and OpenAI HTTP).

Only the request's own faults (InvalidRequest) are client errors. A remote error (RayTaskError,
which subclasses the remote exception's type) is always the server's, even when it wraps an
InvalidRequest. A server's fault reaches the client as its type only: the text (tracebacks, hosts,
addresses) stays in the replica's log.
"""

from __future__ import annotations

import dataclasses
import logging

import grpc
from ray.exceptions import RayError

from raymoe.model.errors import BackendUnavailable, InvalidRequest

from .engine_loop import QueueFull
from .quota import QuotaExceeded

log = logging.getLogger("ray.serve")

GRPC_KEY_HINT = "the metadata 'authorization: Bearer KEY'"
HTTP_KEY_HINT = "the header 'Authorization: Bearer KEY'"


class Unauthenticated(Exception):
    """No API key, or a wrong one; `how` says how the caller's door carries one."""

    def __init__(self, how: str) -> None:
        super().__init__(f"missing or wrong API key: send {how}")


class PermissionDenied(Exception):
    """A known key without the right (the Experts service needs an admin tenant)."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """One failure as each door reports it."""

    message: str
    grpc_code: grpc.StatusCode
    http_status: int
    http_type: str  # OpenAI's error "type"
    http_code: str | None = None  # OpenAI's error "code"
    field: str | None = None  # the request field at fault (InvalidRequest only)
    retry_after_s: int | None = None  # a quota's refusal: when a retry may pass (Retry-After)


def classify(error: BaseException) -> Failure:
    if isinstance(error, InvalidRequest) and not isinstance(error, RayError):
        return Failure(str(error), grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", field=error.field)
    if isinstance(error, QueueFull):
        return Failure(str(error), grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", "server_busy")
    if isinstance(error, QuotaExceeded):
        wait = int(error.retry_after_s)
        return Failure(f"{error}; retry after {wait} s", grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error",
                       "quota_exceeded", retry_after_s=wait)
    if isinstance(error, Unauthenticated):
        return Failure(str(error), grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error", "invalid_api_key")
    if isinstance(error, PermissionDenied):
        return Failure(str(error), grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error", "permission_denied")
    if isinstance(error, BackendUnavailable) and not isinstance(error, RayError):
        # names layers, experts and actors; no addresses
        return Failure(str(error), grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable", "experts_unavailable")
    log.error("request failed", exc_info=error)
    return Failure(f"internal error ({type(error).__name__}); see the replica's log", grpc.StatusCode.INTERNAL, 500,
                   "internal_error")

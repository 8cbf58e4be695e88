"""Errors a core raises; the server interceptor turns each into its gRPC status.

Cores stay plain Python: they raise these instead of touching a gRPC context,
and the message is what the client reads, so it should say what to do.
"""

from __future__ import annotations

import logging
import traceback

import grpc

log = logging.getLogger("aios.errors")


class AiosError(Exception):
    """Base class: an error with a gRPC status code and an actionable message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Seconds after which the same call may succeed; sent as `retry-after` trailing metadata.
        self.retry_after = retry_after


class InvalidArgument(AiosError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(AiosError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(AiosError):
    """No credential, or one that is unknown or revoked."""

    code = grpc.StatusCode.UNAUTHENTICATED


class AlreadyExists(AiosError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(AiosError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(AiosError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(AiosError):
    """The request is valid but the system is not in a state to serve it (e.g. incompatible snapshot)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(AiosError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AiosError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(AiosError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(AiosError):
    code = grpc.StatusCode.UNIMPLEMENTED


class ForwardedError(AiosError):
    """Another service's gRPC error, passed on with its own status code."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.code = code


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, float | None]:
    """The status a call answers for an exception that escaped it: (code, message, seconds until a retry may
    succeed). A core error says its own; anything else is a bug, logged, and INTERNAL."""
    if isinstance(exc, AiosError):
        return exc.code, exc.message, exc.retry_after
    log.error("unexpected error: %s", "".join(traceback.format_exception(exc)))
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); see the service log", None


def require(condition: bool, message: str) -> None:
    """Raises InvalidArgument(message) unless condition holds."""
    if not condition:
        raise InvalidArgument(message)

"""Domain exceptions and the one place they map to gRPC status codes.

Engines and services raise these; `StatusInterceptor` (privlm.grpcserver) turns them into statuses
with the exception's message, which must be something a caller can act on (name the field).
"""
from __future__ import annotations

import grpc


class PrivlmError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(PrivlmError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PrivlmError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(PrivlmError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(PrivlmError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(PrivlmError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(PrivlmError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(PrivlmError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(PrivlmError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised below a servicer."""
    if isinstance(exc, PrivlmError):
        return exc.code, str(exc)
    # Engine-level exceptions are torch-free and grpc-free; map them by type name here.
    from services.inference import types as t

    if isinstance(exc, t.InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, t.EngineOverloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "server overloaded, retry later"
    if isinstance(exc, t.EngineUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "worker group unavailable"
    return grpc.StatusCode.INTERNAL, "internal error (see server log)"

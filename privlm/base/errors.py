"""Domain exceptions and the one place they map to gRPC status codes.

Engines and services raise these; `StatusInterceptor` (privlm.base.grpcserver) turns them into statuses
with the exception's message, which must be something a caller can act on (name the field). A
message quotes a client's string only through `echo` (a short escaped prefix), and an error a
backend returned reaches the public API only through `upstream_failure` (no backend internals).
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


ECHO_CHARS = 32


def echo(value: str, limit: int = ECHO_CHARS) -> str:
    """A client-supplied string as a message or log line may quote it: the repr of its first `limit`
    characters, so an unbounded field never swells a status trailer (16 KiB limit) or a log."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


# What a caller can do about a backend failure, by status; any other code is the operator's problem
# (credentials, configuration between the gateway and the backend) and reads as UNAVAILABLE.
_UPSTREAM = {
    grpc.StatusCode.UNAVAILABLE: (Unavailable, "is unavailable; retry later"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (ResourceExhausted, "is at capacity; retry later"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (DeadlineExceeded, "did not answer within the deadline; retry with a "
                                                          "longer deadline or fewer sampling.max_new_tokens"),
    grpc.StatusCode.INVALID_ARGUMENT: (InvalidArgument, "refused the request; check the prompt length and "
                                                        "sampling parameters"),
}


def upstream_failure(exc: PrivlmError, backend: str, ref: str) -> PrivlmError:
    """The public form of an error a backend returned: same class of status, a message naming what
    failed and what the caller can do, and `ref` (the trace id) so an operator finds the details,
    which the caller must log: the backend's own message may hold addresses or stack frames."""
    cls, advice = _UPSTREAM.get(exc.code, (Unavailable, "failed; retry later"))
    return cls(f"{backend} {advice} (trace {ref})")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised below a servicer; anything outside the family is
    INTERNAL with no detail (the detail goes to the server log)."""
    if isinstance(exc, PrivlmError):
        return exc.code, str(exc) or _DEFAULT_MESSAGE.get(exc.code, "internal error (see server log)")
    return grpc.StatusCode.INTERNAL, "internal error (see server log)"


_DEFAULT_MESSAGE = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "server overloaded, retry later",
    grpc.StatusCode.UNAVAILABLE: "worker group unavailable",
}

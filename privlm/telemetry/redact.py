"""Last line of defence before spans leave the process: exception text never leaves.

Business code never puts prompt text, completions, features or keys in attributes (see
instruments.py for the attribute vocabulary). Exceptions are the leak nobody plans: the gRPC
instrumentation records every escaping exception as a span event with its message and traceback,
and a message can quote input (`KeyError(<user text>)`). This exporter keeps the exception type and
the code locations, and drops the message text.
"""
from __future__ import annotations

from typing import Sequence

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Status

REDACTED = "[redacted]"
_MAX_STATUS = 200


def scrub_traceback(text: str) -> str:
    """Keep the 'Traceback' header, 'File ...' frames and their source lines; drop message lines."""
    kept = [line for line in text.splitlines()
            if line.startswith(("Traceback", "  File ", "    "))]
    return "\n".join(kept)


def _scrub_event(event: Event) -> Event:
    if event.name != "exception" or not event.attributes:
        return event
    attrs = dict(event.attributes)
    if "exception.message" in attrs:
        attrs["exception.message"] = REDACTED
    if "exception.stacktrace" in attrs:
        attrs["exception.stacktrace"] = scrub_traceback(str(attrs["exception.stacktrace"]))
    return Event(event.name, attrs, event.timestamp)


def _scrub_status(status: Status) -> Status:
    desc = status.description
    if not desc:
        return status
    # The gRPC client instrumentation writes f"{type(exc).__name__}: {exc}"; str(AioRpcError) dumps
    # the whole call (including debug_error_string). Keep the first line, bounded.
    first = desc.splitlines()[0][:_MAX_STATUS]
    return Status(status.status_code, first)


def scrub(span: ReadableSpan) -> ReadableSpan:
    """A copy of `span` with exception messages removed (no copy when there is nothing to remove)."""
    events = span.events
    touched = any(e.name == "exception" for e in events) or bool(span.status.description)
    if not touched:
        return span
    return ReadableSpan(
        name=span.name, context=span.context, parent=span.parent, resource=span.resource,
        attributes=span.attributes, events=[_scrub_event(e) for e in events], links=span.links,
        kind=span.kind, status=_scrub_status(span.status), start_time=span.start_time,
        end_time=span.end_time, instrumentation_scope=span.instrumentation_scope)


class RedactingSpanExporter(SpanExporter):
    """Wraps another exporter; every span passes through scrub() first."""

    def __init__(self, inner: SpanExporter):
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([scrub(s) for s in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)

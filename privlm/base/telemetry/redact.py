"""Last line of defence before spans leave the process: exception text never leaves.

Business code never puts prompt text, completions, features or keys in attributes (see
instruments.py for the attribute vocabulary). Exceptions are the leak nobody plans: the gRPC
instrumentation records every escaping exception as a span event with its message and traceback,
and a message can quote input (`KeyError(<user text>)`). This exporter keeps the exception type and
the code locations, and drops the message text.
"""
from __future__ import annotations

import re
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


_RPC_DETAILS = re.compile(r'status = (StatusCode\.\w+).*?details = "([^"]*)"', re.S)
_EXC_PREFIX = re.compile(r"([A-Za-z_][\w.]*): ")


def _scrub_status(status: Status, is_rpc: bool) -> Status:
    """Status descriptions written from exceptions (f"{type}: {message}") keep the type only.

    On RPC spans the description is the gRPC status details, which privlm servers write for the
    caller (they name a field, never quote its value): kept, first line, bounded. The aio client
    instrumentation writes str(AioRpcError), a multi-line dump: reduced to its code and details.
    """
    desc = status.description
    if not desc:
        return status
    if is_rpc:
        m = _RPC_DETAILS.search(desc)
        text = f"{m.group(1)}: {m.group(2)}" if m else desc.splitlines()[0]
    else:
        m = _EXC_PREFIX.match(desc)
        text = m.group(1) if m else desc.splitlines()[0]
    return Status(status.status_code, text[:_MAX_STATUS])


def scrub(span: ReadableSpan) -> ReadableSpan:
    """A copy of `span` with exception messages removed (no copy when there is nothing to remove)."""
    events = span.events
    touched = any(e.name == "exception" for e in events) or bool(span.status.description)
    if not touched:
        return span
    return ReadableSpan(
        name=span.name, context=span.context, parent=span.parent, resource=span.resource,
        attributes=span.attributes, events=[_scrub_event(e) for e in events], links=span.links,
        kind=span.kind, status=_scrub_status(span.status, "rpc.system" in (span.attributes or {})), start_time=span.start_time,
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


class RedactingLogFilter:
    """Handler filter: tracebacks in log records keep their frames, lose exception messages.

    A `log.exception(...)` for an unexpected error prints "KeyError: <the value>", and that value can
    be user input. Install on every handler (install_log_redaction) after logging is configured.
    """

    def filter(self, record) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            import traceback

            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = scrub_traceback(text) + f"\n{record.exc_info[0].__name__}: {REDACTED}"
            record.exc_info = None
        return True


def install_log_redaction(logger=None) -> RedactingLogFilter:
    """Add the filter to every handler of `logger` (default: the root logger)."""
    import logging

    target = logger or logging.getLogger()
    filt = RedactingLogFilter()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingLogFilter) for f in handler.filters):
            handler.addFilter(filt)
    return filt

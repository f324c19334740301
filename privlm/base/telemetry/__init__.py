"""privlm observability: OpenTelemetry tracing and metrics, an embedded OTLP receiver, reports.

Nothing here configures anything at import time: entrypoints call setup_telemetry(config) once.
Names are imported lazily, so that `from privlm.base.telemetry import instruments` (the engine's
meters) needs only opentelemetry-api, not the gRPC instrumentation.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TelemetryConfig": "privlm.base.telemetry.config",
    "client_interceptors": "privlm.base.telemetry.interceptors",
    "server_interceptors": "privlm.base.telemetry.interceptors",
    "Telemetry": "privlm.base.telemetry.setup",
    "init_service": "privlm.base.telemetry.setup",
    "setup_telemetry": "privlm.base.telemetry.setup",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'privlm.base.telemetry' has no attribute {name!r}")

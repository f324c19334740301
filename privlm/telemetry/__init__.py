"""privlm observability: OpenTelemetry tracing and metrics, an embedded OTLP receiver, reports.

Nothing here configures anything at import time: entrypoints call setup_telemetry(config) once.
"""
from privlm.telemetry.config import TelemetryConfig
from privlm.telemetry.interceptors import client_interceptors, server_interceptors
from privlm.telemetry.setup import Telemetry, init_service, setup_telemetry

__all__ = ["Telemetry", "TelemetryConfig", "init_service", "setup_telemetry", "server_interceptors", "client_interceptors"]

"""Telemetry configuration: one frozen dataclass per process, passed to setup_telemetry()."""
from __future__ import annotations

from dataclasses import dataclass

from privlm.config import check


@dataclass(frozen=True)
class TelemetryConfig:
    """Where traces and metrics go for one process.

    otlp_endpoint: "host:port" of an OTLP/gRPC collector (Jaeger listens on 4317); None disables span
    export (spans are still created, so trace context keeps propagating to the next hop).
    metrics_port: Prometheus scrape port (0 picks a free one, None disables the endpoint).
    span_store: JSONL file the embedded receiver (privlm.telemetry.receiver) appends to; only used by
    the process that runs the receiver (`privlm up` when no otlp_endpoint is configured).
    """
    service_name: str
    otlp_endpoint: str | None = None
    otlp_insecure: bool = True             # plaintext gRPC to the collector (loopback/in-cluster)
    otlp_timeout_s: float = 10.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    span_store: str | None = None
    sampling_ratio: float = 1.0            # head sampling of new traces; parents' decisions win
    export_batch_size: int = 512
    export_delay_ms: int = 1000            # BatchSpanProcessor schedule delay

    def __post_init__(self):
        check(bool(self.service_name) and self.service_name.strip() == self.service_name,
              f"service_name must be a non-empty name without surrounding spaces, got {self.service_name!r}")
        if self.otlp_endpoint is not None:
            host, sep, port = self.otlp_endpoint.rpartition(":")
            check(bool(sep) and bool(host) and port.isdigit() and 0 < int(port) < 65536,
                  f"otlp_endpoint must be 'host:port', got {self.otlp_endpoint!r}")
        check(self.otlp_timeout_s > 0, "otlp_timeout_s must be > 0")
        check(self.metrics_port is None or 0 <= self.metrics_port < 65536,
              f"metrics_port must be in [0, 65535] or None, got {self.metrics_port}")
        check(0.0 <= self.sampling_ratio <= 1.0, f"sampling_ratio must be in [0, 1], got {self.sampling_ratio}")
        check(self.export_batch_size >= 1, "export_batch_size must be >= 1")
        check(self.export_delay_ms >= 1, "export_delay_ms must be >= 1")

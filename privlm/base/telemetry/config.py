"""Telemetry configuration: one frozen dataclass per process, passed to setup_telemetry()."""
from __future__ import annotations

from dataclasses import dataclass

from privlm.base.config import check


@dataclass(frozen=True)
class TelemetryConfig:
    """Where traces and metrics go for one process.

    otlp_endpoint: "host:port" of an OTLP/gRPC collector (Jaeger listens on 4317); None disables span
    export (spans are still created, so trace context keeps propagating to the next hop).
    metrics_port: Prometheus scrape port (0 picks a free one, None disables the endpoint).
    span_store: JSONL file the embedded receiver (privlm.base.telemetry.receiver) appends to; only used by
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


def add_arguments(parser) -> None:
    """The telemetry flags every service entrypoint accepts (argparse)."""
    g = parser.add_argument_group("telemetry")
    g.add_argument("--otlp-endpoint", default=None,
                   help="OTLP/gRPC collector host:port for traces (Jaeger: 4317); unset: spans are not exported")
    g.add_argument("--otlp-tls", action="store_true", help="use TLS to the collector (default: plaintext)")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (0: pick a free one; unset: off)")
    g.add_argument("--metrics-host", default="127.0.0.1")
    g.add_argument("--trace-sampling", type=float, default=1.0, help="fraction of new traces sampled")


def from_args(args, service_name: str) -> TelemetryConfig:
    """TelemetryConfig from the flags added by add_arguments()."""
    return TelemetryConfig(service_name=service_name, otlp_endpoint=args.otlp_endpoint,
                           otlp_insecure=not args.otlp_tls, metrics_host=args.metrics_host,
                           metrics_port=args.metrics_port, sampling_ratio=args.trace_sampling)

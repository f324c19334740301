"""Process-wide telemetry: called once in each entrypoint, never at import time.

setup_telemetry() builds a TracerProvider (BatchSpanProcessor -> OTLP/gRPC when an endpoint is
configured) and a MeterProvider read by a Prometheus collector served over HTTP on metrics_port.
With set_global=True (the default, what entrypoints want) they become the OpenTelemetry globals, so
instrumentation that asks the API for a tracer or meter (the gRPC interceptors, instruments.get())
uses them. Tests that build several in one process pass set_global=False and hand the providers on.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Sequence

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from privlm.base.telemetry.config import TelemetryConfig
from privlm.base.telemetry.redact import RedactingSpanExporter

log = logging.getLogger("privlm.base.telemetry")


@dataclass
class Telemetry:
    """What setup_telemetry() built; shutdown() flushes spans and stops the scrape endpoint."""
    config: TelemetryConfig
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    metrics_port: int | None = None
    _http_server: object | None = None
    _http_thread: threading.Thread | None = None
    _registry: object | None = None
    _closed: bool = field(default=False)

    def tracer(self, name: str = "privlm") -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def force_flush(self, timeout_ms: int = 10_000) -> bool:
        return self.tracer_provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Flush pending spans, stop exporters and the metrics endpoint. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.tracer_provider.force_flush(int(self.config.otlp_timeout_s * 1000))
        finally:
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown()
            if self._http_server is not None:
                self._http_server.shutdown()
                self._http_server.server_close()


def _span_exporter(config: TelemetryConfig) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure,
                            timeout=config.otlp_timeout_s)


def setup_telemetry(config: TelemetryConfig, *, set_global: bool = True,
                    extra_exporters: Sequence[SpanExporter] = ()) -> Telemetry:
    """Build and (by default) install this process's tracer and meter providers.

    extra_exporters: more span exporters (each wrapped in the redacting exporter and its own batch
    processor), e.g. an InMemorySpanExporter in tests.
    """
    resource = Resource.create({"service.name": config.service_name})
    sampler = ParentBased(TraceIdRatioBased(config.sampling_ratio))
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    exporters = list(extra_exporters)
    if config.otlp_endpoint:
        exporters.append(_span_exporter(config))
    for exporter in exporters:
        tracer_provider.add_span_processor(BatchSpanProcessor(
            RedactingSpanExporter(exporter), max_export_batch_size=config.export_batch_size,
            schedule_delay_millis=config.export_delay_ms))

    readers = []
    registry = http_server = http_thread = None
    port = None
    if config.metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        readers.append(PrometheusMetricReader(registry=registry))
        http_server, http_thread = start_http_server(config.metrics_port, addr=config.metrics_host,
                                                     registry=registry)
        port = http_server.server_port
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)

    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    log.info("telemetry for %s: spans -> %s, metrics on %s", config.service_name,
             config.otlp_endpoint or "not exported", f"{config.metrics_host}:{port}" if port else "off")
    return Telemetry(config, tracer_provider, meter_provider, port, http_server, http_thread, registry)


def init_service(config: TelemetryConfig, *, utilization=None) -> Telemetry:
    """What a service entrypoint calls once, after logging is configured.

    Installs the global providers (setup_telemetry), the traceback redaction on every root log
    handler, and a utilisation source for privlm_accelerator_utilization (default: this process's
    CPU share; a GPU worker passes GpuUtilization(device_index)).
    """
    from privlm.base.telemetry import instruments
    from privlm.base.telemetry.redact import install_log_redaction

    telemetry = setup_telemetry(config)
    install_log_redaction()
    instruments.get().observe_utilization(utilization or instruments.CpuUtilization())
    return telemetry

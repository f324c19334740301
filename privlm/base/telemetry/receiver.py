"""Embedded OTLP/gRPC trace receiver: the endpoint `privlm up` runs when no collector is configured.

It speaks the collector's real wire protocol (opentelemetry-proto TraceService/Export, the same one
Jaeger ingests on 4317), so services export exactly as they would in production, and it appends each
received span as one JSON line to a local store that `privlm trace-report` reads.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import threading
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from privlm.base.grpcserver import SERVING, add_health_and_reflection, bind, new_server
from privlm.base.telemetry.spanstore import records_from_otlp

log = logging.getLogger("privlm.base.telemetry.receiver")
SERVICE_NAME = "opentelemetry.proto.collector.trace.v1.TraceService"


def default_store_path() -> Path:
    """Where `privlm up`'s embedded receiver keeps spans (git-ignored cache)."""
    from privlm.base.config import cache_dir

    return cache_dir() / "traces" / "spans.jsonl"


def receiver_argv(store: str | Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line that runs the receiver as its own process (for `privlm up`)."""
    import sys

    return [sys.executable, "-m", "privlm.base.telemetry.receiver", "--store", str(store), "--host", host,
            "--port", str(port)]


class SpanStore:
    """Append-only JSONL file; one writer (this process), flushed after each export batch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self.count = 0

    def append(self, records) -> int:
        lines = [json.dumps(r, separators=(",", ":")) + "\n" for r in records]
        with self._lock:
            self._file.writelines(lines)
            self._file.flush()
            self.count += len(lines)
        return len(lines)

    def close(self) -> None:
        with self._lock:
            self._file.close()


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: SpanStore):
        self.store = store

    async def Export(self, request, context):
        n = self.store.append(records_from_otlp(request))
        log.debug("stored %d spans", n)
        return trace_service_pb2.ExportTraceServiceResponse()


async def create_receiver(store_path: str | Path, host: str = "127.0.0.1", port: int = 0,
                          max_message_bytes: int = 64 * 1024 * 1024) -> tuple[grpc.aio.Server, int]:
    """A started OTLP/gRPC receiver writing to store_path; returns (server, bound port)."""
    store = SpanStore(store_path)
    server = new_server(max_message_bytes=max_message_bytes)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceReceiver(store), server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    bound = bind(server, host, port)
    await server.start()
    await health.set("", SERVING)
    await health.set(SERVICE_NAME, SERVING)
    server.privlm_span_store = store  # for callers that want the count; closed by main() on exit
    return server, bound


async def _serve(args) -> None:
    server, port = await create_receiver(args.store, args.host, args.port)
    print(json.dumps({"service": "otlp-receiver", "host": args.host, "port": port, "store": str(args.store)}),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=2.0)
    server.privlm_span_store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privlm otlp-receiver",
                                     description="Embedded OTLP/gRPC trace receiver writing spans to a JSONL store.")
    parser.add_argument("--store", default=None, help="JSONL file to append spans to (default: .cache/traces/spans.jsonl)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317, help="0 picks a free port (printed on stdout)")
    args = parser.parse_args(argv)
    args.store = args.store or str(default_store_path())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

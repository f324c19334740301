"""A two-hop test service shaped like gateway -> worker, instrumented with privlm.base.telemetry.

Not a stand-in for the real servers' behaviour: it exists so the telemetry library is tested across
a real gRPC client/server boundary (and a real process boundary, via `python obs_chain.py worker`)
before and independently of gateway/ and services/inference/.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from privlm.base.grpcserver import SERVING, add_health_and_reflection, bind, new_server  # noqa: E402
from privlm.base.telemetry import client_interceptors, server_interceptors  # noqa: E402
from privlm.base.telemetry.instruments import Instruments  # noqa: E402
from privlm.base.telemetry.spans import GenerationSpan, RequestTimeline  # noqa: E402
from privlm.internal.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402
from privlm.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402

log = logging.getLogger("privlm.test.chain")
_REASON = {worker_pb2.WORKER_FINISH_REASON_LENGTH: ("length", inference_pb2.FINISH_REASON_LENGTH)}


class TestWorker(worker_pb2_grpc.WorkerServicer):
    """Streams max_new_tokens token ids, one per `step_s`, stamping a RequestTimeline like an engine."""

    def __init__(self, tracer, instruments: Instruments, step_s: float = 0.002, queue_s: float = 0.001):
        self.tracer, self.instruments, self.step_s, self.queue_s = tracer, instruments, step_s, queue_s

    async def Generate(self, request, context):
        from opentelemetry import context as otel_context

        parent = otel_context.get_current()
        tl = RequestTimeline(prompt_tokens=len(request.prompt_token_ids))
        await asyncio.sleep(self.queue_s)
        tl.admitted()
        n = request.sampling.max_new_tokens
        for i in range(n):
            await asyncio.sleep(self.step_s)
            self.instruments.record_step(1, self.step_s)
            tl.token(1)
            last = i == n - 1
            msg = worker_pb2.WorkerGenerateResponse(token_ids=[100 + i])
            if last:
                tl.finished("length")
                msg.finish_reason = worker_pb2.WORKER_FINISH_REASON_LENGTH
                msg.prompt_tokens = tl.prompt_tokens
            yield msg
        tl.emit_spans(self.tracer, parent, model="test-model", instruments=self.instruments)


class TestGateway(inference_pb2_grpc.InferenceServicer):
    """Tokenizes by characters (ids only cross to the worker), streams 'tokN ' chunks back."""

    def __init__(self, worker_address: str, tracer, instruments: Instruments, tracer_provider=None):
        self.tracer, self.instruments = tracer, instruments
        self.channel = grpc.aio.insecure_channel(worker_address,
                                                 interceptors=client_interceptors(tracer_provider))
        self.worker = worker_pb2_grpc.WorkerStub(self.channel)

    async def GenerateStream(self, request, context):
        text = request.prompt or "".join(m.content for m in request.chat.messages)
        with self.tracer.start_as_current_span("privlm.tokenize"):  # records escaping exceptions
            if request.prompt.startswith("FAIL:"):
                # An unexpected bug whose message quotes the input: the redacting exporter must drop it.
                raise KeyError(request.prompt)
        ids = [ord(c) % 1000 for c in text]
        max_new = request.sampling.max_new_tokens or 4
        log.info("generate request_id=%s prompt_tokens=%d", request.request_id, len(ids))
        with GenerationSpan(self.tracer, model="test-model", request_id=request.request_id,
                            instruments=self.instruments, max_tokens=max_new) as g:
            wreq = worker_pb2.WorkerGenerateRequest(request_id=request.request_id, prompt_token_ids=ids,
                                                    sampling=worker_pb2.WorkerSampling(max_new_tokens=max_new))
            async for msg in self.worker.Generate(wreq):
                g.tokens(len(msg.token_ids))
                out = inference_pb2.GenerateStreamResponse(
                    text="".join(f"tok{t} " for t in msg.token_ids), token_ids=list(msg.token_ids),
                    request_id=request.request_id)
                if msg.finish_reason:
                    reason, code = _REASON[msg.finish_reason]
                    g.finish(reason, prompt_tokens=msg.prompt_tokens)
                    out.finish_reason = code
                    out.usage.prompt_tokens = msg.prompt_tokens
                yield out


async def start_worker(tracer_provider, instruments, step_s=0.002):
    server = new_server(server_interceptors(tracer_provider, instruments))
    worker_pb2_grpc.add_WorkerServicer_to_server(
        TestWorker(tracer_provider.get_tracer("test.worker"), instruments, step_s), server)
    health = add_health_and_reflection(server, ["privlm.internal.v1.Worker"])
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    await health.set("", SERVING)
    return server, port


async def start_gateway(worker_address, tracer_provider, instruments):
    server = new_server(server_interceptors(tracer_provider, instruments))
    servicer = TestGateway(worker_address, tracer_provider.get_tracer("test.gateway"), instruments,
                           tracer_provider)
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, ["privlm.v1.Inference"])
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    await health.set("", SERVING)
    return server, port


async def _worker_process(otlp_endpoint: str) -> None:
    """Run the worker hop in this process with global telemetry; print its port; stop on stdin EOF."""
    from privlm.base.telemetry import TelemetryConfig, setup_telemetry

    tel = setup_telemetry(TelemetryConfig(service_name="privlm-test-worker", otlp_endpoint=otlp_endpoint,
                                          export_delay_ms=50))
    server, port = await start_worker(tel.tracer_provider, Instruments(tel.meter_provider))
    print(json.dumps({"port": port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(1.0)
    tel.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        logging.basicConfig(level=logging.INFO)
        asyncio.run(_worker_process(sys.argv[2]))

"""The metrics and attribute vocabulary the services share (OpenTelemetry GenAI + RPC conventions).

Everything here is cheap on the hot path: the decode loop calls `Instruments.record_step` once per
step (one histogram record, one counter add), and per-request timing (`RequestTimeline`) is a few
integer timestamps, turned into spans and histogram records only when the request finishes.
Attribute values are ids, counts, enums and model names: never prompt text, completions, features,
keys or ciphertext.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

# OpenTelemetry GenAI semantic-convention attribute names.
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"          # "chat" or "text_completion"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"                    # "input" or "output"
# RPC conventions (the gRPC instrumentation sets these on RPC spans; metrics reuse them).
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
# privlm's own.
PRIVLM_REQUEST_ID = "privlm.request_id"
PRIVLM_TENANT = "privlm.tenant"
PRIVLM_OUTCOME = "privlm.outcome"                          # "ok", "client_error", "server_error"
PRIVLM_TTFT_MS = "privlm.time_to_first_token_ms"
PRIVLM_TPOT_MS = "privlm.time_per_output_token_ms"
PRIVLM_HE_OP = "privlm.he.operation"

# Span and event names (trace-report keys on these).
SPAN_QUEUE = "privlm.queue"
SPAN_PREFILL = "privlm.prefill"
SPAN_DECODE = "privlm.decode"
EVENT_FIRST_TOKEN = "gen_ai.first_token"

# gRPC codes a caller caused (4xx-style); everything else but OK counts as a server error (5xx-style).
CLIENT_ERROR_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
                                "UNAUTHENTICATED", "FAILED_PRECONDITION", "OUT_OF_RANGE", "CANCELLED",
                                "RESOURCE_EXHAUSTED"})

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                     1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                           0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


MOE_IMBALANCE = {"expert_max_over_mean": "expert", "rank_max_over_mean": "rank"}


def outcome(code_name: str) -> str:
    if code_name == "OK":
        return "ok"
    return "client_error" if code_name in CLIENT_ERROR_CODES else "server_error"


class Instruments:
    """All of privlm's metric instruments on one meter. Create once per process (see get())."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None):
        provider = meter_provider or metrics.get_meter_provider()
        m = provider.get_meter("privlm")
        self.requests = m.create_counter(
            "privlm.requests", unit="{request}", description="RPCs handled, by method and gRPC status code")
        self.rpc_duration = m.create_histogram(
            "privlm.rpc.server.duration", unit="s", description="Server-side RPC latency",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.request_duration = m.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="End-to-end generation latency",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.ttft = m.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", description="Time to first output token",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.tpot = m.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Decode time per output token after the first",
            explicit_bucket_boundaries_advisory=TOKEN_LATENCY_BUCKETS_S)
        self.queue_wait = m.create_histogram(
            "privlm.queue.wait", unit="s", description="Time from submission to admission into a batch",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.tokens = m.create_counter(
            "privlm.tokens", unit="{token}", description="Tokens processed, by gen_ai.token.type (rate = tokens/s)")
        self.step_duration = m.create_histogram(
            "privlm.engine.step.duration", unit="s", description="One scheduler step (prefill chunk or decode)",
            explicit_bucket_boundaries_advisory=TOKEN_LATENCY_BUCKETS_S)
        self.batch_size = m.create_histogram(
            "privlm.engine.batch.size", unit="{request}", description="Running sequences per step",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS)
        self.he_op = m.create_histogram(
            "privlm.he.operation.duration", unit="s", description="Homomorphic-encryption operation latency",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self._lock = threading.Lock()
        self._kv_sources: list[Callable[[], tuple[int, int]]] = []
        self._util_sources: list[Callable[[], float | None]] = []
        self._canary: dict[str, float] = {}
        m.create_observable_gauge("privlm.kv_cache.usage", [self._observe_kv], unit="1",
                                  description="Fraction of KV-cache blocks in use")
        m.create_observable_gauge("privlm.kv_cache.blocks.used", [self._observe_kv_used], unit="{block}",
                                  description="KV-cache blocks in use")
        m.create_observable_gauge("privlm.accelerator.utilization", [self._observe_util], unit="1",
                                  description="Accelerator (or CPU) busy fraction since the last scrape")
        m.create_observable_gauge("privlm.canary.perplexity", [self._observe_canary("current")], unit="1",
                                  description="Perplexity of the fixed canary text, last measurement")
        m.create_observable_gauge("privlm.canary.perplexity.baseline", [self._observe_canary("baseline")],
                                  unit="1", description="Canary perplexity of the known-good weights")
        self._extra_sources: list[Callable[[], dict[str, float]]] = []
        m.create_observable_gauge("privlm.moe.imbalance", [self._observe_extra(MOE_IMBALANCE)], unit="1",
                                  description="MoE load imbalance since load, max/mean tokens per expert or "
                                              "per expert-parallel rank (1 = balanced)")
        m.create_observable_gauge("privlm.moe.tokens_routed", [self._observe_extra({"tokens_routed": None})],
                                  unit="{token}", description="(token, expert) assignments routed since load")
        m.create_observable_gauge("privlm.fp8.tensor_core_fraction",
                                  [self._observe_extra({"fp8_tensor_core_fraction": None})], unit="1",
                                  description="Share of FP8 linears running FP8 tensor-core matmuls (keep_fp8)")
        self._step_attrs = None   # no attributes: the cheapest record (~5 us each with the SDK)

    # -- request-level -------------------------------------------------------------------------------
    def record_rpc(self, method: str, code_name: str, seconds: float) -> None:
        attrs = {RPC_METHOD: method, RPC_GRPC_STATUS_CODE: code_name, PRIVLM_OUTCOME: outcome(code_name)}
        self.requests.add(1, attrs)
        self.rpc_duration.record(seconds, {RPC_METHOD: method, RPC_GRPC_STATUS_CODE: code_name})

    def record_generation(self, *, model: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                          duration_s: float, ttft_s: float | None = None, tpot_s: float | None = None,
                          operation: str = "chat") -> None:
        base = {GEN_AI_REQUEST_MODEL: model, GEN_AI_OPERATION_NAME: operation}
        self.request_duration.record(duration_s, {**base, GEN_AI_RESPONSE_FINISH_REASONS: finish_reason})
        if ttft_s is not None:
            self.ttft.record(ttft_s, base)
        if tpot_s is not None:
            self.tpot.record(tpot_s, base)
        self.tokens.add(prompt_tokens, {**base, GEN_AI_TOKEN_TYPE: "input"})
        self.tokens.add(completion_tokens, {**base, GEN_AI_TOKEN_TYPE: "output"})

    def record_queue_wait(self, seconds: float, model: str = "") -> None:
        self.queue_wait.record(seconds, {GEN_AI_REQUEST_MODEL: model} if model else None)

    def record_he_op(self, op: str, seconds: float) -> None:
        self.he_op.record(seconds, {PRIVLM_HE_OP: op})

    # -- hot path: once per engine step ------------------------------------------------------------------
    def record_step(self, batch_size: int, seconds: float) -> None:
        self.batch_size.record(batch_size, self._step_attrs)
        self.step_duration.record(seconds, self._step_attrs)

    # -- observed on scrape ------------------------------------------------------------------------------
    def observe_kv_cache(self, source: Callable[[], tuple[int, int]]) -> None:
        """Register a callable returning (used_blocks, total_blocks); called at scrape time."""
        with self._lock:
            self._kv_sources.append(source)

    def observe_utilization(self, source: Callable[[], float | None]) -> None:
        """Register a callable returning the busy fraction in [0, 1] (None: unknown this time)."""
        with self._lock:
            self._util_sources.append(source)

    def observe_engine_extra(self, source: Callable[[], dict[str, float]]) -> None:
        """Register a callable returning EngineStats.extra; the MoE / FP8 keys become gauges."""
        with self._lock:
            self._extra_sources.append(source)

    def _observe_extra(self, keys: dict[str, str | None]):
        """keys: EngineStats.extra key -> value of the `privlm.moe.scope` attribute (None: no attribute)."""
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for i, source in enumerate(list(self._extra_sources)):
                extra = source()
                for key, scope in keys.items():
                    if key in extra:
                        attrs = {"privlm.engine": str(i)}
                        if scope is not None:
                            attrs["privlm.moe.scope"] = scope
                        yield Observation(float(extra[key]), attrs)
        return callback

    def set_canary(self, perplexity: float, baseline: float | None) -> None:
        with self._lock:
            self._canary["current"] = float(perplexity)
            if baseline is not None:
                self._canary["baseline"] = float(baseline)

    def _observe_kv(self, options: CallbackOptions) -> Iterable[Observation]:
        for i, source in enumerate(list(self._kv_sources)):
            used, total = source()
            if total > 0:
                yield Observation(used / total, {"privlm.kv_cache.pool": str(i)})

    def _observe_kv_used(self, options: CallbackOptions) -> Iterable[Observation]:
        for i, source in enumerate(list(self._kv_sources)):
            used, _ = source()
            yield Observation(used, {"privlm.kv_cache.pool": str(i)})

    def _observe_util(self, options: CallbackOptions) -> Iterable[Observation]:
        for i, source in enumerate(list(self._util_sources)):
            value = source()
            if value is not None:
                yield Observation(value, {"privlm.device": str(i)})

    def _observe_canary(self, key: str):
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            value = self._canary.get(key)
            if value is not None:
                yield Observation(value)
        return callback


_default: Instruments | None = None
_default_lock = threading.Lock()


def get() -> Instruments:
    """The process's instruments on the global meter provider (installed by setup_telemetry)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Instruments()
    return _default


class CpuUtilization:
    """Busy fraction of this process's CPU time over wall time since the previous call, per core."""

    def __init__(self, cores: int | None = None):
        import os

        self.cores = cores or len(os.sched_getaffinity(0))
        self._last = (time.monotonic(), time.process_time())

    def __call__(self) -> float | None:
        now, cpu = time.monotonic(), time.process_time()
        wall = now - self._last[0]
        used = cpu - self._last[1]
        self._last = (now, cpu)
        if wall <= 0:
            return None
        return max(0.0, min(1.0, used / (wall * self.cores)))


class GpuUtilization:
    """torch.cuda.utilization(device) as a fraction (NVML through torch); None when it is unavailable."""

    def __init__(self, device: int = 0):
        self.device = device

    def __call__(self) -> float | None:
        try:
            import torch

            return torch.cuda.utilization(self.device) / 100.0
        except Exception:  # noqa: BLE001 - no NVML / no GPU: report nothing rather than a wrong 0
            return None

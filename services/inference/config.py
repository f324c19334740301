"""Configuration of the worker group: the engine (model, parallelism, KV cache) and its server."""
from __future__ import annotations

from dataclasses import dataclass

from privlm.base.config import check
from privlm.base.transport import TransportConfig

BACKENDS = ("native", "deepspeed")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    model: str                              # path to a Hugging Face model folder
    tp: int = 1                             # tensor-parallel ranks (one OS process each)
    backend: str = "native"                 # "native" or "deepspeed"
    dtype: str = "bfloat16"
    device: str = "cpu"                     # "cpu" (gloo) or "cuda" (NCCL)
    max_num_seqs: int = 32                  # running batch size cap
    max_num_batched_tokens: int = 512       # tokens per step: the chunked-prefill budget
    block_size: int = 16                    # tokens per KV block
    num_kv_blocks: int | None = None        # None: sized from kv_cache_bytes
    kv_cache_bytes: int = 512 * 1024 * 1024
    max_queue: int = 256                    # waiting requests before RESOURCE_EXHAUSTED
    max_model_len: int | None = None        # None: the model's context window
    threads: int | None = None              # torch threads per rank; None: cores / tp
    prefill_chunk: int | None = None        # max prefill tokens of one sequence per step; None: the budget
    long_prefill_threshold: int | None = None  # prompts with more tokens left than this are chunked at
                                            # prefill_chunk, shorter ones go whole; None: prefill_chunk
    rank_timeout_s: float = 60.0            # collective / rendezvous timeout between ranks (an idle
                                            # group stays up: rank 0 sends keep-alives, keepalive_s)
    start_timeout_s: float | None = None    # ranks meeting at start (process start, imports);
                                            # None: rank_timeout_s
    load_format: str = "safetensors"        # "dummy": random weights of the right shapes (benchmarks)
    cuda_graphs: bool = True                # CUDA only: replay captured graphs for pure-decode steps
    cuda_graphs_tp: bool = True             # CUDA graphs also at tp > 1 (all-reduces inside the graph)
    compile_kernels: bool = True            # CUDA only: torch.compile the small fused blocks (engine/ops.py)
    decode_kernels: str = "auto"            # batch-1 / pure-decode graph steps in Triton (engine/gemv.py,
                                            # triton_ops.py: GEMV, RoPE + KV write, paged attention):
                                            # "triton", "torch", "auto" (triton on CUDA if it imports and
                                            # the model supports it)
    pdl: bool = True                        # with decode kernels on sm90+ (H100/H200): programmatic
                                            # dependent launch (the next kernel's launch and weight
                                            # prologue overlap the current kernel's tail)
    cpu_fused_decode: bool = True           # CPU, tp = 1: batch-1 decode steps in one C++ call (same ops)
    custom_all_reduce: bool = True          # CUDA, tp > 1: one-shot all-reduce over symmetric memory
                                            # (NVLink peer loads) for small tensors instead of NCCL
    fused_all_reduce_norm: bool = True      # with custom_all_reduce: the all-reduce after attention and
                                            # after the MLP fused with the residual add + RMSNorm (Triton),
                                            # checked against NCCL at start (docs/engine.md)
    plan_channel: str = "auto"              # step plans to follower ranks: "shm" (shared memory, ranks on
                                            # one host), "gloo", or "auto" (shm for CUDA local groups)
    overlap_decode: str = "auto"            # greedy decode steps: enqueue step N+1 before step N's tokens
                                            # reach the host ("on", "off", "auto": on for CUDA)
    keep_fp8: bool = False                  # FP8 block-scaled checkpoints (DeepSeek): weights stay FP8
                                            # and run FP8 tensor-core matmuls (CUDA sm90: H100/H200)

    def __post_init__(self):
        check(self.tp >= 1, f"tp must be >= 1, got {self.tp}")
        check(self.rank_timeout_s > 0, f"rank_timeout_s must be > 0, got {self.rank_timeout_s}")
        check(self.start_timeout_s is None or self.start_timeout_s > 0, "start_timeout_s must be > 0")
        check(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check(self.device in ("cpu", "cuda"), f"device must be 'cpu' or 'cuda', got {self.device!r}")
        check(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        check(self.max_num_batched_tokens >= 16, "max_num_batched_tokens must be >= 16")
        check(self.block_size >= 1, "block_size must be >= 1")
        check(self.max_queue >= 1, "max_queue must be >= 1")
        check(self.prefill_chunk is None or self.prefill_chunk >= 1, "prefill_chunk must be >= 1")
        check(self.load_format in ("safetensors", "dummy"), "load_format must be 'safetensors' or 'dummy'")
        check(self.plan_channel in ("auto", "shm", "gloo"), "plan_channel must be 'auto', 'shm' or 'gloo'")
        check(self.decode_kernels in ("auto", "triton", "torch"), "decode_kernels must be 'auto', 'triton' or 'torch'")
        check(self.overlap_decode in ("auto", "on", "off"), "overlap_decode must be 'auto', 'on' or 'off'")

    @property
    def rendezvous_timeout_s(self) -> float:
        return self.rank_timeout_s if self.start_timeout_s is None else self.start_timeout_s

    @property
    def keepalive_s(self) -> float:
        """Longest time rank 0 leaves followers without a message while idle: a follower's wait for
        the next plan is a collective bounded by rank_timeout_s, so a quarter of it leaves room for
        a late keep-alive (a long step, a busy host)."""
        return self.rank_timeout_s / 4

    @property
    def overlap_enabled(self) -> bool:
        """overlap_decode resolved (every rank must agree: followers then gather full logits too)."""
        return self.overlap_decode == "on" or (self.overlap_decode == "auto" and self.device == "cuda")


@dataclass(frozen=True)
class WorkerServerConfig:
    engine: EngineConfig
    transport: TransportConfig             # mTLS (only the gateway may call) or explicit plaintext_dev
    host: str = "127.0.0.1"
    port: int = 0
    grace_seconds: float = 10.0
    max_message_bytes: int = 8 * 1024 * 1024
    canary_interval_s: float = 300.0       # perplexity canary period (0: off)
    canary_baseline: float | None = None   # known-good perplexity; None: the first measurement

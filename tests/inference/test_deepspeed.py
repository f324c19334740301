"""DeepSpeed backend (transformers + deepspeed.init_inference AutoTP) at TP=2 on CPU, fp32.

Real rank processes, real gloo groups and DeepSpeed's real shared-memory all-reduce; the reference is
transformers' own generate() on the same weights in this process. The first run on a machine
JIT-compiles DeepSpeed's shm op into .cache/torch_extensions (~30 s); later runs reuse it.
"""
from __future__ import annotations

import os
import queue
import signal
import time

import pytest
import torch

from privlm.base.config import ConfigError
from services.inference.config import EngineConfig
from services.inference.deepspeed_backend import create_deepspeed_engine
from services.inference.deepspeed_backend.launch import EXTENSIONS_DIR, REPO_ROOT, rank_env
from services.inference.types import EngineUnavailable, FinishReason, GenerationRequest, InvalidRequest, SamplingParams

PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 81, 64, 12, 9, 150, 33, 2, 77, 18], [11, 250], [60] * 9]


def hf_generate(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


class Collector:
    """Receives an engine's events for many requests; `result(rid)` waits for the final one."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.tokens: dict[str, list[int]] = {}
        self.final: dict[str, object] = {}

    def __call__(self, ev):
        self.q.put(ev)

    def result(self, rid: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while rid not in self.final:
            ev = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            self.tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
            if ev.finish_reason is not None:
                self.final[ev.request_id] = ev
        return self.tokens.get(rid, []), self.final[rid]


def run(engine, rid: str, ids: list[int], n: int, **sampling):
    c = Collector()
    engine.submit(GenerationRequest(rid, tuple(ids), SamplingParams(max_new_tokens=n, **sampling)), c)
    return c.result(rid)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random Llama whose head counts split over 2 ranks (4 query heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = create_deepspeed_engine(EngineConfig(model=str(tiny_llama[0]), tp=2, backend="deepspeed", dtype="float32"))
    yield eng
    eng.shutdown()


def test_rank_environment_follows_the_deepspeed_pitfalls():
    cfg = EngineConfig(model="m", tp=2, backend="deepspeed", threads=1)
    env = rank_env(cfg, 1, 12345)
    assert env["LOCAL_SIZE"] == env["WORLD_SIZE"] == "2"        # else the shm all-reduce segfaults
    assert env["OMP_NUM_THREADS"] == "1" and env["RANK"] == "1" and env["MASTER_PORT"] == "12345"
    assert EXTENSIONS_DIR.is_relative_to(REPO_ROOT / ".cache")
    assert env["TORCH_EXTENSIONS_DIR"] == str(EXTENSIONS_DIR)


def test_a_group_that_cannot_load_reports_why(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny_llama[0] / "config.json").read_bytes())   # no weights
    with pytest.raises(EngineUnavailable, match="rank 0 failed to start"):
        create_deepspeed_engine(EngineConfig(model=str(tmp_path), tp=1, backend="deepspeed"))
    with pytest.raises(ConfigError):
        create_deepspeed_engine(EngineConfig(model=str(tmp_path / "missing"), tp=2, backend="deepspeed"))


def test_engine_describes_the_model(engine):
    info = engine.info
    assert (info.backend, info.tensor_parallel, info.dtype) == ("deepspeed", 2, "float32")
    assert info.vocab_size == 256 and info.context_window == 256 and info.eos_token_ids == (2,)
    assert engine.healthy and len(engine.rank_pids) == 2


def test_tp2_greedy_equals_transformers_generate(engine, tiny_llama):
    _, model = tiny_llama
    for i, ids in enumerate(PROMPTS):
        want = hf_generate(model, ids, 16)
        got, final = run(engine, f"alone-{i}", ids, 16)
        assert got == want, f"prompt {i}"
        assert final.finish_reason in (FinishReason.LENGTH, FinishReason.END_OF_SEQUENCE)
        assert final.prompt_tokens == len(ids)


def test_concurrent_requests_give_the_same_tokens_as_alone(engine, tiny_llama):
    """Rows join and leave one padded batch at different steps; each must still match generate()."""
    _, model = tiny_llama
    lengths = [20, 6, 14, 3]
    want = [hf_generate(model, ids, n) for ids, n in zip(PROMPTS, lengths)]
    c = Collector()
    for i, (ids, n) in enumerate(zip(PROMPTS, lengths)):
        engine.submit(GenerationRequest(f"batch-{i}", tuple(ids), SamplingParams(max_new_tokens=n)), c)
        if i == 1:
            c.result("batch-1")       # the next prompts join a batch that already decodes
    got = [c.result(f"batch-{i}")[0] for i in range(len(PROMPTS))]
    assert got == want
    assert engine.stats().steps > 0 and engine.stats().running == 0


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    ids = PROMPTS[0]
    params = dict(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone, _ = run(engine, "seeded-alone", ids, 12, **params)
    c = Collector()
    engine.submit(GenerationRequest("noise", tuple(PROMPTS[1]), SamplingParams(max_new_tokens=12, temperature=1.0)), c)
    engine.submit(GenerationRequest("seeded-batched", tuple(ids), SamplingParams(max_new_tokens=12, **params)), c)
    assert c.result("seeded-batched")[0] == alone
    c.result("noise")
    other, _ = run(engine, "seeded-other", ids, 12, **{**params, "seed": 99})
    assert other != alone and len(other) == 12


def test_cancel_ends_the_request_and_the_batch_keeps_working(engine, tiny_llama):
    c = Collector()
    engine.submit(GenerationRequest("long", tuple(PROMPTS[0]), SamplingParams(max_new_tokens=200)), c)
    first = c.q.get(timeout=60)
    c.q.put(first)
    engine.cancel("long")
    tokens, final = c.result("long")
    assert final.finish_reason is FinishReason.CANCELLED and 0 < len(tokens) < 200
    got, _ = run(engine, "after-cancel", PROMPTS[2], 8)
    assert got == hf_generate(tiny_llama[1], PROMPTS[2], 8)
    assert engine.stats().running == 0


def test_idle_group_is_kept_alive_by_heartbeats(engine, tiny_llama):
    """Idle followers wait in a gloo broadcast that would time out after 30 min: empty plans reset it."""
    before = engine.stats().extra["heartbeats"]
    engine.heartbeat_s = 0.2
    try:
        time.sleep(1.5)
    finally:
        engine.heartbeat_s = 60.0
    assert engine.stats().extra["heartbeats"] >= before + 2
    got, _ = run(engine, "after-idle", PROMPTS[1], 6)
    assert got == hf_generate(tiny_llama[1], PROMPTS[1], 6)


def test_scoring_for_the_canary_equals_transformers(engine, tiny_llama):
    """engine.score (teacher-forced log-probs, the perplexity canary's input) through both ranks."""
    from privlm.base.telemetry.canary import hf_scorer

    ids = [1, 17, 99, 23, 5, 42, 7, 130, 64]
    ours = engine.score(ids)
    ref = hf_scorer(tiny_llama[1])(ids)
    assert len(ours) == len(ids) - 1 and max(abs(a - b) for a, b in zip(ours, ref)) < 1e-4
    assert run(engine, "after-score", [1, 5, 9], 3)[0]                       # generation unaffected
    with pytest.raises(InvalidRequest):
        engine.score([1])


def test_invalid_requests_are_refused(engine):
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest("empty", (), SamplingParams(max_new_tokens=4)), lambda ev: None)
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest("oov", (1, 256), SamplingParams(max_new_tokens=4)), lambda ev: None)
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest("too-long", (1,) * 256, SamplingParams(max_new_tokens=4)), lambda ev: None)


def test_two_groups_on_one_host_and_a_dying_follower(engine, tiny_llama):
    """A second group starts beside the first (free rendezvous port, own shm segment); then its
    rank 1 is killed mid-generation: in-flight requests end with ERROR, new ones are refused, and
    rank 0 does not stay behind spinning in the all-reduce."""
    from services.inference.deepspeed_backend.launch import shm_buffers

    doomed = create_deepspeed_engine(EngineConfig(model=str(tiny_llama[0]), tp=2, backend="deepspeed",
                                                  dtype="float32"))
    port = doomed._group.port
    try:
        c = Collector()
        doomed.submit(GenerationRequest("victim", tuple(PROMPTS[0]), SamplingParams(max_new_tokens=250)), c)
        c.q.put(c.q.get(timeout=60))          # generation is under way
        assert shm_buffers(port)               # DeepSpeed's shm all-reduce buffers of this group...
        os.kill(doomed.rank_pids[1], signal.SIGKILL)
        tokens, final = c.result("victim", timeout=30)
        assert final.finish_reason is FinishReason.ERROR and "rank" in final.error
        assert not doomed.healthy and not doomed.stats().healthy
        with pytest.raises(EngineUnavailable):
            doomed.submit(GenerationRequest("late", (1, 2), SamplingParams(max_new_tokens=2)), c)
        for pid in doomed.rank_pids:           # killed and reaped by the driver
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        doomed.shutdown()
    assert not shm_buffers(port)               # ...are removed with it (DeepSpeed leaves them behind)
    # the first group was never disturbed
    got, _ = run(engine, "survivor", PROMPTS[3], 8)
    assert got == hf_generate(tiny_llama[1], PROMPTS[3], 8)
    assert shm_buffers(engine._group.port)     # its buffers are still there while it runs


@pytest.mark.slow
@pytest.mark.model
def test_default_model_tp2_greedy_equals_transformers_generate(default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model), local_files_only=True)
    msgs = [{"role": "user", "content": "In one sentence, what does a bank's liquidity coverage ratio measure?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    eng = create_deepspeed_engine(EngineConfig(model=str(default_model), tp=2, backend="deepspeed", dtype="float32"))
    try:
        assert eng.info.parameters > 100_000_000 and eng.info.architecture == "LlamaForCausalLM"
        got, final = run(eng, "smollm2", ids, 24)
    finally:
        eng.shutdown()
    model = AutoModelForCausalLM.from_pretrained(str(default_model), dtype=torch.float32, local_files_only=True).eval()
    assert got == hf_generate(model, ids, 24)
    assert final.finish_reason in (FinishReason.LENGTH, FinishReason.END_OF_SEQUENCE)

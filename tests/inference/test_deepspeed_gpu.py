"""DeepSpeed backend on CUDA (NCCL for the tensors, gloo for the plans). Skipped without 2 GPUs;
run on a GPU machine with `python -m pytest tests/inference/test_deepspeed_gpu.py`; besides torch and
transformers that machine needs the deepspeed backend's pinned packages from pyproject.toml installed
(deepspeed 0.19.8 with hjson, py-cpuinfo, ninja, einops, msgpack, psutil, pydantic, tqdm)."""
from __future__ import annotations

import queue

import pytest
import torch

from services.inference.config import EngineConfig
from services.inference.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")

PROMPTS = [[5, 17, 42, 99, 7], list(range(100, 130)), [11, 250]]


def test_cuda_tp2_greedy_and_batched_equal_transformers_generate(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.inference.deepspeed_backend import create_deepspeed_engine

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    model = model.cuda()
    want = []
    with torch.no_grad():
        for ids in PROMPTS:
            out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=20, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"), pad_token_id=0)
            want.append(out[0, len(ids):].tolist())
    eng = create_deepspeed_engine(EngineConfig(model=str(tmp_path), tp=2, backend="deepspeed", dtype="float32",
                                               device="cuda"))
    try:
        q: queue.Queue = queue.Queue()
        for i, ids in enumerate(PROMPTS):
            eng.submit(GenerationRequest(f"r{i}", tuple(ids), SamplingParams(max_new_tokens=20)), q.put)
        got: dict[str, list[int]] = {}
        done = 0
        while done < len(PROMPTS):
            ev = q.get(timeout=300)
            got.setdefault(ev.request_id, []).extend(ev.token_ids)
            done += ev.finish_reason is not None
        assert [got[f"r{i}"] for i in range(len(PROMPTS))] == want
        assert eng.info.device == "cuda" and eng.healthy
    finally:
        eng.shutdown()

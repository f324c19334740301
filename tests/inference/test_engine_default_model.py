"""Native engine at TP=1 on the default model (fp32): token-for-token equal to transformers."""
from __future__ import annotations

import pytest

from privlm.testing.engine import generate
from services.inference.config import EngineConfig
from services.inference.engine import create_engine
from services.inference.types import GenerationRequest, InvalidRequest, SamplingParams
from tests.conftest import hf_greedy

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine(default_model):
    eng = create_engine(EngineConfig(model=str(default_model), dtype="float32", max_num_batched_tokens=64,
                                     num_kv_blocks=256))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompts(hf_model):
    _, tok = hf_model
    texts = ["What is a credit default swap?", "List three risks of a variable-rate mortgage.",
             "Hello", "Summarise: the bank's quarterly net interest margin rose by 12 basis points, "
             "driven by higher yields on its loan book and lower deposit costs, while provisions fell."]
    return [list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]) for t in texts]


def test_greedy_equals_transformers(engine, hf_model, prompts):
    for p in prompts[:2]:
        ref = hf_greedy(hf_model, p, 24)
        assert generate(engine, [p], 24)[0] == ref


def test_concurrent_equals_alone(engine, hf_model, prompts):
    """Different prompts in one continuous batch (prefill chunked at 64 tokens) = each alone."""
    alone = [hf_greedy(hf_model, p, 20) for p in prompts]
    together = generate(engine, prompts, 20)
    assert together == alone
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_invalid_requests(engine):
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest("e", (), SamplingParams(max_new_tokens=4)), lambda e: None)
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest("l", (1,) * 10, SamplingParams(max_new_tokens=engine.info.context_window)),
                      lambda e: None)
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest("v", (engine.info.vocab_size,), SamplingParams(max_new_tokens=4)),
                      lambda e: None)


def test_info(engine):
    assert engine.info.architecture == "LlamaForCausalLM"
    assert engine.info.eos_token_ids == (2,)
    assert engine.info.context_window == 8192
    assert 130e6 < engine.info.parameters < 140e6


@pytest.mark.slow
def test_tp2_greedy_equals_transformers(default_model, hf_model, prompts):
    """TP=2 on the default model: 3 KV heads split 2 + 1, vocab-parallel tied embedding / lm_head."""
    eng = create_engine(EngineConfig(model=str(default_model), dtype="float32", tp=2, threads=1,
                                     max_num_batched_tokens=64, num_kv_blocks=256))
    try:
        st = eng.stats()
        total = st.extra["weight_bytes_rank0"] + st.extra["weight_bytes_rank1"]
        assert 0.45 < st.extra["weight_bytes_rank0"] / total < 0.6
        refs = [hf_greedy(hf_model, p, 16) for p in prompts[:3]]
        assert generate(eng, prompts[:3], 16) == refs
    finally:
        eng.shutdown()

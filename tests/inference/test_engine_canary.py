"""The perplexity canary through the engine: teacher-forced log-probs equal transformers', and
corrupting the served weights makes the guide's alert condition fire."""
import pytest
import torch

from privlm.base.telemetry.canary import CANARY_TEXT, CanaryMonitor, hf_scorer
from services.inference.config import EngineConfig
from services.inference.engine import create_engine

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine(default_model):
    eng = create_engine(EngineConfig(model=str(default_model), dtype="float32", max_queue=8))
    yield eng
    eng.shutdown()


def test_engine_scores_like_transformers(engine, hf_model):
    model, tok = hf_model
    ids = tok.encode(CANARY_TEXT)[:200]
    ours = engine.score(ids)
    ref = hf_scorer(model)(ids)
    assert len(ours) == len(ids) - 1
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-3
    s = engine.stats()
    assert s.kv_blocks_free == s.kv_blocks_total            # borrowed blocks went back


def test_corrupted_weights_fire_the_canary(engine, hf_model):
    ids = hf_model[1].encode(CANARY_TEXT)[:200]
    monitor = CanaryMonitor(engine.score, ids)
    baseline = monitor.measure()
    assert not monitor.firing
    w = engine.runner.model.model.layers[3].mlp.down_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(4.0)                                       # what a bad quantisation could do
        corrupted = monitor.measure()
        assert corrupted > baseline * 1.15 and monitor.firing
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert abs(monitor.measure() - baseline) < 1e-3 * baseline

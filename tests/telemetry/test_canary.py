"""The perplexity canary on the real default model: healthy weights stay quiet, corrupted ones fire."""
from __future__ import annotations

import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from privlm.base.telemetry import TelemetryConfig, setup_telemetry
from privlm.base.telemetry.canary import CANARY_TEXT, CanaryMonitor, alert_condition, canary_perplexity, hf_scorer, perplexity
from privlm.base.telemetry.instruments import Instruments


def test_perplexity_math():
    assert perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        canary_perplexity(lambda ids: [0.0], [1, 2, 3])  # one log-prob too few
    assert alert_condition(11.6, 10.0) and not alert_condition(11.4, 10.0)


@pytest.fixture(scope="module")
def model_and_ids(hf_model):
    """The session's transformers model (tests/conftest.py); weights are restored after corruption."""
    model, tok = hf_model
    return model, tok(CANARY_TEXT).input_ids


def _scraped_canary(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("privlm_canary")}


@pytest.mark.model
@pytest.mark.slow
def test_corrupted_weights_fire_the_canary(model_and_ids):
    import torch

    model, ids = model_and_ids
    assert len(ids) > 64
    tel = setup_telemetry(TelemetryConfig(service_name="privlm-test-worker", metrics_port=0), set_global=False)
    try:
        monitor = CanaryMonitor(hf_scorer(model), ids, Instruments(tel.meter_provider))
        baseline = monitor.measure()              # healthy weights: the baseline
        assert 1.0 < baseline < 200.0
        assert not monitor.firing
        g = _scraped_canary(tel.metrics_port)
        assert not alert_condition(g["privlm_canary_perplexity"], g["privlm_canary_perplexity_baseline"])

        weight = model.model.layers[3].mlp.down_proj.weight
        original = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.mul_(1.5)                  # a mild perturbation stays under the 15% bar
            mild = monitor.measure()
            assert not monitor.firing, f"mild perturbation fired: {mild:.2f} vs {baseline:.2f}"
            with torch.no_grad():
                weight.copy_(original * 4.0)      # one corrupted layer (e.g. a wrong dequant scale)
            corrupted = monitor.measure()
            assert monitor.firing, f"corrupted {corrupted:.2f} vs baseline {baseline:.2f}"
            g = _scraped_canary(tel.metrics_port)
            assert g["privlm_canary_perplexity"] == pytest.approx(corrupted)
            assert g["privlm_canary_perplexity_baseline"] == pytest.approx(baseline)
            # the alert rule's condition (docs/prometheus/alerts.yml), evaluated on the scraped series
            assert g["privlm_canary_perplexity"] / g["privlm_canary_perplexity_baseline"] > 1.15
        finally:
            with torch.no_grad():
                weight.copy_(original)
    finally:
        tel.shutdown()

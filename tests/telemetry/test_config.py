"""TelemetryConfig validation and its command-line flags."""
from __future__ import annotations

import argparse

import pytest

from privlm.base.config import ConfigError, from_mapping
from privlm.base.telemetry.config import TelemetryConfig, add_arguments, from_args


@pytest.mark.parametrize("bad, field", [
    ({"service_name": ""}, "service_name"),
    ({"service_name": "gw", "otlp_endpoint": "localhost"}, "otlp_endpoint"),
    ({"service_name": "gw", "otlp_endpoint": "localhost:99999"}, "otlp_endpoint"),
    ({"service_name": "gw", "metrics_port": -1}, "metrics_port"),
    ({"service_name": "gw", "sampling_ratio": 1.5}, "sampling_ratio"),
    ({"service_name": "gw", "export_delay_ms": 0}, "export_delay_ms"),
    ({"service_name": "gw", "jaeger": "x"}, "unknown key"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        from_mapping(TelemetryConfig, bad)


def test_flags_build_a_config():
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    cfg = from_args(ap.parse_args(["--otlp-endpoint", "127.0.0.1:4317", "--metrics-port", "0",
                                   "--trace-sampling", "0.25"]), "privlm-gateway")
    assert cfg == TelemetryConfig(service_name="privlm-gateway", otlp_endpoint="127.0.0.1:4317", metrics_port=0,
                                  sampling_ratio=0.25)
    assert from_args(ap.parse_args([]), "w").otlp_endpoint is None

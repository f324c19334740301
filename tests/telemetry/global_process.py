"""Run in a fresh process: the global path an entrypoint takes (instruments.get() before and after setup)."""
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from privlm.base.telemetry import TelemetryConfig, init_service, instruments  # noqa: E402

early = instruments.get()            # created before any provider is installed (proxy meter)
tel = init_service(TelemetryConfig(service_name="privlm-global-test", metrics_port=0))
early.record_rpc("/a.B/C", "OK", 0.002)
instruments.get().record_step(3, 0.01)
sum(i * i for i in range(300_000))
text = urllib.request.urlopen(f"http://127.0.0.1:{tel.metrics_port}/metrics", timeout=10).read().decode()
tel.shutdown()
print(json.dumps({"text": text}))

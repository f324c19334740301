"""`privlm he` runs standalone and stops gracefully on SIGTERM; config rules; `privlm demo he` passes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from he_support import make_model, make_records

from privlm.base.config import ConfigError, from_mapping
from services.he.config import HEServiceConfig
from services.he.model import load_model, save_model

ROOT = Path(__file__).resolve().parents[2]


def test_config_validation():
    cfg = from_mapping(HEServiceConfig, {"port": 0, "model_files": ["a.json"], "workers": 3, "plaintext_dev": True})
    assert cfg.model_files == ("a.json",) and cfg.workers == 3
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(HEServiceConfig, {"max_contxts": 3})
    with pytest.raises(ConfigError, match="workers"):
        from_mapping(HEServiceConfig, {"workers": 0, "plaintext_dev": True})
    with pytest.raises(ConfigError, match="max_context_bytes_per_tenant"):
        HEServiceConfig(max_context_bytes=10_000, max_context_bytes_per_tenant=5_000, plaintext_dev=True)
    assert cfg.transport_max_bytes > cfg.max_request_bytes


def test_model_file_rules(tmp_path):
    m = make_model()
    path = save_model(m, tmp_path / "m.json")
    again = load_model(path)
    assert again.model_id == m.model_id                  # identified by content hash
    data = json.loads(path.read_text())
    (tmp_path / "pretty.json").write_text(json.dumps(data, indent=7))
    assert load_model(tmp_path / "pretty.json").model_id == m.model_id
    data["bias"] += 1
    (tmp_path / "changed.json").write_text(json.dumps(data))
    assert load_model(tmp_path / "changed.json").model_id != m.model_id
    for bad, match in [({**data, "extra": 1}, "unknown key"), ({**data, "scales": data["scales"][:-1]}, "scales has"),
                       ({**data, "scales": [0.0] * len(data["scales"])}, "> 0"),
                       ({**data, "weights": [0.0] * len(data["weights"])}, "non-zero")]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match):
            load_model(tmp_path / "bad.json")


def test_main_serves_and_stops_on_sigterm(tmp_path):
    from services.he.client import HEClient
    from services.he.keys import BankKeys

    model = make_model()
    path = save_model(model, tmp_path / "m.json")
    proc = subprocess.Popen([sys.executable, "-m", "services.he.server", "--port", "0", "--plaintext-dev", "--model-file", str(path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port = None
        deadline = time.time() + 60
        while time.time() < deadline and port is None:
            line = proc.stdout.readline()
            m = re.search(r"serving privlm\.v1\.HomomorphicPreprocessor on [\d.]+:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, "server did not report its port"
        keys = BankKeys.generate(depth=1)
        with HEClient(f"127.0.0.1:{port}") as c:
            c.register(keys)
            x = make_records(10)
            np.testing.assert_allclose(c.score(keys, x).values, model.logit(x), atol=1e-3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        rest = proc.stdout.read()
        assert "stopped" in rest
        with pytest.raises(grpc.RpcError):
            with HEClient(f"127.0.0.1:{port}", timeout=2) as c:
                c.describe()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_main_rejects_bad_model_file(tmp_path):
    from services.he.server import main

    (tmp_path / "bad.json").write_text('{"name": "x"}')
    assert main(["--port", "0", "--plaintext-dev", "--model-file", str(tmp_path / "bad.json")]) == 2


def test_demo_he(capsys):
    from privlm.scenarios.he_demo import main

    assert main(["--records", "400"]) == 0
    out = capsys.readouterr().out
    assert "encrypted decisions equal plaintext decisions: 400/400" in out
    assert "result: encrypted decisions equal plaintext decisions" in out


def test_mtls_admits_only_allowed_peers(loop_thread, tmp_path):
    from privlm.base import certs
    from services.he.client import HEClient
    from services.he.keys import BankKeys
    from services.he.server import create_server

    certs.create(tmp_path / "certs")
    model = make_model()
    cfg = HEServiceConfig(model_files=(str(save_model(model, tmp_path / "m.json")),), tls_dir=str(tmp_path / "certs"))
    server, port = loop_thread.run(create_server(cfg))
    loop_thread.run(server.start())
    try:
        keys = BankKeys.generate(depth=1)
        with HEClient(f"127.0.0.1:{port}", credentials=certs.channel_credentials(tmp_path / "certs", "client")) as c:
            c.register(keys)
            x = make_records(5)
            np.testing.assert_allclose(c.score(keys, x).values, model.logit(x), atol=1e-3)
        with HEClient(f"127.0.0.1:{port}", credentials=certs.channel_credentials(tmp_path / "certs", "worker")) as c:
            with pytest.raises(grpc.RpcError) as info:
                c.describe()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with HEClient(f"127.0.0.1:{port}", timeout=5) as c:                  # plaintext: no handshake
            with pytest.raises(grpc.RpcError) as info:
                c.describe()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop_thread.run(server.stop(0))
        server.privlm_servicer.close()


def test_config_requires_an_explicit_transport():
    """No silent plaintext: a config built in code must choose mTLS or development plaintext."""
    with pytest.raises(ConfigError, match="tls_dir .* or plaintext_dev"):
        HEServiceConfig()
    with pytest.raises(ConfigError, match="exactly one"):
        HEServiceConfig(tls_dir="certs", plaintext_dev=True)
    assert HEServiceConfig(plaintext_dev=True).tls_dir is None

"""privlm measure / verify / audit / certs command lines, against real servers."""
import json

from enclave_fixtures import MEASUREMENT, serve, sim_runtime

from enclave import audit_cli, measure, verify_cli
from enclave.attestation import policy as pol
from privlm.base import certs


def _model(tmp_path):
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text('{"hidden_size": 8}')
    (m / "model.safetensors").write_bytes(b"\x00" * 1000)
    return m


def test_measure_is_reproducible_and_sensitive(tmp_path, capsys):
    m = _model(tmp_path)
    cfg = tmp_path / "gw.json"
    cfg.write_text('{"b": 1, "a": [1, 2]}')
    assert measure.main(["--model", str(m), "--config", str(cfg)]) == 0
    first = capsys.readouterr().out.strip()
    assert len(first) == 96
    cfg.write_text('{\n  "a": [1, 2],\n  "b": 1\n}')  # same effective config, different formatting
    measure.main(["--model", str(m), "--config", str(cfg)])
    assert capsys.readouterr().out.strip() == first
    (m / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")  # one weight byte
    measure.main(["--model", str(m), "--config", str(cfg)])
    assert capsys.readouterr().out.strip() != first
    cfg.write_text('{"a": [1, 2], "b": 2}')
    measure.main(["--model", str(m), "--config", str(cfg), "--json"])
    assert set(json.loads(capsys.readouterr().out)) == {"measurement_sha384", "code_sha384", "model_sha384", "config_sha384"}
    assert measure.main(["--model", str(tmp_path / "missing")]) == 2


def test_verify_cli_over_mtls_and_plaintext(tmp_path, loop_thread, capsys):
    certs.create(tmp_path / "certs")
    rt = sim_runtime(tmp_path)
    policy_file = tmp_path / "policy.json"
    assert verify_cli.main(["--emit-dev-policy", str(policy_file), "--key-dir", str(tmp_path / "keys"),
                            "--measurement", MEASUREMENT.hex()]) == 0
    server, port, _ = loop_thread.run(serve(rt, credentials=certs.server_credentials(tmp_path / "certs", "gateway")))
    plain, pport, _ = loop_thread.run(serve(rt))
    try:
        capsys.readouterr()
        rc = verify_cli.main(["--target", f"127.0.0.1:{port}", "--policy", str(policy_file),
                              "--certs", str(tmp_path / "certs")])
        out = capsys.readouterr()
        assert rc == 0, out
        res = json.loads(out.out)
        assert res["verified"] and res["simulated"] and res["measurement_sha384"] == MEASUREMENT.hex()
        assert "SIMULATED" in out.err
        prod = tmp_path / "prod.json"
        prod.write_text(pol.production([MEASUREMENT.hex()]).to_json())
        assert verify_cli.main(["--target", f"127.0.0.1:{port}", "--policy", str(prod),
                                "--certs", str(tmp_path / "certs")]) == 1
        assert json.loads(capsys.readouterr().out)["reason"] == "simulation_not_allowed"
        assert verify_cli.main(["--target", f"127.0.0.1:{pport}", "--policy", str(policy_file),
                                "--insecure-dev-plaintext"]) == 0
        assert "PLAINTEXT" in capsys.readouterr().err
    finally:
        loop_thread.run(server.stop(None))
        loop_thread.run(plain.stop(None))


def test_audit_cli_public_key_and_verify(tmp_path, capsys):
    rt = sim_runtime(tmp_path)
    rt.evidence(b"n" * 32)
    capsys.readouterr()
    assert audit_cli.main(["public-key", "--key-dir", str(tmp_path / "keys")]) == 0
    pem = tmp_path / "audit.pub"
    pem.write_text(capsys.readouterr().out)
    assert audit_cli.main(["checkpoint", "--log", str(tmp_path / "audit")]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == rt.audit.size
    assert audit_cli.main(["verify", "--log", str(tmp_path / "audit"), "--public-key", str(pem)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["entries"] == rt.audit.size == 2

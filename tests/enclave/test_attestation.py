"""Every evidence rejection: forged, stale nonce, wrong measurement, simulated under production,
wrong key binding, tampered transparency proof; and no silent downgrade without hardware."""
import dataclasses
import hashlib
import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from enclave_fixtures import MEASUREMENT, dev_policy, sim_runtime

from enclave import evidence as ev
from enclave.attestation import AttestationError, AttestationUnavailable, backend_for
from enclave.attestation import policy as pol
from enclave.attestation.simulated import SimulatedBackend
from enclave.config import EnclaveConfig
from enclave.hpke import ServerKey
from privlm.base.config import ConfigError


@pytest.fixture()
def setup(tmp_path):
    rt = sim_runtime(tmp_path)
    return rt, dev_policy(tmp_path, rt)


def _reason(fn) -> str:
    with pytest.raises(AttestationError) as err:
        fn()
    return err.value.reason


def test_valid_simulated_evidence_verifies_under_dev_policy(setup, caplog):
    rt, policy = setup
    nonce = os.urandom(32)
    v = ev.verify_bundle(rt.evidence(nonce), policy, nonce)
    assert v.claims.simulated and v.claims.debug and v.key_config == rt.key.config()
    assert any("SIMULATED" in r.getMessage() for r in caplog.records)  # it says so, every time


def test_forged_evidence_rejected(setup):
    rt, policy = setup
    nonce = os.urandom(32)
    b = rt.evidence(nonce)
    forger = SimulatedBackend(Ed25519PrivateKey.generate(), MEASUREMENT)  # not the pinned root
    forged = ev.issue(forger, nonce, b.key_config, b.measurement, b.transparency)
    assert _reason(lambda: ev.verify_bundle(forged, policy, nonce)) == "bad_signature"
    outer = json.loads(b.raw)
    outer["payload"] = outer["payload"].replace('"debug":true', '"debug":false')
    edited = dataclasses.replace(b, raw=json.dumps(outer).encode())
    assert _reason(lambda: ev.verify_bundle(edited, policy, nonce)) == "bad_signature"


def test_stale_nonce_rejected(setup):
    rt, policy = setup
    old = os.urandom(32)
    b = rt.evidence(old)
    fresh = os.urandom(32)
    assert _reason(lambda: ev.verify_bundle(b, policy, fresh)) == "stale_nonce"
    # Relabelling the old evidence with the new nonce fails inside the signed evidence too.
    assert _reason(lambda: ev.verify_bundle(dataclasses.replace(b, nonce=fresh), policy, fresh)) in (
        "stale_nonce", "key_binding")


def test_expired_evidence_rejected(setup):
    rt, policy = setup
    nonce = os.urandom(32)
    b = rt.evidence(nonce)
    strict = dataclasses.replace(policy, max_age_s=1e-9)
    assert _reason(lambda: ev.verify_bundle(b, strict, nonce)) == "expired"


def test_wrong_measurement_rejected(setup, tmp_path):
    rt, policy = setup
    nonce = os.urandom(32)
    other = dataclasses.replace(policy, measurements=(hashlib.sha384(b"another build").hexdigest(),))
    assert _reason(lambda: ev.verify_bundle(rt.evidence(nonce), other, nonce)) == "wrong_measurement"
    # A bundle claiming the pinned measurement while the signed evidence covers another one:
    b = rt.evidence(nonce)
    lying = dataclasses.replace(b, measurement=hashlib.sha384(b"x").digest())
    assert _reason(lambda: ev.verify_bundle(lying, policy, nonce)) in ("key_binding", "wrong_measurement")


def test_simulated_evidence_under_production_policy_rejected(setup):
    rt, policy = setup
    nonce = os.urandom(32)
    prod = pol.production([MEASUREMENT.hex()])
    assert _reason(lambda: ev.verify_bundle(rt.evidence(nonce), prod, nonce)) == "simulation_not_allowed"
    # Even a production policy that lists the measurement and the root but not allow_simulated:
    sneaky = pol.Policy(measurements=(MEASUREMENT.hex(),), simulated_root_public_key=policy.simulated_root_public_key)
    assert _reason(lambda: ev.verify_bundle(rt.evidence(nonce), sneaky, nonce)) == "simulation_not_allowed"
    with pytest.raises(ConfigError):
        pol.Policy(tee_types=("simulated",))  # listing it without allow_simulated is a config error


def test_wrong_key_binding_rejected(setup):
    rt, policy = setup
    nonce = os.urandom(32)
    b = rt.evidence(nonce)
    attacker_key = ServerKey.generate(b.key_config[0]).config().encode()  # same key id, attacker's key
    swapped = dataclasses.replace(b, key_config=attacker_key)
    assert _reason(lambda: ev.verify_bundle(swapped, policy, nonce)) == "key_binding"


def test_tampered_transparency_proof_rejected(setup):
    rt, policy = setup
    nonce = os.urandom(32)
    b = rt.evidence(nonce)
    t = b.transparency
    bad_cp = dataclasses.replace(t.checkpoint, root=hashlib.sha256(b"x").digest())
    assert _reason(lambda: ev.verify_bundle(dataclasses.replace(b, transparency=dataclasses.replace(
        t, checkpoint=bad_cp)), policy, nonce)) == "transparency"
    assert _reason(lambda: ev.verify_bundle(dataclasses.replace(b, transparency=None), policy, nonce)) == \
        "no_transparency_proof"


def test_simulated_backend_requires_explicit_opt_in():
    with pytest.raises(ConfigError):
        EnclaveConfig(attestation="simulated", measurement=MEASUREMENT.hex())


@pytest.mark.parametrize("tee", ["sev-snp", "tdx", "sgx-gramine"])
def test_missing_hardware_is_a_clear_error_not_a_downgrade(tee, tmp_path):
    opts = {"report_root": str(tmp_path / "no-tsm")} if tee != "sgx-gramine" else {"device_root": str(tmp_path / "no-dev")}
    backend = backend_for(tee, **opts)
    with pytest.raises(AttestationUnavailable) as err:
        backend.evidence(os.urandom(32), os.urandom(64))
    assert tee in str(err.value) or "attestation" in str(err.value)


def test_gateway_runtime_with_missing_tee_fails_at_startup(tmp_path):
    from enclave.runtime import ConfidentialRuntime
    cfg = EnclaveConfig(attestation="sev-snp", measurement=MEASUREMENT.hex(), key_dir=str(tmp_path / "k"),
                        audit_dir=str(tmp_path / "a"), tsm_report_root=str(tmp_path / "no-configfs"))
    with pytest.raises(AttestationUnavailable, match="Refusing to fall back"):
        ConfidentialRuntime(cfg)

"""SEV-SNP, TDX, Gramine SGX and NVIDIA GPU evidence: parsed and verified from constructed fixtures.

No TEE exists on this machine; these fixtures follow the public layouts and are signed with test
keys, and the policies pin those test roots. Each backend must also reject what it should."""
import base64
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
from tee_fixtures import DcapChain, NvidiaSigner, SnpChain, pem

from enclave import evidence as ev
from enclave.attestation import AttestationError, backend_for
from enclave.attestation import policy as pol
from enclave.hpke import ServerKey

M = hashlib.sha384(b"privlm build").digest()
LAUNCH = hashlib.sha384(b"vm image").digest()


def _bundle(tee, raw_fn, nonce, key_config):
    rd = ev.report_data_for(nonce, M, key_config)
    return ev.Bundle(tee, raw_fn(rd), key_config, M, nonce)


def _reason(fn):
    with pytest.raises(AttestationError) as err:
        fn()
    return err.value.reason


@pytest.fixture(scope="module")
def snp_chain():
    return SnpChain()


@pytest.fixture(scope="module")
def dcap_chain():
    return DcapChain()


def test_snp_report_verifies_and_binds(snp_chain):
    nonce, kc = os.urandom(32), ServerKey.generate(1).config().encode()
    policy = pol.production([M.hex()], trusted_roots_pem=(pem(snp_chain.ark),), launch_measurements=(LAUNCH.hex(),))
    b = _bundle("sev-snp", lambda rd: snp_chain.evidence(rd, LAUNCH), nonce, kc)
    v = ev.verify_bundle(b, policy, nonce)
    assert v.claims.tee_type == "sev-snp" and v.claims.launch_measurement == LAUNCH and not v.claims.debug
    # debug guest, wrong launch measurement, forged signature, untrusted root, wrong binding:
    dbg = _bundle("sev-snp", lambda rd: snp_chain.evidence(rd, LAUNCH, debug=True), nonce, kc)
    assert _reason(lambda: ev.verify_bundle(dbg, policy, nonce)) == "debug"
    other = _bundle("sev-snp", lambda rd: snp_chain.evidence(rd, hashlib.sha384(b"evil").digest()), nonce, kc)
    assert _reason(lambda: ev.verify_bundle(other, policy, nonce)) == "wrong_launch_measurement"
    from cryptography.hazmat.primitives.asymmetric import ec
    forged = _bundle("sev-snp", lambda rd: snp_chain.evidence(rd, LAUNCH, key=ec.generate_private_key(ec.SECP384R1())), nonce, kc)
    assert _reason(lambda: ev.verify_bundle(forged, policy, nonce)) == "bad_signature"
    foreign = dataclasses.replace(policy, trusted_roots_pem=(pem(SnpChain().ark),))
    assert _reason(lambda: ev.verify_bundle(b, foreign, nonce)) == "untrusted_root"
    swapped = dataclasses.replace(b, key_config=ServerKey.generate(1).config().encode())
    assert _reason(lambda: ev.verify_bundle(swapped, policy, nonce)) == "key_binding"


def test_snp_report_fields_edit_breaks_signature(snp_chain):
    nonce, kc = os.urandom(32), ServerKey.generate(1).config().encode()
    policy = pol.production([M.hex()], trusted_roots_pem=(pem(snp_chain.ark),))
    raw = json.loads(_bundle("sev-snp", lambda rd: snp_chain.evidence(rd, LAUNCH), nonce, kc).raw)
    report = bytearray(base64.b64decode(raw["outblob"]))
    report[0x90] ^= 1  # flip a measurement bit
    raw["outblob"] = base64.b64encode(bytes(report)).decode()
    b = ev.Bundle("sev-snp", json.dumps(raw).encode(), kc, M, nonce)
    assert _reason(lambda: ev.verify_bundle(b, policy, nonce)) == "bad_signature"


def test_tdx_quote_verifies_and_rejects(dcap_chain):
    nonce, kc = os.urandom(32), ServerKey.generate(2).config().encode()
    policy = pol.production([M.hex()], trusted_roots_pem=(pem(dcap_chain.root),))

    def raw(rd, **kw):
        return json.dumps({"provider": "tdx_guest", "outblob": base64.b64encode(dcap_chain.tdx_quote(rd, LAUNCH, **kw)).decode(),
                           "auxblob": ""}).encode()
    v = ev.verify_bundle(_bundle("tdx", raw, nonce, kc), policy, nonce)
    assert v.claims.launch_measurement == LAUNCH and not v.claims.debug
    assert _reason(lambda: ev.verify_bundle(_bundle("tdx", lambda rd: raw(rd, debug=True), nonce, kc), policy, nonce)) == "debug"
    q = bytearray(dcap_chain.tdx_quote(ev.report_data_for(nonce, M, kc), LAUNCH))
    q[48 + 136] ^= 1  # MRTD bit
    tampered = ev.Bundle("tdx", json.dumps({"provider": "tdx_guest", "outblob": base64.b64encode(bytes(q)).decode()}).encode(),
                         kc, M, nonce)
    assert _reason(lambda: ev.verify_bundle(tampered, policy, nonce)) == "bad_signature"
    assert _reason(lambda: ev.verify_bundle(_bundle("tdx", raw, nonce, kc),
                                            dataclasses.replace(policy, trusted_roots_pem=(pem(DcapChain().root),)),
                                            nonce)) == "untrusted_root"


def test_gramine_sgx_quote_verifies_and_rejects(dcap_chain, tmp_path):
    nonce, kc = os.urandom(32), ServerKey.generate(3).config().encode()
    policy = pol.production([M.hex()], trusted_roots_pem=(pem(dcap_chain.root),), launch_measurements=(LAUNCH[:32].hex(),))
    # Gramine's pseudo-file interface, laid out in a folder (the backend reads/writes plain files).
    dev = tmp_path / "attestation"
    dev.mkdir()
    (dev / "attestation_type").write_text("dcap")
    rd = ev.report_data_for(nonce, M, kc)
    (dev / "quote").write_bytes(dcap_chain.sgx_quote(rd, LAUNCH[:32]))
    backend = backend_for("sgx-gramine", device_root=str(dev))
    b = ev.issue(backend, nonce, kc, M)
    assert (dev / "user_report_data").read_bytes() == rd
    v = ev.verify_bundle(b, policy, nonce)
    assert v.claims.tee_type == "sgx-gramine" and v.claims.launch_measurement == LAUNCH[:32]
    (dev / "quote").write_bytes(dcap_chain.sgx_quote(rd, LAUNCH[:32], debug=True))
    assert _reason(lambda: ev.verify_bundle(ev.issue(backend, nonce, kc, M), policy, nonce)) == "debug"
    (dev / "attestation_type").write_text("epid")
    from enclave.attestation import AttestationUnavailable
    with pytest.raises(AttestationUnavailable):
        backend.evidence(nonce, rd)


def test_nvidia_gpu_tokens_verify_and_reject():
    signer = NvidiaSigner()
    nonce, kc = os.urandom(32), ServerKey.generate(4).config().encode()
    policy = pol.Policy(tee_types=("nvidia-gpu-cc",), measurements=(M.hex(),), nvidia_token_keys_pem=(signer.public_pem(),))
    ok = _bundle("nvidia-gpu-cc", signer.evidence, nonce, kc)
    assert ev.verify_bundle(ok, policy, nonce).claims.tee_type == "nvidia-gpu-cc"
    bad_meas = _bundle("nvidia-gpu-cc", lambda rd: signer.evidence(rd, measres="fail"), nonce, kc)
    assert _reason(lambda: ev.verify_bundle(bad_meas, policy, nonce)) == "wrong_measurement"
    other_nonce = _bundle("nvidia-gpu-cc", lambda rd: signer.evidence(rd, nonce_of=b"old"), nonce, kc)
    assert _reason(lambda: ev.verify_bundle(other_nonce, policy, nonce)) == "key_binding"
    forged = _bundle("nvidia-gpu-cc", NvidiaSigner().evidence, nonce, kc)
    assert _reason(lambda: ev.verify_bundle(forged, policy, nonce)) == "bad_signature"
    dbg = _bundle("nvidia-gpu-cc", lambda rd: signer.evidence(rd, dbg="enabled"), nonce, kc)
    assert _reason(lambda: ev.verify_bundle(dbg, policy, nonce)) == "debug"


def test_nvidia_cli_missing_is_a_clear_error():
    from enclave.attestation import AttestationUnavailable
    backend = backend_for("nvidia-gpu-cc", command=("privlm-no-such-nvattest", "{nonce}"))
    with pytest.raises(AttestationUnavailable, match="not on PATH"):
        backend.evidence(os.urandom(32), os.urandom(64))


def test_cpu_plus_gpu_composite_evidence(snp_chain):
    """SEV-SNP CPU evidence + NVIDIA GPU tokens bound to the same report_data (H100 CC deployments)."""
    signer = NvidiaSigner()
    nonce, kc = os.urandom(32), ServerKey.generate(5).config().encode()
    policy = pol.production([M.hex()], trusted_roots_pem=(pem(snp_chain.ark),),
                            nvidia_token_keys_pem=(signer.public_pem(),), required_accelerators=("nvidia-gpu-cc",))
    rd = ev.report_data_for(nonce, M, kc)
    cpu = snp_chain.evidence(rd, LAUNCH)
    both = ev.Bundle("sev-snp", cpu, kc, M, nonce, additional=(("nvidia-gpu-cc", signer.evidence(rd)),))
    v = ev.verify_bundle(both, policy, nonce)
    assert [c.tee_type for c in v.accelerators] == ["nvidia-gpu-cc"]
    assert _reason(lambda: ev.verify_bundle(dataclasses.replace(both, additional=()), policy, nonce)) == \
        "missing_accelerator_evidence"
    other = ev.report_data_for(os.urandom(32), M, kc)  # GPU evidence from another session
    stale_gpu = dataclasses.replace(both, additional=(("nvidia-gpu-cc", signer.evidence(other)),))
    assert _reason(lambda: ev.verify_bundle(stale_gpu, policy, nonce)) == "key_binding"


def test_runtime_attests_gpu_through_the_cli_boundary(tmp_path):
    """The NVIDIA CLI is an external program: a stand-in script prints constructed tokens for the
    nonce it is given, so the subprocess path, binding and verification run for real."""
    import sys

    from enclave_fixtures import dev_policy, sim_config

    from enclave.runtime import ConfidentialRuntime

    signer = NvidiaSigner()
    key_file = tmp_path / "nv.pem"
    from cryptography.hazmat.primitives import serialization
    key_file.write_bytes(signer.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    script = tmp_path / "fake_nvattest.py"
    script.write_text(f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from cryptography.hazmat.primitives import serialization
from tee_fixtures import NvidiaSigner
s = NvidiaSigner()
s.key = serialization.load_pem_private_key(open({str(key_file)!r}, 'rb').read(), None)
nonce = sys.argv[1]
o = s.jwt({{"eat_nonce": nonce, "x-nvidia-overall-att-result": True}})
g = s.jwt({{"eat_nonce": nonce, "measres": "success", "dbgstat": "disabled"}})
print(json.dumps({{"detached_eat": [["JWT", o], {{"GPU-0": g}}]}}))
""")
    cfg = dataclasses.replace(sim_config(tmp_path), gpu_attestation=True,
                              nvidia_command=(sys.executable, str(script), "{nonce}"))
    rt = ConfidentialRuntime(cfg)
    policy = dataclasses.replace(dev_policy(tmp_path, rt), nvidia_token_keys_pem=(signer.public_pem(),),
                                 required_accelerators=("nvidia-gpu-cc",))
    nonce = os.urandom(32)
    v = ev.verify_bundle(rt.evidence(nonce), policy, nonce)
    assert v.claims.simulated and v.accelerators[0].tee_type == "nvidia-gpu-cc"
    from enclave.attestation import AttestationUnavailable
    with pytest.raises(AttestationUnavailable):
        ConfidentialRuntime(dataclasses.replace(cfg, nvidia_command=("privlm-no-such-cli", "{nonce}")))

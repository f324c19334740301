"""Key release to a verified measurement only, wrapped to the attested key; measurement-bound sealing."""
import dataclasses
import hashlib

import numpy as np
import pytest
import tenseal as ts
from enclave_fixtures import MEASUREMENT, dev_policy, sim_runtime

from enclave.attestation import AttestationError
from enclave.attestation import policy as pol
from enclave.audit.events import AuditEvent
from enclave.hpke import SealError, ServerKey
from enclave.key_release import KeyBroker, unwrap
from enclave.sealing import Sealer, SealingError, root_secret


def _kinds(rt):
    return [AuditEvent.decode(e) for e in rt.audit.entries(0, rt.audit.size)]


def _bank_ckks():
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2 ** 40
    return ctx


def test_ckks_secret_key_released_to_verified_enclave_only(tmp_path):
    rt = sim_runtime(tmp_path)
    bank = _bank_ckks()
    public = bank.copy()
    public.make_context_public()
    scores = ts.ckks_vector(public, [0.25, 0.5, 0.75]).serialize()  # what the HE service returns
    broker = KeyBroker(dev_policy(tmp_path, rt), audit=rt.audit)
    broker.add_secret("ckks/bank-a", bank.serialize(save_secret_key=True), measurements=[MEASUREMENT.hex()])

    wrapped = broker.release("ckks/bank-a", rt.evidence(broker.challenge()), tenant="bank-a")
    ctx = ts.context_from(unwrap(rt.keys, wrapped, rt.measurement))
    np.testing.assert_allclose(ts.ckks_vector_from(ctx, scores).decrypt(), [0.25, 0.5, 0.75], atol=1e-4)
    # Someone who copied the wrapped blob but lacks the attested private key gets nothing.
    with pytest.raises(SealError):
        unwrap({wrapped.message.key_id: ServerKey.generate(wrapped.message.key_id)}, wrapped, rt.measurement)
    released = [e for e in _kinds(rt) if e.kind == "key_released"]
    assert len(released) == 1 and released[0].tenant == "bank-a"
    assert b"ckks" not in b"".join(rt.audit.entries(0, rt.audit.size))  # the name is hashed too


def test_release_refusals_are_audited(tmp_path):
    rt = sim_runtime(tmp_path)
    policy = dev_policy(tmp_path, rt)
    broker = KeyBroker(policy, audit=rt.audit)
    broker.add_secret("model-key", b"k" * 32)
    broker.add_secret("narrow", b"n" * 32, measurements=[hashlib.sha384(b"other").hexdigest()])

    def reason(fn):
        with pytest.raises(AttestationError) as err:
            fn()
        return err.value.reason

    nonce = broker.challenge()
    good = rt.evidence(nonce)
    broker.release("model-key", good)
    assert reason(lambda: broker.release("model-key", good)) == "stale_nonce"  # challenge is single-use
    assert reason(lambda: broker.release("model-key", rt.evidence(b"n" * 32))) == "stale_nonce"  # not issued
    b = rt.evidence(broker.challenge())
    swapped = dataclasses.replace(b, key_config=ServerKey.generate(b.key_config[0]).config().encode())
    assert reason(lambda: broker.release("model-key", swapped)) == "key_binding"
    assert reason(lambda: broker.release("narrow", rt.evidence(broker.challenge()))) == "wrong_measurement"
    prod = KeyBroker(pol.production([MEASUREMENT.hex()]), audit=rt.audit)
    prod.add_secret("model-key", b"k" * 32)
    assert reason(lambda: prod.release("model-key", rt.evidence(prod.challenge()))) == "simulation_not_allowed"
    denied = [e.labels["reason"] for e in _kinds(rt) if e.kind == "key_release_denied"]
    assert denied == ["stale_nonce", "stale_nonce", "key_binding", "wrong_measurement", "simulation_not_allowed"]


def test_sealing_is_bound_to_measurement(tmp_path):
    root = root_secret("simulated", tmp_path)
    assert root == root_secret("simulated", tmp_path)  # stable across restarts
    a = Sealer(root, hashlib.sha384(b"build A").digest())
    blob = a.seal(b"kv cache spill", label=b"cache")
    assert Sealer(root, a.measurement).unseal(blob, label=b"cache") == b"kv cache spill"
    b = Sealer(root, hashlib.sha384(b"build B").digest())
    with pytest.raises(SealingError, match="different measurement"):
        b.unseal(blob, label=b"cache")
    relabelled = blob[:4] + b.measurement + blob[4 + 48:]  # lie about the measurement in the header
    with pytest.raises(SealingError):
        b.unseal(relabelled, label=b"cache")
    with pytest.raises(SealingError):
        a.unseal(blob[:-1] + bytes([blob[-1] ^ 1]), label=b"cache")
    with pytest.raises(SealingError):
        a.unseal(blob, label=b"other")


def test_policy_change_and_he_context_registration_are_audited(tmp_path):
    rt = sim_runtime(tmp_path)
    broker = KeyBroker(dev_policy(tmp_path, rt), audit=rt.audit)
    new = pol.production([MEASUREMENT.hex()], name="bank-a-prod")
    broker.set_policy(new, tenant="bank-a")
    public = _bank_ckks()
    public.make_context_public()
    idx = rt.record("he_context_registered", tenant="bank-a",
                    hashes={"context_sha256": hashlib.sha256(public.serialize()).hexdigest()})
    events = _kinds(rt)
    changed = [e for e in events if e.kind == "policy_changed"][0]
    assert changed.hashes["new_policy_sha256"] == new.digest() and changed.labels["policy_id"] == "bank-a-prod"
    assert events[idx].kind == "he_context_registered"
    with pytest.raises(ValueError):
        rt.record("he_context_registered", labels={"secret": "the raw key bytes here"})


def test_bank_provisions_ckks_key_over_grpc_push_model(tmp_path):
    import asyncio

    import grpc
    from enclave_fixtures import channel, serve

    from enclave.client import ConfidentialClient
    from privlm.v1 import enclave_pb2, enclave_pb2_grpc

    rt = sim_runtime(tmp_path)
    bank = _bank_ckks()
    public = bank.copy()
    public.make_context_public()
    scores = ts.ckks_vector(public, [0.9, 0.1]).serialize()

    async def main():
        server, port, _ = await serve(rt)
        out = {}
        async with channel(port) as ch:
            client = ConfidentialClient(ch, dev_policy(tmp_path, rt), tenant="bank-a")
            out["measurement"] = await client.provision_secret("ckks-secret-key", bank.serialize(save_secret_key=True))
            # Replaying the captured provisioning, or re-labelling it for another tenant, fails.
            captured = {}
            orig = client.stub.ProvisionSecret

            async def spy(req, timeout=None):
                captured["req"] = req
                return await orig(req, timeout=timeout)
            client.stub.ProvisionSecret = spy
            await client.provision_secret("model-key", b"k" * 32)
            stub = enclave_pb2_grpc.ConfidentialStub(ch)
            for mutate in ("replay", "tenant"):
                req = enclave_pb2.ProvisionSecretRequest()
                req.CopyFrom(captured["req"])
                if mutate == "tenant":
                    req.tenant = "bank-b"
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ProvisionSecret(req)
                out[mutate] = err.value.code()
        await server.stop(None)
        return out

    out = asyncio.run(main())
    assert out["measurement"] == rt.measurement
    ctx = ts.context_from(rt.secret("bank-a", "ckks-secret-key"))
    np.testing.assert_allclose(ts.ckks_vector_from(ctx, scores).decrypt(), [0.9, 0.1], atol=1e-4)
    assert out["replay"] == grpc.StatusCode.PERMISSION_DENIED and out["tenant"] == grpc.StatusCode.INVALID_ARGUMENT
    assert rt.rejections["replayed"] == 1 and rt.rejections["wrong_binding"] == 1
    from privlm.base.errors import NotFound
    with pytest.raises(NotFound):
        rt.secret("bank-b", "ckks-secret-key")
    assert [e.tenant for e in _kinds(rt) if e.kind == "key_released"] == ["bank-a", "bank-a"]

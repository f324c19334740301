"""Bad input gets a clear status, and the service keeps serving everyone else afterwards."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import tenseal as ts
from he_support import F, make_records

from privlm.v1 import he_pb2 as pb
from services.he.client import HEClient, score_request
from services.he.keys import BankKeys


def _code(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


@pytest.fixture()
def req(client, keys1):
    client.register(keys1)
    return score_request(keys1, make_records(3), packing="record_per_ciphertext")


def _score(client, request):
    return client.stub.ScoreBatch(request, metadata=client.metadata, timeout=30)


def _with(request, cts=None, **fields):
    out = pb.ScoreBatchRequest()
    out.CopyFrom(request)
    if cts is not None:
        del out.ciphertexts[:]
        out.ciphertexts.extend(cts)
    for k, v in fields.items():
        setattr(out, k, v)
    return out


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "header_flipped", "tail_cut"])
def test_corrupt_or_truncated_ciphertext(client, req, damage):
    good = req.ciphertexts[1]
    bad = {"random": np.random.default_rng(0).bytes(len(good)), "truncated": good[: len(good) // 2],
           "empty": b"", "header_flipped": bytes(b ^ 0xFF for b in good[:32]) + good[32:],
           "tail_cut": good[:-7]}[damage]
    code, details = _code(lambda: _score(client, _with(req, [req.ciphertexts[0], bad, req.ciphertexts[2]])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "ciphertexts[1]" in details


def test_ciphertext_from_other_parameters(client, req, keys2):
    foreign = keys2.encrypt_records(make_records(1))[0]          # depth-2 ring, registered context is depth 1
    code, details = _code(lambda: _score(client, _with(req, [req.ciphertexts[0], foreign, req.ciphertexts[2]])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "other parameters" in details


def test_wrong_vector_length_and_count(client, req, keys1):
    short = keys1.encrypt_records(np.ones((1, F - 1)))[0]
    code, details = _code(lambda: _score(client, _with(req, [req.ciphertexts[0], short, req.ciphertexts[2]])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"expected {F}" in details
    code, details = _code(lambda: _score(client, _with(req, list(req.ciphertexts[:2]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected 3 ciphertexts" in details
    code, _ = _code(lambda: _score(client, _with(req, num_records=0)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = _code(lambda: _score(client, _with(req, packing=pb.PACKING_UNSPECIFIED)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # feature-major: a block vector with the wrong number of records
    fm = score_request(keys1, make_records(30), packing="feature_major")
    odd = keys1.encrypt_vector(np.ones(29))
    code, details = _code(lambda: _score(client, _with(fm, [*fm.ciphertexts[:-1], odd])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected 30" in details


def test_exhausted_depth(client, req, keys1):
    # A ciphertext that already used its only level (the bank squared it locally).
    v = ts.ckks_vector(keys1._ctx, make_records(1)[0] / 1e5)
    used = (v * v).serialize()
    code, details = _code(lambda: _score(client, _with(req, [used, *req.ciphertexts[1:]])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "depth exhausted" in details
    # The sigmoid asked for on a depth-1 context
    code, details = _code(lambda: _score(client, _with(req, activation=pb.ACTIVATION_SIGMOID)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "needs 3 multiplicative levels" in details
    # variance needs 2 levels
    with pytest.raises(grpc.RpcError) as info:
        client.aggregate(keys1, np.ones((3, 4)), ["variance"])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_rotations_needed_but_absent(client, keys1_plain):
    client.register(keys1_plain)
    r = score_request(keys1_plain, make_records(2), packing="record_per_ciphertext")
    code, details = _code(lambda: _score(client, r))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "Galois" in details
    with pytest.raises(grpc.RpcError) as info:
        client.aggregate(keys1_plain, np.ones((2, 3)), ["sum"], axis="slots")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_unknown_context_model_and_other_tenant(client, req, target, keys1):
    code, _ = _code(lambda: _score(client, _with(req, context_id="ab" * 32)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code(lambda: _score(client, _with(req, model_id="sha256:nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    with HEClient(target, tenant="other-bank") as other:       # contexts are per tenant
        code, _ = _code(lambda: _score(other, req))
        assert code == grpc.StatusCode.NOT_FOUND


def test_oversized_payload(loop_thread, tmp_path, he_model, keys1):
    from services.he.config import HEServiceConfig
    from services.he.model import save_model
    from services.he.server import create_server

    path = save_model(he_model, tmp_path / "m.json")
    cfg = HEServiceConfig(model_files=(str(path),), max_request_bytes=300_000, max_ciphertexts_per_request=4,
                          max_context_bytes=2_500_000, max_context_bytes_per_tenant=8_000_000, plaintext_dev=True)
    server, port = loop_thread.run(create_server(cfg))
    loop_thread.run(server.start())
    try:
        with HEClient(f"127.0.0.1:{port}") as c:
            c.register(keys1)
            r = score_request(keys1, make_records(3), packing="record_per_ciphertext")   # ~700 KB
            code, details = _code(lambda: _score(c, r))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 300000" in details
            r = score_request(keys1, make_records(5), packing="record_per_ciphertext")
            code, details = _code(lambda: _score(c, r))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 4" in details
            mid = BankKeys.generate(depth=1, rotations_for=64)                              # ~3.3 MB context
            assert 2_500_000 < len(mid.public_context) < cfg.transport_max_bytes
            code, details = _code(lambda: c.register(mid))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 2500000" in details
            # beyond the transport limit (application limit + 4 MiB) gRPC itself answers RESOURCE_EXHAUSTED
            big = b"\0" * (cfg.transport_max_bytes + 1)
            code, _ = _code(lambda: c.stub.RegisterContext(pb.RegisterContextRequest(public_context=big)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # one record still fits and is served
            out = c.score(keys1, make_records(1))
            assert out.values.shape == (1,)
    finally:
        loop_thread.run(server.stop(0))
        server.privlm_servicer.close()


def test_context_limits_per_tenant(loop_thread, tmp_path, he_model):
    from services.he.config import HEServiceConfig
    from services.he.model import save_model
    from services.he.server import create_server

    cfg = HEServiceConfig(model_files=(str(save_model(he_model, tmp_path / "m.json")),), max_contexts_per_tenant=3,
                          plaintext_dev=True)
    server, port = loop_thread.run(create_server(cfg))
    loop_thread.run(server.start())
    try:
        with HEClient(f"127.0.0.1:{port}", tenant="limited") as c:
            keys = [BankKeys.generate(depth=1) for _ in range(4)]
            for k in keys[:3]:
                c.register(k)
            assert c.stub.RegisterContext(pb.RegisterContextRequest(public_context=keys[0].public_context),
                                          metadata=c.metadata).already_registered
            code, details = _code(lambda: c.register(keys[3]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 3" in details
            with HEClient(f"127.0.0.1:{port}", tenant="another") as other:   # the bound is per tenant
                other.register(keys[3])
            c.delete(keys[0])                            # key rotation frees a slot
            c.register(keys[3])
            code, _ = _code(lambda: c.delete(keys[0]))
            assert code == grpc.StatusCode.NOT_FOUND
    finally:
        loop_thread.run(server.stop(0))
        server.privlm_servicer.close()


def test_bad_contexts(client):
    bfv = ts.context(ts.SCHEME_TYPE.BFV, 4096, plain_modulus=1032193)
    bfv.make_context_public()
    no_scale = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    no_scale.make_context_public()
    for blob in (b"", b"not a context", np.random.default_rng(1).bytes(5000), bfv.serialize(), no_scale.serialize()):
        code, _ = _code(lambda: client.stub.RegisterContext(pb.RegisterContextRequest(public_context=blob)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_still_serving_after_errors(client, keys1, he_model):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="privlm.v1.HomomorphicPreprocessor")).status == \
        health_pb2.HealthCheckResponse.SERVING
    x = make_records(4, seed=21)
    out = client.score(keys1, x)
    np.testing.assert_allclose(out.values, he_model.logit(x), atol=1e-3)


def test_describe(client, keys3, he_model):
    client.register(keys3)
    d = client.describe(keys3.context_id)
    assert d.parameters.poly_modulus_degree == 16384 and d.parameters.multiplicative_depth == 3
    assert list(d.parameters.coeff_modulus_bits) == [60, 40, 40, 40, 60]
    assert d.parameters.scale_bits == 40 and d.parameters.slots == 8192 and not d.parameters.has_galois_keys
    default = [m for m in d.models if m.is_default]
    assert len(default) == 1 and default[0].model_id == he_model.model_id and default[0].num_features == F
    assert default[0].sigmoid_depth == 2 and d.variance_depth == 2
    assert d.limits.max_contexts_per_tenant == 32


def test_overload_is_refused_promptly_and_expired_work_dropped(loop_thread, tmp_path, he_model, keys1):
    """max_pending bounds queued + running work: extra requests get RESOURCE_EXHAUSTED at once, not a
    timeout; a request whose deadline passes while queued is never computed."""
    import asyncio

    from services.he.client import AsyncHEClient
    from services.he.config import HEServiceConfig
    from services.he.model import save_model
    from services.he.server import create_server

    cfg = HEServiceConfig(model_files=(str(save_model(he_model, tmp_path / "m.json")),), workers=1, max_pending=2,
                          plaintext_dev=True)
    server, port = loop_thread.run(create_server(cfg))
    loop_thread.run(server.start())
    servicer = server.privlm_servicer
    slow_req = score_request(keys1, make_records(200), packing="record_per_ciphertext")   # ~200 dot products
    one = score_request(keys1, make_records(1), packing="record_per_ciphertext")

    async def scenario():
        c = AsyncHEClient(f"127.0.0.1:{port}")
        try:
            await c.register(keys1.public_context)
            runs = servicer.jobs_run
            slow = asyncio.ensure_future(c.score(slow_req, timeout=120))
            while servicer.jobs_run == runs:                 # the slow job now holds the only worker
                await asyncio.sleep(0.005)
            late = asyncio.ensure_future(c.score(one, timeout=0.1))     # queued behind it: pending = 2
            while servicer._pending < 2:
                await asyncio.sleep(0.002)
            burst = await asyncio.gather(*(c.score(one, timeout=60) for _ in range(3)), return_exceptions=True)
            burst_done_before_slow = not slow.done()
            late_result = (await asyncio.gather(late, return_exceptions=True))[0]
            await slow
            await asyncio.sleep(0.2)
            return burst, burst_done_before_slow, late_result, servicer.jobs_run - runs
        finally:
            await c.close()

    try:
        burst, prompt, late, runs = loop_thread.run(scenario())
    finally:
        loop_thread.run(server.stop(0))
        servicer.close()
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in burst)
    assert prompt                                          # refused while the slow job was still running
    assert isinstance(late, grpc.aio.AioRpcError) and late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert runs == 1                                       # only the slow job ran; the expired one never did


def test_mutated_ciphertexts_and_contexts_fuzz(he_model, keys1):
    """Random byte flips and cuts: every outcome is a result or a caller error, never a crash or an
    internal error. (A flip that keeps coefficients below their moduli loads and computes garbage:
    ciphertexts carry no integrity tag the server could check; mTLS protects them in transit.)"""
    from privlm.base.errors import FailedPrecondition, InvalidArgument
    from services.he.config import HEServiceConfig
    from services.he.engine import HEEngine, ScoreJob

    eng = HEEngine(HEServiceConfig(max_contexts_per_tenant=100, max_context_bytes_per_tenant=1 << 30, plaintext_dev=True),
                   [he_model])
    eng.register_context("t", keys1.public_context)
    good = keys1.encrypt_records(make_records(1))[0]
    rng = np.random.default_rng(2024)

    def mutate(blob: bytes, head: int) -> bytes:
        b = bytearray(blob)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, head if rng.random() < 0.5 else len(b)))
            b[pos] ^= int(rng.integers(1, 256))
        return bytes(b[:int(rng.integers(0, len(b)))]) if rng.random() < 0.2 else bytes(b)

    outcomes = {"ok": 0, "refused": 0}
    for _ in range(120):
        try:
            eng.score("t", ScoreJob(keys1.context_id, "", "record_per_ciphertext", 1, [mutate(good, 200)], "none"))
            outcomes["ok"] += 1
        except (InvalidArgument, FailedPrecondition):
            outcomes["refused"] += 1
    assert outcomes["refused"] > 60
    small = BankKeys.generate(depth=1).public_context
    for i in range(25):
        try:
            eng.register_context(f"fuzz-{i}", mutate(small, 400))
        except InvalidArgument:
            pass
    out = eng.score("t", ScoreJob(keys1.context_id, "", "record_per_ciphertext", 1, [good], "none"))
    np.testing.assert_allclose(keys1.decrypt_scores(out.context_id, "record_per_ciphertext", 1, out.scores),
                               he_model.logit(make_records(1)), atol=1e-3)

"""The service cannot decrypt: no secret key is accepted, held, or ever sent; wrong keys are caught."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import tenseal as ts
from he_support import make_records

from privlm.v1 import he_pb2 as pb
from services.he.client import HEClient, read_scores, score_request
from services.he.keys import BankKeys, KeyMismatch


class _Recorder(grpc.UnaryUnaryClientInterceptor):
    """Keeps every serialized request that leaves the client: what the service (or the network) sees."""

    def __init__(self):
        self.sent: list[bytes] = []

    def intercept_unary_unary(self, continuation, details, request):
        self.sent.append(request.SerializeToString())
        return continuation(details, request)


def test_context_with_secret_key_is_refused_and_not_stored(client, engine, keys1):
    before = len(engine.held_contexts())
    private = keys1._ctx.serialize(save_secret_key=True)
    with pytest.raises(grpc.RpcError) as info:
        client.stub.RegisterContext(pb.RegisterContextRequest(public_context=private), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "secret key" in info.value.details()
    assert len(engine.held_contexts()) == before


def test_server_holds_no_secret_and_cannot_decrypt(client, engine, keys1, he_model):
    client.register(keys1)
    x = make_records(4, seed=2)
    resp = client.stub.ScoreBatch(score_request(keys1, x), metadata=client.metadata)
    held = engine.held_contexts()
    assert held
    secret = keys1.holds_secret()
    assert len(secret) > 1000
    for ctx in held:
        assert ctx.is_public() and not ctx.has_secret_key()
        with pytest.raises(ValueError):
            ctx.secret_key()
        # everything the server could serialize from what it holds lacks the secret key
        assert secret not in ctx.serialize(save_secret_key=False)
    # the server's own context cannot decrypt the score it computed
    server_ctx = next(c for c in held if c.has_galois_keys())
    for blob in resp.scores:
        with pytest.raises(ValueError):
            ts.ckks_vector_from(server_ctx, blob).decrypt()
    # ...while the bank can
    np.testing.assert_allclose(read_scores(keys1, resp).values, he_model.logit(x), atol=1e-3)


@pytest.mark.parametrize("symmetric", [False, True])
def test_secret_key_never_leaves_the_client(target, he_model, symmetric):
    keys = BankKeys.generate(depth=1, rotations_for=8, symmetric=symmetric)
    recorder = _Recorder()
    with HEClient(target) as c:
        c.channel = grpc.intercept_channel(c.channel, recorder)
        from privlm.v1 import he_pb2_grpc

        c.stub = he_pb2_grpc.HomomorphicPreprocessorStub(c.channel)
        c.register(keys)
        x = make_records(50)
        np.testing.assert_allclose(c.score(keys, x[:3]).values, he_model.logit(x[:3]), atol=1e-3)
        np.testing.assert_allclose(c.score(keys, x).values, he_model.logit(x), atol=1e-3)
        c.aggregate(keys, np.ones((2, 5)), ["sum", "mean"])
    secret = keys.holds_secret()
    assert len(recorder.sent) >= 4
    for blob in recorder.sent:
        assert secret not in blob
        assert secret[:64] not in blob and secret[-64:] not in blob


def test_wrong_key_is_detected_not_garbage(client, keys1, he_model):
    client.register(keys1)
    x = make_records(3, seed=8)
    resp = client.stub.ScoreBatch(score_request(keys1, x), metadata=client.metadata)
    other = BankKeys.generate(depth=1, rotations_for=8)            # same parameters, another key
    # Without the check TenSEAL silently returns garbage:
    garbage = np.asarray(ts.ckks_vector_from(other._ctx, resp.scores[0]).decrypt()[0])
    assert abs(garbage - he_model.logit(x[:1])[0]) > 1.0
    # With it, decryption is refused:
    with pytest.raises(KeyMismatch):
        read_scores(other, resp)
    # The enclave path: a released (exported) key decrypts, and is checked the same way.
    released = BankKeys.import_secret(keys1.export_secret())
    np.testing.assert_allclose(read_scores(released, resp).values, he_model.logit(x), atol=1e-3)
    with pytest.raises(KeyMismatch):
        read_scores(BankKeys.import_secret(other.export_secret()), resp)


def test_several_clients_at_once(target, he_model):
    """Six banks (own tenant, own keys) score concurrently through real channels; each gets its own
    correct results while one of them keeps sending bad requests."""
    errors: list[BaseException] = []
    results: dict[int, float] = {}
    keys = [BankKeys.generate(depth=1, rotations_for=8) for _ in range(5)]

    def bank(i: int):
        try:
            with HEClient(target, tenant=f"bank-{i}") as c:
                c.register(keys[i])
                worst = 0.0
                for rnd in range(4):
                    x = make_records(3 if rnd % 2 else 70, seed=100 * i + rnd)
                    out = c.score(keys[i], x)
                    worst = max(worst, float(np.abs(out.values - he_model.logit(x)).max()))
                results[i] = worst
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def vandal():
        with HEClient(target, tenant="bank-0") as c:
            for _ in range(10):
                try:
                    c.stub.ScoreBatch(pb.ScoreBatchRequest(context_id=keys[0].context_id,
                                                           packing=pb.PACKING_RECORD_PER_CIPHERTEXT, num_records=1,
                                                           ciphertexts=[b"\x00garbage"]), metadata=c.metadata)
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                        errors.append(exc)

    threads = [threading.Thread(target=bank, args=(i,)) for i in range(5)] + [threading.Thread(target=vandal)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(results) == list(range(5))
    assert max(results.values()) < 1e-3


def test_trace_spans_carry_sizes_not_values(loop_thread, tmp_path, he_model, keys1):
    """One trace client -> server: the RPC span and a privlm.he.score child with sizes and ids only."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.he.config import HEServiceConfig
    from services.he.model import save_model
    from services.he.server import create_server

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = HEServiceConfig(model_files=(str(save_model(he_model, tmp_path / "m.json")),), plaintext_dev=True)
    server, port = loop_thread.run(create_server(cfg, [aio_server_interceptor(tracer_provider=provider)], provider))
    loop_thread.run(server.start())
    try:
        with HEClient(f"127.0.0.1:{port}") as c:
            c.register(keys1)
            x = make_records(3)
            c.score(keys1, x)
            with pytest.raises(grpc.RpcError):
                c.stub.ScoreBatch(pb.ScoreBatchRequest(context_id=keys1.context_id, num_records=1,
                                                       packing=pb.PACKING_RECORD_PER_CIPHERTEXT,
                                                       ciphertexts=[b"junk"]), metadata=c.metadata)
    finally:
        loop_thread.run(server.stop(0))
        server.privlm_servicer.close()
    spans = exporter.get_finished_spans()
    scores = [s for s in spans if s.name == "privlm.he.score"]
    assert len(scores) == 2
    ok, bad = scores
    rpc = [s for s in spans if s.name.endswith("ScoreBatch")]
    assert rpc and ok.parent is not None and ok.parent.span_id in {s.context.span_id for s in rpc}
    assert ok.attributes["privlm.he.records"] == 3 and ok.attributes["privlm.he.packing"] == "record_per_ciphertext"
    assert bad.status.status_code.name == "ERROR"
    for s in spans:
        for v in (s.attributes or {}).values():
            assert not isinstance(v, bytes) and len(str(v)) < 200
            assert str(v) not in (str(float(t)) for t in x.ravel())


def test_async_forwarder_and_enclave_decrypt(loop_thread, target, keys1, he_model):
    """The risk-alert path: the bank encrypts one transaction, a service forwards the bytes through
    AsyncHEClient (never able to read them), the holder of the released key decrypts the score."""
    from services.he.client import AsyncHEClient

    x = make_records(4, seed=31)
    cts = keys1.encrypt_records(x)                         # at the bank

    async def forward():
        c = AsyncHEClient(target)
        try:
            await c.register(keys1.public_context)
            return [await c.score_one(keys1.context_id, ct, timeout=30) for ct in cts]
        finally:
            await c.close()

    responses = loop_thread.run(forward())
    enclave = BankKeys.import_secret(keys1.export_secret())
    got = np.concatenate([read_scores(enclave, r).values for r in responses])
    np.testing.assert_allclose(got, he_model.logit(x), atol=1e-3)

"""Sealed generation over real gRPC: attest, seal, stream; every refusal counted and audited."""
import asyncio

import grpc
import pytest
from enclave_fixtures import channel, dev_policy, serve, sim_runtime

from enclave.attestation import AttestationError
from enclave.attestation import policy as pol
from enclave.audit.events import AuditEvent
from enclave.client import ConfidentialClient, open_stream
from enclave.hpke import ServerKey
from privlm.v1 import enclave_pb2, enclave_pb2_grpc, inference_pb2


def _events(rt, kind):
    return [e for e in (AuditEvent.decode(b) for b in rt.audit.entries(0, rt.audit.size)) if e.kind == kind]


def test_sealed_stream_end_to_end_and_audit(tmp_path):
    rt = sim_runtime(tmp_path)

    async def main():
        server, port, names = await serve(rt)
        assert names == ["privlm.v1.Confidential", "privlm.v1.Audit"]
        async with channel(port) as ch:
            client = ConfidentialClient(ch, dev_policy(tmp_path, rt), tenant="bank-a")
            verified = await client.attest()
            assert verified.claims.simulated and verified.measurement == rt.measurement
            req = inference_pb2.GenerateRequest(prompt="IBAN DE89 3704 0044 0532 0130 00", request_id="r1")
            out = [r async for r in client.generate_stream(req, trace_id="ab" * 16)]
        await server.stop(None)
        return out

    out = asyncio.run(main())
    assert "".join(r.text for r in out) == "sealed answer 32"
    assert out[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    opened = _events(rt, "sealed_request_opened")
    assert len(opened) == 1 and opened[0].tenant == "bank-a" and opened[0].trace_id == "ab" * 16
    raw_log = b"".join(rt.audit.entries(0, rt.audit.size))
    assert b"IBAN" not in raw_log and b"DE89" not in raw_log  # never plaintext in the log
    assert _events(rt, "evidence_issued") and _events(rt, "measurement_registered")


def _flip(b: bytes, i: int = 0) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x80]) + b[i + 1:]


def test_tampered_and_replayed_requests_refused_counted_audited(tmp_path):
    rt = sim_runtime(tmp_path)

    async def main():
        server, port, _ = await serve(rt)
        codes = {}
        async with channel(port) as ch:
            client = ConfidentialClient(ch, dev_policy(tmp_path, rt), tenant="bank-a")
            stub = enclave_pb2_grpc.ConfidentialStub(ch)
            req = inference_pb2.GenerateRequest(prompt="hello")
            for field in ("enc", "ciphertext", "aad", "key_id"):
                sealed, _ = await client.seal_request(req)
                if field == "key_id":
                    sealed.key_id ^= 1
                else:
                    setattr(sealed, field, _flip(getattr(sealed, field)))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [c async for c in stub.GenerateSealed(sealed)]
                codes[field] = err.value.code()
            sealed, ctx = await client.seal_request(req)
            first = [r async for r in open_stream(stub.GenerateSealed(sealed), ctx, sealed.enc)]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [c async for c in stub.GenerateSealed(sealed)]
            codes["replay"] = err.value.code()
            old = enclave_pb2.SealedRequestContext(tenant="bank-a", sent_at_unix_ms=1)
            stale, _ = await client.seal_request(req)
            from enclave.hpke import seal
            msg, _ = seal(client._verified.key_config, req.SerializeToString(), old.SerializeToString())
            stale = enclave_pb2.SealedRequest(key_id=msg.key_id, kem_id=msg.kem_id, kdf_id=msg.kdf_id,
                                              aead_id=msg.aead_id, enc=msg.enc, ciphertext=msg.ciphertext, aad=msg.aad)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [c async for c in stub.GenerateSealed(stale)]
            codes["stale"] = err.value.code()
        await server.stop(None)
        return codes, first

    codes, first = asyncio.run(main())
    assert first[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    for f in ("enc", "ciphertext", "aad"):
        assert codes[f] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["key_id"] in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    assert codes["replay"] == grpc.StatusCode.PERMISSION_DENIED
    assert codes["stale"] == grpc.StatusCode.PERMISSION_DENIED
    assert rt.rejections["hpke_open_failed"] == 3
    assert rt.rejections["unknown_key_id"] + rt.rejections["hpke_open_failed"] == 4
    assert rt.rejections["replayed"] == 1 and rt.rejections["stale_request"] == 1
    reasons = [e.labels["reason"] for e in _events(rt, "sealed_request_rejected")]
    assert sorted(reasons) == sorted(k for k, v in rt.rejections.items() for _ in range(v))
    assert rt.opened == 1


def test_production_policy_refuses_simulated_gateway(tmp_path):
    rt = sim_runtime(tmp_path)

    async def main():
        server, port, _ = await serve(rt)
        async with channel(port) as ch:
            client = ConfidentialClient(ch, pol.production([rt.measurement.hex()]))
            with pytest.raises(AttestationError) as err:
                await client.attest()
        await server.stop(None)
        return err.value

    assert asyncio.run(main()).reason == "simulation_not_allowed"


def test_errors_inside_the_boundary_come_back_sealed_and_tenant_is_bound(tmp_path):
    from enclave.client import SealedStreamError
    from privlm.base.errors import InvalidArgument
    rt = sim_runtime(tmp_path)

    async def failing(request, context):
        raise InvalidArgument(f"stop sequence {request.prompt!r} is too long")
        yield  # pragma: no cover

    async def main():
        from enclave.gateway_mount import mount
        from privlm.base.grpcserver import bind, new_server
        server = new_server()
        mount(server, failing, rt.config, runtime=rt, tenant_of=lambda ctx: "bank-a")
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        out = {}
        async with channel(port) as ch:
            client = ConfidentialClient(ch, dev_policy(tmp_path, rt), tenant="bank-a")
            with pytest.raises(SealedStreamError) as err:
                [r async for r in client.generate_stream(inference_pb2.GenerateRequest(prompt="ACCT-991"))]
            out["err"] = err.value
            stub = enclave_pb2_grpc.ConfidentialStub(ch)
            sealed, _ = await client.seal_request(inference_pb2.GenerateRequest(prompt="ACCT-991"))
            raw = [c async for c in stub.GenerateSealed(sealed)]
            out["raw"] = raw
            other = ConfidentialClient(ch, dev_policy(tmp_path, rt), tenant="bank-b")
            with pytest.raises(grpc.aio.AioRpcError) as e2:
                [r async for r in other.generate_stream(inference_pb2.GenerateRequest(prompt="x"))]
            out["mismatch"] = e2.value.code()
        await server.stop(None)
        return out

    out = asyncio.run(main())
    assert out["err"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "ACCT-991" in str(out["err"])
    assert len(out["raw"]) == 1 and out["raw"][0].error_code and b"ACCT-991" not in out["raw"][0].ciphertext
    assert out["mismatch"] == grpc.StatusCode.PERMISSION_DENIED
    assert rt.rejections["tenant_mismatch"] == 1


def test_client_reattests_after_gateway_restart(tmp_path):
    """A restarted gateway has a new attested key; the client re-verifies and resends once."""
    rt1 = sim_runtime(tmp_path / "one")

    async def main():
        server, port, _ = await serve(rt1)
        async with channel(port) as ch:
            client = ConfidentialClient(ch, dev_policy(tmp_path / "one", rt1), tenant="bank-a")
            await client.attest()
            old_key = client._verified.key_config
            rt1.keys.clear()  # what a restart looks like to the client: its key id is gone
            rt1.key = ServerKey.generate((old_key.key_id + 1) % 256)
            rt1.keys[rt1.key.key_id] = rt1.key
            out = [r async for r in client.generate_stream(inference_pb2.GenerateRequest(prompt="abc"))]
            new_key = client._verified.key_config
        await server.stop(None)
        return out, old_key, new_key

    out, old_key, new_key = asyncio.run(main())
    assert out[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert old_key != new_key and rt1.rejections["unknown_key_id"] == 1

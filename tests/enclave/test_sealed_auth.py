"""Sealed requests behind the gateway's tenant authentication, over real gRPC and real HPKE.

The server is composed as the gateway composes it: privlm's status mapping, then TenantInterceptor,
then Confidential + Audit mounted with the authenticated tenant (privlm/gateway_app.py ConfidentialMount).
"""
import asyncio
import contextlib

import grpc
import pytest
from enclave_fixtures import channel, dev_policy, sim_runtime, tiny_generate

from enclave.audit.events import AuditEvent
from enclave.client import ConfidentialClient
from enclave.gateway_mount import mount
from enclave.hpke import seal
from gateway.tenants import TenantConfig, TenantInterceptor, TenantRegistry, current_tenant, hash_token
from privlm.base.grpcserver import add_health_and_reflection, bind, new_server
from privlm.v1 import enclave_pb2, enclave_pb2_grpc, inference_pb2

TOKENS = {"bank-a": "plm_token-of-bank-a", "bank-b": "plm_token-of-bank-b"}
MALFORMED = b"\x0a\xff\x01"          # field 1, length 255, one byte present: DecodeError


def _md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


async def _serve(rt, generate=tiny_generate):
    registry = TenantRegistry(tuple(TenantConfig(t, hash_token(tok)) for t, tok in TOKENS.items()))
    server = new_server(inner_interceptors=[TenantInterceptor(registry)])
    mounted = mount(server, generate, rt.config, runtime=rt, tenant_of=lambda ctx: current_tenant.get() or None)
    add_health_and_reflection(server, mounted.names)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    return server, port


@contextlib.asynccontextmanager
async def _stopping(server):
    """Stop the server however the test body ends (a live aio server keeps the loop from closing)."""
    try:
        yield
    finally:
        await server.stop(None)


def _events(rt, kind):
    return [e for e in (AuditEvent.decode(b) for b in rt.audit.entries(0, rt.audit.size)) if e.kind == kind]


def _flip(b: bytes) -> bytes:
    return bytes([b[0] ^ 0x80]) + b[1:]


async def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if hasattr(call, "__aiter__"):
            [c async for c in call]
        else:
            await call
    return err.value.code()


def test_sealed_client_attaches_the_bearer_token(tmp_path):
    rt = sim_runtime(tmp_path)

    async def main():
        server, port = await _serve(rt)
        req = inference_pb2.GenerateRequest(prompt="balance check")
        async with _stopping(server), channel(port) as ch:
            anonymous = ConfidentialClient(ch, dev_policy(tmp_path, rt), tenant="bank-a")
            await anonymous.attest()                     # evidence is public: no token sent for it
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in anonymous.generate_stream(req)]
            client = ConfidentialClient(ch, dev_policy(tmp_path, rt), tenant="bank-a", token=TOKENS["bank-a"])
            out = [r async for r in client.generate_stream(req)]
        return err.value.code(), out

    code, out = asyncio.run(main())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "".join(r.text for r in out) == "sealed answer 13"
    assert [e.tenant for e in _events(rt, "sealed_request_opened")] == ["bank-a"]


def test_every_rejected_sealed_request_is_audited_with_the_authenticated_tenant(tmp_path):
    rt = sim_runtime(tmp_path, max_sealed_request_bytes=4096)

    async def main():
        server, port = await _serve(rt)
        codes = {}
        async with _stopping(server), channel(port) as ch:
            stub = enclave_pb2_grpc.ConfidentialStub(ch)
            client = ConfidentialClient(ch, dev_policy(tmp_path, rt), tenant="bank-a", token=TOKENS["bank-a"])
            req = inference_pb2.GenerateRequest(prompt="hello")
            for case in ("enc", "ciphertext", "aad", "key_id"):
                sealed, _ = await client.seal_request(req)
                if case == "key_id":
                    sealed.key_id ^= 1
                else:
                    setattr(sealed, case, _flip(getattr(sealed, case)))
                codes[case] = await _code(stub.GenerateSealed(sealed, metadata=_md("bank-a")))
            sealed, _ = await client.seal_request(req)
            [c async for c in stub.GenerateSealed(sealed, metadata=_md("bank-a"))]
            codes["replayed"] = await _code(stub.GenerateSealed(sealed, metadata=_md("bank-a")))
            big, _ = await client.seal_request(inference_pb2.GenerateRequest(prompt="x" * 8192))
            codes["too_large"] = await _code(stub.GenerateSealed(big, metadata=_md("bank-a")))
            # Sealed for bank-b (its AAD says so), sent with bank-a's credentials.
            other = ConfidentialClient(ch, dev_policy(tmp_path, rt), tenant="bank-b", token=TOKENS["bank-a"])
            codes["tenant_mismatch"] = await _code(other.generate_stream(req))
            codes["provision_mismatch"] = await _code(other.provision_secret("ckks-secret-key", b"k" * 32))
            ctx = enclave_pb2.SealedRequestContext(tenant="bank-a", sent_at_unix_ms=1).SerializeToString()
            msg, _ = seal(client._verified.key_config, req.SerializeToString(), ctx)
            stale = enclave_pb2.SealedRequest(key_id=msg.key_id, kem_id=msg.kem_id, kdf_id=msg.kdf_id,
                                              aead_id=msg.aead_id, enc=msg.enc, ciphertext=msg.ciphertext, aad=msg.aad)
            codes["stale"] = await _code(stub.GenerateSealed(stale, metadata=_md("bank-a")))
        return codes

    codes = asyncio.run(main())
    assert codes["replayed"] == codes["stale"] == grpc.StatusCode.PERMISSION_DENIED
    assert codes["tenant_mismatch"] == codes["provision_mismatch"] == grpc.StatusCode.PERMISSION_DENIED
    assert codes["key_id"] == grpc.StatusCode.FAILED_PRECONDITION
    assert codes["enc"] == codes["ciphertext"] == codes["aad"] == codes["too_large"] == grpc.StatusCode.INVALID_ARGUMENT
    rejected = _events(rt, "sealed_request_rejected")
    assert sorted(e.labels["reason"] for e in rejected) == sorted(
        ["hpke_open_failed"] * 3 + ["unknown_key_id", "replayed", "too_large", "tenant_mismatch",
                                    "tenant_mismatch", "stale_request"])
    assert {e.tenant for e in rejected} == {"bank-a"}, [(e.labels["reason"], e.tenant) for e in rejected]
    # only the one good request was opened; the misdirected one is refused before it counts as opened
    assert [e.tenant for e in _events(rt, "sealed_request_opened")] == ["bank-a"] and rt.opened == 1


def test_unauthenticated_malformed_bytes_are_unauthenticated(tmp_path):
    """Authentication comes before parsing: a caller without credentials cannot probe the parser."""
    rt = sim_runtime(tmp_path)
    methods = {"/privlm.v1.Confidential/GenerateSealed": "stream", "/privlm.v1.Confidential/ProvisionSecret": "unary",
               "/privlm.v1.Audit/GetEntries": "unary", "/privlm.v1.Audit/GetCheckpoint": "unary"}

    async def main():
        server, port = await _serve(rt)
        size_before = rt.audit.size
        got = {}
        async with _stopping(server), channel(port) as ch:
            for method, kind in methods.items():
                call = ch.unary_stream(method) if kind == "stream" else ch.unary_unary(method)
                for who, md in (("none", ()), ("wrong", (("authorization", "Bearer plm_nope"),)),
                                ("bank-a", _md("bank-a"))):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        res = call(MALFORMED, metadata=md, timeout=10)
                        if kind == "stream":
                            [c async for c in res]
                        else:
                            await res
                    got[method, who] = (err.value.code(), err.value.details())
            evidence = ch.unary_unary("/privlm.v1.Confidential/GetEvidence")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await evidence(MALFORMED, timeout=10)     # public method: parsing is all there is
            got["evidence"] = (err.value.code(), err.value.details())
        return got, size_before

    got, size_before = asyncio.run(main())
    for method in methods:
        assert got[method, "none"][0] == grpc.StatusCode.UNAUTHENTICATED, (method, got[method, "none"])
        assert got[method, "wrong"][0] == grpc.StatusCode.UNAUTHENTICATED, (method, got[method, "wrong"])
        code, details = got[method, "bank-a"]
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"malformed request message for {method}" in details
    assert got["evidence"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert rt.audit.size == size_before and not rt.rejections   # nothing reached the runtime

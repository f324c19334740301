"""Client library: attest the gateway against a pinned policy, seal requests, open sealed streams.

    client = ConfidentialClient(channel, policy, tenant="bank-a", token=bearer_token)
    verified = await client.attest()                       # fresh nonce, full verification
    async for resp in client.generate_stream(request):     # GenerateRequest -> GenerateStreamResponse
        ...
Nothing is sent before the evidence verifies; evidence is re-fetched after policy.max_age_s.
The bearer token goes with every call except GetEvidence: the gateway is verified before it is
trusted with a credential.
"""
from __future__ import annotations

import os
import time
from typing import AsyncIterator

import grpc

from enclave import evidence as ev
from enclave.attestation.policy import Policy
from enclave.audit.checkpoint import Checkpoint
from enclave.hpke import ResponseOpener, SealError, seal
from privlm.v1 import enclave_pb2, enclave_pb2_grpc, inference_pb2


def bundle_from_pb(e: enclave_pb2.Evidence) -> ev.Bundle:
    t = None
    if e.HasField("inclusion"):
        c = e.inclusion.checkpoint
        cp = Checkpoint(c.origin, c.tree_size, bytes(c.root_hash), c.timestamp_unix_ms, bytes(c.key_id),
                        bytes(c.signature))
        t = ev.TransparencyProof(cp, e.inclusion.leaf_index, bytes(e.inclusion.leaf),
                                 tuple(bytes(p) for p in e.inclusion.path))
    extra = tuple((a.tee_type, bytes(a.raw)) for a in e.additional)
    return ev.Bundle(e.tee_type, bytes(e.raw), bytes(e.key_config), bytes(e.measurement), bytes(e.nonce), t, extra)


async def fetch_and_verify(stub: enclave_pb2_grpc.ConfidentialStub, policy: Policy,
                           timeout: float = 30.0) -> ev.Verified:
    """One attestation round: fresh 32-byte nonce, GetEvidence, verify_bundle (raises AttestationError)."""
    nonce = os.urandom(32)
    resp = await stub.GetEvidence(enclave_pb2.GetEvidenceRequest(nonce=nonce), timeout=timeout)
    return ev.verify_bundle(bundle_from_pb(resp.evidence), policy, nonce)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer <token>` as call metadata. Metadata rather than grpc call credentials:
    gRPC refuses call credentials on a channel without TLS, and development channels have none."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class ConfidentialClient:
    def __init__(self, channel: grpc.aio.Channel, policy: Policy, tenant: str = "", token: str | None = None):
        self.stub = enclave_pb2_grpc.ConfidentialStub(channel)
        self.policy = policy
        self.tenant = tenant
        md = bearer_metadata(token)
        self._auth = {"metadata": md} if md else {}     # anonymous: no metadata argument at all
        self._verified: ev.Verified | None = None
        self._verified_at = 0.0

    async def attest(self) -> ev.Verified:
        self._verified = await fetch_and_verify(self.stub, self.policy)
        self._verified_at = time.monotonic()
        return self._verified

    async def verified(self) -> ev.Verified:
        if self._verified is None or time.monotonic() - self._verified_at > self.policy.max_age_s:
            return await self.attest()
        return self._verified

    async def seal_request(self, request: inference_pb2.GenerateRequest, trace_id: str = ""):
        """(SealedRequest proto, HPKE sender context) for callers that drive the RPC themselves."""
        verified = await self.verified()
        aad = enclave_pb2.SealedRequestContext(tenant=self.tenant, sent_at_unix_ms=int(time.time() * 1000),
                                               trace_id=trace_id).SerializeToString()
        msg, ctx = seal(verified.key_config, request.SerializeToString(), aad)
        pb = enclave_pb2.SealedRequest(key_id=msg.key_id, kem_id=msg.kem_id, kdf_id=msg.kdf_id,
                                       aead_id=msg.aead_id, enc=msg.enc, ciphertext=msg.ciphertext, aad=msg.aad)
        return pb, ctx

    async def provision_secret(self, name: str, value: bytes, timeout: float = 30.0) -> bytes:
        """Push key release: seal `value` to the verified key for this tenant; returns the measurement."""
        from enclave.key_release import seal_for_provision
        verified = await self.verified()
        sent_at = int(time.time() * 1000)
        msg = seal_for_provision(verified, self.tenant, name, value, sent_at)
        sealed = enclave_pb2.SealedRequest(key_id=msg.key_id, kem_id=msg.kem_id, kdf_id=msg.kdf_id,
                                           aead_id=msg.aead_id, enc=msg.enc, ciphertext=msg.ciphertext, aad=msg.aad)
        resp = await self.stub.ProvisionSecret(enclave_pb2.ProvisionSecretRequest(
            tenant=self.tenant, name=name, sealed=sealed, sent_at_unix_ms=sent_at), timeout=timeout,
            **self._auth)
        return bytes(resp.measurement)

    def _call(self, sealed: enclave_pb2.SealedRequest, timeout: float | None):
        return self.stub.GenerateSealed(sealed, timeout=timeout, **self._auth)

    async def generate_stream(self, request: inference_pb2.GenerateRequest, trace_id: str = "",
                              timeout: float | None = None) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        sealed, ctx = await self.seal_request(request, trace_id)
        started = False
        try:
            async for resp in open_stream(self._call(sealed, timeout), ctx, sealed.enc):
                started = True
                yield resp
        except grpc.aio.AioRpcError as exc:
            # The gateway restarted (new attested key): re-attest once and resend. Safe, because a
            # request for an unknown key id is refused before anything is opened or generated.
            if started or exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            await self.attest()
            sealed, ctx = await self.seal_request(request, trace_id)
            async for resp in open_stream(self._call(sealed, timeout), ctx, sealed.enc):
                yield resp


class SealedStreamError(RuntimeError):
    """Generation failed inside the trust boundary; the message arrived sealed."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


async def open_stream(call, ctx, enc: bytes) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
    """Open the sealed chunks of one GenerateSealed call, in order; a cut stream raises SealError."""
    opener = None
    async for chunk in call:
        if opener is None:
            opener = ResponseOpener(ctx, enc, bytes(chunk.response_nonce))
        elif opener.finished:
            raise SealError("extra_chunk", "sealed stream continued after its final chunk")
        if chunk.error_code:
            if not chunk.final:
                raise SealError("bad_error_chunk", "error chunk must be final")
            raise SealedStreamError(chunk.error_code, opener.open(bytes(chunk.ciphertext), True).decode())
        yield inference_pb2.GenerateStreamResponse.FromString(opener.open(bytes(chunk.ciphertext), chunk.final))
    if opener is None or not opener.finished:
        raise SealError("truncated", "sealed stream ended without its final chunk")

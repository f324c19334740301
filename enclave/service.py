"""gRPC servicers: privlm.v1.Confidential (evidence, sealed generation) and privlm.v1.Audit.

Thin adapters: protobuf <-> domain objects <-> ConfidentialRuntime / AuditLog. Blocking work
(signing, fsync, HPKE) runs in a thread, never on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from enclave.attestation import SIMULATION_WARNING, AttestationError, AttestationUnavailable
from enclave.audit.log import AuditLog
from enclave.audit.merkle import ProofError
from enclave.hpke import ResponseSealer, SealedMessage, SealError
from enclave.runtime import ConfidentialRuntime
from privlm.base.errors import FailedPrecondition, InvalidArgument, PermissionDenied, PrivlmError, Unavailable, status_for
from privlm.v1 import audit_pb2, audit_pb2_grpc, enclave_pb2, enclave_pb2_grpc, inference_pb2

log = logging.getLogger("privlm.enclave")
UNSPECIFIED = inference_pb2.FINISH_REASON_UNSPECIFIED
GenerateStream = Callable[[inference_pb2.GenerateRequest, grpc.aio.ServicerContext],
                          AsyncIterator[inference_pb2.GenerateStreamResponse]]


def checkpoint_pb(cp) -> audit_pb2.SignedCheckpoint:
    return audit_pb2.SignedCheckpoint(origin=cp.origin, tree_size=cp.size, root_hash=cp.root,
                                      timestamp_unix_ms=cp.time_unix_ms, key_id=cp.key_id, signature=cp.signature)


def seal_error_status(exc: SealError) -> Exception:
    msg = f"{exc.reason}: {exc}"
    if exc.reason in ("replayed", "stale_request", "tenant_mismatch"):
        return PermissionDenied(msg)
    if exc.reason == "unknown_key_id":
        return FailedPrecondition(msg)
    return InvalidArgument(msg)


def _parse_context(aad: bytes) -> enclave_pb2.SealedRequestContext:
    try:
        return enclave_pb2.SealedRequestContext.FromString(aad)
    except DecodeError as exc:
        raise ValueError("bad sealed request context") from exc


class ConfidentialServicer(enclave_pb2_grpc.ConfidentialServicer):
    def __init__(self, runtime: ConfidentialRuntime, generate_stream: GenerateStream,
                 tenant_of: Callable[[grpc.aio.ServicerContext], str | None] | None = None):
        self.rt = runtime
        self.generate_stream = generate_stream
        self.tenant_of = tenant_of

    async def GetEvidence(self, request, context):
        try:
            bundle = await asyncio.to_thread(self.rt.evidence, bytes(request.nonce))
        except AttestationError as exc:
            raise InvalidArgument(str(exc)) from exc
        except AttestationUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        t = bundle.transparency
        inclusion = enclave_pb2.MeasurementInclusion(checkpoint=checkpoint_pb(t.checkpoint), leaf_index=t.leaf_index,
                                                     leaf=t.leaf, path=list(t.path))
        return enclave_pb2.GetEvidenceResponse(
            evidence=enclave_pb2.Evidence(tee_type=bundle.tee_type, raw=bundle.raw, key_config=bundle.key_config,
                                          measurement=bundle.measurement, nonce=bundle.nonce, inclusion=inclusion,
                                          additional=[enclave_pb2.AdditionalEvidence(tee_type=t, raw=r)
                                                      for t, r in bundle.additional]),
            simulated=self.rt.simulated, warning=SIMULATION_WARNING if self.rt.simulated else "")

    def _authenticated(self, context) -> str:
        """The tenant the server's authentication established for this call ("" without one)."""
        return (self.tenant_of(context) or "") if self.tenant_of is not None else ""

    async def GenerateSealed(self, request, context):
        msg = SealedMessage(request.key_id, request.kem_id, request.kdf_id, request.aead_id,
                            bytes(request.enc), bytes(request.ciphertext), bytes(request.aad))
        tenant = self._authenticated(context)
        try:
            plaintext, hctx, meta = await asyncio.to_thread(self.rt.open_request, msg, _parse_context, tenant)
        except SealError as exc:
            raise seal_error_status(exc) from exc
        try:
            inner = inference_pb2.GenerateRequest.FromString(plaintext)
        except DecodeError as exc:
            await asyncio.to_thread(self.rt.reject, "bad_plaintext", msg, tenant or meta.tenant, meta.trace_id)
            raise InvalidArgument("bad_plaintext: sealed payload is not a GenerateRequest") from exc
        sealer = ResponseSealer(hctx, msg.enc)
        first, finished = True, False
        try:
            async for resp in self.generate_stream(inner, context):
                final = resp.finish_reason != UNSPECIFIED
                ct = sealer.seal(resp.SerializeToString(), final=final)
                yield enclave_pb2.SealedChunk(response_nonce=sealer.response_nonce if first else b"",
                                              ciphertext=ct, final=final)
                first, finished = False, final
                if final:
                    break
        except PrivlmError as exc:  # domain errors: details sealed, only the code in clear
            code, message = status_for(exc)
            ct = sealer.seal(f"{code.name}: {message}".encode(), final=True)
            yield enclave_pb2.SealedChunk(response_nonce=sealer.response_nonce if first else b"",
                                          ciphertext=ct, final=True, error_code=code.value[0])
            return
        if not finished:  # the stream ended without a finish reason: close it explicitly
            ct = sealer.seal(inference_pb2.GenerateStreamResponse().SerializeToString(), final=True)
            yield enclave_pb2.SealedChunk(response_nonce=sealer.response_nonce if first else b"",
                                          ciphertext=ct, final=True)

    async def ProvisionSecret(self, request, context):
        tenant, authenticated = request.tenant, self._authenticated(context)
        s = request.sealed
        msg = SealedMessage(s.key_id, s.kem_id, s.kdf_id, s.aead_id, bytes(s.enc), bytes(s.ciphertext), bytes(s.aad))
        if authenticated and authenticated != tenant:
            await asyncio.to_thread(self.rt.reject, "tenant_mismatch", msg, authenticated)
            raise PermissionDenied("tenant_mismatch: secrets can only be provisioned for your own tenant")
        try:
            await asyncio.to_thread(self.rt.provision_secret, tenant, request.name, msg, request.sent_at_unix_ms)
        except SealError as exc:
            raise seal_error_status(exc) from exc
        return enclave_pb2.ProvisionSecretResponse(measurement=self.rt.measurement)


class AuditServicer(audit_pb2_grpc.AuditServicer):
    MAX_ENTRIES = 1000

    def __init__(self, audit: AuditLog):
        self.audit = audit

    async def GetCheckpoint(self, request, context):
        return checkpoint_pb(self.audit.checkpoint())

    async def GetInclusionProof(self, request, context):
        size = request.tree_size or self.audit.checkpoint().size
        try:
            path = self.audit.inclusion(request.leaf_index, size)
        except ProofError as exc:
            raise InvalidArgument(str(exc)) from exc
        leaf = self.audit.entries(request.leaf_index, request.leaf_index + 1)[0]
        return audit_pb2.InclusionProof(leaf_index=request.leaf_index, tree_size=size, path=path, leaf=leaf)

    async def GetConsistencyProof(self, request, context):
        second = request.second_size or self.audit.checkpoint().size
        if request.first_size > second:
            raise InvalidArgument(f"first_size {request.first_size} > second_size {second}")
        try:
            path = self.audit.consistency(request.first_size, second)
        except ProofError as exc:
            raise InvalidArgument(str(exc)) from exc
        return audit_pb2.ConsistencyProof(first_size=request.first_size, second_size=second, path=path)

    async def GetEntries(self, request, context):
        end = min(request.end, self.audit.size, request.start + self.MAX_ENTRIES)
        if request.start > end:
            raise InvalidArgument(f"start {request.start} is beyond the log size {self.audit.size}")
        return audit_pb2.GetEntriesResponse(entries=self.audit.entries(request.start, end))

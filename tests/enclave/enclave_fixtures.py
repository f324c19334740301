"""Helpers for the enclave tests: a simulated runtime, a tiny generate_stream, real aio servers."""
from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from enclave.attestation import policy as pol
from enclave.attestation.simulated import load_or_create_root, public_hex
from enclave.config import EnclaveConfig
from enclave.gateway_mount import mount
from enclave.runtime import ConfidentialRuntime
from privlm.base.grpcserver import add_health_and_reflection, bind, new_server
from privlm.v1 import inference_pb2

MEASUREMENT = hashlib.sha384(b"privlm test build").digest()


def sim_config(tmp: Path, **kw) -> EnclaveConfig:
    return EnclaveConfig(attestation="simulated", allow_simulated=True, key_dir=str(tmp / "keys"),
                         audit_dir=str(tmp / "audit"), measurement=MEASUREMENT.hex(), **kw)


def sim_runtime(tmp: Path, **kw) -> ConfidentialRuntime:
    return ConfidentialRuntime(sim_config(tmp, **kw))


def audit_pem(rt: ConfidentialRuntime) -> str:
    from cryptography.hazmat.primitives import serialization
    return rt.audit.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def dev_policy(tmp: Path, rt: ConfidentialRuntime | None = None, **kw) -> pol.Policy:
    root = public_hex(load_or_create_root(tmp / "keys"))
    extra = {"audit_public_key_pem": audit_pem(rt)} if rt is not None else {}
    extra.update(kw)
    return pol.development([MEASUREMENT.hex()], root, **extra)


async def tiny_generate(request: inference_pb2.GenerateRequest, context):
    """The callable boundary the gateway provides: echo the prompt's length and three words."""
    n = len(request.prompt)
    for word in ("sealed", " answer", f" {n}"):
        yield inference_pb2.GenerateStreamResponse(text=word, request_id=request.request_id)
    yield inference_pb2.GenerateStreamResponse(text="", finish_reason=inference_pb2.FINISH_REASON_LENGTH,
                                               usage=inference_pb2.Usage(prompt_tokens=n, completion_tokens=3))


async def serve(rt: ConfidentialRuntime, generate=tiny_generate, credentials=None, interceptors=()):
    server = new_server(interceptors)
    mounted = mount(server, generate, rt.config, runtime=rt)
    add_health_and_reflection(server, mounted.names)
    port = bind(server, "127.0.0.1", 0, credentials)
    await server.start()
    return server, port, mounted.names


def channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")

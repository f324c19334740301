"""How the gateway mounts the confidential services on its own grpc.aio server.

    names = add_confidential_services(server, generate_stream, enclave_config)
    add_health_and_reflection(server, [..., *names])
"""
from __future__ import annotations

import dataclasses

import grpc

from enclave.config import EnclaveConfig
from enclave.runtime import ConfidentialRuntime
from enclave.service import AuditServicer, ConfidentialServicer, GenerateStream
from privlm.v1 import audit_pb2, audit_pb2_grpc, enclave_pb2, enclave_pb2_grpc

CONFIDENTIAL = enclave_pb2.DESCRIPTOR.services_by_name["Confidential"].full_name
AUDIT = audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name


@dataclasses.dataclass
class Mounted:
    names: list[str]
    runtime: ConfidentialRuntime


def mount(server: grpc.aio.Server, generate_stream: GenerateStream, config: EnclaveConfig,
          runtime: ConfidentialRuntime | None = None, tenant_of=None) -> Mounted:
    """Like add_confidential_services, but also returns the runtime (counters, audit log)."""
    runtime = runtime or ConfidentialRuntime(config)
    enclave_pb2_grpc.add_ConfidentialServicer_to_server(
        ConfidentialServicer(runtime, generate_stream, tenant_of), server)
    audit_pb2_grpc.add_AuditServicer_to_server(AuditServicer(runtime.audit), server)
    return Mounted([CONFIDENTIAL, AUDIT], runtime)


def add_confidential_services(server: grpc.aio.Server, generate_stream: GenerateStream,
                              config: EnclaveConfig, tenant_of=None) -> list[str]:
    """Register privlm.v1.Confidential and privlm.v1.Audit; returns their full service names.

    `tenant_of(context) -> str | None` (optional): the tenant the gateway authenticated for this
    call; a sealed request whose authenticated context names another tenant is refused.
    """
    return mount(server, generate_stream, config, tenant_of=tenant_of).names

"""How the confidential services are mounted on the gateway's own grpc.aio server.

    mounted = mount(server, generate_stream, enclave_config, tenant_of=...)
    add_health_and_reflection(server, [..., *mounted.names])
"""
from __future__ import annotations

import dataclasses

import grpc

from enclave.config import EnclaveConfig
from enclave.handlers import add_servicer_parsing_last
from enclave.runtime import ConfidentialRuntime
from enclave.service import AuditServicer, ConfidentialServicer, GenerateStream
from privlm.v1 import audit_pb2, enclave_pb2

CONFIDENTIAL_SERVICE = enclave_pb2.DESCRIPTOR.services_by_name["Confidential"]
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["Audit"]
CONFIDENTIAL, AUDIT = CONFIDENTIAL_SERVICE.full_name, AUDIT_SERVICE.full_name


@dataclasses.dataclass
class Mounted:
    names: list[str]
    runtime: ConfidentialRuntime


def mount(server: grpc.aio.Server, generate_stream: GenerateStream, config: EnclaveConfig,
          runtime: ConfidentialRuntime | None = None, tenant_of=None) -> Mounted:
    """Register privlm.v1.Confidential and privlm.v1.Audit; returns their names and the runtime
    (counters, audit log).

    `tenant_of(context) -> str | None` (optional): the tenant the gateway authenticated for this
    call; a sealed request whose authenticated context names another tenant is refused, and every
    refusal is audited under the authenticated tenant.
    Requests are parsed after the server's interceptors (enclave/handlers.py), so authentication
    answers a caller without credentials before its bytes are looked at.
    """
    runtime = runtime or ConfidentialRuntime(config)
    add_servicer_parsing_last(server, CONFIDENTIAL_SERVICE, ConfidentialServicer(runtime, generate_stream, tenant_of))
    add_servicer_parsing_last(server, AUDIT_SERVICE, AuditServicer(runtime.audit))
    return Mounted([CONFIDENTIAL, AUDIT], runtime)

"""The gateway process as `privlm gateway` runs it: the public gateway, plus the confidential layer
(Confidential + Audit) and the risk-alert stream when asked for.

This is the one place the gateway and the confidential layer meet: gateway/ knows only a generic
`mounts` hook, enclave/ only a gRPC server and a GenerateStream callable. Tests, demos and `privlm up`
mount through `ConfidentialMount` too.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from enclave.config import EnclaveConfig
from enclave.gateway_mount import mount as mount_confidential
from enclave.runtime import ConfidentialRuntime
from gateway.config import GatewayConfig, ModelRoute
from gateway.server import serve
from gateway.tenants import current_tenant, load_tenants
from privlm.base.config import cache_dir
from privlm.base.transport import add_transport_args, transport_from_args
from privlm.scenarios.risk_config import RiskConfig


@dataclass
class ConfidentialMount:
    """A gateway mount: Confidential + Audit over the gateway's GenerateStream (with the tenant the
    gateway authenticated), then, with `risk`, RiskAlerts sharing the same attested runtime (one
    attested key per process: the key banks verify is the one that opens their released keys)."""

    enclave: EnclaveConfig
    risk: RiskConfig | None = None
    runtime: ConfidentialRuntime | None = None       # default: built from `enclave` at mount time
    tracer_provider: object = None
    risk_servicer: object = field(default=None, init=False)

    def __call__(self, server, service, generate_stream) -> list[str]:
        mounted = mount_confidential(server, generate_stream, self.enclave, runtime=self.runtime,
                                     tenant_of=lambda ctx: current_tenant.get() or None)
        self.runtime = mounted.runtime
        names = list(mounted.names)
        if self.risk is not None:
            from privlm.scenarios.risk import mount_risk_service

            self.risk_servicer = mount_risk_service(server, service, self.risk, runtime=self.runtime,
                                                    tracer_provider=self.tracer_provider)
            names.append(self.risk_servicer.service_name)
        return names

    async def close(self) -> None:
        if self.risk_servicer is not None:
            await self.risk_servicer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm gateway", description="Run the public gRPC gateway.")
    ap.add_argument("--model", default=None, help="model folder (tokenizer); default: the embedded model")
    ap.add_argument("--model-id", default="")
    ap.add_argument("--worker", required=True, help="host:port of the worker group's rank 0")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", type=Path, default=None)
    add_transport_args(ap)
    ap.add_argument("--attestation", default="none", choices=["none", "simulated", "sev-snp", "tdx", "sgx-gramine"],
                    help="TEE backend for privlm.v1.Confidential (sealed generation) and the audit log")
    ap.add_argument("--allow-simulated", action="store_true",
                    help="DEVELOPMENT ONLY: permit --attestation simulated (no TEE hardware; said everywhere)")
    ap.add_argument("--enclave-dir", type=Path, default=None, help="keys and audit log (default .cache/enclave)")
    ap.add_argument("--he-target", default=None, help="HE service host:port: mounts privlm.v1.RiskAlerts")
    from privlm.base.telemetry.config import add_arguments as add_telemetry_args

    add_telemetry_args(ap)
    auth = ap.add_mutually_exclusive_group(required=True)
    auth.add_argument("--tenants", type=Path, help="JSON list of tenants (tenant, token_sha256, limits)")
    auth.add_argument("--allow-anonymous", action="store_true",
                      help="DEVELOPMENT ONLY: serve without authentication (logged as a warning)")
    args = ap.parse_args(argv)
    if args.he_target and args.attestation == "none":
        ap.error("--he-target needs --attestation: the risk stream opens released keys inside the attested boundary")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = args.model
    if model is None:
        from privlm.model_prep import default_model_dir

        model = str(default_model_dir())
    tenants = load_tenants(args.tenants) if args.tenants else ()
    mounts = []
    if args.attestation != "none":
        edir = args.enclave_dir or cache_dir() / "enclave"
        enclave = EnclaveConfig(attestation=args.attestation, allow_simulated=args.allow_simulated,
                                key_dir=str(edir / "keys"), audit_dir=str(edir / "audit"), model_path=model)
        risk = RiskConfig(he_target=args.he_target) if args.he_target else None
        mounts.append(ConfidentialMount(enclave, risk))
    cfg = GatewayConfig(models=(ModelRoute(model, args.worker, args.model_id),), transport=transport_from_args(args),
                        host=args.host, port=args.port, tenants=tenants, allow_anonymous=args.allow_anonymous)
    from privlm.base.telemetry.config import from_args
    from privlm.base.telemetry.setup import init_service

    telemetry = init_service(from_args(args, "privlm-gateway"))
    asyncio.run(serve(cfg, mounts, args.ready_file, telemetry))
    return 0

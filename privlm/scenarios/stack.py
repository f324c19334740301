"""The whole suite in one process on 127.0.0.1 port 0: worker group, gateway, and for the risk scenario
the HE service, the confidential runtime and the RiskAlerts service mounted on the gateway.

Used by `privlm demo report|risk` when no --target is given, by the scenario benchmarks and by the
scenario tests: every hop is a real gRPC server and a real channel, as in production, only co-located.

    stack = await ScenarioStack.start(model_dir, risk=True, workdir=tmp)
    ... stack.target (gateway), stack.policy (what the bank pins), stack.he_target ...
    await stack.close()
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import tempfile
from pathlib import Path

from privlm.base.grpcserver import SERVING


@dataclasses.dataclass
class ScenarioStack:
    target: str
    service: object                      # gateway.service.GatewayService
    engine: object
    servers: list                        # started grpc.aio servers, closed in reverse order
    workdir: Path
    he_target: str = ""
    policy: object = None                # enclave.attestation.policy.Policy the bank pins (simulated TEE)
    runtime: object = None               # enclave.runtime.ConfidentialRuntime
    risk_model: object = None            # services.he.model.ScoringModel the bank trained
    mount: object = None                 # privlm.gateway_app.ConfidentialMount (risk stacks)
    _tmp: object = None

    @classmethod
    async def start(cls, model_dir: str | Path, *, risk: bool = False, workdir: str | Path | None = None,
                    dtype: str = "bfloat16", tracer_provider=None, threads: int | None = None,
                    risk_overrides: dict | None = None) -> "ScenarioStack":
        from gateway.config import GatewayConfig, ModelRoute
        from gateway.server import create_server as create_gateway
        from privlm.base.transport import PLAINTEXT_DEV
        from services.inference.config import EngineConfig, WorkerServerConfig
        from services.inference.server import build_engine
        from services.inference.server import create_server as create_worker

        tmp = None
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="privlm-scenario-")
            workdir = tmp.name
        workdir = Path(workdir)
        srv_ic, cli_ic = _interceptors(tracer_provider)
        ecfg = EngineConfig(model=str(model_dir), dtype=dtype, threads=threads, max_queue=256)
        engine = await asyncio.to_thread(build_engine, ecfg)
        servers = []
        # Plaintext loopback between co-located servers (development transport, which warns); `privlm
        # up` runs the same services over mTLS.
        worker, wport, whealth = await create_worker(WorkerServerConfig(engine=ecfg, transport=PLAINTEXT_DEV),
                                                     engine, srv_ic)
        await worker.start()
        await whealth.set("", SERVING)
        servers.append(worker)
        stack = cls("", None, engine, servers, workdir, _tmp=tmp)
        mounts = []
        if risk:
            await stack._start_risk_backends(model_dir, tracer_provider)
            mounts.append(stack._risk_mount(model_dir, tracer_provider, risk_overrides or {}))
        gcfg = GatewayConfig(models=(ModelRoute(str(model_dir), f"127.0.0.1:{wport}"),), transport=PLAINTEXT_DEV,
                             allow_anonymous=True)
        gateway, gport, service, _ = await create_gateway(gcfg, srv_ic, cli_ic, mounts)
        await gateway.start()
        servers.append(gateway)
        stack.target, stack.service = f"127.0.0.1:{gport}", service
        return stack

    async def _start_risk_backends(self, model_dir, tracer_provider) -> None:
        from privlm.scenarios.risk_data import DEMO_MODEL_SEED, train_model
        from services.he.config import HEServiceConfig
        from services.he.model import save_model

        self.risk_model = train_model(seed=DEMO_MODEL_SEED)
        model_file = save_model(self.risk_model, self.workdir / "risk_model.json")
        he_server, he_port = await _create_he_server(HEServiceConfig(model_files=(str(model_file),), plaintext_dev=True),
                                                     tracer_provider)
        await he_server.start()
        self.servers.append(he_server)
        self.he_target = f"127.0.0.1:{he_port}"

    def _risk_mount(self, model_dir, tracer_provider, overrides: dict):
        from enclave.attestation import policy as pol
        from enclave.attestation.simulated import load_or_create_root, public_hex
        from enclave.config import EnclaveConfig
        from enclave.runtime import ConfidentialRuntime
        from privlm.gateway_app import ConfidentialMount
        from privlm.scenarios.risk import RiskConfig

        # Simulated TEE (no hardware here): the measurement covers the model files' names and sizes
        # only, to keep start-up fast; `privlm measure` is the real, full one.
        files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
        digest = hashlib.sha384(repr([(p.name, p.stat().st_size) for p in files]).encode()).hexdigest()
        ecfg = EnclaveConfig(attestation="simulated", allow_simulated=True, key_dir=str(self.workdir / "keys"),
                             audit_dir=str(self.workdir / "audit"), measurement=digest)
        self.runtime = ConfidentialRuntime(ecfg)
        root = public_hex(load_or_create_root(self.workdir / "keys"))
        self.policy = pol.development([digest], root, audit_public_key_pem=_audit_pem(self.runtime))
        self.mount = ConfidentialMount(ecfg, RiskConfig(he_target=self.he_target, **overrides), runtime=self.runtime,
                                       tracer_provider=tracer_provider)
        return self.mount

    async def close(self) -> None:
        if self.mount is not None:
            await self.mount.close()
        for server in reversed(self.servers):
            await server.stop(1)
            servicer = getattr(server, "privlm_servicer", None)
            if servicer is not None and hasattr(servicer, "close"):
                servicer.close()
        if self.service is not None:
            await self.service.close()
        await asyncio.to_thread(self.engine.shutdown)
        if self._tmp is not None:
            self._tmp.cleanup()


def _interceptors(tracer_provider):
    """(server, client) interceptors: traced when a tracer provider is given, else none."""
    if tracer_provider is None:
        return (), ()
    from privlm.base.telemetry import client_interceptors, server_interceptors

    return server_interceptors(tracer_provider), client_interceptors(tracer_provider)


async def _create_he_server(config, tracer_provider):
    """services.he.server.create_server with trace-context interceptors when tracing."""
    from services.he import server as he

    return await he.create_server(config, _interceptors(tracer_provider)[0], tracer_provider)


def _audit_pem(runtime) -> str:
    from cryptography.hazmat.primitives import serialization

    return runtime.audit.public_key.public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode()

"""`privlm up`: start the worker group, the gateway and the HE service as separate processes.

Waits until each reports SERVING over grpc.health.v1, optionally asks the demo question, then
keeps serving until Ctrl-C / SIGTERM, when it stops every process group it started (no orphans).
A worker group that dies is restarted on the same port, so the gateway reconnects to it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("privlm.up")
DEMO_QUESTION = ("A customer has a balance of 12,400 EUR and monthly card spending of 3,100 EUR. "
                 "In two sentences, what should the bank's advisor check before raising the card limit?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    argv: list[str]
    port: int
    proc: subprocess.Popen | None = None
    restarts: int = 0
    plaintext: bool = False
    env: dict = field(default_factory=dict)     # extra environment (read by native libraries at load)
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    def start(self, log_dir: Path) -> None:
        self.log_path = log_dir / f"{self.name}.log"
        logf = open(self.log_path, "ab")
        # Own session: Ctrl-C reaches only `privlm up`, which then stops each group in order.
        self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent,
                                     env={**os.environ, **self.env} if self.env else None)
        logf.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float) -> None:
        if self.proc is None:
            return
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: killing", self.name, grace)
        try:   # whatever is left of its process group (e.g. tensor-parallel ranks)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def _die_with_parent() -> None:
    """In the child: get SIGTERM if `privlm up` itself is killed (-9), so no service is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass   # not Linux: the normal stop path still applies


def wait_serving(child: Child, timeout: float, transport) -> None:
    """Block until the child's gRPC health check says SERVING (or fail with its log tail)."""
    deadline = time.monotonic() + timeout
    if child.plaintext:
        from privlm.base.transport import PLAINTEXT_DEV as transport
    with transport.channel(f"127.0.0.1:{child.port}", "client") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}; "
                                   f"last log lines:\n{tail(child.log_path)}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"{child.name} not SERVING after {timeout:.0f}s; last log lines:\n{tail(child.log_path)}")


def tail(path: Path | None, n: int = 15) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def build_children(args, model: str, transport) -> list[Child]:
    """Receiver (unless --otlp-endpoint), worker group, HE service, gateway: in start order."""
    py = [sys.executable, "-m", "privlm.cli"]
    tls = ["--tls-dir", transport.tls_dir] if transport.tls_dir else ["--plaintext-dev"]
    children = []
    otlp = args.otlp_endpoint
    if not otlp:
        from privlm.base.telemetry.receiver import default_store_path, receiver_argv

        rport = free_port()
        children.append(Child("otlp-receiver", receiver_argv(default_store_path(), rport), rport, plaintext=True))
        otlp = f"127.0.0.1:{rport}"

    def telemetry(child_name: str) -> list[str]:
        mport = free_port()
        args.metrics_ports[child_name] = mport
        return ["--otlp-endpoint", otlp, "--metrics-port", str(mport)]

    wport = free_port()
    worker = Child("worker", py + ["worker", "--model", model, "--tp", str(args.tp), "--backend", args.backend,
                                   "--dtype", args.dtype, "--port", str(wport), *tls, *telemetry("worker")], wport,
                   env=omp_env(args.tp))
    gport = args.port if args.port else free_port()
    auth = ["--tenants", str(args.tenants)] if args.tenants else ["--allow-anonymous"]
    attest = ["--attestation", args.attestation]
    hport = free_port()
    if not args.no_he and args.attestation != "none":
        attest += ["--he-target", f"127.0.0.1:{hport}"]      # mounts privlm.v1.RiskAlerts
    if args.attestation == "simulated":
        log.warning("SIMULATED attestation: this machine has no TEE; any production policy rejects its evidence")
        attest.append("--allow-simulated")
    gateway = Child("gateway", py + ["gateway", "--model", model, "--worker", f"127.0.0.1:{wport}",
                                     "--port", str(gport), *auth, *tls, *attest, *telemetry("gateway")], gport)
    children.append(worker)
    if not args.no_he:
        he_model = ["--model-file", str(demo_risk_model(args.log_dir))]
        children.append(Child("he", py + ["he", "--port", str(hport), *tls, *telemetry("he"), *he_model], hport))
    children.append(gateway)
    return children


def omp_env(tp: int) -> dict:
    """A single CPU rank decodes ~40% faster with a short OpenMP spin between ops (measured in
    bench/bench_engine_cpu.py); several ranks sharing cores must wait passively (launch.py)."""
    if tp != 1 or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    return {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "3000"}


def demo_risk_model(log_dir: Path) -> Path:
    """The demo bank's plaintext scoring model (weights are server configuration, not secrets)."""
    from privlm.scenarios.risk_data import DEMO_MODEL_SEED, train_model
    from services.he.model import save_model

    return Path(save_model(train_model(seed=DEMO_MODEL_SEED), log_dir / "risk-model.json"))


def dev_tenants(log_dir: Path) -> Path:
    """A fresh development tenant: token in .cache/run/dev-token (0600), its hash for the gateway."""
    from gateway.tenants import create_dev_tenant
    from privlm.base.config import dev_token_path

    _, tenant = create_dev_tenant(dev_token_path())
    path = log_dir / "tenants.json"
    path.write_text(json.dumps([{"tenant": tenant.tenant, "token_sha256": tenant.token_sha256}]))
    return path


def setup_transport(args):
    """mTLS by default (a private CA in .cache/run/certs, created once); plaintext only if asked."""
    from privlm.base.config import cache_dir
    from privlm.base.transport import TransportConfig

    if args.plaintext_dev:
        return TransportConfig(plaintext_dev=True)
    tls_dir = args.tls_dir or cache_dir() / "run" / "certs"
    if not (Path(tls_dir) / "ca.pem").exists():
        from privlm.base.certs import create

        create(tls_dir)
        log.info("created a private CA and service certificates in %s", tls_dir)
    return TransportConfig(tls_dir=str(tls_dir))


def write_profile(port: int, transport) -> None:
    """.cache/run/endpoint.json: how `privlm generate/chat/models` reach this local suite."""
    from privlm.base.config import cache_dir

    path = cache_dir() / "run" / "endpoint.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"target": f"127.0.0.1:{port}", "tls_dir": transport.tls_dir,
                                "plaintext_dev": transport.plaintext_dev}))


def run_demo(port: int, question: str, transport) -> None:
    from privlm.client_cli import stream_answer
    from privlm.v1 import inference_pb2 as pb
    from privlm.v1 import inference_pb2_grpc as pb_grpc

    print(f"\nQ: {question}\nA: ", end="", flush=True)
    req = pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=120))
    req.chat.messages.add(role="user", content=question)
    t0 = time.monotonic()
    from privlm.client_cli import auth_metadata

    with transport.channel(f"127.0.0.1:{port}", "client") as ch:
        _, last = stream_answer(pb_grpc.InferenceStub(ch), req, timeout=300, metadata=auth_metadata(None))
    dt = time.monotonic() - t0
    print(f"[{last.usage.completion_tokens} tokens in {dt:.1f}s; prompt {last.usage.prompt_tokens} tokens]\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm up", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Hugging Face model folder (default: the embedded model)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--backend", default="native", choices=["native", "deepspeed"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--port", type=int, default=50051, help="gateway port (0: pick a free one)")
    ap.add_argument("--no-he", action="store_true", help="do not start the HE preprocessing service")
    ap.add_argument("--demo", action="store_true", help="ask the demo banking question once serving")
    ap.add_argument("--question", default=DEMO_QUESTION)
    ap.add_argument("--exit-after-demo", action="store_true", help="stop everything after the demo answer")
    ap.add_argument("--tenants", type=Path, default=None,
                    help="tenants JSON for the gateway (default: a fresh dev tenant, token in .cache/run/dev-token)")
    ap.add_argument("--allow-anonymous", action="store_true",
                    help="DEVELOPMENT ONLY: gateway without authentication")
    ap.add_argument("--tls-dir", type=Path, default=None,
                    help="mTLS certificates (default: .cache/run/certs, created on first use)")
    ap.add_argument("--plaintext-dev", action="store_true",
                    help="DEVELOPMENT ONLY: plaintext gRPC between all services and clients (warns)")
    ap.add_argument("--attestation", default="simulated",
                    choices=["none", "simulated", "sev-snp", "tdx", "sgx-gramine"],
                    help="TEE backend for sealed generation and the audit log (default: simulated, which "
                         "says so everywhere and is rejected by production policies)")
    ap.add_argument("--otlp-endpoint", default=None,
                    help="send traces to this OTLP/gRPC collector (Jaeger: host:4317); default: an embedded "
                         "receiver storing spans in .cache/traces/spans.jsonl (read them with `privlm trace-report`)")
    ap.add_argument("--state-file", type=Path, default=None, help="write service ports and pids here (JSON)")
    ap.add_argument("--log-dir", type=Path, default=None, help="service logs (default: a temp folder)")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--grace", type=float, default=10.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop_requested.append(s))

    model = args.model
    if model is None:
        from privlm.model_prep import prepare

        model = str(prepare())
    if args.no_he is False:
        try:
            import services.he.server  # noqa: F401
        except ModuleNotFoundError:
            log.warning("HE service not available in this build: starting without it")
            args.no_he = True
    log_dir = args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="privlm-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if not args.tenants and not args.allow_anonymous:
        args.tenants = dev_tenants(log_dir)
    transport = setup_transport(args)
    args.metrics_ports = {}
    children = build_children(args, model, transport)
    code = 0
    try:
        for child in children:
            if stop_requested:
                break
            log.info("starting %s on 127.0.0.1:%d", child.name, child.port)
            child.start(log_dir)
            wait_serving(child, args.startup_timeout, transport)
            log.info("%s SERVING (pid %d)", child.name, child.proc.pid)
        if not stop_requested:
            gateway = next(c for c in children if c.name == "gateway")
            write_profile(gateway.port, transport)
            print(f"\nprivlm is up: gateway 127.0.0.1:{gateway.port} "
                  f"({'mTLS, certificates in ' + transport.tls_dir if transport.tls_dir else 'PLAINTEXT (dev)'}) "
                  f"({', '.join(f'{c.name} :{c.port}' for c in children)}); logs in {log_dir}", flush=True)
            print("metrics (Prometheus): " + ", ".join(f"{n} http://127.0.0.1:{p}/metrics"
                                                      for n, p in args.metrics_ports.items()), flush=True)
            publish_state(args.state_file, children, log_dir, transport.tls_dir, args.metrics_ports)
            if args.demo:
                run_demo(gateway.port, args.question, transport)
            if not args.exit_after_demo:
                print("serving; press Ctrl-C to stop", flush=True)
                supervise(children, log_dir, args, stop_requested, transport)
    except Exception as exc:  # noqa: BLE001 - report and stop everything we started
        print(f"privlm up: {exc}", file=sys.stderr)
        code = 1
    finally:
        for child in reversed(children):
            child.stop(args.grace)
        print("privlm stopped: all services exited", flush=True)
    return code


def publish_state(path: Path | None, children: list[Child], log_dir: Path, tls_dir: str | None,
                  metrics: dict) -> None:
    """Write the state file (ports and pids of the running services) by rename, so a reader never
    sees half a file; called again after every restart, since operators kill and inspect by it."""
    if path is None:
        return
    state = ({c.name: {"port": c.port, "pid": c.proc.pid, "restarts": c.restarts} for c in children if c.proc}
             | {"log_dir": str(log_dir), "tls_dir": tls_dir, "metrics": metrics})
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(json.dumps(state))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def health_status(child: Child, transport) -> int | None:
    """The child's overall grpc.health.v1 status, or None when it does not answer."""
    if child.plaintext:
        from privlm.base.transport import PLAINTEXT_DEV as transport
    with transport.channel(f"127.0.0.1:{child.port}", "client") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
        except grpc.RpcError:
            return None


def supervise(children: list[Child], log_dir: Path, args, stop_requested: list, transport,
              period: float = 1.0, unhealthy_checks: int = 3) -> None:
    """Wait for a stop signal. A service that exits, or that stays NOT_SERVING (a worker group whose
    rank died) for `unhealthy_checks` checks in a row, is restarted on the same port, so the
    gateway's channel reconnects to it. The gateway is restarted only when it exits or stops answering."""
    bad = {c.name: 0 for c in children}
    while not stop_requested:
        time.sleep(period)
        for child in children:
            if stop_requested:
                return
            if child.alive():
                status = health_status(child, transport)
                # The gateway's health follows its worker groups: NOT_SERVING there means "no worker
                # answers" (restarted on its own), so only a gateway that stops answering is restarted.
                ok = (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING) \
                    if child.name == "gateway" else (health_pb2.HealthCheckResponse.SERVING,)
                bad[child.name] = 0 if status in ok else bad[child.name] + 1
                if bad[child.name] < unhealthy_checks:
                    continue
                log.error("%s is not SERVING (%d checks); restarting it", child.name, bad[child.name])
            else:
                log.error("%s exited with code %s; restarting it. Log tail:\n%s", child.name,
                          child.proc.returncode, tail(child.log_path, 5))
            bad[child.name] = 0
            child.stop(args.grace if child.alive() else 0)
            child.restarts += 1
            child.start(log_dir)
            publish_state(args.state_file, children, log_dir, transport.tls_dir, args.metrics_ports)
            try:
                wait_serving(child, args.startup_timeout, transport)
                log.info("%s SERVING again (restart %d)", child.name, child.restarts)
            except RuntimeError as exc:
                log.error("%s failed to restart: %s", child.name, exc)

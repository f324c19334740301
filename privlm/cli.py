"""The `privlm` command line: one entry point, each subcommand imported only when used."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, help). Each function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "up": ("privlm.up", "main", "start every service on 127.0.0.1 and keep them serving"),
    "generate": ("privlm.client_cli", "generate_main", "send one prompt to the gateway and stream the answer"),
    "chat": ("privlm.client_cli", "chat_main", "interactive chat with the gateway"),
    "models": ("privlm.client_cli", "models_main", "list the gateway's models"),
    "gateway": ("privlm.gateway_app", "main", "run the public gateway alone"),
    "worker": ("privlm.worker_app", "main", "run a worker group (--tp N ranks)"),
    "he": ("services.he.server", "main", "run the homomorphic-encryption service alone"),
    "model": ("privlm.model_prep", "main", "prepare the embedded default model"),
    "plan": ("services.inference.deepseek.plan", "main", "memory plan for a model on N GPUs"),
    "measure": ("enclave.measure", "main", "print the SHA-384 measurement of code + model + config"),
    "verify": ("enclave.verify_cli", "main", "verify the gateway's attestation evidence against a policy"),
    "certs": ("privlm.base.certs", "main", "create a private CA and per-service mTLS certificates"),
    "audit": ("enclave.audit_cli", "main", "verify the transparency (audit) log offline"),
    "trace-report": ("privlm.base.telemetry.report", "main", "latency percentiles from stored traces"),
    "demo": ("privlm.demos", "main", "demonstrations: he, report, risk"),
    "bench": ("privlm.demos", "bench_main", "benchmarks: load"),
}


def usage() -> str:
    lines = ["usage: privlm COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`privlm COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"privlm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        print(f"privlm {name}: not available in this build ({exc})", file=sys.stderr)
        return 2
    return int(getattr(mod, func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`privlm measure`: the SHA-384 measurement a bank pins in its policy.

measurement = SHA-384("privlm-measurement-v1" 0x00 || code || model || config), where each part is
the SHA-384 of sorted "relative/path NUL sha384(file) LF" lines (code: the installed privlm,
gateway, services and enclave packages plus protos/; model: every file of the model folder) and
config is the SHA-384 of the effective configuration as canonical JSON. Same inputs, same digest,
on any machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("privlm", "gateway", "services", "enclave", "protos")
CODE_SUFFIXES = (".py", ".proto")


@dataclasses.dataclass(frozen=True)
class Measurement:
    code: str
    model: str
    config: str
    value: bytes

    def hex(self) -> str:
        return self.value.hex()

    def as_dict(self) -> dict:
        return {"measurement_sha384": self.hex(), "code_sha384": self.code, "model_sha384": self.model,
                "config_sha384": self.config}


def _file_digest(path: Path) -> str:
    h = hashlib.sha384()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha384()
    for rel, path in sorted(files):
        h.update(rel.encode() + b"\x00" + _file_digest(path).encode() + b"\n")
    return h.hexdigest()


def code_files(root: Path = ROOT) -> list[tuple[str, Path]]:
    out = []
    for d in CODE_DIRS:
        for p in (root / d).rglob("*"):
            if p.is_file() and p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts:
                out.append((p.relative_to(root).as_posix(), p))
    return out


def model_files(model: Path) -> list[tuple[str, Path]]:
    if not model.is_dir():
        raise FileNotFoundError(f"model folder {model} does not exist")
    return [(p.relative_to(model).as_posix(), p) for p in model.rglob("*") if p.is_file()]


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha384(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def measure(model: str | Path, config: dict[str, Any], root: Path = ROOT) -> Measurement:
    code = tree_digest(code_files(root))
    mdl = tree_digest(model_files(Path(model)))
    cfg = config_digest(config)
    value = hashlib.sha384(b"privlm-measurement-v1\x00" + bytes.fromhex(code) + bytes.fromhex(mdl)
                           + bytes.fromhex(cfg)).digest()
    return Measurement(code, mdl, cfg, value)


def load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    return tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm measure", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--config", help="effective service configuration (.json or .toml)")
    ap.add_argument("--json", action="store_true", help="print all component digests as JSON")
    args = ap.parse_args(argv)
    try:
        m = measure(args.model, load_config(args.config))
    except (OSError, ValueError) as exc:
        print(f"privlm measure: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(m.as_dict(), indent=2) if args.json else m.hex())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Generate Python gRPC stubs (with .pyi) from protos/ into the repository root.

Generated files land next to the `privlm` package (privlm/v1, privlm/internal/v1) and are
git-ignored: they are produced by the build and never edited by hand.
"""
from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate() -> list[Path]:
    src = ROOT / "protos"
    protos = sorted(src.rglob("*.proto"))
    if not protos:
        raise SystemExit("no .proto files under protos/")
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    args = ["protoc", f"-I{src}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}"]
    if plugin.exists():
        args += [f"--plugin=protoc-gen-mypy_grpc={plugin}", f"--mypy_grpc_out={ROOT}"]
    args += [str(p.relative_to(src)) for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: see the messages above")
    return protos


if __name__ == "__main__":
    for p in generate():
        print(f"generated stubs for {p.relative_to(ROOT)}")

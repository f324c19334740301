"""Shared fixtures: the default model, and a real worker + gateway stack on 127.0.0.1 port 0."""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from privlm.base.transport import PLAINTEXT_DEV

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class LoopThread:
    """An asyncio loop on a background thread, so sync tests can use real grpc.aio servers."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def default_model() -> Path:
    from privlm.model_prep import prepare

    return prepare(log=lambda *a: None)


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


class Stack:
    """Worker group (native engine, tp=1) + gateway, both real gRPC servers in this process."""

    def __init__(self, loop_thread: LoopThread, model: Path, dtype: str = "float32"):
        from gateway.config import GatewayConfig, ModelRoute
        from gateway.server import create_server as create_gateway
        from services.inference.config import EngineConfig, WorkerServerConfig
        from services.inference.server import build_engine
        from services.inference.server import create_server as create_worker

        self.lt = loop_thread
        self.engine = build_engine(EngineConfig(model=str(model), dtype=dtype, max_queue=64))
        self.worker, self.worker_port, self.worker_health = self.lt.run(
            create_worker(WorkerServerConfig(engine=EngineConfig(model=str(model), dtype=dtype), transport=PLAINTEXT_DEV), self.engine))
        self.lt.run(self.worker.start())
        from privlm.base.grpcserver import SERVING

        self.lt.run(self.worker_health.set("", SERVING))
        gcfg = GatewayConfig(transport=PLAINTEXT_DEV, models=(ModelRoute(str(model), f"127.0.0.1:{self.worker_port}"),),
                             allow_anonymous=True)
        self.gateway, self.port, self.service, self.health = self.lt.run(create_gateway(gcfg))
        self.lt.run(self.gateway.start())
        self.target = f"127.0.0.1:{self.port}"

    def close(self):
        self.lt.run(self.gateway.stop(1))
        self.lt.run(self.service.close())
        self.lt.run(self.worker.stop(1))
        self.engine.shutdown()


@pytest.fixture(scope="session")
def stack(loop_thread, default_model):
    s = Stack(loop_thread, default_model)
    yield s
    s.close()


@pytest.fixture(scope="session")
def hf_model(default_model):
    """transformers' reference implementation of the default model, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(default_model), dtype=torch.float32, local_files_only=True)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(default_model), local_files_only=True)
    return model, tok


def hf_greedy(hf_model, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    model, tok = hf_model
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()

"""Overload: a full engine queue answers RESOURCE_EXHAUSTED at once, and finishes the work it took."""
import concurrent.futures as cf
import time

import grpc
import pytest

from privlm.base.transport import PLAINTEXT_DEV
from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def small_queue(loop_thread, default_model):
    from gateway.config import GatewayConfig, ModelRoute
    from gateway.server import create_server as create_gateway
    from privlm.base.grpcserver import SERVING
    from services.inference.config import EngineConfig, WorkerServerConfig
    from services.inference.server import build_engine
    from services.inference.server import create_server as create_worker

    ecfg = EngineConfig(model=str(default_model), dtype="bfloat16", max_num_seqs=1, max_queue=1)
    engine = build_engine(ecfg)
    worker, wport, health = loop_thread.run(create_worker(WorkerServerConfig(engine=ecfg, transport=PLAINTEXT_DEV),
                                                          engine))
    loop_thread.run(worker.start())
    loop_thread.run(health.set("", SERVING))
    gcfg = GatewayConfig(transport=PLAINTEXT_DEV, allow_anonymous=True,
                         models=(ModelRoute(str(default_model), f"127.0.0.1:{wport}"),))
    gateway, port, service, _ = loop_thread.run(create_gateway(gcfg))
    loop_thread.run(gateway.start())
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.InferenceStub(ch)
    ch.close()
    loop_thread.run(gateway.stop(1))
    loop_thread.run(service.close())
    loop_thread.run(worker.stop(1))
    engine.shutdown()


def test_full_queue_is_resource_exhausted_promptly(small_queue):
    req = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(max_new_tokens=48))

    def call():
        t0 = time.monotonic()
        try:
            small_queue.Generate(req, timeout=120)
            return "OK", time.monotonic() - t0
        except grpc.RpcError as err:
            return err.code().name, time.monotonic() - t0

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: call(), range(6)))
    codes = [c for c, _ in results]
    assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert all(dt < 2.0 for c, dt in results if c == "RESOURCE_EXHAUSTED"), results

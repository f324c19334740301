"""Sealed generation through the real gateway and worker group with the default model."""
import pytest
from enclave_fixtures import dev_policy, sim_config

from enclave.client import ConfidentialClient
from privlm.base.transport import PLAINTEXT_DEV
from privlm.gateway_app import ConfidentialMount
from privlm.v1 import inference_pb2

pytestmark = [pytest.mark.model]


@pytest.mark.slow
def test_sealed_generate_through_real_gateway(tmp_path, loop_thread, default_model):
    import grpc

    from gateway.config import GatewayConfig, ModelRoute
    from gateway.server import create_server as create_gateway
    from privlm.base.grpcserver import SERVING
    from services.inference.config import EngineConfig, WorkerServerConfig
    from services.inference.server import build_engine
    from services.inference.server import create_server as create_worker

    cfg = sim_config(tmp_path)
    engine = build_engine(EngineConfig(model=str(default_model), dtype="float32", max_queue=8))
    worker, wport, whealth = loop_thread.run(create_worker(
        WorkerServerConfig(engine=EngineConfig(model=str(default_model), dtype="float32"), transport=PLAINTEXT_DEV), engine))
    loop_thread.run(worker.start())
    loop_thread.run(whealth.set("", SERVING))
    gcfg = GatewayConfig(transport=PLAINTEXT_DEV, models=(ModelRoute(str(default_model), f"127.0.0.1:{wport}"),), allow_anonymous=True)
    try:
        gw, port, service, _ = loop_thread.run(create_gateway(
            gcfg, mounts=[ConfidentialMount(cfg)]))
        loop_thread.run(gw.start())
    except BaseException:
        loop_thread.run(worker.stop(0))
        engine.shutdown()
        raise

    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            client = ConfidentialClient(ch, dev_policy(tmp_path), tenant="bank-a")
            req = inference_pb2.GenerateRequest(
                chat=inference_pb2.Chat(messages=[inference_pb2.ChatMessage(role="user", content="Name one bank risk.")]),
                sampling=inference_pb2.SamplingParams(max_new_tokens=8))
            sealed = [r async for r in client.generate_stream(req)]
            plain = [r async for r in inference_pb2_grpc_stub(ch).GenerateStream(req)]
            return sealed, plain

    try:
        sealed, plain = loop_thread.run(main())
    finally:
        loop_thread.run(gw.stop(1))
        loop_thread.run(service.close())
        loop_thread.run(worker.stop(1))
        engine.shutdown()
    assert sealed[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
    assert sum(len(r.token_ids) for r in sealed) == sealed[-1].usage.completion_tokens == 8
    # Greedy: the sealed path returns exactly what the plain path returns.
    assert "".join(r.text for r in sealed) == "".join(r.text for r in plain)


def inference_pb2_grpc_stub(ch):
    from privlm.v1 import inference_pb2_grpc
    return inference_pb2_grpc.InferenceStub(ch)

"""Tenant authentication and limits on a real gateway (sharing the stack's worker group)."""
import concurrent.futures as cf
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.tenants import TenantConfig, hash_token
from privlm.base.config import ConfigError
from privlm.base.transport import PLAINTEXT_DEV
from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model
TOKEN_A, TOKEN_B = "plm_token_for_bank_a", "plm_token_for_bank_b"


@pytest.fixture(scope="module")
def tenant_gateway(stack):
    from gateway.config import GatewayConfig, ModelRoute
    from gateway.server import create_server

    tenants = (TenantConfig("bank-a", hash_token(TOKEN_A), requests_per_second=1000, burst=1000, max_concurrent=2),
               TenantConfig("bank-b", hash_token(TOKEN_B), requests_per_second=0.01, burst=2))
    cfg = GatewayConfig(transport=PLAINTEXT_DEV, models=(ModelRoute(stack.service.models[stack.service.default_model].route.model_dir,
                                           f"127.0.0.1:{stack.worker_port}"),), tenants=tenants)
    server, port, service, _ = stack.lt.run(create_server(cfg))
    stack.lt.run(server.start())
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield ch
    ch.close()
    stack.lt.run(server.stop(1))
    stack.lt.run(service.close())


def _gen(ch, token=None, n=4, prompt="Hello"):
    md = (("authorization", f"Bearer {token}"),) if token else ()
    req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_new_tokens=n))
    return pb_grpc.InferenceStub(ch).Generate(req, timeout=60, metadata=md)


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
def test_missing_or_wrong_token_is_unauthenticated(tenant_gateway, token):
    with pytest.raises(grpc.RpcError) as err:
        _gen(tenant_gateway, token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_malformed_authorization_header(tenant_gateway):
    req = pb.GenerateRequest(prompt="hi")
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.InferenceStub(tenant_gateway).Generate(req, timeout=10, metadata=(("authorization", TOKEN_A),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in err.value.details()


def test_valid_token_is_served_and_health_needs_none(tenant_gateway):
    assert _gen(tenant_gateway, TOKEN_A).usage.completion_tokens >= 1
    status = health_pb2_grpc.HealthStub(tenant_gateway).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_rate_limit_is_resource_exhausted_promptly(tenant_gateway):
    codes = []
    for _ in range(4):
        t0 = time.monotonic()
        try:
            _gen(tenant_gateway, TOKEN_B, n=1)
            codes.append("OK")
        except grpc.RpcError as err:
            codes.append(err.code().name)
            assert time.monotonic() - t0 < 1.0, "a rejection must be prompt, not a timeout"
            assert "rate limit" in err.details()
    assert codes[:2] == ["OK", "OK"] and codes[2:] == ["RESOURCE_EXHAUSTED"] * 2
    assert _gen(tenant_gateway, TOKEN_A).usage.completion_tokens >= 1   # other tenants unaffected


def test_concurrency_limit(tenant_gateway):
    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(_gen, tenant_gateway, TOKEN_A, 64, "Write a long story about a bank.") for _ in range(4)]
        outcomes = []
        for f in futs:
            try:
                f.result()
                outcomes.append("OK")
            except grpc.RpcError as err:
                outcomes.append(err.code().name)
    assert outcomes.count("OK") >= 2
    assert "RESOURCE_EXHAUSTED" in outcomes


def test_tenant_config_is_validated():
    with pytest.raises(ConfigError):
        TenantConfig("bank-a", "not-a-hash")

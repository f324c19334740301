"""The public API through real gRPC servers: gateway -> worker -> native engine (fp32)."""
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import hf_greedy

pytestmark = pytest.mark.model

QUESTION = "What is a credit limit? Answer in one sentence."


@pytest.fixture(scope="module")
def stub(stack):
    ch = grpc.insecure_channel(stack.target)
    yield pb_grpc.InferenceStub(ch)
    ch.close()


def chat(text, **sampling):
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    req.chat.messages.add(role="user", content=text)
    return req


def test_greedy_tokens_equal_transformers(stub, stack, hf_model):
    req = chat(QUESTION, max_new_tokens=32)
    resp = stub.Generate(req, timeout=120)
    ids = list(stub.Tokenize(pb.TokenizeRequest(chat=req.chat), timeout=30).token_ids)
    expected = hf_greedy(hf_model, ids, 32)
    assert list(resp.token_ids) == expected
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(expected)
    assert resp.text == hf_model[1].decode(expected, skip_special_tokens=True)
    assert resp.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_END_OF_SEQUENCE)


def test_stream_equals_unary(stub):
    req = chat(QUESTION, max_new_tokens=24)
    unary = stub.Generate(req, timeout=120)
    msgs = list(stub.GenerateStream(req, timeout=120))
    assert "".join(m.text for m in msgs) == unary.text
    assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
    assert msgs[-1].finish_reason == unary.finish_reason
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])


def test_non_ascii_stream_is_valid_utf8(stub, hf_model):
    req = pb.GenerateRequest(prompt="東京, 大阪, 京都, 名古屋, 横浜, 札幌, 神戸,",
                             sampling=pb.SamplingParams(max_new_tokens=24))
    msgs = list(stub.GenerateStream(req, timeout=120))
    text = "".join(m.text for m in msgs)
    ids = [t for m in msgs for t in m.token_ids]
    assert any(ord(c) > 127 for c in text), f"premise: the model continues with non-ASCII text, got {text!r}"
    assert text == hf_model[1].decode(ids, skip_special_tokens=True).replace("\ufffd", "")
    for m in msgs:
        assert "\ufffd" not in m.text


def test_stop_sequence_cuts_text(stub):
    base = stub.Generate(chat(QUESTION, max_new_tokens=32), timeout=120).text
    words = base.split()
    assert len(words) > 4, base
    stop = " " + words[3]
    cut = base.index(stop)
    resp = stub.Generate(chat(QUESTION, max_new_tokens=32, stop=[stop]), timeout=120)
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    assert resp.text == base[:cut]


def test_tokenize_and_list_models(stub, stack):
    t = stub.Tokenize(pb.TokenizeRequest(prompt="Balance: 12,400 EUR"), timeout=10)
    assert t.count == len(t.token_ids) > 0 and len(t.tokens) == t.count
    assert t.context_window == 8192
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].is_default and models[0].architecture == "LlamaForCausalLM"
    assert 130e6 < models[0].parameters < 140e6


@pytest.mark.parametrize("req, field", [
    (pb.GenerateRequest(), "input"),
    (pb.GenerateRequest(prompt="   "), "prompt"),
    (pb.GenerateRequest(chat=pb.Chat()), "chat.messages"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="hi")])), "role"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_new_tokens=0)), "max_new_tokens"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_new_tokens=100000)), "max_new_tokens"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-0.5)), "temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=float("nan"))), "temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=0.0)), "top_p"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_k=10**9)), "top_k"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=[""])), "stop"),
    (pb.GenerateRequest(prompt="word " * 9000), "context window"),
    (pb.GenerateRequest(prompt="hi " * 8000, sampling=pb.SamplingParams(max_new_tokens=1000)), "context window"),
])
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_bad_input_is_invalid_argument(stub, req, field, rpc):
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub, rpc)(req, timeout=30)
        if rpc == "GenerateStream":
            list(result)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(model="gpt-17", prompt="hi"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "gpt-17" in err.value.details()


def _wait_idle(stack, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = stack.engine.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_free == s.kv_blocks_total:
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine not idle after {timeout}s: {stack.engine.stats()}")


def test_cancelled_stream_stops_generation_in_worker(stub, stack):
    idle = _wait_idle(stack)
    call = stub.GenerateStream(chat("Write a long essay about interest rates.", max_new_tokens=2000), timeout=120)
    got = 0
    for msg in call:
        got += len(msg.token_ids)
        if got >= 3:
            break
    assert stack.engine.stats().running >= 1
    call.cancel()
    after = _wait_idle(stack)
    assert after.tokens_generated - idle.tokens_generated < 2000
    assert after.kv_blocks_free == idle.kv_blocks_free


def test_deadline_exceeded_and_worker_freed(stub, stack):
    _wait_idle(stack)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(chat("Write a long essay about interest rates.", max_new_tokens=2000), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    _wait_idle(stack)


def test_health_and_reflection(stack):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(stack.target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", "privlm.v1.Inference"):
            assert h.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert {"privlm.v1.Inference", "grpc.health.v1.Health"} <= names

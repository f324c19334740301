"""Hostile and malformed input against the real gateway: clear status codes, never a crash."""
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model
GENERATE = "/privlm.v1.Inference/Generate"


@pytest.fixture(scope="module")
def channel(stack):
    ch = grpc.insecure_channel(stack.target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    yield ch
    ch.close()


def _raw_call(channel, payload: bytes, method=GENERATE):
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return call(payload, timeout=30)


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x1a\x05ab", b"\x0a\x80"])
def test_malformed_protobuf_is_invalid_argument(channel, payload):
    with pytest.raises(grpc.RpcError) as err:
        _raw_call(channel, payload)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in err.value.details()


def test_invalid_utf8_in_string_field_is_invalid_argument(channel):
    bad_prompt = b"\x1a\x02\xc3\x28"            # field 3 (prompt), 2 bytes that are not UTF-8
    with pytest.raises(grpc.RpcError) as err:
        _raw_call(channel, bad_prompt)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_message_is_resource_exhausted(channel):
    req = pb.GenerateRequest(prompt="x" * (9 * 1024 * 1024))
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.InferenceStub(channel).Generate(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_still_serves_after_abuse(channel):
    resp = pb_grpc.InferenceStub(channel).Generate(
        pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(max_new_tokens=2)), timeout=30)
    assert resp.usage.completion_tokens >= 1


ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
text = st.text(max_size=40)
sampling = st.builds(
    pb.SamplingParams,
    max_new_tokens=st.integers(0, 3),
    temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
    top_p=st.floats(allow_nan=True, allow_infinity=True, width=32),
    top_k=st.integers(0, 2**32 - 1),
    seed=st.integers(0, 2**64 - 1),
    stop=st.lists(text, max_size=3),
)
messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "", "x"]),
                              content=text), max_size=3)
requests = st.one_of(
    st.builds(pb.GenerateRequest, model=st.sampled_from(["", "SmolLM2-135M-Instruct", "nope"]), prompt=text,
              sampling=sampling, request_id=st.text(max_size=8)),
    st.builds(pb.GenerateRequest, model=st.just(""), chat=st.builds(pb.Chat, messages=messages), sampling=sampling),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests)
def test_fuzz_public_requests_never_crash(channel, req):
    try:
        resp = pb_grpc.InferenceStub(channel).Generate(req, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details(), req)
        assert err.details()
    else:
        assert resp.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert resp.usage.completion_tokens <= max(req.sampling.max_new_tokens, 256)

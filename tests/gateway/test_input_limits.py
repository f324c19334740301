"""Input size: one large request never stalls other callers, oversize input is refused before any
tokenizer work, and client strings are bounded and never echoed or logged in full."""
import concurrent.futures as cf
import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.tenants import TenantConfig, hash_token
from privlm.base.transport import PLAINTEXT_DEV
from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model
TOKEN_A, TOKEN_B = "plm_limits_token_a", "plm_limits_token_b"
SECRET = "IBAN-DE44500105175407324931-limit-secret-771"
FILLER = "x" * 40                      # the secret sits past any short prefix an error message may quote
HUGE = 999_000


def _gateway(stack, **limits):
    """A tenant gateway over the stack's worker group, with the given GatewayConfig limits."""
    from gateway.config import GatewayConfig, ModelRoute
    from gateway.server import create_server

    tenants = tuple(TenantConfig(name, hash_token(tok), requests_per_second=1000, burst=1000)
                    for name, tok in (("bank-a", TOKEN_A), ("bank-b", TOKEN_B)))
    model_dir = stack.service.models[stack.service.default_model].route.model_dir
    cfg = GatewayConfig(transport=PLAINTEXT_DEV, models=(ModelRoute(model_dir, f"127.0.0.1:{stack.worker_port}"),),
                        tenants=tenants, **limits)
    server, port, service, _ = stack.lt.run(create_server(cfg))
    stack.lt.run(server.start())
    return server, service, grpc.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def gateway(stack):
    server, service, ch = _gateway(stack)
    yield ch
    ch.close()
    stack.lt.run(server.stop(1))
    stack.lt.run(service.close())


@pytest.fixture(scope="module")
def roomy_gateway(stack):
    """Input limits wide enough that a million-character chat reaches the tokenizer."""
    server, service, ch = _gateway(stack, input_chars_per_token=1024, max_input_chars=10_000_000)
    yield ch
    ch.close()
    stack.lt.run(server.stop(1))
    stack.lt.run(service.close())


def _md(token):
    return (("authorization", f"Bearer {token}"),)


def _chat(contents, **sampling):
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    for c in contents:
        req.chat.messages.add(role="user", content=c)
    return req


def _words(n: int) -> str:
    return ("credit limit interest rate account " * (n // 35 + 1))[:n]


class StreamTimes:
    """Tenant A's stream on a thread: the arrival time of every message."""

    def __init__(self, ch):
        req = _chat(["Write a long essay about interest rates."], max_new_tokens=400, temperature=0.0)
        self.call = pb_grpc.InferenceStub(ch).GenerateStream(req, timeout=300, metadata=_md(TOKEN_A))
        self.times: list[float] = []
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.first.wait(120), "premise: the stream starts"

    def _read(self):
        try:
            for _ in self.call:
                self.times.append(time.monotonic())
                self.first.set()
        except grpc.RpcError:
            pass

    def max_gap(self, t0: float, t1: float) -> float:
        """Longest wait for a message during [t0, t1] (also counting the wait still open at t1)."""
        inside = [t for t in self.times if t0 <= t <= t1]
        before = [t for t in self.times if t < t0]
        marks = ([before[-1]] if before else [t0]) + inside + [t1]
        return max(b - a for a, b in zip(marks, marks[1:]))

    def close(self):
        self.call.cancel()
        self.thread.join(10)


def _health_latency(ch) -> float:
    t0 = time.monotonic()
    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - t0


def test_oversize_input_is_refused_at_once_while_others_stream(gateway):
    """8 messages of 999,000 characters (each within the per-message and message-size limits)."""
    stub = pb_grpc.InferenceStub(gateway)
    stream = StreamTimes(gateway)
    try:
        t0 = time.monotonic()
        for make in (lambda: _chat([_words(HUGE)] * 8, max_new_tokens=4),
                     lambda: pb.GenerateRequest(prompt=_words(HUGE), sampling=pb.SamplingParams(max_new_tokens=4))):
            for rpc in ("Generate", "GenerateStream"):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    result = getattr(stub, rpc)(make(), timeout=60, metadata=_md(TOKEN_B))
                    if rpc == "GenerateStream":
                        list(result)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "characters, over the limit of 131072 characters" in err.value.details()
                assert "context window" in err.value.details()
                assert time.monotonic() - started < 2.0, "refused before any tokenizer work"
        with pytest.raises(grpc.RpcError) as err:
            stub.Tokenize(pb.TokenizeRequest(chat=_chat([_words(HUGE)] * 8).chat), timeout=60, metadata=_md(TOKEN_B))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _health_latency(gateway) < 1.0
        gap = stream.max_gap(t0, time.monotonic())
    finally:
        stream.close()
    assert gap < 1.0, f"tenant A's stream stalled {gap:.2f}s"


def test_allowed_input_at_the_limit_is_tokenized(gateway):
    stub = pb_grpc.InferenceStub(gateway)
    text = _words(131072 // 2)
    t = stub.Tokenize(pb.TokenizeRequest(chat=_chat([text, text]).chat), timeout=60, metadata=_md(TOKEN_B))
    assert t.count > 8192                      # then the context window decides, with token counts
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_chat([text, text + "x"]), timeout=60, metadata=_md(TOKEN_B))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "131073 characters" in err.value.details()


def test_tokenizing_a_large_request_does_not_stall_the_event_loop(roomy_gateway):
    """A chat of a million characters passes the (widened) limit: its chat template and tokenizer
    work must run off the event loop, so tenant A's stream and health keep answering."""
    stub = pb_grpc.InferenceStub(roomy_gateway)
    big = _chat([_words(HUGE)] * 3, max_new_tokens=4)
    stream = StreamTimes(roomy_gateway)
    health = []
    try:
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(2) as pool:
            heavy = [pool.submit(stub.Generate, big, timeout=120, metadata=_md(TOKEN_B)) for _ in range(2)]
            while not all(f.done() for f in heavy):
                health.append(_health_latency(roomy_gateway))
                time.sleep(0.05)
        gap = stream.max_gap(t0, time.monotonic())
        busy = time.monotonic() - t0
        for f in heavy:
            assert f.exception().code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "tokens, longer than the context window" in f.exception().details()   # it was tokenized
    finally:
        stream.close()
    assert busy > 0.5, f"premise: the tokenizer works a while ({busy:.2f}s)"
    assert max(health) < 1.5, f"health answered after {max(health):.2f}s"
    assert gap < 1.5, f"tenant A's stream stalled {gap:.2f}s while another request was tokenized"


@pytest.mark.parametrize("make, field", [
    (lambda big: pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role=big, content="hi")])), "role"),
    (lambda big: pb.GenerateRequest(model=big, prompt="hi"), "model"),
    (lambda big: pb.GenerateRequest(prompt="hi", request_id=big), "request_id"),
    (lambda big: pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=[big])), "stop"),
    (lambda big: pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=["a"] * 100_000)), "stop"),
    (lambda big: _chat(["hi"] * 100_000), "chat.messages"),
])
def test_long_strings_are_invalid_argument_and_never_echoed(gateway, caplog, make, field):
    caplog.set_level(logging.DEBUG)
    big = FILLER + SECRET + "y" * 500_000
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.InferenceStub(gateway).Generate(make(big), timeout=60, metadata=_md(TOKEN_A))
    details = err.value.details()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), details[:200])
    assert field in details and len(details) < 300
    assert SECRET not in details
    assert SECRET not in caplog.text and "y" * 100 not in caplog.text


def test_unknown_model_echo_is_a_short_escaped_prefix(gateway):
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.InferenceStub(gateway).Generate(pb.GenerateRequest(model="nope\n" + "z" * 100, prompt="hi"),
                                                timeout=30, metadata=_md(TOKEN_A))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope\\nzzz" in err.value.details() and "z" * 40 not in err.value.details()
    assert "..." in err.value.details()


def test_planted_secret_in_token_and_text_never_logged(gateway, caplog):
    caplog.set_level(logging.DEBUG)
    stub = pb_grpc.InferenceStub(gateway)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=30, metadata=_md(FILLER + SECRET + "t" * 4000))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and SECRET not in err.value.details()
    resp = stub.Generate(pb.GenerateRequest(prompt=f"My account {SECRET}: what is my balance?",
                                            sampling=pb.SamplingParams(max_new_tokens=4)),
                         timeout=60, metadata=_md(TOKEN_A))
    assert resp.usage.completion_tokens >= 1
    for make in (lambda: pb.GenerateRequest(prompt=f"{SECRET} " * 30_000),
                 lambda: _chat([f"{SECRET} " * 30_000]),
                 lambda: pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content=SECRET)]))):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(make(), timeout=60, metadata=_md(TOKEN_A))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and SECRET not in err.value.details()
    assert "/privlm.v1.Inference/Generate -> INVALID_ARGUMENT" in caplog.text   # the scan saw the logs
    assert SECRET not in caplog.text

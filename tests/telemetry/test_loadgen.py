"""`privlm bench load` against a real gRPC Inference service, percentiles from clients and traces."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest
from obs_chain import start_gateway, start_worker

from privlm.base.telemetry import TelemetryConfig, setup_telemetry
from privlm.base.telemetry.instruments import Instruments
from privlm.base.telemetry.receiver import create_receiver
from privlm.loadgen import main


@pytest.fixture(scope="module")
def chain_stack(tmp_path_factory):
    """Receiver + test gateway/worker on a background event loop; yields (gateway address, store)."""
    store = tmp_path_factory.mktemp("load") / "spans.jsonl"
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def up():
        receiver, rport = await create_receiver(store)
        tel = setup_telemetry(TelemetryConfig(service_name="privlm-test", otlp_endpoint=f"127.0.0.1:{rport}",
                                              export_delay_ms=50), set_global=False)
        inst = Instruments(tel.meter_provider)
        worker, wport = await start_worker(tel.tracer_provider, inst)
        gw, gport = await start_gateway(f"127.0.0.1:{wport}", tel.tracer_provider, inst)
        state.update(receiver=receiver, tel=tel, worker=worker, gw=gw, port=gport)

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(up())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield f"127.0.0.1:{state['port']}", store

    async def down():
        await state["gw"].stop(0.5)
        await state["worker"].stop(0.5)
        await asyncio.to_thread(state["tel"].shutdown)
        await state["receiver"].stop(0.5)
    asyncio.run_coroutine_threadsafe(down(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _run(capsys, argv) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_closed_loop_with_traces(chain_stack, capsys):
    target, store = chain_stack
    out = _run(capsys, ["--plaintext-dev", "--target", target, "--requests", "12", "--concurrency", "3", "--max-new-tokens", "4",
                        "--warmup", "1", "--span-store", str(store)])
    client, traces = out["client"], out["traces"]
    assert client["mode"] == "closed" and client["requests"] == 12 and client["codes"] == {"OK": 12}
    assert client["ttft_ms"]["count"] == 12 and client["tpot_ms"]["count"] == 12
    assert client["e2e_ms"]["p50"] <= client["e2e_ms"]["p99"]
    # every request's trace was found by the trace id the load generator injected
    assert traces["requests_with_trace"] == 12 and traces["ttft_ms"]["count"] == 12
    # the client's time wraps the server span's: client p50 >= trace p50, and they are close
    # (a loose structural bound that catches matching the wrong spans, not a timing benchmark)
    diff = client["e2e_ms"]["p50"] - traces["e2e_ms"]["p50"]
    assert -0.5 <= diff < 50.0, diff


def test_open_loop_and_text_table(chain_stack, capsys):
    target, store = chain_stack
    out = _run(capsys, ["--plaintext-dev", "--target", target, "--rate", "40", "--requests", "8", "--max-new-tokens", "3",
                        "--warmup", "0"])
    assert out["client"]["mode"] == "open" and out["client"]["codes"] == {"OK": 8} and out["traces"] is None
    assert main(["--plaintext-dev", "--target", target, "--rate", "40", "--requests", "4", "--warmup", "0",
                 "--span-store", str(store)]) == 0
    text = capsys.readouterr().out
    assert "open loop: 4 requests" in text and "end to end (trace)" in text and "client minus trace" in text


def test_unreachable_target_fails(capsys):
    assert main(["--plaintext-dev", "--target", "127.0.0.1:1", "--requests", "2", "--warmup", "0", "--timeout", "2"]) == 1

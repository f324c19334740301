"""The standing baseline: transformers' greedy generate(), timed per token by a streamer."""
from __future__ import annotations

import time


def hf_token_times(model, ids: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """Run greedy generate() for exactly `new_tokens` and return (start, stamps): perf_counter at the
    call, then one stamp per streamer put(). The first put() is the prompt itself, so stamps[1] is the
    first generated token."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamp(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)                      # x: [1, T]
    st = Stamp()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=st, pad_token_id=0)
    return t0, st.times


def decode_rate(times: list[float]) -> float:
    """Tokens per second between the first and last of `times` (stamps of generated tokens)."""
    return (len(times) - 1) / (times[-1] - times[0])


class HFProcess:
    """transformers generate() in a child process: `rate(prompt, n)` -> decode tokens/s.

    Why a child: libgomp keeps one OpenMP worker pool per thread that opens parallel regions, and
    two pools in one process on few cores throttle each other's spin-waiting. Running the baseline
    in its own process gives it (and the engine under test) one pool each, as in production."""

    def __init__(self, model_dir: str, threads: int, dtype: str = "bfloat16"):
        import json
        import subprocess
        import sys
        from pathlib import Path

        self._json = json
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.hf_baseline", model_dir, str(threads), dtype],
                                     cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("HF baseline process failed to start")

    def times(self, prompt: list[int], n: int) -> tuple[float, list[float]]:
        self.proc.stdin.write(self._json.dumps({"prompt": prompt, "n": n}) + "\n")
        self.proc.stdin.flush()
        out = self._json.loads(self.proc.stdout.readline())
        return out["t0"], out["times"]

    def rate(self, prompt: list[int], n: int) -> float:
        return decode_rate(self.times(prompt, n)[1][1:])       # stamp 0 is the prompt

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _serve(model_dir: str, threads: int, dtype: str) -> None:
    """Child side of HFProcess: one JSON request per stdin line, one JSON answer per line."""
    import json
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                 local_files_only=True).eval()
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        t0, times = hf_token_times(model, req["prompt"], req["n"])
        print(json.dumps({"t0": t0, "times": times}), flush=True)


if __name__ == "__main__":
    import sys

    _serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])

"""HE scoring speed, end to end through a real server on loopback (encrypt + RPC + score + decrypt).

Figures (same run, same server, same 64-feature model):
  he.score_batch_records_per_s   feature-major batches (one ciphertext per feature, 4096 records in its
                                 slots, no rotations) vs the naive layout, one record per ciphertext
                                 (dot product with rotations), as baseline.        target >= 1000
  he.score_single_p99_ms         one record per request, one ciphertext, rotations by 1..32 only; the
                                 baseline is the same record sent feature-major (64 ciphertexts).
                                                                                   target <= 25 ms
  he.score_single_compact_p99_ms the same single-record path on the compact ring (N=4096, scale 2^31,
                                 ~1e-3 precision) with secret-key encryption; baseline: the default
                                 N=8192 ring's P99.
  he.score_batch_sigmoid_records_per_s   depth-3 (N=16384) batches with the polynomial sigmoid.
Every figure carries the 1-minute load average when it was taken: the CPU machine is shared.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import report
from privlm.scenarios.he_demo import start_local_server

F = 64


def _rate(fn, records: int, reps: int) -> tuple[float, list[float]]:
    fn()                                                   # warm up with the same shapes
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return records * reps / sum(times), times


def _latencies(fn, n: int, warmup: int = 10) -> np.ndarray:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return np.asarray(out) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_he")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--naive-records", type=int, default=256)
    parser.add_argument("--single", type=int, default=300, help="single-record requests timed")
    parser.add_argument("--no-sigmoid", action="store_true")
    args = parser.parse_args(argv or [])

    from services.he.client import HEClient
    from services.he.keys import BankKeys
    from services.he.model import ScoringModel, save_model

    rng = np.random.default_rng(0)
    model = ScoringModel(name="bench", version="1", weights=(rng.normal(size=F) / 8).tolist(), bias=0.1,
                         means=rng.normal(size=F).tolist(), scales=rng.uniform(0.5, 2, size=F).tolist())
    tmp = tempfile.TemporaryDirectory(prefix="privlm-bench-he-")
    target, stop = start_local_server(save_model(model, Path(tmp.name) / "model.json"))
    try:
        with HEClient(target, timeout=600) as he:
            batch_keys = BankKeys.generate(depth=1)                       # no Galois keys: 1.1 MB context
            single_keys = BankKeys.generate(depth=1, rotations_for=F)     # 6 Galois keys: 3.3 MB context
            he.register(batch_keys)
            he.register(single_keys)
            slots = batch_keys.slots
            x = rng.normal(size=(slots, F))                               # x: [4096, 64]

            def check(out, xs):
                err = float(np.abs(out.values - model.logit(xs)).max())
                assert err < 1e-3, f"encrypted scores off by {err}"

            check(he.score(batch_keys, x, packing="feature_major"), x)
            batched, _ = _rate(lambda: he.score(batch_keys, x, packing="feature_major"), slots, args.batches)
            xn = x[:args.naive_records]
            check(he.score(single_keys, xn, packing="record_per_ciphertext"), xn)
            naive, _ = _rate(lambda: he.score(single_keys, xn, packing="record_per_ciphertext"), len(xn), 2)
            report("he.score_batch_records_per_s", "records/s", batched, naive, 1000, "higher",
                   features=F, batch_records=slots, ciphertexts_per_batch=F, naive_records=len(xn),
                   preset="N=8192 [60,40,60] 2^40", scope="encrypt+RPC+score+decrypt, one client",
                   load_avg_1m=round(os.getloadavg()[0], 2))

            lat = _latencies(lambda i: he.score(single_keys, x[i], packing="record_per_ciphertext"), args.single)
            lat_fm = _latencies(lambda i: he.score(batch_keys, x[i:i + 1], packing="feature_major"),
                                max(30, args.single // 10), warmup=3)
            load = round(os.getloadavg()[0], 2)
            report("he.score_single_p99_ms", "ms", float(np.percentile(lat, 99)), float(np.percentile(lat_fm, 99)),
                   25, "lower", p50_ms=round(float(np.percentile(lat, 50)), 2), load_avg_1m=load,
                   p90_ms=round(float(np.percentile(lat, 90)), 2), max_ms=round(float(lat.max()), 2),
                   requests=len(lat), baseline_layout="feature-major (64 ciphertexts)",
                   baseline_p50_ms=round(float(np.percentile(lat_fm, 50)), 2),
                   context_bytes=len(single_keys.public_context), galois_steps=single_keys.rotation_steps)

            compact = BankKeys.generate(depth=1, rotations_for=F, compact=True, symmetric=True)
            he.register(compact)
            out = he.score(compact, x[:20], packing="record_per_ciphertext")
            err = float(np.abs(out.values - model.logit(x[:20])).max())
            lat_c = _latencies(lambda i: he.score(compact, x[i], packing="record_per_ciphertext"), args.single)
            report("he.score_single_compact_p99_ms", "ms", float(np.percentile(lat_c, 99)),
                   float(np.percentile(lat, 99)), 25, "lower", p50_ms=round(float(np.percentile(lat_c, 50)), 2),
                   max_ms=round(float(lat_c.max()), 2), requests=len(lat_c), max_abs_error=err,
                   preset="N=4096 [39,31,39] 2^31, symmetric encryption", context_bytes=len(compact.public_context),
                   load_avg_1m=round(os.getloadavg()[0], 2))

            if not args.no_sigmoid:
                keys3 = BankKeys.generate(depth=3)
                he.register(keys3)
                x3 = rng.normal(size=(keys3.slots, F))
                out = he.score(keys3, x3, activation="sigmoid")
                err = float(np.abs(out.values - model.sigmoid_poly(model.logit(x3))).max())
                rate3, _ = _rate(lambda: he.score(keys3, x3, activation="sigmoid"), len(x3), 2)
                report("he.score_batch_sigmoid_records_per_s", "records/s", rate3, None, None, "higher",
                       features=F, batch_records=len(x3), preset="N=16384 [60,40,40,40,60] 2^40",
                       max_abs_error=err, load_avg_1m=round(os.getloadavg()[0], 2))
    finally:
        stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

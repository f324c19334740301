"""`privlm demo he`: a bank scores credit risk on encrypted features; decisions match plaintext.

1. Synthetic applicants (generated here, seeded) and a logistic model the bank trains in plaintext.
2. The model goes to the HE service as plaintext configuration; the features never do: the bank
   encrypts them under its own CKKS key, the service scores ciphertexts, the bank decrypts.
3. Encrypted decisions are compared with plaintext decisions on the same records.

By default a real server is started in-process on 127.0.0.1 port 0. With --target HOST:PORT the demo
uses a running service, which must serve the demo's model: write it with --write-model PATH and start
`privlm he --model-file PATH` first.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from services.he.model import ScoringModel, save_model

FEATURES = ("income_k", "balance", "debt_to_income", "credit_utilisation", "late_payments_12m",
            "account_age_years", "open_accounts", "recent_inquiries", "overdraft_days", "savings_ratio")
_TRUE_W = np.array([-0.9, -0.6, 1.1, 0.9, 1.3, -0.5, 0.2, 0.6, 0.8, -0.7])


def synthetic_applicants(n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Raw features x: [n, 10] in natural units (balances can be negative), default labels y: [n]."""
    rng = np.random.default_rng(seed)
    income = rng.lognormal(mean=3.9, sigma=0.45, size=n)                  # thousands per year
    balance = rng.normal(4_000, 9_000, size=n)                            # overdrawn accounts included
    dti = np.clip(rng.normal(0.35, 0.15, size=n), 0, 1.5)
    util = np.clip(rng.beta(2, 3, size=n), 0, 1)
    late = rng.poisson(0.6, size=n).astype(float)
    age = rng.gamma(3.0, 2.5, size=n)
    accounts = rng.poisson(4, size=n).astype(float)
    inquiries = rng.poisson(1.2, size=n).astype(float)
    overdraft = np.where(balance < 0, rng.poisson(6, size=n), 0).astype(float)
    savings = np.clip(rng.normal(0.08, 0.07, size=n), -0.1, 0.6)
    x = np.stack([income, balance, dti, util, late, age, accounts, inquiries, overdraft, savings], axis=1)
    z = ((x - x.mean(0)) / x.std(0)) @ _TRUE_W - 1.2
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return x, y


def train_logistic(x: np.ndarray, y: np.ndarray, steps: int = 400, lr: float = 0.5, l2: float = 1e-2) -> ScoringModel:
    """Plain numpy gradient descent on standardised features (the bank's own training)."""
    mu, sd = x.mean(0), x.std(0)
    xs = (x - mu) / sd                                                     # xs: [n, F]
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(xs @ w + b)))
        w -= lr * (xs.T @ (p - y) / len(y) + l2 * w)
        b -= lr * float(np.mean(p - y))
    return ScoringModel(name="demo-credit-risk", version="demo-1", weights=w.tolist(), bias=b, means=mu.tolist(),
                        scales=sd.tolist(), feature_names=FEATURES)


def start_local_server(model_path: Path):
    from services.he.config import HEServiceConfig
    from services.he.server import create_server

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    server, port = run(create_server(HEServiceConfig(model_files=(str(model_path),), plaintext_dev=True)))
    run(server.start())

    def stop():
        run(server.stop(1))
        server.privlm_servicer.close()
        loop.call_soon_threadsafe(loop.stop)

    return f"127.0.0.1:{port}", stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privlm demo he", description=__doc__.split("\n")[0])
    parser.add_argument("--target", help="use a running HE service instead of starting one")
    parser.add_argument("--write-model", help="write the demo's scoring model JSON here and exit")
    parser.add_argument("--records", type=int, default=2000, help="applicants to score encrypted")
    args = parser.parse_args(argv)

    from services.he.client import HEClient
    from services.he.keys import BankKeys

    x_train, y_train = synthetic_applicants(4000, seed=7)          # the same model whatever --records is
    x_eval, _ = synthetic_applicants(args.records, seed=8)
    model = train_logistic(x_train, y_train)
    if args.write_model:
        save_model(model, args.write_model)
        print(f"wrote {args.write_model} (model id {model.model_id})")
        return 0
    acc = np.mean((model.logit(x_train) > 0) == (y_train > 0.5))
    print(f"bank: trained a logistic model on {len(x_train)} synthetic applicants in plaintext "
          f"({len(FEATURES)} features, train accuracy {acc:.1%})")
    print(f"      model id {model.model_id[:23]}... goes to the HE service as configuration")

    stop = None
    tmp = tempfile.TemporaryDirectory(prefix="privlm-he-demo-")
    if args.target:
        target = args.target
    else:
        target, stop = start_local_server(save_model(model, Path(tmp.name) / "model.json"))
        print(f"service: started on {target} (holds public keys only)")
    ok = True
    try:
        with HEClient(target) as he:
            if model.model_id not in {m.model_id for m in he.describe().models}:
                print("the service does not serve the demo model: run `privlm demo he --write-model m.json` and "
                      "start `privlm he --model-file m.json`")
                return 2
            plain_logit = model.logit(x_eval)
            plain_decision = plain_logit > 0                     # sigmoid(z) > 0.5  <=>  z > 0

            # Batch: one ciphertext per feature, every applicant in its slots; depth 1, no rotations.
            keys = BankKeys.generate(depth=1)
            he.register(keys)
            t0 = time.perf_counter()
            out = he.score(keys, x_eval, model_id=model.model_id)
            dt = time.perf_counter() - t0
            enc_decision = out.values > 0
            err = np.abs(out.values - plain_logit).max()
            same = int(np.sum(enc_decision == plain_decision))
            ok &= same == len(x_eval)
            print(f"batch:  {len(x_eval)} applicants in {len(FEATURES)} ciphertexts, scored encrypted in {dt * 1e3:.0f} ms "
                  f"({len(x_eval) / dt:.0f} records/s end to end); max |logit error| {err:.1e}")
            print(f"        encrypted decisions equal plaintext decisions: {same}/{len(x_eval)}; "
                  f"plaintext default rate predicted {plain_decision.mean():.1%}")

            # Probabilities: depth 3 leaves room for the polynomial sigmoid.
            keys3 = BankKeys.generate(depth=3)
            he.register(keys3)
            sub = x_eval[:500]
            out3 = he.score(keys3, sub, model_id=model.model_id, activation="sigmoid")
            z = model.logit(sub)
            inside = np.abs(z) < model.sigmoid_range
            same3 = int(np.sum((out3.values > 0.5) == (z > 0)))
            ok &= bool(np.all(((out3.values > 0.5) == (z > 0))[inside]))
            print(f"probs:  {len(sub)} applicants, degree-{model.sigmoid_degree} sigmoid on ciphertexts: decisions equal "
                  f"{same3}/{len(sub)}, max |p - numpy polynomial| "
                  f"{np.abs(out3.values - model.sigmoid_poly(z)).max():.1e}, max |p - logistic| "
                  f"{np.abs(out3.values - 1 / (1 + np.exp(-z)))[inside].max():.3f} inside |z| < {model.sigmoid_range:g}")

            # One transaction at a time: one ciphertext, rotations by 1..8 only (log2 F Galois keys).
            keys1 = BankKeys.generate(depth=1, rotations_for=len(FEATURES))
            he.register(keys1)
            lat = []
            for i in range(20):
                t0 = time.perf_counter()
                s = he.score(keys1, x_eval[i], model_id=model.model_id)
                lat.append(time.perf_counter() - t0)
                ok &= bool((s.values[0] > 0) == plain_decision[i])
            print(f"single: 20 applicants one at a time, median {np.median(lat) * 1e3:.1f} ms, "
                  f"max {max(lat) * 1e3:.1f} ms per encrypted score (encrypt + RPC + decrypt)")

            # Aggregates: 30 days of spend, slot = account; per-account monthly total and mean, encrypted.
            keys2 = BankKeys.generate(depth=2)
            he.register(keys2)
            spend = np.random.default_rng(3).gamma(1.5, 40.0, size=(30, 1000)) * (np.random.default_rng(4).random((30, 1000)) < 0.6)
            agg = he.aggregate(keys2, spend, ["sum", "mean", "variance"])
            agg_err = max(np.abs(agg["sum"] - spend.sum(0)).max(), np.abs(agg["mean"] - spend.mean(0)).max())
            print(f"spend:  30 daily ciphertexts x 1000 accounts -> monthly total, mean and variance per account; "
                  f"max error {agg_err:.1e} (variance {np.abs(agg['variance'] - spend.var(0)).max():.1e})")
    finally:
        if stop:
            stop()
        tmp.cleanup()
    print("result: " + ("encrypted decisions equal plaintext decisions" if ok else "MISMATCH"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

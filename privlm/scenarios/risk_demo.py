"""`privlm demo risk`: the bank streams synthetic card transactions and prints alerts as they arrive."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import numpy as np

from privlm.scenarios.risk_data import transactions


async def run_demo(args) -> int:
    from privlm.scenarios.risk_client import RiskClient
    from services.he.keys import BankKeys

    stack = None
    if args.target:
        if not args.policy:
            print("privlm demo risk: --policy FILE is required with --target (the bank pins what it attests)",
                  file=sys.stderr)
            return 2
        from enclave.attestation.policy import load as load_policy
        from privlm.scenarios.connect import open_target

        policy = load_policy(args.policy)
        channel, metadata = open_target(args)
        target, tenant = args.target, args.tenant
    else:
        from privlm.model_prep import prepare
        from privlm.scenarios.stack import ScenarioStack

        print("starting worker group, gateway (+ RiskAlerts, Confidential), HE service in this process...",
              file=sys.stderr)
        stack = await ScenarioStack.start(prepare(log=lambda *a: None), risk=True)
        import grpc

        policy, metadata, target, tenant = stack.policy, (), stack.target, ""
        channel = grpc.aio.insecure_channel(target)
    try:
        txs = transactions(args.transactions, seed=args.seed)
        keys = await asyncio.to_thread(BankKeys.generate, 1, len(txs[0].features))
        client = RiskClient(channel, policy, keys, tenant=tenant, metadata=metadata)
        opened = await client.open(threshold=args.threshold, explanation_max_tokens=args.max_new_tokens)
        print(f"attested {target} ({client.verified.claims.tee_type}"
              f"{', SIMULATED: no hardware protection' if client.verified.claims.simulated else ''}); "
              f"CKKS key released; model {opened.scoring_model_version}, {opened.num_features} features",
              file=sys.stderr)
        if opened.num_features != len(txs[0].features):
            print(f"the HE service's model takes {opened.num_features} features, this demo's has "
                  f"{len(txs[0].features)}: start the HE service with the demo model", file=sys.stderr)
            client.cancel()
            return 2
        sent: dict[str, float] = {}
        by_id = {t.transaction_id: t for t in txs}

        async def produce():
            for t in txs:
                sent[t.transaction_id] = time.perf_counter()
                await client.send(t.transaction_id, t.features, t.memo)
                await asyncio.sleep(1.0 / args.rate)
            await client.done_writing()

        producer = asyncio.create_task(produce())
        texts: dict[str, list[str]] = {}
        alerts = 0
        async for tx_id, event in client.events():
            kind = event.WhichOneof("kind")
            if kind == "decision":
                d = event.decision
                ms = (time.perf_counter() - sent[tx_id]) * 1e3
                t = by_id[tx_id]
                flag = "ALERT" if d.alert else "ok   "
                print(f"{flag} {tx_id} p={d.probability:.3f} ({t.merchant}, {t.features[0]:.2f}k) "
                      f"decided in {ms:.0f} ms")
                alerts += d.alert
            elif kind == "explanation" and event.explanation.skipped_reason:
                print(f"  -> {tx_id} explanation skipped ({event.explanation.skipped_reason})")
            elif kind == "explanation":
                texts.setdefault(tx_id, []).append(event.explanation.text)
                if event.explanation.done:
                    ms = (time.perf_counter() - sent[tx_id]) * 1e3
                    memo = by_id[tx_id].memo
                    print(f"  -> {tx_id} explanation ({ms:.0f} ms){' [memo: ' + memo + ']' if memo else ''}:\n"
                          f"     {''.join(texts.pop(tx_id)).strip()}")
            elif kind == "error":
                print(f"ERROR {tx_id}: {event.error.code} {event.error.reason}: {event.error.message}")
            elif kind == "end":
                e = event.end
                print(f"session end: {e.transactions} transactions, {e.alerts} alerts, {e.errors} errors, "
                      f"{e.explanations_skipped} explanations skipped",
                      file=sys.stderr)
        await producer
        x = np.array([t.features for t in txs])
        if stack is not None:
            expected = int((1 / (1 + np.exp(-stack.risk_model.logit(x))) >= args.threshold).sum())
            print(f"plaintext check: the bank's own model flags {expected} of {len(txs)}; the encrypted path "
                  f"flagged {alerts}", file=sys.stderr)
    finally:
        await channel.close()
        if stack is not None:
            await stack.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`privlm demo risk`: stream ~20 synthetic transactions, print decisions and alerts as they arrive."""
    ap = argparse.ArgumentParser(prog="privlm demo risk", description=main.__doc__)
    from privlm.scenarios.connect import add_target_args

    add_target_args(ap)     # without --target: worker, gateway, HE service, enclave runtime in-process
    ap.add_argument("--policy", default="", help="attestation policy file to pin (required with --target)")
    ap.add_argument("--tenant", default="dev", help="with --target: the tenant your token authenticates as")
    ap.add_argument("--transactions", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="explanation length in tokens")
    ap.add_argument("--rate", type=float, default=4.0, help="transactions per second sent")
    ap.add_argument("--write-model", default="", metavar="PATH",
                    help="write the bank's scoring model JSON (for `privlm he --model-file PATH`) and exit")
    args = ap.parse_args(argv)
    if args.write_model:
        from privlm.scenarios.risk_data import DEMO_MODEL_SEED, train_model
        from services.he.model import save_model

        model = train_model(seed=DEMO_MODEL_SEED)
        print(f"wrote {save_model(model, args.write_model)} ({model.model_id})")
        return 0
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(run_demo(args))

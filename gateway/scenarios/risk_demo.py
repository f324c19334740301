"""`privlm demo risk`: the bank streams synthetic card transactions and prints alerts as they arrive."""
from __future__ import annotations

import asyncio
import sys
import time

import numpy as np

from gateway.scenarios.risk_data import transactions


async def run_demo(args) -> int:
    from gateway.scenarios.risk_client import RiskClient
    from services.he.keys import BankKeys

    stack = None
    if args.target:
        if not args.policy:
            print("privlm demo risk: --policy FILE is required with --target (the bank pins what it attests)",
                  file=sys.stderr)
            return 2
        from enclave.attestation.policy import load as load_policy
        from gateway.scenarios.connect import open_target

        policy = load_policy(args.policy)
        channel, metadata = open_target(args)
        target, tenant = args.target, args.tenant
    else:
        from gateway.scenarios.stack import ScenarioStack
        from privlm.model_prep import prepare

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

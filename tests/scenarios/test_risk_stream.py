"""The risk-alert stream end to end with real servers on 127.0.0.1 port 0: worker group, gateway with
Confidential + Audit + RiskAlerts mounted, HE service, simulated-TEE confidential runtime. Real
TenSEAL CKKS, real HPKE, real gRPC, real OpenTelemetry spans (in-memory exporter)."""
from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from privlm.base.telemetry import TelemetryConfig, setup_telemetry
from privlm.scenarios.risk_client import RiskClient
from privlm.scenarios.risk_data import transactions
from services.he.keys import BankKeys

pytestmark = pytest.mark.slow
THRESHOLD = 0.8
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def risk_env(loop_thread, default_model, tmp_path_factory):
    from privlm.scenarios.stack import ScenarioStack

    exporter = InMemorySpanExporter()
    tel = setup_telemetry(TelemetryConfig(service_name="privlm-scenario-test", export_delay_ms=50),
                          set_global=False, extra_exporters=[exporter])
    stack = loop_thread.run(ScenarioStack.start(default_model, risk=True, tracer_provider=tel.tracer_provider,
                                                workdir=tmp_path_factory.mktemp("risk")))
    keys = BankKeys.generate(1, rotations_for=8)
    yield stack, tel, exporter, keys
    loop_thread.run(stack.close())
    tel.shutdown()


async def _session(stack, keys, tel=None, threshold=THRESHOLD):
    channel = grpc.aio.insecure_channel(stack.target)
    client = RiskClient(channel, stack.policy, keys, tracer=tel.tracer("bank") if tel else None)
    opened = await client.open(threshold=threshold, explanation_max_tokens=MAX_TOKENS)
    return channel, client, opened


async def _collect(client) -> dict[str, list]:
    events: dict[str, list] = {}
    async for tx_id, event in client.events():
        events.setdefault(tx_id, []).append(event)
    return events


def test_encrypted_decisions_equal_plaintext_and_alerts_only_above_threshold(risk_env, loop_thread):
    stack, tel, exporter, keys = risk_env
    txs = transactions(14, seed=11)
    x = np.array([t.features for t in txs])                                     # x: [N, F]
    p_plain = 1 / (1 + np.exp(-stack.risk_model.logit(x)))                      # [N]
    assert 0 < (p_plain >= THRESHOLD).sum() < len(txs), "the sample must hold both classes"
    # CKKS error is ~1e-6 on the logit; a record this close to the threshold would be a coin flip.
    assert np.min(np.abs(p_plain - THRESHOLD)) > 1e-4

    async def scenario():
        channel, client, opened = await _session(stack, keys, tel)
        assert opened.num_features == 8 and opened.context_id == keys.context_id
        for t in txs:
            await client.send(t.transaction_id, t.features, t.memo)
        await client.done_writing()
        events = await _collect(client)
        await channel.close()
        return events

    events = loop_thread.run(scenario())
    end = events.pop("")[-1].end
    assert (end.transactions, end.errors) == (len(txs), 0)
    for t, p in zip(txs, p_plain):
        evs = events[t.transaction_id]
        d = evs[0].decision
        assert evs[0].WhichOneof("kind") == "decision"
        assert d.alert == bool(p >= THRESHOLD), t.transaction_id
        assert d.probability == pytest.approx(p, abs=1e-4)
        assert d.memo_opened == bool(t.memo)
        chunks = [e.explanation for e in evs[1:]]
        if d.alert:
            assert chunks and chunks[-1].done and "".join(c.text for c in chunks).strip()
        else:
            assert not chunks, "no explanation below the threshold"
    assert end.alerts == int((p_plain >= THRESHOLD).sum())


def test_sealed_memo_opened_tampered_and_misbound_memos_rejected(risk_env, loop_thread):
    stack, _, _, keys = risk_env
    t = transactions(3, seed=5, memo_share=1.0)
    before = dict(stack.runtime.rejections)

    async def scenario():
        channel, client, _ = await _session(stack, keys, threshold=0.999999)   # no explanations needed
        good = client.request(t[0].transaction_id, await client.encrypt(t[0].features), t[0].memo)
        tampered = client.request(t[1].transaction_id, await client.encrypt(t[1].features), t[1].memo)
        ct = bytearray(tampered.transaction.memo.ciphertext)
        ct[3] ^= 0x01
        tampered.transaction.memo.ciphertext = bytes(ct)
        # A valid memo sealed for transaction 0, attached to transaction 2: bound to the wrong id.
        moved = client.request(t[2].transaction_id, await client.encrypt(t[2].features),
                               memo_sealed=client.seal_memo(t[0].transaction_id, "moved memo"))
        for r in (good, tampered, moved):
            await client.write(r)
        await client.done_writing()
        events = await _collect(client)
        await channel.close()
        return events

    events = loop_thread.run(scenario())
    assert events[t[0].transaction_id][0].decision.memo_opened
    err = events[t[1].transaction_id][0]
    assert err.WhichOneof("kind") == "error" and err.error.reason == "hpke_open_failed"
    assert err.error.code == "INVALID_ARGUMENT"
    moved = events[t[2].transaction_id][0]
    assert moved.WhichOneof("kind") == "error" and moved.error.reason == "wrong_binding"
    assert events[""][-1].end.errors == 2 and events[""][-1].end.transactions == 3
    after = stack.runtime.rejections
    assert after["hpke_open_failed"] == before.get("hpke_open_failed", 0) + 1
    assert after["wrong_binding"] == before.get("wrong_binding", 0) + 1
    # Audited: the key release, the memo opens and the refusals by reason; never the memo text.
    from enclave.audit.events import AuditEvent

    audit = stack.runtime.audit
    raw = audit.entries(0, audit.size)
    events = [AuditEvent.decode(e) for e in raw]
    assert any(e.kind == "key_released" and e.labels.get("service") == "risk" for e in events)
    assert any(e.kind == "sealed_request_opened" and e.labels.get("service") == "risk" for e in events)
    assert any(e.kind == "sealed_request_rejected" and e.labels.get("reason") == "hpke_open_failed" for e in events)
    assert not any(t[0].memo.encode() in e or b"moved memo" in e for e in raw)


def test_released_key_of_another_context_is_refused(risk_env, loop_thread):
    """The broker releases a secret key that is not the public context's: CKKS would decrypt garbage
    silently, so the enclave must refuse the session instead."""
    stack, _, _, keys = risk_env
    other = BankKeys.generate(1, rotations_for=8)

    async def scenario():
        channel = grpc.aio.insecure_channel(stack.target)
        client = RiskClient(channel, stack.policy, keys)
        client.broker.add_secret(client.name, other.export_secret())          # wrong key under the right name
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.open(threshold=THRESHOLD)
                await client._call.read()
            return info.value
        finally:
            await channel.close()

    err = loop_thread.run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key_mismatch" in err.details()


def test_simulated_evidence_refused_under_production_policy(risk_env, loop_thread):
    """A bank pinning a production policy never releases its key to the simulated enclave."""
    from enclave.attestation import AttestationError
    from enclave.attestation.policy import production

    stack, _, _, keys = risk_env
    policy = production(stack.policy.measurements)

    async def scenario():
        channel = grpc.aio.insecure_channel(stack.target)
        client = RiskClient(channel, policy, keys)
        try:
            with pytest.raises(AttestationError) as info:
                await client.open()
            return info.value
        finally:
            await channel.close()

    assert loop_thread.run(scenario()).reason == "simulation_not_allowed"


def test_one_trace_per_transaction_across_services_and_no_secrets_in_spans(risk_env, loop_thread):
    stack, tel, exporter, keys = risk_env
    txs = transactions(40, seed=11)
    x = np.array([t.features for t in txs])
    p = 1 / (1 + np.exp(-stack.risk_model.logit(x)))
    alert = next(t for t, pi in zip(txs, p) if pi >= THRESHOLD)
    calm = next(t for t, pi in zip(txs, p) if pi < THRESHOLD)
    secret_memo = "SECRET-MEMO-7f3a customer wired savings to a new payee"
    alert = dataclasses.replace(alert, memo=secret_memo)
    exporter.clear()

    async def scenario():
        channel, client, _ = await _session(stack, keys, tel)
        for t in (alert, calm):
            await client.send(t.transaction_id, t.features, t.memo)
        await client.done_writing()
        await _collect(client)
        await channel.close()

    loop_thread.run(scenario())
    assert tel.force_flush()
    spans = exporter.get_finished_spans()
    roots = {s.context.trace_id: s for s in spans if s.name == "privlm.risk.client.transaction"}
    assert len(roots) == 2, "one trace per transaction"
    for trace_id in roots:
        names = {s.name for s in spans if s.context.trace_id == trace_id}
        assert {"privlm.risk.transaction", "privlm.risk.he_score", "privlm.risk.decrypt"} <= names
        he_server = [s for s in spans if s.context.trace_id == trace_id and s.kind == SpanKind.SERVER
                     and "ScoreBatch" in s.name]
        assert he_server, f"the HE service's server span is in the transaction's trace: {names}"
    alert_trace = next(t for t, s in roots.items()
                       if any(x.name == "privlm.risk.explain" and x.context.trace_id == t for x in spans))
    worker = [s for s in spans if s.context.trace_id == alert_trace and s.kind == SpanKind.SERVER
              and "Worker/Generate" in s.name]
    assert worker, "the worker's Generate span joins the alert's trace"
    assert "privlm.risk.memo_open" in {s.name for s in spans if s.context.trace_id == alert_trace}
    explain = next(s for s in spans if s.name == "privlm.risk.explain")
    assert explain.attributes["gen_ai.usage.output_tokens"] > 0
    assert explain.attributes["privlm.time_to_first_token_ms"] > 0
    # Parent links: transaction span under the bank's span, HE scoring under the transaction.
    tx_span = next(s for s in spans if s.name == "privlm.risk.transaction" and s.context.trace_id == alert_trace)
    assert tx_span.parent.span_id == roots[alert_trace].context.span_id
    for s in spans:
        blob = repr(s.to_json())
        assert "SECRET-MEMO-7f3a" not in blob and "wired savings" not in blob


def test_overload_skips_explanations_never_decisions(risk_env, loop_thread):
    """With one explanation slot, a burst of alerts all get their decisions; the rest of the
    explanations are skipped ("overloaded"), sealed, and counted at session end."""
    stack, _, _, keys = risk_env
    engine = stack.mount.risk_servicer.engine
    txs = transactions(60, seed=11)
    x = np.array([t.features for t in txs])
    p = 1 / (1 + np.exp(-stack.risk_model.logit(x)))
    alerts = [t for t, pi in zip(txs, p) if pi >= THRESHOLD][:4]
    assert len(alerts) == 4
    saved = engine.settings
    engine.settings = dataclasses.replace(saved, max_pending_explanations=1)

    async def scenario():
        channel, client, _ = await _session(stack, keys)
        reqs = [client.request(t.transaction_id, await client.encrypt(t.features)) for t in alerts]
        for r in reqs:
            await client.write(r)
        await client.done_writing()
        events = await _collect(client)
        await channel.close()
        return events

    try:
        events = loop_thread.run(scenario())
    finally:
        engine.settings = saved
    skipped = 0
    for t in alerts:
        evs = events[t.transaction_id]
        assert evs[0].decision.alert
        last = evs[-1].explanation
        assert last.done
        skipped += last.skipped_reason == "overloaded"
    assert skipped >= 1 and skipped == events[""][-1].end.explanations_skipped
    assert engine.pending_explanations == 0


def test_replayed_memo_and_garbage_ciphertext_get_per_transaction_errors(risk_env, loop_thread):
    """A memo replayed on another transaction is refused (replay guard); a ciphertext the HE service
    cannot load is refused there; the session goes on and the next transaction is decided."""
    stack, _, _, keys = risk_env
    t = transactions(3, seed=9)

    async def scenario():
        channel, client, _ = await _session(stack, keys, threshold=0.999999)
        first = client.request(t[0].transaction_id, await client.encrypt(t[0].features), "first memo")
        replay = client.request(t[1].transaction_id, await client.encrypt(t[1].features))
        replay.transaction.memo.CopyFrom(first.transaction.memo)              # same enc, same ciphertext
        garbage = client.request(t[2].transaction_id, b"\x00not a ciphertext" * 10)
        after = client.request("tx-after", await client.encrypt(t[0].features))
        for r in (first, replay, garbage, after):
            await client.write(r)
        await client.done_writing()
        events = await _collect(client)
        await channel.close()
        return events

    events = loop_thread.run(scenario())
    assert events[t[0].transaction_id][0].decision.memo_opened
    replayed = events[t[1].transaction_id][0].error
    # Bound to transaction 0's id, so it fails the binding or the replay check, never opens twice.
    assert replayed.reason in ("replayed", "wrong_binding") and replayed.code == "PERMISSION_DENIED"
    bad = events[t[2].transaction_id][0].error
    assert bad.code == "INVALID_ARGUMENT" and bad.reason == "he_score_failed"
    assert events["tx-after"][0].WhichOneof("kind") == "decision"


@pytest.mark.parametrize("violation", ["second_open", "bad_id", "no_open"])
def test_protocol_violations_end_the_call_with_invalid_argument(risk_env, loop_thread, violation):
    from privlm.v1 import risk_pb2, risk_pb2_grpc

    stack, _, _, keys = risk_env

    async def scenario():
        channel = grpc.aio.insecure_channel(stack.target)
        try:
            if violation == "no_open":
                call = risk_pb2_grpc.RiskAlertsStub(channel).StreamTransactions()
                await call.write(risk_pb2.RiskRequest(transaction=risk_pb2.RiskTransaction(transaction_id="x")))
                await call.done_writing()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
                return info.value
            client = RiskClient(channel, stack.policy, keys)
            await client.open()
            if violation == "second_open":
                await client.write(risk_pb2.RiskRequest(open=risk_pb2.OpenRiskSession()))
            else:
                await client.write(client.request("bad id with spaces", b"x"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in client.events():
                    pass
            return info.value
        finally:
            await channel.close()

    err = loop_thread.run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


def test_authenticated_tenant_binds_the_session(risk_env, loop_thread):
    """Behind tenant authentication the stream runs as the authenticated tenant: a session sealed for
    another tenant is refused, a call without credentials is UNAUTHENTICATED."""
    from gateway.config import GatewayConfig, ModelRoute
    from gateway.server import create_server
    from gateway.tenants import TenantConfig, hash_token
    from privlm.base.transport import PLAINTEXT_DEV
    from privlm.gateway_app import ConfidentialMount
    from privlm.scenarios.risk import RiskConfig

    stack, _, _, keys = risk_env
    route = next(iter(stack.service.models.values())).route
    cfg = GatewayConfig(models=(ModelRoute(route.model_dir, route.worker_target),), transport=PLAINTEXT_DEV,
                        tenants=(TenantConfig("bank-a", hash_token("token-a")),))

    mount = ConfidentialMount(stack.runtime.config, RiskConfig(he_target=stack.he_target), runtime=stack.runtime)

    async def scenario():
        server, port, service, _ = await create_server(cfg, mounts=[mount])
        await server.start()
        target = f"127.0.0.1:{port}"
        t = transactions(1, seed=2)[0]
        outcomes = {}
        try:
            for name, tenant, metadata in (("ok", "bank-a", (("authorization", "Bearer token-a"),)),
                                           ("other_tenant", "bank-b", (("authorization", "Bearer token-a"),)),
                                           ("anonymous", "bank-a", ())):
                channel = grpc.aio.insecure_channel(target)
                client = RiskClient(channel, stack.policy, keys, tenant=tenant, metadata=metadata)
                try:
                    await client.open(threshold=0.999999)
                    await client.send("tx-tenant", t.features)
                    await client.done_writing()
                    outcomes[name] = [e.WhichOneof("kind") async for _, e in client.events()]
                except grpc.aio.AioRpcError as exc:
                    outcomes[name] = exc.code()
                finally:
                    await channel.close()
        finally:
            await server.stop(1)
            await mount.close()
            await service.close()
        return outcomes

    out = loop_thread.run(scenario())
    assert out["ok"] == ["decision", "end"]
    assert out["other_tenant"] == grpc.StatusCode.PERMISSION_DENIED
    assert out["anonymous"] == grpc.StatusCode.UNAUTHENTICATED

"""The bank's side of the risk-alert stream: attest, release the CKKS secret key to the attested
enclave through the bank's own key broker, seal the session parameters and memos, encrypt features,
and open the sealed decisions and explanations in order.

    client = RiskClient(channel, policy, keys, tenant="bank-a")
    opened = await client.open(threshold=0.8, explanation_max_tokens=32)
    await client.send(tx_id, features, memo)          # features: [F] plaintext, encrypted here
    async for tx_id, event in client.events():        # privlm.v1.RiskEvent, opened
        ...
    await client.done_writing()
Nothing is sent before the gateway's evidence verifies against the pinned policy.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc
import numpy as np
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from enclave import evidence as ev
from enclave.attestation.policy import Policy
from enclave.client import bundle_from_pb
from enclave.hpke import ResponseOpener, SealedMessage, SealError, seal
from enclave.key_release import KeyBroker
from privlm.scenarios.risk_seal import MEMO_LABEL, SESSION_LABEL
from privlm.v1 import enclave_pb2, enclave_pb2_grpc, risk_pb2, risk_pb2_grpc
from services.he.keys import BankKeys


def sealed_pb(msg: SealedMessage) -> enclave_pb2.SealedRequest:
    return enclave_pb2.SealedRequest(key_id=msg.key_id, kem_id=msg.kem_id, kdf_id=msg.kdf_id, aead_id=msg.aead_id,
                                     enc=msg.enc, ciphertext=msg.ciphertext, aad=msg.aad)


class RiskClient:
    def __init__(self, channel: grpc.aio.Channel, policy: Policy, keys: BankKeys, tenant: str = "",
                 metadata=(), tracer: trace.Tracer | None = None, audit=None):
        self.channel = channel
        self.policy = policy
        self.keys = keys
        self.tenant = tenant
        self.metadata = tuple(metadata)
        self.tracer = tracer or trace.get_tracer("privlm.risk.client")
        self.broker = KeyBroker(policy, audit)          # the bank's own key broker
        self.name = f"ckks:{keys.context_id}"
        self.broker.add_secret(self.name, keys.export_secret())
        self.verified: ev.Verified | None = None
        self.opened: risk_pb2.RiskSessionOpened | None = None
        self.spans: dict[str, trace.Span] = {}
        self._call = None
        self._opener: ResponseOpener | None = None
        self._prop = TraceContextTextMapPropagator()

    async def _attest_and_release(self):
        """Challenge -> evidence for it -> the broker verifies and wraps the secret to the attested key."""
        stub = enclave_pb2_grpc.ConfidentialStub(self.channel)
        nonce = self.broker.challenge()
        resp = await stub.GetEvidence(enclave_pb2.GetEvidenceRequest(nonce=nonce), metadata=self.metadata,
                                      timeout=30)
        bundle = bundle_from_pb(resp.evidence)
        wrapped = await asyncio.to_thread(self.broker.release, self.name, bundle, self.tenant)  # raises if refused
        self.verified = ev.verify_bundle(bundle, self.policy, nonce)
        return wrapped

    async def open(self, threshold: float = 0.0, explanation_max_tokens: int = 0,
                   scoring_model_id: str = "") -> risk_pb2.RiskSessionOpened:
        wrapped = await self._attest_and_release()
        params = risk_pb2.RiskSessionParams(threshold=threshold, explanation_max_tokens=explanation_max_tokens)
        aad = risk_pb2.RiskSessionContext(tenant=self.tenant, context_id=self.keys.context_id,
                                          sent_at_unix_ms=int(time.time() * 1000)).SerializeToString()
        msg, ctx = seal(self.verified.key_config, params.SerializeToString(), aad, label=SESSION_LABEL)
        self._call = risk_pb2_grpc.RiskAlertsStub(self.channel).StreamTransactions(metadata=self.metadata)
        await self._call.write(risk_pb2.RiskRequest(open=risk_pb2.OpenRiskSession(
            public_context=self.keys.public_context, released_key=sealed_pb(wrapped.message),
            released_key_name=self.name, session=sealed_pb(msg), scoring_model_id=scoring_model_id)))
        first = await self._call.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "opened":
            raise SealError("protocol", "the stream did not start with RiskSessionOpened")
        self.opened = first.opened
        self._opener = ResponseOpener(ctx, msg.enc, bytes(first.opened.response_nonce))
        return self.opened

    def seal_memo(self, transaction_id: str, memo: str) -> enclave_pb2.SealedRequest:
        aad = risk_pb2.MemoContext(transaction_id=transaction_id,
                                   sent_at_unix_ms=int(time.time() * 1000)).SerializeToString()
        msg, _ = seal(self.verified.key_config, memo.encode("utf-8"), aad, label=MEMO_LABEL)
        return sealed_pb(msg)

    async def encrypt(self, features) -> bytes:
        """[F] plaintext -> one CKKS ciphertext (record-per-ciphertext layout), off the event loop."""
        x = np.asarray(features, dtype=np.float64).reshape(1, -1)
        return (await asyncio.to_thread(self.keys.encrypt_records, x))[0]

    def request(self, transaction_id: str, ciphertext: bytes, memo: str = "",
                memo_sealed: enclave_pb2.SealedRequest | None = None) -> risk_pb2.RiskRequest:
        """Build one transaction message; its span (the trace's root) starts here."""
        span = self.tracer.start_span("privlm.risk.client.transaction")
        self.spans[transaction_id] = span
        carrier: dict[str, str] = {}
        self._prop.inject(carrier, context=trace.set_span_in_context(span))
        t = risk_pb2.RiskTransaction(transaction_id=transaction_id, features=ciphertext,
                                     traceparent=carrier.get("traceparent", ""))
        if memo_sealed is not None:
            t.memo.CopyFrom(memo_sealed)
        elif memo:
            t.memo.CopyFrom(self.seal_memo(transaction_id, memo))
        return risk_pb2.RiskRequest(transaction=t)

    async def write(self, request: risk_pb2.RiskRequest) -> None:
        await self._call.write(request)

    async def send(self, transaction_id: str, features, memo: str = "") -> None:
        await self.write(self.request(transaction_id, await self.encrypt(features), memo))

    async def done_writing(self) -> None:
        await self._call.done_writing()

    async def events(self) -> AsyncIterator[tuple[str, risk_pb2.RiskEvent]]:
        """Open every sealed event in order until the final one; a cut stream raises SealError."""
        while True:
            msg = await self._call.read()
            if msg is grpc.aio.EOF:
                break
            e = msg.event
            event = risk_pb2.RiskEvent.FromString(self._opener.open(bytes(e.ciphertext), e.final))
            if event.transaction_id != e.transaction_id:
                raise SealError("mismatch", "sealed event's transaction id differs from the one in clear")
            self._end_span(event)
            yield event.transaction_id, event
            if e.final:
                break
        if not self._opener.finished:
            raise SealError("truncated", "risk stream ended without its final event")

    def _end_span(self, event: risk_pb2.RiskEvent) -> None:
        kind = event.WhichOneof("kind")
        done = (kind == "error" or (kind == "decision" and not event.decision.alert)
                or (kind == "explanation" and event.explanation.done))
        if done and event.transaction_id in self.spans:
            self.spans.pop(event.transaction_id).end()

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
        for span in self.spans.values():
            span.end()
        self.spans.clear()

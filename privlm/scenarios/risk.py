"""privlm.v1.RiskAlerts: the bidirectional risk-alert stream, mounted on the gateway's server.

Thin servicer: protobuf <-> risk_engine objects; responses sealed in stream order with the session's
HPKE-exported keys. The HE service is reached over gRPC (GrpcHELink) with trace context propagated.

Wiring: privlm.gateway_app.ConfidentialMount(enclave_config, risk_config) mounts Confidential + Audit
and then this stream, sharing one attested runtime.

`privlm demo risk` (risk_demo.py) runs the whole chain in one process, or against --target.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace

from enclave.hpke import ResponseSealer, SealedMessage
from enclave.runtime import ConfidentialRuntime
from gateway.service import GatewayService
from privlm.base.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from privlm.scenarios.risk_config import RiskConfig
from privlm.scenarios.risk_engine import (
    Decision,
    Explanation,
    HEError,
    HEScore,
    ModelInfo,
    RiskEngine,
    SessionEnd,
    SessionOpen,
    TransactionIn,
    TxError,
)
from privlm.v1 import he_pb2, he_pb2_grpc, risk_pb2, risk_pb2_grpc

__all__ = ["RiskConfig", "RiskServicer", "mount_risk_service", "SERVICE_NAME"]
log = logging.getLogger("privlm.risk")
SERVICE_NAME = risk_pb2.DESCRIPTOR.services_by_name["RiskAlerts"].full_name
HE_TENANT_KEY = "x-privlm-tenant"
_PACKING = {he_pb2.PACKING_FEATURE_MAJOR: "feature_major", he_pb2.PACKING_RECORD_PER_CIPHERTEXT: "record_per_ciphertext"}
_DONE = object()


def sealed_from_pb(m) -> SealedMessage:
    return SealedMessage(m.key_id, m.kem_id, m.kdf_id, m.aead_id, bytes(m.enc), bytes(m.ciphertext), bytes(m.aad))


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            raise ValueError(f"not a {cls.__name__}") from exc
    return parse


class GrpcHELink:
    """The HE service over gRPC (aio), as risk_engine.HELink."""

    def __init__(self, config: RiskConfig, transport, tracer_provider=None):
        from privlm.base.telemetry import client_interceptors

        self.channel = transport.aio_channel(config.he_target, "gateway", client_interceptors(tracer_provider),
                                             options=[("grpc.max_send_message_length", 64 << 20),
                                                      ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = he_pb2_grpc.HomomorphicPreprocessorStub(self.channel)
        self.timeout = config.he_timeout_s
        self._models: dict[str, ModelInfo] = {}

    async def _call(self, method, request, tenant: str = "default"):
        try:
            return await method(request, metadata=((HE_TENANT_KEY, tenant),), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise HEError(exc.code().name, exc.details() or "") from None

    async def register(self, tenant: str, public_context: bytes) -> str:
        try:
            resp = await self._call(self.stub.RegisterContext,
                                    he_pb2.RegisterContextRequest(public_context=public_context), tenant)
        except HEError as exc:
            if exc.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                raise Unavailable(f"HE service unreachable: {exc.code}") from None
            raise (InvalidArgument if exc.code == "INVALID_ARGUMENT" else FailedPrecondition)(
                f"HE service refused the public context: {exc}") from None
        return resp.context_id

    async def model(self, model_id: str) -> ModelInfo:
        if model_id not in self._models:
            try:
                resp = await self._call(self.stub.Describe, he_pb2.DescribeRequest())
            except HEError as exc:
                raise Unavailable(f"HE service did not describe its models: {exc.code}") from None
            for m in resp.models:
                info = ModelInfo(m.model_id, m.version, m.num_features, tuple(m.feature_names))
                self._models[m.model_id] = info
                if m.is_default:
                    self._models[""] = info
        if model_id not in self._models:
            raise NotFound(f"scoring model {model_id!r} is not served by the HE service")
        return self._models[model_id]

    async def score(self, tenant: str, context_id: str, model_id: str, ciphertext: bytes) -> HEScore:
        req = he_pb2.ScoreBatchRequest(context_id=context_id, model_id=model_id,
                                       packing=he_pb2.PACKING_RECORD_PER_CIPHERTEXT, num_records=1,
                                       ciphertexts=[ciphertext], activation=he_pb2.ACTIVATION_NONE)
        resp = await self._call(self.stub.ScoreBatch, req, tenant)
        activation = "sigmoid" if resp.activation == he_pb2.ACTIVATION_SIGMOID else "none"
        return HEScore(resp.context_id, _PACKING[resp.packing], resp.num_records, list(resp.scores), activation,
                       resp.model_version)

    async def close(self) -> None:
        await self.channel.close()


def event_pb(ev) -> risk_pb2.RiskEvent:
    if isinstance(ev, Decision):
        return risk_pb2.RiskEvent(transaction_id=ev.transaction_id, decision=risk_pb2.RiskDecision(
            alert=ev.alert, probability=ev.probability, threshold=ev.threshold, memo_opened=ev.memo_opened,
            scoring_model_version=ev.model_version))
    if isinstance(ev, Explanation):
        return risk_pb2.RiskEvent(transaction_id=ev.transaction_id,
                                  explanation=risk_pb2.AlertExplanationChunk(text=ev.text, done=ev.done,
                                                                             skipped_reason=ev.skipped_reason))
    if isinstance(ev, TxError):
        return risk_pb2.RiskEvent(transaction_id=ev.transaction_id, error=risk_pb2.RiskTransactionError(
            code=ev.code, reason=ev.reason, message=ev.message))
    if isinstance(ev, SessionEnd):
        return risk_pb2.RiskEvent(end=risk_pb2.RiskSessionEnd(transactions=ev.transactions, alerts=ev.alerts,
                                                              errors=ev.errors,
                                                              explanations_skipped=ev.explanations_skipped))
    raise TypeError(f"unknown risk event {type(ev).__name__}")


class RiskServicer(risk_pb2_grpc.RiskAlertsServicer):
    service_name = SERVICE_NAME

    def __init__(self, engine: RiskEngine, config: RiskConfig, he: GrpcHELink):
        self.engine = engine
        self.config = config
        self.he = he

    async def StreamTransactions(self, request_iterator, context):
        from gateway.tenants import current_tenant

        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "open":
            raise InvalidArgument("the first RiskRequest must be `open`")
        o = first.open
        if not o.HasField("released_key") or not o.HasField("session"):
            raise InvalidArgument("open.released_key and open.session are required (seal them to the attested key)")
        session = await self.engine.open_session(SessionOpen(
            tenant=current_tenant.get(), public_context=bytes(o.public_context),
            released_key_name=o.released_key_name, released_key=sealed_from_pb(o.released_key),
            session=sealed_from_pb(o.session), scoring_model_id=o.scoring_model_id,
            parse_session_context=_parser(risk_pb2.RiskSessionContext),
            parse_session_params=_parser(risk_pb2.RiskSessionParams)))
        sealer = ResponseSealer(session.response_ctx, session.response_enc)
        m = session.model
        yield risk_pb2.RiskResponse(opened=risk_pb2.RiskSessionOpened(
            session_id=session.session_id, context_id=session.context_id, scoring_model_id=m.model_id,
            scoring_model_version=m.version, num_features=m.num_features, feature_names=list(m.feature_names),
            response_nonce=sealer.response_nonce))
        queue: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(self._read(request_iterator, session, queue))
        try:
            while True:
                ev = await queue.get()
                if ev is _DONE:
                    break
                if isinstance(ev, BaseException):
                    raise ev
                final = isinstance(ev, SessionEnd)
                ct = sealer.seal(event_pb(ev).SerializeToString(), final=final)
                yield risk_pb2.RiskResponse(event=risk_pb2.SealedRiskEvent(
                    transaction_id=getattr(ev, "transaction_id", ""), ciphertext=ct, final=final))
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            session.keys = None

    async def _read(self, request_iterator, session, queue: asyncio.Queue) -> None:
        sem = asyncio.Semaphore(self.config.max_in_flight)
        tasks: set[asyncio.Task] = set()
        parse_memo = _parser(risk_pb2.MemoContext)

        async def run(tx: TransactionIn) -> None:
            released = False

            def decided() -> None:
                nonlocal released
                if not released:
                    released = True
                    sem.release()

            try:
                await self.engine.process(session, tx, queue.put, parse_memo, decided)
            finally:
                session.in_flight.discard(tx.transaction_id)
                decided()

        try:
            async for req in request_iterator:
                if req.WhichOneof("kind") != "transaction":
                    raise InvalidArgument("only the first RiskRequest may be `open`; then transactions only")
                t = req.transaction
                tx = TransactionIn(t.transaction_id, bytes(t.features),
                                   sealed_from_pb(t.memo) if t.HasField("memo") else None, t.traceparent)
                self.engine.validate(session, tx)
                if tx.transaction_id in session.in_flight:
                    await queue.put(TxError(tx.transaction_id, "ALREADY_EXISTS", "duplicate_id",
                                            "a transaction with this id is still being processed"))
                    continue
                await sem.acquire()
                session.in_flight.add(tx.transaction_id)
                task = asyncio.create_task(run(tx))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*list(tasks))
            await queue.put(self.engine.end(session))
            await queue.put(_DONE)
        except asyncio.CancelledError:
            for task in list(tasks):
                task.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the response side, which raises it
            for task in list(tasks):
                task.cancel()
            await queue.put(exc)

    async def close(self) -> None:
        await self.he.close()


def mount_risk_service(server: grpc.aio.Server, service: GatewayService, config: RiskConfig, *,
                       runtime: ConfidentialRuntime, tracer_provider=None) -> RiskServicer:
    """Register privlm.v1.RiskAlerts on `server` and return its servicer (close() closes the HE channel).

    runtime: the gateway's ConfidentialRuntime, so the key banks attest with GetEvidence is the one
    that opens their released keys.
    """
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("privlm.risk")
    he = GrpcHELink(config, config.he_transport or service.config.transport, tracer_provider)
    servicer = RiskServicer(RiskEngine(runtime, service, he, config, tracer), config, he)
    risk_pb2_grpc.add_RiskAlertsServicer_to_server(servicer, server)
    return servicer

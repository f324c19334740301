"""The risk-alert pipeline inside the trust boundary: open a session (released CKKS key, sealed
parameters), then per transaction: open the sealed memo, have the HE service score the encrypted
features, decrypt the score alone, decide, and for alerts have the model write an explanation.

No grpc and no generated stubs here: the servicer (risk.py) converts protobuf to these objects, gives
the engine an `HELink` (async HE calls) and turns the events it emits into sealed responses, in order.
Blocking work (HPKE opens, audit fsync, TenSEAL decryption) runs in threads. Prompt text, memos,
scores and keys never reach a log line or a span attribute.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from enclave.hpke import SealedMessage, SealError
from enclave.key_release import WrappedSecret, unwrap
from enclave.runtime import ConfidentialRuntime, sha256_hex
from gateway.service import GatewayService, GenerateInput
from privlm.base.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from privlm.base.telemetry import instruments as I
from privlm.base.telemetry.spans import GenerationSpan
from privlm.scenarios.risk_config import RiskConfig
from privlm.scenarios.risk_seal import MEMO_LABEL, SESSION_LABEL, open_labeled
from services.he.keys import BankKeys, KeyMismatch
from services.he.params import context_id as he_context_id

log = logging.getLogger("privlm.risk")
TX_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
SYSTEM_PROMPT = ("Write one sentence for a bank fraud analyst: why the card transaction below needs review, "
                 "and what to verify first with the customer.")


# ---- what the servicer hands in -------------------------------------------------------------------
@dataclass(frozen=True)
class SessionOpen:
    tenant: str                    # the gateway's authenticated tenant ("" when anonymous)
    public_context: bytes
    released_key_name: str
    released_key: SealedMessage
    session: SealedMessage
    scoring_model_id: str
    parse_session_context: Callable[[bytes], object]    # aad -> .tenant .context_id .sent_at_unix_ms .trace_id
    parse_session_params: Callable[[bytes], object]     # plaintext -> .threshold .explanation_max_tokens


@dataclass(frozen=True)
class TransactionIn:
    transaction_id: str
    features: bytes                # one serialized CKKSVector
    memo: SealedMessage | None
    traceparent: str


@dataclass(frozen=True)
class HEScore:
    context_id: str
    packing: str
    num_records: int
    scores: list[bytes]
    activation: str                # "none" (logit) or "sigmoid"
    model_version: str


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    version: str
    num_features: int
    feature_names: tuple[str, ...]


class HELink(Protocol):
    """The HE service as the engine needs it (risk.py implements it over gRPC)."""

    async def register(self, tenant: str, public_context: bytes) -> str: ...

    async def model(self, model_id: str) -> ModelInfo: ...

    async def score(self, tenant: str, context_id: str, model_id: str, ciphertext: bytes) -> HEScore: ...


class HEError(Exception):
    """An HE call failed; `code` is the gRPC status name the service answered."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ---- what the engine emits, in order ----------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    transaction_id: str
    alert: bool
    probability: float
    threshold: float
    memo_opened: bool
    model_version: str


@dataclass(frozen=True)
class Explanation:
    transaction_id: str
    text: str
    done: bool
    skipped_reason: str = ""


@dataclass(frozen=True)
class TxError:
    transaction_id: str
    code: str
    reason: str
    message: str


@dataclass(frozen=True)
class SessionEnd:
    transactions: int
    alerts: int
    errors: int
    explanations_skipped: int = 0


Emit = Callable[[object], Awaitable[None]]


@dataclass
class Session:
    session_id: str
    tenant: str
    context_id: str
    model: ModelInfo
    keys: BankKeys = field(repr=False)
    response_ctx: object = field(repr=False)         # HPKE recipient context: response keys come from it
    response_enc: bytes = field(repr=False)
    threshold: float = 0.8
    max_tokens: int = 32
    transactions: int = 0
    alerts: int = 0
    errors: int = 0
    explanations_skipped: int = 0
    in_flight: set = field(default_factory=set)


class RiskEngine:
    def __init__(self, runtime: ConfidentialRuntime, service: GatewayService, he: HELink, settings: RiskConfig,
                 tracer: trace.Tracer):
        self.rt = runtime
        self.service = service
        self.he = he
        self.settings = settings
        self.tracer = tracer
        self._propagator = TraceContextTextMapPropagator()
        self.pending_explanations = 0

    # ---- session ----------------------------------------------------------------------------------
    async def open_session(self, req: SessionOpen) -> Session:
        if not req.public_context:
            raise InvalidArgument("open.public_context is empty")
        cid = he_context_id(req.public_context)
        name = f"ckks:{cid}"
        if req.released_key_name != name:
            raise InvalidArgument("open.released_key_name must be 'ckks:' + the public context's SHA-256")
        plaintext, hctx, meta = await asyncio.to_thread(
            open_labeled, self.rt, req.session, SESSION_LABEL, req.parse_session_context, req.tenant)
        if meta.context_id != cid:
            await asyncio.to_thread(self.rt.reject, "wrong_binding", req.session, req.tenant)
            raise PermissionDenied("wrong_binding: sealed session parameters belong to another CKKS context")
        if req.tenant and meta.tenant != req.tenant:
            await asyncio.to_thread(self.rt.reject, "tenant_mismatch", req.session, req.tenant)
            raise PermissionDenied("tenant_mismatch: sealed session was sealed for another tenant")
        try:
            params = req.parse_session_params(plaintext)
        except ValueError as exc:
            raise InvalidArgument("open.session does not hold RiskSessionParams") from exc
        threshold = params.threshold or self.settings.default_threshold
        if not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
            raise InvalidArgument("session threshold must be a probability in (0, 1)")
        max_tokens = params.explanation_max_tokens or self.settings.default_explanation_tokens
        if max_tokens > self.settings.max_explanation_tokens:
            raise InvalidArgument(f"explanation_max_tokens must be <= {self.settings.max_explanation_tokens}")
        tenant = req.tenant or meta.tenant or "default"
        keys = await asyncio.to_thread(self._import_key, req, cid, tenant)
        registered = await self.he.register(tenant, req.public_context)
        if registered != cid:
            raise FailedPrecondition("HE service registered the public context under another id")
        model = await self.he.model(req.scoring_model_id)
        session = Session(uuid.uuid4().hex, tenant, cid, model, keys, hctx, req.session.enc, threshold, max_tokens)
        log.info("risk session %s opened (tenant %s, model %s)", session.session_id[:12], tenant, model.version)
        return session

    def _import_key(self, req: SessionOpen, cid: str, tenant: str) -> BankKeys:
        """Open the released secret (bound to this measurement), then prove it is the secret key of the
        registered public context: CKKS decrypts garbage silently under a wrong key."""
        try:
            blob = unwrap(self.rt.keys, WrappedSecret(req.released_key_name, req.released_key), self.rt.measurement)
        except SealError as exc:
            self.rt.reject(exc.reason, req.released_key, tenant)
            raise PermissionDenied(f"{exc.reason}: released key does not open in this enclave") from exc
        try:
            keys = BankKeys.import_secret(blob)
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises assorted types on bad bytes
            self.rt.reject("bad_released_key", req.released_key, tenant)
            raise InvalidArgument("released key is not an exported CKKS secret context") from exc
        if keys.context_id != cid or not _probe_matches(req.public_context, keys):
            self.rt.reject("key_mismatch", req.released_key, tenant)
            raise InvalidArgument("key_mismatch: released secret key does not belong to open.public_context")
        self.rt.record("key_released", tenant=tenant, hashes={"he_context_sha256": cid,
                                                                "ciphertext_sha256": sha256_hex(req.released_key.ciphertext)},
                       labels={"service": "risk", "secret": "ckks", "key_id": str(req.released_key.key_id)})
        return keys

    # ---- transactions -----------------------------------------------------------------------------
    def validate(self, session: Session, tx: TransactionIn) -> None:
        if not TX_ID.match(tx.transaction_id):
            raise InvalidArgument("transaction.transaction_id must be 1-64 characters of [A-Za-z0-9_.:-]")
        if not tx.features:
            raise InvalidArgument(f"transaction {tx.transaction_id}: features (one CKKS ciphertext) is empty")

    async def process(self, session: Session, tx: TransactionIn, emit: Emit, parse_memo_context,
                      decided: Callable[[], None] = lambda: None) -> None:
        """One transaction end to end, under its own trace (the bank's traceparent, else a new root).

        `decided()` is called once the decision (or the error) is out: the caller frees the stream's
        slot then, so explanations being written never hold up the next transactions' decisions.
        """
        parent = otel_context.Context()
        if tx.traceparent:
            parent = self._propagator.extract({"traceparent": tx.traceparent}, context=parent)
        links = []
        current = trace.get_current_span().get_span_context()
        if current.is_valid:
            links.append(Link(current))            # the stream's RPC span
        session.transactions += 1
        with self.tracer.start_as_current_span("privlm.risk.transaction", context=parent, links=links,
                                               attributes={I.PRIVLM_TENANT: session.tenant,
                                                           "privlm.risk.session": session.session_id[:12]}) as span:
            try:
                await self._process(session, tx, emit, parse_memo_context, decided)
            except _TxFailed as exc:
                session.errors += 1
                span.set_attribute(I.PRIVLM_OUTCOME, "client_error" if exc.client else "server_error")
                span.set_attribute("error.type", exc.reason)
                await emit(TxError(tx.transaction_id, exc.code, exc.reason, str(exc)))
            except Exception as exc:  # noqa: BLE001 - a bug must not end every other transaction's stream
                session.errors += 1
                span.set_attribute(I.PRIVLM_OUTCOME, "server_error")
                span.set_attribute("error.type", type(exc).__name__)
                log.error("risk transaction failed: %s", type(exc).__name__)   # the type only: no data
                await emit(TxError(tx.transaction_id, "INTERNAL", "internal", "internal error; see the server log"))

    async def _process(self, session: Session, tx: TransactionIn, emit: Emit, parse_memo_context, decided) -> None:
        memo = ""
        if tx.memo is not None:
            with self.tracer.start_as_current_span("privlm.risk.memo_open"):
                memo = await asyncio.to_thread(self._open_memo, session, tx, parse_memo_context)
        with self.tracer.start_as_current_span("privlm.risk.he_score", attributes={I.PRIVLM_HE_OP: "score"}):
            try:
                result = await self.he.score(session.tenant, session.context_id, session.model.model_id, tx.features)
            except HEError as exc:
                client = exc.code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND")
                raise _TxFailed(exc.code, "he_score_failed", f"HE scoring refused the ciphertext: {exc}", client)
        with self.tracer.start_as_current_span("privlm.risk.decrypt"):
            try:
                value = await asyncio.to_thread(self._decrypt, session, result)
            except KeyMismatch as exc:
                raise _TxFailed("FAILED_PRECONDITION", "key_mismatch", str(exc), False)
        probability = value if result.activation == "sigmoid" else 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, value))))
        alert = probability >= session.threshold
        await emit(Decision(tx.transaction_id, alert, probability, session.threshold, bool(memo), result.model_version))
        decided()
        if not alert:
            return
        session.alerts += 1
        if self.pending_explanations >= self.settings.max_pending_explanations:
            session.explanations_skipped += 1
            trace.get_current_span().set_attribute("privlm.risk.explanation", "skipped_overloaded")
            await emit(Explanation(tx.transaction_id, "", True, "overloaded"))
            return
        self.pending_explanations += 1
        try:
            await self._explain(session, tx.transaction_id, probability, memo, result.model_version, emit)
        finally:
            self.pending_explanations -= 1

    def _open_memo(self, session: Session, tx: TransactionIn, parse_memo_context) -> str:
        if len(tx.memo.ciphertext) > self.settings.max_memo_bytes + 16:
            self.rt.reject("too_large", tx.memo, session.tenant)
            raise _TxFailed("INVALID_ARGUMENT", "too_large", f"memo is over {self.settings.max_memo_bytes} bytes", True)
        try:
            plaintext, _, meta = open_labeled(self.rt, tx.memo, MEMO_LABEL, parse_memo_context, session.tenant)
        except SealError as exc:
            code = "PERMISSION_DENIED" if exc.reason in ("replayed", "stale_request") else "INVALID_ARGUMENT"
            raise _TxFailed(code, exc.reason, f"sealed memo refused: {exc}", True)
        if meta.transaction_id != tx.transaction_id:
            self.rt.reject("wrong_binding", tx.memo, session.tenant)
            raise _TxFailed("PERMISSION_DENIED", "wrong_binding", "sealed memo belongs to another transaction", True)
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise _TxFailed("INVALID_ARGUMENT", "bad_plaintext", "memo is not valid UTF-8", True)

    @staticmethod
    def _decrypt(session: Session, result: HEScore) -> float:
        values = session.keys.decrypt_scores(result.context_id, result.packing, result.num_records, result.scores)
        return float(values[0])

    async def _explain(self, session: Session, tx_id: str, probability: float, memo: str, version: str,
                       emit: Emit) -> None:
        # Short and concrete: a small model copies long preambles instead of explaining.
        memo_line = f'Memo: "{memo}".' if memo else "No memo."
        user = (f"A card transaction scored {probability:.0%} fraud probability (alert threshold "
                f"{session.threshold:.0%}). {memo_line}")
        inp = GenerateInput(model=self.settings.model, messages=(("system", SYSTEM_PROMPT), ("user", user)),
                            max_new_tokens=session.max_tokens, temperature=0.0, request_id=f"risk-{tx_id}",
                            tenant=session.tenant if session.tenant != "default" else "")
        with GenerationSpan(self.tracer, model=self.settings.model or self.service.default_model,
                            request_id=inp.request_id, operation="chat", name="privlm.risk.explain",
                            max_tokens=session.max_tokens, temperature=0.0) as g:
            try:
                async for chunk in self.service.generate(inp, timeout=self.settings.generation_timeout_s):
                    g.tokens(len(chunk.token_ids))
                    if chunk.text or chunk.finish:
                        await emit(Explanation(tx_id, chunk.text, chunk.finish is not None))
                    if chunk.finish:
                        g.finish(chunk.finish, prompt_tokens=chunk.prompt_tokens,
                                 completion_tokens=chunk.completion_tokens)
            except Exception as exc:  # noqa: BLE001 - reported per transaction, the session goes on
                code, _ = _status(exc)
                raise _TxFailed(code, "explanation_failed", "the model could not write the explanation", False)

    def end(self, session: Session) -> SessionEnd:
        session.keys = None                      # drop the released secret with the session
        return SessionEnd(session.transactions, session.alerts, session.errors, session.explanations_skipped)


def _status(exc: BaseException) -> tuple[str, str]:
    """(gRPC status name, message) of an exception from the gateway path or a gRPC call."""
    code = getattr(exc, "code", None)
    if callable(code):                                   # grpc.aio.AioRpcError
        return code().name, ""
    from privlm.base.errors import status_for

    sc, msg = status_for(exc)
    return sc.name, msg


class _TxFailed(Exception):
    def __init__(self, code: str, reason: str, message: str, client: bool):
        super().__init__(message)
        self.code, self.reason, self.client = code, reason, client


def _probe_matches(public_context: bytes, keys: BankKeys) -> bool:
    """Encrypt known values under the public context, decrypt with the released secret."""
    import tenseal as ts

    probe = np.array([1.25, -3.5, 0.0, 7.0])
    pub = ts.context_from(public_context)
    blob = ts.ckks_vector(pub, probe.tolist()).serialize()
    try:
        got = keys.decrypt_vector(keys.context_id, blob)[:probe.size]
    except Exception:  # noqa: BLE001
        return False
    return bool(np.allclose(got, probe, atol=1e-3))

"""The HE engine: public-context registry per tenant, encrypted scoring and aggregation.

Holds only public/evaluation keys (a context with a secret key is refused before it reaches TenSEAL's
loader). Synchronous and CPU-bound: the servicer runs it on worker threads. Raises privlm.base.errors; no
grpc, no generated stubs.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import tenseal as ts

from privlm.base.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.he.config import HEServiceConfig
from services.he.model import ScoringModel
from services.he.params import (
    ContextInfo,
    TenSEALContextProto,
    ciphertext_levels,
    ciphertext_scale_bits,
    context_id,
    inspect_context,
    rotation_steps,
)

log = logging.getLogger("privlm.he")

FEATURE_MAJOR = "feature_major"
RECORD_PER_CIPHERTEXT = "record_per_ciphertext"
ACTIVATIONS = ("auto", "none", "sigmoid")
STATISTICS = ("sum", "mean", "variance")
STAT_DEPTH = {"sum": 0, "mean": 1, "variance": 2}
LINEAR_DEPTH = 1


@dataclass
class _Entry:
    ctx: ts.Context
    info: ContextInfo


@dataclass(frozen=True)
class ScoreJob:
    context_id: str
    model_id: str
    packing: str
    num_records: int
    ciphertexts: list[bytes]
    activation: str = "auto"


@dataclass(frozen=True)
class ScoreOutcome:
    context_id: str
    model: ScoringModel
    packing: str
    num_records: int
    scores: list[bytes]
    activation: str          # "none" or "sigmoid"
    levels_left: int


@dataclass(frozen=True)
class AggregateOutcome:
    context_id: str
    count: int
    length: int
    results: list[tuple[str, bytes, int]]   # (statistic, ciphertext, levels left)


class HEEngine:
    def __init__(self, config: HEServiceConfig, models: list[ScoringModel]):
        self.config = config
        self.models = {m.model_id: m for m in models}
        self.default_model_id = models[0].model_id if models else ""
        self._contexts: dict[str, dict[str, _Entry]] = {}    # tenant -> context id -> entry
        self._lock = threading.Lock()

    # ---- contexts -------------------------------------------------------------------------------
    def register_context(self, tenant: str, blob: bytes) -> tuple[str, ContextInfo, bool]:
        cfg = self.config
        if not blob:
            raise InvalidArgument("public_context is empty")
        if len(blob) > cfg.max_context_bytes:
            raise InvalidArgument(f"public_context is {len(blob)} bytes, over the limit of {cfg.max_context_bytes}")
        cid = context_id(blob)
        with self._lock:
            existing = self._contexts.get(tenant, {}).get(cid)
        if existing is not None:
            return cid, existing.info, True
        ctx = _load_public_context(blob)
        info = inspect_context(ctx, len(blob))
        with self._lock:
            mine = self._contexts.setdefault(tenant, {})
            if cid in mine:
                return cid, mine[cid].info, True
            if len(mine) >= cfg.max_contexts_per_tenant:
                raise ResourceExhausted(f"tenant already has {len(mine)} contexts (limit "
                                        f"{cfg.max_contexts_per_tenant}); DeleteContext one first")
            used = sum(e.info.context_bytes for e in mine.values())
            if used + len(blob) > cfg.max_context_bytes_per_tenant:
                raise ResourceExhausted(f"tenant contexts would take {used + len(blob)} bytes (limit "
                                        f"{cfg.max_context_bytes_per_tenant}); DeleteContext one first")
            mine[cid] = _Entry(ctx, info)
        log.info("registered context %s (N=%d, depth %d, galois=%s)", cid[:16], info.poly_modulus_degree,
                 info.depth, info.has_galois_keys)
        return cid, info, False

    def delete_context(self, tenant: str, cid: str) -> None:
        with self._lock:
            if self._contexts.get(tenant, {}).pop(cid, None) is None:
                raise NotFound(f"context {cid!r} is not registered for this tenant")

    def context(self, tenant: str, cid: str) -> _Entry:
        if not cid:
            raise InvalidArgument("context_id is required (RegisterContext returns it)")
        with self._lock:
            entry = self._contexts.get(tenant, {}).get(cid)
        if entry is None:
            raise NotFound(f"context {cid!r} is not registered for this tenant; call RegisterContext")
        return entry

    def held_contexts(self) -> list[ts.Context]:
        """Every context the engine holds (tests use this to show none can decrypt)."""
        with self._lock:
            return [e.ctx for t in self._contexts.values() for e in t.values()]

    def model(self, model_id: str) -> ScoringModel:
        if not self.models:
            raise FailedPrecondition("this server has no scoring model configured (--model-file)")
        model = self.models.get(model_id or self.default_model_id)
        if model is None:
            raise NotFound(f"model {model_id!r} is not configured; Describe lists the model ids")
        return model

    # ---- scoring --------------------------------------------------------------------------------
    def score(self, tenant: str, job: ScoreJob) -> ScoreOutcome:
        entry = self.context(tenant, job.context_id)
        model = self.model(job.model_id)
        if job.activation not in ACTIVATIONS:
            raise InvalidArgument(f"activation must be one of {ACTIVATIONS}")
        n, f, slots = job.num_records, model.num_features, entry.info.slots
        if not 1 <= n <= self.config.max_records_per_request:
            raise InvalidArgument(f"num_records must be in [1, {self.config.max_records_per_request}], got {n}")
        if job.packing == FEATURE_MAJOR:
            blocks = math.ceil(n / slots)
            expected = f * blocks
            layout = f"{f} features x {blocks} block(s) of up to {slots} records"
        elif job.packing == RECORD_PER_CIPHERTEXT:
            expected, layout = n, "one ciphertext per record"
            if f > 1 and not entry.info.has_galois_keys:
                raise FailedPrecondition(
                    f"PACKING_RECORD_PER_CIPHERTEXT sums slots with rotations by {rotation_steps(f)}: register a "
                    "context generated with those Galois keys, or use PACKING_FEATURE_MAJOR (no rotations)")
        else:
            raise InvalidArgument("packing must be PACKING_FEATURE_MAJOR or PACKING_RECORD_PER_CIPHERTEXT")
        if len(job.ciphertexts) != expected:
            raise InvalidArgument(f"expected {expected} ciphertexts ({layout}) for {n} records of model "
                                  f"{model.name!r}, got {len(job.ciphertexts)}")
        self._check_request_size(job.ciphertexts)

        if job.packing == FEATURE_MAJOR:
            sizes = [min(slots, n - (i // f) * slots) for i in range(expected)]
        else:
            sizes = [f] * n
        vecs = [_load_vector(entry.ctx, blob, i, size, job.context_id, entry.info)
                for i, (blob, size) in enumerate(zip(job.ciphertexts, sizes))]
        levels = min(ciphertext_levels(v) for v in vecs)
        activation = self._choose_activation(job.activation, levels, model, entry.info.has_relin_keys)
        a, c = model.affine()
        with _he_errors():
            if job.packing == FEATURE_MAJOR:
                outs = [_linear_feature_major(vecs[k * f:(k + 1) * f], a, c) for k in range(len(vecs) // f)]
            else:
                a_list = a.tolist()
                outs = [v.dot(a_list) + c for v in vecs]
            if activation == "sigmoid":
                outs = [odd_polyval(o, model.sigmoid_coefficients) for o in outs]
            scores = [o.serialize() for o in outs]
        return ScoreOutcome(job.context_id, model, job.packing, n, scores, activation, ciphertext_levels(outs[0]))

    @staticmethod
    def _choose_activation(requested: str, levels: int, model: ScoringModel, has_relin_keys: bool) -> str:
        need_sigmoid = LINEAR_DEPTH + model.sigmoid_depth
        if requested == "sigmoid" and not has_relin_keys:
            raise FailedPrecondition("the sigmoid multiplies ciphertexts and needs relinearisation keys in the context")
        if levels < LINEAR_DEPTH:
            raise FailedPrecondition(f"the ciphertexts have {levels} multiplicative levels left and the linear score "
                                     f"needs {LINEAR_DEPTH}: depth exhausted, encrypt fresh ciphertexts")
        if requested == "sigmoid" and levels < need_sigmoid:
            raise FailedPrecondition(f"the sigmoid score needs {need_sigmoid} multiplicative levels "
                                     f"({LINEAR_DEPTH} linear + {model.sigmoid_depth} for the degree-"
                                     f"{model.sigmoid_degree} polynomial), the ciphertexts have {levels}: use a "
                                     f"depth-{need_sigmoid} preset or ACTIVATION_NONE (threshold the logit)")
        if requested == "none" or (requested == "auto" and (levels < need_sigmoid or not has_relin_keys)):
            return "none"
        return "sigmoid"

    # ---- aggregation ----------------------------------------------------------------------------
    def aggregate(self, tenant: str, cid: str, blobs: list[bytes], statistics: list[str], axis: str) -> AggregateOutcome:
        entry = self.context(tenant, cid)
        stats = list(dict.fromkeys(statistics or ["sum"]))
        bad = [s for s in stats if s not in STATISTICS]
        if bad:
            raise InvalidArgument(f"unknown statistic(s) {bad}; allowed: {list(STATISTICS)}")
        if axis not in ("ciphertexts", "slots"):
            raise InvalidArgument("axis must be AXIS_CIPHERTEXTS or AXIS_SLOTS")
        if not blobs:
            raise InvalidArgument("ciphertexts is empty")
        if len(blobs) > self.config.max_ciphertexts_per_request:
            raise InvalidArgument(f"{len(blobs)} ciphertexts, over the limit of {self.config.max_ciphertexts_per_request}")
        self._check_request_size(blobs)
        vecs = [_load_vector(entry.ctx, b, i, None, cid, entry.info) for i, b in enumerate(blobs)]
        length = vecs[0].size()
        if any(v.size() != length for v in vecs):
            raise InvalidArgument(f"all ciphertexts must hold the same number of values; sizes "
                                  f"{sorted({v.size() for v in vecs})}")
        if axis == "slots" and not entry.info.has_galois_keys:
            raise FailedPrecondition("AXIS_SLOTS sums within ciphertexts with rotations: register a context with "
                                     "Galois keys, or use AXIS_CIPHERTEXTS")
        levels = min(ciphertext_levels(v) for v in vecs)
        need = max(STAT_DEPTH[s] for s in stats)
        if levels < need:
            worst = max(stats, key=STAT_DEPTH.get)
            raise FailedPrecondition(f"{worst} needs {need} multiplicative levels, the ciphertexts have {levels}")
        if "variance" in stats and not entry.info.has_relin_keys:
            raise FailedPrecondition("variance multiplies ciphertexts and needs relinearisation keys in the context")

        def reduce(vs: list[ts.CKKSVector]) -> ts.CKKSVector:
            if axis == "slots":
                vs = [v.sum() for v in vs]
            if len(vs) == 1:
                return vs[0]
            total = vs[0] + vs[1]          # a new vector (copy() needs an encryptor: not in public contexts)
            for v in vs[2:]:
                total.add_(v)
            return total

        count = len(vecs) if axis == "ciphertexts" else len(vecs) * length
        results = []
        with _he_errors():
            total = reduce(vecs)
            mean = total * (1.0 / count) if ("mean" in stats or "variance" in stats) else None
            for s in stats:
                if s == "sum":
                    out = total
                elif s == "mean":
                    out = mean
                else:
                    out = reduce([v.square() for v in vecs]) * (1.0 / count) - mean.square()
                results.append((s, out.serialize(), ciphertext_levels(out)))
        return AggregateOutcome(cid, count, 1 if axis == "slots" else length, results)

    def _check_request_size(self, blobs: list[bytes]) -> None:
        cfg = self.config
        if len(blobs) > cfg.max_ciphertexts_per_request:
            raise InvalidArgument(f"{len(blobs)} ciphertexts, over the limit of {cfg.max_ciphertexts_per_request}")
        total = sum(len(b) for b in blobs)
        if total > cfg.max_request_bytes:
            raise InvalidArgument(f"ciphertexts total {total} bytes, over the limit of {cfg.max_request_bytes}; "
                                  "split the batch")


def _load_public_context(blob: bytes) -> ts.Context:
    """Parse a client's context, refusing any that carries a secret key before TenSEAL loads it."""
    proto = TenSEALContextProto()
    try:
        proto.ParseFromString(blob)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad input
        raise InvalidArgument("public_context is not a serialized TenSEAL context") from exc
    if proto.HasField("private_context") and proto.private_context.secret_key:
        # Never stored, never logged: the bytes go out of scope with this request.
        raise InvalidArgument("refused: public_context contains a secret key; send "
                              "Context.serialize(save_secret_key=False) (the service must never hold it)")
    try:
        ctx = ts.context_from(blob)
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgument(f"public_context could not be loaded: {exc}") from exc
    if ctx.is_private() or ctx.has_secret_key():
        raise InvalidArgument("refused: public_context contains a secret key")
    if ctx.seal_context().data.key_context_data().parms().scheme() != ts.SCHEME_TYPE.CKKS.value:
        raise InvalidArgument("public_context is not a CKKS context")
    try:
        scale = ctx.global_scale
    except ValueError:
        scale = 0.0
    if not scale > 0:
        raise InvalidArgument("public_context has no global scale: set Context.global_scale (the client library does)")
    # Our evaluation relies on automatic relinearisation/rescaling/mod-switching, whatever the client set.
    ctx.auto_relin = ctx.auto_rescale = ctx.auto_mod_switch = True
    return ctx


def _load_vector(ctx: ts.Context, blob: bytes, index: int, size: int | None, cid: str,
                 info: ContextInfo) -> ts.CKKSVector:
    try:
        vec = ts.ckks_vector_from(ctx, blob)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or foreign-parameter ciphertexts
        raise InvalidArgument(f"ciphertexts[{index}] is not a valid CKKS vector for context {cid[:16]}: corrupt, "
                              f"truncated, or encrypted under other parameters ({type(exc).__name__})") from exc
    if size is not None and vec.size() != size:
        raise InvalidArgument(f"ciphertexts[{index}] holds {vec.size()} values, expected {size}")
    scale = ciphertext_scale_bits(vec)
    if abs(scale - info.scale_bits) > 1.0:
        raise InvalidArgument(f"ciphertexts[{index}] has scale 2^{scale:.1f}, the context's is 2^{info.scale_bits:.1f}")
    return vec


def _linear_feature_major(vecs: list[ts.CKKSVector], a, c: float) -> ts.CKKSVector:
    """z = sum_j a_j * x_j + c over one block: F plaintext-scalar products, no rotation."""
    acc = None
    for v, aj in zip(vecs, a):                    # v: [records in block]
        if aj == 0.0:                             # a zero plaintext would make a transparent ciphertext
            continue
        term = v * float(aj)
        if acc is None:
            acc = term
        else:
            acc.add_(term)
    return acc + c


def odd_polyval(z: ts.CKKSVector, coeffs) -> ts.CKKSVector:
    """c0 + c1 z + c3 z^3 (+ c5 z^5 + c7 z^7): the model's odd sigmoid polynomial, at depth
    ceil(log2(degree + 1)) like TenSEAL's polyval, but without encrypting constants (TenSEAL's
    polyval does, so it fails on contexts without a public key). Zero coefficients are skipped."""
    c = list(coeffs) + [0.0] * (8 - len(coeffs))
    if any(c[k] for k in (2, 4, 6)):
        raise ValueError("odd_polyval takes odd polynomials (plus a constant) only")
    degree = max(k for k in range(8) if c[k] or k == 1)
    z2 = z.square() if degree >= 3 else None                      # level +1
    z4 = z2.square() if degree >= 5 else None                     # level +2
    terms = []
    if c[1]:
        terms.append(z * c[1])                                    # level +1
    if c[3]:
        terms.append((z * c[3]) * z2)                             # level +2
    if c[5]:
        terms.append((z * c[5]) * z4)                             # level +3
    if c[7]:
        terms.append(((z * c[7]) * z2) * z4)                      # level +3
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out + c[0] if c[0] else out


class _he_errors:
    """Map TenSEAL's depth/key errors raised mid-computation to statuses a caller can act on."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, (ValueError, RuntimeError)):
            return False
        text = str(exc)
        if "scale out of bounds" in text or "end of modulus switching chain" in text:
            raise FailedPrecondition(f"multiplicative depth exhausted ({text}): use a deeper preset or fresh "
                                     "ciphertexts") from exc
        if "Galois key" in text or "galois" in text.lower():
            raise FailedPrecondition(f"the context lacks a Galois key this operation needs ({text})") from exc
        return False

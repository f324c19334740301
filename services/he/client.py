"""Bank-side client library: keys from presets by depth, SIMD packing, encryption, checked decryption,
and the gRPC calls to the HE service.

    keys = BankKeys.generate(depth=1, rotations_for=64)      # rotations only for the single-record path
    with HEClient("127.0.0.1:50061") as he:
        he.register(keys)
        scores = he.score(keys, x).values                        # x: [N, 64] plaintext, stays here

The request/response helpers (`score_request`, `read_scores`) work with the sync or the aio stub, so
the gateway's risk-alert stream can build one-record requests itself and an enclave holding the
released key can decrypt with `BankKeys.import_secret(...).decrypt_scores(...)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from privlm.v1 import he_pb2 as pb
from privlm.v1 import he_pb2_grpc as pb_grpc
from services.he.keys import FEATURE_MAJOR, RECORD_PER_CIPHERTEXT, BankKeys, KeyMismatch, packing_for  # noqa: F401
from services.he.params import CkksPreset, preset_for_depth  # noqa: F401 - part of the client API
from services.he.server import TENANT_KEY

PACKING_PB = {FEATURE_MAJOR: pb.PACKING_FEATURE_MAJOR, RECORD_PER_CIPHERTEXT: pb.PACKING_RECORD_PER_CIPHERTEXT}
PACKING_NAME = {v: k for k, v in PACKING_PB.items()}
ACTIVATION_PB = {"auto": pb.ACTIVATION_AUTO, "none": pb.ACTIVATION_NONE, "sigmoid": pb.ACTIVATION_SIGMOID}
STATISTIC_PB = {"sum": pb.STATISTIC_SUM, "mean": pb.STATISTIC_MEAN, "variance": pb.STATISTIC_VARIANCE}
STATISTIC_NAME = {v: k for k, v in STATISTIC_PB.items()}
AXIS_PB = {"ciphertexts": pb.AXIS_CIPHERTEXTS, "slots": pb.AXIS_SLOTS}
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Scores:
    values: np.ndarray        # [N], record order
    activation: str           # "none" (logit) or "sigmoid" (probability)
    model_id: str
    model_version: str
    levels_left: int


def score_request(keys: BankKeys, x: np.ndarray, *, num_features: int | None = None, model_id: str = "",
                  packing: str = "auto", activation: str = "auto") -> pb.ScoreBatchRequest:
    """Encrypt x: [N, F] in the chosen layout ("auto": the fewest ciphertexts the keys allow)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(f"x has {x.shape[1]} features, the model takes {num_features}")
    if packing == "auto":
        packing = packing_for(x.shape[0], x.shape[1], bool(keys.rotation_steps))
    cts = keys.encrypt_feature_major(x) if packing == FEATURE_MAJOR else keys.encrypt_records(x)
    return pb.ScoreBatchRequest(context_id=keys.context_id, model_id=model_id, packing=PACKING_PB[packing],
                                num_records=x.shape[0], ciphertexts=cts, activation=ACTIVATION_PB[activation])


def read_scores(keys: BankKeys, resp: pb.ScoreBatchResponse) -> Scores:
    """Decrypt a ScoreBatch response after checking it was computed under these keys' context."""
    values = keys.decrypt_scores(resp.context_id, PACKING_NAME[resp.packing], resp.num_records, list(resp.scores))
    activation = "sigmoid" if resp.activation == pb.ACTIVATION_SIGMOID else "none"
    return Scores(values, activation, resp.model_id, resp.model_version, resp.levels_left)


class HEClient:
    """Synchronous client over a real gRPC channel: plaintext loopback, or mTLS with `credentials`
    (e.g. privlm.base.certs.channel_credentials(tls_dir, "client")); the server's name is "he"."""

    def __init__(self, target: str, tenant: str = "default", credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout: float | None = 60.0,
                 server_name: str = "he"):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if credentials:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.HomomorphicPreprocessorStub(self.channel)
        self.metadata = ((TENANT_KEY, tenant),)
        self.timeout = timeout
        self._models: dict[str, int] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def register(self, keys: BankKeys) -> str:
        resp = self.stub.RegisterContext(pb.RegisterContextRequest(public_context=keys.public_context),
                                         metadata=self.metadata, timeout=self.timeout)
        keys.check_context(resp.context_id)     # the service hashed exactly what we sent
        return resp.context_id

    def delete(self, keys: BankKeys) -> None:
        self.stub.DeleteContext(pb.DeleteContextRequest(context_id=keys.context_id), metadata=self.metadata,
                                timeout=self.timeout)

    def describe(self, context_id: str = "") -> pb.DescribeResponse:
        return self.stub.Describe(pb.DescribeRequest(context_id=context_id), metadata=self.metadata,
                                  timeout=self.timeout)

    def num_features(self, model_id: str = "") -> int:
        if model_id not in self._models:
            for m in self.describe().models:
                self._models[m.model_id] = m.num_features
                if m.is_default:
                    self._models[""] = m.num_features
        if model_id not in self._models:
            raise KeyError(f"model {model_id!r} is not served")
        return self._models[model_id]

    def score(self, keys: BankKeys, x: np.ndarray, *, model_id: str = "", packing: str = "auto",
              activation: str = "auto") -> Scores:
        req = score_request(keys, x, num_features=self.num_features(model_id), model_id=model_id,
                            packing=packing, activation=activation)
        return read_scores(keys, self.stub.ScoreBatch(req, metadata=self.metadata, timeout=self.timeout))

    def aggregate(self, keys: BankKeys, vectors, statistics=("sum",), axis: str = "ciphertexts") -> dict[str, np.ndarray]:
        """vectors: [K, L] plaintext -> {statistic: [L] (or [1] over slots)}, computed encrypted."""
        vectors = np.asarray(vectors, dtype=np.float64)
        _check_aggregate_bounds(keys, vectors, statistics)
        req = pb.AggregateRequest(context_id=keys.context_id, ciphertexts=[keys.encrypt_vector(v) for v in vectors],
                                  statistics=[STATISTIC_PB[s] for s in statistics], axis=AXIS_PB[axis])
        resp = self.stub.Aggregate(req, metadata=self.metadata, timeout=self.timeout)
        return {STATISTIC_NAME[r.statistic]: keys.decrypt_vector(resp.context_id, r.ciphertext)[:resp.length]
                for r in resp.results}


def _check_aggregate_bounds(keys: BankKeys, vectors: np.ndarray, statistics) -> None:
    """Refuse inputs whose results would overflow the modulus left after their levels (CKKS would
    return garbage, not an error). mean: |x| at level 1; variance: x^2 at level 2; sum: |sum| at 0."""
    peak = float(np.abs(vectors).max()) if vectors.size else 0.0
    needs = {"sum": (0, peak * max(1, vectors.shape[0] * (vectors.shape[1] if vectors.ndim > 1 else 1))),
             "mean": (1, peak), "variance": (2, peak * peak)}
    for stat in statistics:
        levels, magnitude = needs[stat]
        if levels <= keys.depth and magnitude >= keys.value_bound(levels):
            raise ValueError(f"{stat} of values up to {peak:g} would overflow this depth-{keys.depth} context "
                             f"(bound {keys.value_bound(levels):g} after {levels} level(s)): rescale the values "
                             "(e.g. thousands) or use a deeper preset")


class AsyncHEClient:
    """grpc.aio client for services that forward bank ciphertexts (the gateway's risk-alert stream):
    the bank encrypted the transaction, this client only moves bytes; whoever holds the key (the bank,
    or an attested enclave with `BankKeys.import_secret`) decrypts with `read_scores`."""

    def __init__(self, target: str, tenant: str = "default", credentials: grpc.ChannelCredentials | None = None,
                 interceptors=(), max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, server_name: str = "he"):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if credentials:
            options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.aio.secure_channel(target, credentials, options, interceptors=list(interceptors))
        else:
            self.channel = grpc.aio.insecure_channel(target, options, interceptors=list(interceptors))
        self.stub = pb_grpc.HomomorphicPreprocessorStub(self.channel)
        self.metadata = ((TENANT_KEY, tenant),)

    async def close(self) -> None:
        await self.channel.close()

    async def register(self, public_context: bytes, timeout: float | None = 60.0) -> str:
        resp = await self.stub.RegisterContext(pb.RegisterContextRequest(public_context=public_context),
                                               metadata=self.metadata, timeout=timeout)
        return resp.context_id

    async def score(self, request: pb.ScoreBatchRequest, timeout: float | None = None) -> pb.ScoreBatchResponse:
        return await self.stub.ScoreBatch(request, metadata=self.metadata, timeout=timeout)

    async def score_one(self, context_id: str, ciphertext: bytes, *, model_id: str = "", activation: str = "none",
                        timeout: float | None = None) -> pb.ScoreBatchResponse:
        """One transaction (one record-per-ciphertext vector) -> its encrypted score (slot 0)."""
        req = pb.ScoreBatchRequest(context_id=context_id, model_id=model_id, num_records=1,
                                   packing=pb.PACKING_RECORD_PER_CIPHERTEXT, ciphertexts=[ciphertext],
                                   activation=ACTIVATION_PB[activation])
        return await self.stub.ScoreBatch(req, metadata=self.metadata, timeout=timeout)

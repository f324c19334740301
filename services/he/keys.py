"""Bank-side CKKS keys, SIMD packing, encryption and checked decryption (no grpc here).

The secret key never leaves this object except through `export_secret()` (for release to an attested
enclave, sealed by the caller). Every result is checked against the context id it was computed under
before decrypting: TenSEAL decrypts garbage silently under a wrong key, so we refuse instead.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from services.he.params import CkksPreset, TenSEALContextProto, context_id, inspect_context, preset_for_depth, rotation_steps

FEATURE_MAJOR = "feature_major"
RECORD_PER_CIPHERTEXT = "record_per_ciphertext"
_EXPORT_MAGIC = b"PRIVLM-HE-SECRET-1\n"


class KeyMismatch(ValueError):
    """A result was computed under another context/key than the one asked to decrypt it."""


class BankKeys:
    """A CKKS key pair from a preset: the secret context stays here, `public_context` goes to the service."""

    def __init__(self, secret_ctx: ts.Context, public_context: bytes, preset: CkksPreset | None = None):
        if not secret_ctx.is_private():
            raise ValueError("BankKeys needs the secret context")
        self._ctx = secret_ctx
        self.public_context = public_context
        self.context_id = context_id(public_context)
        self.preset = preset
        parms = secret_ctx.seal_context().data.first_context_data()
        self.slots = parms.parms().poly_modulus_degree() // 2
        self.depth = parms.chain_index()
        self.rotation_steps: list[int] = []      # Galois key steps in the public context

    @classmethod
    def generate(cls, depth: int = 1, rotations_for: int | None = None, compact: bool = False,
                 symmetric: bool = False) -> "BankKeys":
        """Keys for `depth` multiplicative levels. `rotations_for=F` adds Galois keys for the rotation
        steps a dot product over F slots needs (log2 F keys, not the full 35 MB set): only the
        one-record-per-ciphertext path and AXIS_SLOTS aggregates need them. `compact=True` (depth 1)
        uses the N=4096 ring: ~2x less CPU per single record, ~1e-3 precision, results within +-128.
        `symmetric=True` encrypts with the secret key (2.3x cheaper encryption); the public context
        then carries no public key, so only this key holder can encrypt under it."""
        preset = preset_for_depth(depth, compact=compact)
        kind = ts.ENCRYPTION_TYPE.SYMMETRIC if symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, preset.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes), encryption_type=kind)
        ctx.global_scale = 2.0 ** preset.scale_bits
        if symmetric:      # TenSEAL's make_context_public refuses symmetric contexts; drop the key instead
            blob = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                                 save_relin_keys=True)
        else:
            public = ctx.copy()
            public.make_context_public()
            blob = public.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                    save_relin_keys=True)
        steps = rotation_steps(rotations_for) if rotations_for else []
        if steps:
            blob = _with_galois_keys(ctx, blob, steps)
        keys = cls(ctx, blob, preset)
        keys.rotation_steps = steps
        return keys

    def value_bound(self, levels_used: int) -> float:
        """Largest |value| a ciphertext can hold after `levels_used` rescales: beyond it CKKS wraps
        around silently and every slot decrypts to garbage, so callers check before sending."""
        info = inspect_context(self._ctx, 0)
        data_bits = info.coeff_modulus_bits[:-1]                 # q0 first, special prime excluded
        remaining = sum(data_bits[:len(data_bits) - levels_used])
        return 2.0 ** (remaining - info.scale_bits - 1)

    # ---- export for an attested enclave -----------------------------------------------------------
    def export_secret(self) -> bytes:
        """The secret context (no Galois keys) bound to this context id: seal it before it travels."""
        secret = self._ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                                     save_relin_keys=False)
        return _EXPORT_MAGIC + self.context_id.encode() + b"\n" + secret

    @classmethod
    def import_secret(cls, blob: bytes) -> "BankKeys":
        if not blob.startswith(_EXPORT_MAGIC):
            raise ValueError("not an exported privlm HE secret")
        rest = blob[len(_EXPORT_MAGIC):]
        cid, _, secret = rest.partition(b"\n")
        keys = cls.__new__(cls)
        BankKeys.__init__(keys, ts.context_from(secret), b"", None)
        keys.context_id = cid.decode()          # the id of the public context registered with the service
        return keys

    # ---- packing and encryption -----------------------------------------------------------------
    def encrypt_feature_major(self, x: np.ndarray) -> list[bytes]:
        """x: [N, F] -> F ciphertexts per block of `slots` records; ciphertext j holds feature j of every
        record in the block (slot r = record r). The batch layout: w.x + b needs no rotation."""
        x = _check_matrix(x)
        out = []
        for start in range(0, x.shape[0], self.slots):
            block = x[start:start + self.slots]              # block: [n_b, F]
            out += [ts.ckks_vector(self._ctx, block[:, j]).serialize() for j in range(x.shape[1])]
        return out

    def encrypt_records(self, x: np.ndarray) -> list[bytes]:
        """x: [N, F] -> N ciphertexts, record i's F features in slots 0..F-1 (the low-latency layout)."""
        x = _check_matrix(x)
        return [ts.ckks_vector(self._ctx, row).serialize() for row in x]

    def encrypt_vector(self, values) -> bytes:
        v = _check_matrix(np.asarray(values, dtype=np.float64).reshape(1, -1))[0]
        if v.size > self.slots:
            raise ValueError(f"{v.size} values do not fit {self.slots} slots")
        return ts.ckks_vector(self._ctx, v).serialize()

    # ---- checked decryption ---------------------------------------------------------------------
    def check_context(self, result_context_id: str) -> None:
        if result_context_id != self.context_id:
            raise KeyMismatch(f"result was computed under context {result_context_id[:16]}..., these keys are "
                              f"{self.context_id[:16]}...: refusing to decrypt (it would be garbage)")

    def decrypt_vector(self, result_context_id: str, blob: bytes) -> np.ndarray:
        self.check_context(result_context_id)
        return np.asarray(ts.ckks_vector_from(self._ctx, blob).decrypt(), dtype=np.float64)

    def decrypt_scores(self, result_context_id: str, packing: str, num_records: int,
                       scores: list[bytes]) -> np.ndarray:
        """Scores in record order: [num_records]."""
        self.check_context(result_context_id)
        if packing == FEATURE_MAJOR:
            parts = [np.asarray(ts.ckks_vector_from(self._ctx, b).decrypt()) for b in scores]
            out = np.concatenate(parts) if parts else np.zeros(0)
        else:
            out = np.asarray([ts.ckks_vector_from(self._ctx, b).decrypt()[0] for b in scores])
        if out.shape[0] != num_records:
            raise ValueError(f"got {out.shape[0]} scores for {num_records} records")
        return out.astype(np.float64)

    def holds_secret(self) -> bytes:
        """The serialized secret key alone (tests check it never appears in anything sent)."""
        proto = TenSEALContextProto()
        proto.ParseFromString(self._ctx.serialize(save_secret_key=True, save_galois_keys=False,
                                                  save_relin_keys=False))
        return proto.private_context.secret_key


def _check_matrix(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected a non-empty [records, features] matrix, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite")
    return x


def _with_galois_keys(secret_ctx: ts.Context, public_blob: bytes, steps: list[int]) -> bytes:
    """Add Galois keys for `steps` only (TenSEAL can only make all ~24 of them, 35 MB at depth 2).

    SEAL's KeyGenerator takes Galois elements: a left rotation by k slots is 3^k mod 2N.
    """
    if not steps:
        return public_blob
    proto = TenSEALContextProto()
    proto.ParseFromString(secret_ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False))
    with tempfile.TemporaryDirectory(prefix="privlm-he-") as tmp:
        path = str(Path(tmp) / "blob")
        Path(path).write_bytes(proto.encryption_parameters)
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        parms.load(path)
        seal_ctx = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        sk = sealapi.SecretKey()
        Path(path).write_bytes(proto.private_context.secret_key)
        sk.load(seal_ctx, path)
        m = 2 * parms.poly_modulus_degree()
        keys = sealapi.KeyGenerator(seal_ctx, sk).create_galois_keys([pow(3, k, m) for k in steps])
        keys.save(path)
        galois = Path(path).read_bytes()
        Path(path).write_bytes(b"\0" * len(proto.private_context.secret_key))   # don't leave key bytes around
    public = TenSEALContextProto()
    public.ParseFromString(public_blob)
    public.public_context.galois_keys = galois
    return public.SerializeToString()


def packing_for(n_records: int, num_features: int, has_rotations: bool) -> str:
    """The layout with the fewest ciphertexts: one per record below F records (needs rotations), else
    one per feature holding up to `slots` records."""
    return RECORD_PER_CIPHERTEXT if has_rotations and n_records < num_features else FEATURE_MAJOR

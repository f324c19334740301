"""CKKS parameter presets by multiplicative depth, and inspection of TenSEAL contexts/ciphertexts.

Shared by the bank-side client and the server; imports neither grpc nor generated stubs.

Why these presets: scale 2^40 keeps ~1e-6 absolute error per fresh value (public-key encryption noise
is ~2^20); the first prime is 60 bits so a decrypted result may reach ~2^19 (about 5e5) in magnitude
after its last rescale; every 40-bit middle prime is one multiplicative level. 128-bit security caps
the total modulus at 218 bits for N=8192, 438 for N=16384, 881 for N=32768 (SEAL's table), so
depth <= 2 fits N=8192 and depth <= 7 fits N=16384.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import tenseal as ts
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

MAX_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
SCALE_BITS = 40
OUTER_PRIME_BITS = 60


@dataclass(frozen=True)
class CkksPreset:
    depth: int
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int = SCALE_BITS

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


# The compact single-record ring: N=4096 allows 109 bits in all. A 39-bit special prime at least as
# large as the data primes keeps rotation noise down; scale 2^31 leaves 2^7 of headroom in the 39-bit
# first prime. Measured: |logit error| <= 4e-4 for 64 features (vs ~1e-6 at N=8192), about 3x less
# CPU per record. Results must stay within +-128 or they wrap around.
COMPACT = (4096, (39, 31, 39), 31)


def preset_for_depth(depth: int, compact: bool = False) -> CkksPreset:
    """The smallest ring that gives `depth` multiplicative levels at scale 2^40 with 128-bit security.

    compact=True (depth 1 only) picks N=4096, scale 2^31: the low-latency single-record ring.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if compact:
        if depth != 1:
            raise ValueError("the compact preset (N=4096) has depth 1 only")
        n, bits, scale = COMPACT
        return CkksPreset(1, n, bits, scale)
    bits = (OUTER_PRIME_BITS, *([SCALE_BITS] * depth), OUTER_PRIME_BITS)
    for n in sorted(MAX_BITS):
        if n >= 8192 and sum(bits) <= MAX_BITS[n]:
            return CkksPreset(depth, n, bits)
    raise ValueError(f"depth {depth} does not fit 128-bit security at N <= 32768 with scale 2^{SCALE_BITS}")


def rotation_steps(num_features: int) -> list[int]:
    """Left rotations TenSEAL's sum() uses on a vector of this length: the powers of two below it."""
    steps, s = [], 1
    while s < num_features:
        steps.append(s)
        s *= 2
    return steps


def _context_message_class():
    """TenSEAL's context protobuf (tenseal/proto/tensealcontext.proto), built at run time.

    TenSEAL ships the .proto but not the generated module; we need it to splice in Galois keys for
    chosen rotation steps only and to check a context for a secret key before handing it to C++.
    """
    fd = descriptor_pb2.FileDescriptorProto(name="privlm_he_tenseal_context.proto",
                                            package="privlm_he_tenseal", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def message(name, fields):
        m = fd.message_type.add(name=name)
        for number, fname, ftype, tname in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=T.LABEL_OPTIONAL)
            if tname:
                f.type_name = tname

    message("Private", [(1, "secret_key", T.TYPE_BYTES, None), (2, "relin_keys_generated", T.TYPE_BOOL, None),
                        (3, "galois_keys_generated", T.TYPE_BOOL, None)])
    message("Public", [(1, "public_key", T.TYPE_BYTES, None), (2, "auto_flags", T.TYPE_UINT32, None),
                       (3, "scale", T.TYPE_DOUBLE, None), (4, "relin_keys", T.TYPE_BYTES, None),
                       (5, "galois_keys", T.TYPE_BYTES, None)])
    message("Context", [(1, "encryption_parameters", T.TYPE_BYTES, None),
                        (2, "public_context", T.TYPE_MESSAGE, ".privlm_he_tenseal.Public"),
                        (3, "private_context", T.TYPE_MESSAGE, ".privlm_he_tenseal.Private"),
                        (4, "encryption_type", T.TYPE_UINT32, None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("privlm_he_tenseal.Context"))


TenSEALContextProto = _context_message_class()


def context_id(public_context: bytes) -> str:
    """The identity of a public context: hex SHA-256 of its serialized bytes (binds the public key)."""
    return hashlib.sha256(public_context).hexdigest()


@dataclass(frozen=True)
class ContextInfo:
    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: float
    depth: int
    has_galois_keys: bool
    has_relin_keys: bool
    context_bytes: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


def inspect_context(ctx: ts.Context, size: int) -> ContextInfo:
    seal = ctx.seal_context().data
    key = seal.key_context_data()
    first = seal.first_context_data()
    # Walk the modulus chain: each level drops one prime, so successive total bit counts give the
    # primes' sizes (the product's bit count may round one bit off a sum of sizes).
    totals = [key.total_coeff_modulus_bit_count()]
    level = first
    while level is not None:
        totals.append(level.total_coeff_modulus_bit_count())
        level = level.next_context_data()
    primes = [totals[i] - totals[i + 1] for i in range(1, len(totals) - 1)] + [totals[-1]]
    bits = tuple(reversed(primes)) + (totals[0] - totals[1],)   # q0 first, special prime last
    return ContextInfo(poly_modulus_degree=first.parms().poly_modulus_degree(), coeff_modulus_bits=bits,
                       scale_bits=math.log2(ctx.global_scale) if ctx.global_scale > 0 else 0.0,
                       depth=first.chain_index(), has_galois_keys=ctx.has_galois_keys(),
                       has_relin_keys=ctx.has_relin_keys(), context_bytes=size)


def ciphertext_levels(vec: ts.CKKSVector) -> int:
    """Multiplicative levels a ciphertext has left (data primes at its level minus one)."""
    return min(c.coeff_modulus_size() for c in vec.ciphertext()) - 1


def ciphertext_scale_bits(vec: ts.CKKSVector) -> float:
    return math.log2(vec.ciphertext()[0].scale)

"""Encrypted scores and aggregates vs numpy plaintext, under explicit tolerances per depth."""
from __future__ import annotations

import numpy as np
import pytest
from he_support import TOLERANCE, F, make_records


def test_feature_major_linear_depth1(client, keys1_plain, he_model):
    client.register(keys1_plain)
    x = make_records(300)
    out = client.score(keys1_plain, x)
    assert out.activation == "none"                   # depth 1 has no room for the sigmoid
    assert out.model_id == he_model.model_id and out.model_version == "t1"
    ref = he_model.logit(x)
    assert np.abs(ref).max() > 1.0                    # the comparison is not trivially near zero
    np.testing.assert_allclose(out.values, ref, rtol=0, atol=TOLERANCE["linear_depth1"])
    assert out.levels_left == 0


def test_standardisation_matches_explicit_formula(he_model):
    x = make_records(5)
    w, mu, s = (np.asarray(v) for v in (he_model.weights, he_model.means, he_model.scales))
    np.testing.assert_allclose(he_model.logit(x), ((x - mu) / s) @ w + he_model.bias, rtol=1e-12, atol=1e-9)


def test_record_per_ciphertext_single_records(client, keys1, he_model):
    client.register(keys1)
    x = make_records(5, seed=3)
    for i in range(len(x)):
        out = client.score(keys1, x[i])               # one record: the low-latency layout
        assert out.values.shape == (1,)
        np.testing.assert_allclose(out.values, he_model.logit(x[i:i + 1]), atol=TOLERANCE["linear_depth1"])
    out = client.score(keys1, x, packing="record_per_ciphertext")
    np.testing.assert_allclose(out.values, he_model.logit(x), atol=TOLERANCE["linear_depth1"])


def test_compact_ring_single_records(client, he_model):
    from services.he.keys import BankKeys

    keys = BankKeys.generate(depth=1, rotations_for=F, compact=True)
    assert keys.slots == 2048 and keys.value_bound(1) == 128.0
    client.register(keys)
    d = client.describe(keys.context_id)
    assert d.parameters.poly_modulus_degree == 4096 and list(d.parameters.coeff_modulus_bits) == [39, 31, 39]
    x = make_records(6, seed=13)
    out = client.score(keys, x, packing="record_per_ciphertext")
    np.testing.assert_allclose(out.values, he_model.logit(x), atol=TOLERANCE["linear_compact"])
    out = client.score(keys, x, packing="feature_major")
    np.testing.assert_allclose(out.values, he_model.logit(x), atol=TOLERANCE["linear_compact"])


def test_auto_packing_picks_fewest_ciphertexts(keys1, keys1_plain):
    from privlm.v1 import he_pb2 as pb
    from services.he.client import score_request

    small = score_request(keys1, make_records(3))
    assert small.packing == pb.PACKING_RECORD_PER_CIPHERTEXT and len(small.ciphertexts) == 3
    big = score_request(keys1, make_records(40))
    assert big.packing == pb.PACKING_FEATURE_MAJOR and len(big.ciphertexts) == F
    no_rot = score_request(keys1_plain, make_records(3))
    assert no_rot.packing == pb.PACKING_FEATURE_MAJOR and len(no_rot.ciphertexts) == F


def test_feature_major_several_blocks(client, keys1_plain, he_model):
    client.register(keys1_plain)
    n = keys1_plain.slots + 37                         # two blocks: 4096 + 37 records
    x = make_records(n, seed=5)
    from services.he.client import score_request

    req = score_request(keys1_plain, x)
    assert len(req.ciphertexts) == 2 * F
    out = client.score(keys1_plain, x)
    np.testing.assert_allclose(out.values, he_model.logit(x), atol=TOLERANCE["linear_depth1"])


def test_depth2_linear_and_second_model(client, keys2, he_server):
    client.register(keys2)
    engine = he_server[0].privlm_servicer.engine
    other = [m for mid, m in engine.models.items() if mid != engine.default_model_id][0]
    x = make_records(64, seed=9)
    out = client.score(keys2, x, model_id=other.model_id, activation="none")
    assert out.model_id == other.model_id
    np.testing.assert_allclose(out.values, other.logit(x), atol=TOLERANCE["linear_depth2"])
    assert out.levels_left == 1


def test_depth3_sigmoid(client, keys3, he_model):
    client.register(keys3)
    # Records whose logits lie inside the polynomial's fitted range, plus the all-zero record.
    x = make_records(200, seed=11)
    z = he_model.logit(x)
    x = x[np.abs(z) < he_model.sigmoid_range]
    assert len(x) > 20
    out = client.score(keys3, x)                       # AUTO: depth 3 allows the sigmoid
    assert out.activation == "sigmoid"
    ref = he_model.sigmoid_poly(he_model.logit(x))
    np.testing.assert_allclose(out.values, ref, atol=TOLERANCE["sigmoid_depth3"])
    # decisions at 0.5 are the plaintext logistic model's decisions (the polynomial is odd about 1/2
    # and keeps the logit's sign inside its range)
    assert np.array_equal(out.values > 0.5, he_model.logit(x) > 0)


@pytest.mark.parametrize("degree,bound", [(3, 0.12), (5, 0.065), (7, 0.035)])
def test_sigmoid_fit_quality(he_model, degree, bound):
    """Max |poly - sigmoid| on [-8, 8] per degree (documented in docs/he.md)."""
    import dataclasses

    m = dataclasses.replace(he_model, sigmoid_degree=degree)
    z = np.linspace(-m.sigmoid_range, m.sigmoid_range, 401)
    err = np.abs(m.sigmoid_poly(z) - 1 / (1 + np.exp(-z)))
    assert err.max() < bound
    assert np.array_equal(m.sigmoid_poly(z) > 0.5, z > 0)
    assert m.sigmoid_coefficients[0] == 0.5 and m.sigmoid_coefficients[2] == 0.0
    assert m.sigmoid_depth == (2 if degree == 3 else 3)


@pytest.mark.parametrize("axis", ["ciphertexts", "slots"])
def test_aggregate_sum_mean_variance(client, keys2, axis):
    client.register(keys2)
    rng = np.random.default_rng(4)
    # one ciphertext per transaction, slot = account: spend (negative = refunds, zeros = no spend)
    v = rng.normal(size=(12, 10)) * 120
    v[3] = 0.0
    v[:, 4] = -np.abs(v[:, 4])
    v[0, 0] = 650.0                                   # the largest value, within the depth-2 bound
    out = client.aggregate(keys2, v, ["sum", "mean", "variance"], axis=axis)
    if axis == "ciphertexts":
        ref = {"sum": v.sum(0), "mean": v.mean(0), "variance": v.var(0)}
    else:
        ref = {"sum": np.array([v.sum()]), "mean": np.array([v.mean()]), "variance": np.array([v.var()])}
    for stat, want in ref.items():
        got = out[stat]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=TOLERANCE[stat], atol=TOLERANCE[stat] * 10)


def test_aggregate_large_sum_depth1(client, keys1_plain):
    client.register(keys1_plain)
    v = np.array([[1e9, -2.5e8, 0.0], [3.0e8, 1.0, 0.0]])   # sums stay at the top level: large values fine
    out = client.aggregate(keys1_plain, v, ["sum"])
    np.testing.assert_allclose(out["sum"], v.sum(0), rtol=1e-7, atol=1e-2)
    # a mean of these would overflow the 60-bit modulus left after one level (CKKS wraps silently):
    # the client library refuses before sending instead of returning garbage
    assert keys1_plain.value_bound(1) == 2.0 ** 19
    with pytest.raises(ValueError, match="overflow"):
        client.aggregate(keys1_plain, v, ["mean"])
    small = v / 1e4                                    # the same data in units of 10k
    out = client.aggregate(keys1_plain, small, ["mean"])
    np.testing.assert_allclose(out["mean"], small.mean(0), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("degree,depth,tol", [(3, 2, 1e-5), (5, 3, 1e-4), (7, 3, 2e-3)])
def test_odd_polyval_depth_and_accuracy(degree, depth, tol):
    """The sigmoid polynomial uses exactly ceil(log2(degree+1)) levels and matches numpy."""
    import tenseal as ts

    from services.he.engine import odd_polyval
    from services.he.keys import BankKeys
    from services.he.model import fit_sigmoid
    from services.he.params import ciphertext_levels

    keys = BankKeys.generate(depth=depth)
    pub = ts.context_from(keys.public_context)
    z = np.concatenate([np.linspace(-8, 8, 41), [0.0]])
    coeffs = fit_sigmoid(degree, 8.0)
    out = odd_polyval(ts.ckks_vector_from(pub, keys.encrypt_vector(z)), coeffs)
    assert ciphertext_levels(out) == 0                  # all levels used, none more needed
    got = keys.decrypt_vector(keys.context_id, out.serialize())[:z.size]
    np.testing.assert_allclose(got, np.polynomial.polynomial.polyval(z, coeffs), atol=tol)


def test_symmetric_keys_with_sigmoid(client, he_model):
    """Secret-key encryption: the public context has no public key, and every path still works."""
    from services.he.keys import BankKeys

    keys = BankKeys.generate(depth=3, symmetric=True)
    client.register(keys)
    x = make_records(40, seed=17)
    x = x[np.abs(he_model.logit(x)) < he_model.sigmoid_range]
    out = client.score(keys, x, activation="sigmoid")
    np.testing.assert_allclose(out.values, he_model.sigmoid_poly(he_model.logit(x)), atol=TOLERANCE["sigmoid_depth3"])
    agg = client.aggregate(keys, x[:, 1:4].T, ["sum", "mean", "variance"])
    np.testing.assert_allclose(agg["variance"], x[:, 1:4].T.var(0), rtol=1e-4, atol=1e-3)

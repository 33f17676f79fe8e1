"""Sparse teacher soft labels (`pand_jax.soft_labels`) against a NumPy transcription of FKD's
`Recover_soft_label` (szq0214/FKD, utils_FKD.py) and its label quantisation (FKD_SLG's
generate_soft_label.py), plus properties of MS, MR and hard that a wrong scatter, a mixed-up
index or a lost remainder breaks."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pand_jax import soft_labels

HYP = settings(max_examples=20, deadline=None)


def _probs(rng, shape, sharpness):
    """Teacher-like class probabilities: softmax of scaled Gaussian logits, float64."""
    z = sharpness * rng.standard_normal(shape)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------- FKD, transcribed to NumPy


def fkd_quantize(p, k):
    """FKD's label_quantization: torch.argsort(p, descending=True)[:K] and p there. A stable
    sort keeps equal values in index order, the order `lax.top_k` documents."""
    index = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    return index, np.take_along_axis(p, index, -1)


def fkd_recover(index, value, kind, n_classes):
    """FKD's Recover_soft_label on rows [B, K]: 'hard' scatters 1 at the index;
    'marginal_smoothing_k{K}' fills (1 - sum value) / (C - K) and scatters the values;
    'marginal_renorm' scatters the values and L1-normalises (F.normalize, eps 1e-12). FKD
    writes the K = 5 and 10 cases out; the formula is the same for any K. The one change:
    FKD leaves a negative remainder (fp16 values summing above 1) as it is; we clip it to 0,
    as `reconstruct` does."""
    rows = np.arange(index.shape[0])[:, None]
    value = value.astype(np.float64)
    if kind == "hard":
        out = np.zeros((index.shape[0], n_classes))
        out[rows, index[:, :1]] = 1.0
        return out
    if kind == "ms":
        minor = (1.0 - value.sum(1, keepdims=True)) / (n_classes - index.shape[1])
        out = np.repeat(np.maximum(minor, 0.0), n_classes, axis=1)
        out[rows, index] = value
        return out
    out = np.zeros((index.shape[0], n_classes))
    out[rows, index] = value
    return out / np.maximum(np.abs(out).sum(1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------ sparsify


@pytest.mark.parametrize("c", [12, 200, 1000])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_sparsify_is_fkds_top_k_in_fp16(c, k):
    rng = np.random.default_rng([c, k])
    p = _probs(rng, (3, 4, c), 3.0).astype(np.float32)
    p[0, 0, :] = 1.0 / c  # all tied: the first K classes, in index order
    indices, values = soft_labels.sparsify(p, k)
    assert indices.dtype == np.int32 and values.dtype == np.float16
    assert indices.shape == values.shape == (3, 4, k)
    want_index, want_value = fkd_quantize(p, k)
    np.testing.assert_array_equal(indices, want_index)
    np.testing.assert_array_equal(values, want_value.astype(np.float16))
    np.testing.assert_array_equal(indices[0, 0], np.arange(k))


# ------------------------------------------------------------------- reconstruct vs FKD

CASES = [(kind, k) for kind in ("ms", "mr") for k in (1, 5, 10)] + [("hard", 1)]


@pytest.mark.parametrize("kind, k", CASES)
@pytest.mark.parametrize("c", [12, 200, 1000])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_reconstruct_matches_fkd(kind, k, c, dtype):
    """Both sides get the same stored values; what is left is fp32 arithmetic (ours) against
    fp64 (the reference): rtol 1e-5, atol 1e-7 (q of C = 1000 is ~1e-3 off the top-K)."""
    rng = np.random.default_rng([k, c])
    p = _probs(rng, (16, c), 4.0)
    index, value = fkd_quantize(p, k)
    value = value.astype(dtype)
    q = soft_labels.reconstruct(index.astype(np.int32), value, kind, c)
    assert q.dtype == np.float32 and q.shape == (16, c)
    np.testing.assert_allclose(q, fkd_recover(index, value, kind, c), rtol=1e-5, atol=1e-7)


def test_a_remainder_below_zero_from_fp16_rounding_is_clipped():
    """fp16(0.7) + fp16(0.3) = 0.7002 + 0.30005 > 1: FKD's MS would give the other classes a
    negative probability (log q undefined); ours gives them 0."""
    p = np.array([[0.7, 0.3 - 3e-6, 1e-6, 1e-6, 1e-6]])
    index, value = fkd_quantize(p, 2)
    value = value.astype(np.float16)
    assert value.astype(np.float64).sum() > 1.0  # the case this test is about
    q = np.asarray(soft_labels.reconstruct(index.astype(np.int32), value, "ms", 5))
    np.testing.assert_array_equal(q[0, 2:], 0.0)
    np.testing.assert_array_equal(q[0, :2], value[0].astype(np.float32))


# ------------------------------------------------------------------------------ properties

cases = st.tuples(
    st.integers(0, 2**16),
    st.sampled_from([2, 7, 200]),
    st.sampled_from([1, 5, 10, -1]),
    st.sampled_from([0.1, 3.0, 30.0]),
)


def _in_top(indices, c):
    """bool [..., C]: class c is among the K indices of its row."""
    return (np.asarray(indices)[..., None] == np.arange(c)).any(-2)


def _case(seed, c, k, sharpness):
    k = c - 1 if k == -1 or k >= c else k
    p = _probs(np.random.default_rng(seed), (8, c), sharpness).astype(np.float32)
    return p, k, *soft_labels.sparsify(p, k)


@HYP
@given(cases)
def test_ms_and_mr_are_distributions_that_keep_the_top_k(case):
    """q >= 0 and sums to 1; MS keeps the stored top-K values and spreads the rest evenly,
    never above the K-th; MR is MS's top-K rescaled to sum 1. Rounding bound: each fp16 value
    is off by <= 2^-11 relative (2^-25 absolute where subnormal), so their sum, about 1, by
    `err` <= 2^-11 + K 2^-25; MS's sum is off only where the clip applies, its remainder by
    err / (C - K)."""
    p, k, indices, values = _case(*case)
    c = p.shape[-1]
    ms = np.asarray(soft_labels.reconstruct(indices, values, "ms", c))
    mr = np.asarray(soft_labels.reconstruct(indices, values, "mr", c))
    assert (ms >= 0).all() and (mr >= 0).all()
    err = 2**-11 + k * 2**-25
    np.testing.assert_allclose(ms.sum(-1), 1.0, atol=err)
    np.testing.assert_allclose(mr.sum(-1), 1.0, atol=1e-5)
    top_ms = np.take_along_axis(ms, np.asarray(indices), -1)
    np.testing.assert_array_equal(top_ms, np.asarray(values, np.float32))
    np.testing.assert_allclose(
        np.take_along_axis(mr, np.asarray(indices), -1),
        top_ms / top_ms.sum(-1, keepdims=True),
        rtol=1e-5,
    )
    rest = np.where(_in_top(indices, c), np.nan, ms)
    rest_max, rest_min = np.nanmax(rest, -1), np.nanmin(rest, -1)
    np.testing.assert_array_equal(rest_max, rest_min)  # one value off the top-K
    assert (rest_max <= top_ms[:, -1] * (1 + 2**-10) + err / (c - k)).all()


@HYP
@given(cases)
def test_hard_is_the_one_hot_argmax(case):
    p, _, indices, values = _case(*case)
    hard = soft_labels.reconstruct(indices[:, :1], values[:, :1], "hard", p.shape[-1])
    np.testing.assert_array_equal(hard, np.eye(p.shape[-1])[p.argmax(-1)])


@pytest.mark.parametrize("c", [2, 12, 200])
def test_ms_with_k_one_below_c_recovers_p(c):
    """K = C - 1 leaves one class, whose remainder is exactly its probability: MS gives back p
    (fp32 values: to fp32 rounding of the remainder), MR gives p renormalised over the top-K."""
    p = _probs(np.random.default_rng(c), (8, c), 3.0).astype(np.float32)
    indices, _ = soft_labels.sparsify(p, c - 1)
    values = np.take_along_axis(p, np.asarray(indices), -1)  # fp32: no storage rounding
    np.testing.assert_allclose(
        soft_labels.reconstruct(indices, values, "ms", c), p, rtol=1e-6, atol=1e-6
    )
    top = _in_top(indices, c)
    np.testing.assert_allclose(
        soft_labels.reconstruct(indices, values, "mr", c),
        np.where(top, p, 0) / (p * top).sum(-1, keepdims=True),
        rtol=1e-6,
    )


def test_reconstruct_is_the_same_under_jit_and_over_views():
    """The trainer runs it inside its jitted step on [B, K] (or [B, V, K]) rows."""
    p = _probs(np.random.default_rng(1), (4, 3, 50), 2.0).astype(np.float32)
    indices, values = soft_labels.sparsify(p, 5)
    for kind in soft_labels.SPARSE_KINDS:
        k = 1 if kind == "hard" else 5
        eager = soft_labels.reconstruct(indices[..., :k], values[..., :k], kind, 50)
        jitted = jax.jit(soft_labels.reconstruct, static_argnums=(2, 3))(
            indices[..., :k], values[..., :k], kind, 50
        )
        np.testing.assert_array_equal(eager, jitted)
        flat = soft_labels.reconstruct(
            indices[..., :k].reshape(12, k), values[..., :k].reshape(12, k), kind, 50
        )
        np.testing.assert_array_equal(np.asarray(eager).reshape(12, 50), flat)


def test_probabilities_are_the_softmax_of_scaled_cosines():
    rng = np.random.default_rng(2)
    t, anchors = rng.standard_normal((6, 8)), rng.standard_normal((5, 8))
    cos = (t / np.linalg.norm(t, axis=1, keepdims=True)) @ (
        anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    ).T
    z = 14.0 * cos / 2.0
    want = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    got = soft_labels.probabilities(t.astype(np.float32), anchors.astype(np.float32), 14.0, 2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "spec, want",
    [
        ("embedding", ("embedding", None)),
        ("hard", ("hard", 1)),
        ("ms", ("ms", 7)),
        ("mr", ("mr", 7)),
        ("ms:10", ("ms", 10)),
        ("mr:5", ("mr", 5)),
    ],
)
def test_parse(spec, want):
    assert soft_labels.parse(spec, 7) == want


@pytest.mark.parametrize(
    "spec, message",
    [
        ("soft", r"--soft-labels 'soft': unknown kind 'soft'; expected one of \['embedding', 'ms'"),
        ("ms:x", r"--soft-labels 'ms:x': K must be an integer >= 1"),
        ("mr:0", r"--soft-labels 'mr:0': K must be an integer >= 1"),
        ("ms:-3", r"K must be an integer >= 1"),
        ("hard:3", r"--soft-labels 'hard:3': hard takes no :K"),
        ("embedding:2", r"embedding takes no :K"),
    ],
)
def test_parse_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        soft_labels.parse(spec, 10)


def test_k_outside_one_to_c_and_unknown_kinds_are_one_line():
    p = np.full((2, 10), 0.1, np.float32)
    for k in (0, 10, 11):
        with pytest.raises(ValueError, match=rf"--soft-labels ms:{k} needs 1 <= K < C = 10$"):
            soft_labels.check("ms", k, 10)
        with pytest.raises(ValueError, match=rf"--soft-labels K = {k} needs 1 <= K < C = 10$"):
            soft_labels.sparsify(p, k)
    indices = np.zeros((2, 10), np.int32)
    with pytest.raises(ValueError, match=r"--soft-labels mr:10 needs 1 <= K < C = 10$"):
        soft_labels.reconstruct(indices, p, "mr", 10)
    with pytest.raises(
        ValueError,
        match=r"unknown soft-label kind 'embedding'; expected one of "
        r"\['ms', 'mr', 'hard'\]",
    ):
        soft_labels.reconstruct(indices[:, :3], p[:, :3], "embedding", 10)
    with pytest.raises(ValueError, match="hard keeps K = 1, got K = 3"):
        soft_labels.check("hard", 3, 10)

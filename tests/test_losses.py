"""Losses against references written from the formulas (docs/equations.md).

References are float64 NumPy loops or literal PyTorch transcriptions of the released formulas.
fp32 parity uses rtol 1e-5: the losses are sums of JS/KL terms whose per-element fp32 rounding
(~6e-8) accumulates over B*k*C terms and cancels inside log-ratios, so 1e-6 is not reliably
reachable in fp32; the same comparisons under x64 hold to 1e-12, which pins the formulas.
"""

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import torch_dist, torch_dkd, torch_standardize
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from scipy.special import logsumexp

from pand_jax import losses as L

LN2 = np.log(2.0)
HYP = settings(max_examples=15, deadline=None)


def vl2lite_positional(sf, te, ta, ai, at, y, zs, temperature, reduction, scale):
    """`L.vl2lite` with its inputs in the order the references take them."""
    return L.vl2lite(
        sf,
        te,
        ta,
        align_image=ai,
        align_text=at,
        labels=y,
        student_logits=zs,
        temperature=temperature,
        reduction=reduction,
        scale=scale,
    )


# Functions whose tests call them with positional inputs (cast by `run_in`).
POSITIONAL = {"vl2lite": vl2lite_positional}


# Everything runs under jit: one compile per shape instead of one per eager op, which keeps
# the file fast on a busy CPU.
@functools.cache
def jitted(name, *static):
    return jax.jit(POSITIONAL.get(name) or getattr(L, name), static_argnames=static)


def rng_arrays(seed, *shapes, scale=1.0):
    r = np.random.default_rng(seed)
    return [scale * r.standard_normal(s) for s in shapes]


# ---------------------------------------------------------------- float64 references


def ref_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def ref_js(p_logits, q_logits):
    p, q = ref_softmax(p_logits), ref_softmax(q_logits)
    m = (p + q) / 2

    def kl(a, b):
        return sum(ai * np.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def ref_nsd_paper(zs, zt, y, k):
    total = 0.0
    for i in range(len(y)):
        others = [c for c in np.argsort(-zt[i], kind="stable") if c != y[i]][:k]
        d_t = np.array([zt[i, y[i]] - zt[i, j] for j in others])
        d_s = np.array([zs[i, y[i]] - zs[i, j] for j in others])
        total += ref_js(-d_t, -d_s)
    return total / len(y)


def ref_nsd_batch(zs, zt, k, group_size=None):
    b = len(zs)
    g = b if group_size is None else group_size
    k = min(k, g - 1)
    total = 0.0
    for start in range(0, b, g):
        members = range(start, start + g)
        for i in members:
            cos = {
                j: zt[i] @ zt[j] / np.linalg.norm(zt[i]) / np.linalg.norm(zt[j])
                for j in members
                if j != i
            }
            for j in sorted(cos, key=lambda j: -cos[j])[:k]:
                total += ref_js(zt[i] - zt[j], zs[i] - zs[j])
    return total / (b * k)


def torch_vl2lite(sf, te, ta, ai, at, y, zs, tau, reduction):
    """Literal transcription of the released criterion (feature_norm adds 1e-10)."""

    def t(x):
        return torch.tensor(x, dtype=torch.float64)

    def norm(x):
        return x / (x.norm(dim=-1, keepdim=True) + 1e-10)

    hidden, aligned_img, aligned_nlp = norm(t(sf)), norm(t(ai)), norm(t(at))
    clip_img, clip_nlp = norm(t(te)), norm(t(ta))
    scale = 1 / 0.07
    cls = torch.nn.CrossEntropyLoss()(t(zs), torch.tensor(y).long())
    vis = torch.nn.L1Loss()(hidden, aligned_img)
    student = scale * hidden @ aligned_nlp.T / tau
    teacher = scale * clip_img @ clip_nlp.T / tau
    kl = torch.nn.KLDivLoss(reduction="mean" if reduction == "half_batch_mean" else "batchmean")
    txt = kl(F.log_softmax(student, dim=1), F.softmax(teacher, dim=1)) * tau * tau
    if reduction == "half_batch_mean":
        txt = txt * zs.shape[1] / 2
    return cls.item(), vis.item(), txt.item()


def torch_rkd(s, t, wd, wa):
    """Park et al. 2019 as published, in float64."""
    s, t = torch.tensor(s), torch.tensor(t)

    def pdist(e):
        sq = (e**2).sum(1)
        d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=1e-12).sqrt().clone()
        d[range(len(e)), range(len(e))] = 0
        return d

    def angles(e):
        u = F.normalize(e[None] - e[:, None], p=2, dim=2)
        return torch.bmm(u, u.transpose(1, 2)).view(-1)

    td, sd = pdist(t), pdist(s)
    dist = F.smooth_l1_loss(sd / sd[sd > 0].mean(), td / td[td > 0].mean())
    ang = F.smooth_l1_loss(angles(s), angles(t))
    return (wd * dist + wa * ang).item()


def torch_kd(zs, zt, tau):
    zs, zt = torch.tensor(zs), torch.tensor(zt)
    return (
        F.kl_div(F.log_softmax(zs / tau, 1), F.softmax(zt / tau, 1), reduction="batchmean") * tau**2
    ).item()


def ref_promptkd(zs, zt, tau):
    """NumPy transcription of PromptKD's released loss (trainers/promptkd.py):
    F.kl_div(F.log_softmax(z_s / T, 1), F.softmax(z_t / T, 1), reduction="sum") * T * T
    / z_s.numel()."""

    def log_softmax(z):
        z = z / tau
        m = z.max(axis=1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))

    log_p, log_q = log_softmax(np.asarray(zt, np.float64)), log_softmax(np.asarray(zs, np.float64))
    return float(np.sum(np.exp(log_p) * (log_p - log_q)) * tau * tau / np.size(zs))


def ref_fdbpl(zs, log_pt, a, b):
    """FDBPL's positive loss from the formula, per crop in float64: w = 1 - H(p_T) / log C,
    mean(a w KL(p_T || p+)) + mean(b w KL(p+ || p_T)), p+ = softmax(z+)."""
    total = []
    for z, lp in zip(np.asarray(zs, np.float64), np.asarray(log_pt, np.float64)):
        log_ps = ref_log_softmax(z)
        p_t, p_s = np.exp(lp), np.exp(log_ps)
        w = 1 + np.sum(p_t * lp) / np.log(len(z))
        fwd = np.sum(p_t * (lp - log_ps))
        rev = np.sum(p_s * (log_ps - lp))
        total.append(a * w * fwd + b * w * rev)
    return float(np.mean(total))


def torch_coop_ce(img, txt, y, scale):
    img, txt = torch.tensor(img), torch.tensor(txt)
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    return F.cross_entropy(logits, torch.tensor(y).long()).item()


def np_torch_dkd(zs, zt, y, alpha, beta, tau):
    zs, zt, y = torch.tensor(zs), torch.tensor(zt), torch.tensor(y).long()
    return torch_dkd(zs, zt, y, alpha, beta, tau).item()


def ref_dkd(zs, zt, y, alpha, beta, tau):
    """DKD from its formula in float64 NumPy, in log space (finite where the released
    code's log of a sum underflows): TCKD on the binary (true class, rest) distributions,
    NCKD on softmax(z / T - 1000 [c = y])."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    true = np.arange(zs.shape[1]) == np.asarray(y)[:, None]

    def kl(log_p, log_q):
        return np.sum(np.exp(log_p) * (log_p - log_q), axis=1)

    def binary(z):
        log_p = ref_log_softmax(z / tau)
        return np.stack([log_p[true], logsumexp(np.where(true, -np.inf, log_p), axis=1)], 1)

    def non_target(z):
        return ref_log_softmax(z / tau - 1000.0 * true)

    tckd = kl(binary(zt), binary(zs)).mean()
    nckd = kl(non_target(zt), non_target(zs)).mean()
    return float(tau**2 * (alpha * tckd + beta * nckd))


def np_torch_dist(zs, zt, beta, gamma, tau):
    return torch_dist(torch.tensor(zs), torch.tensor(zt), beta, gamma, tau).item()


def ref_dist(zs, zt, beta, gamma, tau):
    """DIST from its formula in float64 NumPy: Pearson correlations of the softmaxes' rows
    and columns (np.corrcoef; no row of a softmax is constant in these cases)."""
    p_s, p_t = (np.exp(ref_log_softmax(np.asarray(z, np.float64) / tau)) for z in (zs, zt))

    def mean_corr(a, b):
        return np.mean([np.corrcoef(u, v)[0, 1] for u, v in zip(a, b)])

    inter, intra = 1 - mean_corr(p_s, p_t), 1 - mean_corr(p_s.T, p_t.T)
    return float(tau**2 * (beta * inter + gamma * intra))


def ref_standardize(z, eps):
    """The released `normalize` (logit-standardization-KD, mdistiller/distillers/KD.py) in
    NumPy: (z - mean) / (eps + std) with the unbiased std (torch.std's default)."""
    z = np.asarray(z, np.float64)
    return (z - z.mean(-1, keepdims=True)) / (eps + z.std(-1, ddof=1, keepdims=True))


# ---------------------------------------------------------------- parity

PRECISIONS = [(np.float32, 1e-5), (np.float64, 1e-12)]


def run_in(dtype, name, *args, **kwargs):
    """L.<name> jitted on args cast to dtype (x64 enabled for float64), as Python floats."""
    with jax.enable_x64(dtype == np.float64):
        cast = [a.astype(dtype) if a.dtype.kind == "f" else a for a in map(np.asarray, args)]
        out = jitted(name, *kwargs)(*cast, **kwargs)
        return np.asarray(out, np.float64).tolist()


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize("b,c,k", [(4, 5, 1), (8, 10, 3), (16, 37, 4)])
def test_nsd_paper_parity(dtype, rtol, b, c, k):
    zs, zt = rng_arrays(b * c + k, (b, c), (b, c), scale=3.0)
    y = np.random.default_rng(k).integers(0, c, b, dtype=np.int32)
    got = run_in(dtype, "nsd_paper", zs, zt, y, k=k)
    np.testing.assert_allclose(got, ref_nsd_paper(zs, zt, y, k), rtol=rtol)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize(
    "b,c,k,group", [(8, 10, 3, None), (16, 7, 3, 4), (12, 20, 2, 3), (8, 5, 5, 2), (6, 9, 1, None)]
)
def test_nsd_batch_parity(dtype, rtol, b, c, k, group):
    zs, zt = rng_arrays(b + c + k, (b, c), (b, c), scale=3.0)
    got = run_in(dtype, "nsd_batch", zs, zt, k=k, group_size=group)
    np.testing.assert_allclose(got, ref_nsd_batch(zs, zt, k, group), rtol=rtol)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
def test_js_parity(dtype, rtol):
    p, q = rng_arrays(0, (6, 11), (6, 11), scale=4.0)
    got = run_in(dtype, "js_divergence", p, q)
    np.testing.assert_allclose(got, [ref_js(a, b) for a, b in zip(p, q)], rtol=rtol)
    # axis: the same rows laid out as columns
    got_t = run_in(dtype, "js_divergence", p.T, q.T, axis=0)
    np.testing.assert_allclose(got_t, got, rtol=rtol)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize("reduction", ["batch_mean", "half_batch_mean"])
@pytest.mark.parametrize("b,c,d,dt", [(4, 5, 6, 8), (16, 20, 12, 10)])
def test_vl2lite_parity(dtype, rtol, reduction, b, c, d, dt):
    sf, te, ta, ai, at, zs = rng_arrays(b + c, (b, d), (b, dt), (c, dt), (b, d), (c, d), (b, c))
    y = np.random.default_rng(1).integers(0, c, b, dtype=np.int32)
    got = run_in(
        dtype,
        "vl2lite",
        sf,
        te,
        ta,
        ai,
        at,
        y,
        zs,
        temperature=2.0,
        reduction=reduction,
        scale=1 / 0.07,
    )
    with warnings.catch_warnings():  # torch warns that 'mean' is not 'batchmean': intended
        warnings.simplefilter("ignore", UserWarning)
        want = torch_vl2lite(sf, te, ta, ai, at, y, zs, 2.0, reduction)
    # rtol floor 1e-9 in x64: the released feature_norm adds 1e-10 to the norm
    np.testing.assert_allclose(got, want, rtol=max(rtol, 1e-9))


def test_vl2lite_reductions_relate_by_half():
    args = rng_arrays(3, (8, 6), (8, 5), (10, 5), (8, 6), (10, 6), (8, 10))
    y = np.arange(8, dtype=np.int32)
    vl2lite = jitted("vl2lite", "reduction")
    pand = vl2lite(*args[:5], y, args[5], temperature=2.0, reduction="batch_mean", scale=1 / 0.07)
    vl2 = vl2lite(
        *args[:5], y, args[5], temperature=2.0, reduction="half_batch_mean", scale=1 / 0.07
    )
    np.testing.assert_allclose(pand[:2], vl2[:2])
    np.testing.assert_allclose(vl2[2], pand[2] / 2, rtol=1e-6)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize("b,ds,dt", [(5, 4, 7), (12, 16, 8)])
def test_rkd_parity(dtype, rtol, b, ds, dt):
    s, t = rng_arrays(b, (b, ds), (b, dt))
    got = run_in(dtype, "rkd", s, t, distance_weight=25.0, angle_weight=50.0)
    # 1e-9 floor in x64: Park's pdist expands |a-b|^2 = a^2 + b^2 - 2ab (cancellation)
    np.testing.assert_allclose(got, torch_rkd(s, t, 25.0, 50.0), rtol=max(rtol, 1e-9))


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_parity(dtype, rtol, tau):
    zs, zt = rng_arrays(7, (9, 13), (9, 13), scale=5.0)
    np.testing.assert_allclose(
        run_in(dtype, "kd", zs, zt, temperature=tau), torch_kd(zs, zt, tau), rtol=rtol
    )


def ref_big_vision_kl(student, teacher, t):
    """big_vision's distillation distance 'kl' (evaluators/proj/distill/distance.py), float64:
    t^2 softmax_xent(student / t, softmax(teacher / t), kl=True) per example, then the trainer's
    mean over the batch."""
    log_p = ref_log_softmax(np.asarray(teacher, np.float64) / t)
    xent = -(np.exp(log_p) * ref_log_softmax(np.asarray(student, np.float64) / t)).sum(1)
    return float(np.mean(t**2 * (xent + (np.exp(log_p) * log_p).sum(1))))


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize("t", [1.0, 10.0])  # big_vision's Flowers long and fast settings
def test_function_matching_is_big_visions_kl_distance(dtype, rtol, t):
    """The fm objective on the teacher's anchor logits z_t = s t_hat T_hat^T: big_vision's 'kl'
    distance and nothing else (no labels, no cross-entropy); its gradient by finite
    differences in float64."""
    from pand_jax.methods import Inputs, fm

    zs, te, anchors = rng_arrays(13, (6, 11), (6, 8), (11, 8), scale=3.0)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    want = ref_big_vision_kl(zs, 100.0 * unit(te) @ unit(anchors).T, t)

    def loss(z, teacher, anchor_rows):
        x = Inputs(z, z, None, teacher, anchor_rows, {}, 0)
        return fm.fm_objective(x, temperature=t, scale=100.0)[0]

    with jax.enable_x64(dtype == np.float64):
        args = [jnp.asarray(a, dtype) for a in (zs, te, anchors)]
        np.testing.assert_allclose(float(jax.jit(loss)(*args)), want, rtol=rtol)
        if dtype == np.float64:
            check_grads(lambda z: loss(z, *args[1:]), (args[0],), order=1, modes=["rev"])


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_promptkd_parity(dtype, rtol, tau):
    """Against the NumPy transcription: 1e-12 in fp64 pins the formula (the sum over B*C
    entries divided by B*C, not by B); fp32 at the file's 1e-5."""
    zs, zt = rng_arrays(8, (6, 11), (6, 11), scale=20.0)  # s = 100 makes logits large
    got = run_in(dtype, "promptkd", zs, zt, temperature=tau)
    np.testing.assert_allclose(got, ref_promptkd(zs, zt, tau), rtol=rtol)
    # KD's batch mean is C times PromptKD's entry mean
    np.testing.assert_allclose(run_in(dtype, "kd", zs, zt, temperature=tau), 11 * got, rtol=rtol)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
def test_kd_soft_is_kd_on_the_teachers_softmax_and_reads_zeros(dtype, rtol):
    zs, zt = rng_arrays(9, (6, 11), (6, 11), scale=5.0)
    q = np.exp(zt / 4) / np.exp(zt / 4).sum(1, keepdims=True)
    np.testing.assert_allclose(
        run_in(dtype, "kd_soft", zs, q, temperature=4.0), torch_kd(zs, zt, 4.0), rtol=rtol
    )
    hard = np.eye(11)[np.argmax(zt, 1)]  # zeros contribute 0 (xlogy), not NaN
    want = np.mean(-np.log(np.exp(zs) / np.exp(zs).sum(1, keepdims=True))[hard > 0])
    np.testing.assert_allclose(
        run_in(dtype, "kd_soft", zs, hard, temperature=1.0), want, rtol=max(rtol, 1e-6)
    )


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize("alpha,beta,tau", [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (9.0, 4.5, 2.0)])
def test_dkd_parity(dtype, rtol, alpha, beta, tau):
    """Against mdistiller's dkd_loss in PyTorch float64, and the log-space NumPy formula."""
    zs, zt = rng_arrays(12, (10, 13), (10, 13), scale=4.0)
    y = np.random.default_rng(12).integers(0, 13, 10, dtype=np.int32)
    got = run_in(dtype, "dkd", zs, zt, y, alpha=alpha, beta=beta, temperature=tau)
    np.testing.assert_allclose(got, np_torch_dkd(zs, zt, y, alpha, beta, tau), rtol=rtol)
    np.testing.assert_allclose(got, ref_dkd(zs, zt, y, alpha, beta, tau), rtol=rtol)


def test_dkd_terms_decouple_kd():
    """DKD's identity (Zhao et al., Eq. 2-3): KD = TCKD + (1 - p_t) NCKD per sample, with p_t
    the teacher's probability of the true class; on one sample (B = 1) in float64."""
    zs, zt = rng_arrays(13, (1, 9), (1, 9), scale=2.0)
    y = np.array([4], np.int32)
    tckd = run_in(np.float64, "dkd", zs, zt, y, alpha=1.0, beta=0.0, temperature=1.0)
    nckd = run_in(np.float64, "dkd", zs, zt, y, alpha=0.0, beta=1.0, temperature=1.0)
    p_true = np.exp(ref_log_softmax(zt[0]))[4]
    kd = run_in(np.float64, "kd", zs, zt, temperature=1.0)
    np.testing.assert_allclose(tckd + (1 - p_true) * nckd, kd, rtol=1e-12)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_parity(dtype, rtol, beta, gamma, tau):
    """Against torchdistill's DISTLoss in PyTorch float64 and np.corrcoef; `dist_soft` on the
    teacher's softmax is the same loss."""
    zs, zt = rng_arrays(14, (8, 11), (8, 11), scale=3.0)
    got = run_in(dtype, "dist", zs, zt, beta=beta, gamma=gamma, temperature=tau)
    np.testing.assert_allclose(got, np_torch_dist(zs, zt, beta, gamma, tau), rtol=rtol)
    np.testing.assert_allclose(got, ref_dist(zs, zt, beta, gamma, tau), rtol=rtol)
    q = np.exp(ref_log_softmax(zt / tau))
    soft = run_in(dtype, "dist_soft", zs, q, beta=beta, gamma=gamma, temperature=tau)
    np.testing.assert_allclose(soft, got, rtol=rtol)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
def test_standardize_logits_parity(dtype, rtol):
    z = rng_arrays(15, (7, 10), scale=6.0)[0] + 3.0
    got = run_in(dtype, "standardize_logits", z, eps=1e-7)
    np.testing.assert_allclose(got, ref_standardize(z, 1e-7), rtol=rtol, atol=rtol)
    want = torch_standardize(torch.tensor(z)).numpy()  # torch's std: the unbiased one
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1.0, 0.0), (0.0, 2.0)])
def test_fdbpl_parity(dtype, rtol, a, b):
    zs, zt = rng_arrays(10, (7, 9), (7, 9), scale=3.0)
    zt[0] *= 10  # a confident crop beside unsure ones: w spans (0, 1)
    log_pt = ref_log_softmax(zt)
    loss, w = run_in(dtype, "fdbpl", zs, log_pt, forward_weight=a, reverse_weight=b)
    np.testing.assert_allclose(loss, ref_fdbpl(zs, log_pt, a, b), rtol=rtol)
    p = np.exp(log_pt)
    np.testing.assert_allclose(w, np.mean(1 + np.sum(p * log_pt, 1) / np.log(9)), rtol=rtol)


def test_fdbpl_is_zero_for_a_student_equal_to_the_teacher_and_weights_confidence():
    zt = rng_arrays(4, (5, 6), scale=2.0)[0]
    log_pt = ref_log_softmax(zt)
    loss, _ = run_in(np.float64, "fdbpl", zt, log_pt, forward_weight=0.5, reverse_weight=0.5)
    assert abs(loss) < 1e-12
    uniform = np.full((5, 6), -np.log(6.0))  # w = 0: a uniform teacher teaches nothing
    loss, w = run_in(np.float64, "fdbpl", zt, uniform, forward_weight=0.5, reverse_weight=0.5)
    assert abs(w) < 1e-12 and abs(loss) < 1e-12


def ref_fdbpl_negative(z_pos, z_neg, w, c, d):
    """The negative-prompt terms from the formula, per crop in float64:
    c mean((1 - w) sum p- log p-) + d mean(w cos(z+, z-)), p- = softmax(z-)."""
    ent, cos = [], []
    for zp, zn, wi in zip(*(np.asarray(a, np.float64) for a in (z_pos, z_neg, w))):
        log_q = ref_log_softmax(zn)
        ent.append((1 - wi) * np.sum(np.exp(log_q) * log_q))
        cos.append(wi * zp @ zn / (np.linalg.norm(zp) * np.linalg.norm(zn)))
    return c * np.mean(ent) + d * np.mean(cos), np.mean(ent), np.mean(cos)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
@pytest.mark.parametrize("c,d", [(1.0, 0.001), (0.0, 1.0), (2.0, 0.0)])
def test_fdbpl_negative_parity(dtype, rtol, c, d):
    zp, zn, zt = rng_arrays(11, (6, 8), (6, 8), (6, 8), scale=3.0)
    zt[1] *= 10
    log_pt = ref_log_softmax(zt)
    w = run_in(dtype, "fdbpl_confidence", log_pt)
    np.testing.assert_allclose(
        w, 1 + np.sum(np.exp(log_pt) * log_pt, 1) / np.log(8), rtol=rtol, atol=rtol
    )
    got = run_in(dtype, "fdbpl_negative", zp, zn, np.asarray(w), negative_weight=c, cosine_weight=d)
    np.testing.assert_allclose(got, ref_fdbpl_negative(zp, zn, w, c, d), rtol=rtol, atol=rtol)


def ref_fdbpl_cascade(t_pos, t_neg, teacher_classes):
    """The released L_casc, its double loop over the distinct teacher-argmax classes."""
    d = np.asarray(t_pos, np.float64) - np.asarray(t_neg, np.float64)
    classes = sorted(set(np.asarray(teacher_classes).tolist()))
    return sum(np.mean(d[i] - d[j]) for i in classes for j in classes if i != j)


def test_fdbpl_cascade_is_released_and_identically_zero():
    """L_casc sums mean(d_i - d_j) over ordered pairs: antisymmetric, so zero whatever the
    text features, and so is its gradient (the released loss adds 0.1 of it to nothing)."""
    t_pos, t_neg = rng_arrays(12, (10, 16), (10, 16), scale=2.0)
    y = np.asarray([3, 3, 7, 0, 9, 7], np.int32)
    assert abs(ref_fdbpl_cascade(t_pos, t_neg, y)) < 1e-12
    with jax.enable_x64(True):
        got = L.fdbpl_cascade(t_pos, t_neg, y)
        grads = jax.grad(lambda a, b: L.fdbpl_cascade(a, b, y), argnums=(0, 1))(t_pos, t_neg)
    assert abs(float(got)) < 1e-12
    assert all(float(np.max(np.abs(g))) < 1e-12 for g in grads)
    # Its parts are not zero: it is the pairing that cancels, not a vanishing difference.
    d = np.mean(t_pos - t_neg, axis=1)
    assert np.max(np.abs(d[:, None] - d[None, :])) > 0.1


@pytest.mark.parametrize(
    "size, to", [((7, 7), (7, 7)), ((4, 5), (7, 9)), ((9, 8), (4, 3)), ((1, 1), (3, 2))]
)
def test_resize_map_is_torchs_bilinear_interpolate(size, to):
    """DAIT's resize of the IT's map against F.interpolate(bilinear, align_corners=False), up,
    down and from 1x1; fp32, 1e-6 of the map's scale."""
    x = rng_arrays(12, (2, *size, 3))[0].astype(np.float32)
    want = (
        F.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=to, mode="bilinear", align_corners=False
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    got = np.asarray(jax.jit(L.resize_map, static_argnums=(1, 2))(x, *to))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
def test_feature_map_mse_parity(dtype, rtol):
    s, t = rng_arrays(13, (2, 3, 4, 5), (2, 3, 4, 5))

    def norm(x):  # per position, over C
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    want = float(np.mean((norm(s) - norm(t)) ** 2))
    np.testing.assert_allclose(run_in(dtype, "feature_map_mse", s, t), want, rtol=rtol)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS)
def test_coop_ce_parity(dtype, rtol):
    img, txt = rng_arrays(5, (8, 16), (6, 16))
    y = np.random.default_rng(2).integers(0, 6, 8, dtype=np.int32)
    np.testing.assert_allclose(
        run_in(dtype, "coop_ce", img, txt, y, 100.0), torch_coop_ce(img, txt, y, 100.0), rtol=rtol
    )


def test_loss_weights_schedule():
    for e, offset in itertools.product([0, 5, 80, 1000], [0.0, 0.01]):
        w_cls, w_vis, w_txt = L.loss_weights(e, 100, cls_offset=offset)
        want = min(max(offset + e / 800, 0.0), 1.0)
        np.testing.assert_allclose(
            [w_cls, w_vis, w_txt], [want, (1 - want) / 2, (1 - want) / 2], rtol=1e-6
        )
    np.testing.assert_allclose(
        L.loss_weights(0, 300, cls_offset=0.01), [0.01, 0.495, 0.495], rtol=1e-6
    )
    traced = jax.jit(lambda e: L.loss_weights(e, 100, 0.0))(jnp.asarray(80))
    np.testing.assert_allclose(traced, L.loss_weights(80, 100, 0.0), rtol=1e-6)
    with pytest.raises(ValueError, match="num_epochs"):
        L.loss_weights(0, 0, 0.0)


# ---------------------------------------------------------------- properties

logit_pairs = st.tuples(
    st.integers(0, 2**16),
    st.sampled_from([(4, 5), (8, 10), (6, 3)]),
    st.sampled_from([0.1, 1.0, 30.0]),
)


@HYP
@given(logit_pairs)
def test_js_properties(case):
    seed, shape, scale = case
    p, q = (jnp.asarray(a, jnp.float32) for a in rng_arrays(seed, shape, shape, scale=scale))
    js_divergence = jitted("js_divergence")
    js = js_divergence(p, q)
    np.testing.assert_array_equal(js, js_divergence(q, p))  # exactly symmetric
    assert np.all(js >= -1e-7) and np.all(js <= LN2 + 1e-6)
    # zero iff the distributions match: a per-row shift keeps the distribution
    np.testing.assert_allclose(js_divergence(p, p + 3.0), 0.0, atol=2e-6)
    differ = np.abs(jax.nn.softmax(p) - jax.nn.softmax(q)).max(axis=-1) > 1e-2
    assert np.all(js[differ] > 0)


@HYP
@given(logit_pairs, st.integers(1, 2), st.floats(-50, 50), st.floats(-50, 50))
def test_nsd_paper_row_shift_invariant(case, k, shift_s, shift_t):
    seed, (b, c), scale = case
    zs, zt = rng_arrays(seed, (b, c), (b, c), scale=scale)
    y = np.random.default_rng(seed).integers(0, c, b, dtype=np.int32)
    row = np.linspace(-1, 1, b)[:, None]
    nsd_paper = jitted("nsd_paper", "k")
    base = nsd_paper(zs, zt, y, k=k)
    shifted = nsd_paper(zs + shift_s * row, zt + shift_t * row, y, k=k)
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(nsd_paper(zt, zt, y, k=k), 0.0, atol=1e-6)


@HYP
@given(logit_pairs, st.integers(1, 4))
def test_nsd_batch_permutation_invariant(case, k):
    seed, (b, c), scale = case
    zs, zt = rng_arrays(seed, (b, c), (b, c), scale=scale)
    perm = np.random.default_rng(seed + 1).permutation(b)
    nsd_batch = jitted("nsd_batch", "k")
    np.testing.assert_allclose(
        nsd_batch(zs[perm], zt[perm], k=k), nsd_batch(zs, zt, k=k), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(nsd_batch(zt, zt, k=k), 0.0, atol=1e-6)


def test_nsd_batch_group_equals_mean_of_groups():
    zs, zt = rng_arrays(4, (12, 6), (12, 6))
    nsd_batch = jitted("nsd_batch", "k", "group_size")
    groups = [float(nsd_batch(zs[i : i + 4], zt[i : i + 4], k=3)) for i in range(0, 12, 4)]
    np.testing.assert_allclose(nsd_batch(zs, zt, k=3, group_size=4), np.mean(groups), rtol=1e-6)


def test_nsd_batch_duplicated_rows_pair_with_their_twin_not_themselves():
    """A sample whose teacher logits appear twice in the batch has two rows at cosine 1: its
    neighbour must be the twin (self is excluded by index, not by dropping the first sorted
    column, which may be the twin). Taking self would add JS(0 || 0) = 0 instead."""
    zs, zt = rng_arrays(9, (6, 5), (6, 5))
    zt[1] = zt[0]
    zt[4] = zt[3]
    nsd_batch = jitted("nsd_batch", "k")
    want = ref_nsd_batch(zs, zt, k=1)
    np.testing.assert_allclose(nsd_batch(zs, zt, k=1), want, rtol=1e-5)
    twins = (
        ref_js(zt[0] - zt[1], zs[0] - zs[1])
        + ref_js(zt[1] - zt[0], zs[1] - zs[0])
        + ref_js(zt[3] - zt[4], zs[3] - zs[4])
        + ref_js(zt[4] - zt[3], zs[4] - zs[3])
    )
    assert twins > 0.05 * want * 6  # the twins' terms are a visible share of the loss


def test_nsd_batch_gradient_reaches_neighbours():
    # only sample 0's row differs, yet its neighbours' logits must get gradient too
    zs, zt = rng_arrays(8, (6, 5), (6, 5))
    grad = jax.jit(jax.grad(functools.partial(L.nsd_batch, k=2)))(zt + np.eye(6, 5)[0], zt)
    assert np.count_nonzero(np.abs(grad).sum(axis=1) > 0) > 1


# ---------------------------------------------------------------- gradients and robustness

B, C, D = 6, 7, 5
# weights that make a scalar of the standardised logits (their plain sum is always 0)
_W = rng_arrays(16, (B, C))[0].astype(np.float32)


def loss_cases():
    """(name, fn of differentiable float args, args) for every loss."""
    # fp32 constants: a float64 NumPy constant closed over by a function first traced under
    # x64 makes JAX warn about truncation when it is traced again without x64
    zs, zt, sf, te, ta, ai, at, img, txt = (
        a.astype(np.float32)
        for a in rng_arrays(
            11, (B, C), (B, C), (B, D), (B, 8), (C, 8), (B, D), (C, D), (B, 8), (C, 8), scale=2.0
        )
    )
    y = (np.arange(B) % C).astype(np.int32)
    return [
        ("js", lambda p, q: jnp.sum(L.js_divergence(p, q)), (zs, zt)),
        ("nsd_paper", lambda s, t: L.nsd_paper(s, t, y, k=3), (zs, zt)),
        ("nsd_batch", lambda s, t: L.nsd_batch(s, t, k=3), (zs, zt)),
        ("nsd_batch_groups", lambda s, t: L.nsd_batch(s, t, k=3, group_size=3), (zs, zt)),
        ("kd", lambda s, t: L.kd(s, t, temperature=4.0), (zs, zt)),
        ("promptkd", lambda s, t: L.promptkd(s, t, temperature=1.0), (zs, zt)),
        ("fdbpl", lambda s, t: L.fdbpl(s, jax.nn.log_softmax(L.fp32(t), 1), 0.5, 0.5)[0], (zs, zt)),
        (
            "feature_map_mse",
            lambda s, t: L.feature_map_mse(s.reshape(B, 1, 2, -1), t.reshape(B, 1, 2, -1)),
            (te, img),
        ),
        ("rkd", lambda s: L.rkd(s, te, 25.0, 50.0), (sf,)),
        (
            "vl2lite",
            lambda *a: sum(vl2lite_positional(*a[:5], y, a[5], 2.0, "batch_mean", 1 / 0.07)),
            (sf, te, ta, ai, at, zs),
        ),
        (
            "vl2lite_vl2",
            lambda *a: sum(vl2lite_positional(*a[:5], y, a[5], 2.0, "half_batch_mean", 1 / 0.07)),
            (sf, te, ta, ai, at, zs),
        ),
        ("coop_ce", lambda i, t: L.coop_ce(i, t, y, 100.0), (img, txt)),
        ("dkd", lambda s, t: L.dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0), (zs, zt)),
        ("dist", lambda s, t: L.dist(s, t, beta=1.0, gamma=1.0, temperature=4.0), (zs, zt)),
        ("standardize_logits", lambda z: jnp.sum(L.standardize_logits(z, 1e-7) * _W), (zs,)),
    ]


CASES = {name: (fn, args) for name, fn, args in loss_cases()}


@pytest.mark.parametrize("name", CASES)
def test_check_grads(name):
    fn, args = CASES[name]
    with jax.enable_x64(True):
        check_grads(
            jax.jit(fn),
            tuple(jnp.asarray(a, jnp.float64) for a in args),
            order=1,
            modes=("rev",),
            atol=1e-6,
            rtol=1e-6,
        )


def finite_value_and_grads(fn, args):
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)
    assert value.dtype == jnp.float32
    assert np.isfinite(value), value
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    return value


def ref_rkd(s, t, distance_weight, angle_weight):
    """RKD in float64 NumPy with the conventions for a batch without scale: distances of a
    fully collapsed batch stay 0 (nothing to normalise by) and the direction of a zero
    difference is the zero vector (Park's code divides by 0 there)."""

    def distances(e):
        d = np.linalg.norm(e[:, None] - e[None], axis=-1)
        mean = d.sum() / (len(e) * (len(e) - 1))
        return d / mean if mean > 0 else d

    def angles(e):
        diff = e[None] - e[:, None]
        norm = np.linalg.norm(diff, axis=-1, keepdims=True)
        u = np.divide(diff, norm, out=np.zeros_like(diff), where=norm > 0)
        return np.einsum("ijd,ikd->ijk", u, u)

    def smooth_l1(x, y):
        d = np.abs(x - y)
        return np.mean(np.where(d < 1.0, 0.5 * d * d, d - 0.5))

    return distance_weight * smooth_l1(distances(s), distances(t)) + angle_weight * smooth_l1(
        angles(s), angles(t)
    )


# Each loss of CASES with its parameters spelled out, and its float64 reference from the
# formulas above, both on the case's arguments: the robustness tests check values, not only
# that they are finite. The constants the CASES functions close over are the same draws.
_Y = (np.arange(B) % C).astype(np.int32)
_TE = rng_arrays(11, (B, C), (B, C), (B, D), (B, 8), scale=2.0)[3].astype(np.float32)
VALUE_CASES = {
    "js": (
        lambda p, q: jnp.sum(L.js_divergence(p, q)),
        lambda p, q: sum(ref_js(a, b) for a, b in zip(p, q)),
    ),
    "nsd_paper": (lambda s, t: L.nsd_paper(s, t, _Y, k=3), lambda s, t: ref_nsd_paper(s, t, _Y, 3)),
    "nsd_batch": (lambda s, t: L.nsd_batch(s, t, k=3), lambda s, t: ref_nsd_batch(s, t, 3)),
    "nsd_batch_groups": (
        lambda s, t: L.nsd_batch(s, t, k=3, group_size=3),
        lambda s, t: ref_nsd_batch(s, t, 3, 3),
    ),
    "kd": (lambda s, t: L.kd(s, t, temperature=4.0), lambda s, t: torch_kd(s, t, 4.0)),
    "promptkd": (
        lambda s, t: L.promptkd(s, t, temperature=1.0),
        lambda s, t: ref_promptkd(s, t, 1.0),
    ),
    "fdbpl": (
        lambda s, t: L.fdbpl(s, jax.nn.log_softmax(L.fp32(t), 1), 0.5, 0.5)[0],
        lambda s, t: ref_fdbpl(s, ref_log_softmax(t), 0.5, 0.5),
    ),
    "feature_map_mse": (
        lambda s, t: L.feature_map_mse(s.reshape(B, 1, 2, -1), t.reshape(B, 1, 2, -1)),
        lambda s, t: float(
            np.mean(
                np.square(
                    [
                        a / np.linalg.norm(a) - b / np.linalg.norm(b)
                        for a, b in zip(
                            s.reshape(-1, s.shape[1] // 2), t.reshape(-1, t.shape[1] // 2)
                        )
                    ]
                )
            )
        ),
    ),
    "rkd": (
        lambda s: L.rkd(s, _TE, distance_weight=25.0, angle_weight=50.0),
        lambda s: ref_rkd(s, _TE.astype(np.float64), 25.0, 50.0),
    ),
    "vl2lite": (
        lambda *a: sum(
            vl2lite_positional(
                *a[:5], _Y, a[5], temperature=2.0, reduction="batch_mean", scale=1 / 0.07
            )
        ),
        lambda *a: sum(torch_vl2lite(*a[:5], _Y, a[5], 2.0, "batch_mean")),
    ),
    "vl2lite_vl2": (
        lambda *a: sum(
            vl2lite_positional(
                *a[:5], _Y, a[5], temperature=2.0, reduction="half_batch_mean", scale=1 / 0.07
            )
        ),
        lambda *a: sum(torch_vl2lite(*a[:5], _Y, a[5], 2.0, "half_batch_mean")),
    ),
    "coop_ce": (
        lambda i, t: L.coop_ce(i, t, _Y, 100.0),
        lambda i, t: torch_coop_ce(i, t, _Y, 100.0),
    ),
    "dkd": (
        lambda s, t: L.dkd(s, t, _Y, alpha=1.0, beta=8.0, temperature=4.0),
        lambda s, t: ref_dkd(s, t, _Y, 1.0, 8.0, 4.0),
    ),
    "dist": (
        lambda s, t: L.dist(s, t, beta=1.0, gamma=1.0, temperature=4.0),
        lambda s, t: np_torch_dist(s, t, 1.0, 1.0, 4.0),
    ),
    "standardize_logits": (
        lambda z: jnp.sum(L.standardize_logits(z, eps=1e-7) * _W),
        lambda z: float(np.sum(ref_standardize(z, 1e-7) * _W)),
    ),
}


def assert_value_and_finite_grads(name, args, rtol):
    """The loss `name` on fp32 `args`: its value equals the float64 reference on the same
    (fp32-rounded) values to `rtol`, and value and gradients are finite."""
    fn, reference = VALUE_CASES[name]
    value = finite_value_and_grads(fn, args)
    with warnings.catch_warnings():  # torch warns that 'mean' is not 'batchmean': intended
        warnings.simplefilter("ignore", UserWarning)
        want = reference(*(np.asarray(a, np.float64) for a in args))
    np.testing.assert_allclose(float(value), want, rtol=rtol, atol=1e-6)


def test_every_case_has_a_value_reference():
    assert VALUE_CASES.keys() == CASES.keys()


@pytest.mark.parametrize("name", CASES)
def test_finite_at_large_magnitude(name):
    _, args = CASES[name]
    # fp32 holds the module's 1e-5 here too (measured: under 3e-7)
    assert_value_and_finite_grads(name, [jnp.asarray(a * 1e4, jnp.float32) for a in args], 1e-5)


@pytest.mark.parametrize("name", CASES)
def test_finite_with_ties(name):
    _, args = CASES[name]
    # duplicated rows, constant rows and equal values in every row: ties in every top-k,
    # zero pairwise distances in RKD, equal logits in the softmaxes; tied candidates carry
    # equal terms, so the value does not depend on which of them a top-k takes
    tied = []
    for a in args:
        a = np.array(a, np.float32)
        a[1] = a[0]
        a[2] = 1.0
        a[3, ::2] = a[3, 0]
        tied.append(jnp.asarray(a))
    assert_value_and_finite_grads(name, tied, 1e-5)


def test_rkd_collapsed_student_is_finite():
    # every student feature identical: no distance scale (Park's code gives NaN here)
    teacher = rng_arrays(3, (B, 8))[0].astype(np.float32)
    student = np.ones((B, D), np.float32)
    value = finite_value_and_grads(
        lambda s: L.rkd(s, teacher, distance_weight=25.0, angle_weight=50.0), [jnp.asarray(student)]
    )
    np.testing.assert_allclose(
        float(value),
        ref_rkd(student.astype(np.float64), teacher.astype(np.float64), 25.0, 50.0),
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", CASES)
def test_bf16_inputs_compute_in_fp32(name):
    fn, args = CASES[name]
    low = [jnp.asarray(a, jnp.bfloat16) for a in args]
    value = finite_value_and_grads(fn, low)
    # the same bf16-rounded values in fp32 give the same fp32 answer
    np.testing.assert_allclose(value, jax.jit(fn)(*[x.astype(jnp.float32) for x in low]), rtol=1e-6)


# ---------------------------------------------------------------- bad input


def raises_eager_and_traced(match, fn, *args):
    with pytest.raises(ValueError, match=match):
        fn(*args)
    with pytest.raises(ValueError, match=match):
        jax.jit(fn)(*args)


def test_bad_inputs_raise():
    zs, zt = rng_arrays(0, (8, 5), (8, 5))
    y = np.zeros(8, np.int32)
    raises_eager_and_traced(
        "k must be < the number of classes", lambda s, t: L.nsd_paper(s, t, y, k=5), zs, zt
    )
    raises_eager_and_traced("same shape", lambda s, t: L.nsd_paper(s, t[:, :4], y, 3), zs, zt)
    raises_eager_and_traced("same shape", lambda s, t: L.nsd_batch(s, t[:4], 3), zs, zt)
    raises_eager_and_traced("same shape", lambda s, t: L.kd(s, t[:, 1:], 4.0), zs, zt)
    raises_eager_and_traced(
        "not divisible by group_size 3", lambda s, t: L.nsd_batch(s, t, 3, group_size=3), zs, zt
    )
    raises_eager_and_traced(
        "group_size must be an int >= 2", lambda s, t: L.nsd_batch(s, t, 3, group_size=1), zs, zt
    )
    raises_eager_and_traced("k must be an int >= 1", lambda s, t: L.nsd_batch(s, t, k=0), zs, zt)
    raises_eager_and_traced("2-D", lambda s, t: L.nsd_batch(s[0], t[0], 3), zs, zt)
    raises_eager_and_traced(
        "labels must have shape", lambda s, t: L.nsd_paper(s, t, y[:3], 3), zs, zt
    )
    raises_eager_and_traced(
        "reduction", lambda s: vl2lite_positional(s, s, s, s, s, y, s, 2.0, "x", 1.0), zs
    )
    raises_eager_and_traced(
        "text_anchors must have shape",
        lambda s: vl2lite_positional(s, s, s[:3], s, s, y, s, 2.0, "batch_mean", 1.0),
        zs,
    )
    raises_eager_and_traced("feature width", lambda s: L.coop_ce(s, s[:, :3], y, 1.0), zs)
    raises_eager_and_traced("same batch size", lambda s: L.rkd(s, s[:4], 25.0, 50.0), zs)
    raises_eager_and_traced(
        "same shape", lambda s, t: L.dkd(s, t[:, 1:], y, alpha=1, beta=8, temperature=4), zs, zt
    )
    raises_eager_and_traced(
        "same shape", lambda s, t: L.dist(s, t[:4], beta=1, gamma=1, temperature=4), zs, zt
    )
    raises_eager_and_traced(
        "labels must have shape", lambda s: L.dkd(s, s, y[:3], alpha=1, beta=8, temperature=4), zs
    )


@pytest.mark.parametrize("bad", [-1, 5])
def test_out_of_range_labels(bad):
    zs, zt = rng_arrays(0, (8, 5), (8, 5))
    y = np.zeros(8, np.int32)
    y[3] = bad
    calls = [
        lambda y: L.nsd_paper(zs, zt, y, 3),
        lambda y: L.coop_ce(zs, zt[:5], y, 10.0),
        lambda y: L.dkd(zs, zt, y, alpha=1.0, beta=8.0, temperature=4.0),
        lambda y: vl2lite_positional(zs, zs, zs[:5], zs, zs[:5], y, zs, 2.0, "batch_mean", 1.0)[0],
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
            call(y)
        # traced labels cannot be checked at trace time: the loss is NaN instead
        assert np.isnan(jax.jit(call)(jnp.asarray(y)))

"""The loss functions of PAND and its baselines; each method's Stage-NSD objective, which
combines them, is in `pand_jax.methods`.

Notation (the paper's): z_s student logits, h student penultimate features, y labels,
t teacher image embedding, T text anchors (PSC's learned prompts or hand-written templates),
s the fixed logit scale (1/0.07 in configs/nsd.json), tau the KL temperature. docs/equations.md
maps every paper equation to the function that computes it. Paper values are never defaults
here: they live in configs/ and arrive as arguments.

Every function is pure and jittable, vectorised over samples and neighbours, and computes in
fp32 even when given bf16 (fp64 inputs stay fp64, which the gradient checks use).

Input checks happen at trace time: shapes, k, group sizes and reductions raise ValueError.
Labels can only be range-checked when they are concrete (eager calls); under jit they are
tracers, so a label outside [0, C) instead turns the loss into NaN, which is loud rather than
silently wrong.

Teacher inputs are not wrapped in stop_gradient (the teacher is frozen and its outputs carry
no gradient in the trainer), except in `rkd`, where Park et al. detach the teacher explicitly.
"""

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax
from jax.scipy.special import xlogy

NSD_FORMS = ("paper", "batch")  # nsd_paper (Eq. 6-8) or nsd_batch (released code)
# The text-KL reduction of `vl2lite`: the batch mean (PAND's released code with learned
# prompts), or half of it (VL2Lite's KLDivLoss 'mean' over B*C times C/2).
TXT_REDUCTIONS = ("batch_mean", "half_batch_mean")

# Loss matmuls are small; "highest" keeps TF32/bf16 passes on accelerators from flipping
# nearest-neighbour choices and from hiding parity errors.
_HIGHEST = lax.Precision.HIGHEST


def fp32(x):
    """Upcast bf16/fp16/integers to fp32; fp32 and fp64 pass through unchanged."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits >= 32:
        return x
    return x.astype(jnp.float32)


def _check_ndim(name, x, ndim):
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")


def _check_same_shape(name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape")


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_labels(labels, batch, num_classes):
    labels = jnp.asarray(labels)
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return labels


def _label_logit(logits, labels):
    """logits[i, labels[i]], NaN where a (traced) label is outside [0, C)."""
    num_classes = logits.shape[-1]
    valid = (labels >= 0) & (labels < num_classes)
    picked = jnp.take_along_axis(logits, jnp.clip(labels, 0, num_classes - 1)[:, None], axis=1)
    return jnp.where(valid[:, None], picked, jnp.nan)[:, 0]


def _sqrt0(x):
    """sqrt(x) for x >= 0 whose gradient at 0 is 0, not infinite (NaN once multiplied by 0)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def l2_normalize(x, axis=-1):
    """x / ||x||, with zero vectors mapped to zero and given a zero (not infinite) gradient."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    nonzero = sq > 0
    return jnp.where(nonzero, x * lax.rsqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _kl_rows(log_p, log_q, axis=-1):
    """KL(p || q) from log-probabilities; p = 0 terms contribute exactly 0."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis)


def js_divergence(p_logits, q_logits, axis=-1):
    """Jensen-Shannon divergence between softmax(p_logits) and softmax(q_logits), natural log.

    Reduces `axis`; the result lies in [0, ln 2]. Computed from log-softmax so that logits of
    magnitude 1e4 stay finite: log m = logaddexp(log p, log q) - log 2.
    """
    p_logits, q_logits = fp32(p_logits), fp32(q_logits)
    _check_same_shape("p_logits", p_logits, "q_logits", q_logits)
    log_p = jax.nn.log_softmax(p_logits, axis=axis)
    log_q = jax.nn.log_softmax(q_logits, axis=axis)
    log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0).astype(log_p.dtype)
    return 0.5 * (_kl_rows(log_p, log_m, axis) + _kl_rows(log_q, log_m, axis))


def _check_logit_pair(student_logits, teacher_logits):
    student_logits, teacher_logits = fp32(student_logits), fp32(teacher_logits)
    _check_ndim("student_logits", student_logits, 2)
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    return student_logits, teacher_logits


def nsd_paper(student_logits, teacher_logits, labels, k):
    """NSD of the paper, Eq. 6-8: class neighbourhood around each sample's ground truth.

    N_i = the k non-ground-truth classes with the largest teacher logits. Margins
    D_ij = z[i, y_i] - z[i, j] over j in N_i (the same j for teacher and student);
    rho_i = softmax_j(-D_ij); loss = mean_i JS(rho^T_i || rho^S_i).
    """
    z_s, z_t = _check_logit_pair(student_logits, teacher_logits)
    batch, num_classes = z_s.shape
    _check_positive_int("k", k)
    if k >= num_classes:
        raise ValueError(f"k must be < the number of classes C={num_classes}, got k={k}")
    labels = _check_labels(labels, batch, num_classes)

    is_ground_truth = labels[:, None] == jnp.arange(num_classes)
    _, neighbours = lax.top_k(jnp.where(is_ground_truth, -jnp.inf, z_t), k)  # [B, k]

    def margins(z):
        return _label_logit(z, labels)[:, None] - jnp.take_along_axis(z, neighbours, axis=1)

    return jnp.mean(js_divergence(-margins(z_t), -margins(z_s)))


def _batch_neighbours(z_t, k):
    """Indices [G, g, k] of each sample's k most cosine-similar other samples in its group."""
    z_hat = l2_normalize(lax.stop_gradient(z_t))
    similarity = jnp.einsum("gic,gjc->gij", z_hat, z_hat, precision=_HIGHEST)
    # Mask self explicitly rather than dropping the first sorted column as the released code
    # does: with duplicate samples, self need not sort first.
    self_mask = jnp.eye(z_t.shape[1], dtype=bool)
    _, neighbours = lax.top_k(jnp.where(self_mask, -jnp.inf, similarity), k)
    return neighbours


def nsd_batch(student_logits, teacher_logits, k, group_size=None):
    """NSD of the released code (from NRKD): in-batch sample neighbourhood.

    Neighbours j of sample i: the k samples of its group (self excluded) whose L2-normalised
    teacher logits are most cosine-similar; chosen from the teacher only. With
    Delta_ij = z[i] - z[j] (vectors over classes), loss = sum_ij JS(softmax_C Delta^t_ij ||
    softmax_C Delta^s_ij) / (B k). `group_size` splits the batch into consecutive groups
    (e.g. 32 to mimic the released per-GPU batches); None uses the whole batch. A group of
    g <= k samples uses k = g - 1, as the released code does.
    """
    z_s, z_t = _check_logit_pair(student_logits, teacher_logits)
    batch, num_classes = z_s.shape
    _check_positive_int("k", k)
    group = batch if group_size is None else group_size
    _check_positive_int("group_size", group, minimum=2)
    if batch % group:
        raise ValueError(f"batch size {batch} is not divisible by group_size {group}")
    k = min(k, group - 1)

    z_s, z_t = (
        rearrange(z, "(groups member) c -> groups member c", member=group) for z in (z_s, z_t)
    )
    neighbours = _batch_neighbours(z_t, k)[..., None]  # [G, g, k, 1]

    def deltas(z):  # [G, g, k, C]; the gather keeps the neighbour's gradient
        return z[:, :, None, :] - jnp.take_along_axis(z[:, None], neighbours, axis=2)

    return jnp.sum(js_divergence(deltas(z_t), deltas(z_s))) / (batch * k)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy with integer labels."""
    logits = fp32(logits)
    _check_ndim("logits", logits, 2)
    labels = _check_labels(labels, *logits.shape)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - _label_logit(logits, labels))


def kd(student_logits, teacher_logits, temperature):
    """Hinton KD: T^2 * batch-mean KL(softmax(z_t / T) || softmax(z_s / T))."""
    z_s, z_t = _check_logit_pair(student_logits, teacher_logits)
    log_p = jax.nn.log_softmax(z_t / temperature, axis=1)
    log_q = jax.nn.log_softmax(z_s / temperature, axis=1)
    return temperature**2 * jnp.mean(_kl_rows(log_p, log_q))


def kd_soft(student_logits, teacher_probs, temperature):
    """`kd` against a given teacher distribution q (FKD's sparse soft labels reconstructed,
    `pand_jax.soft_labels`): T^2 * batch-mean KL(q || softmax(z_s / T)); q = 0 entries
    contribute exactly 0."""
    z_s, q = _check_logit_pair(student_logits, teacher_probs)
    log_q_s = jax.nn.log_softmax(z_s / temperature, axis=1)
    return temperature**2 * jnp.mean(jnp.sum(xlogy(q, q) - q * log_q_s, axis=1))


def standardize_logits(logits, eps):
    """Logit standardisation (Sun et al., 2024): each row z-scored, (z - mean) / (eps + std),
    with the unbiased std (`torch.std`'s default, which the released code calls). A constant
    row maps to zeros; its std's gradient is taken as 0 there (torch's is NaN)."""
    z = fp32(logits)
    centred = z - jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.sum(centred * centred, axis=-1, keepdims=True) / (z.shape[-1] - 1)
    return centred / (eps + _sqrt0(var))


def dkd(student_logits, teacher_logits, labels, *, alpha, beta, temperature):
    """Decoupled KD's distillation term (Zhao et al., 2022), as mdistiller's `dkd_loss`:
    alpha TCKD + beta NCKD, each T^2 times a KL summed over the batch and divided by B, without
    the CE and the warm-up factor. TCKD compares the binary split (true class, the rest) of
    softmax(z / T); NCKD compares softmax(z / T - 1000 [c = y]), the released code's way of
    dropping the true class (exactly, while a row's logits / T lie within ~900 of each other).
    The split's log-probabilities come from log-sum-exp, so large logits stay finite."""
    z_s, z_t = _check_logit_pair(student_logits, teacher_logits)
    labels = _check_labels(labels, *z_s.shape)
    true = labels[:, None] == jnp.arange(z_s.shape[1])
    # a (traced) label outside [0, C) marks no class: make the loss NaN, as elsewhere here
    invalid = jnp.where(jnp.any(true, axis=1), 0.0, jnp.nan)

    def binary(z):  # log [p_y, sum_{c != y} p_c] of p = softmax(z / T)
        log_p = jax.nn.log_softmax(z / temperature, axis=1)
        log_true = jnp.sum(jnp.where(true, log_p, 0.0), axis=1)
        log_rest = jax.nn.logsumexp(jnp.where(true, -jnp.inf, log_p), axis=1)
        return jnp.stack([log_true, log_rest], axis=1)

    def non_target(z):
        return jax.nn.log_softmax(z / temperature - 1000.0 * true, axis=1)

    tckd = jnp.mean(_kl_rows(binary(z_t), binary(z_s)) + invalid)
    nckd = jnp.mean(_kl_rows(non_target(z_t), non_target(z_s)) + invalid)
    return temperature**2 * (alpha * tckd + beta * nckd)


def _cosine(x, y, eps):
    """Row-wise cosine as `torch.nn.functional.cosine_similarity` (torch >= 2.0) computes it:
    x / max(||x||, eps) . y / max(||y||, eps); a zero row gives 0 with a finite gradient."""

    def unit(v):
        return v / jnp.maximum(_sqrt0(jnp.sum(v * v, axis=-1, keepdims=True)), eps)

    return jnp.sum(unit(x) * unit(y), axis=-1)


def _pearson(x, y, eps):
    """Pearson correlation of each row of x with the same row of y (DIST's)."""
    centre = lambda v: v - jnp.mean(v, axis=-1, keepdims=True)  # noqa: E731
    return _cosine(centre(x), centre(y), eps)


def dist_soft(student_logits, teacher_probs, *, beta, gamma, temperature):
    """`dist` against a given teacher distribution q in place of softmax(z_t / tau) (FKD's
    sparse soft labels, `pand_jax.soft_labels`)."""
    z_s, q = _check_logit_pair(student_logits, teacher_probs)
    p_s = jax.nn.softmax(z_s / temperature, axis=1)
    inter = 1.0 - jnp.mean(_pearson(p_s, q, 1e-8))
    intra = 1.0 - jnp.mean(_pearson(p_s.T, q.T, 1e-8))
    return temperature**2 * (beta * inter + gamma * intra)


def dist(student_logits, teacher_logits, *, beta, gamma, temperature):
    """DIST (Huang et al., 2022), as torchdistill's `DISTLoss`: with p = softmax(z / tau),
    beta tau^2 (1 - mean Pearson over rows) + gamma tau^2 (1 - mean Pearson over columns), the
    Pearson correlations of p_S and p_T within each sample (inter-class relation) and within
    each class across the batch (intra-class); eps 1e-8 in the cosine, as released."""
    z_s, z_t = _check_logit_pair(student_logits, teacher_logits)
    q = jax.nn.softmax(z_t / temperature, axis=1)
    return dist_soft(z_s, q, beta=beta, gamma=gamma, temperature=temperature)


def fdbpl(student_logits, teacher_log_probs, forward_weight, reverse_weight):
    """FDBPL's positive-prompt loss (released trainers/coop_off.py) with p+ = softmax(z_s):

        mean_b(a w KL(p_T || p+)) + mean_b(b w KL(p+ || p_T)),   w = 1 - H(p_T) / log C

    (a, b = `forward_weight`, `reverse_weight`: 0.5, 0.5 released). w, the teacher's per-crop
    confidence, is a constant of the batch (no gradient flows into the teacher). Returns
    (loss, mean w). The reverse KL needs p_T > 0 everywhere (log p_T finite)."""
    z_s, log_p = _check_logit_pair(student_logits, teacher_log_probs)
    log_q = jax.nn.log_softmax(z_s, axis=1)
    w = fdbpl_confidence(log_p)
    loss = forward_weight * jnp.mean(w * _kl_rows(log_p, log_q)) + reverse_weight * jnp.mean(
        w * _kl_rows(log_q, log_p)
    )
    return loss, jnp.mean(w)


def fdbpl_confidence(teacher_log_probs):
    """w = 1 - H(p_T) / log C [B]: FDBPL's per-crop teacher confidence (the teacher is frozen, so
    no gradient flows through it in training)."""
    log_p = fp32(teacher_log_probs)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=1)
    return 1.0 - entropy / jnp.log(jnp.asarray(log_p.shape[1], log_p.dtype))


def fdbpl_negative(positive_logits, negative_logits, confidence, *, negative_weight, cosine_weight):
    """FDBPL's negative-prompt terms (released trainers/coop_off.py), with w the confidence [B]:

        c mean_b((1 - w) (-H(softmax(z-)))) + d mean_b(w cos(z+, z-))

    The first pushes the negative prompts' distribution towards uniform where the teacher is
    unsure; the second turns z- away from z+ where it is sure (c, d = 1, 0.001 released).
    Returns (total, the entropy term, the cosine term) before weighting."""
    z_pos, z_neg = _check_logit_pair(positive_logits, negative_logits)
    log_q = jax.nn.log_softmax(z_neg, axis=1)
    neg_entropy = jnp.sum(jnp.exp(log_q) * log_q, axis=1)  # -H
    cos = jnp.sum(l2_normalize(z_pos) * l2_normalize(z_neg), axis=1)
    entropy_term, cosine_term = jnp.mean((1 - confidence) * neg_entropy), jnp.mean(confidence * cos)
    return negative_weight * entropy_term + cosine_weight * cosine_term, entropy_term, cosine_term


def fdbpl_cascade(positive_text, negative_text, teacher_classes):
    """FDBPL's L_casc as released: sum over ordered pairs (i, j), i != j, of the batch's distinct
    teacher-argmax classes of mean(d_i - d_j), d = t+ - t- (normalised text features [C, D]).
    The sum is antisymmetric in (i, j), so it is identically zero, and so is its gradient: kept
    to run the released loss as it is (docs/paper_vs_code.md)."""
    d = jnp.mean(fp32(positive_text) - fp32(negative_text), axis=1)  # mean(d_i - d_j) = m_i - m_j
    num_classes = d.shape[0]
    present = jnp.zeros((num_classes,), jnp.float32).at[teacher_classes].set(1.0)
    pairs = present[:, None] * present[None, :] * (1.0 - jnp.eye(num_classes))
    return jnp.sum(pairs * (d[:, None] - d[None, :]))


def resize_map(x, height: int, width: int):
    """[B, h, w, C] -> [B, height, width, C] bilinear, as PyTorch's
    F.interpolate(mode="bilinear", align_corners=False) without antialiasing: half-pixel
    centres, edge samples clamped."""
    x = fp32(x)
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear", antialias=False)


def feature_map_mse(student_map, teacher_map):
    """DAIT's feature alignment (our reading): mean((L2norm_C(S) - L2norm_C(T))^2) over batch,
    positions and channels, each position's channel vector L2-normalised. Maps [B, H, W, C]."""
    s, t = fp32(student_map), fp32(teacher_map)
    _check_same_shape("student_map", s, "teacher_map", t)
    return jnp.mean(jnp.square(l2_normalize(s) - l2_normalize(t)))


def promptkd(student_logits, teacher_logits, temperature):
    """PromptKD's distillation term (released code): T^2 * sum_{b,c} p_T log(p_T / p_S) / (B C)
    with p = softmax(z / T): a KL summed over the batch and divided by every entry B * C, not
    by B (`kd` divided by C)."""
    z_s, z_t = _check_logit_pair(student_logits, teacher_logits)
    log_p = jax.nn.log_softmax(z_t / temperature, axis=1)
    log_q = jax.nn.log_softmax(z_s / temperature, axis=1)
    return temperature**2 * jnp.sum(_kl_rows(log_p, log_q)) / z_s.size


def vl2lite(
    student_features,
    teacher_image_emb,
    text_anchors,
    *,
    align_image,
    align_text,
    labels,
    student_logits,
    temperature,
    reduction,
    scale,
):
    """The VL2Lite base losses (cls, vis, txt), returned separately and unweighted.

    cls = CE(z_s, y); vis = mean |h - a| with h, a the L2-normalised student features and
    image-align output; txt = tau^2 KL(softmax(s t T^T / tau) || softmax(s h A^T / tau)) with
    t, T, A the normalised teacher image embedding, text anchors and text-align output, s = scale.
    reduction "batch_mean": batch-mean KL (released code with learned prompts);
    "half_batch_mean": KLDivLoss 'mean' over B*C times C/2, i.e. half the batch-mean KL.
    """
    if reduction not in TXT_REDUCTIONS:
        raise ValueError(f"reduction must be one of {TXT_REDUCTIONS}, got {reduction!r}")
    h, a = fp32(student_features), fp32(align_image)
    t, anchors, a_txt = fp32(teacher_image_emb), fp32(text_anchors), fp32(align_text)
    z_s = fp32(student_logits)
    _check_vl2lite_shapes(
        student_features=h,
        align_image=a,
        teacher_image_emb=t,
        text_anchors=anchors,
        align_text=a_txt,
        student_logits=z_s,
    )
    cls = cross_entropy(z_s, labels)
    h = l2_normalize(h)
    vis = jnp.mean(jnp.abs(h - l2_normalize(a)))

    def text_log_probs(image, text):
        logits = scale * jnp.matmul(image, text.T, precision=_HIGHEST) / temperature
        return jax.nn.log_softmax(logits, axis=1)

    kl = _kl_rows(
        text_log_probs(l2_normalize(t), l2_normalize(anchors)),
        text_log_probs(h, l2_normalize(a_txt)),
    )
    # 'mean' over B*C then * C/2 equals sum/(2B): half the batch mean.
    factor = 1.0 if reduction == "batch_mean" else 0.5
    txt = temperature**2 * factor * jnp.mean(kl)
    return cls, vis, txt


def _check_vl2lite_shapes(**arrays):
    """Every input 2-D, and B, C, D and d consistent across them."""
    for name, x in arrays.items():
        _check_ndim(name, x, 2)
    batch, num_classes = arrays["student_logits"].shape
    dim, width = arrays["text_anchors"].shape[1], arrays["align_text"].shape[1]
    expected = {
        "student_features": (batch, width),
        "align_image": (batch, width),
        "teacher_image_emb": (batch, dim),
        "text_anchors": (num_classes, dim),
        "align_text": (num_classes, width),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} (B={batch}, C={num_classes}), "
                f"got {arrays[name].shape}"
            )


def loss_weights(epoch, num_epochs, cls_offset):
    """Released schedule: w_cls = clip(offset + e / (8 E), 0, 1), w_vis = w_txt = (1 - w_cls)/2.

    `epoch` is 0-based and may be a Python number or a traced scalar (the trainer passes it
    inside jit). cls_offset = 0.01 gives the paper's stated start of 0.01 / 0.495 / 0.495.
    """
    if isinstance(num_epochs, (int, float, np.number)) and num_epochs <= 0:
        raise ValueError(f"num_epochs must be > 0, got {num_epochs!r}")
    e = jnp.asarray(epoch, dtype=jnp.float32)
    w_cls = jnp.clip(cls_offset + e / (8.0 * num_epochs), 0.0, 1.0)
    w_base = (1.0 - w_cls) / 2.0
    return w_cls, w_base, w_base


def _smooth_l1(x, y):
    """Huber with beta 1, mean over all elements (PyTorch smooth_l1_loss)."""
    d = jnp.abs(x - y)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def _pairwise_distances(e):
    diff = e[:, None, :] - e[None, :, :]
    sq = jnp.sum(diff * diff, axis=-1)
    nonzero = sq > 0  # the diagonal (and duplicates) get distance 0 and a zero gradient
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _normalised_distances(e):
    d = _pairwise_distances(e)
    n = e.shape[0]
    mean_off_diagonal = jnp.sum(d) / (n * (n - 1))
    # a fully collapsed batch has no scale to normalise by; its distances are all zero anyway
    return d / jnp.where(mean_off_diagonal > 0, mean_off_diagonal, 1.0)


def _triplet_angles(e):
    """cos of the angle at i between j and k: <unit(e_j - e_i), unit(e_k - e_i)>, [B, B, B]."""
    u = l2_normalize(e[None, :, :] - e[:, None, :])
    return jnp.einsum("ijd,ikd->ijk", u, u, precision=_HIGHEST)


def rkd(student_features, teacher_features, distance_weight, angle_weight):
    """Relational KD (Park et al. 2019): distance + angle losses with smooth-L1.

    Distances are normalised by their mean over off-diagonal pairs; the teacher side is
    detached. Student and teacher feature widths may differ; the batch sizes must match.
    """
    s, t = fp32(student_features), lax.stop_gradient(fp32(teacher_features))
    _check_ndim("student_features", s, 2)
    _check_ndim("teacher_features", t, 2)
    if s.shape[0] != t.shape[0] or s.shape[0] < 2:
        raise ValueError(
            f"student_features {s.shape} and teacher_features {t.shape} need the "
            "same batch size, at least 2"
        )
    distance = _smooth_l1(_normalised_distances(s), _normalised_distances(t))
    angle = _smooth_l1(_triplet_angles(s), _triplet_angles(t))
    return distance_weight * distance + angle_weight * angle


def coop_ce(image_features, text_features, labels, logit_scale):
    """CoOp objective: CE over logit_scale * norm(img) @ norm(txt)^T.

    `logit_scale` is the multiplier itself (exp of CLIP's stored log scale, about 100).
    """
    img, txt = fp32(image_features), fp32(text_features)
    _check_ndim("image_features", img, 2)
    _check_ndim("text_features", txt, 2)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"image_features {img.shape} and text_features {txt.shape} must share the feature width"
        )
    logits = logit_scale * jnp.matmul(l2_normalize(img), l2_normalize(txt).T, precision=_HIGHEST)
    return cross_entropy(logits, labels)


def teacher_logits(teacher, anchors, scale):
    """z_t = s * L2norm(t) @ L2norm(T)^T: the teacher's class logits over the text anchors."""
    return scale * jnp.matmul(
        l2_normalize(fp32(teacher)), l2_normalize(fp32(anchors)).T, precision=_HIGHEST
    )


def nsd(z_s, z_t, labels, *, form, k, group_size):
    """L_NSD between student logits z_s and teacher logits z_t in the chosen form: "paper" =
    `nsd_paper` (Eq. 6-8, class neighbourhood), "batch" = `nsd_batch` (the released code's
    in-batch sample neighbourhood; `group_size` applies)."""
    if form == "paper":
        return nsd_paper(z_s, z_t, labels, k)
    if form == "batch":
        return nsd_batch(z_s, z_t, k, group_size)
    raise ValueError(f"nsd form must be one of {NSD_FORMS}, got {form!r}")

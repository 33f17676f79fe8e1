"""Sparse teacher soft labels (FKD, Shen & Xing, ECCV 2022; used by FDBPL): the teacher's class
probabilities p of a view kept as their top-K (indices, fp16 values) and turned back into a
full distribution q over the C classes when the student trains:

    MS (marginal smoothing):      q_c = p_c in the top-K, else (1 - sum_topK p) / (C - K)
    MR (marginal re-normalising): q_c = p_c / sum_topK p in the top-K, else 0
    hard:                         q = one-hot of argmax p (K = 1)

"embedding" is no sparsification: the cache holds the teacher's embeddings instead.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pand_jax import losses

KINDS = ("embedding", "ms", "mr", "hard")
SPARSE_KINDS = KINDS[1:]


class SoftLabels(NamedTuple):
    """What a sparse teacher cache stores per view: `sparsify(probabilities(t, anchors, scale,
    temperature), k)` of the teacher's embedding t, read back through `reconstruct(..., kind)`."""

    kind: str  # one of SPARSE_KINDS
    k: int
    anchors: np.ndarray  # [C, D] class (text) anchors
    scale: float
    temperature: float


def parse(spec: str, default_k: int) -> tuple[str, int | None]:
    """(kind, K) of a `--soft-labels` value: "embedding" -> K None, "hard" -> 1, "ms" / "mr" ->
    `default_k` (configs/: FKD's 10), "ms:K" / "mr:K" -> K. K < C is checked by `check`, once
    C is known."""
    kind, colon, k = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(
            f"--soft-labels {spec!r}: unknown kind {kind!r}; expected one of "
            f"{list(KINDS)}, ms and mr optionally with :K"
        )
    if kind in ("embedding", "hard"):
        if colon:
            raise ValueError(f"--soft-labels {spec!r}: {kind} takes no :K")
        return kind, None if kind == "embedding" else 1
    if not colon:
        return kind, default_k
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"--soft-labels {spec!r}: K must be an integer >= 1")
    return kind, int(k)


def check(kind: str, k: int, num_classes: int) -> None:
    """One line for a kind or K that cannot be reconstructed over `num_classes` classes: MS
    divides the remainder by C - K, so K = C (or more) has no remainder to spread."""
    if kind not in SPARSE_KINDS:
        raise ValueError(f"unknown soft-label kind {kind!r}; expected one of {list(SPARSE_KINDS)}")
    if kind == "hard" and k != 1:
        raise ValueError(f"--soft-labels hard keeps K = 1, got K = {k}")
    _check_k(f"{kind}:{k}", k, num_classes)


def _check_k(spec: str, k: int, num_classes: int) -> None:
    if not 1 <= k < num_classes:
        raise ValueError(f"--soft-labels {spec} needs 1 <= K < C = {num_classes}")


def probabilities(embeddings, anchors, scale: float, temperature: float):
    """p = softmax(scale * L2norm(t) @ L2norm(anchors)^T / temperature), fp32 [..., C]."""
    return jax.nn.softmax(losses.teacher_logits(embeddings, anchors, scale) / temperature, -1)


def sparsify(probs, k: int):
    """(indices int32 [..., K], values float16 [..., K]): the top-K of `probs` [..., C] in
    decreasing order, equal values in increasing index order (`lax.top_k`), so hard = argmax."""
    _check_k(f"K = {k}", k, probs.shape[-1])
    values, indices = jax.lax.top_k(probs, k)
    return indices.astype(jnp.int32), values.astype(jnp.float16)


def reconstruct(indices, values, kind: str, num_classes: int):
    """q float32 [..., C] of `kind` ("ms", "mr" or "hard") from `sparsify`'s top-K."""
    check(kind, indices.shape[-1], num_classes)
    # [..., K, C]: a product with a one-hot, not a matmul, is exact at any matmul precision.
    one_hot = jax.nn.one_hot(indices, num_classes, dtype=jnp.float32)
    if kind == "hard":
        return one_hot[..., 0, :]
    values = values.astype(jnp.float32)
    top = jnp.sum(values[..., None] * one_hot, axis=-2)
    mass = jnp.sum(values, axis=-1, keepdims=True)
    if kind == "mr":
        return top / mass
    # fp16 values round up by as much as 2^-11 each, so their sum can exceed 1: a remainder
    # below 0 is rounding, not probability, and a negative q would poison KL and log q.
    rest = jnp.maximum(1.0 - mass, 0.0) / (num_classes - indices.shape[-1])
    return jnp.where(jnp.sum(one_hot, axis=-2) > 0, top, rest)

"""The evaluation figures: a confusion matrix whose class order puts classes that are mistaken for
one another side by side, and a grid of the most confident mistakes."""

from __future__ import annotations

import pathlib
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy.cluster import hierarchy  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

# Up to this many classes every row and column is labelled; beyond it (CUB's 200) names would
# overlap, so the figure lists the largest confusions by name beside the matrix instead.
MAX_TICK_LABELS = 40
MAX_COUNTS = 20  # up to this many classes each non-zero cell shows its count
TOP_CONFUSIONS = 50  # as many as fill the height beside the matrix
MISTAKES = 16


def row_rates(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its support: the fraction of a true class predicted as each class."""
    return cm / np.maximum(cm.sum(1, keepdims=True), 1)


def confusion_order(cm: np.ndarray) -> np.ndarray:
    """A class order with often-confused classes adjacent: average-linkage clustering on the
    symmetric confusion rate, leaves in optimal order (scipy)."""
    rates = row_rates(cm)
    similarity = rates + rates.T
    np.fill_diagonal(similarity, 0.0)
    if len(cm) < 3 or similarity.max() == 0:
        return np.arange(len(cm))
    distance = similarity.max() - similarity
    np.fill_diagonal(distance, 0.0)
    tree = hierarchy.linkage(squareform(distance, checks=False), "average", optimal_ordering=True)
    return hierarchy.leaves_list(tree)


def top_confusions(cm: np.ndarray, n: int) -> list[tuple[int, int]]:
    """The n largest off-diagonal (true, predicted) pairs by count, most frequent first."""
    off = cm.astype(float).copy()
    np.fill_diagonal(off, 0)
    pairs = np.argsort(-off, axis=None, kind="stable")[:n]
    return [(int(t), int(p)) for t, p in zip(*np.unravel_index(pairs, cm.shape)) if off[t, p] > 0]


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def confusion(cm: np.ndarray, class_names, path: pathlib.Path) -> None:
    confusion_figure(cm, class_names).savefig(path, dpi=110)


def confusion_figure(cm: np.ndarray, class_names) -> Figure:
    order = confusion_order(cm)
    rates = row_rates(cm)[np.ix_(order, order)]
    n = len(cm)
    labelled = n <= MAX_TICK_LABELS
    # A labelled matrix names every pair itself; only an unlabelled one needs the side list of
    # the largest confusions. The canvas grows with the classes, so the matrix fills it.
    if labelled:
        fig = Figure(figsize=(6.5 + 0.16 * n, 5.5 + 0.16 * n))
        ax = fig.subplots()
    else:
        fig = Figure(figsize=(15, 9.5))
        ax, side = fig.subplots(1, 2, width_ratios=(3, 1.6))
    # The diagonal (each class's accuracy, in per_class.csv) would set the colour scale and
    # drown the few-percent confusions, so it is greyed out and the errors get the full scale
    # (square root, so that single mistakes still show next to frequent ones).
    errors = np.ma.masked_where(np.eye(n, dtype=bool), rates)
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    norm = PowerNorm(0.5, vmin=0, vmax=max(errors.max(), 1e-9))
    im = ax.imshow(errors, cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(
        im,
        ax=ax,
        fraction=0.046,
        pad=0.02,
        label="fraction of the true class predicted as the column's class",
    )
    if n <= MAX_COUNTS:
        _write_counts(ax, cm[np.ix_(order, order)], errors, norm)
    _set_ticks(ax, order, class_names, labelled)
    ax.set_xlabel("predicted class" + ("" if labelled else " (position in the clustered order)"))
    ax.set_ylabel("true class" + ("" if labelled else " (position in the clustered order)"))
    counted = ", counts in cells" if n <= MAX_COUNTS else ""
    ax.set_title(
        f"confusions, {n} classes, ordered so that confused classes are adjacent\n"
        f"(diagonal grey{counted})",
        fontsize=10,
    )
    if not labelled:
        _largest_confusions(side, cm, order, class_names)
    fig.tight_layout()
    return fig


def _write_counts(ax, counts: np.ndarray, errors: np.ma.MaskedArray, norm: PowerNorm) -> None:
    """Each non-zero cell's count as text, legible on the cell's colour (few classes only)."""
    n = len(counts)
    for (t, p), c in np.ndenumerate(counts):
        if c:  # dark text on the grey diagonal and bright colours, light on viridis' dark end
            dark = t == p or norm(errors[t, p]) > 0.6
            ax.text(
                p,
                t,
                str(c),
                ha="center",
                va="center",
                fontsize=max(5, 11 - n // 3),
                color="black" if dark else "white",
            )


def _set_ticks(ax, order: np.ndarray, class_names, labelled: bool) -> None:
    """Class names on both axes when they fit (`labelled`), else positions every tenth."""
    n = len(order)
    if labelled:
        names = [_short(class_names[i]) for i in order]
        slanted = dict(rotation=30, ha="right") if n <= 10 else dict(rotation=90)  # less height
        ax.set_xticks(range(n), names, fontsize=max(4, 10 - n // 8), **slanted)
        ax.set_yticks(range(n), names, fontsize=max(4, 10 - n // 8))
    else:
        ticks = np.arange(0, n, max(1, n // 10))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)


def _largest_confusions(ax, cm: np.ndarray, order: np.ndarray, class_names) -> None:
    """The most frequent mistakes by name, as text in `ax`, with their rows in the matrix."""
    ax.axis("off")
    position = np.argsort(order)
    lines = [
        f"{cm[t, p]:>4}  {100 * row_rates(cm)[t, p]:5.1f}%  "
        f"[{position[t]:>3}] {_short(class_names[t], 22)}  ->  {_short(class_names[p], 22)}"
        for t, p in top_confusions(cm, TOP_CONFUSIONS)
    ]
    ax.text(
        0,
        1,
        "largest confusions: count, % of true class, [row] true -> predicted\n\n"
        + ("\n".join(lines) or "(none)"),
        va="top",
        ha="left",
        family="monospace",
        fontsize=8,
        transform=ax.transAxes,
    )


def mistakes(
    logits: np.ndarray,
    labels: np.ndarray,
    class_names,
    source,
    *,
    path: pathlib.Path,
    n: int = MISTAKES,
) -> None:
    """The n wrong predictions with the highest softmax probability, with their images
    (`source[i]["image"]`), true and predicted classes."""
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:n]
    cols = 4
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        ax.imshow(np.asarray(source[int(i)]["image"]), interpolation="nearest")
        title = (
            f"true: {class_names[labels[i]]}\npred: {class_names[predicted[i]]} "
            f"({probs[i, predicted[i]]:.2f})"
        )
        ax.set_title("\n".join(textwrap.fill(line, 34) for line in title.split("\n")), fontsize=8)
    if not len(worst):
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("most confident mistakes (softmax probability of the predicted class)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""The paper's figures from the runs: test accuracy per epoch, the sensitivity study of the
paper's method (PAND's lambda_NSD), and the t-SNE of the student's test-set features for the
base method against the paper's (VL2Lite against PAND, the paper's Figure 3)."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # not pyplot: no global state, no display needed
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from pand_jax import files
from pand_jax.experiments import plan as plan_lib
from pand_jax.experiments import results as results_lib
from pand_jax.experiments.results import DATASET_NAMES, STUDENT_NAMES, Result

# Table 1's rows (one per method of the registry), then Table 2's ablations.
ROW_ORDER = tuple(dict.fromkeys([r.label for r in plan_lib.table1() + plan_lib.ablations()]))
# Methods often tie (short runs, or near chance), and a curve drawn over another hides it: each
# method has its own marker and dash, and its points sit DODGE epochs to the side of the next's.
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "h", "<", ">", "p", "8", "H")
DASHES = ("-", "--", "-.", ":")
DODGE = 0.05
# Figure 3's two students: the ablation table's first row (the base method) and its last (the
# paper's method): VL2Lite and PAND.
TSNE_PAIR = (plan_lib.ablation_table()[0], plan_lib.ablation_table()[-1])


def _title(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def epoch_top1(workdir: pathlib.Path) -> dict[int, float]:
    """Test top-1 (%) per epoch from metrics.jsonl; a resumed run's repeated epoch keeps its
    last value."""
    out = {}
    with open(workdir / "metrics.jsonl") as f:
        for line in f:
            m = json.loads(line)
            if m["kind"] == "epoch":
                out[int(m["epoch"])] = 100 * m["top1"]
    return out


def accuracy_curves(results: list[Result], dataset: str, path: pathlib.Path) -> Figure:
    """One panel per student: mean test top-1 over seeds per epoch, a band of +- 1 std; the
    figure is saved to `path` and returned."""
    students = sorted({r.student for r in results if r.dataset == dataset})
    fig = Figure(figsize=(6.4 * len(students), 4.6))
    axes = fig.subplots(1, len(students), squeeze=False, sharey=True)
    colors = colormaps["tab10"]
    for ax, student in zip(axes[0], students):
        seen = set()
        for i, row in enumerate(ROW_ORDER):
            curves = [
                epoch_top1(r.workdir)
                for r in results
                if (r.dataset, r.student) == (dataset, student) and row in r.rows
            ]
            if not curves:
                continue
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            seen.update(epochs)
            y = np.asarray([[c[e] for e in epochs] for c in curves])
            mean = y.mean(0)
            x = np.asarray(epochs) + DODGE * (i - (len(ROW_ORDER) - 1) / 2)
            ax.plot(
                x,
                mean,
                marker=MARKERS[i % len(MARKERS)],
                markevery=max(1, len(epochs) // 20),
                markersize=5,
                markerfacecolor=(0, 0, 0, 0),  # hollow
                linestyle=DASHES[i % len(DASHES)],
                color=colors(i),
                label=f"{row} (n={len(curves)})",
            )
            if len(curves) > 1:
                std = y.std(0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=colors(i), alpha=0.15, linewidth=0)
        ax.set_title(f"{STUDENT_NAMES.get(student, student)} student")
        ax.set_xlabel("epoch")
        if len(seen) <= 12:  # a short run: a tick on every epoch, none between
            ax.set_xticks(sorted(seen))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if seen:  # half an epoch either side, so that the dodge reads as small
            ax.set_xlim(min(seen) - 0.5, max(seen) + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")  # where it covers no point
    axes[0][0].set_ylabel("test top-1 accuracy (%)")
    fig.suptitle(
        f"Test accuracy during Stage-NSD, {_title(dataset)}\n"
        "(mean over seeds, band: ±1 std; methods drawn slightly apart along x)"
    )
    fig.tight_layout()
    _save(fig, path)
    return fig


def sweep_sensitivity(results: list[Result], dataset: str, path: pathlib.Path) -> None:
    """The paper's method's best top-1 against its swept value (PAND's lambda_NSD): mean over
    seeds, error bars +- 1 std, the paper's numbers where known."""
    method = plan_lib.paper_method()
    rs = [r for r in results if r.dataset == dataset]
    lambdas = sorted({r.sweep_value for r in rs if r.sweep_value is not None and not r.no_psc})
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    colors = colormaps["tab10"]
    for i, student in enumerate(sorted({r.student for r in rs})):
        points = [(x, results_lib.top1s(rs, dataset, student, sweep_value=x)) for x in lambdas]
        points = [(lam, v) for lam, v in points if len(v)]
        if not points:
            continue
        x = [lam for lam, _ in points]
        mean = [v.mean() for _, v in points]
        std = [v.std(ddof=1) if len(v) > 1 else 0.0 for _, v in points]
        n = sorted({len(v) for _, v in points})
        ax.errorbar(
            x,
            mean,
            yerr=std,
            marker="o",
            capsize=4,
            color=colors(i),
            label=f"{STUDENT_NAMES.get(student, student)}, ours (n={'/'.join(map(str, n))})",
        )
        paper = results_lib.PAPER_SWEEP.get((dataset, student), {})
        if paper:
            ax.plot(
                list(paper),
                list(paper.values()),
                linestyle="None",
                marker="*",
                markersize=12,
                color=colors(i),
                label=f"{STUDENT_NAMES.get(student, student)}, paper",
            )
    ax.set_xticks(lambdas, [f"{lam:g}" for lam in lambdas])
    ax.set_xlabel(f"${method.sweep.tex}$")
    ax.set_ylabel("best test top-1 accuracy (%)")
    ax.set_title(
        f"{method.label}: sensitivity to ${method.sweep.tex}$, {_title(dataset)}"
        "\n(mean over seeds, error bars: ±1 std)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def student_test_features(workdir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """The exported best student's penultimate features [N, F] of the test split, with the
    trainer's evaluation transform, and the labels [N]."""
    from pand_jax import data as data_lib
    from pand_jax import devices
    from pand_jax.data import augment
    from pand_jax.models.student import load_student
    from pand_jax.train import setup

    cfg = json.loads((workdir / "config.json").read_text())
    info = data_lib.get_dataset(cfg["dataset"])
    mesh = devices.make_mesh()
    size = cfg["image_size"]
    loader = setup.eval_loader(
        info,
        info.test_split,
        cfg,
        size=size,
        resize="stretch",
        batch=cfg["eval_batch_size"],
        cache_dir=setup.host_cache_dir(cfg, workdir),
    )
    extract = devices.jit_apply(
        load_student(workdir / "student"),
        lambda student, batch: student.features(augment.eval_transform(batch["image"], size)),
        mesh,
    )
    return devices.run_over_split(extract, loader, mesh, f"test features {workdir.name}")


def tsne_embedding(workdir: pathlib.Path, cache: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of `student_test_features`, cached under `cache` for the exported student."""
    from sklearn.manifold import TSNE

    from pand_jax.train import features

    def compute():
        feats, labels = student_test_features(workdir)
        perplexity = min(30.0, (len(feats) - 1) / 3)
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(
            feats.astype(np.float64)
        )
        return {"xy": xy, "labels": labels}

    summary = json.loads((workdir / "summary.json").read_text())
    student_dir = workdir / "student"
    key = dict(
        workdir=str(workdir.resolve()),
        best_epoch=summary["best_epoch"],
        weights=sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in student_dir.rglob("*")
            if p.is_file()
        ),
    )
    arrays = features.cached_arrays(cache, key, compute)
    return arrays["xy"], arrays["labels"]


def class_colors(num_classes: int) -> np.ndarray:
    """RGBA per class: tab10/tab20 when they suffice; otherwise hues of the perceptually ordered
    `turbo` map visited in golden-ratio steps, so that classes with nearby ids (often related
    species) get far-apart colours. Matplotlib has no qualitative map beyond 20 colours."""
    if num_classes <= 20:
        return colormaps["tab10" if num_classes <= 10 else "tab20"](np.arange(num_classes))
    return colormaps["turbo"]((np.arange(num_classes) * 0.618034) % 1.0 * 0.9 + 0.05)


def tsne_figure(
    left: Result,
    right: Result,
    *,
    cache_dir: pathlib.Path,
    path: pathlib.Path,
    class_names: tuple[str, ...],
) -> None:
    """Figure 3: the test-set features of two students (VL2Lite, PAND) side by side."""
    fig = Figure(figsize=(12.8, 6.4))
    axes = fig.subplots(1, 2)
    colors = class_colors(len(class_names))
    many = len(class_names) > 20
    for ax, r, name in zip(axes, (left, right), TSNE_PAIR):
        xy, labels = tsne_embedding(
            r.workdir, cache_dir / f"tsne_{name.lower()}_{r.student}_seed{r.seed}.npz"
        )
        ax.scatter(
            xy[:, 0],
            xy[:, 1],
            c=colors[labels],
            s=4 if many else 10,
            linewidths=0,
            alpha=0.8,
            rasterized=True,
        )
        ax.set_title(f"{name} (test top-1 {100 * r.best_top1:.2f}%)")
        ax.set_xlabel("t-SNE dimension 1")
        ax.set_ylabel("t-SNE dimension 2")
        ax.set_xticks([])
        ax.set_yticks([])
    if not many:  # a legend of 200 names is unreadable: colours only tell classes apart
        handles = [
            Line2D([], [], marker="o", linestyle="None", color=colors[i], label=class_names[i])
            for i in range(len(class_names))
        ]
        fig.legend(handles=handles, loc="center right", title="class", fontsize=8)
    fig.suptitle(
        f"t-SNE of {STUDENT_NAMES.get(left.student, left.student)} test-set features, "
        f"{_title(left.dataset)}, seed {left.seed}: one colour per class "
        f"({len(class_names)} classes)"
    )
    fig.tight_layout(rect=(0, 0, 0.9 if not many else 1, 1))
    _save(fig, path)


def _save(fig: Figure, path: pathlib.Path) -> None:
    """The PNG is rendered in memory first, so a disk that refuses it is one line naming the
    file and its size, and no half-written PNG is left (`files.write_file`)."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=150)
    files.write_file(path, png.getvalue(), "the figure")


def make_figures(results: list[Result], out: pathlib.Path) -> list[pathlib.Path]:
    """Every figure the runs allow, under OUT/figures; returns their paths."""
    from pand_jax.data import datasets

    fig_dir = pathlib.Path(out) / "figures"
    (fig_dir / "cache").mkdir(parents=True, exist_ok=True)
    made = []
    for dataset in sorted({r.dataset for r in results}):
        rs = [r for r in results if r.dataset == dataset]
        path = fig_dir / f"{dataset}_accuracy_per_epoch.png"
        accuracy_curves(rs, dataset, path)
        made.append(path)
        if any(r.sweep_value is not None and not r.no_psc for r in rs):
            label = plan_lib.paper_method().sweep.label
            path = fig_dir / f"{dataset}_{label}_sensitivity.png"
            sweep_sensitivity(rs, dataset, path)
            made.append(path)
        base, ours = TSNE_PAIR
        pairs = [
            (a, b)
            for a in rs
            if base in a.rows
            for b in rs
            if ours in b.rows and (a.student, a.seed) == (b.student, b.seed)
        ]
        if pairs:
            left, right = min(
                pairs, key=lambda p: (p[0].student not in STUDENT_NAMES, p[0].student, p[0].seed)
            )
            path = fig_dir / f"{dataset}_tsne_{base.lower()}_vs_{ours.lower()}.png"
            tsne_figure(
                left,
                right,
                cache_dir=fig_dir / "cache",
                path=path,
                class_names=datasets.get_dataset(dataset).class_names,
            )
            made.append(path)
    return made

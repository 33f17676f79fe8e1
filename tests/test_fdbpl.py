"""Training from sparse soft labels (`--soft-labels`, FKD's MS / MR / hard in the teacher
cache) and FDBPL: the lookup step gives the online step's loss where the labels keep the whole
distribution, the methods that read the embedding refuse a sparse cache, and bad input is one
line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import NSD_ARGS

from pand_jax import methods


def cli(argv):
    from pand_jax.cli.train import main

    return main([str(a) for a in argv])


def first_steps(workdir):
    return [
        json.loads(line)
        for line in (workdir / "metrics.jsonl").open()
        if json.loads(line)["kind"] == "step"
    ]


# KL(p_T || p_s) weighs each stored value by itself: fp16's 2^-11 relative rounding shows as
# about that. FDBPL's reverse KL weighs log q by the student's p+, so it also sees the values
# below fp16's normal range (6e-5, where the relative rounding grows): measured 2.3e-3.
LOOKUP_RTOL = {"fdbpl": 1e-2}
# A step record's values that are not terms computed from the teacher's distribution.
NOT_TEACHER_TERMS = {"kind", "step", "loss", "cls", "grad_norm", "lr"}


@pytest.mark.parametrize("method", methods.names(lambda m: m.teacher_distribution))
def test_every_distribution_reader_gives_its_loss_from_the_looked_up_labels(method):
    """MS with K = C - 1 keeps p_T whole: the one class left out gets 1 - sum of the others,
    its own probability. So each method's objective on the stored fp16 labels gives its terms
    on the teacher's embedding (2e-3 unless LOOKUP_RTOL says otherwise)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pand_jax import config, soft_labels

    entry, (b, c, d, width) = methods.get(method), (6, 10, 12, 16)
    loss_cfg = config.default_config("nsd")["loss"]
    scale, temperature = entry.teacher_distribution(loss_cfg)
    logits, features, t, noise = (
        jnp.asarray(np.random.default_rng(5).standard_normal(s), jnp.float32)
        for s in ((b, c), (b, d), (b, width), (c, width))
    )
    anchors = 1.0 + 0.05 * noise  # close class vectors: at s = 100 a spread of a few logits
    index, value = soft_labels.sparsify(
        soft_labels.probabilities(t, anchors, scale, temperature), c - 1
    )
    q = soft_labels.reconstruct(index, value, "ms", c)
    heads = entry.heads(d, width, nnx.Rngs(0))
    settings = entry.settings(loss_cfg, 4, True, "digits")

    labels = jnp.arange(b) % c if entry.reads_labels else None

    def terms(**teacher):
        x = methods.Inputs(
            logits, features, labels, anchors=anchors, heads=heads, epoch=1, **teacher
        )
        return jax.tree.map(float, entry.objective(x, **settings)[1])

    emb, ms = terms(teacher=t), terms(teacher=None, teacher_probs=q)
    assert emb.keys() == ms.keys()
    for term in emb:
        np.testing.assert_allclose(ms[term], emb[term], rtol=LOOKUP_RTOL.get(method, 2e-3))
    assert any(ms[k] != emb[k] for k in emb)  # it did read the fp16 lookup


# End to end (cache build, lookup, step) for FDBPL, whose setting this is, and for function
# matching, whose cache views mix in a partner image: the lookup plumbing is the same for all.
@pytest.mark.parametrize("method", ["fdbpl", "fm"])
def test_ms_labels_of_all_but_one_class_give_the_embedding_caches_loss(
    method, teacher, psc_run, tmp_path
):
    """The lookup step's terms are the embedding step's (the test above, through train.py)."""
    args = NSD_ARGS + [
        "--method",
        method,
        "--teacher",
        teacher,
        "--anchors",
        psc_run / "anchors.npz",
        "--teacher-cache",
        "2",
    ]
    for key, value in methods.get(method).table_sets:  # function matching's mixed views
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert cli(args + ["--workdir", tmp_path / "emb", "--set", "teacher_cache_dtype=float32"]) == 0
    assert cli(args + ["--workdir", tmp_path / "ms", "--soft-labels", "ms:9"]) == 0
    emb, ms = first_steps(tmp_path / "emb"), first_steps(tmp_path / "ms")
    assert len(emb) == len(ms) == 1
    terms = sorted(set(emb[0]) - NOT_TEACHER_TERMS)
    assert terms and set(ms[0]) == set(emb[0])
    for term in terms:
        np.testing.assert_allclose(ms[0][term], emb[0][term], rtol=LOOKUP_RTOL.get(method, 2e-3))
    assert any(ms[0][t] != emb[0][t] for t in terms)  # it did read the fp16 lookup
    meta = json.loads((tmp_path / "ms/teacher_cache/meta.json").read_text())
    assert meta["key"]["soft_labels"]["kind"] == "ms" and meta["key"]["soft_labels"]["k"] == 9


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--soft-labels", "ms", "--method", "kd"],
            "config soft_labels = 'ms': expected embedding without --teacher-cache V",
        ),
        (
            ["--soft-labels", "ms", "--teacher-cache", "2", "--method", "vl2lite"],
            "config soft_labels = 'ms': expected embedding with --method vl2lite, which reads the "
            "teacher's embedding (sparse labels serve "
            f"{', '.join(methods.names(lambda m: m.teacher_distribution))})",
        ),
        (
            ["--soft-labels", "mr:10", "--teacher-cache", "2", "--method", "kd"],
            "config soft_labels_k = 10: expected < the 10 classes",
        ),
        (
            ["--soft-labels", "mr:3", "--teacher-cache", "2", "--method", "fdbpl"],
            "config soft_labels = 'mr': expected embedding or ms with --method fdbpl",
        ),
        (["--soft-labels", "top:3", "--teacher-cache", "2"], "--soft-labels 'top:3': unknown kind"),
    ],
)
def test_bad_soft_labels_are_one_line(extra, message, teacher, psc_run, tmp_path, capsys):
    args = (
        NSD_ARGS
        + [
            "--teacher",
            teacher,
            "--anchors",
            psc_run / "anchors.npz",
            "--workdir",
            tmp_path / "run",
        ]
        + extra
    )
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()

"""Teacher cache: cached embeddings equal the online teacher on the regenerated view, sparse soft
labels equal those of the cached embeddings; the cache is reused only when its key matches and
it is complete."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_demo_clip

from pand_jax import data as data_lib
from pand_jax import devices, soft_labels
from pand_jax.data import augment, pipeline
from pand_jax.data.sources import ArraySource
from pand_jax.train import teacher_cache

N, VIEWS, SEED, HOST, SIZE, RECIPE = 10, 2, 3, 36, 32, "rrc"
SPEC = teacher_cache.Spec(
    teacher="random-demo-clip",
    dataset="digits",
    split="train",
    data_dir="None",
    views=VIEWS,
    seed=SEED,
    recipe=RECIPE,
    host_image_size=HOST,
    image_size=SIZE,
    compute_dtype="float32",
    dtype="bfloat16",
)


@pytest.fixture(scope="module")
def clip():
    """The demo CLIP with random weights drawn by NumPy (compiling JAX's initialisers for every
    layer shape would cost more CPU than the rest of this file)."""
    return random_demo_clip()


@pytest.fixture(scope="module")
def source():
    train = data_lib.load_split("digits", "train")
    return ArraySource(train.images[:N], train.labels[:N], name="digits-train-head")


@pytest.fixture
def calls(monkeypatch):
    """Counts the teacher passes (builds) so reuse is observable."""
    count = {"n": 0, "chunks": []}
    compute = teacher_cache._compute

    def counted(clip, source, spec, job):
        count["n"] += 1
        count["chunks"].append(list(job.chunks))
        return compute(clip, source, spec, job)

    monkeypatch.setattr(teacher_cache, "_compute", counted)
    return count


def build(clip, source, path, **overrides):
    """`teacher_cache.build` of SPEC with `overrides` (of the spec's fields, or of the build's
    batch size, mesh and sharding)."""
    fields = {f.name for f in dataclasses.fields(SPEC)}
    spec = dataclasses.replace(SPEC, **{k: v for k, v in overrides.items() if k in fields})
    # batch 4 over 10 examples: the last batch is padded, which the cache must drop.
    args = dict(batch_size=4, mesh=devices.make_mesh(), teacher_sharding="replicated")
    args.update({k: v for k, v in overrides.items() if k not in fields})
    return teacher_cache.build(clip, source, spec, path=path, **args)


def read_all(cache, n=N, views=VIEWS) -> dict[str, np.ndarray]:
    """The whole cache as the trainer reads it, `cache.lookup` of every (example, view), each
    field reshaped to [n, views, ...]."""
    got = cache.lookup(np.arange(n).repeat(views), np.tile(np.arange(views), n))
    return {name: a.reshape(n, views, *a.shape[1:]) for name, a in got.items()}


def embeddings(cache) -> np.ndarray:
    """An embedding cache's teacher embeddings as the trainer reads them: float32 [N, V, D]."""
    got = read_all(cache)
    assert set(got) == {"teacher"}, sorted(got)
    return got["teacher"].astype(np.float32)


def on_disk(path, file=teacher_cache.EMBEDDINGS) -> np.ndarray:
    """A cache file as stored (module docstring): bfloat16 embeddings are kept as their uint16
    bit pattern, read back as a bfloat16 view."""
    stored = np.load(path / file, mmap_mode="r")
    return stored.view(jnp.bfloat16) if stored.dtype == np.uint16 else stored


@pytest.fixture(scope="module")
def online(clip, source):
    """The teacher on the views the trainer regenerates: [N, V, D] fp32."""
    host = np.stack([pipeline.resize_image(source[i]["image"], HOST, "stretch") for i in range(N)])
    encode = devices.jit_apply(
        clip, lambda m, keys: m.encode_image(augment.augment(host, keys, RECIPE, SIZE))
    )
    return np.stack(
        [np.asarray(encode(augment.example_keys(SEED, np.arange(N), v))) for v in range(VIEWS)], 1
    )


def test_mixup_cache_holds_each_views_mixture_with_its_drawn_partner(clip, source, tmp_path):
    """Under "mixup" view v of example i mixes it with `augment.partners(seed, i, v, N)`: the
    cache holds the teacher on exactly that mixture, which the trainer can draw again."""
    host = np.stack([pipeline.resize_image(source[i]["image"], HOST, "stretch") for i in range(N)])
    encode = devices.jit_apply(
        clip,
        lambda m, keys, partners: m.encode_image(
            augment.augment(host, keys, augment.MIXUP, SIZE, partner_images=partners)
        ),
    )
    index = np.arange(N)
    want = np.stack(
        [
            np.asarray(
                encode(
                    augment.example_keys(SEED, index, v),
                    host[augment.partners(SEED, index, v, N)],
                )
            )
            for v in range(VIEWS)
        ],
        1,
    )
    got = embeddings(build(clip, source, tmp_path, dtype="float32", recipe=augment.MIXUP))
    err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert err.max() < 1e-5, err.max()


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_cached_equals_online_teacher(clip, source, online, tmp_path, dtype, rtol):
    cache = build(clip, source, tmp_path, dtype=dtype)
    expected = online
    stored = on_disk(tmp_path)
    assert stored.shape == (N, VIEWS, clip.config.embed_dim)
    assert stored.dtype == {"float32": np.float32, "bfloat16": jnp.bfloat16}[dtype]
    rows = read_all(cache)["teacher"]
    assert rows.dtype == stored.dtype  # the trainer reads the stored dtype
    np.testing.assert_array_equal(rows, stored)
    got = embeddings(cache)
    err = np.linalg.norm(got - expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert err.max() < rtol, err.max()
    # The views differ, so a mix-up of views or examples would show above.
    assert not np.allclose(expected[:, 0], expected[:, 1], rtol=0.05)


def test_reused_when_key_matches(clip, source, tmp_path, calls):
    first = embeddings(build(clip, source, tmp_path))
    second = embeddings(build(clip, source, tmp_path))
    assert calls["n"] == 1
    np.testing.assert_array_equal(first, second)


def test_rebuilt_when_key_changes(clip, source, tmp_path, calls, capsys):
    build(clip, source, tmp_path)
    # The teacher's compute dtype and the storage dtype both key it: a bf16 teacher's cache in
    # a shared teacher_cache_dir is never read by an fp32 run, nor the other way round.
    changes = [
        {"teacher": "another-teacher"},
        {"seed": SEED + 1},
        {"recipe": "released"},
        {"views": VIEWS + 1},
        {"compute_dtype": "bfloat16"},
        {"dtype": "float32"},
    ]
    for n, change in enumerate(changes, 2):
        cache = build(clip, source, tmp_path, **change)
        assert calls["n"] == n, change
        assert _stale(capsys.readouterr().out) >= set(change)
        views = change.get("views", VIEWS)
        assert on_disk(tmp_path).shape == (N, views, clip.config.embed_dim), change
        assert read_all(cache, views=views)["teacher"].shape == (N, views, clip.config.embed_dim)


def _stale(out: str) -> set[str]:
    """The key entries a stale-cache warning names (changed since the last build)."""
    head = (
        "warning: stale cache (it was made for another teacher, dataset, split, dtype, "
        "soft-label or augmentation setting: "
    )
    assert head in out, out
    return set(out.split(head)[1].split("), rebuilding")[0].split(", "))


def _drop_last_checksum(path):  # a build stopped before its last chunk's checksum
    f = path / teacher_cache.CHECKSUMS
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:-1]) + "2 3f")  # cut short


def _truncate(path):
    f = path / teacher_cache.EMBEDDINGS
    f.write_bytes(f.read_bytes()[:-100])


def _drop_meta(path):
    (path / teacher_cache.META).unlink()


def test_rebuilt_when_partial(clip, source, tmp_path, calls, capsys):
    """10 examples in batches of 4: chunks 0, 1, 2. A stopped build recomputes what it had not
    finished; a file cut short or without its meta.json is rebuilt whole."""
    expected = embeddings(build(clip, source, tmp_path))
    for damage, chunks, message in [
        (_drop_last_checksum, [2], "resuming"),
        (_truncate, [0, 1, 2], "unreadable"),
        (_drop_meta, [0, 1, 2], "partial: no meta.json"),
    ]:
        damage(tmp_path)
        again = embeddings(build(clip, source, tmp_path))
        assert calls["chunks"][-1] == chunks, damage.__name__
        assert message in capsys.readouterr().out
        np.testing.assert_array_equal(again, expected)


@pytest.mark.parametrize("junk", ["zeros", "random"])
def test_damaged_rows_are_found_and_only_their_chunk_recomputed(
    clip, source, tmp_path, calls, capsys, junk
):
    """Bytes overwritten inside embeddings.npy (zeros, or random bits with NaN among them) are
    caught by the chunk checksums: one warning, only that chunk computed again, and the cache
    equals the undisturbed one."""
    expected = embeddings(build(clip, source, tmp_path))
    f = tmp_path / teacher_cache.EMBEDDINGS
    raw = bytearray(f.read_bytes())
    row_bytes = VIEWS * clip.config.embed_dim * 2  # bf16
    start = len(raw) - 10 * row_bytes + 5 * row_bytes + 7  # inside example 5: chunk 1
    rng = np.random.default_rng(0)
    junk_bytes = (
        bytes(40)
        if junk == "zeros"
        else np.full(20, np.nan, np.float32).view(np.uint8)[:20].tobytes()
        + rng.integers(0, 256, 20, np.uint8).tobytes()
    )
    raw[start : start + 40] = junk_bytes
    f.write_bytes(bytes(raw))
    again = embeddings(build(clip, source, tmp_path))
    out = capsys.readouterr().out
    assert "warning: chunks [1] of" in out and "do not match their checksums" in out, out
    assert calls["chunks"] == [[0, 1, 2], [1]]
    np.testing.assert_array_equal(again, expected)


# ------------------------------------------------------------------ sparse soft labels

SCALE, TEMPERATURE = 14.0, 2.0


@pytest.fixture(scope="module")
def anchors(clip):
    """10 class anchors (digits' classes) in the teacher's embedding space."""
    return np.random.default_rng(1).standard_normal((10, clip.config.embed_dim)).astype(np.float32)


def sparse(anchors, kind="ms", k=3, **changes):
    return soft_labels.SoftLabels(
        kind, k, anchors, changes.get("scale", SCALE), changes.get("temperature", TEMPERATURE)
    )


def test_sparse_cache_is_the_top_k_of_the_embedding_caches_probabilities(
    clip, source, anchors, tmp_path
):
    """Same teacher, views and settings: the sparse cache holds sparsify(probabilities(t)) of the
    fp32 embedding cache's t. Indices equal; values to one fp16 step (2^-10 relative: both sides
    round their own fp32 probabilities, from separately compiled programs); the files are the
    sparse ones only."""
    emb = build(clip, source, tmp_path / "emb", dtype="float32")
    cache = build(clip, source, tmp_path / "ms", soft_labels=sparse(anchors))
    probs = soft_labels.probabilities(embeddings(emb), anchors, SCALE, TEMPERATURE)
    want_index, want_value = soft_labels.sparsify(probs, 3)
    assert float(np.max(probs)) < 0.99  # not one-hot: the values carry information
    assert sorted(p.name for p in (tmp_path / "ms").iterdir()) == [
        teacher_cache.CHECKSUMS,
        teacher_cache.INDICES,
        teacher_cache.META,
        teacher_cache.VALUES,
    ]
    stored = {
        "teacher_index": on_disk(tmp_path / "ms", teacher_cache.INDICES),
        "teacher_value": on_disk(tmp_path / "ms", teacher_cache.VALUES),
    }
    assert stored["teacher_index"].dtype == np.int16 and stored["teacher_value"].dtype == np.float16
    assert stored["teacher_index"].shape == stored["teacher_value"].shape == (N, VIEWS, 3)
    np.testing.assert_array_equal(stored["teacher_index"], want_index)
    np.testing.assert_allclose(
        stored["teacher_value"].astype(np.float32), np.asarray(want_value, np.float32), rtol=2**-10
    )
    # The trainer reads the stored rows, in the stored dtypes.
    every = read_all(cache)
    assert set(every) == {"teacher_index", "teacher_value"}
    for name, rows in every.items():
        assert rows.dtype == stored[name].dtype, name
        np.testing.assert_array_equal(rows, stored[name])
    index, view = np.array([9, 0, 4, 4]), np.array([1, 0, 0, 1])
    got = cache.lookup(index, view)
    assert set(got) == {"teacher_index", "teacher_value"}
    np.testing.assert_array_equal(got["teacher_index"], stored["teacher_index"][index, view])
    np.testing.assert_array_equal(got["teacher_value"], stored["teacher_value"][index, view])
    assert got["teacher_value"].shape == (4, 3)
    # The embedding cache reads per batch the same way: the stored rows of those examples and
    # views, under the one key "teacher".
    emb_rows = emb.lookup(index, view)
    assert set(emb_rows) == {"teacher"}
    np.testing.assert_array_equal(emb_rows["teacher"], on_disk(tmp_path / "emb")[index, view])


def test_sparse_cache_is_rebuilt_for_another_kind_k_or_anchors(
    clip, source, anchors, tmp_path, calls, capsys
):
    """Every soft-label setting keys the cache, and so does switching from embeddings, whose
    file then goes: the same directory never serves what another setting stored."""
    build(clip, source, tmp_path)
    changes = [
        {},
        {"kind": "mr"},
        {"k": 5},
        {"kind": "hard", "k": 1},
        {"scale": SCALE / 2},
        {"temperature": 1.0},
        {"anchors": anchors[::-1]},
    ]
    for n, change in enumerate(changes, 2):
        spec = sparse(**{"anchors": anchors, **change})
        cache = build(clip, source, tmp_path, soft_labels=spec)
        assert calls["n"] == n, change
        first = {"dtype"} if not change else set()  # bfloat16 embeddings -> float16 values
        assert _stale(capsys.readouterr().out) == {"soft_labels", *first}
        assert on_disk(tmp_path, teacher_cache.VALUES).shape == (N, VIEWS, spec.k), change
        assert read_all(cache)["teacher_value"].shape == (N, VIEWS, spec.k), change
    assert not (tmp_path / teacher_cache.EMBEDDINGS).exists()
    build(clip, source, tmp_path, soft_labels=spec)
    assert calls["n"] == len(changes) + 1  # reused


@pytest.mark.parametrize("file", [teacher_cache.INDICES, teacher_cache.VALUES])
def test_sparse_cache_damage_and_resume_recompute_only_their_chunks(
    clip, source, anchors, tmp_path, calls, capsys, file
):
    """The chunk checksums cover both files: bytes changed in either inside example 5 (chunk 1)
    recompute chunk 1 alone; a build stopped before its last checksum resumes with chunk 2."""
    spec = sparse(anchors)
    expected = build(clip, source, tmp_path, soft_labels=spec).lookup(
        np.arange(N).repeat(VIEWS), np.tile(np.arange(VIEWS), N)
    )
    stored = np.load(tmp_path / file, mmap_mode="r+")
    stored[5, 1, 0] += 1  # another class, or another value
    stored.flush()
    del stored
    for chunks, message in [([1], "warning: chunks [1] of"), ([2], "resuming")]:
        again = build(clip, source, tmp_path, soft_labels=spec)
        assert calls["chunks"][-1] == chunks and message in capsys.readouterr().out
        got = again.lookup(np.arange(N).repeat(VIEWS), np.tile(np.arange(VIEWS), N))
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
        sums = tmp_path / teacher_cache.CHECKSUMS  # a build stopped before chunk 2's checksum
        sums.write_text(
            "".join(
                line
                for line in sums.read_text().splitlines(keepends=True)
                if not line.startswith("2 ")
            )
        )


def test_sparse_cache_refuses_k_of_at_least_c(clip, source, anchors, tmp_path):
    with pytest.raises(ValueError, match=r"--soft-labels ms:10 needs 1 <= K < C = 10$"):
        build(clip, source, tmp_path, soft_labels=sparse(anchors, k=10))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("classes, dtype", [(32768, np.int16), (32769, np.int32)])
def test_indices_are_int16_while_the_classes_fit(classes, dtype):
    spec = soft_labels.SoftLabels("ms", 10, np.zeros((classes, 1)), SCALE, TEMPERATURE)
    index, value = teacher_cache._fields("bfloat16", 8, spec)
    assert index.disk == dtype and value.disk == np.float16


def test_views_for_epoch():
    a = teacher_cache.views_for_epoch(0, 5, 1000, 4)
    assert a.dtype == np.int32 and a.shape == (1000,)
    assert a.min() >= 0 and a.max() < 4
    np.testing.assert_array_equal(a, teacher_cache.views_for_epoch(0, 5, 1000, 4))
    assert not np.array_equal(a, teacher_cache.views_for_epoch(0, 6, 1000, 4))
    assert not np.array_equal(a, teacher_cache.views_for_epoch(1, 5, 1000, 4))
    counts = np.bincount(a, minlength=4)
    assert counts.min() > 200  # uniform: 250 each on average
    assert not teacher_cache.views_for_epoch(0, 0, 10, 1).any()
    with pytest.raises(ValueError, match="views must be >= 1"):
        teacher_cache.views_for_epoch(0, 0, 10, 0)


def test_rejects_bad_arguments(clip, source, tmp_path):
    with pytest.raises(ValueError, match="views >= 1"):
        build(clip, source, tmp_path, views=0)
    with pytest.raises(ValueError, match="unknown cache dtype"):
        build(clip, source, tmp_path, dtype="float16")
    assert jax.process_count() == 1


def _build_in_subprocess(clip, source_dir, path, prelude: str) -> subprocess.CompletedProcess:
    """The cache built by another process, under train.py's SIGTERM handling; `prelude` sets
    up the fault."""
    from pand_jax.models.clip import save_clip

    teacher = path.parent / "teacher"
    if not teacher.exists():
        save_clip(teacher, clip, teacher_id="random-demo-clip")
    code = (
        textwrap.dedent(f"""
        import numpy as np, pathlib, signal, os, resource
        from pand_jax import devices
        from pand_jax.cli import common
        from pand_jax.data.sources import ArraySource
        from pand_jax.models.clip import load_clip
        from pand_jax.train import teacher_cache
        d = np.load({str(source_dir)!r})
        source = ArraySource(d["images"], d["labels"], name="digits-train-head")
        clip = load_clip({str(teacher)!r})
    """)
        + textwrap.dedent(prelude)
        + textwrap.dedent(f"""
        def build():
            teacher_cache.build(clip, source, teacher_cache.{SPEC!r}, batch_size=4,
                                mesh=devices.make_mesh(), teacher_sharding="replicated",
                                path=pathlib.Path({str(path)!r}))
        with common.stop_on_sigterm("the test"):
            raise SystemExit(common.run(build))
    """)
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=600,
    )


@pytest.fixture
def saved_source(source, tmp_path):
    path = tmp_path / "source.npz"
    np.savez(path, images=source.images, labels=source.labels)
    return path


def test_a_build_stopped_by_sigterm_resumes_where_it_stopped(
    clip, source, saved_source, tmp_path, calls, capsys
):
    """SIGTERM after chunk 1's rows are written, before its checksum: the process says so in
    one line, keeps chunk 0, and the next build computes chunks 1 and 2 only; the result equals
    a build that was never stopped."""
    path = tmp_path / "cache"
    stopped = _build_in_subprocess(
        clip,
        saved_source,
        path,
        """
        real, n = teacher_cache._chunk_digest, [0]
        def digest(*args):  # a fresh build calls it once per chunk written, in order
            n[0] += 1
            if n[0] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args)
        teacher_cache._chunk_digest = digest
    """,
    )
    assert stopped.returncode == 1, stopped.stderr
    assert (
        "the test stopped by SIGTERM before training began; run the same command again"
        in stopped.stderr
        and "Traceback" not in stopped.stderr
    ), stopped.stderr
    resumed = embeddings(build(clip, source, path))
    assert "resuming the teacher cache build (1 chunks done)" in capsys.readouterr().out
    assert calls["chunks"] == [[1, 2]]
    np.testing.assert_array_equal(resumed, embeddings(build(clip, source, tmp_path / "whole")))


def test_a_full_disk_is_one_line_naming_the_file_and_size(clip, saved_source, tmp_path):
    """The file size limit (RLIMIT_FSIZE) refuses the cache's blocks as a full disk would:
    reserved before any row is written, so the refusal is an error naming the file and the
    size, not a SIGBUS from a memory-mapped write; nothing is left behind."""
    path = tmp_path / "cache"
    full = _build_in_subprocess(
        clip,
        saved_source,
        path,
        """
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    """,
    )
    assert full.returncode == 2, full.stderr
    err = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in full.stderr, full.stderr
    assert (
        f"no space left to write the teacher cache {path / teacher_cache.EMBEDDINGS}: it "
        "needs about 2.5 KiB"
        in err[0]
        and "teacher_cache_dir" in err[0]
    ), err
    assert not (path / teacher_cache.EMBEDDINGS).exists()

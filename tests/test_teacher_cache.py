"""Teacher cache: cached embeddings equal the online teacher on the regenerated view; the cache
is reused only when its key matches and it is complete."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from pand_jax import data as data_lib
from pand_jax.train import demo
from pand_jax.data import augment, pipeline
from pand_jax.data.sources import ArraySource
from pand_jax.models.clip import CLIP
from pand_jax import devices
from pand_jax.train import teacher_cache

N, VIEWS, SEED, HOST, SIZE, RECIPE = 10, 2, 3, 36, 32, "rrc"
KEY = {"teacher": "random-demo-clip", "dataset": "digits", "split": "train", "data_dir": None}


@pytest.fixture(scope="module")
def clip():
    """The demo CLIP with random weights drawn by NumPy (compiling JAX's initialisers for every
    layer shape would cost more CPU than the rest of this file)."""
    cfg = demo.teacher_config(demo.demo_config()["teacher"])
    model = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)

    def draw(path, x):
        centre = 1.0 if "['scale']" in jax.tree_util.keystr(path) else 0.0  # LayerNorm scales
        return (centre + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.state(model)))
    return model


@pytest.fixture(scope="module")
def source():
    train = data_lib.load_split("digits", "train")
    return ArraySource(train.images[:N], train.labels[:N], name="digits-train-head")


@pytest.fixture
def calls(monkeypatch):
    """Counts the teacher passes (builds) so reuse is observable."""
    count = {"n": 0}
    compute = teacher_cache._compute

    def counted(*args, **kwargs):
        count["n"] += 1
        return compute(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "_compute", counted)
    return count


def build(clip, source, path, **overrides):
    # batch 4 over 10 examples: the last batch is padded, which the cache must drop.
    args = dict(views=VIEWS, seed=SEED, recipe=RECIPE, host_image_size=HOST, image_size=SIZE,
                batch_size=4, mesh=devices.make_mesh(), path=path, key=KEY)
    return teacher_cache.build(clip, source, **{**args, **overrides})


@pytest.fixture(scope="module")
def online(clip, source):
    """The teacher on the views the trainer regenerates: [N, V, D] fp32."""
    host = np.stack([pipeline.resize_image(source[i]["image"], HOST, "stretch") for i in range(N)])
    encode = devices.jit_apply(clip, lambda m, keys: m.encode_image(augment.augment(host, keys, RECIPE, SIZE)))
    return np.stack([np.asarray(encode(augment.example_keys(SEED, np.arange(N), v)))
                     for v in range(VIEWS)], 1)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_cached_equals_online_teacher(clip, source, online, tmp_path, dtype, rtol):
    cache = build(clip, source, tmp_path, dtype=dtype)
    expected = online
    assert cache.shape == (N, VIEWS, clip.config.embed_dim)
    got = np.asarray(cache, np.float32)
    err = np.linalg.norm(got - expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert err.max() < rtol, err.max()
    # The views differ, so a mix-up of views or examples would show above.
    assert not np.allclose(expected[:, 0], expected[:, 1], rtol=0.05)


def test_reused_when_key_matches(clip, source, tmp_path, calls):
    first = np.asarray(build(clip, source, tmp_path), np.float32)
    second = np.asarray(build(clip, source, tmp_path), np.float32)
    assert calls["n"] == 1
    np.testing.assert_array_equal(first, second)


def test_rebuilt_when_key_changes(clip, source, tmp_path, calls, capsys):
    build(clip, source, tmp_path)
    changes = [{"key": dict(KEY, teacher="another-teacher")}, {"seed": SEED + 1},
               {"recipe": "released"}, {"views": VIEWS + 1}]
    for n, change in enumerate(changes, 2):
        cache = build(clip, source, tmp_path, **change)
        assert calls["n"] == n, change
        assert "another teacher, dataset, split or augmentation" in capsys.readouterr().out
        assert cache.shape[1] == change.get("views", VIEWS)


def _drop_complete_flag(path):
    meta = json.loads((path / teacher_cache.META).read_text())
    (path / teacher_cache.META).write_text(json.dumps(dict(meta, complete=False)))


def _truncate(path):
    f = path / teacher_cache.EMBEDDINGS
    f.write_bytes(f.read_bytes()[:-100])


def _drop_meta(path):
    (path / teacher_cache.META).unlink()


def test_rebuilt_when_partial(clip, source, tmp_path, calls, capsys):
    expected = np.asarray(build(clip, source, tmp_path), np.float32)
    for n, damage in enumerate([_drop_complete_flag, _truncate, _drop_meta], 2):
        damage(tmp_path)
        again = np.asarray(build(clip, source, tmp_path), np.float32)
        assert calls["n"] == n, damage.__name__
        assert "partial" in capsys.readouterr().out
        np.testing.assert_array_equal(again, expected)
        assert json.loads((tmp_path / teacher_cache.META).read_text())["complete"] is True


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

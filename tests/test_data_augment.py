"""On-device augmentation: determinism by key, parameter ranges, torchvision agreement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from pand_jax.data import augment as A

# The functions under test compiled whole, as `augment` runs them in training. Called eagerly,
# each of their hundreds of small ops compiles on its own: that was most of these tests' time
# with a cold compilation cache.
sample_params = jax.jit(A.sample_params, static_argnums=(1, 2, 3))
apply_params = jax.jit(A.apply_params, static_argnums=(2, 3))
crop_resize = jax.jit(A._crop_resize, static_argnums=2)


def _images(b=4, s=40, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 255, (b, s, s, 3), dtype=np.uint8))


def test_normalisation_constants():
    assert np.allclose(A.CLIP_MEAN, [0.48145466, 0.4578275, 0.40821073])
    assert np.allclose(A.CLIP_STD, [0.26862954, 0.26130258, 0.27577711])
    x = A.normalize(jnp.full((1, 1, 1, 3), 255, jnp.uint8))
    assert np.allclose(x[0, 0, 0], (1 - A.CLIP_MEAN) / A.CLIP_STD)


def test_example_keys_fold_seed_index_view():
    keys = A.example_keys(7, jnp.array([3, 4]), 2)
    ref = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), 4), 2)
    assert keys.shape == (2, 2) and np.array_equal(keys[1], ref)
    assert np.array_equal(A.example_keys(7, 4, 2), ref)


@pytest.mark.parametrize("recipe", ["released", "rrc", A.MIXUP])
def test_same_key_bit_identical_other_view_differs(recipe):
    imgs = _images()
    idx = jnp.arange(4)
    partners = _images(seed=9) if recipe == A.MIXUP else None

    def view(v, rows=slice(None)):
        extra = None if partners is None else partners[rows]
        return A.augment(
            imgs[rows], A.example_keys(0, idx[rows], v), recipe, 32, partner_images=extra
        )

    a, b, c = view(1), view(1), view(2)
    assert a.shape == (4, 32, 32, 3) and a.dtype == jnp.float32 and bool(jnp.isfinite(a).all())
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert all(not np.array_equal(a[i], c[i]) for i in range(4))
    # an example's view does not depend on its batch neighbours
    assert np.allclose(view(1, slice(2, 3))[0], a[2], atol=1e-5)


def test_released_parameter_ranges():
    keys = A.example_keys(0, jnp.arange(2000), 0)
    p = jax.tree.map(np.asarray, sample_params(keys, "released", 256, 224))
    assert ((p["crop"] >= 0) & (p["crop"] <= 32)).all()
    assert p["side"].min() == 192 and p["side"].max() == 224
    assert ((p["offset"] >= 0) & (p["offset"] + p["side"][:, None] <= 224)).all()
    assert (np.abs(p["angle"]) <= 60).all() and np.abs(p["angle"]).max() > 55
    assert ((p["sigma"] >= 1e-5) & (p["sigma"] <= 10)).all()
    assert ((p["brightness"] >= 0.7) & (p["brightness"] <= 1.3)).all()
    for k in ("contrast", "saturation"):
        assert ((p[k] >= 0.9) & (p[k] <= 1.1)).all()
    assert (np.abs(p["hue"]) <= 0.1).all()
    assert (np.sort(p["jitter_order"], axis=1) == np.arange(4)).all()
    assert 0.45 < p["flip"].mean() < 0.55
    region = p["region"]  # source-pixel square inside the image
    assert (region[:, :2] >= 0).all() and (region[:, :2] + region[:, 2:] <= 256 + 1e-3).all()


def test_rrc_parameter_ranges():
    keys = A.example_keys(1, jnp.arange(2000), 0)
    p = jax.tree.map(np.asarray, sample_params(keys, "rrc", 64, 32))
    y, x, h, w = p["region"].T
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= 64).all() and (x + w <= 64).all()
    frac, ratio = h * w / 64**2, w / h
    assert (frac >= 0.08 - 0.02).all() and (frac <= 1.0).all()
    assert ((ratio >= 0.75 - 0.05) & (ratio <= 4 / 3 + 0.05)).all()


def test_eval_is_normalise_only_at_native_size_and_matches_pil_resize():
    imgs = _images(2, 64)
    keys = A.example_keys(0, jnp.arange(2), 0)
    assert np.allclose(A.augment(imgs, keys, "eval", 64), A.normalize(imgs), atol=1e-6)
    out = np.asarray(A.augment(imgs, keys, "eval", 48)) * A.CLIP_STD + A.CLIP_MEAN
    pil = (
        np.stack(
            [
                np.asarray(Image.fromarray(np.asarray(i)).resize((48, 48), Image.BILINEAR))
                for i in imgs
            ]
        )
        / 255.0
    )
    # PIL rounds to uint8 (fixed-point weights): at most one grey level apart, mostly less.
    assert np.abs(out - pil).max() <= 1 / 255 + 1e-6 and np.abs(out - pil).mean() < 0.5 / 255


def test_unknown_recipe_and_bad_shape():
    keys = A.example_keys(0, jnp.arange(4), 0)
    with pytest.raises(ValueError, match="recipe 'autoaugment'"):
        A.augment(_images(), keys, "autoaugment", 32)
    with pytest.raises(ValueError, match="'mixup' recipe, and only it, reads partner images"):
        A.augment(_images(), keys, A.MIXUP, 32)
    with pytest.raises(ValueError, match="'mixup' recipe, and only it, reads partner images"):
        A.augment(_images(), keys, "rrc", 32, partner_images=_images())
    with pytest.raises(ValueError, match="partner images"):
        A.augment(_images(), keys, A.MIXUP, 32, partner_images=_images(s=36))
    with pytest.raises(ValueError, match=r"\[B, S, S, 3\]"):
        A.augment(
            jnp.zeros((2, 8, 9, 3), jnp.uint8), A.example_keys(0, jnp.arange(2), 0), "eval", 8
        )


# ------------------------------------------------------------ pieces vs torchvision (float tensors)


def _float_image(s=33, seed=1):
    return np.random.default_rng(seed).random((s, s, 3), dtype=np.float32)


def _torch(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def test_rotation_matches_torchvision():
    x = _float_image()
    for angle in (37.0, -60.0):
        ours = np.asarray(A._rotate_flip(jnp.asarray(x), angle, False))
        ref = (
            TF.rotate(_torch(x), angle, interpolation=TF.InterpolationMode.BILINEAR)
            .numpy()
            .transpose(1, 2, 0)
        )
        assert np.abs(ours - ref).max() < 1e-4
    flipped = np.asarray(A._rotate_flip(jnp.asarray(x), 20.0, True))
    ref = (
        TF.hflip(TF.rotate(_torch(x), 20.0, interpolation=TF.InterpolationMode.BILINEAR))
        .numpy()
        .transpose(1, 2, 0)
    )
    assert np.abs(flipped - ref).max() < 1e-4


@pytest.mark.parametrize("size", [33, 224])
def test_blur_matches_torchvision(size):
    """The blur as two [n, n] matrices with the reflect padding folded in, against
    torchvision's padded 5x5 convolution (at the recipe's 224 px too)."""
    x = _float_image(size)
    for sigma in (1e-5, 0.7, 10.0):
        ours = np.asarray(A._gaussian_blur(jnp.asarray(x), sigma))
        ref = TF.gaussian_blur(_torch(x), [5, 5], [sigma, sigma]).numpy().transpose(1, 2, 0)
        assert np.abs(ours - ref).max() < 1e-5


def test_colour_ops_match_torchvision():
    x = _float_image()
    t = _torch(x)
    pairs = [
        (lambda y: jnp.clip(y * 1.25, 0, 1), TF.adjust_brightness(t, 1.25)),
        (lambda y: A._blend(y, A._grey(y).mean(), 0.92), TF.adjust_contrast(t, 0.92)),
        (lambda y: A._blend(y, A._grey(y)[..., None], 1.08), TF.adjust_saturation(t, 1.08)),
        (lambda y: A._adjust_hue(y, -0.07), TF.adjust_hue(t, -0.07)),
    ]
    for ours, ref in pairs:
        assert (
            np.abs(np.asarray(ours(jnp.asarray(x))) - ref.numpy().transpose(1, 2, 0)).max() < 1e-5
        )


def test_crop_then_square_crop_matches_two_step_reference():
    """The fused crop (RandomCrop then square crop resized back) equals doing both steps."""
    imgs = _images(1, 64)
    keys = A.example_keys(5, jnp.arange(1), 0)
    p = sample_params(keys, "released", 64, 56)
    x = np.asarray(imgs[0], np.float32) / 255.0
    (y0, x0), side, (y2, x2) = (
        np.asarray(p["crop"][0]),
        int(p["side"][0]),
        np.asarray(p["offset"][0]),
    )
    first = x[y0 : y0 + 56, x0 : x0 + 56]
    ref = (
        TF.resize(_torch(first[y2 : y2 + side, x2 : x2 + side]), [56, 56], antialias=True)
        .numpy()
        .transpose(1, 2, 0)
    )
    ours = np.asarray(crop_resize(jnp.asarray(x), p["region"][0], 56))
    assert np.abs(ours - ref).max() < 1e-4


def test_released_crop_matrices_match_torchvision_resized_crop():
    """The released recipe's crops at its real sizes (host 256 -> 224), as interpolation
    matrices, against torchvision's resized_crop (plain bilinear: the crops only enlarge).
    Tolerance: both sides round pixel coordinates near 224 to fp32 (~1.5e-5 each)."""
    imgs = np.asarray(_images(4, 256, seed=6))
    p = sample_params(A.example_keys(6, jnp.arange(4), 0), "released", 256, 224)
    region = np.asarray(p["region"])
    assert (region == region.round()).all() and (region[:, 2] < 224).any()
    crop = jax.jit(jax.vmap(lambda im, r: A._crop_resize(im / 255.0, r, 224)))
    ours = np.asarray(crop(jnp.asarray(imgs, jnp.float32), p["region"]))
    for img, (top, left, h, w), got in zip(imgs, region.astype(int), ours):
        ref = TF.resized_crop(
            _torch(img.astype(np.float32) / 255),
            top,
            left,
            h,
            w,
            [224, 224],
            interpolation=TF.InterpolationMode.BILINEAR,
            antialias=False,
        )
        assert np.abs(got - ref.numpy().transpose(1, 2, 0)).max() < 1e-4


def test_released_recipe_matches_torchvision_chain():
    """Whole released views (sampled params, `apply_params`) against torchvision applying
    the same crop, rotation, flip, blur and colour ops in turn: the stages composed, as
    training runs them. Tolerance 5e-5 (of a [0, 1] pixel): fp32 rounding through the chain."""
    imgs = np.asarray(_images(8, 64, seed=7))
    p = sample_params(A.example_keys(7, jnp.arange(8), 0), "released", 64, 56)
    ours = np.asarray(apply_params(jnp.asarray(imgs), p, "released", 56)) * A.CLIP_STD + A.CLIP_MEAN
    p = jax.tree.map(np.asarray, p)
    assert 0 < p["flip"].sum() < 8 and len({tuple(o) for o in p["jitter_order"]}) >= 4
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    for i, (img, got) in enumerate(zip(imgs, ours)):
        top, left, h, w = p["region"][i].astype(int)
        t = TF.resized_crop(
            _torch(img.astype(np.float32) / 255),
            top,
            left,
            h,
            w,
            [56, 56],
            interpolation=TF.InterpolationMode.BILINEAR,
            antialias=False,
        )
        t = TF.rotate(t, float(p["angle"][i]), interpolation=TF.InterpolationMode.BILINEAR)
        t = TF.hflip(t) if p["flip"][i] else t
        t = TF.gaussian_blur(t, [5, 5], [float(p["sigma"][i])] * 2)
        for op in p["jitter_order"][i]:
            t = ops[op](t, float(p[names[op]][i]))
        assert np.abs(got - t.numpy().transpose(1, 2, 0)).max() < 5e-5, i


def test_colour_jitter_applies_each_examples_order_like_torchvision():
    """Vmapped over all 24 orders: ColorJitter's four ops in that example's order."""
    import itertools

    orders = np.array(list(itertools.permutations(range(4))), np.int32)
    n = len(orders)
    x = np.random.default_rng(2).random((n, 12, 12, 3), dtype=np.float32)
    factors = {"brightness": 1.25, "contrast": 0.92, "saturation": 1.08, "hue": -0.07}
    p = {k: jnp.full((n,), v, jnp.float32) for k, v in factors.items()}
    p["jitter_order"] = jnp.asarray(orders)
    ours = np.asarray(jax.jit(jax.vmap(A._color_jitter))(jnp.asarray(x), p))
    tv_ops = [
        lambda t: TF.adjust_brightness(t, factors["brightness"]),
        lambda t: TF.adjust_contrast(t, factors["contrast"]),
        lambda t: TF.adjust_saturation(t, factors["saturation"]),
        lambda t: TF.adjust_hue(t, factors["hue"]),
    ]
    for image, order, got in zip(x, orders, ours):
        t = _torch(image)
        for op in order:
            t = tv_ops[op](t)
        assert np.abs(got - t.numpy().transpose(1, 2, 0)).max() < 1e-5, order


# --------------------------------------------------------- whole ops vs torchvision, sampled params


def torchvision_rrc(imgs, params) -> np.ndarray:
    """[B, 32, 32, 3] in [0, 1]: torchvision's resized_crop (bilinear, antialiased) and hflip of
    each uint8 image on its sampled region."""
    region, flip = np.asarray(params["region"]).astype(int), np.asarray(params["flip"])
    out = []
    for img, (top, left, h, w), f in zip(np.asarray(imgs), region, flip):
        ref = TF.resized_crop(
            _torch(img.astype(np.float32) / 255),
            top,
            left,
            h,
            w,
            [32, 32],
            interpolation=TF.InterpolationMode.BILINEAR,
            antialias=True,
        )
        out.append((TF.hflip(ref) if f else ref).numpy().transpose(1, 2, 0))
    return np.stack(out)


def test_rrc_with_offset_matches_torchvision_resized_crop():
    """Sampled crops (most off the origin) and flips through `apply_params`, against
    torchvision's resized_crop (bilinear, antialiased) and hflip on the same region."""
    imgs = _images(8, 48, seed=3)
    p = sample_params(A.example_keys(2, jnp.arange(8), 0), "rrc", 48, 32)
    ours = np.asarray(apply_params(imgs, p, "rrc", 32)) * A.CLIP_STD + A.CLIP_MEAN
    region, flip = np.asarray(p["region"]).astype(int), np.asarray(p["flip"])
    assert (region[:, :2] > 0).any(axis=1).sum() >= 6 and 0 < flip.sum() < 8
    assert np.abs(ours - torchvision_rrc(imgs, p)).max() < 1e-5


def test_mixup_is_the_weighted_sum_of_two_torchvision_crops():
    """Function matching's view: w RRC(example) + (1 - w) RRC(partner), each crop torchvision's
    on its own sampled region, w = max(a, 1 - a) from the example's key (1e-5 in [0, 1])."""
    imgs, partners = _images(8, 48, seed=3), _images(8, 48, seed=4)
    keys = A.example_keys(2, jnp.arange(8), 5)
    p = jax.tree.map(np.asarray, sample_params(keys, A.MIXUP, 48, 32))
    ours = (
        np.asarray(A.augment(imgs, keys, A.MIXUP, 32, partner_images=partners)) * A.CLIP_STD
        + A.CLIP_MEAN
    )
    w = p["weight"][:, None, None, None]
    want = w * torchvision_rrc(imgs, p["own"]) + (1 - w) * torchvision_rrc(partners, p["partner"])
    assert np.abs(ours - want).max() < 1e-5
    assert not np.array_equal(p["own"]["region"], p["partner"]["region"])


def test_mixup_weight_and_partner_are_drawn_as_big_vision_draws_them():
    """w = max(a, 1 - a), a ~ Beta(1, 1): uniform on [0.5, 1]; the partner uniform over the
    other examples, a pure function of (seed, index, view). Fixed keys and seeds: the tests'
    p-values are the same on every run."""
    from scipy import stats

    keys = A.example_keys(0, jnp.arange(4000), 0)
    w = np.asarray(sample_params(keys, A.MIXUP, 40, 32)["weight"])
    assert w.min() >= 0.5 and w.max() <= 1.0
    assert stats.kstest(w, "uniform", args=(0.5, 0.5)).pvalue > 1e-3
    n, views = 7, np.arange(6000)
    drawn = A.partners(1, np.full(views.shape, 3), views, n)
    assert drawn.dtype == np.int32 and 3 not in drawn and set(drawn) == {0, 1, 2, 4, 5, 6}
    assert stats.chisquare(np.bincount(drawn, minlength=n)[[0, 1, 2, 4, 5, 6]]).pvalue > 1e-3
    index = np.array([0, 5, -1, 6])
    again = A.partners(1, index, 2, n)
    np.testing.assert_array_equal(again, A.partners(1, index, np.full(4, 2), n))
    assert again[2] == -1 and (again[[0, 1, 3]] != index[[0, 1, 3]]).all()
    other_views = np.stack([A.partners(1, index, v, n) for v in range(20)])
    assert (other_views[:, [0, 1, 3]].std(0) > 0).all()  # the view draws again


def test_rrc_fallback_is_torchvision_central_crop(monkeypatch):
    """When none of the 10 tries fits (scale > 1 here), torchvision falls back to the central
    crop, for a square image the whole image; so must we."""
    from torchvision.transforms import RandomResizedCrop

    monkeypatch.setattr(A, "RRC_SCALE", (1.5, 2.0))
    p = sample_params(A.example_keys(0, jnp.arange(16), 0), "rrc", 40, 32)
    with torch.random.fork_rng(devices=[]):  # get_params draws from the global generator
        torch.manual_seed(0)
        ref = RandomResizedCrop.get_params(torch.zeros(3, 40, 40), [1.5, 2.0], [3 / 4, 4 / 3])
    assert ref == (0, 0, 40, 40)
    np.testing.assert_array_equal(np.asarray(p["region"]), np.tile([0, 0, 40, 40], (16, 1)))


def test_colour_jitter_order_and_factors_match_torchvision():
    """The sampled order and factors, applied by torchvision's ColorJitter semantics (fn_idx
    0..3 = brightness, contrast, saturation, hue), give our jittered image."""
    x = _float_image(24, seed=4)
    keys = A.example_keys(3, jnp.arange(6), 0)
    p = jax.tree.map(np.asarray, sample_params(keys, "released", 32, 24))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    orders = {tuple(o) for o in p["jitter_order"]}
    assert len(orders) >= 4  # several orders exercised
    for i in range(6):
        one = {k: v[i] for k, v in p.items()}
        ref = _torch(x)
        for fn_id in one["jitter_order"]:
            ref = ops[fn_id](ref, float(one[names[fn_id]]))
        ours = np.asarray(A._color_jitter(jnp.asarray(x), one))
        assert np.abs(ours - ref.numpy().transpose(1, 2, 0)).max() < 1e-5

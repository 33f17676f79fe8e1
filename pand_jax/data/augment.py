"""On-device augmentation: jittable, per example (vmapped), keyed by (seed, index, view).

Every random choice of an example comes from `example_keys(seed, index, view)`, so any
augmented view can be regenerated exactly (what a teacher-feature cache relies on).
`sample_params` draws the parameters and `apply_params` applies them, so tests can check
the parameter ranges. Recipes:
- "released": the released code's Stage-NSD train transform: Resize 256, RandomCrop 224, a
  random square crop of side U{192..224} resized back to 224, RandomRotation(60), GaussianBlur
  (kernel 5, sigma U[1e-5, 10]), ColorJitter(0.3, 0.1, 0.1, 0.1), horizontal flip.
- "rrc": RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + horizontal flip.
- "mixup": function matching's view (Beyer et al., CVPR 2022; big_vision's distill configs):
  "rrc" of the example and "rrc" of a partner example, mixed with weight max(a, 1 - a),
  a ~ Beta(1, 1). The partner is drawn on the host (`partners`) from the same (seed, index,
  view) as the rest, and comes with the batch; the weight and both crops come from the key.
- "eval": resize to out_size when the host size differs; no randomness.
All end with CLIP mean/std normalisation. Inputs are uint8 [B, S, S, 3] from the host.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
RECIPES = ("released", "rrc", "mixup", "eval")
MIXUP = "mixup"  # the recipe that reads a partner image per example
MIXUP_P = 1.0  # a ~ Beta(p, p): big_vision's `config.mixup = dict(p=1.0, n=2)`
PARTNER_STREAM = 11  # the partner draw's own seed word, apart from every other host draw
ROTATION_DEG = 60.0
BLUR_KERNEL, BLUR_SIGMA = 5, (1e-5, 10.0)
JITTER = {"brightness": 0.3, "contrast": 0.1, "saturation": 0.1, "hue": 0.1}
RRC_SCALE, RRC_RATIO, RRC_TRIES = (0.08, 1.0), (3 / 4, 4 / 3), 10
_GREY = np.array([0.2989, 0.587, 0.114], np.float32)  # torchvision rgb_to_grayscale


def normalize(images: jax.Array) -> jax.Array:
    """uint8 (or float in [0, 255]) images -> float32 with CLIP mean/std."""
    return (jnp.asarray(images, jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def example_keys(seed, index, view) -> jax.Array:
    """fold_in(fold_in(PRNGKey(seed), index), view); index/view scalars or broadcastable arrays."""
    index, view = jnp.broadcast_arrays(jnp.asarray(index, jnp.int32), jnp.asarray(view, jnp.int32))
    base = jax.random.PRNGKey(seed)

    def fold(i, v):
        return jax.random.fold_in(jax.random.fold_in(base, i), v)

    flat = jax.vmap(fold)(index.ravel(), view.ravel())
    return flat.reshape(index.shape + flat.shape[1:])


def partners(seed: int, index, view, num_examples: int) -> np.ndarray:
    """int32 like `index`: the partner "mixup" mixes example `index` with at `view`, uniform
    over the other examples; a pure function of (seed, index, view), so a cached view's
    partner is drawn again exactly. -1 where `index` is -1 (a padding row).

    On the host, because the host reads the partner's image; NumPy's seeded generators give
    one independent draw per (seed, index, view) without a key array on the host."""
    index, view = np.broadcast_arrays(np.asarray(index), np.asarray(view))
    out = np.full(index.shape, -1, np.int32)
    others = max(num_examples - 1, 1)
    for pos in zip(*np.nonzero(index >= 0)):
        i = int(index[pos])
        r = np.random.default_rng([PARTNER_STREAM, seed, i, int(view[pos])]).integers(others)
        out[pos] = (i + 1 + r) % num_examples
    return out


# ---------------------------------------------------------------- parameters


def _released_params(key, in_size: int, out_size: int) -> dict:
    k = jax.random.split(key, 11)
    crop = round(in_size * 224 / 256)  # RandomCrop(224) after Resize(256), scaled to the host size
    y0, x0 = jax.random.randint(k[0], (2,), 0, in_size - crop + 1)
    side = jax.random.randint(k[1], (), round(out_size * 192 / 224), out_size + 1)
    y2, x2 = jax.random.randint(k[2], (2,), 0, out_size - side + 1)
    scale = crop / out_size  # source pixels per pixel of the first crop's output grid
    return {
        "region": jnp.stack([y0 + y2 * scale, x0 + x2 * scale, side * scale, side * scale]),
        "crop": jnp.stack([y0, x0]),
        "side": side,
        "offset": jnp.stack([y2, x2]),
        "angle": jax.random.uniform(k[3], (), minval=-ROTATION_DEG, maxval=ROTATION_DEG),
        "sigma": jax.random.uniform(k[4], (), minval=BLUR_SIGMA[0], maxval=BLUR_SIGMA[1]),
        "brightness": _jitter(k[5], JITTER["brightness"]),
        "contrast": _jitter(k[6], JITTER["contrast"]),
        "saturation": _jitter(k[7], JITTER["saturation"]),
        "hue": jax.random.uniform(k[8], (), minval=-JITTER["hue"], maxval=JITTER["hue"]),
        "jitter_order": jax.random.permutation(k[9], 4),
        "flip": jax.random.bernoulli(k[10]),
    }


def _jitter(key, amount: float):
    return jax.random.uniform(key, (), minval=max(0.0, 1 - amount), maxval=1 + amount)


def _rrc_params(key, in_size: int, out_size: int) -> dict:
    """torchvision RandomResizedCrop.get_params: 10 tries, else the whole (square) image."""
    k = jax.random.split(key, 5)
    area = in_size * in_size
    target = area * jax.random.uniform(k[0], (RRC_TRIES,), minval=RRC_SCALE[0], maxval=RRC_SCALE[1])
    log_r = jax.random.uniform(
        k[1], (RRC_TRIES,), minval=math.log(RRC_RATIO[0]), maxval=math.log(RRC_RATIO[1])
    )
    ratio = jnp.exp(log_r)
    w = jnp.round(jnp.sqrt(target * ratio))
    h = jnp.round(jnp.sqrt(target / ratio))
    ok = (w > 0) & (w <= in_size) & (h > 0) & (h <= in_size)
    first = jnp.argmax(ok)
    any_ok = ok.any()
    h = jnp.where(any_ok, h[first], in_size)
    w = jnp.where(any_ok, w[first], in_size)
    u = jax.random.uniform(k[2], (2,))
    y = jnp.floor(u[0] * (in_size - h + 1))
    x = jnp.floor(u[1] * (in_size - w + 1))
    return {"region": jnp.stack([y, x, h, w]), "flip": jax.random.bernoulli(k[3])}


def _mixup_params(key, in_size: int, out_size: int) -> dict:
    """Both crops and the weight of the example (big_vision's mixup keeps the larger share on
    the example itself: its Dirichlet weights sorted, first the example's)."""
    k = jax.random.split(key, 3)
    a = jax.random.beta(k[2], MIXUP_P, MIXUP_P)
    return {
        "own": _rrc_params(k[0], in_size, out_size),
        "partner": _rrc_params(k[1], in_size, out_size),
        "weight": jnp.maximum(a, 1 - a),
    }


def sample_params(keys: jax.Array, recipe: str, in_size: int, out_size: int) -> dict:
    """Per-example augmentation parameters, each an array with leading dim B."""
    if recipe == MIXUP:
        return jax.vmap(lambda k: _mixup_params(k, in_size, out_size))(keys)
    if recipe == "released":
        return jax.vmap(lambda k: _released_params(k, in_size, out_size))(keys)
    if recipe == "rrc":
        return jax.vmap(lambda k: _rrc_params(k, in_size, out_size))(keys)
    if recipe == "eval":
        region = jnp.asarray([0.0, 0.0, in_size, in_size], jnp.float32)
        return {"region": jnp.broadcast_to(region, (keys.shape[0], 4))}
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")


# ---------------------------------------------------------------- geometry


def _resize_weights(start, length, in_size: int, out_size: int):
    """[out_size, in_size] weights resizing source pixels [start, start + length) to out_size:
    torchvision's antialiased bilinear (PIL's triangle filter, widened by the shrink factor),
    cut at the crop's edges and renormalised there, as resizing an already-cropped image does.

    Written out because jax.image.scale_and_translate filters across the crop's edges (it sees
    the whole image), which changed the border pixels of every crop by up to ~0.3.
    """
    scale = length / out_size
    support = jnp.maximum(scale, 1.0)
    centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    pixel = jnp.arange(in_size, dtype=jnp.float32)
    w = jnp.maximum(0.0, 1.0 - jnp.abs(pixel + 0.5 - centre[:, None]) / support)
    w = jnp.where((pixel >= start) & (pixel < start + length), w, 0.0)
    return w / w.sum(axis=1, keepdims=True)


def _crop_resize(image, region, out_size: int):
    """Crop `region` = (top, left, height, width) in source pixels and resize to out_size
    (torchvision `resized_crop`, bilinear, antialiased: plain bilinear where it enlarges)."""
    wy = _resize_weights(region[0], region[2], image.shape[0], out_size)
    wx = _resize_weights(region[1], region[3], image.shape[1], out_size)
    return _separable(wy, image, wx)


def _separable(wy, image, wx):
    """[O, H] x [H, W, C] x [P, W] -> [O, P, C]: a separable filter as two matmuls.

    Matrices, though the crop's and the blur's are mostly zeros, because XLA fuses gathers and
    shifted slices into their consumers and recomputes them there: crop, rotation and blur as
    gathers and slices ran as one loop re-evaluating the crop's taps for every tap of the
    rotation, several times slower on CPU than the same stages apart. A dot's operands and
    result are materialised, so each stage runs once; the matmuls cost less than that on CPU
    and next to nothing on an accelerator. HIGHEST: no TF32/bf16 passes on GPU/TPU."""
    return jnp.einsum("oh,hwc,pw->opc", wy, image, wx, precision=jax.lax.Precision.HIGHEST)


def _sample_bilinear(image, y, x):
    """Bilinear lookup at float pixel coordinates; neighbours outside the image count as 0."""
    h, w = image.shape[:2]
    y0, x0 = jnp.floor(y), jnp.floor(x)
    out = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            wgt = (1 - jnp.abs(y - yy)) * (1 - jnp.abs(x - xx))
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            px = image[
                jnp.clip(yy, 0, h - 1).astype(jnp.int32), jnp.clip(xx, 0, w - 1).astype(jnp.int32)
            ]
            out = out + jnp.where(inside, wgt, 0.0)[..., None] * px
    return out


def _rotate_flip(image, angle_deg, flip):
    """RandomRotation (counter-clockwise for positive angles, about the centre, black fill)
    followed by an optional horizontal flip, as one inverse mapping of output pixels."""
    n = image.shape[0]
    c = (n - 1) / 2.0
    i, j = jnp.meshgrid(
        jnp.arange(n, dtype=jnp.float32), jnp.arange(n, dtype=jnp.float32), indexing="ij"
    )
    j = jnp.where(flip, n - 1 - j, j)
    dy, dx = i - c, j - c
    t = jnp.deg2rad(angle_deg)
    src_x = jnp.cos(t) * dx - jnp.sin(t) * dy + c
    src_y = jnp.sin(t) * dx + jnp.cos(t) * dy + c
    return _sample_bilinear(image, src_y, src_x)


# ---------------------------------------------------------------- photometric


def _gaussian_blur(image, sigma):
    """torchvision gaussian_blur: separable 5-tap kernel on linspace(-2, 2), reflect padding."""
    weights = _blur_weights(sigma, image.shape[0])
    return _separable(weights, image, weights)


def _blur_weights(sigma, n: int):
    """[n, n]: the blur along one axis with torchvision's reflect padding folded in (output
    pixel i takes kernel tap t from pixel i + t - 2, reflected at the edges)."""
    half = BLUR_KERNEL // 2
    taps = jnp.linspace(-half, half, BLUR_KERNEL)
    kernel = jnp.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    src = jnp.abs(jnp.arange(n)[:, None] + jnp.arange(-half, half + 1))  # reflect at 0
    src = jnp.where(src > n - 1, 2 * (n - 1) - src, src)  # and at n - 1
    return (kernel[:, None] * jax.nn.one_hot(src, n, dtype=kernel.dtype)).sum(1)


def _grey(image):
    # Elementwise like torchvision, not `image @ _GREY`: XLA ends a fusion at a dot, which made
    # each colour op its own pass over the image in memory.
    return image[..., 0] * _GREY[0] + image[..., 1] * _GREY[1] + image[..., 2] * _GREY[2]


def _blend(a, b, factor):
    return jnp.clip(factor * a + (1 - factor) * b, 0.0, 1.0)


def _rgb_to_hsv(rgb):
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = rgb.max(-1), rgb.min(-1)
    v, delta = maxc, maxc - minc
    s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
    safe = jnp.where(delta > 0, delta, 1.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return h, s, v


def _hsv_to_rgb(h, s, v):
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(jnp.int32) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    chans = [jnp.select([i == k for k in range(6)], [c[ch] for c in choices]) for ch in range(3)]
    return jnp.stack(chans, -1)


def _adjust_hue(image, shift):
    h, s, v = _rgb_to_hsv(image)
    return _hsv_to_rgb((h + shift) % 1.0, s, v)


def _color_jitter(image, p):
    """ColorJitter: brightness, contrast, saturation, hue in a random order (torchvision).

    Under vmap a `lax.switch` per position computes all four ops at each of the four positions;
    hue (an HSV round trip) dominates, so it runs once, between the cheap ops that precede it
    in this example's order and those that follow (the same ops in the same order)."""
    cheap = [
        lambda x: jnp.clip(x * p["brightness"], 0.0, 1.0),
        lambda x: _blend(x, _grey(x).mean(), p["contrast"]),
        lambda x: _blend(x, _grey(x)[..., None], p["saturation"]),
        lambda x: x,  # hue's position
    ]
    order = p["jitter_order"]
    hue_at = jnp.argmax(order == 3)
    for k in range(4):
        image = jax.lax.switch(jnp.where(k < hue_at, order[k], 3), cheap, image)
    image = _adjust_hue(image, p["hue"])
    for k in range(4):
        image = jax.lax.switch(jnp.where(k > hue_at, order[k], 3), cheap, image)
    return image


# ---------------------------------------------------------------- recipes


def _apply_one(image, p, recipe: str, out_size: int):
    x = jnp.asarray(image, jnp.float32) / 255.0
    if recipe == "eval":
        return (
            x
            if x.shape[0] == out_size
            else jnp.clip(_crop_resize(x, p["region"], out_size), 0.0, 1.0)
        )
    if recipe == "rrc":
        x = jnp.clip(_crop_resize(x, p["region"], out_size), 0.0, 1.0)
        return jnp.where(p["flip"], x[:, ::-1], x)
    x = _rotate_flip(_crop_resize(x, p["region"], out_size), p["angle"], p["flip"])
    x = _gaussian_blur(x, p["sigma"])
    return _color_jitter(x, p)


def apply_params(
    images, params: dict, recipe: str, out_size: int, *, partner_images=None
) -> jax.Array:
    """uint8 [B,S,S,3] + sampled params (+ the partners' images for "mixup") -> float32
    [B,out,out,3], CLIP-normalised."""
    if recipe == MIXUP:  # mixing after the normalisation: an affine map keeps convex mixtures
        own = apply_params(images, params["own"], "rrc", out_size)
        other = apply_params(partner_images, params["partner"], "rrc", out_size)
        weight = params["weight"][:, None, None, None]
        return weight * own + (1 - weight) * other
    x = jax.vmap(lambda im, p: _apply_one(im, p, recipe, out_size))(images, params)
    return (x - CLIP_MEAN) / CLIP_STD


@functools.partial(jax.jit, static_argnames=("recipe", "out_size"))
def augment(images, keys, recipe: str, out_size: int, *, partner_images=None) -> jax.Array:
    """uint8 [B,S,S,3], keys [B,2] (from `example_keys`) -> float32 [B,out,out,3]. "mixup"
    reads `partner_images`, the images [B,S,S,3] of `partners(seed, index, view, N)`."""
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[-1] != 3:
        raise ValueError(f"expected square uint8 images [B, S, S, 3], got shape {images.shape}")
    if (recipe == MIXUP) != (partner_images is not None):
        raise ValueError(f"the {MIXUP!r} recipe, and only it, reads partner images")
    if partner_images is not None and partner_images.shape != images.shape:
        raise ValueError(
            f"partner images {partner_images.shape} must match the images {images.shape}"
        )
    params = sample_params(keys, recipe, images.shape[1], out_size)
    return apply_params(images, params, recipe, out_size, partner_images=partner_images)


def eval_transform(images, out_size: int) -> jax.Array:
    """The deterministic "eval" recipe, which needs no keys: resize to out_size when the host
    size differs (NSD test: host 224 -> 224, a no-op), then CLIP normalisation."""
    no_keys = jnp.zeros((images.shape[0], 2), jnp.uint32)
    return augment(images, no_keys, "eval", out_size)

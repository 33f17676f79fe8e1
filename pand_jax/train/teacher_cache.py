"""Stage-NSD teacher cache: the frozen teacher's image embeddings of V augmented views of every
training example, computed once, so training runs at student speed.

Augmentation is a pure function of (seed, example index, view) (`augment.example_keys`), so
the trainer can regenerate on device exactly the view whose embedding it reads from here:

    cache = build(clip, source, views=V, ...)        # [N, V, D], memory-mapped
    view = views_for_epoch(seed, epoch, N, V)[index]  # per example of a batch
    teacher = cache[index, view]                      # host gather, bf16 -> fp32 on device

On disk under `path`: `embeddings.npy` ([N, V, D]; bfloat16 is stored as its uint16 bit
pattern because .npy has no bfloat16, and read back as an `ml_dtypes.bfloat16` view) and
`meta.json` (the key, its digest, the shape, and a "complete" flag written last). A cache is
reused only when it is complete, its digest matches and the array reads back with the expected
shape; otherwise it is rebuilt with a message.

Multi-process runs: every process computes its slice of each global batch, process 0 writes,
and all processes then read the same file, so `path` must be on a filesystem every process sees.
"""
from __future__ import annotations

import functools
import inspect
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from pand_jax.config import write_json
from pand_jax.data import augment, pipeline
from pand_jax.devices import replicate, to_global
from pand_jax.progress import progress_bar
from pand_jax.train import features

VERSION = 1
EMBEDDINGS, META = "embeddings.npy", "meta.json"
NO_CACHE = "no cache yet"
# Storage dtype name -> (dtype the device casts to, dtype of the .npy on disk).
DTYPES = {"bfloat16": (jnp.bfloat16, np.uint16), "float32": (jnp.float32, np.float32)}
# Any edit to the augmentation code may change the views, so the cache key covers its source.
AUGMENT_DIGEST = features.cache_key(source=inspect.getsource(augment))


def views_for_epoch(seed: int, epoch: int, num_examples: int, views: int) -> np.ndarray:
    """int32 [N]: the cached view each example uses in `epoch`, uniform over [0, views)."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    rng = np.random.default_rng([seed, epoch, 7])  # 7: a stream apart from the batch order's
    return rng.integers(0, views, num_examples, dtype=np.int32)


def build(clip, source, *, views: int, seed: int, recipe: str, host_image_size: int,
          image_size: int, batch_size: int, mesh, path: pathlib.Path, key: dict[str, Any],
          dtype: str = "bfloat16") -> np.ndarray:
    """The cache [N, V, D] of `clip.encode_image` (unnormalised) on view v of example i,
    `augment.augment(host image, example_keys(seed, i, v), recipe, image_size)`, for every
    example of `source` (index = position) and view; built or reused (module docstring).

    `key` names what the caller knows the embeddings depend on (teacher id, dataset, split,
    data_dir); the arguments that shape the views are added to it here.
    """
    if views < 1:
        raise ValueError(f"the teacher cache needs views >= 1, got {views}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; expected one of {list(DTYPES)}")
    path = pathlib.Path(path)
    shape = (len(source), views, clip.config.embed_dim)
    full_key = dict(key, views=views, seed=seed, recipe=recipe, host_image_size=host_image_size,
                    image_size=image_size, num_examples=shape[0], dtype=dtype,
                    augment=AUGMENT_DIGEST, version=VERSION)
    digest = features.cache_key(**full_key)
    is_main = jax.process_index() == 0

    reason = _stale_reason(path, digest, shape, dtype)
    # Every process has decided before process 0 starts overwriting anything.
    multihost_utils.sync_global_devices("teacher_cache: checked")
    if reason is not None:
        if is_main:
            stale = "" if reason == NO_CACHE else "warning: stale cache, re"
            print(f"{stale}building the teacher cache in {path} ({reason}): {shape[0]} examples "
                  f"x {views} views", flush=True)
        _compute(clip, source, views=views, seed=seed, recipe=recipe,
                 host_image_size=host_image_size, image_size=image_size, batch_size=batch_size,
                 mesh=mesh, path=path, meta=dict(key=full_key, digest=digest,
                                                 shape=list(shape), dtype=dtype))
        multihost_utils.sync_global_devices("teacher_cache: written")
        reason = _stale_reason(path, digest, shape, dtype)
        if reason is not None:
            raise RuntimeError(f"the teacher cache in {path} is not readable after it was built "
                               f"({reason}); with several processes, {path} must be on a "
                               "filesystem that all of them share")
    return _open(path, dtype)


def _stale_reason(path: pathlib.Path, digest: str, shape: tuple, dtype: str) -> str | None:
    """Why the cache under `path` cannot be reused, or None when it can."""
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        return NO_CACHE if not (path / EMBEDDINGS).exists() else "partial: no meta.json"
    except (OSError, ValueError) as e:
        return f"unreadable meta.json ({type(e).__name__})"
    if meta.get("digest") != digest:
        return "it was made for another teacher, dataset, split or augmentation setting"
    if not meta.get("complete"):
        return "partial: an earlier build did not finish"
    try:
        stored = _open(path, dtype)
    except (OSError, ValueError) as e:  # a truncated file fails to map
        return f"partial: embeddings.npy unreadable ({e})"
    if stored.shape != shape:
        return f"partial: embeddings.npy has shape {stored.shape}, expected {shape}"
    return None


def _open(path: pathlib.Path, dtype: str) -> np.ndarray:
    stored = np.load(path / EMBEDDINGS, mmap_mode="r")
    return stored.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else stored


def _write_meta(path: pathlib.Path, meta: dict[str, Any]) -> None:
    write_json(path / META, meta, default=str)


@functools.partial(jax.jit, static_argnames=("graphdef", "seed", "recipe", "image_size", "dtype"))
def _encode(state, images, index, view, *, graphdef, seed, recipe, image_size, dtype):
    """Teacher embeddings [B, D] of view `view` of a batch, cast to the storage dtype on device.

    Module-level so that rebuilds with the same teacher and settings reuse the compiled program;
    the teacher state is an argument, never a baked-in constant."""
    # Padding rows carry index -1; any valid key will do, their rows are dropped.
    keys = augment.example_keys(seed, jnp.maximum(index, 0), view)
    images = augment.augment(images, keys, recipe, image_size)
    teacher = nnx.merge(graphdef, state, copy=True)
    return teacher.encode_image(images).astype(DTYPES[dtype][0])


def _compute(clip, source, *, views, seed, recipe, host_image_size, image_size, batch_size,
             mesh, path, meta) -> None:
    """Runs the teacher over every (example, view) and writes the rows as they arrive."""
    disk_dtype = DTYPES[meta["dtype"]][1]
    is_main = jax.process_index() == 0
    loader = pipeline.Loader(source, global_batch_size=batch_size, image_size=host_image_size,
                             resize="stretch", train=False, seed=seed)

    graphdef, state = nnx.split(clip)
    state = replicate(mesh, state)
    static = dict(graphdef=graphdef, seed=seed, recipe=recipe, image_size=image_size,
                  dtype=meta["dtype"])
    out = None
    if is_main:
        path.mkdir(parents=True, exist_ok=True)
        _write_meta(path, dict(meta, complete=False))  # a crash from here on leaves it partial
        out = np.lib.format.open_memmap(path / EMBEDDINGS, mode="w+", dtype=disk_dtype,
                                        shape=tuple(meta["shape"]))

    def write(pending):
        # Gathering every host's rows; process_allgather waits for the device work.
        emb, index, mask = multihost_utils.process_allgather(pending, tiled=True)
        if out is not None:
            rows = np.stack([np.asarray(e) for e in emb], axis=1)  # [B, V, D]
            out[np.asarray(index)[mask]] = rows[np.asarray(mask)].view(disk_dtype)

    pending = None  # one batch in flight: decode and write overlap the device work
    for batch in progress_bar(iterable=loader.epoch(0), total=loader.steps_per_epoch,
                              unit="batch", desc=f"teacher cache ({views} views)"):
        g = to_global(mesh, batch)
        embs = tuple(_encode(state, g["image"], g["index"], np.int32(v), **static)
                     for v in range(views))
        if pending is not None:
            write(pending)
        pending = (embs, g["index"], g["mask"])
    if pending is not None:
        write(pending)
    if out is not None:
        out.flush()
        del out
        _write_meta(path, dict(meta, complete=True))

"""Stage-NSD teacher cache: the frozen teacher's image embeddings of V augmented views of every
training example, computed once, so training runs at student speed.

Augmentation is a pure function of (seed, example index, view) (`augment.example_keys`), so
the trainer can regenerate on device exactly the view whose embedding it reads from here:

    cache = build(clip, source, views=V, ...)        # [N, V, D], memory-mapped
    view = views_for_epoch(seed, epoch, N, V)[index]  # per example of a batch
    teacher = cache[index, view]                      # host gather, bf16 -> fp32 on device

On disk under `path`: `embeddings.npy` ([N, V, D]; bfloat16 is stored as its uint16 bit
pattern because .npy has no bfloat16, and read back as an `ml_dtypes.bfloat16` view, its
blocks reserved before any row is written), `meta.json` (the key, its digest, the shape, the
chunk size) and `checksums.txt` (a BLAKE2 digest per chunk of `batch_size` examples, appended
after the chunk's rows are written). Every chunk is checked against its digest when the cache
is opened: a cache made for another key is rebuilt, and the chunks a stopped build did not
finish, or whose rows were damaged on disk since, are computed again, each with one message.

Multi-process runs: every process computes its slice of each global batch, process 0 writes,
and all processes then read the same file, so `path` must be on a filesystem every process sees.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from pand_jax import files
from pand_jax.config import write_json
from pand_jax.data import augment, pipeline
from pand_jax.devices import replicate, to_global
from pand_jax.progress import progress_bar
from pand_jax.train import features

VERSION = 2  # of the layout and key; 2: the compute and storage dtypes, checksummed chunks
EMBEDDINGS, META, CHECKSUMS = "embeddings.npy", "meta.json", "checksums.txt"
NO_CACHE = "no cache yet"
# Storage dtype name -> (dtype the device casts to, dtype of the .npy on disk).
DTYPES = {"bfloat16": (jnp.bfloat16, np.uint16), "float32": (jnp.float32, np.float32)}
# Any edit to the augmentation code may change the views, so the cache key covers its source
# (the one record of the augmentation's version: no number to forget to bump).
AUGMENT_DIGEST = features.cache_key(source=inspect.getsource(augment))


def views_for_epoch(seed: int, epoch: int, num_examples: int, views: int) -> np.ndarray:
    """int32 [N]: the cached view each example uses in `epoch`, uniform over [0, views)."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    rng = np.random.default_rng([seed, epoch, 7])  # 7: a stream apart from the batch order's
    return rng.integers(0, views, num_examples, dtype=np.int32)


def cache_key(key: dict[str, Any], source, *, views: int, seed: int, recipe: str,
              host_image_size: int, image_size: int, compute_dtype, dtype: str) -> dict[str, Any]:
    """Everything the cached embeddings depend on, in one place: the caller's `key` (teacher id,
    dataset, split, data_dir), the source's name (it follows an image folder's files and which
    copy is read) and size, the view settings, the teacher's compute dtype and the storage
    dtype, the augmentation code and this module's layout version."""
    return dict(key, source=getattr(source, "name", None), num_examples=len(source), views=views,
                seed=seed, recipe=recipe, host_image_size=host_image_size, image_size=image_size,
                compute_dtype=jnp.dtype(compute_dtype).name, dtype=dtype, augment=AUGMENT_DIGEST,
                version=VERSION)


def build(clip, source, *, views: int, seed: int, recipe: str, host_image_size: int,
          image_size: int, batch_size: int, mesh, path: pathlib.Path, key: dict[str, Any],
          compute_dtype, dtype: str) -> np.ndarray:
    """The cache [N, V, D] of `clip.encode_image` (unnormalised) on view v of example i,
    `augment.augment(host image, example_keys(seed, i, v), recipe, image_size)`, for every
    example of `source` (index = position) and view; built or reused (module docstring).

    `key` names what the caller knows the embeddings depend on (teacher id, dataset, split,
    data_dir); `cache_key` adds the rest. `compute_dtype` is the teacher's (`clip` runs in it),
    `dtype` the storage dtype, a DTYPES name.
    """
    if views < 1:
        raise ValueError(f"the teacher cache needs views >= 1, got {views}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; expected one of {list(DTYPES)}")
    path = pathlib.Path(path)
    shape = (len(source), views, clip.config.embed_dim)
    full_key = cache_key(key, source, views=views, seed=seed, recipe=recipe,
                         host_image_size=host_image_size, image_size=image_size,
                         compute_dtype=compute_dtype, dtype=dtype)
    digest = features.cache_key(**full_key)
    meta = dict(key=full_key, digest=digest, shape=list(shape), dtype=dtype, chunk=batch_size)
    num_chunks = -(-shape[0] // batch_size)

    reason, done = _inspect(path, meta, num_chunks)
    # Every process has decided before process 0 starts overwriting anything.
    multihost_utils.sync_global_devices("teacher_cache: checked")
    todo = [c for c in range(num_chunks) if c not in done]
    if todo:
        if jax.process_index() == 0:
            print(f"{reason}: building the teacher cache, {len(todo)} of {num_chunks} chunks "
                  f"({shape[0]} examples x {views} "
                  f"views) to compute in {path}", flush=True)
        _compute(clip, source, todo, fresh=not done, views=views, seed=seed, recipe=recipe,
                 host_image_size=host_image_size, image_size=image_size, batch_size=batch_size,
                 mesh=mesh, path=path, meta=meta)
        multihost_utils.sync_global_devices("teacher_cache: written")
        reason, done = _inspect(path, meta, num_chunks)
        if len(done) != num_chunks:
            raise RuntimeError(f"the teacher cache in {path} is not readable after it was built "
                               f"({reason}); with several processes, {path} must be on a "
                               "filesystem that all of them share")
    return _open(path, dtype)


def _inspect(path: pathlib.Path, meta: dict[str, Any], num_chunks: int) -> tuple[str, set[int]]:
    """(what the build must do, the chunks on disk whose rows match their checksums).

    A chunk is one batch of `meta["chunk"]` examples, in order; its checksum is recorded after
    its rows are written, so a chunk of a build that stopped, or whose rows were damaged since,
    is computed again, and only those are."""
    try:
        old = json.loads((path / META).read_text())
    except FileNotFoundError:
        return (NO_CACHE if not (path / EMBEDDINGS).exists() else "partial: no meta.json"), set()
    except (OSError, ValueError) as e:
        return f"warning: unreadable meta.json ({type(e).__name__}), rebuilding", set()
    if old.get("digest") != meta["digest"]:
        return ("warning: stale cache (it was made for another teacher, dataset, split, dtype or "
                "augmentation setting), rebuilding"), set()
    if old.get("chunk") != meta["chunk"] or old.get("shape") != meta["shape"]:
        return "warning: the cache was laid out for another batch size, rebuilding", set()
    try:
        stored = _open(path, meta["dtype"])
    except (OSError, ValueError) as e:  # a truncated file fails to map
        return f"warning: embeddings.npy unreadable ({type(e).__name__}), rebuilding", set()
    if list(stored.shape) != meta["shape"]:
        return "warning: embeddings.npy has another shape, rebuilding", set()
    recorded = _checksums(path)
    done = {c for c, digest in recorded.items()
            if c < num_chunks and _chunk_digest(stored, c, meta["chunk"]) == digest}
    damaged = sorted(set(recorded) - done)
    if damaged:
        return (f"warning: chunks {damaged} of {path / EMBEDDINGS} do not match their checksums "
                "(damaged on disk), recomputing them"), done
    return f"resuming the teacher cache build ({len(done)} chunks done)", done


def _checksums(path: pathlib.Path) -> dict[int, str]:
    """chunk -> digest, from the lines `_compute` appends (a line cut short by a kill is not
    one)."""
    try:
        lines = (path / CHECKSUMS).read_text().splitlines()
    except FileNotFoundError:
        return {}
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and len(parts[1]) == 32:
            out[int(parts[0])] = parts[1]
    return out


def _chunk_digest(stored: np.ndarray, chunk: int, rows: int) -> str:
    block = np.ascontiguousarray(stored[chunk * rows:(chunk + 1) * rows]).view(np.uint8)
    return hashlib.blake2b(block, digest_size=16).hexdigest()


def _open(path: pathlib.Path, dtype: str) -> np.ndarray:
    stored = np.load(path / EMBEDDINGS, mmap_mode="r")
    return stored.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else stored


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


def _compute(clip, source, chunks: list[int], *, fresh: bool, views, seed, recipe,
             host_image_size, image_size, batch_size, mesh, path, meta) -> None:
    """Runs the teacher over every (example, view) of `chunks` and writes their rows as they
    arrive, each chunk's checksum after its rows. `fresh`: a new file, else the rows of the
    other chunks are kept."""
    disk_dtype = DTYPES[meta["dtype"]][1]
    is_main = jax.process_index() == 0
    loader = pipeline.Loader(source, global_batch_size=batch_size, image_size=host_image_size,
                             resize="stretch", train=False, seed=seed)

    graphdef, state = nnx.split(clip)
    state = replicate(mesh, state)
    static = dict(graphdef=graphdef, seed=seed, recipe=recipe, image_size=image_size,
                  dtype=meta["dtype"])
    out = sums = None
    if is_main:
        path.mkdir(parents=True, exist_ok=True)
        if fresh:
            (path / META).unlink(missing_ok=True)
            out = _allocate(path / EMBEDDINGS, disk_dtype, tuple(meta["shape"]))
            write_json(path / META, dict(meta, complete=False))
            recorded = {}
        else:
            out = np.load(path / EMBEDDINGS, mmap_mode="r+")
            recorded = _checksums(path)
        keep = {c: d for c, d in recorded.items() if c not in chunks}
        sums = open(path / CHECKSUMS, "w")
        sums.writelines(f"{c} {d}\n" for c, d in sorted(keep.items()))
        sums.flush()

    def write(pending):
        chunk, (emb, index, mask) = pending
        # Gathering every host's rows; process_allgather waits for the device work.
        emb, index, mask = multihost_utils.process_allgather((emb, index, mask), tiled=True)
        if out is not None:
            rows = np.stack([np.asarray(e) for e in emb], axis=1)  # [B, V, D]
            out[np.asarray(index)[mask]] = rows[np.asarray(mask)].view(disk_dtype)
            out.flush()
            sums.write(f"{chunk} {_chunk_digest(out, chunk, batch_size)}\n")
            sums.flush()

    todo = set(chunks)
    pending = None  # one batch in flight: decode and write overlap the device work
    try:
        batches = loader.epoch(0, min(chunks))
        for chunk, batch in zip(range(min(chunks), loader.steps_per_epoch),
                                progress_bar(iterable=batches, total=len(chunks),
                                             unit="batch", desc=f"teacher cache ({views} views)")):
            if chunk not in todo:
                continue
            g = to_global(mesh, batch)
            embs = tuple(_encode(state, g["image"], g["index"], np.int32(v), **static)
                         for v in range(views))
            if pending is not None:
                write(pending)
            pending = (chunk, (embs, g["index"], g["mask"]))
        if pending is not None:
            write(pending)
    finally:
        if out is not None:
            out.flush()
            del out
            sums.close()
    if is_main:
        write_json(path / META, dict(meta, complete=True))


def _allocate(file: pathlib.Path, dtype, shape: tuple) -> np.ndarray:
    """A new .npy of `shape` memory-mapped for writing, its blocks reserved first: a disk that
    fills up while rows are written to a sparse memory map kills the process with SIGBUS."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        with files.disk_full_errors(file, size, "the teacher cache", fix=(
                "free space there, or set teacher_cache_dir to a disk with room")):
            out = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
            fd = os.open(file, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, file.stat().st_size)
            finally:
                os.close(fd)
    except files.DiskFullError:
        file.unlink(missing_ok=True)
        raise
    return out

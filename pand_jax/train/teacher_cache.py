"""Stage-NSD teacher cache: what the frozen teacher says about V augmented views of every
training example, computed once, so training runs at student speed. It holds either the
teacher's image embeddings or, given `soft_labels`, FKD's sparse soft labels: the top-K
indices and fp16 values of the teacher's class probabilities over the anchors
(`pand_jax.soft_labels`).

Augmentation is a pure function of (seed, example index, view) (`augment.example_keys`; under
"mixup" the partner too, `augment.partners`), so the trainer can regenerate on device exactly
the view whose teacher outputs it reads here:

    cache = build(clip, source, Spec(views=V, ...), ...)  # memory-mapped [N, V, ...]
    view = views_for_epoch(seed, epoch, N, V)[index]  # per example of a batch
    batch.update(cache.lookup(index, view))           # host gather: {"teacher": [B, D]}, or
                                                      # {"teacher_index", "teacher_value": [B, K]}

On disk under `path`: `embeddings.npy` ([N, V, D]; bfloat16 is stored as its uint16 bit
pattern because .npy has no bfloat16, and read back as an `ml_dtypes.bfloat16` view), or
`indices.npy` ([N, V, K], int16 while the classes fit, else int32) and `values.npy` ([N, V, K]
float16), each with its blocks reserved before any row is written; `meta.json` (the key, its
digest, the files' shapes and dtypes, the chunk size) and `checksums.txt` (a BLAKE2 digest per
chunk of `batch_size` examples over the rows of every file, appended after the chunk's rows are
written). Every chunk is checked against its digest when the cache is opened: a cache made for
another key is rebuilt, and the chunks a stopped build did not finish, or whose rows were
damaged on disk since, are computed again, each with one message.

Multi-process runs: every process computes its slice of each global batch, process 0 writes,
and all processes then read the same file, so `path` must be on a filesystem every process sees.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from pand_jax import files
from pand_jax import soft_labels as soft_labels_lib
from pand_jax.data import augment, pipeline
from pand_jax.devices import place_frozen, replicate, to_global
from pand_jax.files import write_json
from pand_jax.progress import progress_bar
from pand_jax.train import features

VERSION = 3  # of the layout and key; 2: dtypes, checksummed chunks; 3: sparse soft labels
EMBEDDINGS, INDICES, VALUES = "embeddings.npy", "indices.npy", "values.npy"
META, CHECKSUMS = "meta.json", "checksums.txt"
NO_CACHE = "no cache yet"
# Storage dtype name -> (dtype the device casts to, dtype of the .npy on disk).
DTYPES = {"bfloat16": (jnp.bfloat16, np.uint16), "float32": (jnp.float32, np.float32)}
# Any edit to the augmentation code may change the views, so the cache key covers its source
# (the one record of the augmentation's version: no number to forget to bump).
AUGMENT_DIGEST = features.cache_key(source=inspect.getsource(augment))


class _Field(NamedTuple):
    """One stored array [N, V, width]: the batch key `Cache.lookup` gives it, its file, the
    dtype the device writes and the trainer reads, and the one on disk (a same-size view)."""

    name: str
    file: str
    dtype: Any
    disk: Any
    width: int


def _fields(dtype: str, embed_dim: int, soft: soft_labels_lib.SoftLabels | None) -> tuple:
    if soft is None:
        device, disk = DTYPES[dtype]
        return (_Field("teacher", EMBEDDINGS, device, disk, embed_dim),)
    index = np.int16 if len(soft.anchors) <= np.iinfo(np.int16).max + 1 else np.int32
    return (
        _Field("teacher_index", INDICES, index, index, soft.k),
        _Field("teacher_value", VALUES, np.float16, np.float16, soft.k),
    )


class Cache:
    """The cache as read back: one memory-mapped [N, V, ...] array per stored field."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def lookup(self, index, view) -> dict[str, np.ndarray]:
        """The rows of examples `index` [B] at views `view` [B]: {"teacher": [B, D]} (the
        embedding cache) or {"teacher_index": [B, K], "teacher_value": [B, K] float16}."""
        return {name: np.asarray(a[index, view]) for name, a in self.arrays.items()}


def views_for_epoch(seed: int, epoch: int, num_examples: int, views: int) -> np.ndarray:
    """int32 [N]: the cached view each example uses in `epoch`, uniform over [0, views)."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    rng = np.random.default_rng([seed, epoch, 7])  # 7: a stream apart from the batch order's
    return rng.integers(0, views, num_examples, dtype=np.int32)


def example_views(seed: int, views: int, num_examples: int):
    """(indices [B], epoch) -> int32 [B]: the view each example trains on in that epoch, its
    cached view (`views_for_epoch`) with `views` of them, else the epoch (a fresh view each)."""
    epoch_views = functools.lru_cache(maxsize=2)(
        lambda epoch: views_for_epoch(seed, epoch, num_examples, views)
    )

    def view_of(index, epoch: int) -> np.ndarray:
        if views:
            return epoch_views(epoch)[index]
        return np.full(np.shape(index), epoch, np.int32)

    return view_of


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the cache holds, and everything its outputs depend on besides the images and the
    teacher's weights: where the images come from, the views, the teacher's compute dtype, the
    storage dtype and the soft labels. `cache_key` turns it into the cache's key."""

    teacher: str  # the teacher's id
    dataset: str
    split: str
    data_dir: str
    views: int
    seed: int
    recipe: str  # the augmentation recipe
    host_image_size: int
    image_size: int
    compute_dtype: str  # the teacher's, e.g. "bfloat16"
    dtype: str  # the embeddings' storage dtype, a DTYPES name (soft labels are float16)
    soft_labels: soft_labels_lib.SoftLabels | None = None  # None: embeddings


def cache_key(spec: Spec, source) -> dict[str, Any]:
    """Everything the cached outputs depend on, in one place: the spec, the source's name (it
    follows an image folder's files and which copy is read) and size, the soft labels' kind, K,
    scale, temperature and anchors (by digest), the augmentation code and this module's layout
    version."""
    sparse, soft = None, spec.soft_labels
    if soft is not None:
        anchors = np.ascontiguousarray(soft.anchors, np.float32)
        sparse = dict(
            kind=soft.kind,
            k=soft.k,
            scale=float(soft.scale),
            temperature=float(soft.temperature),
            anchors_shape=list(anchors.shape),
            anchors=hashlib.blake2b(anchors, digest_size=16).hexdigest(),
        )
    return dict(
        dataclasses.asdict(spec),
        source=getattr(source, "name", None),
        num_examples=len(source),
        dtype=spec.dtype if soft is None else "float16",
        soft_labels=sparse,
        augment=AUGMENT_DIGEST,
        version=VERSION,
    )


@dataclasses.dataclass(frozen=True)
class _Build:
    """One build: the chunks to compute (`fresh`: into new files), and where and how."""

    chunks: list[int]
    fresh: bool
    batch_size: int
    mesh: Any
    teacher_sharding: str
    path: pathlib.Path
    meta: dict[str, Any]
    fields: tuple


def build(
    clip,
    source,
    spec: Spec,
    *,
    batch_size: int,
    mesh,
    teacher_sharding: str,
    path: pathlib.Path,
) -> Cache:
    """The cache of `clip.encode_image` (unnormalised) on view v of example i,
    `augment.augment(host image, example_keys(seed, i, v), recipe, image_size)`, for every
    example of `source` (index = position) and view; built or reused (module docstring).
    Without `spec.soft_labels` it stores those embeddings [N, V, D]; with them, per view
    `soft_labels.sparsify(soft_labels.probabilities(embedding, anchors, scale, temperature), K)`,
    indices and values [N, V, K] (a K outside [1, C) is one ValueError).
    """
    _check(spec)
    path = pathlib.Path(path)
    fields = _fields(spec.dtype, clip.config.embed_dim, spec.soft_labels)
    full_key = cache_key(spec, source)
    meta = dict(
        key=full_key,
        digest=features.cache_key(**full_key),
        chunk=batch_size,
        files={f.file: [len(source), spec.views, f.width, np.dtype(f.disk).name] for f in fields},
    )
    num_chunks = -(-len(source) // batch_size)
    reason, done = _inspect(path, meta, fields, num_chunks)
    # Every process has decided before process 0 starts overwriting anything.
    multihost_utils.sync_global_devices("teacher_cache: checked")
    todo = [c for c in range(num_chunks) if c not in done]
    if todo:
        if jax.process_index() == 0:
            print(
                f"{reason}: building the teacher cache, {len(todo)} of {num_chunks} chunks "
                f"({len(source)} examples x {spec.views} views) to compute in {path}",
                flush=True,
            )
        job = _Build(todo, not done, batch_size, mesh, teacher_sharding, path, meta, fields)
        _compute(clip, source, spec, job)
        multihost_utils.sync_global_devices("teacher_cache: written")
        reason, done = _inspect(path, meta, fields, num_chunks)
        if len(done) != num_chunks:
            raise RuntimeError(
                f"the teacher cache in {path} is not readable after it was built "
                f"({reason}); with several processes, {path} must be on a "
                "filesystem that all of them share"
            )
    return Cache({f.name: _open(path, f) for f in fields})


def _check(spec: Spec) -> None:
    if spec.views < 1:
        raise ValueError(f"the teacher cache needs views >= 1, got {spec.views}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"unknown cache dtype {spec.dtype!r}; expected one of {list(DTYPES)}")
    if spec.soft_labels is not None:
        soft = spec.soft_labels
        soft_labels_lib.check(soft.kind, soft.k, len(soft.anchors))


def _inspect(
    path: pathlib.Path, meta: dict[str, Any], fields: tuple, num_chunks: int
) -> tuple[str, set[int]]:
    """(what the build must do, the chunks on disk whose rows match their checksums).

    A chunk is one batch of `meta["chunk"]` examples, in order; its checksum is recorded after
    its rows are written, so a chunk of a build that stopped, or whose rows were damaged since,
    is computed again, and only those are."""
    try:
        old = json.loads((path / META).read_text())
    except FileNotFoundError:
        partial = any((path / f.file).exists() for f in fields)
        return ("partial: no meta.json" if partial else NO_CACHE), set()
    except (OSError, ValueError) as e:
        return f"warning: unreadable meta.json ({type(e).__name__}), rebuilding", set()
    if old.get("digest") != meta["digest"]:
        old_key = old.get("key") if isinstance(old.get("key"), dict) else {}
        changed = sorted(
            k for k in {**old_key, **meta["key"]} if old_key.get(k) != meta["key"].get(k)
        )
        return (
            "warning: stale cache (it was made for another teacher, dataset, split, dtype, "
            f"soft-label or augmentation setting: {', '.join(changed)}), rebuilding"
        ), set()
    if old.get("chunk") != meta["chunk"] or old.get("files") != meta["files"]:
        return "warning: the cache was laid out for another batch size, rebuilding", set()
    stored = []
    for f in fields:
        try:
            stored.append(_open(path, f))
        except (OSError, ValueError) as e:  # a truncated file fails to map
            return f"warning: {f.file} unreadable ({type(e).__name__}), rebuilding", set()
        if list(stored[-1].shape) != meta["files"][f.file][:3]:
            return f"warning: {f.file} has another shape, rebuilding", set()
    recorded = _checksums(path)
    done = {
        c
        for c, digest in recorded.items()
        if c < num_chunks and _chunk_digest(stored, c, meta["chunk"]) == digest
    }
    damaged = sorted(set(recorded) - done)
    if damaged:
        return (
            f"warning: chunks {damaged} of {path} ({', '.join(f.file for f in fields)}) do "
            "not match their checksums (damaged on disk), recomputing them"
        ), done
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


def _chunk_digest(stored: list[np.ndarray], chunk: int, rows: int) -> str:
    """One digest over the chunk's rows of every stored file, in `_fields` order."""
    digest = hashlib.blake2b(digest_size=16)
    for array in stored:
        digest.update(np.ascontiguousarray(array[chunk * rows : (chunk + 1) * rows]).view(np.uint8))
    return digest.hexdigest()


def _open(path: pathlib.Path, field: _Field) -> np.ndarray:
    return np.load(path / field.file, mmap_mode="r").view(field.dtype)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "seed", "recipe", "image_size", "dtype", "sparse")
)
def _encode(
    state,
    images,
    index,
    view,
    *,
    partners=None,
    anchors=None,
    graphdef,
    seed,
    recipe,
    image_size,
    dtype,
    sparse=None,
):
    """What the cache stores of view `view` of a batch (with "mixup", `partners` [B, V, S, S, 3]
    holds every view's partner images), computed and cast on device: the teacher
    embeddings (B, D) in the storage dtype `dtype`, or, with `sparse` = (K, scale, temperature,
    index dtype), their soft labels over `anchors` [C, D]: top-K indices and fp16 values.

    Module-level so that rebuilds with the same teacher and settings reuse the compiled program;
    the teacher state and anchors are arguments, never baked-in constants."""
    # Padding rows carry index -1; any valid key will do, their rows are dropped.
    keys = augment.example_keys(seed, jnp.maximum(index, 0), view)
    partner_images = None if partners is None else partners[:, view]
    images = augment.augment(images, keys, recipe, image_size, partner_images=partner_images)
    teacher = nnx.merge(graphdef, state, copy=True)
    embeddings = teacher.encode_image(images)
    if sparse is None:
        return (embeddings.astype(DTYPES[dtype][0]),)
    k, scale, temperature, index_dtype = sparse
    probs = soft_labels_lib.probabilities(embeddings, anchors, scale, temperature)
    indices, values = soft_labels_lib.sparsify(probs, k)
    return indices.astype(index_dtype), values


def _compute(clip, source, spec: Spec, job: _Build) -> None:
    """Runs the teacher over every (example, view) of `job.chunks` and writes their rows as
    they arrive, each chunk's checksum after its rows. `job.fresh`: new files, else the rows of
    the other chunks are kept."""
    encode = _encoder(clip, spec, job)
    writer = _Writer(job) if jax.process_index() == 0 else None
    loader = pipeline.Loader(
        source,
        global_batch_size=job.batch_size,
        image_size=spec.host_image_size,
        resize="stretch",
        train=False,
        seed=spec.seed,
        # Under "mixup" a batch carries V partner images per example: fewer batches in flight.
        threads=2 if spec.recipe == augment.MIXUP else 8,
        partners=_partners(spec, len(source)),
    )
    first, todo = min(job.chunks), set(job.chunks)
    batches = progress_bar(
        iterable=loader.epoch(0, first),
        total=len(job.chunks),
        unit="batch",
        desc=f"teacher cache ({spec.views} views)",
    )
    pending = None  # one batch in flight: decode and write overlap the device work
    try:
        for chunk, batch in zip(range(first, loader.steps_per_epoch), batches):
            if chunk not in todo:
                continue
            batch = to_global(job.mesh, batch)
            current = (chunk, (encode(batch), batch["index"], batch["mask"]))
            if pending is not None:
                _write(writer, *pending)
            pending = current
        if pending is not None:
            _write(writer, *pending)
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        write_json(job.path / META, dict(job.meta, complete=True))


def _partners(spec: Spec, num_examples: int):
    """The cache loader's partners under "mixup" (None otherwise): [B, V], every view's."""
    if spec.recipe != augment.MIXUP:
        return None

    def every_view(index, epoch):
        return augment.partners(spec.seed, index[:, None], np.arange(spec.views), num_examples)

    return every_view


def _encoder(clip, spec: Spec, job: _Build):
    """global batch -> what the cache stores of each of its views (`_encode`), on device."""
    graphdef, state = nnx.split(clip)
    state = place_frozen(job.mesh, state, job.teacher_sharding)
    anchors, sparse, soft = None, None, spec.soft_labels
    if soft is not None:
        anchors = replicate(job.mesh, jnp.asarray(soft.anchors, jnp.float32))
        index_dtype = np.dtype(job.fields[0].dtype).name
        sparse = (soft.k, float(soft.scale), float(soft.temperature), index_dtype)
    static = dict(
        graphdef=graphdef,
        seed=spec.seed,
        recipe=spec.recipe,
        image_size=spec.image_size,
        dtype=job.meta["key"]["dtype"],
        sparse=sparse,
    )

    def encode(batch):
        return tuple(
            _encode(
                state,
                batch["image"],
                batch["index"],
                np.int32(v),
                partners=batch.get("partner"),
                anchors=anchors,
                **static,
            )
            for v in range(spec.views)
        )

    return encode


def _write(writer: _Writer | None, chunk: int, outputs) -> None:
    """A chunk's (views' outputs, indices, mask), gathered from every host, to the files."""
    # process_allgather waits for the device work.
    per_view, index, mask = multihost_utils.process_allgather(outputs, tiled=True)
    if writer is not None:
        writer.write(chunk, per_view, np.asarray(index), np.asarray(mask))


class _Writer:
    """Process 0's side of a build: the memory-mapped files and the checksums it appends."""

    def __init__(self, job: _Build):
        path, meta = job.path, job.meta
        self.job = job
        path.mkdir(parents=True, exist_ok=True)
        if job.fresh:
            (path / META).unlink(missing_ok=True)
            # A cache of the other kind in the same directory is stale: free its disk space.
            for name in {EMBEDDINGS, INDICES, VALUES} - set(meta["files"]):
                (path / name).unlink(missing_ok=True)
            self.out = [
                _allocate(path / f.file, f.disk, tuple(meta["files"][f.file][:3]))
                for f in job.fields
            ]
            write_json(path / META, dict(meta, complete=False))
            recorded = {}
        else:
            self.out = [np.load(path / f.file, mmap_mode="r+") for f in job.fields]
            recorded = _checksums(path)
        keep = {c: d for c, d in recorded.items() if c not in job.chunks}
        self.sums = open(path / CHECKSUMS, "w")
        self.sums.writelines(f"{c} {d}\n" for c, d in sorted(keep.items()))
        self.sums.flush()

    def write(self, chunk: int, per_view, index: np.ndarray, mask: np.ndarray) -> None:
        rows = index[mask]
        for j, (f, stored) in enumerate(zip(self.job.fields, self.out)):
            block = np.stack([np.asarray(v[j]) for v in per_view], axis=1)  # [B, V, width]
            stored[rows] = block[mask].view(f.disk)
            stored.flush()
        self.sums.write(f"{chunk} {_chunk_digest(self.out, chunk, self.job.batch_size)}\n")
        self.sums.flush()

    def close(self) -> None:
        while self.out:  # flushed, then the map dropped
            self.out.pop().flush()
        self.sums.close()


def _allocate(file: pathlib.Path, dtype, shape: tuple) -> np.ndarray:
    """A new .npy of `shape` memory-mapped for writing, its blocks reserved first: a disk that
    fills up while rows are written to a sparse memory map kills the process with SIGBUS."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        with files.disk_full_errors(
            file,
            size,
            "the teacher cache",
            fix=("free space there, or set teacher_cache_dir to a disk with room"),
        ):
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

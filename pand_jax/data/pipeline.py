"""Host pipeline (grain): per-process slices of global batches of fixed-size uint8 images.

The host only decodes and resizes (augmentation runs on device, `augment.py`). One grain
element is one local batch: step -> (indices of that step) -> images, so resuming at any
step is a slice, and grain's iterator state (`get_state`/`set_state`) is the step counter.
An optional uint8 cache (a memory-mapped .npy of the whole split) turns later epochs into a
fancy-indexing copy with no JPEG decoding. Each chunk of CHUNK rows has a CRC-32 (of its images
and labels) in the key file, written last; a chunk is checked the first time a Loader reads it,
and one that no longer matches is decoded again from the source and repaired in place, with one
warning. CRC-32, not BLAKE2: it finds the damage a disk does (flipped bits, zeroed or torn
blocks) at three times BLAKE2's speed here (bench/RESULTS.md), and nobody forges a cache.
"""

import functools
import json
import os
import threading
import zlib
from collections.abc import Callable

import grain
import numpy as np
from PIL import Image

from pand_jax import files

RESIZE_MODES = ("stretch", "shorter_center_crop")
CACHE_VERSION = 2  # of the host image cache's layout; a change rebuilds old caches. 2: CRC-32s
CHUNK = 64  # rows per checksummed chunk of the host image cache


def resize_image(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """uint8 HWC RGB -> uint8 [size, size, 3], as torchvision does it on PIL images.

    stretch: Resize((size, size)), bilinear with PIL's antialiasing (released-code NSD).
    shorter_center_crop: Resize(size) bicubic on the shorter side + CenterCrop(size)
    (open_clip eval preprocessing, used for PSC features).
    """
    img = Image.fromarray(image)
    if mode == "stretch":
        return np.asarray(img.resize((size, size), Image.BILINEAR))
    if mode != "shorter_center_crop":
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    w, h = img.size
    # torchvision keeps the long side as int(size * long / short) (truncation, not rounding).
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(img)[top : top + size, left : left + size]


def epoch_order(
    n: int, global_batch_size: int, *, train: bool, seed: int, epoch: int
) -> np.ndarray:
    """Example indices of every global batch of an epoch: int64 [steps, global_batch_size].

    train: a permutation seeded by (seed, epoch), remainder dropped. eval: in order, the
    last batch padded with -1.
    """
    if train:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        steps = n // global_batch_size
        return perm[: steps * global_batch_size].reshape(steps, global_batch_size)
    steps = -(-n // global_batch_size)
    order = np.full(steps * global_batch_size, -1, np.int64)
    order[:n] = np.arange(n)
    return order.reshape(steps, global_batch_size)


class Loader:
    """Batches of one process for `source` (a `load_split` result or any random-access source).

    `epoch(e, start_step)` yields dicts {image uint8 [b,S,S,3], label int32 [b], index int32 [b],
    mask bool [b]} with b = `local_batch_size`, and with `partners` ((indices [b], epoch) ->
    partner indices [b, ...], -1 for none) also "partner": their images [b, ..., S, S, 3]
    (the "mixup" augmentation's second images, read in the loader's threads). The global batch
    is the concatenation of the processes' batches in process order. The returned grain
    iterator has get_state/set_state. `global_batch_size` is a multiple of the device count,
    hence of the process count: the config schema checks that before any work (evaluate.py its
    --batch-size).
    """

    def __init__(
        self,
        source,
        *,
        global_batch_size: int,
        image_size: int,
        resize: str = "stretch",
        train: bool,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        cache_dir: str | None = None,
        workers: int = 0,
        threads: int = 8,
        partners: Callable[[np.ndarray, int], np.ndarray] | None = None,
    ):
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; expected one of {RESIZE_MODES}")
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if train and len(source) < global_batch_size:
            raise ValueError(
                f"train split of {len(source)} examples is smaller than one global batch "
                f"of {global_batch_size}; nothing would be yielded"
            )
        self.source, self.train, self.seed = source, train, seed
        self.global_batch_size, self.image_size, self.resize = global_batch_size, image_size, resize
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = global_batch_size // process_count
        self.workers, self.threads, self.partners = workers, threads, partners
        self.cache = None if cache_dir is None else self._open_cache(cache_dir)
        if self.cache is not None:
            # grain's threads read batches at once: one lock per chunk, so a chunk is checked
            # (and repaired) once while the others are read.
            num_chunks = len(self.cache[2])
            self._checked = np.zeros(num_chunks, bool)
            self._locks = [threading.Lock() for _ in range(num_chunks)]

    @property
    def steps_per_epoch(self) -> int:
        n, g = len(self.source), self.global_batch_size
        return n // g if self.train else -(-n // g)

    def local_order(self, epoch: int) -> np.ndarray:
        """This process's slice of every global batch of the epoch: [steps, local_batch_size]."""
        order = epoch_order(
            len(self.source), self.global_batch_size, train=self.train, seed=self.seed, epoch=epoch
        )
        lo = self.process_index * self.local_batch_size
        return order[:, lo : lo + self.local_batch_size]

    def epoch(self, epoch: int, start_step: int = 0) -> grain.DatasetIterator:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        load = functools.partial(self._load_batch, epoch=epoch)
        ds = grain.MapDataset.source(self.local_order(epoch))[start_step:].map(load)
        # Each element is a whole batch, so a few in flight keep the threads busy.
        read = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=2 * self.threads)
        it_ds = ds.to_iter_dataset(read)
        if self.workers:
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return iter(it_ds)

    def _load_batch(self, indices: np.ndarray, epoch: int) -> dict:
        images, labels, valid = self._read(indices)
        batch = {
            "image": images,
            "label": np.where(valid, labels, 0).astype(np.int32),
            "index": indices.astype(np.int32),
            "mask": valid,
        }
        if self.partners is not None:
            partners = self.partners(indices, epoch)
            batch["partner"] = self._read(partners.ravel())[0].reshape(
                partners.shape + images.shape[1:]
            )
        return batch

    def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, labels, valid) of `indices` [n] (-1: a zero image)."""
        valid = indices >= 0
        safe = np.where(valid, indices, 0)
        if self.cache is not None:
            for c in np.unique(safe[valid] // CHUNK):
                self._check_chunk(int(c))
            images, labels = self.cache[0][safe], self.cache[1][safe]
            images[~valid] = 0
        else:
            images = np.zeros((len(indices), self.image_size, self.image_size, 3), np.uint8)
            labels = np.zeros(len(indices), np.int64)
            for j in np.flatnonzero(valid):  # decode + resize; PIL releases the GIL
                images[j], labels[j] = self._decode(int(indices[j]))
        return images, labels, valid

    def _check_chunk(self, c: int) -> None:
        """Compares chunk `c` with its CRC-32 the first time it is read; a damaged one is decoded
        again from the source and written over the damage (the cache dir is this process's)."""
        if self._checked[c]:
            return
        with self._locks[c]:
            if self._checked[c]:
                return
            images, labels, crcs, stem = self.cache
            lo, hi = c * CHUNK, min((c + 1) * CHUNK, len(labels))
            if _chunk_crc(images, labels, lo, hi) != crcs[c]:
                print(
                    f"warning: examples {lo}-{hi - 1} of the image cache {stem}.images.npy do "
                    "not match their checksum (damaged on disk); decoding them again",
                    flush=True,
                )
                rows = [self._decode(i) for i in range(lo, hi)]
                # A writable map of the same file: the read-only one sees the repaired rows.
                writable = np.load(stem + ".images.npy", mmap_mode="r+")
                writable[lo:hi] = np.stack([img for img, _ in rows])
                writable.flush()
                del writable
                labels[lo:hi] = [label for _, label in rows]
                on_disk = np.load(stem + ".labels.npy", mmap_mode="r+")
                on_disk[lo:hi] = labels[lo:hi]
                on_disk.flush()
                del on_disk
                if _chunk_crc(images, labels, lo, hi) != crcs[c]:
                    raise RuntimeError(
                        f"examples {lo}-{hi - 1} of the image cache {stem}.images.npy still do "
                        "not match their checksum after decoding them again: the source changed "
                        "since the cache was built, or the disk does not keep what is written; "
                        f"delete {stem}.json to rebuild the cache"
                    )
            self._checked[c] = True

    def _decode(self, i: int) -> tuple[np.ndarray, int]:
        ex = self.source[i]
        return resize_image(np.asarray(ex["image"]), self.image_size, self.resize), ex["label"]

    def _open_cache(self, cache_dir: str) -> tuple[np.ndarray, np.ndarray, list[int], str]:
        """(images memmap [N,S,S,3], labels [N], a CRC-32 per chunk, the files' stem); built
        once, published by an atomic rename.
        A cache written for other settings, truncated or otherwise unreadable is rebuilt with
        a warning, never reused."""
        name = getattr(self.source, "name", None)
        if name is None:
            raise ValueError("cache_dir needs a source with a `name` (load_split sets it)")
        stem = os.path.join(cache_dir, f"{name}-{self.resize}{self.image_size}-n{len(self.source)}")
        key = {
            "name": name,
            "resize": self.resize,
            "image_size": self.image_size,
            "num_examples": len(self.source),
            "version": CACHE_VERSION,
        }
        cache, reason = self._read_cache(stem, key)
        if cache is None:
            if os.path.exists(stem + ".images.npy"):
                print(
                    f"warning: rebuilding the image cache {stem}.images.npy: {reason}", flush=True
                )
            os.makedirs(cache_dir, exist_ok=True)
            self._write_cache(stem, key)
            cache, reason = self._read_cache(stem, key)
            if cache is None:
                raise RuntimeError(
                    f"the image cache {stem}.images.npy is unreadable right after "
                    f"it was written: {reason}"
                )
        return cache

    def _read_cache(self, stem: str, key: dict) -> tuple[tuple | None, str]:
        """(cache or None, why not)."""
        n, s = len(self.source), self.image_size
        try:
            with open(stem + ".json") as f:
                stored = json.load(f)
            crcs = stored.pop("crc32", None) if isinstance(stored, dict) else None
            if stored != key:
                return None, "it was written for other settings"
            if not isinstance(crcs, list) or len(crcs) != -(-n // CHUNK):
                return None, "its checksums are missing"
            images = np.load(stem + ".images.npy", mmap_mode="r")  # truncated: ValueError
            labels = np.load(stem + ".labels.npy")
        except FileNotFoundError:
            return None, "a file is missing (an unfinished build, or an older version's cache)"
        except (OSError, ValueError) as e:
            return None, f"it is damaged ({type(e).__name__}: {e})"
        if images.shape != (n, s, s, 3) or images.dtype != np.uint8 or labels.shape != (n,):
            return None, (
                f"it holds images {images.shape} {images.dtype} and labels "
                f"{labels.shape}, expected ({n}, {s}, {s}, 3) uint8 and ({n},)"
            )
        return (images, labels, crcs, stem), ""

    def _write_cache(self, stem: str, key: dict) -> None:
        n, s = len(self.source), self.image_size
        # Every file through a temporary one: a run building the same cache at the same time
        # (another host on a shared disk) never reads a half-written one.
        fix = (
            "free space there, or set host_cache_dir to a disk with room, and run the same "
            "command again"
        )
        with (
            files.disk_full_errors(stem + ".images.npy", n * s * s * 3, "the image cache", fix=fix),
            files.atomic_path(stem + ".images.npy") as images_tmp,
        ):
            images = np.lib.format.open_memmap(
                images_tmp, mode="w+", dtype=np.uint8, shape=(n, s, s, 3)
            )
            # Its blocks reserved first: writing a memory map on a full disk is a SIGBUS.
            fd = os.open(images_tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            labels = np.zeros(n, np.int64)
            crcs = [0] * -(-n // CHUNK)
            ds = grain.MapDataset.range(0, n, CHUNK).map(
                lambda lo: (lo, [self._decode(i) for i in range(lo, min(lo + CHUNK, n))])
            )
            for lo, rows in ds.to_iter_dataset(grain.ReadOptions(num_threads=self.threads)):
                for k, (img, label) in enumerate(rows):
                    images[lo + k], labels[lo + k] = img, label
                crcs[lo // CHUNK] = _chunk_crc(images, labels, lo, lo + len(rows))
            images.flush()
            del images
            # labels and images first: the key file appearing is what marks the cache complete.
            if os.path.exists(stem + ".json"):
                os.remove(stem + ".json")
            with (
                files.disk_full_errors(
                    stem + ".labels.npy", labels.nbytes, "the image cache", fix=fix
                ),
                files.atomic_path(stem + ".labels.npy") as labels_tmp,
            ):
                np.save(labels_tmp, labels)
        files.write_file(
            stem + ".json", json.dumps({**key, "crc32": crcs}), "the image cache's key"
        )


def _chunk_crc(images: np.ndarray, labels: np.ndarray, lo: int, hi: int) -> int:
    """CRC-32 of rows [lo, hi) of the cache, images then labels (zlib releases the GIL)."""
    return zlib.crc32(np.ascontiguousarray(labels[lo:hi], np.int64), zlib.crc32(images[lo:hi]))

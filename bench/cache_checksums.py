"""Host image cache checksums: CRC-32 against BLAKE2b on ~100 MB, and what checking every chunk
once costs against reading the cache for an epoch, and against an epoch that computes on what it
reads.

    python bench/cache_checksums.py [--images 640] [--size 224] [--batch 64] [--threads 8]
                                    [--model-size 64]

A synthetic split (random uint8 images, already at the cache's size) is cached in a temporary
folder; epochs are read as training reads them (grain threads, shuffled global batches). The
computing epoch runs a jitted ResNet-18 forward (eval mode, 100 classes) on each batch's
centre --model-size crop: less work per image than a training step, so the share it gives the
checks is an upper bound on what they cost a training epoch on this machine. The checks run in
grain's read threads, so they overlap with that computation.
"""

import argparse
import hashlib
import os
import tempfile
import time
import zlib

import numpy as np

from pand_jax import cli
from pand_jax.data.pipeline import CHUNK, Loader
from pand_jax.data.sources import ArraySource


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_epoch(loader: Loader, epoch: int) -> float:
    t = time.perf_counter()
    for _ in loader.epoch(epoch):
        pass
    return time.perf_counter() - t


def computing_epoch(make_loader, size: int, checked: bool) -> float:
    """Wall seconds of one epoch of a fresh Loader (its chunks marked checked, or not) whose
    batches a jitted ResNet-18 forward consumes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pand_jax.models.student import Student

    model = Student("resnet18", 100, rngs=nnx.Rngs(0))
    model.eval()

    @nnx.jit
    def forward(model, images):
        lo = (images.shape[1] - size) // 2
        crop = images[:, lo : lo + size, lo : lo + size].astype(jnp.float32) / 255.0
        return model(crop).sum()

    def epoch(loader):
        t, out = time.perf_counter(), None
        for batch in loader.epoch(0):
            out = forward(model, batch["image"])
        jax.block_until_ready(out)
        return time.perf_counter() - t

    warm = make_loader()
    warm._checked[:] = True
    epoch(warm)  # compiles
    times = []
    for _ in range(3):
        loader = make_loader()
        if checked:
            loader._checked[:] = True
        times.append(epoch(loader))
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--model-size", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (args.images, args.size, args.size, 3), np.uint8)
    source = ArraySource(images, np.arange(args.images) % 100, name="bench")
    common = dict(
        global_batch_size=args.batch,
        image_size=args.size,
        train=True,
        process_index=0,
        process_count=1,
        threads=args.threads,
    )
    with tempfile.TemporaryDirectory() as tmp:
        Loader(source, cache_dir=tmp, **common)  # builds the cache
        cached = Loader(source, cache_dir=tmp, **common).cache[0]
        data = memoryview(np.ascontiguousarray(cached).reshape(-1))
        chunk = CHUNK * args.size * args.size * 3
        chunks = [data[lo : lo + chunk] for lo in range(0, len(data), chunk)]
        crc = best_of(lambda: [zlib.crc32(c) for c in chunks])
        blake = best_of(lambda: [hashlib.blake2b(c, digest_size=16).digest() for c in chunks])
        mb = len(data) / 1e6
        print(
            f"cpu cores: {os.cpu_count()}  cache: {mb:.0f} MB ({args.images} x {args.size}^2)"
            f"  chunks of {CHUNK} rows"
        )
        print(f"crc32 (zlib {zlib.ZLIB_RUNTIME_VERSION}): {1e3 * crc:.0f} ms, {mb / crc:,.0f} MB/s")
        print(f"blake2b-128: {1e3 * blake:.0f} ms, {mb / blake:,.0f} MB/s")

        loader = Loader(source, cache_dir=tmp, **common)
        loader._checked[:] = True  # an epoch's read alone
        read_epoch(loader, 0)  # warm: threads, page cache
        read = min(read_epoch(loader, e) for e in range(1, 6))

        def check_all():  # what a Loader adds, once, over the epochs that first read each chunk
            fresh = Loader(source, cache_dir=tmp, **common)
            t = time.perf_counter()
            for c in range(len(fresh._checked)):
                fresh._check_chunk(c)
            return time.perf_counter() - t

        check = min(check_all() for _ in range(3))

        def make():
            return Loader(source, cache_dir=tmp, **common)

        computed = computing_epoch(make, args.model_size, checked=True)
        computed_first = computing_epoch(make, args.model_size, checked=False)
    print(
        f"epoch read from the cache ({args.images // args.batch} batches of {args.batch}, "
        f"{args.threads} threads): {1e3 * read:.1f} ms"
    )
    print(
        f"checking every chunk once: {1e3 * check:.1f} ms = {100 * check / read:.0f} % of an "
        "epoch's read"
    )
    for epochs in (10, 100, 300):
        print(
            f"  spread over a run of {epochs} epochs: +{100 * check / (epochs * read):.1f} % "
            "per epoch"
        )
    print(
        f"epoch with a ResNet-18 forward at {args.model_size} px on each batch: "
        f"{1e3 * computed:.0f} ms (chunks checked), {1e3 * computed_first:.0f} ms (checking "
        f"every chunk): +{100 * (computed_first / computed - 1):.1f} %"
    )


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()

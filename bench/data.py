"""Data benchmark: host pipeline images/s (JPEG decode + resize, and from the uint8 cache)
and device augmentation images/s (released recipe, 256 -> 224).

    python bench/data.py [--images 512] [--batch 128] [--threads 8]
        [--device-batch 32] [--device-steps 5] [--device-only]

Builds a synthetic FGVC-Aircraft-like split (random JPEGs, 500x750, q90) with the project's
own builder in a temporary folder, so it needs no download. The last line printed is a JSON
summary of what each rate divides: images counted and seconds measured, per measurement.
"""

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pand_jax import cli
from pand_jax.data import augment, classnames, load_split
from pand_jax.data.pipeline import Loader
from pand_jax.data.prepare import prepare


def make_raw(root: str, n: int) -> None:
    data = f"{root}/fgvc-aircraft-2013b/data"
    os.makedirs(f"{data}/images")
    variants = list(classnames.AIRCRAFT)
    with open(f"{data}/variants.txt", "w") as f:
        f.write("\n".join(variants) + "\n")
    rng = np.random.default_rng(0)
    # Smooth noise compresses like a photo (pure noise would make decoding unrealistically slow).
    base = rng.integers(0, 255, (50, 75, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((750, 500), Image.BICUBIC)
    img.save(f"{data}/images/proto.jpg", quality=90)
    for split, count in (("train", n), ("val", 1), ("test", 1)):
        with open(f"{data}/images_variant_{split}.txt", "w") as f:
            for i in range(count):
                name = f"{split}{i:06d}"
                os.link(f"{data}/images/proto.jpg", f"{data}/images/{name}.jpg")
                f.write(f"{name} {variants[i % 100]}\n")


def host_rate(loader: Loader, epochs: int = 1) -> dict:
    """Images the loader yields over `epochs` epochs and the seconds that took."""
    next(loader.epoch(0))  # warm up threads / page cache
    t, n = time.perf_counter(), 0
    for e in range(epochs):
        for batch in loader.epoch(e):
            n += len(batch["index"])
    return {"images": n, "seconds": time.perf_counter() - t, "epochs": epochs}


def device_rate(batch: int, steps: int = 5) -> dict:
    """Images augmented over `steps` batches, the seconds that took, the device and the
    augmented batch's shape."""
    imgs = jnp.asarray(
        np.random.default_rng(0).integers(0, 255, (batch, 256, 256, 3), dtype=np.uint8)
    )
    keys = augment.example_keys(0, jnp.arange(batch), 0)
    augment.augment(imgs, keys, "released", 224).block_until_ready()
    t = time.perf_counter()
    for v in range(steps):
        keys = augment.example_keys(0, jnp.arange(batch), v + 1)
        out = augment.augment(imgs, keys, "released", 224)
    out.block_until_ready()
    return {
        "images": batch * steps,
        "seconds": time.perf_counter() - t,
        "device": str(jax.devices()[0]),
        "batch": batch,
        "output_shape": list(out.shape),
    }


def rate(measured: dict) -> float:
    return measured["images"] / measured["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--device-batch", type=int, default=32)
    ap.add_argument("--device-steps", type=int, default=5, help="timed augmentation batches")
    ap.add_argument("--device-only", action="store_true", help="skip the host pipeline")
    args = ap.parse_args()
    summary = {} if args.device_only else {"host": report_host(args)}
    summary["device"] = aug = device_rate(args.device_batch, args.device_steps)
    print(
        f"device augment released 256->224 on {aug['device']}: {rate(aug):,.0f} img/s "
        f"(batch {aug['batch']})"
    )
    print(json.dumps(summary))


def report_host(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        make_raw(f"{tmp}/raw", args.images)
        prepare("aircraft", f"{tmp}/data", f"{tmp}/raw")
        src = load_split("aircraft", "train", data_dir=f"{tmp}/data")
        common = dict(
            global_batch_size=args.batch,
            image_size=256,
            train=True,
            process_index=0,
            process_count=1,
            threads=args.threads,
        )
        decode = host_rate(Loader(src, **common))
        t = time.perf_counter()
        cached_loader = Loader(src, cache_dir=f"{tmp}/cache", **common)
        build = {"images": len(src), "seconds": time.perf_counter() - t}
        cached = host_rate(cached_loader, epochs=20)
    print(f"cpu cores: {os.cpu_count()}  threads: {args.threads}  batch: {args.batch}")
    print(f"host decode+resize (500x750 JPEG -> 256 stretch): {rate(decode):,.0f} img/s")
    print(f"host cache build: {rate(build):,.0f} img/s")
    print(f"host from uint8 cache (256x256): {rate(cached):,.0f} img/s")
    return {
        "cpu_cores": os.cpu_count(),
        "threads": args.threads,
        "batch": args.batch,
        "split": len(src),
        "decode": decode,
        "cache_build": build,
        "cached": cached,
    }


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()

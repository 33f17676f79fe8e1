"""Throughput of the teacher's image tower: Flax (fp32, bf16) vs open_clip PyTorch (fp32, bf16
autocast), same device, same run, random weights, at 224 and 256 px.

    python bench/teacher.py                       # --size small: tiny demo ConvNeXt (CPU smoke run)
    python bench/teacher.py --size full --batch 64 --append bench/RESULTS.md   # on a GPU
    python bench/teacher.py --conv native jnp fast   # CPU: XLA's convolution, the jnp forms,
                                                     # pand_jax.models.conv as it runs (oneDNN)

MFU uses the analytic forward FLOPs of the tower (395.9 GFLOP per 256 px image for
convnext_xxlarge, scaling with (px/256)^2) against the device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from conv_paths import CPU_PATHS, traced_with
from pand_jax.convert import open_clip as oc
from pand_jax.convert.open_clip import config_from_open_clip
from pand_jax.hugepages import relaunch_with_huge_pages
from pand_jax.models.clip import CLIP
from pand_jax.models.convnext import ConvNeXtConfig

MODELS = {"small": "pand_demo_convnext", "full": "convnext_xxlarge"}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def vision_flops(cfg: ConvNeXtConfig, px: int, embed_dim: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one image: convs, MLPs and the projection."""
    hw = (px // 4) ** 2
    flops = 2 * 16 * 3 * cfg.dims[0] * hw  # stem 4x4
    prev = cfg.dims[0]
    for s, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
        if s:
            hw //= 4
            flops += 2 * 4 * prev * dim * hw  # downsample 2x2 stride 2
        flops += depth * hw * (2 * 49 * dim + 2 * 8 * dim * dim)  # dwconv 7x7 + Linear 4x, back
        prev = dim
    return flops + 2 * prev * embed_dim


def peak_tflops(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def time_it(fn, iters: int) -> float:
    fn()
    fn()  # compile / autotune, then warm
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


CONV_LABELS = {"native": " (XLA conv)", "jnp": " (jnp conv)", "fast": ""}


def bench_flax(model: CLIP, images: np.ndarray, iters: int, conv: str = "fast") -> float:
    """`conv` is one of `CPU_PATHS` (they differ on CPU only); a fresh jit per call, so the
    choice applies."""
    graphdef, state = nnx.split(model.visual)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = jax.device_put(images)
    with traced_with(conv):
        return time_it(lambda: fwd(state, x).block_until_ready(), iters)


def bench_torch(visual, images: np.ndarray, iters: int, device: str, bf16: bool) -> float:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=bf16):
            visual(x)
        sync()

    return time_it(run, iters)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=MODELS, default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--append", help="append the markdown section to this file (one write)")
    p.add_argument("--conv", nargs="+", default=["fast"], choices=CPU_PATHS,
                   help="Flax convolution: XLA's own, pand_jax.models.conv's jnp forms, "
                        "pand_jax.models.conv as it runs (CPU only differs)")
    args = p.parse_args()

    name = MODELS[args.size]
    cfg = config_from_open_clip(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())  # as many threads as XLA:CPU uses
    kind = jax.devices()[0].device_kind
    peak = peak_tflops(kind)
    torch_visual = oc.build_torch_model(name, device=device).visual.eval()
    models = {dt: CLIP(cfg, dtype=dt, rngs=nnx.Rngs(0)) for dt in (jnp.float32, jnp.bfloat16)}

    rows = []
    for px in (224, 256):
        images = np.random.default_rng(0).standard_normal((args.batch, px, px, 3), np.float32)
        gflop = vision_flops(cfg.vision, px, cfg.embed_dim) / 1e9
        first_row = len(rows)
        runs = {
            f"Flax {name}{CONV_LABELS[conv]}":
                bench_flax(models[dt], images, args.iters, conv)
            for conv in args.conv for name, dt in (("fp32", jnp.float32), ("bf16", jnp.bfloat16))
        }
        runs |= {
            "PyTorch fp32": bench_torch(torch_visual, images, args.iters, device, bf16=False),
            "PyTorch bf16 autocast": bench_torch(torch_visual, images, args.iters, device, True),
        }
        for label, sec in runs.items():
            ips = args.batch / sec
            mfu = f"{100 * ips * gflop / 1e3 / peak:.1f}%" if peak else "n/a"
            rows.append(f"| {px} | {label} | {ips:,.1f} | {mfu} |")
        for prec, torch_name in (("fp32", "PyTorch fp32"), ("bf16", "PyTorch bf16 autocast")):
            for label in [k for k in runs if k.startswith(f"Flax {prec}")]:
                rows.append(f"| {px} | {label} / {torch_name} | {runs[torch_name] / runs[label]:.2f}x | |")
        print("\n".join(rows[first_row:]), flush=True)

    section = "\n".join([
        f"\n## Teacher image tower ({datetime.date.today().isoformat()})\n",
        f"- device: {kind} (JAX {jax.__version__}, torch {torch.__version__} on {device})",
        f"- command: `python bench/teacher.py --size {args.size} --batch {args.batch} "
        f"--iters {args.iters} --conv {' '.join(args.conv)}`",
        f"- model: {name} image tower, random weights; "
        f"{vision_flops(cfg.vision, 256, cfg.embed_dim) / 1e9:.4g} GFLOP/img at 256 px; "
        "MFU " + (f"against {peak:.0f} TFLOP/s dense bf16" if peak else
                  "n/a (no peak known for this device)"),
        *(["- note: CPU at small size on a shared machine: this only proves the script; the "
           "figures that count come from `--size full` on a GPU."] if device == "cpu" else []),
        "", "| px | run | images/s | MFU |", "|---|---|---|---|", *rows, ""])
    print(section)
    if args.append:
        with open(args.append, "a") as f:
            f.write(section)


if __name__ == "__main__":
    relaunch_with_huge_pages()  # as the command-line tools do (pand_jax/hugepages.py)
    main()

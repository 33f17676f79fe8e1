"""Throughput of the teacher's image tower: Flax (fp32, bf16) vs open_clip PyTorch (fp32, bf16
autocast), same device, same run, random weights; a ConvNeXt at 224 and 256 px, a ViT at its
own size (its positional embedding fixes it).

    python bench/teacher.py                       # --size small: tiny demo ConvNeXt (CPU smoke run)
    python bench/teacher.py --size full --batch 64 --append bench/RESULTS.md   # on a GPU
    python bench/teacher.py --arch ViT-B-16 --batch 8     # any supported open_clip CLIP
    python bench/teacher.py --arch pand_demo_vit          # the tiny ViT of the tests
    python bench/teacher.py --conv native jnp fast   # CPU: XLA's convolution, the jnp forms,
                                                     # pand_jax.models.conv as it runs (oneDNN)

GFLOP/img is XLA's cost analysis of the compiled Flax forward (fp32 program, per image); custom
calls count 0 there, so on CPU a ConvNeXt's oneDNN convolutions are missing from it (its
analytic count: 395.9 GFLOP per 256 px image for convnext_xxlarge). MFU divides that by the
device's dense bf16 peak.
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
from conv_paths import CPU_PATHS, traced_with
from flax import nnx

from pand_jax import cli
from pand_jax.convert import open_clip as oc
from pand_jax.convert.open_clip import config_from_open_clip
from pand_jax.models.clip import CLIP

MODELS = {"small": "pand_demo_convnext", "full": "convnext_xxlarge"}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def xla_gflop(model: CLIP, images: np.ndarray) -> float:
    """GFLOP per image of the compiled image-tower forward, by XLA's cost analysis."""
    graphdef, state = nnx.split(model.visual)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # a list in older JAX versions
    return cost["flops"] / images.shape[0] / 1e9


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
    p.add_argument("--arch", help="open_clip model name (default: --size's ConvNeXt)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--append", help="append the markdown section to this file (one write)")
    p.add_argument(
        "--conv",
        nargs="+",
        default=["fast"],
        choices=CPU_PATHS,
        help="Flax convolution: XLA's own, pand_jax.models.conv's jnp forms, "
        "pand_jax.models.conv as it runs (CPU only differs)",
    )
    args = p.parse_args()

    name = args.arch or MODELS[args.size]
    cfg = config_from_open_clip(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())  # as many threads as XLA:CPU uses
    kind = jax.devices()[0].device_kind
    peak = peak_tflops(kind)
    torch_visual = oc.build_torch_model(name, device=device).visual.eval()
    models = {dt: CLIP(cfg, dtype=dt, rngs=nnx.Rngs(0)) for dt in (jnp.float32, jnp.bfloat16)}

    rows = []
    sizes = (cfg.vision.image_size,) if cfg.family == "vit" else (224, 256)
    gflops = {}
    for px in sizes:
        images = np.random.default_rng(0).standard_normal((args.batch, px, px, 3), np.float32)
        gflop = gflops[px] = xla_gflop(models[jnp.float32], images)
        first_row = len(rows)
        runs = {
            f"Flax {name}{CONV_LABELS[conv]}": bench_flax(models[dt], images, args.iters, conv)
            for conv in args.conv
            for name, dt in (("fp32", jnp.float32), ("bf16", jnp.bfloat16))
        }
        runs |= {
            "PyTorch fp32": bench_torch(torch_visual, images, args.iters, device, bf16=False),
            "PyTorch bf16 autocast": bench_torch(torch_visual, images, args.iters, device, True),
        }
        for label, sec in runs.items():
            ips = args.batch / sec
            mfu = f"{100 * ips * gflop / 1e3 / peak:.1f}%" if peak else "n/a"
            gf = f"{gflop:.4g}" if label.startswith("Flax") else ""
            rows.append(f"| {px} | {label} | {ips:,.1f} | {mfu} | {gf} |")
        for prec, torch_name in (("fp32", "PyTorch fp32"), ("bf16", "PyTorch bf16 autocast")):
            for label in [k for k in runs if k.startswith(f"Flax {prec}")]:
                rows.append(
                    f"| {px} | {label} / {torch_name} | {runs[torch_name] / runs[label]:.2f}x | | |"
                )
        print("\n".join(rows[first_row:]), flush=True)

    section = "\n".join(
        [
            f"\n## Teacher image tower ({datetime.date.today().isoformat()})\n",
            f"- device: {kind} (JAX {jax.__version__}, torch {torch.__version__} on {device})",
            f"- command: `python bench/teacher.py --size {args.size}"
            + (f" --arch {args.arch}" if args.arch else "")
            + f" --batch {args.batch} --iters {args.iters} --conv {' '.join(args.conv)}`",
            f"- model: {name} image tower, random weights; "
            + ", ".join(f"{g:.4g} GFLOP/img at {px} px" for px, g in gflops.items())
            + " (XLA cost analysis); MFU "
            + (
                f"against {peak:.0f} TFLOP/s dense bf16"
                if peak
                else "n/a (no peak known for this device)"
            ),
            *(
                [
                    "- note: CPU at small size on a shared machine: this only proves the script; "
                    "the figures that count come from `--size full` on a GPU."
                ]
                if device == "cpu"
                else []
            ),
            "",
            "| px | run | images/s | MFU | GFLOP/img |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(section)
    if args.append:
        with open(args.append, "a") as f:
            f.write(section)


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()

"""Student throughput, Flax NNX vs torchvision, same device, batch, precision and threads.

train = forward + backward + AdamW update on [batch, size, size, 3] random images with random
labels, BatchNorm in training mode, a 200-class head; eval = forward with running statistics.
fp32 is each framework's default fp32 math (on NVIDIA GPUs both let cuDNN use TF32 for
convolutions); bf16 is the Flax Student's compute dtype (params and BN statistics fp32) vs
torch.autocast(bfloat16) with channels_last, PyTorch's fast path. On CPU torch runs with as many
threads as there are cores, as XLA does. `--conv native jnp fast` measures the Flax models with
XLA's own convolution (PAND_NATIVE_CONV=1), with `pand_jax.models.conv` without oneDNN
(PAND_ONEDNN=0, its jnp forms) and with `pand_jax.models.conv` as it runs (oneDNN's kernels on
CPU where they build) in the same run.

    python bench/student.py --device gpu --batch 128 --steps 50
    python bench/student.py --device cpu --batch 16 --steps 3 --size 64 224 --precision fp32 \
        --conv native jnp fast
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conv_paths import CPU_PATHS, traced_with
from flax import nnx

from pand_jax import cli
from pand_jax.models.student import ARCHS, Student

LR = 1e-4
WEIGHT_DECAY = 1e-4
WARMUP_STEPS = 2
NUM_CLASSES = 200  # a CUB-sized head, as in Stage-NSD
MODES = ("train", "eval")


def images_per_s(run, batch: int, steps: int) -> float:
    """`run()` does one step and returns something to block on; warm-up (and compile) first."""
    for _ in range(WARMUP_STEPS):
        out = run()
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = run()
    jax.block_until_ready(out)
    return batch * steps / (time.perf_counter() - start)


def flax_images_per_s(
    arch: str, dtype, platform: str, batch: int, size: int, steps: int, mode: str
) -> float:
    device = jax.devices(platform)[0]
    with jax.default_device(device):
        model = Student(arch, NUM_CLASSES, dtype=dtype, rngs=nnx.Rngs(0))
        rng = np.random.default_rng(0)
        x = jax.device_put(rng.standard_normal((batch, size, size, 3), np.float32), device)
        y = jax.device_put(rng.integers(0, NUM_CLASSES, batch), device)
        if mode == "eval":
            model.eval()
            graphdef, state = nnx.split(model)
            forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
            return images_per_s(lambda: forward(state, x), batch, steps)

        model.train()
        graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        opt = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
        carry = (params, stats, opt.init(params))

        def step(params, stats, opt_state, x, y):
            def loss_fn(params):
                m = nnx.merge(graphdef, params, stats, copy=True)
                logits = m(x)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return loss, nnx.state(m, nnx.BatchStat)

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, opt_state, loss

        step = jax.jit(step, donate_argnums=(0, 1, 2))

        def run():
            nonlocal carry
            *carry, loss = step(*carry, x, y)
            return loss

        return images_per_s(run, batch, steps)


def torch_images_per_s(
    arch: str, bf16: bool, platform: str, batch: int, size: int, steps: int, mode: str
) -> float:
    import torch
    import torchvision

    device = torch.device("cuda" if platform == "gpu" else platform)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
    model = model.to(device, memory_format=torch.channels_last).train(mode == "train")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step():
        if mode == "eval":
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                model(x)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return images_per_s(step, batch, steps)


def flax_with_conv(conv: str, *args) -> float:
    """Flax figure with XLA's convolution ("native"), the jnp forms ("jnp") or
    `pand_jax.models.conv` as it runs ("fast"); every call here traces afresh, so the switches
    apply."""
    with traced_with(conv):
        return flax_images_per_s(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="gpu", choices=("cpu", "gpu"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, nargs="+", default=[224])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument(
        "--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16")
    )
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--conv",
        nargs="+",
        default=["fast"],
        choices=CPU_PATHS,
        help="Flax convolution: XLA's own, pand_jax.models.conv's jnp forms "
        "(without oneDNN), pand_jax.models.conv as it runs (CPU only "
        "differs)",
    )
    args = parser.parse_args()

    import torch

    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count())
    print(
        f"device {args.device}: {jax.devices(args.device)[0].device_kind}, batch {args.batch}, "
        f"{args.steps} timed steps after {WARMUP_STEPS} warm-up, torch threads "
        f"{torch.get_num_threads()}, cores {os.cpu_count()}"
    )
    flax_cols = [f"flax {c} img/s" for c in args.conv]
    ratio_cols = [f"{c}/torch" for c in args.conv]
    print(
        "| arch | px | precision | mode | "
        + " | ".join(flax_cols)
        + " | torch img/s | "
        + " | ".join(ratio_cols)
        + " |"
    )
    print("|---" * (5 + 2 * len(args.conv)) + "|")
    for arch in args.arch:
        for size in args.size:
            for precision in args.precision:
                bf16 = precision == "bf16"
                for mode in args.mode:
                    flax = [
                        flax_with_conv(
                            c,
                            arch,
                            jnp.bfloat16 if bf16 else jnp.float32,
                            args.device,
                            args.batch,
                            size,
                            args.steps,
                            mode,
                        )
                        for c in args.conv
                    ]
                    torch_ips = torch_images_per_s(
                        arch, bf16, args.device, args.batch, size, args.steps, mode
                    )
                    print(
                        f"| {arch} | {size} | {precision} | {mode} | "
                        + " | ".join(f"{f:.1f}" for f in flax)
                        + f" | {torch_ips:.1f} | "
                        + " | ".join(f"{f / torch_ips:.2f}" for f in flax)
                        + " |",
                        flush=True,
                    )


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()

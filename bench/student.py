"""Student training-step throughput: Flax NNX vs torchvision, same device, batch and precision.

One step = forward + backward + AdamW update on [batch, size, size, 3] random images with
random labels, BatchNorm in training mode, a 200-class head. fp32 is each framework's default
fp32 math (on NVIDIA GPUs both let cuDNN use TF32 for convolutions); bf16 is the Flax
Student's compute dtype (params and BN statistics fp32) vs torch.autocast(bfloat16) with
channels_last, PyTorch's fast path.

    python bench/student.py --device gpu --batch 128 --steps 50
    python bench/student.py --device cpu --batch 4 --steps 3 --arch resnet18
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pand_jax.models.student import ARCHS, Student

LR = 1e-4
WEIGHT_DECAY = 1e-4
WARMUP_STEPS = 2
NUM_CLASSES = 200  # a CUB-sized head, as in Stage-NSD


def flax_images_per_s(arch: str, dtype, platform: str, batch: int, size: int, steps: int) -> float:
    device = jax.devices(platform)[0]
    with jax.default_device(device):
        model = Student(arch, NUM_CLASSES, dtype=dtype, rngs=nnx.Rngs(0))
        model.train()
        graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        opt = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
        opt_state = opt.init(params)

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
        rng = np.random.default_rng(0)
        x = jax.device_put(rng.standard_normal((batch, size, size, 3), np.float32), device)
        y = jax.device_put(rng.integers(0, NUM_CLASSES, batch), device)
        for _ in range(WARMUP_STEPS):
            params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
        loss.block_until_ready()
        start = time.perf_counter()
        for _ in range(steps):
            params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
        loss.block_until_ready()
        return batch * steps / (time.perf_counter() - start)


def torch_images_per_s(arch: str, bf16: bool, platform: str, batch: int, size: int, steps: int) -> float:
    import torch
    import torchvision

    device = torch.device("cuda" if platform == "gpu" else platform)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(WARMUP_STEPS):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="gpu", choices=("cpu", "gpu"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    args = parser.parse_args()

    print(f"device {args.device}: {jax.devices(args.device)[0].device_kind}, batch {args.batch}, "
          f"{args.size}px, {args.steps} timed steps after {WARMUP_STEPS} warm-up")
    print(f"{'arch':<14}{'precision':<11}{'flax img/s':>12}{'torch img/s':>13}{'flax/torch':>12}")
    for arch in args.arch:
        for precision in args.precision:
            bf16 = precision == "bf16"
            flax = flax_images_per_s(arch, jnp.bfloat16 if bf16 else jnp.float32, args.device,
                                     args.batch, args.size, args.steps)
            torch = torch_images_per_s(arch, bf16, args.device, args.batch, args.size, args.steps)
            print(f"{arch:<14}{precision:<11}{flax:>12.1f}{torch:>13.1f}{flax / torch:>12.2f}")


if __name__ == "__main__":
    main()

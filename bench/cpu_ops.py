"""Where a CPU step spends its time, op by op: XLA's kernel vs `pand_jax.models.conv` vs PyTorch.

Each row is one convolution or max pool shape of the students at 224 px (batch 16, fp32),
timed alone: fwd = forward, fwd+bwd = forward and the gradient w.r.t. input and kernel of
sum(y^2). "XLA" traces with PAND_NATIVE_CONV=1 (XLA's convolution and reduce_window), "jnp"
with `pand_jax.models.conv` without oneDNN (PAND_ONEDNN=0: its jnp forms, XLA's kernel where
that is kept), "ours" with `pand_jax.models.conv` as it runs (oneDNN's convolutions where they
build), torch is `nn.Conv2d` / `nn.MaxPool2d` in channels_last with as many threads as cores.
Timed alone, an op also pays for first-touching its fresh output buffers (page faults), which a
whole jitted step partly hides: read these rows for the ratio between columns, and
`bench/student.py` for the step.

    python bench/cpu_ops.py                   # every row
    python bench/cpu_ops.py --only pool dw    # rows whose name contains one of these words
    python bench/cpu_ops.py --rule            # XLA's kernel vs the matmul form, dense convs:
                                              # the measurements behind _dense_takes_matmul
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from conv_paths import CPU_PATHS, traced_with

from pand_jax import cli
from pand_jax.models import conv

BATCH = 16
# name: (input size, in channels, out channels, kernel, stride, depthwise); padding k // 2
CONVS = {
    "resnet18 stem 7x7/2 3-64 @224": (224, 3, 64, 7, 2, False),
    "resnet18 3x3 64-64 @56": (56, 64, 64, 3, 1, False),
    "resnet18 3x3/2 64-128 @56": (56, 64, 128, 3, 2, False),
    "resnet18 3x3 256-256 @14": (14, 256, 256, 3, 1, False),
    "resnet18 3x3 512-512 @7": (7, 512, 512, 3, 1, False),
    "mobilenet_v2 1x1 16-96 @112": (112, 16, 96, 1, 1, False),
    "mobilenet_v2 1x1 144-24 @56": (56, 144, 24, 1, 1, False),
    "mobilenet_v2 dw3x3 32 @112": (112, 32, 32, 3, 1, True),
    "mobilenet_v2 dw3x3/2 96 @112": (112, 96, 96, 3, 2, True),
    "mobilenet_v2 dw3x3 144 @56": (56, 144, 144, 3, 1, True),
}
POOLS = {"resnet18 max pool 3x3/2 64 @112": (112, 64)}
# Dense convs either side of each threshold of `conv._dense_takes_matmul`; name: (input size,
# in channels, out channels, kernel, stride, padding, batch)
RULE_CONVS = {
    "3x3 512-512 @2": (2, 512, 512, 3, 1, 1, BATCH),
    "3x3 512-512 @3": (3, 512, 512, 3, 1, 1, BATCH),
    "3x3 512-512 @4": (4, 512, 512, 3, 1, 1, BATCH),
    "3x3 256-256 @4": (4, 256, 256, 3, 1, 1, BATCH),
    "3x3/2 256-512 @4": (4, 256, 512, 3, 2, 1, BATCH),
    "3x3 512-512 @7": (7, 512, 512, 3, 1, 1, BATCH),
    "3x3 64-64 @8": (8, 64, 64, 3, 1, 1, BATCH),
    "3x3 64-64 @16": (16, 64, 64, 3, 1, 1, BATCH),
    "3x3 256-256 @14": (14, 256, 256, 3, 1, 1, BATCH),
    "3x3 64-64 @56": (56, 64, 64, 3, 1, 1, BATCH),
    "1x1 16-96 @112": (112, 16, 96, 1, 1, 0, BATCH),
    "1x1/2 64-128 @56": (56, 64, 128, 1, 2, 0, BATCH),
    "2x2/2 768-1536 @28": (28, 768, 1536, 2, 2, 0, 2),
    "4x4/4 3-192 @224": (224, 3, 192, 4, 4, 0, 2),
    "stem 3x3/2 3-32 @64": (64, 3, 32, 3, 2, 1, BATCH),
    "stem 3x3/2 3-32 @224": (224, 3, 32, 3, 2, 1, BATCH),
    "stem 7x7/2 3-64 @64": (64, 3, 64, 7, 2, 3, BATCH),
    "stem 7x7/2 3-64 @224": (224, 3, 64, 7, 2, 3, BATCH),
}
NHWC = ("NHWC", "HWIO", "NHWC")


def ms(fn, *args, iters: int = 10) -> float:
    for _ in range(2):
        out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters * 1e3


def flax_ms(op, *operands) -> tuple[float, float]:
    """(fwd, fwd+bwd) of `op` in ms, traced afresh (so `traced_with` applies)."""
    grad = jax.grad(lambda *a: jnp.sum(op(*a) ** 2), argnums=tuple(range(len(operands))))
    return ms(jax.jit(op), *operands), ms(jax.jit(grad), *operands)


def torch_ms(module: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    module = module.to(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad():
            return module(x)

    def backward():
        (module(x) ** 2).sum().backward()

    return ms(forward), ms(backward)


def flax_columns(make_op, *operands) -> list[float]:
    """XLA's, the jnp forms', ours: (fwd, fwd+bwd) each. `make_op()` gives a new function each
    time, because jit caches traces per function and the switches act at trace time."""
    times = []
    for path in CPU_PATHS:
        with traced_with(path):
            times += flax_ms(make_op(), *operands)
    return times


def conv_row(size, cin, cout, k, stride, depthwise) -> list[float]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, size, size, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, 1 if depthwise else cin, cout), np.float32) * 0.1)
    groups = cin if depthwise else 1

    def make_op():
        return lambda x, w: conv.conv_general_dilated(
            x,
            w,
            (stride, stride),
            [(k // 2, k // 2)] * 2,
            dimension_numbers=NHWC,
            feature_group_count=groups,
        )

    module = torch.nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    return flax_columns(make_op, x, w) + list(torch_ms(module, torch.randn(BATCH, cin, size, size)))


def pool_row(size, channels) -> list[float]:
    x = jnp.asarray(
        np.random.default_rng(0).standard_normal((BATCH, size, size, channels), np.float32)
    )

    def make_op():
        return lambda x: conv.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))

    return flax_columns(make_op, x) + list(
        torch_ms(torch.nn.MaxPool2d(3, 2, 1), torch.randn(BATCH, channels, size, size))
    )


def rule_row(size, cin, cout, k, stride, pad, batch) -> list[float]:
    """XLA's kernel, then the jnp matmul form forced (`conv._cpu_conv`): fwd, fwd+bwd each."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) * 0.1)
    pads = ((pad, pad), (pad, pad))

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=NHWC)

    def matmul(x, w):
        return conv._cpu_conv(
            x,
            w,
            (stride, stride),
            pads,
            precision=None,
            preferred_element_type=None,
            groups=1,
            use_onednn=False,
        )

    return [*flax_ms(xla, x, w), *flax_ms(matmul, x, w)]


def print_rule_table(only) -> None:
    print("| dense conv | XLA fwd | matmul fwd | XLA fwd+bwd | matmul fwd+bwd | rule picks |")
    print("|---|---|---|---|---|---|")
    for name, (size, cin, cout, k, stride, pad, batch) in RULE_CONVS.items():
        if only and not any(word in name for word in only):
            continue
        xf, xb, mf, mb = rule_row(size, cin, cout, k, stride, pad, batch)
        out = (size + 2 * pad - k) // stride + 1
        pick = (
            "matmul"
            if conv._dense_takes_matmul((k, k), (stride, stride), out * out, cin)
            else "XLA"
        )
        print(
            f"| {name} (batch {batch}) | {xf:.1f} | {mf:.1f} | {xb:.1f} | {mb:.1f} | {pick} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=[], help="words a row's name must contain")
    parser.add_argument(
        "--rule",
        action="store_true",
        help="XLA's kernel vs the matmul form for dense convs, no torch",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"CPU, {os.cpu_count()} cores, batch {BATCH}, fp32, ms (10 timed runs after 2)")
    if args.rule:
        return print_rule_table(args.only)
    print(
        "| op | XLA fwd | jnp fwd | ours fwd | torch fwd | XLA fwd+bwd | jnp fwd+bwd | "
        "ours fwd+bwd | torch fwd+bwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [(name, conv_row, shape) for name, shape in CONVS.items()]
    rows += [(name, pool_row, shape) for name, shape in POOLS.items()]
    for name, row, shape in rows:
        if args.only and not any(word in name for word in args.only):
            continue
        xf, xb, jf, jb, of, ob, tf, tb = row(*shape)
        print(
            f"| {name} | {xf:.1f} | {jf:.1f} | {of:.1f} | {tf:.1f} | {xb:.1f} | {jb:.1f} | "
            f"{ob:.1f} | {tb:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()

"""Forward + backward time of nsd_batch and nsd_paper: JAX jit vs plain PyTorch, same device.

    .venv/bin/python bench/losses.py                  # CPU
    .venv/bin/python bench/losses.py --device cuda    # GPU (JAX on the first GPU, torch cuda:0)

The PyTorch side is a straightforward batched implementation of the same formulas (gather by
index, topk, softmax, JS), differentiated with autograd; eager mode, no torch.compile.
Both sides take the gradient w.r.t. the student logits. Prints a Markdown table.
"""

import argparse
import statistics
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F

from pand_jax import cli, losses

SHAPES = [(128, 200), (4096, 1000)]
K = 3


def torch_js(p_logits, q_logits):
    p, q = F.softmax(p_logits, dim=-1), F.softmax(q_logits, dim=-1)
    log_m = ((p + q) / 2).log()
    return 0.5 * (F.kl_div(log_m, p, reduction="none") + F.kl_div(log_m, q, reduction="none"))


def torch_nsd_batch(zs, zt, k=K):
    b = zs.shape[0]
    zn = F.normalize(zt, dim=1)
    sim = zn @ zn.T
    sim.fill_diagonal_(-float("inf"))
    idx = sim.topk(k, dim=1).indices  # [B, k]
    delta_s = zs[:, None, :] - zs[idx]
    delta_t = zt[:, None, :] - zt[idx]
    return torch_js(delta_t, delta_s).sum() / (b * k)


def torch_nsd_paper(zs, zt, y, k=K):
    masked = zt.scatter(1, y[:, None], -float("inf"))
    idx = masked.topk(k, dim=1).indices
    d_t = zt.gather(1, y[:, None]) - zt.gather(1, idx)
    d_s = zs.gather(1, y[:, None]) - zs.gather(1, idx)
    return torch_js(-d_t, -d_s).sum(dim=1).mean()


def time_it(fn, sync, reps):
    fn()
    sync()  # warm-up (and JAX compile)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_one(name, b, c, device, reps):
    rng = np.random.default_rng(0)
    zs_np = (3 * rng.standard_normal((b, c))).astype(np.float32)
    zt_np = (3 * rng.standard_normal((b, c))).astype(np.float32)
    y_np = rng.integers(0, c, b, dtype=np.int32)

    jax_device = jax.devices("gpu" if device.startswith("cuda") else "cpu")[0]
    zs, zt, y = (jax.device_put(a, jax_device) for a in (zs_np, zt_np, y_np))
    if name == "nsd_batch":
        jax_step = jax.jit(jax.value_and_grad(lambda s, t: losses.nsd_batch(s, t, k=K)))
        jax_args = (zs, zt)
    else:
        jax_step = jax.jit(jax.value_and_grad(lambda s, t, y: losses.nsd_paper(s, t, y, k=K)))
        jax_args = (zs, zt, y)
    jax_value = float(jax_step(*jax_args)[0])
    out = {}

    def run_jax():
        out["jax"] = jax_step(*jax_args)

    jax_ms = time_it(run_jax, lambda: jax.block_until_ready(out["jax"]), reps)

    tdev = torch.device(device)
    zs_t = torch.tensor(zs_np, device=tdev, requires_grad=True)
    zt_t = torch.tensor(zt_np, device=tdev)
    y_t = torch.tensor(y_np, device=tdev, dtype=torch.long)

    def run_torch():
        zs_t.grad = None
        if name == "nsd_batch":
            loss = torch_nsd_batch(zs_t, zt_t)
        else:
            loss = torch_nsd_paper(zs_t, zt_t, y_t)
        loss.backward()
        out["torch"] = loss

    sync = torch.cuda.synchronize if tdev.type == "cuda" else (lambda: None)
    torch_ms = time_it(run_torch, sync, reps)
    torch_value = float(out["torch"].detach())
    return jax_ms, torch_ms, jax_value, torch_value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (median)")
    args = parser.parse_args()

    platform = "gpu" if args.device.startswith("cuda") else "cpu"
    print(
        f"jax {jax.__version__} on {jax.devices(platform)[0]}, "
        f"torch {torch.__version__} on {args.device}, k={K}, fp32, median of {args.reps}"
    )
    print(
        "| loss | B | C | JAX jit fwd+bwd (ms) | PyTorch fwd+bwd (ms) | speed-up | rel. loss diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in ("nsd_batch", "nsd_paper"):
        for b, c in SHAPES:
            jax_ms, torch_ms, jv, tv = bench_one(name, b, c, args.device, args.reps)
            print(
                f"| {name} | {b} | {c} | {jax_ms:.3f} | {torch_ms:.3f} | "
                f"{torch_ms / jax_ms:.2f}x | {abs(jv - tv) / abs(tv):.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()

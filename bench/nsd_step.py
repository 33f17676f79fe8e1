"""Stage-NSD step benchmark and projected CUB wall times.

    python bench/nsd_step.py --size full --device gpu --dtype bfloat16   # H100/H200
    python bench/nsd_step.py --size small --device cpu --dtype float32   # proves the script

Measures images/s of
  (a) ours, online: on-device augmentation + teacher forward + student fwd/bwd + PAND losses
      + AdamW (built from pand_jax.train.nsd: build_model, make_loss, optimizer);
  (b) ours, cached: the same step with the teacher embedding given (teacher_cache path);
  (c) a PyTorch reference step: open_clip ConvNeXt teacher under no_grad + torchvision
      resnet18 + the same losses in torch + AdamW, on an already augmented batch (the released
      code augments in CPU loader workers, outside the step);
plus the pieces the projections need: the teacher forward on augmented views (one cache-build
row, `teacher_cache._encode`), the teacher at the PSC feature size, the student eval forward,
and a Stage-PSC step (text tower fwd/bwd on the 200 CUB prompts). Weights are random: speed
does not depend on them. `full` = convnext_xxlarge + resnet18 at 224, batch 128; `small` =
a tiny ConvNeXt CLIP + resnet18 at 64 px, batch 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pand_jax import cli, devices, losses, methods, prompts
from pand_jax import config as config_lib
from pand_jax.convert.open_clip import DEMO_MODELS, config_from_open_clip
from pand_jax.data import augment, datasets
from pand_jax.models.clip import CLIP
from pand_jax.train import nsd, psc, teacher_cache

# CUB-200-2011 and the paper's schedules.
CUB_TRAIN, CUB_TEST, CUB_CLASSES = 5994, 5794, 200
NSD_EPOCHS, PSC_EPOCHS, PSC_BATCH = 300, 200, 128
# convnext_xxlarge vision forward, GFLOPs per 256 px image.
XXL_GFLOPS_256 = 395.9

# The small teacher: the demo ConvNeXt image tower and a small text tower that still takes
# the real BPE vocabulary and 77 tokens (the CUB prompts need both).
SMALL_TEACHER = dict(
    DEMO_MODELS["pand_demo_convnext"],
    text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
)


@dataclasses.dataclass(frozen=True)
class Size:
    teacher: str | dict
    host: int  # host uint8 size
    image: int  # training view size
    feature: int  # PSC feature-extraction size
    batch: int


SIZES = {
    "small": Size(SMALL_TEACHER, 72, 64, 64, 16),
    "full": Size("convnext_xxlarge", 256, 224, 256, 128),
}


def timed(fn, steps: int, warmup: int = 2) -> float:
    """Seconds per call of `fn() -> pytree`, after `warmup` calls (compilation)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    t = time.perf_counter()
    out = None
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps


# ---------------------------------------------------------------- ours (JAX)


def nsd_config() -> dict:
    cfg = config_lib.default_config("nsd")
    cfg.update(method="pand", student="resnet18", student_weights=None, seed=0)
    return cfg


def build(method, cfg, teacher_dim, dtype):
    # A CNN student reads only the class count of the dataset.
    info = types.SimpleNamespace(num_classes=CUB_CLASSES)
    return nsd.build_model(method, cfg, info, teacher_dim=teacher_dim, dtype=dtype)


def bench_ours(size: Size, dtype, mesh, steps: int) -> dict[str, float]:
    cfg = nsd_config()
    clip = CLIP(config_from_open_clip(size.teacher), dtype=dtype, rngs=nnx.Rngs(0))
    dim, b = clip.config.embed_dim, size.batch
    rng = np.random.default_rng(0)
    host = {
        "image": rng.integers(0, 256, (b, size.host, size.host, 3), dtype=np.uint8),
        "label": rng.integers(0, CUB_CLASSES, b).astype(np.int32),
        "index": np.arange(b, dtype=np.int32),
        "view": np.zeros(b, np.int32),
        "mask": np.ones(b, bool),
    }
    batch = devices.to_global(mesh, host)
    cached_batch = dict(
        batch,
        teacher=devices.to_global(mesh, {"t": rng.standard_normal((b, dim)).astype(jnp.bfloat16)})[
            "t"
        ],
    )
    anchors = devices.replicate(
        mesh,
        np.asarray(losses.l2_normalize(rng.standard_normal((CUB_CLASSES, dim)).astype(np.float32))),
    )
    t_graphdef, t_state = nnx.split(clip)
    t_state = devices.replicate(mesh, t_state)
    cfg.update(image_size=size.image, augment="released")
    tx, schedule = nsd.optimizer(cfg, CUB_TRAIN // b)
    method = methods.get(cfg["method"])
    loss_fn = nsd.make_loss(
        method, cfg["loss"], learned_anchors=True, num_epochs=NSD_EPOCHS, dataset=cfg["dataset"]
    )
    epoch = jnp.int32(0)
    rates = {}
    for name, teacher_state, data in (("online", t_state, batch), ("cached", None, cached_batch)):
        graphdef, state = nsd.init_state(build(method, cfg, dim, dtype), tx)
        step = nsd.make_train_step(
            cfg, graphdef=graphdef, loss_fn=loss_fn, tx=tx, schedule=schedule, teacher=t_graphdef
        )
        box = [devices.replicate(mesh, state)]

        # Called only within this iteration (by `timed`): the defaults bind its values.
        def run(box=box, step=step, teacher_state=teacher_state, data=data):
            box[0], metrics = step(box[0], nsd.Frozen(teacher_state, anchors), data, epoch)
            return metrics["loss"]

        rates[name] = b / timed(run, steps)

    static = dict(
        graphdef=t_graphdef, seed=0, recipe="released", image_size=size.image, dtype="bfloat16"
    )
    rates["teacher_views"] = b / timed(
        lambda: teacher_cache._encode(
            t_state, batch["image"], batch["index"], np.int32(0), **static
        ),
        steps,
    )
    feat_images = devices.to_global(
        mesh, {"i": rng.integers(0, 256, (b, size.feature, size.feature, 3), dtype=np.uint8)}
    )["i"]
    encode = devices.jit_apply(clip, lambda m, x: m.encode_image(augment.normalize(x)), mesh)
    rates["teacher_features"] = b / timed(lambda: encode(feat_images), steps)

    student = build(method, cfg, dim, dtype).student
    student.eval()
    predict = devices.jit_apply(student, lambda m, x: jnp.argmax(m(augment.normalize(x)), -1), mesh)
    eval_images = devices.to_global(mesh, {"i": host["image"][:, : size.image, : size.image]})["i"]
    rates["student_eval"] = b / timed(lambda: predict(eval_images), steps)
    rates.update(bench_psc(clip, mesh, steps))
    return rates


def bench_psc(clip, mesh, steps: int) -> dict[str, float]:
    """Seconds per Stage-PSC step (200 CUB prompts through the text tower, fwd + bwd, SGD) and
    per evaluation of the anchors (text tower forward)."""
    cfg = config_lib.default_config("psc")
    info = datasets.get_dataset("cub")
    parts = prompts.prompt_parts(clip, info.class_names, info.prompt_template, cfg["n_ctx"])
    graphdef, t_state = nnx.split(clip)
    frozen = devices.replicate(mesh, (t_state, parts))
    tx = psc.optimizer(cfg, PSC_EPOCHS * (CUB_TRAIN // PSC_BATCH))
    ctx = prompts.init_context(jax.random.key(0), cfg["n_ctx"], clip.config.text.width)
    state = devices.replicate(mesh, {"ctx": ctx, "opt_state": tx.init(ctx)})
    rng = np.random.default_rng(0)
    dim = clip.config.embed_dim
    batch = devices.to_global(
        mesh,
        {
            "features": np.asarray(
                losses.l2_normalize(rng.standard_normal((PSC_BATCH, dim)).astype(np.float32))
            ),
            "label": rng.integers(0, CUB_CLASSES, PSC_BATCH).astype(np.int32),
        },
    )

    step = psc.make_train_step(graphdef, tx, jnp.exp(clip.logit_scale[...]))
    box = [state]

    def run():
        box[0], metrics = step(box[0], frozen, batch)
        return metrics["loss"]

    evaluate = jax.jit(psc.anchors_fn(graphdef))
    return {
        "psc_step_s": timed(run, steps),
        "psc_anchors_s": timed(lambda: evaluate(box[0]["ctx"], frozen), steps),
    }


# ---------------------------------------------------------------- PyTorch reference


def bench_torch(size: Size, device: str, dtype: str, steps: int) -> float:
    """images/s of the released-code-style step, on a batch already augmented."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from pand_jax.convert.open_clip import build_torch_model

    dev = "cuda" if device == "gpu" else "cpu"
    teacher = build_torch_model(size.teacher, dev).visual
    dim = config_from_open_clip(size.teacher).embed_dim
    student = torchvision.models.resnet18()
    student.fc = torch.nn.Identity()
    head = torch.nn.Linear(512, CUB_CLASSES)

    def mlp():
        return torch.nn.Sequential(
            torch.nn.Linear(dim, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512)
        )

    align_img, align_txt = mlp(), mlp()
    trainable = torch.nn.ModuleList([student, head, align_img, align_txt]).to(dev).train()
    opt = torch.optim.AdamW(trainable.parameters(), lr=1e-4, weight_decay=1e-4)
    lc = nsd_config()["loss"]
    scale, tau = lc["scale"], lc["vl2lite"]["tau"]
    k, lam = lc["pand"]["nsd_k"], lc["pand"]["lambda_nsd"]
    b = size.batch
    images = torch.randn(b, 3, size.image, size.image, device=dev)
    labels = torch.randint(0, CUB_CLASSES, (b,), device=dev)
    anchors = F.normalize(torch.randn(CUB_CLASSES, dim, device=dev), dim=-1)
    autocast = torch.autocast(dev, torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with autocast:
            with torch.no_grad():
                t = F.normalize(teacher(images).float(), dim=-1)
            feats = student(images).float()
            logits = head(feats)
        h = F.normalize(feats, dim=-1)
        a = F.normalize(align_img(t), dim=-1)
        a_txt = F.normalize(align_txt(anchors), dim=-1)
        cls = F.cross_entropy(logits, labels)
        vis = (h - a).abs().mean()
        log_p = F.log_softmax(scale * t @ anchors.T / tau, -1)
        log_q = F.log_softmax(scale * h @ a_txt.T / tau, -1)
        txt = tau**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        z_t = scale * t @ anchors.T  # NSD of the paper: margins to the k nearest wrong classes
        nbr = z_t.masked_fill(F.one_hot(labels, CUB_CLASSES).bool(), -torch.inf).topk(k).indices

        def rho(z):
            return F.log_softmax(-(z.gather(1, labels[:, None]) - z.gather(1, nbr)), -1)

        lp, lq = rho(z_t), rho(logits)
        lm = torch.log((lp.exp() + lq.exp()) / 2)
        js = 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))
        w_cls = 0.0  # epoch 0 of the released weight schedule
        loss = w_cls * cls + (1 - w_cls) / 2 * (vis + txt) + lam * js.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return b * steps / (time.perf_counter() - t0)


# ---------------------------------------------------------------- projections


def project(r: dict[str, float], batch: int, views: int) -> dict[str, float]:
    """Projected seconds of the CUB runs from the measured rates (one device)."""
    nsd_steps = NSD_EPOCHS * (CUB_TRAIN // batch)
    eval_s = NSD_EPOCHS * CUB_TEST / r["student_eval"]
    psc_steps = PSC_EPOCHS * (CUB_TRAIN // PSC_BATCH)  # psc.run drops the remainder: 46/epoch
    return {
        "nsd_online_s": nsd_steps * batch / r["online"] + eval_s,
        "nsd_cached_s": (
            views * CUB_TRAIN / r["teacher_views"] + nsd_steps * batch / r["cached"] + eval_s
        ),
        "nsd_torch_s": nsd_steps * batch / r["torch"] + eval_s if "torch" in r else float("nan"),
        "cache_build_s": views * CUB_TRAIN / r["teacher_views"],
        # features once (train + test), then steps, then 2 anchor evaluations per epoch
        # (CUB selects on test, so the splits are train and test).
        "psc_s": (
            (CUB_TRAIN + CUB_TEST) / r["teacher_features"]
            + psc_steps * r["psc_step_s"]
            + PSC_EPOCHS * 2 * r["psc_anchors_s"]
        ),
        "psc_features_s": (CUB_TRAIN + CUB_TEST) / r["teacher_features"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--views", type=int, default=4, help="teacher-cache views V for the projection")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = p.parse_args()

    size = SIZES[args.size]
    backend_devices = jax.devices(args.device)
    mesh = Mesh(np.array(backend_devices), (devices.DATA,))
    devices.check_batch_size(size.batch, mesh)
    dtype = devices.compute_dtype(args.dtype)
    with jax.default_device(backend_devices[0]):
        rates = bench_ours(size, dtype, mesh, args.steps)
    if not args.no_torch:
        rates["torch"] = bench_torch(size, args.device, args.dtype, args.steps)
    proj = project(rates, size.batch, args.views)

    print(
        f"device: {backend_devices[0].device_kind} x{len(backend_devices)}; size {args.size}; "
        f"dtype {args.dtype}; batch {size.batch}; image {size.image}"
    )
    print("| measurement | value |\n|---|---|")
    for name in ("online", "cached", "torch", "teacher_views", "teacher_features", "student_eval"):
        if name in rates:
            print(f"| {name} | {rates[name]:,.1f} img/s |")
    for name in ("psc_step_s", "psc_anchors_s"):
        print(f"| {name} | {1e3 * rates[name]:,.1f} ms |")
    if "torch" in rates:
        print(f"| cached / torch | {rates['cached'] / rates['torch']:.2f}x |")
    print(f"| cached / online | {rates['cached'] / rates['online']:.2f}x |")
    if args.size == "full":
        tflops = XXL_GFLOPS_256 * (size.image / 256) ** 2 * rates["teacher_views"] / 1e3
        print(f"| teacher forward at {size.image} | {tflops:.0f} TFLOP/s |")
    for name, seconds in proj.items():
        print(f"| projected {name} (CUB, V={args.views}) | {seconds / 60:,.1f} min |")
    print(json.dumps({"rates": rates, "projection_s": proj}))


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()

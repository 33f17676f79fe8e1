"""Run by test_sharding.py in a fresh process with 8 fake CPU devices (XLA_FLAGS is read when
jax starts): the Stage-PSC and Stage-NSD steps of a small ConvNeXt and a small ViT CLIP with
the teacher replicated and sharded (FSDP), run on the CPU mesh and lowered for CUDA and TPU.
Prints one JSON object per family on stdout."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import classes_info

from pand_jax import config, devices, methods, prompts
from pand_jax.models.clip import CLIP, CLIPConfig
from pand_jax.train import nsd, psc

CLASSES = [str(i) for i in range(10)]
BATCH, HOST, SIZE = 16, 36, 32


def teacher(family: str) -> CLIP:
    demo = config.demo_config()
    model = (demo["teacher_variants"][family] if family != "convnext" else demo["teacher"])["model"]
    return CLIP(CLIPConfig.from_dict(model), rngs=nnx.Rngs(0))


def steps(clip: CLIP):
    """(nsd_step, nsd_args, psc_step, psc_args) with host arrays; the teacher state first."""
    cfg = config.default_config("nsd")
    cfg.update(image_size=SIZE, augment="rrc", seed=0)
    # AdamW's first step is lr * g / (|g| + eps): a larger eps than PyTorch's keeps reordered
    # sums of tiny gradients from showing as full-size differences (as in conftest's NSD_ARGS)
    cfg["optimizer"]["eps"] = 1e-3
    method = methods.get("pand")
    cfg.update(student="resnet18", student_weights=None)
    model = nsd.build_model(
        method,
        cfg,
        classes_info(len(CLASSES)),
        teacher_dim=clip.config.embed_dim,
        dtype=jnp.float32,
    )
    tx, schedule = nsd.optimizer(cfg, 10)
    loss_fn = nsd.make_loss(
        method, cfg["loss"], learned_anchors=True, num_epochs=cfg["epochs"], dataset="digits"
    )
    graphdef, state = nsd.init_state(model, tx)
    t_graphdef, t_state = nnx.split(clip)
    rng = np.random.default_rng(0)
    anchors = rng.standard_normal((len(CLASSES), clip.config.embed_dim)).astype(np.float32)
    anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
    batch = {
        "image": rng.integers(0, 256, (BATCH, HOST, HOST, 3), dtype=np.uint8),
        "label": rng.integers(0, len(CLASSES), BATCH).astype(np.int32),
        "index": np.arange(BATCH, dtype=np.int32),
    }
    nsd_step = nsd.make_train_step(
        cfg, graphdef=graphdef, loss_fn=loss_fn, tx=tx, schedule=schedule, teacher=t_graphdef
    )

    pcfg = config.default_config("psc")
    ptx = psc.optimizer(pcfg, 10)
    parts = prompts.prompt_parts(clip, CLASSES, "a photo of {}", 4)
    ctx = prompts.init_context(jax.random.key(0), 4, clip.config.text.width, 0.02)
    features = rng.standard_normal((BATCH, clip.config.embed_dim)).astype(np.float32)
    psc_step = psc.make_train_step(nnx.graphdef(clip), ptx, jnp.exp(clip.logit_scale[...]))
    psc_batch = {"features": features, "label": batch["label"]}
    # host copies: each placement makes fresh device buffers (the NSD step donates its state)
    state, t_state = jax.device_get((state, t_state))
    return (
        nsd_step,
        (state, t_state, anchors, batch),
        psc_step,
        ({"ctx": ctx, "opt_state": ptx.init(ctx)}, t_state, parts, psc_batch),
    )


def place(mesh, sharding, train_state, t_state, rest, batch):
    return (
        devices.replicate(mesh, train_state),
        (devices.place_frozen(mesh, t_state, sharding), devices.replicate(mesh, rest)),
        devices.to_global(mesh, batch),
    )


def per_device_bytes(tree) -> int:
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def family_report(family: str) -> dict:
    mesh = devices.make_mesh()
    nsd_step, nsd_args, psc_step, psc_args = steps(teacher(family))
    out = {"family": family, "devices": mesh.size}
    results = {}
    for sharding in ("replicated", "fsdp"):
        state, frozen, batch = place(mesh, sharding, *nsd_args)
        frozen = nsd.Frozen(*frozen)  # (teacher, anchors)
        epoch = jnp.int32(1)
        pstate, pfrozen, pbatch = place(mesh, sharding, *psc_args)
        # the weights each step reads: NSD the image tower, PSC the text tower after its token
        # embedding (the prompts come embedded); XLA prunes the others from its arguments
        t = frozen[0]
        out[f"nsd_teacher_bytes_per_device_{sharding}"] = per_device_bytes(t["visual"])
        out[f"psc_teacher_bytes_per_device_{sharding}"] = per_device_bytes(
            [v for k, v in t["text"].items() if k != "token_embedding"]
        )
        # XLA's memory analysis of each compiled step, per device
        for stage, fn, args in (
            ("nsd", nsd_step, (state, frozen, batch, epoch)),
            ("psc", psc_step, (pstate, pfrozen, pbatch)),
        ):
            memory = fn.trace(*args).lower().compile().memory_analysis()
            out[f"{stage}_argument_bytes_{sharding}"] = int(memory.argument_size_in_bytes)
            out[f"{stage}_temp_bytes_{sharding}"] = int(memory.temp_size_in_bytes)
        new_state, metrics = nsd_step(state, frozen, batch, epoch)
        new_ctx, pmetrics = psc_step(pstate, pfrozen, pbatch)
        results[sharding] = (
            jax.device_get(new_state["params"]),
            float(metrics["loss"]),
            np.asarray(new_ctx["ctx"]),
            float(pmetrics["loss"]),
        )
        for platform in ("cuda", "tpu"):
            for stage, fn, args in (
                ("nsd", nsd_step, (state, frozen, batch, epoch)),
                ("psc", psc_step, (pstate, pfrozen, pbatch)),
            ):
                if stage == "nsd":  # donated: a fresh copy for each lowering
                    args = (devices.replicate(mesh, nsd_args[0]),) + args[1:]
                text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
                key = f"{stage}_{platform}_{sharding}"
                out[f"{key}_cpu_custom_calls"] = sorted(
                    {c for c in ("PandConv", "onednn", "__onednn") if c.lower() in text.lower()}
                )
                assert '@mesh = <["data"=8]>' in text, key  # the program spans the mesh
                out[f"{key}_data_sharded_values"] = text.count('{"data"}')
    rep, fsdp = results["replicated"], results["fsdp"]
    leaves = zip(jax.tree.leaves(rep[0]), jax.tree.leaves(fsdp[0]))
    out["nsd_params_max_abs_diff"] = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in leaves
    )
    out["nsd_loss"] = [rep[1], fsdp[1]]
    out["psc_ctx_max_abs_diff"] = float(np.max(np.abs(rep[2] - fsdp[2])))
    out["psc_loss"] = [rep[3], fsdp[3]]
    return out


if __name__ == "__main__":
    for family in sys.argv[1:] or ("convnext", "vit"):
        print(json.dumps(family_report(family)), flush=True)

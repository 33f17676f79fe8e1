"""open_clip ViT CLIPs: the ViT image tower and its text tower against open_clip (PyTorch), the
converter's errors, and a ViT teacher through the demo.

Parity tolerances: fp32 with JAX matmul precision "highest", relative to the reference's largest
magnitude, 1e-5 on image features, text features and logits, random weights (measured: about
3e-7 on the tiny configs, 7e-7 on ViT-B-32).
bf16 compute (parameters fp32, residual stream and LayerNorm statistics fp32): within 2e-2 of the
fp32 result, relative as above (measured: pand_demo_vit 1.7e-3 image / 6.3e-3 text features;
ViT-B-16 at 224 px, batch 4: 3.6e-3 image / 3.0e-3 text features; docs/teachers.md).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PSC_ARGS, run_train
from flax import nnx
from helpers import cli_error, clip_embed, jit_call, max_rel, open_clip_checkpoint, random_open_clip
from safetensors.numpy import save_file

from pand_jax.cli import convert as cli
from pand_jax.convert import open_clip as oc
from pand_jax.convert.open_clip import config_from_open_clip
from pand_jax.convert.state_dict import ConversionError
from pand_jax.models import clip as clip_lib
from pand_jax.models.clip import CLIP, CLIPConfig, load_clip, save_clip
from pand_jax.models.vit import ViTConfig

DEMOS = ["pand_demo_vit", "pand_demo_vit_quickgelu"]
FULL = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14"]
QUICK = [f"{n}-quickgelu" for n in FULL]
BF16_TOLERANCE = 2e-2


def _pair(name: str, seed: int):
    """(randomised open_clip model, its state dict, the converted NNX CLIP)."""
    torch_model, sd = random_open_clip(name, seed)
    return torch_model, sd, oc.convert_state_dict(sd, config_from_open_clip(name))


@pytest.fixture(scope="module", params=DEMOS)
def pair(request):
    return (request.param, *_pair(request.param, seed=DEMOS.index(request.param)))


def _assert_parity(model, torch_model, batch):
    diffs = oc.verify_clip(model, torch_model, batch=batch, seed=1)
    for key in ("image", "text", "logits"):
        assert diffs[key]["rel"] < 1e-5, (key, diffs)


def bf16_distance(name, sd, model, batch):
    """Largest relative difference of bf16-compute features to fp32 ones: (image, text)."""
    bf16 = oc.convert_state_dict(sd, config_from_open_clip(name), dtype=jnp.bfloat16)
    images, tokens = oc.random_inputs(model.config, batch, model.config.vision.image_size, seed=5)
    with jax.default_matmul_precision("highest"):
        want = jit_call(clip_embed, model, images, tokens)
    got = jit_call(clip_embed, bf16, images, tokens)
    assert all(g.dtype == jnp.float32 for g in got)
    return tuple(max_rel(g, w) for g, w in zip(got, want))


def test_parity_fp32(pair):
    _, torch_model, _, model = pair
    _assert_parity(model, torch_model, batch=3)


def test_the_activation_is_the_configured_one(pair):
    """The same weights with the other activation drift far beyond the parity tolerance: the
    tests above would see a GELU / QuickGELU mix-up."""
    name, torch_model, sd, _ = pair
    cfg = config_from_open_clip(name)
    flip = not cfg.text.quick_gelu
    other = CLIPConfig(
        cfg.embed_dim,
        ViTConfig(**{**vars(cfg.vision), "quick_gelu": flip}),
        type(cfg.text)(**{**vars(cfg.text), "quick_gelu": flip}),
    )
    diffs = oc.verify_clip(oc.convert_state_dict(sd, other), torch_model, batch=2, seed=1)
    assert diffs["image"]["rel"] > 1e-3 and diffs["text"]["rel"] > 1e-3, diffs


def test_bf16_close_to_fp32():
    """One tiny config (bf16 compiles slowly on CPU); full size: test_full_size_bf16_distance."""
    _, sd, model = _pair(DEMOS[0], seed=0)
    image, text = bf16_distance(DEMOS[0], sd, model, batch=3)
    assert 0 < image < BF16_TOLERANCE and 0 < text < BF16_TOLERANCE  # > 0: it did run in bf16


def test_configs_from_open_clip():
    b16, quick, h14 = (
        config_from_open_clip(n) for n in ("ViT-B-16", "ViT-B-16-quickgelu", "ViT-H-14")
    )
    assert b16.vision == ViTConfig(width=768, layers=12, heads=12, patch_size=16, image_size=224)
    assert b16.family == "vit" and not b16.text.quick_gelu
    assert quick.vision.quick_gelu and quick.text.quick_gelu
    assert (h14.vision.heads, h14.vision.width, h14.vision.grid) == (16, 1280, 16)  # head_width 80
    for cfg in (b16, quick, h14):
        assert CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_old_convnext_configs_without_family_still_load():
    """Weights converted before ViT towers existed record no `family`: they are ConvNeXt."""
    old = json.loads(json.dumps(oc.DEMO_MODELS["pand_demo_convnext"]))
    cfg = config_from_open_clip(old)
    d = cfg.to_dict()
    assert d["vision"].pop("family") == "convnext"
    assert CLIPConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown image tower family 'resnet'"):
        CLIPConfig.from_dict({**d, "vision": {**d["vision"], "family": "resnet"}})


@pytest.mark.parametrize("name", ["RN50", "ViT-bigG-14", "ViT-B-16-SigLIP"])
def test_other_architectures_are_rejected(name):
    with pytest.raises(ValueError, match=f"{name} is not supported .*ViT-B-16.*convnext_xxlarge"):
        config_from_open_clip(name)


@pytest.mark.parametrize("name", FULL + QUICK)
def test_full_size_structure_matches_open_clip(name):
    """Every tensor's shape and the parameter count, without allocating weights (`eval_shape`
    here, the "meta" device in PyTorch)."""
    abstract = nnx.eval_shape(lambda: CLIP(config_from_open_clip(name), rngs=nnx.Rngs(0)))
    torch_model = oc.build_torch_model(name, device="meta")
    torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert oc.expected_shapes(abstract) == torch_shapes
    assert clip_lib.param_count(abstract) == sum(p.numel() for p in torch_model.parameters())


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16"])
def test_full_size_parity_fp32(name):
    """Full-size random-weight parity: ViT-B-32 ~14 s, ViT-B-16 ~10 s on a 2-core CPU, cold
    compilation cache included (the first includes one-time imports)."""
    torch_model, _, model = _pair(name, seed=0)
    _assert_parity(model, torch_model, batch=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-L-14", "ViT-H-14-quickgelu"])
def test_full_size_parity_fp32_large(name):
    torch_model, _, model = _pair(name, seed=0)
    _assert_parity(model, torch_model, batch=1)


@pytest.mark.slow
def test_full_size_bf16_distance():
    """ViT-B-16 at 224 px, batch 4: bf16 stays within the tolerance at full depth too."""
    _, sd, model = _pair("ViT-B-16", seed=0)
    image, text = bf16_distance("ViT-B-16", sd, model, batch=4)
    assert image < BF16_TOLERANCE and text < BF16_TOLERANCE, (image, text)


# ------------------------------------------------------------------------------- bad input


def test_image_size_the_tower_cannot_take(pair):
    _, _, _, model = pair
    size, patch = model.config.vision.image_size, model.config.vision.patch_size
    model.check_image_size(size)  # its own size passes
    for bad in (size + patch, size + 1):  # another grid; not a multiple of the patch size
        with pytest.raises(ValueError) as e:
            model.check_image_size(bad)
        msg = str(e.value)
        assert f"image size {bad} px" in msg and f"takes {size} px only" in msg, msg
        assert "\n" not in msg
    images, _ = oc.random_inputs(model.config, 1, size + patch, seed=0)
    with pytest.raises(ValueError, match=f"image size {size + patch} px"):
        model.encode_image(images)


def test_convnext_size_check():
    model = nnx.eval_shape(
        lambda: CLIP(config_from_open_clip("pand_demo_convnext"), rngs=nnx.Rngs(0))
    )
    model.check_image_size(48)  # a ConvNeXt takes any size from 32 px
    with pytest.raises(ValueError, match="feature_image_size 16 px is too small.*at least 32"):
        model.check_image_size(16, "feature_image_size")


def test_checkpoint_of_another_vit_names_first_mismatch():
    """A ViT-B-32 checkpoint given as ViT-B-16: zero-stride arrays, so nothing is allocated."""
    shapes = oc.expected_shapes(
        nnx.eval_shape(lambda: CLIP(config_from_open_clip("ViT-B-32"), rngs=nnx.Rngs(0)))
    )
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    with pytest.raises(ConversionError) as e:
        oc.convert_state_dict(sd, config_from_open_clip("ViT-B-16"), label="ViT-B-16")
    assert str(e.value).startswith(
        "the checkpoint is not a ViT-B-16: visual.conv1.weight is (768, 3, 32, 32) in it but "
        "(768, 3, 16, 16) in ViT-B-16 (2 of "
    )


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("vit_ckpt")
    sd = open_clip_checkpoint(d / "vit.safetensors", "pand_demo_vit", seed=21)
    return d / "vit.safetensors", sd


def test_cli_converts_safetensors_offline_and_verifies(vit_checkpoint, tmp_path, capsys):
    path, _ = vit_checkpoint
    rc = cli.main(
        [
            "--checkpoint",
            str(path),
            "--model",
            "pand_demo_vit",
            "--out",
            str(tmp_path / "w"),
            "--verify",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "verify passed" in out, out
    model = load_clip(tmp_path / "w")
    assert model.config == config_from_open_clip("pand_demo_vit")
    meta = json.loads((tmp_path / "w" / "config.json").read_text())
    assert meta["model"] == "pand_demo_vit" and meta["config"]["vision"]["family"] == "vit"
    np.testing.assert_allclose(meta["preprocess"]["mean"], (0.48145466, 0.4578275, 0.40821073))


def test_cli_demo_vit(tmp_path, capsys):
    assert (
        cli.main(
            ["--demo-model", "pand_demo_vit_quickgelu", "--verify", "--out", str(tmp_path / "d")]
        )
        == 0
    )
    assert "verify passed" in capsys.readouterr().out
    assert load_clip(tmp_path / "d").config.vision.quick_gelu


def test_cli_checkpoint_of_another_architecture(vit_checkpoint, tmp_path, capsys):
    path, _ = vit_checkpoint
    rc = cli.main(
        [
            "--checkpoint",
            str(path),
            "--model",
            "pand_demo_vit_quickgelu",
            "--out",
            str(tmp_path / "w"),
        ]
    )
    err = cli_error(capsys)
    assert rc == 2 and (
        "the checkpoint is not a pand_demo_vit_quickgelu: visual.conv1.weight "
        "is (48, 3, 8, 8) in it but (40, 3, 16, 16) in pand_demo_vit_quickgelu" in err
    ), err
    assert not (tmp_path / "w").exists()


def test_cli_missing_tensor(vit_checkpoint, tmp_path, capsys):
    _, sd = vit_checkpoint
    sd = dict(sd)
    sd.pop("visual.transformer.resblocks.1.attn.in_proj_bias")
    save_file(sd, str(tmp_path / "bad.safetensors"))
    rc = cli.main(
        [
            "--checkpoint",
            str(tmp_path / "bad.safetensors"),
            "--model",
            "pand_demo_vit",
            "--out",
            str(tmp_path / "w"),
        ]
    )
    assert rc == 2
    assert "missing keys (1): visual.transformer.resblocks.1.attn.in_proj_bias" in cli_error(capsys)


@pytest.fixture
def no_download(monkeypatch):
    """The model hub, unreachable: records what was asked for."""
    import huggingface_hub

    asked = []

    def offline(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    return asked


def test_cli_download_by_tag(no_download, tmp_path, capsys):
    """The real download path, up to the network: the tag's hub repo, safetensors first."""
    rc = cli.main(
        ["--model", "ViT-B-16", "--pretrained", "laion2b_s34b_b88k", "--out", str(tmp_path / "w")]
    )
    err = cli_error(capsys)
    assert rc == 2 and "could not download laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in err
    assert "--checkpoint FILE --model ViT-B-16" in err
    assert no_download == [
        ("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", n)
        for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    ]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--model", "ViT-B-32", "--pretrained", "openai"],
            "ViT-B-32 / openai was trained with QuickGELU: "
            "convert it as --model ViT-B-32-quickgelu",
        ),
        (
            ["--model", "ViT-L-14", "--pretrained", "laion2b_s32b_b82k"],
            "ViT-L-14 / laion2b_s32b_b82k was trained on images normalised "
            "with mean (0.5, 0.5, 0.5)",
        ),
        (
            ["--model", "ViT-B-16", "--pretrained", "nope"],
            "open_clip has no pretrained tag 'nope' for ViT-B-16; its tags: openai, laion400m_e31",
        ),
        (
            ["--model", "ViT-B-16"],
            "no pretrained tag known for ViT-B-16: pass --pretrained TAG "
            "(open_clip has: openai, laion400m_e31",
        ),
    ],
)
def test_cli_refuses_before_any_download(no_download, argv, expected, capsys):
    assert cli.main(argv) == 2
    assert expected in cli_error(capsys)
    assert no_download == []


def test_teacher_with_other_mean_std_is_refused(tmp_path):
    model = CLIP(config_from_open_clip("pand_demo_vit"), rngs=nnx.Rngs(0))
    save_clip(tmp_path / "t", model, model="x", preprocess={"mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.raises(
        ValueError,
        match=r"mean \(0\.5, 0\.5, 0\.5\); pand_jax normalises with "
        r"OpenAI's mean \(0\.481454",
    ):
        load_clip(tmp_path / "t")


# --------------------------------------------------------------------- a ViT teacher in use


@pytest.fixture(scope="module")
def vit_teacher(tmp_path_factory):
    """The demo's ViT teacher architecture (configs/demo.json), random weights."""
    from pand_jax.train import demo

    d = demo.demo_config()
    path = tmp_path_factory.mktemp("vit_teacher")
    cfg = demo.teacher_config(demo.teacher_section(d, "vit"))
    assert cfg.family == "vit"
    save_clip(path, CLIP(cfg, rngs=nnx.Rngs(0)), teacher_id="test-vit-teacher")
    return path


def test_psc_refuses_an_image_size_the_teacher_cannot_take(vit_teacher, tmp_path, capsys):
    from pand_jax.cli.train import main

    args = [str(a) for a in PSC_ARGS + ["--teacher", vit_teacher, "--workdir", tmp_path / "w"]]
    args[args.index("feature_image_size=32")] = "feature_image_size=48"
    assert main(args) == 2
    err = cli_error(capsys)
    assert "feature_image_size 48 px does not fit the ViT image tower: it takes 32 px only" in err
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_vit_demo_psc_and_nsd(tmp_path):
    """`train.py --demo --demo-teacher vit` at tiny settings: teacher, PSC and NSD all run
    with a ViT teacher (its own image size and logit scale)."""
    out = run_train(
        [
            "--demo",
            "--demo-teacher",
            "vit",
            "--workdir",
            tmp_path,
            "--set",
            "teacher:steps=40",
            "--set",
            "psc:epochs=1",
            "--set",
            "psc:max_steps_per_epoch=2",
            "--set",
            "nsd:epochs=1",
            "--set",
            "nsd:max_steps_per_epoch=2",
        ]
    )
    meta = json.loads((tmp_path / "teacher_vit" / "config.json").read_text())
    assert meta["config"]["vision"]["family"] == "vit", out.stdout[-2000:]
    psc = json.loads((tmp_path / "psc" / "summary.json").read_text())
    nsd = json.loads((tmp_path / "nsd" / "summary.json").read_text())
    assert psc["teacher"] == nsd["teacher"] == "pand-demo-clip-vit:digits"
    assert np.isfinite(psc["best_top1"]) and np.isfinite(nsd["best_top1"])

"""The CLIP teacher against open_clip (PyTorch) and the converter CLI.

Parity tolerances: fp32 with JAX matmul precision "highest", relative to the reference's largest
magnitude, 1e-5 (a correct port lands near 1e-7 on these configs; tanh-GELU or a wrong LayerNorm
eps would show up at 1e-4..1e-2). bf16 compute: 2e-2 of the fp32 result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    cli_error,
    clip_embed,
    jit_call,
    max_rel,
    open_clip_checkpoint,
    random_open_clip,
    torch_state_dict,
)
from safetensors.numpy import save_file

from pand_jax.cli import convert as cli
from pand_jax.convert import open_clip as oc
from pand_jax.convert.open_clip import config_from_open_clip
from pand_jax.models import clip as clip_lib
from pand_jax.models.clip import CLIP, CLIPConfig, load_clip, save_clip
from pand_jax.weights import WeightsError

DEMOS = ["pand_demo_convnext", "pand_demo_convnext_eps5"]


@pytest.fixture(scope="module", params=DEMOS)
def pair(request):
    """(name, randomised open_clip model, its state dict, the converted NNX CLIP)."""
    torch_model, sd = random_open_clip(request.param, seed=DEMOS.index(request.param))
    model = oc.convert_state_dict(sd, config_from_open_clip(request.param))
    return request.param, torch_model, sd, model


def test_demo_configs_cover_both_eps():
    assert {config_from_open_clip(n).vision.ln_eps for n in DEMOS} == {1e-5, 1e-6}


def test_seeded_torch_model_ignores_the_global_generator():
    """The parity tests' models must not depend on what ran before them in the process (the
    suite's random draws once made one with near-zero logits)."""
    import torch

    first = torch_state_dict(oc.build_torch_model(DEMOS[0], seed=3))
    torch.randn(1000)
    second = torch_state_dict(oc.build_torch_model(DEMOS[0], seed=3))
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not np.array_equal(
        first["text_projection"],
        torch_state_dict(oc.build_torch_model(DEMOS[0]))["text_projection"],
    )


@pytest.mark.parametrize("image_size", [None, 32])  # native 64 px, and a smaller multiple of 32
def test_parity_fp32(pair, image_size):
    _, torch_model, _, model = pair
    diffs = oc.verify_clip(model, torch_model, batch=3, image_size=image_size, seed=1)
    for key in ("image", "text", "logits"):
        assert diffs[key]["rel"] < 1e-5, (key, diffs)


def test_every_parameter_randomised(pair):
    """A layer scale left at 1e-6 or an LN affine left at 1/0 would hide wrong blocks."""
    _, torch_model, sd, _ = pair
    for key, value in sd.items():
        assert np.unique(value).size > 0.9 * value.size, key  # no constant entries left
    assert not np.isclose(sd["logit_scale"], np.log(1 / 0.07))


def test_cut_text_equals_full_length(pair):
    _, _, _, model = pair
    _, tokens = oc.random_inputs(model.config, 4, 32, seed=3)
    eot = tokens.argmax(-1)
    cut = int(eot.max()) + 1
    # Inputs that exercise the cut: it drops padding, and some rows end before it.
    assert cut < tokens.shape[1] and eot.min() < eot.max(), (cut, eot)
    assert model.embed_tokens(tokens).shape == (*tokens.shape, model.config.text.width)

    def full_and_cut(m, tokens, eot):
        embeds = m.embed_tokens(tokens)[:, :cut]
        return m.encode_text(tokens), m.encode_text_embeds(embeds, eot)

    with jax.default_matmul_precision("highest"):
        full, short = jit_call(full_and_cut, model, tokens, eot)
    np.testing.assert_allclose(short, full, rtol=1e-6, atol=1e-6)


def test_bf16_close_to_fp32(pair):
    name, _, sd, model = pair
    bf16 = oc.convert_state_dict(sd, config_from_open_clip(name), dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    images, tokens = oc.random_inputs(model.config, 3, 64, seed=5)
    with jax.default_matmul_precision("highest"):
        want = jit_call(clip_embed, model, images, tokens)
    for lo, hi in zip(jit_call(clip_embed, bf16, images, tokens), want):
        assert lo.dtype == jnp.float32
        assert 0 < max_rel(lo, hi) < 2e-2  # > 0: it did compute in bf16


def test_config_json_round_trip_and_eps():
    for name, eps in (("convnext_xxlarge", 1e-5), ("convnext_base_w", 1e-6)):
        cfg = config_from_open_clip(name)
        assert cfg.vision.ln_eps == eps and cfg.text.ln_eps == 1e-5
        assert CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    d = json.loads(json.dumps(oc.DEMO_MODELS["pand_demo_convnext"]))
    assert config_from_open_clip(d) == config_from_open_clip("pand_demo_convnext")


def test_unsupported_model_is_rejected_naming_supported():
    with pytest.raises(ValueError, match="RN50 is not supported.*convnext_xxlarge"):
        config_from_open_clip("RN50")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        config_from_open_clip("no-such-model")


def test_full_size_structure_matches_open_clip():
    cfg = config_from_open_clip("convnext_xxlarge")
    abstract = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    assert clip_lib.param_count(abstract) == 1_200_576_385
    torch_model = oc.build_torch_model("convnext_xxlarge", device="meta")  # allocates nothing
    torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert len(torch_shapes) == 673
    assert oc.expected_shapes(abstract) == torch_shapes


def test_save_load_round_trip(pair, tmp_path):
    name, _, _, model = pair
    save_clip(tmp_path / "t", model, model=name, pretrained="none")
    loaded = load_clip(tmp_path / "t")
    assert loaded.config == model.config
    want = nnx.to_pure_dict(nnx.state(model))
    got = nnx.to_pure_dict(nnx.state(loaded))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
    assert json.loads((tmp_path / "t" / "config.json").read_text())["model"] == name
    bf16 = load_clip(tmp_path / "t", dtype=jnp.bfloat16)
    _, tokens = oc.random_inputs(model.config, 2, 64, seed=7)
    encode = nnx.jit(lambda m, t: m.encode_text(t))  # one program, not each op compiled alone
    assert 0 < max_rel(encode(bf16, tokens), encode(loaded, tokens)) < 2e-2


def test_load_missing_weights_says_how_to_create_them(tmp_path):
    with pytest.raises(WeightsError, match="python convert_weights.py"):
        load_clip(tmp_path / "nothing")


# ---------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A demo open_clip state dict on disk, and its model config as a JSON file."""
    d = tmp_path_factory.mktemp("ckpt")
    sd = open_clip_checkpoint(d / "demo.safetensors", "pand_demo_convnext", seed=11)
    (d / "demo.json").write_text(json.dumps(oc.DEMO_MODELS["pand_demo_convnext"]))
    return d, sd


def test_cli_converts_from_model_config_and_verifies(demo_checkpoint, tmp_path, capsys):
    d, _ = demo_checkpoint
    rc = cli.main(
        [
            "--checkpoint",
            str(d / "demo.safetensors"),
            "--model-config",
            str(d / "demo.json"),
            "--out",
            str(tmp_path / "w"),
            "--verify",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "158,753 parameters" in out and "verify passed" in out
    assert load_clip(tmp_path / "w").config == config_from_open_clip("pand_demo_convnext")


def test_cli_verify_fails_above_tolerance(demo_checkpoint, tmp_path, capsys):
    d, _ = demo_checkpoint
    rc = cli.main(
        [
            "--checkpoint",
            str(d / "demo.safetensors"),
            "--model",
            "pand_demo_convnext",
            "--out",
            str(tmp_path / "w"),
            "--verify",
            "--tolerance",
            "1e-12",
        ]
    )
    assert rc == 1 and "verify FAILED" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # weights that failed --verify are not written


def test_cli_demo_model(tmp_path, capsys):
    assert cli.main(["--demo-model", "--verify", "--out", str(tmp_path / "demo")]) == 0
    assert "verify passed" in capsys.readouterr().out
    assert load_clip(tmp_path / "demo").config.vision.image_size == 64


def test_cli_missing_file(tmp_path, capsys):
    rc = cli.main(["--checkpoint", str(tmp_path / "nope.bin"), "--out", str(tmp_path / "w")])
    assert rc == 2 and "checkpoint file not found" in cli_error(capsys)
    (tmp_path / "empty.bin").touch()
    rc = cli.main(
        ["--checkpoint", str(tmp_path / "empty.bin"), "--model-config", str(tmp_path / "nope.json")]
    )
    assert rc == 2 and "model config file not found" in cli_error(capsys)


def test_cli_wrong_model(demo_checkpoint, capsys):
    d, _ = demo_checkpoint
    rc = cli.main(["--checkpoint", str(d / "demo.safetensors"), "--model", "RN50"])
    err = cli_error(capsys)
    assert rc == 2 and "RN50 is not supported" in err and "convnext_xxlarge" in err
    # A supported model of another architecture: the first tensor (in model order) that differs.
    rc = cli.main(["--checkpoint", str(d / "demo.safetensors"), "--model", "ViT-B-32"])
    assert rc == 2 and (
        "the checkpoint is not a ViT-B-32: token_embedding.weight is (500, 32) "
        "in it but (49408, 512) in ViT-B-32" in cli_error(capsys)
    )


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda sd: sd.pop("visual.trunk.stages.1.blocks.0.gamma"),
            "missing keys (1): visual.trunk.stages.1.blocks.0.gamma",
        ),
        (
            lambda sd: sd.update(extra_weight=np.zeros(3, np.float32)),
            "unexpected keys (1): extra_weight",
        ),
        (
            lambda sd: sd.update(
                {"transformer.resblocks.1.attn.in_proj_weight": np.zeros((96, 33), np.float32)}
            ),
            "the checkpoint is not a pand_demo_convnext: "
            "transformer.resblocks.1.attn.in_proj_weight "
            "is (96, 33) in it but (96, 32) in pand_demo_convnext (1 of 94 tensors differ)",
        ),
    ],
)
def test_cli_bad_checkpoint(demo_checkpoint, tmp_path, capsys, edit, expected):
    _, sd = demo_checkpoint
    sd = dict(sd)
    edit(sd)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    rc = cli.main(
        [
            "--checkpoint",
            str(tmp_path / "bad.safetensors"),
            "--model",
            "pand_demo_convnext",
            "--out",
            str(tmp_path / "w"),
        ]
    )
    assert rc == 2 and expected in cli_error(capsys)
    assert not (tmp_path / "w").exists()


def test_cli_download_failure_says_pass_checkpoint(monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert cli.main([]) == 2
    err = cli_error(capsys)
    assert "could not download laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup" in err
    assert "--checkpoint FILE" in err


@pytest.fixture
def student_calls(monkeypatch):
    """Replaces the torchvision student converter (tested with the students) by a recorder."""
    calls = []

    def fake(arch, checkpoint=None, out=None, verify=False):
        calls.append((arch, checkpoint, out, verify))

    try:
        import pand_jax.convert.torchvision as tv
    except ImportError:
        tv = types.ModuleType("pand_jax.convert.torchvision")
        monkeypatch.setitem(sys.modules, tv.__name__, tv)
    monkeypatch.setattr(tv, "convert_student", fake, raising=False)
    return calls


def test_cli_default_run_converts_teacher_and_both_students(monkeypatch, student_calls):
    teacher = []
    monkeypatch.setattr(cli, "convert_teacher", lambda args: teacher.append(args) or 0)
    assert cli.main([]) == 0
    assert len(teacher) == 1 and teacher[0].out is None
    assert student_calls == [
        ("resnet18", None, cli.WEIGHTS / "resnet18", False),
        ("mobilenet_v2", None, cli.WEIGHTS / "mobilenet_v2", False),
    ]


def test_cli_student_dispatch(student_calls, tmp_path):
    ckpt = tmp_path / "mnv2.pth"
    assert (
        cli.main(
            [
                "--student",
                "mobilenet_v2",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(tmp_path / "s"),
                "--verify",
            ]
        )
        == 0
    )
    assert student_calls == [("mobilenet_v2", ckpt, tmp_path / "s", True)]


def test_cli_script_prints_one_line_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "convert_weights.py",
            "--checkpoint",
            str(tmp_path / "missing.safetensors"),
        ],
        capture_output=True,
        text=True,
        cwd=__file__.rsplit("/tests/", 1)[0],
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint file not found: {tmp_path / 'missing.safetensors'}"
    ]


@pytest.mark.slow
def test_full_size_random_weight_parity():
    """convnext_xxlarge with random weights (about 10 GB of RAM, minutes on CPU)."""
    torch_model = oc.build_torch_model("convnext_xxlarge")
    oc.randomize_torch_model(torch_model, seed=0)
    sd = torch_state_dict(torch_model)
    model = oc.convert_state_dict(sd, config_from_open_clip("convnext_xxlarge"))
    del sd
    diffs = oc.verify_clip(model, torch_model, batch=1)
    for key in ("image", "text", "logits"):
        assert diffs[key]["rel"] < 1e-5, (key, diffs)

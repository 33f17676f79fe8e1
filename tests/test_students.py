"""Students against torchvision: eval/train parity, sync BN under a mesh, conversion, bf16.

CPU only, no network: torchvision models get random weights and random BatchNorm statistics.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from conftest import cpu_env
from flax import nnx
from flax.traverse_util import flatten_dict

from pand_jax.convert.state_dict import ConversionError, relative_diff
from pand_jax.convert.torchvision import (
    convert_student,
    student_from_state_dict,
    torchvision_outputs,
    torchvision_to_nnx,
)
from pand_jax.models.student import (
    ARCHS,
    Student,
    load_student,
    save_student,
    student_from_pretrained,
)
from pand_jax.weights import WeightsError

SIZE = 64  # smallest input that keeps every stage's feature map above 1x1 (2x2 at the end)
BATCH = 3
TOL = 1e-5


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def random_torchvision(arch: str, seed: int = 0, num_classes: int = 1000):
    """torchvision model with every parameter and every BatchNorm statistic random."""
    with torch.random.fork_rng():  # seeded here, the global generator untouched
        torch.manual_seed(seed)
        tv = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        with torch.no_grad():
            for name, p in tv.named_parameters():
                if p.ndim == 1:  # BN scale/shift and linear bias start at constants
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
                else:
                    p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            for m in tv.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
        return tv.eval()


def numpy_state_dict(tv) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in tv.state_dict().items()}


def images(n: int = BATCH, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3), np.float32)


@nnx.jit
def forward(model: Student, x):
    features = model.features(x)
    return model.classifier(features), features


def assert_close(got, want, tol=TOL, what=""):
    abs_diff, rel = relative_diff(np.asarray(got), np.asarray(want))
    assert rel < tol, f"{what}: relative {rel:.3e} (abs {abs_diff:.3e}) > {tol:g}"


def test_students_param_counts_match_torchvision():
    for arch, expected in (("resnet18", 11_689_512), ("mobilenet_v2", 3_504_872)):
        model = nnx.eval_shape(lambda arch=arch: Student(arch, 1000, rngs=nnx.Rngs(0)))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert n == expected, arch


@pytest.mark.parametrize("arch", ARCHS)
def test_students_eval_parity(arch):
    tv = random_torchvision(arch)
    model = student_from_state_dict(arch, numpy_state_dict(tv))
    x = images()
    want_logits, want_features = torchvision_outputs(tv, x)
    logits, features = forward(model, x)
    assert features.shape == (BATCH, model.num_features) and features.dtype == jnp.float32
    assert_close(features, want_features, what="features")
    assert_close(logits, want_logits, what="logits")


@pytest.mark.parametrize("arch", ARCHS)
def test_students_train_parity(arch):
    """One training-mode forward: same outputs and same running statistics as PyTorch (whose
    running_var takes the unbiased batch variance).

    Judged against torchvision in float64: batch statistics of a 3-image batch renormalise every
    layer, which amplifies fp32 rounding to ~2e-5 relative in MobileNet-V2 for torchvision itself,
    so the bar is "as exact as torchvision's own fp32" (and never looser than 1e-5)."""
    tv = random_torchvision(arch, seed=1)
    model = student_from_state_dict(arch, numpy_state_dict(tv))
    tv64 = copy.deepcopy(tv).double()
    for m in (tv, tv64):
        m.train()
        if arch == "mobilenet_v2":
            m.classifier[0].eval()  # our head has no dropout
    model.train()
    x = images(seed=1)
    want32 = torchvision_outputs(tv, x)
    want64 = torchvision_outputs(tv64, x.astype(np.float64))
    got = forward(model, x)

    def assert_as_exact_as_torch(ours, torch32, exact, what):
        bound = max(TOL, 2 * relative_diff(torch32, exact)[1])
        assert_close(ours, exact, tol=bound, what=what)

    for name, ours, torch32, exact in zip(("logits", "features"), got, want32, want64):
        assert_as_exact_as_torch(ours, torch32, exact, name)
    stats32 = flatten_dict(torchvision_to_nnx(arch, numpy_state_dict(tv)))
    stats64 = flatten_dict(torchvision_to_nnx(arch, numpy_state_dict(tv64)))  # rounded to fp32
    ours = flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    assert len(ours) == sum(1 for p in stats64 if p[-1] in ("mean", "var"))
    for path, value in ours.items():
        assert_as_exact_as_torch(value, stats32[path], stats64[path], str(path))


SYNC_BN_SCRIPT = textwrap.dedent("""
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    from flax import nnx
    from pand_jax import devices
    from pand_jax.models.student import Student

    model = Student("resnet18", 10, dtype=jnp.float64, rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = jax.tree.map(lambda v: v.astype(jnp.float64), (params, stats))
    x = np.random.default_rng(0).standard_normal((16, 64, 64, 3))

    def step(params, stats, x):
        def loss(params):
            m = nnx.merge(graphdef, params, stats, copy=True)
            logits = m(x)
            return (logits ** 2).mean(), (logits, nnx.state(m, nnx.BatchStat))
        (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return aux, grads

    single = jax.jit(step)(params, stats, jax.device_put(x, jax.devices()[0]))
    # As training shards: the mesh of pand_jax.devices, replicated state, batch split 2 per device.
    mesh = devices.make_mesh()
    sharded_x = jax.device_put(x, devices.batch_sharded(mesh))
    sharded = jax.jit(step)(*devices.replicate(mesh, (params, stats)), sharded_x)

    leaves = [
        (np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded))
    ]
    print(json.dumps({
        "devices": jax.device_count(),
        "batch_devices": len(sharded_x.sharding.device_set),
        "leaves": len(leaves),
        "same_tree": jax.tree.structure(single) == jax.tree.structure(sharded),
        "shapes_equal": all(a.shape == b.shape for a, b in leaves),
        "worst": max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)) for a, b in leaves),
    }))
""")


def test_students_sync_batchnorm_on_8_device_mesh():
    """Batch sharded over 8 CPU devices: BN statistics (and gradients) are global-batch ones.

    The subprocess reports the worst relative difference over every leaf of (logits, BN
    statistics, gradients) between the single-device step and the step with the batch split 2
    per device. Statistics of each device's 2 images would put them off at O(1) (2.6 measured).
    In float64 because fp32 cannot tell: a ReLU input within fp32 rounding of 0 (1.3e-6 here,
    layer2.0 channel 76) switches on or off with the summation order and moves that channel's
    weight gradient by 4% (JAX 0.12 sums the sharded batch in another order than 0.10 does).
    float64 runs agree to 1.6e-14; 1e-9 leaves wide margins both ways."""
    env = cpu_env(8)
    proc = subprocess.run(
        [sys.executable, "-c", SYNC_BN_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["devices"] == 8 and got["batch_devices"] == 8, got
    # Compared: the logits, every BatchNorm statistic and every parameter's gradient.
    model = nnx.eval_shape(lambda: Student("resnet18", 10, rngs=nnx.Rngs(0)))
    stats = len(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert stats > 0 and got["leaves"] == 1 + stats + params and got["same_tree"], got
    assert got["shapes_equal"], got
    assert got["worst"] < 1e-9, got


@pytest.mark.parametrize("arch", ARCHS)
def test_students_convert_round_trip(arch, tmp_path, capsys):
    tv = random_torchvision(arch, seed=2)
    checkpoint = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), checkpoint)
    out = convert_student(arch, checkpoint, out=tmp_path / arch, verify=arch == "resnet18")
    printed = capsys.readouterr().out
    assert str(out) in printed and "parameters" in printed

    model = load_student(out)
    assert model.num_classes == 1000 and model.arch == arch
    x = images(seed=2)
    want_logits, _ = torchvision_outputs(tv, x)
    assert_close(forward(model, x)[0], want_logits, what="logits after load")

    student = student_from_pretrained(out, 7, rngs=nnx.Rngs(3))
    assert student.classifier.kernel.shape == (model.num_features, 7)
    assert (
        not student.backbone.features[0][1].use_running_average
        if arch == "mobilenet_v2"
        else not student.backbone.bn1.use_running_average
    )
    student.eval()
    assert_close(forward(student, x)[1], forward(model, x)[1], what="pretrained backbone")


def test_students_save_load_trained_head(tmp_path):
    model = Student("resnet18", 5, rngs=nnx.Rngs(0))
    save_student(tmp_path / "s", model, dataset="cub")
    loaded = load_student(tmp_path / "s")
    assert loaded.num_classes == 5
    np.testing.assert_array_equal(loaded.classifier.kernel[...], model.classifier.kernel[...])


def test_students_conversion_errors(tmp_path):
    with pytest.raises(ConversionError, match="not found"):
        convert_student("resnet18", tmp_path / "missing.pth", out=tmp_path / "o")
    with pytest.raises(ValueError, match="resnet18, mobilenet_v2"):
        convert_student("resnet50", tmp_path / "missing.pth", out=tmp_path / "o")
    with pytest.raises(ValueError, match="resnet18, mobilenet_v2"):
        Student("vit", 10, rngs=nnx.Rngs(0))

    sd = numpy_state_dict(random_torchvision("resnet18"))
    with pytest.raises(ConversionError, match="unexpected keys"):
        torchvision_to_nnx("mobilenet_v2", sd)  # a ResNet checkpoint passed as MobileNet
    broken = dict(sd)
    del broken["layer2.0.downsample.1.running_var"]
    with pytest.raises(ConversionError, match="missing keys.*layer2.0.downsample.1.running_var"):
        torchvision_to_nnx("resnet18", broken)
    broken = dict(sd, **{"layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match="shape mismatch for layer1.0.conv1.weight"):
        torchvision_to_nnx("resnet18", broken)

    with pytest.raises(WeightsError, match="python convert_weights.py --student resnet18"):
        load_student(tmp_path / "resnet18")


def test_students_offline_download_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConversionError, match="--checkpoint"):
        convert_student("mobilenet_v2", out=tmp_path / "o")


@pytest.mark.parametrize("arch", ARCHS)
def test_students_bf16_close_to_fp32(arch):
    """bf16 compute: params and BN statistics stay fp32, outputs within bf16 rounding of fp32.

    Outputs are compared in eval mode: in train mode a 3-image batch leaves some random-weight
    channels with variance far below eps, and BatchNorm then multiplies rounding error by up to
    1/sqrt(eps) ~ 300 (torchvision's own fp32 shows it, see the train-parity test)."""
    sd = numpy_state_dict(random_torchvision(arch, seed=3))
    fp32 = student_from_state_dict(arch, sd)
    bf16 = Student(arch, 1000, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(fp32))
    bf16.eval()
    x = images(seed=3)
    logits32, features32 = forward(fp32, x)
    logits16, features16 = forward(bf16, x)
    assert logits16.dtype == features16.dtype == jnp.float32
    # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few percent through 20-50 layers.
    assert_close(features16, features32, tol=5e-2, what="bf16 features")
    assert_close(logits16, logits32, tol=5e-2, what="bf16 logits")

    for model in (fp32, bf16):
        model.train()
        forward(model, x)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(bf16, nnx.Param, nnx.BatchStat))} == {
        np.dtype(np.float32)
    }
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(nnx.state(bf16, nnx.BatchStat)))
    # The first BatchNorm's statistics (before any amplification): fp32 sums of bf16 activations.
    stem32, stem16 = (
        flatten_dict(nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))) for m in (fp32, bf16)
    )
    stem_bn = {"resnet18": ("backbone", "bn1"), "mobilenet_v2": ("backbone", "features", 0, 1)}
    stem = [p for p in stem32 if p[:-1] == stem_bn[arch]]
    assert len(stem) == 2
    for path in stem:
        assert_close(stem16[path], stem32[path], tol=1e-2, what=f"bf16 {path}")

"""The teacher sharded over the data axis (`teacher_sharding: fsdp`): the same steps as the
replicated teacher on 8 fake CPU devices, less memory per device, and PSC and NSD steps that
lower for CUDA and TPU with nothing of the CPU's custom calls in them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, cpu_env
from jax.sharding import PartitionSpec as P

from pand_jax import devices

SCRIPT = REPO / "tests" / "sharding_script.py"


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    env = cpu_env(8, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return {r["family"]: r for r in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("family", ["convnext", "vit"])
def test_fsdp_teacher_gives_the_replicated_steps(reports, family):
    r = reports[family]
    assert r["devices"] == 8
    # The partitioner gathers each weight before it is used, so the arithmetic is the
    # replicated one; 1e-6 allows a reordered sum of the fp32 losses and updates.
    assert abs(r["nsd_loss"][0] - r["nsd_loss"][1]) <= 1e-6 * abs(r["nsd_loss"][0]), r["nsd_loss"]
    assert r["nsd_params_max_abs_diff"] < 1e-6
    assert abs(r["psc_loss"][0] - r["psc_loss"][1]) <= 1e-6 * abs(r["psc_loss"][0]), r["psc_loss"]
    assert r["psc_ctx_max_abs_diff"] < 1e-6


@pytest.mark.parametrize("family", ["convnext", "vit"])
def test_fsdp_teacher_holds_an_eighth_per_device(reports, family):
    r = reports[family]
    for stage in ("nsd", "psc"):  # the image tower; the text tower's layers
        rep = r[f"{stage}_teacher_bytes_per_device_replicated"]
        fsdp = r[f"{stage}_teacher_bytes_per_device_fsdp"]
        # every leaf of these towers but a few biases, norms and scalars has an axis 8 divides
        assert fsdp < rep / 6, (stage, rep, fsdp)
        # XLA's memory analysis of the compiled step: its arguments (the teacher weights it
        # reads, the trained state, the batch) shrink by what those weights save per device
        saved = r[f"{stage}_argument_bytes_replicated"] - r[f"{stage}_argument_bytes_fsdp"]
        assert abs(saved - (rep - fsdp)) <= 0.02 * rep, (stage, saved, rep - fsdp)


@pytest.mark.parametrize("family", ["convnext", "vit"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("stage", ["psc", "nsd"])
def test_steps_lower_for_accelerators_without_cpu_custom_calls(reports, family, platform, stage):
    r = reports[family]
    key = f"{stage}_{platform}_" + "{}"
    for sharding in ("replicated", "fsdp"):
        assert r[f"{key.format(sharding)}_cpu_custom_calls"] == [], key.format(sharding)
    # the batch is split over the mesh's "data" axis in both; with fsdp the weights too
    replicated = r[f"{key.format('replicated')}_data_sharded_values"]
    assert replicated >= 1
    assert r[f"{key.format('fsdp')}_data_sharded_values"] >= replicated + 10


def test_fsdp_spec_takes_the_largest_axis_the_devices_divide():
    assert devices.fsdp_spec((640, 3, 3, 1024), 8) == P(None, None, None, "data")
    assert devices.fsdp_spec((1024, 640), 8) == P("data")
    assert devices.fsdp_spec((7, 3), 8) == P()  # none: replicated
    assert devices.fsdp_spec((), 8) == P()  # a scalar
    assert devices.fsdp_spec((1024, 640), 1) == P()
    with pytest.raises(ValueError, match="unknown teacher_sharding 'zero3'"):
        devices.place_frozen(devices.make_mesh(), {}, "zero3")

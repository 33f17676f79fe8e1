"""The bench/ scripts at their smallest settings: each runs to the end and its summary agrees
with its own figures (ratios are the quotients of the printed rates, exports match the Flax
model). Timings themselves are never asserted; they are for bench/RESULTS.md."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO


def run_bench(script: str, *args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (
        f"bench/{script} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row (header rows included, separator rows not)."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def number(cell: str) -> float:
    return float(cell.rstrip("x").replace(",", "").split()[0])


def assert_ratio(printed: str, top: float, bottom: float) -> None:
    """`printed` is top / bottom rounded to 2 decimals, from figures rounded to 1 decimal."""
    slack = 0.005 + (0.05 / bottom + 0.05 * top / bottom**2)
    assert math.isclose(number(printed), top / bottom, abs_tol=slack), (printed, top, bottom)


def test_student_rows_and_ratios():
    text = run_bench(
        "student.py",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--steps",
        "1",
        "--size",
        "32",
        "--arch",
        "resnet18",
        "--precision",
        "fp32",
        "--mode",
        "train",
        "eval",
    )
    header, *rows = table_rows(text)
    assert header == [
        "arch",
        "px",
        "precision",
        "mode",
        "flax fast img/s",
        "torch img/s",
        "fast/torch",
    ]
    assert [row[:4] for row in rows] == [
        ["resnet18", "32", "fp32", "train"],
        ["resnet18", "32", "fp32", "eval"],
    ]
    for *_, flax, torch, ratio in rows:
        assert_ratio(ratio, number(flax), number(torch))


def test_inference_exports_match_flax():
    text = run_bench("inference.py", "--batch", "2", "--size", "32", "--iters", "1")
    header, *rows = table_rows(text)
    assert [row[0] for row in rows] == ["resnet18", "mobilenet_v2"]
    for row in rows:
        cells = dict(zip(header, row))
        assert all(number(cells[k]) > 0 for k in header if k.endswith("img/s"))
        # the torchvision and ONNX exports against the Flax model: fp32 rounding only
        assert number(cells["torchvision rel. err"]) < 1e-5
        assert number(cells["onnxruntime rel. err"]) < 1e-5


def test_losses_match_pytorch_and_speedups_add_up():
    text = run_bench("losses.py", "--device", "cpu", "--reps", "1")
    header, *rows = table_rows(text)
    assert {row[0] for row in rows} == {"nsd_batch", "nsd_paper"}
    for row in rows:
        cells = dict(zip(header, row))
        assert number(cells["rel. loss diff"]) < 1e-5
        jax_ms = number(cells["JAX jit fwd+bwd (ms)"])
        torch_ms = number(cells["PyTorch fwd+bwd (ms)"])
        assert math.isclose(
            number(cells["speed-up"]), torch_ms / jax_ms, rel_tol=0.01, abs_tol=0.01
        )


# The CUB-200 run the nsd_step projections are for: its split sizes and the paper's epochs.
CUB_TRAIN, CUB_TEST, NSD_EPOCHS, PSC_EPOCHS, PSC_BATCH = 5994, 5794, 300, 200, 128


def test_nsd_step_summary_matches_its_rates():
    """The script whose summary line once crashed after every measurement. Its table prints the
    summary's rates, and its ratios and projected run times are those rates' (recomputed here
    from the CUB split sizes and the paper's epochs)."""
    text = run_bench(
        "nsd_step.py", "--size", "small", "--device", "cpu", "--steps", "1", "--views", "3"
    )
    summary = json.loads(text.strip().splitlines()[-1])
    rates, projected = summary["rates"], summary["projection_s"]
    assert set(rates) >= {"online", "cached", "torch", "student_eval"}
    assert all(v > 0 for v in rates.values())
    printed = {row[0]: row[1] for row in table_rows(text)}
    for name in ("online", "cached", "torch", "teacher_views", "teacher_features", "student_eval"):
        assert math.isclose(number(printed[name]), rates[name], abs_tol=0.05 + 1e-9), name
    for name in ("psc_step_s", "psc_anchors_s"):
        assert math.isclose(number(printed[name]), 1e3 * rates[name], abs_tol=0.05 + 1e-9), name
    assert math.isclose(
        number(printed["cached / torch"]), rates["cached"] / rates["torch"], abs_tol=0.005
    )
    assert math.isclose(
        number(printed["cached / online"]), rates["cached"] / rates["online"], abs_tol=0.005
    )

    batch = int(text.split("; batch ")[1].split(";")[0])
    images = NSD_EPOCHS * (CUB_TRAIN // batch) * batch  # whole batches, every epoch
    evaluations = NSD_EPOCHS * CUB_TEST / rates["student_eval"]
    cache = 3 * CUB_TRAIN / rates["teacher_views"]
    features = (CUB_TRAIN + CUB_TEST) / rates["teacher_features"]
    want = {
        "nsd_online_s": images / rates["online"] + evaluations,
        "nsd_cached_s": cache + images / rates["cached"] + evaluations,
        "nsd_torch_s": images / rates["torch"] + evaluations,
        "cache_build_s": cache,
        "psc_s": (
            features
            + PSC_EPOCHS * (CUB_TRAIN // PSC_BATCH) * rates["psc_step_s"]
            + PSC_EPOCHS * 2 * rates["psc_anchors_s"]
        ),
        "psc_features_s": features,
    }
    assert projected.keys() == want.keys()
    for name, seconds in want.items():
        assert math.isclose(projected[name], seconds, rel_tol=1e-9), name
        assert math.isclose(
            number(printed[f"projected {name} (CUB, V=3)"]), seconds / 60, abs_tol=0.05 + 1e-9
        ), name


def test_teacher_section_is_appended_with_consistent_ratios(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    run_bench(
        "teacher.py", "--size", "small", "--batch", "1", "--iters", "1", "--append", str(results)
    )
    text = results.read_text()
    assert text.startswith("# earlier results\n") and "## Teacher image tower" in text
    rows = {(row[0], row[1]): row[2] for row in table_rows(text) if row[0] != "px"}
    for px in ("224", "256"):
        for flax, torch in (("Flax fp32", "PyTorch fp32"), ("Flax bf16", "PyTorch bf16 autocast")):
            assert_ratio(
                rows[(px, f"{flax} / {torch}")], number(rows[(px, flax)]), number(rows[(px, torch)])
            )


@pytest.mark.parametrize(
    "args, row",
    [
        (("--only", "512-512 @7"), "resnet18 3x3 512-512 @7"),
        (("--rule", "--only", "512-512 @2"), "3x3 512-512 @2 (batch 16)"),
    ],
)
def test_cpu_ops_rows(args, row):
    header, *rows = table_rows(run_bench("cpu_ops.py", *args))
    assert [r[0] for r in rows] == [row]
    figures = rows[0][1:-1] if "--rule" in args else rows[0][1:]
    assert all(number(f) > 0 for f in figures)
    if "--rule" in args:  # a 3x3 conv onto a 2x2 map is where the matmul form is chosen
        assert rows[0][-1] == "matmul"


def test_data_rates_are_the_images_counted_over_the_seconds_measured():
    """Each printed rate is its measurement's images over its seconds (the JSON summary's), and
    the images are those the settings make: one epoch of whole batches of the 16-image split
    (train drops the remainder), 20 from the cache, the split once into the cache, and
    --device-batch x --device-steps augmented to 224 px."""
    text = run_bench(
        "data.py", "--images", "16", "--batch", "8", "--device-batch", "4", "--device-steps", "1"
    )
    rates = [line for line in text.splitlines() if line.endswith("img/s") or "img/s (" in line]
    assert len(rates) == 4, text[-2000:]
    assert all(number(line.split(": ")[1]) > 0 for line in rates)
    summary = json.loads(text.strip().splitlines()[-1])
    host, device = summary["host"], summary["device"]
    assert (host["threads"], host["batch"], host["split"]) == (8, 8, 16)
    assert f"cpu cores: {host['cpu_cores']}  threads: 8  batch: 8" in text.splitlines()
    assert (host["decode"]["images"], host["decode"]["epochs"]) == (16, 1)
    assert (host["cached"]["images"], host["cached"]["epochs"]) == (20 * 16, 20)
    assert host["cache_build"]["images"] == 16
    assert (device["images"], device["batch"]) == (4 * 1, 4)
    assert device["output_shape"] == [4, 224, 224, 3]
    measured = [host["decode"], host["cache_build"], host["cached"], device]
    for line, m in zip(rates, measured, strict=True):
        assert m["seconds"] > 0, line
        # printed with no decimals
        assert math.isclose(
            number(line.split(": ")[1]), m["images"] / m["seconds"], abs_tol=0.5 + 1e-9
        ), (line, m)
    assert rates[-1].startswith(f"device augment released 256->224 on {device['device']}: ")
    assert rates[-1].endswith("img/s (batch 4)")


def test_soft_label_bytes_follow_the_cache_layout_and_ratios_add_up():
    """Bytes per view are the stored fields' (bf16 embedding: 2 D; ms:K: K int16 indices + K
    fp16 values; hard: one of each), the projected caches N V bytes/view."""
    text = run_bench("soft_labels.py", "--examples", "40", "--views", "1", "--batch", "32")
    rows = [row for row in table_rows(text) if row[0] != "labels"]
    demo_rows = [row for row in rows if len(row) == 6]  # the demo table, then CUB's of 5
    cub_rows = [row for row in rows if len(row) == 5]
    assert [(r[0], r[1]) for r in demo_rows] == [
        ("embedding", "128"),
        ("ms:5", "20"),
        ("hard", "4"),
    ]
    embedding = number(demo_rows[0][3])
    for _, _, _, seconds, _, ratio in demo_rows:
        assert_ratio(ratio, number(seconds), embedding)
    sizes = {r[0]: number(r[1]) for r in cub_rows}
    assert sizes == {
        "embedding (bfloat16)": 2048,
        "embedding (float32)": 4096,
        "ms:10": 40,
        "ms:5": 20,
        "hard": 4,
    }
    for name, size, v4, v500, ratio in cub_rows:
        assert math.isclose(number(v4), number(size) * 5994 * 4 / 1e6, abs_tol=0.05), name
        assert math.isclose(number(v500), number(size) * 5994 * 500 / 1e6, abs_tol=0.05), name
        assert math.isclose(number(ratio), number(size) / 2048, abs_tol=5e-5), name

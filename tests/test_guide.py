"""docs/guide.md runs as written: each of its ```bash blocks, in order, in a fresh folder that
holds the repository's entry scripts and its Python at `.venv`, so the guide cannot rot.

One command is stood in for: `train.py --demo` (minutes: it trains the demo teacher, then
the whole demo) is replaced by the session's tiny random CLIP at `runs/demo/teacher`, where the
demo leaves its teacher. The guide's own --set flags keep the rest to seconds of training."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from conftest import REPO
from PIL import Image

GUIDE = REPO / "docs" / "guide.md"
DEMO_TEACHER = ".venv/bin/python train.py --demo"
SCRIPTS = ("train.py", "evaluate.py", "export.py", "predict.py")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def test_the_guide_runs_as_written(teacher, tmp_path):
    blocks = bash_blocks(GUIDE.read_text())
    assert [b.strip() for b in blocks].count(DEMO_TEACHER) == 1 and len(blocks) >= 6
    for name in SCRIPTS:
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / ".venv").symlink_to(sys.prefix)  # .venv/bin/python: the Python running pytest
    shutil.copytree(teacher, tmp_path / "runs" / "demo" / "teacher")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    outputs = []
    for block in blocks:
        if block.strip() == DEMO_TEACHER:
            continue
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, f"{block}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
        outputs.append((block, out.stdout))
    # What the guide says each step leaves behind.
    assert (tmp_path / "runs/shapes/psc/anchors.npz").is_file()
    assert (tmp_path / "runs/shapes/nsd/student").is_dir()
    for name in ("confusion.png", "mistakes.png"):
        with Image.open(tmp_path / "runs/shapes/eval" / name) as img:
            assert img.size[0] > 500
    assert (tmp_path / "deploy/student.onnx.json").is_file()
    predictions = next(o for b, o in outputs if "onnxruntime" in b).strip().splitlines()
    assert len(predictions) == 12 and all(line.startswith("shapes/test/") for line in predictions)
    # the label-free student: trained on the 24 images without labels, scored on the 12
    summary = json.loads((tmp_path / "runs/shapes/promptkd/summary.json").read_text())
    assert summary["method"] == "promptkd"
    assert summary["train_examples"] == summary["unlabeled_examples"] == 24
    metrics = json.loads((tmp_path / "runs/shapes/promptkd-eval/metrics.json").read_text())
    assert metrics["num_examples"] == 12 and metrics["student"] == "runs/shapes/promptkd"
